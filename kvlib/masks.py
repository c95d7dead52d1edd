"""Attention masks. Convention: a boolean array, True where a query may attend to a key.

Three kinds, and their combination:

* `causal_mask` — new tokens appended after cached ones see only the past; the
  triangle is aligned to the bottom-right corner.
* `padding_mask` — which columns of a padded `[batch, width]` rectangle hold real tokens
  (left padding puts the pads first; right padding, i.e. a length mask, puts them last).
* `ragged_mask` — several sequences packed along one token axis: each token sees only
  earlier tokens of its own sequence (block-diagonal causal).

`combine_masks` ANDs masks together with broadcasting; `padded_attention_mask` is the
combination a left-padded batch needs at every step.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, LengthError, ShapeError


def causal_mask(n_new: int, n_past: int = 0) -> np.ndarray:
    """Mask for `n_new` queries appended after `n_past` cached tokens.

    Returns a bool array of shape [n_new, n_past + n_new]. Query i sits at absolute
    position n_past + i and may see every key at a position <= its own, so the
    triangle is aligned to the bottom-right corner: the last query sees everything.
    """
    q_pos = n_past + np.arange(n_new)[:, None]
    k_pos = np.arange(n_past + n_new)[None, :]
    return k_pos <= q_pos


def padding_mask(lengths, width: int, side: str = "left") -> np.ndarray:
    """Which columns of a padded batch hold real tokens.

    Args:
        lengths: [B] real tokens per row (0 <= length <= width).
        width: columns of the padded rectangle.
        side: "left" (pads first, real tokens end at the last column) or "right"
            (real tokens first: the length mask of a cache filled from column 0).
    Returns:
        [B, width] bool, True at real tokens.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if side not in ("left", "right"):
        raise ConfigError(f"side must be 'left' or 'right', got {side!r}")
    if (lengths < 0).any() or (lengths > width).any():
        raise LengthError(f"lengths {lengths.tolist()} must lie in [0, {width}]")
    columns = np.arange(width)[None, :]
    if side == "left":
        return columns >= (width - lengths)[:, None]
    return columns < lengths[:, None]


def ragged_mask(counts) -> np.ndarray:
    """Causal mask of several sequences packed along one axis (no padding).

    Args:
        counts: [B] tokens of each sequence, packed one after another.
    Returns:
        [N, N] bool with N = sum(counts): token i sees token j iff both belong to the
        same sequence and j <= i (a block-diagonal of causal triangles).
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (counts < 0).any():
        raise LengthError(f"counts must be >= 0, got {counts.tolist()}")
    owner = np.repeat(np.arange(len(counts)), counts)  # which sequence each token is in
    return (owner[:, None] == owner[None, :]) & causal_mask(len(owner))


def combine_masks(*masks: np.ndarray) -> np.ndarray:
    """Logical AND of masks, broadcast to a common shape (a key must pass them all)."""
    if not masks:
        raise ShapeError("combine_masks needs at least one mask")
    try:
        return np.logical_and.reduce(np.broadcast_arrays(*masks))
    except ValueError as err:
        shapes = [np.shape(m) for m in masks]
        raise ShapeError(f"masks of shapes {shapes} do not broadcast together") from err


def padded_attention_mask(key_is_real: np.ndarray, n_new: int) -> np.ndarray:
    """Mask for the last `n_new` columns of a padded batch attending over all of it.

    Args:
        key_is_real: [B, S] bool, True where column s of row b holds a real token
            (the padding mask of everything stored, new columns included).
        n_new: queries per row: the last `n_new` columns.
    Returns:
        [B, n_new, S] bool: the bottom-right causal mask AND the key padding mask.
        A query that is itself a pad on the left sees no real key: its row is all False.
    """
    key_is_real = np.asarray(key_is_real, dtype=bool)
    if key_is_real.ndim != 2 or not 0 < n_new <= key_is_real.shape[1]:
        raise ShapeError(f"need a [B, S] key mask with S >= n_new = {n_new}, "
                         f"got shape {key_is_real.shape}")
    width = key_is_real.shape[1]
    return combine_masks(causal_mask(n_new, width - n_new)[None, :, :],
                         key_is_real[:, None, :])
