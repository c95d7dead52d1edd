"""Masks: causal (bottom-right), padding, ragged, their combination; positions after padding."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlib.attention import attention
from kvlib.batching import left_pad, own_positions
from kvlib.errors import ConfigError, LengthError, ShapeError
from kvlib.masks import (causal_mask, combine_masks, padded_attention_mask, padding_mask,
                         ragged_mask)


def test_causal_mask_is_aligned_bottom_right_after_a_cached_prefix():
    want = np.array([[1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(causal_mask(3, 2), want)
    np.testing.assert_array_equal(causal_mask(4), np.tril(np.ones((4, 4), dtype=bool)))
    assert causal_mask(1, 6).all()  # one decoded token sees the whole past


def test_top_left_alignment_would_hide_the_cached_prefix():
    """The classic bug: tril of the [n_new, n_past + n_new] block hides past tokens."""
    wrong = np.tril(np.ones((3, 5), dtype=bool))
    assert (wrong != causal_mask(3, 2)).sum() == 6


def test_padding_mask_left_and_right():
    np.testing.assert_array_equal(padding_mask([2, 4, 0], 4),
                                  [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(padding_mask([2, 4], 4, side="right"),
                                  [[1, 1, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("args", [([5], 4), ([-1], 4)])
def test_padding_mask_rejects_impossible_lengths(args):
    with pytest.raises(LengthError, match="lengths"):
        padding_mask(*args)


def test_padding_mask_rejects_an_unknown_side():
    with pytest.raises(ConfigError, match="side"):
        padding_mask([1], 2, side="middle")


def test_ragged_mask_is_block_diagonal_causal():
    want = np.zeros((5, 5), dtype=bool)
    want[:2, :2] = np.tril(np.ones((2, 2)))
    want[2:, 2:] = np.tril(np.ones((3, 3)))
    np.testing.assert_array_equal(ragged_mask([2, 3]), want)


def test_packed_attention_with_the_ragged_mask_equals_each_sequence_alone(rng):
    counts = [3, 1, 5]
    n = sum(counts)
    q = rng.standard_normal((n, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, n, 8)).astype(np.float32)
    v = rng.standard_normal((2, n, 8)).astype(np.float32)
    packed = attention(q, k, v, ragged_mask(counts))
    start = 0
    for c in counts:
        alone = attention(q[start:start + c], k[:, start:start + c], v[:, start:start + c],
                          causal_mask(c))
        np.testing.assert_allclose(packed[start:start + c], alone, atol=1e-6)
        start += c


def test_combine_masks_broadcasts_and_rejects_mismatches():
    both = combine_masks(causal_mask(2, 1)[None], np.array([[0, 1, 1], [1, 1, 1]], bool)[:, None])
    assert both.shape == (2, 2, 3)
    np.testing.assert_array_equal(both[0], [[0, 1, 0], [0, 1, 1]])
    with pytest.raises(ShapeError, match="broadcast"):
        combine_masks(np.ones((2, 3), bool), np.ones((4,), bool))


def test_padded_attention_mask_left_padded_prefill():
    is_real = padding_mask([1, 3], 3)
    mask = padded_attention_mask(is_real, 3)
    assert mask.shape == (2, 3, 3)
    np.testing.assert_array_equal(mask[0], [[0, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(mask[1], causal_mask(3))
    with pytest.raises(ShapeError):
        padded_attention_mask(is_real, 4)


def test_fully_masked_rows_give_zeros_not_nan(rng):
    q = rng.standard_normal((3, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 4)).astype(np.float32)
    v = rng.standard_normal((1, 3, 4)).astype(np.float32)
    mask = padded_attention_mask(padding_mask([1], 3), 3)[0]  # two pad queries see nothing
    out = attention(q, k, v, mask)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:2], 0)
    np.testing.assert_allclose(out[2], np.broadcast_to(v[0, 2], (2, 4)), atol=1e-6)


def test_positions_after_left_padding_follow_each_sequence():
    ids, is_real = left_pad([[5, 6], [7, 8, 9, 10], [11]], pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
    np.testing.assert_array_equal(own_positions(is_real), [[0, 0, 0, 1], [0, 1, 2, 3],
                                                           [0, 0, 0, 0]])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_real_tokens_get_positions_0_to_length(lengths):
    ids, is_real = left_pad([np.arange(n) + 1 for n in lengths])
    positions = own_positions(is_real)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(positions[row][is_real[row]], np.arange(n))
        np.testing.assert_array_equal(ids[row][is_real[row]], np.arange(n) + 1)
