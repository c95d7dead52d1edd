"""Batching prompts of different lengths: left padding, or a ragged layout.

A batch of prompts of different lengths can be laid out two ways.

(a) **Left padding** (the rectangle). Every prompt is padded on the left to the longest
    one, giving a `[B, T_max]` matrix of ids and a `[B, T_max]` padding mask. Every row
    then grows by one column per decode step, so the cache is a rectangle too, and the
    padding columns are computed, stored and masked out at every step. Two things must
    follow each *sequence*, not the column: the RoPE position of a token is its index
    in its own sequence (`own_positions`), and a query may see only real keys at or
    before its own column (`kvlib.masks.padded_attention_mask`). `PaddedCache` holds
    such a batch; `padded_forward` runs one step of it through the model's own layers.

(b) **Ragged** (no padding at all). The tokens of all sequences are packed along one
    axis and each sequence keeps its own length; this is what `Llama.forward` does with
    any `KVCache`. Nothing is padded, so nothing is wasted.

`kvlib.model.generate.generate` decodes with either: with a `PaddedCache` (in
`kvlib.cache.padded`) it left-pads, with any other cache it packs.
"""

from __future__ import annotations

import numpy as np

from .cache.padded import PaddedCache, PaddedPlan, own_positions
from .errors import ShapeError
from .masks import padding_mask

PAD_ID = 0
"""Token id written into padding columns. Any id works (padding is masked); 0 is
SmolLM2's `<|endoftext|>`."""


def left_pad(prompts, pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Pad token arrays on the left to the longest one.

    Args:
        prompts: list of 1-D int arrays (at least one token each).
    Returns:
        ids [B, T_max] int64 with `pad_id` in the padding, and is_real [B, T_max] bool,
        True at real tokens (`kvlib.masks.padding_mask(lengths, T_max, "left")`).
    """
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShapeError("left_pad needs at least one prompt and one token per prompt")
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    is_real = padding_mask(lengths, width, side="left")
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    ids[is_real] = np.concatenate(prompts)
    return ids, is_real


def padded_forward(llama, tokens, cache: PaddedCache, seq_ids, pad_id: int = PAD_ID):
    """One step of strategy (a): left-pad `tokens` and run them as a rectangle.

    Args:
        llama: a `kvlib.model.Llama`.
        tokens: list of 1-D int arrays of new tokens, one per row (a prefill of prompts
            of different lengths, or one token each when decoding).
        cache: the `PaddedCache` holding rows `seq_ids`.
    Returns:
        [B, vocab] float32 logits at each row's last (real) token.
    """
    ids, is_real = left_pad(tokens, pad_id)
    ids = llama.check_token_ids(ids)
    plan = cache.plan(seq_ids, np.full(len(ids), ids.shape[1]), is_real)
    return llama.forward_plan(ids.reshape(-1), cache, plan)


__all__ = ["PAD_ID", "left_pad", "own_positions", "padded_forward", "PaddedCache",
           "PaddedPlan"]


def __getattr__(name: str):
    """`LogitRecorder` moved next to the samplers (`kvlib.model.sampling`); importing it
    from here still works, without making this module import the model."""
    if name == "LogitRecorder":
        from .model.sampling import LogitRecorder
        return LogitRecorder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
