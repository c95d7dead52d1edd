"""Chapter 5's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib.cache import prefix_key
from kvlib.grading.ch05 import (BLOCK_TRADEOFF_LENGTHS, grade_block_size_tradeoff,
                                grade_cached_prefix_len, grade_gather_blocks,
                                grade_slot_mapping)

SOLUTION = solutions("ex05_paged")


def test_the_solutions_pass():
    for report in (grade_slot_mapping(SOLUTION.slot_mapping),
                   grade_gather_blocks(SOLUTION.gather_blocks),
                   grade_cached_prefix_len(SOLUTION.cached_prefix_len),
                   grade_block_size_tradeoff(SOLUTION.waste_16, SOLUTION.waste_128)):
        assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (lambda table, positions, bs: np.asarray(positions), "returned the positions"),
    (lambda table, positions, bs: SOLUTION.slot_mapping(table, positions, bs).astype(float),
     "expected integers"),
    (lambda table, positions, bs: np.asarray(table)[np.asarray(positions) // bs] * bs,
     "+ offset"),
])
def test_slot_mapping_mistakes(wrong, words):
    report = grade_slot_mapping(wrong)
    assert not report.ok and words in str(report), report


def gather_in_order(store, table, length):
    return SOLUTION.gather_blocks(store, np.arange(len(table)), length)


def gather_keeping_the_tail(store, table, length):
    return SOLUTION.gather_blocks(store, table, len(table) * store.shape[2])


def gather_without_transpose(store, table, length):
    blocks = store[np.asarray(table)]
    return blocks.reshape(blocks.shape[1], -1, blocks.shape[3])[:, :length]


@pytest.mark.parametrize("wrong, words", [
    (gather_in_order, "the table names"),
    (gather_keeping_the_tail, "past `length`"),
    (gather_without_transpose, "without moving kv_heads"),
])
def test_gather_blocks_mistakes(wrong, words):
    report = grade_gather_blocks(wrong)
    assert not report.ok and words in str(report), report


def prefix_len(prompt_ids, cached_keys, block_size, keep_last=True, chained=True):
    """The solution with one plausible mistake switched on."""
    parent, n = b"", 0
    limit = (len(prompt_ids) - 1 if keep_last else len(prompt_ids)) // block_size
    for i in range(limit):
        parent = prefix_key(parent if chained else b"",
                            prompt_ids[i * block_size:(i + 1) * block_size])
        if parent not in cached_keys:
            break
        n += 1
    return n * block_size


@pytest.mark.parametrize("wrong, words", [
    (lambda p, c, b: prefix_len(p, c, b, keep_last=False), "last prompt token"),
    (lambda p, c, b: prefix_len(p, c, b, chained=False), "stopped too early"),
    (lambda p, c, b: min(len(p) - 1, prefix_len(p, c, b, keep_last=False)),
     "only whole blocks"),
])
def test_cached_prefix_len_mistakes(wrong, words):
    report = grade_cached_prefix_len(wrong)
    assert not report.ok and words in str(report), report


def test_kvlib_code_is_refused_but_prefix_key_is_allowed():
    from kvlib.cache.block_pool import prefix_keys
    report = grade_cached_prefix_len(lambda p, c, b: len(prefix_keys(p, b)) * b)
    assert not report.ok and "kvlib's own kvlib.cache.block_pool.prefix_keys" in str(report)


@pytest.mark.parametrize("answer, words", [
    (tuple(sum(n % bs for n in BLOCK_TRADEOFF_LENGTHS) for bs in (16, 128)),
     "n % block_size is what the last block holds"),
    ((0, 0), "only partly used"),
    ((SOLUTION.waste_16 // 4, SOLUTION.waste_128 // 4), "not their mean"),
    ((..., ...), "no prediction yet"),
])
def test_block_size_tradeoff_mistakes(answer, words):
    report = grade_block_size_tradeoff(*answer)
    assert not report.ok and words in str(report), report


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError
    for grade in (grade_slot_mapping, grade_gather_blocks, grade_cached_prefix_len):
        report = grade(stub)
        assert report.not_implemented and "not implemented yet" in str(report)
