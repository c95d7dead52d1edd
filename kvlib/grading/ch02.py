"""Graders for chapter 2's exercises (`exercises/ex02_contiguous_cache.ipynb`).

`grade_append_packed` checks the append of a packed batch of new tokens into the
contiguous layout against `ContiguousCache.write` / `commit`; `grade_greedy_decode`
checks a hand-written decode loop over a cache against `kvlib.model.generate.generate`
on the real model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..cache import ContiguousCache
from ..errors import CapacityError
from ..model.generate import generate
from . import Report, grade_prediction, refuses_kvlib, run_cases


def _reference_append(keys, lengths, rows, counts, new):
    """What `ContiguousCache` does for one layer: plan (checks), write, commit."""
    batch, n_kv_heads, max_seq, head_dim = keys.shape
    cache = ContiguousCache(1, n_kv_heads, head_dim, batch, max_seq)
    cache.keys[0], cache.lengths[:], cache.in_use[:] = keys, lengths, True
    plan = cache.plan(rows, counts)
    cache.write(0, plan, new, new)
    cache.commit(plan)
    return cache.keys[0], cache.lengths


@refuses_kvlib()
def grade_append_packed(append_packed: Callable) -> Report:
    """Grade `append_packed(keys, lengths, rows, counts, new)`.

    keys: [batch, kv_heads, max_seq, head_dim] float32, changed in place;
    lengths: [batch] int64 tokens stored per row, advanced in place;
    rows, counts: the rows receiving tokens and how many each, in packing order;
    new: [sum(counts), kv_heads, head_dim], row i's tokens are a contiguous run.
    A write past max_seq must raise `CapacityError` and change nothing.
    """
    rng = np.random.default_rng(202)

    def state(batch, n_kv_heads, max_seq, head_dim, lengths):
        keys = rng.standard_normal((batch, n_kv_heads, max_seq, head_dim)).astype(np.float32)
        return keys, np.array(lengths, dtype=np.int64)

    def case(shape, lengths, rows, counts):
        keys, lens = state(*shape, lengths)
        new = rng.standard_normal((sum(counts), shape[1], shape[3])).astype(np.float32)

        def check():
            got_keys, got_lengths = keys.copy(), lens.copy()
            append_packed(got_keys, got_lengths, list(rows), list(counts), new.copy())
            want_keys, want_lengths = _reference_append(keys.copy(), lens.copy(), rows, counts, new)
            if not np.array_equal(got_lengths, want_lengths):
                return f"lengths became {got_lengths.tolist()}, expected {want_lengths.tolist()}"
            if not np.array_equal(got_keys, want_keys):
                wrong = np.argwhere(got_keys != want_keys)[0]
                return (f"keys differ first at [row, head, position, dim] = {wrong.tolist()}: "
                        "each row's tokens go to positions lengths[row] ... and nothing else may change")
            return None
        return check

    def overflow(shape, lengths, rows, counts):
        keys, lens = state(*shape, lengths)
        new = rng.standard_normal((sum(counts), shape[1], shape[3])).astype(np.float32)

        def check():
            got_keys, got_lengths = keys.copy(), lens.copy()
            try:
                append_packed(got_keys, got_lengths, list(rows), list(counts), new)
            except CapacityError:
                if not (np.array_equal(got_keys, keys) and np.array_equal(got_lengths, lens)):
                    return "raised CapacityError, but only after changing keys or lengths"
                return None
            return "a write past max_seq must raise kvlib.errors.CapacityError"
        return check

    cases = [
        ("one token into an empty row", case((1, 3, 8, 4), [0], [0], [1])),
        ("a 5-token prefill into row 1, which already holds 2",
         case((3, 3, 16, 8), [4, 2, 0], [1], [5])),
        ("two rows in one step, packed in the order [2, 0]",
         case((3, 2, 12, 4), [3, 0, 7], [2, 0], [1, 3])),
        ("a write that fills a row exactly to max_seq", case((2, 3, 6, 4), [1, 4], [1, 0], [2, 5])),
        ("SmolLM2 shapes: one decode token for each of 4 rows",
         case((4, 3, 32, 64), [5, 9, 1, 30], [0, 1, 2, 3], [1, 1, 1, 1])),
        ("overflow past max_seq in the second row of a step",
         overflow((2, 2, 8, 4), [2, 7], [0, 1], [1, 2])),
    ]
    return run_cases("append_packed", cases)


class _RecordingModel:
    """The model, with every `forward` call recorded as (tokens per sequence, cache)."""

    def __init__(self, model):
        self._model, self.calls = model, []

    def forward(self, tokens, cache=None, seq_ids=None, all_logits=False):
        self.calls.append(([len(t) for t in tokens], cache))
        return self._model.forward(tokens, cache, seq_ids, all_logits)

    @property
    def llama(self):
        return self                                           # model.llama.forward is recorded too

    def __getattr__(self, name):
        return getattr(self._model, name)


def _check_calls(calls, cache, n_prompt: int, n_new: int) -> str | None:
    """None if the forward calls were one prefill of the prompt, then one token per step,
    all through `cache`; else what the loop did instead."""
    for step, (counts, used_cache) in enumerate(calls):
        if used_cache is not cache:
            return (f"forward call {step} ran without the cache: each step then recomputes "
                    "the whole sequence; pass the cache to every call")
    if [counts for counts, _ in calls[:1]] != [[n_prompt]]:
        fed = calls[0][0] if calls else "nothing"
        return (f"the first forward call (the prefill) must feed the {n_prompt} prompt "
                f"tokens, fed {fed}")
    for step, (counts, _) in enumerate(calls[1:], start=1):
        if counts != [1]:
            return (f"decode step {step} fed {counts} tokens: with the cache only the "
                    "newest token is fed")
    if len(calls) != n_new:
        return (f"made {len(calls)} forward calls for {n_new} new tokens, expected one "
                f"prefill and {n_new - 1} decode steps")
    return None


PROMPTS = [("The key/value cache of a transformer stores", False), ("Name a color.", True)]


@refuses_kvlib()
def grade_greedy_decode(greedy_decode: Callable, model) -> Report:
    """Grade `greedy_decode(model, prompt_ids, cache, max_new_tokens)` on the real model.

    It must start a new sequence in `cache`, prefill the prompt, then decode one token
    per step greedily, ignoring stop tokens, and return the `max_new_tokens` new ids.
    The last id is returned but never fed back, so the sequence ends up holding
    len(prompt) + max_new_tokens - 1 tokens. Other sequences in the cache are left alone.
    """
    def case(text, chat, n_new, other_sequence):
        prompt = model.encode(text, chat=chat)

        def check():
            cache = ContiguousCache.from_config(model.config, max_batch=2,
                                                max_seq=len(prompt) + n_new + 4)
            other = None
            if other_sequence:
                other = cache.new_sequence()
                model.forward([prompt[:3]], cache, [other])
                other_keys = cache.keys[:, other].copy()
            recording = _RecordingModel(model)
            got = greedy_decode(recording, list(prompt), cache, n_new)
            got = [int(t) for t in got]
            want = generate(model.llama, [prompt], ContiguousCache.from_config(
                model.config, 1, len(prompt) + n_new), max_new_tokens=n_new)[0].token_ids
            if len(got) != n_new:
                return f"returned {len(got)} ids, expected {n_new}"
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                return f"new token {first} is {got[first]}, greedy decoding gives {want[first]}"
            if problem := _check_calls(recording.calls, cache, len(prompt), n_new):
                return problem
            mine = [s for s in cache.sequences() if s != other]
            if len(mine) != 1:
                return f"expected one new sequence in the cache, found {len(mine)}"
            if cache.length(mine[0]) != len(prompt) + n_new - 1:
                return (f"the sequence holds {cache.length(mine[0])} tokens, expected "
                        f"{len(prompt) + n_new - 1} (the prompt and every new token but the last)")
            if other is not None and (cache.length(other) != 3
                                      or not np.array_equal(cache.keys[:, other], other_keys)):
                return "changed another sequence in the cache (use the id new_sequence() returns)"
            return None
        return check

    cases = [
        ("plain prompt, 6 new tokens", case(*PROMPTS[0], 6, False)),
        ("chat prompt, 5 new tokens", case(*PROMPTS[1], 5, False)),
        ("one new token: the prefill alone", case(*PROMPTS[0], 1, False)),
        ("another sequence already lives in the cache", case(*PROMPTS[0], 4, True)),
    ]
    return run_cases("greedy_decode", cases)


def _tokens_fed(prompt_len: int, max_new_tokens: int, use_cache: bool) -> int:
    """Tokens a greedy loop feeds the model, counted step by step."""
    sequence, fed = prompt_len, 0
    for step in range(max_new_tokens):
        fed += sequence if (not use_cache or step == 0) else 1
        sequence += 1
    return fed


def grade_tokens_fed(with_cache, without_cache) -> Report:
    """Grade the predicted number of tokens fed to the model for a 100-token prompt and
    50 new tokens, with the cache and without it (recomputing the whole sequence)."""
    truth = (_tokens_fed(100, 50, True), _tokens_fed(100, 50, False))
    answer = ... if ... in (with_cache, without_cache) else (with_cache, without_cache)
    return grade_prediction("tokens_fed", answer, truth, [
        ((150, truth[1]), "the last new token is never fed back: 100 + 49"),
        ((truth[0], 50 * 100), "without the cache each step feeds the whole sequence so far, "
                               "which grows by one token per step"),
        ((truth[0], 50 * 150), "step i feeds 100 + i tokens, i = 0 ... 49: the longest "
                               "step feeds 149 tokens, not 150"),
    ])
