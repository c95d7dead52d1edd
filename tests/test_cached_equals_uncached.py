"""The central equivalence: decoding with the contiguous cache = recomputing everything."""

import numpy as np

from kvlib.cache import ContiguousCache

N_NEW = 64
N_NEW_UNCACHED = 12    # recomputing everything costs a whole prefill per token


def test_cached_greedy_ids_equal_uncached(model, prompt_ids):
    """The end-to-end check through `generate`; the logit-level test below goes further."""
    prompt = prompt_ids[0]
    cache = ContiguousCache.from_config(model.config, max_batch=1,
                                        max_seq=len(prompt) + N_NEW_UNCACHED)
    cached = model.generate([prompt], cache=cache, max_new_tokens=N_NEW_UNCACHED)[0]
    uncached = model.generate([prompt], cache=None, max_new_tokens=N_NEW_UNCACHED)[0]
    assert cached.token_ids == uncached.token_ids
    assert len(cached.token_ids) > 1


def test_cached_logits_equal_uncached_logits_at_every_step(model, prompt_ids):
    """Teacher-forced over 64 steps: every cached step's logits = the full recompute's."""
    for prompt in prompt_ids:
        cache = ContiguousCache.from_config(model.config, 1, len(prompt) + N_NEW)
        seq = cache.new_sequence()
        logits = [model.forward([prompt], cache, [seq])[0]]
        tokens = list(prompt)
        for _ in range(N_NEW - 1):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(model.forward([tokens[-1:]], cache, [seq])[0])
        tokens.append(int(np.argmax(logits[-1])))
        full = model.forward([tokens[:-1]], all_logits=True)[len(prompt) - 1:]
        np.testing.assert_allclose(np.stack(logits), full, atol=1e-4, rtol=0)


def test_cache_is_reset_between_generations(model, prompt_ids):
    """A cache that still holds another sequence must not leak it into a generation."""
    fresh = ContiguousCache.from_config(model.config, 1, 256)
    first = model.generate([prompt_ids[0]], cache=fresh, max_new_tokens=16)[0]
    used = ContiguousCache.from_config(model.config, 1, 256)
    stale = used.new_sequence()                       # left behind, never freed
    model.forward([prompt_ids[1]], used, [stale])
    assert used.sequences() == [stale] and used.length(stale) == len(prompt_ids[1])
    again = model.generate([prompt_ids[0]], cache=used, max_new_tokens=16)[0]
    assert again.token_ids == first.token_ids


def test_crop_rolls_back_to_an_earlier_state(model, prompt_ids):
    """Crop then re-decode gives the same logits as never having gone further."""
    prompt = prompt_ids[1]
    cache = ContiguousCache.from_config(model.config, 1, 128)
    seq = cache.new_sequence()
    model.forward([prompt], cache, [seq])
    before = model.forward([[42]], cache, [seq])[0]
    model.forward([[7, 8, 9]], cache, [seq])
    cache.crop(seq, len(prompt))
    assert cache.length(seq) == len(prompt)
    after = model.forward([[42]], cache, [seq])[0]
    np.testing.assert_array_equal(before, after)
