"""The continuous-batching engine: concurrent greedy requests equal each request alone,
whatever the arrivals, budget, pool size and preemptions; the pool ends all free."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlib.cache import ContiguousCache, PagedCache
from kvlib.cache.paged import blocks_for
from kvlib.engine import Engine, Request
from kvlib.errors import CapacityError, ConfigError, KVLibError, LengthError

NEW = 5          # tokens per request: the model forward is the cost of these tests
BLOCK = 8
QUESTIONS = ["What is the capital of France?", "Name a prime number.",
             "Why is the sky blue?", "Write a haiku about memory."]


@pytest.fixture(scope="module")
def prompts(model):
    """Chat prompts: they share the template's system prompt (prefix-cache hits)."""
    return [tuple(model.encode(q, chat=True)) for q in QUESTIONS]


def greedy_alone(model, prompt_ids, n_new):
    """Greedy tokens of one prompt generated alone in a contiguous cache.

    Every chosen token must beat the runner-up by a clear margin, so that the float32
    rounding of a different batch (about 1e-4 on these logits) cannot flip it.
    """
    prompt_ids = list(prompt_ids)
    cache = ContiguousCache.from_config(model.config, 1, len(prompt_ids) + n_new)
    tokens = model.generate([prompt_ids], cache, max_new_tokens=n_new)[0].token_ids
    logits = model.forward([prompt_ids + tokens[:-1]], all_logits=True)[len(prompt_ids) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (np.argmax(logits, axis=-1) == tokens).all()
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-2, "a near tie: pick another prompt"
    return tokens


@pytest.fixture(scope="module")
def alone(model, prompts):
    return [greedy_alone(model, p, NEW) for p in prompts]


def make_engine(model, num_blocks, max_batch=4, token_budget=64, **kwargs):
    cache = PagedCache.from_config(model.config, num_blocks=num_blocks, block_size=BLOCK,
                                   max_seqs=max_batch, max_seq_len=256)
    return Engine(model, cache, max_batch=max_batch, token_budget=token_budget, **kwargs)


def requests(prompts, arrivals, new=NEW, **kwargs):
    return [Request(p, new, arrival=a, **kwargs) for p, a in zip(prompts, arrivals)]


def assert_pool_clean(engine):
    """No sequence, no reference: every block free or cached (a prefix kept for later)."""
    cache = engine.cache
    assert not engine.has_work and cache.sequences() == []
    assert cache.pool.n_used == 0 and (cache.pool.refcounts == 0).all()
    assert cache.pool.n_free + cache.pool.n_cached == cache.num_blocks


def min_blocks(engine, prompts, new=NEW):
    return max(engine.blocks_needed(r) for r in requests(prompts, [0] * len(prompts), new))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concurrent_greedy_equals_alone(model, prompts, alone, seed):
    rng = np.random.default_rng(seed)
    budget = int(rng.choice([3, 8, 40]))
    engine = make_engine(model, num_blocks=64, max_batch=int(rng.integers(2, 5)),
                         token_budget=budget)
    arrivals = np.sort(rng.exponential(0.05, len(prompts))).cumsum()
    result = engine.run(requests(prompts, arrivals))
    assert [r.tokens for r in result.requests] == alone
    assert all(r.finish_reason == "length" for r in result.requests)
    assert max(s.n_tokens for s in result.steps) <= budget
    assert_pool_clean(engine)


def test_a_pool_that_fits_prompts_but_not_growth_preempts_exactly(model, prompts, alone):
    # two prompts fill the pool exactly; the first outgrows its blocks while decoding
    num_blocks = sum(blocks_for(len(p), BLOCK) for p in prompts[:2])
    assert blocks_for(len(prompts[0]) + NEW - 1, BLOCK) > blocks_for(len(prompts[0]), BLOCK)
    engine = make_engine(model, num_blocks=num_blocks, token_budget=None)
    result = engine.run(requests(prompts, [0.0] * len(prompts)))
    assert [r.tokens for r in result.requests] == alone
    assert result.peak_blocks <= num_blocks
    mid_decode = [i for step in result.steps for i in step.preempted
                  if any(t <= step.start for t in result.requests[i].token_times)]
    assert mid_decode and result.recomputed_tokens > len(prompts[mid_decode[0]])
    assert result.preemptions == sum(len(s.preempted) for s in result.steps)
    assert_pool_clean(engine)


@settings(max_examples=6, deadline=None)
@given(gaps=st.lists(st.floats(0, 0.2), min_size=3, max_size=3),
       budget=st.sampled_from([4, 16, None]), max_batch=st.integers(1, 3),
       spare_blocks=st.integers(0, 6))
def test_any_arrival_pattern_gives_the_same_tokens(model, prompts, alone, gaps, budget,
                                                   max_batch, spare_blocks):
    probe = make_engine(model, num_blocks=1, max_batch=max_batch)
    engine = make_engine(model, num_blocks=min_blocks(probe, prompts[:3]) + spare_blocks,
                         max_batch=max_batch, token_budget=budget)
    result = engine.run(requests(prompts[:3], np.cumsum(gaps)))
    assert [r.tokens for r in result.requests] == alone[:3]
    assert_pool_clean(engine)


def test_static_batching_admits_only_into_an_empty_engine(model, prompts, alone):
    engine = make_engine(model, num_blocks=64, max_batch=2, token_budget=None,
                         policy="static")
    result = engine.run(requests(prompts, [0.0, 0.0, 0.01, 0.02]))
    assert [r.tokens for r in result.requests] == alone
    first, second = result.requests[:2], result.requests[2:]
    assert min(r.admitted for r in second) >= max(r.finished for r in first)
    assert_pool_clean(engine)


def test_prefix_cache_hits_and_metrics(model, prompts, alone):
    engine = make_engine(model, num_blocks=64)
    result = engine.run(requests(prompts, [0.0, 0.5, 1.0, 1.5]))
    assert [r.tokens for r in result.requests] == alone
    shared = next(i for i, (a, b) in enumerate(zip(*prompts[:2])) if a != b)
    later = sum(len(p) for p in prompts[1:])
    assert result.prefix_hit_rate >= 3 * (shared // BLOCK * BLOCK) / (later + len(prompts[0]))
    for r in result.requests:
        assert 0 <= r.queue_time <= r.ttft
        assert len(r.token_times) == NEW and (r.tbt >= 0).all()
    assert result.throughput == pytest.approx(result.generated_tokens / result.makespan)
    assert result.generated_tokens == NEW * len(prompts)


def test_stop_token_ends_a_request_and_streams_every_token(model, prompts, alone):
    engine = make_engine(model, num_blocks=64)
    seen = []
    stop = alone[0][2]
    request = Request(prompts[0], NEW, stop_ids=frozenset({stop}),
                      on_token=lambda i, tok, reason: seen.append((i, tok, reason)))
    result = engine.run([request])
    state = result.requests[0]
    assert state.tokens == alone[0][:3] and state.finish_reason == "stop"
    assert seen == [(state.request_id, t, None) for t in alone[0][:2]] + \
        [(state.request_id, stop, "stop")]
    assert_pool_clean(engine)


def test_seeded_sampling_is_the_same_batched_or_alone(model, prompts):
    def sample(group):
        engine = make_engine(model, num_blocks=64)
        reqs = requests(group, [0.0] * len(group), temperature=0.8, top_k=40, seed=7)
        return [r.tokens for r in engine.run(reqs).requests]

    together = sample(prompts[:2])
    assert together == [sample([p])[0] for p in prompts[:2]]


def test_cancel_frees_the_blocks_of_a_running_request(model, prompts):
    engine = make_engine(model, num_blocks=64)
    states = [engine.add(r) for r in requests(prompts[:2], [0.0, 0.0])]
    engine.step()
    used = engine.cache.pool.n_used
    assert used > 0 and len(engine.running) == 2
    assert engine.cancel(states[0].request_id)
    assert states[0].finish_reason == "cancelled" and engine.cache.pool.n_used < used
    assert not engine.cancel(states[0].request_id)  # already gone
    while engine.has_work:
        engine.step()
    assert len(states[1].tokens) == NEW
    assert_pool_clean(engine)


@pytest.mark.parametrize("request_kwargs, error, words", [
    ({"prompt_ids": ()}, LengthError, "at least one token"),
    ({"max_new_tokens": 0}, ConfigError, "max_new_tokens"),
    ({"max_new_tokens": 250}, LengthError, "past the context"),
    ({"temperature": -1.0}, ConfigError, "temperature"),
    ({"prompt_ids": (1, 2, 10**6)}, KVLibError, "token ids"),
])
def test_bad_requests_are_refused_before_anything_changes(model, prompts, request_kwargs,
                                                          error, words):
    engine = make_engine(model, num_blocks=64)
    fields = {"prompt_ids": prompts[0], "max_new_tokens": NEW} | request_kwargs
    with pytest.raises(error, match=words):
        engine.add(Request(**fields))
    assert not engine.has_work and engine.cache.sequences() == []


def test_a_request_larger_than_the_pool_is_refused_up_front(model, prompts):
    engine = make_engine(model, num_blocks=4)  # 32 slots; the prompt alone is longer
    with pytest.raises(CapacityError, match="could never finish"):
        engine.add(Request(prompts[0], NEW))
    assert not engine.has_work


def test_engine_configuration_is_checked(model):
    cache = PagedCache.from_config(model.config, num_blocks=8, max_seqs=2)
    with pytest.raises(ConfigError, match="max_seqs"):
        Engine(model, cache, max_batch=3)
    with pytest.raises(ConfigError, match="paged pool"):
        Engine(model, ContiguousCache.from_config(model.config, 2, 16))
    with pytest.raises(ConfigError, match="policy"):
        Engine(model, cache, max_batch=2, policy="fastest")
