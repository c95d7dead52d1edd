"""The serving workload and its memory trace."""

import numpy as np
import pytest

from kvlib.cache import ContiguousCache, PagedCache
from kvlib.errors import ConfigError
from kvlib.workload import Request, chat_workload, reserved_slots, serve


def test_chat_workload_is_seeded_and_clipped():
    a, b = chat_workload(300, seed=1), chat_workload(300, seed=1)
    assert a == b and a != chat_workload(300, seed=2)
    lengths = np.array([(r.prompt_len, r.output_len) for r in a])
    assert lengths.min() >= 4 and lengths.max() <= 1024
    with pytest.raises(ConfigError):
        chat_workload(0)


def test_serve_traces_stored_and_reserved_slots_by_hand():
    requests = [Request(3, 2), Request(5, 1), Request(2, 3)]
    contiguous = serve(requests, ContiguousCache(1, 1, 1, max_batch=2, max_seq=8), max_running=2)
    # step 1: prefill 3 + 5; step 2: 4 + 6 (second leaves); step 3: 5 (first leaves) + prefill 2 ...
    np.testing.assert_array_equal(contiguous.stored, [8, 10, 7, 3, 4, 5])
    np.testing.assert_array_equal(contiguous.reserved, [16, 16, 16, 8, 8, 8])
    paged = serve(requests, PagedCache(1, 1, 1, num_blocks=8, block_size=4, max_seqs=2,
                                       max_seq_len=8), max_running=2)
    np.testing.assert_array_equal(paged.stored, contiguous.stored)
    np.testing.assert_array_equal(paged.reserved, [12, 12, 12, 4, 4, 8])
    one = serve(requests, PagedCache(1, 1, 1, 16, 1, 2, 8), max_running=2)
    assert one.utilization == 1.0


def test_shared_prompts_hit_the_prefix_cache():
    system = list(range(100, 120))
    requests = [Request(23, 2, tuple(system + [i, i, i])) for i in range(5)]
    cache = PagedCache(1, 1, 1, num_blocks=64, block_size=4, max_seqs=2, max_seq_len=32)
    serve(requests, cache, max_running=1)
    assert cache.prefix_hit_tokens == 4 * 20 and cache.prefix_query_tokens == 5 * 23


def test_reserved_slots_needs_a_known_cache():
    with pytest.raises(ConfigError):
        reserved_slots(object())
