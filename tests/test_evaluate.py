"""Measuring caches on the real model: teacher forcing, agreement, captured K/V."""

import numpy as np
import pytest

from kvlib.cache import ContiguousCache, QuantizedCache, QuantScheme
from kvlib.errors import ConfigError
from kvlib.evaluate import (EVAL_TEXT_PATH, GreedyRun, TeacherForced, agreement_lengths,
                            capture_kv, eval_text, greedy_run, log_softmax, teacher_forced,
                            token_exact_margin, top1_agreement, top2_gap)

TEXT = ("Engineers respond with the same tools that have served computing for decades: they "
        "arrange the record so that it can be read in long, orderly runs, and they store "
        "each number with fewer bits.")


@pytest.fixture(scope="module")
def ids(model):
    return np.array(model.encode(TEXT))


@pytest.fixture(scope="module")
def reference(model, ids):
    return teacher_forced(model, ids, first_chunk=8, chunk=8)


def test_the_shipped_text_is_long_enough(model):
    assert EVAL_TEXT_PATH.is_file()
    assert len(model.encode(eval_text())) >= 800


def test_chunked_teacher_forcing_equals_one_uncached_pass(model, ids, reference):
    logp = log_softmax(model.forward([ids], all_logits=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    assert reference.nll.shape == (len(ids) - 1,)
    assert np.allclose(reference.nll, nll, atol=1e-3)
    assert np.array_equal(reference.predictions, logp[:-1].argmax(-1))
    assert reference.perplexity == pytest.approx(np.exp(nll.mean()), rel=1e-4)


def test_int8_is_close_and_full_window_is_exact(model, ids, reference):
    n = len(ids)
    int8 = teacher_forced(model, ids, QuantizedCache.from_config(
        model.config, 1, n, QuantScheme(8, "token", None, 0, symmetric=True)), 8, 8)
    assert abs(int8.perplexity / reference.perplexity - 1) < 0.01
    assert top1_agreement(int8, reference) > 0.9
    wide = teacher_forced(model, ids, QuantizedCache.from_config(
        model.config, 1, n, QuantScheme(2, "channel", 32, window=n)), 8, 8)
    assert np.array_equal(wide.nll, reference.nll)


def test_int2_per_token_keys_hurt_more_than_per_channel(model, ids, reference):
    n = len(ids)
    per = {axis: teacher_forced(model, ids, QuantizedCache.from_config(
        model.config, 1, n, QuantScheme(2, axis, 32, 0)), 8, 8).perplexity
        for axis in ("token", "channel")}
    assert reference.perplexity < per["channel"] < per["token"]


def test_greedy_run_matches_generate_and_forcing_finds_first_difference(model, ids):
    prompts = [ids[:20], ids[30:41]]
    n_new = 6
    cache = ContiguousCache.from_config(model.config, 2, 40)
    generated = [r.token_ids for r in model.generate(prompts, cache=cache,
                                                     max_new_tokens=n_new)]
    run = greedy_run(model, prompts, cache, n_new)
    assert [list(t[:len(g)]) for t, g in zip(run.tokens, generated)] == generated
    assert (run.gaps >= 0).all() and run.gaps.shape == (2, n_new)
    # forcing a run along its own tokens repeats it bit for bit: full agreement
    same = greedy_run(model, prompts, cache, n_new, forced=run.tokens)
    assert agreement_lengths(same, run).tolist() == [n_new, n_new]
    assert token_exact_margin(run, same)[0] == 0
    assert token_exact_margin(run, same)[1] == run.gaps.min() >= 0
    # a reference that differs at step 3 of row 0 and step 0 of row 1
    other = run.tokens.copy()
    other[0, 3] = (other[0, 3] + 1) % model.config.vocab_size
    other[1, 0] = (other[1, 0] + 1) % model.config.vocab_size
    reference = GreedyRun(other, run.gaps, run.logits)
    forced = greedy_run(model, prompts, cache, n_new, forced=other)
    assert agreement_lengths(forced, reference).tolist() == [3, 0]


def test_top2_gap():
    logits = np.array([[1.0, 3.0, 2.5], [0.0, -1.0, 0.0]], dtype=np.float32)
    assert top2_gap(logits).tolist() == [0.5, 0.0]


def test_capture_kv_undoes_rope_exactly(model, ids):
    cap = capture_kv(model, ids[:16])
    layers, heads, n, d = cap.keys.shape
    assert (layers, heads, n, d) == (30, 3, 16, 64) and cap.queries.shape == (30, 16, 9, 64)
    rope = model.llama.rope
    again = rope(cap.keys_before_rope[3].transpose(1, 0, 2), np.arange(n)).transpose(1, 0, 2)
    assert np.allclose(again, cap.keys[3], atol=1e-5)
    assert np.allclose(cap.keys_before_rope[:, :, 0], cap.keys[:, :, 0])   # position 0: no rotation


def test_bad_evaluation_input():
    with pytest.raises(ConfigError):
        teacher_forced(None, [1])
    a, b = (TeacherForced(np.zeros(n), np.zeros(n, int)) for n in (3, 4))
    with pytest.raises(ConfigError):
        top1_agreement(a, b)
