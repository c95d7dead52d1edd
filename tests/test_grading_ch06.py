"""Chapter 6's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib.grading.ch06 import (grade_kivi_bytes_per_token, grade_pack_int4,
                                grade_quantization_error, grade_quantize_rows)
from kvlib.quantize import quantize

SOLUTION = solutions("ex06_quantization")


def test_the_solutions_pass():
    for report in (grade_quantize_rows(SOLUTION.quantize_rows),
                   grade_pack_int4(SOLUTION.pack_int4, SOLUTION.unpack_int4),
                   grade_kivi_bytes_per_token(SOLUTION.kivi_bytes_per_token),
                   grade_quantization_error(SOLUTION.step, SOLUTION.worst_error)):
        assert report.ok, report


def quantize_rows(x, bits, rounding=np.rint, guard=True, scale_dtype=np.float32):
    """The solution with one plausible mistake switched on."""
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    scale = ((high - low) / (2 ** bits - 1)).astype(scale_dtype)
    steps = (x - low) / (np.where(scale > 0, scale, 1) if guard else scale)
    codes = np.clip(rounding(steps), 0, 2 ** bits - 1).astype(np.uint8)
    return codes, scale[:, 0], low[:, 0]


def quantize_with_kvlib(x, bits):
    q = quantize(x, bits, scale_dtype=np.float32)
    return q.codes, q.scale[:, 0], q.zero[:, 0]


@pytest.mark.parametrize("wrong, words", [
    (lambda x, b: quantize_rows(x, b, guard=False), "guard the zero scale"),
    (lambda x, b: quantize_rows(x, b, scale_dtype=np.float16), "dtype float16"),
    (lambda x, b: quantize_rows(x, b, rounding=np.floor), "half a step"),
    (lambda x, b: (x, np.ones(len(x), np.float32), np.zeros(len(x), np.float32)), "integers"),
    (quantize_with_kvlib, "kvlib's own kvlib.quantize.quantize"),
])
def test_quantize_rows_mistakes(wrong, words):
    report = grade_quantize_rows(wrong)
    assert not report.ok and words in str(report), report


def pack_high_first(codes):
    return (codes[..., 1::2] | (codes[..., 0::2] << 4)).astype(np.uint8)


def pack_with_add_overflow(codes):
    return (codes[..., 0::2] + codes[..., 1::2] * 15).astype(np.uint8)


def unpack_in_wrong_order(packed):
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(*packed.shape[:-1], -1)


@pytest.mark.parametrize("pack, unpack, words", [
    (pack_high_first, SOLUTION.unpack_int4, "low nibble"),
    (pack_with_add_overflow, SOLUTION.unpack_int4, "pack_int4"),
    (SOLUTION.pack_int4, unpack_in_wrong_order, "unpack_int4"),
])
def test_pack_int4_mistakes(pack, unpack, words):
    report = grade_pack_int4(pack, unpack)
    assert not report.ok and words in str(report), report


def kivi(n_layers, n_kv_heads, head_dim, bits, key_group, value_group, keys_per_token=False,
         meta_bytes=2, zero_points=True):
    """The solution with one plausible mistake switched on."""
    meta = meta_bytes * (2 if zero_points else 1)
    codes = 2 * head_dim * bits / 8
    value_meta = head_dim / value_group * meta
    key_meta = value_meta if keys_per_token else head_dim * meta / key_group
    return n_layers * n_kv_heads * (codes + value_meta + key_meta)


@pytest.mark.parametrize("wrong, words", [
    (lambda *a: kivi(*a, keys_per_token=True), "keys were counted like values"),
    (lambda *a: kivi(*a, zero_points=False), "zero points are missing"),
    (lambda *a: kivi(*a, meta_bytes=4), "2 bytes each, not 4"),
])
def test_kivi_bytes_mistakes(wrong, words):
    report = grade_kivi_bytes_per_token(wrong)
    assert not report.ok and words in str(report), report


@pytest.mark.parametrize("answer, words", [
    ((0.75, 0.375), "3 steps, not 4"), ((1.0, 1.0), "half a step"),
    ((1.0, 0.0), "exactly on a level"), ((..., 0.5), "no prediction yet"),
])
def test_quantization_error_mistakes(answer, words):
    report = grade_quantization_error(*answer)
    assert not report.ok and words in str(report), report


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError("your code here")
    for report in (grade_quantize_rows(stub), grade_pack_int4(stub, stub),
                   grade_kivi_bytes_per_token(stub)):
        assert report.not_implemented and "not implemented yet" in str(report)
