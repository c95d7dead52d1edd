"""The KV cache on a GPU, on paper: sourced specifications, arithmetic intensity of every
part of a decode step, the roofline's prediction of its time, and how many blocks a
paged decode-attention kernel launches.

Nothing here runs on a GPU. `GPUS` holds figures from vendor datasheets and architecture
documents (the BibTeX keys of each row are in `GPUSpec.sources`); a figure that could
not be sourced is None, and `GPUSpec.unconfirmed` names it, so that no table or plot
silently fills it in. Units are SI: bytes/s, FLOP/s, bytes.

Arithmetic intensity (FLOPs per byte moved from memory) of the pieces of one step:

* **decode attention**, per KV head and cached token: the g query heads that share the
  KV head each do a dot product with the key and a weighted add of the value,
  4 * g * head_dim FLOPs, while the key and value cost 2 * (head_dim * b + metadata)
  bytes; so about 2g/b FLOP/byte, whatever the context or the batch;
* **prefill attention** of a chunk of C new tokens after P cached ones: every new token
  attends to all tokens before it, but K and V are read once for the whole chunk, so the
  intensity grows with C;
* **weight matmuls**: every parameter is read once per step and used by each of the B
  tokens in it (2 FLOPs each), so 2B / b_w FLOP/byte: batching raises it.

The roofline model (Williams, Waterman and Patterson, 2009) then bounds each part's time
by max(bytes / bandwidth, FLOPs / peak), and `decode_step` adds the two parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .config import ModelConfig
from .errors import ConfigError
from .memory import cached_tokens, storage_type, weights_bytes
from .roofline import Traffic

TERA = 10**12
GIGA = 10**9
MIB = 2**20
KIB = 2**10


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator, as its vendor documents it (dense figures, no sparsity).

    Attributes:
        name: short name used by `gpu()` and the command line.
        vendor: "NVIDIA" or "AMD".
        bandwidth: peak memory bandwidth, bytes/s.
        fp16_flops: dense FP16/BF16 matrix (tensor core) FLOP/s.
        fp32_flops: FP32 FLOP/s without tensor cores (vector).
        eight_bit_ops: dense 8-bit matrix operations/s (see `eight_bit_kind`), or None.
        eight_bit_kind: "fp8" or "int8": the 8-bit type the part's datasheet gives.
        memory_gb: memory as the datasheet states it, decimal gigabytes (1e9 bytes).
        reported_bytes: memory as software reports it (nvidia-smi's MiB * 2**20), or None.
        sms: streaming multiprocessors (compute units on AMD), or None.
        l2_bytes: L2 cache, bytes, or None.
        shared_per_sm: the most shared memory (LDS) one SM can give its blocks, bytes.
        sources: BibTeX keys of the documents the figures come from.
        note: where a figure is derived, or why one is missing.
    """

    name: str
    vendor: str
    bandwidth: float
    fp16_flops: float
    fp32_flops: float
    eight_bit_ops: float | None
    eight_bit_kind: str | None
    memory_gb: float
    reported_bytes: int | None
    sms: int | None
    l2_bytes: int | None
    shared_per_sm: int | None
    sources: tuple[str, ...]
    note: str = ""

    @property
    def unconfirmed(self) -> tuple[str, ...]:
        """Names of the figures no source confirmed (left as None)."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is None)

    @property
    def ridge_point(self) -> float:
        """FP16 FLOP/byte above which a kernel can be compute bound on this part."""
        return self.fp16_flops / self.bandwidth


# Datasheets quote some tensor figures only "with sparsity" (2:4 structured sparsity
# doubles them); the dense figure is half, which the architecture whitepapers confirm.
_HOPPER = ("nvidia2022hopperwhitepaper", "nvidia2023hoppertuning")
_AMPERE = ("nvidia2020a100datasheet", "nvidia2020amperewhitepaper", "nvidia2023amperetuning")
_ADA = ("nvidia2023adawhitepaper", "nvidia2023adatuning")
_SMI = "modal2024gpumemory"  # nvidia-smi capacities of cloud GPUs

GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    GPUSpec("A100-40GB-SXM", "NVIDIA", 1555 * GIGA, 312 * TERA, 19.5 * TERA, 624 * TERA,
            "int8", 40, 40960 * MIB, 108, 40 * MIB, 164 * KIB, _AMPERE + (_SMI,)),
    GPUSpec("A100-80GB-SXM", "NVIDIA", 2039 * GIGA, 312 * TERA, 19.5 * TERA, 624 * TERA,
            "int8", 80, 81920 * MIB, 108, 40 * MIB, 164 * KIB, _AMPERE + (_SMI,)),
    GPUSpec("H100-SXM", "NVIDIA", 3.35 * TERA, 1979 / 2 * TERA, 67 * TERA, 3958 / 2 * TERA,
            "fp8", 80, 81559 * MIB, 132, 50 * MIB, 228 * KIB,
            ("nvidia2023h100datasheet",) + _HOPPER + (_SMI,),
            "FP16 and FP8: half of the datasheet's figures with sparsity"),
    GPUSpec("H100-PCIe", "NVIDIA", 2.0 * TERA, 1513 / 2 * TERA, 51 * TERA, 3026 / 2 * TERA,
            "fp8", 80, None, 114, 50 * MIB, 228 * KIB,
            ("nvidia2023h100datasheet", "nvidia2023h100mig") + _HOPPER,
            "FP16 and FP8: half of the datasheet's figures with sparsity; "
            "no published nvidia-smi capacity found"),
    GPUSpec("H200-SXM", "NVIDIA", 4.8 * TERA, 1979 / 2 * TERA, 67 * TERA, 3958 / 2 * TERA,
            "fp8", 141, 143771 * MIB, None, None, None, ("nvidia2024h200datasheet", _SMI),
            "FP16 and FP8: half of the datasheet's figures with sparsity; the datasheet "
            "gives no SM count, L2 or shared-memory size"),
    GPUSpec("L4", "NVIDIA", 300 * GIGA, 242 / 2 * TERA, 30.3 * TERA, 485 / 2 * TERA, "fp8",
            24, 23034 * MIB, None, None, 100 * KIB,
            ("nvidia2023l4datasheet", "nvidia2023adatuning", _SMI),
            "FP16 and FP8: half of the datasheet's figures with sparsity; the datasheet "
            "gives no SM count or L2 size"),
    GPUSpec("L40S", "NVIDIA", 864 * GIGA, 362.05 * TERA, 91.6 * TERA, 733 * TERA, "fp8",
            48, 46068 * MIB, 142, None, 100 * KIB,
            ("nvidia2023l40sdatasheet",) + _ADA + (_SMI,),
            "SMs: the datasheet's 18,176 CUDA cores / 128 per Ada SM; no L2 size given"),
    GPUSpec("RTX-4090", "NVIDIA", 1008 * GIGA, 165.2 * TERA, 82.6 * TERA, None, None,
            24, None, 128, 72 * MIB, 100 * KIB, _ADA,
            "FP16 tensor with FP32 accumulate; 8-bit figures and nvidia-smi capacity "
            "not confirmed"),
    GPUSpec("MI300X", "AMD", 5.3 * TERA, 1307.4 * TERA, 163.4 * TERA, 2614.9 * TERA, "fp8",
            192, None, 304, 32 * MIB, None, ("amd2023mi300xdatasheet", "amd2024mi300rocm"),
            "compute units, not SMs; L2: 4 MB on each of 8 XCDs (plus a 256 MB Infinity "
            "Cache); LDS size and reported capacity not confirmed"),
)}


def gpu(name: str) -> GPUSpec:
    """The `GPUSpec` called `name` (see `GPUS`)."""
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


# --- arithmetic intensity -----------------------------------------------------------
def _attention_per_token(config: ModelConfig, dtype, group_size) -> tuple[int, int]:
    """(FLOPs, bytes) of one query token against one cached token, over all layers.

    MHA/GQA/MQA: per KV head, 4 * g * head_dim FLOPs and a key and a value of head_dim
    numbers. MLA (absorbed form, DeepSeek-V2 §2.1.3): every query head scores the cached
    latent and RoPE key, 2 * (d_c + d_r) FLOPs, and adds the weighted latent, 2 * d_c.
    """
    storage = storage_type(dtype, group_size)
    if config.attention_kind == "MLA":
        flops = config.n_heads * (4 * config.kv_lora_rank + 2 * config.rope_head_dim)
        kv = storage.vector_bytes(config.kv_lora_rank) + storage.vector_bytes(config.rope_head_dim)
    else:
        flops = 4 * config.n_heads * config.head_dim
        kv = 2 * config.n_kv_heads * storage.vector_bytes(config.head_dim)
    return config.n_layers * flops, config.n_layers * kv


def _check_positive(**values) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")


def decode_attention(config: ModelConfig, context: int, batch: int = 1, dtype="fp16",
                     group_size: int | None = None) -> Traffic:
    """FLOPs and K/V bytes of one decode step's attention, all layers, `batch` sequences
    of `context` tokens (a sliding window keeps fewer). Queries and outputs, O(head_dim)
    per head against O(context * head_dim), are left out."""
    _check_positive(context=context, batch=batch)
    flops, kv = _attention_per_token(config, dtype, group_size)
    tokens = batch * cached_tokens(config, context)
    return Traffic(tokens * kv, tokens * flops)


def prefill_attention(config: ModelConfig, chunk: int, past: int = 0, dtype="fp16",
                      group_size: int | None = None) -> Traffic:
    """FLOPs and K/V bytes of the attention of a chunk of `chunk` new tokens after `past`
    cached ones (one sequence, all layers, no sliding window).

    New token i (0-based) attends to past + i + 1 tokens, so the chunk does
    chunk * past + chunk * (chunk + 1) / 2 token pairs; K and V of the past + chunk
    tokens are read once (the kernel keeps the chunk's queries on chip, as
    FlashAttention does).
    """
    _check_positive(chunk=chunk)
    if int(past) != past or past < 0:
        raise ConfigError(f"past must be an integer >= 0, got {past}")
    flops, kv = _attention_per_token(config, dtype, group_size)
    pairs = chunk * past + chunk * (chunk + 1) // 2
    return Traffic((past + chunk) * kv, pairs * flops)


def weight_matmuls(config: ModelConfig, tokens: int, dtype="bf16") -> Traffic:
    """FLOPs and bytes of the weight matrix products of a step over `tokens` tokens.

    Every parameter is read once and does a multiply-add for each token. All
    `config.n_params` are counted: the input embedding table (only gathered) and, for a
    mixture of experts, the experts a step does not use make this an upper bound.
    """
    _check_positive(tokens=tokens)
    if config.n_params is None:
        raise ConfigError("this configuration has no parameter count (n_params)")
    return Traffic(weights_bytes(config, dtype), 2 * config.n_params * tokens)


# --- the roofline's prediction ------------------------------------------------------
@dataclass(frozen=True)
class PartTime:
    """A part of a step on the roofline: its traffic, its bound and its time (s)."""

    traffic: Traffic
    bound: str
    seconds: float


def roofline_time(traffic: Traffic, spec: GPUSpec, peak_flops: float | None = None) -> PartTime:
    """Time the roofline allows: max(bytes / bandwidth, FLOPs / peak) (FP16 peak by default)."""
    peak = spec.fp16_flops if peak_flops is None else peak_flops
    memory_s, compute_s = traffic.bytes / spec.bandwidth, traffic.flops / peak
    return PartTime(traffic, "memory" if memory_s >= compute_s else "compute",
                    max(memory_s, compute_s))


@dataclass(frozen=True)
class StepPrediction:
    """Predicted time of one decode step: attention plus weight matmuls, each at its roof.

    `bound` is the bound of the part that takes longer.
    """

    attention: PartTime
    weights: PartTime

    @property
    def seconds(self) -> float:
        return self.attention.seconds + self.weights.seconds

    @property
    def bound(self) -> str:
        slower = max((self.attention, self.weights), key=lambda p: p.seconds)
        return slower.bound


def decode_step(config: ModelConfig, spec: GPUSpec, context: int, batch: int = 1,
                dtype="fp16", group_size: int | None = None,
                weights_dtype="bf16") -> StepPrediction:
    """The roofline's time for one decode step of `batch` sequences at `context` tokens.

    The model runs once per step: weights are read once for the batch, each sequence
    reads its own KV cache. Norms, RoPE, sampling and kernel launches are ignored, so
    this is a lower bound.
    """
    return StepPrediction(roofline_time(decode_attention(config, context, batch, dtype,
                                                         group_size), spec),
                          roofline_time(weight_matmuls(config, batch, weights_dtype), spec))


# --- mapping paged decode attention to a grid ---------------------------------------
@dataclass(frozen=True)
class Occupancy:
    """How a grid of one block per (sequence, KV head, split) fills a GPU.

    Attributes:
        blocks: thread blocks launched.
        sms: streaming multiprocessors of the GPU.
        waves: rounds of one block per SM needed to run them all.
        busy_fraction: share of SM-rounds that have a block, blocks / (waves * sms).
    """

    blocks: int
    sms: int
    waves: int
    busy_fraction: float


def decode_grid(batch: int, n_kv_heads: int, n_splits: int, sms: int) -> Occupancy:
    """Occupancy of a split-K decode launch, counting one resident block per SM.

    A real SM can hold several blocks at once; with one per SM the count says how many
    SMs have any work at all, which is what a short, memory-bound kernel needs.
    """
    _check_positive(batch=batch, n_kv_heads=n_kv_heads, n_splits=n_splits, sms=sms)
    blocks = batch * n_kv_heads * n_splits
    waves = math.ceil(blocks / sms)
    return Occupancy(blocks, sms, waves, blocks / (waves * sms))


def gpu_splits(batch: int, n_kv_heads: int, context: int, sms: int,
               min_tokens: int = 256) -> int:
    """Split-K count for a GPU: the CPU kernels' rule (`kvlib.kernels.cpu.choose_splits`)
    with SMs in place of threads, and splits of at least `min_tokens` tokens."""
    from .kernels.cpu import choose_splits

    _check_positive(batch=batch, n_kv_heads=n_kv_heads, context=context, sms=sms)
    return choose_splits(batch * n_kv_heads, context, n_threads=sms, min_tokens=min_tokens)


# --- coalescing -------------------------------------------------------------------
WARP_SIZE = 32
SECTOR_BYTES = 32  # the unit in which NVIDIA GPUs move global memory to the SM


def sectors_per_load(dims, itemsize: int = 4) -> int:
    """32-byte sectors one warp-wide load touches when lane k reads element dims[k] of a
    contiguous row (each `itemsize` bytes). The fewest possible is
    ceil(32 * itemsize / 32): consecutive lanes reading consecutive elements."""
    return len({(int(d) * itemsize) // SECTOR_BYTES for d in dims})
