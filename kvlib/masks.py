"""Attention masks. Convention: a boolean array, True where a query may attend to a key."""

from __future__ import annotations

import numpy as np


def causal_mask(n_new: int, n_past: int = 0) -> np.ndarray:
    """Mask for `n_new` queries appended after `n_past` cached tokens.

    Returns a bool array of shape [n_new, n_past + n_new]. Query i sits at absolute
    position n_past + i and may see every key at a position <= its own, so the
    triangle is aligned to the bottom-right corner: the last query sees everything.
    """
    q_pos = n_past + np.arange(n_new)[:, None]
    k_pos = np.arange(n_past + n_new)[None, :]
    return k_pos <= q_pos
