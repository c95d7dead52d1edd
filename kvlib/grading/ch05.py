"""Graders for chapter 5's exercises: slot mapping, gathering a sequence's blocks, and
the longest cached prefix."""

from __future__ import annotations

import numpy as np

from ..cache import prefix_key
from ..cache.paged import blocks_for
from ..cache.block_pool import prefix_keys
from . import Report, compare_arrays, grade_prediction, refuses_kvlib, run_cases


def _reference_slots(block_table, positions, block_size) -> np.ndarray:
    table = np.asarray(block_table, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size


@refuses_kvlib(prefix_key)
def grade_slot_mapping(slot_mapping) -> Report:
    """`slot_mapping(block_table, positions, block_size)` -> [n] int slots."""
    def case(description, table, positions, block_size):
        want = _reference_slots(table, positions, block_size)

        def check():
            got = np.asarray(slot_mapping(np.array(table, dtype=np.int32),
                                          np.array(positions), block_size))
            if got.shape != want.shape:
                return f"shape {got.shape}, expected {want.shape} (one slot per position)"
            if not np.issubdtype(got.dtype, np.integer):
                return f"dtype {got.dtype}, expected integers (slots index an array)"
            if np.array_equal(got, want):
                return None
            if np.array_equal(got, positions):
                return "returned the positions: a slot is in the block the table names"
            i = int(np.flatnonzero(got != want)[0])
            return (f"position {positions[i]}: got slot {got[i]}, expected {want[i]} "
                    f"(block table[{positions[i]} // {block_size}] * {block_size} + offset)")
        return description, check

    return run_cases("slot_mapping", [
        case("table [3, 0, 5], block size 4, every position", [3, 0, 5], range(12), 4),
        case("block size 1: the slot is the block", [9, 2, 7, 4], [0, 1, 2, 3], 1),
        case("block size 7, positions out of order", [1, 6, 2], [20, 0, 7, 13], 7),
        case("only the last, partly filled block", [5, 8], [16, 17], 16),
    ])


@refuses_kvlib(prefix_key)
def grade_gather_blocks(gather_blocks) -> Report:
    """`gather_blocks(store, block_table, length)` -> [kv_heads, length, head_dim]."""
    rng = np.random.default_rng(5)

    def case(description, num_blocks, block_size, table, length):
        store = rng.standard_normal((num_blocks, 2, block_size, 3)).astype(np.float32)
        blocks = store[np.asarray(table)]
        want = blocks.transpose(1, 0, 2, 3).reshape(2, -1, 3)[:, :length]

        def check():
            before = store.copy()
            got = np.asarray(gather_blocks(store, np.array(table, dtype=np.int32), length))
            if not np.array_equal(store, before):
                return "changed the block store; gathering must only read"
            if got.shape == (len(table), 2, block_size, 3) or got.shape == (2, len(table) * block_size, 3):
                if got.shape != want.shape:
                    return (f"shape {got.shape}: the trailing slots past `length` in the "
                            f"last block are not tokens of the sequence; keep the first {length}")
            if got.shape != want.shape:
                return f"shape {got.shape}, expected {want.shape} [kv_heads, length, head_dim]"
            wrong_order = store[np.arange(len(table))].transpose(1, 0, 2, 3).reshape(2, -1, 3)[:, :length]
            if len(table) > 1 and np.array_equal(got, wrong_order) and not np.array_equal(got, want):
                return "read blocks 0, 1, 2, ... in order; read the blocks the table names"
            unmoved = blocks.reshape(2, -1, 3)[:, :length]
            if np.array_equal(got, unmoved) and not np.array_equal(got, want):
                return ("reshaped [n_blocks, kv_heads, block_size, head_dim] without moving "
                        "kv_heads to the front first, which mixes heads and blocks")
            return compare_arrays(got, want, rtol=0, atol=0)
        return description, check

    return run_cases("gather_blocks", [
        case("3 blocks out of order, last half full", 6, 4, [4, 1, 3], 10),
        case("every block full", 5, 3, [2, 0], 6),
        case("one token", 4, 8, [3], 1),
        case("block size 1", 8, 1, [7, 5, 6, 0, 2], 5),
    ])


@refuses_kvlib(prefix_key)
def grade_cached_prefix_len(cached_prefix_len) -> Report:
    """`cached_prefix_len(prompt_ids, cached_keys, block_size)` -> tokens reusable."""
    def case(description, prompt, cached_prompt, block_size, want):
        cached = set(prefix_keys(cached_prompt, block_size))

        def check():
            got = cached_prefix_len(list(prompt), set(cached), block_size)
            if got == want:
                return None
            if got == len(prompt):
                return (f"got {got}: the whole prompt; the last prompt token must still run "
                        "through the model to give the next token's logits")
            if got < want:
                return (f"got {got}, expected {want}: stopped too early; a block's key is "
                        "prefix_key(key of the block before, its tokens), b\"\" for the first")
            return (f"got {got}, expected {want}: only whole blocks count, from the start up "
                    "to the first block whose key is not cached")
        return description, check

    system = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    return run_cases("cached_prefix_len", [
        case("shared 9-token start, blocks of 4", system + [50, 51], system + [60], 4, 8),
        case("nothing cached", [1, 2, 3, 4, 5], [9, 9, 9, 9], 2, 0),
        case("the whole prompt is cached", [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], 4, 4),
        case("first block differs, later blocks equal", [0, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7], 2, 0),
        case("block size 1", [4, 5, 6, 7], [4, 5, 9], 1, 2),
        case("a prompt shorter than a block", [1, 2, 3], [1, 2, 3, 4], 4, 0),
    ])


BLOCK_TRADEOFF_LENGTHS = (100, 37, 250, 16)


def grade_block_size_tradeoff(waste_16, waste_128) -> Report:
    """Grade the slots left empty (allocated but unused) by sequences of
    `BLOCK_TRADEOFF_LENGTHS` tokens in blocks of 16 and of 128 tokens."""
    def waste(block_size):
        return sum(blocks_for(n, block_size) * block_size - n for n in BLOCK_TRADEOFF_LENGTHS)

    def modulo(block_size):
        return sum(n % block_size for n in BLOCK_TRADEOFF_LENGTHS)

    answer = ... if ... in (waste_16, waste_128) else (waste_16, waste_128)
    return grade_prediction("block_size_tradeoff", answer, (waste(16), waste(128)), [
        ((modulo(16), modulo(128)), "n % block_size is what the last block holds; the empty "
                                    "slots are block_size minus that (and 0 for a full block)"),
        ((0, 0), "a sequence gets whole blocks: its last block is only partly used"),
        ((waste(16) // 4, waste(128) // 4), "count the empty slots of every sequence, "
                                            "not their mean"),
    ])
