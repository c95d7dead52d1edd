"""The chapter 8 graders pass correct solutions and fail wrong ones, saying why."""

import numpy as np

from kvlib.grading.ch08 import (grade_decode_traffic, grade_fold_tile, grade_merge_partials,
                                grade_paged_decode)


def decode_traffic(batch, context, n_heads, n_kv_heads, head_dim, bytes_per_value):
    return (2 * batch * context * n_kv_heads * head_dim * bytes_per_value,
            4 * batch * n_heads * context * head_dim)


def fold_tile(m, l, acc, scores, values):
    new_m = max(m, float(scores.max()))
    correction = np.exp(m - new_m)
    p = np.exp(scores - new_m)
    return new_m, l * correction + p.sum(), acc * correction + p @ values


def merge_partials(ms, ls, accs):
    top = ms.max()
    weights = np.where(ls > 0, np.exp(np.where(ls > 0, ms, top) - top), 0.0)
    return (weights @ accs) / (weights @ ls)


def paged_decode(q, key_blocks, value_blocks, block_table, length):
    block_size, head_dim = key_blocks.shape[1:]
    m, l, acc = -np.inf, 0.0, np.zeros(head_dim, dtype=np.float32)
    for i in range(-(-length // block_size)):
        used = min(block_size, length - i * block_size)
        block = block_table[i]
        m, l, acc = fold_tile(m, l, acc,
                              (key_blocks[block, :used] @ q) / np.float32(np.sqrt(head_dim)),
                              value_blocks[block, :used])
    return acc / l


def test_correct_solutions_pass():
    for report in (grade_decode_traffic(decode_traffic), grade_fold_tile(fold_tile),
                   grade_merge_partials(merge_partials), grade_paged_decode(paged_decode)):
        assert report.ok, report


def test_wrong_traffic_fails():
    report = grade_decode_traffic(lambda b, c, h, kv, d, bpv: (b * c * kv * d * bpv,
                                                               4 * b * h * c * d))
    assert not report.ok and "keys AND values" in str(report)


def test_fold_without_rescaling_fails():
    def no_rescale(m, l, acc, scores, values):
        new_m = max(m, float(scores.max()))
        p = np.exp(scores - new_m)
        return new_m, l + p.sum(), acc + p @ values
    report = grade_fold_tile(no_rescale)
    assert not report.ok and "several tiles" in str(report)


def test_merge_that_ignores_maxima_or_empty_splits_fails():
    report = grade_merge_partials(lambda ms, ls, accs: accs.sum(0) / ls.sum())
    assert not report.ok
    naive = grade_merge_partials(
        lambda ms, ls, accs: (np.exp(ms - ms.max()) @ accs) / (np.exp(ms - ms.max()) @ ls))
    assert naive.passed >= 1  # handles ordinary splits


def test_paged_decode_that_ignores_the_block_table_fails():
    def in_order(q, key_blocks, value_blocks, block_table, length):
        return paged_decode(q, key_blocks, value_blocks, np.arange(len(key_blocks)), length)
    report = grade_paged_decode(in_order)
    assert not report.ok and "block_table[t // block_size]" in str(report)


def test_not_implemented_is_reported_cleanly():
    def stub(*args):
        raise NotImplementedError("your code here")
    report = grade_paged_decode(stub)
    assert report.not_implemented and "not implemented yet" in str(report)
