"""Online softmax: chunk-by-chunk attention equals full attention, for any split."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlib.attention import SoftmaxState, attention, chunk_boundaries, online_attention
from kvlib.errors import ConfigError, ShapeError
from kvlib.masks import causal_mask


def qkv(rng, n_tokens, n_keys, n_heads=6, n_kv_heads=2, head_dim=8, spread=1.0):
    q = (spread * rng.standard_normal((n_tokens, n_heads, head_dim))).astype(np.float32)
    k = (spread * rng.standard_normal((n_kv_heads, n_keys, head_dim))).astype(np.float32)
    v = rng.standard_normal((n_kv_heads, n_keys, head_dim)).astype(np.float32)
    return q, k, v


def relative_error(got, want):
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


@settings(max_examples=60, deadline=None)
@given(n_tokens=st.integers(1, 6), n_keys=st.integers(1, 40), seed=st.integers(0, 2**16),
       cuts=st.lists(st.integers(0, 40), max_size=8),
       spread=st.sampled_from([0.1, 1.0, 10.0]), masked_row=st.booleans())
def test_any_split_equals_full_attention(n_tokens, n_keys, seed, cuts, spread,
                                         masked_row):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, n_tokens, n_keys, spread=spread)
    mask = rng.random((n_tokens, n_keys)) < 0.7
    if masked_row:
        mask[0] = False  # a query that sees no key: zeros, never NaN
    splits = [0, *sorted(c for c in cuts if c <= n_keys), n_keys]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no inf - inf, no 0/0
        got = online_attention(q, k, v, mask, splits=splits)
    want = attention(q, k, v, mask)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert relative_error(got, want) <= 1e-5
    if masked_row:
        assert (got[0] == 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 16, 17, 100])
def test_chunk_sizes_including_one_key_at_a_time_and_causal_mask(rng, chunk):
    q, k, v = qkv(rng, 5, 17, n_heads=9, n_kv_heads=3, head_dim=64)
    mask = causal_mask(5, 12)
    got = online_attention(q, k, v, mask, chunk_size=chunk)
    assert relative_error(got, attention(q, k, v, mask)) <= 1e-5


def chunk_states(rng, n_chunks, n_keys=7, n_rows=4, head_dim=8, spread=20.0):
    """States of `n_chunks` key chunks for the same query rows (with some masked keys)."""
    scores = spread * rng.standard_normal((n_chunks, n_rows, n_keys)).astype(np.float32)
    v = rng.standard_normal((n_chunks, n_keys, head_dim)).astype(np.float32)
    masks = rng.random((n_chunks, n_rows, n_keys)) < 0.6
    masks[0, 0] = False
    return [SoftmaxState.of_chunk(scores[i], v[i], masks[i]) for i in range(n_chunks)], \
        scores, v, masks


def assert_states_close(a, b, rtol=1e-5):
    np.testing.assert_array_equal(a.row_max, b.row_max)  # max is exact
    np.testing.assert_allclose(a.normaliser, b.normaliser, rtol=rtol)
    np.testing.assert_allclose(a.out, b.out, rtol=rtol, atol=rtol * np.abs(a.out).max())


def test_merge_is_associative_and_commutative(rng):
    for _ in range(20):
        (a, b, c), *_ = chunk_states(rng, 3)
        assert_states_close(a.merge(b).merge(c), a.merge(b.merge(c)))
        assert_states_close(a.merge(b), b.merge(a))


def test_merge_equals_one_state_over_all_keys(rng):
    states, scores, v, masks = chunk_states(rng, 4)
    whole = SoftmaxState.of_chunk(np.concatenate(list(scores), axis=-1),
                                  np.concatenate(list(v), axis=0),
                                  np.concatenate(list(masks), axis=-1))
    tree = states[0].merge(states[1]).merge(states[2].merge(states[3]))  # split-K style
    assert_states_close(tree, whole)
    np.testing.assert_allclose(tree.log_sum_exp[1:], whole.log_sum_exp[1:], rtol=1e-6)


def test_empty_state_is_the_identity_of_merge(rng):
    (a,), *_ = chunk_states(rng, 1)
    empty = SoftmaxState.empty(a.row_max.shape, a.out.shape[-1])
    assert_states_close(empty.merge(a), a)
    assert_states_close(a.merge(empty), a)
    assert (empty.result() == 0).all()


def test_update_adds_one_chunk():
    scores = np.array([[1.0, 3.0, 2.0]], np.float32)
    v = np.eye(3, dtype=np.float32)
    state = SoftmaxState.of_chunk(scores[:, :2], v[:2]).update(scores[:, 2:], v[2:])
    assert state.row_max[0] == 3.0
    e = np.exp(scores[0] - 3.0)
    np.testing.assert_allclose(state.normaliser, [e.sum()], rtol=1e-6)
    np.testing.assert_allclose(state.result()[0], e / e.sum(), rtol=1e-6)


def test_bad_splits_and_chunk_sizes_are_clear_errors(rng):
    q, k, v = qkv(rng, 2, 5)
    with pytest.raises(ShapeError, match="splits"):
        online_attention(q, k, v, splits=[0, 3, 2, 5])
    with pytest.raises(ShapeError, match="splits"):
        online_attention(q, k, v, splits=[0, 4])
    with pytest.raises(ConfigError, match="chunk_size"):
        online_attention(q, k, v, chunk_size=0)
    assert chunk_boundaries(10, 4) == [0, 4, 8, 10]
    assert chunk_boundaries(8, 4) == [0, 4, 8]
    assert chunk_boundaries(3, 10) == [0, 3]
