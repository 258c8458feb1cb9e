"""Host-side hardening (issue 16): every bad plan/pool input gets a ValueError naming the argument
(shared/DESIGN.md section 5) instead of being wrapped to int32, truncated, turned into NaN outputs
or reported under another argument's name.

Each test first checks that the call with the rule respected succeeds, so that the error really
comes from the rule under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import jaxinfer
from jaxinfer.nn.kv_pool import KVCachePool
from jaxinfer.plan.checks import check_int, check_page_table
from jaxinfer.variants import AttentionVariant

HQ, HKV, D, PAGE = 4, 2, 64, 4
WIDE_IDS = [
    np.array([2**32 + 3], np.int64),  # wrapped to page 3
    np.array([2**32 - 1], np.int64),  # wrapped to -1
    np.array([2**31], np.uint32),  # wrapped to INT32_MIN
    np.array([2**31], np.int64),
]


def _decode(indptr=(0, 1), indices=(3,), last=(4,), *geom, **kw):
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
    return w.plan(indptr, indices, last, *(geom or (HQ, HKV, D, PAGE)), **kw)


def _prefill(qo=(0, 2), indptr=(0, 1), indices=(3,), last=(4,), *geom, **kw):
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend="xla")
    return w.plan(qo, indptr, indices, last, *(geom or (HQ, HKV, D, PAGE)), **kw)


def _sparse(indptr=(0, 1, 2), indices=(0, 1), M=8, N=8, R=4, C=4, **kw):
    w = jaxinfer.BlockSparseAttentionWrapper(backend="xla")
    return w.plan(np.asarray(indptr), np.asarray(indices), M, N, R, C, HQ, HKV, D, **kw)


# --- 1. integer inputs must fit int32 (no silent wrap) and be integers ---------------------------


@pytest.mark.parametrize("ids", WIDE_IDS, ids=lambda a: f"{a.dtype}:{a[0]}")
def test_decode_page_ids_beyond_int32(ids):
    _decode([0, 1], ids - ids + 3, [4])
    with pytest.raises(ValueError, match="indices must fit int32") as e:
        _decode([0, 1], ids, [4])  # a list indptr: the numpy checks
    assert "kv_indices" not in str(e.value)  # the decode wrapper's own argument name
    with pytest.raises(ValueError, match="indices must fit int32"):
        _decode(np.array([0, 1]), ids, np.array([4]))  # int64 row pointer and lengths (native path)


@pytest.mark.parametrize("ids", WIDE_IDS, ids=lambda a: f"{a.dtype}:{a[0]}")
def test_prefill_page_ids_beyond_int32(ids):
    _prefill(np.array([0, 2]), np.array([0, 1]), ids - ids + 3, np.array([4]))
    with pytest.raises(ValueError, match="paged_kv_indices|kv_indices"):
        _prefill(np.array([0, 2]), np.array([0, 1]), ids, np.array([4]))


def test_unused_page_ids_beyond_int32_rejected_before_the_cast():
    # kv_indices may be longer than kv_indptr[-1]; its tail is cast to int32 too and must not wrap.
    check_page_table(np.array([0, 1]), np.array([3, 5]), np.array([4]), PAGE)
    with pytest.raises(ValueError, match="kv_indices must fit int32"):
        check_page_table(np.array([0, 1]), np.array([3, 2**40]), np.array([4]), PAGE)


def test_page_size_beyond_int32():
    # Before: an OverflowError from numpy, no argument named (and last_page_len 2**32+1 would wrap).
    with pytest.raises(ValueError, match="page_size"):
        _decode(np.array([0, 1]), np.array([3]), np.array([2**32 + 1]), HQ, HKV, D, 2**33)


@pytest.mark.parametrize("native", [True, False])
def test_request_longer_than_int32_tokens(native):
    """4096 pages of 2**20 tokens: 2**32 - 2**20 + 1 tokens in one request wrapped to a small kv_len."""
    page_size, pages = 2**20, 4096
    arr = np.array if native else (lambda a, dtype=None: np.asarray(a, dtype).tolist())
    indptr, indices, last = arr([0, pages]), arr(np.arange(pages), np.int32), arr([1])
    _decode(arr([0, 1]), arr([0], np.int32), arr([1]), HQ, HKV, D, page_size)
    with pytest.raises(ValueError, match=r"\bindptr: request 0 holds"):
        _decode(indptr, indices, last, HQ, HKV, D, page_size)
    with pytest.raises(ValueError, match="kv_indptr: request 0 holds"):
        _prefill(arr([0, 1]), indptr, indices, last, HQ, HKV, D, page_size)


@pytest.mark.parametrize("bad", [np.array([0.0, 1.0]), np.array([False, True])], ids=["float", "bool"])
def test_sparse_block_ids_must_be_integers(bad):
    _sparse(indices=np.array([0, 1]))
    with pytest.raises(ValueError, match="indices must be a 1-D integer array"):
        _sparse(indices=bad + np.array([0.7, 0]) if bad.dtype.kind == "f" else bad)
    with pytest.raises(ValueError, match="indptr"):
        _sparse(indptr=np.array([0, 1, 2], bad.dtype) if bad.dtype.kind == "f" else np.array([False, True, True]))


def test_sparse_block_ids_beyond_int32():
    with pytest.raises(ValueError, match="indices"):
        _sparse(indices=np.array([0, 2**32 + 1]))  # wrapped to column block 1 before


@pytest.mark.parametrize("name", ["M", "N", "R", "C"])
@pytest.mark.parametrize("value", [math.nan, 2.5, True], ids=["nan", "2.5", "bool"])
def test_sparse_shapes_must_be_integers(name, value):
    shapes = dict(M=8, N=8, R=4, C=4)
    with pytest.raises(ValueError, match=rf"^{name} must be an integer"):
        _sparse(**(shapes | {name: value}))


@pytest.mark.parametrize("which", ["indptr", "indices", "last_page_len"])
@pytest.mark.parametrize("dtype", [np.float64, np.bool_])
def test_decode_index_arrays_must_be_integers(which, dtype):
    args = dict(indptr=np.array([0, 1]), indices=np.array([1]), last_page_len=np.array([1]))
    _decode(*args.values())
    args[which] = args[which].astype(dtype)
    with pytest.raises(ValueError, match=rf"^{which} must"):
        _decode(*args.values())


# --- 2. options and geometry: finite numbers, integers, the right argument named -----------------


@pytest.mark.parametrize("name", ["logits_soft_cap", "sm_scale", "rope_scale", "rope_theta"])
@pytest.mark.parametrize("value", [math.inf, math.nan, -math.inf], ids=["inf", "nan", "-inf"])
def test_non_finite_float_options(name, value):
    AttentionVariant(**{name: 1.0})
    with pytest.raises(ValueError, match=name):
        AttentionVariant(**{name: value})
    with pytest.raises(ValueError, match=name):
        _decode(**{name: value})


@pytest.mark.parametrize("name", ["num_qo_heads", "num_kv_heads", "head_dim", "page_size"])
@pytest.mark.parametrize("value", [math.nan, 2.5, 4.0, True, np.float64(4)], ids=["nan", "2.5", "4.0", "bool", "np4.0"])
def test_geometry_must_be_integers(name, value):
    geom = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=PAGE)
    _decode([0, 1], [3], [4], *(geom | {name: np.int64(geom[name])}).values())  # numpy integers are fine
    with pytest.raises(ValueError, match=rf"^{name} must be an integer"):
        _decode([0, 1], [3], [4], *(geom | {name: value}).values())
    with pytest.raises(ValueError, match=rf"^{name} must be an integer"):
        _prefill([0, 2], [0, 1], [3], [4], *(geom | {name: value}).values())


@pytest.mark.parametrize("value", [math.nan, 2.5, True], ids=["nan", "2.5", "bool"])
def test_window_left_must_be_an_integer(value):
    _decode(window_left=np.int32(3))
    with pytest.raises(ValueError, match="window_left"):
        _decode(window_left=value)


def test_wrong_length_last_page_len_is_named():
    with pytest.raises(ValueError, match="^last_page_len has 2 entries"):
        _decode([0, 1], [3], [4, 4])
    with pytest.raises(ValueError, match="^paged_kv_last_page_len has 2 entries"):
        _prefill([0, 2], [0, 1], [3], [4, 4])
    with pytest.raises(ValueError, match="^paged_kv_last_page_len has 2 entries"):
        _prefill(np.array([0, 2]), np.array([0, 1]), np.array([3]), np.array([4, 4]))


def test_paged_prefill_without_page_ids():
    _prefill()
    with pytest.raises(ValueError, match="paged_kv_indices"):
        _prefill([0, 2], [0, 1], None, [4])
    with pytest.raises(ValueError, match="paged_kv_last_page_len"):
        _prefill([0, 2], [0, 1], [3], None)


# --- 3. the KV-cache pool's counts and lengths ---------------------------------------------------


@pytest.mark.parametrize("value", [2.5, 2.0, True, np.float64(2), math.nan, "2"], ids=repr)
def test_pool_extend_needs_an_integer(value):
    pool = KVCachePool(8, 4, 1, 1, 4)
    pool.add("a")
    pool.extend("a", np.int64(2))
    assert type(pool.seq_len("a")) is int and pool.seq_len("a") == 2
    with pytest.raises(ValueError, match="num_tokens"):
        pool.extend("a", value)
    assert pool.seq_len("a") == 2 and len(pool.pages("a")) == 1
    with pytest.raises(ValueError, match="num_tokens"):
        pool.pages_for(value)


@pytest.mark.parametrize("name", ["num_pages", "page_size", "num_layers", "num_kv_heads", "head_dim"])
@pytest.mark.parametrize("value", [math.nan, 2.5, 4.0, True], ids=["nan", "2.5", "4.0", "bool"])
def test_pool_sizes_must_be_integers(name, value):
    sizes = dict(num_pages=4, page_size=2, num_layers=1, num_kv_heads=1, head_dim=4)
    KVCachePool(**(sizes | {name: np.int64(sizes[name])}))
    with pytest.raises(ValueError, match=name):
        KVCachePool(**(sizes | {name: value}))


def test_check_int():
    assert check_int("x", np.int64(3)) == 3 and type(check_int("x", np.uint8(3))) is int
    for bad in (True, np.bool_(False), 3.0, math.nan, "3", None):
        with pytest.raises(ValueError, match="^x must be an integer"):
            check_int("x", bad)
    with pytest.raises(ValueError, match=r"^x must be an integer in 1\.\.2147483647, got 0"):
        check_int("x", 0, minimum=1)
    with pytest.raises(ValueError, match="^x must be an integer"):
        check_int("x", 2**31)


@pytest.mark.parametrize(
    "page_lists,last,qo_lens,page_size,what",
    [
        ([[0, 2**32 + 3]], [4], [1], 4, "page_lists"),  # would wrap to page 3
        ([[0, -1]], [4], [1], 4, "page_lists"),
        ([[0, 1.0]], [4], [1], 4, "page_lists"),
        ([[0, 1]], [5], [1], 4, "kv_last_page_len"),
        ([[0, 1]], [4], [-1], 4, "qo_lens"),
        ([[0, 1]], [4], [1], 0, "page_size"),
    ],
)
def test_cascade_levels_from_prefix_tree_checks_before_the_int32_cast(page_lists, last, qo_lens, page_size, what):
    assert len(jaxinfer.cascade_levels_from_prefix_tree([[0, 1], [0, 2]], [4, 4], [1, 1], 4)[0]) == 2
    with pytest.raises(ValueError, match=what):
        jaxinfer.cascade_levels_from_prefix_tree(page_lists, last, qo_lens, page_size)
