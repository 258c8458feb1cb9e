"""Host time of the Pallas backend's ``plan()`` for B=256 decode (issue 3 target: under 300 us).

Run on the GPU machine: ``PYTHONPATH=. python3 benchmarks/plan_gpu.py`` (``--quick`` for a short
CPU check). Batches: B=256 decode, Hq=32, Hkv=8, D=128, page_size=16, shuffled page ids, KV
lengths uniform 1024 or Zipf (decode_zipf's draw: ``clip(zipf(1.5) * 256, 16, 32768)``).

Measured, each call timed on its own with ``time.perf_counter`` (min and median of ``--calls``,
the previous result ready first):
- ``plan``: wall time of ``BatchDecodeWithPagedKVCacheWrapper(backend="pallas").plan(...)``; it
  returns with the host-to-device copy of the plan buffer enqueued, as FlashInfer's plan() does;
  ``ready``: from the call until ``jax.block_until_ready`` of the plan (buffer on the device);
- ``before``: the same plan() with the numpy planner (tests/planner_ref.py, the planner the
  native one replaced), the numpy page-table checks and ``jax.device_put`` patched in: the host
  path before the native planner, in the same run;
- the parts, alone: ``BatchSpec.create`` (validation), ``plan_work`` (native, into fresh
  arrays), ``plan_work_packed`` (native, into one buffer with the page ids), the planner call
  that plan() makes (``plan_packed_at`` on the spec's recorded addresses), the numpy planner,
  ``jax.device_put`` of the plan buffer and the backend's direct form of it
  (``jaxinfer.plan.transfer.to_device``: jaxlib's ``batched_device_put``), and one address
  lookup of a numpy array (``__array_interface__``, as jaxinfer.plan.native does, against
  ``ctypes.c_char.from_buffer``, which an audit hook slows down);
- minor page faults per call (``ru_minflt``) of plan() and of the before path;
- a cProfile of 300 plan() calls (top functions by own time) and the native build time.

Checks first that the plan on the device equals the numpy oracle's buffers and the page ids, and
that the direct device put gives what ``jax.device_put`` gives (values, sharding, committed).
Prints a table last; writes ``$OUT/plan_gpu.json`` and ``$OUT/plan_profile.txt`` when ``OUT`` is
set.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import json
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jaxinfer.plan.batch as batch
import jaxinfer.backends.pallas.backend as pallas_backend
from jaxinfer import BatchDecodeWithPagedKVCacheWrapper, native, page, transfer
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.bench.workloads import PageTable
from jaxinfer.plan.planner import count_query_tiles, plan_packed_at, plan_work, plan_work_packed
from jaxinfer.variants import AttentionVariant

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planner_ref import plan_work_ref  # noqa: E402

B, HQ, HKV, D, PAGE = 256, 32, 8, 128, 16


def kv_lens(kind: str) -> np.ndarray:
    if kind == "uniform":
        return np.full(B, 1024)
    return np.clip(np.random.default_rng(0).zipf(1.5, B) * 256, 16, 32768)


def per_call(fn, calls: int, ready: bool = True) -> dict:
    """Min and median microseconds of ``fn()`` (``call``) and until its result is on the device
    (``ready``), each call timed alone after the previous one is ready; minor page faults per
    call (``faults``, after 10 warm-up calls: the heap's first growth is not per call)."""
    for _ in range(10):
        jax.block_until_ready(fn())
    call, done = [], []
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        if ready:
            jax.block_until_ready(out)
        t2 = time.perf_counter()
        call.append(t1 - t0)
        done.append(t2 - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
    res = {"call_min_us": min(call) * 1e6, "call_med_us": statistics.median(call) * 1e6, "faults": faults}
    if ready:
        res |= {"ready_min_us": min(done) * 1e6, "ready_med_us": statistics.median(done) * 1e6}
    return res


class NumpyPlanBackend(pallas_backend.PallasBackend):
    """The host path before the native planner: the numpy planner into views of the packed
    buffer, the page ids copied by numpy, ``jax.device_put``."""

    def plan(self, spec, capacity):
        cfg = self.tile_config(spec, capacity)
        unsplit = count_query_tiles(spec.qo_indptr, cfg.tokens_per_tile(spec.group_size)) * spec.num_kv_heads
        max_tiles = self._work_capacity(unsplit, cfg, capacity)
        ks, _ = self._kernel_spec(spec, cfg, max_tiles, self._page_capacity(spec, capacity), False)
        host, _ = pallas_backend._aligned_empty(ks.buffer_size)
        wb = plan_work_ref(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1], **self._plan_kwargs(spec, cfg, max_tiles))
        for a, off, end in ((wb.work, 0, ks.off_cta), (wb.cta_indptr, ks.off_cta, ks.off_merge_indptr),
                            (wb.merge_indptr, ks.off_merge_indptr, ks.off_merge_dest),
                            (wb.merge_dest, ks.off_merge_dest, ks.off_kv_indices)):
            host[off:end] = a.reshape(-1)
        pages = host[ks.off_kv_indices :]
        n = int(spec.kv_indptr[-1])
        pages[:n] = spec.kv_indices[:n]
        pages[n:] = 0
        return pallas_backend.PallasPlan(buffer=jax.device_put(host), kernel=ks, config=cfg)


def before(fn):
    """Run ``fn()`` on the host path before the native planner (numpy planner, numpy checks)."""
    saved = (pallas_backend.get_backend, batch.checked_batch, page._checked_indptr)
    numpy_backend = NumpyPlanBackend()
    pallas_backend.get_backend = lambda name="pallas": numpy_backend
    batch.checked_batch = lambda *args: None
    page._checked_indptr = lambda arr, batch_size: None
    try:
        return fn()
    finally:
        pallas_backend.get_backend, batch.checked_batch, page._checked_indptr = saved


def measure(kind: str, calls: int) -> dict:
    table = PageTable.shuffled(kv_lens(kind), PAGE, np.random.default_rng(0))
    args = (table.indptr, table.indices, table.last_page_len, HQ, HKV, D, PAGE)
    w = BatchDecodeWithPagedKVCacheWrapper("NHD", backend="pallas")
    plan = w.plan(*args)
    ks = plan.inner.kernel
    got = plan.inner.unpack()
    res = {"pages": int(table.indices.size), "buffer_bytes": ks.buffer_size * 4, "tiles": int(got["cta_indptr"][-1])}

    # Correctness: the plan on the device equals the numpy oracle's buffers and the page ids.
    spec = w._spec
    be = pallas_backend.get_backend()
    cfg = be.tile_config(spec, PlanCapacity())
    kw = be._plan_kwargs(spec, cfg, ks.max_tiles)
    want = plan_work_ref(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1], **kw)
    for name in ("work", "cta_indptr", "merge_indptr", "merge_dest"):
        assert np.array_equal(got[name], getattr(want, name)), name
    assert np.array_equal(got["kv_indices"][: table.indices.size], table.indices)
    assert not got["kv_indices"][table.indices.size :].any()
    assert np.array_equal(np.asarray(before(lambda: w.plan(*args)).inner.buffer), np.asarray(plan.inner.buffer))
    buf = np.asarray(plan.inner.buffer).copy()
    direct, put = transfer.to_device(buf), jax.device_put(buf)
    assert (direct.sharding, direct.committed, direct.aval) == (put.sharding, put.committed, put.aval)
    assert np.array_equal(np.asarray(direct), buf)
    res["direct_device_put"] = transfer.direct_device_put() is not None

    res["plan"] = per_call(lambda: w.plan(*args), calls)
    res["before_plan"] = before(lambda: per_call(lambda: w.plan(*args), calls))
    res["batch_spec"] = per_call(
        lambda: BatchSpec.create(np.arange(B + 1), table.indptr, table.indices, table.last_page_len, page_size=PAGE,
                                 num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, variant=AttentionVariant()),
        calls, ready=False)
    res["before_batch_spec"] = before(lambda: per_call(
        lambda: BatchSpec.create(np.arange(B + 1), table.indptr, table.indices, table.last_page_len, page_size=PAGE,
                                 num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, variant=AttentionVariant()),
        calls, ready=False))
    base = spec.kv_indptr[:-1]
    res["plan_work"] = per_call(lambda: plan_work(spec.qo_indptr, spec.kv_lens, base, **kw), calls, ready=False)
    host = np.empty(ks.buffer_size, np.int32)
    used = spec.kv_indices[: spec.kv_indptr[-1]]
    res["plan_work_packed"] = per_call(
        lambda: plan_work_packed(host, spec.qo_indptr, spec.kv_lens, base, kv_indices=used, **kw), calls, ready=False)
    a_qo, a_indptr, a_lens, a_pages = spec.native_addresses
    plan_args, address = be._kernel_spec(spec, cfg, ks.max_tiles, ks.page_capacity, False)[1], native.address(host)
    res["plan_packed_at"] = per_call(
        lambda: plan_packed_at(plan_args, address, host.size, B, a_qo, a_lens, a_indptr, None, a_pages, used.size),
        calls, ready=False)
    res["numpy_plan_work"] = per_call(lambda: plan_work_ref(spec.qo_indptr, spec.kv_lens, base, **kw), calls, ready=False)
    aligned, _ = pallas_backend._aligned_empty(buf.size)  # as plan() allocates it
    aligned[:] = buf
    res["device_put"] = per_call(lambda: jax.device_put(aligned), calls)
    res["direct_put"] = per_call(lambda: transfer.to_device(aligned), calls)
    res["address"] = per_call(lambda: native.address(buf), calls, ready=False)
    res["from_buffer"] = per_call(lambda: ctypes.addressof(ctypes.c_char.from_buffer(buf)), calls, ready=False)
    return res


def profile(calls: int) -> str:
    table = PageTable.shuffled(kv_lens("uniform"), PAGE, np.random.default_rng(0))
    args = (table.indptr, table.indices, table.last_page_len, HQ, HKV, D, PAGE)
    w = BatchDecodeWithPagedKVCacheWrapper("NHD", backend="pallas")
    w.plan(*args)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        w.plan(*args)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def build_seconds() -> float:
    """Wall time of a cold build of the host library (a fresh cache directory)."""
    saved = os.environ.get("JAXINFER_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JAXINFER_CACHE_DIR"] = tmp
        try:
            t0 = time.perf_counter()
            native.build()
            return time.perf_counter() - t0
        finally:
            if saved is None:
                del os.environ["JAXINFER_CACHE_DIR"]
            else:
                os.environ["JAXINFER_CACHE_DIR"] = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="few calls (CPU check)")
    args = ap.parse_args()
    calls = 20 if args.quick else args.calls
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "| platform:", dev.client.platform_version, flush=True)
    out = {"device": dev.device_kind, "platform_version": dev.client.platform_version, "jax": jax.__version__,
           "calls": calls, "compiler": native.find_compiler(), "cxx_flags": native.CXX_FLAGS,
           "build_s": build_seconds(), "workloads": {}}
    for kind in ("uniform", "zipf"):
        out["workloads"][kind] = measure(kind, calls)
    prof = profile(calls)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "plan_gpu.json").write_text(json.dumps(out, indent=1))
        Path(os.environ["OUT"], "plan_profile.txt").write_text(prof)
    print(prof)
    print(f"native build {out['build_s']:.2f} s ({out['compiler']} {' '.join(out['cxx_flags'])})")
    print(f"\n{'batch':8s} {'what':36s} {'min us':>8s} {'med us':>8s} {'ready min':>10s} {'ready med':>10s} {'faults':>7s}")
    for kind, r in out["workloads"].items():
        for key, label in (("plan", "plan() call / ready"), ("before_plan", "before: plan() call / ready"),
                           ("batch_spec", "BatchSpec.create"), ("before_batch_spec", "before: BatchSpec.create"),
                           ("plan_work", "plan_work (native)"), ("plan_work_packed", "plan_work_packed (+pages)"),
                           ("plan_packed_at", "plan() planner call (+pages)"),
                           ("numpy_plan_work", "before: plan_work (numpy)"),
                           ("device_put", f"jax.device_put ({r['buffer_bytes'] // 1024} KiB)"),
                           ("direct_put", f"direct device put ({'on' if r['direct_device_put'] else 'OFF'})"),
                           ("address", "address (__array_interface__)"), ("from_buffer", "address (from_buffer)")):
            c = r[key]
            ready = f"{c['ready_min_us']:10.1f} {c['ready_med_us']:10.1f}" if "ready_min_us" in c else " " * 21
            print(f"{kind:8s} {label:36s} {c['call_min_us']:8.1f} {c['call_med_us']:8.1f} {ready} {c['faults']:7.2f}")


if __name__ == "__main__":
    main()
