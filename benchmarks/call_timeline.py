"""Where the time of one prefill_causal call goes on the GPU (B=4, S=4096, H=32, D=128, bf16).

For each backend: the per-call wall time of back-to-back calls (as ``ffi_gpu.py`` times them),
then a ``jax.profiler`` trace (CUPTI) of ``--calls`` back-to-back calls, with the SM clock and
the board power sampled by ``nvidia-smi`` every 50 ms meanwhile. From the trace: each kernel's
total time per call and the time the GPU stream had no kernel running, which separate the kernel
from launch gaps, and the clock log separates a slower kernel from a lower clock.

Usage (GPU machine, repository root): ``PYTHONPATH=. python3 benchmarks/call_timeline.py --out DIR``
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ffi_gpu  # noqa: E402  (the workloads, inputs and backends of benchmarks/ffi_gpu.py)


def gpu_kernels(trace_dir: Path) -> list[tuple[str, float, float]]:
    """``(name, start us, duration us)`` of the kernel and memset events on GPU stream lines of
    the perfetto trace under ``trace_dir``."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        return []
    events = json.load(gzip.open(files[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["name"], e["pid"], e.get("tid"))] = e["args"]["name"]
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        process = names.get(("process_name", e["pid"], None), "")
        thread = names.get(("thread_name", e["pid"], e.get("tid")), "")
        if "GPU" in process and "Stream" in thread:
            out.append((e["name"], float(e["ts"]), float(e.get("dur", 0.0))))
    return sorted(out, key=lambda t: t[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="fa3,cudnn")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.backends.split(","):
        fn, fn_args = ffi_gpu.ragged_call(name, "prefill_causal")
        wall = ffi_gpu.bench(fn, *fn_args)
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-lms", "50"], stdout=subprocess.PIPE, text=True)
        trace_dir = out / f"trace_{name}"
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(args.calls):
                result = fn(*fn_args)
            jax.block_until_ready(result)
        smi.terminate()
        samples = [tuple(float(x) for x in line.split(",")) for line in smi.communicate()[0].splitlines()
                   if line.count(",") == 1]
        kernels = gpu_kernels(trace_dir)
        print(f"{name}: {wall * 1e3:.3f} ms per call untraced; {len(samples)} clock samples: SM "
              f"{np.median([s[0] for s in samples]) if samples else float('nan'):.0f} MHz median, power "
              f"{np.median([s[1] for s in samples]) if samples else float('nan'):.0f} W median")
        if not kernels:
            print(f"  no GPU stream events in the trace (CUPTI?); files: {[p.name for p in trace_dir.rglob('*')]}")
            continue
        span = kernels[-1][1] + kernels[-1][2] - kernels[0][1]
        busy = collections.defaultdict(float)
        for kname, _, dur in kernels:
            busy[kname[:60]] += dur
        idle = span - sum(busy.values())
        print(f"  traced span {span / args.calls:.1f} us per call, stream idle {idle / args.calls:.1f} us per call")
        for kname, total in sorted(busy.items(), key=lambda kv: -kv[1]):
            print(f"  {total / args.calls:9.1f} us per call  {kname}")


if __name__ == "__main__":
    main()
