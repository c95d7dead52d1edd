"""The contiguous cache: one preallocated `[batch, kv_heads, max_seq, head_dim]` array per layer.

Each sequence owns one row of the batch axis and may grow to `max_seq` tokens. For a
given (sequence, head) the keys of all positions are one contiguous `[max_seq, head_dim]`
slab, so attention reads them as a single stream, and appending a token writes one
`head_dim` vector per head at offset `length`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import StepPlan, attention_kernel
from .rows import RowCache


class ContiguousCache(RowCache):
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
        self._init_rows(max_batch, max_seq)
        shape = (n_layers, max_batch, n_kv_heads, max_seq, head_dim)
        self.keys = np.zeros(shape, dtype=dtype)    # keys[layer] is [batch, kv_heads, max_seq, head_dim]
        self.values = np.zeros(shape, dtype=dtype)
        self.set_backend(backend)

    @classmethod
    def from_config(cls, config, max_batch: int, max_seq: int, dtype=np.float32,
                    backend: str = "numpy"):
        """A cache shaped for `config` (a `ModelConfig`)."""
        cache = cls(config.n_layers, config.n_kv_heads, config.head_dim, max_batch, max_seq,
                    dtype)
        return cache.set_backend(backend)

    # --- sequences (rows: `RowCache`) ----------------------------------------------
    def crop(self, seq_id: int, length: int) -> None:
        self._check_crop(seq_id, length)
        self.lengths[seq_id] = length

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.lengths.nbytes + self.in_use.nbytes

    # --- one forward step ----------------------------------------------------------
    def write(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None:
        self._check_kv(layer, plan, k, v)
        offsets = plan.offsets
        for i, row in enumerate(plan.seq_ids):
            start, end = plan.starts[i], plan.starts[i] + plan.counts[i]
            rows = slice(offsets[i], offsets[i + 1])
            # packed [n, kv_heads, d] -> cache layout [kv_heads, n, d]
            self.keys[layer, row, :, start:end] = k[rows].transpose(1, 0, 2)
            self.values[layer, row, :, start:end] = v[rows].transpose(1, 0, 2)

    def _sequence_kv(self, layer: int, plan: StepPlan, i: int):
        row, end = plan.seq_ids[i], int(plan.starts[i] + plan.counts[i])
        return (self.keys[layer, row, :, :end].astype(np.float32, copy=False),
                self.values[layer, row, :, :end].astype(np.float32, copy=False))

    def commit(self, plan: StepPlan) -> None:
        for s, c in zip(plan.seq_ids, plan.counts):
            self.lengths[s] += c


@attention_kernel(ContiguousCache, "numba")
def _decode_numba(cache: ContiguousCache, layer: int, plan: StepPlan, q: np.ndarray):
    """One compiled pass over each row's contiguous keys/values."""
    from ..kernels.cpu import decode_contiguous

    return decode_contiguous(q, cache.keys[layer], cache.values[layer],
                             np.asarray(plan.seq_ids), plan.starts + 1)


@attention_kernel(ContiguousCache, "numba", "prefill")
def _prefill_numba(cache: ContiguousCache, layer: int, plan: StepPlan, q: np.ndarray):
    """The causal tiled kernel, reading the layer as a pool whose blocks are its rows
    (one block of `max_seq` tokens per sequence)."""
    from ..kernels.prefill import causal_attention

    rows = np.asarray(plan.seq_ids, dtype=np.int32)[:, None]
    return causal_attention(q, cache.keys[layer], cache.values[layer], rows, plan.starts,
                            plan.counts)
