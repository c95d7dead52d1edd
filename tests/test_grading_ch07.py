"""The chapter 7 graders pass a correct solution, fail wrong ones, and spot stubs."""

import numpy as np

from kvlib.attention import SoftmaxState, online_attention as library_online_attention
from kvlib.grading.ch07 import grade_merge_states, grade_online_attention


def merge_reference(m1, l1, o1, m2, l2, o2):
    s = SoftmaxState(m1, l1, o1).merge(SoftmaxState(m2, l2, o2))
    return s.row_max, s.normaliser, s.out


def merge_without_rescaling(m1, l1, o1, m2, l2, o2):
    return np.maximum(m1, m2), l1 + l2, o1 + o2


def merge_with_nan_for_empty_rows(m1, l1, o1, m2, l2, o2):
    m = np.maximum(m1, m2)
    with np.errstate(invalid="ignore"):  # -inf - (-inf) = NaN: the bug under test
        a, b = np.exp(m1 - m), np.exp(m2 - m)
    return m, a * l1 + b * l2, a[:, None] * o1 + b[:, None] * o2


def online_reference(q, k, v, mask, chunk_size):
    return library_online_attention(q[:, None, :], k[None], v[None], mask,
                                    chunk_size=chunk_size)[:, 0]


def online_without_running_max(q, k, v, mask, chunk_size):
    s = q @ k.T / np.sqrt(q.shape[1]).astype(np.float32)
    w = np.exp(s) if mask is None else np.where(mask, np.exp(s), 0)
    return (w @ v) / w.sum(axis=1, keepdims=True)


def stub(*args):
    raise NotImplementedError("your code here")


def test_merge_grader():
    assert grade_merge_states(merge_reference).ok
    wrong = grade_merge_states(merge_without_rescaling)
    assert not wrong.ok and "rescale" in str(wrong)
    nan = grade_merge_states(merge_with_nan_for_empty_rows)
    assert not nan.ok and "no key on either side" in str(nan)
    assert "not implemented yet" in str(grade_merge_states(stub))


def test_online_attention_grader():
    assert grade_online_attention(online_reference).ok
    wrong = grade_online_attention(online_without_running_max)
    assert not wrong.ok and "large scores" in str(wrong)
    assert "not implemented yet" in str(grade_online_attention(stub))
