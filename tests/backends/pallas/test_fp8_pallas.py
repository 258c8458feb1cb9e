"""The Pallas kernel on fp8 KV caches (interpret mode here, the Triton kernel on a GPU) against the
float64 reference on the dequantized values (cache values times their scales).

Few small cases (interpret mode is slow): decode, paged prefill/append, ragged KV, cascade,
block-sparse, a split-KV plan whose partials and output transform see ``v_scale``, the variant
paths that widen fp8 tiles differently (RoPE, key transform, no softmax), poison in slots no
request owns, and scales equal to scaled values. tests/test_fp8.py has the broad matrix on the
xla reference; tests/backends/pallas/test_pallas_lowering.py lowers every fp8 config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, indptr_of, make_paged_kv, rand, tol
from ref64 import dequantize, gather_paged_kv, ref_attention, ref_batch

import jaxinfer
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant

D = 32
# A small persistent grid (interpret mode runs every program) that splits requests into chunks.
SPLIT = PallasBackend(num_ctas=64, split_factor=16, config=TileConfig(16, 16, 4, 1), min_chunk=16)


def _scales(kind, hkv):
    if kind == "head":
        return np.array([0.5, 1.75, 3.0, 0.8][:hkv], np.float32), jnp.asarray([2.0, 0.3, 1.1, 0.7][:hkv], jnp.float32)
    return (0.7, 1.9) if kind == "tensor" else (None, None)


@pytest.mark.parametrize("kv_dtype,q_dtype,page_size,geom,layout,single,scales", [
    (jnp.float8_e4m3fn, jnp.bfloat16, 5, (8, 2), "NHD", False, "head"),
    (jnp.float8_e5m2, jnp.float16, 1, (8, 1), "HND", True, None),
])
def test_decode_fp8(rng, kv_dtype, q_dtype, page_size, geom, layout, single, scales):
    hq, hkv = geom
    kv_lens = [37, 0, 5, 64]
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype, layout, single)
    k_scale, v_scale = _scales(scales, hkv)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout=layout, backend="pallas")
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size, q_data_type=q_dtype,
           kv_data_type=kv_dtype)
    q = rand(rng, (len(kv_lens), hq, D), q_dtype)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale), indptr_of([1] * 4))
    assert o.dtype == q_dtype
    assert_close(o, want_o, q_dtype)
    assert_close(lse, want_lse, q_dtype, "lse")


@pytest.mark.parametrize("kv_dtype,page_size,layout", [(jnp.float8_e5m2, 16, "HND")])
def test_paged_prefill_and_append_fp8(rng, kv_dtype, page_size, layout):
    """A prefill-class tile (64 rows) over prefill and append requests, causal with a window."""
    hq, hkv = 8, 2
    qo_lens, kv_lens = [12, 3, 0], [12, 30, 7]
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype, layout)
    k_scale, v_scale = _scales("head", hkv)
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(kv_layout=layout, backend="pallas")
    w.plan(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size,
           causal=True, window_left=20, kv_data_type=kv_dtype)
    q = rand(rng, (sum(qo_lens), hq, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale),
                                 indptr_of(qo_lens), causal=True, window_left=20)
    assert_close(o, want_o, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16, "lse")


# Attention sinks plus a bias (an affine output transform, applied in the merge kernel to split
# rows: v_scale must come before it) with RoPE's rotated halves; sigmoid attention (no softmax)
# over RMS-normalized keys with a soft cap: the key transform must see the dequantized keys (RMS
# norm undoes a scale of the logits).
SINK_ROPE = AttentionVariant(
    output_transform=lambda o, lse, qp, qh: o * jax.nn.sigmoid(lse * 0.69 - 0.5 * qh)[..., None] + 0.25,
    pos_encoding_mode="ROPE_LLAMA", causal=True)
SIGMOID_RMS = AttentionVariant(
    logits_transform=lambda x, qp, kp, qh, kh: jax.nn.sigmoid(x + 0.1 * qh), use_softmax=False,
    key_transform=lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6), logits_soft_cap=8.0)


@pytest.mark.parametrize("variant,kv_dtype", [(SINK_ROPE, jnp.float8_e4m3fn), (SIGMOID_RMS, jnp.float8_e5m2)],
                         ids=["sink-rope", "sigmoid-keytransform"])
def test_split_and_variants_fp8(rng, variant, kv_dtype):
    """Split-KV partials merge after v_scale (and before the output transform, in the merge
    kernel); the RoPE halves and key transforms widen fp8 tiles through float32."""
    hq, hkv, page_size = 4, 2, 4
    qo_lens, kv_lens = [1, 6, 1], [70, 40, 9]
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype)
    k_scale, v_scale = _scales("head", hkv)
    spec = BatchSpec.create(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len,
                            page_size=page_size, num_qo_heads=hq, num_kv_heads=hkv, head_dim=D, variant=variant,
                            q_dtype=jnp.bfloat16, kv_dtype=kv_dtype)
    plan = SPLIT.plan(spec, PlanCapacity())
    assert np.diff(plan.unpack()["merge_indptr"]).max(initial=1) > 1  # some request was split
    q = rand(rng, (sum(qo_lens), hq, D), jnp.bfloat16)
    run = jax.jit(lambda p, q, k, v, ks, vs: SPLIT.run(p, q, k, v, return_lse=variant.use_softmax, k_scale=ks,
                                                       v_scale=vs))
    o, lse = run(plan, q, *kv.cache, jnp.asarray(k_scale), v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale),
                                 indptr_of(qo_lens), variant=variant)
    if variant.use_softmax:
        assert_close(o, want_o, jnp.bfloat16)
        assert_close(lse, want_lse, jnp.bfloat16, "lse")
    else:  # a plain weighted sum grows with kv_len: compare relative to its magnitude
        scale = max(1.0, float(np.abs(want_o).max()))
        np.testing.assert_allclose(np.asarray(o, np.float64) / scale, want_o / scale, **tol(jnp.bfloat16))


def test_cascade_and_block_sparse_fp8(rng):
    """The other front doors on the pallas backend: a 2-level cascade and block-sparse (ragged KV
    takes the kernel's ragged path, lowered in test_pallas_lowering.py)."""
    hq, hkv = 4, 2
    k_scale, v_scale = _scales("tensor", hkv)
    # Cascade: request 0 and 1 share pages [4, 1] (8 tokens), then 3 and 6 tokens of their own.
    ps = 4
    cache = tuple(rand(rng, (8, ps, hkv, D), jnp.float8_e5m2) for _ in range(2))
    own_pages, own_last = [[0], [5, 2]], np.array([3, 2], np.int32)
    cw = jaxinfer.MultiLevelCascadeAttentionWrapper(2, backend="pallas")
    cw.plan([np.array([0, 2], np.int32), indptr_of([1, 1])], [np.array([0, 2], np.int32), indptr_of([1, 2])],
            [np.array([4, 1], np.int32), np.array([0, 5, 2], np.int32)], [np.array([ps], np.int32), own_last],
            hq, hkv, D, ps, kv_data_type=jnp.float8_e5m2)
    qc = rand(rng, (2, hq, D), jnp.bfloat16)
    flat = [[4, 1] + p for p in own_pages]
    fk, fv = gather_paged_kv(*cache, indptr_of([len(p) for p in flat]), np.concatenate(flat).astype(np.int32),
                             own_last)
    want, _ = ref_batch(qc, dequantize(fk, k_scale), dequantize(fv, v_scale), indptr_of([1, 1]))
    assert_close(cw.run(qc, cache, k_scale=k_scale, v_scale=v_scale), want, jnp.bfloat16, "cascade")
    # Block-sparse, 4x4 blocks with a per-element mask.
    M = N = 12
    mask = rng.random((M, N)) < 0.5
    indptr, indices, block_mask = jaxinfer.dense_to_bsr(mask, 4, 4)
    bw = jaxinfer.BlockSparseAttentionWrapper(backend="pallas")
    bw.plan(indptr, indices, M, N, 4, 4, hq, hkv, D, mask=block_mask, kv_data_type=jnp.float8_e4m3fn)
    qb = rand(rng, (M, hq, D), jnp.bfloat16)
    kb, vb = (rand(rng, (N, hkv, D), jnp.float8_e4m3fn) for _ in range(2))
    dense = jaxinfer.bsr_to_dense(indptr, indices, M, N, 4, 4, block_mask)
    want, _ = ref_attention(qb, dequantize([kb], k_scale)[0], dequantize([vb], v_scale)[0], custom_mask=dense)
    seen = dense.any(axis=1)
    o = bw.run(qb, kb, vb, k_scale=k_scale, v_scale=v_scale)
    assert_close(np.asarray(o)[seen], want[seen], jnp.bfloat16, "block-sparse")


@pytest.mark.parametrize("kv_dtype,poison", [(jnp.float8_e5m2, -np.inf)])
def test_poison_in_unowned_slots_stays_out_fp8(rng, kv_dtype, poison):
    """inf in every slot no request owns (NaN alike; e4m3 has only NaN): causal rows that load
    those slots stay finite and exact."""
    hq, hkv, ps = 4, 2, 5
    qo_lens, kv_lens = [1, 4], [23, 11]
    kv = make_paged_kv(rng, kv_lens, ps, hkv, D, kv_dtype)
    owned = np.zeros(kv.cache[0].shape[:2], bool)
    for b, n in enumerate(kv_lens):
        pages = kv.kv_indices[kv.kv_indptr[b] : kv.kv_indptr[b + 1]]
        for t in range(n):
            owned[pages[t // ps], t % ps] = True
    cache = tuple(jnp.where(jnp.asarray(owned)[:, :, None, None], c, poison).astype(kv_dtype) for c in kv.cache)
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend="pallas")
    w.plan(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, ps, causal=True,
           kv_data_type=kv_dtype)
    q = rand(rng, (5, hq, D), jnp.bfloat16)
    o = w.run(q, cache, k_scale=1.5, v_scale=0.5)
    want, _ = ref_batch(q, dequantize(kv.k_list, 1.5), dequantize(kv.v_list, 0.5), indptr_of(qo_lens), causal=True)
    assert_close(o, want, jnp.bfloat16)


def test_scale_equals_scaled_values_pallas(rng):
    """Scale 2**k on stored v gives the output of scale 1 on the stored 2**k v (exact in fp8 and
    in every float32 product), to one rounding of the output."""
    hq, hkv, ps = 8, 2, 16
    kv = make_paged_kv(rng, [40, 7], ps, hkv, D, jnp.float8_e4m3fn)
    k_scale, v_scale = np.array([2.0, 4.0], np.float32), 2.0
    scaled = ((kv.cache[0].astype(jnp.float32) * jnp.asarray(k_scale)[:, None]).astype(jnp.float8_e4m3fn),
              (kv.cache[1].astype(jnp.float32) * v_scale).astype(jnp.float8_e4m3fn))
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="pallas")
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, ps, kv_data_type=jnp.float8_e4m3fn)
    q = rand(rng, (2, hq, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    o1, lse1 = w.run(q, scaled, return_lse=True)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o1, np.float32), rtol=2**-8, atol=2**-16)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse1), rtol=1e-6)


@pytest.mark.parametrize("q_max", [1e3, 3e5])
def test_bf16_q_beyond_fp16_range_fp8(rng, q_max):
    """fp8 tiles meet q in fp16: a bf16 q tile whose largest entry exceeds fp16's 65504 is scaled
    by a power of two first (and its logits back), so it stays exact instead of overflowing."""
    hq, hkv, kv_lens = 8, 2, [21, 9]
    kv = make_paged_kv(rng, kv_lens, 4, hkv, D, jnp.float8_e4m3fn, "NHD", False)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="pallas")
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, 4, q_data_type=jnp.bfloat16,
           kv_data_type=jnp.float8_e4m3fn, sm_scale=1.0 / q_max)  # logits of O(1) whatever q_max
    q = rand(rng, (2, hq, D), jnp.float32) * q_max
    q = q.at[0, 0, 0].set(q_max * 4).astype(jnp.bfloat16)  # one entry well past the others
    o, lse = w.run(q, kv.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, None), dequantize(kv.v_list, None), indptr_of([1, 1]),
                                 sm_scale=1.0 / q_max)
    assert_close(o, want_o, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16, "lse")
