"""Hardening of the run side (issue 16): the module-level run functions check their arrays against
the plan at trace time, a batch of zero requests gives empty outputs, and ``plan`` is safe to call
from several threads."""

from __future__ import annotations

import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS, assert_close, indptr_of, make_paged_kv, rand
from ref64 import ref_batch

import jaxinfer

HQ, HKV, D, PAGE = 4, 2, 64, 4


def _decode_plan(backend, kv_layout="NHD"):
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout, backend=backend)
    plan = w.plan(np.array([0, 1, 2]), np.array([0, 1]), np.array([3, 4]), HQ, HKV, D, PAGE)
    return w, plan


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "q_shape,cache_shape,layout_of_cache,what",
    [
        ((2, 2, D), (2, PAGE, HKV, D), "NHD", "q"),  # 2 query heads for a 4-head plan
        ((2, 8, D), (2, PAGE, HKV, D), "NHD", "q"),  # 8 query heads
        ((2, HQ, 32), (2, PAGE, HKV, D), "NHD", "q"),  # head_dim
        ((2, HQ, D), (2, 8, HKV, D), "NHD", "paged_kv_cache"),  # page_size 8 for a page_size-4 plan
        ((2, HQ, D), (2, HKV, PAGE, D), "NHD", "paged_kv_cache"),  # an HND cache for an NHD plan
    ],
)
def test_batch_decode_checks_the_plan_at_trace_time(backend, q_shape, cache_shape, layout_of_cache, what):
    _, plan = _decode_plan(backend)
    q = jnp.zeros(q_shape, jnp.bfloat16)
    cache = jnp.zeros(cache_shape, jnp.bfloat16)
    with pytest.raises(ValueError, match=what):
        jax.jit(jaxinfer.batch_decode)(q, (cache, cache), plan)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_level_runs_check_dtype_and_kind(backend, rng):
    _, plan = _decode_plan(backend)
    cache = jnp.zeros((2, PAGE, HKV, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="q_data_type"):
        jaxinfer.batch_decode(jnp.zeros((2, HQ, D), jnp.float16), (cache, cache), plan)
    # A ragged prefill plan run as a paged one, and the other way round.
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
    ragged = w.plan(np.array([0, 2]), np.array([0, 5]), HQ, HKV, D)
    with pytest.raises(ValueError, match="k must be"):
        jaxinfer.batch_prefill_paged(jnp.zeros((2, HQ, D), jnp.bfloat16), (cache, cache), ragged)
    k = jnp.zeros((5, HKV, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="paged_kv_cache"):
        jaxinfer.batch_prefill_ragged(jnp.zeros((2, HQ, D), jnp.bfloat16), k, k, plan)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_outputs(backend, rng):
    kv = make_paged_kv(rng, [3, 5], PAGE, HKV, D, jnp.bfloat16)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    plan = w.plan(np.array([0]), np.array([], np.int32), np.array([], np.int32), HQ, HKV, D, PAGE)
    q = jnp.zeros((0, HQ, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True)
    assert o.shape == (0, HQ, D) and lse.shape == (0, HQ)
    o = jax.jit(jaxinfer.batch_decode)(q, kv.cache, plan)
    assert o.shape == (0, HQ, D)
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
    w.plan(np.array([0]), np.array([0]), np.array([], np.int32), np.array([], np.int32), HQ, HKV, D, PAGE, causal=True)
    assert w.run(q, kv.cache).shape == (0, HQ, D)
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
    w.plan(np.array([0]), np.array([0]), HQ, HKV, D)
    k = rand(rng, (0, HKV, D), jnp.bfloat16)
    assert w.run(q, k, k).shape == (0, HQ, D)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_plan_from_several_threads_returns_each_callers_plan(backend, rng):
    """4 threads share one wrapper; each plans its own batches and must get its own plan back,
    and the wrapper must keep a matching (spec, plan) pair."""
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend,
                                                    capacity=jaxinfer.PlanCapacity(max_batch_size=8, max_kv_len=64))
    batches = []
    for t in range(4):
        lens = rng.integers(1, 60, size=t + 2)
        pages = -(-lens // PAGE)
        indptr = indptr_of(pages)
        last = (lens - PAGE * (pages - 1)).astype(np.int32)
        batches.append((indptr, np.arange(indptr[-1], dtype=np.int32), last, lens.astype(np.int32)))
    wrong, barrier = [], threading.Barrier(4)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded serving host does

    def worker(t):
        indptr, indices, last, lens = batches[t]
        barrier.wait()
        for _ in range(200):
            # No reference to the plan outlives the check: replacing the wrapper's previous plan
            # then frees it, and freeing device arrays releases the GIL (where threads switch).
            if not np.array_equal(_kv_lens(w.plan(indptr, indices, last, HQ, HKV, D, PAGE), lens.size), lens):
                wrong.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} of 800 plan() calls returned another thread's plan"
    spec, plan = w._require_plan()
    np.testing.assert_array_equal(_kv_lens(plan, spec.batch_size), spec.kv_lens)


def _kv_lens(plan, batch_size: int) -> np.ndarray:
    """Keys per request that a plan was made for (xla: its kv_lens; pallas: from its work tiles)."""
    if plan.backend == "xla":
        return np.asarray(plan.inner.kv_lens)[:batch_size]
    work = plan.inner.unpack()["work"]
    from jaxinfer.plan.layout import F

    lens = np.zeros(batch_size, np.int64)
    tiles = work[work[:, F["valid"]] == 1]
    # Decode: one query per request, so q_row0 is the request's index.
    lens[tiles[:, F["q_row0"]]] = tiles[:, F["kv_len"]]
    return lens


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_level_decode_still_matches_reference(backend, rng):
    kv_lens = [3, 9, 1]
    kv = make_paged_kv(rng, kv_lens, PAGE, HKV, D, jnp.bfloat16)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    plan = w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, HQ, HKV, D, PAGE)
    q = rand(rng, (3, HQ, D), jnp.bfloat16)
    o = jax.jit(jaxinfer.batch_decode)(q, kv.cache, plan)
    want, _ = ref_batch(q, kv.k_list, kv.v_list, indptr_of([1, 1, 1]))
    assert_close(o, want, jnp.bfloat16)


@pytest.mark.parametrize("num_levels", [float("nan"), True, 2.0, 0])
def test_cascade_num_levels_must_be_a_positive_integer(num_levels):
    with pytest.raises(ValueError, match="num_levels"):
        jaxinfer.MultiLevelCascadeAttentionWrapper(num_levels)


@pytest.mark.parametrize("R,C", [(4, 0), (0, 4), (2.5, 4), (4, float("nan"))])
def test_bsr_helpers_name_bad_block_shapes(R, C):
    mask = np.ones((8, 8), bool)
    with pytest.raises(ValueError, match=r"\b[RC]\b"):
        jaxinfer.dense_to_bsr(mask, R, C)
    with pytest.raises(ValueError, match=r"\b[RC]\b"):
        jaxinfer.bsr_to_dense(np.array([0, 1]), np.array([0]), 8, 8, R, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_level_ragged_run_stays_inside_short_arrays(backend, rng):
    """Row counts are data of the traced plan, so a module-level run cannot check q or k rows against
    it. With fewer rows than the plan covers, the kernels compute the rows that exist as planned,
    never touch rows past the arrays (on the GPU: compute-sanitizer), and give finite values."""
    qo_lens, kv_lens = [5, 150], [9, 150]
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
    plan = w.plan(indptr_of(qo_lens), indptr_of(kv_lens), HQ, HKV, D, causal=True)
    q = rand(rng, (sum(qo_lens), HQ, D), jnp.bfloat16)
    k, v = (rand(rng, (sum(kv_lens), HKV, D), jnp.bfloat16) for _ in range(2))
    want, _ = ref_batch(q, [k[:9], k[9:]], [v[:9], v[9:]], indptr_of(qo_lens), causal=True)
    run = jax.jit(jaxinfer.batch_prefill_ragged)
    short_q = run(q[:40], k, v, plan)
    assert short_q.shape == (40, HQ, D)
    assert_close(short_q, want[:40], jnp.bfloat16)
    short_kv = np.asarray(run(q, k[:100], v[:100], plan), np.float32)
    assert np.isfinite(short_kv).all()
    assert_close(short_kv[:5], want[:5], jnp.bfloat16)  # request 0's keys are all inside k


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_level_paged_run_stays_inside_a_small_cache(backend, rng):
    """A traced plan's page ids cannot be checked against the cache a module-level run passes: ids
    past the cache are clamped to it (finite values; on the GPU: compute-sanitizer finds no access
    outside the cache), and the request whose pages exist is exact."""
    k_cache, v_cache = (rand(rng, (13, PAGE, HKV, D), jnp.bfloat16) for _ in range(2))
    kv_indptr, kv_indices, last = np.array([0, 3, 13]), np.arange(13), np.array([1, PAGE])  # 9 and 40 keys
    qo_lens = [3, 70]
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
    plan = w.plan(indptr_of(qo_lens), kv_indptr, kv_indices, last, HQ, HKV, D, PAGE, causal=True)
    q = rand(rng, (sum(qo_lens), HQ, D), jnp.bfloat16)
    want, _ = ref_batch(q[:3], [k_cache[:3].reshape(-1, HKV, D)[:9]], [v_cache[:3].reshape(-1, HKV, D)[:9]],
                        indptr_of(qo_lens[:1]), causal=True)
    o = np.asarray(jax.jit(jaxinfer.batch_prefill_paged)(q, (k_cache[:3], v_cache[:3]), plan), np.float32)
    assert np.isfinite(o).all()
    assert_close(o[:3], want, jnp.bfloat16)
