"""fp8 KV caches (issue 18) on the xla reference and through the public API, against the float64
reference on the dequantized values (tests/ref64.py: cache values times their scales).

The broad matrix (decode, paged prefill, append, cascade, block-sparse, ragged and single-request
prefill; NHD/HND; page sizes 1/5/16; GQA 1/4/8; e4m3/e5m2; bf16/fp16 q; no, per-tensor and
per-KV-head scales; tuple and single-array caches) runs on the "xla" backend, which is fast here;
tests/backends/pallas/test_fp8_pallas.py runs the Pallas kernel on a few of the same cases in
interpret mode, and test_fp8_gpu.py the kernels on a GPU. Also here: scales honoured exactly
(a power-of-2 scale on v equals scale 1 on the stored s*v, bit for bit), traced scales without
recompiles, quantizing appends (saturation, padding rows, other requests' pages), the fused
RoPE + quantize + append, routing and the ValueErrors of bad scales.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DECODE_OPTIONS, PREFILL_OPTIONS, assert_between, assert_close, indptr_of, make_paged_kv, rand
from ref64 import dequantize, f64, gather_paged_kv, quantized_bounds, ref_attention, ref_batch, rope_rotate_half

import jaxinfer
from jaxinfer import backends
from jaxinfer.backends import device
from jaxinfer.backends.pallas.backend import get_backend as pallas_backend
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant

FP8 = [jnp.float8_e4m3fn, jnp.float8_e5m2]
D = 32
GEOMS = [(2, 2), (8, 2), (8, 1)]  # (Hq, Hkv): GQA 1, 4, 8
PAGE_SIZES = [1, 5, 16]
SCALE_KINDS = [None, "tensor", "head"]


def draw_scales(rng, kind, hkv):
    """``(k_scale, v_scale)`` to pass to run: none, Python floats, or per-KV-head arrays (numpy for
    k, a device array for v)."""
    if kind is None:
        return None, None
    if kind == "tensor":
        return float(rng.uniform(0.3, 3.0)), float(rng.uniform(0.3, 3.0))
    return rng.uniform(0.3, 3.0, hkv).astype(np.float32), jnp.asarray(rng.uniform(0.3, 3.0, hkv), jnp.float32)


def fp8_grid(options, n_cases):
    """``n_cases`` cases: (page size, geometry) over their product, the rest rotating so that each
    value meets several others."""
    cases = []
    for i, (ps, geom) in enumerate(itertools.islice(itertools.cycle(itertools.product(PAGE_SIZES, GEOMS)), n_cases)):
        cases.append(pytest.param(
            ps, geom, ("NHD", "HND")[i % 2], FP8[i // 2 % 2], (jnp.bfloat16, jnp.float16)[i // 3 % 2],
            SCALE_KINDS[i % 3], i % 4 == 3, options[i % len(options)],
            id=f"ps{ps}-gqa{geom[0] // geom[1]}-{i}",
        ))
    return cases


@pytest.mark.parametrize("page_size,geom,layout,kv_dtype,q_dtype,scales,single,opts", fp8_grid(DECODE_OPTIONS, 9))
def test_decode_fp8(rng, page_size, geom, layout, kv_dtype, q_dtype, scales, single, opts):
    hq, hkv = geom
    kv_lens = [7, 0, 33, 16]
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype, layout, single)
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout=layout, backend="xla")
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size, q_data_type=q_dtype,
           kv_data_type=kv_dtype, **opts)
    q = rand(rng, (len(kv_lens), hq, D), q_dtype)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale),
                                 indptr_of([1] * len(kv_lens)), **opts)
    assert o.dtype == q_dtype
    assert_close(o, want_o, q_dtype)
    assert_close(lse, want_lse, q_dtype, "lse")


@pytest.mark.parametrize("page_size,geom,layout,kv_dtype,q_dtype,scales,single,opts", fp8_grid(PREFILL_OPTIONS, 6))
def test_paged_prefill_and_append_fp8(rng, page_size, geom, layout, kv_dtype, q_dtype, scales, single, opts):
    """Prefill (qo_len = kv_len) and append (qo_len < kv_len) requests in one batch."""
    hq, hkv = geom
    qo_lens, kv_lens = [5, 0, 12, 3], [5, 9, 12, 20]
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype, layout, single)
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(kv_layout=layout, backend="xla")
    w.plan(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size,
           q_data_type=q_dtype, kv_data_type=kv_dtype, **opts)
    q = rand(rng, (sum(qo_lens), hq, D), q_dtype)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale),
                                 indptr_of(qo_lens), **opts)
    assert_close(o, want_o, q_dtype)
    assert_close(lse, want_lse, q_dtype, "lse")


@pytest.mark.parametrize("front,kv_dtype,scales", [("ragged", jnp.float8_e4m3fn, "head"),
                                                   ("single", jnp.float8_e5m2, "tensor")])
def test_ragged_and_single_request_fp8(rng, front, kv_dtype, scales):
    hq, hkv = 8, 2
    qo_lens, kv_lens = [3, 6], [10, 6]
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    q = rand(rng, (sum(qo_lens), hq, D), jnp.bfloat16)
    k, v = (rand(rng, (sum(kv_lens), hkv, D), kv_dtype) for _ in range(2))
    ptr = indptr_of(kv_lens)
    ks, vs = ([x[ptr[b] : ptr[b + 1]] for b in range(2)] for x in (k, v))
    want, _ = ref_batch(q, dequantize(ks, k_scale), dequantize(vs, v_scale), indptr_of(qo_lens), causal=True)
    if front == "ragged":
        w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend="xla")
        w.plan(indptr_of(qo_lens), indptr_of(kv_lens), hq, hkv, D, causal=True, kv_data_type=kv_dtype)
        assert_close(w.run(q, k, v, k_scale=k_scale, v_scale=v_scale), want, jnp.bfloat16)
        return
    o1 = jaxinfer.single_prefill_with_kv_cache(q[3:], jnp.swapaxes(k[10:], 0, 1), jnp.swapaxes(v[10:], 0, 1),
                                               causal=True, kv_layout="HND", backend="xla", k_scale=k_scale,
                                               v_scale=v_scale)
    assert_close(o1, want[3:], jnp.bfloat16)
    o2 = jaxinfer.single_decode_with_kv_cache(q[0], k[:10], v[:10], backend="xla", k_scale=k_scale, v_scale=v_scale)
    want2, _ = ref_attention(q[:1], dequantize(ks, k_scale)[0], dequantize(vs, v_scale)[0])
    assert_close(o2, want2[0], jnp.bfloat16)


@pytest.mark.parametrize("kv_dtype,scales,layout",
                         [(jnp.float8_e4m3fn, "head", "NHD"), (jnp.float8_e5m2, "tensor", "HND")])
def test_cascade_fp8(rng, kv_dtype, scales, layout):
    """Two levels (a shared prefix, then each request's own pages) against flat attention."""
    hq, hkv, ps = 8, 2, 4
    shared, unique = 12, [5, 9, 1]
    kv = make_paged_kv(rng, [shared + u for u in unique], ps, hkv, D, kv_dtype, layout)
    k_cache, v_cache = kv.cache
    # Requests share the first 3 pages: rebuild the page lists so that they do.
    pages = [kv.kv_indices[kv.kv_indptr[b] : kv.kv_indptr[b + 1]] for b in range(3)]
    prefix = pages[0][:3]
    own = [p[3:] for p in pages]
    lists = [list(prefix) + list(p) for p in own]
    flat_k, flat_v = gather_paged_kv(k_cache, v_cache, indptr_of([len(x) for x in lists]),
                                     np.concatenate(lists).astype(np.int32), kv.kv_last_page_len, layout)
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    w = jaxinfer.MultiLevelCascadeAttentionWrapper(2, kv_layout=layout, backend="xla")
    w.plan([np.array([0, 3], np.int32), indptr_of([1, 1, 1])],
           [np.array([0, 3], np.int32), indptr_of([len(p) for p in own])],
           [prefix.astype(np.int32), np.concatenate(own).astype(np.int32)],
           [np.array([ps], np.int32), kv.kv_last_page_len], hq, hkv, D, ps, kv_data_type=kv_dtype)
    q = rand(rng, (3, hq, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(flat_k, k_scale), dequantize(flat_v, v_scale), indptr_of([1, 1, 1]))
    assert_close(o, want_o, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16, "lse")


@pytest.mark.parametrize("kv_dtype,C,scales", [(jnp.float8_e4m3fn, 4, "head"), (jnp.float8_e5m2, 1, "tensor")])
def test_block_sparse_fp8(rng, kv_dtype, C, scales):
    hq, hkv, M, N, R = 4, 2, 10, 16, 4
    mask = rng.random((M, N)) < 0.4
    indptr, indices, block_mask = jaxinfer.dense_to_bsr(mask, R, C)
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    w = jaxinfer.BlockSparseAttentionWrapper(backend="xla")
    w.plan(indptr, indices, M, N, R, C, hq, hkv, D, mask=block_mask, kv_data_type=kv_dtype)
    q = rand(rng, (M, hq, D), jnp.bfloat16)
    k, v = (rand(rng, (N, hkv, D), kv_dtype) for _ in range(2))
    o = w.run(q, k, v, k_scale=k_scale, v_scale=v_scale)
    dense = jaxinfer.bsr_to_dense(indptr, indices, M, N, R, C, block_mask)
    kd, vd = dequantize([k], k_scale)[0], dequantize([v], v_scale)[0]
    want, _ = ref_attention(q, kd, vd, custom_mask=dense)
    seen = dense.any(axis=1)
    assert_close(np.asarray(o)[seen], want[seen], jnp.bfloat16)


def test_xla_pv_in_float32(rng):
    """The reference's P.V keeps float32 probabilities with an fp8 V (issue 18: rounding P to e4m3
    cost a 10x larger error than the same values stored as bf16)."""
    hq, hkv, n = 4, 1, 200
    q = rand(rng, (1, hq, D), jnp.bfloat16, scale=3.0)
    k, v = (rand(rng, (n, hkv, D), jnp.float8_e4m3fn) for _ in range(2))
    o = jaxinfer.single_decode_with_kv_cache(q[0], k, v, backend="xla")
    o16 = jaxinfer.single_decode_with_kv_cache(q[0], k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), backend="xla")
    want, _ = ref_attention(q, k, v)
    err = np.abs(f64(o) - want[0]).max() / np.abs(want).max()
    err16 = np.abs(f64(o16) - want[0]).max() / np.abs(want).max()
    assert err <= 1.5 * err16 + 1e-3, (err, err16)


# ------------------------------------------------------------------ scales honoured

@pytest.mark.parametrize("backend_op,kv_dtype", [("decode", jnp.float8_e4m3fn), ("prefill", jnp.float8_e5m2)])
def test_scale_equals_scaled_values(rng, backend_op, kv_dtype):
    """Scale s on stored values v gives the output of scale 1 on stored values s*v (powers of two
    >= 1: s*v is exact in fp8, subnormals included, and every product by s is exact in float32),
    to one rounding: the two compiled programs may evaluate tanh/exp in different fusions, which
    can move a float32 result by an ulp and then the bf16 output by one."""
    hq, hkv, ps = 4, 2, 4
    kv_lens = [9, 14]
    kv = make_paged_kv(rng, kv_lens, ps, hkv, D, kv_dtype, "NHD")
    k_scale, v_scale = np.array([2.0, 4.0], np.float32), 2.0
    scaled = (
        (kv.cache[0].astype(jnp.float32) * jnp.asarray(k_scale)[:, None]).astype(kv_dtype),
        (kv.cache[1].astype(jnp.float32) * v_scale).astype(kv_dtype),
    )
    assert np.array_equal(np.asarray(scaled[0].astype(jnp.float32)),
                          np.asarray(kv.cache[0], np.float32) * k_scale[:, None])  # exact in fp8
    if backend_op == "decode":
        w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
        w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, ps, kv_data_type=kv_dtype,
               logits_soft_cap=3.0)
        q = rand(rng, (2, hq, D), jnp.bfloat16)
    else:
        w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend="xla")
        w.plan(indptr_of([4, 14]), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, ps, causal=True,
               kv_data_type=kv_dtype, pos_encoding_mode="ALIBI")
        q = rand(rng, (18, hq, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    o1, lse1 = w.run(q, scaled, return_lse=True)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o1, np.float32), rtol=2**-8, atol=2**-16)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse1), rtol=1e-6)


def test_traced_scales_do_not_recompile(rng):
    """A jitted decode step takes calibrated scales as arguments: new values, one trace."""
    hq, hkv, ps = 4, 2, 5
    kv = make_paged_kv(rng, [11, 3], ps, hkv, D, jnp.float8_e4m3fn)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
    plan = w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, ps, kv_data_type=jnp.float8_e4m3fn)
    q = rand(rng, (2, hq, D), jnp.bfloat16)
    traces = []

    @jax.jit
    def step(plan, q, cache, k_scale, v_scale):
        traces.append(1)
        return jaxinfer.batch_decode(q, cache, plan, k_scale=k_scale, v_scale=v_scale)

    traced = None
    for k_scale, v_scale in ((0.5, 2.0), (3.0, 0.25), (1.5, 1.0)):
        o = step(plan, q, kv.cache, jnp.float32(k_scale), jnp.full((hkv,), v_scale, jnp.float32))
        traced = traced or len(traces)  # the first call traces
        want, _ = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale), indptr_of([1, 1]))
        assert_close(o, want, jnp.bfloat16)
    assert len(traces) == traced == 1


BAD_SCALES = [
    (float("nan"), "finite and > 0"),
    (-1.0, "finite and > 0"),
    (0.0, "finite and > 0"),
    (np.array([1.0, np.inf], np.float32), "finite and > 0"),
    (True, "bool"),
    ("2", "float"),
    (jnp.ones((3,), jnp.float32), r"\[num_kv_heads = 2\]"),
    (jnp.ones((2,), jnp.int32), "float"),
]


@pytest.mark.parametrize("name", ["k_scale", "v_scale"])
@pytest.mark.parametrize("value,match", BAD_SCALES, ids=[f"bad{i}" for i in range(len(BAD_SCALES))])
def test_bad_scales_raise_naming_the_argument(rng, name, value, match):
    hq, hkv, ps = 4, 2, 4
    kv = make_paged_kv(rng, [5], ps, hkv, D, jnp.float8_e5m2)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, ps, kv_data_type=jnp.float8_e5m2)
    q = rand(rng, (1, hq, D), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{name}.*{match}"):
        w.run(q, kv.cache, **{name: value})
    rows = jnp.zeros((1, hkv, D), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{name}.*{match}"):
        jaxinfer.append_paged_kv_cache(rows, rows, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), kv.cache,
                                       jnp.asarray(kv.kv_indices), jnp.asarray(kv.kv_indptr),
                                       jnp.asarray(kv.kv_last_page_len), **{name: value})


# ------------------------------------------------------------------ routing

def _fp8_spec(kv_dtype=jnp.float8_e4m3fn):
    return BatchSpec.create(np.array([0, 1]), np.array([0, 1]), np.array([0]), np.array([3]), page_size=4,
                            num_qo_heads=8, num_kv_heads=2, head_dim=128, variant=AttentionVariant(),
                            q_dtype=jnp.bfloat16, kv_dtype=kv_dtype)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_fp8_routing(monkeypatch, kv_dtype):
    """fa2/fa3 decline fp8 caches with their reason; pallas serves them; "auto" on an H100 routes
    every op to pallas (the capabilities decide, before any kernel library is built)."""
    spec = _fp8_spec(kv_dtype)
    for name in ("fa2", "fa3"):
        reason = backends.get_backend(name).capabilities.unsupported(spec)
        assert reason is not None and "pallas" in reason and jnp.dtype(kv_dtype).name in reason
        with pytest.raises(backends.BackendUnsupportedError, match="pallas"):
            backends.resolve(name, spec)
    assert backends.get_backend("pallas").unsupported(spec) is None
    monkeypatch.setattr(device, "gpu_arch", lambda: 90)
    for op in backends.OPS:
        assert backends.resolve("auto", spec, op=op).name == "pallas"
    # fp8 queries are not served by the kernels (bf16/fp16 q with an fp8 cache).
    q8 = BatchSpec.create(np.array([0, 1]), np.array([0, 1]), np.array([0]), np.array([3]), page_size=4,
                          num_qo_heads=8, num_kv_heads=2, head_dim=128, variant=AttentionVariant(),
                          q_dtype=kv_dtype, kv_dtype=kv_dtype)
    assert "q dtype" in backends.get_backend("pallas").unsupported(q8)


def test_fp8_plan_uses_fp8_decode_tile():
    """The plan of an fp8 decode batch carries the fp8 tile (twice the keys per step)."""
    args = dict(page_size=16, num_qo_heads=32, num_kv_heads=8, head_dim=128,
                variant=jaxinfer.AttentionVariant(), q_dtype=jnp.bfloat16)
    table = (np.arange(3), np.arange(3), np.arange(2), np.array([16, 5]))
    bf16 = BatchSpec.create(*table, **args, kv_dtype=jnp.bfloat16)
    fp8 = BatchSpec.create(*table, **args, kv_dtype=jnp.float8_e4m3fn)
    cfg16 = pallas_backend().plan(bf16, PlanCapacity()).config
    cfg8 = pallas_backend().plan(fp8, PlanCapacity()).config
    assert cfg8.block_n == 2 * cfg16.block_n and cfg8.block_m == cfg16.block_m


# ------------------------------------------------------------------ quantizing appends

@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("row_dtype,scales,layout,single", [
    (jnp.bfloat16, "head", "NHD", False), (jnp.float32, "tensor", "HND", True), (jnp.float16, None, "NHD", True),
])
def test_append_quantizes_and_saturates(rng, kv_dtype, row_dtype, scales, layout, single):
    """Rows (with values past the fp8 range, +-inf and NaN) go to the request's slots as saturated
    K / k_scale; padding rows and every other slot stay as they were."""
    hkv, ps, d = 2, 4, 8
    kv_indptr, kv_indices = np.array([0, 2, 3], np.int32), np.array([3, 0, 2], np.int32)
    last = np.array([2, 4], np.int32)  # request 0: 6 tokens, request 1: 4 tokens
    num_pages = 5
    shape = (num_pages, ps, hkv, d) if layout == "NHD" else (num_pages, hkv, ps, d)
    k0, v0 = rand(rng, shape, kv_dtype), rand(rng, shape, kv_dtype)
    cache = jnp.stack([k0, v0], axis=1) if single else (k0, v0)
    batch_indices = np.array([0, 0, 1, -1, 1], np.int32)  # row 3 is padding
    positions = np.array([4, 5, 3, -1, 0], np.int32)
    keys = rng.standard_normal((5, hkv, d)).astype(np.float32) * 50
    keys[0, 0, :4] = [6e4, -6e4, np.inf, -np.inf]  # past e4m3's and e5m2's range, inside fp16's
    keys[2, 1, 0] = np.nan
    values = rng.standard_normal((5, hkv, d)).astype(np.float32) * 50
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    out = jaxinfer.append_paged_kv_cache(
        jnp.asarray(keys, row_dtype), jnp.asarray(values, row_dtype), jnp.asarray(batch_indices),
        jnp.asarray(positions), cache, jnp.asarray(kv_indices), jnp.asarray(kv_indptr), jnp.asarray(last),
        kv_layout=layout, k_scale=k_scale, v_scale=v_scale)
    k, v = jaxinfer.page.unpack_paged_kv_cache(out, layout)
    assert k.dtype == kv_dtype
    k, v = (np.array(x) for x in (k, v))
    # [lo, hi] per slot (the old bits in both where nothing is written), NaN where NaN.
    lo, hi = ([np.array(x, np.float32) for x in (k0, v0)] for _ in range(2))
    if layout == "HND":
        k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
        lo, hi = ([x.transpose(0, 2, 1, 3) for x in xs] for xs in (lo, hi))
    rows_in = lambda x: np.asarray(jnp.asarray(x, row_dtype).astype(jnp.float32))  # noqa: E731
    bounds = [quantized_bounds(rows_in(x), scale, kv_dtype) for x, scale in ((keys, k_scale), (values, v_scale))]
    for r, (b, pos) in enumerate(zip(batch_indices, positions)):
        if b < 0:
            continue
        page = kv_indices[kv_indptr[b] + pos // ps]
        for i in range(2):
            lo[i][page, pos % ps], hi[i][page, pos % ps] = bounds[i][0][r], bounds[i][1][r]
    assert_between(k.astype(np.float32), lo[0], hi[0], "k")
    assert_between(v.astype(np.float32), lo[1], hi[1], "v")
    limit = float(jnp.finfo(kv_dtype).max)
    if k_scale is None:  # the first key's saturated entries: +-max for +-6e4 and +-inf
        np.testing.assert_array_equal(k[kv_indices[1], 0, 0, :4].astype(np.float32), [limit, -limit, limit, -limit])
    assert np.isnan(k[kv_indices[2], 3, 1, 0].astype(np.float32))


def test_append_then_attend_reads_the_scaled_values(rng):
    """append_paged_kv_cache(k_scale=s) then attention with k_scale=s reads back K to fp8 precision."""
    hq, hkv, ps, n = 4, 2, 4, 10
    kv_indptr, kv_indices, last = np.array([0, 3], np.int32), np.array([2, 0, 1], np.int32), np.array([2], np.int32)
    cache = tuple(jnp.zeros((3, ps, hkv, D), jnp.float8_e4m3fn) for _ in range(2))
    keys, values = (rand(rng, (n, hkv, D), jnp.bfloat16, scale=40.0) for _ in range(2))
    k_scale, v_scale = np.array([0.5, 1.0], np.float32), 0.5  # |K| / k_scale stays inside e4m3's 448
    cache = jaxinfer.append_paged_kv_cache(keys, values, jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32),
                                           cache, kv_indices, kv_indptr, last, k_scale=k_scale, v_scale=v_scale)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
    w.plan(kv_indptr, kv_indices, last, hq, hkv, D, ps, kv_data_type=jnp.float8_e4m3fn)
    q = rand(rng, (1, hq, D), jnp.bfloat16, scale=0.05)
    o = w.run(q, cache, k_scale=k_scale, v_scale=v_scale)
    # The cache holds K / k_scale to e4m3's precision (3 mantissa bits: relative error <= 2**-4,
    # absolute 2**-10 below its normal range), and attention reads what it holds times the scale.
    ks, vs = gather_paged_kv(*cache, kv_indptr, kv_indices, last)
    for stored, scale, x in ((ks, k_scale, keys), (vs, v_scale, values)):
        got, scale = dequantize(stored, scale)[0], np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (hkv,))
        bound = np.maximum(2.0**-4 * np.abs(f64(x)), 2.0**-10 * scale[None, :, None])
        assert (np.abs(got - f64(x)) <= bound).all()
    want, _ = ref_attention(q, dequantize(ks, k_scale)[0], dequantize(vs, v_scale)[0])
    assert_close(o, want, jnp.bfloat16)


@pytest.mark.parametrize("is_neox,nope,quant_dtype", [(True, 16, None), (False, 0, jnp.float8_e4m3fn)])
def test_rope_quantize_fp8_append(rng, is_neox, nope, quant_dtype):
    nnz, hq, hkv, rope_dim, ps = 6, 4, 2, 16, 4
    d = rope_dim + nope
    q_rope, q_nope = rand(rng, (nnz, hq, rope_dim), jnp.bfloat16), rand(rng, (nnz, hq, nope), jnp.bfloat16)
    k_rope, k_nope = rand(rng, (nnz, hkv, rope_dim), jnp.bfloat16), rand(rng, (nnz, hkv, nope), jnp.bfloat16)
    v = rand(rng, (nnz, hkv, d), jnp.bfloat16)
    theta = 100.0
    freq = theta ** (-2.0 * np.arange(rope_dim // 2) / rope_dim)
    angle = np.arange(32)[:, None] * freq[None]
    cos_sin = jnp.asarray(np.concatenate([np.cos(angle), np.sin(angle)], axis=1), jnp.float32)
    pos_ids = np.array([3, 4, 5, 6, 7, 0], np.int32)
    kv_indptr, kv_indices = np.array([0, 2, 3], np.int32), np.array([1, 3, 0], np.int32)
    last = np.array([4, 1], np.int32)
    batch_indices, positions = np.array([0, 0, 0, 0, 0, 1], np.int32), pos_ids  # request 0 appends 3..7
    cache = tuple(jnp.zeros((4, ps, hkv, d), jnp.float8_e5m2) for _ in range(2))
    scale_q, scale_kv = 0.5, np.array([4.0, 0.25], np.float32)
    q_out, qn_out, cache = jaxinfer.rope_quantize_fp8_append_paged_kv_cache(
        q_rope, k_rope, q_nope if nope else None, k_nope if nope else None, v, cos_sin, pos_ids, cache,
        kv_indices, kv_indptr, batch_indices, positions, kv_last_page_len=last, is_neox=is_neox,
        quantize_dtype=quant_dtype, quant_scale_q=scale_q, quant_scale_kv=scale_kv)

    def rope64(x):
        x = f64(x)
        if is_neox:
            return rope_rotate_half(x, pos_ids, 1.0, theta)
        # Interleaved pairs (2i, 2i+1) are rotate-half pairs after a de-interleaving permutation.
        perm = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
        y = rope_rotate_half(x[..., perm], pos_ids, 1.0, theta)
        out = np.empty_like(y)
        out[..., perm] = y
        return out

    want_q = rope64(q_rope) * scale_q
    out_dtype = quant_dtype or jnp.bfloat16
    assert q_out.dtype == out_dtype and qn_out.shape == (nnz, hq, nope)
    np.testing.assert_allclose(f64(q_out), want_q, rtol=2 ** -3 if quant_dtype else 2e-2, atol=2e-2)
    np.testing.assert_allclose(f64(qn_out), f64(q_nope) * scale_q, rtol=2 ** -3, atol=1e-2)
    k_full = np.concatenate([rope64(k_rope), f64(k_nope)], axis=-1) * scale_kv[None, :, None]
    k_cache, v_cache = (f64(c) for c in cache)
    for r, (b, pos) in enumerate(zip(batch_indices, positions)):
        page = kv_indices[kv_indptr[b] + pos // ps]
        # e5m2 rounding: relative 2**-3 at most.
        np.testing.assert_allclose(k_cache[page, pos % ps], k_full[r], rtol=2 ** -3, atol=1e-4)
        np.testing.assert_allclose(v_cache[page, pos % ps], f64(v[r]) * scale_kv[:, None], rtol=2 ** -3, atol=1e-4)
    written = np.zeros((4, ps), bool)
    for b, pos in zip(batch_indices, positions):
        written[kv_indices[kv_indptr[b] + pos // ps], pos % ps] = True
    assert not k_cache[~written].any() and not v_cache[~written].any()


def test_rope_quantize_fp8_append_errors(rng):
    q = rand(rng, (2, 4, 16), jnp.bfloat16)
    k = rand(rng, (2, 2, 16), jnp.bfloat16)
    cos_sin = jnp.ones((8, 16), jnp.float32)
    args = dict(kv_indices=np.zeros(1, np.int32), kv_indptr=np.array([0, 1], np.int32),
                batch_indices=np.zeros(2, np.int32), positions=np.arange(2, dtype=np.int32))
    fp8_cache = tuple(jnp.zeros((1, 4, 2, 16), jnp.float8_e4m3fn) for _ in range(2))
    call = lambda **kw: jaxinfer.rope_quantize_fp8_append_paged_kv_cache(  # noqa: E731
        **{**dict(q_rope=q, k_rope=k, q_nope=None, k_nope=None, v=k, cos_sin_cache=cos_sin, pos_ids=np.arange(2),
                  paged_kv_cache=fp8_cache, kv_last_page_len=np.array([2], np.int32)), **args, **kw})
    call()
    with pytest.raises(ValueError, match="paged_kv_cache must be float8"):
        call(paged_kv_cache=tuple(c.astype(jnp.bfloat16) for c in fp8_cache))
    with pytest.raises(ValueError, match="k_rope"):
        call(k_rope=k[:, 0])
    with pytest.raises(ValueError, match="cos_sin_cache"):
        call(cos_sin_cache=cos_sin.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="quant_scale_kv"):
        call(quant_scale_kv=-2.0)
    with pytest.raises(ValueError, match="v must be"):
        call(v=k[..., :8])
