"""Reference attention in NumPy: softmax, grouped-query attention.

Shapes follow the cache layout: queries are token-major `[T, n_heads, head_dim]`,
keys and values head-major `[n_kv_heads, S, head_dim]` (one contiguous slab per head).

`SoftmaxState` and `online_attention` compute the same attention one chunk of keys at a
time (online softmax), merging partial results exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, ShapeError


def softmax(scores: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis; masked-out entries get probability 0.

    A row whose entries are all masked returns zeros, never NaN.
    """
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    weights = np.exp(scores - row_max)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(total > 0, total, 1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
              mask: np.ndarray | None = None, scale: float | None = None) -> np.ndarray:
    """Grouped-query attention of `T` queries over `S` keys.

    Args:
        q: [T, n_heads, head_dim] queries.
        k, v: [n_kv_heads, S, head_dim] keys and values; query head h reads KV head
            h // (n_heads // n_kv_heads), as in Llama.
        mask: [T, S] bool, True where query t may attend to key s (None: attend to all).
        scale: multiplier of q·k; defaults to 1/sqrt(head_dim).
    Returns:
        [T, n_heads, head_dim] attention outputs, same dtype as q.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[0]
    group = n_heads // n_kv_heads
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    scale = np.asarray(scale, dtype=q.dtype)  # a float64 scalar would upcast everything
    # [T, H, d] -> [Hkv, group, T, d]: the `group` query heads of one KV head side by side
    q_grouped = q.reshape(n_tokens, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    scores = (q_grouped * scale) @ k[:, None].transpose(0, 1, 3, 2)  # [Hkv, group, T, S]
    probs = softmax(scores, mask)
    out = probs @ v[:, None]  # [Hkv, group, T, d]
    return out.transpose(2, 0, 1, 3).reshape(n_tokens, n_heads, head_dim)


# --- online softmax ------------------------------------------------------------------
# Softmax attention over keys split into chunks, one chunk at a time, never holding a
# row of scores longer than one chunk (Milakov & Gimelshein 2018; FlashAttention keeps
# the same three numbers per query row, Flash-Decoding merges them across splits).


@dataclass(frozen=True)
class SoftmaxState:
    """Softmax attention of some query rows over the keys seen so far.

    For every query row, with scores s_j of the keys seen so far:

    * ``row_max``    m = max_j s_j  (-inf while no key is visible),
    * ``normaliser`` l = sum_j exp(s_j - m),
    * ``out``        o = sum_j exp(s_j - m) v_j  (unnormalised output).

    Shapes: ``row_max`` and ``normaliser`` are ``[..., T]``, ``out`` is ``[..., T, d]``
    (the leading axes are heads). `result` returns o / l, the attention output.
    """

    row_max: np.ndarray
    normaliser: np.ndarray
    out: np.ndarray

    @classmethod
    def empty(cls, rows_shape: tuple[int, ...], head_dim: int,
              dtype=np.float32) -> "SoftmaxState":
        """The state before any key: m = -inf, l = 0, o = 0."""
        return cls(np.full(rows_shape, -np.inf, dtype=dtype), np.zeros(rows_shape, dtype),
                   np.zeros((*rows_shape, head_dim), dtype))

    @classmethod
    def of_chunk(cls, scores: np.ndarray, v: np.ndarray,
                 mask: np.ndarray | None = None) -> "SoftmaxState":
        """State of one chunk of keys: scores [..., T, S], v [..., S, d], mask [T, S]."""
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        row_max = scores.max(axis=-1)
        weights = np.exp(scores - _finite(row_max)[..., None])  # masked keys: exp(-inf) = 0
        return cls(row_max, weights.sum(axis=-1), weights @ v)

    def merge(self, other: "SoftmaxState") -> "SoftmaxState":
        """The state of both key sets: rescale each side to the larger maximum and add.

        m = max(m1, m2);  l = e^(m1-m) l1 + e^(m2-m) l2;  o = e^(m1-m) o1 + e^(m2-m) o2.
        Exact in real arithmetic, commutative and associative, so chunks may be
        processed in any order or in parallel and combined afterwards.
        """
        row_max = np.maximum(self.row_max, other.row_max)
        safe_max = _finite(row_max)
        a = np.exp(self.row_max - safe_max)   # 0 where a side has seen no visible key
        b = np.exp(other.row_max - safe_max)
        return SoftmaxState(row_max, a * self.normaliser + b * other.normaliser,
                            a[..., None] * self.out + b[..., None] * other.out)

    def update(self, scores: np.ndarray, v: np.ndarray,
               mask: np.ndarray | None = None) -> "SoftmaxState":
        """This state after one more chunk of keys (scores [..., T, S], v [..., S, d])."""
        return self.merge(SoftmaxState.of_chunk(scores, v, mask))

    @property
    def log_sum_exp(self) -> np.ndarray:
        """log sum_j exp(s_j) per row: the one number per split Flash-Decoding keeps."""
        with np.errstate(divide="ignore"):
            return self.row_max + np.log(self.normaliser)

    def result(self) -> np.ndarray:
        """o / l, the attention output [..., T, d]; zeros for rows that saw no key."""
        l = self.normaliser[..., None]
        return self.out / np.where(l > 0, l, 1)


def _finite(row_max: np.ndarray) -> np.ndarray:
    """The running max with -inf (no visible key yet) replaced by 0, safe to subtract."""
    return np.where(np.isfinite(row_max), row_max, 0).astype(row_max.dtype)


def chunk_boundaries(n: int, chunk_size: int) -> list[int]:
    """Boundaries [0, c, 2c, ..., n] of chunks of `chunk_size` items (the last may be shorter)."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    return [*range(0, n, chunk_size), n]


def online_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     mask: np.ndarray | None = None, scale: float | None = None,
                     chunk_size: int | None = None, splits=None) -> np.ndarray:
    """`attention`, computed over the keys one chunk at a time with a `SoftmaxState`.

    Same arguments and result as `attention` (q [T, n_heads, d], k, v [n_kv_heads, S, d],
    mask [T, S]), plus the key chunks: `chunk_size` keys each, or explicit boundaries
    `splits` = [0, b1, ..., S] (increasing; empty chunks are allowed). The largest
    score array alive is [n_heads, T, chunk] instead of [n_heads, T, S].
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[0], k.shape[1]
    if splits is None:
        splits = chunk_boundaries(n_keys, chunk_size if chunk_size is not None else max(n_keys, 1))
    splits = [int(b) for b in splits]
    if splits[0] != 0 or splits[-1] != n_keys or any(a > b for a, b in zip(splits, splits[1:])):
        raise ShapeError(f"splits must rise from 0 to {n_keys}, got {splits}")
    group = n_heads // n_kv_heads
    scale = np.asarray(1.0 / np.sqrt(head_dim) if scale is None else scale, dtype=q.dtype)
    q_grouped = q.reshape(n_tokens, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    q_grouped = q_grouped * scale                                # [Hkv, group, T, d]
    state = SoftmaxState.empty((n_kv_heads, group, n_tokens), head_dim, q.dtype)
    for lo, hi in zip(splits[:-1], splits[1:]):
        if lo == hi:
            continue
        scores = q_grouped @ k[:, None, lo:hi].transpose(0, 1, 3, 2)  # [Hkv, group, T, hi-lo]
        state = state.update(scores, v[:, None, lo:hi], None if mask is None else mask[:, lo:hi])
    out = state.result()
    return out.transpose(2, 0, 1, 3).reshape(n_tokens, n_heads, head_dim).astype(q.dtype, copy=False)
