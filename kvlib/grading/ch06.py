"""Graders for chapter 6 (KV quantization)."""

from __future__ import annotations

import numpy as np

from ..cache.quantized import QuantScheme, quantized_token_bytes
from ..quantize import pack_codes
from . import Report, compare_arrays, run_cases


def _rows(seed: int, shape, spread: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)


def grade_quantize_rows(quantize_rows) -> Report:
    """Grade `quantize_rows(x, bits) -> (codes, scale, zero)`: asymmetric quantization of
    each row of x [rows, d] to `bits`-bit levels 0..2^bits-1, x ≈ codes * scale + zero."""

    def check(x: np.ndarray, bits: int):
        def run():
            codes, scale, zero = quantize_rows(x.copy(), bits)
            codes, scale, zero = (np.asarray(a) for a in (codes, scale, zero))
            if codes.shape != x.shape:
                return f"codes have shape {codes.shape}, expected {x.shape}"
            if not np.issubdtype(codes.dtype, np.integer):
                return f"codes should be integers, got dtype {codes.dtype}"
            if codes.min() < 0 or codes.max() > 2 ** bits - 1:
                return (f"codes must lie in [0, {2 ** bits - 1}], got {codes.min()}.."
                        f"{codes.max()}")
            scale = scale.reshape(-1, 1).astype(np.float32)
            zero = zero.reshape(-1, 1).astype(np.float32)
            if len(scale) != len(x) or len(zero) != len(x):
                return f"expected one scale and one zero point per row ({len(x)} rows)"
            span = x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True)
            varied = span[:, 0] > 0
            problem = compare_arrays(scale[varied], span[varied] / (2 ** bits - 1), rtol=1e-4)
            if problem:
                return f"scale should be (max - min) / (2^bits - 1) per row: {problem}"
            problem = compare_arrays(zero, x.min(axis=1, keepdims=True), rtol=1e-5)
            if problem:
                return f"zero point should be the row minimum: {problem}"
            x_hat = codes * scale + zero
            if np.isnan(x_hat).any():
                return "the reconstruction contains NaN (a constant row needs care)"
            error = np.abs(x_hat - x) - np.where(varied[:, None], span / (2 ** bits - 1), 0) / 2
            if (error > 1e-5 * (1 + np.abs(x))).any():
                return ("a value is more than half a step from its reconstruction: "
                        "round to the nearest level")
            return None
        return run

    wide = _rows(2, (4, 16))
    wide[:, 5] *= 40
    return run_cases("quantize_rows", [
        ("random rows at 8 bits", check(_rows(0, (5, 32)), 8)),
        ("random rows at 4 bits", check(_rows(1, (7, 16)), 4)),
        ("2 bits, one row", check(_rows(3, (1, 8)), 2)),
        ("an outlier channel at 4 bits", check(wide, 4)),
        ("all-negative rows", check(-np.abs(_rows(4, (3, 8))) - 5, 4)),
        ("a constant row (max == min)", check(np.full((2, 8), 1.5, dtype=np.float32), 4)),
    ])


def grade_pack_int4(pack_int4, unpack_int4) -> Report:
    """Grade `pack_int4(codes)` (uint8 codes 0..15 [..., n] -> uint8 [..., n/2], the first
    code of each pair in the low 4 bits) and `unpack_int4` (its exact inverse)."""
    rng = np.random.default_rng(0)

    def check(codes: np.ndarray):
        def run():
            packed = np.asarray(pack_int4(codes.copy()))
            want = pack_codes(codes, 4)
            if packed.dtype != np.uint8:
                return f"packed bytes should be uint8, got {packed.dtype}"
            problem = compare_arrays(packed, want, rtol=0, atol=0)
            if problem:
                return f"pack_int4: {problem} (code 2j goes in the low nibble of byte j)"
            problem = compare_arrays(np.asarray(unpack_int4(want.copy())), codes, rtol=0, atol=0)
            return f"unpack_int4: {problem}" if problem else None
        return run

    return run_cases("pack_int4 / unpack_int4", [
        ("one pair", check(np.array([3, 10], dtype=np.uint8))),
        ("random codes [4, 64]", check(rng.integers(0, 16, (4, 64)).astype(np.uint8))),
        ("every code 15 (no overflow into the neighbour)", check(np.full((2, 8), 15, np.uint8))),
        ("zeros", check(np.zeros(6, dtype=np.uint8))),
        ("a 3-D array [2, 3, 4]", check(rng.integers(0, 16, (2, 3, 4)).astype(np.uint8))),
    ])


def grade_kivi_bytes_per_token(kivi_bytes_per_token) -> Report:
    """Grade `kivi_bytes_per_token(n_layers, n_kv_heads, head_dim, bits, group_size)`: bytes
    of one quantized token with per-channel keys (G tokens per scale) and per-token values
    (G channels per scale), float16 scales and zero points, over all layers."""

    def check(n_layers, n_kv_heads, head_dim, bits, group):
        def run():
            got = kivi_bytes_per_token(n_layers, n_kv_heads, head_dim, bits, group)
            want = quantized_token_bytes(n_layers, n_kv_heads, head_dim,
                                         QuantScheme(bits, "channel", group))
            if not np.isclose(float(got), want, rtol=1e-9):
                return f"got {got}, expected {want:g}"
            return None
        return run

    return run_cases("kivi_bytes_per_token", [
        ("SmolLM2-135M, 4 bits, G=32", check(30, 3, 64, 4, 32)),
        ("SmolLM2-135M, 2 bits, G=32", check(30, 3, 64, 2, 32)),
        ("Llama-3-8B, 2 bits, G=128", check(32, 8, 128, 2, 128)),
        ("8 bits, G=64 (one value scale per token)", check(2, 1, 64, 8, 64)),
        ("2 bits, G=8 (scales dominate)", check(1, 1, 16, 2, 8)),
    ])
