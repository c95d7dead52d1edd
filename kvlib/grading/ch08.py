"""Graders for chapter 8: decode-attention traffic, the online-softmax tile update, the
split-K merge and the block-table walk of a paged cache."""

from __future__ import annotations

import numpy as np

from ..attention import softmax
from ..roofline import attention_traffic
from . import Report, RowReader, compare_arrays, grade_prediction, refuses_kvlib, run_cases


@refuses_kvlib()
def grade_decode_traffic(decode_traffic) -> Report:
    """decode_traffic(batch, context, n_heads, n_kv_heads, head_dim, bytes_per_value)
    -> (kv_bytes, flops): K/V bytes read and FLOPs of one decode-attention call."""
    def case(batch, context, n_heads, n_kv_heads, head_dim, bpv):
        def check():
            got = decode_traffic(batch, context, n_heads, n_kv_heads, head_dim, bpv)
            if not isinstance(got, tuple) or len(got) != 2:
                return f"expected a pair (kv_bytes, flops), got {got!r}"
            kv_bytes = 2 * batch * context * n_kv_heads * head_dim * bpv
            flops = attention_traffic(batch, context, n_heads, n_kv_heads, head_dim).flops
            if not np.isclose(got[0], kv_bytes):
                return (f"kv_bytes {got[0]}, expected {kv_bytes} (keys AND values, every "
                        "token, every KV head, every sequence)")
            if not np.isclose(got[1], flops):
                return (f"flops {got[1]}, expected {flops} (each query head: a dot product "
                        "and a weighted add per token, 2 FLOPs per multiply-add)")
            return None
        return check

    return run_cases("decode_traffic", [
        ("SmolLM2 shape, float32, batch 1, 8k tokens", case(1, 8192, 9, 3, 64, 4)),
        ("batch 16, int8", case(16, 1000, 9, 3, 64, 1)),
        ("multi-head attention (group of 1)", case(2, 300, 8, 8, 128, 2)),
        ("multi-query attention (one KV head)", case(3, 77, 16, 1, 64, 4)),
    ])


def _softmax_reference(scores, values):
    return softmax(scores[None])[0] @ values


@refuses_kvlib()
def grade_fold_tile(fold_tile) -> Report:
    """fold_tile(m, l, acc, scores, values) -> (m, l, acc): the online-softmax update of
    one query head by a tile of scores [n] and values [n, d]."""
    def case(tile_sizes, spread, seed):
        def check():
            rng = np.random.default_rng(seed)
            n = sum(tile_sizes)
            scores = (rng.standard_normal(n) * spread).astype(np.float32)
            values = rng.standard_normal((n, 16)).astype(np.float32)
            m, l, acc = -np.inf, 0.0, np.zeros(16, dtype=np.float32)
            start = 0
            for size in tile_sizes:
                m, l, acc = fold_tile(m, l, acc, scores[start:start + size],
                                      values[start:start + size])
                start += size
            if not np.isclose(m, scores.max()):
                return f"running maximum {m}, expected {scores.max()} (the largest score seen)"
            with np.errstate(invalid="ignore", divide="ignore"):
                output = np.asarray(acc) / l
            problem = compare_arrays(output, _softmax_reference(scores, values),
                                     rtol=1e-4, atol=1e-5)
            return None if problem is None else f"acc / l is not softmax(scores) @ values: {problem}"
        return check

    return run_cases("fold_tile", [
        ("one tile from the empty state (m = -inf)", case([8], 1.0, 0)),
        ("several tiles", case([5, 7, 3, 9], 1.0, 1)),
        ("tiles of one token", case([1] * 6, 1.0, 2)),
        ("a later tile with a much larger maximum", case([4, 4, 4], 40.0, 3)),
        ("large scores that would overflow exp without the maximum", case([16, 16], 200.0, 4)),
    ])


@refuses_kvlib()
def grade_merge_partials(merge_partials) -> Report:
    """merge_partials(ms [s], ls [s], accs [s, d]) -> [d]: combine split-K partial states
    into the normalised attention output."""
    def case(split_sizes, spread, seed):
        def check():
            rng = np.random.default_rng(seed)
            n = sum(split_sizes)
            scores = (rng.standard_normal(n) * spread).astype(np.float64)
            values = rng.standard_normal((n, 8))
            ms, ls, accs, start = [], [], [], 0
            for size in split_sizes:
                s, v = scores[start:start + size], values[start:start + size]
                start += size
                if size == 0:
                    ms.append(-np.inf), ls.append(0.0), accs.append(np.zeros(8))
                    continue
                m = s.max()
                ms.append(m), ls.append(np.exp(s - m).sum()), accs.append(np.exp(s - m) @ v)
            got = merge_partials(np.array(ms), np.array(ls), np.array(accs))
            problem = compare_arrays(got, _softmax_reference(scores, values), rtol=1e-6,
                                     atol=1e-8)
            return None if problem is None else f"{problem}"
        return check

    return run_cases("merge_partials", [
        ("one split (nothing to merge)", case([10], 1.0, 0)),
        ("three splits", case([10, 3, 7], 1.0, 1)),
        ("splits with very different maxima", case([5, 5, 5], 50.0, 2)),
        ("an empty split (m = -inf, l = 0) contributes nothing", case([6, 0, 4], 1.0, 3)),
    ])


def _paged_case(block_size, length, n_blocks, seed):
    rng = np.random.default_rng(seed)
    key_blocks = rng.standard_normal((n_blocks, block_size, 16)).astype(np.float32)
    value_blocks = rng.standard_normal((n_blocks, block_size, 16)).astype(np.float32)
    needed = -(-length // block_size)
    table = rng.permutation(n_blocks)[:needed].astype(np.int32)  # blocks in any order
    q = rng.standard_normal(16).astype(np.float32)
    slots = table[np.arange(length) // block_size] * block_size + np.arange(length) % block_size
    k = key_blocks.reshape(-1, 16)[slots]
    v = value_blocks.reshape(-1, 16)[slots]
    want = _softmax_reference((k @ q) / np.float32(4.0), v)
    return q, key_blocks, value_blocks, table, length, want


@refuses_kvlib()
def grade_paged_decode(paged_decode) -> Report:
    """paged_decode(q [d], key_blocks [N, bs, d], value_blocks, block_table [n], length)
    -> [d]: one query head's decode attention over a paged sequence (scale 1/sqrt(d)).

    The block pools are handed in as `RowReader`s that allow reading one block at a time,
    so gathering the whole sequence into one array is refused."""
    def case(block_size, length, n_blocks, seed):
        def check():
            q, kb, vb, table, length_, want = _paged_case(block_size, length, n_blocks, seed)
            rule = ("walk the block table one block at a time, key_blocks[block_table[i]], "
                    "never gathering the sequence into one copy")
            got = paged_decode(q, RowReader(kb, "key_blocks", 1, rule),
                               RowReader(vb, "value_blocks", 1, rule), table.copy(), length_)
            problem = compare_arrays(got, want, rtol=1e-4, atol=1e-5)
            if problem is None:
                return None
            return (f"{problem} (token t lives in block block_table[t // block_size] at "
                    "offset t % block_size; the last block may be partly filled)")
        return check

    return run_cases("paged_decode", [
        ("one token", case(4, 1, 3, 0)),
        ("exactly one full block", case(8, 8, 4, 1)),
        ("a block boundary plus one token", case(8, 9, 4, 2)),
        ("many blocks, last one partly filled", case(16, 100, 12, 3)),
        ("block size 1", case(1, 13, 20, 4)),
        ("block size that is not a power of two", case(5, 23, 9, 5)),
    ])


def grade_intensity(float32_intensity, int8_intensity) -> Report:
    """Grade the predicted arithmetic intensity (FLOPs per byte) of SmolLM2's decode
    attention (9 query heads over 3 KV heads of 64) over 4,096 cached tokens, with float32
    and with int8 keys and values (scales left out), as `attention_traffic` counts it."""
    def intensity(bytes_per_value, n_heads=9):
        return attention_traffic(1, 4096, n_heads, 3, 64, bytes_per_value).intensity

    answer = (... if ... in (float32_intensity, int8_intensity)
              else (float32_intensity, int8_intensity))
    return grade_prediction("intensity", answer, (intensity(4), intensity(1)), [
        ((intensity(4, 3), intensity(1, 3)), "each KV head serves a group of 3 query heads: "
                                             "3 times the FLOPs for the same bytes"),
        ((intensity(4), intensity(4)), "int8 reads a quarter of the bytes for the same FLOPs"),
        ((2 * intensity(4), 2 * intensity(1)), "read keys AND values: two vectors per token"),
    ], rtol=0.05)
