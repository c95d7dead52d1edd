"""The quantized cache: keys and values stored as 8-, 4- or 2-bit codes plus scales,
with the most recent tokens kept in full precision (KIVI-style).

A sequence of `n` tokens is split in two parts:

* the **quantized prefix**, tokens ``[0, n_quantized)``: integer codes with one float16
  scale (and zero point, if asymmetric) per group;
* the **full-precision tail**, tokens ``[n_quantized, n)``: float32, at least the
  `window` most recent tokens.

When a step appends tokens, every whole group that has left the window is quantized;
attention dequantizes the prefix on the fly and reads the tail as it is. Keys are
quantized either per token (the channels of one token share a scale, in groups of
`group_size` channels) or per channel (the tokens of one channel share a scale, in
groups of `group_size` tokens, as KIVI does: a key group is quantized only once all of
its tokens have arrived, so up to `group_size - 1` extra tokens wait in the tail).
Values are always quantized per token.

Array layouts (row = a sequence of the batch, as in `ContiguousCache`; ``P = head_dim *
bits // 8`` bytes of packed codes per token and head, ``Gk`` = `group_size` for
per-channel keys and 1 for per-token keys, ``W = window + Gk - 1`` tail slots)::

    key_codes, value_codes   [n_layers, max_batch, kv_heads, max_seq, P]        uint8 (int8 if 8-bit symmetric)
    value_scale, value_zero  [n_layers, max_batch, kv_heads, max_seq, head_dim // G] float16
    key_scale, key_zero      per token:   same shape as value_scale
                             per channel: [n_layers, max_batch, kv_heads, max_seq // G, head_dim] float16
    tail_keys, tail_values   [n_layers, max_batch, kv_heads, W, head_dim]       float32
    lengths, n_quantized     [max_batch] int64; in_use [max_batch] bool

For the simplest scheme (8-bit, symmetric, per token, ``group_size=None``) a kernel
reads key ``t`` of head ``h`` as ``key_codes[layer, row, h, t, :] * key_scale[layer, row,
h, t, 0]``: one int8 vector and one scale per (token, head). Zero-point arrays are
allocated only for asymmetric schemes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, QuantizationError
from ..quantize import Quantized, code_range, dequantize, quantize
from .base import StepPlan, attention_kernel
from .rows import RowCache

SCALE_DTYPE = np.float16
KEY_AXES = ("token", "channel")


@dataclass(frozen=True)
class QuantScheme:
    """How a `QuantizedCache` stores keys and values.

    Attributes:
        bits: 8, 4 or 2 bits per stored element.
        key_axis: "token" (per-token key scales) or "channel" (per-channel, KIVI-style).
        group_size: G. Per-token data (values, and keys when key_axis="token") has one
            scale per G channels (None: per whole head); per-channel keys have one scale
            per channel and G tokens (None is not allowed there).
        window: R, the most recent tokens kept in float32.
        symmetric: scale only (True) or scale and zero point (False).
    """

    bits: int = 8
    key_axis: str = "token"
    group_size: int | None = None
    window: int = 0
    symmetric: bool = False

    def validate(self, head_dim: int) -> None:
        """Raise a `QuantizationError`/`ConfigError` if the scheme cannot store `head_dim`."""
        if self.key_axis not in KEY_AXES:
            raise ConfigError(f"key_axis must be one of {KEY_AXES}, got {self.key_axis!r}")
        if self.key_axis == "channel" and self.group_size is None:
            raise QuantizationError("per-channel keys need a group size (tokens per group)")
        if int(self.window) != self.window or self.window < 0:
            raise ConfigError(f"window must be a whole number >= 0, got {self.window}")
        code_range(self.bits, self.symmetric)                   # a supported bit width
        if self.group_size is not None and (self.group_size < 1 or head_dim % self.group_size):
            raise QuantizationError(f"group size {self.group_size} does not divide "
                                    f"head_dim {head_dim}")
        if (head_dim * self.bits) % 8:
            raise QuantizationError(f"head_dim {head_dim} at {self.bits} bits is not a whole "
                                    "number of bytes")

    @property
    def name(self) -> str:
        """A short label such as 'int4 K/channel G32 R64'."""
        group = "" if self.group_size is None else f" G{self.group_size}"
        window = f" R{self.window}" if self.window else ""
        kind = " sym" if self.symmetric else ""
        return f"int{self.bits} K/{self.key_axis}{group}{window}{kind}"

    def channel_group(self, head_dim: int) -> int:
        """Channels per scale of per-token data."""
        return head_dim if self.group_size is None else self.group_size

    def token_group(self) -> int:
        """Tokens that must be complete before keys can be quantized (Gk)."""
        return self.group_size if self.key_axis == "channel" else 1

    def tail_slots(self) -> int:
        """Float32 tail tokens allocated per (layer, row, head): W = R + Gk - 1."""
        return self.window + self.token_group() - 1

    def n_quantized(self, n_tokens: int) -> int:
        """Tokens of an `n_tokens` sequence held quantized: whole key groups left of the window."""
        group = self.token_group()
        return max(n_tokens - self.window, 0) // group * group


def quantized_token_bytes(n_layers: int, n_kv_heads: int, head_dim: int,
                          scheme: QuantScheme) -> float:
    """Bytes of one quantized token over all layers: codes, scales and zero points.

    Per layer and KV head: ``2 * head_dim * bits / 8`` bytes of codes, plus float16
    scales (and zero points): ``head_dim / G`` of them per token for per-token data, and
    ``head_dim`` shared by G tokens for per-channel keys (``head_dim / G`` per token,
    amortized). The window's float32 tokens are not included (see
    `sequence_bytes_per_token`).
    """
    meta = SCALE_DTYPE().itemsize * (1 if scheme.symmetric else 2)
    codes = 2 * head_dim * scheme.bits / 8
    value_meta = head_dim // scheme.channel_group(head_dim) * meta
    if scheme.key_axis == "channel":
        key_meta = head_dim * meta / scheme.group_size
    else:
        key_meta = value_meta
    return n_layers * n_kv_heads * (codes + value_meta + key_meta)


def float32_token_bytes(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """Bytes of one token's keys and values in float32 over all layers."""
    return 2 * n_layers * n_kv_heads * head_dim * 4


def sequence_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int,
                             scheme: QuantScheme, n_tokens: int) -> float:
    """Average bytes per token of an `n_tokens` sequence: quantized prefix + float32 tail."""
    n_q = scheme.n_quantized(n_tokens)
    total = n_q * quantized_token_bytes(n_layers, n_kv_heads, head_dim, scheme) \
        + (n_tokens - n_q) * float32_token_bytes(n_layers, n_kv_heads, head_dim)
    return total / n_tokens


def quantized_cache_nbytes(n_layers: int, n_kv_heads: int, head_dim: int, max_batch: int,
                           max_seq: int, scheme: QuantScheme) -> int:
    """Exact bytes a `QuantizedCache` allocates (see the module docstring for the arrays)."""
    slots = n_layers * max_batch * n_kv_heads
    code_bytes = 2 * slots * max_seq * head_dim * scheme.bits // 8
    per_meta = 1 if scheme.symmetric else 2      # scale (+ zero point)
    value_meta = slots * max_seq * (head_dim // scheme.channel_group(head_dim))
    if scheme.key_axis == "channel":
        key_meta = slots * (max_seq // scheme.group_size) * head_dim
    else:
        key_meta = value_meta
    meta_bytes = per_meta * (value_meta + key_meta) * SCALE_DTYPE().itemsize
    tail_bytes = 2 * slots * scheme.tail_slots() * head_dim * 4
    row_bytes = max_batch * (8 + 8 + 1)          # lengths, n_quantized, in_use
    return code_bytes + meta_bytes + tail_bytes + row_bytes


class QuantizedCache(RowCache):
    """Reserve-max cache that stores keys/values quantized, the recent window in float32.

    Args:
        n_layers, n_kv_heads, head_dim: the model's KV shape (see `from_config`).
        max_batch: most sequences alive at once.
        max_seq: tokens reserved for every sequence.
        scheme: a `QuantScheme` (bits, key axis, group size, window, symmetric).
    """

    STORAGE = ("key_codes", "value_codes", "key_scale", "value_scale", "key_zero",
               "value_zero", "tail_keys", "tail_values")

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_batch: int,
                 max_seq: int, scheme: QuantScheme = QuantScheme()) -> None:
        if max_batch < 1 or max_seq < 1:
            raise ConfigError(f"max_batch and max_seq must be positive, got {max_batch}, {max_seq}")
        scheme.validate(head_dim)
        super().__init__(n_layers, n_kv_heads, head_dim)
        self.scheme = scheme
        rows = (n_layers, max_batch, n_kv_heads)
        code_dtype = np.int8 if scheme.bits == 8 and scheme.symmetric else np.uint8
        packed = head_dim * scheme.bits // 8
        self.key_codes = np.zeros(rows + (max_seq, packed), dtype=code_dtype)
        self.value_codes = np.zeros(rows + (max_seq, packed), dtype=code_dtype)
        token_meta = rows + (max_seq, head_dim // scheme.channel_group(head_dim))
        key_meta = rows + (max_seq // scheme.group_size, head_dim) \
            if scheme.key_axis == "channel" else token_meta
        self.key_scale = np.ones(key_meta, dtype=SCALE_DTYPE)
        self.value_scale = np.ones(token_meta, dtype=SCALE_DTYPE)
        self.key_zero = None if scheme.symmetric else np.zeros(key_meta, dtype=SCALE_DTYPE)
        self.value_zero = None if scheme.symmetric else np.zeros(token_meta, dtype=SCALE_DTYPE)
        tail = rows + (scheme.tail_slots(), head_dim)
        self.tail_keys = np.zeros(tail, dtype=np.float32)
        self.tail_values = np.zeros(tail, dtype=np.float32)
        self.n_quantized = np.zeros(max_batch, dtype=np.int64)  # tokens held quantized
        self._init_rows(max_batch, max_seq)

    @classmethod
    def from_config(cls, config, max_batch: int, max_seq: int,
                    scheme: QuantScheme = QuantScheme()) -> "QuantizedCache":
        """A cache shaped for `config` (a `ModelConfig`)."""
        return cls(config.n_layers, config.n_kv_heads, config.head_dim, max_batch, max_seq, scheme)

    # --- sequences (rows: `RowCache`) ----------------------------------------------
    def _clear_row(self, row: int) -> None:
        super()._clear_row(row)
        self.n_quantized[row] = 0

    def crop(self, seq_id: int, length: int) -> None:
        """Keep the first `length` tokens. Cropping into the quantized prefix moves the
        tokens of the broken key group back to the tail, dequantized."""
        self._check_crop(seq_id, length)
        n_q = int(self.n_quantized[seq_id])
        if length < n_q:
            group = self.scheme.token_group()
            kept = length // group * group
            for layer in range(self.n_layers):
                k, v = self._read(layer, seq_id, n_q, n_q)
                self.tail_keys[layer, seq_id, :, :length - kept] = k[:, kept:length]
                self.tail_values[layer, seq_id, :, :length - kept] = v[:, kept:length]
            self.n_quantized[seq_id] = kept
        self.lengths[seq_id] = length

    @property
    def nbytes(self) -> int:
        arrays = [self.key_codes, self.value_codes, self.key_scale, self.value_scale,
                  self.key_zero, self.value_zero, self.tail_keys, self.tail_values,
                  self.lengths, self.n_quantized, self.in_use]
        return sum(a.nbytes for a in arrays if a is not None)

    def dequantized(self, layer: int, seq_id: int) -> tuple[np.ndarray, np.ndarray]:
        """What attention reads for a sequence: float32 keys, values [kv_heads, length, head_dim]."""
        self._check_layer(layer)
        self._check_known(seq_id)
        return self._read(layer, seq_id, int(self.n_quantized[seq_id]), int(self.lengths[seq_id]))

    # --- one forward step ----------------------------------------------------------
    def _quantized_after(self, row: int, end: int) -> int:
        """Tokens of `row` held quantized once it holds `end` tokens (never fewer than now)."""
        return max(int(self.n_quantized[row]), self.scheme.n_quantized(end))

    def write(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None:
        """Append the step's keys/values: quantize the groups that leave the window, keep
        the rest in the float32 tail."""
        self._check_kv(layer, plan, k, v)
        limit = float(np.finfo(SCALE_DTYPE).max)
        for name, x in (("k", k), ("v", v)):
            if not np.isfinite(x).all() or np.abs(x).max(initial=0) > limit:
                raise QuantizationError(f"{name} holds NaN, infinite or values above {limit:g} "
                                        f"in magnitude, which {SCALE_DTYPE.__name__} scales cannot store")
        for i, row in enumerate(plan.seq_ids):
            start, end = int(plan.starts[i]), int(plan.starts[i] + plan.counts[i])
            q_old, q_new = int(self.n_quantized[row]), self._quantized_after(row, end)
            rows = slice(plan.offsets[i], plan.offsets[i + 1])
            for tail, new, store in ((self.tail_keys, k, self._store_keys),
                                     (self.tail_values, v, self._store_values)):
                # tokens [q_old, end) in float32: the old tail, then the new tokens
                recent = np.concatenate([tail[layer, row, :, :start - q_old],
                                         new[rows].transpose(1, 0, 2)], axis=1)
                if q_new > q_old:
                    store(layer, row, q_old, q_new, recent[:, :q_new - q_old])
                tail[layer, row, :, :end - q_new] = recent[:, q_new - q_old:]

    def _store_keys(self, layer: int, row: int, start: int, end: int, x: np.ndarray) -> None:
        """Quantize keys x [kv_heads, end - start, head_dim] of tokens [start, end)."""
        s = self.scheme
        if s.key_axis == "channel":
            q = quantize(x, s.bits, axis=1, group_size=s.group_size, symmetric=s.symmetric,
                         scale_dtype=SCALE_DTYPE)
            meta = slice(start // s.group_size, end // s.group_size)
        else:
            q = quantize(x, s.bits, axis=2, group_size=s.group_size, symmetric=s.symmetric,
                         scale_dtype=SCALE_DTYPE)
            meta = slice(start, end)
        self._put(q, self.key_codes, self.key_scale, self.key_zero, layer, row, start, end, meta)

    def _store_values(self, layer: int, row: int, start: int, end: int, x: np.ndarray) -> None:
        s = self.scheme
        q = quantize(x, s.bits, axis=2, group_size=s.group_size, symmetric=s.symmetric,
                     scale_dtype=SCALE_DTYPE)
        self._put(q, self.value_codes, self.value_scale, self.value_zero, layer, row, start,
                  end, slice(start, end))

    @staticmethod
    def _put(q: Quantized, codes, scale, zero, layer, row, start, end, meta) -> None:
        codes[layer, row, :, start:end] = q.codes
        scale[layer, row, :, meta] = q.scale
        if zero is not None:
            zero[layer, row, :, meta] = q.zero

    def _read(self, layer: int, row: int, n_quant: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Float32 keys, values [kv_heads, end, head_dim]: dequantized prefix + tail."""
        s = self.scheme
        key_meta = slice(0, n_quant // s.group_size) if s.key_axis == "channel" else slice(0, n_quant)
        key_axis = 1 if s.key_axis == "channel" else 2
        parts = []
        for codes, scale, zero, tail, axis, meta in (
                (self.key_codes, self.key_scale, self.key_zero, self.tail_keys, key_axis, key_meta),
                (self.value_codes, self.value_scale, self.value_zero, self.tail_values, 2,
                 slice(0, n_quant))):
            group = s.group_size if axis == 1 else s.channel_group(self.head_dim)
            q = Quantized(codes[layer, row, :, :n_quant], scale[layer, row, :, meta],
                          None if zero is None else zero[layer, row, :, meta],
                          s.bits, s.symmetric, axis, group)
            parts.append(np.concatenate([dequantize(q), tail[layer, row, :, :end - n_quant]],
                                        axis=1))
        return parts[0], parts[1]

    def _sequence_kv(self, layer: int, plan: StepPlan, i: int):
        """The dequantized prefix and the float32 tail."""
        row, end = plan.seq_ids[i], int(plan.starts[i] + plan.counts[i])
        return self._read(layer, row, self._quantized_after(row, end), end)

    def _check_kernel(self, backend: str) -> None:
        if self.scheme.bits != 8:
            raise ConfigError(f"the Numba kernel reads 8-bit codes; this cache stores "
                              f"{self.scheme.bits}-bit codes")

    def commit(self, plan: StepPlan) -> None:
        for s, c in zip(plan.seq_ids, plan.counts):
            self.n_quantized[s] = self._quantized_after(s, int(self.lengths[s] + c))
            self.lengths[s] += c


@attention_kernel(QuantizedCache, "numba")
def _decode_numba(cache: QuantizedCache, layer: int, plan: StepPlan, q: np.ndarray):
    """8-bit codes dequantized inside the kernel; the float32 tail read as it is."""
    from ..kernels.cpu import decode_int8

    ends = plan.starts + 1
    n_quantized = [cache._quantized_after(row, int(end)) for row, end in zip(plan.seq_ids, ends)]
    zero = lambda a: None if a is None else a[layer]  # noqa: E731
    per_channel = cache.scheme.key_axis == "channel"
    return decode_int8(q, cache.key_codes[layer], cache.key_scale[layer], zero(cache.key_zero),
                       cache.value_codes[layer], cache.value_scale[layer],
                       zero(cache.value_zero), cache.tail_keys[layer], cache.tail_values[layer],
                       np.asarray(plan.seq_ids), ends, n_quantized,
                       cache.scheme.group_size if per_channel else 0)
