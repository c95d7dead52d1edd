"""The roofline of the machine you run on, measured, and kernels placed on it.

The roofline model (Williams, Waterman and Patterson, 2009) bounds the speed of a kernel
that does `flops` floating-point operations while moving `bytes` to or from DRAM:

    attainable FLOP/s = min(peak FLOP/s, bandwidth * intensity),  intensity = flops / bytes

Both roofs are *measured* here with Numba kernels:

* bandwidth: STREAM-style read (sum), copy (b = a) and triad (a = b + s * c) kernels on
  arrays far larger than the last-level cache, counting the bytes the kernel names
  (reads + writes, as STREAM does). The three run in turn, several rounds, and each
  figure is the median of its rounds, reported with the lowest and highest: a shared or
  throttled machine moves between rounds by tens of percent. The roof is the best of the
  three medians.
* `ReadProbe` samples the read bandwidth *between* other timings, so a benchmark can
  state its kernels' fraction of the roof measured in the same minutes.
* peak FP32: every thread updates 64 independent accumulators with fused multiply-adds
  (2 FLOPs each) that the compiler packs into SIMD registers and keeps there.

`attention_traffic` gives the bytes and FLOPs of one decode-attention call, so any
kernel's measured time places it on the plot.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from .errors import ConfigError

# Independent accumulators per thread in the peak-FLOP kernel: eight 8-float registers,
# enough chains to hide a 4-cycle FMA latency on two FMA pipes, few enough to stay in the
# 16 vector registers of AVX2. With 256 they spill to memory, and every FMA then waits on
# a load and a store: the kernel would time the first-level cache, not the FMA units.
FMA_WIDTH = 64


@njit(parallel=True, cache=True)
def _fill(a, value):
    """a[:] = value, in parallel, so each page is first touched by the thread that streams it."""
    for i in prange(a.shape[0]):
        a[i] = value


@njit(cache=True, fastmath={"reassoc"})
def _sum(a):
    total = np.float32(0.0)
    for i in range(a.shape[0]):
        total += a[i]
    return total


@njit(parallel=True, cache=True)
def stream_read(a, n_chunks):
    """Sum of `a` (reads a.nbytes), in `n_chunks` parallel pieces."""
    per_chunk = (a.shape[0] + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, dtype=np.float32)
    for c in prange(n_chunks):
        partial[c] = _sum(a[c * per_chunk:(c + 1) * per_chunk])
    return partial.sum()


@njit(parallel=True, cache=True)
def stream_copy(dst, src):
    """dst[:] = src (reads and writes one array each)."""
    for i in prange(src.shape[0]):
        dst[i] = src[i]


@njit(parallel=True, cache=True)
def stream_triad(a, b, c, s):
    """a[:] = b + s * c (reads two arrays, writes one)."""
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@njit(cache=True, fastmath={"contract"})
def _fma_chain(acc, n_iter, x, y):
    """n_iter rounds of acc = acc * x + y on FMA_WIDTH independent accumulators.

    The inner trip count is the compile-time constant FMA_WIDTH, so the compiler unrolls
    it and keeps the accumulators in SIMD registers: enough independent chains to hide
    the FMA latency on every port. (`contract` allows fusing * and + into one FMA.)
    """
    for _ in range(n_iter):
        for u in range(FMA_WIDTH):
            acc[u] = acc[u] * x + y


@njit(parallel=True, cache=True)
def fma_peak(n_threads, n_iter):
    """n_threads * n_iter * FMA_WIDTH fused multiply-adds; returns their (unused) sums."""
    out = np.zeros(n_threads, dtype=np.float32)
    for t in prange(n_threads):
        acc = np.full(FMA_WIDTH, np.float32(t), dtype=np.float32)
        _fma_chain(acc, n_iter, np.float32(0.999999), np.float32(1e-7))
        out[t] = acc.sum()
    return out


def call_times(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after one untimed call (compile, warm-up)."""
    fn()
    return [seconds_of(fn) for _ in range(repeats)]


def seconds_of(fn) -> float:
    """Seconds of one call of fn (no warm-up: for rounds that interleave kernels)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls: the machine's best, for its compute roofs."""
    return min(call_times(fn, repeats))


def last_level_cache_bytes(cpu_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size in bytes of the largest data cache of CPU 0, read from Linux's sysfs
    (`index*/level`, `type` and `size`); 32 MiB, a large server's L3, where sysfs is absent."""
    sizes = {}
    for index in cpu_dir.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes[level] = int(size.rstrip("KMG")) * units.get(size[-1], 1)
    return sizes[max(sizes)] if sizes else 32 * 2**20


def _big_array_mb(array_mb: int | None) -> int:
    """`array_mb`, or by default 4 times the last-level cache and at least 128 MiB."""
    if array_mb is None:
        return max(128, 4 * last_level_cache_bytes() // 2**20)
    if array_mb < 1:
        raise ConfigError(f"array_mb must be positive, got {array_mb}")
    return array_mb


@dataclass(frozen=True)
class Roofline:
    """A machine's two roofs.

    Attributes:
        bandwidth: bytes/s per STREAM kernel ("read", "copy", "triad"), median of rounds.
        peak_flops: FP32 FLOP/s of the FMA kernel (its fastest run).
        threads: Numba threads used.
        machine: a short description (processor, cores).
        bandwidth_range: (lowest, highest) bytes/s of each STREAM kernel over the rounds.
    """

    bandwidth: dict
    peak_flops: float
    threads: int
    machine: str
    bandwidth_range: dict | None = None

    @property
    def memory_roof(self) -> float:
        """The bandwidth roof in bytes/s: the best STREAM kernel."""
        return max(self.bandwidth.values())

    @property
    def ridge_point(self) -> float:
        """Intensity (FLOP/byte) above which a kernel can be compute bound."""
        return self.peak_flops / self.memory_roof

    def attainable(self, intensity):
        """Roofline bound in FLOP/s at `intensity` FLOP/byte."""
        return np.minimum(self.peak_flops, self.memory_roof * np.asarray(intensity))


def measure_roofline(array_mb: int | None = None, repeats: int = 5,
                     fma_seconds: float = 0.1) -> Roofline:
    """Measure bandwidth (read, copy, triad on `array_mb` MiB float32 arrays) and peak FP32.

    Three arrays are allocated (3 * array_mb MiB); by default each is 4 times the
    last-level cache and at least 128 MiB, so that every byte comes from DRAM. The three
    bandwidth kernels take turns for `repeats` rounds after a warm-up; each figure is the
    median of its rounds. The FMA kernel runs for at least `fma_seconds` per call, and
    its fastest of `repeats` runs is the peak.
    """
    array_mb = _big_array_mb(array_mb)
    if repeats < 1:
        raise ConfigError(f"repeats must be positive, got {repeats}")
    n = array_mb * 2**20 // 4
    threads = numba.get_num_threads()
    a, b, c = (np.empty(n, dtype=np.float32) for _ in range(3))
    for x, value in ((a, 1.0), (b, 2.0), (c, 0.5)):
        _fill(x, np.float32(value))
    chunks = 16 * threads
    kernels = {  # name -> (call, bytes it moves)
        "read": (lambda: stream_read(a, chunks), a.nbytes),
        "copy": (lambda: stream_copy(b, a), 2 * a.nbytes),
        "triad": (lambda: stream_triad(a, b, c, np.float32(3.0)), 3 * a.nbytes),
    }
    rates = {name: [] for name in kernels}
    for name, (call, _) in kernels.items():
        call()  # compile, warm up
    for _ in range(repeats):
        for name, (call, n_bytes) in kernels.items():
            rates[name].append(n_bytes / seconds_of(call))
    del a, b, c
    fma_peak(threads, 10)  # compile / warm up
    n_iter = 1000
    while _best_time(lambda: fma_peak(threads, n_iter), 1) < fma_seconds:
        n_iter *= 2  # long enough that starting the threads is a negligible part
    seconds = _best_time(lambda: fma_peak(threads, n_iter), repeats)
    peak = 2 * threads * n_iter * FMA_WIDTH / seconds
    machine = f"{platform.processor() or platform.machine()}, {threads} threads"
    return Roofline({k: float(np.median(v)) for k, v in rates.items()}, peak, threads,
                    machine, {k: (min(v), max(v)) for k, v in rates.items()})


class ReadProbe:
    """The read bandwidth of DRAM, sampled between the timings of other kernels.

    Each `sample()` sums a float32 array of `array_mb` MiB (by default 4 times the
    last-level cache, at least 128 MiB) with `stream_read` and records bytes/s. A
    benchmark that calls it after every round of its own timings gets a roof measured in
    the same minutes as its kernels, and the spread of that roof.
    """

    def __init__(self, array_mb: int | None = None) -> None:
        n = _big_array_mb(array_mb) * 2**20 // 4
        self.array = np.empty(n, dtype=np.float32)
        _fill(self.array, np.float32(1.0))
        self.chunks = 16 * numba.get_num_threads()
        stream_read(self.array, self.chunks)  # compile, warm up
        self.samples: list[float] = []

    def sample(self) -> float:
        """Time one pass over the array; returns (and records) its bytes/s."""
        rate = self.array.nbytes / seconds_of(lambda: stream_read(self.array, self.chunks))
        self.samples.append(rate)
        return rate

    @property
    def median(self) -> float:
        """Median bytes/s of the samples so far (one is taken if there are none)."""
        if not self.samples:
            self.sample()
        return float(np.median(self.samples))


def measure_matmul_roof(rows: int = 2048, inner: int = 576, cols: int = 1536,
                       repeats: int = 3) -> float:
    """FP32 FLOP/s of NumPy's matrix product (BLAS) on a `[rows, inner] @ [inner, cols]`
    product, best of `repeats` after a warm-up.

    The default shape is SmolLM2-135M's feed-forward projection over 2,048 tokens: the
    speed the weight matrices of a prefill can reach on this machine, which a prefill
    can at best approach (the FMA kernel's `peak_flops` is what no real product reaches).
    """
    if min(rows, inner, cols, repeats) < 1:
        raise ConfigError("matrix sizes and repeats must be positive")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner), dtype=np.float32)
    b = rng.standard_normal((cols, inner), dtype=np.float32)   # [out, in], as weights are
    return 2 * rows * inner * cols / _best_time(lambda: a @ b.T, repeats)


@dataclass(frozen=True)
class Traffic:
    """Work of one decode-attention call.

    Attributes:
        bytes: bytes that must come from memory (K/V as stored, scales, queries, outputs).
        flops: floating-point operations (2 per multiply-add; softmax ignored, it is O(S)).
    """

    bytes: float
    flops: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes


def attention_traffic(batch: int, context: int, n_heads: int, n_kv_heads: int,
                      head_dim: int, kv_bytes_per_value: float = 4.0,
                      extra_bytes_per_token: float = 0.0) -> Traffic:
    """Bytes and FLOPs of decode attention: one query per sequence over `context` tokens.

    Each token's key and value (n_kv_heads * head_dim values each) are read once; every
    query head does a dot product with each key (2 * head_dim FLOPs) and adds a weighted
    value (2 * head_dim FLOPs). `extra_bytes_per_token` counts per-token metadata read
    along with K/V (quantization scales, for example).
    """
    kv = 2 * n_kv_heads * head_dim * kv_bytes_per_value + extra_bytes_per_token
    io = 2 * n_heads * head_dim * 4  # query in, output out (float32)
    flops = 4 * n_heads * head_dim * context
    return Traffic(batch * (context * kv + io), batch * flops)


def plot_roofline(ax, roof: Roofline, intensity_range=(0.05, 100.0)):
    """Draw the measured roofline on a matplotlib axis (log-log, GFLOP/s vs FLOP/byte)."""
    x = np.geomspace(*intensity_range, 200)
    ax.loglog(x, roof.attainable(x) / 1e9, color="black", linewidth=2,
              label=f"roof: {roof.memory_roof / 1e9:.1f} GB/s, {roof.peak_flops / 1e9:.0f} GFLOP/s")
    for name, bw in roof.bandwidth.items():
        if bw < roof.memory_roof:
            ax.loglog(x, np.minimum(roof.peak_flops, bw * x) / 1e9, ":", color="grey",
                      linewidth=1)
    ax.axvline(roof.ridge_point, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"Roofline of this machine ({roof.machine})")
    return ax
