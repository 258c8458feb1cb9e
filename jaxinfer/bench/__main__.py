"""``python -m jaxinfer.bench`` / ``jaxinfer-bench``: the benchmark CLI (see benchmarks/README.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from jaxinfer.bench import e2e, fib, harness, peers, report
from jaxinfer.bench.workloads import E2E, GROUPS, SIZE_FACTORS, WORKLOADS, expand, select

GPU_REPEATS, CPU_REPEATS = 20, 3
GPU_WARMUP = 3  # calls before timing on GPU (the first compiles); 1 on CPU
GPU_MIN_REPEAT_S = 5e-3  # a timed repeat's shorter burst of back-to-back calls on GPU (harness.Timer)
GPU_PLAN_REPEATS, CPU_PLAN_REPEATS = 20, 2  # timed plan() calls per (workload, backend), after one warm-up


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxinfer-bench", description="Benchmark jaxinfer's attention backends.")
    groups = "; ".join(f"{g}: {','.join(m)}" for g, m in GROUPS.items() if g != "all")
    p.add_argument("--workloads", help=f"comma-separated workload or group names (default: the default group). "
                   f"Workloads: {','.join([*WORKLOADS, E2E])}. Groups: {groups}; all: every workload")
    p.add_argument("--backends", help=f"comma-separated from {','.join(harness.BACKENDS)}; "
                   "default: those that can run here (xla only on CPU)")
    p.add_argument("--repeats", type=int, help=f"timed repeats (default {GPU_REPEATS} on GPU, {CPU_REPEATS} on CPU)")
    p.add_argument("--size", choices=tuple(SIZE_FACTORS), help="full, cpu (1/8 of the sizes) or tiny (1/64, "
                   "for tests); default full on GPU, cpu otherwise")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory of records.jsonl, table.md "
                   "and throughput.png (default bench_out/)")
    p.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=None,
                   help="measure copy bandwidth and bf16 matmul rate and report each workload's floor "
                   "(default on GPU)")
    p.add_argument("--min-repeat-ms", type=float, help="on GPU, a timed repeat's shorter burst: C back-to-back "
                   f"calls lasting at least this long (default {GPU_MIN_REPEAT_S * 1e3:g}); the other burst has 2C "
                   "calls and the latency is their difference over C")
    p.add_argument("--plan-repeats", type=int, help="timed plan() calls per workload and backend, after one "
                   f"warm-up (default {GPU_PLAN_REPEATS} on GPU, {CPU_PLAN_REPEATS} on CPU)")
    p.add_argument("--kv-dtype", choices=("bf16", "e4m3", "e5m2"), default="bf16",
                   help="KV cache dtype: e4m3/e5m2 runs each attention workload over the bf16 cache and then over "
                   "an fp8 cache quantized from it (per-KV-head scales), in the same run, and reports the fp8 "
                   "throughput counting fp8 bytes and its ratio to the bf16 cache (default bf16: the bf16 cache "
                   "only; the e2e step stays bf16)")
    p.add_argument("--fib-out", type=Path, help="also write the runs as a FlashInfer-Bench trace set "
                   "(definitions/, workloads/, traces/, blob/) in this directory, for jaxinfer.apply and "
                   "flashinfer-bench's tools; bf16 decode and prefill workloads only (see jaxinfer/bench/fib.py)")
    p.add_argument("--peers", help=f"comma-separated from {','.join(peers.PEER_NAMES)}: also run these libraries' "
                   "kernels on the same inputs in the same process, timed the same way, and report jaxinfer's best "
                   "backend against each (a peer that does not import is reported and left out; "
                   "benchmarks/README.md says how to stage them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = p.parse_args(argv)
    args.backends = _names(args.backends)
    unknown = [b for b in args.backends or () if b not in harness.BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {', '.join(harness.BACKENDS)}")
    args.peers = _names(args.peers) or []
    unknown = [n for n in args.peers if n not in peers.PEER_NAMES]
    if unknown:
        p.error(f"unknown peers {unknown}; choose from {', '.join(peers.PEER_NAMES)}")
    names = _names(args.workloads)
    size = args.size or ("full" if harness.on_gpu() else "cpu")
    try:
        expanded = expand(names)
        args.workloads = select(names, size)
    except ValueError as e:
        p.error(str(e))
    args.e2e = e2e.E2EWorkload().scaled(SIZE_FACTORS[size]) if E2E in expanded else None
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 when a jaxinfer backend errored or disagreed with the reference
    (a peer's failure is reported, not counted)."""
    args = parse_args(argv)
    gpu = harness.on_gpu()
    env = harness.environment()
    if not gpu:
        print(report.cpu_notice(env["device"]))
    loaded, peer_lines = peers.load(args.peers)
    for line in peer_lines:
        print(line)
    min_repeat_s = (args.min_repeat_ms / 1e3 if args.min_repeat_ms else GPU_MIN_REPEAT_S) if gpu else 0.0
    timer = harness.Timer(args.repeats or (GPU_REPEATS if gpu else CPU_REPEATS), warmup=GPU_WARMUP if gpu else 1,
                          min_repeat_s=min_repeat_s)
    ceilings = None
    if args.ceilings if args.ceilings is not None else gpu:
        ceilings = harness.measure_ceilings(timer, full=gpu)
    records = harness.run_benchmark(
        args.workloads, args.backends or harness.default_backends(), timer, ceilings=ceilings, seed=args.seed,
        plan_repeats=args.plan_repeats or (GPU_PLAN_REPEATS if gpu else CPU_PLAN_REPEATS), progress=args.progress,
        kv_dtypes=("bf16",) if args.kv_dtype == "bf16" else ("bf16", args.kv_dtype), peers=loaded,
    )
    if args.e2e is not None:
        records += e2e.run_e2e(args.e2e, args.backends or harness.default_backends(), timer)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["jaxinfer-bench", *(sys.argv[1:] if argv is None else argv)])
    paths = [report.write_records(records, args.out),
             report.write_markdown(records, ceilings, command, args.out, peer_lines),
             report.plot(records, ceilings, args.out / report.CHART_FILE)]
    if args.fib_out is not None:
        own = [r for r in records if not r.get("peer")]
        fib_files = fib.write_trace_set(own, args.workloads, args.fib_out, seed=args.seed)
        paths.append(f"{args.fib_out} ({len(fib_files)} FlashInfer-Bench files)")
    print(report.table(records, ceilings))
    for line in report.notes(records, ceilings) + e2e.latency_lines(records) + peer_lines:
        print(line)
    print("wrote " + ", ".join(map(str, paths)))
    if not gpu:
        print(report.cpu_notice(env["device"]))
    return int(any(r["status"] in ("error", "mismatch") for r in records if not r.get("peer")))


if __name__ == "__main__":
    sys.exit(main())
