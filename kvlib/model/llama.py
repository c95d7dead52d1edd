"""The Llama forward pass in NumPy float32: RMSNorm, RoPE, grouped-query attention,
SwiGLU, tied LM head.

`Llama.forward` takes a *ragged* batch — a list with one 1-D array of new token ids per
sequence — packs all tokens along one axis, and either

* recomputes everything (``cache=None``): each list entry is a whole sequence and
  attends causally over itself, or
* uses a KV cache: each entry holds only the *new* tokens of an existing sequence,
  which are written to the cache and attend over everything the cache holds for it.
"""

from __future__ import annotations

import numpy as np

from ..attention import attention
from ..config import ModelConfig
from ..errors import KVLibError, ShapeError
from ..masks import causal_mask
from .files import Weights


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * weight over the last axis (float32 in, float32 out)."""
    mean_sq = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(mean_sq + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class RoPE:
    """Rotary position embedding on *adjacent pairs* (x[2i], x[2i+1]).

    GGUF files store the Q and K weights permuted for llama.cpp's pairwise RoPE, so
    rotating adjacent pairs here gives exactly the model's attention scores. (The
    Hugging Face checkpoint rotates the two halves of each head instead; the two are
    the same function after that permutation.)
    """

    def __init__(self, head_dim: int, base: float, max_position: int) -> None:
        inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        angles = np.arange(max_position, dtype=np.float64)[:, None] * inv_freq[None, :]
        self.cos = np.cos(angles).astype(np.float32)  # [max_position, head_dim / 2]
        self.sin = np.sin(angles).astype(np.float32)

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate x [n_tokens, n_heads, head_dim] at `positions` [n_tokens]."""
        if positions.size and positions.max() >= len(self.cos):
            raise KVLibError(f"position {positions.max()} is past the model's "
                             f"context of {len(self.cos)} tokens")
        cos = self.cos[positions][:, None, :]  # [n_tokens, 1, head_dim / 2]
        sin = self.sin[positions][:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out


class Llama:
    """A Llama-architecture decoder with weights in NumPy float32."""

    def __init__(self, config: ModelConfig, weights: Weights) -> None:
        self.config = config
        self.weights = weights
        self.rope = RoPE(config.head_dim, config.rope_base, config.max_position)

    def forward(self, tokens, cache=None, seq_ids=None, all_logits: bool = False) -> np.ndarray:
        """Run the model over a ragged batch.

        Args:
            tokens: list of 1-D int arrays, one per sequence (whole sequences when
                `cache` is None, new tokens only otherwise).
            cache: a `KVCache`, or None to recompute attention from scratch.
            seq_ids: the cache's id of each sequence (required with a cache).
            all_logits: return logits for every token instead of each sequence's last.
        Returns:
            float32 logits, [n_sequences, vocab] (or [n_tokens, vocab] with all_logits).
        """
        cfg = self.config
        tokens = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
        counts = np.array([len(t) for t in tokens], dtype=np.int64)
        if len(tokens) == 0 or (counts == 0).any():
            raise ShapeError("forward needs at least one sequence and one token per sequence")
        flat = np.concatenate(tokens)
        if flat.min() < 0 or flat.max() >= cfg.vocab_size:
            raise KVLibError(f"token ids must lie in [0, {cfg.vocab_size})")

        if cache is None:
            plan = None
            positions = np.concatenate([np.arange(c) for c in counts])
        else:
            if seq_ids is None or len(seq_ids) != len(tokens):
                raise ShapeError("with a cache, give one sequence id per token array")
            plan = cache.plan(seq_ids, counts)  # validates; raises before any change
            positions = plan.positions
        offsets = np.concatenate([[0], np.cumsum(counts)])

        n = len(flat)
        x = self.weights.embed[flat].astype(np.float32)  # [n_tokens, hidden]
        for layer_index, w in enumerate(self.weights.layers):
            h = rms_norm(x, w.attn_norm, cfg.norm_eps)
            q = (h @ w.wq.T).reshape(n, cfg.n_heads, cfg.head_dim)
            k = (h @ w.wk.T).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            v = (h @ w.wv.T).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            q = self.rope(q, positions)
            k = self.rope(k, positions)
            if plan is None:
                attn = self._attend_uncached(q, k, v, offsets)
            else:
                cache.write(layer_index, plan, k, v)
                attn = cache.attend(layer_index, plan, q)
            x = x + attn.reshape(n, cfg.n_heads * cfg.head_dim) @ w.wo.T
            h = rms_norm(x, w.ffn_norm, cfg.norm_eps)
            x = x + (silu(h @ w.w_gate.T) * (h @ w.w_up.T)) @ w.w_down.T
        if plan is not None:
            cache.commit(plan)

        if not all_logits:
            x = x[offsets[1:] - 1]  # the last token of each sequence
        return rms_norm(x, self.weights.final_norm, cfg.norm_eps) @ self.weights.embed.T

    @staticmethod
    def _attend_uncached(q, k, v, offsets) -> np.ndarray:
        """Causal attention of each sequence over its own keys, recomputed every call."""
        out = np.empty_like(q)
        for start, end in zip(offsets[:-1], offsets[1:]):
            out[start:end] = attention(q[start:end], k[start:end].transpose(1, 0, 2),
                                       v[start:end].transpose(1, 0, 2),
                                       causal_mask(end - start))
        return out
