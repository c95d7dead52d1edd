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
from . import Report, compare_arrays, run_cases


def _random(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def grade_masked_softmax(masked_softmax: Callable) -> Report:
    """Grade `masked_softmax(scores, mask)`: softmax over the last axis, 0 where mask is False."""
    rng = np.random.default_rng(101)
    half_masked = np.ones((3, 6), bool)
    half_masked[1] = False                                   # a row with nothing to attend to

    def case(scores, mask):
        def check():
            before = scores.copy()
            got = masked_softmax(scores, mask)
            if not np.array_equal(scores, before):
                return "modified its input scores"
            problem = compare_arrays(got, softmax(scores, mask))
            if problem and mask is not None and np.isnan(np.asarray(got, float)).any():
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
    ]
    return run_cases("masked_softmax", cases)


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
                return "the mask was ignored"
            return problem
        return check

    masked_rows = causal_mask(4, 2)
    masked_rows[2] = False                                   # one query may see nothing
    cases = [
        ("multi-head attention (group of 1), no mask", case(3, 4, 4, 3, 8, None)),
        ("SmolLM2 shapes: 9 query heads over 3 KV heads, causal", case(6, 9, 3, 6, 64, causal_mask(6))),
        ("multi-query attention: 8 query heads share 1 KV head", case(5, 8, 1, 5, 16, causal_mask(5))),
        ("one decoding query (T = 1) over 10 cached keys", case(1, 9, 3, 10, 64, None)),
        ("3 queries appended after 5 cached keys (bottom-right mask)",
         case(3, 6, 2, 8, 16, causal_mask(3, 5))),
        ("a query row with every key masked gives zeros", case(4, 4, 2, 6, 8, masked_rows)),
    ]
    return run_cases("grouped_query_attention", cases)

