"""Graders for chapter 6 (KV quantization)."""

from __future__ import annotations

import warnings

import numpy as np

from ..cache.quantized import QuantScheme, quantized_token_bytes
from ..quantize import dequantize, pack_codes, quantize
from . import Report, compare_arrays, grade_prediction, refuses_kvlib, run_cases


def _rows(seed: int, shape, spread: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)


@refuses_kvlib()
def grade_quantize_rows(quantize_rows) -> Report:
    """Grade `quantize_rows(x, bits) -> (codes, scale, zero)`: asymmetric quantization of
    each row of x [rows, d] to `bits`-bit levels 0..2^bits-1, x ≈ codes * scale + zero."""

    def check(x: np.ndarray, bits: int):
        def run():
            constant = bool((x.max(axis=1) == x.min(axis=1)).any())
            try:
                with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise"):
                    warnings.simplefilter("error", RuntimeWarning)
                    codes, scale, zero = quantize_rows(x.copy(), bits)
            except (FloatingPointError, RuntimeWarning) as err:
                if not constant:
                    raise
                return (f"a constant row has scale 0, and (x - z) / s divides 0 by 0 ({err}); "
                        "the cast to uint8 may hide the NaN, so guard the zero scale")
            codes, scale, zero = (np.asarray(a) for a in (codes, scale, zero))
            for name, array in (("scale", scale), ("zero", zero)):
                if array.dtype != np.float32:
                    return (f"{name} has dtype {array.dtype}; return float32 here (kvlib "
                            "stores float16 scales to save bytes, but then the codes must be "
                            "rounded with the float16 scale; this exercise keeps float32)")
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


@refuses_kvlib()
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


@refuses_kvlib()
def kivi_reference(n_layers, n_kv_heads, head_dim, bits, key_group, value_group) -> float:
    """kvlib's bytes per token with per-channel keys over `key_group` tokens and per-token
    values over `value_group` channels (both dividing head_dim). kvlib's schemes use one G
    for both, so this is the mean of two schemes: per-channel keys and values at
    G = key_group (each part head_dim / key_group scales per token), and per-token keys
    and values at G = value_group."""
    channel = quantized_token_bytes(n_layers, n_kv_heads, head_dim,
                                    QuantScheme(bits, "channel", key_group))
    token = quantized_token_bytes(n_layers, n_kv_heads, head_dim,
                                  QuantScheme(bits, "token", value_group))
    return (channel + token) / 2


@refuses_kvlib()
def grade_kivi_bytes_per_token(kivi_bytes_per_token) -> Report:
    """Grade `kivi_bytes_per_token(n_layers, n_kv_heads, head_dim, bits, key_group,
    value_group)`: bytes of one quantized token with per-channel keys (one scale per
    channel for every `key_group` tokens) and per-token values (one scale per
    `value_group` channels), float16 scales and zero points, over all layers."""

    def check(n_layers, n_kv_heads, head_dim, bits, key_group, value_group):
        def run():
            args = (n_layers, n_kv_heads, head_dim, bits, key_group, value_group)
            got = float(kivi_bytes_per_token(*args))
            want = kivi_reference(*args)
            if np.isclose(got, want, rtol=1e-9):
                return None
            per_token_keys = kivi_reference(n_layers, n_kv_heads, head_dim, bits,
                                            value_group, value_group)
            hints = [(per_token_keys, "keys were counted like values (a scale per "
                      "value_group channels of each token); keys have one scale per "
                      "channel, shared by the key_group tokens of a group"),
                     (want - (want - 2 * n_layers * n_kv_heads * head_dim * bits / 8) / 2,
                      "the zero points are missing (asymmetric: a scale AND a zero point)"),
                     (2 * want - 2 * n_layers * n_kv_heads * head_dim * bits / 8,
                      "scales and zero points are float16: 2 bytes each, not 4")]
            for wrong, hint in hints:
                if np.isclose(got, wrong, rtol=1e-9) and not np.isclose(wrong, want):
                    return f"got {got:g}, expected {want:g}: {hint}"
            return f"got {got:g}, expected {want:g}"
        return run

    return run_cases("kivi_bytes_per_token", [
        ("SmolLM2-135M, 4 bits, key and value groups of 32", check(30, 3, 64, 4, 32, 32)),
        ("SmolLM2-135M, 2 bits, keys over 64 tokens, values over 16 channels",
         check(30, 3, 64, 2, 64, 16)),
        ("Llama-3-8B, 2 bits, keys over 32 tokens, values over 128 channels",
         check(32, 8, 128, 2, 32, 128)),
        ("8 bits, one value scale per token", check(2, 1, 64, 8, 64, 64)),
        ("2 bits, groups of 8 (scales dominate)", check(1, 1, 16, 2, 8, 8)),
    ])


def grade_quantization_error(step, worst_error) -> Report:
    """Grade the predicted step and largest reconstruction error of 2-bit asymmetric
    quantization of the row np.linspace(0, 3, 64) (one group), as kvlib computes them."""
    row = np.linspace(0, 3, 64, dtype=np.float32)[None]
    q = quantize(row, 2, scale_dtype=np.float32)
    truth_step = float(np.asarray(q.scale).ravel()[0])
    truth_error = float(np.abs(dequantize(q) - row).max())
    if ... in (step, worst_error):
        return grade_prediction("quantization_error", ..., None)
    step_report = grade_prediction("quantization_error: step", step, truth_step, [
        (3 / 4, "2 bits give 4 levels 0 ... 3, so the range is cut into 3 steps, not 4"),
        (3 / 2, "the range 0 ... 3 is cut into 2^bits - 1 = 3 steps"),
    ], rtol=1e-3)
    if not step_report.ok:
        return step_report
    return grade_prediction("quantization_error", worst_error, truth_error, [
        (truth_step, "rounding to the nearest level errs by at most half a step"),
        (0.5 * 3 / 4, "the step is 1.0 (3 steps over the range 3), so the error is at most 0.5"),
        (0.0, "only values that sit exactly on a level come back exactly"),
    ], rtol=0.1)
