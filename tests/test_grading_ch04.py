"""The chapter 4 graders pass correct answers and catch the usual wrong ones."""

import math

from kvlib.grading.ch04 import (grade_contiguous_nbytes, grade_group_quantized_bytes,
                                grade_kv_bytes_per_token, grade_max_context,
                                grade_mla_bytes_per_token)


def kv_right(layers, kv_heads, dim, b):
    return 2 * layers * kv_heads * dim * b


def kv_forgets_values(layers, kv_heads, dim, b):
    return layers * kv_heads * dim * b


def mla_right(layers, rank, rope, b):
    return layers * (rank + rope) * b


def mla_as_keys_and_values(layers, rank, rope, b):
    return 2 * layers * (rank + rope) * b


def quant_right(n, bits, group, scale, zero):
    return math.ceil(n * bits / 8) + math.ceil(n / group) * (scale + zero)


def quant_floor_groups(n, bits, group, scale, zero):
    return math.ceil(n * bits / 8) + n // group * (scale + zero)


def fit_right(gpu, weights, reserve, per_token, batch):
    return max(0, (math.floor(gpu * (1 - reserve)) - weights) // (batch * per_token))


def fit_negative(gpu, weights, reserve, per_token, batch):
    return (math.floor(gpu * (1 - reserve)) - weights) // (batch * per_token)


def contiguous_right(layers, heads, dim, batch, seq, itemsize):
    return 2 * layers * batch * heads * seq * dim * itemsize + 9 * batch


def contiguous_no_metadata(layers, heads, dim, batch, seq, itemsize):
    return 2 * layers * batch * heads * seq * dim * itemsize


def not_done(*args):
    raise NotImplementedError


CASES = [(grade_kv_bytes_per_token, kv_right, kv_forgets_values, "keys AND values"),
         (grade_mla_bytes_per_token, mla_right, mla_as_keys_and_values, "not once per head"),
         (grade_group_quantized_bytes, quant_right, quant_floor_groups, "last group"),
         (grade_max_context, fit_right, fit_negative, "do not fit"),
         (grade_contiguous_nbytes, contiguous_right, contiguous_no_metadata, "in_use")]


def test_graders_pass_right_answers_and_fail_wrong_ones():
    for grade, right, wrong, hint in CASES:
        good = grade(right)
        assert good.ok and good.passed >= 3, good
        bad = grade(wrong)
        assert not bad.ok and bad.failures, grade.__name__
        assert hint in str(bad), str(bad)


def test_graders_report_not_implemented_and_non_integers():
    for grade, right, _, _ in CASES:
        report = grade(not_done)
        assert report.not_implemented and "not implemented yet" in str(report)
    report = grade_kv_bytes_per_token(lambda *a: float(kv_right(*a)))
    assert not report.ok and "expected the integer" in str(report)
