"""Output of ``jaxinfer-bench``: the table, the JSON records and the throughput chart."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; the benchmark machines have no display
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402

from jaxinfer.bench.harness import L2_BYTES, Ceilings  # noqa: E402

RECORDS_FILE = "records.jsonl"
CHART_FILE = "throughput.png"
UNITS = ("TB/s", "TFLOP/s")


def cpu_notice(device: str) -> str:
    return (
        f"NOTE: this ran on a CPU ({device}, {os.cpu_count()} cores) with scaled-down workloads. "
        "CPU timings are not GPU performance; they only show that the benchmark runs and is correct."
    )


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(records: Sequence[dict], ceilings: Ceilings | None) -> str:
    """One row per record: latency, throughput, speedup over xla, errors, plan time, floor."""
    headers = ["workload", "backend", "status", "latency ms", "throughput", "vs xla", "max err",
               "err f64", "plan ms"]
    if ceilings:
        headers += ["floor ms", "x floor"]
    rows = []
    for r in records:
        row = [r["workload"], r["backend"], r["status"], _fmt(r["latency_ms"], ".4g"),
               "" if r["throughput"] is None else f"{r['throughput']:.3g} {r['unit']}",
               _fmt(r["speedup"], ".2f"), _fmt(r["max_error"], ".1e"), _fmt(r["max_error_f64"], ".1e"),
               _fmt(r["plan_ms"], ".3g")]
        if ceilings:
            row += [_fmt(r["floor_ms"], ".4g"), _fmt(r["of_floor"], ".2f")]
        rows.append(row)
    return tabulate(rows, headers=headers)


def notes(records: Sequence[dict], ceilings: Ceilings | None) -> list[str]:
    """Lines under the table: ceilings, cascade against plain decode, why runs did not happen."""
    lines = []
    if ceilings:
        lines.append(
            f"ceilings: copy {ceilings.copy_tb_s:.3g} TB/s (read + write of {ceilings.copy_bytes / 2**30:.3g} GiB), "
            f"bf16 matmul {ceilings.matmul_tflop_s:.3g} TFLOP/s ({ceilings.matmul_n}^3); "
            "floor = max(bytes / copy, FLOPs / matmul), x floor = latency / floor"
        )
    if any(r["platform"] == "gpu" for r in records):
        rotated = sorted({r["workload"] for r in records if (r["input_copies"] or 1) > 1})
        l2 = f"2x the {L2_BYTES >> 20} MiB L2"
        if rotated:
            lines.append(f"inputs rotated among copies (they fit in {l2}): {', '.join(rotated)}")
        else:
            lines.append(f"no workload's inputs fit in {l2}: every repeat reads HBM, no input rotation needed")
    latency = {(r["workload"], r["backend"]): r["latency_ms"] for r in records if r["status"] == "ok"}
    for (workload, backend), ms in latency.items():
        flat = latency.get(("cascade_flat", backend))
        if workload == "cascade" and flat:
            lines.append(f"cascade vs plain batch decode of the same batch ({backend}): {flat / ms:.2f}x faster")
    lines += [f"{r['workload']} / {r['backend']}: {r['status']}: {r['reason']}" for r in records if r["reason"]]
    return lines


def write_records(records: Sequence[dict], out_dir: Path) -> Path:
    """``out_dir/records.jsonl``: one JSON record per line."""
    path = out_dir / RECORDS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def plot(records: Sequence[dict], ceilings: Ceilings | None, path: Path) -> Path:
    """Bar chart of throughput per workload and backend: one panel per unit, ceilings dashed."""
    ok = [r for r in records if r["status"] == "ok"]
    units = [u for u in UNITS if any(r["unit"] == u for r in ok)] or [UNITS[0]]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    fig, axes = plt.subplots(1, len(units), figsize=(7 * len(units), 4.5), squeeze=False)
    for ax, unit in zip(axes[0], units):
        workloads = list(dict.fromkeys(r["workload"] for r in ok if r["unit"] == unit))
        value = {(r["workload"], r["backend"]): r["throughput"] for r in ok if r["unit"] == unit}
        width = 0.8 / max(len(backends), 1)
        for i, backend in enumerate(backends):
            xs = [w + (i - (len(backends) - 1) / 2) * width for w in range(len(workloads))]
            ax.bar(xs, [value.get((w, backend), 0.0) for w in workloads], width, label=backend)
        if ceilings:
            ceiling = ceilings.copy_tb_s if unit == "TB/s" else ceilings.matmul_tflop_s
            ax.axhline(ceiling, linestyle="--", color="gray", label="copy" if unit == "TB/s" else "matmul")
        ax.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.legend(fontsize="small")
    device = records[0]["device"] if records else ""
    fig.suptitle(f"jaxinfer-bench throughput on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
