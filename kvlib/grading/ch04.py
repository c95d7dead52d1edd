"""Graders for chapter 4's exercises (memory growth).

Every expected value comes from `kvlib.memory`, applied to real model presets and to
edge cases (MQA's single KV head, a last quantization group that is not full, weights
that do not fit the GPU).
"""

from __future__ import annotations

import numpy as np

from ..cache import ContiguousCache
from ..config import preset
from ..memory import (GPU_MEMORY_BYTES, StorageType, kv_budget_bytes, kv_bytes_per_token,
                      max_context, weights_bytes)
from . import Report, grade_prediction, refuses_kvlib, run_cases


def _same_int(got, want: int) -> str | None:
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, np.integer)):
        return f"returned {got!r} ({type(got).__name__}); expected the integer {want}"
    if got != want:
        return f"returned {int(got):,}, expected {want:,}"
    return None


_FLOAT_BYTES = {"fp32": 4, "fp16": 2}


@refuses_kvlib()
def grade_kv_bytes_per_token(fn) -> Report:
    """fn(n_layers, n_kv_heads, head_dim, bytes_per_value) -> bytes one token adds (MHA/GQA/MQA)."""
    cases = []
    for name in ("smollm2-135m", "llama-2-7b", "llama-3-8b", "falcon-7b", "qwen2.5-7b"):
        c = preset(name)
        for dtype in ("fp16", "fp32"):
            want = kv_bytes_per_token(c, dtype)
            cases.append((f"{name} ({c.attention_kind}) in {dtype}",
                          lambda c=c, d=dtype, w=want:
                          _same_int(fn(c.n_layers, c.n_kv_heads, c.head_dim, _FLOAT_BYTES[d]), w)))
    cases.append(("one layer, one head of size 1, 1 byte (keys AND values count)",
                  lambda: _same_int(fn(1, 1, 1, 1), 2)))
    return run_cases("kv_bytes_per_token", cases)


@refuses_kvlib()
def grade_mla_bytes_per_token(fn) -> Report:
    """fn(n_layers, kv_lora_rank, rope_head_dim, bytes_per_value) -> bytes per token (MLA)."""
    ds = preset("deepseek-v2")
    cases = [
        ("DeepSeek-V2 in fp16", lambda: _same_int(
            fn(ds.n_layers, ds.kv_lora_rank, ds.rope_head_dim, 2), kv_bytes_per_token(ds, "fp16"))),
        ("DeepSeek-V2 in fp32", lambda: _same_int(
            fn(ds.n_layers, ds.kv_lora_rank, ds.rope_head_dim, 4), kv_bytes_per_token(ds, "fp32"))),
        ("a latent is cached once per layer, not once per head (nor twice for K and V)",
         lambda: _same_int(fn(1, 8, 2, 1), 10)),
        ("the shared RoPE key of rope_head_dim numbers is cached beside the latent",
         lambda: _same_int(fn(2, 4, 3, 1), 14)),
    ]
    return run_cases("mla_bytes_per_token", cases)


@refuses_kvlib()
def grade_group_quantized_bytes(fn) -> Report:
    """fn(n, bits, group_size, scale_bytes, zero_bytes) -> bytes of one quantized vector."""
    cases = []
    for n, bits, group, scale, zero, why in [
        (32, 8, 32, 2, 0, "llama.cpp q8_0 block (34 bytes)"),
        (32, 4, 32, 2, 2, "llama.cpp q4_1 block (20 bytes)"),
        (128, 4, 64, 2, 2, "a 128-dim head, groups of 64"),
        (64, 2, 32, 2, 2, "2-bit, as in KIVI"),
        (576, 4, 32, 2, 2, "a DeepSeek-V2 latent + RoPE key"),
        (33, 4, 32, 2, 2, "a last group of one number still stores its scale and zero"),
        (3, 4, 32, 2, 0, "3 four-bit numbers need 2 whole bytes"),
        (100, 3, 128, 2, 0, "3-bit numbers packed across byte boundaries"),
    ]:
        want = StorageType("case", bits, group, scale, zero).vector_bytes(n)
        cases.append((f"n={n}, {bits} bits, group {group}: {why}",
                      lambda a=(n, bits, group, scale, zero), w=want: _same_int(fn(*a), w)))
    return run_cases("group_quantized_bytes", cases)


@refuses_kvlib()
def grade_max_context(fn) -> Report:
    """fn(gpu_bytes, weights_bytes, reserve, bytes_per_token, batch) -> longest context."""
    cases = []
    for name, gpu, batch in [("llama-3-8b", "H100 SXM 80GB", 1), ("llama-3-8b", "L4", 4),
                             ("qwen2.5-7b", "RTX 4090", 1), ("smollm2-135m", "L4", 64),
                             ("llama-3-70b", "H200 SXM 141GB", 1)]:
        c, g = preset(name), GPU_MEMORY_BYTES[gpu]
        w, per = weights_bytes(c), kv_bytes_per_token(c)
        budget = kv_budget_bytes(c, g)
        want = max(0, budget // (batch * per))
        label = f"{name} on {gpu}, batch {batch}"
        if budget < 0:
            label += " (the weights alone do not fit: 0)"
        cases.append((label, lambda a=(g, w, 0.10, per, batch), want=want:
                      _same_int(fn(*a), int(want))))
    cases.append(("no reserve, room for exactly 10 tokens",
                  lambda: _same_int(fn(1000, 0, 0.0, 100, 1), 10)))
    cases.append(("half the memory kept in reserve: room for 5 tokens",
                  lambda: _same_int(fn(1000, 0, 0.5, 100, 1), 5)))
    cases.append(("room for 9.99 tokens rounds down",
                  lambda: _same_int(fn(1099, 100, 0.0, 100, 1), 9)))
    return run_cases("max_context", cases)


@refuses_kvlib()
def grade_contiguous_nbytes(fn) -> Report:
    """fn(n_layers, n_kv_heads, head_dim, max_batch, max_seq, itemsize) -> ContiguousCache.nbytes."""
    cases = []
    for layers, heads, dim, batch, seq, dtype in [(30, 3, 64, 2, 128, np.float32),
                                                  (30, 3, 64, 4, 256, np.float16),
                                                  (2, 1, 8, 1, 1, np.float32),
                                                  (1, 2, 4, 7, 3, np.float16)]:
        cache = ContiguousCache(layers, heads, dim, batch, seq, dtype)
        args = (layers, heads, dim, batch, seq, np.dtype(dtype).itemsize)
        why = (" (lengths and in_use are arrays too)" if batch > 1 and seq < 10
               else " (a keys AND a values array)")
        cases.append((f"ContiguousCache({layers}, {heads}, {dim}, max_batch={batch}, "
                      f"max_seq={seq}, {np.dtype(dtype).name}){why}",
                      lambda a=args, w=cache.nbytes: _same_int(fn(*a), w)))
    return run_cases("contiguous_nbytes", cases)


__all__ = ["grade_kv_bytes_per_token", "grade_mla_bytes_per_token",
           "grade_group_quantized_bytes", "grade_max_context", "grade_contiguous_nbytes"]


def grade_int4_tradeoff(fp16_tokens, int4_tokens) -> Report:
    """Grade the longest context of one Qwen2.5-7B sequence on an RTX 4090 (bf16 weights)
    with an fp16 cache and with an int4 cache (groups of 32, fp16 scale and zero point),
    as `kvlib.memory.max_context` computes them."""
    config, gpu = preset("qwen2.5-7b"), GPU_MEMORY_BYTES["RTX 4090"]
    truth = (max_context(config, gpu, dtype="fp16"),
             max_context(config, gpu, dtype="int4", group_size=32))
    answer = ... if ... in (fp16_tokens, int4_tokens) else (fp16_tokens, int4_tokens)
    return grade_prediction("int4_tradeoff", answer, truth, [
        ((truth[0], 4 * truth[0]), "int4 is not 4x smaller: every group of 32 numbers also "
                                   "stores a 2-byte scale and a 2-byte zero point"),
        ((truth[0] // 2, truth[1] // 2), "the bytes per token already count keys AND values; "
                                         "do not halve again"),
        ((2 * truth[0], 2 * truth[1]), "count keys AND values: two vectors per KV head, "
                                       "per layer"),
    ])
