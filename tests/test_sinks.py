"""Attention sinks (``run(..., sinks=)``) against the float64 reference of tests/ref64.py.

A sink ``s_h`` (natural log, per query head) joins the softmax denominator once per row:
``o = o * sigmoid(lse ln 2 - s_h)``, ``lse = logaddexp(lse ln 2, s_h) / ln 2``. Covered: batch
decode, paged and ragged prefill, cascade and the single-request functions on the reference and
Pallas (interpret mode) engines, with sliding window and soft cap; split-KV plans (the sink comes
after the merge kernel's fold); a huge negative sink equals no sink exactly; rows with no visible
key give ``o = 0, lse = s_h / ln 2``; bad ``sinks`` raise; fa2/fa3 on the GPU (also their rows
without keys and a -1e30 sink, joined in the CUDA kernels' epilogue); the deviceless
Triton lowering of a sink kernel with split-KV.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, indptr_of, make_paged_kv, rand
from jax.experimental.pallas import triton as pltriton
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from ref64 import random_page_table, ref_batch

import jaxinfer
from jaxinfer.backends.pallas.attention import KernelSpec, attention
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.backends.pallas.merge import ParamLayout, force_triton_lowering
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant

BF16, F16 = jnp.bfloat16, jnp.float16
LN2 = math.log(2.0)
ENGINES = ["xla", "pallas"]
# Small tiles, few CTAs, short chunks: split-KV plans on small batches (the merge kernel runs).
SPLIT = PallasBackend(num_ctas=64, split_factor=16, config=TileConfig(16, 16, 4, 1), min_chunk=16)
WINDOW_CAP = dict(window_left=9, logits_soft_cap=6.0)


def _sinks(rng, hq):
    # Around the logits' scale, so that the sink moves every output (and some dominate).
    return jnp.asarray(rng.normal(1.0, 2.0, hq), jnp.float32)


def _check(o, lse, want_o, want_lse, dtype):
    assert_close(o, want_o, dtype)
    assert_close(lse, want_lse, jnp.float32 if dtype == jnp.float32 else dtype, "lse")


def test_decode_wrapper(rng, engine):
    hq, hkv, d, ps = 8, 2, 64, 4
    kv = make_paged_kv(rng, [13, 0, 40, 1], ps, hkv, d, BF16)
    q = rand(rng, (4, hq, d), BF16)
    sinks = _sinks(rng, hq)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", backend=engine)
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, d, ps, q_data_type=BF16, **WINDOW_CAP)
    o, lse = jax.jit(lambda q, c, s: w.run(q, c, return_lse=True, sinks=s))(q, kv.cache, sinks)
    want_o, want_lse = ref_batch(q, kv.k_list, kv.v_list, np.arange(5), sinks=sinks, **WINDOW_CAP)
    _check(o, lse, want_o, want_lse, BF16)
    # Request 1 has no key: o = 0 and lse = sink / ln 2 (base 2).
    np.testing.assert_array_equal(np.asarray(o[1], np.float32), 0.0)
    np.testing.assert_allclose(np.asarray(lse[1]), np.asarray(sinks) / LN2, rtol=1e-6)


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def _spec_and_kv(rng, qo_lens, kv_lens, variant, *, hq, hkv, d, page_size, dtype):
    """A paged (``page_size``) or ragged (``None``) batch: spec, q, k, v and the reference's KV."""
    qo_indptr = indptr_of(qo_lens)
    q = rand(rng, (int(qo_indptr[-1]), hq, d), dtype)
    if page_size is None:
        kv_indptr = indptr_of(kv_lens)
        k = rand(rng, (int(kv_indptr[-1]) + 2, hkv, d), dtype)
        v = rand(rng, k.shape, dtype)
        spec = BatchSpec.create(qo_indptr, kv_indptr, None, None, page_size=1, num_qo_heads=hq, num_kv_heads=hkv,
                                head_dim=d, variant=variant, q_dtype=dtype)
        k_list = [k[a:b] for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        v_list = [v[a:b] for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        return spec, q, k, v, k_list, v_list
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype)
    spec = BatchSpec.create(qo_indptr, kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, page_size=page_size,
                            num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, variant=variant, q_dtype=dtype)
    return spec, q, *kv.cache, kv.k_list, kv.v_list


# Windows wide enough that the visible keys still split into several chunks.
SPLIT_CASES = {
    # decode over paged KV with window and soft cap; an empty request
    "decode": (np.ones(4, np.int64), np.array([70, 0, 33, 90]), AttentionVariant(window_left=50, logits_soft_cap=6.0),
               5),
    # paged prefill, causal with window and soft cap
    "prefill-paged": (np.array([9, 1, 17]), np.array([60, 30, 17]),
                      AttentionVariant(causal=True, window_left=40, logits_soft_cap=6.0), 4),
    # ragged prefill, non-causal with soft cap; an empty KV under 3 queries (rows see nothing)
    "prefill-ragged": (np.array([5, 3, 12]), np.array([50, 0, 12]), AttentionVariant(logits_soft_cap=6.0), None),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_kv_pallas(rng, case):
    """Split-KV plans: partials merge first and the sink joins once (in the merge kernel)."""
    qo_lens, kv_lens, variant, page_size = SPLIT_CASES[case]
    spec, q, k, v, k_list, v_list = _spec_and_kv(rng, qo_lens, kv_lens, variant, hq=4, hkv=2, d=32,
                                                 page_size=page_size, dtype=F16)
    plan = SPLIT.plan(spec, PlanCapacity())
    assert int(np.diff(plan.unpack()["merge_indptr"]).max(initial=1)) >= 2  # some rows are split
    sinks = _sinks(rng, 4)
    run = jax.jit(lambda p, q, k, v, s: SPLIT.run(p, q, k, v, return_lse=True, sinks=s))
    o, lse = run(plan, q, k, v, sinks)
    want_o, want_lse = ref_batch(q, k_list, v_list, spec.qo_indptr, variant=variant, sinks=sinks)
    _check(o, lse, want_o, want_lse, F16)


def test_ragged_prefill_wrapper(rng, engine):
    hq, hkv, d = 4, 1, 32
    qo_lens, kv_lens = [7, 0, 12], [20, 5, 12]
    variant = AttentionVariant(causal=True, **WINDOW_CAP)
    _, q, k, v, k_list, v_list = _spec_and_kv(rng, qo_lens, kv_lens, variant, hq=hq, hkv=hkv, d=d, page_size=None,
                                              dtype=F16)
    sinks = _sinks(rng, hq)
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(None, backend=engine)
    w.plan(indptr_of(qo_lens), indptr_of(kv_lens), hq, hkv, d, causal=True, q_data_type=F16, **WINDOW_CAP)
    o, lse = w.run(q, k[:37], v[:37], return_lse=True, sinks=sinks)
    want_o, want_lse = ref_batch(q, k_list, v_list, indptr_of(qo_lens), variant=variant, sinks=sinks)
    _check(o, lse, want_o, want_lse, F16)


def test_cascade(rng, engine):
    """Two levels (a shared prefix, then each request's pages): the sink joins the merged state
    once, equal to flat attention with sinks over the concatenated KV."""
    hq, hkv, d, ps = 4, 2, 32, 4
    own_lens = np.array([5, 9, 1])
    shared_len = 8
    lens = [shared_len + n for n in own_lens]
    kv_indptr, kv_indices, last, num_pages = random_page_table(rng, lens, ps)
    k_cache, v_cache = (rand(rng, (num_pages, ps, hkv, d), F16) for _ in range(2))
    # Level 0: the shared prefix is request 0's first two pages, seen by all three queries.
    prefix = kv_indices[kv_indptr[0] : kv_indptr[0] + 2]
    own = [kv_indices[kv_indptr[b] + 2 : kv_indptr[b + 1]] for b in range(3)]
    own_last = np.where(own_lens % ps == 0, ps, own_lens % ps)
    w = jaxinfer.MultiLevelCascadeAttentionWrapper(2, backend=engine)
    w.plan([np.array([0, 3]), np.arange(4)], [np.array([0, 2]), indptr_of([len(p) for p in own])],
           [prefix, np.concatenate(own)], [np.array([ps]), own_last], hq, hkv, d, ps, causal=True, q_data_type=F16,
           logits_soft_cap=6.0)
    q = rand(rng, (3, hq, d), F16)
    sinks = _sinks(rng, hq)
    o, lse = w.run(q, (k_cache, v_cache), return_lse=True, sinks=sinks)
    k_list = [np.concatenate([np.asarray(k_cache[prefix]).reshape(-1, hkv, d),
                              np.asarray(k_cache[own[b]]).reshape(-1, hkv, d)[: own_lens[b]]]) for b in range(3)]
    v_list = [np.concatenate([np.asarray(v_cache[prefix]).reshape(-1, hkv, d),
                              np.asarray(v_cache[own[b]]).reshape(-1, hkv, d)[: own_lens[b]]]) for b in range(3)]
    want_o, want_lse = ref_batch(q, k_list, v_list, np.arange(4), causal=True, logits_soft_cap=6.0, sinks=sinks)
    _check(o, lse, want_o, want_lse, F16)


def test_huge_negative_sink_is_no_sink(rng, engine):
    hq, hkv, d = 4, 2, 32
    kv = make_paged_kv(rng, [30, 3], 16, hkv, d, BF16)
    q = rand(rng, (2, hq, d), BF16)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(None, backend=engine)
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, d, 16, q_data_type=BF16, logits_soft_cap=6.0)
    run = jax.jit(lambda q, c, s: w.run(q, c, return_lse=True, sinks=s))
    o, lse = run(q, kv.cache, jnp.full((hq,), -1e30, jnp.float32))
    o0, lse0 = w.run(q, kv.cache, return_lse=True)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o0, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse0))


def test_single_functions(rng):
    hq, hkv, d = 4, 2, 32
    q = rand(rng, (6, hq, d), jnp.float32)
    k, v = rand(rng, (10, hkv, d), jnp.float32), rand(rng, (10, hkv, d), jnp.float32)
    sinks = _sinks(rng, hq)
    o, lse = jaxinfer.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=4, return_lse=True, sinks=sinks,
                                                   backend="xla")
    want_o, want_lse = ref_batch(q, [k], [v], [0, 6], causal=True, window_left=4, sinks=sinks)
    _check(o, lse, want_o, want_lse, jnp.float32)
    o, lse = jaxinfer.single_decode_with_kv_cache(q[0], k, v, return_lse=True, sinks=sinks, backend="xla")
    want_o, want_lse = ref_batch(q[:1], [k], [v], [0, 1], sinks=sinks)
    _check(o, lse, want_o[0], want_lse[0], jnp.float32)


def test_bad_sinks():
    q = jnp.zeros((1, 4, 32), BF16)
    k = jnp.zeros((3, 2, 32), BF16)
    for bad in (jnp.zeros(3, jnp.float32), jnp.zeros((4, 1), jnp.float32), jnp.zeros(4, jnp.int32), "x"):
        with pytest.raises(ValueError, match="sinks"):
            jaxinfer.single_prefill_with_kv_cache(q, k, k, sinks=bad, backend="xla")
    sigmoid = AttentionVariant(logits_transform=lambda x, *_: x, use_softmax=False)
    with pytest.raises(ValueError, match="sinks"):
        jaxinfer.single_prefill_with_kv_cache(q, k, k, sinks=jnp.zeros(4), variant=sigmoid, backend="xla")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa2", "fa3", "pallas"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "ragged"])
def test_sinks_gpu(rng, backend, paged):
    """fa2/fa3 (the sink joined in the CUDA kernels' epilogue) and pallas on the GPU: causal
    prefill with window and soft cap, and decode, against the reference."""
    hq, hkv, d = 8, 2, 128
    qo_lens, kv_lens = np.array([100, 1, 300, 0]), np.array([400, 50, 300, 20])
    sinks = _sinks(rng, hq)
    for variant in (AttentionVariant(causal=True, window_left=64, logits_soft_cap=30.0), AttentionVariant()):
        lens = (qo_lens if variant.causal else np.minimum(qo_lens, 1))
        spec, q, k, v, k_list, v_list = _spec_and_kv(rng, lens, kv_lens, variant, hq=hq, hkv=hkv, d=d,
                                                     page_size=16 if paged else None, dtype=BF16)
        be = jaxinfer.backends.get_backend(backend)
        if be.unsupported(spec) is not None:
            pytest.skip(be.unsupported(spec))
        plan = be.plan(spec, PlanCapacity())
        o, lse = jax.jit(lambda p, q, k, v, s: be.run(p, q, k, v, return_lse=True, sinks=s))(plan, q, k, v, sinks)
        want_o, want_lse = ref_batch(q, k_list, v_list, spec.qo_indptr, variant=variant, sinks=sinks)
        _check(o, lse, want_o, want_lse, BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
@pytest.mark.parametrize("d", [64, 256])
def test_sinks_ffi_edge_rows(rng, backend, d):
    """fa2/fa3, whose kernels join the sink to each row's max and sum: rows that see no key (the
    first 30 of a causal request with qo_len > kv_len, a request with no KV, some of them in work
    items with no KV tile at all) give o = 0 and lse = s_h / ln 2; more work items than fa3's
    persistent CTAs (each item carries its head's sink); outputs poisoned first (a run on NaN
    inputs); a -1e30 sink equals no sink bit for bit (a no-key row's lse is then -1e30 / ln 2)."""
    hq, hkv = 32, 8
    qo_lens, kv_lens = np.array([40, 3, 600, 1]), np.array([10, 0, 700, 70])
    variant = AttentionVariant(causal=True, logits_soft_cap=20.0)
    spec, q, k, v, k_list, v_list = _spec_and_kv(rng, qo_lens, kv_lens, variant, hq=hq, hkv=hkv, d=d,
                                                 page_size=None, dtype=BF16)
    be = jaxinfer.backends.get_backend(backend)
    if be.unsupported(spec) is not None:
        pytest.skip(be.unsupported(spec))
    plan = be.plan(spec, PlanCapacity())
    run = jax.jit(lambda p, q, k, v, s: be.run(p, q, k, v, return_lse=True, sinks=s))
    sinks = _sinks(rng, hq)
    nan = lambda a: jnp.full_like(a, jnp.nan)  # noqa: E731
    jax.block_until_ready(run(plan, nan(q), nan(k), nan(v), nan(sinks)))
    o, lse = run(plan, q, k, v, sinks)
    want_o, want_lse = ref_batch(q, k_list, v_list, spec.qo_indptr, variant=variant, sinks=sinks)
    _check(o, lse, want_o, want_lse, BF16)
    empty = np.r_[0:30, 40:43]  # request 0's rows 0-29 (q_pos < 0), request 1 (no KV)
    np.testing.assert_array_equal(np.asarray(o[empty], np.float32), 0.0)
    want_empty = np.broadcast_to(np.asarray(sinks) / LN2, (empty.size, hq))
    np.testing.assert_allclose(np.asarray(lse[empty]), want_empty, rtol=1e-6)

    o_huge, lse_huge = run(plan, q, k, v, jnp.full((hq,), -1e30, jnp.float32))
    o0, lse0 = jax.jit(lambda p, q, k, v: be.run(p, q, k, v, return_lse=True))(plan, q, k, v)
    np.testing.assert_array_equal(np.asarray(o_huge, np.float32), np.asarray(o0, np.float32))
    lse_huge, lse0 = np.asarray(lse_huge), np.asarray(lse0)
    seen = np.isfinite(lse0)
    assert not seen[empty].any() and seen.sum() == seen.size - empty.size * hq
    np.testing.assert_array_equal(lse_huge[seen], lse0[seen])
    np.testing.assert_allclose(lse_huge[~seen], -1e30 / LN2, rtol=1e-6)


def _export_cuda(f, *args):
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                                disabled_checks=[DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*args)
    return exp.mlir_module()


@pytest.mark.parametrize("cfg", [TileConfig(16, 64, 4, 3, ctas_per_sm=3), TileConfig(128, 64, 8, 3, qk_ahead=True)],
                         ids=["decode-tile", "prefill-tile"])
def test_sinks_and_params_lower(cfg):
    """Deviceless Triton lowering (the conftest fixture verifies each module) of a split-KV
    kernel with sinks, window, soft cap and a variant whose callables take params: the sink and
    param loads of the attention and merge kernels."""
    hkv, group, d = 2, 4, 128
    hq = hkv * group
    params = {"bias": jnp.zeros(hq), "gate": jnp.zeros((hq, 4)), "c": jnp.float32(0.5)}
    variant = AttentionVariant(
        takes_params=True,
        logits_transform=lambda x, qp, kp, qh, kh, p: x + p["bias"] * (kp - qp) * p["c"],
        output_transform=lambda o, lse, qp, qh, p: o * (1.0 + jnp.sum(p["gate"], axis=-1))[:, None],
    )
    layout, leaves = ParamLayout.of(params)
    ks = KernelSpec(paged=True, kv_layout="NHD", page_size=16, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                    sm_scale=0.1, causal=True, window_left=64, logits_soft_cap=30.0, num_ctas=264, num_slots=1056,
                    num_groups=528, max_tiles=2048, page_capacity=4096, callables=variant, sinks=True, params=layout)
    S = jax.ShapeDtypeStruct
    kv = S((300, 16, hkv, d), BF16)
    args = (S((ks.buffer_size,), jnp.int32), S((77, hq, d), BF16), kv, kv, S((hq,), jnp.float32),
            *(S(x.shape, x.dtype) for x in leaves))
    text = _export_cuda(lambda b, q, k, v, s, *p: attention(b, q, k, v, None, None, s, p, ks=ks, cfg=cfg), *args)
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2
