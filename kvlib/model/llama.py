"""The Llama forward pass in NumPy float32: RMSNorm, RoPE, grouped-query attention,
SwiGLU, tied LM head.

`Llama.forward` takes a *ragged* batch — a list with one 1-D array of new token ids per
sequence — packs all tokens along one axis, and either

* recomputes everything (``cache=None``): each list entry is a whole sequence and
  attends causally over itself, or
* uses a KV cache: each entry holds only the *new* tokens of an existing sequence,
  which are written to the cache and attend over everything the cache holds for it.

Both run the same per-layer code, `Llama.layers`, which takes the packed tokens, their
RoPE positions and an `attend` function; `Llama.forward_plan` runs a step a cache has
already planned (the left-padded batch of `kvlib.batching` uses it).
"""

from __future__ import annotations

import numpy as np

from ..attention import attention
from ..cache.base import Cache
from ..config import ModelConfig
from ..errors import ContextLengthError, ShapeError, TokenIdError
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
            raise ContextLengthError(f"position {positions.max()} is past the model's "
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
        self.on_layer = None  # called as on_layer(layer, n_tokens) after each block (progress)

    def forward(self, tokens, cache: Cache | None = None, seq_ids=None,
                all_logits: bool = False) -> np.ndarray:
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
        tokens = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
        counts = np.array([len(t) for t in tokens], dtype=np.int64)
        if len(tokens) == 0 or (counts == 0).any():
            raise ShapeError("forward needs at least one sequence and one token per sequence")
        flat = self.check_token_ids(np.concatenate(tokens))
        if cache is None:
            offsets = np.concatenate([[0], np.cumsum(counts)])
            positions = np.concatenate([np.arange(c) for c in counts])
            x = self.layers(flat, positions,
                            lambda layer, q, k, v: self._attend_uncached(q, k, v, offsets))
            return self.logits(x, offsets, all_logits)
        if seq_ids is None or len(seq_ids) != len(tokens):
            raise ShapeError("with a cache, give one sequence id per token array")
        plan = cache.plan(seq_ids, counts)  # validates; raises before any change
        return self.forward_plan(flat, cache, plan, all_logits)

    def forward_plan(self, flat_tokens: np.ndarray, cache, plan, all_logits: bool = False):
        """One cached step for a plan already made by `cache.plan` (validated tokens).

        `flat_tokens` [plan.n_tokens] are packed as the plan says; RoPE uses
        `plan.positions`, so a cache whose plans carry their own positions (the
        left-padded batch of `kvlib.batching`) runs through this same code.
        """
        def attend(layer, q, k, v):
            cache.write(layer, plan, k, v)
            return cache.attend(layer, plan, q)

        x = self.layers(flat_tokens, plan.positions, attend)
        cache.commit(plan)
        return self.logits(x, plan.offsets, all_logits)

    def check_token_ids(self, ids: np.ndarray) -> np.ndarray:
        """`ids` as int64 if every id is in the vocabulary, else a `TokenIdError`."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise TokenIdError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    def layers(self, flat_tokens: np.ndarray, positions: np.ndarray, attend) -> np.ndarray:
        """Embed and run every transformer block over packed tokens.

        Args:
            flat_tokens: [n_tokens] token ids.
            positions: [n_tokens] RoPE position of each token.
            attend: attend(layer, q, k, v) -> [n_tokens, n_heads, head_dim], given
                RoPE'd q [n_tokens, n_heads, head_dim] and k, v [n_tokens, n_kv_heads,
                head_dim]; it decides what each token sees (cache, mask, sequence).
        Returns:
            [n_tokens, hidden] residual stream after the last block.
        """
        cfg = self.config
        n = len(flat_tokens)
        x = self.weights.embed[flat_tokens].astype(np.float32)  # [n_tokens, hidden]
        for layer_index, w in enumerate(self.weights.layers):
            h = rms_norm(x, w.attn_norm, cfg.norm_eps)
            q = (h @ w.wq.T).reshape(n, cfg.n_heads, cfg.head_dim)
            k = (h @ w.wk.T).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            v = (h @ w.wv.T).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            q = self.rope(q, positions)
            k = self.rope(k, positions)
            attn = attend(layer_index, q, k, v)
            x = x + attn.reshape(n, cfg.n_heads * cfg.head_dim) @ w.wo.T
            h = rms_norm(x, w.ffn_norm, cfg.norm_eps)
            x = x + (silu(h @ w.w_gate.T) * (h @ w.w_up.T)) @ w.w_down.T
            if self.on_layer is not None:
                self.on_layer(layer_index, n)
        return x

    def logits(self, x: np.ndarray, offsets: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Final norm + LM head: [n_sequences, vocab] at each sequence's last token
        (sequence i owns rows offsets[i]:offsets[i+1]), or [n_tokens, vocab] for all."""
        if not all_logits:
            x = x[offsets[1:] - 1]  # the last token of each sequence
        return rms_norm(x, self.weights.final_norm, self.config.norm_eps) @ self.weights.embed.T

    @staticmethod
    def _attend_uncached(q, k, v, offsets) -> np.ndarray:
        """Causal attention of each sequence over its own keys, recomputed every call."""
        out = np.empty_like(q)
        for start, end in zip(offsets[:-1], offsets[1:]):
            out[start:end] = attention(q[start:end], k[start:end].transpose(1, 0, 2),
                                       v[start:end].transpose(1, 0, 2),
                                       causal_mask(end - start))
        return out
