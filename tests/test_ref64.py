"""Tests of the float64 reference itself (tests/ref64.py): hand-computable cases and brute force."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest

from jaxinfer.variants import AttentionVariant
from ref64 import (
    alibi_slopes_ref,
    gather_paged_kv,
    random_page_table,
    ref_attention,
    ref_batch,
    ref_merge,
    rope_rotate_half,
)

LOG2E = 1.0 / math.log(2.0)


def _qkv(rng, lq, lk, hq, hkv, d):
    return (
        rng.standard_normal((lq, hq, d)),
        rng.standard_normal((lk, hkv, d)),
        rng.standard_normal((lk, hkv, d)),
    )


def _brute(q, k, v, *, causal, window_left, cap, sm_scale, alibi, custom_mask):
    """Scalar loops, one query row and one head at a time."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    slopes = alibi_slopes_ref(hq)
    o = np.zeros((lq, hq, d))
    lse = np.full((lq, hq), -np.inf)
    for h in range(hq):
        kvh = h // (hq // hkv)
        for i in range(lq):
            pos = i + lk - lq
            xs, vs = [], []
            for j in range(lk):
                if causal and j > pos:
                    continue
                if window_left >= 0 and j < pos - window_left:
                    continue
                if custom_mask is not None and not custom_mask[i, j]:
                    continue
                x = sum(q[i, h, e] * k[j, kvh, e] for e in range(d)) * sm_scale
                if cap:
                    x = cap * math.tanh(x / cap)
                if alibi:
                    x += slopes[h] * (j - pos)
                xs.append(x)
                vs.append(v[j, kvh])
            if not xs:
                continue
            m = max(xs)
            ws = [math.exp(x - m) for x in xs]
            o[i, h] = sum(w * vj for w, vj in zip(ws, vs)) / sum(ws)
            lse[i, h] = (m + math.log(sum(ws))) * LOG2E
    return o, lse


def test_one_key_gives_its_value(rng):
    q, k, v = _qkv(rng, 3, 1, 8, 2, 16)
    o, lse = ref_attention(q, k, v)
    kv_head = np.arange(8) // 4
    np.testing.assert_allclose(o, np.broadcast_to(v[0, kv_head], o.shape), rtol=1e-12)
    x = np.einsum("ihd,hd->ih", q, k[0, kv_head]) / math.sqrt(16)
    np.testing.assert_allclose(lse, x * LOG2E, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_equal_logits_give_mean_and_log2_n(rng, n):
    q = rng.standard_normal((2, 4, 8))
    k = np.broadcast_to(rng.standard_normal((1, 4, 8)), (n, 4, 8))
    v = rng.standard_normal((n, 4, 8))
    o, lse = ref_attention(q, k, v, sm_scale=0.3)
    np.testing.assert_allclose(o, np.broadcast_to(v.mean(axis=0), o.shape), rtol=1e-12, atol=1e-14)
    x = np.einsum("ihd,hd->ih", q, k[0]) * 0.3
    np.testing.assert_allclose(lse, math.log2(n) + x * LOG2E, rtol=1e-12)


@pytest.mark.parametrize(
    "lq,lk,causal,window_left,cap,alibi,masked",
    [
        (4, 6, False, -1, None, False, False),
        (4, 6, True, -1, None, False, False),
        (6, 4, True, -1, None, False, False),  # qo_len > kv_len: first rows see nothing
        (5, 9, True, 2, None, False, False),
        (5, 9, False, 0, None, False, False),
        (3, 7, False, -1, 2.5, False, False),
        (4, 6, True, -1, None, True, False),
        (4, 6, False, -1, None, False, True),
        (4, 6, True, 1, 3.0, True, True),
    ],
)
def test_masks_and_logits_options_match_brute_force(rng, lq, lk, causal, window_left, cap, alibi, masked):
    q, k, v = _qkv(rng, lq, lk, 4, 2, 8)
    mask = rng.random((lq, lk)) < 0.6 if masked else None
    o, lse = ref_attention(
        q,
        k,
        v,
        causal=causal,
        window_left=window_left,
        logits_soft_cap=cap,
        sm_scale=0.4,
        pos_encoding_mode="ALIBI" if alibi else "NONE",
        custom_mask=mask,
    )
    want_o, want_lse = _brute(
        q, k, v, causal=causal, window_left=window_left, cap=cap, sm_scale=0.4, alibi=alibi, custom_mask=mask
    )
    np.testing.assert_allclose(o, want_o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10)


def test_row_without_visible_key_is_zero_and_minus_inf(rng):
    q, k, v = _qkv(rng, 6, 3, 2, 1, 8)
    o, lse = ref_attention(q, k, v, causal=True)  # rows 0..2 have q_pos < 0
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(o[:3], 0.0)
    np.testing.assert_array_equal(lse[:3], -np.inf)
    assert np.isfinite(lse[3:]).all()
    o, lse = ref_attention(q, k[:0], v[:0])
    np.testing.assert_array_equal(o, 0.0)
    np.testing.assert_array_equal(lse, -np.inf)


@pytest.mark.parametrize("shift", [5e5, -5e5])
def test_stable_for_huge_logits(rng, shift):
    q, k, v = _qkv(rng, 3, 5, 2, 2, 8)
    o0, lse0 = ref_attention(q, k, v)
    shifted = AttentionVariant(logits_transform=lambda x, *_: x + shift)
    o, lse = ref_attention(q, k, v, variant=shifted)
    # Logits near 5e5 carry float64 rounding of ~5e5 * 2.2e-16 = 1.1e-10 each, so the softmax
    # weights move by ~1e-10 relative: far below any kernel tolerance, far above 1e-12.
    np.testing.assert_allclose(o, o0, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(lse, lse0 + shift * LOG2E, rtol=1e-12)


def test_rope_rotate_half_matches_complex_rotation(rng):
    lq, h, d, scale, theta = 5, 3, 16, 2.0, 500.0
    x = rng.standard_normal((lq, h, d))
    pos = rng.integers(0, 1000, size=lq)
    got = rope_rotate_half(x, pos, scale, theta)
    for i in range(lq):
        for hh in range(h):
            for e in range(d // 2):
                angle = pos[i] / scale * theta ** (-2.0 * e / d)
                z = complex(x[i, hh, e], x[i, hh, e + d // 2]) * cmath.exp(1j * angle)
                assert got[i, hh, e] == pytest.approx(z.real, abs=1e-12)
                assert got[i, hh, e + d // 2] == pytest.approx(z.imag, abs=1e-12)


def test_rope_attention_depends_on_relative_position_only(rng):
    # Rotating q and k by the same extra angle keeps every q.k: shifting all positions (by making
    # the key list longer with masked-out keys in front) must not change the output.
    q, k, v = _qkv(rng, 3, 6, 2, 2, 16)
    pad = 11
    k_pad = np.concatenate([rng.standard_normal((pad, 2, 16)), k])
    v_pad = np.concatenate([rng.standard_normal((pad, 2, 16)), v])
    mask = np.ones((3, 6 + pad), dtype=bool)
    mask[:, :pad] = False
    o, lse = ref_attention(q, k, v, pos_encoding_mode="ROPE_LLAMA", rope_theta=100.0)
    o_pad, lse_pad = ref_attention(
        q, k_pad, v_pad, pos_encoding_mode="ROPE_LLAMA", rope_theta=100.0, custom_mask=mask
    )
    np.testing.assert_allclose(o_pad, o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse_pad, lse, rtol=1e-10)
    o_none, _ = ref_attention(q, k, v)
    assert not np.allclose(o_none, o)


def test_alibi_slopes_published_values():
    np.testing.assert_allclose(alibi_slopes_ref(8), [2.0**-e for e in range(1, 9)], rtol=1e-15)
    twelve = [2.0**-e for e in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(alibi_slopes_ref(12), twelve, rtol=1e-15)
    np.testing.assert_allclose(alibi_slopes_ref(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], rtol=1e-15)


def test_gqa_equals_repeated_kv_heads(rng):
    q, k, v = _qkv(rng, 4, 5, 8, 2, 8)
    o, lse = ref_attention(q, k, v, causal=True)
    o_rep, lse_rep = ref_attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), causal=True)
    np.testing.assert_allclose(o, o_rep, rtol=1e-12)
    np.testing.assert_allclose(lse, lse_rep, rtol=1e-12)


def test_variant_callables(rng):
    q, k, v = _qkv(rng, 4, 6, 4, 2, 8)
    # logits_mask equals the equivalent custom mask.
    band = AttentionVariant(logits_mask=lambda qp, kp, qh, kh: (kp + qh) % 3 != 0)
    o, lse = ref_attention(q, k, v, variant=band)
    for h in range(4):
        mask = (np.arange(6)[None, :] + h) % 3 != 0
        kv = slice(h // 2, h // 2 + 1)
        o_h, lse_h = ref_attention(q[:, h : h + 1], k[:, kv], v[:, kv], custom_mask=np.broadcast_to(mask, (4, 6)))
        np.testing.assert_allclose(o[:, h : h + 1], o_h, rtol=1e-12)
        np.testing.assert_allclose(lse[:, h : h + 1], lse_h, rtol=1e-12)
    # Plain weighted sum of sigmoid logits.
    sig = AttentionVariant(use_softmax=False, logits_transform=lambda x, *_: 1 / (1 + np.exp(-x)), causal=True)
    o, lse = ref_attention(q, k, v, variant=sig)
    assert lse is None
    x = np.einsum("ihd,jhd->hij", q, np.repeat(k, 2, axis=1)) / math.sqrt(8)
    w = 1 / (1 + np.exp(-x)) * (np.arange(6)[None, None, :] <= np.arange(4)[None, :, None] + 2)
    np.testing.assert_allclose(o, np.einsum("hij,jhd->ihd", w, np.repeat(v, 2, axis=1)), rtol=1e-12)
    # Query/key transforms and output transform see the documented arguments.
    scaled = AttentionVariant(
        query_transform=lambda r: 2 * r,
        key_transform=lambda r: r + 1,
        output_transform=lambda o, lse, qp, qh: o * qp[..., None] + lse[..., None] + qh[..., None],
    )
    o, lse = ref_attention(q, k, v, variant=scaled)
    o0, lse0 = ref_attention(2 * q, k + 1, v)
    np.testing.assert_allclose(lse, lse0, rtol=1e-12)
    want = o0 * (np.arange(4) + 2)[:, None, None] + lse0[..., None] + np.arange(4)[None, :, None]
    np.testing.assert_allclose(o, want, rtol=1e-12)


def _merge_pair(a, b):
    return ref_merge([a[0], b[0]], [a[1], b[1]])


def test_merge_of_kv_halves_equals_full_attention(rng):
    q, k, v = _qkv(rng, 5, 12, 4, 2, 8)
    o, lse = ref_attention(q, k, v)
    parts = [ref_attention(q, k[a:b], v[a:b]) for a, b in ((0, 3), (3, 3), (3, 10), (10, 12))]
    o_m, lse_m = ref_merge([p[0] for p in parts], [p[1] for p in parts])
    np.testing.assert_allclose(o_m, o, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse_m, lse, rtol=1e-12)


def test_merge_is_associative_and_skips_minus_inf(rng):
    def state():
        s = rng.standard_normal((6, 3)) * 5
        s[rng.random(s.shape) < 0.3] = -np.inf
        return rng.standard_normal((6, 3, 4)), s

    a, b, c = state(), state(), state()
    left = _merge_pair(_merge_pair(a, b), c)
    right = _merge_pair(a, _merge_pair(b, c))
    flat = ref_merge([a[0], b[0], c[0]], [a[1], b[1], c[1]])
    for got in (left, right):
        np.testing.assert_allclose(got[0], flat[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[1], flat[1], rtol=1e-12)
    only_a = a[1] > -np.inf
    none = ~only_a & (b[1] == -np.inf) & (c[1] == -np.inf)
    o, s = flat
    assert not np.isnan(o).any()
    np.testing.assert_array_equal(o[none], 0.0)
    np.testing.assert_array_equal(s[none], -np.inf)
    # A -inf state leaves the other one unchanged.
    minus_inf = (rng.standard_normal((6, 3, 4)), np.full((6, 3), -np.inf))
    b_only = (b[0], np.where(np.isfinite(b[1]), b[1], 0.0))
    o, s = _merge_pair(minus_inf, b_only)
    np.testing.assert_allclose(o, b_only[0], rtol=1e-15)
    np.testing.assert_allclose(s, b_only[1], rtol=1e-15)


def test_merge_hand_values():
    v, s = ref_merge([np.array([[1.0]]), np.array([[3.0]])], [np.array([2.0]), np.array([2.0])])
    np.testing.assert_allclose(v, [[2.0]])
    np.testing.assert_allclose(s, [3.0])
    v, s = ref_merge([np.array([[1.0]]), np.array([[4.0]])], [np.array([0.0]), np.array([1.0])])
    np.testing.assert_allclose(v, [[3.0]])  # weights 1/3, 2/3
    np.testing.assert_allclose(s, [math.log2(3.0)])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_random_page_table_and_gather(rng, layout, page_size):
    kv_lens = [0, 1, page_size, page_size + 1, 37]
    kv_indptr, kv_indices, last, num_pages = random_page_table(rng, kv_lens, page_size)
    assert len(set(kv_indices.tolist())) == kv_indices.size and kv_indices.max() < num_pages
    assert ((last >= 1) & (last <= page_size) | (np.asarray(kv_lens) == 0) & (last == 0)).all()
    tokens = [rng.standard_normal((n, 2, 4)) for n in kv_lens]
    cache = rng.standard_normal((num_pages, page_size, 2, 4))  # unused slots hold garbage
    for b, n in enumerate(kv_lens):
        for t in range(n):
            cache[kv_indices[kv_indptr[b] + t // page_size], t % page_size] = tokens[b][t]
    if layout == "HND":
        cache = cache.transpose(0, 2, 1, 3)
    k_list, v_list = gather_paged_kv(cache, -cache, kv_indptr, kv_indices, last, layout)
    for b, n in enumerate(kv_lens):
        np.testing.assert_array_equal(k_list[b], tokens[b])
        np.testing.assert_array_equal(v_list[b], -tokens[b])


def test_ref_batch_is_per_request_with_flat_mask(rng):
    qo_lens, kv_lens = [2, 0, 3, 4], [5, 3, 0, 6]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    q = rng.standard_normal((qo_indptr[-1], 4, 8))
    ks = [rng.standard_normal((n, 2, 8)) for n in kv_lens]
    vs = [rng.standard_normal((n, 2, 8)) for n in kv_lens]
    masks = [rng.random((a, b)) < 0.5 for a, b in zip(qo_lens, kv_lens)]
    flat = np.concatenate([m.reshape(-1) for m in masks])
    o, lse = ref_batch(q, ks, vs, qo_indptr, custom_mask=flat, causal=True)
    for b in range(4):
        sl = slice(qo_indptr[b], qo_indptr[b + 1])
        o_b, lse_b = ref_attention(q[sl], ks[b], vs[b], custom_mask=masks[b], causal=True)
        np.testing.assert_array_equal(o[sl], o_b)
        np.testing.assert_array_equal(lse[sl], lse_b)
    with pytest.raises(ValueError):
        ref_batch(q, ks, vs, qo_indptr, custom_mask=flat[:-1])
