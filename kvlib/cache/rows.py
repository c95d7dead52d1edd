"""Sequences of a reserve-max cache: one row of the batch axis each.

The contiguous and quantized caches reserve `max_seq` tokens for each of `max_batch`
rows. A sequence's id is its row (the decode kernels index storage by it), so a freed
id comes back with the next `new_sequence`. The rule for ids is the paged cache's:
an id the cache never handed out is an `UnknownSequenceError`, freeing one that is no
longer live a `DoubleFreeError`.
"""

from __future__ import annotations

import numpy as np

from ..errors import CapacityError, DoubleFreeError, LengthError
from .base import KVCache


class RowCache(KVCache):
    """Row bookkeeping of a reserve-max cache.

    Attributes:
        max_batch, max_seq: rows, and tokens reserved per row.
        lengths: [max_batch] int64 tokens stored per row.
        in_use: [max_batch] bool, rows holding a live sequence.
    """

    def _init_rows(self, max_batch: int, max_seq: int) -> None:
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.lengths = np.zeros(max_batch, dtype=np.int64)
        self.in_use = np.zeros(max_batch, dtype=bool)

    def _clear_rows(self, rows) -> None:
        """Forget what `rows` (an index or a slice) held; extend for more per-row state."""
        self.lengths[rows] = 0

    def new_sequence(self) -> int:
        free_rows = np.flatnonzero(~self.in_use)
        if len(free_rows) == 0:
            raise CapacityError(f"all {self.max_batch} rows of the cache hold a sequence")
        row = int(free_rows[0])
        self.in_use[row] = True
        self._clear_rows(row)
        return row

    def free(self, seq_id: int) -> None:
        if 0 <= seq_id < self.max_batch and not self.in_use[seq_id]:
            raise DoubleFreeError(f"sequence {seq_id} was already freed")
        self._check_known(seq_id)
        self.in_use[seq_id] = False
        self._clear_rows(seq_id)

    def length(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return int(self.lengths[seq_id])

    def capacity(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return self.max_seq

    def sequences(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.in_use)]

    def reset(self) -> None:
        self.in_use[:] = False
        self._clear_rows(slice(None))

    @property
    def max_sequences(self) -> int:
        return self.max_batch

    def _check_crop(self, seq_id: int, length: int) -> None:
        self._check_known(seq_id)
        if not 0 <= length <= self.lengths[seq_id]:
            raise LengthError(f"cannot crop sequence {seq_id} of length "
                              f"{self.lengths[seq_id]} to {length}")

    def _check_room(self, plan) -> None:
        for s, end in zip(plan.seq_ids, plan.starts + plan.counts):
            if end > self.max_seq:
                raise CapacityError(f"sequence {s} would hold {end} tokens; "
                                    f"the cache reserves {self.max_seq}")
