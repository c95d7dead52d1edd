"""A token-budget scheduler (Sarathi-style) and a simulator of what it does to latency.

Every forward step of a serving engine runs a batch of *items*: one new token for each
running decode, and chunks of prompts still being prefilled. With a token budget B,
`TokenBudgetScheduler` builds each step by packing every running decode first (one
token each), then filling what is left of B with prefill chunks, oldest request first
(Agrawal et al., SARATHI and Sarathi-Serve). A long prompt is thus spread over several
steps and never stalls the decodes for the whole of its prefill. With no budget
(`token_budget=None`) every waiting prompt is prefilled whole in the next step, next to
the decodes.

`StepCostModel` predicts how long a step takes from its items (fitted by least squares
to steps timed on the real model), and `simulate` plays a workload through a scheduler
with that cost model, recording when every token comes out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import ConfigError, DuplicateSequenceError


@dataclass(frozen=True)
class Request:
    """A prompt of `prompt_len` tokens arriving at `arrival` seconds, wanting
    `max_new_tokens` (>= 1) generated tokens."""

    request_id: int
    prompt_len: int
    max_new_tokens: int
    arrival: float = 0.0


@dataclass(frozen=True)
class StepItem:
    """`count` new tokens of one request, at positions start .. start + count - 1."""

    request_id: int
    start: int
    count: int
    is_decode: bool


@dataclass(frozen=True)
class Step:
    """The items of one forward step: decodes first, then prefill chunks."""

    items: tuple[StepItem, ...]

    @property
    def n_tokens(self) -> int:
        return sum(item.count for item in self.items)

    @property
    def decodes(self) -> list[StepItem]:
        return [item for item in self.items if item.is_decode]

    @property
    def prefills(self) -> list[StepItem]:
        return [item for item in self.items if not item.is_decode]


@dataclass
class _Progress:
    request: Request
    prefilled: int = 0
    generated: int = 0


class TokenBudgetScheduler:
    """Builds forward steps under a token budget (None: whole prompts, no chunking).

    Use: `add` requests as they arrive; `next_step()` returns the next `Step` (None if
    nothing can run); after running it, `finish_step(step)` advances every request and
    returns the ids of the requests that produced a token in it.
    """

    def __init__(self, token_budget: int | None) -> None:
        if token_budget is not None and token_budget < 1:
            raise ConfigError(f"token_budget must be >= 1 (or None), got {token_budget}")
        self.token_budget = token_budget
        self._waiting: list[_Progress] = []   # prompt not fully prefilled, oldest first
        self._running: list[_Progress] = []   # decoding, oldest first
        self._known: set[int] = set()

    def add(self, request: Request) -> None:
        if request.request_id in self._known:
            raise DuplicateSequenceError(f"request {request.request_id} was already added")
        if request.prompt_len < 1 or request.max_new_tokens < 1:
            raise ConfigError(f"request {request.request_id} needs a prompt and at least "
                              f"one new token, got {request.prompt_len} and "
                              f"{request.max_new_tokens}")
        self._known.add(request.request_id)
        self._waiting.append(_Progress(request))

    @property
    def idle(self) -> bool:
        """True when no request is waiting or running."""
        return not self._waiting and not self._running

    def next_step(self) -> Step | None:
        budget = self.token_budget if self.token_budget is not None else np.inf
        items = []
        for p in self._running:                     # 1. every running decode, one token
            if len(items) == budget:
                break
            r = p.request
            items.append(StepItem(r.request_id, r.prompt_len + p.generated - 1, 1, True))
        left = budget - len(items)
        for p in self._waiting:                     # 2. prefill chunks, oldest first
            if left == 0:
                break
            count = int(min(left, p.request.prompt_len - p.prefilled))
            items.append(StepItem(p.request.request_id, p.prefilled, count, False))
            left -= count
        return Step(tuple(items)) if items else None

    def finish_step(self, step: Step) -> list[int]:
        by_id = {p.request.request_id: p for p in self._waiting + self._running}
        emitted = []
        for item in step.items:
            p = by_id[item.request_id]
            if item.is_decode:
                p.generated += 1
                emitted.append(item.request_id)
                continue
            p.prefilled += item.count
            if p.prefilled == p.request.prompt_len:  # the last chunk gives token 1
                p.generated = 1
                emitted.append(item.request_id)
                self._waiting.remove(p)
                self._running.append(p)
        self._running = [p for p in self._running if p.generated < p.request.max_new_tokens]
        return emitted


def step_features(starts, counts, causal: bool = False) -> np.ndarray:
    """[1, tokens, attention pairs, sequences] of a step whose item i feeds counts[i]
    tokens after starts[i] cached ones.

    Pairs are the query-key scores the step computes. The NumPy reference scores each
    item's whole rectangle and masks afterwards: sum counts[i] * (starts[i] + counts[i]).
    A causal kernel skips the masked half of the new tokens' square (up to its tile
    size): sum counts[i] * starts[i] + counts[i] * (counts[i] + 1) / 2 (`causal=True`).
    """
    starts, counts = np.asarray(starts, np.float64), np.asarray(counts, np.float64)
    if causal:
        pairs = (counts * starts + counts * (counts + 1) / 2).sum()
    else:
        pairs = (counts * (starts + counts)).sum()
    return np.array([1.0, counts.sum(), pairs, len(counts)])


@dataclass(frozen=True)
class StepCostModel:
    """seconds(step) = fixed + per_token * tokens + per_pair * pairs + per_sequence * sequences.

    `causal` says how pairs are counted (see `step_features`): False for the NumPy
    reference's rectangles, True for a kernel that skips masked scores.
    """

    fixed: float
    per_token: float
    per_pair: float
    per_sequence: float
    causal: bool = False

    @classmethod
    def fit(cls, starts_per_step, counts_per_step, seconds, per_pair: float | None = None,
            relative: bool = False, causal: bool = False) -> "StepCostModel":
        """Least squares over timed steps, keeping every coefficient >= 0 (a coefficient
        that comes out negative is dropped and the rest refitted). Pairs are counted as
        `causal` says: rectangles for the NumPy reference, the causal count for a
        kernel that skips masked scores.

        `per_pair`, if given, is taken as known (measured on attention alone) and only
        the other coefficients are fitted: in steps of a short prompt, pairs and tokens
        grow together and least squares cannot tell their costs apart. With `relative`,
        each step's error counts relative to its time, so that short steps (whose
        per-call costs matter) weigh as much as long ones.
        """
        x = np.array([step_features(s, c, causal)
                      for s, c in zip(starts_per_step, counts_per_step)])
        y = np.asarray(seconds, dtype=np.float64)
        active = [0, 1, 2, 3]
        if per_pair is not None:
            if per_pair < 0:
                raise ConfigError(f"per_pair must be >= 0, got {per_pair}")
            y = y - per_pair * x[:, 2]
            active = [0, 1, 3]
        if len(y) < len(active):
            raise ConfigError(f"need at least {len(active)} timed steps, got {len(y)}")
        weight = 1 / np.asarray(seconds, dtype=np.float64) if relative else np.ones(len(y))
        while True:
            coef, *_ = np.linalg.lstsq(x[:, active] * weight[:, None], y * weight,
                                       rcond=None)
            if (coef >= 0).all():
                break
            active.pop(int(np.argmin(coef)))
        full = np.zeros(x.shape[1])
        full[active] = coef
        if per_pair is not None:
            full[2] = per_pair
        return cls(*map(float, full), causal=causal)

    def predict(self, starts, counts) -> float:
        coef = np.array([self.fixed, self.per_token, self.per_pair, self.per_sequence])
        return float(step_features(starts, counts, self.causal) @ coef)

    def __call__(self, step: Step) -> float:
        return self.predict([i.start for i in step.items], [i.count for i in step.items])


@dataclass
class SimulationResult:
    """When each request's tokens came out (seconds), and the steps that ran."""

    requests: list[Request]
    token_times: dict[int, list[float]] = field(default_factory=dict)
    steps: list[tuple[float, float, Step]] = field(default_factory=list)  # (start, end, step)

    def ttft(self, request_id: int) -> float:
        """Time to first token: arrival to the end of the step that finished the prompt."""
        arrival = next(r.arrival for r in self.requests if r.request_id == request_id)
        return self.token_times[request_id][0] - arrival

    def tbt(self, request_id: int) -> np.ndarray:
        """Times between successive tokens of one request."""
        return np.diff(self.token_times[request_id])


def simulate(requests: list[Request], scheduler: TokenBudgetScheduler,
             step_cost: Callable[[Step], float]) -> SimulationResult:
    """Run `requests` through `scheduler`, each step lasting `step_cost(step)` seconds.

    A request joins the scheduler once the clock reaches its arrival; when nothing can
    run the clock jumps to the next arrival. Every token is stamped with the end time
    of the step that produced it.
    """
    pending = sorted(requests, key=lambda r: r.arrival)
    result = SimulationResult(list(requests), {r.request_id: [] for r in requests})
    clock = 0.0
    while pending or not scheduler.idle:
        while pending and pending[0].arrival <= clock:
            scheduler.add(pending.pop(0))
        step = scheduler.next_step()
        if step is None:
            clock = pending[0].arrival
            continue
        end = clock + step_cost(step)
        for request_id in scheduler.finish_step(step):
            result.token_times[request_id].append(end)
        result.steps.append((clock, end, step))
        clock = end
    return result
