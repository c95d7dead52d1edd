"""Uniform integer quantization of float32 arrays: 8, 4 and 2 bits, symmetric or
asymmetric, in groups along one axis.

One *group* is `group_size` consecutive elements along `axis`; all elements of a group
share one scale (and, when asymmetric, one zero point). With `b` bits:

* **asymmetric** (scale + zero point): codes are unsigned levels ``0 .. 2^b - 1``,
  ``scale = (max - min) / (2^b - 1)``, ``zero = min``, ``x ≈ code * scale + zero``;
* **symmetric** (scale only): codes are signed levels ``-(2^(b-1) - 1) .. 2^(b-1) - 1``,
  ``scale = max|x| / (2^(b-1) - 1)``, ``x ≈ code * scale``.

Either way the round-trip error of an element is at most half a step, ``scale / 2``
(plus the rounding of the stored scale and zero point, which are float16 by default).

Quantizing a key matrix ``[tokens, head_dim]`` *per token* means ``axis=-1`` (the
channels of one token share a scale); *per channel* means ``axis=0`` (the tokens of one
channel share a scale), in groups of `group_size` tokens.

Codes of fewer than 8 bits are *packed* along the last axis, ``8 // b`` codes per byte,
the first code in the lowest bits: byte ``j`` of int4 data holds code ``2j`` in bits 0-3
and code ``2j+1`` in bits 4-7. Symmetric codes are stored offset by ``2^(b-1)`` so that
every stored field is unsigned; 8-bit symmetric codes are stored as plain ``int8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QuantizationError

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported bit width {bits}; choose one of {SUPPORTED_BITS}")


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code of a `bits`-bit quantizer."""
    _check_bits(bits)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2 ** bits - 1


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (each < 2^bits) along the last axis, 8 // bits per byte.

    Args:
        codes: integer array [..., n] with values in [0, 2^bits); n a multiple of 8 // bits.
    Returns:
        uint8 array [..., n * bits // 8].
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise QuantizationError(f"cannot pack {codes.shape[-1]} codes of {bits} bits: "
                                f"the last axis must be a multiple of {per_byte}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2 ** bits):
        raise QuantizationError(f"codes must lie in [0, {2 ** bits}) to pack into {bits} bits")
    grouped = codes.astype(np.uint8).reshape(codes.shape[:-1] + (codes.shape[-1] // per_byte, per_byte))
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 [..., m] -> uint8 codes [..., m * 8 // bits]."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    codes = (packed[..., None] >> shifts) & np.uint8(2 ** bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass(frozen=True)
class Quantized:
    """A quantized array: stored codes plus one scale (and zero point) per group.

    Attributes:
        codes: int8 [..shape] for 8-bit symmetric; otherwise uint8 packed along the last
            axis, [..., shape[-1] * bits // 8].
        scale: [..shape with `axis` of length shape[axis] // group_size] in `scale.dtype`.
        zero: same shape as `scale` (asymmetric), or None (symmetric).
        bits, symmetric, axis, group_size: how it was quantized (axis is non-negative).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    bits: int
    symmetric: bool
    axis: int
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points."""
        return self.codes.nbytes + self.scale.nbytes + (0 if self.zero is None else self.zero.nbytes)


def _grouped(x: np.ndarray, axis: int, group_size: int) -> np.ndarray:
    """View x with `axis` split into (n_groups, group_size); the group axis is axis + 1."""
    shape = x.shape[:axis] + (x.shape[axis] // group_size, group_size) + x.shape[axis + 1:]
    return x.reshape(shape)


def _check_layout(shape: tuple[int, ...], bits: int, axis: int, group_size: int | None) -> tuple[int, int]:
    """Validate a quantization layout; return (non-negative axis, group size)."""
    _check_bits(bits)
    if len(shape) == 0:
        raise QuantizationError("cannot quantize a 0-d array")
    if not -len(shape) <= axis < len(shape):
        raise QuantizationError(f"axis {axis} out of range for an array of shape {shape}")
    axis = axis % len(shape)
    group_size = shape[axis] if group_size is None else int(group_size)
    if group_size < 1 or shape[axis] % group_size:
        raise QuantizationError(f"group size {group_size} does not divide axis {axis} "
                                f"of length {shape[axis]}")
    if (shape[-1] * bits) % 8:
        raise QuantizationError(f"the last axis ({shape[-1]}) times {bits} bits is not a "
                                "whole number of bytes")
    return axis, group_size


def quantize(x: np.ndarray, bits: int, axis: int = -1, group_size: int | None = None,
             symmetric: bool = False, scale_dtype=np.float16) -> Quantized:
    """Quantize `x` to `bits`-bit integers, one scale per group of `group_size` along `axis`.

    Args:
        x: float array of any shape (its last axis times `bits` must fill whole bytes).
        bits: 8, 4 or 2.
        axis: the axis whose elements share a scale (-1: per token for [tokens, d] data).
        group_size: elements per group along `axis` (None: the whole axis); must divide it.
        symmetric: scale only (True) or scale and zero point (False).
        scale_dtype: storage type of scales and zero points.
    Returns:
        A `Quantized`; `dequantize` turns it back into float32.
    """
    x = np.asarray(x, dtype=np.float32)
    axis, group_size = _check_layout(x.shape, bits, axis, group_size)
    if not np.isfinite(x).all():
        raise QuantizationError("cannot quantize NaN or infinite values")
    groups = _grouped(x, axis, group_size)
    low, high = code_range(bits, symmetric)
    with np.errstate(over="ignore"):  # too-large values are reported just below
        if symmetric:
            zero = None
            scale = (np.abs(groups).max(axis=axis + 1, keepdims=True) / high).astype(scale_dtype)
        else:
            zero = groups.min(axis=axis + 1, keepdims=True).astype(scale_dtype)
            span = groups.max(axis=axis + 1, keepdims=True) - zero.astype(np.float32)
            scale = (span / high).astype(scale_dtype)
    if not (np.isfinite(scale).all() and (zero is None or np.isfinite(zero).all())):
        raise QuantizationError(f"values too large for {np.dtype(scale_dtype).name} scales "
                                f"(largest |x| is {np.abs(x).max():.3g})")
    scale = np.where(scale > 0, scale, np.ones_like(scale))  # a constant (or all-zero) group
    shifted = groups if zero is None else groups - zero.astype(np.float32)
    levels = np.rint(shifted / scale.astype(np.float32))
    levels = np.clip(levels, low, high).reshape(x.shape)
    if bits == 8 and symmetric:
        codes = levels.astype(np.int8)
    else:
        codes = pack_codes((levels - low).astype(np.uint8), bits)
    scale = np.squeeze(scale, axis=axis + 1)
    zero = None if zero is None else np.squeeze(zero, axis=axis + 1)
    return Quantized(codes, scale, zero, bits, symmetric, axis, group_size)


def dequantize(q: Quantized) -> np.ndarray:
    """Float32 reconstruction of a `Quantized` array."""
    low, _ = code_range(q.bits, q.symmetric)
    if q.bits == 8 and q.symmetric:
        levels = q.codes.astype(np.float32)
    else:
        levels = unpack_codes(q.codes, q.bits).astype(np.float32) + np.float32(low)
    groups = _grouped(levels, q.axis, q.group_size)
    scale = np.expand_dims(q.scale.astype(np.float32), q.axis + 1)
    out = groups * scale
    if q.zero is not None:
        out += np.expand_dims(q.zero.astype(np.float32), q.axis + 1)
    return out.reshape(levels.shape)
