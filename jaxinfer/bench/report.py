"""Output of ``jaxinfer-bench``: the table, the JSON records, the markdown summary and the chart."""

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
MARKDOWN_FILE = "table.md"
UNITS = ("TB/s", "TFLOP/s")
PEERS = ("cudnn", "dense-xla", "dense-cudnn")


def cpu_notice(device: str) -> str:
    return (
        f"NOTE: this ran on a CPU ({device}, {os.cpu_count()} cores) with scaled-down workloads. "
        "CPU timings are not GPU performance; they only show that the benchmark runs and is correct."
    )


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(records: Sequence[dict], ceilings: Ceilings | None) -> str:
    """One row per record: latency, throughput, same-run ratios to xla and cuDNN, of a peer's record
    jaxinfer's best backend against it (best/peer), errors, plan() time (until it returns / until
    the plan is on the device), floor."""
    headers = ["workload", "backend", "status", "latency ms", "throughput", "vs xla", "vs cudnn", "best/peer",
               "max err", "err f64", "plan call ms", "plan ms"]
    if ceilings:
        headers += ["floor ms", "x floor"]
    rows = []
    for r in records:
        row = [r["workload"], r["backend"], r["status"], _fmt(r["latency_ms"], ".4g"),
               "" if r["throughput"] is None else f"{r['throughput']:.3g} {r['unit']}",
               _fmt(r["speedup"], ".2f"), _fmt(r.get("vs_cudnn"), ".2f"), _fmt(r.get("best_vs_peer"), ".2f"),
               _fmt(r["max_error"], ".1e"),
               _fmt(r["max_error_f64"], ".1e"), _fmt(r.get("plan_call_ms"), ".3g"), _fmt(r["plan_ms"], ".3g")]
        if ceilings:
            row += [_fmt(r["floor_ms"], ".4g"), _fmt(r["of_floor"], ".2f")]
        rows.append(row)
    return tabulate(rows, headers=headers)


def notes(records: Sequence[dict], ceilings: Ceilings | None) -> list[str]:
    """Lines under the table: timing method, ceilings, cascade against plain decode, fused RoPE
    against plain decode, why runs did not happen."""
    timings = list(dict.fromkeys(r["timing"] for r in records if r.get("timing")))
    lines = [f"timing: {t}" for t in timings]
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
        plain = latency.get(("decode_uniform", backend))
        if workload == "decode_rope" and plain:
            lines.append(f"decode_rope (fused ROPE_LLAMA) vs decode_uniform, same inputs ({backend}): "
                         f"{ms / plain:.3f}x the latency")
    lines += fp8_lines(records)
    lines += peer_lines(records)
    lines += [f"{r['workload']} / {r['backend']}: {r['status']}: {r['reason']}" for r in records if r["reason"]]
    return lines


def fp8_lines(records: Sequence[dict]) -> list[str]:
    """One line per fp8-cache record that has its bf16-cache twin: the same batch's tokens/s
    ratio (same backend, same run), the throughput counting the cache's bytes and the error."""
    lines = []
    for r in records:
        if r.get("vs_bf16") is None or r["status"] != "ok":
            continue
        err = "" if r["max_error"] is None else f", max rel. error {r['max_error']:.1e} vs the float32 reference"
        lines.append(f"{r['workload']} ({r['backend']}): {r['vs_bf16']:.2f}x the speed of the bf16 cache "
                     f"(its latency / this one: the tokens/s ratio of a decode batch), {r['throughput']:.3g} "
                     f"{r['unit']} counting {r['kv_dtype']} bytes{err} on dequantized values")
    return lines


def peer_lines(records: Sequence[dict]) -> list[str]:
    """One line per same-run peer record that ran: its throughput against jaxinfer's fastest
    backend on the same inputs, same timing (best / peer: the peer's latency over jaxinfer's)."""
    lines = []
    for r in records:
        if not r.get("peer") or r["status"] not in ("ok", "unchecked") or not r.get("best_latency_ms"):
            continue
        lines.append(f"{r['workload']}: jaxinfer {r['best_backend']} {_throughput(r, r['best_latency_ms'])} vs "
                     f"{r['backend']} {_throughput(r, r['latency_ms'])} ({r['status']}): best / peer "
                     f"{r['best_vs_peer']:.2f}x")
    return lines


def _throughput(r: dict, latency_ms: float) -> str:
    """``r``'s work (bytes or FLOPs, by its unit) over ``latency_ms``, with the unit."""
    work = r["flops"] if r["unit"] == "TFLOP/s" else r["bytes"]
    return f"{work / (latency_ms * 1e-3) / 1e12:.3g} {r['unit']}"


def write_records(records: Sequence[dict], out_dir: Path) -> Path:
    """``out_dir/records.jsonl``: one JSON record per line."""
    path = out_dir / RECORDS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _best(rows: Sequence[dict]) -> dict | None:
    """The fastest jaxinfer backend's record among ``rows`` (status ok; peers and xla excluded)."""
    own = [r for r in rows if r["status"] == "ok" and r["backend"] not in PEERS and r["backend"] != "xla"
           and not r.get("peer")]
    return min(own, key=lambda r: r["latency_ms"], default=None)


def markdown(records: Sequence[dict], ceilings: Ceilings | None, command: str, peers: Sequence[str] = ()) -> str:
    """The run as markdown for benchmarks/RESULTS.md: a header (device, commit, date, command,
    timing, the same-run peers: ``peers`` are the lines of :func:`jaxinfer.bench.peers.load`),
    then one row per workload with each backend's throughput (latency) and the fastest jaxinfer
    backend's same-run ratios to cuDNN and to the xla backend; the same-run peers against that
    backend; then plan() times."""
    if not records:
        return ""
    env = records[0]
    peer_records = [r for r in records if r.get("peer")]
    records = [r for r in records if not r.get("peer")]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    by = {(r["workload"], r["backend"]): r for r in records}
    lines = [
        f"- device: {env['device']} ({env['platform']}), jax {env['jax_version']}",
        f"- commit: `{env['git_commit']}`, date {env['date']}",
        f"- command: `{command}`",
        *[f"- timing: {t}" for t in dict.fromkeys(r["timing"] for r in records if r.get("timing"))],
    ]
    if ceilings:
        lines.append(f"- ceilings: copy {ceilings.copy_tb_s:.3g} TB/s, bf16 matmul {ceilings.matmul_tflop_s:.3g} TFLOP/s")
    lines += [f"- {line}" for line in peers]
    lines += ["", "| workload | unit | " + " | ".join(backends) + " | best | best / cuDNN | best / xla |",
              "| --- " * (len(backends) + 5) + "|"]
    for w in workloads:
        rows = [by[(w, b)] for b in backends if (w, b) in by]
        cells = []
        for b in backends:
            r = by.get((w, b))
            if r is None:
                cells.append("")
            elif r["status"] in ("ok", "unchecked") and r["latency_ms"]:
                mark = "" if r["status"] == "ok" else " (unchecked)"
                cells.append(f"{r['throughput']:.3g} ({r['latency_ms']:.4g} ms){mark}")
            else:
                cells.append(r["status"])
        best = _best(rows)
        ratios = ["", "", ""] if best is None else [best["backend"], _fmt(best.get("vs_cudnn"), ".2f"),
                                                    _fmt(best["speedup"], ".2f")]
        lines.append(f"| {w} | {rows[0]['unit']} | " + " | ".join(cells + ratios) + " |")
    if peer_records:
        lines += ["", "Same-run peers (same inputs, same timing, same references): best / peer = the peer's latency "
                  "over jaxinfer's fastest backend's (above 1: jaxinfer is faster)", "",
                  "| workload | peer | status | peer throughput | jaxinfer best | best / peer |", "| --- " * 6 + "|"]
        for r in peer_records:
            ran = r["status"] in ("ok", "unchecked") and r["latency_ms"]
            peer = f"{_throughput(r, r['latency_ms'])} ({r['latency_ms']:.4g} ms)" if ran else ""
            best = (f"{r['best_backend']} {_throughput(r, r['best_latency_ms'])} ({r['best_latency_ms']:.4g} ms)"
                    if r.get("best_latency_ms") else "")
            lines.append(f"| {r['workload']} | {r['backend']} | {r['status']} | {peer} | {best} | "
                         f"{_fmt(r.get('best_vs_peer'), '.2f')} |")
    fp8 = fp8_lines(records)
    if fp8:
        lines += ["", "fp8 KV cache against the bf16 cache of the same batch, same run:", "", *[f"- {x}" for x in fp8]]
    # FlashInfer's plan() beside jaxinfer's: the peers' host planning, timed the same way.
    planned = [r for r in records + peer_records if r.get("plan_call_ms") is not None]
    by.update({(r["workload"], r["backend"]): r for r in peer_records})
    if planned:
        plan_backends = list(dict.fromkeys(r["backend"] for r in planned))
        lines += ["", "plan() on the host, ms: median until it returns / until the plan is on the device", "",
                  "| workload | " + " | ".join(plan_backends) + " |", "| --- " * (len(plan_backends) + 1) + "|"]
        for w in dict.fromkeys(r["workload"] for r in planned):
            cells = [f"{by[(w, b)]['plan_call_ms']:.3g} / {by[(w, b)]['plan_ms']:.3g}"
                     if (w, b) in by and by[(w, b)].get("plan_call_ms") is not None else "" for b in plan_backends]
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(records: Sequence[dict], ceilings: Ceilings | None, command: str, out_dir: Path,
                   peers: Sequence[str] = ()) -> Path:
    """``out_dir/table.md``: :func:`markdown` of the run."""
    path = out_dir / MARKDOWN_FILE
    path.write_text(markdown(records, ceilings, command, peers))
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
