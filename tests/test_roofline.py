"""kvlib.roofline and the attention benchmark: the roofs are medians with their spread,
the read roof is sampled between the kernels' timings, and the last-level cache decides
which shapes count."""

import math

import numpy as np
import pytest

from kvlib import bench
from kvlib.errors import ConfigError
from kvlib.roofline import ReadProbe, last_level_cache_bytes, measure_roofline


def fake_cpu_caches(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    return root


def test_last_level_cache_is_the_largest_level_of_data(tmp_path):
    root = fake_cpu_caches(tmp_path, [(1, "Data", "32K"), (1, "Instruction", "32K"),
                                      (2, "Unified", "512K"), (3, "Unified", "32768K")])
    assert last_level_cache_bytes(root) == 32 * 2**20
    (tmp_path / "laptop").mkdir()
    root = fake_cpu_caches(tmp_path / "laptop", [(1, "Data", "48K"), (2, "Unified", "2M")])
    assert last_level_cache_bytes(root) == 2 * 2**20


def test_last_level_cache_without_sysfs_is_32_mib(tmp_path):
    assert last_level_cache_bytes(tmp_path / "missing") == 32 * 2**20


def test_roofline_bandwidth_is_a_median_inside_its_range():
    roof = measure_roofline(array_mb=8, repeats=3, fma_seconds=0.01)
    assert set(roof.bandwidth) == set(roof.bandwidth_range) == {"read", "copy", "triad"}
    for name, median in roof.bandwidth.items():
        low, high = roof.bandwidth_range[name]
        assert 0 < low <= median <= high
    assert roof.memory_roof == max(roof.bandwidth.values())
    assert roof.ridge_point == roof.peak_flops / roof.memory_roof


def test_read_probe_records_every_sample():
    probe = ReadProbe(array_mb=4)
    rates = [probe.sample() for _ in range(3)]
    assert probe.samples == rates and all(r > 0 for r in rates)
    assert probe.median == float(np.median(rates))


@pytest.mark.parametrize("array_mb, repeats", [(0, 3), (8, 0)])
def test_roofline_bad_sizes_are_clear_errors(array_mb, repeats):
    with pytest.raises(ConfigError, match="must be positive"):
        measure_roofline(array_mb=array_mb, repeats=repeats)


def test_bench_attention_samples_the_roof_after_every_round(monkeypatch):
    result = bench.bench_attention(["numpy", "numba"], [1, 2], [64], repeats=3,
                                   probe=ReadProbe(array_mb=4))
    assert len(result.roof_samples) == 2 * 3          # two shapes, three rounds each
    assert result.roof == float(np.median(result.roof_samples))
    low, high = result.roof_range
    assert low <= result.roof <= high
    for r in result.rows:
        assert r["fraction_of_roof"] == pytest.approx(r["gb_per_s"] * 1e9 / result.roof,
                                                      rel=1e-12)
        assert r["beyond_llc"] is False               # 64 tokens fit in any cache
    assert math.isnan(result.fraction("numba"))


def test_only_shapes_beyond_the_last_level_cache_count(monkeypatch):
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 200_000)
    result = bench.bench_attention(["numba"], [1, 4], [64], repeats=1,
                                   probe=ReadProbe(array_mb=4))
    beyond = {r["batch"]: r["beyond_llc"] for r in result.rows}
    assert beyond == {1: False, 4: True}              # about 103 kB and 412 kB
    (counted,) = [r for r in result.rows if r["beyond_llc"]]
    assert result.fraction("numba") == counted["fraction_of_roof"]
