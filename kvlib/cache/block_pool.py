"""The block pool: a fixed set of physical KV blocks shared by every sequence.

A block is `block_size` token slots; the keys and values themselves live in
`PagedCache`, the pool only keeps the books. Every block is in exactly one state:

* **free**: on the free list; it holds nothing anyone needs;
* **in use**: named by at least one sequence's block table (reference count > 0);
* **cached**: no references, but it holds a full block of a known prefix (it carries a
  *prefix key*) and can be handed to a new request that starts with the same tokens.

`allocate` takes free blocks first; only when the free list is empty does it evict
cached blocks, the least recently used first, forgetting their keys.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import BlockStateError, ConfigError, DoubleFreeError, OutOfBlocksError

KEY_BYTES = 16  # a prefix key is the first 16 bytes of a SHA-256 digest
ROOT_KEY = b""  # the parent key of a sequence's first block

FREE, IN_USE, CACHED = 0, 1, 2  # values of `BlockPool.states()`


def prefix_key(parent_key: bytes, token_ids) -> bytes:
    """Key of a full block: a hash of its parent block's key and its own token ids.

    Chaining the parent in makes the key name the *whole prefix* up to the end of the
    block, not just the block's tokens: two blocks with the same tokens after different
    prefixes hold different keys and values, and get different keys.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    return hashlib.sha256(parent_key + tokens.tobytes()).digest()[:KEY_BYTES]


def prefix_keys(token_ids, block_size: int) -> list[bytes]:
    """Keys of every full block of `token_ids` (a trailing partial block has none)."""
    keys, parent = [], ROOT_KEY
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = prefix_key(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys


def block_pool_nbytes(num_blocks: int) -> int:
    """Bytes of the pool's metadata arrays (see `BlockPool.__init__`)."""
    per_block = (4      # refcounts, int32
                 + 4    # free_stack, int32
                 + KEY_BYTES  # keys, uint8[16]
                 + 1    # has_key, bool
                 + 8)   # last_used, int64
    return num_blocks * per_block


class BlockPool:
    """Free list, reference counts and the prefix-key index of `num_blocks` blocks.

    Attributes:
        refcounts: [num_blocks] int32, block tables naming each block.
        free_stack: [num_blocks] int32; its first `n_free` entries are the free blocks
            (the last one is handed out next).
        keys: [num_blocks, 16] uint8 prefix key of each block that has one.
        has_key: [num_blocks] bool.
        last_used: [num_blocks] int64, the pool's clock when a block was last taken or
            released; the smallest among cached blocks is evicted first.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ConfigError(f"a pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcounts = np.zeros(num_blocks, dtype=np.int32)
        self.free_stack = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)  # block 0 on top
        self.n_free = num_blocks
        self.keys = np.zeros((num_blocks, KEY_BYTES), dtype=np.uint8)
        self.has_key = np.zeros(num_blocks, dtype=bool)
        self.last_used = np.zeros(num_blocks, dtype=np.int64)
        self._clock = 0
        self._block_of_key: dict[bytes, int] = {}  # index over `keys`
        self.n_evicted = 0

    # --- counts ----------------------------------------------------------------------
    @property
    def n_used(self) -> int:
        """Blocks named by at least one block table."""
        return int(np.count_nonzero(self.refcounts))

    @property
    def n_cached(self) -> int:
        """Unreferenced blocks kept for their prefix key (evictable)."""
        return int(np.count_nonzero(self.has_key & (self.refcounts == 0)))

    @property
    def n_available(self) -> int:
        """Blocks `allocate` can hand out: free ones plus evictable cached ones."""
        return self.n_free + self.n_cached

    def states(self) -> np.ndarray:
        """[num_blocks] FREE, IN_USE or CACHED for each block."""
        states = np.full(self.num_blocks, CACHED, dtype=np.int8)
        states[self.refcounts > 0] = IN_USE
        states[self.free_stack[:self.n_free]] = FREE
        return states

    @property
    def nbytes(self) -> int:
        return (self.refcounts.nbytes + self.free_stack.nbytes + self.keys.nbytes
                + self.has_key.nbytes + self.last_used.nbytes)

    # --- taking and giving back blocks -----------------------------------------------
    def allocate(self, n: int) -> np.ndarray:
        """Take `n` blocks (reference count 1 each); all of them or, if short, none.

        Raises:
            OutOfBlocksError: fewer than `n` blocks are free or evictable.
        """
        if n > self.n_available:
            raise OutOfBlocksError(
                f"need {n} blocks but only {self.n_available} of {self.num_blocks} are free "
                f"or evictable ({self.n_used} in use)")
        from_free = min(n, self.n_free)
        blocks = self.free_stack[self.n_free - from_free:self.n_free][::-1].copy()
        self.n_free -= from_free
        if n > from_free:
            blocks = np.concatenate([blocks, self._evict(n - from_free)])
        self.refcounts[blocks] = 1
        self._stamp(blocks)
        return blocks

    def retain(self, block: int) -> None:
        """Add a reference to a block in use or cached (a fork, or a prefix-cache hit)."""
        self._check_block(block)
        if self.refcounts[block] == 0 and not self.has_key[block]:
            raise BlockStateError(f"block {block} is free; only blocks in use or cached "
                             "can gain a reference")
        self.refcounts[block] += 1
        self._stamp(block)

    def release(self, block: int) -> None:
        """Drop one reference. At zero a keyed block stays cached, any other is freed.

        Raises:
            DoubleFreeError: the block has no reference left to drop.
        """
        self._check_block(block)
        if self.refcounts[block] == 0:
            raise DoubleFreeError(f"block {block} has no reference to release "
                                  "(it was already freed)")
        self.refcounts[block] -= 1
        self._stamp(block)
        if self.refcounts[block] == 0 and not self.has_key[block]:
            self._push_free(block)

    # --- the prefix index ------------------------------------------------------------
    def register(self, block: int, key: bytes) -> bool:
        """Give a full, in-use block its prefix key. False if the key (or block) has one."""
        self._check_block(block)
        if self.refcounts[block] == 0:
            raise BlockStateError(f"block {block} is not in use; only a written block can be keyed")
        if key in self._block_of_key or self.has_key[block]:
            return False
        self._block_of_key[key] = block
        self.keys[block] = np.frombuffer(key, dtype=np.uint8)
        self.has_key[block] = True
        return True

    def lookup(self, key: bytes) -> int | None:
        """The block holding the prefix `key`, or None."""
        return self._block_of_key.get(key)

    def key_of(self, block: int) -> bytes | None:
        return self.keys[block].tobytes() if self.has_key[block] else None

    def clear_cache(self) -> None:
        """Forget every prefix key; cached (unreferenced) blocks return to the free list."""
        for block in np.flatnonzero(self.has_key & (self.refcounts == 0)):
            self._push_free(int(block))
        self.has_key[:] = False
        self._block_of_key.clear()

    # --- internals -------------------------------------------------------------------
    def _evict(self, n: int) -> np.ndarray:
        """Unkey the `n` least recently used cached blocks and return them."""
        cached = np.flatnonzero(self.has_key & (self.refcounts == 0))
        victims = cached[np.argsort(self.last_used[cached], kind="stable")[:n]]
        for block in victims:
            del self._block_of_key[self.keys[block].tobytes()]
        self.has_key[victims] = False
        self.n_evicted += len(victims)
        return victims.astype(np.int32)

    def _push_free(self, block: int) -> None:
        self.free_stack[self.n_free] = block
        self.n_free += 1

    def _stamp(self, blocks) -> None:
        self._clock += 1
        self.last_used[blocks] = self._clock

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise BlockStateError(f"block {block} out of range [0, {self.num_blocks})")
