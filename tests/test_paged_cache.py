"""PagedCache and BlockPool: layout, slot mapping, sharing, prefix cache, errors, bytes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.cache import BlockPool, ContiguousCache, PagedCache, paged_cache_nbytes
from kvlib.cache.block_pool import CACHED, FREE, IN_USE, prefix_key
from kvlib.errors import (CapacityError, ConfigError, DoubleFreeError, KVLibError, LengthError,
                          OutOfBlocksError, UnknownSequenceError)

L, HKV, H, D = 2, 2, 6, 8


def make_cache(num_blocks=8, block_size=4, max_seqs=4, max_seq_len=64):
    return PagedCache(L, HKV, D, num_blocks, block_size, max_seqs, max_seq_len)


def kv(rng, n):
    return (rng.standard_normal((n, HKV, D), dtype=np.float32),
            rng.standard_normal((n, HKV, D), dtype=np.float32))


def step(cache, seq_ids, counts, rng):
    """Plan, write every layer and commit; return (plan, k, v) of the step."""
    plan = cache.plan(seq_ids, counts)
    k, v = kv(rng, plan.n_tokens)
    for layer in range(L):
        cache.write(layer, plan, k, v)
    cache.commit(plan)
    return plan, k, v


def gathered_keys(cache, seq, layer=0):
    """[length, kv_heads, head_dim] keys of a sequence, read through its block table."""
    n = cache.length(seq)
    slots = cache.slot_mapping(seq, np.arange(n))
    return cache.keys[layer, slots // cache.block_size, :, slots % cache.block_size]


def snapshot(cache):
    p = cache.pool
    return (cache.keys.copy(), cache.values.copy(), cache.block_tables.copy(),
            cache.table_lengths.copy(), cache.lengths.copy(), cache.in_use.copy(),
            p.refcounts.copy(), p.free_stack.copy(), np.array(p.n_free), p.has_key.copy(),
            np.array(cache.sequences()))


def assert_unchanged(cache, snap):
    for before, after in zip(snap, snapshot(cache)):
        np.testing.assert_array_equal(before, after)


def test_layout_and_kernel_views(rng):
    cache = make_cache(num_blocks=8, block_size=4)
    assert cache.keys.shape == (L, 8, HKV, 4, D)
    a, b = cache.new_sequence(), cache.new_sequence()
    step(cache, [a, b], [6, 1], rng)
    tables = cache.block_table_array([a, b])
    assert tables.dtype == np.int32 and tables.shape == (2, 2)
    np.testing.assert_array_equal(tables, [[0, 1], [2, -1]])
    np.testing.assert_array_equal(cache.lengths_array([a, b]), [6, 1])


def test_write_goes_to_slot_block_times_size_plus_offset(rng):
    cache = make_cache(block_size=3)
    s = cache.new_sequence()
    plan, k, v = step(cache, [s], [5], rng)
    table = cache.block_table(s)
    for pos in range(5):
        slot = table[pos // 3] * 3 + pos % 3
        assert plan.slots[pos] == slot
        np.testing.assert_array_equal(cache.keys[1, slot // 3, :, slot % 3], k[pos])
        np.testing.assert_array_equal(cache.values[0, slot // 3, :, slot % 3], v[pos])


@settings(max_examples=40, deadline=None)
@given(block_size=st.integers(1, 6), seed=st.integers(0, 2**16),
       steps=st.lists(st.lists(st.integers(0, 5), min_size=3, max_size=3), min_size=1, max_size=5))
def test_paged_attention_equals_contiguous_on_ragged_workloads(block_size, seed, steps):
    """Same writes into both caches; every step's attention output is the same."""
    rng = np.random.default_rng(seed)
    paged = PagedCache(L, HKV, D, num_blocks=64, block_size=block_size, max_seqs=3,
                       max_seq_len=32)
    contiguous = ContiguousCache(L, HKV, D, max_batch=3, max_seq=32)
    ids_p = [paged.new_sequence() for _ in range(3)]
    ids_c = [contiguous.new_sequence() for _ in range(3)]
    for counts in steps:
        taking_part = [i for i in range(3) if counts[i] > 0]
        if not taking_part:
            continue
        n = [counts[i] for i in taking_part]
        plan_p = paged.plan([ids_p[i] for i in taking_part], n)
        plan_c = contiguous.plan([ids_c[i] for i in taking_part], n)
        for layer in range(L):
            k, v = kv(rng, plan_p.n_tokens)
            q = rng.standard_normal((plan_p.n_tokens, H, D), dtype=np.float32)
            paged.write(layer, plan_p, k, v)
            contiguous.write(layer, plan_c, k, v)
            np.testing.assert_allclose(paged.attend(layer, plan_p, q),
                                       contiguous.attend(layer, plan_c, q), rtol=1e-6, atol=1e-6)
        paged.commit(plan_p)
        contiguous.commit(plan_c)


def test_out_of_blocks_raises_before_any_change(rng):
    cache = make_cache(num_blocks=4, block_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    step(cache, [a], [10], rng)                    # 3 blocks
    snap = snapshot(cache)
    with pytest.raises(OutOfBlocksError, match="needs 2 blocks but only 1"):
        cache.plan([a, b], [3, 1])                 # a needs a 4th block, b its first
    assert_unchanged(cache, snap)
    assert isinstance(OutOfBlocksError("x"), CapacityError)
    cache.free(a)                                  # freeing returns its blocks
    assert cache.pool.n_free == 4
    step(cache, [b], [16], rng)


def test_capacity_rows_and_lengths_are_checked():
    cache = make_cache(max_seqs=2, max_seq_len=8)
    a = cache.new_sequence()
    cache.new_sequence()
    with pytest.raises(CapacityError, match="rows"):
        cache.new_sequence()
    with pytest.raises(CapacityError, match="would hold 9"):
        cache.plan([a], [9])
    with pytest.raises(UnknownSequenceError):
        cache.plan([99], [1])


def test_double_free_is_a_clear_error(rng):
    cache = make_cache()
    s = cache.new_sequence()
    step(cache, [s], [5], rng)
    cache.free(s)
    with pytest.raises(DoubleFreeError, match="already freed"):
        cache.free(s)
    with pytest.raises(UnknownSequenceError):
        cache.free(12345)                          # never existed
    pool = BlockPool(2)
    block = int(pool.allocate(1)[0])
    pool.release(block)
    with pytest.raises(DoubleFreeError, match="block 0"):
        pool.release(block)


def test_fork_shares_blocks_and_copies_on_first_write(rng):
    cache = make_cache(num_blocks=8, block_size=4)
    parent = cache.new_sequence()
    step(cache, [parent], [6], rng)                # one full block, one half-full
    child = cache.fork(parent)
    np.testing.assert_array_equal(cache.block_table(child), cache.block_table(parent))
    assert list(cache.pool.refcounts[cache.block_table(parent)]) == [2, 2]
    before = gathered_keys(cache, parent).copy()
    _, k_new, _ = step(cache, [child], [1], rng)
    # the shared half-full block was copied for the child; the full one is still shared
    t_parent, t_child = cache.block_table(parent), cache.block_table(child)
    assert t_parent[0] == t_child[0] and t_parent[1] != t_child[1]
    assert list(cache.pool.refcounts[t_parent]) == [2, 1]
    np.testing.assert_array_equal(gathered_keys(cache, parent), before)
    np.testing.assert_array_equal(gathered_keys(cache, child)[:6], before)
    np.testing.assert_array_equal(gathered_keys(cache, child)[6], k_new[0])
    # the parent now owns its half-full block alone: it writes in place, no copy
    step(cache, [parent], [1], rng)
    assert cache.block_table(parent)[1] == t_parent[1]


def test_two_forks_writing_one_shared_block_in_one_step_copy_only_once(rng):
    cache = make_cache(num_blocks=4, block_size=4)
    a = cache.new_sequence()
    step(cache, [a], [2], rng)
    b = cache.fork(a)
    # 1 block used, 3 free: a copies, b then owns the original and writes in place
    step(cache, [a, b], [1, 1], rng)
    assert cache.pool.n_used == 2


def test_prefix_cache_reuses_full_blocks_and_keeps_the_last_token(rng):
    cache = make_cache(num_blocks=16, block_size=4)
    prompt = list(range(10, 20))                   # 10 tokens: 2 full blocks
    s, n_cached = cache.start_sequence(prompt)
    assert n_cached == 0
    step(cache, [s], [10], rng)
    first_keys = gathered_keys(cache, s).copy()
    cache.free(s)
    assert cache.pool.n_cached == 2 and cache.pool.n_used == 0
    s2, n_cached = cache.start_sequence(prompt + [7, 7])
    assert n_cached == 8 and cache.length(s2) == 8
    np.testing.assert_array_equal(gathered_keys(cache, s2), first_keys[:8])
    # a prompt that is exactly the cached blocks still recomputes its last token
    s3, n_cached = cache.start_sequence(prompt[:8])
    assert n_cached == 4
    # a different first block means no hit, even if later tokens agree
    s4, n_cached = cache.start_sequence([0] + prompt[1:])
    assert n_cached == 0
    assert cache.prefix_hit_tokens == 12 and cache.prefix_query_tokens == 10 + 12 + 8 + 10
    assert cache.prefix_hit_rate == pytest.approx(12 / 40)
    for seq in (s2, s3, s4):
        cache.free(seq)


def test_cached_blocks_are_evicted_least_recently_used_first(rng):
    cache = make_cache(num_blocks=4, block_size=2)
    for prompt in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]):   # 2 full blocks each get keys
        s, _ = cache.start_sequence(prompt)
        step(cache, [s], [4], rng)                 # 4 tokens: 2 full blocks, both keyed
        cache.free(s)
    assert cache.pool.n_cached == 4 and cache.pool.n_free == 0
    # the first prompt's blocks are the oldest; its tail block goes first
    s = cache.new_sequence()
    step(cache, [s], [2], rng)
    assert cache.start_sequence([1, 2, 3, 4, 5])[1] == 2    # head of prompt 1 survives
    assert cache.start_sequence([6, 7, 8, 9, 10])[1] == 4   # prompt 2 untouched
    assert cache.pool.n_evicted == 1


def test_crop_drops_blocks_and_never_rewrites_a_cached_block(rng):
    cache = make_cache(num_blocks=8, block_size=4)
    prompt = list(range(9))
    s, _ = cache.start_sequence(prompt)
    step(cache, [s], [9], rng)
    cached_block = int(cache.block_table(s)[1])
    content = cache.keys[:, cached_block].copy()
    cache.crop(s, 6)
    assert cache.table_lengths[s] == 2 and cache.length(s) == 6
    with pytest.raises(LengthError):
        cache.crop(s, 7)
    step(cache, [s], [2], rng)                     # writes into keyed block 1: copy first
    assert int(cache.block_table(s)[1]) != cached_block
    np.testing.assert_array_equal(cache.keys[:, cached_block], content)


def test_reset_keeps_the_prefix_cache_until_cleared(rng):
    cache = make_cache(num_blocks=8, block_size=4)
    s, _ = cache.start_sequence(list(range(9)))
    step(cache, [s], [9], rng)
    t = cache.fork(s)
    cache.reset()
    assert cache.sequences() == [] and cache.pool.n_used == 0 and cache.pool.n_cached == 2
    cache.clear_prefix_cache()
    assert cache.pool.n_free == 8 and set(cache.pool.states()) == {FREE}
    with pytest.raises(DoubleFreeError):
        cache.free(t)


def test_pool_states_partition_the_blocks():
    pool = BlockPool(5)
    a = pool.allocate(3)
    pool.register(int(a[0]), prefix_key(b"", [1, 2]))
    pool.release(int(a[0]))
    assert list(pool.states()) == [CACHED, IN_USE, IN_USE, FREE, FREE]
    with pytest.raises(OutOfBlocksError):
        pool.allocate(4)
    with pytest.raises(KVLibError, match="free"):
        pool.retain(4)


def test_prefix_key_depends_on_the_parent():
    assert prefix_key(b"", [1, 2]) != prefix_key(prefix_key(b"", [0, 0]), [1, 2])
    assert prefix_key(b"", [1, 2]) == prefix_key(b"", np.array([1, 2]))


def test_nbytes_equals_the_formula_and_every_array():
    cache = PagedCache(L, HKV, D, num_blocks=10, block_size=7, max_seqs=3, max_seq_len=50)
    kv_bytes = 2 * L * 10 * HKV * 7 * D * 4
    assert cache.nbytes == paged_cache_nbytes(L, HKV, D, 10, 7, 3, 50)
    arrays = [cache.keys, cache.values, cache.block_tables, cache.table_lengths, cache.lengths,
              cache.in_use, cache.pool.refcounts, cache.pool.free_stack, cache.pool.keys,
              cache.pool.has_key, cache.pool.last_used]
    assert cache.nbytes == sum(a.nbytes for a in arrays)
    assert cache.nbytes == kv_bytes + 10 * (4 + 4 + 16 + 1 + 8) + 3 * (8 * 4 + 4 + 8 + 1)
    half = PagedCache(L, HKV, D, 10, 7, 3, 50, dtype=np.float16)
    assert half.nbytes == paged_cache_nbytes(L, HKV, D, 10, 7, 3, 50, np.float16)


def test_bad_construction_and_bad_prompts_are_rejected():
    with pytest.raises(ConfigError):
        PagedCache(L, HKV, D, num_blocks=0)
    with pytest.raises(ConfigError):
        PagedCache(L, HKV, D, 4, block_size=0)
    with pytest.raises(ConfigError):
        PagedCache(L, HKV, D, 4, dtype=np.int8)
    cache = make_cache(max_seq_len=8)
    snap = snapshot(cache)
    with pytest.raises(LengthError):
        cache.start_sequence([])
    with pytest.raises(LengthError):
        cache.start_sequence(list(range(9)))
    assert_unchanged(cache, snap)


def test_generate_with_n_needs_a_cache_that_forks():
    from kvlib.model.generate import generate

    cache = ContiguousCache(L, HKV, D, 2, 8)
    with pytest.raises(ConfigError, match="cannot fork"):
        generate(None, [[1, 2]], cache=cache, n=2)
    with pytest.raises(ConfigError, match="n "):
        generate(None, [[1, 2]], cache=None, n=0)
