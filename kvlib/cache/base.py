"""The protocol every KV cache in `kvlib` honours.

The model never changes when the cache does. One forward step over a batch of
sequences talks to the cache in four moves:

1. ``plan = cache.plan(seq_ids, counts)`` — check that each sequence exists and has
   room for ``counts[i]`` new tokens (``cache.check``, which changes nothing and raises
   a `CapacityError` if the step does not fit), then reserve that room and say where
   the tokens go (``cache.reserve``: a paged cache takes its blocks here);
2. per layer, ``cache.write(layer, plan, k, v)`` stores the new keys/values;
3. per layer, ``cache.attend(layer, plan, q)`` returns attention of the new queries over
   everything stored for their sequence (causal, aligned bottom-right);
4. ``cache.commit(plan)`` makes the new tokens part of each sequence's length.

Tokens of all sequences in a step are *packed* along one axis (no padding):
sequence i owns rows ``plan.offsets[i]:plan.offsets[i+1]``.

Every check runs before anything changes, so a call that raises leaves the cache as it
was; `unchanged_on_error` extends that promise to a sequence of bookkeeping calls
(`generate` starts its sequences inside it).
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from ..attention import attention
from ..errors import (CapacityError, ConfigError, DTypeError, DuplicateSequenceError,
                      KVLibError, LayerIndexError, LengthError, ShapeError)
from ..masks import causal_mask

BACKENDS = ("numpy", "numba", "cuda")  # how a cache computes attention; see `set_backend`

STEP_KINDS = ("decode", "prefill")
"""A "decode" step adds one token to every sequence; any other step (prefill, chunked
prefill, a mix of prefill chunks and decodes) is a "prefill" step."""

ATTENTION_KERNELS: dict[tuple[type, str, str], Callable] = {}
"""(cache class, backend, step kind) -> kernel(cache, layer, plan, q) that runs a step's
attention; "numpy" needs no entry (the per-sequence loop of `KVCache.attend`), and a
step kind without a kernel falls back to that loop too."""


def attention_kernel(cache_type: type, backend: str, step: str = "decode"):
    """Register the decorated function as `cache_type`'s `step` kernel for `backend`."""
    if step not in STEP_KINDS:
        raise ValueError(f"step must be one of {STEP_KINDS}, got {step!r}")

    def register(kernel: Callable) -> Callable:
        ATTENTION_KERNELS[(cache_type, backend, step)] = kernel
        return kernel
    return register


def kernel_for(cache_type: type, backend: str, step: str = "decode") -> Callable | None:
    """The `step` kernel of `cache_type` (or of its nearest base class) for `backend`."""
    for cls in cache_type.__mro__:
        if (cls, backend, step) in ATTENTION_KERNELS:
            return ATTENTION_KERNELS[(cls, backend, step)]
    return None


@dataclass(frozen=True)
class StepPlan:
    """Where one forward step's new tokens go.

    Attributes:
        seq_ids: the sequences taking part, in packing order.
        starts: [B] tokens already cached per sequence = position of its first new token.
        counts: [B] new tokens per sequence.

    The derived arrays below are computed once per plan (a plan serves every layer).
    """

    seq_ids: tuple[int, ...]
    starts: np.ndarray
    counts: np.ndarray

    @cached_property
    def offsets(self) -> np.ndarray:
        """[B + 1] start of each sequence's rows in the packed token axis."""
        return np.concatenate([[0], np.cumsum(self.counts)])

    @cached_property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    @cached_property
    def positions(self) -> np.ndarray:
        """[n_tokens] absolute position of every new token (each sequence its own)."""
        return np.concatenate([s + np.arange(c) for s, c in zip(self.starts, self.counts)])

    @cached_property
    def is_decode(self) -> bool:
        """True when every sequence adds exactly one token (a decode step)."""
        return bool((self.counts == 1).all())


@runtime_checkable
class Cache(Protocol):
    """What the model and `generate` need from a KV cache (`KVCache` implements it).

    Type hints name this protocol, so a signature shows what a cache must offer.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    backend: str

    def new_sequence(self) -> int: ...
    def start_sequence(self, prompt_ids) -> tuple[int, int]: ...
    def free(self, seq_id: int) -> None: ...
    def length(self, seq_id: int) -> int: ...
    def sequences(self) -> list[int]: ...
    def reset(self) -> None: ...
    @property
    def max_sequences(self) -> int: ...
    def check(self, seq_ids, counts) -> StepPlan: ...
    def can_fit(self, seq_ids, counts) -> bool: ...
    def reserve(self, plan: StepPlan) -> StepPlan: ...
    def plan(self, seq_ids, counts) -> StepPlan: ...
    def write(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None: ...
    def attend(self, layer: int, plan: StepPlan, q: np.ndarray) -> np.ndarray: ...
    def commit(self, plan: StepPlan) -> None: ...
    def unchanged_on_error(self): ...


class KVCache(ABC):
    """Storage of keys and values for several sequences, one layer at a time.

    `backend` says how `attend` computes: "numpy" (the reference, every step),
    "numba" (compiled kernels: `kvlib.kernels.cpu` for decode steps, where every
    sequence adds one token, and the causal kernel of `kvlib.kernels.prefill` for the
    other steps of the float32 caches) or "cuda" (the `numba.cuda` kernel of
    `kvlib.kernels.cuda`, decode steps of the paged cache). Kernels are looked up in
    `ATTENTION_KERNELS` by (cache class, backend, step kind); a step with no kernel runs
    the NumPy loop.

    A cache says how to read one sequence's keys and values (`_sequence_kv`) and, if it
    is not the causal one, its mask (`_mask`); `attend` is written once, here.
    """

    backend: str = "numpy"
    STORAGE: tuple[str, ...] = ()
    """Attributes holding stored keys/values; every other attribute is bookkeeping."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int) -> None:
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim

    def set_backend(self, backend: str) -> "KVCache":
        """Choose the attention backend (one of `BACKENDS`); returns the cache."""
        if backend not in BACKENDS:
            raise ConfigError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        if backend != "numpy":
            if kernel_for(type(self), backend) is None:
                raise ConfigError(f"{type(self).__name__} has no {backend} attention kernel")
            self._check_kernel(backend)
        self.backend = backend
        return self

    def _check_kernel(self, backend: str) -> None:
        """Raise `ConfigError` if this cache's data cannot go through its `backend` kernel.
        By default: float `keys`/`values` arrays must be float32 (what the kernels read)."""
        keys = getattr(self, "keys", None)
        if keys is not None and keys.dtype != np.float32:
            raise ConfigError(f"the {backend} kernel reads float32 keys/values; this cache "
                              f"stores {keys.dtype}")

    # --- sequences -----------------------------------------------------------------
    @abstractmethod
    def new_sequence(self) -> int:
        """Start an empty sequence and return its id."""

    def start_sequence(self, prompt_ids) -> tuple[int, int]:
        """Start a sequence for `prompt_ids`; return (id, prompt tokens already cached).

        The caller then feeds the model `prompt_ids[n_cached:]`. Caches without a
        prefix cache hold nothing yet: n_cached is 0.
        """
        return self.new_sequence(), 0

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Forget a sequence and release its space."""

    @abstractmethod
    def length(self, seq_id: int) -> int:
        """Tokens stored for a sequence."""

    @abstractmethod
    def capacity(self, seq_id: int) -> int:
        """Most tokens the sequence can hold."""

    @abstractmethod
    def sequences(self) -> list[int]:
        """Ids of the live sequences."""

    @abstractmethod
    def crop(self, seq_id: int, length: int) -> None:
        """Keep only the first `length` tokens of a sequence (rollback)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every sequence."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes really allocated: stored keys/values plus all metadata arrays."""

    @property
    @abstractmethod
    def max_sequences(self) -> int:
        """Most sequences the cache holds at once."""

    @contextlib.contextmanager
    def unchanged_on_error(self):
        """Undo every bookkeeping change of the block if it raises a `KVLibError`.

        For blocks that start, fork, free or check sequences but write no keys or
        values (storage is not copied, so a block that writes cannot be undone).
        """
        books = copy.deepcopy({name: value for name, value in vars(self).items()
                               if name not in self.STORAGE})
        try:
            yield self
        except KVLibError:
            vars(self).update(books)
            raise

    # --- one forward step ----------------------------------------------------------
    def plan(self, seq_ids, counts) -> StepPlan:
        """Check a step (`check`), then reserve its room (`reserve`); raises before any
        change. The plan then serves `write`, `attend` and `commit` of every layer."""
        return self.reserve(self.check(seq_ids, counts))

    def can_fit(self, seq_ids, counts) -> bool:
        """Whether `check` would accept the step (no `CapacityError`); changes nothing."""
        try:
            self.check(seq_ids, counts)
        except CapacityError:
            return False
        return True

    def reserve(self, plan: StepPlan) -> StepPlan:
        """Take the room a checked plan needs (nothing to take for a reserve-max cache)."""
        return plan

    def check(self, seq_ids, counts) -> StepPlan:
        """Validate a step of `counts[i]` new tokens for `seq_ids[i]`; changes nothing."""
        seq_ids = tuple(int(s) for s in seq_ids)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if len(seq_ids) != len(counts):
            raise ShapeError(f"{len(seq_ids)} sequence ids but {len(counts)} token counts")
        if len(set(seq_ids)) != len(seq_ids):
            raise DuplicateSequenceError(f"a sequence appears twice in one step: {seq_ids}")
        if (counts < 1).any():
            raise LengthError(f"every sequence needs at least one new token, got {counts}")
        for s in seq_ids:
            self._check_known(s)
        starts = np.array([self.length(s) for s in seq_ids], dtype=np.int64)
        plan = StepPlan(seq_ids, starts, counts)
        self._check_room(plan)
        return plan

    @abstractmethod
    def _check_room(self, plan: StepPlan) -> None:
        """Raise a `CapacityError` (or pool error) if the step does not fit; change nothing."""

    @abstractmethod
    def write(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None:
        """Store `k`, `v` ([plan.n_tokens, n_kv_heads, head_dim]) for one layer."""

    def attend(self, layer: int, plan: StepPlan, q: np.ndarray) -> np.ndarray:
        """Attention of q ([n_tokens, n_heads, head_dim]) over each sequence's cache.

        On a compiled backend the step runs the kernel registered for its kind (decode
        or prefill); otherwise it loops over the sequences in NumPy: read the
        sequence's keys/values, mask, attend.
        """
        self._check_q(layer, plan, q)
        if self.backend != "numpy":
            step = "decode" if plan.is_decode else "prefill"
            kernel = kernel_for(type(self), self.backend, step)
            if kernel is not None:
                return kernel(self, layer, plan, q)
        out = np.empty_like(q)
        for i in range(len(plan.seq_ids)):
            k, v = self._sequence_kv(layer, plan, i)
            rows = slice(plan.offsets[i], plan.offsets[i + 1])
            out[rows] = attention(q[rows], k, v, self._mask(plan, i))
        return out

    @abstractmethod
    def _sequence_kv(self, layer: int, plan: StepPlan, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Float32 keys, values [kv_heads, starts[i] + counts[i], head_dim] that the plan's
        i-th sequence attends to in `layer` (this step's tokens already written)."""

    def _mask(self, plan: StepPlan, i: int) -> np.ndarray | None:
        """[n_new, n_past + n_new] mask of the plan's i-th sequence (None: sees all):
        causal, aligned bottom-right."""
        n_past, n_new = int(plan.starts[i]), int(plan.counts[i])
        return causal_mask(n_new, n_past) if n_new > 1 else None

    @abstractmethod
    def commit(self, plan: StepPlan) -> None:
        """Add the step's tokens to the sequences' lengths."""

    # --- checks shared by every cache ----------------------------------------------
    @abstractmethod
    def _check_known(self, seq_id: int) -> None:
        """Raise `UnknownSequenceError` unless `seq_id` names a live sequence."""

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise LayerIndexError(f"layer {layer} out of range [0, {self.n_layers})")

    def _check_kv(self, layer: int, plan: StepPlan, k: np.ndarray, v: np.ndarray) -> None:
        self._check_layer(layer)
        want = (plan.n_tokens, self.n_kv_heads, self.head_dim)
        for name, a in (("k", k), ("v", v)):
            if not isinstance(a, np.ndarray):
                raise DTypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
            if a.shape != want:
                raise ShapeError(f"{name} has shape {a.shape}, expected {want} "
                                 "[new tokens, kv heads, head dim]")
            if a.dtype != np.float32:
                raise DTypeError(f"{name} has dtype {a.dtype}, expected float32")

    def _check_q(self, layer: int, plan: StepPlan, q: np.ndarray) -> None:
        self._check_layer(layer)
        if not isinstance(q, np.ndarray) or q.dtype != np.float32:
            raise DTypeError(f"q must be a float32 array, got {getattr(q, 'dtype', type(q))}")
        if q.ndim != 3 or q.shape[0] != plan.n_tokens or q.shape[2] != self.head_dim \
                or q.shape[1] % self.n_kv_heads:
            raise ShapeError(f"q has shape {q.shape}, expected [{plan.n_tokens}, "
                             f"a multiple of {self.n_kv_heads}, {self.head_dim}]")
