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
from . import Report, run_cases


def _reference_append(keys, lengths, rows, counts, new):
    """What `ContiguousCache` does for one layer: plan (checks), write, commit."""
    batch, n_kv_heads, max_seq, head_dim = keys.shape
    cache = ContiguousCache(1, n_kv_heads, head_dim, batch, max_seq)
    cache.keys[0], cache.lengths[:], cache.in_use[:] = keys, lengths, True
    plan = cache.plan(rows, counts)
    cache.write(0, plan, new, new)
    cache.commit(plan)
    return cache.keys[0], cache.lengths


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


PROMPTS = [("The key/value cache of a transformer stores", False), ("Name a color.", True)]


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
            got = greedy_decode(model, list(prompt), cache, n_new)
            got = [int(t) for t in got]
            want = generate(model.llama, [prompt], ContiguousCache.from_config(
                model.config, 1, len(prompt) + n_new), max_new_tokens=n_new)[0].token_ids
            if len(got) != n_new:
                return f"returned {len(got)} ids, expected {n_new}"
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                return f"new token {first} is {got[first]}, greedy decoding gives {want[first]}"
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
