"""The graders of chapters 1 and 2 accept the reference solutions and reject wrong ones."""

import numpy as np
import pytest

from kvlib.attention import attention, softmax
from kvlib.errors import CapacityError
from kvlib.grading.ch01 import grade_grouped_query_attention, grade_masked_softmax
from kvlib.grading.ch02 import grade_append_packed, grade_greedy_decode


# --- chapter 1 -------------------------------------------------------------------------
def naive_softmax(scores, mask):
    """Wrong: no max subtraction, and masked rows become NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(scores) * (1 if mask is None else mask)
        return e / e.sum(axis=-1, keepdims=True)


def test_softmax_grader_accepts_the_reference():
    assert grade_masked_softmax(softmax).ok


def test_softmax_grader_rejects_a_naive_softmax():
    report = grade_masked_softmax(naive_softmax)
    assert not report.ok
    assert any("large scores" in f for f in report.failures)
    assert any("NaN" in f for f in report.failures)


def test_softmax_grader_reports_not_implemented():
    def stub(scores, mask):
        raise NotImplementedError
    report = grade_masked_softmax(stub)
    assert report.not_implemented and "not implemented" in str(report)


def test_gqa_grader_accepts_the_reference():
    report = grade_grouped_query_attention(attention)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (lambda q, k, v, m: attention(q, np.tile(k, (q.shape[1] // k.shape[0], 1, 1)),
                                  np.tile(v, (q.shape[1] // k.shape[0], 1, 1)), m), "h // 3"),
    (lambda q, k, v, m: attention(q, k, v, m, scale=1.0), "scaled"),
    (lambda q, k, v, m: attention(q, k, v, None), "mask was ignored"),
    (lambda q, k, v, m: attention(q, k, v, m).astype(np.float64), "float32"),
    (lambda q, k, v, m: attention(q, k, v, m)[:, :k.shape[0]], "shape"),
])
def test_gqa_grader_rejects_wrong_attention_and_says_why(wrong, words):
    report = grade_grouped_query_attention(wrong)
    assert not report.ok
    assert any(words in f for f in report.failures), report


# --- chapter 2: append -----------------------------------------------------------------
def append_reference(keys, lengths, rows, counts, new):
    starts = [int(lengths[r]) for r in rows]
    for r, s, c in zip(rows, starts, counts):
        if s + c > keys.shape[2]:
            raise CapacityError(f"row {r} would hold {s + c} tokens")
    offset = 0
    for r, s, c in zip(rows, starts, counts):
        keys[r, :, s:s + c] = new[offset:offset + c].transpose(1, 0, 2)
        lengths[r] += c
        offset += c


def append_at_zero(keys, lengths, rows, counts, new):
    """Wrong: ignores the rows' lengths and overwrites position 0 onwards."""
    offset = 0
    for r, c in zip(rows, counts):
        keys[r, :, :c] = new[offset:offset + c].transpose(1, 0, 2)
        lengths[r] += c
        offset += c


def append_check_late(keys, lengths, rows, counts, new):
    """Wrong: writes the rows that fit before noticing the one that does not."""
    offset = 0
    for r, c in zip(rows, counts):
        s = int(lengths[r])
        if s + c > keys.shape[2]:
            raise CapacityError("full")
        keys[r, :, s:s + c] = new[offset:offset + c].transpose(1, 0, 2)
        lengths[r] += c
        offset += c


def append_forgets_lengths(keys, lengths, rows, counts, new):
    append_reference(keys, lengths.copy(), rows, counts, new)


def test_append_grader_accepts_the_reference():
    report = grade_append_packed(append_reference)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (append_at_zero, "keys differ"),
    (append_check_late, "only after changing"),
    (append_forgets_lengths, "lengths became"),
])
def test_append_grader_rejects_wrong_appends(wrong, words):
    report = grade_append_packed(wrong)
    assert not report.ok
    assert any(words in f for f in report.failures), report


# --- chapter 2: decode loop (real model) -----------------------------------------------
def decode_reference(model, prompt, cache, max_new_tokens):
    seq = cache.new_sequence()
    token = int(np.argmax(model.forward([prompt], cache, [seq])[0]))
    out = [token]
    while len(out) < max_new_tokens:
        token = int(np.argmax(model.forward([[token]], cache, [seq])[0]))
        out.append(token)
    return out


def decode_in_row_zero(model, prompt, cache, max_new_tokens):
    """Wrong: assumes the new sequence is row 0, and claims it without new_sequence()."""
    cache.in_use[0] = True
    cache.lengths[0] = 0
    token = int(np.argmax(model.forward([prompt], cache, [0])[0]))
    out = [token]
    while len(out) < max_new_tokens:
        token = int(np.argmax(model.forward([[token]], cache, [0])[0]))
        out.append(token)
    return out


def decode_one_too_many(model, prompt, cache, max_new_tokens):
    """Wrong: feeds the last token back too (one wasted step)."""
    out = decode_reference(model, prompt, cache, max_new_tokens)
    model.forward([[out[-1]]], cache, [cache.sequences()[-1]])
    return out


def test_decode_grader_accepts_the_reference(model):
    report = grade_greedy_decode(decode_reference, model)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (decode_in_row_zero, "another sequence"),
    (decode_one_too_many, "every new token but the last"),
])
def test_decode_grader_rejects_wrong_loops(model, wrong, words):
    report = grade_greedy_decode(wrong, model)
    assert not report.ok
    assert any(words in f for f in report.failures), report
