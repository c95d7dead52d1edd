"""Measuring a lossy cache on the real model: teacher-forced perplexity, top-1 agreement
with a float32 run, greedy agreement length, and the real keys/values/queries of a text.

Teacher forcing feeds a fixed text through the cache in *chunks* (a first chunk, then
`chunk` tokens per step), exactly as decoding would append them, so the keys and values
of earlier tokens are read back from the cache — quantized, if the cache quantizes —
when later tokens are predicted. Within one chunk every query sees the cache as it
stands after the whole chunk is written (at most ``chunk - 1`` tokens more of it
quantized than token-by-token decoding would have), which keeps the evaluation fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache.contiguous import ContiguousCache
from .errors import ConfigError

EVAL_TEXT_PATH = Path(__file__).resolve().parent / "data" / "eval_text.txt"


def eval_text() -> str:
    """The fixed English text shipped with the book for perplexity measurements."""
    return EVAL_TEXT_PATH.read_text(encoding="utf-8")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed stably in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class TeacherForced:
    """One teacher-forced pass over a text of n tokens.

    Attributes:
        nll: [n - 1] negative log-likelihood (nats) of token t + 1 given tokens 0..t.
        predictions: [n - 1] the model's top-1 token after tokens 0..t.
    """

    nll: np.ndarray
    predictions: np.ndarray

    @property
    def perplexity(self) -> float:
        """exp(mean nll)."""
        return float(np.exp(self.nll.mean()))


def teacher_forced(model, ids, cache=None, first_chunk: int = 128,
                   chunk: int = 64) -> TeacherForced:
    """Feed `ids` through `cache` (a float32 `ContiguousCache` if None) and score every token.

    Args:
        model: a `Model` (or `Llama`) with `forward` and `config`.
        ids: token ids of the text, at least 2.
        cache: a cache with room for len(ids) tokens of one sequence; it is reset first.
        first_chunk: tokens of the first forward (the prefill).
        chunk: tokens per later forward.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise ConfigError("teacher forcing needs a text of at least 2 tokens")
    if first_chunk < 1 or chunk < 1:
        raise ConfigError(f"chunk sizes must be positive, got {first_chunk}, {chunk}")
    if cache is None:
        cache = ContiguousCache.from_config(model.config, max_batch=1, max_seq=len(ids))
    cache.reset()
    seq = cache.new_sequence()
    bounds = [0] + list(range(min(first_chunk, len(ids)), len(ids), chunk)) + [len(ids)]
    nll, predictions = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        logits = model.forward([ids[start:end]], cache, [seq], all_logits=True)
        logp = log_softmax(logits)
        targets = ids[start + 1:end + 1]             # the next token of each position
        nll.append(-logp[np.arange(len(targets)), targets])
        predictions.append(logits[:len(targets)].argmax(axis=-1))
    return TeacherForced(np.concatenate(nll), np.concatenate(predictions))


def top1_agreement(a: TeacherForced, b: TeacherForced) -> float:
    """Fraction of positions where two passes over the same text predict the same token."""
    if a.predictions.shape != b.predictions.shape:
        raise ConfigError("the two passes cover texts of different lengths")
    return float(np.mean(a.predictions == b.predictions))


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """Margin of the greedy choice: largest minus second-largest logit, over the last axis.

    A token-exact proof (two runs pick the same tokens) is only as safe as this margin is
    large against the logit differences between the runs: a gap of 0.01 can flip under
    float32 rounding, a gap of 1 cannot.
    """
    top = np.partition(np.asarray(logits, dtype=np.float32), -2, axis=-1)
    return top[..., -1] - top[..., -2]


@dataclass
class GreedyRun:
    """Greedy decoding of a batch of prompts, one token per step.

    Attributes:
        tokens: [batch, n_new] the argmax token of every step.
        gaps: [batch, n_new] the top-two logit gap (`top2_gap`) of every step.
        logits: [batch, n_new, vocab] float32 logits of every step.
    """

    tokens: np.ndarray
    gaps: np.ndarray
    logits: np.ndarray


def greedy_run(model, prompts, cache, n_new: int, forced=None) -> GreedyRun:
    """Decode `n_new` tokens after each prompt, all prompts together, one token per step.

    Without `forced`, each step feeds back its own argmax (greedy decoding; end-of-text
    tokens do not stop it). With `forced` ([batch, n_new] token ids, e.g. another cache's
    greedy run) each step feeds the forced token instead and still records the argmax:
    up to the first step where the argmax differs from the forced token, both runs have
    seen the same tokens, so that step is where greedy decoding would part ways.

    Args:
        model: a `Model` (or `Llama`) with `forward`.
        prompts: list of token-id lists.
        cache: a cache with room for every prompt + n_new tokens; it is reset first.
    """
    if n_new < 1:
        raise ConfigError(f"n_new must be at least 1, got {n_new}")
    cache.reset()
    seqs = [cache.new_sequence() for _ in prompts]
    logits = model.forward([np.asarray(p) for p in prompts], cache, seqs)
    steps = []
    for step in range(n_new):
        steps.append(logits)
        if step + 1 < n_new:
            feed = logits.argmax(axis=-1) if forced is None else np.asarray(forced)[:, step]
            logits = model.forward([np.array([t]) for t in feed], cache, seqs)
    logits = np.stack(steps, axis=1)
    return GreedyRun(logits.argmax(axis=-1), top2_gap(logits), logits)


def token_exact_margin(run: GreedyRun, other: GreedyRun) -> tuple[float, float]:
    """(largest |logit difference|, smallest top-two gap of `run`) over two runs.

    `other` must have been decoded along `run`'s tokens (`forced=run.tokens`). When the
    largest difference is below half the smallest gap, no rounding between the two runs
    could have changed a greedy choice: the token-exact result is safe, not lucky.
    """
    if run.logits.shape != other.logits.shape:
        raise ConfigError("the two runs decoded different numbers of prompts or steps")
    return float(np.abs(run.logits - other.logits).max()), float(run.gaps.min())


def agreement_lengths(run: GreedyRun, reference: GreedyRun) -> np.ndarray:
    """[batch] steps before `run` first picks a token other than `reference`'s.

    `run` must have been decoded with `forced=reference.tokens`. A row that never
    differs counts all n_new steps.
    """
    if run.tokens.shape != reference.tokens.shape:
        raise ConfigError("the two runs decoded different numbers of prompts or steps")
    differs = run.tokens != reference.tokens
    return np.where(differs.any(axis=1), differs.argmax(axis=1), differs.shape[1])


class _QueryRecorder(ContiguousCache):
    """A float32 contiguous cache that also keeps the queries of its last step per layer."""

    def attend(self, layer, plan, q):
        self.queries[layer] = q.copy()
        return super().attend(layer, plan, q)


@dataclass
class CapturedKV:
    """The real attention inputs of a text, every layer (n tokens, after one prefill).

    Attributes:
        queries: [n_layers, n, n_heads, head_dim] queries after RoPE.
        keys: [n_layers, n_kv_heads, n, head_dim] keys after RoPE (what caches store).
        keys_before_rope: the same keys with the rotation undone.
        values: [n_layers, n_kv_heads, n, head_dim].
    """

    queries: np.ndarray
    keys: np.ndarray
    keys_before_rope: np.ndarray
    values: np.ndarray


def capture_kv(model, ids) -> CapturedKV:
    """Run one prefill over `ids` and return the queries, keys and values of every layer."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    cache = _QueryRecorder.from_config(model.config, max_batch=1, max_seq=n)
    cache.queries = [None] * model.config.n_layers
    seq = cache.new_sequence()
    model.forward([ids], cache, [seq])
    keys = cache.keys[:, seq, :, :n].copy()
    rope = model.llama.rope if hasattr(model, "llama") else model.rope
    # undo RoPE: rotate each adjacent pair back by its angle (sin -> -sin)
    cos, sin = rope.cos[:n][None, None], rope.sin[:n][None, None]
    even, odd = keys[..., 0::2], keys[..., 1::2]
    before = np.empty_like(keys)
    before[..., 0::2] = even * cos + odd * sin
    before[..., 1::2] = -even * sin + odd * cos
    return CapturedKV(np.stack(cache.queries), keys, before, cache.values[:, seq, :, :n].copy())
