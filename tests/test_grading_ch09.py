"""The chapter 9 graders pass correct solutions and reject plausible wrong ones, saying why."""

import math

from kvlib.grading.ch09 import (grade_coalesced_dim, grade_decode_intensity,
                                grade_grid_occupancy, grade_predict)


def decode_intensity(n_heads, n_kv_heads, head_dim, bits, group_size, meta_bytes):
    groups = math.ceil(head_dim / group_size) if group_size else 0
    per_vector = head_dim * bits / 8 + groups * meta_bytes
    return 4 * (n_heads // n_kv_heads) * head_dim / (2 * per_vector)


def predict(flops, bytes_, bandwidth, peak_flops):
    memory_s, compute_s = bytes_ / bandwidth, flops / peak_flops
    return ("memory" if memory_s >= compute_s else "compute"), max(memory_s, compute_s)


def grid_occupancy(batch, n_kv_heads, n_splits, sms):
    blocks = batch * n_kv_heads * n_splits
    waves = -(-blocks // sms)
    return blocks, waves, blocks / (waves * sms)


def test_correct_solutions_pass():
    for report in (grade_decode_intensity(decode_intensity), grade_predict(predict),
                   grade_grid_occupancy(grid_occupancy),
                   grade_coalesced_dim(lambda lane, step, d: lane + 32 * step)):
        assert report.ok, report


def test_wrong_intensities_are_explained():
    only_keys = grade_decode_intensity(
        lambda h, kv, d, bits, gs, meta: 2 * decode_intensity(h, kv, d, bits, gs, meta))
    assert not only_keys.ok and "a key AND a value" in str(only_keys)
    all_heads = grade_decode_intensity(
        lambda h, kv, d, bits, gs, meta: decode_intensity(h, 1, d, bits, gs, meta))
    assert not all_heads.ok and "query heads" in str(all_heads)
    no_scales = grade_decode_intensity(
        lambda h, kv, d, bits, gs, meta: decode_intensity(h, kv, d, bits, None, 0))
    assert not no_scales.ok and "scale/zero point" in str(no_scales)
    bits_as_bytes = grade_decode_intensity(
        lambda h, kv, d, bits, gs, meta: 4 * (h // kv) * d / (2 * d * bits))
    assert not bits_as_bytes.ok and "bits is" in str(bits_as_bytes)


def test_wrong_predictions_are_explained():
    summed = grade_predict(lambda f, b, bw, p: ("memory" if b / bw >= f / p else "compute",
                                                b / bw + f / p))
    assert not summed.ok and "the larger" in str(summed)
    always_memory = grade_predict(lambda f, b, bw, p: ("memory", max(b / bw, f / p)))
    assert not always_memory.ok and "the longer one binds" in str(always_memory)
    smaller = grade_predict(lambda f, b, bw, p: predict(f, b, bw, p)[0:1] + (min(b / bw, f / p),))
    assert not smaller.ok and "expected" in str(smaller)


def test_wrong_occupancies_are_explained():
    no_heads = grade_grid_occupancy(lambda b, kv, s, sms: grid_occupancy(b, 1, s, sms))
    assert not no_heads.ok and "per KV head" in str(no_heads)
    floor_waves = grade_grid_occupancy(
        lambda b, kv, s, sms: (b * kv * s, b * kv * s // sms, 0.5))
    assert not floor_waves.ok and "round up" in str(floor_waves)
    over_one = grade_grid_occupancy(
        lambda b, kv, s, sms: grid_occupancy(b, kv, s, sms)[:2] + (b * kv * s / sms,))
    assert not over_one.ok and "blocks / (waves * SMs)" in str(over_one)


def test_uncoalesced_or_incomplete_mappings_are_explained():
    chunked = grade_coalesced_dim(lambda lane, step, d: lane * (d // 32) + step)
    assert not chunked.ok and "sectors instead of 4" in str(chunked)
    assert chunked.passed == 1  # head_dim 32: one step, the two mappings coincide
    half = grade_coalesced_dim(lambda lane, step, d: lane % 16 + 16 * step)
    assert not half.ok and "exactly once" in str(half)
    reversed_lanes = grade_coalesced_dim(lambda lane, step, d: 31 - lane + 32 * step)
    assert reversed_lanes.ok  # any order inside the 128 bytes is still one transaction


def test_not_implemented_is_reported_cleanly():
    def stub(*args):
        raise NotImplementedError("your code here")
    for grade in (grade_decode_intensity, grade_predict, grade_grid_occupancy,
                  grade_coalesced_dim):
        report = grade(stub)
        assert report.not_implemented and "not implemented yet" in str(report)
