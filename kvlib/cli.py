"""Command line: `kvlib generate "prompt"` and friends (`python -m kvlib` works the same)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import KVLibError


def _make_cache(args, model, prompts):
    """The cache named by --cache, sized for this batch (None for recompute)."""
    from .cache import ContiguousCache

    if args.cache == "none":
        return None
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    return ContiguousCache.from_config(model.config, max_batch=len(prompts), max_seq=longest)


def cmd_generate(args) -> int:
    from .model import Sampler, load_model

    model = load_model(progress=not args.quiet)
    prompts = [model.encode(p, chat=args.chat) for p in args.prompts]
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    cache = _make_cache(args, model, prompts)

    start = time.perf_counter()
    results = model.generate(prompts, cache=cache, max_new_tokens=args.max_new_tokens,
                             sampler=sampler, prefill_chunk=args.prefill_chunk)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with SmolLM2-135M-Instruct")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT",
                     help="one or more prompts, decoded together as one batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--cache", choices=["none", "contiguous"], default="contiguous",
                     help="none recomputes every token's keys and values at every step")
    gen.add_argument("--prefill-chunk", type=int, default=None, metavar="C",
                     help="feed each prompt through the cache C tokens at a time "
                          "(chunked prefill; needs a cache)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--quiet", action="store_true", help="no progress or timing on stderr")
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KVLibError as err:
        print(f"kvlib: error: {err}", file=sys.stderr)
        return 2
