"""Command line: `kvlib generate "prompt"` and friends (`python -m kvlib` works the same)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import ConfigError, KVLibError


QUANTIZED = {"int8": 8, "int4": 4, "int2": 2}


def _scheme(args):
    """The `QuantScheme` named by --cache intN and the quantization options."""
    from .cache import QuantScheme

    return QuantScheme(QUANTIZED[args.cache], args.key_axis, args.group_size, args.window,
                       args.symmetric)


def _make_cache(args, model, prompts):
    """The cache named by --cache, sized for this batch (None for recompute)."""
    from .batching import PaddedCache
    from .cache import ContiguousCache, PagedCache, QuantizedCache
    from .cache.paged import blocks_for

    if args.batching == "padded" and args.cache != "contiguous":
        raise ConfigError("--batching padded stores the padding in the float32 contiguous "
                          f"cache; it cannot run with --cache {args.cache}")
    if args.cache == "none":
        return None
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    if args.cache in QUANTIZED:
        cache = QuantizedCache.from_config(model.config, max_batch=len(prompts),
                                           max_seq=longest, scheme=_scheme(args))
    elif args.cache == "paged":
        # enough blocks for every sample to grow to the longest length, even unshared
        num_blocks = args.num_blocks or len(prompts) * args.n * blocks_for(longest, args.block_size)
        cache = PagedCache.from_config(model.config, num_blocks=num_blocks,
                                       block_size=args.block_size,
                                       max_seqs=len(prompts) * args.n, max_seq_len=longest)
    else:
        kind = PaddedCache if args.batching == "padded" else ContiguousCache
        cache = kind.from_config(model.config, max_batch=len(prompts), max_seq=longest)
    return cache.set_backend(args.backend)


def cmd_generate(args) -> int:
    from .model import Sampler, load_model

    if args.backend == "cuda":  # before loading the model: fail fast
        if args.cache != "paged":
            raise ConfigError("--backend cuda runs the paged cache's numba.cuda kernel; "
                              "add --cache paged")
        from .kernels.cuda import require_device

        require_device()
    model = load_model(progress=not args.quiet)
    prompts = [model.encode(p, chat=args.chat) for p in args.prompts]
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    if args.n < 1 or args.block_size < 1 or (args.num_blocks is not None and args.num_blocks < 1):
        raise ConfigError("--n, --block-size and --num-blocks must be positive")
    cache = _make_cache(args, model, prompts)

    start = time.perf_counter()
    results = model.generate(prompts, cache=cache, max_new_tokens=args.max_new_tokens,
                             sampler=sampler, batching=args.batching, n=args.n,
                             prefill_chunk=args.prefill_chunk)
    seconds = time.perf_counter() - start
    n_new = sum(len(r.token_ids) for r in results)

    for index, r in enumerate(results):
        text, sample = args.prompts[index // args.n], index % args.n
        if args.json:
            row = {"prompt": text, "prompt_ids": r.prompt_ids, "token_ids": r.token_ids,
                   "text": r.text, "finish_reason": r.finish_reason, "cache": args.cache,
                   "batching": args.batching}
            print(json.dumps(row | ({"sample": sample} if args.n > 1 else {})))
        else:
            print(r.text)
    if not args.quiet:
        print(f"{n_new} tokens in {seconds:.2f} s ({n_new / seconds:.1f} tokens/s, "
              f"cache={args.cache}, batching={args.batching})", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    """The engine behind an OpenAI-compatible HTTP API (`kvlib.serve`)."""
    from .cache import PagedCache
    from .engine import Engine
    from .model import load_model
    from .serve import create_app, listen, run_server

    sock = listen(args.host, args.port)  # a busy port fails before the model loads
    model = load_model(progress=not args.quiet)
    cache = PagedCache.from_config(model.config, num_blocks=args.num_blocks,
                                   block_size=args.block_size, max_seqs=args.max_batch)
    engine = Engine(model, cache.set_backend(args.backend), max_batch=args.max_batch,
                    token_budget=args.token_budget)
    if not args.quiet:
        host, port = sock.getsockname()[:2]
        print(f"serving {model.path.name} on http://{host}:{port}/v1", file=sys.stderr)
    run_server(create_app(model, engine), sock, "warning" if args.quiet else "info")
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


def cmd_perplexity(args) -> int:
    """Teacher-forced perplexity of a text through a cache, and its agreement with float32."""
    from .cache import QuantizedCache
    from .cache.quantized import float32_token_bytes, sequence_bytes_per_token
    from .evaluate import EVAL_TEXT_PATH, teacher_forced, top1_agreement
    from .model import load_model

    path = args.text or EVAL_TEXT_PATH
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as err:
        raise ConfigError(f"cannot read --text {path}: {err.strerror}") from None
    model = load_model(progress=not args.quiet)
    ids = model.encode(text)
    cfg = model.config
    shape = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    reference = teacher_forced(model, ids, None, args.first_chunk, args.chunk)
    if args.cache in QUANTIZED:
        scheme = _scheme(args)
        cache = QuantizedCache.from_config(cfg, max_batch=1, max_seq=len(ids), scheme=scheme)
        result = teacher_forced(model, ids, cache, args.first_chunk, args.chunk)
        name, per_token = scheme.name, sequence_bytes_per_token(*shape, scheme, len(ids))
    else:
        result, name, per_token = reference, "float32", float32_token_bytes(*shape)
    report = {"text": str(path), "tokens": len(ids), "cache": name,
              "perplexity": result.perplexity, "float32_perplexity": reference.perplexity,
              "top1_agreement": top1_agreement(result, reference),
              "bytes_per_token": per_token,
              "float32_bytes_per_token": float32_token_bytes(*shape)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{name}: perplexity {report['perplexity']:.4f} (float32 "
              f"{report['float32_perplexity']:.4f}), top-1 agreement "
              f"{report['top1_agreement']:.2%}, {per_token:,.0f} bytes/token "
              f"over {len(ids)} tokens")
    return 0


def _add_quantization_options(parser) -> None:
    parser.add_argument("--group-size", type=int, default=32, metavar="G",
                        help="channels per scale (per-token data) or tokens per scale "
                             "(per-channel keys); default 32")
    parser.add_argument("--window", type=int, default=0, metavar="R",
                        help="most recent tokens kept in float32 (default 0)")
    parser.add_argument("--key-axis", choices=["token", "channel"], default="channel",
                        help="quantize keys per channel (KIVI, default) or per token; "
                             "values are always per token")
    parser.add_argument("--symmetric", action="store_true",
                        help="scale only, no zero point (default: asymmetric)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with SmolLM2-135M-Instruct")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT",
                     help="one or more prompts, decoded together as one batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--cache", choices=["none", "contiguous", "paged", *QUANTIZED],
                     default="contiguous",
                     help="none recomputes every token's keys and values at every step; "
                          "paged stores them in a block pool (see --block-size); "
                          "int8/int4/int2 quantize the cache (see --group-size, --window)")
    gen.add_argument("--batching", choices=["ragged", "padded"], default="ragged",
                     help="how prompts of different lengths share a batch: ragged packs "
                          "them with no padding; padded left-pads them into a rectangle")
    gen.add_argument("--block-size", type=int, default=16,
                     help="tokens per block of the paged cache")
    gen.add_argument("--num-blocks", type=int, default=None,
                     help="blocks in the paged pool (default: enough for the batch)")
    gen.add_argument("--n", type=int, default=1, metavar="K",
                     help="K samples per prompt; the paged cache shares the prompt's blocks")
    gen.add_argument("--prefill-chunk", type=int, default=None, metavar="C",
                     help="feed each prompt through the cache C tokens at a time "
                          "(chunked prefill; needs a cache)")
    gen.add_argument("--backend", choices=["numpy", "numba", "cuda"], default="numpy",
                     help="attention of decode steps: NumPy reference, the Numba kernel, or "
                          "the numba.cuda kernel (--cache paged; a GPU, or the simulator "
                          "with NUMBA_ENABLE_CUDASIM=1)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--quiet", action="store_true", help="no progress or timing on stderr")
    _add_quantization_options(gen)
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

    ppl = sub.add_parser("perplexity", help="teacher-forced perplexity of a text through a "
                                            "cache, and top-1 agreement with float32")
    ppl.add_argument("--text", default=None, metavar="FILE",
                     help="a UTF-8 text file (default: the book's evaluation text)")
    ppl.add_argument("--cache", choices=["contiguous", *QUANTIZED], default="int8",
                     help="the cache to measure (contiguous = float32)")
    _add_quantization_options(ppl)
    ppl.add_argument("--first-chunk", type=int, default=128, help="tokens of the first step")
    ppl.add_argument("--chunk", type=int, default=64, help="tokens per later step")
    ppl.add_argument("--json", action="store_true", help="one JSON object")
    ppl.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ppl.set_defaults(run=cmd_perplexity)

    roof = sub.add_parser("roofline", help="a decode step of a real model on a GPU's "
                                           "roofline: intensity, bound, predicted time")
    roof.add_argument("--gpu", help="a GPU from --list, e.g. H100-SXM")
    roof.add_argument("--model", help="a model preset, e.g. llama-3-8b")
    roof.add_argument("--context", type=int, help="tokens cached per sequence")
    roof.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    roof.add_argument("--dtype", default="fp16", help="KV cache storage type (default fp16)")
    roof.add_argument("--weights-dtype", default="bf16",
                      help="storage type of the weights (default bf16)")
    roof.add_argument("--json", action="store_true", help="one JSON object")
    roof.add_argument("--list", action="store_true", help="list the GPUs")
    roof.set_defaults(run=cmd_roofline)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the "
                                       "continuous-batching engine")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    srv.add_argument("--num-blocks", type=int, default=512,
                     help="blocks in the paged pool shared by all requests (default 512)")
    srv.add_argument("--block-size", type=int, default=16, help="tokens per block")
    srv.add_argument("--max-batch", type=int, default=16,
                     help="most requests decoding together (default 16)")
    srv.add_argument("--token-budget", type=int, default=256,
                     help="most tokens per forward step, decodes and prefill chunks")
    srv.add_argument("--backend", choices=["numpy", "numba"], default="numpy",
                     help="attention of decode steps: NumPy reference or the Numba kernel")
    srv.add_argument("--quiet", action="store_true", help="no progress, warnings only")
    srv.set_defaults(run=cmd_serve)
    return parser


def cmd_roofline(args) -> int:
    from .config import preset
    from .gpu import GPUS, decode_step, gpu

    if args.list:
        for g in GPUS.values():
            missing = f"  (unconfirmed: {', '.join(g.unconfirmed)})" if g.unconfirmed else ""
            print(f"{g.name:14s} {g.bandwidth / 1e12:5.2f} TB/s  {g.fp16_flops / 1e12:7.1f} "
                  f"FP16 TFLOP/s  {g.memory_gb:g} GB{missing}")
        return 0
    if args.gpu is None or args.model is None or args.context is None:
        raise ConfigError("roofline needs --gpu NAME, --model NAME and --context N (or --list)")
    spec, config = gpu(args.gpu), preset(args.model)
    step = decode_step(config, spec, args.context, args.batch, args.dtype,
                       weights_dtype=args.weights_dtype)
    att, wts = step.attention, step.weights
    row = {"gpu": spec.name, "model": args.model, "context": args.context,
           "batch": args.batch, "dtype": args.dtype, "weights_dtype": args.weights_dtype,
           "attention_flop_per_byte": att.traffic.intensity, "attention_bytes": att.traffic.bytes,
           "attention_flops": att.traffic.flops, "attention_bound": att.bound,
           "attention_seconds": att.seconds, "weight_flop_per_byte": wts.traffic.intensity,
           "weight_bytes": wts.traffic.bytes, "weight_flops": wts.traffic.flops,
           "weight_bound": wts.bound, "weight_seconds": wts.seconds,
           "ridge_flop_per_byte": spec.ridge_point,
           "predicted_step_seconds": step.seconds, "bound": step.bound}
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"{args.model} on {spec.name}, batch {args.batch} x {args.context:,} tokens, "
          f"KV {args.dtype}, weights {args.weights_dtype} (ridge {spec.ridge_point:.0f} FLOP/byte)")
    for name, part in (("attention", att), ("weights", wts)):
        print(f"  {name:9s} {part.traffic.intensity:8.2f} FLOP/byte  "
              f"{part.traffic.bytes / 1e9:8.2f} GB  {part.bound}-bound  "
              f"{part.seconds * 1e3:7.3f} ms")
    print(f"  predicted step {step.seconds * 1e3:.3f} ms ({step.bound}-bound)")
    return 0


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
