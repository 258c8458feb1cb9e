"""Properties of the load-balanced planner (hypothesis) and fixed-capacity plans (one compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand
from hypothesis import given, settings
from hypothesis import strategies as st
from ref64 import random_page_table

from jaxinfer.batch import BatchSpec, PlanCapacity
from jaxinfer.pallas.backend import PallasBackend
from jaxinfer.pallas.config import TileConfig
from jaxinfer.planner import F, MERGE_FIELDS, WORK_FIELDS, plan_work, plan_work_in_jit
from jaxinfer.variants import AttentionVariant


@st.composite
def batches(draw):
    b = draw(st.integers(1, 6))
    # Decode batches (one query each) take the planner's one-tile-per-request path.
    qo = draw(st.one_of(st.just([1] * b), st.lists(st.integers(0, 20), min_size=b, max_size=b)))
    kv = draw(st.lists(st.integers(0, 200), min_size=b, max_size=b))
    return dict(
        qo_lens=np.array(qo),
        kv_lens=np.array(kv),
        num_kv_heads=draw(st.sampled_from([1, 2, 3])),
        group_size=draw(st.sampled_from([1, 3, 4, 8])),
        block_m=draw(st.sampled_from([16, 32])),
        block_n=draw(st.sampled_from([16, 32])),
        causal=draw(st.booleans()),
        window_left=draw(st.sampled_from([-1, 0, 5, 40])),
        num_ctas=draw(st.integers(1, 9)),
        split_budget=draw(st.integers(2, 80)),
        min_chunk=draw(st.sampled_from([16, 48])),
    )


def _plan(case, max_work_tiles=4096):
    qo_indptr = np.concatenate([[0], np.cumsum(case["qo_lens"])])
    kw = {k: v for k, v in case.items() if k not in ("qo_lens", "kv_lens")}
    base = np.arange(case["kv_lens"].size) * 1000
    return qo_indptr, plan_work(qo_indptr, case["kv_lens"], base, max_work_tiles=max_work_tiles, **kw)


def _visible(case, b, i, j):
    """Reference mask of key j for local query i of request b (bottom-right aligned)."""
    q_pos, j = np.broadcast_arrays(i + case["kv_lens"][b] - case["qo_lens"][b], j)
    ok = j < case["kv_lens"][b]
    if case["causal"]:
        ok = ok & (j <= q_pos)
    if case["window_left"] >= 0:
        ok = ok & (j >= q_pos - case["window_left"])
    return ok


@settings(max_examples=150, deadline=None)
@given(batches())
def test_every_visible_pair_covered_once(case):
    qo_indptr, wb = _plan(case)
    hkv, g = case["num_kv_heads"], case["group_size"]
    nnz_q, max_kv = int(qo_indptr[-1]), int(case["kv_lens"].max()) + 1
    cover = np.zeros((nnz_q, hkv, max_kv), np.int32)
    writers = np.zeros((nnz_q, hkv), np.int32)  # final writes: unsplit tiles + merge groups
    work = wb.work[: wb.num_tiles]
    req_of_row = np.repeat(np.arange(case["qo_lens"].size), case["qo_lens"])
    for t in work:
        rows = slice(t[F["q_row0"]], t[F["q_row0"]] + t[F["q_len"]])
        b = req_of_row[t[F["q_row0"]]] if t[F["q_len"]] else None
        assert t[F["kv_base"]] == b * 1000
        assert t[F["q_pos0"]] == t[F["q_row0"]] - qo_indptr[b] + case["kv_lens"][b] - case["qo_lens"][b]
        assert 0 <= t[F["kv_lo"]] <= t[F["kv_hi"]] <= case["kv_lens"][b]
        assert 1 <= t[F["q_len"]] <= max(1, case["block_m"] // g)
        cover[rows, t[F["kv_head"]], t[F["kv_lo"]] : t[F["kv_hi"]]] += 1
        writers[rows, t[F["kv_head"]]] += t[F["out_slot"]] < 0
    for grp in range(wb.num_groups):
        h, r0, n, _ = wb.merge_dest[grp]
        writers[r0 : r0 + n, h] += 1
    assert np.all(writers == 1), "every (row, kv head) is written exactly once"
    assert cover.max(initial=0) <= 1, "no key is read twice for a row"
    for b in range(case["qo_lens"].size):
        i = np.arange(case["qo_lens"][b])[:, None]
        j = np.arange(max_kv)[None, :]
        vis = _visible(case, b, i, j)
        got = cover[qo_indptr[b] : qo_indptr[b + 1]]  # [qo, hkv, max_kv]
        assert np.all(got[vis[:, None, :].repeat(hkv, 1)] == 1), "a visible key is missed"


@settings(max_examples=150, deadline=None)
@given(batches())
def test_balance_and_capacity(case):
    _, wb = _plan(case)
    work, n = wb.work, wb.num_tiles
    assert np.all(work[n:, F["valid"]] == 0) and np.all(work[:n, F["valid"]] == 1)
    cta = wb.cta_indptr
    assert cta[0] == 0 and cta[-1] == n and np.all(np.diff(cta) >= 0)
    cost = (work[:n, F["kv_hi"]] - work[:n, F["kv_lo"]]) + 2 * work[:n, F["q_len"]] * case["group_size"]
    if n:
        load = np.add.reduceat(np.concatenate([cost, [0]]), cta[:-1])[: case["num_ctas"]] * (np.diff(cta) > 0)
        assert load.max() <= cost.sum() / case["num_ctas"] + cost.max(), "a CTA is over budget by more than one tile"
    slots = work[:n, F["out_slot"]]
    used = np.sort(slots[slots >= 0])
    assert np.array_equal(used, np.arange(used.size)), "partial slots are 0..S-1, each once"
    assert used.size <= case["split_budget"]
    if wb.chunk:
        assert n <= case["split_budget"]
    mi = wb.merge_indptr
    assert mi.size == case["split_budget"] // 2 + 1 and mi[wb.num_groups] == used.size
    assert np.all(np.diff(mi[: wb.num_groups + 1]) >= 2) and np.all(mi[wb.num_groups :] == used.size)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_out_buffers_are_fully_written(case):
    """Planning into caller buffers (views of one packed array) overwrites every entry with what
    a plan into fresh arrays holds."""
    _, want = _plan(case)
    qo_indptr = np.concatenate([[0], np.cumsum(case["qo_lens"])])
    kw = {k: v for k, v in case.items() if k not in ("qo_lens", "kv_lens")}
    g = case["split_budget"] // 2
    sizes = (4096 * len(WORK_FIELDS), case["num_ctas"] + 1, g + 1, g * len(MERGE_FIELDS))
    packed = np.full(sum(sizes), -12345, np.int32)
    parts = np.split(packed, np.cumsum(sizes)[:-1])
    out = (parts[0].reshape(4096, -1), parts[1], parts[2], parts[3].reshape(g, -1))
    got = plan_work(qo_indptr, case["kv_lens"], np.arange(case["kv_lens"].size) * 1000, max_work_tiles=4096, out=out, **kw)
    assert not np.any(packed == -12345)
    for name in ("work", "cta_indptr", "merge_indptr", "merge_dest"):
        assert getattr(got, name).base is not None and np.shares_memory(getattr(got, name), packed)
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert (got.num_tiles, got.num_groups, got.chunk) == (want.num_tiles, want.num_groups, want.chunk)


def test_out_buffer_of_wrong_shape_raises():
    case = dict(num_kv_heads=1, group_size=1, block_m=16, block_n=16, causal=False, window_left=-1, num_ctas=2,
                split_budget=4, min_chunk=16, max_work_tiles=8)
    out = (np.zeros((8, len(WORK_FIELDS)), np.int32), np.zeros(3, np.int32), np.zeros(3, np.int32), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="merge_dest"):
        plan_work(np.array([0, 1]), np.array([5]), np.array([0]), out=out, **case)


@pytest.mark.parametrize("fixed", [False, True])
def test_backend_plan_buffer_is_the_packed_plan(rng, fixed):
    """The backend's one host buffer has KernelSpec's layout: it equals ``KernelSpec.pack`` of a
    separate plan_work, page ids included and padded with zeros."""
    kv_lens = rng.integers(0, 300, size=5)
    kv_lens[1] = 0
    kv_indptr, kv_indices, last, _ = random_page_table(rng, kv_lens, 16)
    qo_indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 4, size=5))])
    spec = BatchSpec.create(qo_indptr, kv_indptr, kv_indices, last, page_size=16, num_qo_heads=8, num_kv_heads=2,
                            head_dim=32, variant=AttentionVariant(causal=True), q_dtype=jnp.float16)
    backend = PallasBackend(num_ctas=3, split_factor=4, config=TileConfig(16, 16, 4, 1), min_chunk=16)
    cap = PlanCapacity(max_batch_size=8, max_kv_len=320, max_work_tiles=64) if fixed else PlanCapacity()
    plan = backend.plan(spec, cap)
    ks = plan.kernel
    nnz = int(kv_indptr[-1])
    assert ks.page_capacity == (8 * 20 if fixed else 1 << (nnz - 1).bit_length())
    wb = plan_work(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1],
                   **backend._plan_kwargs(spec, plan.config, ks.max_tiles))
    pages = np.zeros(ks.page_capacity, np.int32)
    pages[:nnz] = kv_indices[:nnz]
    want = ks.pack(wb.work, wb.cta_indptr, wb.merge_indptr, wb.merge_dest, pages)
    np.testing.assert_array_equal(np.asarray(plan.buffer), want)


def test_capacity_overflow_raises():
    with pytest.raises(ValueError, match="max_work_tiles"):
        _plan(dict(qo_lens=np.array([40]), kv_lens=np.array([10]), num_kv_heads=2, group_size=1, block_m=16, block_n=16,
                   causal=False, window_left=-1, num_ctas=2, split_budget=4, min_chunk=16), max_work_tiles=4)


def test_plan_in_jit_matches_host():
    case = dict(num_kv_heads=2, group_size=4, block_m=16, block_n=16, causal=True, window_left=-1,
                num_ctas=3, split_budget=24, min_chunk=16, max_work_tiles=64)
    qo_indptr = np.array([0, 1, 5, 6])
    kv_lens = np.array([100, 7, 0])
    base = np.array([0, 7, 9])
    host = plan_work(qo_indptr, kv_lens, base, **case)
    traced = jax.jit(lambda a, b, c: plan_work_in_jit(a, b, c, **case))(qo_indptr, kv_lens, base)
    for got, want in zip(traced, (host.work, host.cta_indptr, host.merge_indptr, host.merge_dest)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_fixed_capacity_compiles_once(rng):
    """50 random batch compositions of the same array shapes: one trace of the jitted step."""
    B, nnz_q, hq, hkv, d, ps, num_pages = 4, 8, 4, 2, 16, 4, 40
    backend = PallasBackend(num_ctas=2, split_factor=4, config=TileConfig(16, 16, 4, 1), min_chunk=16)
    cap = PlanCapacity(max_batch_size=B, max_qo_len=nnz_q, max_kv_len=64, max_work_tiles=32)
    traces = []

    @jax.jit
    def step(plan, q, k, v):
        traces.append(1)
        return backend.run(plan, q, k, v, kv_layout="NHD", return_lse=True)

    q = rand(rng, (nnz_q, hq, d), jnp.bfloat16)
    k = rand(rng, (num_pages, ps, hkv, d), jnp.bfloat16)
    v = rand(rng, k.shape, jnp.bfloat16)
    # The first Pallas call of a process registers config state that is part of jit's tracing
    # context (a JAX artefact), so warm up outside ``step`` first.
    warm = jax.jit(lambda *a: backend.run(*a, kv_layout="NHD", return_lse=False))
    for i in range(51):
        cuts = np.sort(rng.integers(0, nnz_q + 1, size=B - 1))
        qo_indptr = np.concatenate([[0], cuts, [nnz_q]])
        kv_lens = rng.integers(0, 40, size=B)
        kv_indptr, kv_indices, last, _ = random_page_table(rng, kv_lens, ps, num_pages_extra=num_pages - int((-(-kv_lens // ps)).sum()))
        spec = BatchSpec.create(qo_indptr, kv_indptr, kv_indices, last, page_size=ps, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                                variant=AttentionVariant(causal=True), q_dtype=jnp.bfloat16)
        if i == 0:
            jax.block_until_ready(warm(backend.plan(spec, cap), q, k, v))
            continue
        o, lse = step(backend.plan(spec, cap), q, k, v)
        assert not np.isnan(np.asarray(o, np.float32)).any()
    assert len(traces) == 1


def test_backend_plan_in_jit_matches_host(rng):
    kv_lens = np.array([30, 0, 75])
    kv_indptr, kv_indices, last, _ = random_page_table(rng, kv_lens, 16)
    qo_indptr = np.array([0, 2, 3, 7])
    spec = BatchSpec.create(qo_indptr, kv_indptr, kv_indices, last, page_size=16, num_qo_heads=4, num_kv_heads=2,
                            head_dim=32, variant=AttentionVariant(causal=True), q_dtype=jnp.float16)
    backend = PallasBackend(num_ctas=3, split_factor=4, config=TileConfig(16, 16, 4, 1), min_chunk=16)
    cap = PlanCapacity(max_batch_size=3, max_qo_len=4, max_kv_len=80, max_work_tiles=48)
    host = backend.plan(spec, cap)
    pages = np.zeros(host.kernel.page_capacity, np.int32)
    pages[: kv_indices.size] = kv_indices
    traced = jax.jit(lambda *a: backend.plan_in_jit(spec, cap, *a))(qo_indptr, kv_indptr, pages, last)
    assert traced.kernel == host.kernel and traced.config == host.config
    np.testing.assert_array_equal(np.asarray(traced.buffer), np.asarray(host.buffer))


@settings(max_examples=50, deadline=None)
@given(batches())
def test_mask_base_points_at_the_tiles_first_token(case):
    # Tile (request b, first token i0) finds mask bit (i, j) at mask_base + (i - i0) * kv_len + j.
    qo, kv = case["qo_lens"], case["kv_lens"]
    offsets = np.concatenate([[0], np.cumsum(qo * kv)])[:-1] + 7
    qo_indptr = np.concatenate([[0], np.cumsum(qo)])
    kw = {k: v for k, v in case.items() if k not in ("qo_lens", "kv_lens")}
    wb = plan_work(qo_indptr, kv, np.zeros(qo.size), max_work_tiles=4096, mask_offsets=offsets, **kw)
    for t in wb.work[: wb.num_tiles]:
        b = int(np.searchsorted(qo_indptr, t[F["q_row0"]], side="right") - 1)
        assert t[F["kv_len"]] == kv[b]
        assert t[F["mask_base"]] == offsets[b] + (t[F["q_row0"]] - qo_indptr[b]) * kv[b]
