"""The token-budget scheduler: budget, decodes first, every prompt prefilled exactly once."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlib.errors import ConfigError, KVLibError
from kvlib.scheduler import (Request, StepCostModel, TokenBudgetScheduler, simulate,
                             step_features)

requests_strategy = st.lists(
    st.tuples(st.integers(1, 300), st.integers(1, 20), st.floats(0, 2)), min_size=1,
    max_size=8)


def run_all(requests, budget):
    """Drive the scheduler by hand, checking every step; returns the steps."""
    scheduler = TokenBudgetScheduler(budget)
    pending = sorted(requests, key=lambda r: r.arrival)
    steps, done_prefill = [], {}
    while pending or not scheduler.idle:
        if pending:
            scheduler.add(pending.pop(0))
        step = scheduler.next_step()
        if step is None:
            continue
        steps.append(step)
        kinds = [item.is_decode for item in step.items]
        assert kinds == sorted(kinds, reverse=True), "decodes come first"
        if budget is not None:
            assert step.n_tokens <= budget
        ids = [item.request_id for item in step.items]
        assert len(ids) == len(set(ids)), "a request appears once per step"
        for item in step.prefills:
            assert item.start == done_prefill.get(item.request_id, 0), "chunks in order"
            done_prefill[item.request_id] = item.start + item.count
        scheduler.finish_step(step)
    return steps


@settings(max_examples=80, deadline=None)
@given(specs=requests_strategy, budget=st.one_of(st.none(), st.integers(1, 64)))
def test_invariants(specs, budget):
    requests = [Request(i, p, n, a) for i, (p, n, a) in enumerate(specs)]
    steps = run_all(requests, budget)
    for r in requests:
        prefill = [it for s in steps for it in s.prefills if it.request_id == r.request_id]
        decode = [it for s in steps for it in s.decodes if it.request_id == r.request_id]
        assert sum(it.count for it in prefill) == r.prompt_len, "prefilled exactly once"
        assert len(decode) == r.max_new_tokens - 1, "the prefill gives the first token"
        assert [it.start for it in decode] == list(range(r.prompt_len,
                                                         r.prompt_len + len(decode)))


@settings(max_examples=40, deadline=None)
@given(specs=requests_strategy, budget=st.one_of(st.none(), st.integers(1, 64)))
def test_simulation_emits_every_token_once_in_time_order(specs, budget):
    requests = [Request(i, p, n, a) for i, (p, n, a) in enumerate(specs)]
    result = simulate(requests, TokenBudgetScheduler(budget), StepCostModel(0.01, 1e-4, 0, 0))
    for r in requests:
        times = result.token_times[r.request_id]
        assert len(times) == r.max_new_tokens
        assert result.ttft(r.request_id) > 0 and (result.tbt(r.request_id) > 0).all()
    ends = [end for _, end, _ in result.steps]
    assert ends == sorted(ends)


def test_decodes_are_packed_before_a_waiting_prompt():
    s = TokenBudgetScheduler(8)
    s.add(Request(0, 3, 5))
    s.finish_step(s.next_step())  # prompt 0 prefilled: now decoding
    s.add(Request(1, 100, 2))
    step = s.next_step()
    assert [(i.request_id, i.start, i.count, i.is_decode) for i in step.items] == \
        [(0, 3, 1, True), (1, 0, 7, False)]


def test_without_a_budget_a_prompt_is_prefilled_whole():
    s = TokenBudgetScheduler(None)
    s.add(Request(0, 5000, 1))
    assert s.next_step().n_tokens == 5000


def test_chunking_lowers_the_worst_time_between_tokens():
    cost = StepCostModel(fixed=0.03, per_token=1e-3, per_pair=1e-7, per_sequence=1e-3)
    requests = [Request(i, 20, 50) for i in range(3)] + [Request(9, 3000, 2, arrival=0.2)]
    worst = {b: max(simulate(requests, TokenBudgetScheduler(b), cost).tbt(i).max()
                    for i in range(3)) for b in (None, 64, 512)}
    assert worst[64] < worst[512] < worst[None]


def test_cost_model_fit_recovers_known_coefficients(rng):
    truth = StepCostModel(0.02, 1e-3, 2e-7, 5e-4)
    starts = [rng.integers(0, 500, n) for n in rng.integers(1, 6, 40)]
    counts = [rng.integers(1, 200, len(s)) for s in starts]
    seconds = [truth.predict(s, c) for s, c in zip(starts, counts)]
    fitted = StepCostModel.fit(starts, counts, seconds)
    np.testing.assert_allclose([fitted.fixed, fitted.per_token, fitted.per_pair,
                                fitted.per_sequence],
                               [0.02, 1e-3, 2e-7, 5e-4], rtol=1e-6)
    assert list(step_features([3], [2])) == [1, 2, 10, 1]
    # a negative coefficient is dropped, never kept
    noisy = StepCostModel.fit(starts, counts, np.array(seconds) - 0.05)
    assert min(noisy.fixed, noisy.per_token, noisy.per_pair, noisy.per_sequence) >= 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="token_budget"):
        TokenBudgetScheduler(0)
    s = TokenBudgetScheduler(4)
    with pytest.raises(ConfigError, match="request 3"):
        s.add(Request(3, 0, 1))
    assert s.idle
    s.add(Request(3, 2, 1))
    with pytest.raises(KVLibError, match="already"):
        s.add(Request(3, 2, 1))
    with pytest.raises(ConfigError, match="timed steps"):
        StepCostModel.fit([[0]], [[1]], [0.1])


def test_causal_pairs_are_the_same_for_any_chunking():
    assert list(step_features([3], [2], causal=True)) == [1, 2, 3 * 2 + 3, 1]
    n = 100
    for chunk in (1, 7, 32, 100):
        bounds = list(range(0, n, chunk)) + [n]
        starts, counts = bounds[:-1], np.diff(bounds)
        causal = sum(step_features([s], [c], causal=True)[2] for s, c in zip(starts, counts))
        rectangle = sum(step_features([s], [c])[2] for s, c in zip(starts, counts))
        assert causal == n * (n + 1) / 2          # the causal triangle, however it is cut
        assert rectangle == n * n if chunk == n else rectangle < n * n


def test_fit_with_a_known_pair_cost_recovers_the_rest(rng):
    truth = StepCostModel(0.02, 1e-3, 2e-7, 5e-4)
    starts = [rng.integers(0, 500, n) for n in rng.integers(1, 6, 40)]
    counts = [rng.integers(1, 200, len(s)) for s in starts]
    seconds = [truth.predict(s, c) for s, c in zip(starts, counts)]
    for relative in (False, True):
        fitted = StepCostModel.fit(starts, counts, seconds, per_pair=2e-7,
                                   relative=relative)
        np.testing.assert_allclose([fitted.fixed, fitted.per_token, fitted.per_pair,
                                    fitted.per_sequence], [0.02, 1e-3, 2e-7, 5e-4],
                                   rtol=1e-6)


def test_a_causal_fit_counts_causal_pairs_and_stays_causal(rng):
    """Steps timed on a causal kernel: fitted with causal pair counts, all four costs
    come back; fitted as rectangles, the pair cost does not."""
    truth = StepCostModel(0.02, 1e-3, 2e-7, 5e-4, causal=True)
    starts = [rng.integers(0, 500, n) for n in rng.integers(1, 6, 40)]
    counts = [rng.integers(1, 200, len(s)) for s in starts]
    seconds = [truth.predict(s, c) for s, c in zip(starts, counts)]
    fitted = StepCostModel.fit(starts, counts, seconds, causal=True)
    assert fitted.causal
    np.testing.assert_allclose([fitted.fixed, fitted.per_token, fitted.per_pair,
                                fitted.per_sequence], [0.02, 1e-3, 2e-7, 5e-4], rtol=1e-6)
    rectangles = StepCostModel.fit(starts, counts, seconds)
    assert not rectangles.causal and abs(rectangles.per_pair / 2e-7 - 1) > 0.01


def test_a_relative_fit_weighs_short_steps_as_much_as_long_ones():
    # one long step with a 10% error: an absolute fit bends the per-call cost to it,
    # a relative one keeps the short steps right
    starts = [[0]] * 6
    counts = [[1], [2], [4], [8], [16], [1000]]
    truth = StepCostModel(0.01, 1e-3, 0.0, 0.0)
    seconds = [truth.predict(s, c) for s, c in zip(starts, counts)]
    seconds[-1] *= 1.1
    absolute = StepCostModel.fit(starts, counts, seconds, per_pair=0.0)
    relative = StepCostModel.fit(starts, counts, seconds, per_pair=0.0, relative=True)
    short = [truth.predict(s, c) for s, c in zip(starts[:5], counts[:5])]
    miss = {name: max(abs(m.predict(s, c) / t - 1)
                      for s, c, t in zip(starts[:5], counts[:5], short))
            for name, m in (("absolute", absolute), ("relative", relative))}
    assert miss["relative"] < miss["absolute"]
    with pytest.raises(ConfigError, match="per_pair"):
        StepCostModel.fit(starts, counts, seconds, per_pair=-1.0)


def test_with_causal_pairs_a_budget_never_brings_the_first_token_earlier():
    # chunks compute the same causal pairs and the same tokens as one shot, and every
    # extra step pays the fixed cost again: the first token can only come later
    cost = StepCostModel(fixed=0.03, per_token=1e-3, per_pair=3e-6, per_sequence=1e-3,
                         causal=True)
    # 4-token prompts: every budget (>= 16) runs the same steps until the arrival
    requests = [Request(i, 4, 80) for i in range(4)] + [Request(9, 2048, 5, arrival=0.5)]
    ttft = {b: simulate(requests, TokenBudgetScheduler(b), cost).ttft(9)
            for b in (None, 16, 256, 1024)}
    assert all(ttft[b] > ttft[None] for b in (16, 256, 1024))
