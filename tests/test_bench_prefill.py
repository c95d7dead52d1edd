"""Prefill FLOPs counted from the real weights, and the benchmarks' input checks."""

import pytest

from kvlib.bench import bench_decode, bench_prefill, prefill_flops
from kvlib.errors import ConfigError
from kvlib.gpu import prefill_attention

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def test_prefill_flops_count_every_weight_matrix_and_the_causal_pairs(model):
    weights = model.llama.weights
    per_token = sum(getattr(layer, name).size for layer in weights.layers for name in MATRICES)
    for n in (1, 7, 2000):
        matmuls, attention = prefill_flops(model.config, n)
        assert matmuls == 2 * n * per_token + 2 * weights.embed.size  # LM head: last token
        assert attention == prefill_attention(model.config, n).flops


def test_benchmarks_refuse_bad_input(model):
    with pytest.raises(ConfigError, match="numpy and numba"):
        bench_prefill(model, [1, 2, 3], ["cuda"])
    with pytest.raises(ConfigError, match="repeats"):
        bench_prefill(model, [1, 2, 3], ["numpy"], repeats=0)
    with pytest.raises(ConfigError, match="batch and steps"):
        bench_decode(model, [1, 2, 3], 0, ["numpy"])
    with pytest.raises(ConfigError, match="n_tokens"):
        prefill_flops(model.config, 0)
