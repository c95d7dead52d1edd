"""Decode throughput of the real model with and without the contiguous cache.

    python tools/bench_decode.py [--lengths 64 256 512] [--json]

For each length N, generates exactly N tokens greedily (stop tokens ignored) from the
same plain prompt, once recomputing everything (no cache) and once with a
`ContiguousCache`, after one short warm-up run of each. Prints tokens/s and the ratio.
Also times a cold model load (dequantizing into an empty cache directory) and a warm one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from kvlib.cache import ContiguousCache
from kvlib.model import load_model
from kvlib.model.generate import generate

PROMPT = "The history of computer memory begins with"


def timed_load(cache_dir: str) -> tuple[float, object]:
    os.environ["KVLIB_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    model = load_model(progress=False)
    return time.perf_counter() - start, model


def decode_seconds(model, prompt, n_new: int, use_cache: bool) -> float:
    cache = (ContiguousCache.from_config(model.config, 1, len(prompt) + n_new)
             if use_cache else None)
    start = time.perf_counter()
    out = generate(model.llama, [prompt], cache, max_new_tokens=n_new)
    seconds = time.perf_counter() - start
    assert len(out[0].token_ids) == n_new
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as empty:
        cold, _ = timed_load(empty)
        warm, model = timed_load(empty)
    prompt = model.encode(PROMPT)
    for use_cache in (False, True):
        decode_seconds(model, prompt, 8, use_cache)  # warm-up
    rows = []
    for n in args.lengths:
        uncached = n / decode_seconds(model, prompt, n, use_cache=False)
        cached = n / decode_seconds(model, prompt, n, use_cache=True)
        rows.append({"new_tokens": n, "uncached_tokens_per_s": round(uncached, 2),
                     "cached_tokens_per_s": round(cached, 2),
                     "speedup": round(cached / uncached, 2)})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    summary = {"machine": machine, "cold_load_s": round(cold, 2), "warm_load_s": round(warm, 2),
               "prompt_tokens": len(prompt), "decode": rows}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"machine: {machine}; cold load {cold:.2f} s, warm load {warm:.2f} s")
    print(f"{'new tokens':>10} {'uncached tok/s':>15} {'cached tok/s':>13} {'speedup':>8}")
    for r in rows:
        print(f"{r['new_tokens']:>10} {r['uncached_tokens_per_s']:>15} "
              f"{r['cached_tokens_per_s']:>13} {r['speedup']:>7}x")


if __name__ == "__main__":
    main()
