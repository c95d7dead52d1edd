"""Benchmarks of decode attention, of whole decode steps and of prefill, used by
`kvlib bench` and chapter 8.

Attention is timed through the cache protocol, exactly as the model calls it: a cache is
filled with `context` tokens per sequence, one decode step is planned and written, and
`cache.attend` is timed (median of repeats, after a warm-up call that also compiles).
The backends of one shape take turns, round after round, with a sample of the DRAM read
bandwidth after each round: every fraction of the roof is against the roof of the same
run.
Whole steps time `model.forward` and, inside it, the share spent in `cache.attend`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .cache import ContiguousCache, PagedCache
from .cache.quantized import QuantizedCache, QuantScheme
from .errors import ConfigError
from .roofline import (ReadProbe, Traffic, attention_traffic, last_level_cache_bytes,
                       seconds_of)


@dataclass(frozen=True)
class AttentionBackend:
    """One way of running decode attention: a cache type plus its attend backend.

    Attributes:
        name: how benchmarks and plots label it.
        make_cache: (n_kv_heads, head_dim, batch, max_seq) -> an empty one-layer cache.
        bytes_per_value: storage bytes of one key or value element.
        meta_bytes_per_vector: metadata read with each stored key or value vector of one
            head and token (e.g. a quantization scale).
    """

    name: str
    make_cache: Callable
    bytes_per_value: float = 4.0
    meta_bytes_per_vector: float = 0.0


def _contiguous(backend: str) -> Callable:
    return lambda n_kv_heads, head_dim, batch, max_seq: ContiguousCache(
        1, n_kv_heads, head_dim, batch, max_seq, backend=backend)


def _paged(backend: str, block_size: int = 16) -> Callable:
    def make(n_kv_heads, head_dim, batch, max_seq):
        blocks = batch * -(-max_seq // block_size)
        return PagedCache(1, n_kv_heads, head_dim, blocks, block_size, max_seqs=batch,
                          max_seq_len=max_seq).set_backend(backend)
    return make


def _int8(backend: str) -> Callable:
    def make(n_kv_heads, head_dim, batch, max_seq):
        return QuantizedCache(1, n_kv_heads, head_dim, batch, max_seq,
                              QuantScheme(bits=8, symmetric=True)).set_backend(backend)
    return make


ATTENTION_BACKENDS = {
    "numpy": AttentionBackend("numpy", _contiguous("numpy")),
    "numba": AttentionBackend("numba", _contiguous("numba")),
    "paged-numpy": AttentionBackend("paged-numpy", _paged("numpy")),
    "paged-numba": AttentionBackend("paged-numba", _paged("numba")),
    # int8 codes plus one float16 scale per (token, head), for keys and for values
    "int8-numpy": AttentionBackend("int8-numpy", _int8("numpy"), 1.0, 2.0),
    "int8-numba": AttentionBackend("int8-numba", _int8("numba"), 1.0, 2.0),
}


def filled_cache(backend: AttentionBackend, batch: int, context: int, n_kv_heads: int,
                 head_dim: int, seed: int = 0, chunk: int = 1024):
    """A one-layer cache holding `context` tokens for each of `batch` sequences.

    Keys/values are random; one random chunk is reused along the context (timing does
    not depend on the values). Returns (cache, sequence ids).
    """
    rng = np.random.default_rng(seed)
    cache = backend.make_cache(n_kv_heads, head_dim, batch, context + 1)
    seqs = [cache.new_sequence() for _ in range(batch)]
    block = rng.standard_normal((chunk, n_kv_heads, head_dim), dtype=np.float32)
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        plan = cache.plan(seqs, [n] * batch)
        k = np.tile(block[:n], (batch, 1, 1))
        cache.write(0, plan, k, k[::-1].copy())
        cache.commit(plan)
    return cache, seqs


@dataclass(frozen=True)
class AttentionBench:
    """Decode-attention timings and the bandwidth roof measured between them.

    Attributes:
        rows: one dict per (shape, backend): backend, batch, context, seconds (median),
            bytes (that must be read), gb_per_s (bytes / seconds, 1e9 bytes per GB),
            fraction_of_roof (of `roof`), gflop_per_s, intensity (FLOP/byte), and
            beyond_llc (the bytes exceed the last-level cache, so they come from DRAM).
        roof_samples: DRAM read bandwidth, bytes/s, one sample after every round.
        llc_bytes: the last-level cache the rows were compared with.
    """

    rows: list
    roof_samples: list
    llc_bytes: int

    @property
    def roof(self) -> float:
        """The bandwidth roof of this run: the median of its samples, bytes/s."""
        return float(np.median(self.roof_samples))

    @property
    def roof_range(self) -> tuple[float, float]:
        """(lowest, highest) read bandwidth sampled during the run, bytes/s."""
        return min(self.roof_samples), max(self.roof_samples)

    def fraction(self, backend: str) -> float:
        """Median fraction of the roof of `backend` over the shapes beyond the LLC
        (NaN if there are none)."""
        found = [r["fraction_of_roof"] for r in self.rows
                 if r["backend"] == backend and r["beyond_llc"]]
        return float(np.median(found)) if found else float("nan")


def bench_attention(backends, batches, contexts, n_heads: int = 9, n_kv_heads: int = 3,
                    head_dim: int = 64, repeats: int = 5, progress: bool = False,
                    probe: ReadProbe | None = None) -> AttentionBench:
    """Time decode attention for every (backend, batch, context).

    For each shape the backends' caches are filled, each is called once (warm-up,
    compile), then `repeats` rounds time one call of each backend in turn followed by
    one `probe.sample()` of the read bandwidth (a new `ReadProbe` if none is given).
    """
    unknown = [b for b in backends if b not in ATTENTION_BACKENDS]
    if unknown:
        raise ConfigError(f"unknown attention backend(s) {unknown}; "
                          f"choose from {sorted(ATTENTION_BACKENDS)}")
    if min(batches) < 1 or min(contexts) < 1 or repeats < 1:
        raise ConfigError("batch sizes, contexts and repeats must be positive")
    probe = probe or ReadProbe()
    shapes = [(b, c) for c in contexts for b in batches]
    if progress:
        from tqdm.auto import tqdm
        shapes = tqdm(shapes, desc="bench attention")
    timed = []  # (name, batch, context, median seconds, traffic)
    for batch, context in shapes:
        calls = {name: decode_call(ATTENTION_BACKENDS[name], batch, context, n_heads,
                                   n_kv_heads, head_dim) for name in backends}
        seconds = {name: [] for name in backends}
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                seconds[name].append(seconds_of(call))
            probe.sample()
        for name in backends:
            backend = ATTENTION_BACKENDS[name]
            work = attention_traffic(batch, context, n_heads, n_kv_heads, head_dim,
                                     backend.bytes_per_value,
                                     2 * n_kv_heads * backend.meta_bytes_per_vector)
            timed.append((name, batch, context, float(np.median(seconds[name])), work))
        del calls
    llc = last_level_cache_bytes()
    result = AttentionBench([], list(probe.samples), llc)
    result.rows.extend(_row(*t, result.roof, llc) for t in timed)
    return result


def decode_call(backend: AttentionBackend, batch: int, context: int, n_heads: int,
                n_kv_heads: int, head_dim: int, seed: int = 1) -> Callable:
    """`cache.attend` of one decode step over `context` tokens per sequence, ready to call."""
    rng = np.random.default_rng(seed)
    cache, seqs = filled_cache(backend, batch, context - 1, n_kv_heads, head_dim)
    plan = cache.plan(seqs, [1] * batch)
    k = rng.standard_normal((batch, n_kv_heads, head_dim), dtype=np.float32)
    cache.write(0, plan, k, k)
    q = rng.standard_normal((batch, n_heads, head_dim), dtype=np.float32)
    return lambda: cache.attend(0, plan, q)


def _row(backend: str, batch: int, context: int, seconds: float, work: Traffic,
        roof: float, llc_bytes: int) -> dict:
    """One benchmark row: effective bandwidth and its share of the `roof` (bytes/s)."""
    bandwidth = work.bytes / seconds
    return {"backend": backend, "batch": batch, "context": context, "seconds": seconds,
            "bytes": work.bytes, "gb_per_s": bandwidth / 1e9,
            "fraction_of_roof": bandwidth / roof, "gflop_per_s": work.flops / seconds / 1e9,
            "intensity": work.intensity, "beyond_llc": bool(work.bytes > llc_bytes)}


@dataclass(frozen=True)
class DecodeProfile:
    """Median time of one real-model decode step and of its attention calls.

    Attributes:
        backend: the cache's attention backend.
        context: tokens in the cache when the step starts.
        step_seconds: whole forward step (all layers, LM head).
        attention_seconds: part of it spent in `cache.attend` (all layers).
        batch: sequences decoding together, one new token each per step.
    """

    backend: str
    context: int
    step_seconds: float
    attention_seconds: float
    batch: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_seconds

    @property
    def attention_share(self) -> float:
        return self.attention_seconds / self.step_seconds


def profile_decode(model, cache, seq_id: int, context: int, steps: int = 4,
                   token: int = 198) -> DecodeProfile:
    """Time `steps` decode steps of one sequence cropped to `context` cached tokens.

    The sequence must already hold at least `context` tokens; it is cropped back to
    `context` first, so one filled cache serves every context. One untimed step warms up.
    """
    if steps < 1 or not 1 <= context <= cache.length(seq_id):
        raise ConfigError(f"need steps >= 1 and 1 <= context <= {cache.length(seq_id)}")
    with timed_attention(cache) as attention_times:
        cache.crop(seq_id, context)
        model.forward([[token]], cache, [seq_id])  # warm-up
        step_times, per_step_attention = [], []
        for _ in range(steps):
            attention_times.clear()
            start = time.perf_counter()
            model.forward([[token]], cache, [seq_id])
            step_times.append(time.perf_counter() - start)
            per_step_attention.append(sum(attention_times))
    return DecodeProfile(cache.backend, context, float(np.median(step_times)),
                         float(np.median(per_step_attention)))


@contextlib.contextmanager
def timed_attention(cache):
    """Within the block, every `cache.attend` call appends its seconds to the list
    this yields."""
    attend = cache.attend
    seconds: list[float] = []

    def timed_attend(layer, plan, q):
        start = time.perf_counter()
        out = attend(layer, plan, q)
        seconds.append(time.perf_counter() - start)
        return out

    cache.attend = timed_attend  # instance attribute: shadows the method for the block
    try:
        yield seconds
    finally:
        del cache.attend


def prefill_flops(config, n_tokens: int) -> tuple[float, float]:
    """(weight-matrix FLOPs, attention FLOPs) of a prefill of `n_tokens` tokens.

    Weight matrices: per layer and token, a multiply-add (2 FLOPs) for every parameter of
    the Q, K, V and output projections and of the three feed-forward matrices; the LM
    head for the last token only. Attention: 4 * n_heads * head_dim FLOPs per (query,
    visible key) pair, n (n + 1) / 2 pairs per layer for a causal prefill; a kernel that
    computes the masked half as well does twice that, the useful work stays this.
    """
    if n_tokens < 1:
        raise ConfigError(f"n_tokens must be positive, got {n_tokens}")
    c = config
    per_layer = (c.hidden_size * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
                 + c.n_heads * c.head_dim * c.hidden_size
                 + 3 * c.hidden_size * c.intermediate_size)
    weights = 2 * n_tokens * per_layer * c.n_layers + 2 * c.hidden_size * c.vocab_size
    attention = 4 * c.n_heads * c.head_dim * n_tokens * (n_tokens + 1) / 2 * c.n_layers
    return float(weights), float(attention)


@dataclass(frozen=True)
class PrefillTiming:
    """Median time of a real-model prefill of one sequence.

    Attributes:
        backend: the cache's attention backend.
        tokens: prompt tokens.
        seconds: the whole `model.forward` (all layers, last token's logits).
        attention_seconds: the part spent in `cache.attend` (all layers).
        flops: useful FLOPs (`prefill_flops`, weights plus attention).
    """

    backend: str
    tokens: int
    seconds: float
    attention_seconds: float
    flops: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def bench_prefill(model, ids, backends,
                  repeats: int = 3) -> tuple[list[PrefillTiming], list[float]]:
    """Prefill `ids` into an empty float32 contiguous cache with each attention backend.

    Rounds interleave the backends with a measurement of the matmul roof
    (`measure_matmul_roof` over as many rows as tokens), so a machine that slows down
    mid-run slows every figure alike; the first round warms up (and compiles) and is
    dropped. Returns (one `PrefillTiming` per backend, median times of `repeats`
    rounds; the matmul roof of each timed round in FLOP/s).
    """
    from .roofline import measure_matmul_roof

    unknown = [b for b in backends if b not in ("numpy", "numba")]
    if unknown or repeats < 1:
        raise ConfigError(f"prefill backends are numpy and numba (got {backends}); "
                          f"repeats must be positive (got {repeats})")
    ids = np.asarray(ids, dtype=np.int64)
    config = model.config
    caches = {b: ContiguousCache.from_config(config, 1, len(ids), backend=b) for b in backends}
    totals = {b: [] for b in backends}
    in_attention = {b: [] for b in backends}
    roofs = []
    for _ in range(repeats + 1):
        for backend, cache in caches.items():
            cache.reset()
            with timed_attention(cache) as attention_times:
                start = time.perf_counter()
                model.forward([ids], cache, [cache.new_sequence()])
                totals[backend].append(time.perf_counter() - start)
            in_attention[backend].append(sum(attention_times))
        roofs.append(measure_matmul_roof(len(ids), config.hidden_size,
                                         config.intermediate_size, repeats=1))
    flops = sum(prefill_flops(config, len(ids)))
    timings = [PrefillTiming(b, len(ids), float(np.median(totals[b][1:])),
                             float(np.median(in_attention[b][1:])), flops) for b in backends]
    return timings, roofs[1:]


def extend_by_repetition(cache, seq_id: int, length: int) -> None:
    """Grow a sequence of a `ContiguousCache` to `length` tokens by repeating its keys/values.

    For timing long contexts without a long prefill: the cost of a decode step depends on
    how many tokens are cached, not on what they are.
    """
    have = cache.length(seq_id)
    if have < 1 or length < have:
        raise ConfigError(f"sequence holds {have} tokens; cannot extend it to {length}")
    if length == have:
        return
    plan = cache.plan([seq_id], [length - have])
    reps = -(-length // have)
    for layer in range(cache.n_layers):
        k, v = (np.tile(x[layer, seq_id, :, :have], (1, reps, 1))[:, have:length]
                .transpose(1, 0, 2).copy() for x in (cache.keys, cache.values))
        cache.write(layer, plan, k, v)
    cache.commit(plan)

def bench_decode(model, ids, batch: int, backends, steps: int = 8,
                 token: int = 198) -> list[DecodeProfile]:
    """End-to-end decode: `batch` sequences holding `ids` each, one token per step.

    Each backend gets a float32 contiguous cache; `ids` is prefilled once (with the
    Numba kernels) and copied into the other rows through the cache protocol. Steps
    then alternate between the backends, one warm-up step each first; the median step
    of `steps` is kept.
    """
    if batch < 1 or steps < 1:
        raise ConfigError(f"batch and steps must be positive, got {batch}, {steps}")
    ids = np.asarray(ids, dtype=np.int64)
    caches = {}
    for backend in backends:
        cache = ContiguousCache.from_config(model.config, batch, len(ids) + steps + 1,
                                            backend="numba")
        first = cache.new_sequence()
        model.forward([ids], cache, [first])
        others = [cache.new_sequence() for _ in range(batch - 1)]
        if others:
            plan = cache.plan(others, [len(ids)] * len(others))
            for layer in range(cache.n_layers):
                k, v = (np.tile(x[layer, first, :, :len(ids)].transpose(1, 0, 2),
                                (len(others), 1, 1)) for x in (cache.keys, cache.values))
                cache.write(layer, plan, k, v)
            cache.commit(plan)
        caches[backend] = cache.set_backend(backend)
    step_times = {b: [] for b in backends}
    attention = {b: [] for b in backends}
    feed = [np.array([token])] * batch
    for _ in range(steps + 1):
        for backend, cache in caches.items():
            with timed_attention(cache) as attention_times:
                start = time.perf_counter()
                model.forward(feed, cache, cache.sequences())
                step_times[backend].append(time.perf_counter() - start)
            attention[backend].append(sum(attention_times))
    return [DecodeProfile(b, len(ids), float(np.median(step_times[b][1:])),
                          float(np.median(attention[b][1:])), batch) for b in backends]
