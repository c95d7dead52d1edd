"""The Numba decode kernels equal the NumPy reference, and the real model decodes the
same with either backend."""

import numpy as np
import pytest

from kvlib.attention import attention
from kvlib.cache import ContiguousCache, PagedCache
from kvlib.cache.quantized import QuantizedCache, QuantScheme
from kvlib.errors import ConfigError, DTypeError, ShapeError
from kvlib.kernels import cpu


def reference(q, keys, values, rows, lengths):
    """Per-sequence NumPy attention of one query over the first lengths[b] tokens."""
    return np.stack([attention(q[b:b + 1], keys[r, :, :n], values[r, :, :n])[0]
                     for b, (r, n) in enumerate(zip(rows, lengths))])


def random_layer(rng, n_rows, n_kv_heads, max_seq, head_dim):
    shape = (n_rows, n_kv_heads, max_seq, head_dim)
    return (rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (9, 3), (8, 1)])  # groups 1, 3, 8
@pytest.mark.parametrize("n_splits", [1, 2, 5])
def test_contiguous_kernel_matches_reference(rng, n_heads, n_kv_heads, n_splits):
    keys, values = random_layer(rng, 5, n_kv_heads, 300, 32)
    rows = np.array([3, 0, 4, 1])
    lengths = np.array([1, 64, 65, 300])  # one token, exactly one tile, a tile + 1, full
    q = rng.standard_normal((4, n_heads, 32), dtype=np.float32)
    got = cpu.decode_contiguous(q, keys, values, rows, lengths, n_splits=n_splits)
    np.testing.assert_allclose(got, reference(q, keys, values, rows, lengths),
                               rtol=1e-5, atol=1e-6)
    # prefetching only changes when bytes arrive, never the arithmetic
    unprefetched = cpu.decode_contiguous(q, keys, values, rows, lengths, n_splits=n_splits,
                                         prefetch=False)
    np.testing.assert_array_equal(got, unprefetched)


def test_more_splits_than_tiles_and_large_scores(rng):
    """Empty split ranges contribute nothing; large logits do not overflow."""
    keys, values = random_layer(rng, 2, 2, 100, 64)
    keys *= 30
    q = rng.standard_normal((2, 4, 64), dtype=np.float32) * 10
    rows, lengths = np.array([0, 1]), np.array([3, 100])
    got = cpu.decode_contiguous(q, keys, values, rows, lengths, n_splits=8)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, keys, values, rows, lengths),
                               rtol=1e-4, atol=1e-5)


def test_choose_splits():
    assert cpu.choose_splits(n_items=16, n_tokens=32768, n_threads=2) == 1
    assert cpu.choose_splits(n_items=3, n_tokens=32768, n_threads=2) == 2   # 6 items
    assert cpu.choose_splits(n_items=1, n_tokens=32768, n_threads=8) == 8
    assert cpu.choose_splits(n_items=1, n_tokens=600, n_threads=8) == 1     # too short


def test_bad_input_is_a_clear_error(rng):
    keys, values = random_layer(rng, 2, 3, 16, 8)
    q = rng.standard_normal((1, 9, 8), dtype=np.float32)
    with pytest.raises(DTypeError):
        cpu.decode_contiguous(q.astype(np.float64), keys, values, [0], [4])
    with pytest.raises(ShapeError):
        cpu.decode_contiguous(q[:, :8], keys, values, [0], [4])
    with pytest.raises(ShapeError):
        cpu.decode_contiguous(q, keys, values, [0], [17])
    with pytest.raises(ShapeError):
        cpu.decode_contiguous(q, keys, values, [0], [0])


def test_backend_choice_is_checked_before_any_change():
    cache = ContiguousCache(2, 3, 8, max_batch=2, max_seq=16)
    with pytest.raises(ConfigError):
        cache.set_backend("cuda")
    assert cache.backend == "numpy"
    half = ContiguousCache(2, 3, 8, max_batch=2, max_seq=16, dtype=np.float16)
    with pytest.raises(ConfigError):
        half.set_backend("numba")
    assert half.backend == "numpy"


def test_cache_attend_same_with_both_backends_for_prefill_and_decode(rng):
    """Same outputs from both backends for a prefill step (the causal kernel) then two
    decode steps (the decode kernel)."""
    caches = {b: ContiguousCache(1, 2, 16, max_batch=3, max_seq=40, backend=b)
              for b in ("numpy", "numba")}
    seqs = {b: [c.new_sequence() for _ in range(3)] for b, c in caches.items()}
    for counts in ([5, 1, 12], [1, 1, 1], [1, 1, 1]):
        n = sum(counts)
        k = rng.standard_normal((n, 2, 16), dtype=np.float32)
        v = rng.standard_normal((n, 2, 16), dtype=np.float32)
        q = rng.standard_normal((n, 6, 16), dtype=np.float32)
        outs = {}
        for b, cache in caches.items():
            plan = cache.plan(seqs[b], counts)
            cache.write(0, plan, k, v)
            outs[b] = cache.attend(0, plan, q)
            cache.commit(plan)
        np.testing.assert_allclose(outs["numba"], outs["numpy"], rtol=1e-5, atol=1e-6)


def record_backend_differences(cache) -> list:
    """Make `cache.attend` run decode steps with both backends; returns the list that
    collects the largest difference of each call. The NumPy result is what the model gets."""
    differences = []
    attend = cache.attend

    def both(layer, plan, q):
        cache.backend = "numpy"
        want = attend(layer, plan, q)
        if plan.is_decode:
            cache.backend = "numba"
            differences.append(float(np.abs(attend(layer, plan, q) - want).max()))
            cache.backend = "numpy"
        return want

    cache.attend = both
    return differences


CACHES = {
    "contiguous": lambda cfg, batch, seq: ContiguousCache.from_config(cfg, batch, seq),
    "int8": lambda cfg, batch, seq: QuantizedCache.from_config(
        cfg, batch, seq, QuantScheme(bits=8, symmetric=True)),
    "uint8-kivi": lambda cfg, batch, seq: QuantizedCache.from_config(
        cfg, batch, seq, QuantScheme(bits=8, key_axis="channel", group_size=16, window=8)),
    "paged-7": lambda cfg, batch, seq: PagedCache.from_config(
        cfg, num_blocks=batch * -(-seq // 7), block_size=7, max_seqs=batch, max_seq_len=seq),
}


def test_quantized_backend_needs_8_bit_codes():
    cache = QuantizedCache(2, 3, 8, 2, 16, QuantScheme(bits=4))
    with pytest.raises(ConfigError):
        cache.set_backend("numba")
    assert cache.backend == "numpy"


def test_padded_cache_keeps_numpy_backend():
    from kvlib.batching import PaddedCache

    cache = PaddedCache(2, 3, 8, 2, 16)
    with pytest.raises(ConfigError):
        cache.set_backend("numba")
    assert cache.backend == "numpy"


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_real_model_same_greedy_ids_with_both_backends(model, prompt_ids, kind):
    runs = {}
    for backend in ("numpy", "numba"):
        cache = CACHES[kind](model.config, 3, 128).set_backend(backend)
        runs[backend] = [r.token_ids for r in model.generate(prompt_ids, cache=cache,
                                                               max_new_tokens=16)]
    assert runs["numba"] == runs["numpy"]


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_real_model_attention_outputs_agree_within_1e_5(model, prompt_ids, kind):
    """At every layer of real decode steps, kernel and reference differ by < 1e-5."""
    cache = CACHES[kind](model.config, 3, 64)
    differences = record_backend_differences(cache)
    model.generate(prompt_ids, cache=cache, max_new_tokens=4)
    assert len(differences) == 3 * model.config.n_layers
    assert max(differences) < 1e-5


def random_pool(rng, n_seq, n_kv_heads, head_dim, block_size, lengths, extra_blocks=3):
    """A block pool plus block tables in shuffled order, and the same data laid out
    contiguously ([n_seq, kv, max_len, d]) for the reference."""
    need = [-(-n // block_size) for n in lengths]
    n_blocks = sum(need) + extra_blocks
    keys = rng.standard_normal((n_blocks, n_kv_heads, block_size, head_dim), dtype=np.float32)
    values = rng.standard_normal(keys.shape, dtype=np.float32)
    order = rng.permutation(n_blocks)
    table = np.full((n_seq, max(need)), -1, dtype=np.int32)
    contiguous_k = np.zeros((n_seq, n_kv_heads, max(need) * block_size, head_dim), np.float32)
    contiguous_v = np.zeros_like(contiguous_k)
    taken = 0
    for b, n in enumerate(need):
        table[b, :n] = order[taken:taken + n]
        taken += n
        for i, block in enumerate(table[b, :n]):
            contiguous_k[b, :, i * block_size:(i + 1) * block_size] = keys[block]
            contiguous_v[b, :, i * block_size:(i + 1) * block_size] = values[block]
    return keys, values, table, contiguous_k, contiguous_v


@pytest.mark.parametrize("block_size,lengths", [
    (16, [1, 16, 17, 200]),     # one token, one full block, a boundary + 1, many blocks
    (1, [1, 5, 9, 2]),          # block size 1
    (7, [7, 6, 50, 8]),         # a block size that is not a power of two
])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(3, 3), (9, 3), (12, 1)])
@pytest.mark.parametrize("n_splits", [1, 3])
def test_paged_kernel_matches_reference(rng, block_size, lengths, n_heads, n_kv_heads,
                                        n_splits):
    keys, values, table, ck, cv = random_pool(rng, 4, n_kv_heads, 16, block_size, lengths)
    q = rng.standard_normal((4, n_heads, 16), dtype=np.float32)
    got = cpu.decode_paged(q, keys, values, table, lengths, n_splits=n_splits)
    want = reference(q, ck, cv, np.arange(4), lengths)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        got, cpu.decode_paged(q, keys, values, table, lengths, n_splits=n_splits, prefetch=False))


def test_paged_kernel_rejects_bad_tables(rng):
    keys, values, table, _, _ = random_pool(rng, 2, 1, 8, 4, [5, 8])
    q = rng.standard_normal((2, 2, 8), dtype=np.float32)
    bad = table.copy()
    bad[0, 1] = len(keys)
    with pytest.raises(ShapeError):
        cpu.decode_paged(q, keys, values, bad, [5, 8])
    with pytest.raises(ShapeError):
        cpu.decode_paged(q, keys, values, table[:1], [5, 8])
    with pytest.raises(ShapeError):
        cpu.decode_paged(q, keys, values, table, [5, 9])  # past the table's blocks


def test_halves_to_float32_matches_numpy_float16():
    bits = np.arange(0, 2**16, dtype=np.uint16)
    halves = bits.view(np.float16)
    finite = np.isfinite(halves)
    got = np.empty(int(finite.sum()), dtype=np.float32)
    cpu.halves_to_float32(bits[finite], got)
    np.testing.assert_array_equal(got, halves[finite].astype(np.float32))
    assert np.array_equal(np.signbit(got), np.signbit(halves[finite]))


def quantize_8bit(x, axis, group, symmetric):
    """8-bit codes and float16 scales (and zero points) of x, one scale per `group`
    elements along `axis` (x is [..., tokens, d]); also the dequantized float32 array."""
    shape = x.shape
    moved = np.moveaxis(x, axis, -1)
    g = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // group, group))
    if symmetric:
        scale = (np.abs(g).max(-1, keepdims=True) / 127).astype(np.float16)
        codes = np.clip(np.rint(g / scale.astype(np.float32)), -127, 127).astype(np.int8)
        deq = codes.astype(np.float32) * scale.astype(np.float32)
        zero = None
    else:
        zero = g.min(-1, keepdims=True).astype(np.float16)
        scale = ((g.max(-1, keepdims=True) - zero.astype(np.float32)) / 255).astype(np.float16)
        codes = np.clip(np.rint((g - zero.astype(np.float32)) / scale.astype(np.float32)),
                        0, 255).astype(np.uint8)
        deq = codes.astype(np.float32) * scale.astype(np.float32) + zero.astype(np.float32)
    back = lambda a: np.moveaxis(a.reshape(a.shape[:-2] + (-1,)), -1, axis)  # noqa: E731
    meta = lambda a: None if a is None else np.moveaxis(a[..., 0], -1, axis)  # noqa: E731
    return back(codes).reshape(shape), meta(scale), meta(zero), back(deq).reshape(shape)


@pytest.mark.parametrize("symmetric,channel_group,key_token_group", [
    (True, 64, 0),     # int8, one scale per token and head
    (False, 16, 0),    # uint8 + zero point, groups of 16 channels
    (False, 64, 8),    # per-channel keys in groups of 8 tokens (KIVI-style)
])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (9, 3)])
@pytest.mark.parametrize("n_splits", [1, 4])
def test_int8_kernel_matches_reference_on_dequantized_data(rng, symmetric, channel_group,
                                                           key_token_group, n_heads,
                                                           n_kv_heads, n_splits):
    n_rows, max_seq, d, tail_slots = 3, 200, 64, 12
    keys = rng.standard_normal((n_rows, n_kv_heads, max_seq, d), dtype=np.float32)
    values = rng.standard_normal(keys.shape, dtype=np.float32)
    if key_token_group:
        kc, ks, kz, kdeq = quantize_8bit(keys, 2, key_token_group, symmetric)
    else:
        kc, ks, kz, kdeq = quantize_8bit(keys, 3, channel_group, symmetric)
    vc, vs, vz, vdeq = quantize_8bit(values, 3, channel_group, symmetric)
    tail_k = rng.standard_normal((n_rows, n_kv_heads, tail_slots, d), dtype=np.float32)
    tail_v = rng.standard_normal(tail_k.shape, dtype=np.float32)
    rows = np.array([2, 0, 1, 0])[:3]
    n_quantized = np.array([0, 64, 192])   # only the tail; one tile; several tiles
    lengths = np.array([5, 64, 200])       # no tail for the second sequence
    q = rng.standard_normal((3, n_heads, d), dtype=np.float32)
    got = cpu.decode_int8(q, kc, ks, kz, vc, vs, vz, tail_k, tail_v, rows, lengths,
                          n_quantized, key_token_group, n_splits=n_splits)
    want = []
    for b, (r, n, nq) in enumerate(zip(rows, lengths, n_quantized)):
        k = np.concatenate([kdeq[r, :, :nq], tail_k[r, :, :n - nq]], axis=1)
        v = np.concatenate([vdeq[r, :, :nq], tail_v[r, :, :n - nq]], axis=1)
        want.append(attention(q[b:b + 1], k, v)[0])
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)


def test_exp_nonpositive_matches_numpy_exp():
    x = np.concatenate([-np.geomspace(1e-9, 86.9, 100_001), [0.0, -0.5, -np.log(2)]])
    x = x.astype(np.float32)
    got = x.copy()
    cpu.exp_nonpositive(got, len(got), np.empty(len(got), dtype=np.int32))
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7
    below = np.array([-87.0, -100.0, -np.inf], dtype=np.float32)   # clamped at exp(-87)
    cpu.exp_nonpositive(below, 3, np.empty(3, dtype=np.int32))
    np.testing.assert_allclose(below, np.exp(-87.0), rtol=2e-7)
