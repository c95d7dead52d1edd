"""Quantizers: round-trip error bounds, exact packing, clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from kvlib.errors import KVLibError, QuantizationError
from kvlib.quantize import dequantize, pack_codes, quantize, unpack_codes

FLOATS = st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def layouts(draw):
    """An array [rows, cols] with a bit width, an axis and a group size that divides it."""
    bits = draw(st.sampled_from([2, 4, 8]))
    rows = draw(st.integers(1, 12))
    cols = 4 * draw(st.integers(1, 8))               # whole bytes at 2 and 4 bits
    axis = draw(st.sampled_from([0, 1]))
    length = (rows, cols)[axis]
    group = draw(st.sampled_from([d for d in range(1, length + 1) if length % d == 0]))
    x = draw(arrays(np.float32, (rows, cols), elements=FLOATS))
    return x, bits, axis, group, draw(st.booleans())


def step_bound(q, x):
    """Largest error the quantizer promises for each element: half a step, plus the
    float16 rounding of the stored zero point, and steps too small for a float16 scale."""
    scale = np.repeat(q.scale.astype(np.float32), q.group_size, axis=q.axis)
    return scale / 2 * (1 + 1e-3) + 2.0 ** -10 * np.abs(x).max() + 255 * 2.0 ** -24


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_round_trip_error_is_at_most_half_a_step(case):
    x, bits, axis, group, symmetric = case
    q = quantize(x, bits, axis=axis, group_size=group, symmetric=symmetric)
    x_hat = dequantize(q)
    assert x_hat.shape == x.shape and x_hat.dtype == np.float32
    assert (np.abs(x_hat - x) <= step_bound(q, x)).all()


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_step_is_the_group_range_over_the_levels(case):
    x, bits, axis, group, symmetric = case
    q = quantize(x, bits, axis=axis, group_size=group, symmetric=symmetric)
    # the levels as the module's docstring defines them, not as code_range computes them
    levels = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    groups = np.moveaxis(x, axis, -1).reshape(*np.moveaxis(x, axis, -1).shape[:-1], -1, group)
    if symmetric:
        span = np.abs(groups).max(-1)
    else:                                      # measured from the stored (float16) zero point
        span = groups.max(-1) - np.moveaxis(q.zero.astype(np.float32), axis, -1)
    scale = np.moveaxis(q.scale.astype(np.float32), axis, -1)
    normal = span / levels >= 2.0 ** -14       # steps a float16 scale holds to 3 digits
    assert np.allclose(scale[normal], (span / levels)[normal], rtol=2e-3)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(0, 5), st.integers(1, 6), st.data())
def test_packing_is_exact_and_dense(bits, rows, n_bytes, data):
    per_byte = 8 // bits
    codes = data.draw(arrays(np.uint8, (rows, n_bytes * per_byte),
                             elements=st.integers(0, 2 ** bits - 1)))
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, n_bytes) and packed.dtype == np.uint8
    assert np.array_equal(unpack_codes(packed, bits), codes)


def test_int4_nibble_order_first_code_in_low_bits():
    assert pack_codes(np.array([0x3, 0xA, 0xF, 0x0]), 4).tolist() == [0xA3, 0x0F]
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert unpack_codes(np.array([0xA3], dtype=np.uint8), 4).tolist() == [0x3, 0xA]


def test_int4_stores_half_a_byte_per_value_plus_scales():
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    q = quantize(x, 4, axis=-1, group_size=32)
    assert q.codes.shape == (16, 32) and q.scale.shape == (16, 2) and q.zero.shape == (16, 2)
    assert q.nbytes == 16 * 32 + 2 * 16 * 2 * 2


def test_symmetric_int8_codes_are_signed_and_exact_on_the_grid():
    scale = np.float32(0.5)
    x = (np.arange(-127, 128, dtype=np.float32) * scale)[None]
    q = quantize(x, 8, symmetric=True)
    assert q.codes.dtype == np.int8 and q.zero is None
    assert np.array_equal(q.codes[0], np.arange(-127, 128))
    assert np.array_equal(dequantize(q), x)


def test_constant_and_zero_groups_round_trip_exactly():
    zeros, threes = np.zeros((4, 8), dtype=np.float32), np.full((4, 8), 3.0, dtype=np.float32)
    for symmetric in (True, False):
        assert np.array_equal(dequantize(quantize(zeros, 4, symmetric=symmetric)), zeros)
    # asymmetric: a constant group is its zero point, stored exactly
    assert np.array_equal(dequantize(quantize(threes, 2)), threes)


def test_per_channel_scales_follow_the_channels():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    x[:, 3] *= 50                                        # one outlier channel
    per_channel = dequantize(quantize(x, 4, axis=0, group_size=32))
    per_token = dequantize(quantize(x, 4, axis=1))
    normal = [c for c in range(8) if c != 3]
    assert np.abs(per_channel - x)[:, normal].max() < np.abs(per_token - x)[:, normal].max() / 5


@pytest.mark.parametrize("kwargs, words", [
    (dict(bits=3), "unsupported bit width 3"),
    (dict(bits=16), "unsupported bit width"),
    (dict(bits=4, group_size=5), "group size 5 does not divide axis 1 of length 8"),
    (dict(bits=4, axis=0, group_size=3), "does not divide axis 0"),
    (dict(bits=4, group_size=0), "group size 0"),
    (dict(bits=4, axis=2), "axis 2 out of range"),
])
def test_bad_layouts_are_clear_errors(kwargs, words):
    x = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(QuantizationError, match=words):
        quantize(x, **kwargs)


def test_bad_values_are_clear_errors():
    with pytest.raises(QuantizationError, match="whole number of bytes"):
        quantize(np.ones((2, 3), dtype=np.float32), 4)
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(np.array([[np.nan, 1.0]], dtype=np.float32), 8)
    with pytest.raises(QuantizationError, match="too large"):
        quantize(np.array([[1e9, -1e9]], dtype=np.float32), 8)
    with pytest.raises(QuantizationError, match="multiple of 2"):
        pack_codes(np.array([1, 2, 3]), 4)
    with pytest.raises(QuantizationError, match=r"\[0, 16\)"):
        pack_codes(np.array([1, 16]), 4)
    assert issubclass(QuantizationError, KVLibError)
