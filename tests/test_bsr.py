"""BSR conversions and the module-level block-sparse and cascade runners inside jax.jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS, assert_close, rand
from ref64 import f64, ref_attention

import jaxinfer


@pytest.mark.parametrize("R,C", [(1, 1), (4, 4), (3, 8), (16, 2)])
def test_dense_to_bsr_round_trip(rng, R, C):
    M, N = 37, 48
    dense = rng.random((M, N)) < 0.2
    indptr, indices, block_mask = jaxinfer.dense_to_bsr(dense, R, C)
    assert indptr.size == -(-M // R) + 1 and indices.size == indptr[-1] == block_mask.shape[0]
    assert block_mask.any(axis=(1, 2)).all(), "every kept block holds a True element"
    np.testing.assert_array_equal(jaxinfer.bsr_to_dense(indptr, indices, M, N, R, C, block_mask), dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_block_sparse_jitted_with_plan_argument(rng, backend):
    M, N, R, C, Hq, Hkv, D, dtype = 24, 32, 4, 8, 4, 2, 32, jnp.float16
    dense = rng.random((M, N)) < 0.3
    indptr, indices, block_mask = jaxinfer.dense_to_bsr(dense, R, C)
    wrapper = jaxinfer.BlockSparseAttentionWrapper(backend=backend)
    plan = wrapper.plan(indptr, indices, M, N, R, C, Hq, Hkv, D, mask=block_mask, q_data_type=dtype)
    q, k, v = rand(rng, (M, Hq, D), dtype), rand(rng, (N, Hkv, D), dtype), rand(rng, (N, Hkv, D), dtype)
    o = jax.jit(jaxinfer.batch_block_sparse)(q, k, v, plan)
    want, _ = ref_attention(f64(q), f64(k), f64(v), custom_mask=dense)
    assert_close(o, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_cascade_jitted_with_plan_argument(rng, backend):
    page_size, Hq, Hkv, D, dtype = 4, 4, 2, 32, jnp.float16
    page_lists = [[0, 1, 5], [0, 1, 6], [2, 7]]
    last = np.array([2, 4, 1])
    levels = jaxinfer.cascade_levels_from_prefix_tree(page_lists, last, np.ones(3, np.int64), page_size)
    wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(len(levels[0]), backend=backend)
    plans = wrapper.plan(*levels, Hq, Hkv, D, page_size, q_data_type=dtype)
    cache = (rand(rng, (8, page_size, Hkv, D), dtype), rand(rng, (8, page_size, Hkv, D), dtype))
    q = rand(rng, (3, Hq, D), dtype)
    o = jax.jit(jaxinfer.batch_cascade)(q, cache, plans)
    for b, (pages, n) in enumerate(zip(page_lists, last)):
        length = (len(pages) - 1) * page_size + n
        k, v = (f64(c)[pages].reshape(-1, Hkv, D)[:length] for c in cache)
        want, _ = ref_attention(f64(q[b : b + 1]), k, v)
        assert_close(o[b : b + 1], want, dtype)
