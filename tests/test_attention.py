"""Reference attention and masks."""

import numpy as np

from kvlib.attention import attention, softmax
from kvlib.masks import causal_mask


def test_causal_mask_is_aligned_bottom_right():
    m = causal_mask(2, 3)
    assert m.shape == (2, 5)
    assert m[0].tolist() == [True, True, True, True, False]
    assert m[1].all()
    assert (causal_mask(4) == np.tril(np.ones((4, 4), bool))).all()


def test_fully_masked_row_gives_zeros_not_nan():
    p = softmax(np.zeros((2, 3), np.float32), np.array([[True, False, True], [False] * 3]))
    assert not np.isnan(p).any()
    np.testing.assert_allclose(p[0], [0.5, 0, 0.5])
    np.testing.assert_array_equal(p[1], 0)


def test_gqa_equals_mha_with_repeated_kv_heads(rng):
    q = rng.standard_normal((5, 6, 4), dtype=np.float32)
    k = rng.standard_normal((2, 7, 4), dtype=np.float32)
    v = rng.standard_normal((2, 7, 4), dtype=np.float32)
    gqa = attention(q, k, v)
    mha = attention(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0))
    np.testing.assert_allclose(gqa, mha, rtol=1e-6)


def test_attention_matches_a_per_head_loop(rng):
    q = rng.standard_normal((3, 4, 8), dtype=np.float32)
    k = rng.standard_normal((2, 5, 8), dtype=np.float32)
    v = rng.standard_normal((2, 5, 8), dtype=np.float32)
    mask = causal_mask(3, 2)
    out = attention(q, k, v, mask)
    assert out.dtype == np.float32
    for t in range(3):
        for h in range(4):
            s = k[h // 2] @ q[t, h] / np.sqrt(8)
            s[~mask[t]] = -np.inf
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(out[t, h], p @ v[h // 2], rtol=1e-5, atol=1e-6)
