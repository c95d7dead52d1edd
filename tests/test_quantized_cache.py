"""QuantizedCache: the cache protocol, exact bytes, the window, and clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlib.cache import ContiguousCache, QuantizedCache, QuantScheme
from kvlib.cache.quantized import (float32_token_bytes, quantized_cache_nbytes,
                                   quantized_token_bytes, sequence_bytes_per_token)
from kvlib.errors import (CapacityError, ConfigError, DTypeError, KVLibError, LengthError,
                          QuantizationError, ShapeError, UnknownSequenceError)

LAYERS, KV_HEADS, HEAD_DIM, HEADS = 2, 2, 16, 4
SCHEMES = [
    QuantScheme(8, "token", None, 0, symmetric=True),
    QuantScheme(8, "token", 8, 3),
    QuantScheme(4, "token", 8, 0),
    QuantScheme(4, "channel", 4, 0),
    QuantScheme(4, "channel", 4, 5, symmetric=True),
    QuantScheme(2, "channel", 8, 2),
]


def make(scheme, max_batch=3, max_seq=40):
    return QuantizedCache(LAYERS, KV_HEADS, HEAD_DIM, max_batch, max_seq, scheme)


def step(cache, seq_ids, counts, rng):
    """One forward step of random K/V/Q through every layer; returns the attention outputs."""
    plan = cache.plan(seq_ids, counts)
    outs = []
    for layer in range(LAYERS):
        k, v = (rng.standard_normal((plan.n_tokens, KV_HEADS, HEAD_DIM)).astype(np.float32)
                for _ in range(2))
        q = rng.standard_normal((plan.n_tokens, HEADS, HEAD_DIM)).astype(np.float32)
        cache.write(layer, plan, k, v)
        outs.append(cache.attend(layer, plan, q))
    cache.commit(plan)
    return outs


def snapshot(cache):
    return {name: None if a is None else a.copy() for name, a in vars(cache).items()
            if isinstance(a, np.ndarray) or a is None}


def assert_unchanged(cache, before):
    for name, a in snapshot(cache).items():
        assert (a is None and before[name] is None) or np.array_equal(a, before[name]), name


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_window_covering_everything_equals_the_contiguous_cache_exactly(scheme):
    wide = QuantScheme(scheme.bits, scheme.key_axis, scheme.group_size, window=40,
                       symmetric=scheme.symmetric)
    quantized, contiguous = make(wide), ContiguousCache(LAYERS, KV_HEADS, HEAD_DIM, 3, 40)
    for cache in (quantized, contiguous):
        a, b = cache.new_sequence(), cache.new_sequence()
        assert (a, b) == (0, 1)
    for seq_ids, counts in [((0, 1), (7, 3)), ((1,), (1,)), ((0, 1), (1, 9)), ((0,), (13,))]:
        got = step(quantized, seq_ids, counts, np.random.default_rng(len(seq_ids) + sum(counts)))
        want = step(contiguous, seq_ids, counts, np.random.default_rng(len(seq_ids) + sum(counts)))
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
    assert quantized.n_quantized.tolist() == [0, 0, 0]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_nbytes_is_the_formula(scheme):
    for max_batch, max_seq in [(1, 7), (3, 40), (2, 64)]:
        cache = make(scheme, max_batch, max_seq)
        formula = quantized_cache_nbytes(LAYERS, KV_HEADS, HEAD_DIM, max_batch, max_seq, scheme)
        assert cache.nbytes == formula


def test_bytes_per_token_of_the_real_model():
    """SmolLM2-135M (30 layers, 3 KV heads, head_dim 64): 46,080 B per token in float32."""
    assert float32_token_bytes(30, 3, 64) == 46080
    int8 = QuantScheme(8, "token", None, 0, symmetric=True)   # 128 B codes + 2 x 2 B scales
    assert quantized_token_bytes(30, 3, 64, int8) == 90 * 132
    kivi4 = QuantScheme(4, "channel", 32, 128)                # 64 B codes + 4 scale/zero pairs
    assert quantized_token_bytes(30, 3, 64, kivi4) == 90 * (64 + 4 * 4)
    # a 1000-token sequence keeps 128 (+ up to 31) tokens in float32
    assert kivi4.n_quantized(1000) == 864
    assert sequence_bytes_per_token(30, 3, 64, kivi4, 1000) == pytest.approx(
        (864 * 90 * 80 + 136 * 46080) / 1000)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_quantized_prefix_and_tail_follow_the_scheme(scheme):
    cache, rng = make(scheme), np.random.default_rng(0)
    seq = cache.new_sequence()
    for count in (5, 1, 1, 9, 2, 11):
        step(cache, [seq], [count], rng)
        n = cache.length(seq)
        assert cache.n_quantized[seq] == scheme.n_quantized(n)
        assert n - cache.n_quantized[seq] <= scheme.tail_slots()
        assert n - cache.n_quantized[seq] >= min(scheme.window, n)


def test_stored_values_are_within_the_quantization_error():
    rng = np.random.default_rng(3)
    for bits, worst in ((8, 0.02), (4, 0.3), (2, 1.2)):
        cache = make(QuantScheme(bits, "channel", 4, 0))
        seq = cache.new_sequence()
        plan = cache.plan([seq], [24])
        k, v = (rng.standard_normal((24, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(2))
        for layer in range(LAYERS):
            cache.write(layer, plan, k, v)
        cache.commit(plan)
        k_hat, v_hat = cache.dequantized(1, seq)
        assert k_hat.shape == v_hat.shape == (KV_HEADS, 24, HEAD_DIM)
        for x, x_hat in ((k, k_hat), (v, v_hat)):
            err = np.abs(x.transpose(1, 0, 2) - x_hat).max()
            assert 0 < err < worst


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SCHEMES), st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_contents_do_not_depend_on_how_tokens_were_chunked(scheme, chunks):
    rng = np.random.default_rng(1)
    n = sum(chunks)
    k, v = (rng.standard_normal((n, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(2))
    one, many = make(scheme, 1, 60), make(scheme, 1, 60)
    for cache, sizes in ((one, [n]), (many, chunks)):
        seq, start = cache.new_sequence(), 0
        for size in sizes:
            plan = cache.plan([seq], [size])
            for layer in range(LAYERS):
                cache.write(layer, plan, k[start:start + size], v[start:start + size])
            cache.commit(plan)
            start += size
    for layer in range(LAYERS):
        for a, b in zip(one.dequantized(layer, 0), many.dequantized(layer, 0)):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_crop_keeps_the_prefix_and_decoding_continues(scheme):
    cache, rng = make(scheme), np.random.default_rng(2)
    seq = cache.new_sequence()
    step(cache, [seq], [30], rng)
    before = [cache.dequantized(layer, seq) for layer in range(LAYERS)]
    for length in (27, 13, 6):
        cache.crop(seq, length)
        assert cache.length(seq) == length
        for layer in range(LAYERS):
            for a, b in zip(cache.dequantized(layer, seq), before[layer]):
                assert np.array_equal(a, b[:, :length])
    step(cache, [seq], [20], rng)
    assert cache.length(seq) == 26 and cache.n_quantized[seq] <= scheme.n_quantized(26)
    with pytest.raises(LengthError):
        cache.crop(seq, 27)


def test_sequences_free_and_reset():
    cache = make(SCHEMES[3], max_batch=2)
    a, b = cache.new_sequence(), cache.new_sequence()
    with pytest.raises(CapacityError):
        cache.new_sequence()
    step(cache, [a, b], [9, 4], np.random.default_rng(0))
    assert (cache.length(a), cache.length(b), cache.capacity(a)) == (9, 4, 40)
    cache.free(a)
    assert cache.sequences() == [b]
    with pytest.raises(UnknownSequenceError):
        cache.length(a)
    assert cache.new_sequence() == a and cache.length(a) == 0
    cache.reset()
    assert cache.sequences() == [] and cache.n_quantized.tolist() == [0, 0]


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(bits=3), QuantizationError, "unsupported bit width 3"),
    (dict(bits=4, group_size=5), QuantizationError, "group size 5 does not divide"),
    (dict(bits=4, key_axis="channel", group_size=None), QuantizationError, "need a group size"),
    (dict(bits=4, key_axis="head"), ConfigError, "key_axis"),
    (dict(bits=4, window=-1), ConfigError, "window"),
])
def test_bad_schemes_are_rejected(kwargs, error, words):
    with pytest.raises(error, match=words):
        make(QuantScheme(**kwargs))


def test_bad_steps_leave_the_cache_unchanged():
    cache, rng = make(SCHEMES[4], max_seq=20), np.random.default_rng(0)
    seq = cache.new_sequence()
    step(cache, [seq], [12], rng)
    before = snapshot(cache)
    with pytest.raises(CapacityError):
        cache.plan([seq], [9])
    plan = cache.plan([seq], [2])
    good = np.zeros((2, KV_HEADS, HEAD_DIM), dtype=np.float32)
    for k, error in [(np.zeros((3, KV_HEADS, HEAD_DIM), np.float32), ShapeError),
                     (good.astype(np.float64), DTypeError), (good.tolist(), DTypeError)]:
        with pytest.raises(error):
            cache.write(0, plan, k, good)
    with pytest.raises(KVLibError, match="layer 5"):
        cache.write(5, plan, good, good)
    with pytest.raises(QuantizationError, match="NaN"):
        cache.write(0, plan, np.full_like(good, np.nan), good)
    with pytest.raises(QuantizationError, match="v holds"):
        cache.write(0, plan, good, np.full_like(good, 1e6))
    with pytest.raises(ShapeError):
        cache.attend(0, plan, np.zeros((2, 3, HEAD_DIM), np.float32))
    with pytest.raises(UnknownSequenceError):
        cache.plan([7], [1])
    with pytest.raises(LengthError):
        cache.crop(seq, 13)
    assert_unchanged(cache, before)
