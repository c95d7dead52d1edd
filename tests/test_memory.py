"""Model presets and the memory formulas of `kvlib.memory`."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlib import cache as cache_module
from kvlib.batching import PaddedCache
from kvlib.cache import ContiguousCache, KVCache, PagedCache, QuantizedCache, QuantScheme
from kvlib.config import PRESET_SOURCES, PRESETS, preset
from kvlib.errors import ConfigError
from kvlib.memory import (GPU_DATASHEET_GB, GPU_MEMORY_BYTES, GPU_MEMORY_MIB, NBYTES_FORMULAS,
                          STORAGE_NAMES, StorageType, cached_tokens, contiguous_cache_nbytes,
                          crossover_tokens, expected_nbytes, format_bytes, kv_budget_bytes,
                          kv_bytes_per_token, kv_cache_bytes, max_batch, max_context,
                          storage_type, weights_bytes)

SMOL = PRESETS["smollm2-135m"]


# --- presets ------------------------------------------------------------------------
def test_smollm2_preset_equals_the_config_read_from_the_gguf_file(model):
    assert model.config == SMOL


def test_every_preset_cites_a_source_in_references_bib():
    from pathlib import Path

    bib = (Path(__file__).resolve().parent.parent / "references.bib").read_text()
    assert set(PRESET_SOURCES) == set(PRESETS)
    for keys in PRESET_SOURCES.values():
        for key in keys:
            assert "{" + key + "," in bib, key


@pytest.mark.parametrize("name, kind, layers, heads, kv_heads, head_dim", [
    ("smollm2-135m", "GQA", 30, 9, 3, 64),
    ("gpt2", "MHA", 12, 12, 12, 64),
    ("llama-2-7b", "MHA", 32, 32, 32, 128),
    ("llama-3-8b", "GQA", 32, 32, 8, 128),
    ("llama-3-70b", "GQA", 80, 64, 8, 128),
    ("mistral-7b", "GQA", 32, 32, 8, 128),
    ("falcon-7b", "MQA", 32, 71, 1, 64),
    ("qwen2.5-7b", "GQA", 28, 28, 4, 128),
    ("deepseek-v2", "MLA", 60, 128, 128, 128),
])
def test_presets_have_the_published_shapes(name, kind, layers, heads, kv_heads, head_dim):
    c = preset(name)
    assert (c.attention_kind, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == \
        (kind, layers, heads, kv_heads, head_dim)


def test_window_and_mla_sizes():
    assert preset("mistral-7b").sliding_window == 4096
    ds = preset("deepseek-v2")
    assert (ds.kv_lora_rank, ds.rope_head_dim) == (512, 64)
    assert ds.kv_values_per_token_per_layer == 576        # the paper's (d_c + d_h^R)
    assert 2 * ds.n_heads * ds.head_dim == 32768          # the matching MHA
    assert all(c.sliding_window is None for n, c in PRESETS.items() if n != "mistral-7b")


def _llama_params(c, tied=False, qkv_bias=False):
    """Parameters of a Llama-style decoder (RMSNorm, SwiGLU, no biases but Qwen's QKV)."""
    h, q, kv = c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + 2 * h
    layer += (q + 2 * kv) if qkv_bias else 0
    return c.vocab_size * h * (1 if tied else 2) + c.n_layers * layer + h


def test_parameter_counts_follow_from_the_shapes():
    for name in ("llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b"):
        assert _llama_params(preset(name)) == preset(name).n_params, name
    assert _llama_params(SMOL, tied=True) == SMOL.n_params
    assert _llama_params(preset("qwen2.5-7b"), qkv_bias=True) == preset("qwen2.5-7b").n_params
    g = preset("gpt2")  # LayerNorm (weight+bias), biased linears, learned positions, tied
    h = g.hidden_size
    layer = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
    assert g.vocab_size * h + g.max_position * h + g.n_layers * layer + 2 * h == g.n_params
    f = preset("falcon-7b")  # one LayerNorm per block, fused QKV with one K and one V head
    h = f.hidden_size
    layer = 2 * h + h * (h + 2 * f.head_dim) + h * h + 2 * h * f.intermediate_size
    assert f.vocab_size * h + f.n_layers * layer + 2 * h == f.n_params
    assert round(preset("deepseek-v2").n_params / 1e9) == 236    # the paper's "236B"


def test_preset_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'.*llama-3-8b"):
        preset("gpt-5")
    with pytest.raises(ConfigError, match="both kv_lora_rank and rope_head_dim"):
        dataclasses.replace(SMOL, kv_lora_rank=512)
    with pytest.raises(ConfigError, match="sliding_window"):
        dataclasses.replace(SMOL, sliding_window=0)


# --- bytes per token ----------------------------------------------------------------
def test_the_reference_figures():
    assert kv_bytes_per_token(SMOL, "fp16") == 23_040
    assert kv_bytes_per_token(preset("llama-3-8b"), "bf16") == 128 * 1024
    assert kv_bytes_per_token(preset("deepseek-v2"), "fp16") == 60 * 576 * 2


def test_attention_kinds_differ_only_by_kv_heads():
    llama = preset("llama-2-7b")
    mha = kv_bytes_per_token(llama)
    gqa = kv_bytes_per_token(dataclasses.replace(llama, n_kv_heads=8))
    mqa = kv_bytes_per_token(dataclasses.replace(llama, n_kv_heads=1))
    assert mha == 2 * 32 * 32 * 128 * 2 and (mha // gqa, mha // mqa) == (4, 32)


def test_storage_types_count_their_metadata():
    assert [storage_type(n).vector_bytes(32) for n in STORAGE_NAMES] == \
        [128, 64, 64, 32, 34, 20, 12]          # int8 = q8_0, int4 = q4_1 in llama.cpp
    assert storage_type("int4", group_size=64).vector_bytes(64) == 32 + 4
    assert storage_type("int4").vector_bytes(33) == 17 + 2 * 4   # a short last group
    # SmolLM2: 30 layers x 6 vectors of 64 numbers per token
    assert kv_bytes_per_token(SMOL, "int4") == 30 * 6 * (32 + 2 * 4)
    assert kv_bytes_per_token(SMOL, "int8", group_size=64) == 30 * 6 * (64 + 2)
    custom = StorageType("int3-g128", bits=3, group_size=128, scale_bytes=2)
    assert kv_bytes_per_token(SMOL, custom) == 30 * 6 * (24 + 2)


@pytest.mark.parametrize("name, group", [("fp12", None), ("fp16", 32), ("int4", 0)])
def test_bad_storage_is_a_clear_error(name, group):
    with pytest.raises(ConfigError):
        storage_type(name, group)


def test_total_scales_with_batch_and_length_and_stops_at_the_window():
    assert kv_cache_bytes(SMOL, 1000, batch=3) == 3 * 1000 * 23_040
    mistral = preset("mistral-7b")
    assert cached_tokens(mistral, 10_000) == 4096
    assert kv_cache_bytes(mistral, 10_000) == kv_cache_bytes(mistral, 4096)
    assert kv_cache_bytes(mistral, 10_000, sliding_window=False) == 10_000 * 131_072
    for bad in (dict(tokens=-1), dict(tokens=1.5), dict(tokens=1, batch=0)):
        with pytest.raises(ConfigError):
            kv_cache_bytes(SMOL, **bad)


# --- weights and GPUs ---------------------------------------------------------------
def test_weights_bytes():
    assert weights_bytes(preset("llama-3-8b"), "bf16") == 2 * 8_030_261_248
    assert weights_bytes(SMOL, "fp32") == 4 * 134_515_008
    with pytest.raises(ConfigError, match="n_params"):
        weights_bytes(dataclasses.replace(SMOL, n_params=None))


def test_max_context_fills_the_budget_exactly():
    c, gpu = preset("llama-3-8b"), GPU_MEMORY_BYTES["H100 SXM 80GB"]
    budget = kv_budget_bytes(c, gpu)
    assert gpu == 81_559 * 2**20                       # what nvidia-smi reports, in bytes
    assert budget == math.floor(0.9 * 81_559 * 2**20) - 2 * c.n_params
    for batch in (1, 4, 32):
        n = max_context(c, gpu, batch=batch)
        assert kv_cache_bytes(c, n, batch) <= budget < kv_cache_bytes(c, n + 1, batch)
    b = max_batch(c, gpu, tokens=8192)
    assert kv_cache_bytes(c, 8192, b) <= budget < kv_cache_bytes(c, 8192, b + 1)


def test_when_nothing_fits_and_when_the_window_lifts_the_limit():
    assert max_context(preset("llama-3-70b"), GPU_MEMORY_BYTES["H100 SXM 80GB"]) == 0
    assert max_batch(preset("llama-3-70b"), GPU_MEMORY_BYTES["H100 SXM 80GB"], 100) == 0
    assert max_context(preset("mistral-7b"), GPU_MEMORY_BYTES["L4"]) is None
    assert max_context(preset("mistral-7b"), GPU_MEMORY_BYTES["L4"], sliding_window=False) > 0
    for bad in (1.5, 0.0, -0.1):
        with pytest.raises(ConfigError, match="utilization"):
            max_context(SMOL, 10**9, utilization=bad)
    with pytest.raises(ConfigError, match="overhead_bytes"):
        kv_budget_bytes(SMOL, 10**9, overhead_bytes=-1)


def test_gpu_memory_is_what_the_device_reports_not_decimal_gigabytes():
    assert set(GPU_MEMORY_BYTES) == set(GPU_MEMORY_MIB) == set(GPU_DATASHEET_GB)
    for name, mib in GPU_MEMORY_MIB.items():
        assert GPU_MEMORY_BYTES[name] == mib * 2**20
    # an "80 GB" card reports about 80 GiB, more than 80 * 10**9 bytes
    for name in ("H100 SXM 80GB", "A100 SXM 80GB", "H200 SXM 141GB"):
        assert GPU_MEMORY_BYTES[name] > GPU_DATASHEET_GB[name] * 10**9
        assert abs(GPU_MEMORY_BYTES[name] / (GPU_DATASHEET_GB[name] * 2**30) - 1) < 0.01


def test_the_engine_share_and_the_overhead_come_out_of_the_budget():
    c, gpu = preset("llama-3-8b"), GPU_MEMORY_BYTES["A100 SXM 80GB"]
    full = kv_budget_bytes(c, gpu, utilization=1.0)
    assert full == gpu - weights_bytes(c)
    assert kv_budget_bytes(c, gpu, overhead_bytes=5 * 2**30) == \
        kv_budget_bytes(c, gpu) - 5 * 2**30
    assert max_batch(c, gpu, 8192, overhead_bytes=5 * 2**30) < max_batch(c, gpu, 8192)


def test_crossover_is_the_first_length_where_the_cache_outgrows_the_weights():
    for name in ("smollm2-135m", "llama-3-8b", "falcon-7b", "deepseek-v2"):
        c = preset(name)
        for batch in (1, 8):
            n = crossover_tokens(c, batch)
            w = weights_bytes(c)
            assert kv_cache_bytes(c, n - 1, batch) < w <= kv_cache_bytes(c, n, batch)
    mistral = preset("mistral-7b")
    assert crossover_tokens(mistral) is None          # 4096 tokens never outweigh 7B
    n = crossover_tokens(mistral, batch=64)           # 64 windows do
    assert kv_cache_bytes(mistral, n - 1, 64) < weights_bytes(mistral) <= \
        kv_cache_bytes(mistral, n, 64)


def test_format_bytes():
    assert format_bytes(131072) == "128.0 KiB" and format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(512) == "512 B"


# --- kvlib's own caches: nbytes equals the formula ----------------------------------
@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 4), kv_heads=st.integers(1, 4), head_dim=st.integers(1, 16),
       batch=st.integers(1, 5), seq=st.integers(1, 40),
       dtype=st.sampled_from([np.float32, np.float16]))
def test_contiguous_nbytes_equals_the_formula(layers, kv_heads, head_dim, batch, seq, dtype):
    cache = ContiguousCache(layers, kv_heads, head_dim, batch, seq, dtype)
    arrays = sum(a.nbytes for a in vars(cache).values() if isinstance(a, np.ndarray))
    config = dataclasses.replace(SMOL, n_layers=layers, n_heads=kv_heads, n_kv_heads=kv_heads,
                                 head_dim=head_dim)
    assert cache.nbytes == arrays == expected_nbytes(cache) == \
        contiguous_cache_nbytes(config, batch, seq, dtype)


def test_contiguous_nbytes_is_what_numpy_really_allocates():
    import tracemalloc

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    cache = ContiguousCache.from_config(SMOL, max_batch=2, max_seq=100, dtype=np.float16)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    numpy_only = [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]
    allocated = sum(s.size_diff for s in after.filter_traces(numpy_only).compare_to(
        before.filter_traces(numpy_only), "filename"))
    assert allocated == cache.nbytes == contiguous_cache_nbytes(SMOL, 2, 100, np.float16)


def test_contiguous_formula_is_kv_bytes_plus_metadata():
    assert contiguous_cache_nbytes(SMOL, 4, 1000, np.float16) == \
        kv_cache_bytes(SMOL, 1000, 4, "fp16") + 4 * (8 + 1)
    assert contiguous_cache_nbytes(SMOL, 2, 10, np.float32) == \
        kv_cache_bytes(SMOL, 10, 2, "fp32") + 2 * 9


def test_nbytes_is_fixed_by_the_settings_not_by_use(model, prompt_ids):
    cache = ContiguousCache.from_config(model.config, max_batch=3, max_seq=64)
    before = cache.nbytes
    model.generate(prompt_ids, cache=cache, max_new_tokens=4)
    assert cache.nbytes == before == expected_nbytes(cache)


def test_every_cache_class_has_a_memory_formula():
    classes = [getattr(cache_module, n) for n in cache_module.__all__] + [PaddedCache]
    caches = [c for c in classes if isinstance(c, type) and issubclass(c, KVCache)
              and c is not KVCache]
    missing = [c.__name__ for c in caches if c not in NBYTES_FORMULAS]
    assert caches and missing == [], f"add formulas to kvlib.memory.NBYTES_FORMULAS: {missing}"


def test_expected_nbytes_of_an_unknown_cache_is_a_clear_error():
    class Mystery(ContiguousCache):
        pass

    with pytest.raises(ConfigError, match="no memory formula for Mystery"):
        expected_nbytes(Mystery(1, 1, 1, 1, 1))


@pytest.mark.parametrize("make", [
    lambda: PaddedCache(3, 2, 8, max_batch=2, max_seq=11),
    lambda: PagedCache(3, 2, 8, num_blocks=10, block_size=7, max_seqs=3, max_seq_len=50),
    lambda: QuantizedCache(3, 2, 64, 2, 64, QuantScheme(4, "channel", 32, 16, False)),
    lambda: QuantizedCache(3, 2, 64, 3, 40, QuantScheme(8, "token", 8, 0, True)),
])
def test_nbytes_of_padded_paged_and_quantized_caches_equal_their_formulas(make):
    cache = make()
    owners = [cache] + [v for v in vars(cache).values() if hasattr(v, "__dict__")]  # + the pool
    arrays = [a for o in owners for a in vars(o).values() if isinstance(a, np.ndarray)]
    assert cache.nbytes == expected_nbytes(cache) == sum(a.nbytes for a in arrays)
