"""Batch invariance (issue 23, item 3): with a fixed split size (``PlanCapacity.fixed_split_size``,
FlashInfer's ``fixed_split_size``) a request's split points, merge order and output bits do not
depend on the batch it is planned in.

The split points are checked on the planner (fast, any machine); the output bits on the Pallas
backend, in interpret mode on the CPU and on the GPU (``@pytest.mark.gpu``), over 20 random batch
compositions around one request long enough to be split into several chunks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ref64 import random_page_table

from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.plan.batch import DETERMINISTIC_QO_LEN, DETERMINISTIC_SPLIT_SIZE, BatchSpec, PlanCapacity
from jaxinfer.plan.layout import F
from jaxinfer.plan.planner import count_work, plan_work
from jaxinfer.variants import AttentionVariant

COMPOSITIONS = 20


def _batch_around(rng, target_qo: int, target_kv: int, max_others: int, max_qo: int, max_kv: int):
    """A random batch holding the target request at a random position: ``(qo_lens, kv_lens, b)``."""
    others = int(rng.integers(0, max_others + 1))
    qo = rng.integers(1, max_qo + 1, others)
    kv = np.maximum(qo, rng.integers(1, max_kv + 1, others))
    b = int(rng.integers(0, others + 1))
    return np.insert(qo, b, target_qo), np.insert(kv, b, target_kv), b


def _request_tiles(work: np.ndarray, num_tiles: int, q_row0: int, q_rows: int) -> list[tuple]:
    """The tiles of the request whose queries are rows ``q_row0 : q_row0 + q_rows``, relative to
    its first row, with whether each is split, in a canonical order."""
    rows = work[:num_tiles]
    mine = rows[(rows[:, F["q_row0"]] >= q_row0) & (rows[:, F["q_row0"]] < q_row0 + q_rows)]
    fields = [F[n] for n in ("kv_head", "q_len", "q_pos0", "kv_lo", "kv_hi")]
    return sorted((int(t[F["q_row0"]]) - q_row0, *map(int, t[fields]), bool(t[F["out_slot"]] >= 0)) for t in mine)


PLAN_KW = dict(num_kv_heads=8, group_size=4, block_m=16, block_n=64, causal=True, window_left=-1, num_ctas=132,
               max_work_tiles=1 << 17, min_chunk=256)


@pytest.mark.parametrize("target_qo", [1, 37])
def test_split_points_do_not_depend_on_the_batch(rng, target_qo):
    """A request's tiles (key ranges, split or not) are the same in 20 random batches with a fixed
    chunk; without one they follow the batch (alone it is split finer than beside 100 others)."""
    target_kv, chunk = 5000, 1024

    def target_tiles(qo, kv, b, fixed_chunk, split_budget):
        qo_indptr = np.concatenate([[0], np.cumsum(qo)])
        wb = plan_work(qo_indptr, kv, np.arange(qo.size), fixed_chunk=fixed_chunk, split_budget=split_budget, **PLAN_KW)
        return wb, tuple(_request_tiles(wb.work, wb.num_tiles, int(qo_indptr[b]), target_qo))

    seen = set()
    for _ in range(COMPOSITIONS):
        wb, tiles = target_tiles(*_batch_around(rng, target_qo, target_kv, 40, 64, 9000), chunk, 1 << 17)
        assert wb.chunk == chunk
        # Its split tiles start at multiples of the chunk.
        assert all(lo % chunk == 0 for *_, lo, _hi, split in tiles if split)
        seen.add(tiles)
    (tiles,) = seen
    assert any(split for *_, split in tiles), "the target request must be split"
    alone = target_tiles(np.array([target_qo]), np.array([target_kv]), 0, 0, 528)[1]
    crowded = target_tiles(np.full(101, target_qo), np.full(101, target_kv), 50, 0, 528)[1]
    assert alone != crowded


def test_merge_order_is_key_order(rng):
    """Each merge group's partial slots are its chunks in ascending key order, in every batch (the
    merge kernel folds slots in index order)."""
    for _ in range(5):
        qo, kv, _ = _batch_around(rng, 1, 3000, 20, 1, 6000)
        qo_indptr = np.concatenate([[0], np.cumsum(qo)])
        wb = plan_work(qo_indptr, kv, np.arange(qo.size), fixed_chunk=512, split_budget=1 << 14, **PLAN_KW)
        slot_lo = {}
        for t in wb.work[: wb.num_tiles]:
            if t[F["out_slot"]] >= 0:
                slot_lo[int(t[F["out_slot"]])] = int(t[F["kv_lo"]])
        for g in range(wb.num_groups):
            los = [slot_lo[s] for s in range(wb.merge_indptr[g], wb.merge_indptr[g + 1])]
            assert los == sorted(los) and los[0] == 0 and len(los) > 1


def test_count_work_matches_the_plan(rng):
    qo, kv, _ = _batch_around(rng, 9, 4000, 30, 40, 8000)
    qo_indptr = np.concatenate([[0], np.cumsum(qo)])
    for fixed_chunk, budget in ((300, 1 << 16), (0, 264)):
        kw = dict(PLAN_KW, fixed_chunk=fixed_chunk, split_budget=budget, max_work_tiles=1 << 16)
        counts = count_work(qo_indptr, kv, **kw)
        wb = plan_work(qo_indptr, kv, np.zeros(qo.size), **kw)
        slots = int((wb.work[: wb.num_tiles, F["out_slot"]] >= 0).sum())
        assert (counts.num_tiles, counts.num_slots, counts.num_groups, counts.chunk) == (
            wb.num_tiles, slots, wb.num_groups, wb.chunk)


def test_fixed_chunk_capacity_and_argument_errors():
    qo_indptr, kv = np.arange(5), np.full(4, 4096)
    with pytest.raises(ValueError, match="split_budget=64 partial slots is less than the plan's 128"):
        plan_work(qo_indptr, kv, np.zeros(4), fixed_chunk=1024, split_budget=64, **PLAN_KW)
    with pytest.raises(ValueError, match="fixed_chunk=1024 splits every request: it needs split_kv"):
        plan_work(qo_indptr, kv, np.zeros(4), fixed_chunk=1024, split_budget=64, **{**PLAN_KW, "split_kv": False})
    with pytest.raises(ValueError, match="fixed_chunk"):
        plan_work(qo_indptr, kv, np.zeros(4), fixed_chunk=-1, split_budget=64, **PLAN_KW)


def test_plan_capacity_fixed_split_size():
    assert not PlanCapacity().deterministic
    cap = PlanCapacity(max_batch_size=8).as_deterministic()
    assert cap.deterministic and cap.fixed_split_size == DETERMINISTIC_SPLIT_SIZE and cap.max_batch_size == 8
    assert cap.as_deterministic(512).fixed_split_size == 512
    assert PlanCapacity(fixed_split_size=np.int64(64)).as_deterministic().fixed_split_size == 64
    for bad in (0, -5, 1.5, True, "64"):
        with pytest.raises(ValueError, match="fixed_split_size"):
            PlanCapacity(fixed_split_size=bad)
        with pytest.raises(ValueError, match="fixed_split_size"):
            PlanCapacity().as_deterministic(bad)


def test_config_qo_len_does_not_follow_the_batch():
    """The tile config's query lengths: the batch's mean and median by default, fixed when
    deterministic or when max_qo_len is set."""
    spec = BatchSpec.create(np.array([0, 1, 101]), np.array([0, 200, 300]), None, None, page_size=1,
                            num_qo_heads=4, num_kv_heads=2, head_dim=32, variant=AttentionVariant())
    assert PlanCapacity().config_qo_len(spec) == 50.5
    assert PlanCapacity().as_deterministic().config_qo_len(spec) == DETERMINISTIC_QO_LEN
    assert PlanCapacity(max_qo_len=1).as_deterministic().config_qo_len(spec) == 1.0
    assert PlanCapacity().config_median_qo_len(spec) == 50.5
    assert PlanCapacity().as_deterministic().config_median_qo_len(spec) == DETERMINISTIC_QO_LEN
    assert PlanCapacity(max_qo_len=7).config_median_qo_len(spec) == 7.0
    mixed = BatchSpec.create(np.array([0, 0, 9, 10, 11]), np.array([0, 5, 20, 30, 40]), None, None, page_size=1,
                             num_qo_heads=4, num_kv_heads=2, head_dim=32, variant=AttentionVariant())
    assert PlanCapacity().config_median_qo_len(mixed) == 1.0  # the empty request is not counted


# --- Output bits on the Pallas backend -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """Geometry of the output-bit tests and the random batches around the target request."""

    num_qo_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    page_size: int = 4
    max_others: int = 5  # other requests of a batch
    max_qo: int = 1  # their queries (1: a decode batch)
    max_kv: int = 160  # their keys


# Interpret mode runs the grid's programs one after another: a small grid keeps the tests fast.
SMALL_GRID = PallasBackend(num_sms=2)


def _outputs_across_batches(rng, setup: Setup, backend: PallasBackend, *, target_qo: int, target_kv: int,
                            capacity: PlanCapacity, causal: bool = False, compositions: int = COMPOSITIONS):
    """Plan and run ``compositions`` random batches around one target request whose queries and
    KV are fixed (the other requests, the target's position and the page ids are random) and
    check that every plan splits the target and that its output and lse bits never change
    (without a fixed split size they do: the chunk then follows the batch)."""
    hq, hkv, d, page = setup.num_qo_heads, setup.num_kv_heads, setup.head_dim, setup.page_size
    key = jax.random.key(int(rng.integers(2**31)))
    q_target = jax.random.normal(jax.random.fold_in(key, 1 << 20), (target_qo, hq, d), jnp.bfloat16)
    kv_target = jax.random.normal(jax.random.fold_in(key, 1 << 21), (target_kv, 2, hkv, d), jnp.bfloat16)
    # Fixed q rows and cache pages (the plan's rows and page ids are a prefix): with a fixed
    # capacity every batch runs one compiled program.
    q_rows = (setup.max_others + 1) * max(setup.max_qo, target_qo)
    cache_pages = (setup.max_others + 1) * -(-max(setup.max_kv, target_kv) // page) + 3
    run = jax.jit(lambda plan, q, k, v: backend.run(plan, q, k, v, return_lse=True))
    outs, split = [], []
    for i in range(compositions):
        qo, kv, b = _batch_around(rng, target_qo, target_kv, setup.max_others, setup.max_qo, setup.max_kv)
        # One batch with a capacity of its own shapes: another compiled program, the same bits.
        own = i == compositions // 2
        cap = dataclasses.replace(capacity, max_batch_size=None, max_kv_len=None, max_work_tiles=None) if own else capacity
        indptr, indices, last, _ = random_page_table(rng, kv, page)
        kq, kc = jax.random.split(jax.random.fold_in(key, i))
        tok = np.arange(target_kv)
        cache = jax.random.normal(kc, (cache_pages, 2, page, hkv, d), jnp.bfloat16)
        cache = cache.at[indices[indptr[b] + tok // page], :, tok % page].set(kv_target)
        qo_indptr = np.concatenate([[0], np.cumsum(qo)]).astype(np.int32)
        rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
        q = jax.random.normal(kq, (q_rows, hq, d), jnp.bfloat16).at[rows].set(q_target)
        spec = BatchSpec.create(qo_indptr, indptr, indices, last, page_size=page, num_qo_heads=hq, num_kv_heads=hkv,
                                head_dim=d, variant=AttentionVariant(causal=causal))
        plan = backend.plan(spec, cap)
        o, lse = run(plan, q, cache[:, 0], cache[:, 1])
        outs.append((np.asarray(o)[rows].view(np.uint16), np.asarray(lse)[rows].view(np.uint32)))
        work = plan.unpack()["work"]
        mine = (work[:, F["valid"]] == 1) & (work[:, F["q_row0"]] >= qo_indptr[b]) & (work[:, F["q_row0"]] < qo_indptr[b + 1])
        split.append(bool((work[mine, F["out_slot"]] >= 0).any()))
    assert all(split), "every plan must split the target request (a split-KV forcing setup)"
    for i, (o, lse) in enumerate(outs[1:], 1):
        assert np.array_equal(o, outs[0][0]), f"batch composition {i} changed the target request's output bits"
        assert np.array_equal(lse, outs[0][1]), f"batch composition {i} changed the target request's lse bits"


def test_decode_output_bits_do_not_depend_on_the_batch(rng):
    """Decode (one query over 150 keys, chunks of 32) in 20 random batches: the same bits."""
    cap = PlanCapacity(max_batch_size=8, max_qo_len=1, max_kv_len=256, max_work_tiles=256).as_deterministic(32)
    _outputs_across_batches(rng, Setup(), SMALL_GRID, target_qo=1, target_kv=150, capacity=cap)


def test_prefill_output_bits_do_not_depend_on_the_batch(rng):
    """Causal prefill of 9 queries over 150 keys beside random prefill and decode requests in 20
    random batches: the same bits."""
    cap = PlanCapacity(max_batch_size=8, max_kv_len=256, max_work_tiles=256).as_deterministic(32)
    _outputs_across_batches(rng, Setup(max_qo=12), SMALL_GRID, target_qo=9, target_kv=150, capacity=cap, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("max_qo", [1, 64])
def test_gpu_output_bits_do_not_depend_on_the_batch(rng, max_qo):
    """On the GPU at the benchmark's geometry (Hq=32, Hkv=8, D=128, page 16): a 5000-token
    request split at the default size, in 20 random batches of up to 256 decode requests (or
    64 requests of up to 64 queries, the target a causal prefill of 17) of up to 4096 keys."""
    setup = Setup(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, max_others=255 if max_qo == 1 else 63,
                  max_qo=max_qo, max_kv=4096)
    cap = PlanCapacity(max_qo_len=1 if max_qo == 1 else None).as_deterministic()
    _outputs_across_batches(rng, setup, PallasBackend(), target_qo=1 if max_qo == 1 else 17, target_kv=5000, capacity=cap,
                            causal=max_qo > 1)


def test_wrapper_deterministic_decode_bits(rng):
    """``BatchDecodeWithPagedKVCacheWrapper(deterministic=True)``: a request's output bits are the
    same alone and beside other requests (the split size fixed; 32 here, so that it splits)."""
    import jaxinfer

    hq, hkv, d, ps, num_pages = 8, 2, 32, 4, 200
    cache = jnp.asarray(rng.standard_normal((num_pages, 2, ps, hkv, d)), jnp.bfloat16)
    mine = rng.permutation(num_pages)[:40]  # 160 keys: 5 chunks of 32
    q_mine = jnp.asarray(rng.standard_normal((1, hq, d)), jnp.bfloat16)
    outs = []
    for others in (0, 3, 7):
        pages = [mine] + [rng.choice(num_pages, int(rng.integers(1, 30)), replace=False) for _ in range(others)]
        indptr = np.concatenate([[0], np.cumsum([len(p) for p in pages])])
        last = np.concatenate([[ps], rng.integers(1, ps + 1, others)])
        q = jnp.concatenate([q_mine, jnp.asarray(rng.standard_normal((others, hq, d)), jnp.bfloat16)])
        w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="pallas", capacity=PlanCapacity(fixed_split_size=32),
                                                        deterministic=True)
        w.plan(indptr, np.concatenate(pages), last, hq, hkv, d, ps, q_data_type=jnp.bfloat16)
        outs.append(np.asarray(w.run(q, cache)[0].astype(jnp.float32)))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    # The keyword sets the capacity the backend-level tests above check (they fail without it).
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(deterministic=True)
    assert (w._capacity.fixed_split_size, w._capacity.max_qo_len) == (DETERMINISTIC_SPLIT_SIZE, 1)
    assert jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(deterministic=True)._capacity.deterministic
    assert not jaxinfer.BatchPrefillWithRaggedKVCacheWrapper()._capacity.deterministic
