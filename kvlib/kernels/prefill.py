"""Causal attention for multi-token steps in Numba: prefill, and chunked prefill over a
cached prefix.

A step adds `counts[b]` new tokens to sequence b, which already holds `starts[b]`; the
new query at position p = starts[b] + t sees the keys 0..p (causal, bottom-right). This
is FlashAttention-2's loop order, on the CPU:

* **Tiles of queries x keys.** A work item is one (sequence, KV head, query tile): the
  `Q_TILE` consecutive new tokens of the tile times the G query heads sharing the KV
  head, so `G * Q_TILE` rows of queries. It walks the keys in tiles of `K_TILE`.
* **Each K/V tile is loaded once for the whole query tile**, all G heads included: it is
  copied out of the cache (through the block table) into two small buffers, keys
  transposed, and then used by every row. The score tile is a small matrix product,
  `[rows, d] @ [d, K_TILE]`, and so is the value update, `[rows, K_TILE] @ [K_TILE, d]`
  (`_add_product` computes both): the work per byte read grows with the query tile,
  which is what moves prefill from memory-bound to compute-bound.
* **The online softmax of chapter 7** (running maximum, sum and unnormalised output per
  row; `kvlib.kernels.cpu._softmax_update`), so no `[T, S]` score matrix exists.
* **Tiles above the causal diagonal are never computed**: the key loop of a query tile
  stops after the last key its last query may see. Only the tiles crossing the diagonal
  are masked, element by element. A prefill of T tokens computes about T^2 / 2 scores
  instead of the T^2 of the NumPy reference.
* **Parallel over work items** (`prange`). Items far down the diagonal see more keys, so
  they are ordered heaviest-next-to-lightest (`balanced_order`): Numba hands each thread
  a contiguous range of items, and every range then holds about the same work.

The kernel reads a `[num_blocks, n_kv_heads, block_size, head_dim]` pool through block
tables, so it serves `PagedCache` as it is, and `ContiguousCache` as a pool whose blocks
are its rows (`block_size = max_seq`, one block per sequence).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..errors import DTypeError, ShapeError
from .cpu import LANES_FM, _softmax_update

Q_TILE = 32   # new tokens per work item (times G query heads = rows of the query tile)
K_TILE = 64   # keys per online-softmax update
ROWS = 4      # rows (and columns) of `a` per pass of `_add_product`


@njit(cache=True, fastmath=LANES_FM)
def _load_tile(store, table, kv_head, first, n, out, transpose):
    """Copy keys or values first..first+n of one sequence and KV head out of the pool.

    Args:
        store: [num_blocks, n_kv_heads, block_size, d] one layer of keys or values.
        table: [max_blocks] the sequence's block table.
        out: [d, >= n] when `transpose` (keys: a score is then a row times columns),
            else [>= n, d] (values).
    """
    block_size = store.shape[2]
    head_dim = store.shape[3]
    for i in range(n):
        token = first + i
        row = store[table[token // block_size], kv_head, token % block_size]
        if transpose:
            for j in range(head_dim):
                out[j, i] = row[j]
        else:
            for j in range(head_dim):
                out[i, j] = row[j]


@njit(cache=True, inline="always")
def _block_of_16(a, r, c):
    """a[r:r + 4, c:c + 4] as 16 scalars, row after row. Loaded into scalars before the
    inner loop, the compiler keeps them in registers for all of it."""
    return (a[r, c], a[r, c + 1], a[r, c + 2], a[r, c + 3],
            a[r + 1, c], a[r + 1, c + 1], a[r + 1, c + 2], a[r + 1, c + 3],
            a[r + 2, c], a[r + 2, c + 1], a[r + 2, c + 2], a[r + 2, c + 3],
            a[r + 3, c], a[r + 3, c + 1], a[r + 3, c + 2], a[r + 3, c + 3])


@njit(cache=True, fastmath=LANES_FM)
def _add_product(a, b, k, m, out):
    """out[:, :m] += a[:, :k] @ b[:k, :m]: the small matrix product of a tile.

    Both products of a tile have this form: the scores (queries times transposed keys)
    and the value update (weights times values). Four rows of `a` and four of its
    columns are taken per pass: each row of `b` loaded serves four output rows, each
    output element loaded and stored takes four multiply-adds, and the 16 values of
    `a` stay in registers. The innermost loop runs along m contiguous columns, which
    the compiler turns into SIMD multiply-adds.
    """
    n_rows = out.shape[0]
    r = 0
    while r + ROWS <= n_rows:
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        for c in range(0, k - 3, 4):
            b0, b1, b2, b3 = b[c], b[c + 1], b[c + 2], b[c + 3]
            a0, a1, a2, a3, e0, e1, e2, e3, f0, f1, f2, f3, g0, g1, g2, g3 = \
                _block_of_16(a, r, c)
            for j in range(m):
                x0, x1, x2, x3 = b0[j], b1[j], b2[j], b3[j]
                o0[j] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                o1[j] += e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3
                o2[j] += f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3
                o3[j] += g0 * x0 + g1 * x1 + g2 * x2 + g3 * x3
        for c in range(k - k % 4, k):          # the last columns when k % 4 != 0
            for j in range(m):
                o0[j] += a[r, c] * b[c, j]
                o1[j] += a[r + 1, c] * b[c, j]
                o2[j] += a[r + 2, c] * b[c, j]
                o3[j] += a[r + 3, c] * b[c, j]
        r += ROWS
    for rr in range(r, n_rows):                # the last rows, one at a time
        for c in range(k):
            for j in range(m):
                out[rr, j] += a[rr, c] * b[c, j]


@njit(cache=True)
def _mask_above_diagonal(scores, n_group, first_position, key_first, n, fill):
    """scores[r, i] = fill where key key_first + i lies after the query of row r.

    Row r is query head r % G of the tile's token r // G, at `first_position + r // G`.
    """
    for r in range(scores.shape[0]):
        visible = first_position + r // n_group - key_first + 1   # keys 0..visible-1 seen
        for i in range(max(visible, 0), n):
            scores[r, i] = fill


@njit(parallel=True, cache=True)
def _causal_kernel(q, keys, values, tables, starts, q_offsets, items, scale):
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    n_group = n_heads // n_kv_heads
    out = np.empty_like(q)
    for index in prange(items.shape[0]):
        b, kv_head, t_first, t_count = items[index, 0], items[index, 1], items[index, 2], \
            items[index, 3]
        n_rows = t_count * n_group
        q_rows = np.empty((n_rows, head_dim), dtype=np.float32)  # row = token * G + head
        for t in range(t_count):
            for g in range(n_group):
                for j in range(head_dim):
                    q_rows[t * n_group + g, j] = \
                        q[q_offsets[b] + t_first + t, kv_head * n_group + g, j] * scale
        m = np.full(n_rows, -np.inf, dtype=np.float32)
        l = np.zeros(n_rows, dtype=np.float32)
        acc = np.zeros((n_rows, head_dim), dtype=np.float32)
        scores = np.empty((n_rows, K_TILE), dtype=np.float32)
        scratch = np.empty(K_TILE, dtype=np.int32)
        keys_t = np.empty((head_dim, K_TILE), dtype=np.float32)
        value_tile = np.empty((K_TILE, head_dim), dtype=np.float32)
        first_position = starts[b] + t_first
        n_keys = first_position + t_count          # keys the tile's last query sees
        for key_first in range(0, n_keys, K_TILE):
            n = min(K_TILE, n_keys - key_first)
            _load_tile(keys, tables[b], kv_head, key_first, n, keys_t, True)
            _load_tile(values, tables[b], kv_head, key_first, n, value_tile, False)
            scores[:, :n] = 0.0
            _add_product(q_rows, keys_t, head_dim, n, scores)
            crosses_diagonal = key_first + n > first_position + 1
            if crosses_diagonal:
                _mask_above_diagonal(scores, n_group, first_position, key_first, n, -np.inf)
            _softmax_update(scores, n, m, l, acc, scratch)
            if crosses_diagonal:   # exp(-inf) comes out as exp(-87), not 0: make it 0
                _mask_above_diagonal(scores, n_group, first_position, key_first, n, 0.0)
            _add_product(scores, value_tile, n, head_dim, acc)
        for t in range(t_count):
            for g in range(n_group):
                r = t * n_group + g
                for j in range(head_dim):
                    out[q_offsets[b] + t_first + t, kv_head * n_group + g, j] = acc[r, j] / l[r]
    return out


def balanced_order(costs: np.ndarray, n_threads: int) -> np.ndarray:
    """An order of work items whose `n_threads` contiguous ranges carry equal work.

    Items are sorted by cost and dealt heaviest, lightest, second heaviest, second
    lightest, ...: neighbours pair up into near-equal sums, so any contiguous cut holds
    about the same total.
    """
    by_cost = np.argsort(costs, kind="stable")
    order = np.empty_like(by_cost)
    order[0::2] = by_cost[::-1][:(len(by_cost) + 1) // 2]
    order[1::2] = by_cost[:len(by_cost) // 2]
    return order


def work_items(starts: np.ndarray, counts: np.ndarray, n_kv_heads: int,
               q_tile: int = Q_TILE) -> np.ndarray:
    """[n_items, 4] int64 rows (sequence, KV head, first new token, tokens) of a step,
    in `balanced_order` by the keys each item reads."""
    rows = [(b, h, t, min(q_tile, int(c) - t))
            for b, c in enumerate(counts) for h in range(n_kv_heads)
            for t in range(0, int(c), q_tile)]
    items = np.array(rows, dtype=np.int64).reshape(-1, 4)
    keys_read = starts[items[:, 0]] + items[:, 2] + items[:, 3]
    return items[balanced_order(keys_read, numba.get_num_threads())]


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, tables,
                     starts, counts, scale: float | None = None) -> np.ndarray:
    """Causal attention of a step's new queries over their sequences' cached keys.

    Args:
        q: [n_tokens, n_heads, head_dim] float32, the new tokens of every sequence packed
            (sequence b owns rows sum(counts[:b]) : sum(counts[:b + 1])).
        keys, values: [num_blocks, n_kv_heads, block_size, head_dim] float32, one layer of
            the pool, this step's keys and values already written.
        tables: [B, max_blocks] int; token t of sequence b is in block
            tables[b, t // block_size] at offset t % block_size.
        starts: [B] tokens each sequence held before the step; counts: [B] new tokens.
        scale: multiplier of q . k (default 1 / sqrt(head_dim)).
    Returns:
        [n_tokens, n_heads, head_dim] float32, equal to `kvlib.attention.attention` with
        `causal_mask(counts[b], starts[b])` for each sequence, up to float32 rounding.
    """
    tables = np.ascontiguousarray(tables, dtype=np.int32)
    starts = np.ascontiguousarray(starts, dtype=np.int64).reshape(-1)
    counts = np.ascontiguousarray(counts, dtype=np.int64).reshape(-1)
    if keys.dtype != np.float32 or values.dtype != np.float32:
        raise DTypeError(f"the causal kernel reads float32 keys/values, got {keys.dtype}")
    if not isinstance(q, np.ndarray) or q.dtype != np.float32:
        raise DTypeError(f"q must be a float32 array, got {getattr(q, 'dtype', type(q))}")
    n_kv_heads, block_size, head_dim = keys.shape[1:]
    if q.ndim != 3 or q.shape[0] != counts.sum() or q.shape[2] != head_dim \
            or q.shape[1] % n_kv_heads:
        raise ShapeError(f"q has shape {q.shape}, expected [{counts.sum()}, a multiple of "
                         f"{n_kv_heads}, {head_dim}]")
    if tables.ndim != 2 or tables.shape[0] != len(counts) or len(starts) != len(counts):
        raise ShapeError(f"tables {tables.shape}, starts {starts.shape} and counts "
                         f"{counts.shape} must describe the same {len(counts)} sequences")
    ends = starts + counts
    if len(counts) and (counts.min() < 1 or starts.min() < 0
                        or ends.max() > tables.shape[1] * block_size):
        raise ShapeError(f"each sequence needs 1 or more new tokens within its "
                         f"{tables.shape[1] * block_size} slots")
    used = tables[np.arange(tables.shape[1]) < -(-ends[:, None] // block_size)]
    if used.size and (used.min() < 0 or used.max() >= keys.shape[0]):
        raise ShapeError(f"block table names blocks outside the pool of {keys.shape[0]}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q_offsets = np.concatenate([[0], np.cumsum(counts)])
    return _causal_kernel(np.ascontiguousarray(q), keys, values, tables, starts, q_offsets,
                          work_items(starts, counts, n_kv_heads), np.float32(scale))
