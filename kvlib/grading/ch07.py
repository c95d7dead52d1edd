"""Graders for the chapter 7 exercises: the online-softmax merge and chunked attention."""

from __future__ import annotations

import numpy as np

from ..attention import SoftmaxState, attention
from ..masks import causal_mask
from . import Report, RowReader, compare_arrays, grade_prediction, refuses_kvlib, run_cases


def _chunk_state(rng, n_rows, n_keys, head_dim, shift=0.0, hidden_rows=()):
    scores = (shift + 3 * rng.standard_normal((n_rows, n_keys))).astype(np.float32)
    v = rng.standard_normal((n_keys, head_dim)).astype(np.float32)
    mask = np.ones((n_rows, n_keys), bool)
    mask[list(hidden_rows)] = False
    return SoftmaxState.of_chunk(scores, v, mask)


def _check_merge(merge, a: SoftmaxState, b: SoftmaxState) -> str | None:
    want = a.merge(b)
    got = merge(a.row_max.copy(), a.normaliser.copy(), a.out.copy(),
                b.row_max.copy(), b.normaliser.copy(), b.out.copy())
    if not isinstance(got, tuple) or len(got) != 3:
        return "should return a tuple (row_max, normaliser, out)"
    for name, g, w in zip(("row_max", "normaliser", "out"), got, (want.row_max,
                                                                   want.normaliser, want.out)):
        problem = compare_arrays(g, w, rtol=1e-5, atol=1e-6)
        if problem is not None:
            return f"{name}: {problem}"
    return None


@refuses_kvlib()
def grade_merge_states(merge) -> Report:
    """Check merge(m1, l1, o1, m2, l2, o2) -> (m, l, o) against the exact rule."""
    rng = np.random.default_rng(7)
    d = 4

    def case(shift_b=0.0, hidden_a=(), hidden_b=()):
        return lambda: _check_merge(merge, _chunk_state(rng, 3, 5, d, 0.0, hidden_a),
                                    _chunk_state(rng, 3, 6, d, shift_b, hidden_b))

    return run_cases("merge_states", [
        ("two chunks with similar scores", case()),
        ("the second chunk's scores are 50 larger (rescale the first side)", case(50.0)),
        ("the second chunk's scores are 50 smaller (rescale the second side)", case(-50.0)),
        ("scores around 1000: exp must never see them unshifted", case(1000.0)),
        ("a row that saw no key yet on one side (max = -inf, l = 0, o = 0)",
         case(hidden_a=(0,))),
        ("a row that saw no key on either side: the result stays empty, not NaN",
         case(hidden_a=(1,), hidden_b=(1,))),
    ])


def _single_head_reference(q, k, v, mask):
    return attention(q[:, None, :], k[None], v[None], mask)[:, 0, :]


@refuses_kvlib()
def grade_online_attention(online_attention) -> Report:
    """Check online_attention(q, k, v, mask, chunk_size) against full softmax attention.

    k and v are handed in as `RowReader`s that allow reading at most chunk_size rows at a
    time, so a plain softmax over all keys is refused."""
    rng = np.random.default_rng(70)

    def case(n_q, n_k, chunk, scale=1.0, mask="causal"):
        def check():
            d = 8
            q = (scale * rng.standard_normal((n_q, d))).astype(np.float32)
            k = (scale * rng.standard_normal((n_k, d))).astype(np.float32)
            v = rng.standard_normal((n_k, d)).astype(np.float32)
            m = causal_mask(n_q, n_k - n_q) if mask == "causal" else None
            if mask == "row hidden":
                m = np.ones((n_q, n_k), bool)
                m[0] = False
            rule = (f"read the keys and values chunk by chunk, k[lo:lo + {chunk}] and "
                    f"v[lo:lo + {chunk}], never all {n_k} at once")
            k_reader, v_reader = RowReader(k, "k", chunk, rule), RowReader(v, "v", chunk, rule)
            with np.errstate(all="ignore"):
                got = online_attention(q, k_reader, v_reader, m, chunk)
            for name, reader in (("k", k_reader), ("v", v_reader)):
                if sum(reader.reads) != n_k:
                    return (f"read {sum(reader.reads)} rows of {name} in all, expected each "
                            f"of its {n_k} rows once")
            return compare_arrays(got, _single_head_reference(q, k, v, m), rtol=1e-4,
                                  atol=1e-5)
        return check

    return run_cases("online_attention", [
        ("chunk of 4 keys, 16 keys, causal after 12 cached", case(4, 16, 4)),
        ("one key at a time", case(3, 9, 1)),
        ("a chunk size that does not divide the keys (last chunk shorter)", case(5, 23, 6)),
        ("one chunk larger than all the keys", case(2, 7, 100)),
        ("no mask", case(4, 10, 3, mask=None)),
        ("large scores (q, k scaled by 30): keep a running max or exp overflows",
         case(4, 20, 5, scale=30.0)),
        ("a query that may see no key returns zeros, not NaN", case(3, 8, 3, mask="row hidden")),
    ])


__all__ = ["Report", "grade_merge_states", "grade_online_attention"]


def merge_without_guard(m1, l1, o1, m2, l2, o2):
    """The buggy merge of the find-the-bug exercise: it subtracts the common maximum
    without replacing an infinite one."""
    m = np.maximum(m1, m2)
    with np.errstate(invalid="ignore"):
        a, b = np.exp(m1 - m), np.exp(m2 - m)
    return m, a * l1 + b * l2, a[:, None] * o1 + b[:, None] * o2


def nan_bug_states() -> tuple[SoftmaxState, SoftmaxState]:
    """Two states of 4 query rows: row 0 saw keys on both sides, row 1 only on the first,
    row 2 only on the second, row 3 on neither."""
    rng = np.random.default_rng(71)
    return (_chunk_state(rng, 4, 5, 3, hidden_rows=(2, 3)),
            _chunk_state(rng, 4, 6, 3, hidden_rows=(1, 3)))


def grade_nan_rows(nan_rows) -> Report:
    """Grade the rows whose merged state `merge_without_guard` turns to NaN for the states
    of `nan_bug_states` (found by running it)."""
    a, b = nan_bug_states()
    _, normaliser, out = merge_without_guard(a.row_max, a.normaliser, a.out,
                                             b.row_max, b.normaliser, b.out)
    truth = [int(r) for r in np.flatnonzero(np.isnan(normaliser) | np.isnan(out).any(axis=1))]
    answer = nan_rows if nan_rows is ... else sorted(int(r) for r in nan_rows)
    return grade_prediction("nan_rows", answer, truth, [
        ([], "when both sides are empty, m = -inf and m1 - m is -inf - (-inf) = NaN"),
        ([1, 2, 3], "a row with one empty side is fine: the empty side gets exp(-inf - m) = 0 "
                    "with a finite m"),
        ([0, 1, 2, 3], "exp(m1 - m) is NaN only where m itself is -inf"),
    ])
