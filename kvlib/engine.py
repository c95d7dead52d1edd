"""Continuous batching: one step loop that serves many requests on the paged KV cache.

Requests arrive at any time, each with its own prompt, sampling and length. The engine
keeps a *waiting* queue (first come, first served) and a *running* set, and every call
to `Engine.step` builds and runs one forward step of the model:

1. **decodes first**: every running request whose next input is a single token (it has
   finished its prompt) feeds that token;
2. **prefill chunks**: running requests still in their prompt feed as much of it as the
   token budget leaves (chunked prefill, chapter 7);
3. **admission**: waiting requests join while there is budget left, fewer than
   `max_batch` run, and the pool keeps `watermark` blocks free after their prompts;
   each starts with `start_sequence`, so a prompt that begins with a cached prefix
   (chapter 5) feeds only the rest;
4. **room**: the step's blocks are reserved in the pool; if the pool is short, the
   newest running request is *preempted by recompute* (its blocks are freed and it goes
   back to the front of the queue with its generated tokens appended to its prompt) until
   the step fits;
5. **forward**: one packed, ragged forward over all the step's tokens (no padding);
6. **sampling**: every request that fed the last token of its pending input gets a new
   token, which is streamed through its callback; finished requests free their blocks.

Request-level ("static") batching is the `policy="static"` baseline: a batch is admitted
only when nothing runs, and runs until its longest request finishes (Orca's argument,
measured in chapter 10).

Only the public cache methods are used, each in one small method of `Engine`
(`_start`, `_reserve`, `_forward`, `_release`, `_free_blocks`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .cache.paged import PagedCache, blocks_for
from .errors import CapacityError, ConfigError, KVLibError, LengthError, OutOfBlocksError
from .model.sampling import Sampler

POLICIES = ("continuous", "static")

# on_token(request_id, token_id, finish_reason): finish_reason is None until the last token
TokenCallback = Callable[[int, int, "str | None"], None]


def pack_step(pending, budget) -> list[int]:
    """Tokens each running request feeds in the next step, under a token budget.

    Args:
        pending: per running request, oldest first, the tokens it must still feed
            before its next token can be sampled (1 for a decode).
        budget: most tokens in the step (a number, or `np.inf`).
    Returns:
        one count per request (0: it sits this step out). Decodes go first, one token
        each, oldest first; what is left of the budget goes to prefill chunks, oldest
        first (Sarathi-Serve's stall-free batching).
    """
    counts = [0] * len(pending)
    left = budget
    for i, n in enumerate(pending):  # decodes
        if n == 1 and left > 0:
            counts[i], left = 1, left - 1
    for i, n in enumerate(pending):  # prefill chunks
        if n > 1 and left > 0:
            counts[i] = int(min(n, left))
            left -= counts[i]
    return counts


@dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        prompt_ids: token ids of the prompt (at least one).
        max_new_tokens: most tokens to generate (>= 1).
        temperature, top_k, top_p, seed: sampling (`Sampler`); temperature 0 is greedy.
        stop_ids: token ids that end the request (the stop token is kept in its output).
        arrival: seconds on the engine's clock when the request arrives (`Engine.run`).
        on_token: called as on_token(request_id, token_id, finish_reason) for every new
            token; finish_reason is "stop" or "length" on the last token, else None.
    """

    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    arrival: float = 0.0
    on_token: TokenCallback | None = None


@dataclass
class RequestState:
    """What the engine knows about one request while and after it runs.

    Times are seconds on the engine's clock. `tokens` are the generated ids; the cache
    holds the first `n_cached` tokens of `context` = prompt + generated tokens.
    """

    request_id: int
    request: Request
    sampler: Sampler
    tokens: list[int] = field(default_factory=list)
    seq_id: int | None = None
    n_cached: int = 0
    admitted: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    finished: float | None = None
    preemptions: int = 0
    recomputed: int = 0  # cached tokens dropped by preemptions (computed again later)

    @property
    def context(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return list(self.request.prompt_ids) + self.tokens

    @property
    def n_pending(self) -> int:
        """Tokens the model must still see before the next token can be sampled."""
        return len(self.request.prompt_ids) + len(self.tokens) - self.n_cached

    @property
    def queue_time(self) -> float:
        """Arrival to first being scheduled."""
        return self.admitted - self.request.arrival

    @property
    def ttft(self) -> float:
        """Time to first token: arrival to the end of the step that produced it."""
        return self.token_times[0] - self.request.arrival

    @property
    def tbt(self) -> np.ndarray:
        """Times between successive tokens."""
        return np.diff(self.token_times)


@dataclass(frozen=True)
class StepItem:
    """`count` tokens of one request in a step; `decode` if it fed a single generated
    token after a finished prompt, else a prefill chunk (of the prompt, or of the
    prompt plus generated tokens of a preempted request)."""

    request_id: int
    count: int
    decode: bool


@dataclass(frozen=True)
class StepRecord:
    """One forward step: when it ran (engine clock), what it fed, and the pool after it."""

    start: float
    end: float
    items: tuple[StepItem, ...]
    preempted: tuple[int, ...]
    blocks_in_use: int

    @property
    def n_tokens(self) -> int:
        return sum(item.count for item in self.items)


@dataclass
class RunResult:
    """Every request's state and every step of an `Engine.run`, with run-level metrics."""

    requests: list[RequestState]
    steps: list[StepRecord]
    prefix_hit_rate: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    @property
    def makespan(self) -> float:
        """First arrival to the last token (seconds)."""
        return max(r.finished for r in self.requests) - min(r.request.arrival
                                                            for r in self.requests)

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the makespan."""
        return self.generated_tokens / self.makespan

    @property
    def busy_time(self) -> float:
        """Seconds spent in forward steps."""
        return sum(s.end - s.start for s in self.steps)

    @property
    def preemptions(self) -> int:
        return sum(r.preemptions for r in self.requests)

    @property
    def recomputed_tokens(self) -> int:
        """Tokens whose keys and values were computed again after a preemption."""
        return sum(r.recomputed for r in self.requests)

    @property
    def peak_blocks(self) -> int:
        return max(s.blocks_in_use for s in self.steps)

    def ttft(self) -> np.ndarray:
        return np.array([r.ttft for r in self.requests])

    def tbt(self) -> np.ndarray:
        """Every gap between two tokens of the same request, all requests pooled."""
        return np.concatenate([r.tbt for r in self.requests])

    def queue_times(self) -> np.ndarray:
        return np.array([r.queue_time for r in self.requests])


class Engine:
    """Serves `Request`s with continuous batching on a `PagedCache`.

    Args:
        model: a `Llama` (or a `Model`, whose `.llama` is used).
        cache: the `PagedCache` whose pool every request shares; its prefix cache
            persists across runs (`cache.clear_prefix_cache()` to start cold).
        max_batch: most requests running at once (<= cache.max_seqs).
        token_budget: most tokens per step (decodes + prefill chunks); None: no limit,
            whole prompts are prefilled in one step.
        watermark: share of the pool's blocks that admission keeps free, so that
            running requests can grow a while before anyone is preempted.
        policy: "continuous" (join and leave at every step) or "static" (a new batch
            only when the previous one has finished).
    """

    def __init__(self, model, cache: PagedCache, max_batch: int = 16,
                 token_budget: int | None = 256, watermark: float = 0.01,
                 policy: str = "continuous") -> None:
        if not isinstance(cache, PagedCache):
            raise ConfigError(f"the engine shares a paged pool; got {type(cache).__name__}")
        if not 1 <= max_batch <= cache.max_seqs:
            raise ConfigError(f"max_batch must be in [1, {cache.max_seqs}] (the cache's "
                              f"max_seqs), got {max_batch}")
        if token_budget is not None and token_budget < 1:
            raise ConfigError(f"token_budget must be >= 1 or None, got {token_budget}")
        if not 0 <= watermark < 1:
            raise ConfigError(f"watermark must be in [0, 1), got {watermark}")
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.llama = getattr(model, "llama", model)
        self.cache = cache
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.policy = policy
        self.waiting: list[RequestState] = []   # first come, first served
        self.running: list[RequestState] = []   # in order of admission
        self._next_id = 0

    # --- requests --------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise a `KVLibError` naming what is wrong with `request`; changes nothing.

        Reads only the engine's fixed configuration, so any thread may call it.
        """
        prompt = np.asarray(request.prompt_ids)
        if prompt.ndim != 1 or len(prompt) == 0:
            raise LengthError("a request needs a prompt of at least one token")
        self.llama.check_token_ids(prompt)
        if isinstance(request.max_new_tokens, bool) or request.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        most = self.cache.max_seq_len
        if len(prompt) + request.max_new_tokens > most:
            raise LengthError(f"prompt of {len(prompt)} tokens plus {request.max_new_tokens} "
                              f"new tokens is past the context of {most} tokens")
        need = self.blocks_needed(request)
        if need > self.cache.num_blocks:
            raise CapacityError(f"the request can hold up to {need} blocks but the pool has "
                                f"{self.cache.num_blocks}: it could never finish")
        Sampler(request.temperature, request.top_k, request.top_p, request.seed)

    def blocks_needed(self, request: Request) -> int:
        """Blocks a request holds at its longest: its last token is sampled, never
        cached, so prompt + max_new_tokens - 1 tokens."""
        n = len(request.prompt_ids) + request.max_new_tokens - 1
        return blocks_for(n, self.cache.block_size)

    def add(self, request: Request) -> RequestState:
        """Check a request and queue it; returns its state (its `request_id` names it)."""
        self.check(request)
        state = RequestState(self._next_id, request,
                             Sampler(request.temperature, request.top_k, request.top_p,
                                     request.seed))
        self._next_id += 1
        self.waiting.append(state)
        return state

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request and free its blocks; False if unknown
        (already finished, or never added)."""
        for queue in (self.waiting, self.running):
            for state in queue:
                if state.request_id == request_id:
                    if state.seq_id is not None:
                        self._release(state)
                    queue.remove(state)
                    state.finish_reason = "cancelled"
                    return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step --------------------------------------------------------------------
    def step(self, now: float = 0.0) -> StepRecord | None:
        """Schedule and run one forward step starting at `now` (engine clock, seconds).

        Tokens are stamped with the step's end, `now` plus the measured duration of the
        step. Returns the step's record, or None if nothing can run.
        """
        started = time.perf_counter()
        items = self._schedule(now)
        plan, preempted = self._make_room(items)
        items = [(s, n) for s, n in items if s.seq_id is not None]
        if not items:
            return None
        fed = tuple(StepItem(s.request_id, n, n == 1 and bool(s.tokens)) for s, n in items)
        logits = self._forward(items, plan)
        end = now + (time.perf_counter() - started)
        for row, (state, count) in enumerate(items):
            state.n_cached += count
            if state.n_pending == 0:
                self._emit(state, int(state.sampler(logits[row:row + 1])[0]), end)
        return StepRecord(now, end, fed, tuple(preempted), self.cache.pool.n_used)

    def _schedule(self, now: float) -> list[tuple[RequestState, int]]:
        """The step's (request, token count) items: decodes, prefill chunks, admissions."""
        budget = self.token_budget if self.token_budget is not None else np.inf
        counts = pack_step([s.n_pending for s in self.running], budget)
        decodes = [(s, 1) for s, n in zip(self.running, counts) if n and s.n_pending == 1]
        chunks = [(s, n) for s, n in zip(self.running, counts) if n and s.n_pending > 1]
        items = decodes + chunks
        left = budget - sum(counts)
        if self.policy == "static" and self.running:    # static: no one joins a batch
            return items
        free = self._free_blocks()
        while self.waiting and left > 0 and len(self.running) < self.max_batch:
            state = self.waiting[0]                     # 3. admissions, first come first
            need = blocks_for(len(state.context), self.cache.block_size)
            if self.running and free - need < self.watermark_blocks:
                break
            free -= need
            self.waiting.pop(0)
            self._start(state)
            if state.admitted is None:
                state.admitted = now
            self.running.append(state)
            count = int(min(state.n_pending, left))
            items.append((state, count))
            left -= count
        return items

    def _make_room(self, items):
        """Reserve the step's blocks, first preempting the newest running requests until
        they fit. Returns (plan or None if no item is left, preempted request ids)."""
        preempted = []
        while True:
            live = [(s, n) for s, n in items if s.seq_id is not None]
            plan = self._reserve(live) if live else None
            if plan is not None or not live:
                return plan, preempted
            victim = self.running.pop()  # the newest; the oldest alone always fits
            self._release(victim)
            victim.recomputed += victim.n_cached
            victim.n_cached = 0
            victim.preemptions += 1
            self.waiting.insert(0, victim)  # older than every request still waiting
            preempted.append(victim.request_id)

    def _emit(self, state: RequestState, token: int, when: float) -> None:
        """Record a sampled token, stream it, and retire the request if it is done."""
        state.tokens.append(token)
        state.token_times.append(when)
        request = state.request
        if token in request.stop_ids:
            state.finish_reason = "stop"
        elif len(state.tokens) == request.max_new_tokens:
            state.finish_reason = "length"
        if state.finish_reason is not None:
            state.finished = when
            self._release(state)
            self.running.remove(state)
        if request.on_token is not None:
            request.on_token(state.request_id, token, state.finish_reason)

    # --- the cache, behind five small methods ------------------------------------------
    def _start(self, state: RequestState) -> None:
        """Open a sequence for the request's context, reusing a cached prefix."""
        state.seq_id, state.n_cached = self.cache.start_sequence(state.context)

    def _reserve(self, items):
        """Plan the step and reserve its blocks; None (nothing changed) if the pool is short."""
        try:
            return self.cache.plan([s.seq_id for s, _ in items], [n for _, n in items])
        except OutOfBlocksError:
            return None

    def _forward(self, items, plan) -> np.ndarray:
        """One packed forward over the step; [n_items, vocab] logits, last token each."""
        tokens = np.concatenate([s.context[s.n_cached:s.n_cached + n] for s, n in items])
        return self.llama.forward_plan(self.llama.check_token_ids(tokens), self.cache, plan)

    def _release(self, state: RequestState) -> None:
        """Free the request's sequence and its blocks."""
        self.cache.free(state.seq_id)
        state.seq_id = None

    def _free_blocks(self) -> int:
        """Blocks the pool can still hand out (free or evictable cached)."""
        return self.cache.pool.n_available

    # --- offline runs ----------------------------------------------------------------
    def run(self, requests: list[Request], progress: bool = False) -> RunResult:
        """Serve `requests` to the end on a clock driven by the measured step times.

        The clock starts at 0; a request joins once the clock passes its `arrival`, and
        when nothing runs the clock jumps to the next arrival. Each step advances it by
        the step's measured duration, so waiting and idle time cost nothing real.
        """
        if self.has_work:
            raise KVLibError("run() needs an idle engine; it still has requests")
        for r in requests:
            self.check(r)
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
        states: list[RequestState | None] = [None] * len(requests)
        hits, queries = self.cache.prefix_hit_tokens, self.cache.prefix_query_tokens
        steps, clock, next_arrival = [], 0.0, 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=f"{self.policy} batching", disable=not progress)
        while next_arrival < len(order) or self.has_work:
            while next_arrival < len(order) and \
                    requests[order[next_arrival]].arrival <= clock:
                states[order[next_arrival]] = self.add(requests[order[next_arrival]])
                next_arrival += 1
            if not self.has_work:
                clock = requests[order[next_arrival]].arrival
                continue
            n_done = len(self.running) + len(self.waiting)
            record = self.step(clock)
            steps.append(record)
            clock = record.end
            bar.update(n_done - len(self.running) - len(self.waiting))
        bar.close()
        queried = self.cache.prefix_query_tokens - queries
        return RunResult(states, steps, (self.cache.prefix_hit_tokens - hits) / max(queried, 1))
