"""Sequence ids and rows: one allocator for every cache.

Every cache keeps its per-sequence state in arrays with one row per sequence it can
hold at once: a reserve-max cache its keys and values, the paged cache its block tables
and lengths. A sequence's id *is* its row, the lowest free one, the way POSIX hands out
file descriptors: kernels index rows by id with no lookup, and a freed id comes back
with the next `new_sequence`. One rule for bad ids in every cache: an id that names no
live sequence is an `UnknownSequenceError`, and freeing a row that holds none is a
`DoubleFreeError`.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import CapacityError, DoubleFreeError, LengthError, UnknownSequenceError
from .base import KVCache


class SequenceRows(KVCache):
    """Row allocation and lengths, shared by every cache.

    Attributes:
        in_use: [max_sequences] bool, rows holding a live sequence.
        lengths: [max_sequences] int64 tokens stored per row.
    """

    def _init_sequence_rows(self, n_rows: int) -> None:
        self.in_use = np.zeros(n_rows, dtype=bool)
        self.lengths = np.zeros(n_rows, dtype=np.int64)

    def _clear_row(self, row: int) -> None:
        """Forget what `row` held; each cache extends it for its per-row state."""
        self.lengths[row] = 0

    def _free_row(self) -> int:
        """The lowest row without a sequence; `CapacityError` if every row has one."""
        free_rows = np.flatnonzero(~self.in_use)
        if len(free_rows) == 0:
            raise CapacityError(f"all {len(self.in_use)} sequence rows of the cache are "
                                f"in use")
        return int(free_rows[0])

    def new_sequence(self) -> int:
        row = self._free_row()
        self.in_use[row] = True
        self._clear_row(row)
        return row

    def free(self, seq_id: int) -> None:
        if self._is_row(seq_id) and not self.in_use[seq_id]:
            raise DoubleFreeError(f"sequence {seq_id} is not live: it was already freed "
                                  f"(or never started)")
        self._check_known(seq_id)
        self._clear_row(seq_id)
        self.in_use[seq_id] = False

    def length(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return int(self.lengths[seq_id])

    def sequences(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.in_use)]

    def reset(self) -> None:
        """Free every sequence."""
        for seq in self.sequences():
            self.free(seq)

    @property
    def max_sequences(self) -> int:
        return len(self.in_use)

    def _is_row(self, seq_id) -> bool:
        """Whether `seq_id` is an integer that names a row (live or not)."""
        return (isinstance(seq_id, numbers.Integral) and not isinstance(seq_id, bool)
                and 0 <= seq_id < len(self.in_use))

    def _check_known(self, seq_id: int) -> None:
        if not (self._is_row(seq_id) and self.in_use[seq_id]):
            raise UnknownSequenceError(f"sequence {seq_id} is not in this cache")

    def _check_crop(self, seq_id: int, length: int) -> None:
        self._check_known(seq_id)
        if not 0 <= length <= self.lengths[seq_id]:
            raise LengthError(f"cannot crop sequence {seq_id} of length "
                              f"{self.lengths[seq_id]} to {length}")


class RowCache(SequenceRows):
    """Bookkeeping of a reserve-max cache: `max_seq` tokens reserved for each row.

    Attributes:
        max_batch, max_seq: rows, and tokens reserved per row.
    """

    def _init_rows(self, max_batch: int, max_seq: int) -> None:
        self.max_batch = max_batch
        self.max_seq = max_seq
        self._init_sequence_rows(max_batch)

    def capacity(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return self.max_seq

    def _check_room(self, plan) -> None:
        for s, end in zip(plan.seq_ids, plan.starts + plan.counts):
            if end > self.max_seq:
                raise CapacityError(f"sequence {s} would hold {end} tokens; "
                                    f"the cache reserves {self.max_seq}")
