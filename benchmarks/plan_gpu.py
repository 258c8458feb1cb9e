"""Host time of the Pallas backend's ``plan()`` for B=256 decode (issue 3 target: under 300 us).

Run on the GPU machine: ``PYTHONPATH=. python3 benchmarks/plan_gpu.py`` (``--quick`` for a short
CPU check). Batches: B=256 decode, Hq=32, Hkv=8, D=128, page_size=16, shuffled page ids, KV
lengths uniform 1024 or Zipf (decode_zipf's draw: ``clip(zipf(1.5) * 256, 16, 32768)``).

Measured, each call timed on its own with ``time.perf_counter`` (min and median of ``--calls``):
- ``call``: wall time of ``BatchDecodeWithPagedKVCacheWrapper(backend="pallas").plan(...)``; it
  returns with the host-to-device copy of the plan buffer enqueued, as FlashInfer's plan() does;
- ``ready``: from the call until ``jax.block_until_ready`` of the plan (buffer on the device);
- the parts: ``BatchSpec.create`` (validation), ``plan_work`` (the numpy planner), the copy alone;
- each host-to-device path for the whole ``plan()`` (the backend's ``_to_device`` swapped);
- whether a path lets the host buffer change under a pending copy: the buffer is overwritten
  right after the call returns, and the device copy is compared with the original;
- ``before``: the same calls with the planner and backend of commit 085e1b0, and ``page_fast``:
  with the leaner page-table checks of benchmarks/results/planner/page_checks.patch, when
  ``benchmarks/results/planner/baseline/`` holds them (not kept in the repository; recreate with
  ``git show 085e1b0:jaxinfer/planner.py > baseline/baseline_planner.py``, the same for
  ``jaxinfer/pallas/backend.py`` as ``baseline_backend.py`` with its ``from jaxinfer.planner``
  import changed to ``from baseline_planner``, and ``proposed_page.py`` = page.py patched);
- ``copy 64 MiB``: call and ready time of each path for a large buffer (is the copy enqueued
  or done inside the call?).

Prints a table last; writes ``$OUT/plan_gpu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer.batch as batch
import jaxinfer.pallas.backend as pallas_backend
from jaxinfer import BatchDecodeWithPagedKVCacheWrapper
from jaxinfer.batch import BatchSpec, PlanCapacity
from jaxinfer.bench.workloads import PageTable
from jaxinfer.planner import plan_work
from jaxinfer.variants import AttentionVariant

B, HQ, HKV, D, PAGE = 256, 32, 8, 128, 16
BASELINE = Path(__file__).parent / "results" / "planner" / "baseline"


def kv_lens(kind: str) -> np.ndarray:
    if kind == "uniform":
        return np.full(B, 1024)
    return np.clip(np.random.default_rng(0).zipf(1.5, B) * 256, 16, 32768)


def per_call(fn, calls: int, ready: bool = True) -> dict:
    """Min and median microseconds of ``fn()`` (``call``) and until its result is on the device
    (``ready``), each call timed alone after the previous one is ready."""
    fn()
    call, done = [], []
    gc.collect()
    for _ in range(calls):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        if ready:
            jax.block_until_ready(out)
        t2 = time.perf_counter()
        call.append(t1 - t0)
        done.append(t2 - t0)
    res = {"call_min_us": min(call) * 1e6, "call_med_us": statistics.median(call) * 1e6}
    if ready:
        res |= {"ready_min_us": min(done) * 1e6, "ready_med_us": statistics.median(done) * 1e6}
    return res


def back_to_back(fn, n: int = 50, reps: int = 5) -> float:
    """Min over ``reps`` of the mean microseconds of ``n`` calls issued without waiting."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        best = min(best, (time.perf_counter() - t0) / n)
        jax.block_until_ready(out)
    return best * 1e6


def copy_paths() -> dict:
    """Host-to-device paths for one int32 numpy buffer, all public JAX APIs."""
    dev = jax.devices()[0]
    identity = jax.jit(lambda x: x)
    return {
        "jnp.asarray": jnp.asarray,
        "jax.device_put": jax.device_put,
        "jax.device_put(dev)": lambda x: jax.device_put(x, dev),
        "device_put(may_alias=False)": lambda x: jax.device_put(x, may_alias=False),
        "jit(identity)": identity,
    }


def race(put, size: int, trials: int) -> int:
    """Trials (of ``trials``) in which overwriting the host buffer right after ``put`` returned
    changed what reached the device (a pending copy read the buffer late)."""
    bad = 0
    want = np.arange(size, dtype=np.int32)
    for _ in range(trials):
        host = want.copy()
        dev = put(host)
        host[:] = -1
        bad += not np.array_equal(np.asarray(dev), want)
    return bad


def load_baseline():
    """The planner and backend of commit 085e1b0 as a backend object, or ``None``."""
    sys.path.insert(0, str(BASELINE))
    if not (BASELINE / "baseline_backend.py").exists():
        return None
    return importlib.import_module("baseline_backend").PallasBackend()


def with_page_checks(module, fn):
    """Run ``fn()`` with ``module``'s page-table checks in BatchSpec.create."""
    names = ("check_indptr", "check_page_table", "seq_lens_host")
    saved = [getattr(batch, n) for n in names]
    for n in names:
        setattr(batch, n, getattr(module, n))
    try:
        return fn()
    finally:
        for n, f in zip(names, saved):
            setattr(batch, n, f)


def with_backend(backend, fn):
    """Run ``fn()`` with ``backend`` serving the wrapper's ``"pallas"``."""
    saved = pallas_backend.get_backend
    pallas_backend.get_backend = lambda name="pallas": backend
    try:
        return fn()
    finally:
        pallas_backend.get_backend = saved


def measure(kind: str, calls: int, baseline) -> dict:
    table = PageTable.shuffled(kv_lens(kind), PAGE, np.random.default_rng(0))
    args = (table.indptr, table.indices, table.last_page_len, HQ, HKV, D, PAGE)
    w = BatchDecodeWithPagedKVCacheWrapper("NHD", backend="pallas")
    plan = w.plan(*args)
    buf = np.asarray(plan.inner.buffer)
    res = {"pages": int(table.indices.size), "buffer_bytes": int(buf.nbytes), "tiles": int(plan.inner.unpack()["cta_indptr"][-1])}

    # Correctness: the plan on the device equals the host planner's output.
    spec = w._spec
    be = pallas_backend.PallasBackend()
    cap = PlanCapacity()
    cfg = be.tile_config(spec, cap)
    kw = be._plan_kwargs(spec, cfg, plan.inner.kernel.max_tiles)
    wb = plan_work(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1], **kw)
    got = plan.inner.unpack()
    assert np.array_equal(got["work"], wb.work) and np.array_equal(got["cta_indptr"], wb.cta_indptr)
    assert np.array_equal(got["kv_indices"][: table.indices.size], table.indices)

    res["plan"] = per_call(lambda: w.plan(*args), calls)
    res["plan_back_to_back_us"] = back_to_back(lambda: w.plan(*args))
    res["batch_spec"] = per_call(
        lambda: BatchSpec.create(np.arange(B + 1), table.indptr, table.indices, table.last_page_len, page_size=PAGE,
                                 num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, variant=AttentionVariant()),
        calls, ready=False)
    res["plan_work"] = per_call(lambda: plan_work(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1], **kw), calls, ready=False)
    res["copy"] = {name: per_call(lambda put=put: put(buf), calls) for name, put in copy_paths().items()}
    saved = pallas_backend._to_device
    res["plan_by_path"] = {}
    for name, put in copy_paths().items():
        pallas_backend._to_device = put
        try:
            res["plan_by_path"][name] = per_call(lambda: w.plan(*args), calls)
        finally:
            pallas_backend._to_device = saved
    if (BASELINE / "proposed_page.py").exists():
        fast = importlib.import_module("proposed_page")
        res["page_fast_plan"] = with_page_checks(fast, lambda: per_call(lambda: w.plan(*args), calls))
        res["page_fast_batch_spec"] = with_page_checks(fast, lambda: per_call(
            lambda: BatchSpec.create(np.arange(B + 1), table.indptr, table.indices, table.last_page_len, page_size=PAGE,
                                     num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, variant=AttentionVariant()),
            calls, ready=False))
    if baseline is not None:
        res["before_plan"] = with_backend(baseline, lambda: per_call(lambda: w.plan(*args), calls))
        old_plan_work = importlib.import_module("baseline_planner").plan_work
        res["before_plan_work"] = per_call(lambda: old_plan_work(spec.qo_indptr, spec.kv_lens, spec.kv_indptr[:-1], **kw), calls, ready=False)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="few calls (CPU check)")
    args = ap.parse_args()
    calls = 20 if args.quick else args.calls
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "| platform:", dev.client.platform_version, flush=True)
    baseline = load_baseline()
    out = {"device": dev.device_kind, "platform_version": dev.client.platform_version, "jax": jax.__version__,
           "calls": calls, "workloads": {}}
    for kind in ("uniform", "zipf"):
        out["workloads"][kind] = measure(kind, calls, baseline)
    size = out["workloads"]["uniform"]["buffer_bytes"] // 4
    big = np.arange(1 << 24, dtype=np.int32)
    out["copy_64MiB"] = {name: per_call(lambda put=put: put(big), 5 if args.quick else 20) for name, put in copy_paths().items()}
    out["race_mismatches"] = {name: race(put, size, 20 if args.quick else 200) for name, put in copy_paths().items()}
    out["race_trials"] = 20 if args.quick else 200

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "plan_gpu.json").write_text(json.dumps(out, indent=1))
    rows = []
    for kind, r in out["workloads"].items():
        rows.append((kind, "plan() back to back (mean of 50)", r["plan_back_to_back_us"], r["plan_back_to_back_us"], None, None))
        rows.append((kind, "plan() call / ready", r["plan"]["call_min_us"], r["plan"]["call_med_us"], r["plan"]["ready_min_us"], r["plan"]["ready_med_us"]))
        if "before_plan" in r:
            b = r["before_plan"]
            rows.append((kind, "before: plan() call / ready", b["call_min_us"], b["call_med_us"], b["ready_min_us"], b["ready_med_us"]))
            rows.append((kind, "before: plan_work", r["before_plan_work"]["call_min_us"], r["before_plan_work"]["call_med_us"], None, None))
        if "page_fast_plan" in r:
            f = r["page_fast_plan"]
            rows.append((kind, "page_fast: plan() call / ready", f["call_min_us"], f["call_med_us"], f["ready_min_us"], f["ready_med_us"]))
            rows.append((kind, "page_fast: BatchSpec.create", r["page_fast_batch_spec"]["call_min_us"], r["page_fast_batch_spec"]["call_med_us"], None, None))
        rows.append((kind, "plan_work", r["plan_work"]["call_min_us"], r["plan_work"]["call_med_us"], None, None))
        rows.append((kind, "BatchSpec.create", r["batch_spec"]["call_min_us"], r["batch_spec"]["call_med_us"], None, None))
        for name, c in r["copy"].items():
            rows.append((kind, f"copy {name} ({r['buffer_bytes'] // 1024} KiB)", c["call_min_us"], c["call_med_us"], c["ready_min_us"], c["ready_med_us"]))
        for name, c in r["plan_by_path"].items():
            rows.append((kind, f"plan() via {name}", c["call_min_us"], c["call_med_us"], c["ready_min_us"], c["ready_med_us"]))
    for name, c in out["copy_64MiB"].items():
        rows.append(("64MiB", f"copy {name}", c["call_min_us"], c["call_med_us"], c["ready_min_us"], c["ready_med_us"]))
    print(f"\n{'batch':8s} {'what':44s} {'min us':>8s} {'med us':>8s} {'ready min':>10s} {'ready med':>10s}")
    for kind, what, a, b, c, d in rows:
        fmt = lambda x: f"{x:10.1f}" if x is not None else f"{'':10s}"
        print(f"{kind:8s} {what:44s} {a:8.1f} {b:8.1f} {fmt(c)} {fmt(d)}")
    print("race mismatches (of", out["race_trials"], "):", out["race_mismatches"])


if __name__ == "__main__":
    main()
