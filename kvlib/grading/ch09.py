"""Graders for chapter 9: decode-attention intensity, the roofline's bound and time, the
grid a split-K launch fills, and a coalesced lane-to-dimension mapping."""

from __future__ import annotations

import math

import numpy as np

from ..gpu import SECTOR_BYTES, WARP_SIZE, decode_grid, sectors_per_load
from . import Report, run_cases


def _intensity(n_heads, n_kv_heads, head_dim, bits, group_size, meta_bytes):
    groups = math.ceil(head_dim / group_size) if group_size else 0
    vector = math.ceil(head_dim * bits / 8) + groups * meta_bytes
    return 4 * (n_heads // n_kv_heads) * head_dim / (2 * vector)


def grade_decode_intensity(decode_intensity) -> Report:
    """decode_intensity(n_heads, n_kv_heads, head_dim, bits, group_size, meta_bytes)
    -> FLOP/byte of decode attention (per KV head and cached token)."""
    def case(n_heads, n_kv_heads, head_dim, bits, group_size, meta_bytes):
        def check():
            got = decode_intensity(n_heads, n_kv_heads, head_dim, bits, group_size,
                                   meta_bytes)
            want = _intensity(n_heads, n_kv_heads, head_dim, bits, group_size, meta_bytes)
            if np.isclose(got, want, rtol=1e-9):
                return None
            g = n_heads // n_kv_heads
            if np.isclose(got, 2 * want):
                return f"got {got:g}, expected {want:g}: a token brings a key AND a value"
            if np.isclose(got, want * n_kv_heads) or np.isclose(got, want / g):
                return (f"got {got:g}, expected {want:g}: per KV head the work is that of "
                        f"its g = {g} query heads, each doing 4 * head_dim FLOPs")
            if group_size and np.isclose(got, _intensity(n_heads, n_kv_heads, head_dim, bits,
                                                         None, 0)):
                return (f"got {got:g}, expected {want:g}: each group of {group_size} values "
                        f"also stores {meta_bytes} bytes of scale/zero point")
            if np.isclose(got, want * 8) or np.isclose(got, want / 8):
                return f"got {got:g}, expected {want:g}: {bits} bits is {bits / 8:g} bytes"
            return f"got {got:g}, expected {want:g} FLOP/byte"
        return check

    return run_cases("decode_intensity", [
        ("Llama-3-8B shape, fp16", case(32, 8, 128, 16, None, 0)),
        ("multi-head attention, fp32", case(12, 12, 64, 32, None, 0)),
        ("multi-query attention, fp16", case(16, 1, 128, 16, None, 0)),
        ("int8 with an fp16 scale per 32 values", case(9, 3, 64, 8, 32, 2)),
        ("int4 with scale and zero point per 32 values", case(32, 8, 128, 4, 32, 4)),
    ])


def grade_predict(predict) -> Report:
    """predict(flops, bytes_, bandwidth, peak_flops) -> (bound, seconds): the roofline's
    bound ("memory" or "compute") and time."""
    def case(flops, bytes_, bandwidth, peak):
        def check():
            got = predict(flops, bytes_, bandwidth, peak)
            if not isinstance(got, tuple) or len(got) != 2:
                return f"expected a pair (bound, seconds), got {got!r}"
            memory_s, compute_s = bytes_ / bandwidth, flops / peak
            bound = "memory" if memory_s >= compute_s else "compute"
            if got[0] != bound:
                return (f"bound {got[0]!r}, expected {bound!r}: moving the bytes takes "
                        f"{memory_s:.3g} s, the FLOPs {compute_s:.3g} s; the longer one binds")
            if not np.isclose(got[1], max(memory_s, compute_s), rtol=1e-9):
                if np.isclose(got[1], memory_s + compute_s):
                    return ("seconds is the sum of the two times; the roofline overlaps "
                            "them: the time is the larger")
                return f"seconds {got[1]:.4g}, expected {max(memory_s, compute_s):.4g}"
            return None
        return check

    return run_cases("predict", [
        ("decode attention on an H100 (memory bound)", case(4.3e9, 1.07e9, 3.35e12, 989.5e12)),
        ("a large prefill matmul (compute bound)", case(6.6e13, 1.6e10, 3.35e12, 989.5e12)),
        ("batch-32 weights on an A100", case(5.1e11, 1.6e10, 2.039e12, 312e12)),
        ("an L4, fp32 without tensor cores", case(1e12, 2e9, 300e9, 30.3e12)),
    ])


def grade_grid_occupancy(grid_occupancy) -> Report:
    """grid_occupancy(batch, n_kv_heads, n_splits, sms) -> (blocks, waves, busy_fraction)
    for one block per (sequence, KV head, split) and one resident block per SM."""
    def case(batch, n_kv_heads, n_splits, sms):
        def check():
            got = grid_occupancy(batch, n_kv_heads, n_splits, sms)
            want = decode_grid(batch, n_kv_heads, n_splits, sms)
            if not isinstance(got, tuple) or len(got) != 3:
                return f"expected (blocks, waves, busy_fraction), got {got!r}"
            if got[0] != want.blocks:
                return (f"blocks {got[0]}, expected {want.blocks}: one block per sequence, "
                        "per KV head, per split")
            if got[1] != want.waves:
                return (f"waves {got[1]}, expected {want.waves}: a partly filled last round "
                        "still counts (round up)")
            if not np.isclose(got[2], want.busy_fraction):
                return (f"busy_fraction {got[2]:.4g}, expected {want.busy_fraction:.4g}: "
                        "blocks / (waves * SMs), never above 1")
            return None
        return check

    return run_cases("grid_occupancy", [
        ("batch 1, Llama-3-8B's 8 KV heads, no split, H100", case(1, 8, 1, 132)),
        ("batch 1 with 16 splits", case(1, 8, 16, 132)),
        ("batch 64, no split", case(64, 8, 1, 132)),
        ("exactly one full wave", case(1, 12, 11, 132)),
        ("A100, batch 8", case(8, 8, 2, 108)),
    ])


def _check_mapping(dim_of, head_dim) -> str | None:
    steps = head_dim // WARP_SIZE
    table = [[int(dim_of(lane, step, head_dim)) for lane in range(WARP_SIZE)]
             for step in range(steps)]
    seen = sorted(d for row in table for d in row)
    if seen != list(range(head_dim)):
        missing = sorted(set(range(head_dim)) - set(seen))
        what = (f"dimension {missing[0]} is never read" if missing
                else "a dimension is read twice or lies outside the row")
        return (f"head_dim {head_dim}: the lanes must read every dimension exactly once "
                f"over the {steps} steps ({what})")
    best = WARP_SIZE * 4 // SECTOR_BYTES  # 32 float32 values, 4 bytes each
    for step, row in enumerate(table):
        sectors = sectors_per_load(row)
        if sectors > best:
            return (f"head_dim {head_dim}, step {step}: the warp's load touches {sectors} "
                    f"32-byte sectors instead of {best}; at each step lane k should read "
                    "the element next to lane k - 1's")
    return None


def grade_coalesced_dim(coalesced_dim) -> Report:
    """coalesced_dim(lane, step, head_dim) -> the dimension of a float32 row that `lane`
    reads at `step` (steps 0 .. head_dim / 32 - 1)."""
    return run_cases("coalesced_dim", [
        (f"head_dim {d}", lambda d=d: _check_mapping(coalesced_dim, d)) for d in (32, 64, 128)
    ])
