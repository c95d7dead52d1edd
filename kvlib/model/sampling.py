"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ..errors import ConfigError


class Sampler:
    """Picks one token id per row of logits.

    temperature == 0 means greedy (argmax). Otherwise logits are divided by the
    temperature, cut to the `top_k` most likely tokens and to the smallest set whose
    probability reaches `top_p`, and a token is drawn from a generator seeded by `seed`.
    """

    def __init__(self, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0) -> None:
        if not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """[batch, vocab] float logits -> [batch] int64 token ids."""
        if self.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / self.temperature
        order = np.argsort(-scaled, kind="stable")  # most likely first
        if self.top_k is not None:
            order = order[: self.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if self.top_p is not None:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])


class LogitRecorder(Sampler):
    """Greedy sampler that keeps the logits each prompt was decoded from.

    Pass it as `sampler=` and its `on_token` as `on_token=` to `generate`; afterwards
    `logits(i)` is prompt i's [n_generated, vocab] logits, one row per step.
    """

    def __init__(self) -> None:
        super().__init__(temperature=0.0)
        self._rows: list[np.ndarray] = []
        self._logits: dict[int, list[np.ndarray]] = defaultdict(list)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        self._rows = list(logits)  # generate reports tokens in the order of these rows
        return super().__call__(logits)

    def on_token(self, prompt_index: int, token: int) -> None:
        self._logits[prompt_index].append(self._rows.pop(0))

    def logits(self, prompt_index: int) -> np.ndarray:
        return np.stack(self._logits[prompt_index])
