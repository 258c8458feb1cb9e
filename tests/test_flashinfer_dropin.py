"""FlashInfer calls that used to be silently accepted (or wrongly rejected) now behave as
documented: each silent trap of the drop-in audit raises a ValueError naming the user's argument,
and FlashInfer's signatures (workspace buffer first, its keywords and defaults) are accepted."""

from __future__ import annotations

import inspect
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import assert_close, rand
from ref64 import gather_paged_kv, ref_batch

HQ, HKV, D, PAGE = 4, 2, 16, 4
WS = jnp.zeros(16, jnp.uint8)


def _decode_setup(rng, dtype=jnp.float16):
    indptr = np.array([0, 2, 3], np.int32)
    indices = np.array([0, 2, 1], np.int32)
    last = np.array([3, 2], np.int32)
    cache = rand(rng, (4, 2, PAGE, HKV, D), dtype)
    return indptr, indices, last, cache


@pytest.mark.parametrize("cls", [jaxinfer.BatchDecodeWithPagedKVCacheWrapper,
                                 jaxinfer.BatchPrefillWithPagedKVCacheWrapper,
                                 jaxinfer.BatchPrefillWithRaggedKVCacheWrapper])
def test_kv_layout_in_workspace_position_raises(cls):
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        cls("NHD")


def test_flashinfer_constructor_flags_accepted():
    jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS, "HND", use_cuda_graph=True, use_tensor_cores=True)
    jaxinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", True)
    jaxinfer.MultiLevelCascadeAttentionWrapper(2, WS, "NHD")
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        jaxinfer.BlockSparseAttentionWrapper("xla")


def test_q_rows_beyond_plan_raise(rng):
    indptr, indices, last, cache = _decode_setup(rng)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS, "NHD")
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE)
    with pytest.raises(ValueError, match="q has 3 rows but the plan has nnz_q = 2"):
        w.run(rand(rng, (3, HQ, D), jnp.float16), cache)
    # The documented padding rule: the module-level run function pads (rows past B are zeros).
    plan = w.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type="float16")
    q = rand(rng, (3, HQ, D), jnp.float16)
    o = jaxinfer.batch_decode(q, cache, plan)
    k_list, v_list = gather_paged_kv(cache[:, 0], cache[:, 1], indptr, indices, last)
    want, _ = ref_batch(q[:2], k_list, v_list, np.arange(3))
    assert_close(o[:2], want, jnp.float16)
    assert not np.asarray(o[2]).any()


def test_single_decode_dtype_mismatch_raises(rng):
    q = rand(rng, (HQ, D), jnp.float32)
    k = v = rand(rng, (5, HKV, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="k and v must have q's dtype float32"):
        jaxinfer.single_decode_with_kv_cache(q, k, v)


def test_last_page_len_length_is_named(rng):
    indptr, indices, _, _ = _decode_setup(rng)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS)
    with pytest.raises(ValueError, match=r"^last_page_len has 3 entries and indptr 3"):
        w.plan(indptr, indices, np.array([3, 2, 1], np.int32), HQ, HKV, D, PAGE)


def test_decode_errors_name_decode_arguments(rng):
    _, indices, last, _ = _decode_setup(rng)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS)
    with pytest.raises(ValueError) as err:
        w.plan(np.array([0, 3, 2], np.int32), indices, last, HQ, HKV, D, PAGE)
    assert "indptr" in str(err.value) and "kv_indptr" not in str(err.value)


@pytest.mark.parametrize("name", ["out", "lse"])
def test_out_and_lse_buffers_raise(rng, name):
    indptr, indices, last, cache = _decode_setup(rng)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS)
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE)
    q = rand(rng, (2, HQ, D), jnp.float16)
    with pytest.raises(ValueError, match=f"{name}= cannot be written in place.*return value"):
        w.run(q, cache, **{name: jnp.zeros_like(q)})


def test_q_data_type_inferred_at_run_and_explicit_dtype_checked(rng):
    indptr, indices, last, cache = _decode_setup(rng, jnp.bfloat16)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS)
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE)  # no q_data_type: taken from run's q
    o16 = w.run(rand(rng, (2, HQ, D), jnp.float16), cache.astype(jnp.float16))
    o_bf = w.run(rand(rng, (2, HQ, D), jnp.bfloat16), cache)
    assert (o16.dtype, o_bf.dtype) == (jnp.float16, jnp.bfloat16)
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type="float16")
    with pytest.raises(ValueError, match="q_data_type float16"):
        w.run(rand(rng, (2, HQ, D), jnp.bfloat16), cache)


def test_unsupported_plan_arguments_raise():
    qo = np.array([0, 2], np.int32)
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(WS)
    with pytest.raises(ValueError, match="head_dim_vo"):
        w.plan(qo, qo, HQ, HKV, D, 2 * D)
    with pytest.raises(ValueError, match="packed_custom_mask has 2 bytes"):  # 2 x 2 keys: 1 byte
        w.plan(qo, qo, HQ, HKV, D, packed_custom_mask=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="data_type"):
        jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS).plan(
            np.array([0, 1]), np.array([0]), np.array([1]), HQ, HKV, D, PAGE, q_data_type="float16",
            data_type="float16")


def test_inplace_names_return_new_arrays(rng):
    q = rand(rng, (3, HQ, D), jnp.float16)
    k = rand(rng, (3, HKV, D), jnp.float16)
    indptr, offsets = jnp.array([0, 3]), jnp.array([5])
    q2, k2 = jaxinfer.apply_rope_inplace(q, k, indptr, offsets)
    want_q, want_k = jaxinfer.apply_rope(q, k, indptr, offsets)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(want_q))
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(want_k))
    assert not np.array_equal(np.asarray(q2), np.asarray(q))
    for fn in (jaxinfer.apply_rope_inplace, jaxinfer.apply_rope_pos_ids_inplace, jaxinfer.apply_llama31_rope_inplace,
               jaxinfer.apply_llama31_rope_pos_ids_inplace, jaxinfer.apply_rope_with_cos_sin_cache_inplace,
               jaxinfer.merge_state_in_place, jaxinfer.append_paged_kv_cache):
        assert "RETURNS" in fn.__doc__ and "NOT modified" in fn.__doc__, fn.__name__


def test_every_public_name_has_its_own_docstring():
    owned = {"wrapper", "decode", "prefill", "cascade", "sparse", "page", "rope", "variants", "fp8"}
    for name in jaxinfer.__all__:
        obj = getattr(jaxinfer, name)
        if inspect.ismodule(obj) or not obj.__module__.split(".")[-1] in owned:
            continue
        assert obj.__doc__ and "DESIGN.md" not in obj.__doc__, name
        if inspect.isclass(obj) and "__init__" in vars(obj):
            doc = obj.__init__.__doc__
            assert doc and "Initialize self" not in doc and "DESIGN.md" not in doc, name
    root = pathlib.Path(jaxinfer.__file__).parent
    for mod in owned:
        assert "DESIGN.md" not in (root / f"{mod}.py").read_text(), mod


def test_explicit_kv_data_type_kept_when_q_inferred(rng):
    indptr, indices, last, cache = _decode_setup(rng, jnp.float16)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(WS)
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE, kv_data_type="float16")
    assert w.run(rand(rng, (2, HQ, D), jnp.float16), cache).dtype == jnp.float16
    with pytest.raises(ValueError, match="kv_data_type float16"):
        w.run(rand(rng, (2, HQ, D), jnp.bfloat16), cache.astype(jnp.bfloat16))
