"""Graders for chapter 1's exercises (`exercises/ex01_attention.ipynb`).

Both compare the learner's function with `kvlib.attention` on hidden cases: plain
multi-head attention (groups of 1), SmolLM2's 9 query heads over 3 KV heads,
multi-query attention (one KV head for all), a single decoding query (T = 1), queries
appended after cached keys (a bottom-right causal mask) and rows with every key masked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..attention import attention, softmax
from ..masks import causal_mask
from . import Report, compare_arrays, grade_prediction, refuses_kvlib, run_cases


def _random(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@refuses_kvlib()
def grade_masked_softmax(masked_softmax: Callable) -> Report:
    """Grade `masked_softmax(scores, mask)`: softmax over the last axis, 0 where mask is False."""
    rng = np.random.default_rng(101)
    half_masked = np.ones((3, 6), bool)
    half_masked[1] = False                                   # a row with nothing to attend to
    big_masked = np.array([[1000.0, 0.0, 1.0], [0.5, 2.0, -1.0]], np.float32)
    first_hidden = np.array([[False, True, True], [True, True, True]])

    def case(scores, mask):
        def check():
            before = scores.copy()
            got = masked_softmax(scores, mask)
            if not np.array_equal(scores, before):
                return "modified its input scores"
            want = softmax(scores, mask)
            problem = compare_arrays(got, want)
            if problem is None or mask is None:
                return problem
            got = np.asarray(got, float)
            lost = (want.sum(axis=-1) > 0) & ~(np.nan_to_num(got).sum(axis=-1) > 0.5)
            if lost.any():
                return (problem + " (a row lost all its weight: a masked score still went "
                        "into the exp or the maximum; set masked scores to -inf before the "
                        "softmax instead of zeroing their weights afterwards)")
            if np.isnan(got).any():
                return problem + " (a row whose keys are all masked must give zeros, not NaN)"
            return problem
        return check

    cases = [
        ("one row, no mask", case(_random(rng, (1, 5)), None)),
        ("a batch of rows [2, 3, 7], no mask", case(_random(rng, (2, 3, 7)), None)),
        ("large scores (subtract the row maximum before exp)", case(_random(rng, (4, 8), 500.0), None)),
        ("causal mask", case(_random(rng, (5, 5)), causal_mask(5))),
        ("bottom-right causal mask, 3 queries after 4 cached keys",
         case(_random(rng, (3, 7)), causal_mask(3, 4))),
        ("a row whose keys are all masked gives zeros", case(_random(rng, (3, 6)), half_masked)),
        ("scores [1000 (masked), 0, 1]: a masked score must not take part at all",
         case(big_masked, first_hidden)),
    ]
    return run_cases("masked_softmax", cases)


@refuses_kvlib()
def grade_grouped_query_attention(grouped_query_attention: Callable) -> Report:
    """Grade `grouped_query_attention(q, k, v, mask)` against `kvlib.attention.attention`.

    q is [T, n_heads, head_dim], k and v are [n_kv_heads, S, head_dim], mask is [T, S]
    bool or None; the result is [T, n_heads, head_dim] float32.
    """
    rng = np.random.default_rng(102)

    def case(n_tokens, n_heads, n_kv_heads, n_keys, head_dim, mask):
        q = _random(rng, (n_tokens, n_heads, head_dim))
        k = _random(rng, (n_kv_heads, n_keys, head_dim))
        v = _random(rng, (n_kv_heads, n_keys, head_dim))

        def check():
            got = grouped_query_attention(q, k, v, mask)
            want = attention(q, k, v, mask)
            if getattr(got, "dtype", None) != np.float32:
                return (f"returned dtype {getattr(got, 'dtype', type(got).__name__)}, expected "
                        "float32 (a float64 scale such as 1/np.sqrt(d) upcasts everything)")
            problem = compare_arrays(got, want)
            if problem is None:
                return None
            group = n_heads // n_kv_heads
            if group > 1 and n_kv_heads > 1:
                # np.tile repeats the KV heads as k0 k1 k2 k0 k1 k2 ...: head h reads h % n_kv_heads
                interleaved = attention(q, np.tile(k, (group, 1, 1)), np.tile(v, (group, 1, 1)), mask)
                if compare_arrays(got, interleaved) is None:
                    return (f"query head h must read KV head h // {group} (the heads of a group are "
                            f"adjacent), not h % {n_kv_heads}")
            if compare_arrays(got, attention(q, k, v, mask, scale=1.0)) is None:
                return "scores must be scaled by 1/sqrt(head_dim)"
            if mask is not None and compare_arrays(got, attention(q, k, v, None)) is None:
                if n_tokens == 1:
                    return ("the mask was ignored for a single query (T = 1): it still hides "
                            "keys, such as the padding of a shorter sequence")
                return "the mask was ignored"
            return problem
        return check

    masked_rows = causal_mask(4, 2)
    masked_rows[2] = False                                   # one query may see nothing
    padded_decode = np.ones((1, 10), bool)
    padded_decode[0, :3] = False                             # left padding of a short prompt
    cases = [
        ("multi-head attention (group of 1), no mask", case(3, 4, 4, 3, 8, None)),
        ("SmolLM2 shapes: 9 query heads over 3 KV heads, causal", case(6, 9, 3, 6, 64, causal_mask(6))),
        ("multi-query attention: 8 query heads share 1 KV head", case(5, 8, 1, 5, 16, causal_mask(5))),
        ("one decoding query (T = 1) over 10 cached keys", case(1, 9, 3, 10, 64, None)),
        ("3 queries appended after 5 cached keys (bottom-right mask)",
         case(3, 6, 2, 8, 16, causal_mask(3, 5))),
        ("a query row with every key masked gives zeros", case(4, 4, 2, 6, 8, masked_rows)),
        ("one decoding query (T = 1) whose mask hides 3 padded keys",
         case(1, 9, 3, 10, 64, padded_decode)),
    ]
    return run_cases("grouped_query_attention", cases)


def attention_with_tile(q, k, v, mask=None):
    """The buggy grouped-query attention of the find-the-bug exercise: it repeats the KV
    heads with np.tile, so query head h reads KV head h % n_kv_heads."""
    group = q.shape[1] // k.shape[0]
    return attention(q, np.tile(k, (group, 1, 1)), np.tile(v, (group, 1, 1)), mask)


def grade_tile_bug(wrong_heads) -> Report:
    """Grade the list of query heads whose output `attention_with_tile` gets wrong for
    SmolLM2's 9 query heads over 3 KV heads (found by running it against `attention`)."""
    rng = np.random.default_rng(103)
    q, k, v = _random(rng, (4, 9, 16)), _random(rng, (3, 6, 16)), _random(rng, (3, 6, 16))
    differs = ~np.isclose(attention_with_tile(q, k, v), attention(q, k, v)).all(axis=(0, 2))
    truth = [int(h) for h in np.flatnonzero(differs)]
    answer = wrong_heads if wrong_heads is ... else sorted(int(h) for h in wrong_heads)
    return grade_prediction("tile_bug", answer, truth, [
        ([], "np.tile puts the KV heads in the order k0 k1 k2 k0 k1 k2 ..., not k0 k0 k0 k1 ..."),
        (list(range(9)), "head h reads KV head h % 3 instead of h // 3, and the two agree "
                         "for some heads"),
        ([1, 2, 4, 5, 7, 8], "a head is right when h // 3 == h % 3 (heads 0, 4 and 8), "
                             "not when h % 3 == 0"),
    ])
