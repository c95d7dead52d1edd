"""Chunked prefill equals one-shot prefill: same cache, same logits, same generation."""

import numpy as np
import pytest

from kvlib.attention import attention
from kvlib.cache import ContiguousCache
from kvlib.errors import CapacityError, ConfigError, KVLibError, ShapeError
from kvlib.masks import causal_mask
from kvlib.prefill import chunked_prefill, peak_score_elements, prefill_schedule

TEXT = ("A key/value cache keeps the keys and values of every token already seen, "
        "so each new token computes only its own.")


@pytest.fixture(scope="module")
def long_prompt(model):
    ids = model.encode(TEXT, chat=True)
    assert len(ids) > 40
    return ids


def prefilled(model, prompts, chunk, extra=16):
    cache = ContiguousCache.from_config(model.config, len(prompts),
                                        max(len(p) for p in prompts) + extra)
    ids = [cache.new_sequence() for _ in prompts]
    logits = chunked_prefill(model.llama, prompts, cache, ids, chunk)
    return cache, ids, logits


def test_schedule_covers_each_prompt_once_in_order():
    steps = prefill_schedule([5, 2, 7], 3)
    assert steps == [[(0, 0, 3), (1, 0, 2), (2, 0, 3)], [(0, 3, 5), (2, 3, 6)], [(2, 6, 7)]]
    assert prefill_schedule([4], 10) == [[(0, 0, 4)]]


@pytest.fixture(scope="module")
def one_shot(model, long_prompt):
    return prefilled(model, [long_prompt], len(long_prompt))


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_cache_and_logits_equal_one_shot(model, long_prompt, one_shot, chunk):
    assert len(long_prompt) % 7 != 0  # 7 does not divide the prompt: a short last chunk
    ref_cache, (ref_id,), ref_logits = one_shot
    cache, (seq,), logits = prefilled(model, [long_prompt], chunk)
    n = len(long_prompt)
    assert cache.length(seq) == ref_cache.length(ref_id) == n
    np.testing.assert_allclose(cache.keys[:, seq, :, :n], ref_cache.keys[:, ref_id, :, :n],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cache.values[:, seq, :, :n],
                               ref_cache.values[:, ref_id, :, :n], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-3)
    assert logits.argmax() == ref_logits.argmax()


def test_chunk_size_one_is_token_by_token_decoding(model, long_prompt):
    cache, (seq,), logits = prefilled(model, [long_prompt[:12]], 1)
    decode = ContiguousCache.from_config(model.config, 1, 32)
    s = decode.new_sequence()
    for token in long_prompt[:12]:
        last = model.forward([[token]], decode, [s])
    np.testing.assert_array_equal(logits, last)
    np.testing.assert_array_equal(cache.keys[:, seq, :, :12], decode.keys[:, s, :, :12])


def greedy(model, prompt, prefill_chunk):
    cache = ContiguousCache.from_config(model.config, 1, len(prompt) + 10)
    return model.generate([prompt], cache, max_new_tokens=10,
                          prefill_chunk=prefill_chunk)[0].token_ids


@pytest.fixture(scope="module")
def one_shot_generation(model, long_prompt):
    return greedy(model, long_prompt, None)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_greedy_generation_equals_one_shot_prefill(model, long_prompt, one_shot_generation,
                                                   chunk):
    assert greedy(model, long_prompt, chunk) == one_shot_generation


def test_ragged_batch_of_prompts_equals_each_alone(model, prompt_ids):
    _, _, together = prefilled(model, prompt_ids, 4)
    for i, p in enumerate(prompt_ids):
        _, _, alone = prefilled(model, [p], len(p))
        np.testing.assert_allclose(together[i], alone[0], rtol=1e-4, atol=1e-3)
        assert together[i].argmax() == alone[0].argmax()


def test_a_chunk_after_a_cached_prefix_uses_the_bottom_right_mask(rng):
    """Chunk queries at positions 5..8 see keys 0..their own position, as in one shot."""
    n_past, n_new, heads, kv_heads, d = 5, 4, 6, 2, 8
    cache = ContiguousCache(1, kv_heads, d, max_batch=1, max_seq=16)
    seq = cache.new_sequence()
    k = rng.standard_normal((n_past + n_new, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((n_past + n_new, kv_heads, d)).astype(np.float32)
    q = rng.standard_normal((n_past + n_new, heads, d)).astype(np.float32)
    for lo, hi in [(0, n_past), (n_past, n_past + n_new)]:  # prefix, then the chunk
        plan = cache.plan([seq], [hi - lo])
        cache.write(0, plan, k[lo:hi], v[lo:hi])
        out = cache.attend(0, plan, q[lo:hi])
        cache.commit(plan)
    full = attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), causal_mask(n_past + n_new))
    np.testing.assert_allclose(out, full[n_past:], rtol=1e-5, atol=1e-6)
    # the classic bug: a top-left triangle lets query 5 see only keys 0..0
    top_left = np.tril(np.ones((n_new, n_past + n_new), bool))
    wrong = attention(q[n_past:], k.transpose(1, 0, 2), v.transpose(1, 0, 2), top_left)
    assert not np.allclose(wrong, full[n_past:], atol=1e-3)


def test_bad_input_raises_before_the_cache_changes(model, long_prompt):
    cache = ContiguousCache.from_config(model.config, 1, 20)
    seq = cache.new_sequence()
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_prefill(model.llama, [long_prompt[:5]], cache, [seq], 0)
    with pytest.raises(CapacityError):  # 30 tokens do not fit in 20: nothing is written
        chunked_prefill(model.llama, [long_prompt[:30]], cache, [seq], 8)
    with pytest.raises(KVLibError, match="token ids"):  # bad id in the last chunk
        chunked_prefill(model.llama, [[1, 2, 3, 4, 10**6]], cache, [seq], 2)
    with pytest.raises(ShapeError):
        chunked_prefill(model.llama, [[1, 2]], cache, [seq, seq], 2)
    assert cache.length(seq) == 0
    with pytest.raises(ConfigError, match="prefill_chunk"):
        model.generate([long_prompt[:5]], None, max_new_tokens=2, prefill_chunk=4)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        model.generate([long_prompt[:5]], cache, max_new_tokens=2, prefill_chunk=0)
    assert cache.sequences() == [seq] and cache.length(seq) == 0


def test_peak_score_elements_formula():
    assert peak_score_elements(8, 8, 9) == 9 * 8 * 8          # one shot: L x L per head
    assert peak_score_elements(8, 4, 9) == 9 * 4 * 8          # last chunk: C x L
    assert peak_score_elements(10, 4, 1) == max(4 * 4, 4 * 8, 2 * 10)
    assert peak_score_elements(5, 1, 2) == 2 * 5
