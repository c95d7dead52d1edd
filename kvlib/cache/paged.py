"""The paged cache: keys and values in fixed-size blocks drawn from one shared pool.

Storage is one array per K and V, `[n_layers, num_blocks, n_kv_heads, block_size,
head_dim]`. A sequence owns no storage of its own: its *block table* lists the physical
blocks that hold its tokens, in order, so token `t` of a sequence lives in block
`table[t // block_size]` at offset `t % block_size`. Flattening (block, offset) gives
the *slot*, `slot = block * block_size + offset`, the one number a write needs.

Because a table only names blocks, two tables can name the same block: `fork` shares
every block of a sequence (reference counts say how many tables hold each), and the
first write into a shared block copies it first (copy-on-write). Full blocks of known
prompts are keyed by a hash of their prefix, so a later request that starts with the
same tokens reuses them instead of recomputing them (the prefix cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import CapacityError, ConfigError, LengthError, OutOfBlocksError
from .base import StepPlan, attention_kernel
from .block_pool import BlockPool, block_pool_nbytes, prefix_keys
from .rows import SequenceRows


def blocks_for(n_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `n_tokens` tokens: ceil(n_tokens / block_size)."""
    return -(-n_tokens // block_size)


def paged_cache_nbytes(n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                       block_size: int, max_seqs: int, max_seq_len: int,
                       dtype=np.float32) -> int:
    """Bytes a `PagedCache` with these arguments allocates, metadata included.

    K and V: 2 · layers · blocks · kv_heads · block_size · head_dim · bytes/element;
    the pool's per-block books (`block_pool_nbytes`); and per sequence row a block table
    of ceil(max_seq_len / block_size) int32 entries plus its table length (int32),
    token length (int64) and in-use flag (bool).
    """
    kv = 2 * n_layers * num_blocks * n_kv_heads * block_size * head_dim * np.dtype(dtype).itemsize
    per_row = blocks_for(max_seq_len, block_size) * 4 + 4 + 8 + 1
    return kv + block_pool_nbytes(num_blocks) + max_seqs * per_row


@dataclass(frozen=True)
class PagedStepPlan(StepPlan):
    """A `StepPlan` plus what the paged cache needs for it.

    Attributes (besides `StepPlan`'s):
        new_blocks: per sequence, blocks to append to its table (from `check`).
        copies: per sequence, table indices to copy before writing (copy-on-write).
        slots: [n_tokens] int64 slot of every new token (None until `reserve`).
        tables: [B, max blocks] int32 block tables of the step, -1 padded (None until
            `reserve`); built once per step for every layer's kernel call.
    """

    new_blocks: tuple[int, ...] = ()
    copies: tuple[tuple[int, ...], ...] = ()
    slots: np.ndarray | None = None
    tables: np.ndarray | None = None


class PagedCache(SequenceRows):
    """KV cache in `num_blocks` blocks of `block_size` tokens, shared by all sequences.

    Args:
        n_layers, n_kv_heads, head_dim: the model's KV shape (see `from_config`).
        num_blocks: physical blocks in the pool.
        block_size: token slots per block.
        max_seqs: most sequences alive at once (rows of the block-table array).
        max_seq_len: most tokens one sequence may hold (sets the table width).
        dtype: storage type of keys/values (float32 or float16); attention runs in float32.

    Attributes:
        keys, values: [n_layers, num_blocks, n_kv_heads, block_size, head_dim].
        block_tables: [max_seqs, ceil(max_seq_len / block_size)] int32, -1 = no block.
        table_lengths: [max_seqs] int32 blocks in each row's table.
        lengths: [max_seqs] int64 tokens stored per row.
        in_use: [max_seqs] bool, rows holding a live sequence (a sequence's id is its
            row: `SequenceRows`).
        pool: the `BlockPool` (free list, reference counts, prefix index).
        prefix_hit_tokens, prefix_query_tokens: prompt tokens found in the prefix cache
            and prompt tokens looked up, since construction.

    `reset` frees every sequence; the prefix cache survives it (`clear_prefix_cache`
    drops it).
    """

    STORAGE = ("keys", "values")

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, max_seqs: int = 64, max_seq_len: int = 2048,
                 dtype=np.float32) -> None:
        if block_size < 1 or max_seqs < 1 or max_seq_len < 1:
            raise ConfigError(f"block_size, max_seqs and max_seq_len must be positive, got "
                              f"{block_size}, {max_seqs}, {max_seq_len}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float16):
            raise ConfigError(f"storage dtype must be float32 or float16, got {dtype}")
        super().__init__(n_layers, n_kv_heads, head_dim)
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_seq_len = max_seq_len
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        self.keys = np.zeros(shape, dtype=dtype)
        self.values = np.zeros(shape, dtype=dtype)
        self.block_tables = np.full((max_seqs, blocks_for(max_seq_len, block_size)), -1,
                                    dtype=np.int32)
        self.table_lengths = np.zeros(max_seqs, dtype=np.int32)
        self._init_sequence_rows(max_seqs)
        self._prefix_keys: list[list[bytes]] = [[] for _ in range(max_seqs)]  # per row:
        # the keys of its sequence's known full blocks
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @classmethod
    def from_config(cls, config, num_blocks: int, block_size: int = 16, max_seqs: int = 64,
                    max_seq_len: int | None = None, dtype=np.float32):
        """A cache shaped for `config` (a `ModelConfig`); sequences up to its context."""
        return cls(config.n_layers, config.n_kv_heads, config.head_dim, num_blocks,
                   block_size, max_seqs, max_seq_len or config.max_position, dtype)

    # --- sequences -----------------------------------------------------------------
    def _clear_row(self, row: int) -> None:
        """Release the row's blocks and forget its length and prefix keys."""
        super()._clear_row(row)
        self._drop_blocks(row, keep=0)
        self._prefix_keys[row] = []

    def start_sequence(self, prompt_ids) -> tuple[int, int]:
        """Start a sequence for `prompt_ids`, reusing its longest cached prefix.

        Only full blocks are reused, and never the whole prompt: its last token must
        still run through the model to give the next token's logits.
        Returns:
            (sequence id, n_cached): the first `n_cached` prompt tokens are already in
            the cache; feed the model `prompt_ids[n_cached:]`.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        if not 0 < len(prompt_ids) <= self.max_seq_len:
            raise LengthError(f"a prompt needs 1 to {self.max_seq_len} tokens, "
                              f"got {len(prompt_ids)}")
        self._free_row()  # raises before anything changes
        keys = prefix_keys(prompt_ids, self.block_size)
        reusable = (len(prompt_ids) - 1) // self.block_size
        hits = []
        for key in keys[:reusable]:
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
        seq = self.new_sequence()
        for i, block in enumerate(hits):
            self.pool.retain(block)
            self.block_tables[seq, i] = block
        self.table_lengths[seq] = len(hits)
        self.lengths[seq] = len(hits) * self.block_size
        self._prefix_keys[seq] = keys
        self.prefix_query_tokens += len(prompt_ids)
        self.prefix_hit_tokens += int(self.lengths[seq])
        return seq, int(self.lengths[seq])

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block (and token) of `seq_id`; copy-on-write later."""
        self._check_known(seq_id)
        child = self.new_sequence()
        n = self.table_lengths[seq_id]
        for block in self.block_tables[seq_id, :n]:
            self.pool.retain(int(block))
        self.block_tables[child] = self.block_tables[seq_id]
        self.table_lengths[child] = n
        self.lengths[child] = self.lengths[seq_id]
        self._prefix_keys[child] = list(self._prefix_keys[seq_id])
        return child

    def capacity(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return self.max_seq_len

    def crop(self, seq_id: int, length: int) -> None:
        self._check_crop(seq_id, length)
        self._drop_blocks(seq_id, keep=blocks_for(length, self.block_size))
        self.lengths[seq_id] = length
        # tokens written after a crop may differ from the prompt: forget its later keys
        del self._prefix_keys[seq_id][length // self.block_size:]

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; unreferenced cached blocks become free."""
        self.pool.clear_cache()

    @property
    def nbytes(self) -> int:
        return (self.keys.nbytes + self.values.nbytes + self.pool.nbytes
                + self.block_tables.nbytes + self.table_lengths.nbytes
                + self.lengths.nbytes + self.in_use.nbytes)

    @property
    def prefix_hit_rate(self) -> float:
        """Share of looked-up prompt tokens that came from the prefix cache."""
        return self.prefix_hit_tokens / max(self.prefix_query_tokens, 1)

    # --- what a kernel needs -------------------------------------------------------
    def block_table(self, seq_id: int) -> np.ndarray:
        """[n_blocks] int32 physical blocks of a sequence, in token order."""
        self._check_known(seq_id)
        return self.block_tables[seq_id, :self.table_lengths[seq_id]].copy()

    def block_table_array(self, seq_ids) -> np.ndarray:
        """[B, max blocks among them] int32 block tables, padded with -1."""
        for s in seq_ids:
            self._check_known(s)
        rows = list(seq_ids)
        width = max([int(self.table_lengths[r]) for r in rows] + [1])
        return self.block_tables[rows, :width].copy()

    def lengths_array(self, seq_ids) -> np.ndarray:
        """[B] int64 tokens stored for each sequence."""
        return np.array([self.length(s) for s in seq_ids], dtype=np.int64)

    def slot_mapping(self, seq_id: int, positions) -> np.ndarray:
        """Slots (block * block_size + offset) of token `positions` of a sequence."""
        self._check_known(seq_id)
        positions = np.asarray(positions, dtype=np.int64)
        table = self.block_tables[seq_id]
        return table[positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size

    # --- one forward step ----------------------------------------------------------
    def check(self, seq_ids, counts) -> PagedStepPlan:
        """Validate a step and count the blocks it needs (new blocks and copy-on-write
        copies); changes nothing. Raises `OutOfBlocksError` if the pool is short."""
        plan = super().check(seq_ids, counts)
        new, copies = self._blocks_needed(plan)
        needed = sum(new) + sum(len(c) for c in copies)
        if needed > self.pool.n_available:
            raise OutOfBlocksError(
                f"this step needs {needed} blocks but only {self.pool.n_available} of "
                f"{self.num_blocks} are free or evictable")
        return PagedStepPlan(plan.seq_ids, plan.starts, plan.counts, tuple(new),
                             tuple(tuple(c) for c in copies))

    def reserve(self, plan: PagedStepPlan) -> PagedStepPlan:
        """Take the blocks a checked plan counted, copy shared blocks it writes into, and
        return the plan with its slots and block tables."""
        for row, n_new, to_copy in zip(plan.seq_ids, plan.new_blocks, plan.copies):
            for i in to_copy:  # copy-on-write
                old = int(self.block_tables[row, i])
                fresh = int(self.pool.allocate(1)[0])
                self.keys[:, fresh] = self.keys[:, old]
                self.values[:, fresh] = self.values[:, old]
                self.block_tables[row, i] = fresh
                self.pool.release(old)
            have = int(self.table_lengths[row])
            self.block_tables[row, have:have + n_new] = self.pool.allocate(n_new)
            self.table_lengths[row] = have + n_new
        slots = np.concatenate([self.slot_mapping(s, start + np.arange(count))
                                for s, start, count in zip(plan.seq_ids, plan.starts, plan.counts)])
        return dataclasses.replace(plan, slots=slots,
                                   tables=self.block_table_array(plan.seq_ids))

    def _check_room(self, plan: StepPlan) -> None:
        for s, end in zip(plan.seq_ids, plan.starts + plan.counts):
            if end > self.max_seq_len:
                raise CapacityError(f"sequence {s} would hold {end} tokens; "
                                    f"the cache allows {self.max_seq_len} per sequence")

    def _blocks_needed(self, plan: StepPlan) -> tuple[list[int], list[list[int]]]:
        """Per sequence: new blocks to append, and table indices to copy before writing.

        A block must be copied before a write if another table also names it, or if it
        carries a prefix key (cached blocks are immutable). Copies are counted in order,
        so when two sequences share a block, only the first to write copies it.
        """
        new, copies = [], []
        released: dict[int, int] = {}
        for row, start, count in zip(plan.seq_ids, plan.starts, plan.counts):
            have = int(self.table_lengths[row])
            end_block = blocks_for(int(start + count), self.block_size)
            new.append(max(end_block - have, 0))
            to_copy = []
            for i in range(int(start) // self.block_size, min(have, end_block)):
                block = int(self.block_tables[row, i])
                refs = self.pool.refcounts[block] - released.get(block, 0)
                if refs > 1 or self.pool.has_key[block]:
                    to_copy.append(i)
                    released[block] = released.get(block, 0) + 1
            copies.append(to_copy)
        return new, copies

    def write(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None:
        self._check_kv(layer, plan, k, v)
        blocks, offsets = np.divmod(plan.slots, self.block_size)
        # keys[layer][blocks, :, offsets] is [n_tokens, kv_heads, head_dim], like k
        self.keys[layer, blocks, :, offsets] = k
        self.values[layer, blocks, :, offsets] = v

    def _sequence_kv(self, layer: int, plan: StepPlan, i: int):
        """Gather the blocks the sequence's table names (only those)."""
        end = int(plan.starts[i] + plan.counts[i])
        table = self.block_tables[plan.seq_ids[i], :blocks_for(end, self.block_size)]
        return tuple(self._gather(store[layer], table, end) for store in (self.keys, self.values))

    def _check_kernel(self, backend: str) -> None:
        """Both kernels read float32 storage; the CUDA one also needs a device (or
        Numba's CUDA simulator)."""
        super()._check_kernel(backend)
        if backend == "cuda":
            from ..kernels.cuda import require_device

            require_device()

    def _gather(self, store: np.ndarray, table: np.ndarray, n_tokens: int) -> np.ndarray:
        """[kv_heads, n_tokens, head_dim] from the blocks `table` of one layer's store."""
        blocks = store[table]  # [n_blocks, kv_heads, block_size, head_dim]
        n_blocks, n_kv_heads, block_size, head_dim = blocks.shape
        flat = blocks.transpose(1, 0, 2, 3).reshape(n_kv_heads, n_blocks * block_size, head_dim)
        return flat[:, :n_tokens].astype(np.float32, copy=False)

    def commit(self, plan: StepPlan) -> None:
        """Advance lengths; key the blocks of known prompts that this step filled."""
        for row, start, count in zip(plan.seq_ids, plan.starts, plan.counts):
            self.lengths[row] += count
            keys = self._prefix_keys[row]
            full = min(int(self.lengths[row]) // self.block_size, len(keys))
            for i in range(int(start) // self.block_size, full):
                self.pool.register(int(self.block_tables[row, i]), keys[i])

    # --- internals -----------------------------------------------------------------
    def _drop_blocks(self, row: int, keep: int) -> None:
        """Release the blocks of a table past its first `keep`, last block first.

        Releasing from the end stamps a sequence's deepest blocks as least recently
        used, so eviction takes the tail of a cached prefix before its head.
        """
        for i in range(int(self.table_lengths[row]) - 1, keep - 1, -1):
            self.pool.release(int(self.block_tables[row, i]))
            self.block_tables[row, i] = -1
        self.table_lengths[row] = min(keep, int(self.table_lengths[row]))


@attention_kernel(PagedCache, "numba")
def _decode_numba(cache: PagedCache, layer: int, plan: PagedStepPlan, q: np.ndarray):
    """The kernel walks the step's block tables (built once per step, in `reserve`)."""
    from ..kernels.cpu import decode_paged

    return decode_paged(q, cache.keys[layer], cache.values[layer], plan.tables,
                        plan.starts + 1)


@attention_kernel(PagedCache, "numba", "prefill")
def _prefill_numba(cache: PagedCache, layer: int, plan: PagedStepPlan, q: np.ndarray):
    """The causal tiled kernel, walking the same block tables as the decode kernel."""
    from ..kernels.prefill import causal_attention

    return causal_attention(q, cache.keys[layer], cache.values[layer], plan.tables,
                            plan.starts, plan.counts)


@attention_kernel(PagedCache, "cuda")
def _decode_cuda(cache: PagedCache, layer: int, plan: PagedStepPlan, q: np.ndarray):
    """The `numba.cuda` kernel: one block per (sequence, KV head, split), split-K merge."""
    from ..kernels.cuda import decode_paged

    return decode_paged(q, cache.keys[layer], cache.values[layer], plan.tables,
                        plan.starts + 1)
