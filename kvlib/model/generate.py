"""Autoregressive generation over a batch of prompts, with or without a KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .sampling import Sampler


@dataclass
class Generation:
    """One prompt's result.

    Attributes:
        prompt_ids: the prompt's token ids.
        token_ids: generated ids, including the stop token if one was produced.
        finish_reason: "stop" (a stop token) or "length" (max_new_tokens reached).
        text: the generated text (filled by `Model.generate`).
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


def generate(model, prompts: list[list[int]], cache=None, max_new_tokens: int = 32,
             sampler: Sampler | None = None, stop_ids=frozenset(),
             on_token: Callable[[int, int], None] | None = None,
             batching: str = "ragged") -> list[Generation]:
    """Generate up to `max_new_tokens` tokens for each prompt.

    Args:
        model: a `Llama`.
        prompts: token ids of each prompt (ragged: any lengths).
        cache: None to recompute the whole sequence every step, or a `KVCache` with
            room for the batch; it is reset first, so no state leaks between calls.
        sampler: how to pick tokens (default greedy).
        stop_ids: token ids that end a sequence (the id itself is kept in the output).
        on_token: called as on_token(prompt_index, token_id) for every new token.
        batching: how prompts of different lengths share a step (see `kvlib.batching`):
            "ragged" packs them with no padding (any cache); "padded" left-pads them
            into a rectangle and needs a `PaddedCache`.
    Returns:
        One `Generation` per prompt, in order. A finished sequence leaves the batch;
        the others keep decoding until they stop or reach the limit.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if batching not in ("ragged", "padded"):
        raise ConfigError(f"batching must be 'ragged' or 'padded', got {batching!r}")
    if batching == "padded":
        from ..batching import PaddedCache, padded_forward
        if not isinstance(cache, PaddedCache):
            raise ConfigError("padded batching stores its padding in a kvlib.batching."
                              f"PaddedCache; got {type(cache).__name__}")
    sampler = sampler or Sampler()
    results = [Generation(prompt_ids=[int(t) for t in p]) for p in prompts]
    if max_new_tokens == 0:
        return results

    active = list(range(len(prompts)))
    if cache is None:
        def step(indices, new_tokens):
            whole = [results[i].prompt_ids + results[i].token_ids for i in indices]
            return model.forward(whole)
    else:
        cache.reset()
        seq_of = {i: cache.new_sequence() for i in active}

        def step(indices, new_tokens):
            if batching == "padded":
                return padded_forward(model, new_tokens, cache, [seq_of[i] for i in indices])
            return model.forward(new_tokens, cache, [seq_of[i] for i in indices])

    new_tokens = [np.asarray(p) for p in prompts]  # the first step is the prefill
    while active:
        next_ids = sampler(step(active, new_tokens))
        still_active = []
        for i, token in zip(active, next_ids):
            token = int(token)
            results[i].token_ids.append(token)
            if on_token is not None:
                on_token(i, token)
            if token in stop_ids:
                results[i].finish_reason = "stop"
            elif len(results[i].token_ids) < max_new_tokens:
                still_active.append(i)
        if cache is not None:
            for i in set(active) - set(still_active):
                cache.free(seq_of[i])
        active = still_active
        new_tokens = [np.array([results[i].token_ids[-1]]) for i in active]
    return results
