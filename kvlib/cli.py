"""Command line: `kvlib generate "prompt"` and friends (`python -m kvlib` works the same)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import ConfigError, KVLibError


def _make_cache(args, model, prompts):
    """The cache named by --cache, sized for this batch (None for recompute)."""
    from .cache import ContiguousCache

    if args.cache == "none":
        return None
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    return ContiguousCache.from_config(model.config, max_batch=len(prompts), max_seq=longest,
                                       backend=args.backend)


def cmd_generate(args) -> int:
    from .model import Sampler, load_model

    model = load_model(progress=not args.quiet)
    prompts = [model.encode(p, chat=args.chat) for p in args.prompts]
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    cache = _make_cache(args, model, prompts)

    start = time.perf_counter()
    results = model.generate(prompts, cache=cache, max_new_tokens=args.max_new_tokens,
                             sampler=sampler)
    seconds = time.perf_counter() - start
    n_new = sum(len(r.token_ids) for r in results)

    for text, r in zip(args.prompts, results):
        if args.json:
            print(json.dumps({"prompt": text, "prompt_ids": r.prompt_ids,
                              "token_ids": r.token_ids, "text": r.text,
                              "finish_reason": r.finish_reason, "cache": args.cache}))
        else:
            print(r.text)
    if not args.quiet:
        print(f"{n_new} tokens in {seconds:.2f} s ({n_new / seconds:.1f} tokens/s, "
              f"cache={args.cache})", file=sys.stderr)
    return 0


def cmd_memory(args) -> int:
    from .config import PRESETS, preset
    from .memory import (cached_tokens, format_bytes, kv_bytes_per_token, kv_cache_bytes,
                         storage_type)

    if args.list:
        for name, config in PRESETS.items():
            window = f", window {config.sliding_window}" if config.sliding_window else ""
            kv = (f"latent {config.kv_lora_rank} + RoPE key {config.rope_head_dim}"
                  if config.attention_kind == "MLA" else f"{config.n_kv_heads} KV heads")
            print(f"{name:14s} {config.attention_kind}  {config.n_layers} layers, "
                  f"{config.n_heads} heads, {kv}, head dim {config.head_dim}{window}")
        return 0
    if args.model is None or args.tokens is None:
        raise ConfigError("memory needs --model NAME and --tokens N (or --list)")
    config = preset(args.model)
    storage = storage_type(args.dtype, args.group_size)
    per_token = kv_bytes_per_token(config, args.dtype, args.group_size)
    total = kv_cache_bytes(config, args.tokens, args.batch, args.dtype, args.group_size)
    kept = cached_tokens(config, args.tokens)
    if args.json:
        print(json.dumps({"model": args.model, "attention": config.attention_kind,
                          "dtype": args.dtype, "group_size": storage.group_size,
                          "tokens": args.tokens, "cached_tokens": kept, "batch": args.batch,
                          "bytes_per_token": per_token, "total_bytes": total}))
    else:
        window = f" (a sliding window keeps {kept})" if kept != args.tokens else ""
        print(f"{args.model} ({config.attention_kind}), {args.dtype}: "
              f"{per_token:,} bytes per token ({format_bytes(per_token)})")
        print(f"{args.batch} x {args.tokens:,} tokens{window}: "
              f"{total:,} bytes ({format_bytes(total)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with SmolLM2-135M-Instruct")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT",
                     help="one or more prompts, decoded together as one batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--cache", choices=["none", "contiguous"], default="contiguous",
                     help="none recomputes every token's keys and values at every step")
    gen.add_argument("--backend", choices=["numpy", "numba"], default="numpy",
                     help="attention of decode steps: NumPy reference or the Numba kernel")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--quiet", action="store_true", help="no progress or timing on stderr")
    gen.set_defaults(run=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    att = bench_sub.add_parser(
        "attention", help="decode attention per backend and shape, against the measured "
                          "bandwidth roof of this machine")
    att.add_argument("--backend", nargs="+", default=["numpy", "numba"], dest="backends",
                     help="attention backends to time (see kvlib.bench.ATTENTION_BACKENDS)")
    att.add_argument("--batch", nargs="+", type=int, default=[1, 8], dest="batches")
    att.add_argument("--context", nargs="+", type=int, default=[1024, 8192], dest="contexts")
    att.add_argument("--repeats", type=int, default=5)
    att.add_argument("--array-mb", type=int, default=128,
                     help="size of each array of the bandwidth measurement (MiB)")
    att.add_argument("--json", action="store_true", help="one JSON object per row")
    att.add_argument("--quiet", action="store_true", help="no progress on stderr")
    att.set_defaults(run=cmd_bench_attention)

    mem = sub.add_parser("memory", help="KV cache bytes of a real model (see --list)")
    mem.add_argument("--model", help="a preset name, e.g. llama-3-8b")
    mem.add_argument("--tokens", type=int, help="tokens per sequence")
    mem.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    mem.add_argument("--dtype", default="fp16",
                     help="storage type: fp32, fp16, bf16, fp8, int8, int4, int2 (default fp16)")
    mem.add_argument("--group-size", type=int, default=None,
                     help="numbers per scale for int types (default 32)")
    mem.add_argument("--json", action="store_true", help="one JSON object")
    mem.add_argument("--list", action="store_true", help="list the model presets")
    mem.set_defaults(run=cmd_memory)
    return parser


def cmd_bench_attention(args) -> int:
    from .bench import ATTENTION_BACKENDS, bench_attention
    from .errors import ConfigError
    from .model.files import default_model_path, read_config
    from .roofline import measure_roofline

    unknown = [b for b in args.backends if b not in ATTENTION_BACKENDS]
    if unknown:
        raise ConfigError(f"unknown attention backend(s) {unknown}; "
                          f"choose from {sorted(ATTENTION_BACKENDS)}")
    from gguf import GGUFReader

    cfg = read_config(GGUFReader(default_model_path()))
    roof = measure_roofline(array_mb=args.array_mb)
    rows = bench_attention(args.backends, args.batches, args.contexts, roof, cfg.n_heads,
                           cfg.n_kv_heads, cfg.head_dim, args.repeats,
                           progress=not args.quiet)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"bandwidth roof {roof.memory_roof / 1e9:.1f} GB/s "
          f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in roof.bandwidth.items())}); "
          f"peak FP32 {roof.peak_flops / 1e9:.0f} GFLOP/s; {roof.machine}")
    print(f"{'backend':<12}{'batch':>6}{'context':>9}{'ms':>10}{'GB/s':>8}{'of roof':>9}")
    for r in rows:
        print(f"{r['backend']:<12}{r['batch']:>6}{r['context']:>9}{r['seconds'] * 1e3:>10.3f}"
              f"{r['gb_per_s']:>8.1f}{r['fraction_of_roof']:>9.0%}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KVLibError as err:
        print(f"kvlib: error: {err}", file=sys.stderr)
        return 2
