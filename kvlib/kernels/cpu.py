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
table, one block per tile, without gathering the sequence into a copy; `decode_int8`
reads 8-bit codes with float16 scales (the layout of `QuantizedCache`) and dequantizes
each tile into a small buffer that stays in the core's L1 cache.
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


# 2**(e - 25) for the 5-bit exponent e of a float16 (e = 0 is handled as e = 1: subnormals)
_HALF_POWERS = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float32)


@njit(cache=True, fastmath=False)
def _half_to_float(bits):
    """The float32 value of float16 `bits` (a uint16), for finite values.

    Numba cannot read float16 arrays, so the kernels read scales as their raw 16 bits:
    sign (1 bit), exponent e (5 bits), mantissa m (10 bits); the value is
    +-(1024 + m) * 2**(e - 25) for e > 0 and +-m * 2**(-24) for e = 0 (subnormal).
    """
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent > 0:
        mantissa += 1024
    value = np.float32(mantissa) * _HALF_POWERS[exponent]
    return -value if bits & 0x8000 else value


@njit(cache=True, fastmath=False)
def _dequantize_rows(codes, scale, zero, has_zero, channel_group, out):
    """out[i, j] = codes[i, j] * scale[i, j // channel_group] (+ zero[i, ...]).

    For per-token data: codes [n, d], scale/zero [n, d // channel_group] as float16 bits.
    """
    n, head_dim = codes.shape
    for i in range(n):
        for g in range(head_dim // channel_group):
            s = _half_to_float(scale[i, g])
            z = _half_to_float(zero[i, g]) if has_zero else np.float32(0.0)
            for j in range(g * channel_group, (g + 1) * channel_group):
                out[i, j] = np.float32(codes[i, j]) * s + z


@njit(cache=True, fastmath=False)
def _dequantize_channels(codes, scale, zero, has_zero, first_token, token_group, out):
    """Per-channel keys: out[i, j] = codes[i, j] * scale[(first_token + i) // token_group, j]."""
    n, head_dim = codes.shape
    for i in range(n):
        row = (first_token + i) // token_group
        for j in range(head_dim):
            z = _half_to_float(zero[row, j]) if has_zero else np.float32(0.0)
            out[i, j] = np.float32(codes[i, j]) * _half_to_float(scale[row, j]) + z


@njit(parallel=True, cache=True, fastmath=False)
def _decode_int8_kernel(q, key_codes, key_scale, key_zero, value_codes, value_scale,
                        value_zero, tail_keys, tail_values, rows, lengths, n_quantized,
                        has_zero, channel_group, key_token_group, scale, n_splits):
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = key_codes.shape[1]
    n_group = n_heads // n_kv_heads
    m = np.full((n_seq, n_kv_heads, n_splits, n_group), -np.inf, dtype=np.float32)
    l = np.zeros((n_seq, n_kv_heads, n_splits, n_group), dtype=np.float32)
    acc = np.zeros((n_seq, n_kv_heads, n_splits, n_group, head_dim), dtype=np.float32)
    for item in prange(n_seq * n_kv_heads * n_splits):
        b = item // (n_kv_heads * n_splits)
        h = (item // n_splits) % n_kv_heads
        split = item % n_splits
        r = rows[b]
        q_group = q[b, h * n_group:(h + 1) * n_group] * scale
        scores = np.empty((n_group, TILE), dtype=np.float32)
        k_tile = np.empty((TILE, head_dim), dtype=np.float32)  # dequantized tile, in L1
        v_tile = np.empty((TILE, head_dim), dtype=np.float32)
        n_q = n_quantized[b]
        n_tiles = (n_q + TILE - 1) // TILE
        n_units = n_tiles + (1 if lengths[b] > n_q else 0)  # the tail is one more unit
        first, last = _split_range(n_units, split, n_splits)
        for tile in range(first, last):
            state = (m[b, h, split], l[b, h, split], acc[b, h, split])
            if tile == n_tiles:                                  # the float32 tail
                n_tail = lengths[b] - n_q
                _fold_tile(q_group, tail_keys[r, h, :n_tail], tail_values[r, h, :n_tail],
                           state[0], state[1], state[2], scores)
                continue
            start = tile * TILE
            end = min(start + TILE, n_q)
            n = end - start
            if key_token_group > 0:                              # per-channel keys
                _dequantize_channels(key_codes[r, h, start:end], key_scale[r, h],
                                     key_zero[r, h], has_zero, start, key_token_group,
                                     k_tile[:n])
            else:
                _dequantize_rows(key_codes[r, h, start:end], key_scale[r, h, start:end],
                                 key_zero[r, h, start:end], has_zero, channel_group, k_tile[:n])
            _dequantize_rows(value_codes[r, h, start:end], value_scale[r, h, start:end],
                             value_zero[r, h, start:end], has_zero, channel_group, v_tile[:n])
            _fold_tile(q_group, k_tile[:n], v_tile[:n], state[0], state[1], state[2], scores)
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


def decode_int8(q: np.ndarray, key_codes, key_scale, key_zero, value_codes, value_scale,
                value_zero, tail_keys, tail_values, rows, lengths, n_quantized,
                key_token_group: int = 0, scale: float | None = None,
                n_splits: int | None = None) -> np.ndarray:
    """Decode attention over one layer of an 8-bit quantized cache, dequantizing inside.

    Tokens [0, n_quantized[b]) of sequence b are stored as 8-bit codes (int8 symmetric,
    or uint8 with a zero point) with float16 scales; tokens [n_quantized[b], lengths[b])
    are float32 in the tail.

    Args:
        q: [B, n_heads, head_dim] float32.
        key_codes, value_codes: [rows, n_kv_heads, max_seq, head_dim] int8 or uint8.
        value_scale, value_zero: [rows, n_kv_heads, max_seq, head_dim // channel_group]
            float16 (zero None when symmetric); key_scale, key_zero: the same for per-token
            keys, [rows, n_kv_heads, max_seq // key_token_group, head_dim] for per-channel.
        tail_keys, tail_values: [rows, n_kv_heads, tail_slots, head_dim] float32.
        rows, lengths, n_quantized: [B] row, tokens to attend over, tokens quantized.
        key_token_group: 0 for per-token keys, else tokens per per-channel key scale.
        scale, n_splits: as in `decode_contiguous`.
    Returns:
        [B, n_heads, head_dim] float32.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    n_quantized = np.ascontiguousarray(n_quantized, dtype=np.int64)
    if key_codes.dtype not in (np.int8, np.uint8) or value_codes.dtype != key_codes.dtype:
        raise DTypeError(f"the int8 kernel reads 8-bit codes, got {key_codes.dtype}")
    if key_scale.dtype != np.float16 or value_scale.dtype != np.float16:
        raise DTypeError("the int8 kernel reads float16 scales")
    _check_decode(q, len(rows), key_codes.shape[1], key_codes.shape[3], lengths,
                  key_codes.shape[2])
    if (n_quantized > lengths).any() or (lengths - n_quantized > tail_keys.shape[2]).any():
        raise ShapeError(f"n_quantized {n_quantized} does not fit lengths {lengths} with a "
                         f"tail of {tail_keys.shape[2]} slots")
    has_zero = key_zero is not None
    if not has_zero:  # symmetric: the kernel never reads zero points; pass the scales
        key_zero, value_zero = key_scale, value_scale
    channel_group = key_codes.shape[3] // value_scale.shape[3]
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if n_splits is None:
        n_splits = choose_splits(len(rows) * key_codes.shape[1], int(lengths.max(initial=1)))
    bits = [a.view(np.uint16) for a in (key_scale, key_zero, value_scale, value_zero)]
    return _decode_int8_kernel(np.ascontiguousarray(q), key_codes, bits[0], bits[1],
                               value_codes, bits[2], bits[3], tail_keys, tail_values, rows, lengths,
                               n_quantized, has_zero, channel_group, key_token_group,
                               np.float32(scale), n_splits)
