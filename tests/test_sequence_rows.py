"""One allocator, one rule for sequence ids in every cache (`kvlib.cache.rows`)."""

import numpy as np
import pytest

from kvlib.cache import ContiguousCache, PaddedCache, PagedCache, QuantizedCache
from kvlib.errors import CapacityError, DoubleFreeError, UnknownSequenceError

CACHES = {
    "contiguous": lambda: ContiguousCache(1, 1, 4, max_batch=3, max_seq=8),
    "padded": lambda: PaddedCache(1, 1, 4, max_batch=3, max_seq=8),
    "quantized": lambda: QuantizedCache(1, 1, 4, max_batch=3, max_seq=8),
    "paged": lambda: PagedCache(1, 1, 4, num_blocks=8, block_size=2, max_seqs=3,
                                max_seq_len=8),
}


def fill(cache, seq, n):
    plan = cache.plan([seq], [n])
    k = np.ones((n, 1, 4), dtype=np.float32)
    cache.write(0, plan, k, k)
    cache.commit(plan)


@pytest.mark.parametrize("kind", CACHES)
def test_an_id_is_the_lowest_free_row_and_comes_back_empty_after_free(kind):
    cache = CACHES[kind]()
    a, b, c = (cache.new_sequence() for _ in range(3))
    assert (a, b, c) == (0, 1, 2) and cache.sequences() == [0, 1, 2]
    fill(cache, b, 3)
    cache.free(b)
    assert cache.sequences() == [0, 2]
    again = cache.new_sequence()
    assert again == b and cache.length(again) == 0


@pytest.mark.parametrize("kind", CACHES)
def test_bad_ids_raise_the_same_errors_in_every_cache(kind):
    cache = CACHES[kind]()
    seqs = [cache.new_sequence() for _ in range(3)]
    with pytest.raises(CapacityError, match="all 3 sequence rows of the cache are in use"):
        cache.new_sequence()
    cache.free(seqs[1])
    with pytest.raises(DoubleFreeError, match="sequence 1 is not live: it was already"):
        cache.free(seqs[1])
    for bad in (3, -1, 12345, 1.0, True, "0"):
        with pytest.raises(UnknownSequenceError, match="is not in this cache"):
            cache.free(bad)
        with pytest.raises(UnknownSequenceError):
            cache.length(bad)
    with pytest.raises(UnknownSequenceError):
        cache.plan([seqs[1]], [1])          # freed, not handed out again: unknown


@pytest.mark.parametrize("kind", CACHES)
def test_reset_frees_every_row(kind):
    cache = CACHES[kind]()
    for _ in range(3):
        fill(cache, cache.new_sequence(), 2)
    cache.reset()
    assert cache.sequences() == [] and not cache.in_use.any()
    assert cache.new_sequence() == 0 and cache.length(0) == 0
