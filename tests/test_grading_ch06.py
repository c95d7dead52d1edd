"""The chapter 6 graders pass a right answer and fail wrong ones, saying why."""

import numpy as np

from kvlib.grading.ch06 import grade_kivi_bytes_per_token, grade_pack_int4, grade_quantize_rows


def quantize_rows(x, bits, rounding=np.rint):
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    scale = (high - low) / (2 ** bits - 1)
    codes = np.clip(rounding((x - low) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1)
    return codes.astype(np.uint8), scale[:, 0], low[:, 0]


def pack_int4(codes, high_first=False):
    first, second = codes[..., 0::2], codes[..., 1::2]
    if high_first:
        first, second = second, first
    return (first | (second << 4)).astype(np.uint8)


def unpack_int4(packed):
    codes = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    codes[..., 0::2], codes[..., 1::2] = packed & 15, packed >> 4
    return codes


def kivi_bytes(n_layers, n_kv_heads, head_dim, bits, group, zero_points=True):
    meta = 4 if zero_points else 2
    return n_layers * n_kv_heads * (2 * head_dim * bits / 8 + 2 * head_dim / group * meta)


def stub(*args):
    raise NotImplementedError("your code here")


def test_right_answers_pass():
    for report in (grade_quantize_rows(quantize_rows), grade_pack_int4(pack_int4, unpack_int4),
                   grade_kivi_bytes_per_token(kivi_bytes)):
        assert report.ok, report


def test_wrong_answers_fail_with_a_reason():
    floor = grade_quantize_rows(lambda x, b: quantize_rows(x, b, np.floor))
    assert not floor.ok and "half a step" in str(floor)
    float_codes = grade_quantize_rows(lambda x, b: (x, np.ones(len(x)), np.zeros(len(x))))
    assert not float_codes.ok and "integers" in str(float_codes)
    swapped = grade_pack_int4(lambda c: pack_int4(c, high_first=True), unpack_int4)
    assert not swapped.ok and "low nibble" in str(swapped)
    no_zeros = grade_kivi_bytes_per_token(lambda *a: kivi_bytes(*a, zero_points=False))
    assert not no_zeros.ok and "expected" in str(no_zeros)


def test_stubs_are_reported_as_not_implemented():
    for report in (grade_quantize_rows(stub), grade_pack_int4(stub, stub),
                   grade_kivi_bytes_per_token(stub)):
        assert report.not_implemented and "not implemented yet" in str(report)
