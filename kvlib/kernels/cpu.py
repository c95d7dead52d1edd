"""Decode attention in Numba: one new query token per sequence, over the whole cache.

Every kernel here computes, for each sequence b and query head h,

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G]^T) @ V[b, h // G]

over the `lengths[b]` cached tokens, where G = n_heads / n_kv_heads is the number of
query heads sharing one KV head (grouped-query attention). What makes them fast:

* **Grouped-query aware.** A work item is one (sequence, KV head): it loads each key and
  value vector once and uses it for all G query heads of that KV head.
* **One pass with an online softmax.** Keys are read in tiles of `TILE` tokens; each tile
  updates a running maximum `m`, a running sum of exponentials `l` and an unnormalised
  output `acc`, so K and V are streamed exactly once and no `[n_heads, context]` score
  matrix is ever stored.
* **SIMD inner loops.** Dot products and value sums take four tokens per step, and the
  exponential is a polynomial the compiler vectorises (`exp_nonpositive`), not one
  C-library call per score.
* **Software prefetch.** While one tile is computed, the next tile's keys and values (for
  the paged cache, the block half a tile ahead, found through the block table) are
  requested from memory, so the core does not wait for DRAM at every tile and block.
* **Parallel over (sequence, KV head), and split-K.** Work items run on Numba's threads
  (`prange`), each with its own private state. When there are too few items to keep
  every thread busy, each item's context is cut into `n_splits` ranges processed in
  parallel, and the partial results are merged afterwards with the same online-softmax
  rule (Flash-Decoding).

Kernels follow the storage of each cache: `decode_contiguous` reads a
`[rows, n_kv_heads, max_seq, head_dim]` layer of `ContiguousCache`; `decode_paged` reads a
`[num_blocks, n_kv_heads, block_size, head_dim]` block pool through each sequence's block
table, without gathering the sequence into a copy; `decode_int8` reads 8-bit codes with
float16 scales (the layout of `QuantizedCache`): with one scale per token and head the
scales multiply scores and weights and the codes are used as they are; other layouts are
dequantized one tile at a time into a buffer that stays in the core's L1 cache.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..errors import DTypeError, ShapeError

TILE = 64                 # tokens per online-softmax update
MIN_SPLIT_TOKENS = 512    # split-K never gives a thread fewer tokens than this
UNROLL = 4                # tokens per step of the dot-product and value loops
LANES_FM = {"reassoc", "contract"}
# The only relaxations used anywhere in the kernels: `reassoc` lets the compiler keep
# partial sums in SIMD lanes and add them at the end, `contract` fuses a * b + c into one
# FMA instruction. Both change the last bits of a result, never more; infinities and NaN
# keep their IEEE meaning (no flush-to-zero, no "no-NaN" assumptions).

# exp(x) = 2**k * exp(r) with k = round(x / ln 2) and |r| <= ln(2) / 2; ln 2 is split in
# a short high part (exact in k * LN2_HI) and a low correction, so r is accurate.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)   # exp(-87) ~ 1.6e-38, the smallest normal float32 is 1.2e-38
# Taylor coefficients 1/7!, ..., 1/1!, 1/0!: the error is below r**8 / 8! < 1e-8 relative
_EXP_COEFFS = np.array([1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1, 1],
                       dtype=np.float32)


@njit(cache=True, fastmath={"contract"})
def exp_nonpositive(x, n, scratch):
    """x[:n] <- exp(x[:n]) for x <= 0, in a loop the compiler turns into SIMD code.

    NumPy's exponential is vectorised, but `np.exp` on one float inside a Numba loop is a
    call to the C library, one value at a time; with three query heads per key that is
    three calls per cached token. This version needs only multiply-adds, a rounding and
    integer shifts, so 16 values go through each AVX-512 instruction.

    Args:
        x: [>= n] float32, scores minus their running maximum (so <= 0).
        scratch: [>= n] int32 buffer for the bits of 2**k.
    Results are within 2e-7 relative of `np.exp`; inputs below -87 give exp(-87).
    """
    powers = scratch.view(np.float32)
    for i in range(n):
        v = max(x[i], _EXP_FLOOR)
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - k * _LN2_HI - k * _LN2_LO
        p = _EXP_COEFFS[0]
        for c in range(1, _EXP_COEFFS.shape[0]):
            p = p * r + _EXP_COEFFS[c]
        x[i] = p
        scratch[i] = (np.int32(k) + np.int32(127)) << 23   # the float32 bits of 2**k
    for i in range(n):
        x[i] *= powers[i]


# LLVM's locality hint: 3 = keep in every cache level (x86 `prefetcht0`, into L1),
# 2 = into L2 and below (`prefetcht1`). Prefetching a whole tile of K and V ahead is
# about as large as L1 itself, so lines sent to L1 evict the ones in use (chapter 8).
PREFETCH_LOCALITY = 2


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line holding array.flat[index] (no wait).

    A software prefetch (`prefetcht1` on x86 with `PREFETCH_LOCALITY` 2): it never
    faults and returns nothing; the
    load proceeds in the background while the core computes. Numba has no function for
    it, so this emits LLVM's `llvm.prefetch` intrinsic directly.
    """
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(data, [args[1]])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(fn, [address, i32(0), i32(PREFETCH_LOCALITY), i32(1)])  # read, data
        return context.get_dummy_value()
    return types.void(array, index), codegen


@njit(cache=True)
def _prefetch_rows(rows, first, count):
    """Prefetch every 64-byte cache line of rows[first:first + count] that exists.

    Args:
        rows: a C-contiguous [m, d] array (the rows of the next tile or block).
    """
    width = rows.shape[1]
    for i in range(first, min(first + count, rows.shape[0])):
        for e in range(0, width, max(1, 64 // rows.itemsize)):
            _prefetch(rows, i * width + e)


@njit(cache=True, fastmath=LANES_FM)
def _scores(q_group, keys, scores, offset, ahead):
    """scores[g, offset + t] = q_group[g] . keys[t] for every key of the tile.

    Args:
        q_group: [G, d] scaled queries sharing one KV head.
        keys: [n, d] keys (float32, or 8-bit codes). Four keys are taken per step, so
            each query value is loaded once for four dot products.
        scores: [G, >= offset + n] output.
        ahead: [m, d] the keys to be read next; row t is prefetched with key t, so memory
            works on the next tile while this one is computed.
    """
    n = keys.shape[0]
    n_group, head_dim = q_group.shape
    t = 0
    while t + UNROLL <= n:
        _prefetch_rows(ahead, t, UNROLL)
        for g in range(n_group):
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for j in range(head_dim):
                qj = q_group[g, j]
                s0 += qj * keys[t, j]
                s1 += qj * keys[t + 1, j]
                s2 += qj * keys[t + 2, j]
                s3 += qj * keys[t + 3, j]
            scores[g, offset + t] = s0
            scores[g, offset + t + 1] = s1
            scores[g, offset + t + 2] = s2
            scores[g, offset + t + 3] = s3
        t += UNROLL
    for t in range(t, n):
        for g in range(n_group):
            total = np.float32(0.0)
            for j in range(head_dim):
                total += q_group[g, j] * keys[t, j]
            scores[g, offset + t] = total


@njit(cache=True, fastmath=LANES_FM)
def _softmax_update(scores, n, m, l, acc, scratch):
    """Fold n new scores into the online-softmax state; scores[:, :n] become weights.

    Args:
        scores: [G, >= n] scores of the tile; on return exp(score - new maximum).
        m, l: [G] running maximum and running sum of exp(score - m).
        acc: [G, d] running sum of exp(score - m) * value, rescaled here to the new m.
        scratch: [>= n] int32, for `exp_nonpositive`.
    """
    n_group, head_dim = acc.shape
    for g in range(n_group):
        new_max = m[g]
        for t in range(n):
            new_max = max(new_max, scores[g, t])
        correction = np.exp(m[g] - new_max)   # one libm call per tile: exp(-inf) = 0 here
        m[g] = new_max
        for j in range(head_dim):
            acc[g, j] *= correction
        row = scores[g]
        for t in range(n):
            row[t] -= new_max
        exp_nonpositive(row, n, scratch)
        total = np.float32(0.0)
        for t in range(n):
            total += row[t]
        l[g] = l[g] * correction + total


@njit(cache=True, fastmath=LANES_FM)
def _accumulate_values(weights, offset, values, acc, ahead):
    """acc[g] += sum_t weights[g, offset + t] * values[t], four values per step.

    Args:
        weights: [G, >= offset + n] softmax weights; values: [n, d]; acc: [G, d].
        ahead: [m, d] the values to be read next, prefetched as in `_scores`.
    """
    n = values.shape[0]
    n_group, head_dim = acc.shape
    t = 0
    while t + UNROLL <= n:
        _prefetch_rows(ahead, t, UNROLL)
        for g in range(n_group):
            w0, w1 = weights[g, offset + t], weights[g, offset + t + 1]
            w2, w3 = weights[g, offset + t + 2], weights[g, offset + t + 3]
            for j in range(head_dim):
                acc[g, j] += (w0 * values[t, j] + w1 * values[t + 1, j]
                              + w2 * values[t + 2, j] + w3 * values[t + 3, j])
        t += UNROLL
    for t in range(t, n):
        for g in range(n_group):
            w = weights[g, offset + t]
            for j in range(head_dim):
                acc[g, j] += w * values[t, j]


@njit(cache=True)
def _fold_tile(q_group, keys, values, state, keys_ahead, values_ahead):
    """Fold one tile of keys/values ([n, d] each, n <= TILE) into an online-softmax state.

    The three steps of every kernel here: scores of the tile, the softmax update, the
    weighted values. `state` is the tuple made by `_new_state`; `keys_ahead` and
    `values_ahead` are the rows of the next tile, prefetched on the way.
    """
    m, l, acc, scores, scratch = state
    _scores(q_group, keys, scores, 0, keys_ahead)
    _softmax_update(scores, keys.shape[0], m, l, acc, scratch)
    _accumulate_values(scores, 0, values, acc, values_ahead)


@njit(cache=True)
def _new_state(n_group, head_dim, tile):
    """Online-softmax state of G query heads, private to one work item (so to one thread).

    Returns (m [G] = -inf, l [G] = 0, acc [G, d] = 0, scores [G, tile], scratch [tile]).
    Each thread updates its own small arrays; only the final state is written to memory
    that other threads touch, so no cache line bounces between cores while streaming.
    """
    return (np.full(n_group, -np.inf, dtype=np.float32),
            np.zeros(n_group, dtype=np.float32),
            np.zeros((n_group, head_dim), dtype=np.float32),
            np.empty((n_group, tile), dtype=np.float32),
            np.empty(tile, dtype=np.int32))


@njit(cache=True)
def _split_range(n_units, split, n_splits):
    """[start, end) of the `split`-th of `n_splits` near-equal ranges over n_units."""
    per_split = (n_units + n_splits - 1) // n_splits
    start = min(split * per_split, n_units)
    return start, min(start + per_split, n_units)


@njit(cache=True)
def _work_item(item, n_kv_heads, n_splits):
    """(sequence, KV head, split) of a flat work-item index."""
    return item // (n_kv_heads * n_splits), (item // n_splits) % n_kv_heads, item % n_splits


@njit(cache=True)
def _merge_splits(m, l, acc, n_kv_heads, n_splits):
    """Combine split-K partial states into normalised outputs.

    Args:
        m, l: [items, G]; acc: [items, G, d], item = (b * n_kv_heads + h) * n_splits + split.
            A split that saw no token has m = -inf and l = 0 and contributes nothing.
    Returns:
        [B, n_kv_heads * G, d] float32.
    """
    n_items, n_group, head_dim = acc.shape
    n_seq = n_items // (n_kv_heads * n_splits)
    out = np.empty((n_seq, n_kv_heads * n_group, head_dim), dtype=np.float32)
    for row in range(n_seq * n_kv_heads * n_group):
        b, h, g = _work_item(row, n_kv_heads, n_group)   # same index arithmetic, G for splits
        first = (b * n_kv_heads + h) * n_splits
        top = -np.inf
        for s in range(first, first + n_splits):
            top = max(top, m[s, g])
        total = np.float32(0.0)
        out_row = out[b, h * n_group + g]
        out_row[:] = 0.0
        for s in range(first, first + n_splits):
            if l[s, g] == 0.0:
                continue
            w = np.exp(m[s, g] - top)
            total += w * l[s, g]
            for j in range(head_dim):
                out_row[j] += w * acc[s, g, j]
        for j in range(head_dim):
            out_row[j] /= total
    return out


@njit(cache=True)
def _partials(n_items, n_group, head_dim):
    """Per-item results (m, l, acc) that `_merge_splits` combines."""
    return (np.empty((n_items, n_group), dtype=np.float32),
            np.empty((n_items, n_group), dtype=np.float32),
            np.empty((n_items, n_group, head_dim), dtype=np.float32))


@njit(parallel=True, cache=True)
def _decode_contiguous_kernel(q, keys, values, rows, lengths, scale, n_splits, prefetch):
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    n_group = n_heads // n_kv_heads
    n_items = n_seq * n_kv_heads * n_splits
    m_out, l_out, acc_out = _partials(n_items, n_group, head_dim)
    for item in prange(n_items):
        b, h, split = _work_item(item, n_kv_heads, n_splits)
        q_group = q[b, h * n_group:(h + 1) * n_group] * scale
        state = _new_state(n_group, head_dim, TILE)
        k_seq, v_seq = keys[rows[b], h], values[rows[b], h]
        n_tiles = (lengths[b] + TILE - 1) // TILE
        first, last = _split_range(n_tiles, split, n_splits)
        for tile in range(first, last):
            start, end = tile * TILE, min(tile * TILE + TILE, lengths[b])
            ahead = slice(end, min(end + TILE, lengths[b]) if prefetch else end)
            _fold_tile(q_group, k_seq[start:end], v_seq[start:end], state, k_seq[ahead],
                       v_seq[ahead])
        m_out[item], l_out[item], acc_out[item] = state[0], state[1], state[2]
    return _merge_splits(m_out, l_out, acc_out, n_kv_heads, n_splits)


@njit(parallel=True, cache=True)
def _decode_paged_kernel(q, keys, values, block_table, lengths, scale, n_splits, prefetch):
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads, block_size = keys.shape[1], keys.shape[2]
    n_group = n_heads // n_kv_heads
    per_tile = max(1, TILE // block_size)      # blocks whose scores share one softmax update
    ahead = block_size if prefetch else 0      # rows of a following block to prefetch
    lead = max(1, per_tile // 2)               # ... which is half a tile ahead
    n_items = n_seq * n_kv_heads * n_splits
    m_out, l_out, acc_out = _partials(n_items, n_group, head_dim)
    for item in prange(n_items):
        b, h, split = _work_item(item, n_kv_heads, n_splits)
        q_group = q[b, h * n_group:(h + 1) * n_group] * scale
        state = _new_state(n_group, head_dim, per_tile * block_size)
        m, l, acc, scores, scratch = state
        n_blocks = (lengths[b] + block_size - 1) // block_size
        n_tiles = (n_blocks + per_tile - 1) // per_tile
        first, last = _split_range(n_tiles, split, n_splits)
        for tile in range(first, last):
            first_block = tile * per_tile
            end_block = min(first_block + per_tile, n_blocks)
            for i in range(first_block, end_block):  # the block-table walk: scores first
                used = min(block_size, lengths[b] - i * block_size)  # last block: partial
                following = block_table[b, min(i + lead, n_blocks - 1)]  # prefetched meanwhile
                _scores(q_group, keys[block_table[b, i], h, :used], scores,
                        (i - first_block) * block_size, keys[following, h, :ahead])
            n = min(lengths[b], end_block * block_size) - first_block * block_size
            _softmax_update(scores, n, m, l, acc, scratch)
            for i in range(first_block, end_block):  # then the values, walking the same blocks
                used = min(block_size, lengths[b] - i * block_size)
                following = block_table[b, min(i + lead, n_blocks - 1)]
                _accumulate_values(scores, (i - first_block) * block_size,
                                   values[block_table[b, i], h, :used], acc,
                                   values[following, h, :ahead])
        m_out[item], l_out[item], acc_out[item] = m, l, acc
    return _merge_splits(m_out, l_out, acc_out, n_kv_heads, n_splits)


@njit(cache=True)
def halves_to_float32(bits, out):
    """out[i] = the float32 value of the float16 whose 16 bits are bits[i].

    Numba cannot read float16 arrays, so the kernels read scales as raw 16 bits: sign
    (1 bit), exponent e (5 bits), mantissa (10 bits). A normal float16 (e > 0) becomes a
    float32 by moving its fields into place and adding 127 - 15 to the exponent; a
    subnormal one (e = 0) is mantissa * 2**-24. Both are computed and one is kept, with
    no branch, so the loop runs in SIMD lanes. Infinity and NaN are not supported.

    Args:
        bits: [n] uint16. out: [n] float32, written in place.
    """
    out_bits = out.view(np.int32)
    for i in range(bits.shape[0]):
        h = np.int32(bits[i])
        sign = (h & 0x8000) << 16
        magnitude = h & 0x7FFF
        normal = sign | ((magnitude << 13) + 0x38000000)
        out_bits[i] = normal if magnitude >= 0x400 else sign
    for i in range(bits.shape[0]):
        h = np.int32(bits[i])
        tiny = np.float32(h & 0x3FF) * np.float32(2.0 ** -24) if (h & 0x7C00) == 0 \
            else np.float32(0.0)
        out[i] += -tiny if h & 0x8000 else tiny


@njit(cache=True, fastmath=LANES_FM)
def _dequantize_tokens(codes, scale_bits, zero_bits, has_zero, meta, out):
    """Per-token data: out[i, j] = codes[i, j] * scale[i, j // group] (+ zero[i, ...]).

    Args:
        codes: [n, d] 8-bit codes; scale_bits, zero_bits: [n, d // group] float16 bits.
        meta: [>= 2 * n * (d // group)] float32 scratch for the decoded scales and zeros.
        out: [n, d] float32.
    """
    n, head_dim = codes.shape
    n_groups = scale_bits.shape[1]
    group = head_dim // n_groups
    scales = meta[:n * n_groups]
    zeros = meta[n * n_groups:2 * n * n_groups]
    halves_to_float32(scale_bits.reshape(n * n_groups), scales)
    if has_zero:
        halves_to_float32(zero_bits.reshape(n * n_groups), zeros)
    else:
        zeros[:] = 0.0
    for i in range(n):
        for c in range(n_groups):
            s, z = scales[i * n_groups + c], zeros[i * n_groups + c]
            first = c * group
            for j in range(group):  # a loop from 0 vectorises; range(first, ...) did not
                out[i, first + j] = np.float32(codes[i, first + j]) * s + z


@njit(cache=True, fastmath=LANES_FM)
def _dequantize_channels(codes, scale_bits, zero_bits, has_zero, first_token, token_group,
                         meta, out):
    """Per-channel keys: out[i, j] = codes[i, j] * scale[(first_token + i) // token_group, j].

    Args:
        codes: [n, d]; scale_bits, zero_bits: [groups, d] float16 bits for the whole row.
        meta: [>= 2 * d] float32 scratch (one decoded scale row and zero row at a time).
        out: [n, d] float32.
    """
    n, head_dim = codes.shape
    scales, zeros = meta[:head_dim], meta[head_dim:2 * head_dim]
    row = -1
    for i in range(n):
        if (first_token + i) // token_group != row:   # a new token group: decode its row
            row = (first_token + i) // token_group
            halves_to_float32(scale_bits[row], scales)
            if has_zero:
                halves_to_float32(zero_bits[row], zeros)
            else:
                zeros[:] = 0.0
        for j in range(head_dim):
            out[i, j] = np.float32(codes[i, j]) * scales[j] + zeros[j]


@njit(cache=True, fastmath=LANES_FM)
def _fold_scaled_tile(q_group, key_codes, key_scale_bits, value_codes, value_scale_bits,
                      state, meta, keys_ahead, values_ahead):
    """Fold a tile of int8 codes with one scale per token and head, dequantizing nothing.

    With k = s_k * c_k and v = s_v * c_v, the score q . k is s_k * (q . c_k) and a weight
    w times v is (w * s_v) * c_v: the scales multiply the n scores and the n weights, and
    `_scores` / `_accumulate_values` read the codes directly (converting each to float
    in registers). No [n, d] float32 tile is written or read back.

    Args:
        key_codes, value_codes: [n, d] int8; key_scale_bits, value_scale_bits: [n, 1]
            float16 bits. meta: [>= 2n] float32 scratch.
        keys_ahead, values_ahead: codes to prefetch on the way (as in `_fold_tile`).
    """
    m, l, acc, scores, scratch = state
    n = key_codes.shape[0]
    key_scales, value_scales = meta[:n], meta[n:2 * n]
    halves_to_float32(key_scale_bits.reshape(n), key_scales)
    halves_to_float32(value_scale_bits.reshape(n), value_scales)
    _scores(q_group, key_codes, scores, 0, keys_ahead)
    for g in range(scores.shape[0]):
        for t in range(n):
            scores[g, t] *= key_scales[t]
    _softmax_update(scores, n, m, l, acc, scratch)   # l sums the weights before scaling
    for g in range(scores.shape[0]):
        for t in range(n):
            scores[g, t] *= value_scales[t]
    _accumulate_values(scores, 0, value_codes, acc, values_ahead)


@njit(parallel=True, cache=True)
def _decode_int8_kernel(q, key_codes, key_scale, key_zero, value_codes, value_scale,
                        value_zero, tail_keys, tail_values, rows, lengths, n_quantized,
                        has_zero, key_token_group, scale, n_splits):
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = key_codes.shape[1]
    n_group = n_heads // n_kv_heads
    n_items = n_seq * n_kv_heads * n_splits
    # symmetric, one scale per token and head for keys and values: the fast path
    scaled_codes = not has_zero and key_token_group == 0 and key_scale.shape[3] == 1 \
        and value_scale.shape[3] == 1
    m_out, l_out, acc_out = _partials(n_items, n_group, head_dim)
    for item in prange(n_items):
        b, h, split = _work_item(item, n_kv_heads, n_splits)
        r = rows[b]
        q_group = q[b, h * n_group:(h + 1) * n_group] * scale
        state = _new_state(n_group, head_dim, TILE)
        k_tile = np.empty((TILE, head_dim), dtype=np.float32)  # dequantized tile, in L1
        v_tile = np.empty((TILE, head_dim), dtype=np.float32)
        meta = np.empty(2 * TILE * head_dim, dtype=np.float32)  # decoded scales and zeros
        n_q = n_quantized[b]
        n_tiles = (n_q + TILE - 1) // TILE
        n_units = n_tiles + (1 if lengths[b] > n_q else 0)  # the float32 tail is one more
        first, last = _split_range(n_units, split, n_splits)
        for tile in range(first, last):
            if tile == n_tiles:
                n_tail = lengths[b] - n_q
                _fold_tile(q_group, tail_keys[r, h, :n_tail], tail_values[r, h, :n_tail],
                           state, tail_keys[r, h, :0], tail_values[r, h, :0])
                continue
            start, end = tile * TILE, min(tile * TILE + TILE, n_q)
            n = end - start
            if scaled_codes:  # no prefetch: at a quarter of the bytes, arithmetic is the limit
                _fold_scaled_tile(q_group, key_codes[r, h, start:end], key_scale[r, h, start:end],
                                  value_codes[r, h, start:end], value_scale[r, h, start:end],
                                  state, meta, key_codes[r, h, :0], value_codes[r, h, :0])
                continue
            if key_token_group > 0:
                _dequantize_channels(key_codes[r, h, start:end], key_scale[r, h],
                                     key_zero[r, h], has_zero, start, key_token_group,
                                     meta, k_tile[:n])
            else:
                _dequantize_tokens(key_codes[r, h, start:end], key_scale[r, h, start:end],
                                   key_zero[r, h, start:end], has_zero, meta, k_tile[:n])
            _dequantize_tokens(value_codes[r, h, start:end], value_scale[r, h, start:end],
                               value_zero[r, h, start:end], has_zero, meta, v_tile[:n])
            _fold_tile(q_group, k_tile[:n], v_tile[:n], state, k_tile[:0], v_tile[:0])
        m_out[item], l_out[item], acc_out[item] = state[0], state[1], state[2]
    return _merge_splits(m_out, l_out, acc_out, n_kv_heads, n_splits)


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
                      scale: float | None = None, n_splits: int | None = None,
                      prefetch: bool = True) -> np.ndarray:
    """Decode attention over one layer of a `ContiguousCache`.

    Args:
        q: [B, n_heads, head_dim] float32, the one new query of each sequence.
        keys, values: [rows, n_kv_heads, max_seq, head_dim] float32 (a layer of the cache).
        rows: [B] cache row of each sequence.
        lengths: [B] tokens to attend over per sequence (the new one included), >= 1.
        scale: multiplier of q . k (default 1 / sqrt(head_dim)).
        n_splits: split-K ranges per (sequence, KV head); default `choose_splits`.
        prefetch: prefetch the next tile of K and V while computing one (True), or rely on
            the hardware prefetcher alone (False, for comparison).
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
                                     np.float32(scale), n_splits, prefetch)


def decode_paged(q: np.ndarray, keys: np.ndarray, values: np.ndarray, block_table, lengths,
                 scale: float | None = None, n_splits: int | None = None,
                 prefetch: bool = True) -> np.ndarray:
    """Decode attention over one layer of a paged block pool.

    Args:
        q: [B, n_heads, head_dim] float32, the one new query of each sequence.
        keys, values: [num_blocks, n_kv_heads, block_size, head_dim] float32 (one layer).
        block_table: [B, max_blocks] int; token t of sequence b lives in block
            block_table[b, t // block_size] at offset t % block_size.
        lengths: [B] tokens to attend over per sequence (the new one included), >= 1.
        scale, n_splits, prefetch: as in `decode_contiguous`.
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
                                np.float32(scale), n_splits, prefetch)


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
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if n_splits is None:
        n_splits = choose_splits(len(rows) * key_codes.shape[1], int(lengths.max(initial=1)))
    bits = [a.view(np.uint16) for a in (key_scale, key_zero, value_scale, value_zero)]
    return _decode_int8_kernel(np.ascontiguousarray(q), key_codes, bits[0], bits[1],
                               value_codes, bits[2], bits[3], tail_keys, tail_values, rows, lengths,
                               n_quantized, has_zero, key_token_group,
                               np.float32(scale), n_splits)
