"""Chapter 5's graders pass the reference solutions and fail the classic mistakes."""

import numpy as np

from kvlib.cache import prefix_key
from kvlib.grading.ch05 import grade_cached_prefix_len, grade_gather_blocks, grade_slot_mapping


def slot_mapping(block_table, positions, block_size):
    positions = np.asarray(positions, dtype=np.int64)
    return np.asarray(block_table, dtype=np.int64)[positions // block_size] * block_size \
        + positions % block_size


def gather_blocks(store, block_table, length):
    blocks = store[np.asarray(block_table)]
    n, h, b, d = blocks.shape
    return blocks.transpose(1, 0, 2, 3).reshape(h, n * b, d)[:, :length]


def cached_prefix_len(prompt_ids, cached_keys, block_size, keep_last=True):
    parent, n = b"", 0
    limit = (len(prompt_ids) - 1 if keep_last else len(prompt_ids)) // block_size
    for i in range(limit):
        parent = prefix_key(parent, prompt_ids[i * block_size:(i + 1) * block_size])
        if parent not in cached_keys:
            break
        n += 1
    return n * block_size


def test_reference_solutions_pass():
    for report in (grade_slot_mapping(slot_mapping), grade_gather_blocks(gather_blocks),
                   grade_cached_prefix_len(cached_prefix_len)):
        assert report.ok, report


def test_classic_mistakes_fail_with_a_reason():
    report = grade_slot_mapping(lambda table, positions, bs: np.asarray(positions))
    assert not report.ok and "returned the positions" in str(report)

    def in_order(store, table, length):
        return gather_blocks(store, np.arange(len(table)), length)
    report = grade_gather_blocks(in_order)
    assert not report.ok and "the table names" in str(report)

    def keeps_tail(store, table, length):
        return gather_blocks(store, table, len(table) * store.shape[2])
    report = grade_gather_blocks(keeps_tail)
    assert not report.ok and "past `length`" in str(report)

    report = grade_cached_prefix_len(
        lambda p, c, b: cached_prefix_len(p, c, b, keep_last=False))
    assert not report.ok and "last prompt token" in str(report)


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError
    for grade in (grade_slot_mapping, grade_gather_blocks, grade_cached_prefix_len):
        report = grade(stub)
        assert report.not_implemented and "not implemented yet" in str(report)
