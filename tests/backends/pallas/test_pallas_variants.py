"""Attention variants on the Pallas backend (interpret mode here) against tests/ref64.py.

ALiBi, in-kernel RoPE, custom masks, user callables (sigmoid attention, attention sinks,
QK transforms, logits masks) and use_softmax=False: first on the backend directly with plans
forced to split-KV, then through every public wrapper with ``backend="pallas"`` under ``jax.jit``
(and ``jax.vmap`` where the op allows). The callables use the array's own module (numpy in the
reference, jnp in the kernel), so one function serves both sides.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, indptr_of, jit_call, make_paged_kv, rand
from ref64 import alibi_slopes_ref, ref_attention, ref_batch
from test_pallas_attention import AHEAD, SPLIT, _chunks_per_group, _run_case

import jaxinfer
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.backends.pallas.attention import alibi_slope
from jaxinfer.backends.pallas.backend import PallasBackend, get_backend
from jaxinfer.variants import AttentionVariant, alibi_slopes

BF16, F16 = jnp.bfloat16, jnp.float16
LN2 = math.log(2.0)


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def sigmoid(x):
    return 1.0 / (1.0 + _xp(x).exp(-x))


def _sigmoid_logits(x, q_pos, kv_pos, qo_head, kv_head):
    # FlashSigmoid (Ramapuram et al. 2024): sigmoid(x + b) with a per-head bias b.
    return sigmoid(x - 1.0 + 0.25 * qo_head)


def _sink_output(o, lse, q_pos, qo_head):
    # Attention sinks: a per-head sink logit joins the softmax denominator, o * Z / (Z + e^sink).
    return o * sigmoid(lse * LN2 - (0.5 * qo_head - 1.0))[..., None]


def _rms_norm(x):
    return x / _xp(x).sqrt(_xp(x).mean(x * x, axis=-1, keepdims=True) + 1e-3) * 0.5


def _stripes(q_pos, kv_pos, qo_head, kv_head):
    # Hides every third key from odd heads (head- and position-dependent mask).
    return (kv_pos % 3 != 1) | (qo_head % 2 == 0)


SIGMOID = AttentionVariant(logits_transform=_sigmoid_logits, use_softmax=False)
SINKS = AttentionVariant(output_transform=_sink_output)
QK_NORM = AttentionVariant(query_transform=_rms_norm, key_transform=_rms_norm, logits_mask=_stripes)


def test_alibi_slope_closed_form():
    for n in (1, 2, 5, 8, 12, 32, 40):
        got = np.asarray(alibi_slope(jnp.arange(n), n))
        np.testing.assert_allclose(got, alibi_slopes(n), rtol=1e-6)
        np.testing.assert_allclose(got, alibi_slopes_ref(n), rtol=1e-6)


def test_alibi_paged_prefill_split(rng):
    # 6 query heads: the non-power-of-2 ALiBi schedule; soft cap before the bias.
    variant = AttentionVariant(causal=True, pos_encoding_mode="ALIBI", logits_soft_cap=8.0)
    plan = _run_case(rng, np.array([9, 1, 17]), np.array([40, 30, 17]), backend=SPLIT, page_size=5, hq=6, hkv=2,
                     variant=variant, dtype=F16)
    assert _chunks_per_group(plan) >= 2


def test_rope_decode_split_hnd(rng):
    variant = AttentionVariant(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, rope_theta=500.0)
    plan = _run_case(rng, np.ones(4, np.int64), np.array([70, 0, 33, 90]), backend=SPLIT, page_size=5, hq=8, hkv=2,
                     layout="HND", variant=variant, dtype=F16)
    assert _chunks_per_group(plan) >= 3


@pytest.mark.parametrize("backend", [SPLIT, AHEAD], ids=["split", "qk-ahead"])
def test_rope_transforms_logits_mask_ragged(rng, backend):
    # query/key transforms see whole rows before RoPE rotates their halves; logits_mask hides keys.
    variant = QK_NORM.replace(pos_encoding_mode="ROPE_LLAMA", causal=True, window_left=20)
    _run_case(rng, np.array([20, 3, 33]), np.array([20, 40, 33]), backend=backend, hq=4, hkv=2, d=64,
              variant=variant, dtype=F16)


def test_custom_mask_split_window(rng):
    qo_lens, kv_lens = np.array([9, 0, 13, 1]), np.array([40, 7, 13, 50])
    mask = rng.random(int((qo_lens * kv_lens).sum())) < 0.6
    plan = _run_case(rng, qo_lens, kv_lens, backend=SPLIT, page_size=4, hq=4, hkv=1, variant=AttentionVariant(window_left=25),
                     custom_mask=mask, dtype=F16)
    assert plan.kernel.custom_mask and _chunks_per_group(plan) >= 2


@pytest.mark.parametrize("backend", [SPLIT, AHEAD], ids=["split", "qk-ahead"])
def test_sigmoid_no_softmax_split(rng, backend):
    # Split-KV partials of a plain weighted sum add up in the merge kernel.
    plan = _run_case(rng, np.array([5, 1, 12]), np.array([30, 70, 12]), backend=backend, page_size=16, hq=8, hkv=2,
                     variant=SIGMOID.replace(causal=True), return_lse=False, dtype=F16)
    assert _chunks_per_group(plan) >= 3


def test_sinks_alibi_decode_split(rng):
    # The output transform sees merged (o, lse): in the merge kernel for split rows.
    plan = _run_case(rng, np.ones(5, np.int64), np.array([64, 3, 0, 40, 17]), backend=SPLIT, page_size=16, hq=8, hkv=2,
                     variant=SINKS.replace(pos_encoding_mode="ALIBI"), dtype=F16)
    assert _chunks_per_group(plan) >= 3


def test_unsupported_reasons_left():
    def spec(**kw):
        args = dict(page_size=1, num_qo_heads=2, num_kv_heads=1, head_dim=64, variant=AttentionVariant(), q_dtype=BF16)
        args.update(kw)
        return BatchSpec.create(np.array([0, 1]), np.array([0, 1]), None, None, **args)

    be = get_backend("pallas")
    for v in (AttentionVariant(pos_encoding_mode="ALIBI"), AttentionVariant(pos_encoding_mode="ROPE_LLAMA"), SIGMOID, SINKS, QK_NORM):
        assert be.unsupported(spec(variant=v)) is None
    assert be.unsupported(spec(custom_mask=np.array([True]))) is None
    assert "ROPE_LLAMA" in be.unsupported(spec(head_dim=16, variant=AttentionVariant(pos_encoding_mode="ROPE_LLAMA")))
    assert "head_dim" in be.unsupported(spec(head_dim=96))
    assert "float32" in be.unsupported(spec(q_dtype=jnp.float32))


def test_all_true_mask_is_dropped(rng):
    s = BatchSpec.create(np.array([0, 2]), np.array([0, 5]), None, None, page_size=1, num_qo_heads=2, num_kv_heads=1,
                         head_dim=32, variant=AttentionVariant(), custom_mask=np.ones(10, bool), q_dtype=BF16)
    plan = get_backend("pallas").plan(s, PlanCapacity())
    assert plan.mask is None and not plan.kernel.custom_mask


# ---- public wrappers with backend="pallas", under jax.jit ----


def test_decode_wrapper_rope_sinks(rng):
    kv_lens, hq, hkv, d, page = np.array([33, 1, 0, 70]), 8, 2, 64, 16
    paged = make_paged_kv(rng, kv_lens, page, hkv, d, BF16, "HND")
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout="HND", backend="pallas")
    w.plan(paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page,
           pos_encoding_mode="ROPE_LLAMA", rope_theta=1000.0, variant=SINKS, q_data_type=BF16)
    q = rand(rng, (kv_lens.size, hq, d), BF16)
    o, lse = jit_call(w.run, q, paged.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, paged.k_list, paged.v_list, indptr_of(np.ones(4, int)),
                                 variant=SINKS.replace(pos_encoding_mode="ROPE_LLAMA", rope_theta=1000.0))
    assert_close(o, want_o, BF16, "o")
    assert_close(lse, want_lse, BF16, "lse")


def test_paged_prefill_custom_mask_equals_causal(rng):
    qo_lens, kv_lens, hq, hkv, d, page = np.array([5, 1, 12]), np.array([9, 30, 12]), 4, 2, 32, 5
    paged = make_paged_kv(rng, kv_lens, page, hkv, d, F16)
    causal = np.concatenate([(np.arange(k)[None, :] <= np.arange(q)[:, None] + k - q).reshape(-1) for q, k in zip(qo_lens, kv_lens)])
    q = rand(rng, (qo_lens.sum(), hq, d), F16)
    outs = []
    for opts in (dict(custom_mask=causal), dict(causal=True)):
        w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend="pallas")
        w.plan(indptr_of(qo_lens), paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page,
               q_data_type=F16, **opts)
        outs.append(jit_call(w.run, q, paged.cache, return_lse=True))
    want_o, want_lse = ref_batch(q, paged.k_list, paged.v_list, indptr_of(qo_lens), causal=True)
    for o, lse in outs:
        assert_close(o, want_o, F16, "o")
        assert_close(lse, want_lse, F16, "lse")
    np.testing.assert_allclose(np.asarray(outs[0][0], np.float32), np.asarray(outs[1][0], np.float32), rtol=1e-3, atol=1e-3)


def test_ragged_prefill_sigmoid_alibi(rng):
    qo_lens, kv_lens, hq, hkv, d = np.array([7, 0, 16]), np.array([20, 5, 16]), 4, 4, 32
    q = rand(rng, (qo_lens.sum(), hq, d), F16)
    k, v = rand(rng, (kv_lens.sum(), hkv, d), F16), rand(rng, (kv_lens.sum(), hkv, d), F16)
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend="pallas")
    w.plan(indptr_of(qo_lens), indptr_of(kv_lens), hq, hkv, d, causal=True, pos_encoding_mode="ALIBI",
           variant=SIGMOID, q_data_type=F16)
    o = jit_call(w.run, q, k, v)
    ptr = indptr_of(kv_lens)
    ks = [np.asarray(k[a:b]) for a, b in zip(ptr[:-1], ptr[1:])]
    vs = [np.asarray(v[a:b]) for a, b in zip(ptr[:-1], ptr[1:])]
    want, _ = ref_batch(q, ks, vs, indptr_of(qo_lens), variant=SIGMOID.replace(causal=True, pos_encoding_mode="ALIBI"))
    assert_close(o, want, F16, "o")
    with pytest.raises(ValueError, match="use_softmax"):
        w.run(q, k, v, return_lse=True)


# The cascade wrapper on pallas: tests/test_cascade.py (parametrized over every backend).


def _random_bsr(rng, mb, nb, density):
    rows = [np.sort(rng.choice(nb, size=rng.binomial(nb, density), replace=False)) for _ in range(mb)]
    indptr = indptr_of([r.size for r in rows])
    return indptr, np.concatenate(rows).astype(np.int32)


@pytest.mark.parametrize("R,C,M,N,masked,causal", [(1, 1, 21, 26, True, True), (4, 1, 30, 40, False, False),
                                                   (4, 16, 27, 64, True, False), (16, 4, 40, 48, False, True)])
def test_block_sparse(rng, R, C, M, N, masked, causal):
    hq, hkv, d = 4, 2, 32
    indptr, indices = _random_bsr(rng, -(-M // R), N // C, 0.5)
    block_mask = rng.random((indices.size, R, C)) < 0.7 if masked else None
    w = jaxinfer.BlockSparseAttentionWrapper(backend="pallas")
    w.plan(indptr, indices, M, N, R, C, hq, hkv, d, mask=block_mask, causal=causal, logits_soft_cap=6.0, q_data_type=F16)
    q = rand(rng, (M, hq, d), F16)
    k, v = rand(rng, (N, hkv, d), F16), rand(rng, (N, hkv, d), F16)
    o, lse = jit_call(w.run, q, k, v, return_lse=True)
    dense = jaxinfer.sparse.bsr_to_dense(indptr, indices, M, N, R, C, block_mask)
    want_o, want_lse = ref_attention(q, k, v, custom_mask=dense, causal=causal, logits_soft_cap=6.0)
    assert_close(o, want_o, F16, "o")
    assert_close(lse, want_lse, F16, "lse")


def test_single_prefill_custom_mask_qk_norm(rng):
    lq, lk, hq, hkv, d = 9, 21, 4, 1, 64
    q, k, v = rand(rng, (lq, hq, d), F16), rand(rng, (lk, hkv, d), F16), rand(rng, (lk, hkv, d), F16)
    mask = rng.random((lq, lk)) < 0.5
    f = jax.jit(lambda q, k, v: jaxinfer.single_prefill_with_kv_cache(
        q, k, v, custom_mask=mask, variant=QK_NORM, pos_encoding_mode="ALIBI", return_lse=True, backend="pallas"))
    o, lse = f(q, k, v)
    want_o, want_lse = ref_attention(q, k, v, custom_mask=mask, variant=QK_NORM.replace(pos_encoding_mode="ALIBI"))
    assert_close(o, want_o, F16, "o")
    assert_close(lse, want_lse, F16, "lse")


def test_single_decode_vmap_rope(rng):
    b, lk, hq, hkv, d = 3, 37, 8, 2, 32
    q = rand(rng, (b, hq, d), BF16)
    k, v = rand(rng, (b, hkv, lk, d), BF16), rand(rng, (b, hkv, lk, d), BF16)
    f = jax.jit(jax.vmap(lambda q, k, v: jaxinfer.single_decode_with_kv_cache(
        q, k, v, kv_layout="HND", pos_encoding_mode="ROPE_LLAMA", return_lse=True, backend="pallas")))
    o, lse = f(q, k, v)
    for i in range(b):
        kt, vt = np.swapaxes(np.asarray(k[i]), 0, 1), np.swapaxes(np.asarray(v[i]), 0, 1)
        want_o, want_lse = ref_attention(q[i][None], kt, vt, pos_encoding_mode="ROPE_LLAMA")
        assert_close(o[i], want_o[0], BF16, "o")
        assert_close(lse[i], want_lse[0], BF16, "lse")


# ---- GPU (real Triton) at larger sizes: `pytest -m gpu` on the H100 ----

GPU_VARIANTS = [
    AttentionVariant(pos_encoding_mode="ALIBI", causal=True),
    AttentionVariant(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5, causal=True),
    QK_NORM.replace(pos_encoding_mode="ROPE_LLAMA", window_left=300),
    SIGMOID.replace(causal=True),
    SINKS.replace(logits_soft_cap=30.0, causal=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=["alibi", "rope", "qknorm-rope-window", "sigmoid", "sinks"])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_gpu_variants(rng, variant, kind):
    b = 16 if kind == "decode" else 4
    kv_lens = rng.integers(1, 3000, size=b)
    qo_lens = np.ones(b, np.int64) if kind == "decode" else np.minimum(kv_lens, rng.integers(1, 300, size=b))
    _run_case(rng, qo_lens, kv_lens, backend=get_backend("pallas"), page_size=16, hq=32, hkv=8, d=128,
              variant=variant, return_lse=variant.use_softmax, dtype=F16)


@pytest.mark.gpu
def test_gpu_rope_long_context(rng):
    # The kernel's MUFU cos/sin (error ~2**-23 |angle|) at the angles of a 32k context
    # (positions up to 32767 at rope_theta=5e5), queries at the end of their requests.
    variant = AttentionVariant(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5, causal=True)
    _run_case(rng, np.array([1, 1, 5, 17]), np.array([32768, 20001, 5, 4097]), backend=get_backend("pallas"),
              page_size=16, hq=32, hkv=8, d=128, variant=variant, dtype=BF16)


@pytest.mark.gpu
def test_gpu_custom_mask(rng):
    qo_lens, kv_lens = np.array([200, 1, 77, 300]), np.array([900, 40, 77, 1500])
    mask = rng.random(int((qo_lens * kv_lens).sum())) < 0.3
    _run_case(rng, qo_lens, kv_lens, backend=get_backend("pallas"), page_size=16, hq=32, hkv=8, d=128,
              custom_mask=mask, variant=AttentionVariant(causal=True), dtype=F16)


@pytest.mark.gpu
@pytest.mark.parametrize("R,C", [(1, 1), (4, 16), (16, 1), (64, 64), (64, 1), (1, 64)])
@pytest.mark.parametrize("masked,causal", [(False, False), (True, True)])
def test_gpu_block_sparse(rng, R, C, masked, causal):
    M, N, hq, hkv, d = 512, 1024, 16, 4, 128
    indptr, indices = _random_bsr(rng, -(-M // R), N // C, 0.2)
    block_mask = rng.random((indices.size, R, C)) < 0.7 if masked else None
    w = jaxinfer.BlockSparseAttentionWrapper(backend="pallas")
    w.plan(indptr, indices, M, N, R, C, hq, hkv, d, mask=block_mask, causal=causal, q_data_type=F16)
    q = rand(rng, (M, hq, d), F16)
    k, v = rand(rng, (N, hkv, d), F16), rand(rng, (N, hkv, d), F16)
    o, lse = jit_call(w.run, q, k, v, return_lse=True)
    dense = jaxinfer.sparse.bsr_to_dense(indptr, indices, M, N, R, C, block_mask)
    want_o, want_lse = ref_attention(q, k, v, custom_mask=dense, causal=causal)
    assert_close(o, want_o, F16, "o")
    assert_close(lse, want_lse, F16, "lse")
