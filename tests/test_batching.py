"""A batch of prompts of different lengths decodes exactly like each prompt alone,
with left padding (strategy a) and with the ragged layout (strategy b)."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from kvlib.batching import LogitRecorder, PaddedCache, left_pad, own_positions, padded_forward
from kvlib.cache import ContiguousCache
from kvlib.errors import ConfigError, LengthError, ShapeError
from kvlib.model import generate

N_NEW = 16
BATCH_PROMPTS = [  # chat and plain; one stops early (EOS); one is a single token
    ("What is 2+2?", True),
    ("The key/value cache of a transformer stores", False),
    ("Write a short poem about the sea and the wind that blows over it at night.", True),
    ("Hi", False),
    ("Name three primary colors.", True),
]
CACHES = {"ragged": ContiguousCache, "padded": PaddedCache}
# A batch and a lone sequence go through different BLAS kernels (matrix-matrix against
# matrix-vector), which add the same float32 products in a different order: logits of
# magnitude up to ~40 then differ by up to ~1e-4 (measured 9e-5 at most). 1e-3 keeps
# more than 5x headroom and stays far below what a wrong mask or a wrong position does
# (more than 1e-1, asserted below).
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def batch_prompts(model):
    prompts = [model.encode(text, chat=chat) for text, chat in BATCH_PROMPTS]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths) and min(lengths) * 3 <= max(lengths)
    assert min(lengths) == 1
    return prompts


def decode(model, prompts, batching, n_new=N_NEW):
    """Greedy results and per-prompt logits of one batched generation."""
    cache = CACHES[batching].from_config(model.config, len(prompts),
                                         max(map(len, prompts)) + n_new)
    recorder = LogitRecorder()
    results = model.generate(prompts, cache=cache, max_new_tokens=n_new, sampler=recorder,
                             on_token=recorder.on_token, batching=batching)
    return results, [recorder.logits(i) for i in range(len(prompts))]


@pytest.fixture(scope="module")
def alone(model, batch_prompts):
    return [decode(model, [p], "ragged") for p in batch_prompts]


@pytest.fixture(scope="module", params=["ragged", "padded"])
def batched(request, model, batch_prompts):
    return request.param, decode(model, batch_prompts, request.param)


def test_batched_greedy_ids_equal_each_prompt_alone(batched, alone):
    batching, (results, _) = batched
    for i, r in enumerate(results):
        assert r.token_ids == alone[i][0][0].token_ids, (batching, i)
        assert r.finish_reason == alone[i][0][0].finish_reason


def test_batched_logits_equal_each_prompt_alone(batched, alone):
    """Within LOGIT_ATOL: a batch and a single row sum in a different order."""
    batching, (_, logits) = batched
    for i, got in enumerate(logits):
        np.testing.assert_allclose(got, alone[i][1][0], atol=LOGIT_ATOL, rtol=0,
                                   err_msg=f"{batching}, prompt {i}")


def test_a_sequence_finishing_early_leaves_the_others_undisturbed(batched, alone):
    _, (results, _) = batched
    stopped = [r for r in results if r.finish_reason == "stop"]
    assert stopped and all(len(r.token_ids) < N_NEW for r in stopped)
    assert any(r.finish_reason == "length" and len(r.token_ids) == N_NEW for r in results)


@pytest.mark.parametrize("batching", ["ragged", "padded"])
def test_a_batch_of_one_equals_decoding_alone(model, batch_prompts, alone, batching):
    results, logits = decode(model, [batch_prompts[1]], batching)
    assert results[0].token_ids == alone[1][0][0].token_ids
    np.testing.assert_allclose(logits[0], alone[1][1][0], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("batching", ["ragged", "padded"])
def test_a_one_token_prompt_alone_and_among_long_ones(model, batch_prompts, alone, batching):
    one = batch_prompts[3]
    assert len(one) == 1
    results, _ = decode(model, [batch_prompts[2], one], batching, n_new=6)
    assert results[1].token_ids == alone[3][0][0].token_ids[:6]
    uncached = model.generate([one], cache=None, max_new_tokens=6)[0]
    assert uncached.token_ids == results[1].token_ids


class TopLeftCausalCache(ContiguousCache):
    """The bug: a causal triangle aligned top-left, which hides the cached prefix."""

    def _mask(self, plan, i):
        n_past, n_new = int(plan.starts[i]), int(plan.counts[i])
        return np.tril(np.ones((n_new, n_past + n_new), dtype=bool))


@pytest.mark.parametrize("cache_type", [ContiguousCache, PaddedCache])
def test_mask_offset_on_a_multi_token_append_after_a_cached_prefix(model, batch_prompts,
                                                                    cache_type):
    prefix, append = batch_prompts[2][:30], batch_prompts[2][30:]
    assert len(append) > 1
    full = model.forward([batch_prompts[2]], all_logits=True)[len(prefix):]
    cache = cache_type.from_config(model.config, 1, 64)
    seq = cache.new_sequence()
    model.forward([prefix], cache, [seq])
    got = model.forward([append], cache, [seq], all_logits=True)
    np.testing.assert_allclose(got, full, atol=LOGIT_ATOL, rtol=0)

    wrong = TopLeftCausalCache.from_config(model.config, 1, 64)
    seq = wrong.new_sequence()
    model.forward([prefix], wrong, [seq])
    assert np.abs(model.forward([append], wrong, [seq], all_logits=True) - full).max() > 1e-1


def test_multi_token_append_to_a_left_padded_batch(model, batch_prompts):
    """After a padded prefill, every row appends 3 tokens at once: causal AND padding."""
    short, long = batch_prompts[1], batch_prompts[2]
    extra = [[42, 43, 44], [45, 46, 47]]
    cache = PaddedCache.from_config(model.config, 2, 64)
    rows = [cache.new_sequence(), cache.new_sequence()]
    padded_forward(model.llama, [short, long], cache, rows)
    got = model.forward(extra, cache, rows, all_logits=True)
    for i, prompt in enumerate([short, long]):
        want = model.forward([list(prompt) + extra[i]], all_logits=True)[-3:]
        np.testing.assert_allclose(got[3 * i:3 * i + 3], want, atol=LOGIT_ATOL, rtol=0)


def test_positions_after_left_padding(model, batch_prompts):
    """Prefill and decode of a padded row rotate by the sequence's own positions."""
    short, long = batch_prompts[1], batch_prompts[2]
    ref = ContiguousCache.from_config(model.config, 1, 64)
    seq = ref.new_sequence()
    alone = [model.forward([short], ref, [seq])[0], model.forward([[42]], ref, [seq])[0]]

    def run(decode_positions):
        cache = PaddedCache.from_config(model.config, 2, 64)
        rows = [cache.new_sequence(), cache.new_sequence()]
        ids, is_real = left_pad([short, long])
        plan = cache.plan(rows, [ids.shape[1]] * 2, is_real)
        np.testing.assert_array_equal(plan.own_positions, own_positions(is_real))
        np.testing.assert_array_equal(plan.own_positions[0, -len(short):], np.arange(len(short)))
        prefill = model.llama.forward_plan(ids.reshape(-1), cache, plan)
        plan = cache.plan(rows, [1, 1])
        np.testing.assert_array_equal(plan.own_positions[:, 0], [len(short), len(long)])
        if decode_positions == "stored columns":  # the bug: pads counted as positions
            plan = dataclasses.replace(plan, own_positions=plan.starts[:, None])
        decode = model.llama.forward_plan(np.array([42, 43]), cache, plan)
        return prefill, decode

    prefill, decode = run("own")
    np.testing.assert_allclose(prefill[0], alone[0], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode[0], alone[1], atol=LOGIT_ATOL, rtol=0)
    _, wrong = run("stored columns")
    assert np.abs(wrong[0] - alone[1]).max() > 1e-1
    np.testing.assert_allclose(wrong[1], decode[1], atol=LOGIT_ATOL)  # the unpadded row is fine


def test_a_uniform_position_shift_is_invisible_to_rope(model, batch_prompts):
    """RoPE scores depend on position differences only: rotating a whole left-padded row
    by its column index (shifted by its pad count) changes nothing but rounding."""
    short, long = batch_prompts[1], batch_prompts[2]
    cache = PaddedCache.from_config(model.config, 2, 64)
    rows = [cache.new_sequence(), cache.new_sequence()]
    ids, is_real = left_pad([short, long])
    plan = cache.plan(rows, [ids.shape[1]] * 2, is_real)
    columns = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    shifted = model.llama.forward_plan(ids.reshape(-1), cache,
                                       dataclasses.replace(plan, own_positions=columns))
    np.testing.assert_allclose(shifted[0], model.forward([short])[0], atol=1e-3)


def test_padding_is_masked_whatever_its_token_id(model, batch_prompts):
    prompts = [batch_prompts[3], batch_prompts[1]]
    out = []
    for pad_id in (0, 1234):
        cache = PaddedCache.from_config(model.config, 2, 32)
        rows = [cache.new_sequence(), cache.new_sequence()]
        out.append(padded_forward(model.llama, prompts, cache, rows, pad_id=pad_id))
    np.testing.assert_allclose(out[0], out[1], atol=1e-5, rtol=0)


def test_padding_memory_padded_vs_ragged(model, batch_prompts):
    lengths = np.array([len(p) for p in batch_prompts])
    padded = PaddedCache.from_config(model.config, len(lengths), lengths.max() + 1)
    ragged = ContiguousCache.from_config(model.config, len(lengths), lengths.max() + 1)
    rows = [padded.new_sequence() for _ in lengths]
    seqs = [ragged.new_sequence() for _ in lengths]
    padded_forward(model.llama, batch_prompts, padded, rows)
    model.forward(batch_prompts, ragged, seqs)
    cfg = model.config
    assert padded.bytes_per_column == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    assert padded.padding_columns == (lengths.max() - lengths).sum()
    assert padded.padding_nbytes == padded.padding_columns * padded.bytes_per_column
    assert [padded.length(r) for r in rows] == [lengths.max()] * len(lengths)
    assert [ragged.length(s) for s in seqs] == lengths.tolist()  # nothing padded
    assert padded.nbytes == ragged.nbytes + padded.is_real.nbytes


def test_padded_cache_rejects_a_ragged_step_before_changing_anything(model, batch_prompts):
    cache = PaddedCache.from_config(model.config, 2, 64)
    rows = [cache.new_sequence(), cache.new_sequence()]
    padded_forward(model.llama, batch_prompts[:2], cache, rows)
    keys, lengths, is_real = cache.keys.copy(), cache.lengths.copy(), cache.is_real.copy()
    with pytest.raises(LengthError, match="rectangle"):
        model.forward([[1, 2], [3]], cache, rows)  # different numbers of new columns
    with pytest.raises(LengthError, match="left padding"):
        cache.plan(rows, [2, 2], [[True, False], [True, True]])
    with pytest.raises(ShapeError, match="is_real"):
        cache.plan(rows, [2, 2], [[True, True]])
    cache.crop(rows[0], 3)
    lengths[rows[0]] = 3
    with pytest.raises(LengthError, match="rectangle"):
        model.forward([[1], [2]], cache, rows)  # rows of different widths
    np.testing.assert_array_equal(cache.keys, keys)
    np.testing.assert_array_equal(cache.lengths, lengths)
    np.testing.assert_array_equal(cache.is_real, is_real)


def test_generate_rejects_a_bad_batching_choice(model, batch_prompts):
    cache = ContiguousCache.from_config(model.config, 1, 64)
    seq = cache.new_sequence()
    with pytest.raises(ConfigError, match="PaddedCache"):
        model.generate([batch_prompts[0]], cache=cache, batching="padded")
    with pytest.raises(ConfigError, match="PaddedCache"):
        model.generate([batch_prompts[0]], cache=None, batching="padded")
    with pytest.raises(ConfigError, match="batching"):
        generate(model.llama, [batch_prompts[0]], cache, batching="diagonal")
    assert cache.sequences() == [seq]  # not reset: the error came first


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvlib", "generate", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_batching_padded_prints_the_same_results_in_order():
    prompts = ["What is the capital of France?", "Hi", "Name a color."]
    outs = {b: run_cli(*prompts, "--chat", "--max-new-tokens", "8", "--json", "--quiet",
                       "--batching", b) for b in ("ragged", "padded")}
    rows = {}
    for b, out in outs.items():
        assert out.returncode == 0, out.stderr
        rows[b] = [json.loads(line) for line in out.stdout.splitlines()]
        assert [r["prompt"] for r in rows[b]] == prompts
        assert all(r["batching"] == b for r in rows[b])
    assert [r["token_ids"] for r in rows["ragged"]] == [r["token_ids"] for r in rows["padded"]]
    bad = run_cli("x", "--batching", "padded", "--cache", "none", "--quiet")
    assert bad.returncode == 2 and "kvlib: error: --batching padded" in bad.stderr
