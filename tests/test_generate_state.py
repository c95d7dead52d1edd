"""`generate` keeps the protocol's promise: a call that raises leaves its cache exactly as
it was (every array, counter and index, compared against a snapshot). And when the cache
or the context runs out mid-generation, the tokens made so far are kept, with a
`finish_reason` saying why."""

import copy
import dataclasses

import numpy as np
import pytest

from kvlib.cache import ContiguousCache, PaddedCache, PagedCache, QuantizedCache, QuantScheme
from kvlib.errors import (CapacityError, ConfigError, ContextLengthError, LengthError,
                          OutOfBlocksError, TokenIdError)
from kvlib.model import Llama
from kvlib.model.generate import generate


def snapshot(cache) -> dict:
    return copy.deepcopy(vars(cache))


def assert_same(a, b, where="cache"):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not callable(a):
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def busy(cache, model, prompt):
    """The cache after a generation, plus one live 5-token sequence of its own."""
    generate(model.llama, [prompt], cache, max_new_tokens=3)
    seq = cache.new_sequence()
    model.forward([prompt[:5]], cache, [seq])
    return cache


def caches(cfg):
    return {
        "contiguous": ContiguousCache.from_config(cfg, max_batch=2, max_seq=40),
        "padded": PaddedCache.from_config(cfg, max_batch=2, max_seq=40),
        "int4": QuantizedCache.from_config(cfg, 2, 40, QuantScheme(4, "channel", 8, 4)),
        "paged": PagedCache.from_config(cfg, num_blocks=6, block_size=4, max_seqs=2,
                                        max_seq_len=40),
    }


@pytest.mark.parametrize("kind", ["contiguous", "padded", "int4", "paged"])
def test_every_error_of_generate_leaves_the_cache_as_it_was(model, prompt_ids, kind):
    cfg = model.config
    text = prompt_ids[0] * 2  # any valid ids do: the lengths are what matter
    short = text[:12]
    cache = busy(caches(cfg)[kind], model, short)
    paged = kind == "paged"
    bad_calls = [
        (ConfigError, dict(prompts=[short], max_new_tokens=-1)),
        (ConfigError, dict(prompts=[short], n=0)),
        (ConfigError, dict(prompts=[short], prefill_chunk=0)),
        (ConfigError, dict(prompts=[[]])),
        (TokenIdError, dict(prompts=[[1, cfg.vocab_size]])),
        (CapacityError, dict(prompts=[short] * 3)),                  # more sequences than rows
        ((CapacityError, LengthError), dict(prompts=[text[:41]])),  # past max_seq
        (ContextLengthError, dict(prompts=[[1] * (cfg.max_position + 1)])),
    ]
    if paged:
        bad_calls += [(OutOfBlocksError, dict(prompts=[short, text[20:36]])),
                      (CapacityError, dict(prompts=[short], n=3))]
    else:
        bad_calls += [(ConfigError, dict(prompts=[short], n=2))]  # cannot fork
    for error, kwargs in bad_calls:
        before = snapshot(cache)
        with pytest.raises(error):
            generate(model.llama, cache=cache, **({"max_new_tokens": 4} | kwargs))
        assert_same(before, snapshot(cache), f"{kind} after {error} {kwargs.keys()}")


def test_out_of_blocks_mid_decode_keeps_the_tokens(model, prompt_ids):
    prompt = (prompt_ids[0] * 2)[:10]
    full = generate(model.llama, [prompt], None, max_new_tokens=12)[0]
    cache = PagedCache.from_config(model.config, num_blocks=4, block_size=4, max_seqs=1,
                                   max_seq_len=64)
    short = generate(model.llama, [prompt], cache, max_new_tokens=12)[0]
    # 4 blocks of 4 hold 16 tokens: the prompt's 10 and 6 fed back, so 7 are generated
    assert short.finish_reason == "cache_full"
    assert short.token_ids == full.token_ids[:16 - len(prompt) + 1]
    assert cache.sequences() == [] and cache.pool.n_used == 0


def test_a_full_contiguous_row_stops_that_sequence_only(model, prompt_ids):
    a, b = prompt_ids[0][:6], prompt_ids[0][:9]
    cache = ContiguousCache.from_config(model.config, max_batch=2, max_seq=14)
    results = generate(model.llama, [a, b], cache, max_new_tokens=8)
    alone = [generate(model.llama, [p], None, max_new_tokens=8)[0] for p in (a, b)]
    assert [r.finish_reason for r in results] == ["length", "cache_full"]
    assert results[0].token_ids == alone[0].token_ids
    assert results[1].token_ids == alone[1].token_ids[:14 - len(b) + 1]


def test_the_end_of_the_context_stops_with_finish_reason_context(model, prompt_ids):
    short_context = dataclasses.replace(model.config, max_position=12)
    llama = Llama(short_context, model.llama.weights)
    prompt = prompt_ids[0][:8]
    result = generate(llama, [prompt], None, max_new_tokens=10)[0]
    assert result.finish_reason == "context"
    assert len(result.token_ids) == 12 - len(prompt) + 1  # fed up to position 11
    assert result.token_ids == generate(model.llama, [prompt], None, 5)[0].token_ids
