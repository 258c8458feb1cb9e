"""Bad input gets a ValueError naming the argument (shared/DESIGN.md section 5), one test per rule.

Each test first checks that the same call with the rule respected succeeds, so that the error
really comes from the rule under test.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, indptr_of, make_paged_kv, rand

BF16, FP16 = jnp.bfloat16, jnp.float16
HQ, HKV, D, PAGE = 8, 2, 64, 4


@pytest.fixture
def batch(rng):
    """A valid three-request paged batch: (paged KV, qo_indptr)."""
    return make_paged_kv(rng, [5, 9, 1], PAGE, HKV, D, BF16), indptr_of([2, 3, 1])


def _plan(kind, paged, qo_indptr, backend="xla", *, kv_indptr=None, kv_indices=None, last=None, **kw):
    """Plan ``kind`` ("decode" or "prefill") with the batch's page table, some entries replaced."""
    table = (
        paged.kv_indptr if kv_indptr is None else np.asarray(kv_indptr),
        paged.kv_indices if kv_indices is None else np.asarray(kv_indices),
        paged.kv_last_page_len if last is None else np.asarray(last),
    )
    geom = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=PAGE)
    geom.update({k: kw.pop(k) for k in list(kw) if k in geom})
    if kind == "decode":
        w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
        w.plan(*table, *geom.values(), q_data_type=BF16, **kw)
    else:
        w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
        w.plan(qo_indptr, *table, *geom.values(), q_data_type=BF16, **kw)
    return w


def _q(rng, kind, qo_indptr, heads=HQ, dim=D, dtype=BF16):
    rows = 3 if kind == "decode" else int(qo_indptr[-1])
    return rand(rng, (rows, heads, dim), dtype)


KINDS = ["decode", "prefill"]


@pytest.mark.parametrize("kind", KINDS)
def test_q_shape_mismatch(rng, batch, kind):
    paged, qo_indptr = batch
    w = _plan(kind, paged, qo_indptr)
    w.run(_q(rng, kind, qo_indptr), paged.cache)
    with pytest.raises(ValueError, match=r"\bq\b"):
        w.run(_q(rng, kind, qo_indptr, dim=2 * D), paged.cache)
    with pytest.raises(ValueError, match=r"\bq\b"):
        w.run(_q(rng, kind, qo_indptr, heads=HQ // 2), paged.cache)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_shape_mismatch(rng, batch, kind):
    paged, qo_indptr = batch
    w = _plan(kind, paged, qo_indptr)
    k, v = paged.cache
    with pytest.raises(ValueError, match="paged_kv_cache"):
        w.run(_q(rng, kind, qo_indptr), (k, v[:, :, :1]))
    with pytest.raises(ValueError, match="paged_kv_cache"):
        w.run(_q(rng, kind, qo_indptr), (k[..., :32], v[..., :32]))


def test_single_kv_shape_mismatch(rng):
    q, k = rand(rng, (HQ, D), BF16), rand(rng, (10, HKV, D), BF16)
    jaxinfer.single_decode_with_kv_cache(q, k, k, backend="xla")
    with pytest.raises(ValueError, match=r"\bk\b"):
        jaxinfer.single_decode_with_kv_cache(q, k, k[:9], backend="xla")
    with pytest.raises(ValueError, match=r"\bq\b|head_dim"):
        jaxinfer.single_prefill_with_kv_cache(rand(rng, (3, HQ, 32), BF16), k, k, backend="xla")


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_mismatch(rng, batch, kind):
    paged, qo_indptr = batch
    w = _plan(kind, paged, qo_indptr)
    with pytest.raises(ValueError, match=r"\bq\b.*dtype|q_data_type"):
        w.run(_q(rng, kind, qo_indptr, dtype=FP16), paged.cache)
    k, v = paged.cache
    with pytest.raises(ValueError, match="kv_data_type|paged_kv_cache|dtype"):
        w.run(_q(rng, kind, qo_indptr), (k.astype(FP16), v.astype(FP16)))


@pytest.mark.parametrize("kind", KINDS)
def test_heads_not_divisible(batch, kind):
    with pytest.raises(ValueError, match="num_qo_heads"):
        _plan(kind, *batch, num_qo_heads=6, num_kv_heads=4)


@pytest.mark.parametrize("kind", KINDS)
def test_unsorted_kv_indptr(batch, kind):
    paged, qo_indptr = batch
    bad = paged.kv_indptr.copy()
    bad[1], bad[2] = bad[2], bad[1]
    with pytest.raises(ValueError, match="indptr"):
        _plan(kind, paged, qo_indptr, kv_indptr=bad)


def test_unsorted_qo_indptr(batch):
    paged, _ = batch
    with pytest.raises(ValueError, match="qo_indptr"):
        _plan("prefill", paged, np.array([0, 3, 2, 6]))


@pytest.mark.parametrize("kind", KINDS)
def test_indptr_not_starting_at_zero(batch, kind):
    paged, qo_indptr = batch
    with pytest.raises(ValueError, match="indptr"):
        _plan(kind, paged, qo_indptr, kv_indptr=paged.kv_indptr + 1)
    if kind == "prefill":
        with pytest.raises(ValueError, match="qo_indptr"):
            _plan(kind, paged, qo_indptr + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_indptr_beyond_indices(batch, kind):
    paged, qo_indptr = batch
    bad = paged.kv_indptr.copy()
    bad[-1] += 1
    with pytest.raises(ValueError, match="indices|indptr"):
        _plan(kind, paged, qo_indptr, kv_indptr=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_page_index_outside_cache(rng, batch, kind):
    paged, qo_indptr = batch
    num_pages = paged.cache[0].shape[0]
    bad = paged.kv_indices.copy()
    bad[0] = num_pages
    w = _plan(kind, paged, qo_indptr, kv_indices=bad)  # the cache size is known only at run
    with pytest.raises(ValueError, match="kv_indices|indices"):
        w.run(_q(rng, kind, qo_indptr), paged.cache)


@pytest.mark.parametrize("kind", KINDS)
def test_negative_page_index(batch, kind):
    paged, qo_indptr = batch
    bad = paged.kv_indices.copy()
    bad[-1] = -1
    with pytest.raises(ValueError, match="indices"):
        _plan(kind, paged, qo_indptr, kv_indices=bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [0, PAGE + 1, -1])
def test_last_page_len_out_of_range(batch, kind, value):
    paged, qo_indptr = batch
    bad = paged.kv_last_page_len.copy()
    bad[1] = value  # request 1 has pages, so 0 is out of range too
    with pytest.raises(ValueError, match="last_page_len"):
        _plan(kind, paged, qo_indptr, last=bad)


@pytest.mark.skipif(importlib.util.find_spec("jaxinfer.backends.pallas.backend") is None, reason="no Pallas backend yet")
def test_unsupported_head_dim_on_named_backend(batch):
    """A head_dim that a kernel backend does not serve (40: not a power of 2, not in FlashInfer's
    set) raises NotImplementedError naming head_dim when that backend is asked for by name."""
    paged, qo_indptr = batch
    with pytest.raises(NotImplementedError, match="head_dim"):
        _plan("prefill", paged, qo_indptr, backend="pallas", head_dim=40)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_backend(kind):
    cls = {"decode": jaxinfer.BatchDecodeWithPagedKVCacheWrapper, "prefill": jaxinfer.BatchPrefillWithPagedKVCacheWrapper}
    with pytest.raises(ValueError, match="backend"):
        cls[kind](backend="cudnn-magic")


def test_unknown_backend_single(rng):
    q, k = rand(rng, (HQ, D), BF16), rand(rng, (10, HKV, D), BF16)
    with pytest.raises(ValueError, match="backend"):
        jaxinfer.single_decode_with_kv_cache(q, k, k, backend="cudnn-magic")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_pos_encoding_mode(batch, kind):
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        _plan(kind, *batch, pos_encoding_mode="ROPE")


@pytest.mark.parametrize("kind", KINDS)
def test_window_left_below_minus_one(batch, kind):
    with pytest.raises(ValueError, match="window_left"):
        _plan(kind, *batch, window_left=-2)


def test_single_options_validated(rng):
    q, k = rand(rng, (HQ, D), BF16), rand(rng, (10, HKV, D), BF16)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        jaxinfer.single_decode_with_kv_cache(q, k, k, pos_encoding_mode="alibi", backend="xla")
    with pytest.raises(ValueError, match="window_left"):
        jaxinfer.single_prefill_with_kv_cache(q[None], k, k, window_left=-3, backend="xla")


def test_bad_kv_layout():
    with pytest.raises(ValueError, match="kv_layout"):
        jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NDH")


def test_custom_mask_wrong_size(batch):
    paged, qo_indptr = batch
    good = np.ones(int((np.diff(qo_indptr) * np.array([5, 9, 1])).sum()), dtype=bool)
    _plan("prefill", paged, qo_indptr, custom_mask=good)
    with pytest.raises(ValueError, match="custom_mask"):
        _plan("prefill", paged, qo_indptr, custom_mask=good[:-1])


def test_qo_indptr_batch_size_mismatch(batch):
    paged, _ = batch
    with pytest.raises(ValueError, match="qo_indptr"):
        _plan("prefill", paged, np.array([0, 2, 4]))


def test_block_sparse_bad_shapes():
    w = jaxinfer.BlockSparseAttentionWrapper(backend=BACKENDS[0])
    indptr, indices = np.array([0, 1, 2]), np.array([0, 1])
    w.plan(indptr, indices, 8, 8, 4, 4, HQ, HKV, D)
    with pytest.raises(ValueError, match=r"\bN\b"):
        w.plan(indptr, indices, 8, 10, 4, 4, HQ, HKV, D)
    with pytest.raises(ValueError, match="indices"):
        w.plan(indptr, np.array([0, 2]), 8, 8, 4, 4, HQ, HKV, D)
    with pytest.raises(ValueError, match="indptr"):
        w.plan(np.array([0, 1, 2, 2]), indices, 8, 8, 4, 4, HQ, HKV, D)


def test_merge_state_shape_mismatch(rng):
    v, s = rand(rng, (5, 4, 8), jnp.float32), rand(rng, (5, 4), jnp.float32)
    with pytest.raises(ValueError, match="s_a|v_a|merge_state"):
        jaxinfer.merge_state(v, s, v[:, :2], s[:, :2])
    with pytest.raises(ValueError, match=r"\bs\b|merge_states"):
        jaxinfer.merge_states(v[:, None], s)
