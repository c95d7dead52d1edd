"""A seeded serving workload, and the KV memory a cache reserves while serving it.

`serve` plays requests through any `KVCache` with continuous batching (a finished
request leaves, the next one in line takes its place) and records, after every step,
how many tokens are stored and how many token slots the cache has set aside for the
running requests. Their ratio is the share of KV memory that holds real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache import ContiguousCache, PagedCache
from .errors import ConfigError


@dataclass(frozen=True)
class Request:
    """One request: its prompt length, how many tokens it will generate, and
    (optionally) its prompt's token ids, which let a prefix cache find shared starts."""

    prompt_len: int
    output_len: int
    prompt_ids: tuple[int, ...] | None = None


def chat_workload(n_requests: int, seed: int = 0, prompt_median: float = 128,
                  output_median: float = 192, sigma_prompt: float = 1.0,
                  sigma_output: float = 0.8, max_len: int = 1024) -> list[Request]:
    """Requests with log-normal prompt and output lengths, each clipped to [4, max_len].

    Log-normal: most requests are short and a few are very long, the long right tail
    that conversation logs show. The medians and spreads are parameters; the chapter
    states the values it uses.
    """
    if n_requests < 1:
        raise ConfigError(f"n_requests must be positive, got {n_requests}")
    rng = np.random.default_rng(seed)
    prompts = rng.lognormal(np.log(prompt_median), sigma_prompt, n_requests)
    outputs = rng.lognormal(np.log(output_median), sigma_output, n_requests)
    clip = lambda x: np.clip(np.round(x), 4, max_len).astype(int)  # noqa: E731
    return [Request(int(p), int(o)) for p, o in zip(clip(prompts), clip(outputs))]


def reserved_slots(cache) -> int:
    """Token slots a cache has set aside for its live sequences.

    Contiguous: a whole `max_seq` row per sequence. Paged: the blocks in use.
    """
    if isinstance(cache, ContiguousCache):
        return len(cache.sequences()) * cache.max_seq
    if isinstance(cache, PagedCache):
        return cache.pool.n_used * cache.block_size
    raise ConfigError(f"no reservation rule for {type(cache).__name__}")


@dataclass
class MemoryTrace:
    """Per step of a `serve` run: tokens stored and token slots reserved."""

    stored: np.ndarray
    reserved: np.ndarray

    @property
    def utilization(self) -> float:
        """Share of reserved slots holding real tokens, over the whole run."""
        return float(self.stored.sum() / self.reserved.sum())


def serve(requests: list[Request], cache, max_running: int) -> MemoryTrace:
    """Serve `requests` in order, at most `max_running` at once, and trace memory.

    Each step, a newly admitted request writes its whole prompt (prefill, skipping any
    prefix the cache already holds) and every running request writes one new token.
    A request leaves once it holds prompt_len + output_len tokens. The cache is reset
    first; keys and values are zeros, since only the bookkeeping is measured.
    """
    cache.reset()
    waiting, running = list(requests), {}   # sequence id -> (request, tokens to write next)
    stored, reserved = [], []
    while waiting or running:
        while waiting and len(running) < max_running:
            request = waiting.pop(0)
            if request.prompt_ids is None:
                seq, n_cached = cache.new_sequence(), 0
            else:
                seq, n_cached = cache.start_sequence(request.prompt_ids)
            running[seq] = (request, request.prompt_len - n_cached)
        seq_ids = list(running)
        plan = cache.plan(seq_ids, [running[s][1] for s in seq_ids])
        zeros = np.zeros((plan.n_tokens, cache.n_kv_heads, cache.head_dim), np.float32)
        for layer in range(cache.n_layers):
            cache.write(layer, plan, zeros, zeros)
        cache.commit(plan)
        stored.append(sum(cache.length(s) for s in seq_ids))
        reserved.append(reserved_slots(cache))
        for s in seq_ids:
            request = running[s][0]
            if cache.length(s) >= request.prompt_len + request.output_len:
                cache.free(s)
                del running[s]
            else:
                running[s] = (request, 1)
    return MemoryTrace(np.array(stored), np.array(reserved))
