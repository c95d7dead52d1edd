"""Run the numba.cuda paged decode kernel on a real GPU and write what it measured as JSON.

    python tools/gpu_check.py chapters/data/09_gpu_check.json

It checks that the kernel equals the CPU kernel of chapter 8 (float32 and int8), then
times it on a cache far larger than the GPU's L2 and reports the bandwidth it reached
(bytes that must be read / median time) next to a plain copy kernel's and the
datasheet's (`kvlib.gpu.GPUS`). Chapter 9 shows the file, labelled with the card and the
date, when it exists. Needs a CUDA GPU and a CUDA toolkit numba-cuda can compile with
(for example `pip install numba-cuda[cu12]`); it refuses to run under the simulator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time

import numpy as np
from numba import cuda

DEVICE_NAMES = (  # substring of the device's name -> row of kvlib.gpu.GPUS, first match
    ("H200", "H200-SXM"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-SXM"),
    ("A100-SXM4-80GB", "A100-80GB-SXM"), ("A100-SXM4-40GB", "A100-40GB-SXM"),
    ("L40S", "L40S"), ("L4", "L4"), ("4090", "RTX-4090"))


def paged_problem(rng, batch, context, n_kv_heads, group, head_dim, block_size):
    """Random q, K/V pool and block tables (pages of the sequences interleaved)."""
    pages = context // block_size
    shape = (batch * pages, n_kv_heads, block_size, head_dim)
    keys = rng.standard_normal(shape, dtype=np.float32)
    values = rng.standard_normal(shape, dtype=np.float32)
    q = rng.standard_normal((batch, n_kv_heads * group, head_dim), dtype=np.float32)
    table = rng.permutation(batch * pages).reshape(batch, pages).astype(np.int32)
    return q, keys, values, table, np.full(batch, context)


def median_seconds(fn, repeats):
    fn()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@cuda.jit
def copy(dst, src):
    """dst[i] = src[i], one thread per element: the bandwidth baseline."""
    i = cuda.grid(1)
    if i < src.size:
        dst[i] = src[i]


def copy_bandwidth(n_bytes, repeats):
    """Bytes/s of a plain copy kernel (reads and writes n_bytes each)."""
    src = cuda.to_device(np.ones(n_bytes // 4, dtype=np.float32))
    dst = cuda.device_array_like(src)
    threads = 256
    blocks = math.ceil(src.size / threads)
    return 2 * n_bytes / median_seconds(lambda: copy[blocks, threads](dst, src), repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    from kvlib.gpu import GPUS
    from kvlib.kernels import cpu
    from kvlib.kernels import cuda as kcuda
    from kvlib.quantize import quantize

    if kcuda.simulating() or not cuda.is_available():
        print("gpu_check measures a real GPU: none found (or NUMBA_ENABLE_CUDASIM is set)",
              file=sys.stderr)
        return 2
    device = cuda.get_current_device()
    card = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    spec = next((GPUS[row] for key, row in DEVICE_NAMES if key in card), None)
    rng = np.random.default_rng(0)

    # 1. equality with the CPU kernel, float32 and int8, on a small problem
    q, keys, values, table, lengths = paged_problem(rng, 3, 992, 8, 4, 128, 16)
    longest = table.shape[1] * keys.shape[2]
    lengths = np.array([1, longest // 2 + 1, longest])  # one token, a partial page, full
    want = cpu.decode_paged(q, keys, values, table, lengths)
    errors = {s: float(np.abs(kcuda.decode_paged(q, keys, values, table, lengths,
                                                 n_splits=s) - want).max())
              for s in (1, 3, 8)}
    coded = [quantize(x, 8, axis=-1, symmetric=True, scale_dtype=np.float32)
             for x in (keys, values)]
    scales = [c.scale[..., 0] for c in coded]
    want8 = cpu.decode_paged(q, *(c.codes.astype(np.float32) * s[..., None]
                                  for c, s in zip(coded, scales)), table, lengths)
    got8 = kcuda.decode_paged(q, coded[0].codes, coded[1].codes, table, lengths,
                              key_scale=scales[0], value_scale=scales[1])
    int8_error = float(np.abs(got8 - want8).max())

    # 2. bandwidth on a cache far larger than L2
    q, keys, values, table, lengths = paged_problem(rng, args.batch, args.context,
                                                    args.kv_heads, args.group,
                                                    args.head_dim, args.block_size)
    d_keys, d_values = cuda.to_device(keys), cuda.to_device(values)
    kv_bytes = keys.nbytes + values.nbytes
    splits = None  # kvlib.gpu.gpu_splits for this device
    seconds = median_seconds(lambda: kcuda.decode_paged(q, d_keys, d_values, table, lengths,
                                                        n_splits=splits), args.repeats)
    copy_bps = copy_bandwidth(min(kv_bytes, 2**30), args.repeats)
    result = {
        "card": card, "date": datetime.date.today().isoformat(),
        "sms": device.MULTIPROCESSOR_COUNT, "spec": spec.name if spec else None,
        "shape": {"batch": args.batch, "context": args.context, "kv_heads": args.kv_heads,
                  "group": args.group, "head_dim": args.head_dim,
                  "block_size": args.block_size, "dtype": "float32"},
        "max_abs_error_float32": max(errors.values()), "max_abs_error_int8": int8_error,
        "kv_bytes": kv_bytes, "kernel_seconds": seconds,
        "kernel_bytes_per_s": kv_bytes / seconds, "copy_bytes_per_s": copy_bps,
        "datasheet_bytes_per_s": spec.bandwidth if spec else None,
        "fraction_of_datasheet": kv_bytes / seconds / spec.bandwidth if spec else None,
        "fraction_of_copy": kv_bytes / seconds / copy_bps,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    ok = max(errors.values()) < 1e-4 and int8_error < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
