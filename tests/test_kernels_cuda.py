"""The numba.cuda paged decode kernel, run in Numba's CUDA simulator: it equals the NumPy
reference on random inputs (float32 and int8, every split count, empty splits, partial
pages) and on real keys, values and queries of the model; the paged cache dispatches its
decode steps to it. The simulator runs each GPU thread as a Python thread, so every shape
here is small."""

import os

import numba
import numpy as np
import pytest

# Before numba.cuda is first imported, and kept for the whole session: Numba re-reads its
# environment when it compiles, and would switch the simulator off again. Tests that
# start the command line without it (tests/test_gpu_cli.py) remove it themselves.
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
numba.core.config.reload_config()

from kvlib.attention import attention  # noqa: E402
from kvlib.cache import PagedCache  # noqa: E402
from kvlib.errors import ConfigError, DTypeError, ShapeError  # noqa: E402
from kvlib.kernels import cuda as kcuda  # noqa: E402
from kvlib.quantize import dequantize, quantize  # noqa: E402


def test_the_simulator_is_on():
    assert kcuda.simulating()


def reference(q, keys, values, table, lengths):
    """NumPy attention of each sequence over the tokens its block table names."""
    block_size = keys.shape[2]
    out = []
    for b, n in enumerate(lengths):
        slots = np.arange(n)
        pages = table[b, slots // block_size]
        k = keys[pages, :, slots % block_size].transpose(1, 0, 2)  # [kv_heads, n, d]
        v = values[pages, :, slots % block_size].transpose(1, 0, 2)
        out.append(attention(q[b:b + 1], k, v)[0])
    return np.stack(out)


def random_pool(rng, num_blocks, n_kv_heads, block_size, head_dim, lengths, n_heads):
    shape = (num_blocks, n_kv_heads, block_size, head_dim)
    keys = rng.standard_normal(shape, dtype=np.float32)
    values = rng.standard_normal(shape, dtype=np.float32)
    q = rng.standard_normal((len(lengths), n_heads, head_dim), dtype=np.float32)
    width = -(-max(lengths) // block_size)
    table = np.stack([rng.permutation(num_blocks)[:width] for _ in lengths]).astype(np.int32)
    return q, keys, values, table, np.array(lengths)


@pytest.mark.parametrize("n_splits", [1, 3])
def test_float32_equals_reference_with_partial_pages_and_empty_splits(n_splits):
    rng = np.random.default_rng(n_splits)
    # 13 tokens in pages of 4: a partial last page; 1 token: two of three splits empty
    q, keys, values, table, lengths = random_pool(rng, 9, 1, 4, 32, [13, 1], 2)
    got = kcuda.decode_paged(q, keys, values, table, lengths, n_splits=n_splits)
    assert np.abs(got - reference(q, keys, values, table, lengths)).max() < 1e-5


def test_int8_equals_reference_on_dequantized_values():
    rng = np.random.default_rng(7)
    q, keys, values, table, lengths = random_pool(rng, 6, 2, 4, 32, [11], 4)
    coded = [quantize(x, 8, axis=-1, symmetric=True, scale_dtype=np.float32)
             for x in (keys, values)]
    scales = [c.scale[..., 0] for c in coded]  # one scale per token and head
    got = kcuda.decode_paged(q, coded[0].codes, coded[1].codes, table, lengths, n_splits=2,
                             key_scale=scales[0], value_scale=scales[1])
    want = reference(q, dequantize(coded[0]), dequantize(coded[1]), table, lengths)
    assert np.abs(got - want).max() < 1e-5


@pytest.fixture(scope="module")
def model():
    from kvlib.model import load_model

    return load_model(progress=False)


def test_real_keys_values_and_queries_of_the_model(model):
    """Record a real decode step of SmolLM2 through the paged cache (NumPy backend), then
    give the last layer's queries and block pool to the kernel."""
    cache = PagedCache.from_config(model.config, num_blocks=8, block_size=4, max_seqs=1,
                                   max_seq_len=32)
    steps = []
    numpy_attend = cache.attend

    def recording_attend(layer, plan, q):
        out = numpy_attend(layer, plan, q)
        if plan.is_decode and layer == model.config.n_layers - 1:
            steps.append((q.copy(), cache.keys[layer].copy(), cache.values[layer].copy(),
                          cache.block_table_array(plan.seq_ids), plan.starts + 1, out))
        return out

    cache.attend = recording_attend
    model.generate([model.encode("The capital of France is")], cache=cache, max_new_tokens=2)
    assert len(steps) == 1
    for q, keys, values, table, lengths, want in steps:
        got = kcuda.decode_paged(q, keys, values, table, lengths, n_splits=2)
        assert np.abs(got - want).max() < 1e-5


def test_paged_cache_sends_decode_steps_to_the_kernel():
    rng = np.random.default_rng(3)
    caches = {b: PagedCache(1, 1, 32, num_blocks=6, block_size=4, max_seqs=2,
                            max_seq_len=16).set_backend(b) for b in ("numpy", "cuda")}
    out = {}
    for backend, cache in caches.items():
        rng = np.random.default_rng(3)
        seqs = [cache.new_sequence(), cache.new_sequence()]
        for counts in ([5, 2], [1, 1]):  # a prefill (NumPy path), then a decode step
            plan = cache.plan(seqs, counts)
            k, v = (rng.standard_normal((plan.n_tokens, 1, 32), dtype=np.float32)
                    for _ in range(2))
            cache.write(0, plan, k, v)
            out[backend] = cache.attend(0, plan, rng.standard_normal((plan.n_tokens, 2, 32),
                                                                     dtype=np.float32))
            cache.commit(plan)
    assert np.abs(out["cuda"] - out["numpy"]).max() < 1e-5


def test_bad_input_is_refused_before_launching():
    rng = np.random.default_rng(0)
    q, keys, values, table, lengths = random_pool(rng, 4, 1, 4, 32, [5], 2)
    with pytest.raises(ShapeError, match="outside the pool"):
        kcuda.decode_paged(q, keys, values, table + 10, lengths)
    with pytest.raises(ShapeError, match="lengths"):
        kcuda.decode_paged(q, keys, values, table, [9])
    with pytest.raises(DTypeError, match="scale"):
        kcuda.decode_paged(q, keys.astype(np.int8), values.astype(np.int8), table, lengths)
    with pytest.raises(ShapeError, match="head_dim"):
        kcuda.decode_paged(q[..., :16], keys[..., :16], values[..., :16], table, lengths)
    with pytest.raises(ConfigError, match="n_warps"):
        kcuda.decode_paged(q, keys, values, table, lengths, n_warps=9)


def test_only_the_paged_cache_has_a_cuda_backend():
    from kvlib.cache import ContiguousCache

    with pytest.raises(ConfigError, match="has no cuda attention kernel"):
        ContiguousCache(1, 1, 32, max_batch=1, max_seq=8).set_backend("cuda")
