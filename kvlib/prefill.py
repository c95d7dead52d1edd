"""Chunked prefill: feed long prompts through the model and a KV cache C tokens at a time.

A one-shot prefill of an L-token prompt builds, in every layer, an attention score array
of n_heads x L x L. Split into chunks of C tokens, chunk j (tokens s_j .. s_j + c_j)
attends to the s_j cached tokens plus itself, causally, with the triangle aligned to
the bottom-right corner (`kvlib.masks.causal_mask(c_j, s_j)`, which every cache
applies): its scores are n_heads x c_j x (s_j + c_j), at most n_heads x C x L. The keys,
values and the logits of the last token are the same as in one shot, up to float
rounding, so the generation that follows is the same.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .attention import chunk_boundaries
from .cache.base import Cache
from .errors import ConfigError, ShapeError, TokenIdError


def prefill_schedule(prompt_lengths, chunk_size: int) -> list[list[tuple[int, int, int]]]:
    """The forward steps of a chunked prefill of several prompts side by side.

    Step k holds chunk k of every prompt that still has one, as (prompt index, start,
    end) token ranges; a prompt of L tokens takes ceil(L / chunk_size) steps.
    """
    bounds = [chunk_boundaries(int(n), chunk_size) for n in prompt_lengths]
    n_steps = max((len(b) - 1 for b in bounds), default=0)
    return [[(i, b[k], b[k + 1]) for i, b in enumerate(bounds) if k + 1 < len(b)]
            for k in range(n_steps)]


def chunked_prefill(model, prompts, cache: Cache, seq_ids, chunk_size: int,
                    on_step: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Prefill `prompts` into `cache` in chunks of `chunk_size` tokens per sequence.

    Args:
        model: a `Llama` (or `Model`): anything with `forward(tokens, cache, seq_ids)`
            and `config.vocab_size`.
        prompts: one 1-D array of token ids per sequence (ragged).
        cache: any `KVCache`; the sequences `seq_ids` must exist in it (usually empty).
        seq_ids: the cache's id of each prompt's sequence.
        chunk_size: most tokens of one prompt per forward step (>= 1).
        on_step: called after each forward step as on_step(step_index, counts), with
            counts [n_prompts] the tokens each prompt fed in that step (0 when done).
    Returns:
        float32 logits of each prompt's last token, [n_prompts, vocab].

    Everything is checked before the first chunk runs (chunk size, token ids, room in
    the cache), so bad input leaves the cache unchanged.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    seq_ids = [int(s) for s in seq_ids]
    if len(prompts) == 0 or len(prompts) != len(seq_ids):
        raise ShapeError(f"{len(prompts)} prompts but {len(seq_ids)} sequence ids")
    if any(len(p) == 0 for p in prompts):
        raise ShapeError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    if any(p.min() < 0 or p.max() >= vocab for p in prompts):
        raise TokenIdError(f"token ids must lie in [0, {vocab})")
    cache.check(seq_ids, [len(p) for p in prompts])  # whole prompts fit? (changes nothing)

    logits = np.empty((len(prompts), vocab), dtype=np.float32)
    for step_index, step in enumerate(prefill_schedule([len(p) for p in prompts], chunk_size)):
        step_logits = model.forward([prompts[i][lo:hi] for i, lo, hi in step], cache,
                                    [seq_ids[i] for i, _, _ in step])
        for row, (i, _, hi) in enumerate(step):
            if hi == len(prompts[i]):  # this chunk ends the prompt: keep its last logits
                logits[i] = step_logits[row]
        if on_step is not None:
            counts = np.zeros(len(prompts), dtype=np.int64)
            for i, lo, hi in step:
                counts[i] = hi - lo
            on_step(step_index, counts)
    return logits


def peak_score_elements(n_prompt: int, chunk_size: int, n_heads: int) -> int:
    """Elements of the largest attention score array in a chunked prefill of one prompt.

    Chunk j of c_j tokens after s_j cached ones scores n_heads x c_j x (s_j + c_j);
    the maximum over chunks is about n_heads x C x L (exactly n_heads x L^2 in one shot).
    """
    bounds = chunk_boundaries(n_prompt, chunk_size)
    return n_heads * max((hi - lo) * hi for lo, hi in zip(bounds[:-1], bounds[1:]))
