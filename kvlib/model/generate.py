"""Autoregressive generation over a batch of prompts, with or without a KV cache.

`generate` is a prefill followed by a decode loop. How one forward step of the batch
runs is a *strategy* object, chosen from the cache:

* `Recompute` (no cache): every step runs each whole sequence again;
* `Packed` (any `KVCache`): only new tokens run, packed with no padding, and attend to
  what the cache holds for their sequence;
* `Padded` (a `PaddedCache`): new tokens are left-padded into a rectangle
  (`kvlib.batching.padded_forward`).

A strategy starts sequences (`prefill`), copies them (`fork`), says which can take one
more token (`fitting`), runs one decode step (`decode`) and frees them (`finish`); the
loop itself never looks at the cache. The serving engine reuses the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..batching import padded_forward
from ..cache.base import Cache
from ..cache.padded import PaddedCache
from ..errors import CapacityError, ConfigError, ContextLengthError
from ..prefill import chunked_prefill
from .sampling import Sampler

FINISH_REASONS = {
    "stop": "a stop token was generated",
    "length": "max_new_tokens were generated",
    "context": "the sequence reached the model's context length",
    "cache_full": "the cache had no room for another token (rows, blocks or max_seq)",
}


@dataclass
class Generation:
    """One prompt's result.

    Attributes:
        prompt_ids: the prompt's token ids.
        token_ids: generated ids, including the stop token if one was produced.
        finish_reason: why it ended, a key of `FINISH_REASONS` ("stop", "length", or an
            early stop: "context", "cache_full"); the tokens made so far are kept.
        text: the generated text (filled by `Model.generate`).
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


class Recompute:
    """No cache: every step runs each whole sequence (prompt + generated) again."""

    def __init__(self, llama) -> None:
        self.llama = llama
        self.tokens: dict[int, list[int]] = {}  # result index -> its whole sequence

    def prefill(self, indices, prompts, chunk: int | None = None) -> np.ndarray:
        self.tokens.update({i: list(p) for i, p in zip(indices, prompts)})
        return self.llama.forward([np.asarray(p) for p in prompts])

    def fork(self, parent: int, child: int) -> None:
        self.tokens[child] = list(self.tokens[parent])

    def fitting(self, indices) -> tuple[list[int], list[int]]:
        return list(indices), []

    def decode(self, indices, tokens) -> np.ndarray:
        for i, t in zip(indices, tokens):
            self.tokens[i].append(t)
        return self.llama.forward([self.tokens[i] for i in indices])

    def finish(self, index: int) -> None:
        del self.tokens[index]


class Packed:
    """A KV cache, new tokens of all sequences packed along one axis (no padding)."""

    def __init__(self, llama, cache: Cache) -> None:
        self.llama = llama
        self.cache = cache
        self.seq_of: dict[int, int] = {}  # result index -> the cache's sequence id

    def prefill(self, indices, prompts, chunk: int | None = None) -> np.ndarray:
        """Reset the cache, start one sequence per prompt (reusing cached prefixes) and
        run the prompts. If they do not fit, raises with the cache unchanged."""
        with self.cache.unchanged_on_error():
            self.cache.reset()
            new_tokens = []
            for i, prompt in zip(indices, prompts):
                self.seq_of[i], n_cached = self.cache.start_sequence(prompt)
                new_tokens.append(np.asarray(prompt[n_cached:]))  # skip cached tokens
            seqs = [self.seq_of[i] for i in indices]
            self._check(seqs, new_tokens)
        if chunk is not None:
            return chunked_prefill(self.llama, new_tokens, self.cache, seqs, chunk)
        return self._forward(seqs, new_tokens)

    def _check(self, seqs, tokens) -> None:
        self.cache.check(seqs, [len(t) for t in tokens])

    def _forward(self, seqs, tokens) -> np.ndarray:
        return self.llama.forward(tokens, self.cache, seqs)

    def fork(self, parent: int, child: int) -> None:
        self.seq_of[child] = self.cache.fork(self.seq_of[parent])

    def fitting(self, indices) -> tuple[list[int], list[int]]:
        """Split `indices` into those whose next token fits in the cache and those that
        must stop: first each that cannot grow on its own, then, while the step as a
        whole does not fit (a shared pool), the last ones."""
        fit = [i for i in indices if self.cache.can_fit([self.seq_of[i]], [1])]
        while fit and not self.cache.can_fit([self.seq_of[i] for i in fit], [1] * len(fit)):
            fit.pop()
        return fit, [i for i in indices if i not in fit]

    def decode(self, indices, tokens) -> np.ndarray:
        return self._forward([self.seq_of[i] for i in indices],
                             [np.array([t]) for t in tokens])

    def finish(self, index: int) -> None:
        self.cache.free(self.seq_of.pop(index))


class Padded(Packed):
    """A `PaddedCache`: every step's new tokens left-padded into a rectangle."""

    def _check(self, seqs, tokens) -> None:
        self.cache.plan(seqs, [max(len(t) for t in tokens)] * len(seqs))  # changes nothing

    def _forward(self, seqs, tokens) -> np.ndarray:
        return padded_forward(self.llama, tokens, self.cache, seqs)


def strategy_for(llama, cache: Cache | None, batching: str | None = None):
    """The step strategy for `cache`: `Recompute` (None), `Padded` (a `PaddedCache`) or
    `Packed`. `batching` ("ragged" or "padded") may force one of the last two."""
    if batching not in (None, "ragged", "padded"):
        raise ConfigError(f"batching must be 'ragged' or 'padded', got {batching!r}")
    if batching == "padded" and not isinstance(cache, PaddedCache):
        raise ConfigError("padded batching stores its padding in a kvlib.cache.padded."
                          f"PaddedCache; got {type(cache).__name__}")
    if cache is None:
        return Recompute(llama)
    if batching == "padded" or (batching is None and isinstance(cache, PaddedCache)):
        return Padded(llama, cache)
    return Packed(llama, cache)


def generate(model, prompts: list[list[int]], cache: Cache | None = None,
             max_new_tokens: int = 32, sampler: Sampler | None = None, stop_ids=frozenset(),
             on_token: Callable[[int, int], None] | None = None,
             batching: str | None = None, n: int = 1,
             prefill_chunk: int | None = None) -> list[Generation]:
    """Generate up to `max_new_tokens` tokens for each prompt.

    Args:
        model: a `Llama` (or a `Model`, whose `llama` is used).
        prompts: token ids of each prompt (ragged: any lengths).
        cache: None to recompute the whole sequence every step, or a `KVCache` with
            room for the batch; it is reset first, so no state leaks between calls.
            A cache with a prefix cache may already hold the start of a prompt
            (`start_sequence`); only the rest is fed to the model.
        sampler: how to pick tokens (default greedy).
        stop_ids: token ids that end a sequence (the id itself is kept in the output).
        on_token: called as on_token(result_index, token_id) for every new token.
        batching: None (the cache decides: a `PaddedCache` left-pads, any other cache
            packs), or "padded" / "ragged" to say so explicitly (see `kvlib.batching`).
        n: completions per prompt. Each prompt is prefilled once; with a cache its
            sequence is then forked n - 1 times, so the samples share the prompt's
            blocks (the cache needs `fork`, as `PagedCache` has).
        prefill_chunk: feed the prompts through the cache this many tokens at a time
            (`kvlib.prefill.chunked_prefill`); None prefills each prompt in one step.
    Returns:
        n `Generation`s per prompt, in order: sample j of prompt p is at p * n + j.
        A finished sequence leaves the batch; the others keep decoding until they stop,
        reach the limit, or run out of context or cache room (`finish_reason` says which;
        the tokens made so far are kept).
    Raises:
        a `KVLibError` for bad arguments or prompts that do not fit, before the cache
        changes: on any raise the cache is exactly as it was.
    """
    llama = getattr(model, "llama", model)
    steps = strategy_for(llama, cache, batching)
    _check_arguments(llama, steps, prompts, cache, max_new_tokens, n, prefill_chunk)
    sampler = sampler or Sampler()
    results = [Generation(prompt_ids=[int(t) for t in p]) for p in prompts for _ in range(n)]
    if max_new_tokens == 0:
        return results

    leaders = list(range(0, len(results), n))  # the first sample of each prompt
    logits = np.repeat(steps.prefill(leaders, prompts, prefill_chunk), n, axis=0)
    for i in leaders:
        for j in range(1, n):
            steps.fork(i, i + j)
    context = llama.config.max_position
    active = list(range(len(results)))
    while active:
        running = []
        for i, token in zip(active, sampler(logits)):
            r = results[i]
            r.token_ids.append(int(token))
            if on_token is not None:
                on_token(i, int(token))
            if int(token) in stop_ids:
                r.finish_reason = "stop"
            elif len(r.token_ids) >= max_new_tokens:
                r.finish_reason = "length"
            elif len(r.prompt_ids) + len(r.token_ids) > context:  # no position left
                r.finish_reason = "context"
            else:
                running.append(i)
        for i in active:
            if i not in running:
                steps.finish(i)
        active, stopped = steps.fitting(running)  # after the finished ones freed room
        for i in stopped:
            results[i].finish_reason = "cache_full"
            steps.finish(i)
        if active:
            logits = steps.decode(active, [results[i].token_ids[-1] for i in active])
    return results


def _check_arguments(llama, steps, prompts, cache, max_new_tokens, n, prefill_chunk) -> None:
    """Every check `generate` makes before it touches the cache."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if n < 1:
        raise ConfigError(f"n (completions per prompt) must be >= 1, got {n}")
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one prompt and one token per prompt")
    if cache is None and prefill_chunk is not None:
        raise ConfigError(f"prefill_chunk={prefill_chunk} needs a KV cache")
    if cache is not None:
        _check_cache_arguments(steps, prompts, cache, n, prefill_chunk)
    for p in prompts:
        llama.check_token_ids(p)
    longest = max(len(p) for p in prompts)
    if longest > llama.config.max_position:
        raise ContextLengthError(f"a prompt of {longest} tokens is past the model's context "
                                 f"of {llama.config.max_position}")


def _check_cache_arguments(steps, prompts, cache, n, prefill_chunk) -> None:
    if n > 1 and not hasattr(cache, "fork"):
        raise ConfigError(f"n > 1 shares the prompt by forking its sequence; "
                          f"{type(cache).__name__} cannot fork (use PagedCache)")
    if prefill_chunk is not None and isinstance(steps, Padded):
        raise ConfigError("chunked prefill runs on the ragged path; use batching='ragged'")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ConfigError(f"prefill_chunk={prefill_chunk} must be >= 1")
    if len(prompts) * n > cache.max_sequences:
        raise CapacityError(f"{len(prompts)} prompts x {n} samples need "
                            f"{len(prompts) * n} sequences; the cache holds "
                            f"{cache.max_sequences}")
