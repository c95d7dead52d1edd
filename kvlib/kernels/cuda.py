"""Paged decode attention as a `numba.cuda` kernel, with the split-K merge.

The same computation as `kvlib.kernels.cpu.decode_paged`, mapped onto a GPU the way
paged-attention kernels are (vLLM, Flash-Decoding):

* **grid** = (sequence, KV head, split): one thread block per work item. A split is a
  range of whole pages of the sequence's block table (split-K): with few sequences,
  splitting the context is what gives every SM a block to run.
* **warps over tokens**: warp w of the block takes tokens w, w + n_warps, ... of its
  range, each found through the block table (page `t // block_size`, slot
  `t % block_size`).
* **lanes over head_dim**: lane k holds dimensions k, k + 32, k + 64, ... of the query
  group, of the running output, and reads the same dimensions of every key and value.
  At each step the 32 lanes of a warp read 32 consecutive numbers of one row: one
  coalesced 128-byte transaction in float32.
* **the g query heads of a KV head** stay in registers (`cuda.local.array`), so each
  key and value is read once for all of them.
* a dot product's 32 partial sums are added through shared memory (on hardware, warp
  shuffles do the same; Numba's CUDA simulator has no shuffles);
* each warp keeps an online-softmax state (m, l, acc) per query head; at the end the
  warps of a block, then (second kernel) the splits of an item, are combined by the
  merge rule of chapter 7: rescale each state to the larger maximum and add.

Keys and values are float32, or int8 codes with one float32 scale per token and head
(the scale multiplies the score, and the weight of the value).

Numba's CUDA simulator runs these kernels on the CPU when the environment variable
`NUMBA_ENABLE_CUDASIM=1` is set before this module (which imports `numba.cuda`) is first
imported; if `numba` itself was imported earlier, `numba.core.config.reload_config()`
makes it read the variable again. The simulator runs every thread as a Python thread:
use it on small shapes, to check correctness, never to time anything.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda

from ..errors import ConfigError, DTypeError, ShapeError

SIMULATOR_HINT = ("set NUMBA_ENABLE_CUDASIM=1 to run the numba.cuda kernel in Numba's CUDA "
                  "simulator on the CPU (slow: use it for a few tokens)")

WARP = 32
MAX_WARPS = 2       # warps per block (tokens processed side by side)
MAX_GROUP = 8       # query heads per KV head held in registers
MAX_PER_LANE = 4    # dimensions per lane: head_dim <= 128
TILE = 8            # tokens a warp takes per round
# The block's static shared arrays (partial sums, scores, the warps' states) then take
# about 25 KiB, inside the 48 KiB a CUDA block may declare statically.


def simulating() -> bool:
    """True when numba.cuda runs in the CPU simulator."""
    return bool(numba.core.config.ENABLE_CUDASIM)


def require_device() -> None:
    """Raise `ConfigError` unless a CUDA GPU or the simulator can run the kernel."""
    if not cuda.is_available():
        raise ConfigError(f"no CUDA GPU is available; {SIMULATOR_HINT}")


@cuda.jit(device=True)
def _token_scale(scales, block, head, slot, quantized):
    """Scale of one stored int8 vector; 1 for float32 storage."""
    if quantized:
        return scales[block, head, slot]
    return np.float32(1.0)


@cuda.jit
def _paged_decode_kernel(q, keys, values, key_scale, value_scale, quantized, block_table,
                         lengths, scale, part_m, part_l, part_acc):
    """One block per (sequence b, KV head h, split); writes that split's partial state.

    q: [B, n_heads, d]; keys, values: [num_blocks, n_kv_heads, block_size, d];
    key_scale, value_scale: [num_blocks, n_kv_heads, block_size] (int8) or unused;
    part_m, part_l: [B, n_kv_heads, n_splits, G]; part_acc: [..., G, d].
    """
    b, h, split = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    n_splits = cuda.gridDim.z
    lane, warp = cuda.threadIdx.x % WARP, cuda.threadIdx.x // WARP
    n_warps = cuda.blockDim.x // WARP
    n_group, head_dim = part_acc.shape[3], part_acc.shape[4]
    per_lane = head_dim // WARP
    block_size = keys.shape[2]

    # the query group, this lane's dimensions, pre-scaled, in registers
    q_reg = cuda.local.array((MAX_GROUP, MAX_PER_LANE), numba.float32)
    m = cuda.local.array(MAX_GROUP, numba.float32)
    l = cuda.local.array(MAX_GROUP, numba.float32)
    acc = cuda.local.array((MAX_GROUP, MAX_PER_LANE), numba.float32)
    for g in range(n_group):
        m[g] = -math.inf
        l[g] = 0.0
        for i in range(per_lane):
            q_reg[g, i] = q[b, h * n_group + g, lane + i * WARP] * scale
            acc[g, i] = 0.0

    # this split's tokens: whole pages of the block table
    length = lengths[b]
    n_pages = (length + block_size - 1) // block_size
    pages_per_split = (n_pages + n_splits - 1) // n_splits
    first = min(split * pages_per_split * block_size, length)
    end = min(first + pages_per_split * block_size, length)

    # per round, warp w takes TILE consecutive tokens; their dot products' 32 partial
    # sums go through shared memory, then each lane adds up the sums of a few (head,
    # token) pairs, so that a round needs two barriers whatever the tile
    partial = cuda.shared.array((MAX_WARPS, MAX_GROUP, TILE, WARP), numba.float32)
    scores = cuda.shared.array((MAX_WARPS, MAX_GROUP, TILE), numba.float32)
    n_rounds = (end - first + n_warps * TILE - 1) // (n_warps * TILE)
    for r in range(n_rounds):  # every warp runs every round: barriers stay aligned
        base = first + (r * n_warps + warp) * TILE
        n_valid = max(0, min(TILE, end - base))
        for j in range(n_valid):
            page, slot = block_table[b, (base + j) // block_size], (base + j) % block_size
            for g in range(n_group):
                s = np.float32(0.0)
                for i in range(per_lane):
                    s += q_reg[g, i] * keys[page, h, slot, lane + i * WARP]
                partial[warp, g, j, lane] = s
        cuda.syncthreads()
        for pair in range(lane, n_group * TILE, WARP):
            g, j = pair // TILE, pair % TILE
            if j < n_valid:
                page, slot = block_table[b, (base + j) // block_size], (base + j) % block_size
                s = np.float32(0.0)
                for k in range(WARP):
                    s += partial[warp, g, j, k]
                scores[warp, g, j] = s * _token_scale(key_scale, page, h, slot, quantized)
        cuda.syncthreads()
        for g in range(n_group if n_valid > 0 else 0):  # online-softmax update by the tile
            new_m = m[g]
            for j in range(n_valid):
                new_m = max(new_m, scores[warp, g, j])
            correction = math.exp(m[g] - new_m)
            l[g] *= correction
            for i in range(per_lane):
                acc[g, i] *= correction
            for j in range(n_valid):
                page, slot = block_table[b, (base + j) // block_size], (base + j) % block_size
                p = math.exp(scores[warp, g, j] - new_m)
                l[g] += p
                p *= _token_scale(value_scale, page, h, slot, quantized)
                for i in range(per_lane):
                    acc[g, i] += p * values[page, h, slot, lane + i * WARP]
            m[g] = new_m

    # combine the warps' states (the merge rule), then write this split's state
    warp_m = cuda.shared.array((MAX_WARPS, MAX_GROUP), numba.float32)
    warp_l = cuda.shared.array((MAX_WARPS, MAX_GROUP), numba.float32)
    warp_acc = cuda.shared.array((MAX_WARPS, MAX_GROUP, MAX_PER_LANE * WARP), numba.float32)
    for g in range(n_group):
        if lane == 0:
            warp_m[warp, g] = m[g]
            warp_l[warp, g] = l[g]
        for i in range(per_lane):
            warp_acc[warp, g, lane + i * WARP] = acc[g, i]
    cuda.syncthreads()
    if warp == 0:
        for g in range(n_group):
            top = -math.inf
            for w in range(n_warps):
                top = max(top, warp_m[w, g])
            total = np.float32(0.0)
            for i in range(per_lane):
                acc[g, i] = 0.0
            for w in range(n_warps):
                if warp_l[w, g] > 0:
                    weight = math.exp(warp_m[w, g] - top)
                    total += weight * warp_l[w, g]
                    for i in range(per_lane):
                        acc[g, i] += weight * warp_acc[w, g, lane + i * WARP]
            if lane == 0:
                part_m[b, h, split, g] = top
                part_l[b, h, split, g] = total
            for i in range(per_lane):
                part_acc[b, h, split, g, lane + i * WARP] = acc[g, i]


@cuda.jit
def _merge_splits_kernel(part_m, part_l, part_acc, out):
    """out[b, h * G + g, j] from the split states of (b, h, g); thread j, every g.

    Grid (B, n_kv_heads), a block of head_dim threads. A split that saw no token
    (l = 0) contributes nothing.
    """
    b, h = cuda.blockIdx.x, cuda.blockIdx.y
    j = cuda.threadIdx.x
    n_splits, n_group = part_m.shape[2], part_m.shape[3]
    for g in range(n_group):
        top = -math.inf
        for s in range(n_splits):
            top = max(top, part_m[b, h, s, g])
        total = np.float32(0.0)
        value = np.float32(0.0)
        for s in range(n_splits):
            if part_l[b, h, s, g] > 0:
                weight = math.exp(part_m[b, h, s, g] - top)
                total += weight * part_l[b, h, s, g]
                value += weight * part_acc[b, h, s, g, j]
        out[b, h * n_group + g, j] = value / total


def _check_inputs(q, keys, values, block_table, lengths, key_scale, value_scale, n_warps):
    if not isinstance(q, np.ndarray) or q.dtype != np.float32 or q.ndim != 3:
        raise DTypeError(f"q must be a float32 array [B, n_heads, head_dim], got "
                         f"{getattr(q, 'dtype', type(q))} {getattr(q, 'shape', '')}")
    if keys.ndim != 4 or values.shape != keys.shape:
        raise ShapeError(f"keys and values must both be [num_blocks, n_kv_heads, block_size, "
                         f"head_dim], got {keys.shape} and {values.shape}")
    n_seq, n_heads, head_dim = q.shape
    num_blocks, n_kv_heads, block_size, kv_dim = keys.shape
    if kv_dim != head_dim or n_heads % n_kv_heads:
        raise ShapeError(f"q {q.shape} does not match keys {keys.shape}")
    if head_dim % WARP or head_dim > MAX_PER_LANE * WARP or n_heads // n_kv_heads > MAX_GROUP:
        raise ShapeError(f"the kernel needs head_dim a multiple of {WARP} up to "
                         f"{MAX_PER_LANE * WARP} and at most {MAX_GROUP} query heads per KV "
                         f"head; got head_dim {head_dim}, group {n_heads // n_kv_heads}")
    if keys.dtype == np.int8:
        want = (num_blocks, n_kv_heads, block_size)
        for name, s in (("key_scale", key_scale), ("value_scale", value_scale)):
            if s is None or s.dtype != np.float32 or s.shape != want:
                raise DTypeError(f"int8 keys/values need float32 {name} of shape {want}")
    elif keys.dtype != np.float32 or key_scale is not None or value_scale is not None:
        raise DTypeError(f"keys/values must be float32, or int8 with scales; got {keys.dtype}")
    if values.dtype != keys.dtype:
        raise DTypeError(f"keys are {keys.dtype} but values are {values.dtype}")
    if block_table.ndim != 2 or block_table.shape[0] != n_seq or len(lengths) != n_seq:
        raise ShapeError(f"block_table {block_table.shape} and lengths {len(lengths)} must "
                         f"have one row per sequence ({n_seq})")
    if n_seq and (lengths.min() < 1 or lengths.max() > block_table.shape[1] * block_size):
        raise ShapeError(f"lengths must lie in [1, {block_table.shape[1] * block_size}], "
                         f"got {lengths}")
    used = block_table[np.arange(block_table.shape[1]) < -(-lengths[:, None] // block_size)]
    if used.size and (used.min() < 0 or used.max() >= num_blocks):
        raise ShapeError(f"block table names blocks outside the pool of {num_blocks}")
    if not 1 <= n_warps <= MAX_WARPS:
        raise ConfigError(f"n_warps must lie in [1, {MAX_WARPS}], got {n_warps}")


def device_sms() -> int:
    """Streaming multiprocessors of the current GPU (1 under the simulator)."""
    if simulating():
        return 1
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def decode_paged(q: np.ndarray, keys, values, block_table, lengths,
                 scale: float | None = None, n_splits: int | None = None,
                 key_scale=None, value_scale=None, n_warps: int = 2) -> np.ndarray:
    """Decode attention over one layer of a paged block pool, on the GPU (or simulator).

    Args:
        q: [B, n_heads, head_dim] float32, one new query per sequence.
        keys, values: [num_blocks, n_kv_heads, block_size, head_dim], float32 or int8.
        block_table: [B, max_blocks] int; token t of sequence b is in page
            block_table[b, t // block_size] at slot t % block_size.
        lengths: [B] tokens to attend over (the new one included), >= 1.
        scale: multiplier of q . k (default 1 / sqrt(head_dim)).
        n_splits: split-K ranges per (sequence, KV head); default `kvlib.gpu.gpu_splits`
            for this device.
        key_scale, value_scale: [num_blocks, n_kv_heads, block_size] float32, for int8.
        n_warps: warps per block (tokens processed side by side).
    Returns:
        [B, n_heads, head_dim] float32.
    """
    from ..gpu import gpu_splits

    require_device()
    block_table = np.ascontiguousarray(block_table, dtype=np.int32)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    _check_inputs(q, keys, values, block_table, lengths, key_scale, value_scale, n_warps)
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    if n_splits is None:
        n_splits = gpu_splits(n_seq, n_kv_heads, int(lengths.max()), device_sms())
    if n_splits < 1:
        raise ConfigError(f"n_splits must be positive, got {n_splits}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    quantized = keys.dtype == np.int8
    if not quantized:  # the kernel never reads scales then; pass a placeholder
        key_scale = value_scale = np.ones((1, 1, 1), dtype=np.float32)
    return _launch(np.ascontiguousarray(q), keys, values, key_scale, value_scale, quantized,
                   block_table, lengths, scale, n_splits, n_warps)


def _launch(q, keys, values, key_scale, value_scale, quantized, block_table, lengths, scale,
            n_splits, n_warps) -> np.ndarray:
    """Run the split kernel and the merge kernel; return the output on the host."""
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    n_group = n_heads // n_kv_heads
    part_m = cuda.device_array((n_seq, n_kv_heads, n_splits, n_group), np.float32)
    part_l = cuda.device_array((n_seq, n_kv_heads, n_splits, n_group), np.float32)
    part_acc = cuda.device_array((n_seq, n_kv_heads, n_splits, n_group, head_dim), np.float32)
    out = cuda.device_array((n_seq, n_heads, head_dim), np.float32)
    _paged_decode_kernel[(n_seq, n_kv_heads, n_splits), WARP * n_warps](
        q, keys, values, key_scale, value_scale, quantized,
        block_table, lengths, np.float32(scale), part_m, part_l, part_acc)
    _merge_splits_kernel[(n_seq, n_kv_heads), head_dim](part_m, part_l, part_acc, out)
    return out.copy_to_host()
