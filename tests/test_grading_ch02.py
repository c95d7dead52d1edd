"""Chapter 2's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib.errors import CapacityError
from kvlib.grading.ch02 import grade_append_packed, grade_greedy_decode, grade_tokens_fed
from kvlib.model.generate import generate

SOLUTION = solutions("ex02_contiguous_cache")


# --- append ----------------------------------------------------------------------------
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
    """Wrong: writes the keys but leaves the lengths where they were."""
    SOLUTION.append_packed(keys, lengths.copy(), rows, counts, new)


def test_append_grader_accepts_the_solution():
    report = grade_append_packed(SOLUTION.append_packed)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (append_at_zero, "each row's tokens go to positions lengths[row]"),
    (append_check_late, "only after changing"),
    (append_forgets_lengths, "lengths became"),
])
def test_append_grader_rejects_wrong_appends(wrong, words):
    report = grade_append_packed(wrong)
    assert not report.ok and words in str(report), report


# --- decode loop (real model) ----------------------------------------------------------
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
    out = SOLUTION.greedy_decode(model, prompt, cache, max_new_tokens)
    model.forward([[out[-1]]], cache, [cache.sequences()[-1]])
    return out


def decode_without_the_cache(model, prompt, cache, max_new_tokens):
    """Wrong: recomputes the whole sequence every step, then fills the cache at the end."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        out.append(int(np.argmax(model.forward([ids])[0])))
        ids.append(out[-1])
    model.forward([ids[:-1]], cache, [cache.new_sequence()])
    return out


def decode_feeding_the_sequence(model, prompt, cache, max_new_tokens):
    """Wrong: feeds the whole sequence again at every step, into a fresh cache row."""
    ids, out, seq = list(prompt), [], None
    for _ in range(max_new_tokens):
        if seq is not None:
            cache.free(seq)
        seq = cache.new_sequence()
        out.append(int(np.argmax(model.forward([ids], cache, [seq])[0])))
        ids.append(out[-1])
    return out


def decode_with_kvlib(model, prompt, cache, max_new_tokens):
    """Wrong: hands in kvlib's own loop."""
    return generate(model.llama, [prompt], cache, max_new_tokens=max_new_tokens)[0].token_ids


def test_decode_grader_accepts_the_solution(model):
    report = grade_greedy_decode(SOLUTION.greedy_decode, model)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (decode_in_row_zero, "another sequence"),
    (decode_one_too_many, "one prefill and"),
    (decode_without_the_cache, "ran without the cache"),
    (decode_feeding_the_sequence, "only the newest token is fed"),
    (decode_with_kvlib, "kvlib's own kvlib.model.generate.generate"),
])
def test_decode_grader_rejects_wrong_loops(model, wrong, words):
    report = grade_greedy_decode(wrong, model)
    assert not report.ok and words in str(report), report


# --- prediction ------------------------------------------------------------------------
@pytest.mark.parametrize("answer, words", [
    ((150, 6225), "never fed back"), ((149, 5000), "grows by one token"),
    ((149, 7500), "149 tokens, not 150"), ((..., ...), "no prediction yet"),
])
def test_tokens_fed_grader(answer, words):
    assert grade_tokens_fed(SOLUTION.with_cache, SOLUTION.without_cache).ok
    report = grade_tokens_fed(*answer)
    assert not report.ok and words in str(report), report
