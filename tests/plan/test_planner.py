"""The compiled planner against its numpy oracle (bit for bit), its properties (hypothesis), its
build, fixed-capacity plans (one compile), and the native page-table checks against numpy."""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import pickle
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kv_major_prefill, rand
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import planner_ref
from ref64 import random_page_table

from jaxinfer.plan import native
from jaxinfer.plan import checks
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.plan.checks import check_indptr, check_page_table_lens
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.plan.layout import F, MERGE_FIELDS, WORK_FIELDS
from jaxinfer.plan.planner import plan_work, plan_work_in_jit, plan_work_packed
from jaxinfer.variants import AttentionVariant


def plan_work_ref(*args, fixed_chunk: int = 0, **kw):
    """The numpy oracle (tests/planner_ref.py), with ``fixed_chunk`` as the native planner takes
    it: the oracle's chunk search replaced by the fixed chunk (its only difference)."""
    if not fixed_chunk:
        return planner_ref.plan_work_ref(*args, **kw)
    with mock.patch.object(planner_ref, "_chunk_size", lambda *_: fixed_chunk):
        return planner_ref.plan_work_ref(*args, **kw)


@st.composite
def batches(draw, max_batch=6):
    b = draw(st.integers(1, max_batch))
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
        row_cost=draw(st.sampled_from([0, 2, 5])),
        tile_startup=draw(st.sampled_from([0, 2, 5])),
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
    # The planner's own cost model (row_cost is drawn): the list-scheduling bound holds for it.
    cost = (work[:n, F["kv_hi"]] - work[:n, F["kv_lo"]]) + case["row_cost"] * work[:n, F["q_len"]] * case["group_size"]
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


def _poisoned_out(max_work_tiles, num_ctas, split_budget):
    """``out`` views of one packed int32 array filled with a sentinel, and that array."""
    g = split_budget // 2
    sizes = (max_work_tiles * len(WORK_FIELDS), num_ctas + 1, g + 1, g * len(MERGE_FIELDS))
    packed = np.full(sum(sizes), -12345, np.int32)
    parts = np.split(packed, np.cumsum(sizes)[:-1])
    return (parts[0].reshape(max_work_tiles, len(WORK_FIELDS)), parts[1], parts[2], parts[3].reshape(g, len(MERGE_FIELDS))), packed


@settings(max_examples=300, deadline=None)
@given(batches(max_batch=12), st.integers(2, 600), st.sampled_from([1, 1, 10]), st.booleans(), st.booleans(),
       st.one_of(st.just(2048), st.just(2048), st.integers(0, 64)))
def test_native_matches_numpy_oracle(case, split_budget, kv_scale, masked, split_kv, max_work_tiles):
    """jaxinfer/csrc/planner.cc gives tests/planner_ref.py's buffers bit for bit, written into poisoned
    views of one packed array (every entry overwritten), or raises its capacity error. Budgets
    up to 600 tiles and keys up to 2000 let the larger batches split."""
    case["split_budget"] = split_budget
    qo, kv = case["qo_lens"], case["kv_lens"] * kv_scale
    qo_indptr = np.concatenate([[0], np.cumsum(qo)]).astype(np.int32)
    kw = {k: v for k, v in case.items() if k not in ("qo_lens", "kv_lens")}
    kw |= dict(split_kv=split_kv, max_work_tiles=max_work_tiles,
               mask_offsets=np.concatenate([[0], np.cumsum(qo * kv)])[:-1] + 3 if masked else None)
    base = np.arange(kv.size) * 1000 + 17
    out, packed = _poisoned_out(max_work_tiles, case["num_ctas"], case["split_budget"])
    try:
        want = plan_work_ref(qo_indptr, kv, base, **kw)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            plan_work(qo_indptr, kv, base, out=out, **kw)
        assert str(got.value) == str(e)
        return
    got = plan_work(qo_indptr, kv, base, out=out, **kw)
    assert not np.any(packed == -12345)
    for name, a in zip(("work", "cta_indptr", "merge_indptr", "merge_dest"), out):
        assert getattr(got, name) is a
        np.testing.assert_array_equal(a, getattr(want, name), err_msg=name)
    assert (got.num_tiles, got.num_groups, got.chunk) == (want.num_tiles, want.num_groups, want.chunk)
    # The packed form: the same buffers back to back, then the page ids zero-padded.
    pages = np.random.default_rng(int(kv.sum())).permutation(int(kv.sum()) + 1)[: kv.size * 3]
    buffer = np.full(packed.size + pages.size + 5, -12345, np.int32)
    stats = plan_work_packed(buffer, qo_indptr, kv, base, kv_indices=pages, **kw)
    assert stats == (want.num_tiles, want.num_groups, want.chunk)
    np.testing.assert_array_equal(buffer[: packed.size], packed)
    np.testing.assert_array_equal(buffer[packed.size :], np.concatenate([pages, np.zeros(5)]))


def _kv_major_post_pass(wb, num_ctas):
    """What the Pallas backend made of an LPT plan with a CTA per tile before the planner took
    ``kv_major``: rows stably lexsorted by (kv_base, kv_head, kv_lo - kv_hi), CTA c on row c."""
    work, n = wb.work.copy(), wb.num_tiles
    w = work[:n]
    w[:] = w[np.lexsort((w[:, F["kv_lo"]] - w[:, F["kv_hi"]], w[:, F["kv_head"]], w[:, F["kv_base"]]))]
    return work, np.minimum(np.arange(num_ctas + 1), n)


@settings(max_examples=200, deadline=None)
@given(batches(max_batch=12), st.integers(2, 600), st.sampled_from([1, 1, 10]), st.booleans(), st.booleans(),
       st.integers(0, 5), st.booleans())
def test_kv_major_matches_the_post_pass(case, split_budget, kv_scale, masked, split_kv, extra_ctas, shared_base):
    """kv_major, native and numpy oracle bit for bit, is the former post-pass of the LPT plan with
    a CTA per tile (same rows, CTA ranges and merge groups); both raise the same error when
    num_ctas is less than the tiles. Requests may share a kv_base (ties keep the cost order)."""
    case["split_budget"] = split_budget
    qo, kv = case["qo_lens"], case["kv_lens"] * kv_scale
    qo_indptr = np.concatenate([[0], np.cumsum(qo)]).astype(np.int32)
    kw = {k: v for k, v in case.items() if k not in ("qo_lens", "kv_lens", "num_ctas")}
    kw |= dict(split_kv=split_kv, max_work_tiles=4096,
               mask_offsets=np.concatenate([[0], np.cumsum(qo * kv)])[:-1] + 3 if masked else None)
    base = (np.arange(kv.size) // 2 if shared_base else np.arange(kv.size)) * 1000 + 17
    # The chunk depends on the CTAs (the planner's makespan model): a grid of extra_ctas more than
    # the tiles of its own plan, iterated from 4096 CTAs.
    num_ctas = 4096
    for _ in range(8):
        tiles = plan_work_ref(qo_indptr, kv, base, num_ctas=num_ctas, **kw).num_tiles
        num_ctas, last = max(1, tiles + extra_ctas), num_ctas
        if num_ctas == last:
            break
    lpt = plan_work_ref(qo_indptr, kv, base, num_ctas=num_ctas, **kw)
    assume(lpt.num_tiles <= num_ctas)
    want_work, want_cta = _kv_major_post_pass(lpt, num_ctas)
    out, packed = _poisoned_out(4096, num_ctas, split_budget)
    for got in (plan_work_ref(qo_indptr, kv, base, num_ctas=num_ctas, kv_major=True, **kw),
                plan_work(qo_indptr, kv, base, num_ctas=num_ctas, kv_major=True, out=out, **kw)):
        np.testing.assert_array_equal(got.work, want_work)
        np.testing.assert_array_equal(got.cta_indptr, want_cta)
        np.testing.assert_array_equal(got.merge_indptr, lpt.merge_indptr)
        np.testing.assert_array_equal(got.merge_dest, lpt.merge_dest)
        assert (got.num_tiles, got.num_groups, got.chunk) == (lpt.num_tiles, lpt.num_groups, lpt.chunk)
    assert not np.any(packed == -12345)
    fewer = num_ctas - 1
    if fewer >= 1 and plan_work_ref(qo_indptr, kv, base, num_ctas=fewer, **kw).num_tiles > fewer:
        with pytest.raises(ValueError, match="kv_major runs one tile per CTA") as want:
            plan_work_ref(qo_indptr, kv, base, num_ctas=fewer, kv_major=True, **kw)
        with pytest.raises(ValueError) as got:
            plan_work(qo_indptr, kv, base, num_ctas=fewer, kv_major=True, **kw)
        assert str(got.value) == str(want.value)


def test_backend_kv_major_grid_is_the_post_pass(rng):
    """The Pallas backend's kv_major_grid plan (prefill tiles that fill the persistent grid) is the
    LPT plan of a CTA per tile reordered by the former post-pass, bit for bit."""
    backend, spec = kv_major_prefill(rng)
    plan = backend.plan(spec, PlanCapacity())
    got, ks = plan.unpack(), plan.kernel
    grid = dataclasses.replace(backend, num_ctas=ks.num_ctas, split_factor=0, kv_major_grid=False)
    assert ks.num_ctas == ks.max_tiles > backend.grid_size(plan.config)
    lpt = plan_work_ref(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1],
                        **grid._plan_kwargs(spec, plan.config, ks.max_tiles))
    want_work, want_cta = _kv_major_post_pass(lpt, ks.num_ctas)
    np.testing.assert_array_equal(got["work"], want_work)
    np.testing.assert_array_equal(got["cta_indptr"], want_cta)


def test_native_matches_oracle_on_b256_decode(rng):
    """The benchmark's shapes (B=256, Hkv=8, GQA 4, H100 grid): uniform, Zipf and split plans."""
    kw = dict(num_kv_heads=8, group_size=4, block_m=16, block_n=32, causal=False, window_left=-1, num_ctas=264,
              max_work_tiles=4096, min_chunk=256)
    qo_indptr = np.arange(257, dtype=np.int32)
    for kv in (np.full(256, 1024), np.clip(rng.zipf(1.5, 256) * 256, 16, 32768), rng.integers(0, 9000, 16)):
        for budget in (1056, 4096):
            qo = qo_indptr[: kv.size + 1]
            base = rng.integers(0, 1 << 20, kv.size)
            want = plan_work_ref(qo, kv, base, split_budget=budget, **kw)
            got = plan_work(qo, kv, base, split_budget=budget, **kw)
            for name in ("work", "cta_indptr", "merge_indptr", "merge_dest"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
            assert (got.num_tiles, got.num_groups, got.chunk) == (want.num_tiles, want.num_groups, want.chunk)


@pytest.mark.parametrize("tile_startup", [0, 2])
def test_chunk_choice_runs_one_wave_of_long_chunks(tile_startup):
    """The chunk of least estimated time (module doc, step 2), not the smallest the budget allows:
    two key ranges of 64 steps on 8 CTAs take 4 chunks each, one tile a CTA (mean and most loaded
    CTA 16 + tile_startup steps), where the budget of 32 tiles would allow 16 chunks of 4 steps
    (four waves, 4 tile starts a CTA); 5 chunks a range would leave 2 CTAs a second tile."""
    kw = dict(num_kv_heads=1, group_size=1, block_m=16, block_n=16, causal=False, window_left=-1, num_ctas=8,
              split_budget=32, max_work_tiles=64, min_chunk=16, tile_startup=tile_startup)
    for plan in (plan_work(np.arange(3), [1024, 1024], [0, 0], **kw),
                 plan_work_ref(np.arange(3), np.array([1024, 1024]), np.array([0, 0]), **kw)):
        assert (plan.chunk, plan.num_tiles) == (256, 8)
        np.testing.assert_array_equal(np.diff(plan.cta_indptr), np.ones(8))


def test_inputs_of_wrong_length_raise():
    case = dict(num_kv_heads=1, group_size=1, block_m=16, block_n=16, causal=False, window_left=-1, num_ctas=2,
                split_budget=4, min_chunk=16, max_work_tiles=8)
    with pytest.raises(ValueError, match="qo_indptr"):
        plan_work(np.array([0, 1]), np.array([5, 6]), np.array([0, 0]), **case)
    with pytest.raises(ValueError, match="kv_base"):
        plan_work(np.array([0, 1]), np.array([5]), np.array([0, 0]), **case)


def test_native_build_is_cached_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))
    path = native.build()
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert path == native.library_path()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime, "a cached build is reused"
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"


def test_missing_compiler_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(native.NativeBuildError, match="install one.*or set CXX"):
        native.build()


def test_without_compiler_page_checks_fall_back_and_planner_raises(rng, monkeypatch):
    """No C++ compiler: BatchSpec.create (every backend) still validates, in numpy; the native
    planner raises NativeBuildError naming the fix."""

    def no_library():
        raise native.NativeBuildError("no C++ compiler found (test)")

    monkeypatch.setattr(native, "load", no_library)
    checks._native_lib.cache_clear()
    try:
        kv_indptr, kv_indices, last, _ = random_page_table(rng, np.array([30, 0, 7]), 16)
        spec = BatchSpec.create(np.array([0, 1, 2, 3], np.int32), kv_indptr.astype(np.int32), kv_indices.astype(np.int32),
                                last.astype(np.int32), page_size=16, num_qo_heads=4, num_kv_heads=2, head_dim=32,
                                variant=AttentionVariant())
        np.testing.assert_array_equal(spec.kv_lens, [30, 0, 7])
        with pytest.raises(ValueError, match="kv_last_page_len"):
            BatchSpec.create(np.arange(4), kv_indptr, kv_indices, last + 16, page_size=16, num_qo_heads=4,
                             num_kv_heads=2, head_dim=32, variant=AttentionVariant())
        with pytest.raises(native.NativeBuildError, match="compiler"):
            plan_work(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1], num_kv_heads=2, group_size=2, block_m=16,
                      block_n=16, causal=False, window_left=-1, num_ctas=2, split_budget=4, max_work_tiles=8)
    finally:
        checks._native_lib.cache_clear()


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


@st.composite
def page_tables(draw):
    """A batch (``qo_indptr`` and a page table), valid or broken in one way (the rules of
    jaxinfer.plan.checks.check_indptr and check_page_table)."""
    b = draw(st.integers(0, 8))
    page_size = draw(st.integers(1, 16))
    pages = np.array(draw(st.lists(st.integers(0, 4), min_size=b, max_size=b)), np.int64)
    indptr = np.concatenate([[0], np.cumsum(pages)])
    last = np.array([draw(st.integers(1, page_size)) if n else 0 for n in pages], np.int64)
    indices = np.array(draw(st.permutations(range(int(indptr[-1]) + 2))), np.int64)
    qo_indptr = np.concatenate([[0], np.cumsum(draw(st.lists(st.integers(0, 3), min_size=b, max_size=b)))])
    flaw = draw(st.sampled_from(["none", "start", "decreasing", "short", "negative", "last", "empty_last", "qo_start",
                                 "qo_decreasing", "qo_length"]))
    if flaw == "start":
        indptr[0] = 1
    elif flaw == "decreasing" and b >= 2:
        indptr[1] = indptr[2] + 1
    elif flaw == "short":
        indices = indices[: max(0, int(indptr[-1]) - 1)]
    elif flaw == "negative" and indptr[-1]:
        indices[draw(st.integers(0, int(indptr[-1]) - 1))] = -3
    elif flaw == "last" and b:
        last[-1] = page_size + 1 if pages[-1] else 1
    elif flaw == "empty_last" and b:
        last[0] = 0
    elif flaw == "qo_start":
        qo_indptr[0] = 2
    elif flaw == "qo_decreasing" and b:
        qo_indptr[-1] = qo_indptr[-2] - 1
    elif flaw == "qo_length":
        qo_indptr = qo_indptr[:-1]
    return qo_indptr, indptr, indices, last, page_size


def _numpy_checks(qo_indptr, kv_indptr, kv_indices, last, page_size):
    """``(qo_indptr, kv_indptr, kv_lens, kv_last_page_len)`` of BatchSpec.create's numpy checks
    (``kv_indices is None``: ragged KV), or the ValueError they raise."""
    with mock.patch.object(checks, "_checked_indptr", lambda arr, batch_size: None):
        try:
            if kv_indices is None:
                kv_indptr = check_indptr("kv_indptr", kv_indptr)
                lens, last = np.diff(kv_indptr), None
            else:
                kv_indptr, _, last, lens = check_page_table_lens(kv_indptr, kv_indices, last, page_size)
            return check_indptr("qo_indptr", qo_indptr, batch_size=lens.size), kv_indptr, lens, last
        except ValueError as e:
            return e


@settings(max_examples=300, deadline=None)
@given(page_tables(), st.sampled_from([np.int32, np.int64]), st.sampled_from([np.int32, np.int64]),
       st.sampled_from([np.int32, np.int64]), st.booleans())
def test_native_batch_check_agrees_with_numpy(table, qo_dtype, indptr_dtype, last_dtype, ragged):
    """``checked_batch`` (one native pass) accepts exactly the batches the numpy checks accept,
    page tables and ragged KV, int32 or int64 row pointers and last-page lengths, with the same
    int32 arrays; BatchSpec.create then holds them and raises the numpy checks' message on the
    others."""
    qo, indptr, indices, last, page_size = table
    qo, indptr, last = qo.astype(qo_dtype), indptr.astype(indptr_dtype), last.astype(last_dtype)
    indices = None if ragged else indices.astype(np.int32)
    last = None if ragged else last
    want = _numpy_checks(qo, indptr, indices, last, page_size)
    got = checks.checked_batch(qo, indptr, indices, last, page_size)
    assert (got is None) == isinstance(want, ValueError)

    def create():
        return BatchSpec.create(qo, indptr, indices, last, page_size=page_size, num_qo_heads=4, num_kv_heads=2,
                                head_dim=32, variant=AttentionVariant())

    if isinstance(want, ValueError):
        with pytest.raises(ValueError) as raised:
            create()
        assert str(raised.value) == str(want)
        return
    spec = create()
    for g, s, w in zip(got, (spec.qo_indptr, spec.kv_indptr, spec.kv_lens, spec.kv_last_page_len), want):
        if w is None:
            assert g is None and s is None
            continue
        assert g.dtype == np.int32 and s.dtype == np.int32 and g.flags.c_contiguous
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(s, w)
    if not ragged:
        assert spec.kv_indices is indices


def _data_addresses(spec):
    return tuple(0 if a is None else a.__array_interface__["data"][0]
                 for a in (spec.qo_indptr, spec.kv_indptr, spec.kv_lens, spec.kv_indices))


@pytest.mark.parametrize("paged", [True, False])
def test_spec_native_addresses_are_its_arrays(rng, paged):
    """The addresses the native check recorded are the spec's int32 arrays; a replaced, copied or
    unpickled spec looks up its own (never a stale address), and a spec of other dtypes plans
    from int32 copies it keeps."""
    kv_indptr, kv_indices, last, _ = random_page_table(rng, np.array([30, 0, 7]), 16)
    args = (kv_indptr.astype(np.int32), kv_indices.astype(np.int32), last.astype(np.int32)) if paged else (
        np.array([0, 30, 30, 37], np.int32), None, None)
    spec = BatchSpec.create(np.arange(4), *args, page_size=16, num_qo_heads=4, num_kv_heads=2, head_dim=32,
                            variant=AttentionVariant())
    assert "native_addresses" in spec.__dict__, "filled by create()"
    assert spec.native_addresses == _data_addresses(spec)
    for other in (copy.copy(spec), copy.deepcopy(spec), pickle.loads(pickle.dumps(spec)),
                  dataclasses.replace(spec, kv_lens=spec.kv_lens.copy())):
        assert other.native_addresses == _data_addresses(other)
    wide = dataclasses.replace(spec, qo_indptr=spec.qo_indptr.astype(np.int64))
    qo = np.frombuffer(ctypes.string_at(wide.native_addresses[0], 16), np.int32)
    np.testing.assert_array_equal(qo, spec.qo_indptr)


def test_backend_plans_a_spec_without_recorded_addresses(rng):
    """A spec built around create() (other dtypes, strided arrays) plans like the created one."""
    kv_indptr, kv_indices, last, _ = random_page_table(rng, rng.integers(0, 200, 6), 16)
    spec = BatchSpec.create(np.arange(7), kv_indptr, kv_indices, last, page_size=16, num_qo_heads=4, num_kv_heads=2,
                            head_dim=32, variant=AttentionVariant())
    other = dataclasses.replace(spec, qo_indptr=spec.qo_indptr.astype(np.int64), kv_lens=np.repeat(spec.kv_lens, 2)[::2],
                                kv_indices=spec.kv_indices.astype(np.int64))
    backend = PallasBackend(num_ctas=3, config=TileConfig(16, 16, 4, 1), min_chunk=16)
    want, got = backend.plan(spec, PlanCapacity()), backend.plan(other, PlanCapacity())
    np.testing.assert_array_equal(np.asarray(got.buffer), np.asarray(want.buffer))


def test_native_batch_check_leaves_other_inputs_to_numpy():
    """Lists, other dtypes and strided arrays take the numpy checks."""
    indptr, indices, last = np.array([0, 2, 3], np.int32), np.arange(4, dtype=np.int32), np.array([5, 1], np.int32)
    qo = np.arange(3, dtype=np.int32)
    assert checks.checked_batch(qo, indptr, indices, last, 16) is not None
    for args in ((qo.tolist(), indptr, indices, last, 16), (qo, indptr.astype(np.uint32), indices, last, 16),
                 (qo, indptr, indices.astype(np.int64), last, 16), (qo, indptr, np.arange(8, dtype=np.int32)[::2], last, 16),
                 (qo, indptr, indices, last, 16.0), (qo[:2], indptr, indices, last, 16)):
        assert checks.checked_batch(*args) is None


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("values", [[0], [0, 3, 3, 9], [1, 2], [0, 5, 4], [0, 2**31]])
def test_native_indptr_check_agrees_with_numpy(dtype, values):
    try:
        want = check_indptr("x", list(values))
    except ValueError as e:
        want = e
    if dtype == np.int32 and max(values) >= 2**31:
        return
    arr = np.array(values, dtype)
    assert (checks._checked_indptr(arr, None) is None) == isinstance(want, ValueError)
    if isinstance(want, ValueError):
        with pytest.raises(ValueError, match=re.escape(str(want))):
            check_indptr("x", arr)
    else:
        got = check_indptr("x", arr)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
