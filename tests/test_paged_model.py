"""PagedCache on the real model: same greedy tokens as ContiguousCache, prefix reuse,
parallel sampling that shares the prompt's blocks."""

import pytest

from kvlib.cache import ContiguousCache, PagedCache
from kvlib.model import Sampler

N_NEW = 12


@pytest.fixture(scope="module")
def contiguous_run(model, prompt_ids):
    cache = ContiguousCache.from_config(model.config, max_batch=len(prompt_ids),
                                        max_seq=max(map(len, prompt_ids)) + N_NEW)
    return model.generate(prompt_ids, cache=cache, max_new_tokens=N_NEW)


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_paged_greedy_equals_contiguous_token_for_token(model, prompt_ids, contiguous_run,
                                                        block_size):
    """A ragged batch of three real prompts, decoded together."""
    longest = max(map(len, prompt_ids)) + N_NEW
    cache = PagedCache.from_config(model.config, num_blocks=3 * -(-longest // block_size),
                                   block_size=block_size, max_seqs=3)
    paged = model.generate(prompt_ids, cache=cache, max_new_tokens=N_NEW)
    assert [r.token_ids for r in paged] == [r.token_ids for r in contiguous_run]
    assert cache.pool.n_used == 0                  # every finished sequence gave its blocks back


def test_prefix_reuse_skips_the_shared_system_prompt_and_changes_no_token(model):
    questions = ["What is the capital of France?", "Name a prime number."]
    prompts = [model.encode(q, chat=True) for q in questions]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    cache = PagedCache.from_config(model.config, num_blocks=64, block_size=4, max_seqs=2)
    first = model.generate([prompts[0]], cache=cache, max_new_tokens=6)[0]
    second = model.generate([prompts[1]], cache=cache, max_new_tokens=6)[0]
    assert cache.prefix_hit_tokens == shared // 4 * 4 > 0
    for prompt, got in zip(prompts, (first, second)):
        fresh = ContiguousCache.from_config(model.config, 1, len(prompt) + 6)
        assert got.token_ids == model.generate([prompt], cache=fresh, max_new_tokens=6)[0].token_ids


def test_parallel_samples_share_the_prompt_blocks(model, prompt_ids):
    prompt = prompt_ids[0]
    peak = {}

    def run(cache, prompts, n, sampler):
        peak[id(cache)] = 0

        def track(i, token):
            peak[id(cache)] = max(peak[id(cache)], cache.pool.n_used)
        return model.generate(prompts, cache=cache, max_new_tokens=8, sampler=sampler,
                              on_token=track, n=n)

    shared = PagedCache.from_config(model.config, num_blocks=64, block_size=4, max_seqs=4)
    samples = run(shared, [prompt], 4, Sampler(temperature=1.0, seed=3))
    assert len(samples) == 4 and len({tuple(s.token_ids) for s in samples}) > 1
    separate = PagedCache.from_config(model.config, num_blocks=64, block_size=4, max_seqs=4)
    run(separate, [prompt] * 4, 1, Sampler(temperature=1.0, seed=3))
    prompt_blocks = len(prompt) // 4
    assert peak[id(separate)] - peak[id(shared)] >= 3 * prompt_blocks
    greedy = run(PagedCache.from_config(model.config, 64, 4, 4), [prompt], 3, Sampler())
    assert len({tuple(s.token_ids) for s in greedy}) == 1   # forks diverge only by sampling
