"""A hypothesis state machine drives the paged cache through random alloc / append /
fork / free / crop / prefix-reuse / eviction sequences and checks the books after
every step."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, precondition, rule)

from kvlib.cache import PagedCache
from kvlib.cache.block_pool import FREE
from kvlib.errors import DoubleFreeError, OutOfBlocksError

NUM_BLOCKS = 10
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # few symbols: prefixes recur


def token_values(tokens) -> np.ndarray:
    """The K row of every position: a hash of the whole prefix up to it (exact in float32).

    Like a real model's keys, a token's value depends on everything before it, so
    reusing a block after a different prefix would show up as a wrong value.
    """
    values, h = [], 0
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
        values.append(h)
    return np.array(values, dtype=np.float32)


class PagedCacheMachine(RuleBasedStateMachine):
    sequences = Bundle("sequences")

    @initialize(block_size=st.integers(1, 4))
    def make_cache(self, block_size):
        self.cache = PagedCache(1, 1, 2, NUM_BLOCKS, block_size, max_seqs=6, max_seq_len=40)
        self.tokens = {}        # what each live sequence must read back
        self.freed = set()      # ids freed and not handed out again (ids are rows, reused)

    # --- helpers ---------------------------------------------------------------------
    def _append(self, seq, new_tokens):
        """One forward step's worth of writes; False (and nothing changed) if out of blocks."""
        before = self._books()
        try:
            plan = self.cache.plan([seq], [len(new_tokens)])
        except OutOfBlocksError:
            assert all(np.array_equal(a, b) for a, b in zip(before, self._books()))
            return False
        whole = token_values(self.tokens[seq] + new_tokens)[-len(new_tokens):]
        k = np.repeat(whole[:, None, None], 2, axis=2)
        self.cache.write(0, plan, k, -k)
        self.cache.commit(plan)
        self.tokens[seq] = self.tokens[seq] + new_tokens
        return True

    def _books(self):
        c, p = self.cache, self.cache.pool
        return (c.keys.copy(), c.values.copy(), c.block_tables.copy(),
                c.table_lengths.copy(), c.lengths.copy(), c.in_use.copy(),
                p.refcounts.copy(), p.free_stack[:p.n_free].copy(), p.has_key.copy())

    # --- rules -----------------------------------------------------------------------
    @precondition(lambda self: len(self.tokens) < 6)
    @rule(target=sequences, prompt=TOKENS)
    def start(self, prompt):
        seq, n_cached = self.cache.start_sequence(prompt)
        assert seq not in self.tokens                     # the lowest free row
        self.freed.discard(seq)
        assert n_cached % self.cache.block_size == 0 and n_cached < len(prompt)
        self.tokens[seq] = prompt[:n_cached]
        if not self._append(seq, prompt[n_cached:]):
            self.cache.free(seq)
            del self.tokens[seq]
            self.freed.add(seq)
        return seq

    @rule(seq=sequences, new=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def append(self, seq, new):
        if seq in self.tokens and len(self.tokens[seq]) + len(new) <= 40:
            self._append(seq, new)

    @precondition(lambda self: len(self.tokens) < 6)
    @rule(target=sequences, seq=sequences)
    def fork(self, seq):
        if seq not in self.tokens:
            return seq
        child = self.cache.fork(seq)
        assert child not in self.tokens
        self.freed.discard(child)
        self.tokens[child] = list(self.tokens[seq])
        return child

    @rule(seq=consumes(sequences))
    def free(self, seq):
        if seq in self.freed:
            try:
                self.cache.free(seq)
                raise AssertionError("a double free went unnoticed")
            except DoubleFreeError:
                return
        self.cache.free(seq)
        del self.tokens[seq]
        self.freed.add(seq)

    @rule(seq=sequences, keep=st.floats(0, 1))
    def crop(self, seq, keep):
        if seq in self.tokens:
            length = int(keep * len(self.tokens[seq]))
            self.cache.crop(seq, length)
            self.tokens[seq] = self.tokens[seq][:length]

    @rule()
    def clear_prefix_cache(self):
        self.cache.clear_prefix_cache()

    # --- invariants, checked after every step -----------------------------------------
    @invariant()
    def reference_counts_are_never_negative_and_match_the_tables(self):
        c = self.cache
        assert (c.pool.refcounts >= 0).all()
        named = np.zeros(NUM_BLOCKS, dtype=np.int64)
        for seq in c.sequences():
            np.add.at(named, c.block_table(seq), 1)
        np.testing.assert_array_equal(named, c.pool.refcounts)

    @invariant()
    def no_block_is_both_free_and_in_use(self):
        p = self.cache.pool
        free = p.free_stack[:p.n_free]
        assert len(set(free.tolist())) == len(free)
        assert (p.refcounts[free] == 0).all() and not p.has_key[free].any()
        assert p.n_free + p.n_used + p.n_cached == NUM_BLOCKS

    @invariant()
    def every_sequence_reads_back_exactly_its_own_tokens(self):
        """Copy-on-write never changed another sequence; prefix hits hold the right values."""
        c = self.cache
        assert sorted(self.tokens) == c.sequences()
        for seq, tokens in self.tokens.items():
            n = len(tokens)
            assert c.length(seq) == n
            assert len(c.block_table(seq)) == -(-n // c.block_size)
            slots = c.slot_mapping(seq, np.arange(n))
            blocks, offsets = slots // c.block_size, slots % c.block_size
            want = token_values(tokens)
            # keys hold the token values, values their negatives: a copy-on-write that
            # moved only one of the two arrays fails here
            np.testing.assert_array_equal(c.keys[0, blocks, 0, offsets][:, 0], want)
            np.testing.assert_array_equal(c.values[0, blocks, 0, offsets][:, 0], -want)

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        for seq in list(self.tokens):
            self.cache.free(seq)
        self.cache.clear_prefix_cache()
        assert self.cache.pool.n_free == NUM_BLOCKS
        assert set(self.cache.pool.states()) == {FREE}


PagedCacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                               deadline=None)
TestPagedCacheMachine = PagedCacheMachine.TestCase
