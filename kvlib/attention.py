"""Reference attention in NumPy: softmax, grouped-query attention.

Shapes follow the cache layout: queries are token-major `[T, n_heads, head_dim]`,
keys and values head-major `[n_kv_heads, S, head_dim]` (one contiguous slab per head).
"""

from __future__ import annotations

import numpy as np


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
