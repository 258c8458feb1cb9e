"""Batch wrappers (decode, paged prefill, ragged prefill) and their jitted module-level runners."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, DECODE_OPTIONS, PREFILL_OPTIONS, assert_close, case_grid, indptr_of, jit_call, make_paged_kv, rand
from ref64 import gather_paged_kv, ref_batch

BF16, FP16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (page_size, num_qo_heads, num_kv_heads, head_dim, kv_layout, single-array cache, dtype)
GEOMS = [
    (1, 4, 4, 64, "NHD", False, BF16),
    (5, 8, 2, 128, "HND", True, FP16),
    (16, 8, 1, 64, "NHD", True, F32),
    (16, 16, 2, 128, "HND", False, BF16),
    (5, 4, 1, 64, "NHD", False, F32),
]

def _kv_lens(rng, max_len: int = 300) -> np.ndarray:
    """Five requests: an empty one, a one-token one and three random lengths up to ``max_len``."""
    lens = np.array([0, 1, rng.integers(2, 40), rng.integers(40, max_len + 1), rng.integers(2, max_len + 1)])
    return rng.permutation(lens)


def _qo_lens(rng, kv_lens: np.ndarray) -> np.ndarray:
    """Per-request query counts, some above their kv_len (rows that causal leaves without keys)."""
    qo = np.minimum(rng.integers(1, 24, size=kv_lens.size), np.maximum(kv_lens, 1))
    qo[rng.integers(kv_lens.size)] = 0  # a request without queries
    short = np.flatnonzero((kv_lens > 0) & (kv_lens < 20))
    if short.size:
        qo[short[0]] = kv_lens[short[0]] + rng.integers(1, 5)
    return qo


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom,max_len,options", case_grid(GEOMS, DECODE_OPTIONS, [300, 60]))
def test_batch_decode(rng, backend, geom, max_len, options):
    page_size, hq, hkv, d, layout, single, dtype = geom
    kv_lens = _kv_lens(rng, max_len)
    paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype, layout, single)
    q = rand(rng, (kv_lens.size, hq, d), dtype)
    wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout=layout, backend=backend)
    wrapper.plan(
        paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size,
        q_data_type=dtype, **options,
    )
    o, lse = jit_call(wrapper.run, q, paged.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, paged.k_list, paged.v_list, indptr_of(np.ones_like(kv_lens)), **options)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom,max_len,options", case_grid(GEOMS, PREFILL_OPTIONS, [300, 60]))
def test_batch_prefill_paged(rng, backend, geom, max_len, options):
    page_size, hq, hkv, d, layout, single, dtype = geom
    kv_lens = _kv_lens(rng, max_len)
    qo_indptr = indptr_of(_qo_lens(rng, kv_lens))
    paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype, layout, single)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(kv_layout=layout, backend=backend)
    wrapper.plan(
        qo_indptr, paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size,
        q_data_type=dtype, **options,
    )
    o, lse = jit_call(wrapper.run, q, paged.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, paged.k_list, paged.v_list, qo_indptr, **options)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom,max_len,options", case_grid(GEOMS, PREFILL_OPTIONS, [300, 60], per_option=1))
def test_batch_prefill_ragged(rng, backend, geom, max_len, options):
    _, hq, hkv, d, _, _, dtype = geom
    kv_lens = _kv_lens(rng, max_len)
    qo_indptr, kv_indptr = indptr_of(_qo_lens(rng, kv_lens)), indptr_of(kv_lens)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    k, v = rand(rng, (kv_indptr[-1], hkv, d), dtype), rand(rng, (kv_indptr[-1], hkv, d), dtype)
    wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
    wrapper.plan(qo_indptr, kv_indptr, hq, hkv, d, q_data_type=dtype, **options)
    o, lse = jit_call(wrapper.run, q, k, v, return_lse=True)
    k_list = [k[kv_indptr[b] : kv_indptr[b + 1]] for b in range(kv_lens.size)]
    v_list = [v[kv_indptr[b] : kv_indptr[b + 1]] for b in range(kv_lens.size)]
    want_o, want_lse = ref_batch(q, k_list, v_list, qo_indptr, **options)
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")


def _flat_mask(rng, qo_lens, kv_lens):
    return np.concatenate([(rng.random((a, b)) < 0.6).reshape(-1) for a, b in zip(qo_lens, kv_lens)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_batch_prefill_custom_mask(rng, backend, causal, ragged):
    page_size, hq, hkv, d, dtype = 5, 8, 2, 64, BF16
    kv_lens = _kv_lens(rng, max_len=90)
    qo_lens = _qo_lens(rng, kv_lens)
    qo_indptr = indptr_of(qo_lens)
    mask = _flat_mask(rng, qo_lens, kv_lens)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    if ragged:
        kv_indptr = indptr_of(kv_lens)
        k, v = rand(rng, (kv_indptr[-1], hkv, d), dtype), rand(rng, (kv_indptr[-1], hkv, d), dtype)
        k_list = [k[kv_indptr[b] : kv_indptr[b + 1]] for b in range(kv_lens.size)]
        v_list = [v[kv_indptr[b] : kv_indptr[b + 1]] for b in range(kv_lens.size)]
        wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
        wrapper.plan(qo_indptr, kv_indptr, hq, hkv, d, custom_mask=mask, causal=causal, q_data_type=dtype)
        o, lse = jit_call(wrapper.run, q, k, v, return_lse=True)
    else:
        paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype)
        k_list, v_list = paged.k_list, paged.v_list
        wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
        wrapper.plan(
            qo_indptr, paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size,
            custom_mask=mask, causal=causal, q_data_type=dtype,
        )
        o, lse = jit_call(wrapper.run, q, paged.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, k_list, v_list, qo_indptr, custom_mask=mask, causal=causal)
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jitted_module_level_runners_take_the_plan(rng, backend):
    page_size, hq, hkv, d, dtype = 16, 8, 2, 64, BF16
    kv_lens = _kv_lens(rng, max_len=100)
    qo_indptr = indptr_of(_qo_lens(rng, kv_lens))
    paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype, "HND")
    table = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size)

    dec = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout="HND", backend=backend)
    plan = dec.plan(*table, q_data_type=dtype)
    q = rand(rng, (kv_lens.size, hq, d), dtype)
    o, lse = jax.jit(lambda q, c, p: jaxinfer.batch_decode(q, c, p, return_lse=True))(q, paged.cache, plan)
    want = ref_batch(q, paged.k_list, paged.v_list, indptr_of(np.ones_like(kv_lens)))
    assert_close(o, want[0], dtype, "decode o")
    assert_close(lse, want[1], dtype, "decode lse")

    pre = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(kv_layout="HND", backend=backend)
    plan = pre.plan(qo_indptr, *table, causal=True, q_data_type=dtype)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    o = jax.jit(jaxinfer.batch_prefill_paged)(q, paged.cache, plan)
    assert_close(o, ref_batch(q, paged.k_list, paged.v_list, qo_indptr, causal=True)[0], dtype, "paged o")

    kv_indptr = indptr_of(kv_lens)
    k, v = rand(rng, (kv_indptr[-1], hkv, d), dtype), rand(rng, (kv_indptr[-1], hkv, d), dtype)
    rag = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
    plan = rag.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=True, q_data_type=dtype)
    o = jax.jit(jaxinfer.batch_prefill_ragged)(q, k, v, plan)
    k_list = [k[kv_indptr[b] : kv_indptr[b + 1]] for b in range(kv_lens.size)]
    v_list = [v[kv_indptr[b] : kv_indptr[b + 1]] for b in range(kv_lens.size)]
    assert_close(o, ref_batch(q, k_list, v_list, qo_indptr, causal=True)[0], dtype, "ragged o")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fixed_capacity_compiles_once(rng, backend, kind):
    """Ten batch compositions of the same array shapes under one PlanCapacity: one trace."""
    page_size, hq, hkv, d, dtype = 5, 8, 2, 64, BF16
    batch, nnz_q, max_kv, num_pages = 4, 24, 60, 60
    capacity = jaxinfer.PlanCapacity(max_batch_size=batch, max_qo_len=nnz_q, max_kv_len=max_kv, max_work_tiles=256)
    traces = []
    if kind == "decode":
        wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend, capacity=capacity)

        @jax.jit
        def step(q, cache, plan):
            traces.append(1)
            return jaxinfer.batch_decode(q, cache, plan)
    else:
        wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend, capacity=capacity)

        @jax.jit
        def step(q, cache, plan):
            traces.append(1)
            return jaxinfer.batch_prefill_paged(q, cache, plan)

    k_cache = rand(rng, (num_pages, page_size, hkv, d), dtype)
    v_cache = rand(rng, (num_pages, page_size, hkv, d), dtype)
    for _ in range(10):
        kv_lens = rng.integers(0, max_kv + 1, size=batch)
        n_pages = -(-kv_lens // page_size)
        kv_indptr = indptr_of(n_pages)
        kv_indices = rng.permutation(num_pages)[: kv_indptr[-1]].astype(np.int32)
        last = np.where(kv_lens > 0, kv_lens - page_size * (n_pages - 1), 0).astype(np.int32)
        table = (kv_indptr, kv_indices, last, hq, hkv, d, page_size)
        if kind == "decode":
            qo_indptr = indptr_of(np.ones(batch, np.int32))
            plan = wrapper.plan(*table, q_data_type=dtype)
        else:
            cuts = np.sort(rng.integers(0, nnz_q + 1, size=batch - 1))
            qo_indptr = np.concatenate([[0], cuts, [nnz_q]]).astype(np.int32)
            plan = wrapper.plan(qo_indptr, *table, causal=True, q_data_type=dtype)
        q = rand(rng, (qo_indptr[-1], hq, d), dtype)
        o = step(q, (k_cache, v_cache), plan)
        k_list, v_list = gather_paged_kv(k_cache, v_cache, kv_indptr, kv_indices, last)
        want = ref_batch(q, k_list, v_list, qo_indptr, causal=(kind == "prefill"))[0]
        assert_close(o, want, dtype, "o")
    assert len(traces) == 1, f"the jitted step was traced {len(traces)} times for 10 batches"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_run_without_lse(rng, backend):
    """``run`` outside jit, ``return_lse=False``: a plain array, equal to the reference."""
    page_size, hq, hkv, d, dtype = 16, 4, 1, 64, F32
    kv_lens = np.array([0, 3, 40])
    qo_indptr = indptr_of([2, 3, 5])
    paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype, "NHD", True)
    table = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size)
    dec = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    dec.plan(*table, q_data_type=dtype)
    q = rand(rng, (kv_lens.size, hq, d), dtype)
    o = dec.run(q, paged.cache)
    assert isinstance(o, jax.Array) and o.shape == q.shape and o.dtype == dtype
    assert_close(o, ref_batch(q, paged.k_list, paged.v_list, indptr_of([1, 1, 1]))[0], dtype)
    pre = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
    pre.plan(qo_indptr, *table, causal=True, q_data_type=dtype)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    o = pre.run(q, paged.cache)
    assert isinstance(o, jax.Array) and o.shape == q.shape
    assert_close(o, ref_batch(q, paged.k_list, paged.v_list, qo_indptr, causal=True)[0], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ragged", [False, True])
def test_batch_without_any_key(rng, backend, ragged):
    """Every request empty (no pages / nnz_kv = 0): o = 0 and lse = -inf, no NaN."""
    hq, hkv, d, dtype = 8, 2, 64, BF16
    qo_indptr = indptr_of([2, 1])
    q = rand(rng, (3, hq, d), dtype)
    if ragged:
        wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
        wrapper.plan(qo_indptr, np.zeros(3, np.int32), hq, hkv, d, q_data_type=dtype)
        empty = rand(rng, (0, hkv, d), dtype)
        o, lse = wrapper.run(q, empty, empty, return_lse=True)
    else:
        paged = make_paged_kv(rng, [0, 0], 16, hkv, d, dtype)
        wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
        wrapper.plan(qo_indptr, paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, 16,
                     q_data_type=dtype)
        o, lse = wrapper.run(q, paged.cache, return_lse=True)
    assert_close(o, np.zeros((3, hq, d)), dtype, "o")
    assert_close(lse, np.full((3, hq), -np.inf), dtype, "lse")
