"""kvlib.gpu: the spec table is sourced, intensities match hand-worked cases, the roofline
prediction and the grid occupancy follow their formulas."""

import re
from pathlib import Path

import pytest

from kvlib.config import preset
from kvlib.errors import ConfigError
from kvlib.gpu import (GPUS, decode_attention, decode_grid, decode_step, gpu, gpu_splits,
                       prefill_attention, roofline_time, sectors_per_load, weight_matmuls)

BIB = (Path(__file__).resolve().parent.parent / "references.bib").read_text()
LLAMA3 = preset("llama-3-8b")
SMOL = preset("smollm2-135m")


def test_every_row_cites_sources_present_in_the_bibliography():
    keys = set(re.findall(r"@\w+\{([^,]+),", BIB))
    for spec in GPUS.values():
        assert spec.sources and set(spec.sources) <= keys, spec.name


def test_the_table_has_the_parts_the_chapter_needs():
    assert {"A100-40GB-SXM", "A100-80GB-SXM", "H100-SXM", "H100-PCIe", "H200-SXM", "L4",
            "L40S", "RTX-4090", "MI300X"} <= set(GPUS)
    assert any(g.vendor != "NVIDIA" for g in GPUS.values())


def test_unconfirmed_figures_are_none_and_named_in_the_note():
    h200 = gpu("H200-SXM")
    assert h200.sms is None and "sms" in h200.unconfirmed
    for spec in GPUS.values():
        if spec.unconfirmed:
            assert spec.note, spec.name  # a missing figure is explained


def test_reported_capacity_is_in_mib_as_nvidia_smi_reports_it():
    assert gpu("H100-SXM").reported_bytes == 81559 * 2**20
    assert gpu("A100-80GB-SXM").reported_bytes == 81920 * 2**20
    assert gpu("H100-SXM").reported_bytes > 80e9  # more than the "80 GB" of the datasheet


def test_decode_intensity_is_2g_over_b():
    for config, dtype, want in ((SMOL, "fp16", 3.0), (LLAMA3, "fp16", 4.0),
                                (LLAMA3, "fp32", 2.0), (preset("llama-2-7b"), "fp16", 1.0),
                                (preset("falcon-7b"), "fp16", 71.0)):
        assert decode_attention(config, 4096, 1, dtype).intensity == want


def test_decode_bytes_are_the_kv_cache_and_batch_does_not_change_intensity():
    one = decode_attention(LLAMA3, 8192, 1)
    assert one.bytes == 8192 * 131072  # 128 KiB per token in fp16
    many = decode_attention(LLAMA3, 8192, 32)
    assert many.bytes == 32 * one.bytes and many.intensity == one.intensity


def test_int8_counts_its_scales():
    # per KV head and token: 4 * g * d FLOPs; K and V of d int8 values + 2-byte scales
    # per group of 32: 2 * (128 + 4 * 2) = 272 bytes; g = 4
    work = decode_attention(LLAMA3, 100, 1, "int8")
    assert work.intensity == pytest.approx(4 * 4 * 128 / 272)
    assert decode_attention(LLAMA3, 100, 1, "fp8").intensity == 8.0


def test_mla_decode_uses_the_latent():
    ds = preset("deepseek-v2")  # 128 heads, d_c 512, d_r 64
    work = decode_attention(ds, 1000, 1, "fp16")
    assert work.intensity == pytest.approx(128 * (4 * 512 + 2 * 64) / (2 * 576))


def test_prefill_intensity_grows_with_the_chunk():
    # chunk C after nothing: pairs C (C + 1) / 2 over C tokens read: 2g/b * (C + 1) / 2
    for chunk in (1, 16, 512):
        got = prefill_attention(LLAMA3, chunk).intensity
        assert got == pytest.approx(4.0 * (chunk + 1) / 2)
    after = prefill_attention(LLAMA3, 4, past=10)
    assert after.flops == (4 * 10 + 4 * 5 // 2) * 32 * 4 * 32 * 128


def test_weight_intensity_is_2b_over_bytes_per_weight():
    for tokens in (1, 8, 256):
        assert weight_matmuls(LLAMA3, tokens, "bf16").intensity == tokens
    assert weight_matmuls(LLAMA3, 1, "bf16").bytes == 2 * LLAMA3.n_params


def test_roofline_time_and_bound():
    h100 = gpu("H100-SXM")
    memory = roofline_time(decode_attention(LLAMA3, 8192, 1), h100)
    assert memory.bound == "memory" and memory.seconds == 8192 * 131072 / 3.35e12
    compute = roofline_time(weight_matmuls(LLAMA3, 4096), h100)
    assert compute.bound == "compute"
    assert compute.seconds == pytest.approx(2 * LLAMA3.n_params * 4096 / h100.fp16_flops)


def test_decode_step_adds_weights_and_attention():
    h100 = gpu("H100-SXM")
    step = decode_step(LLAMA3, h100, 8192, 32)
    want = (32 * 8192 * 131072 + 2 * LLAMA3.n_params) / 3.35e12
    assert step.seconds == pytest.approx(want) and step.bound == "memory"


def test_decode_grid_counts_blocks_and_waves():
    occ = decode_grid(1, 8, 1, 132)
    assert (occ.blocks, occ.waves) == (8, 1) and occ.busy_fraction == 8 / 132
    occ = decode_grid(1, 8, 33, 132)
    assert (occ.blocks, occ.waves, occ.busy_fraction) == (264, 2, 1.0)
    assert decode_grid(64, 8, 1, 132).waves == 4


def test_gpu_splits_fill_the_sms_but_keep_splits_long():
    splits = gpu_splits(1, 8, 8192, 132)
    assert decode_grid(1, 8, splits, 132).busy_fraction > 0.9
    assert 8192 / splits >= 256
    assert gpu_splits(128, 8, 8192, 132) == 1  # four waves of blocks already
    assert gpu_splits(1, 8, 300, 132) == 1  # too short to split


def test_sectors_per_load():
    assert sectors_per_load(range(32)) == 4  # 128 bytes of float32: four 32-byte sectors
    assert sectors_per_load([2 * k for k in range(32)]) == 8
    assert sectors_per_load([4 * k for k in range(32)], itemsize=2) == 8


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown GPU"):
        gpu("H300")
    with pytest.raises(ConfigError, match="context"):
        decode_attention(LLAMA3, 0)
    with pytest.raises(ConfigError, match="past"):
        prefill_attention(LLAMA3, 4, past=-1)
    with pytest.raises(ConfigError, match="sms"):
        decode_grid(1, 8, 1, 0)
