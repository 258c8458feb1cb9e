"""GPU check and timing of the ``"fa2"`` backend, in one run (built for the device's lease).

Steps: build the kernel library; run ``pytest -m gpu tests/test_ffi.py`` in child processes (also
on the libraries of ``--pytest-variants``); at full size, compare every timed workload with a
float32 XLA reference on the GPU (relative Frobenius error of o, max error of lse), time it and
cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")`` on the dense equivalent); dump the
SASS and profile one launch with ncu (clocks left alone); time tile-shape variants (``VARIANTS``)
in child processes; run compute-sanitizer memcheck on a small case; print a table last.

TFLOP/s count ``4 * S * S * Hq * D`` per request, halved when causal.

    python benchmarks/ffi_gpu.py --out DIR            # everything
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

from jaxinfer.batch import BatchSpec, PlanCapacity  # noqa: E402
from jaxinfer.bench.harness import median_seconds  # noqa: E402
from jaxinfer.ffi import ops  # noqa: E402
from jaxinfer.ffi.backend import get_backend  # noqa: E402
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


def run_workload(name: str, check: bool) -> dict:
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
    backend = get_backend("fa2")
    reason = backend.unsupported(spec)
    if reason is not None:
        raise RuntimeError(reason)
    plan = backend.plan(spec, PlanCapacity())
    fa2 = jax.jit(lambda p, q, k, v: backend.run(p, q, k, v, kv_layout="NHD", return_lse=True))
    row = dict(workload=name, causal=causal, hkv=hkv, d=d, page_size=page_size)
    if check:
        o, lse = fa2(plan, q, k_run, v_run)
        errs, lse_errs = [], []
        for b in range(B):
            sl = slice(b * S, (b + 1) * S)
            o_ref, lse_ref = _ref_one(q[sl], k_dense[sl], v_dense[sl], causal)
            errs.append(float(jnp.linalg.norm((o[sl].astype(jnp.float32) - o_ref).ravel()) / jnp.linalg.norm(o_ref.ravel())))
            lse_errs.append(float(jnp.max(jnp.abs(lse[sl] - lse_ref))))
        row["o_rel_err"] = max(errs)
        row["lse_max_err"] = max(lse_errs)
        row["nan"] = bool(jnp.isnan(o).any())
        row["ok"] = row["o_rel_err"] < 1e-2 and row["lse_max_err"] < 5e-2 and not row["nan"]
    row["fa2_s"] = bench(fa2, plan, q, k_run, v_run)
    row["fa2_tflops"] = tflops(row["fa2_s"], causal, d)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    dense = lambda x: x.reshape(B, S, x.shape[1], d)  # noqa: E731
    try:
        row["cudnn_s"] = bench(cudnn, dense(q), dense(k_dense), dense(v_dense))
        row["cudnn_tflops"] = tflops(row["cudnn_s"], causal, d)
    except Exception as e:  # noqa: BLE001 - cuDNN may not take a shape; the row still reports fa2
        row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def run_pytest(timeout: int, defines: str = "") -> int:
    if importlib.util.find_spec("pytest") is None:
        print("pytest is not installed here: GPU tests not run")
        return -1
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "--tb=line", "-p", "no:cacheprovider", "tests/test_ffi.py"]
    try:
        env = dict(os.environ, JAXINFER_FA2_DEFINES=defines)
        return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"pytest timed out after {timeout} s")
        return -2


def memcheck_case() -> None:
    """A small paged causal GQA case (run under compute-sanitizer)."""
    rng = np.random.default_rng(0)
    qo_lens, kv_lens, ps, hq, hkv, d = [37, 0, 5], [100, 20, 64], 16, 4, 2, 128
    n_pages = [-(-x // ps) for x in kv_lens]
    kv_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    kv_indices = rng.permutation(sum(n_pages) + 2)[: sum(n_pages)].astype(np.int32)
    last = np.array([x - ps * (n - 1) for x, n in zip(kv_lens, n_pages)], np.int32)
    spec = BatchSpec.create(np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32), kv_indptr, kv_indices, last,
                            page_size=ps, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                            variant=AttentionVariant(causal=True, window_left=40))
    backend = get_backend("fa2")
    plan = backend.plan(spec, PlanCapacity())
    q = jnp.asarray(rng.standard_normal((sum(qo_lens) + 2, hq, d)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((sum(n_pages) + 2, ps, hkv, d)), jnp.bfloat16)
    o, lse = backend.run(plan, q, cache, cache, kv_layout="NHD", return_lse=True)
    print("memcheck case ran; finite o:", bool(jnp.isfinite(o).all()))


def run_memcheck(timeout: int) -> str:
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--kernel-name", "kns=fa2_forward", "--error-exitcode", "9",
           sys.executable, str(Path(__file__).resolve()), "--memcheck-case"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        return f"not completed: {type(e).__name__}"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
    print(tail)
    return f"exit {proc.returncode}" + (" (no error)" if proc.returncode == 0 else "")


# Tile-shape variants (csrc/fa2_kernel.cuh Fa2Traits overrides) timed in child processes.
_D128 = ("JAXINFER_FA2_MT_D128={},JAXINFER_FA2_WARPS_D128={},JAXINFER_FA2_BN_D128={},JAXINFER_FA2_MINB_D128={},"
         "JAXINFER_FA2_STAGES_D128={}")
VARIANTS = {
    # K and V of a tile in one cp.async group, waited for together (the loop of runs 1-5).
    "nosplit": "JAXINFER_FA2_SPLITKV_D64=0,JAXINFER_FA2_SPLITKV_D128=0",
    # Run 5's head_dim-128 tile: 8 warps of 16 rows, 2 CTAs/SM (128 registers, spills).
    "mt1w8bn64m2": _D128.format(1, 8, 64, 2, 2),
}
VARIANT_WORKLOADS = {"nosplit": "prefill_causal,d64_causal"}


def run_variant(tag: str, defines: str, out_dir: Path) -> list[dict]:
    """Time one tile-shape variant in a child process (its own library); rows tagged ``name@tag``."""
    out = out_dir / f"variant_{tag}.json"
    env = dict(os.environ, JAXINFER_FA2_DEFINES=defines)
    workloads = VARIANT_WORKLOADS.get(tag, "prefill_causal")
    try:
        subprocess.run([sys.executable, __file__, "--quick", "--json", str(out), "--workloads", workloads],
                       env=env, timeout=150, check=True, capture_output=True)
        return [dict(r, workload=f"{r['workload']}@{tag}") for r in json.loads(out.read_text())]
    except Exception as e:  # noqa: BLE001 - a failed variant is reported, not fatal
        return [dict(workload=f"*@{tag}", error=f"{type(e).__name__}: {str(e)[:120]}")]


def build_variants(variants: dict[str, str]) -> None:
    """Build the variants' libraries concurrently (nvcc is single-threaded per translation unit)."""
    arch = f"sm_{ops.device_arch()}"
    procs = [subprocess.Popen([sys.executable, "-m", "jaxinfer.ffi.build", "--arch", arch], cwd=ROOT,
                              env=dict(os.environ, JAXINFER_FA2_DEFINES=d), stdout=subprocess.DEVNULL)
             for d in variants.values()]
    for p in procs:
        p.wait()


def ncu_case() -> None:
    """One fa2 launch of the non-causal workload (profiled by ncu)."""
    causal, hkv, d, _ = WORKLOADS["noncausal"]
    q, k, v, _ = make_inputs(jax.random.PRNGKey(0), hkv, d, None)
    indptr = np.arange(B + 1, dtype=np.int32) * S
    spec = BatchSpec.create(indptr, indptr, None, None, page_size=1, num_qo_heads=H, num_kv_heads=hkv, head_dim=d,
                            variant=AttentionVariant(causal=causal))
    backend = get_backend("fa2")
    jax.block_until_ready(backend.run(backend.plan(spec, PlanCapacity()), q, k, v, kv_layout="NHD", return_lse=True))


NCU_KEYS = ("Duration", "Registers Per Thread", "Theoretical Occupancy", "Achieved Occupancy", "Block Limit",
            "Shared Memory Configuration Size", "Issue Slots Busy", "Issued Warp Per Scheduler",
            "Warp Cycles Per Issued Instruction", "No Eligible", "Compute (SM) Throughput", "Memory Throughput",
            "L1/TEX Hit Rate", "L2 Hit Rate", "stall", "Stall")


def run_ncu(out_dir: Path, timeout: int) -> None:
    """Profile one launch (no clock locking: the card's clocks stay as found); key lines to stdout."""
    sections = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "InstructionStats"]
    cmd = ["ncu", "--clock-control", "none", "-k", "regex:fa2_forward", "--launch-count", "1"]
    cmd += [a for sec in sections for a in ("--section", sec)] + [sys.executable, __file__, "--ncu-case"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        print("ncu not completed:", type(e).__name__)
        return
    (out_dir / "ncu.txt").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if any(key in line for key in NCU_KEYS):
            print("ncu|", line.strip()[:160])


def dump_sass(out_dir: Path) -> None:
    from jaxinfer.ffi import build

    lib = build.library_path("fa2", f"sm_{ops.device_arch()}", build.env_defines())
    try:
        proc = subprocess.run(["cuobjdump", "-sass", str(lib)], capture_output=True, text=True, timeout=60)
        (out_dir / "fa2.sass").write_text(proc.stdout[:15_000_000])
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        print("cuobjdump not completed:", type(e).__name__)


def print_table(rows: list[dict]) -> None:
    print(f"{'workload':<28}{'check':>18}{'fa2 ms':>9}{'fa2 TF/s':>10}{'cudnn ms':>10}{'cudnn TF/s':>11}{'ratio':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<28} ERROR {r['error'][:90]}")
            continue
        chk = f"{r['o_rel_err']:.1e}/{r['lse_max_err']:.0e}{'' if r['ok'] else ' BAD'}" if "ok" in r else "-"
        cd = r.get("cudnn_tflops")
        cd_s = f"{r['cudnn_s'] * 1e3:>10.3f}{cd:>11.1f}{r['fa2_tflops'] / cd:>7.2f}" if cd else "  cudnn n/a"
        print(f"{r['workload']:<28}{chk:>18}{r['fa2_s'] * 1e3:>9.3f}{r['fa2_tflops']:>10.1f}{cd_s}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for results.json")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="workloads only: no memcheck, tests or variants")
    parser.add_argument("--json", default=None, help="write rows here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="tile variants to time ('' for none)")
    parser.add_argument("--pytest-variants", default="", help="variants the GPU tests also run on")
    parser.add_argument("--no-memcheck", action="store_true", help="skip compute-sanitizer")
    parser.add_argument("--no-profile", action="store_true", help="skip the SASS dump and ncu")
    parser.add_argument("--memcheck-case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ncu-case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memcheck_case:
        memcheck_case()
        return
    if args.ncu_case:
        ncu_case()
        return
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "| jax", jax.__version__, "| defines:", os.environ.get("JAXINFER_FA2_DEFINES", ""))
    t = time.perf_counter()
    ops.ensure_registered("fa2")
    print(f"build+register: {time.perf_counter() - t:.1f} s")
    variants = {tag: VARIANTS[tag] for tag in args.variants.split(",") if tag}
    if not args.quick:
        variant_build = threading.Thread(target=build_variants, args=(variants,))
        variant_build.start()
        # Small cases first, in child processes: a faulting kernel there leaves this one usable.
        print("pytest -m gpu:", run_pytest(timeout=180))
        for tag in filter(None, args.pytest_variants.split(",")):
            print(f"pytest -m gpu @{tag}:", run_pytest(timeout=180, defines=VARIANTS[tag]), flush=True)
    rows = []
    for name in args.workloads.split(","):
        try:
            rows.append(run_workload(name, check=True))
        except Exception as e:  # noqa: BLE001 - report and go on to the next workload
            rows.append(dict(workload=name, error=f"{type(e).__name__}: {e}"))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.quick:
        print_table(rows)
        return
    out_dir = Path(args.out or "/tmp")
    if not args.no_profile:
        dump_sass(out_dir)
        run_ncu(out_dir, timeout=120)
    variant_build.join()
    variant_rows = []
    for tag, defines in variants.items():
        variant_rows += run_variant(tag, defines, out_dir)
        print(json.dumps(variant_rows[-1]), flush=True)
    if args.out:
        Path(args.out, "results.json").write_text(json.dumps(rows + variant_rows, indent=1))
    if not args.no_memcheck:  # last: the slowest step, and the one a tight time limit can spare
        print("memcheck:", run_memcheck(timeout=90))
    print(f"\n== fa2 vs cuDNN, {dev.device_kind}, B={B} S={S} Hq={H} bf16; variants: {variants}")
    print_table(rows + variant_rows)


if __name__ == "__main__":
    main()
