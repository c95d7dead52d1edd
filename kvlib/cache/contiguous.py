"""The contiguous cache: one preallocated `[batch, kv_heads, max_seq, head_dim]` array per layer.

Each sequence owns one row of the batch axis and may grow to `max_seq` tokens. For a
given (sequence, head) the keys of all positions are one contiguous `[max_seq, head_dim]`
slab, so attention reads them as a single stream, and appending a token writes one
`head_dim` vector per head at offset `length`.
"""

from __future__ import annotations

import numpy as np

from ..attention import attention
from ..errors import CapacityError, ConfigError, LengthError
from ..masks import causal_mask
from .base import KVCache, StepPlan


class ContiguousCache(KVCache):
    """Reserve-max cache for up to `max_batch` sequences of up to `max_seq` tokens.

    Args:
        n_layers, n_kv_heads, head_dim: the model's KV shape (see `from_config`).
        max_batch: rows of the batch axis = most sequences alive at once.
        max_seq: tokens reserved for every sequence.
        dtype: storage type of keys/values (float32 or float16); attention runs in float32.
        backend: "numpy" or "numba" (float32 storage only), see `KVCache.set_backend`.
    """

    STORAGE = ("keys", "values")

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int,
                 max_batch: int, max_seq: int, dtype=np.float32, backend: str = "numpy") -> None:
        if max_batch < 1 or max_seq < 1:
            raise ConfigError(f"max_batch and max_seq must be positive, got {max_batch}, {max_seq}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float16):
            raise ConfigError(f"storage dtype must be float32 or float16, got {dtype}")
        super().__init__(n_layers, n_kv_heads, head_dim)
        self.max_batch = max_batch
        self.max_seq = max_seq
        shape = (n_layers, max_batch, n_kv_heads, max_seq, head_dim)
        self.keys = np.zeros(shape, dtype=dtype)    # keys[layer] is [batch, kv_heads, max_seq, head_dim]
        self.values = np.zeros(shape, dtype=dtype)
        self.lengths = np.zeros(max_batch, dtype=np.int64)  # tokens stored per row
        self.in_use = np.zeros(max_batch, dtype=bool)       # rows holding a live sequence
        self.set_backend(backend)

    @classmethod
    def from_config(cls, config, max_batch: int, max_seq: int, dtype=np.float32,
                    backend: str = "numpy"):
        """A cache shaped for `config` (a `ModelConfig`)."""
        cache = cls(config.n_layers, config.n_kv_heads, config.head_dim, max_batch, max_seq,
                    dtype)
        return cache.set_backend(backend)

    def _check_numba_supported(self) -> None:
        if self.keys.dtype != np.float32:
            raise ConfigError(f"the Numba kernel reads float32 keys/values; this cache "
                              f"stores {self.keys.dtype}")

    # --- sequences -----------------------------------------------------------------
    def new_sequence(self) -> int:
        free_rows = np.flatnonzero(~self.in_use)
        if len(free_rows) == 0:
            raise CapacityError(f"all {self.max_batch} rows of the cache hold a sequence")
        row = int(free_rows[0])
        self.in_use[row] = True
        self.lengths[row] = 0
        return row

    def free(self, seq_id: int) -> None:
        self._check_known(seq_id)
        self.in_use[seq_id] = False
        self.lengths[seq_id] = 0

    def length(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return int(self.lengths[seq_id])

    def capacity(self, seq_id: int) -> int:
        self._check_known(seq_id)
        return self.max_seq

    def sequences(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.in_use)]

    def crop(self, seq_id: int, length: int) -> None:
        self._check_known(seq_id)
        if not 0 <= length <= self.lengths[seq_id]:
            raise LengthError(f"cannot crop sequence {seq_id} of length "
                              f"{self.lengths[seq_id]} to {length}")
        self.lengths[seq_id] = length

    def reset(self) -> None:
        self.in_use[:] = False
        self.lengths[:] = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.lengths.nbytes + self.in_use.nbytes

    @property
    def max_sequences(self) -> int:
        return self.max_batch

    # --- one forward step ----------------------------------------------------------
    def _check_room(self, plan: StepPlan) -> None:
        ends = plan.starts + plan.counts
        for s, end in zip(plan.seq_ids, ends):
            if end > self.max_seq:
                raise CapacityError(f"sequence {s} would hold {end} tokens; "
                                    f"the cache reserves {self.max_seq}")

    def write(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None:
        self._check_kv(layer, plan, k, v)
        offsets = plan.offsets
        for i, row in enumerate(plan.seq_ids):
            start, end = plan.starts[i], plan.starts[i] + plan.counts[i]
            rows = slice(offsets[i], offsets[i + 1])
            # packed [n, kv_heads, d] -> cache layout [kv_heads, n, d]
            self.keys[layer, row, :, start:end] = k[rows].transpose(1, 0, 2)
            self.values[layer, row, :, start:end] = v[rows].transpose(1, 0, 2)

    def attend(self, layer: int, plan: StepPlan, q: np.ndarray) -> np.ndarray:
        self._check_q(layer, plan, q)
        if self._use_kernel(plan):
            from ..kernels.cpu import decode_contiguous

            return decode_contiguous(q, self.keys[layer], self.values[layer],
                                     np.asarray(plan.seq_ids), plan.starts + 1)
        out = np.empty_like(q)
        offsets = plan.offsets
        for i, row in enumerate(plan.seq_ids):
            n_past, n_new = int(plan.starts[i]), int(plan.counts[i])
            end = n_past + n_new
            k = self.keys[layer, row, :, :end].astype(np.float32, copy=False)
            v = self.values[layer, row, :, :end].astype(np.float32, copy=False)
            rows = slice(offsets[i], offsets[i + 1])
            out[rows] = attention(q[rows], k, v, self._mask(plan, i))
        return out

    def _mask(self, plan: StepPlan, i: int) -> np.ndarray | None:
        """[n_new, n_past + n_new] mask of the plan's i-th sequence (None: sees all)."""
        n_past, n_new = int(plan.starts[i]), int(plan.counts[i])
        return causal_mask(n_new, n_past) if n_new > 1 else None

    def commit(self, plan: StepPlan) -> None:
        for s, c in zip(plan.seq_ids, plan.counts):
            self.lengths[s] += c
