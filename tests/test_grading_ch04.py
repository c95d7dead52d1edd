"""Chapter 4's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import math

import pytest

from exercise_solutions import solutions
from kvlib.config import preset
from kvlib.grading.ch04 import (grade_contiguous_nbytes, grade_group_quantized_bytes,
                                grade_int4_tradeoff, grade_kv_bytes_per_token,
                                grade_max_context, grade_mla_bytes_per_token)
from kvlib.memory import GPU_MEMORY_BYTES, weights_bytes

QWEN = preset("qwen2.5-7b")
SOLUTION = solutions("ex04_memory", qwen=QWEN, gpu=GPU_MEMORY_BYTES["RTX 4090"],
                     weights=weights_bytes(QWEN, "bf16"))


def test_the_solutions_pass():
    for report in (grade_kv_bytes_per_token(SOLUTION.kv_bytes_per_token),
                   grade_mla_bytes_per_token(SOLUTION.mla_bytes_per_token),
                   grade_group_quantized_bytes(SOLUTION.group_quantized_bytes),
                   grade_max_context(SOLUTION.max_context),
                   grade_contiguous_nbytes(SOLUTION.contiguous_nbytes),
                   grade_int4_tradeoff(SOLUTION.fp16_tokens, SOLUTION.int4_tokens)):
        assert report.ok, report


def kv_bits(layers, kv_heads, dim, b):
    return 2 * layers * kv_heads * dim * b * 8


def quant_floor_bytes(n, bits, group, scale, zero):
    return n * bits // 8 + math.ceil(n / group) * (scale + zero)


def fit_ignoring_reserve(gpu, weights, reserve, per_token, batch):
    return max(0, (gpu - weights) // (batch * per_token))


def contiguous_keys_only(layers, heads, dim, batch, seq, itemsize):
    return layers * batch * heads * seq * dim * itemsize + 9 * batch


@pytest.mark.parametrize("grade, wrong, words", [
    (grade_kv_bytes_per_token, lambda l, h, d, b: l * h * d * b, "keys AND values"),
    (grade_kv_bytes_per_token, lambda l, h, d, b: float(2 * l * h * d * b),
     "expected the integer"),
    (grade_kv_bytes_per_token, kv_bits, "1 byte (keys AND values count)"),
    (grade_mla_bytes_per_token, lambda l, r, p, b: 2 * l * (r + p) * b, "not once per head"),
    (grade_mla_bytes_per_token, lambda l, r, p, b: l * r * b, "RoPE key"),
    (grade_mla_bytes_per_token, lambda l, r, p, b: l * (r + p), "fp32"),
    (grade_group_quantized_bytes,
     lambda n, bits, g, s, z: math.ceil(n * bits / 8) + n // g * (s + z), "last group"),
    (grade_group_quantized_bytes, quant_floor_bytes, "2 whole bytes"),
    (grade_group_quantized_bytes,
     lambda n, bits, g, s, z: math.ceil(n * bits / 8) + math.ceil(n / g) * s, "q4_1"),
    (grade_max_context,
     lambda gpu, w, r, p, b: (math.floor(gpu * (1 - r)) - w) // (b * p), "do not fit"),
    (grade_max_context, fit_ignoring_reserve, "reserve"),
    (grade_max_context,
     lambda gpu, w, r, p, b: max(0, math.ceil((math.floor(gpu * (1 - r)) - w) / (b * p))),
     "rounds down"),
    (grade_contiguous_nbytes,
     lambda l, h, d, b, s, i: 2 * l * b * h * s * d * i, "in_use"),
    (grade_contiguous_nbytes, contiguous_keys_only, "a keys AND a values array"),
    (grade_contiguous_nbytes,
     lambda l, h, d, b, s, i: 2 * l * b * h * s * d * 4 + 9 * b, "float16"),
])
def test_wrong_answers_fail_with_a_reason(grade, wrong, words):
    report = grade(wrong)
    assert not report.ok and words in str(report), report


FP16, INT4 = SOLUTION.fp16_tokens, SOLUTION.int4_tokens


@pytest.mark.parametrize("answer, words", [
    ((FP16, 4 * FP16), "not 4x smaller"),
    ((FP16 // 2, INT4 // 2), "do not halve"),
    ((2 * FP16, 2 * INT4), "keys AND values"),
    ((..., 1), "no prediction yet"),
])
def test_int4_tradeoff_mistakes(answer, words):
    report = grade_int4_tradeoff(*answer)
    assert not report.ok and words in str(report), report


def test_kvlib_functions_are_refused():
    from kvlib import memory
    report = grade_group_quantized_bytes(
        lambda n, bits, g, s, z: memory.StorageType("x", bits, g, s, z).vector_bytes(n))
    assert not report.ok and "kvlib's own kvlib.memory" in str(report), report


def test_graders_report_not_implemented():
    def not_done(*args):
        raise NotImplementedError
    for grade in (grade_kv_bytes_per_token, grade_mla_bytes_per_token,
                  grade_group_quantized_bytes, grade_max_context, grade_contiguous_nbytes):
        report = grade(not_done)
        assert report.not_implemented and "not implemented yet" in str(report)
