"""ContiguousCache: storage, attention, errors that change nothing."""

import numpy as np
import pytest

from kvlib.attention import attention
from kvlib.cache import ContiguousCache
from kvlib.errors import (CapacityError, ConfigError, DTypeError, KVLibError, LengthError,
                          ShapeError, UnknownSequenceError)
from kvlib.masks import causal_mask

L, HKV, H, D = 2, 2, 6, 8


def make_cache(max_batch=2, max_seq=16):
    return ContiguousCache(L, HKV, D, max_batch=max_batch, max_seq=max_seq)


def kv(rng, n):
    return (rng.standard_normal((n, HKV, D), dtype=np.float32),
            rng.standard_normal((n, HKV, D), dtype=np.float32))


def step(cache, seq_ids, counts, rng):
    """Write random K/V for every layer and return (plan, k, v) of layer 0."""
    plan = cache.plan(seq_ids, counts)
    k, v = kv(rng, plan.n_tokens)
    for layer in range(L):
        cache.write(layer, plan, k, v)
    return plan, k, v


def snapshot(cache):
    return (cache.keys.copy(), cache.values.copy(), cache.lengths.copy(), cache.in_use.copy())


def assert_unchanged(cache, snap):
    for before, after in zip(snap, snapshot(cache)):
        np.testing.assert_array_equal(before, after)


def test_layout_is_batch_heads_seq_dim():
    cache = make_cache(max_batch=3, max_seq=10)
    assert cache.keys[0].shape == (3, HKV, 10, D)


def test_write_places_tokens_at_each_sequences_length(rng):
    cache = make_cache()
    a, b = cache.new_sequence(), cache.new_sequence()
    plan, k, _ = step(cache, [a, b], [3, 2], rng)
    cache.commit(plan)
    plan2, k2, _ = step(cache, [b], [1], rng)
    cache.commit(plan2)
    assert (cache.length(a), cache.length(b)) == (3, 3)
    np.testing.assert_array_equal(cache.keys[0, a, :, :3], k[:3].transpose(1, 0, 2))
    np.testing.assert_array_equal(cache.keys[0, b, :, :2], k[3:].transpose(1, 0, 2))
    np.testing.assert_array_equal(cache.keys[0, b, :, 2], k2[0])


def test_attend_equals_reference_with_bottom_right_causal_mask(rng):
    """A 3-token append after 5 cached tokens: each new query sees the prefix and itself."""
    cache = make_cache()
    s = cache.new_sequence()
    plan, k1, v1 = step(cache, [s], [5], rng)
    cache.commit(plan)
    plan, k2, v2 = step(cache, [s], [3], rng)
    q = rng.standard_normal((3, H, D), dtype=np.float32)
    got = cache.attend(0, plan, q)
    k = np.concatenate([k1, k2]).transpose(1, 0, 2)
    v = np.concatenate([v1, v2]).transpose(1, 0, 2)
    want = attention(q, k, v, causal_mask(3, 5))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the classic bug: a top-left aligned mask would hide most of the prefix
    wrong = attention(q, k, v, np.tril(np.ones((3, 8), dtype=bool)))
    assert not np.allclose(got, wrong, atol=1e-3)


def test_float16_storage_is_close_and_half_the_bytes(rng):
    c32 = make_cache()
    c16 = ContiguousCache(L, HKV, D, 2, 16, dtype=np.float16)
    assert c16.keys.nbytes * 2 == c32.keys.nbytes
    for c in (c32, c16):
        c.new_sequence()
    plan, k, v = step(c32, [0], [4], np.random.default_rng(1))
    plan16 = c16.plan([0], [4])
    c16.write(0, plan16, k, v)
    q = rng.standard_normal((4, H, D), dtype=np.float32)
    np.testing.assert_allclose(c16.attend(0, plan16, q), c32.attend(0, plan, q), atol=2e-3)


def test_nbytes_counts_every_array():
    cache = make_cache(max_batch=3, max_seq=10)
    kv_bytes = 2 * L * 3 * HKV * 10 * D * 4
    assert cache.nbytes == kv_bytes + 3 * 8 + 3 * 1


def test_overflow_raises_and_changes_nothing(rng):
    cache = make_cache(max_seq=8)
    s = cache.new_sequence()
    cache.commit(step(cache, [s], [6], rng)[0])
    snap = snapshot(cache)
    with pytest.raises(CapacityError, match="would hold 9 tokens"):
        cache.plan([s], [3])
    assert_unchanged(cache, snap)
    cache.plan([s], [2])  # exactly full is fine


def test_bad_shapes_and_dtypes_raise_and_change_nothing(rng):
    cache = make_cache()
    s = cache.new_sequence()
    plan = cache.plan([s], [2])
    k, v = kv(rng, 2)
    snap = snapshot(cache)
    bad_inputs = [
        (ShapeError, k[:1], v[:1]),                      # wrong token count
        (ShapeError, k.reshape(2, D, HKV), v),            # heads and dim swapped
        (DTypeError, k.astype(np.float64), v),            # float64
        (DTypeError, k, v.astype(np.float16)),
        (DTypeError, k.tolist(), v),                      # not an array
    ]
    for err, bad_k, bad_v in bad_inputs:
        with pytest.raises(err):
            cache.write(0, plan, bad_k, bad_v)
        assert_unchanged(cache, snap)
    with pytest.raises(KVLibError):
        cache.write(L, plan, k, v)                        # no such layer
    with pytest.raises(ShapeError):
        cache.attend(0, plan, np.zeros((2, H + 1, D), np.float32))
    with pytest.raises(DTypeError):
        cache.attend(0, plan, np.zeros((2, H, D), np.float64))
    assert_unchanged(cache, snap)


def test_unknown_sequences_and_bad_plans_are_rejected():
    cache = make_cache()
    s = cache.new_sequence()
    with pytest.raises(UnknownSequenceError):
        cache.plan([s + 1], [1])
    with pytest.raises(KVLibError):
        cache.plan([s, s], [1, 1])
    with pytest.raises(LengthError):
        cache.plan([s], [0])
    with pytest.raises(ShapeError):
        cache.plan([s], [1, 2])


def test_rows_run_out_then_free_makes_room():
    cache = make_cache(max_batch=2)
    a, _ = cache.new_sequence(), cache.new_sequence()
    with pytest.raises(CapacityError):
        cache.new_sequence()
    cache.free(a)
    assert cache.new_sequence() == a
    with pytest.raises(UnknownSequenceError):
        cache.free(5)


def test_crop_and_reset(rng):
    cache = make_cache()
    s = cache.new_sequence()
    cache.commit(step(cache, [s], [5], rng)[0])
    cache.crop(s, 2)
    assert cache.length(s) == 2
    snap = snapshot(cache)
    with pytest.raises(LengthError):
        cache.crop(s, 3)                                  # cannot grow by cropping
    assert_unchanged(cache, snap)
    cache.reset()
    assert cache.sequences() == [] and cache.lengths.sum() == 0


def test_bad_construction_is_rejected():
    with pytest.raises(ConfigError):
        ContiguousCache(L, HKV, D, max_batch=0, max_seq=4)
    with pytest.raises(ConfigError):
        ContiguousCache(L, HKV, D, 1, 4, dtype=np.int8)
