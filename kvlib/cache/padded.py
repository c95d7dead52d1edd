"""The contiguous cache holding a left-padded batch: every step is a rectangle.

See `kvlib.batching` for the two ways prompts of different lengths share a batch; this
module holds the cache of the padded one (strategy a) and the plan of one of its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, LengthError, ShapeError
from ..masks import padded_attention_mask
from .base import StepPlan
from .contiguous import ContiguousCache


def own_positions(is_real: np.ndarray) -> np.ndarray:
    """RoPE position of every column of a padded batch, counted in its own sequence.

    Args:
        is_real: [B, S] bool, True where a column holds a real token.
    Returns:
        [B, S] int64: a real token's index among its row's real tokens. Padding
        columns get position 0 (their value never matters: nothing attends to them).
    """
    is_real = np.asarray(is_real, dtype=bool)
    return np.maximum(np.cumsum(is_real, axis=-1) - 1, 0)


@dataclass(frozen=True)
class PaddedPlan(StepPlan):
    """One step of a left-padded batch: every row receives the same `T` new columns.

    Attributes (besides `StepPlan`'s, where every count is T and every start equal):
        is_real: [B, T] which new columns hold real tokens (False: padding).
        mask: [B, T, S] what each new column may attend to, S = start + T
            (bottom-right causal AND key padding).
        own_positions: [B, T] RoPE position of each new column in its own sequence.
    """

    is_real: np.ndarray
    mask: np.ndarray
    own_positions: np.ndarray

    @property
    def positions(self) -> np.ndarray:
        """[n_tokens] each sequence's own positions (not the padded column index)."""
        return self.own_positions.reshape(-1)


class PaddedCache(ContiguousCache):
    """The contiguous cache holding a left-padded batch (strategy a).

    Storage is `ContiguousCache`'s, but every step is a rectangle: all rows taking
    part have the same number of stored columns and receive the same number of new
    ones, padding included. `is_real` [max_batch, max_seq] remembers which stored
    columns are padding, so attention can mask them and `padding_nbytes` can count
    the memory they take.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int,
                 max_batch: int, max_seq: int, dtype=np.float32) -> None:
        super().__init__(n_layers, n_kv_heads, head_dim, max_batch, max_seq, dtype)
        self.is_real = np.zeros((max_batch, max_seq), dtype=bool)

    def plan(self, seq_ids, counts, is_real=None) -> PaddedPlan:
        """Validate one rectangular step; changes nothing.

        Args:
            seq_ids: rows taking part (all must hold the same number of columns).
            counts: new columns per row (all equal).
            is_real: [B, T] bool, which new columns are real tokens; None: all are.
                Padding may only come first (left padding): each row's last new
                column must be real.
        """
        base = super().plan(seq_ids, counts)
        n_rows, n_new = len(base.seq_ids), int(base.counts[0])
        if (base.counts != n_new).any() or (base.starts != base.starts[0]).any():
            raise LengthError(
                "a padded batch is a rectangle: every row needs the same number of stored "
                f"columns (got {base.starts.tolist()}) and of new ones (got "
                f"{base.counts.tolist()}); pad the prompts with kvlib.batching.left_pad")
        if is_real is None:
            is_real = np.ones((n_rows, n_new), dtype=bool)
        is_real = np.asarray(is_real, dtype=bool)
        if is_real.shape != (n_rows, n_new):
            raise ShapeError(f"is_real has shape {is_real.shape}, expected {(n_rows, n_new)}")
        if not is_real[:, -1].all():
            raise LengthError("left padding: the last new column of every row must be a real token")
        start = int(base.starts[0])
        key_is_real = np.concatenate([self.is_real[list(base.seq_ids), :start], is_real], axis=1)
        return PaddedPlan(base.seq_ids, base.starts, base.counts, is_real,
                          padded_attention_mask(key_is_real, n_new),
                          own_positions(key_is_real)[:, start:])

    def _mask(self, plan: PaddedPlan, i: int) -> np.ndarray:
        return plan.mask[i]

    def _check_kernel(self, backend: str) -> None:
        raise ConfigError("the Numba decode kernel has no padding mask; a padded batch "
                          "attends with the NumPy backend")

    def commit(self, plan: PaddedPlan) -> None:
        for i, row in enumerate(plan.seq_ids):
            start = int(plan.starts[i])
            self.is_real[row, start:start + int(plan.counts[i])] = plan.is_real[i]
        super().commit(plan)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.is_real.nbytes

    @property
    def bytes_per_column(self) -> int:
        """Bytes of keys and values one token column takes, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.keys.itemsize

    @property
    def padding_columns(self) -> int:
        """Stored columns of live rows that hold padding, not tokens."""
        return int(sum((~self.is_real[row, :self.lengths[row]]).sum()
                       for row in self.sequences()))

    @property
    def padding_nbytes(self) -> int:
        """Bytes of keys and values stored for padding (memory the ragged layout saves)."""
        return self.padding_columns * self.bytes_per_column
