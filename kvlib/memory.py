"""How many bytes a KV cache takes: formulas for real models, GPUs and kvlib's own caches.

Everything here is arithmetic on a `ModelConfig`; nothing is allocated. The formulas:

* per token and layer, MHA/GQA/MQA caches a key and a value per KV head,
  ``2 * n_kv_heads * head_dim`` numbers; MLA caches one latent of ``kv_lora_rank``
  numbers and one shared RoPE key of ``rope_head_dim`` numbers;
* a storage type turns numbers into bytes. Float types cost their width. Integer types
  split every cached vector (one head's key, one head's value, or an MLA latent) into
  groups of ``group_size`` consecutive numbers and store, per group, an fp16 scale and,
  for the asymmetric types, an fp16 zero point (llama.cpp's q8_0 and q4_1 layouts);
* a cache of ``tokens`` tokens for ``batch`` sequences holds
  ``batch * min(tokens, sliding_window) * bytes_per_token`` bytes: a model whose every
  layer attends to only the last ``sliding_window`` tokens needs to keep only those
  (Mistral's rolling buffer cache).

`kvlib`'s caches each have a formula for their `nbytes` (arrays and metadata), listed in
`NBYTES_FORMULAS`; `expected_nbytes(cache)` applies the right one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .cache.padded import PaddedCache
from .cache import ContiguousCache, KVCache, PagedCache, QuantizedCache
from .cache.paged import paged_cache_nbytes
from .cache.quantized import quantized_cache_nbytes
from .config import ModelConfig
from .errors import ConfigError


# --- storage types ------------------------------------------------------------------
@dataclass(frozen=True)
class StorageType:
    """How cached numbers are stored.

    Attributes:
        name: e.g. "fp16" or "int4".
        bits: bits per stored number.
        group_size: numbers that share one scale (and zero point); None for float types.
        scale_bytes: bytes of the scale stored per group (fp16: 2).
        zero_bytes: bytes of the zero point stored per group (0 if symmetric).
    """

    name: str
    bits: int
    group_size: int | None = None
    scale_bytes: int = 0
    zero_bytes: int = 0

    def vector_bytes(self, n: int) -> int:
        """Bytes for one vector of `n` numbers: packed data plus per-group metadata.

        Groups never cross vectors; a last, shorter group still stores its metadata.
        """
        data = math.ceil(n * self.bits / 8)
        groups = math.ceil(n / self.group_size) if self.group_size else 0
        return data + groups * (self.scale_bytes + self.zero_bytes)


DEFAULT_GROUP_SIZE = 32

# name -> (bits, scale bytes, zero-point bytes); integer types are grouped.
_STORAGE = {
    "fp32": (32, 0, 0),
    "fp16": (16, 0, 0),
    "bf16": (16, 0, 0),
    "fp8": (8, 0, 0),    # e4m3/e5m2; a per-tensor scale is a few bytes and not counted
    "int8": (8, 2, 0),   # symmetric: fp16 scale per group (q8_0: 34 bytes per 32)
    "int4": (4, 2, 2),   # asymmetric: fp16 scale + fp16 zero point (q4_1: 20 bytes per 32)
    "int2": (2, 2, 2),   # asymmetric, as in KIVI
}
STORAGE_NAMES = tuple(_STORAGE)


def storage_type(name: str | StorageType, group_size: int | None = None) -> StorageType:
    """The `StorageType` called `name`; integer types take `group_size` (default 32)."""
    if isinstance(name, StorageType):
        return name
    if name not in _STORAGE:
        raise ConfigError(f"unknown storage type {name!r}; known: {', '.join(STORAGE_NAMES)}")
    bits, scale, zero = _STORAGE[name]
    if scale == 0:
        if group_size is not None:
            raise ConfigError(f"{name} is a float type and takes no group size")
        return StorageType(name, bits)
    group = DEFAULT_GROUP_SIZE if group_size is None else int(group_size)
    if group < 1:
        raise ConfigError(f"group size must be positive, got {group_size}")
    return StorageType(name, bits, group, scale, zero)


# --- KV cache of a model ------------------------------------------------------------
def _cached_vectors(config: ModelConfig) -> list[tuple[int, int]]:
    """(count, length) of the vectors one token adds to one layer's cache."""
    if config.attention_kind == "MLA":
        return [(1, config.kv_lora_rank), (1, config.rope_head_dim)]
    return [(2 * config.n_kv_heads, config.head_dim)]  # a key and a value per KV head


def kv_bytes_per_token(config: ModelConfig, dtype: str | StorageType = "fp16",
                       group_size: int | None = None) -> int:
    """Bytes one token adds to the cache, over all layers.

    MHA/GQA/MQA: n_layers * 2 * n_kv_heads * head_dim numbers;
    MLA: n_layers * (kv_lora_rank + rope_head_dim) numbers; plus group metadata.
    """
    storage = storage_type(dtype, group_size)
    per_layer = sum(count * storage.vector_bytes(length)
                    for count, length in _cached_vectors(config))
    return config.n_layers * per_layer


def _check_count(name: str, value: int, minimum: int = 0) -> int:
    if int(value) != value or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def cached_tokens(config: ModelConfig, tokens: int, sliding_window: bool = True) -> int:
    """Tokens a sequence of `tokens` tokens keeps in its cache.

    With `sliding_window` (and a model that has one), a layer keeps only the last
    `config.sliding_window` tokens, the most it ever attends to.
    """
    tokens = _check_count("tokens", tokens)
    if sliding_window and config.sliding_window is not None:
        return min(tokens, config.sliding_window)
    return tokens


def kv_cache_bytes(config: ModelConfig, tokens: int, batch: int = 1,
                   dtype: str | StorageType = "fp16", group_size: int | None = None,
                   sliding_window: bool = True) -> int:
    """Bytes of the KV cache of `batch` sequences of `tokens` tokens each."""
    batch = _check_count("batch", batch, 1)
    return (batch * cached_tokens(config, tokens, sliding_window)
            * kv_bytes_per_token(config, dtype, group_size))


def weights_bytes(config: ModelConfig, dtype: str | StorageType = "bf16",
                  group_size: int | None = None) -> int:
    """Bytes of all `config.n_params` weights stored as `dtype` (groups over the lot)."""
    if config.n_params is None:
        raise ConfigError("this configuration has no parameter count (n_params)")
    return storage_type(dtype, group_size).vector_bytes(config.n_params)


# --- fitting a GPU ------------------------------------------------------------------
# Memory of the GPUs in the book's reference table as the device reports it to software
# (nvidia-smi's memory total, in MiB = 2**20 bytes). Vendors print decimal gigabytes on
# the box ("80 GB"); an 80 GB H100 reports 81,559 MiB = 79.6 GiB = 85.5 * 10**9 bytes.
# Sources: nvidia-smi outputs quoted in modal-labs/modal-client pull request 2797 (H100,
# A100 80GB, L4), in RLinf/RLinf issue 255 (RTX 4090) and in nvidia-smi logs of H200 SXM
# machines (143,771 MiB).
GPU_MEMORY_MIB: dict[str, int] = {
    "H100 SXM 80GB": 81_559,
    "H200 SXM 141GB": 143_771,
    "A100 SXM 80GB": 81_920,
    "L4": 23_034,
    "RTX 4090": 24_564,
}
GPU_MEMORY_BYTES: dict[str, int] = {name: mib * 2**20 for name, mib in GPU_MEMORY_MIB.items()}
# What the datasheets print, in decimal gigabytes (1 GB = 10**9 bytes), for comparison.
GPU_DATASHEET_GB: dict[str, int] = {"H100 SXM 80GB": 80, "H200 SXM 141GB": 141,
                                    "A100 SXM 80GB": 80, "L4": 24, "RTX 4090": 24}

# vLLM's default `gpu_memory_utilization`: the share of the device's memory one engine
# may use. Out of that share come the weights, the peak activations of a profiling
# forward pass and other allocations (CUDA graphs, library workspaces); the KV cache
# gets what is left. The remaining 10% is not a reserve for activations: the engine
# leaves it to everything else on the device.
DEFAULT_UTILIZATION = 0.9


def kv_budget_bytes(config: ModelConfig, gpu_bytes: int, weights_dtype="bf16",
                    utilization: float = DEFAULT_UTILIZATION, overhead_bytes: int = 0) -> int:
    """Bytes left for the KV cache: floor(utilization * gpu_bytes) - weights - overhead.

    `overhead_bytes` stands for what an engine takes besides the weights (activations,
    CUDA graphs); with the default 0 the result is an upper bound on an engine's cache.
    Negative if the weights do not fit.
    """
    if gpu_bytes <= 0:
        raise ConfigError(f"GPU memory must be positive, got {gpu_bytes}")
    if not 0 < utilization <= 1:
        raise ConfigError(f"utilization is the share of GPU memory used, in (0, 1], "
                          f"got {utilization}")
    _check_count("overhead_bytes", overhead_bytes)
    return (math.floor(gpu_bytes * utilization) - weights_bytes(config, weights_dtype)
            - int(overhead_bytes))


def max_context(config: ModelConfig, gpu_bytes: int, batch: int = 1,
                dtype: str | StorageType = "fp16", group_size: int | None = None,
                weights_dtype="bf16", utilization: float = DEFAULT_UTILIZATION,
                overhead_bytes: int = 0, sliding_window: bool = True) -> int | None:
    """Longest context each of `batch` sequences can reach in `gpu_bytes` of memory.

    0 if the weights do not fit (or not even one token does); None if memory sets no
    limit because a sliding window caps the cache below what fits.
    """
    batch = _check_count("batch", batch, 1)
    budget = kv_budget_bytes(config, gpu_bytes, weights_dtype, utilization, overhead_bytes)
    if budget <= 0:
        return 0
    tokens = budget // (batch * kv_bytes_per_token(config, dtype, group_size))
    if sliding_window and config.sliding_window is not None and tokens >= config.sliding_window:
        return None
    return int(tokens)


def max_batch(config: ModelConfig, gpu_bytes: int, tokens: int,
              dtype: str | StorageType = "fp16", group_size: int | None = None,
              weights_dtype="bf16", utilization: float = DEFAULT_UTILIZATION,
              overhead_bytes: int = 0, sliding_window: bool = True) -> int:
    """Most sequences of `tokens` tokens whose caches fit beside the weights (0 if none)."""
    _check_count("tokens", tokens, 1)
    budget = kv_budget_bytes(config, gpu_bytes, weights_dtype, utilization, overhead_bytes)
    one = kv_cache_bytes(config, tokens, 1, dtype, group_size, sliding_window)
    return max(0, int(budget // one))


def crossover_tokens(config: ModelConfig, batch: int = 1, dtype: str | StorageType = "fp16",
                     group_size: int | None = None, weights_dtype="bf16",
                     sliding_window: bool = True) -> int | None:
    """Shortest context at which the cache of `batch` sequences outgrows the weights
    (None if a sliding window stops it from ever doing so)."""
    batch = _check_count("batch", batch, 1)
    per_token = batch * kv_bytes_per_token(config, dtype, group_size)
    tokens = -(-weights_bytes(config, weights_dtype) // per_token)  # ceil
    if sliding_window and config.sliding_window is not None and tokens > config.sliding_window:
        return None
    return int(tokens)


# --- kvlib's own caches -------------------------------------------------------------
def contiguous_cache_nbytes(shape, max_batch: int, max_seq: int, dtype=np.float32) -> int:
    """Bytes a `ContiguousCache` allocates.

    `shape` is anything with `n_layers`, `n_kv_heads`, `head_dim` (a `ModelConfig`).
    Keys and values: two [n_layers, max_batch, n_kv_heads, max_seq, head_dim] arrays;
    metadata: `lengths` (int64) and `in_use` (bool), one entry per batch row.
    """
    itemsize = np.dtype(dtype).itemsize
    kv = 2 * shape.n_layers * max_batch * shape.n_kv_heads * max_seq * shape.head_dim * itemsize
    metadata = max_batch * (np.dtype(np.int64).itemsize + np.dtype(np.bool_).itemsize)
    return kv + metadata


# cache class -> formula giving its expected nbytes from its settings (not its arrays).
def padded_cache_nbytes(shape, max_batch: int, max_seq: int, dtype=np.float32) -> int:
    """Bytes a `PaddedCache` allocates: a contiguous cache plus one bool per
    (row, column) saying whether the column holds a real token or padding."""
    return contiguous_cache_nbytes(shape, max_batch, max_seq, dtype) + max_batch * max_seq


NBYTES_FORMULAS: dict[type, Callable[[KVCache], int]] = {
    ContiguousCache: lambda c: contiguous_cache_nbytes(c, c.max_batch, c.max_seq, c.keys.dtype),
    PaddedCache: lambda c: padded_cache_nbytes(c, c.max_batch, c.max_seq, c.keys.dtype),
    PagedCache: lambda c: paged_cache_nbytes(c.n_layers, c.n_kv_heads, c.head_dim, c.num_blocks,
                                             c.block_size, c.max_seqs, c.max_seq_len,
                                             c.keys.dtype),
    QuantizedCache: lambda c: quantized_cache_nbytes(c.n_layers, c.n_kv_heads, c.head_dim,
                                                     c.max_batch, c.max_seq, c.scheme),
}


def expected_nbytes(cache: KVCache) -> int:
    """What `cache.nbytes` must be, by the formula for its class."""
    formula = NBYTES_FORMULAS.get(type(cache))
    if formula is None:
        raise ConfigError(f"no memory formula for {type(cache).__name__}; "
                          "add one to kvlib.memory.NBYTES_FORMULAS")
    return formula(cache)


def format_bytes(n: float) -> str:
    """`n` bytes in binary units: '128.0 KiB', '1.50 GiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{1 if unit == 'KiB' else 2}f} {unit}"
    return f"{int(n)} B"
