"""The plan() host path's shortcuts give what the plain forms give: the native planner's radix
sorts on large and extreme batches against the numpy oracle, array addresses read from the
array object, variants built once per set of options, frozen dataclasses filled in place."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import planner_ref

from jaxinfer import decode, wrapper
from jaxinfer.plan import native
from jaxinfer.plan.batch import BatchSpec, PlanCapacity, filled
from jaxinfer.plan.planner import plan_work
from jaxinfer.variants import AttentionVariant, make_variant

_DECODE = dict(num_kv_heads=8, group_size=4, block_m=16, block_n=64, causal=False, window_left=-1, num_ctas=396,
               split_budget=1584, max_work_tiles=2048, min_chunk=256)


def _assert_same_plan(got, want):
    for name in ("work", "cta_indptr", "merge_indptr", "merge_dest"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert (got.num_tiles, got.num_groups, got.chunk) == (want.num_tiles, want.num_groups, want.chunk)


@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize("lens", ["uniform", "random", "zipf"])
def test_split_decode_orders_match_the_oracle(rng, batch, lens):
    """B=16/64 decode plans split their keys into 1-2k tiles whose costs the radix sort orders
    (several passes for Zipf lengths): bit for bit the oracle's stable sort."""
    kv = {"uniform": np.full(batch, 4096), "random": rng.integers(0, 9000, batch),
          "zipf": np.clip(rng.zipf(1.5, batch) * 256, 16, 200_000)}[lens]
    qo_indptr = np.arange(batch + 1, dtype=np.int32)
    base = rng.integers(0, 1 << 20, batch)
    want = planner_ref.plan_work_ref(qo_indptr, kv, base, **_DECODE)
    assert want.chunk > 0, "a split plan"
    _assert_same_plan(plan_work(qo_indptr, kv, base, **_DECODE), want)


@pytest.mark.parametrize("causal", [True, False])
def test_kv_major_prefill_orders_match_the_oracle(rng, causal):
    """A prefill plan of a CTA per tile (~2k tiles, kv_major) on random lengths, bases in any
    order and shared by requests, against the oracle."""
    qo = rng.integers(0, 600, 16)
    kv = qo + rng.integers(0, 300, 16)
    qo_indptr = np.concatenate([[0], np.cumsum(qo)]).astype(np.int32)
    base = rng.permutation(np.repeat(rng.integers(0, 5000, 8), 2))
    kw = dict(num_kv_heads=8, group_size=4, block_m=128, block_n=64, causal=causal, window_left=-1, split_budget=2,
              max_work_tiles=4096, split_kv=False, kv_major=True)
    tiles = planner_ref.plan_work_ref(qo_indptr, kv, base, num_ctas=4096, **{**kw, "kv_major": False}).num_tiles
    want = planner_ref.plan_work_ref(qo_indptr, kv, base, num_ctas=tiles, **kw)
    _assert_same_plan(plan_work(qo_indptr, kv, base, num_ctas=tiles, **kw), want)


def test_orders_at_the_limits_of_their_keys(rng):
    """Keys over their whole range: kv_base from -2**31 to 2**31 - 1 (a (kv_base, head) key of 35
    bits), key ranges up to 2**31 - 1 and costs past 2**32 (five radix passes), many heads."""
    kv = np.array([2**31 - 1, 0, 5, 2**31 - 1, 2**20, 3, 2**31 - 1, 1], np.int64)
    qo = np.array([1, 3, 1, 2, 1, 1, 1, 2])
    qo_indptr = np.concatenate([[0], np.cumsum(qo)]).astype(np.int32)
    base = np.array([2**31 - 1, -2**31, 0, -2**31, 7, 2**31 - 1, -1, 7])
    kw = dict(num_kv_heads=5, group_size=3, block_m=3, block_n=16, causal=False, window_left=-1, split_budget=2,
              max_work_tiles=256, split_kv=False, row_cost=2**30)
    for kv_major in (False, True):
        args = dict(kw, num_ctas=256 if kv_major else 7, kv_major=kv_major)
        want = planner_ref.plan_work_ref(qo_indptr, kv, base, **args)
        _assert_same_plan(plan_work(qo_indptr, kv, base, **args), want)


def test_address_is_the_arrays_data_pointer():
    """Read from the array object for numpy arrays (views, empty, strided), from
    ``__array_interface__`` for anything else and where the offset is unknown."""
    assert native.array_data_offset() == object.__basicsize__
    a = np.arange(40, dtype=np.int64)
    arrays = (a, a[7:], a[::3], a.reshape(5, 8)[2], np.empty(0, np.int8), np.zeros((), np.float32))
    for x in arrays:
        assert native.address(x) == x.__array_interface__["data"][0]

    class Interface:  # anything with an array interface
        __array_interface__ = {"data": (12345, False), "shape": (1,), "typestr": "<i4", "version": 3}

    assert native.address(Interface()) == 12345
    sub = np.ma.masked_array([1, 2], dtype=np.int32)  # a subclass: its own __array_interface__
    assert native.address(sub) == sub.__array_interface__["data"][0]


def test_batch_checks_without_the_data_offset_use_numpy(monkeypatch):
    """An unknown offset (a Python whose objects numpy lays out otherwise): the numpy checks,
    same spec, same errors."""
    args = (np.arange(4), np.array([0, 2, 2, 5], np.int32), np.arange(6, dtype=np.int32), np.array([3, 0, 1], np.int32))
    kw = dict(page_size=4, num_qo_heads=4, num_kv_heads=2, head_dim=32, variant=AttentionVariant())
    fast = BatchSpec.create(*args, **kw)
    monkeypatch.setattr(native, "array_data_offset", lambda: None)
    slow = BatchSpec.create(*args, **kw)
    for name in ("qo_indptr", "kv_indptr", "kv_lens", "kv_last_page_len"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
    assert slow.native_addresses[1] == slow.kv_indptr.__array_interface__["data"][0]
    with pytest.raises(ValueError, match=r"kv_last_page_len\[1\] = 2"):
        BatchSpec.create(args[0], args[1], args[2], np.array([3, 2, 1], np.int32), **kw)


def test_plan_variant_is_make_variant():
    """The same variant as make_variant for each set of options, one object per set; 1, 1.0 and
    True are different options (make_variant rejects a bool window); a rejected option is
    rejected on every call; an unhashable option goes to make_variant."""
    options = dict(window_left=3, logits_soft_cap=30.0, sm_scale=0.1, pos_encoding_mode="ROPE_LLAMA",
                   rope_scale=None, rope_theta=5e5)
    got = wrapper.plan_variant(None, **options)
    assert got == make_variant(None, **options)
    assert wrapper.plan_variant(None, **options) is got
    assert wrapper.plan_variant(None, window_left=1).window_left == 1
    for _ in range(2):
        with pytest.raises(ValueError, match="window_left"):
            wrapper.plan_variant(None, window_left=True)
        with pytest.raises(ValueError, match="sm_scale"):
            wrapper.plan_variant(None, sm_scale=float("nan"))
    assert wrapper.plan_variant(None, sm_scale=np.array(0.5)) == make_variant(None, sm_scale=np.array(0.5))
    user = AttentionVariant(logits_transform=lambda x, *_: x)
    assert wrapper.plan_variant(user, window_left=4) == make_variant(user, window_left=4)


def test_filled_is_the_constructor():
    """``filled`` makes the object the dataclass constructor makes, given every field."""
    spec = BatchSpec.create(np.arange(3), np.array([0, 1, 3], np.int32), np.arange(3, dtype=np.int32),
                            np.array([2, 4], np.int32), page_size=4, num_qo_heads=2, num_kv_heads=1, head_dim=16,
                            variant=AttentionVariant())
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(BatchSpec)}
    built = BatchSpec(**fields)
    assert {k: v for k, v in spec.__dict__.items() if k in fields} == built.__dict__
    assert set(fields) <= set(spec.__dict__), "create() sets every field"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.page_size = 8
    plan = decode.BatchDecodeWithPagedKVCacheWrapper(backend="xla").plan(
        np.array([0, 1, 3], np.int32), np.arange(3, dtype=np.int32), np.array([2, 4], np.int32), 2, 1, 16, 4,
        q_data_type=jnp.float16)
    plan_fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(wrapper.Plan)}
    assert plan == wrapper.Plan(**plan_fields) and set(plan.__dict__) == set(plan_fields)
    assert plan.q_dtype == plan.kv_dtype == "float16"
    assert filled(PlanCapacity, max_batch_size=None, max_qo_len=None, max_kv_len=None, max_work_tiles=None,
                  fixed_split_size=None) == PlanCapacity()


def test_decode_query_pointer_is_shared_and_read_only():
    """The decode wrapper's one-query-per-request row pointer is made once per batch size and
    cannot be changed (a spec made from it holds its own copy)."""
    indptr = decode._one_query_each(5)
    assert indptr is decode._one_query_each(5) and not indptr.flags.writeable
    np.testing.assert_array_equal(indptr, np.arange(5))
    with pytest.raises(ValueError):
        indptr[0] = 1
