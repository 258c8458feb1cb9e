"""GPU check and timing of the ``"fa2"`` / ``"fa3"`` backends, in one run (built for the device's lease).

Steps: build the kernel libraries (``--backends``' FFI kernels, concurrently); run ``pytest -m gpu
tests/test_ffi.py`` in child processes (also on the libraries of ``--pytest-variants``); at full
size, compare every timed workload with a float32 XLA reference on the GPU (relative Frobenius
error of o, max error of lse) and time it on each of ``--backends`` (``fa2``, ``fa3``,
``pallas``, and ``cudnn`` = ``jax.nn.dot_product_attention(implementation="cudnn")`` on the dense
equivalent), each backend in its own child process with ``--isolate`` (a faulting kernel then
spoils only its own rows); dump the SASS and profile one launch of the first FFI backend with ncu
(clocks left alone); time tile-shape variants (``VARIANTS``) in child processes; run
compute-sanitizer memcheck on a small case; print a table last, with the first backend's ratio to
each other one.

TFLOP/s count ``4 * S * S * Hq * D`` per request, halved when causal.

    python benchmarks/ffi_gpu.py --out DIR            # everything, fa2 vs cuDNN
    python benchmarks/ffi_gpu.py --out DIR --backends fa3,fa2,pallas,cudnn --isolate --variants fa3_nopp
    python benchmarks/ffi_gpu.py --quick --workloads prefill_causal --json x.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Child processes (memcheck, pytest, tile variants) need GPU memory too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.plan.batch import BatchSpec, PlanCapacity  # noqa: E402
from jaxinfer.bench.harness import median_seconds  # noqa: E402
from jaxinfer.backends import get_backend  # noqa: E402
from jaxinfer.backends.ffi import build, ops  # noqa: E402
from jaxinfer.variants import AttentionVariant  # noqa: E402

B, S, H = 4, 4096, 32
# name: (causal, num_kv_heads, head_dim, page_size or None for ragged)
WORKLOADS = {
    "prefill_causal": (True, 32, 128, None),
    "noncausal": (False, 32, 128, None),
    "gqa_hkv8": (True, 8, 128, None),
    "d64_causal": (True, 32, 64, None),
    "d256_causal": (True, 32, 256, None),
    "paged16_causal": (True, 32, 128, 16),
    "paged1_causal": (True, 32, 128, 1),
}


def tflops(seconds: float, causal: bool, d: int) -> float:
    flops = B * 4.0 * S * S * H * d / (2 if causal else 1)
    return flops / seconds / 1e12


def bench(fn, *args, iters: int = 10, reps: int = 5) -> float:
    """Median seconds per call over ``reps`` bursts of ``iters`` back-to-back calls (after warm-up)."""
    return median_seconds(fn, *args, iters=iters, reps=reps, warmup=3)


@jax.jit
def _ref_one(q, k, v, causal):
    """float32 attention of one request [S, H, D] (GQA by repeat), lse base 2."""
    group = q.shape[1] // k.shape[1]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    s = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k, precision="highest") / np.sqrt(q.shape[2])
    keep = jnp.where(causal, jnp.tril(jnp.ones(s.shape[1:], bool)), True)
    s = jnp.where(keep, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("hqk,khd->qhd", jnp.exp(s - lse[..., None]), v, precision="highest")
    return o, (lse / np.log(2.0)).T


def make_inputs(key, hkv, d, page_size, dtype=jnp.bfloat16):
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B * S, H, d), dtype)
    k = jax.random.normal(kk, (B * S, hkv, d), dtype)
    v = jax.random.normal(kv, (B * S, hkv, d), dtype)
    if page_size is None:
        return q, k, v, None
    n_pages = B * S // page_size
    perm = np.asarray(jax.random.permutation(kp, n_pages)).astype(np.int32)
    # Logical page i of the concatenated requests lives in cache page perm[i].
    k_cache = jnp.zeros((n_pages, page_size, hkv, d), dtype).at[perm].set(k.reshape(n_pages, page_size, hkv, d))
    v_cache = jnp.zeros((n_pages, page_size, hkv, d), dtype).at[perm].set(v.reshape(n_pages, page_size, hkv, d))
    return q, (k, k_cache), (v, v_cache), perm


FFI_BACKENDS = ("fa2", "fa3")


def run_workload(name: str, backends: list[str], check: bool) -> dict:
    """Check (float32 reference) and time ``name`` on each backend; keys ``<backend>_s``,
    ``<backend>_tflops``, ``<backend>_o_err`` / ``_lse_err`` / ``_ok`` (cudnn: time only)."""
    causal, hkv, d, page_size = WORKLOADS[name]
    q, k, v, perm = make_inputs(jax.random.PRNGKey(hash(name) % 2**31), hkv, d, page_size)
    indptr = np.arange(B + 1, dtype=np.int32) * S
    variant = AttentionVariant(causal=causal)
    if page_size is None:
        spec = BatchSpec.create(indptr, indptr, None, None, page_size=1, num_qo_heads=H, num_kv_heads=hkv,
                                head_dim=d, variant=variant)
        k_run, v_run, k_dense, v_dense = k, v, k, v
    else:
        pages_per = S // page_size
        spec = BatchSpec.create(indptr, np.arange(B + 1, dtype=np.int32) * pages_per, perm,
                                np.full(B, page_size, np.int32), page_size=page_size, num_qo_heads=H,
                                num_kv_heads=hkv, head_dim=d, variant=variant)
        (k_dense, k_run), (v_dense, v_run) = k, v
    row = dict(workload=name, causal=causal, hkv=hkv, d=d, page_size=page_size)
    refs = None
    for bname in backends:
        try:
            if bname == "cudnn":
                fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                          implementation="cudnn"))
                dense = lambda x: x.reshape(B, S, x.shape[1], d)  # noqa: E731
                row["cudnn_s"] = bench(fn, dense(q), dense(k_dense), dense(v_dense))
                row["cudnn_tflops"] = tflops(row["cudnn_s"], causal, d)
                continue
            backend = get_backend(bname)
            reason = backend.unsupported(spec)
            if reason is not None:
                raise RuntimeError(reason)
            plan = backend.plan(spec, PlanCapacity())
            fn = jax.jit(lambda p, q, k, v, b=backend: b.run(p, q, k, v, kv_layout="NHD", return_lse=True))
            if check:
                if refs is None:
                    refs = [_ref_one(q[b * S:(b + 1) * S], k_dense[b * S:(b + 1) * S], v_dense[b * S:(b + 1) * S], causal)
                            for b in range(B)]
                o, lse = fn(plan, q, k_run, v_run)
                errs, lse_errs = [], []
                for b, (o_ref, lse_ref) in enumerate(refs):
                    sl = slice(b * S, (b + 1) * S)
                    errs.append(float(jnp.linalg.norm((o[sl].astype(jnp.float32) - o_ref).ravel())
                                      / jnp.linalg.norm(o_ref.ravel())))
                    lse_errs.append(float(jnp.max(jnp.abs(lse[sl] - lse_ref))))
                row[f"{bname}_o_err"], row[f"{bname}_lse_err"] = max(errs), max(lse_errs)
                row[f"{bname}_ok"] = max(errs) < 1e-2 and max(lse_errs) < 5e-2 and not bool(jnp.isnan(o).any())
                del o, lse
            row[f"{bname}_s"] = bench(fn, plan, q, k_run, v_run)
            row[f"{bname}_tflops"] = tflops(row[f"{bname}_s"], causal, d)
        except Exception as e:  # noqa: BLE001 - report and go on with the next backend
            row[f"{bname}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def run_isolated(backends: list[str], workloads: str, timeout: int, out_dir: Path) -> list[dict]:
    """Each backend's rows from its own child process (at most ``timeout`` s each), merged per workload."""
    merged: dict[str, dict] = {}
    for bname in backends:
        out = out_dir / f"rows_{bname}.json"
        cmd = [sys.executable, __file__, "--quick", "--no-table", "--backends", bname, "--workloads", workloads,
               "--json", str(out)]
        t = time.perf_counter()
        try:
            subprocess.run(cmd, cwd=ROOT, timeout=timeout, check=True)
            rows = json.loads(out.read_text())
        except Exception as e:  # noqa: BLE001 - a crashed backend is reported, not fatal
            rows = [dict(workload=w, **{f"{bname}_error": f"{type(e).__name__}: {str(e)[:150]}"})
                    for w in workloads.split(",")]
        print(f"{bname}: {time.perf_counter() - t:.0f} s", flush=True)
        for r in rows:
            merged.setdefault(r["workload"], {}).update(r)
    return list(merged.values())


def run_pytest(timeout: int, kernel: str = "fa2", defines: str = "") -> int:
    if importlib.util.find_spec("pytest") is None:
        print("pytest is not installed here: GPU tests not run")
        return -1
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "--tb=line", "-p", "no:cacheprovider", "tests/test_ffi.py"]
    try:
        env = dict(os.environ, **({f"JAXINFER_{kernel.upper()}_DEFINES": defines} if defines else {}))
        return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"pytest timed out after {timeout} s")
        return -2


def memcheck_case(backends: list[str]) -> None:
    """A small causal GQA window case, paged and ragged, on each FFI backend of ``backends`` (run
    under compute-sanitizer). 5 query tiles x 64 heads: more work items than an H100 has SMs, so
    fa3's persistent CTAs run several items each (the item boundary and the O stores through Q)."""
    rng = np.random.default_rng(0)
    qo_lens, kv_lens, ps, hq, hkv, d = [37, 0, 5, 300], [100, 20, 64, 250], 16, 64, 2, 128
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    n_pages = [-(-x // ps) for x in kv_lens]
    kv_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    kv_indices = rng.permutation(sum(n_pages) + 2)[: sum(n_pages)].astype(np.int32)
    last = np.array([x - ps * (n - 1) for x, n in zip(kv_lens, n_pages)], np.int32)
    geometry = dict(num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, variant=AttentionVariant(causal=True, window_left=40))
    paged = BatchSpec.create(qo_indptr, kv_indptr, kv_indices, last, page_size=ps, **geometry)
    ragged = BatchSpec.create(qo_indptr, np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32), None, None,
                              page_size=1, **geometry)
    q = jnp.asarray(rng.standard_normal((sum(qo_lens) + 2, hq, d)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((sum(n_pages) + 2, ps, hkv, d)), jnp.bfloat16)
    flat = cache.reshape(-1, hkv, d)[: sum(kv_lens)]
    for bname in (b for b in backends if b in FFI_BACKENDS):
        backend = get_backend(bname)
        for name, spec, kv in (("paged", paged, cache), ("ragged", ragged, flat)):
            if backend.unsupported(spec) is not None:
                continue
            o, lse = backend.run(backend.plan(spec, PlanCapacity()), q, kv, kv, kv_layout="NHD", return_lse=True)
            print(f"memcheck case ran on {bname} ({name}); finite o:", bool(jnp.isfinite(o).all()))


def diagnose(backend_name: str) -> None:
    """Where a kernel goes wrong: one request (Lq = Lk = 300, 2 heads, D 64/128/256, causal and
    not) against numpy float64; prints the error per 16-row group and per 8-column group."""
    rng = np.random.default_rng(1)
    backend = get_backend(backend_name)
    for d in (64, 128, 256):
        for causal in (False, True):
            lq = lk = 300
            q, k, v = (rng.standard_normal((n, 2, d)).astype(np.float32) for n in (lq, lk, lk))
            spec = BatchSpec.create(np.array([0, lq], np.int32), np.array([0, lk], np.int32), None, None, page_size=1,
                                    num_qo_heads=2, num_kv_heads=2, head_dim=d, variant=AttentionVariant(causal=causal))
            bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
            o, lse = backend.run(backend.plan(spec, PlanCapacity()), bf(q), bf(k), bf(v), kv_layout="NHD", return_lse=True)
            o = np.asarray(o.astype(jnp.float32), np.float64)
            qd, kd, vd = (np.asarray(bf(x).astype(jnp.float32), np.float64) for x in (q, k, v))
            s_ = np.einsum("qhd,khd->hqk", qd, kd) / np.sqrt(d)
            if causal:
                s_ = np.where(np.tril(np.ones((lq, lk), bool)), s_, -np.inf)
            p_ = np.exp(s_ - s_.max(-1, keepdims=True))
            ref = np.einsum("hqk,khd->qhd", p_ / p_.sum(-1, keepdims=True), vd)
            err = np.abs(o - ref).max(axis=1)  # [lq, d]
            bad = err > 0.05
            print(f"diagnose {backend_name} d={d} causal={causal}: max err {np.nanmax(err):.3g}, nan {np.isnan(o).sum()}, "
                  f"bad {bad.sum()}/{bad.size}; bad rows by 16-row group {np.add.reduce(bad.reshape(-1, d)[:288].reshape(18, 16, d), (1, 2)).tolist()}; "
                  f"bad cols by 8 {bad.sum(0).reshape(-1, 8).sum(1).tolist()}", flush=True)


def run_memcheck(timeout: int, backends: list[str]) -> str:
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--kernel-name", "kns=_forward_kernel", "--error-exitcode", "9",
           sys.executable, str(Path(__file__).resolve()), "--memcheck-case", "--backends", ",".join(backends)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        return f"not completed: {type(e).__name__}"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
    print(tail)
    return f"exit {proc.returncode}" + (" (no error)" if proc.returncode == 0 else "")


# Tile-shape variants (fa2: Fa2Traits overrides of jaxinfer/csrc/fa2_kernel.cuh; fa3: Shape / register
# overrides of jaxinfer/csrc/fa3_kernel.cuh) timed in child processes: tag -> (kernel, defines).
_D128 = ("JAXINFER_FA2_MT_D128={},JAXINFER_FA2_WARPS_D128={},JAXINFER_FA2_BN_D128={},JAXINFER_FA2_MINB_D128={},"
         "JAXINFER_FA2_STAGES_D128={}")
VARIANTS = {
    # K and V of a tile in one cp.async group, waited for together (the loop of runs 1-5).
    "nosplit": ("fa2", "JAXINFER_FA2_SPLITKV_D64=0,JAXINFER_FA2_SPLITKV_D128=0"),
    # Run 5's head_dim-128 tile: 8 warps of 16 rows, 2 CTAs/SM (128 registers, spills).
    "mt1w8bn64m2": ("fa2", _D128.format(1, 8, 64, 2, 2)),
    # fa3 without ping-pong between the consumer warpgroups (each issues its GEMMs freely).
    "fa3_nopp": ("fa3", "JAXINFER_FA3_PINGPONG=0"),
}
VARIANT_WORKLOADS = {"nosplit": "prefill_causal,d64_causal"}


def run_variant(tag: str, out_dir: Path) -> list[dict]:
    """Time one tile-shape variant in a child process (its own library); rows tagged ``name@tag``."""
    kernel, defines = VARIANTS[tag]
    out = out_dir / f"variant_{tag}.json"
    env = dict(os.environ, **{f"JAXINFER_{kernel.upper()}_DEFINES": defines})
    workloads = VARIANT_WORKLOADS.get(tag, "prefill_causal")
    try:
        subprocess.run([sys.executable, __file__, "--quick", "--no-table", "--json", str(out), "--workloads", workloads,
                        "--backends", kernel], env=env, timeout=150, check=True, capture_output=True)
        return [dict(r, workload=f"{r['workload']}@{tag}") for r in json.loads(out.read_text())]
    except Exception as e:  # noqa: BLE001 - a failed variant is reported, not fatal
        return [dict(workload=f"*@{tag}", error=f"{type(e).__name__}: {str(e)[:120]}")]


def build_libraries(builds: list[tuple[str, str]]) -> None:
    """Build (kernel, defines) libraries concurrently (nvcc is single-threaded per translation unit)."""
    cc = ops.device_arch()
    procs = []
    for kernel, defines in builds:
        try:
            arch = build.kernel_arch(kernel, cc)
        except ValueError:
            continue
        env = dict(os.environ, **{f"JAXINFER_{kernel.upper()}_DEFINES": defines})
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxinfer.backends.ffi.build", "--kernel", kernel, "--arch", arch],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
    for p in procs:
        p.wait()


def ragged_call(backend_name: str, workload: str):
    """``(jitted fn, args)`` of one call of ``backend_name`` on a ragged workload (``cudnn``: its
    dense equivalent), as ncu and ``call_timeline.py`` launch it."""
    causal, hkv, d, page_size = WORKLOADS[workload]
    if page_size is not None:
        raise SystemExit(f"{workload} is paged; ragged workloads only")
    q, k, v, _ = make_inputs(jax.random.PRNGKey(0), hkv, d, None)
    if backend_name == "cudnn":
        dense = lambda x: x.reshape(B, S, x.shape[1], d)  # noqa: E731
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
        return fn, (dense(q), dense(k), dense(v))
    indptr = np.arange(B + 1, dtype=np.int32) * S
    spec = BatchSpec.create(indptr, indptr, None, None, page_size=1, num_qo_heads=H, num_kv_heads=hkv, head_dim=d,
                            variant=AttentionVariant(causal=causal))
    backend = get_backend(backend_name)
    fn = jax.jit(lambda p, q, k, v: backend.run(p, q, k, v, kv_layout="NHD", return_lse=True))
    return fn, (backend.plan(spec, PlanCapacity()), q, k, v)


def ncu_case(backend_name: str, workload: str) -> None:
    """One launch of ``backend_name`` on a ragged workload (profiled by ncu)."""
    fn, args = ragged_call(backend_name, workload)
    jax.block_until_ready(fn(*args))


NCU_KEYS = ("Duration", "Registers Per Thread", "Theoretical Occupancy", "Achieved Occupancy", "Block Limit",
            "Shared Memory Configuration Size", "Issue Slots Busy", "Issued Warp Per Scheduler",
            "Warp Cycles Per Issued Instruction", "No Eligible", "Compute (SM) Throughput", "Memory Throughput",
            "L1/TEX Hit Rate", "L2 Hit Rate", "stall", "Stall")


def run_ncu(out_dir: Path, timeout: int, backend_name: str) -> None:
    """Profile one launch (no clock locking: the card's clocks stay as found); key lines to stdout."""
    sections = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "InstructionStats"]
    cmd = ["ncu", "--clock-control", "none", "-k", f"regex:{backend_name}_forward", "--launch-count", "1"]
    cmd += [a for sec in sections for a in ("--section", sec)]
    cmd += [sys.executable, __file__, "--ncu-case", backend_name]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        print("ncu not completed:", type(e).__name__)
        return
    (out_dir / f"ncu_{backend_name}.txt").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if any(key in line for key in NCU_KEYS):
            print("ncu|", line.strip()[:160])


def dump_sass(out_dir: Path, kernel: str) -> None:
    lib = build.library_path(kernel, build.kernel_arch(kernel, ops.device_arch()), build.env_defines(kernel))
    try:
        proc = subprocess.run(["cuobjdump", "-sass", str(lib)], capture_output=True, text=True, timeout=60)
        (out_dir / f"{kernel}.sass").write_text(proc.stdout[:15_000_000])
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        print("cuobjdump not completed:", type(e).__name__)


def print_table(rows: list[dict], backends: list[str]) -> None:
    """One line per workload: each backend's TFLOP/s (check: o rel. error / lse max error), then
    the first backend's ratio to each other one."""
    first, others = backends[0], backends[1:]
    head = f"{'workload':<24}" + "".join(f"{b + ' TF/s':>17}{'check':>17}" for b in backends if b != "cudnn")
    head += f"{'cudnn TF/s':>17}" if "cudnn" in backends else ""
    print(head + "".join(f"{first + '/' + b:>13}" for b in others))
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<24} ERROR {r['error'][:90]}")
            continue
        line = f"{r['workload']:<24}"
        for b in backends:
            tf = r.get(f"{b}_tflops")
            cell = f"{tf:.1f} ({r[b + '_s'] * 1e3:.2f}ms)" if tf else ("ERR" if f"{b}_error" in r else "-")
            if b == "cudnn":
                line += f"{cell:>17}"
                continue
            chk = (f"{r[b + '_o_err']:.0e}/{r[b + '_lse_err']:.0e}{'' if r[b + '_ok'] else ' BAD'}"
                   if f"{b}_ok" in r else "-")
            line += f"{cell:>17}{chk:>17}"
        for b in others:
            a, c = r.get(f"{first}_tflops"), r.get(f"{b}_tflops")
            line += f"{a / c:>13.2f}" if a and c else f"{'-':>13}"
        print(line)
    for r in rows:
        for key, val in r.items():
            if key.endswith("_error"):
                print(f"{r['workload']} {key}: {val}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for results.json")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--backends", default="fa2,cudnn", help="timed backends, first = the one compared (fa2, fa3, pallas, cudnn)")
    parser.add_argument("--isolate", action="store_true", help="time each backend in its own child process")
    parser.add_argument("--child-timeout", type=int, default=300, help="seconds per backend with --isolate")
    parser.add_argument("--quick", action="store_true", help="workloads only: no memcheck, tests or variants")
    parser.add_argument("--json", default=None, help="write rows here")
    parser.add_argument("--variants", default="nosplit,mt1w8bn64m2", help="tile variants to time ('' for none)")
    parser.add_argument("--pytest-variants", default="", help="variants the GPU tests also run on")
    parser.add_argument("--no-memcheck", action="store_true", help="skip compute-sanitizer")
    parser.add_argument("--no-profile", action="store_true", help="skip the SASS dump and ncu")
    parser.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memcheck-case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ncu-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ncu-workload", default="noncausal", help="the workload --ncu-case launches")
    parser.add_argument("--diagnose", default=None, help="print where BACKEND's output is wrong on small cases, then exit")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    ffi = [b for b in backends if b in FFI_BACKENDS]
    if args.memcheck_case:
        memcheck_case(backends)
        return
    if args.ncu_case:
        ncu_case(args.ncu_case, args.ncu_workload)
        return
    if args.diagnose:
        diagnose(args.diagnose)
        return
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "| jax", jax.__version__, "| defines:",
          {k: os.environ.get(f"JAXINFER_{k.upper()}_DEFINES", "") for k in FFI_BACKENDS})
    variants = {tag: VARIANTS[tag] for tag in args.variants.split(",") if tag}
    t = time.perf_counter()
    build_libraries([(k, ",".join(build.env_defines(k))) for k in ffi])
    for k in ffi:
        try:
            ops.ensure_registered(k)
        except Exception as e:  # noqa: BLE001 - the backend's rows will say it
            print(f"{k} unavailable: {e}"[:2000])
    print(f"build+register: {time.perf_counter() - t:.1f} s", flush=True)
    if not args.quick:
        variant_build = threading.Thread(target=build_libraries, args=(list(variants.values()),))
        variant_build.start()
        # Small cases first, in child processes: a faulting kernel there leaves this one usable.
        print("pytest -m gpu:", run_pytest(timeout=240), flush=True)
        for tag in filter(None, args.pytest_variants.split(",")):
            kernel, defines = VARIANTS[tag]
            print(f"pytest -m gpu @{tag}:", run_pytest(timeout=180, kernel=kernel, defines=defines), flush=True)
    out_dir = Path(args.out or "/tmp")
    if args.isolate:
        rows = run_isolated(backends, args.workloads, timeout=args.child_timeout, out_dir=out_dir)
    else:
        rows = []
        for name in args.workloads.split(","):
            rows.append(run_workload(name, backends, check=True))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.quick:
        if not args.no_table:
            print_table(rows, backends)
        return
    if not args.no_profile and ffi:
        for k in ffi:
            dump_sass(out_dir, k)
        run_ncu(out_dir, timeout=120, backend_name=ffi[0])
    variant_build.join()
    variant_rows = []
    for tag in variants:
        variant_rows += run_variant(tag, out_dir)
        print(json.dumps(variant_rows[-1]), flush=True)
    if args.out:
        Path(args.out, "results.json").write_text(json.dumps(rows + variant_rows, indent=1))
    if not args.no_memcheck:  # last: the slowest step, and the one a tight time limit can spare
        print("memcheck:", run_memcheck(timeout=120, backends=ffi), flush=True)
    print(f"\n== {', '.join(backends)}; {dev.device_kind}, B={B} S={S} Hq={H} bf16; variants: {variants}")
    print_table(rows, backends)
    if variant_rows:
        print_table(variant_rows, sorted({k[:-7] for r in variant_rows for k in r if k.endswith("_tflops")}) or ["fa2"])


if __name__ == "__main__":
    main()
