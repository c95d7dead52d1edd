"""Decode attention in Numba: one new query token per sequence, over the whole cache.

Every kernel here computes, for each sequence b and query head h,

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G]^T) @ V[b, h // G]

over the `lengths[b]` cached tokens, where G = n_heads / n_kv_heads is the number of
query heads sharing one KV head (grouped-query attention). Three ideas make it fast:

* **Grouped-query aware.** A work item is one (sequence, KV head): it loads each key and
  value vector once and uses it for all G query heads of that KV head.
* **One pass with an online softmax.** Keys are read in tiles of `TILE` tokens (one
  block for the paged cache); each tile updates a running maximum `m`, a running sum of
  exponentials `l` and an unnormalised output `acc`, so K and V are streamed exactly once
  and no `[n_heads, context]` score matrix is ever stored.
* **Parallel over (sequence, KV head), and split-K.** Work items run on Numba's threads
  (`prange`). When there are too few items to keep every thread busy, each item's context
  is cut into `n_splits` ranges processed in parallel, and the partial results are merged
  afterwards with the same online-softmax rule (Flash-Decoding).

Kernels follow the storage of each cache: `decode_contiguous` reads a
`[rows, n_kv_heads, max_seq, head_dim]` layer of `ContiguousCache`; `decode_paged` reads a
`[num_blocks, n_kv_heads, block_size, head_dim]` block pool through each sequence's block
table, one block per tile, without gathering the sequence into a copy.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..errors import DTypeError, ShapeError

TILE = 64                 # tokens per online-softmax update in the contiguous kernel
MIN_SPLIT_TOKENS = 512    # split-K never gives a thread fewer tokens than this


@njit(cache=True, fastmath={"reassoc"})
def _dot(a, b):
    """a . b for two float32 vectors.

    `reassoc` lets the compiler keep several partial sums in SIMD lanes and add them at
    the end. It is the only relaxation used anywhere in the kernels (no flush-to-zero, no
    assumptions about NaN or infinity); it changes the last bits of a score, never more.
    """
    total = np.float32(0.0)
    for j in range(a.shape[0]):
        total += a[j] * b[j]
    return total


@njit(cache=True, fastmath=False)
def _fold_tile(q_group, keys, values, m, l, acc, scores):
    """Fold a tile of keys/values into the online-softmax state of G query heads.

    Args:
        q_group: [G, d] scaled queries sharing one KV head.
        keys, values: [n, d] the tile (n >= 1 tokens).
        m, l: [G] running maximum score and running sum of exp(score - m).
        acc: [G, d] running sum of exp(score - m) * value.
        scores: [G, >= n] scratch space.
    """
    n = keys.shape[0]
    n_group, head_dim = acc.shape
    for t in range(n):                      # scores: each key read once for all G heads
        for g in range(n_group):
            scores[g, t] = _dot(q_group[g], keys[t])
    for g in range(n_group):                # rescale the state to the new maximum
        new_max = m[g]
        for t in range(n):
            new_max = max(new_max, scores[g, t])
        correction = np.exp(m[g] - new_max)
        m[g] = new_max
        l[g] *= correction
        for j in range(head_dim):
            acc[g, j] *= correction
        for t in range(n):
            p = np.exp(scores[g, t] - new_max)
            scores[g, t] = p
            l[g] += p
    for t in range(n):                      # values: each read once for all G heads
        for g in range(n_group):
            p = scores[g, t]
            for j in range(head_dim):
                acc[g, j] += p * values[t, j]


@njit(cache=True, fastmath=False)
def _merge_splits(m, l, acc, out):
    """Combine split-K partial states into normalised outputs.

    Args:
        m, l: [B, n_kv_heads, n_splits, G]; acc: [B, n_kv_heads, n_splits, G, d].
        out: [B, n_kv_heads * G, d] written in place. A split that saw no token has
            m = -inf and l = 0 and contributes nothing.
    """
    n_seq, n_kv_heads, n_splits, n_group, head_dim = acc.shape
    for item in prange(n_seq * n_kv_heads * n_group):
        b = item // (n_kv_heads * n_group)
        h = (item // n_group) % n_kv_heads
        g = item % n_group
        top = -np.inf
        for s in range(n_splits):
            top = max(top, m[b, h, s, g])
        total = np.float32(0.0)
        row = out[b, h * n_group + g]
        row[:] = 0.0
        for s in range(n_splits):
            if l[b, h, s, g] == 0.0:
                continue
            w = np.exp(m[b, h, s, g] - top)
            total += w * l[b, h, s, g]
            for j in range(head_dim):
                row[j] += w * acc[b, h, s, g, j]
        for j in range(head_dim):
            row[j] /= total


@njit(cache=True, fastmath=False)
def _split_range(n_units, split, n_splits):
    """[start, end) of the `split`-th of `n_splits` near-equal ranges over n_units."""
    per_split = (n_units + n_splits - 1) // n_splits
    start = min(split * per_split, n_units)
    return start, min(start + per_split, n_units)


@njit(parallel=True, cache=True, fastmath=False)
def _decode_contiguous_kernel(q, keys, values, rows, lengths, scale, n_splits):
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    n_group = n_heads // n_kv_heads
    m = np.full((n_seq, n_kv_heads, n_splits, n_group), -np.inf, dtype=np.float32)
    l = np.zeros((n_seq, n_kv_heads, n_splits, n_group), dtype=np.float32)
    acc = np.zeros((n_seq, n_kv_heads, n_splits, n_group, head_dim), dtype=np.float32)
    for item in prange(n_seq * n_kv_heads * n_splits):
        b = item // (n_kv_heads * n_splits)
        h = (item // n_splits) % n_kv_heads
        split = item % n_splits
        q_group = q[b, h * n_group:(h + 1) * n_group] * scale
        scores = np.empty((n_group, TILE), dtype=np.float32)
        n_tiles = (lengths[b] + TILE - 1) // TILE
        first, last = _split_range(n_tiles, split, n_splits)
        k_seq, v_seq = keys[rows[b], h], values[rows[b], h]
        for tile in range(first, last):
            start = tile * TILE
            end = min(start + TILE, lengths[b])
            _fold_tile(q_group, k_seq[start:end], v_seq[start:end],
                       m[b, h, split], l[b, h, split], acc[b, h, split], scores)
    out = np.empty_like(q)
    _merge_splits(m, l, acc, out)
    return out


@njit(parallel=True, cache=True, fastmath=False)
def _decode_paged_kernel(q, keys, values, block_table, lengths, scale, n_splits):
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads, block_size = keys.shape[1], keys.shape[2]
    n_group = n_heads // n_kv_heads
    m = np.full((n_seq, n_kv_heads, n_splits, n_group), -np.inf, dtype=np.float32)
    l = np.zeros((n_seq, n_kv_heads, n_splits, n_group), dtype=np.float32)
    acc = np.zeros((n_seq, n_kv_heads, n_splits, n_group, head_dim), dtype=np.float32)
    for item in prange(n_seq * n_kv_heads * n_splits):
        b = item // (n_kv_heads * n_splits)
        h = (item // n_splits) % n_kv_heads
        split = item % n_splits
        q_group = q[b, h * n_group:(h + 1) * n_group] * scale
        scores = np.empty((n_group, block_size), dtype=np.float32)
        n_blocks = (lengths[b] + block_size - 1) // block_size
        first, last = _split_range(n_blocks, split, n_splits)
        for i in range(first, last):
            block = block_table[b, i]                           # the block-table walk
            used = min(block_size, lengths[b] - i * block_size)  # the last block may be partial
            _fold_tile(q_group, keys[block, h, :used], values[block, h, :used],
                       m[b, h, split], l[b, h, split], acc[b, h, split], scores)
    out = np.empty_like(q)
    _merge_splits(m, l, acc, out)
    return out


def choose_splits(n_items: int, n_tokens: int, n_threads: int | None = None,
                  min_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """How many ranges to cut each work item's context into (split-K).

    With at least as many items as a few rounds of threads, no split (1). Otherwise the
    smallest split count that makes the item count a multiple of the thread count (so no
    thread idles in the last round) or gives every thread four items, but never ranges of
    fewer than `min_tokens` tokens: below that the merge costs more than it saves.
    """
    n_threads = numba.get_num_threads() if n_threads is None else n_threads
    most = max(1, n_tokens // min_tokens)
    splits = 1
    while splits < most and n_items * splits < 4 * n_threads \
            and (n_items * splits) % n_threads != 0:
        splits += 1
    return splits


def _check_decode(q, n_seq: int, n_kv_heads: int, head_dim: int, lengths, capacity: int):
    if not isinstance(q, np.ndarray) or q.dtype != np.float32:
        raise DTypeError(f"q must be a float32 array, got {getattr(q, 'dtype', type(q))}")
    if q.ndim != 3 or q.shape[0] != n_seq or q.shape[2] != head_dim or q.shape[1] % n_kv_heads:
        raise ShapeError(f"q has shape {q.shape}, expected [{n_seq}, a multiple of "
                         f"{n_kv_heads}, {head_dim}] (one new token per sequence)")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ShapeError(f"lengths must lie in [1, {capacity}], got {lengths}")


def decode_contiguous(q: np.ndarray, keys: np.ndarray, values: np.ndarray, rows, lengths,
                      scale: float | None = None, n_splits: int | None = None) -> np.ndarray:
    """Decode attention over one layer of a `ContiguousCache`.

    Args:
        q: [B, n_heads, head_dim] float32, the one new query of each sequence.
        keys, values: [rows, n_kv_heads, max_seq, head_dim] float32 (a layer of the cache).
        rows: [B] cache row of each sequence.
        lengths: [B] tokens to attend over per sequence (the new one included), >= 1.
        scale: multiplier of q . k (default 1 / sqrt(head_dim)).
        n_splits: split-K ranges per (sequence, KV head); default `choose_splits`.
    Returns:
        [B, n_heads, head_dim] float32.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if keys.dtype != np.float32 or values.dtype != np.float32:
        raise DTypeError(f"the Numba kernel reads float32 keys/values, got {keys.dtype}")
    _check_decode(q, len(rows), keys.shape[1], keys.shape[3], lengths, keys.shape[2])
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if n_splits is None:
        n_splits = choose_splits(len(rows) * keys.shape[1], int(lengths.max(initial=1)))
    return _decode_contiguous_kernel(np.ascontiguousarray(q), keys, values, rows, lengths,
                                     np.float32(scale), n_splits)


def decode_paged(q: np.ndarray, keys: np.ndarray, values: np.ndarray, block_table, lengths,
                 scale: float | None = None, n_splits: int | None = None) -> np.ndarray:
    """Decode attention over one layer of a paged block pool.

    Args:
        q: [B, n_heads, head_dim] float32, the one new query of each sequence.
        keys, values: [num_blocks, n_kv_heads, block_size, head_dim] float32 (one layer).
        block_table: [B, max_blocks] int; token t of sequence b lives in block
            block_table[b, t // block_size] at offset t % block_size.
        lengths: [B] tokens to attend over per sequence (the new one included), >= 1.
        scale, n_splits: as in `decode_contiguous`.
    Returns:
        [B, n_heads, head_dim] float32.
    """
    block_table = np.ascontiguousarray(block_table, dtype=np.int32)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if keys.dtype != np.float32 or values.dtype != np.float32:
        raise DTypeError(f"the Numba kernel reads float32 keys/values, got {keys.dtype}")
    block_size = keys.shape[2]
    if block_table.ndim != 2 or block_table.shape[0] != len(lengths):
        raise ShapeError(f"block_table has shape {block_table.shape}, expected "
                         f"[{len(lengths)}, max_blocks]")
    _check_decode(q, len(lengths), keys.shape[1], keys.shape[3], lengths,
                  block_table.shape[1] * block_size)
    used = block_table[np.arange(block_table.shape[1]) < -(-lengths[:, None] // block_size)]
    if used.size and (used.min() < 0 or used.max() >= keys.shape[0]):
        raise ShapeError(f"block table names blocks outside the pool of {keys.shape[0]}")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if n_splits is None:
        n_splits = choose_splits(len(lengths) * keys.shape[1], int(lengths.max(initial=1)))
    return _decode_paged_kernel(np.ascontiguousarray(q), keys, values, block_table, lengths,
                                np.float32(scale), n_splits)
