"""Graders for chapter 3's exercises: masks and positions for batches of different lengths."""

from __future__ import annotations

import numpy as np

from .. import masks
from ..batching import own_positions
from . import Report, grade_prediction, refuses_kvlib, run_cases


def _compare_masks(got, want: np.ndarray, diagnose=None) -> str | None:
    """None if `got` is the boolean mask `want`, else what is wrong (diagnose(got) may
    name a known mistake)."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if got.dtype != bool:
        return f"dtype {got.dtype}, expected bool (True = may attend)"
    if np.array_equal(got, want):
        return None
    if diagnose is not None and (known := diagnose(got)):
        return known
    wrong = np.argwhere(got != want)[0]
    return (f"{int((got != want).sum())} entries wrong; first at {tuple(int(i) for i in wrong)}: "
            f"got {bool(got[tuple(wrong)])}, expected {bool(want[tuple(wrong)])}")


@refuses_kvlib()
def grade_causal_mask(causal_mask) -> Report:
    """`causal_mask(n_new, n_past)` -> [n_new, n_past + n_new], aligned bottom-right."""
    def case(n_new, n_past):
        def check():
            def diagnose(got):
                if np.array_equal(got, np.tril(np.ones_like(got))):
                    return ("the triangle is aligned top-left: the new queries cannot see "
                            "the cached prefix (query i sits at position n_past + i)")
                if np.array_equal(got, ~masks.causal_mask(n_new, n_past)):
                    return "True and False are swapped (True must mean 'may attend')"
                return None
            return _compare_masks(causal_mask(n_new, n_past), masks.causal_mask(n_new, n_past),
                                  diagnose)
        return f"n_new={n_new}, n_past={n_past}", check

    return run_cases("causal_mask", [case(4, 0), case(3, 5), case(1, 7), case(1, 0),
                                     case(6, 1), case(2, 30)])


@refuses_kvlib()
def grade_padding_mask(padding_mask) -> Report:
    """`padding_mask(lengths, width)` -> [B, width], left padding (pads first)."""
    def case(lengths, width):
        want = masks.padding_mask(lengths, width, side="left")

        def check():
            def diagnose(got):
                if np.array_equal(got, masks.padding_mask(lengths, width, side="right")):
                    return "the pads are on the right; left padding puts them first"
                return None
            return _compare_masks(padding_mask(np.array(lengths), width), want, diagnose)
        return f"lengths={lengths}, width={width}", check

    return run_cases("padding_mask", [case([2, 4, 1], 4), case([3], 3), case([1, 1], 5),
                                      case([0, 2], 2), case([7, 3, 5, 1], 9)])


@refuses_kvlib()
def grade_own_positions(positions_fn) -> Report:
    """`own_positions(is_real)` -> [B, S] each real token's index in its own sequence."""
    def case(description, is_real):
        is_real = np.asarray(is_real, dtype=bool)
        want = own_positions(is_real)

        def check():
            got = np.asarray(positions_fn(is_real.copy()))
            if got.shape != want.shape:
                return f"shape {got.shape}, expected {want.shape}"
            if not np.issubdtype(got.dtype, np.integer):
                return f"dtype {got.dtype}, expected integers (they index the RoPE table)"
            if np.array_equal(got, want):
                return None
            if np.array_equal(got[is_real], want[is_real]):
                return "real tokens are right, but padding columns must get position 0"
            if np.array_equal(got, np.broadcast_to(np.arange(is_real.shape[1]), want.shape)):
                return ("these are the padded column indices: a sequence's first real "
                        "token must get position 0, however much padding precedes it")
            if np.array_equal(got[is_real], want[is_real] + 1):
                return "off by one: a sequence's first real token is at position 0, not 1"
            row = int(np.argwhere((got != want).any(axis=1))[0, 0])
            return f"row {row}: got {got[row].tolist()}, expected {want[row].tolist()}"
        return description, check

    return run_cases("own_positions", [
        case("left-padded prefill", masks.padding_mask([2, 4, 1], 4)),
        case("no padding", masks.padding_mask([3, 3], 3)),
        case("one row", masks.padding_mask([2], 6)),
        case("after decode steps", np.concatenate(
            [masks.padding_mask([1, 3], 3), np.ones((2, 2), dtype=bool)], axis=1)),
    ])


@refuses_kvlib()
def grade_padded_attention_mask(mask_fn) -> Report:
    """`padded_attention_mask(is_real, n_new)` -> [B, n_new, S]: causal AND padding."""
    def case(description, is_real, n_new):
        is_real = np.asarray(is_real, dtype=bool)
        want = masks.padded_attention_mask(is_real, n_new)

        def check():
            def diagnose(got):
                width = is_real.shape[1]
                causal = np.broadcast_to(masks.causal_mask(n_new, width - n_new), want.shape)
                if np.array_equal(got, causal):
                    return "the padding is not masked: queries attend to pad keys"
                if np.array_equal(got, np.broadcast_to(is_real[:, None, :], want.shape)):
                    return "the causal mask is missing: queries see future tokens"
                return None
            return _compare_masks(mask_fn(is_real.copy(), n_new), want, diagnose)
        return description, check

    return run_cases("padded_attention_mask", [
        case("prefill of a left-padded batch", masks.padding_mask([2, 4, 1], 4), 4),
        case("one decode step", np.concatenate(
            [masks.padding_mask([1, 3], 3), np.ones((2, 1), dtype=bool)], axis=1), 1),
        case("two new columns after a padded prefix", np.concatenate(
            [masks.padding_mask([2, 5], 5), np.ones((2, 2), dtype=bool)], axis=1), 2),
        case("no padding", np.ones((1, 3), dtype=bool), 3),
    ])


@refuses_kvlib()
def grade_ragged_mask(ragged_mask) -> Report:
    """`ragged_mask(counts)` -> [N, N] block-diagonal causal mask of packed sequences."""
    def case(counts):
        want = masks.ragged_mask(counts)

        def check():
            def diagnose(got):
                if np.array_equal(got, masks.causal_mask(len(want))):
                    return "one causal triangle over everything: sequences see each other"
                return None
            return _compare_masks(ragged_mask(list(counts)), want, diagnose)
        return f"counts={counts}", check

    return run_cases("ragged_mask", [case([2, 3]), case([4]), case([1, 1, 1]),
                                     case([3, 1, 2, 5])])


__all__ = ["Report", "grade_causal_mask", "grade_padding_mask", "grade_own_positions",
           "grade_padded_attention_mask", "grade_ragged_mask"]


def grade_tril_bug(hidden_by_mistake) -> Report:
    """Grade the predicted number of (query, key) pairs that the top-left `np.tril` mask
    wrongly hides when 2 new queries follow 3 cached keys (found by comparing masks)."""
    buggy = np.tril(np.ones((2, 5), dtype=bool))
    right = masks.causal_mask(2, 3)
    truth = int((right & ~buggy).sum())
    return grade_prediction("tril_bug", hidden_by_mistake, truth, [
        (0, "np.tril of the [2, 5] rectangle keeps the diagonal starting at key 0, so query "
            "0 sees only key 0 although it sits at position 3"),
        (3, "both queries lose keys: query i sits at position 3 + i but sees keys 0 ... i"),
        (2, "count the pairs hidden by mistake, not the queries affected"),
    ])
