"""Command line: `kvlib generate "prompt"` and friends (`python -m kvlib` works the same).

Every bad input ends in one line `kvlib: error: ...` on stderr and exit status 2 (130
on Ctrl-C), never a traceback. Input is checked before the model is loaded: options
against each other, prompts and texts as UTF-8, and lengths against the model's
context, read from the model file's metadata without its weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from . import __version__
from .errors import ConfigError, KVLibError

QUANTIZED = {"int8": 8, "int4": 4, "int2": 2}
QUANT_OPTIONS = ("group_size", "window", "key_axis", "symmetric")
PROGRESS_TOKENS = 256  # prompts at least this long show a progress bar over the layers


class OutputError(KVLibError):
    """stdout cannot be written (a closed pipe, a full disk)."""


# --- argument types: each names what is wrong; argparse adds the flag -----------------
def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def at_least(low: int):
    """An argparse type: a whole number >= `low`."""
    def parse(text: str) -> int:
        value = _whole(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def finite_float(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high])."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) \
                or value > high:
            where = (f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf
                     else f"{'>' if low_open else '>='} {low:g}")
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line `kvlib: error: ...` (exit 2), no usage block."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"kvlib: error: {message}", file=sys.stderr)
        sys.exit(2)


# --- checks before any work --------------------------------------------------------
def _given(args, dest: str) -> bool:
    """Whether an option differs from its default (the user gave it)."""
    return getattr(args, dest) != args.parser.get_default(dest)


def _refuse_unused(args, dests, reason: str) -> None:
    """Refuse options that would be silently ignored."""
    for dest in dests:
        if _given(args, dest):
            raise ConfigError(f"--{dest.replace('_', '-')} {reason}")


def _check_generate_options(args) -> None:
    cache = args.cache
    if cache != "paged":
        _refuse_unused(args, ["block_size", "num_blocks"], "applies only to --cache paged")
    if cache not in QUANTIZED:
        _refuse_unused(args, QUANT_OPTIONS, "applies only to --cache int8, int4 or int2")
    if args.temperature == 0:
        _refuse_unused(args, ["top_k", "top_p", "seed"],
                       "applies only when sampling (--temperature above 0)")
    if args.batching == "padded" and cache != "contiguous":
        raise ConfigError("--batching padded stores the padding in the float32 contiguous "
                          f"cache; it cannot run with --cache {cache}")
    if args.n > 1 and cache not in ("paged", "none"):
        raise ConfigError(f"--n {args.n} shares the prompt by forking its sequence; "
                          f"--cache {cache} cannot fork (use --cache paged)")
    if args.prefill_chunk is not None and cache == "none":
        raise ConfigError("--prefill-chunk feeds the prompt through a cache; "
                          "it cannot run with --cache none")
    if args.prefill_chunk is not None and args.batching == "padded":
        raise ConfigError("--prefill-chunk runs on the ragged path; "
                          "it cannot run with --batching padded")
    if args.backend == "cuda":                     # before loading the model: fail fast
        if cache != "paged":
            raise ConfigError("--backend cuda runs the paged cache's numba.cuda kernel; "
                              "add --cache paged")
        from .kernels.cuda import require_device

        require_device()
    if args.backend == "numba":
        if cache == "none" or args.batching == "padded" or cache in ("int4", "int2"):
            what = "--batching padded" if args.batching == "padded" else f"--cache {cache}"
            raise ConfigError(f"--backend numba has no kernel for {what}; "
                              "use --backend numpy")


def _check_utf8(text: str, what: str) -> str:
    """`text` if it is valid Unicode (argv bytes that are not UTF-8 arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{what} is not valid UTF-8 (at character {err.start})") from None
    return text


def _check_context(n_tokens: int, n_new: int, context: int, what: str) -> None:
    if n_tokens + n_new > context:
        room = max(context - n_tokens, 0)
        raise ConfigError(f"{what} has {n_tokens} tokens; with --max-new-tokens {n_new} that "
                          f"is {n_tokens + n_new}, past the model's context of {context} "
                          f"(at most {room} new tokens fit)")


def _read_text(path) -> str:
    """A UTF-8 text file, or a one-line error naming --text."""
    try:
        data = open(path, "rb").read()
    except OSError as err:
        raise ConfigError(f"cannot read --text {path}: {err.strerror}") from None
    if b"\0" in data:
        raise ConfigError(f"--text {path} is a binary file (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--text {path} is not UTF-8 text (byte {data[err.start]:#04x} at "
                          f"offset {err.start})") from None


# --- output ------------------------------------------------------------------------
def emit(text: str = "", end: str = "\n") -> None:
    """Write to stdout now; a closed pipe or a full disk becomes an `OutputError`."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except OSError as err:
        raise OutputError(f"cannot write to stdout: {err.strerror or err}") from None


class TokenStream:
    """Prints one completion's text as its tokens arrive (a terminal on stdout).

    Tokens are decoded together and only the new characters printed, so a character
    split over two tokens appears once it is whole.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, index: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):  # a character cut in half: wait for the next token
            return
        emit(text[self.shown:], end="")
        self.shown = len(text)


def _layer_progress(llama, n_tokens: int, quiet: bool):
    """A progress bar over the layers of a long prompt's prefill (None if not needed)."""
    if quiet or n_tokens < PROGRESS_TOKENS:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=llama.config.n_layers, desc=f"prefill ({n_tokens} tokens)",
               unit="layer", leave=False)

    def on_layer(layer: int, n: int) -> None:
        if n >= PROGRESS_TOKENS:
            bar.update(1)
    llama.on_layer = on_layer
    return bar


# --- commands ----------------------------------------------------------------------
def _scheme(args):
    """The `QuantScheme` named by --cache intN and the quantization options."""
    from .cache import QuantScheme

    return QuantScheme(QUANTIZED[args.cache], args.key_axis, args.group_size, args.window,
                       args.symmetric)


def _make_cache(args, config, prompts):
    """The cache named by --cache, sized for this batch (None for recompute)."""
    from .cache import ContiguousCache, PaddedCache, PagedCache, QuantizedCache
    from .cache.paged import blocks_for

    if args.cache == "none":
        return None
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    if args.cache in QUANTIZED:
        cache = QuantizedCache.from_config(config, max_batch=len(prompts),
                                           max_seq=longest, scheme=_scheme(args))
    elif args.cache == "paged":
        # enough blocks for every sample to grow to the longest length, even unshared
        num_blocks = args.num_blocks or len(prompts) * args.n * blocks_for(longest, args.block_size)
        cache = PagedCache.from_config(config, num_blocks=num_blocks,
                                       block_size=args.block_size,
                                       max_seqs=len(prompts) * args.n, max_seq_len=longest)
    else:
        kind = PaddedCache if args.batching == "padded" else ContiguousCache
        cache = kind.from_config(config, max_batch=len(prompts), max_seq=longest)
    return cache.set_backend(args.backend)


def cmd_generate(args) -> int:
    from .model import ModelFile, Sampler

    _check_generate_options(args)
    texts = [_check_utf8(p, f"PROMPT {i + 1}") for i, p in enumerate(args.prompts)]
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    file = ModelFile()
    prompts = [file.tokenizer.encode_chat(t) if args.chat else file.tokenizer.encode(t)
               for t in texts]
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"PROMPT {i + 1} is empty")
        _check_context(len(p), args.max_new_tokens, file.config.max_position,
                       f"PROMPT {i + 1}")
    cache = _make_cache(args, file.config, prompts)
    model = file.load(progress=not args.quiet)
    n_results = len(prompts) * args.n
    stream = TokenStream(model.tokenizer) if (
        n_results == 1 and not args.json and sys.stdout.isatty()) else None
    bar = _layer_progress(model.llama, max(map(len, prompts)), args.quiet)

    start = time.perf_counter()
    try:
        results = model.generate(prompts, cache=cache, max_new_tokens=args.max_new_tokens,
                                 sampler=sampler, on_token=stream, n=args.n,
                                 prefill_chunk=args.prefill_chunk)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    n_new = sum(len(r.token_ids) for r in results)

    for index, r in enumerate(results):
        text, sample = args.prompts[index // args.n], index % args.n
        if args.json:
            row = {"prompt": text, "prompt_ids": r.prompt_ids, "token_ids": r.token_ids,
                   "text": r.text, "finish_reason": r.finish_reason, "cache": args.cache,
                   "batching": args.batching}
            emit(json.dumps(row | ({"sample": sample} if args.n > 1 else {})))
            continue
        if n_results > 1:  # completions may hold newlines: a header tells them apart
            which = f", sample {sample + 1} of {args.n}" if args.n > 1 else ""
            emit(f"--- completion {index + 1} of {n_results} (prompt {index // args.n + 1}"
                 f"{which}) ---")
        emit("" if stream is not None else r.text)
        if r.finish_reason not in ("stop", "length"):
            from .model.generate import FINISH_REASONS

            print(f"kvlib: completion {index + 1} stopped early: "
                  f"{FINISH_REASONS[r.finish_reason]} (finish_reason {r.finish_reason}); "
                  f"its {len(r.token_ids)} tokens are kept", file=sys.stderr)
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
            emit(f"{name:14s} {config.attention_kind}  {config.n_layers} layers, "
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
        emit(json.dumps({"model": args.model, "attention": config.attention_kind,
                         "dtype": args.dtype, "group_size": storage.group_size,
                         "tokens": args.tokens, "cached_tokens": kept, "batch": args.batch,
                         "bytes_per_token": per_token, "total_bytes": total}))
    else:
        window = f" (a sliding window keeps {kept})" if kept != args.tokens else ""
        emit(f"{args.model} ({config.attention_kind}), {args.dtype}: "
             f"{per_token:,} bytes per token ({format_bytes(per_token)})")
        emit(f"{args.batch} x {args.tokens:,} tokens{window}: "
             f"{total:,} bytes ({format_bytes(total)})")
    return 0


class _CountingModel:
    """A model whose forward steps advance a progress bar by the tokens they run."""

    def __init__(self, model, bar) -> None:
        self.model, self.bar, self.config = model, bar, model.config

    def forward(self, tokens, *args, **kwargs):
        logits = self.model.forward(tokens, *args, **kwargs)
        self.bar.update(sum(len(t) for t in tokens))
        return logits


def cmd_perplexity(args) -> int:
    """Teacher-forced perplexity of a text through a cache, and its agreement with float32."""
    from .cache import QuantizedCache
    from .cache.quantized import float32_token_bytes, sequence_bytes_per_token
    from .evaluate import EVAL_TEXT_PATH, teacher_forced, top1_agreement
    from .model import ModelFile

    if args.cache not in QUANTIZED:
        _refuse_unused(args, QUANT_OPTIONS, "applies only to --cache int8, int4 or int2")
    path = args.text or EVAL_TEXT_PATH
    text = _read_text(path)
    file = ModelFile()
    ids = file.tokenizer.encode(text)
    cfg = file.config
    if len(ids) < 2:
        raise ConfigError(f"--text {path} has {len(ids)} tokens; perplexity needs at least 2")
    if len(ids) > cfg.max_position:
        raise ConfigError(f"--text {path} has {len(ids)} tokens, past the model's context of "
                          f"{cfg.max_position}; use a shorter text")
    scheme = _scheme(args) if args.cache in QUANTIZED else None
    model = file.load(progress=not args.quiet)
    shape = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    from tqdm.auto import tqdm

    passes = 2 if scheme is not None else 1
    with tqdm(total=passes * len(ids), desc="perplexity", unit="token",
              disable=args.quiet, leave=False) as bar:
        counting = _CountingModel(model, bar)
        reference = teacher_forced(counting, ids, None, args.first_chunk, args.chunk)
        if scheme is not None:
            cache = QuantizedCache.from_config(cfg, max_batch=1, max_seq=len(ids),
                                               scheme=scheme)
            result = teacher_forced(counting, ids, cache, args.first_chunk, args.chunk)
            name, per_token = scheme.name, sequence_bytes_per_token(*shape, scheme, len(ids))
        else:
            result, name, per_token = reference, "float32", float32_token_bytes(*shape)
    report = {"text": str(path), "tokens": len(ids), "cache": name,
              "perplexity": result.perplexity, "float32_perplexity": reference.perplexity,
              "top1_agreement": top1_agreement(result, reference),
              "bytes_per_token": per_token,
              "float32_bytes_per_token": float32_token_bytes(*shape)}
    if args.json:
        emit(json.dumps(report))
    else:
        emit(f"{name}: perplexity {report['perplexity']:.4f} (float32 "
             f"{report['float32_perplexity']:.4f}), top-1 agreement "
             f"{report['top1_agreement']:.2%}, {per_token:,.0f} bytes/token "
             f"over {len(ids)} tokens")
    return 0


def _add_quantization_options(parser) -> None:
    parser.add_argument("--group-size", type=at_least(1), default=32, metavar="G",
                        help="channels per scale (per-token data) or tokens per scale "
                             "(per-channel keys)")
    parser.add_argument("--window", type=at_least(0), default=0, metavar="R",
                        help="most recent tokens kept in float32")
    parser.add_argument("--key-axis", choices=["token", "channel"], default="channel",
                        help="quantize keys per channel (KIVI) or per token; "
                             "values are always per token")
    parser.add_argument("--symmetric", action="store_true",
                        help="scale only, no zero point (default: asymmetric)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvlib", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"kvlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with SmolLM2-135M-Instruct")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT",
                     help="one or more prompts, decoded together as one batch")
    gen.add_argument("--max-new-tokens", type=at_least(0), default=64,
                     help="most tokens generated per prompt (prompt + these must fit the "
                          "model's context)")
    gen.add_argument("--cache", choices=["none", "contiguous", "paged", *QUANTIZED],
                     default="contiguous",
                     help="none recomputes every token's keys and values at every step; "
                          "paged stores them in a block pool (see --block-size); "
                          "int8/int4/int2 quantize the cache (see --group-size, --window)")
    gen.add_argument("--batching", choices=["ragged", "padded"], default="ragged",
                     help="how prompts of different lengths share a batch: ragged packs "
                          "them with no padding; padded left-pads them into a rectangle")
    gen.add_argument("--block-size", type=at_least(1), default=16,
                     help="tokens per block of the paged cache")
    gen.add_argument("--num-blocks", type=at_least(1), default=None,
                     help="blocks in the paged pool (None: enough for the batch)")
    gen.add_argument("--n", type=at_least(1), default=1, metavar="K",
                     help="K samples per prompt; the paged cache shares the prompt's blocks")
    gen.add_argument("--prefill-chunk", type=at_least(1), default=None, metavar="C",
                     help="feed each prompt through the cache C tokens at a time "
                          "(chunked prefill; needs a cache)")
    gen.add_argument("--backend", choices=["numpy", "numba", "cuda"], default="numpy",
                     help="attention: the NumPy reference; the Numba kernels (decode, and "
                          "the causal prefill kernel of the float32 caches); or the "
                          "numba.cuda decode kernel (--cache paged; a GPU, or the simulator "
                          "with NUMBA_ENABLE_CUDASIM=1)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the model's chat template")
    gen.add_argument("--temperature", type=finite_float(0.0), default=0.0,
                     help="0 = greedy")
    gen.add_argument("--top-k", type=at_least(1), default=None,
                     help="sample among the K most likely tokens (None: all)")
    gen.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True), default=None,
                     help="sample among the most likely tokens that reach this "
                          "probability (None: all)")
    gen.add_argument("--seed", type=at_least(0), default=0, help="seed of the sampler")
    gen.add_argument("--json", action="store_true", help="one JSON object per completion")
    gen.add_argument("--quiet", action="store_true", help="no progress or timing on stderr")
    _add_quantization_options(gen)
    gen.set_defaults(run=cmd_generate, parser=gen)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    att = bench_sub.add_parser(
        "attention", help="decode attention per backend and shape, against the measured "
                          "bandwidth roof of this machine")
    att.add_argument("--backend", nargs="+", default=["numpy", "numba"], dest="backends",
                     help="attention backends to time (see kvlib.bench.ATTENTION_BACKENDS)")
    att.add_argument("--batch", nargs="+", type=at_least(1), default=[1, 8], dest="batches")
    att.add_argument("--context", nargs="+", type=at_least(1), default=[1024, 8192],
                     dest="contexts")
    att.add_argument("--repeats", type=at_least(1), default=5)
    att.add_argument("--array-mb", type=at_least(1), default=None,
                     help="size of the array the read bandwidth is sampled on (MiB; "
                          "default: 4 times the last-level cache, at least 128)")
    att.add_argument("--json", action="store_true", help="one JSON object per row")
    att.add_argument("--quiet", action="store_true", help="no progress on stderr")
    att.set_defaults(run=cmd_bench_attention, parser=att)
    pre = bench_sub.add_parser(
        "prefill", help="a real-model prefill per attention backend, against the matmul "
                        "roof of this machine")
    pre.add_argument("--tokens", type=at_least(2), default=2000,
                     help="prompt tokens (the evaluation text, repeated)")
    pre.add_argument("--backend", nargs="+", choices=["numpy", "numba"],
                     default=["numpy", "numba"], dest="backends")
    pre.add_argument("--repeats", type=at_least(1), default=3, help="timed rounds (median)")
    pre.add_argument("--json", action="store_true", help="one JSON object per backend")
    pre.set_defaults(run=cmd_bench_prefill, parser=pre)
    dec = bench_sub.add_parser(
        "decode", help="end-to-end real-model decode steps per attention backend")
    dec.add_argument("--context", type=at_least(1), default=2000,
                     help="tokens cached per sequence before the first timed step")
    dec.add_argument("--batch", type=at_least(1), default=1, help="sequences")
    dec.add_argument("--backend", nargs="+", choices=["numpy", "numba"],
                     default=["numpy", "numba"], dest="backends")
    dec.add_argument("--steps", type=at_least(1), default=8, help="timed steps (median)")
    dec.add_argument("--json", action="store_true", help="one JSON object per backend")
    dec.set_defaults(run=cmd_bench_decode, parser=dec)

    mem = sub.add_parser("memory", help="KV cache bytes of a real model (see --list)")
    mem.add_argument("--model", help="a preset name, e.g. llama-3-8b")
    mem.add_argument("--tokens", type=at_least(1), help="tokens per sequence")
    mem.add_argument("--batch", type=at_least(1), default=1, help="sequences")
    mem.add_argument("--dtype", default="fp16",
                     help="storage type: fp32, fp16, bf16, fp8, int8, int4, int2")
    mem.add_argument("--group-size", type=at_least(1), default=None,
                     help="numbers per scale for int types (None: 32)")
    mem.add_argument("--json", action="store_true", help="one JSON object")
    mem.add_argument("--list", action="store_true", help="list the model presets")
    mem.set_defaults(run=cmd_memory, parser=mem)

    ppl = sub.add_parser("perplexity", help="teacher-forced perplexity of a text through a "
                                            "cache, and top-1 agreement with float32")
    ppl.add_argument("--text", default=None, metavar="FILE",
                     help="a UTF-8 text file (None: the book's evaluation text)")
    ppl.add_argument("--cache", choices=["contiguous", *QUANTIZED], default="int8",
                     help="the cache to measure (contiguous = float32)")
    _add_quantization_options(ppl)
    ppl.add_argument("--first-chunk", type=at_least(1), default=128,
                     help="tokens of the first step")
    ppl.add_argument("--chunk", type=at_least(1), default=64, help="tokens per later step")
    ppl.add_argument("--json", action="store_true", help="one JSON object")
    ppl.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ppl.set_defaults(run=cmd_perplexity, parser=ppl)

    roof = sub.add_parser("roofline", help="a decode step of a real model on a GPU's "
                                           "roofline: intensity, bound, predicted time")
    roof.add_argument("--gpu", help="a GPU from --list, e.g. H100-SXM")
    roof.add_argument("--model", help="a model preset, e.g. llama-3-8b")
    roof.add_argument("--context", type=at_least(1), help="tokens cached per sequence")
    roof.add_argument("--batch", type=at_least(1), default=1, help="sequences (default 1)")
    roof.add_argument("--dtype", default="fp16", help="KV cache storage type (default fp16)")
    roof.add_argument("--weights-dtype", default="bf16",
                      help="storage type of the weights (default bf16)")
    roof.add_argument("--json", action="store_true", help="one JSON object")
    roof.add_argument("--list", action="store_true", help="list the GPUs")
    roof.set_defaults(run=cmd_roofline, parser=roof)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the "
                                       "continuous-batching engine")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=at_least(0), default=8000, help="TCP port (default 8000)")
    srv.add_argument("--num-blocks", type=at_least(1), default=512,
                     help="blocks in the paged pool shared by all requests (default 512)")
    srv.add_argument("--block-size", type=at_least(1), default=16, help="tokens per block")
    srv.add_argument("--max-batch", type=at_least(1), default=16,
                     help="most requests decoding together (default 16)")
    srv.add_argument("--token-budget", type=at_least(1), default=256,
                     help="most tokens per forward step, decodes and prefill chunks")
    srv.add_argument("--backend", choices=["numpy", "numba"], default="numpy",
                     help="attention: the NumPy reference or the Numba kernels (decode "
                          "steps, and the causal kernel for steps with prefill chunks)")
    srv.add_argument("--quiet", action="store_true", help="no progress, warnings only")
    srv.set_defaults(run=cmd_serve, parser=srv)
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


def _emit_json(rows) -> int:
    """Print one JSON object per row; returns the exit status, 0."""
    for r in rows:
        emit(json.dumps(r))
    return 0


def cmd_bench_attention(args) -> int:
    from .bench import ATTENTION_BACKENDS, bench_attention
    from .model import ModelFile
    from .roofline import ReadProbe

    unknown = [b for b in args.backends if b not in ATTENTION_BACKENDS]
    if unknown:
        raise ConfigError(f"unknown attention backend(s) {unknown}; "
                          f"choose from {sorted(ATTENTION_BACKENDS)}")
    cfg = ModelFile().config
    result = bench_attention(args.backends, args.batches, args.contexts, cfg.n_heads,
                             cfg.n_kv_heads, cfg.head_dim, args.repeats,
                             progress=not args.quiet, probe=ReadProbe(args.array_mb))
    if args.json:
        return _emit_json({**r, "roof_gb_per_s": result.roof / 1e9} for r in result.rows)
    low, high = result.roof_range
    emit(f"read bandwidth roof {result.roof / 1e9:.1f} GB/s: median of "
         f"{len(result.roof_samples)} samples between the timings "
         f"(lowest {low / 1e9:.1f}, highest {high / 1e9:.1f})")
    emit(f"{'backend':<12}{'batch':>6}{'context':>9}{'ms':>10}{'GB/s':>8}{'of roof':>9}")
    for r in result.rows:
        cached = "" if r["beyond_llc"] else "  (fits in the last-level cache)"
        emit(f"{r['backend']:<12}{r['batch']:>6}{r['context']:>9}{r['seconds'] * 1e3:>10.3f}"
             f"{r['gb_per_s']:>8.1f}{r['fraction_of_roof']:>9.0%}{cached}")
    return 0


def _benchmark_model(n_tokens: int, flag: str, quiet: bool = True):
    """(model, ids): the model, and `n_tokens` ids of the evaluation text repeated,
    refused before loading if they would not fit the model's context."""
    import numpy as np

    from .evaluate import eval_text
    from .model import ModelFile

    file = ModelFile()
    if n_tokens > file.config.max_position:
        raise ConfigError(f"{flag} {n_tokens} is past the model's context of "
                          f"{file.config.max_position} tokens")
    ids = np.resize(file.tokenizer.encode(eval_text()), n_tokens)
    return file.load(progress=not quiet), ids


def cmd_bench_prefill(args) -> int:
    import numpy as np

    from .bench import bench_prefill

    model, ids = _benchmark_model(args.tokens, "--tokens")
    timings, roofs = bench_prefill(model, ids, args.backends, args.repeats)
    roof = float(np.median(roofs))
    rows = [{"backend": t.backend, "tokens": t.tokens, "seconds": t.seconds,
             "tokens_per_s": t.tokens_per_s, "attention_seconds": t.attention_seconds,
             "gflop": t.flops / 1e9, "gflop_per_s": t.flops_per_s / 1e9,
             "matmul_roof_gflop_per_s": roof / 1e9,
             "matmul_roof_spread": (max(roofs) - min(roofs)) / roof,
             "fraction_of_roof": t.flops_per_s / roof} for t in timings]
    if args.json:
        return _emit_json(rows)
    emit(f"prefill of {args.tokens} tokens ({rows[0]['gflop']:.0f} GFLOP); matmul roof "
         f"{roof / 1e9:.0f} GFLOP/s (median of {len(roofs)}, spread "
         f"{rows[0]['matmul_roof_spread']:.0%})")
    emit(f"{'backend':<9}{'seconds':>9}{'tokens/s':>10}{'attention s':>13}{'GFLOP/s':>9}"
         f"{'of roof':>9}")
    for r in rows:
        emit(f"{r['backend']:<9}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.0f}"
             f"{r['attention_seconds']:>13.2f}{r['gflop_per_s']:>9.1f}"
             f"{r['fraction_of_roof']:>9.0%}")
    return 0


def cmd_bench_decode(args) -> int:
    from .bench import bench_decode

    model, ids = _benchmark_model(args.context + args.steps + 1, "--context plus --steps")
    profiles = bench_decode(model, ids[:args.context], args.batch, args.backends, args.steps)
    rows = [{"backend": p.backend, "context": p.context, "batch": p.batch,
             "step_seconds": p.step_seconds, "tokens_per_s": p.tokens_per_s,
             "attention_share": p.attention_share} for p in profiles]
    if args.json:
        return _emit_json(rows)
    emit(f"decode, batch {args.batch} x {args.context} cached tokens")
    emit(f"{'backend':<9}{'ms/step':>9}{'tokens/s':>10}{'attention':>11}")
    for r in rows:
        emit(f"{r['backend']:<9}{r['step_seconds'] * 1e3:>9.1f}{r['tokens_per_s']:>10.1f}"
             f"{r['attention_share']:>11.0%}")
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, 2 on an error, 130 on Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except OutputError as err:
        _silence_stdout()
        print(f"kvlib: error: {err}", file=sys.stderr)
        return 2
    except KVLibError as err:
        print(f"kvlib: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlib: error: interrupted", file=sys.stderr)
        return 130
