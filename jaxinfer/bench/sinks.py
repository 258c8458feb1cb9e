"""The cost of attention sinks: ``decode_uniform`` and ``prefill_causal`` with and without ``sinks=``.

Issue 20's goal: with sinks a step takes at most 1.05x the time without, per backend. Both steps
run the same plan and inputs (:mod:`jaxinfer.bench.workloads`), the sinks ``[Hq]`` float32
traced; each backend's two steps are timed in alternating rounds with the harness's
:class:`~jaxinfer.bench.harness.Timer` (the median of the rounds' medians), so that a drift of
the device's clocks reaches both alike. The table gives the latency of each and their ratio.

Run::

    python -m jaxinfer.bench.sinks                      # full sizes, every backend available here
    python -m jaxinfer.bench.sinks --size tiny --backends xla
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import backends as backend_registry
from jaxinfer.bench.harness import Timer, on_gpu
from jaxinfer.bench.workloads import select
from jaxinfer.wrapper import run_paged_plan, run_plan

WORKLOADS = ("decode_uniform", "prefill_causal")
BACKENDS = ("pallas", "fa2", "fa3", "xla")
GOAL = 1.05  # issue 20: time with sinks / time without, per backend


@dataclasses.dataclass(frozen=True)
class Row:
    """One (workload, backend): latencies in ms (``None`` when it did not run) and why not."""

    workload: str
    backend: str
    ms: float | None = None
    ms_sinks: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.ms is None else self.ms_sinks / self.ms


def _step(plan, q, kv, sinks):
    """The workload's run through the public plan runners, with ``sinks`` (or ``None``)."""
    if plan.paged:
        return run_paged_plan(plan, q, kv, sinks=sinks)
    return run_plan(plan, q, *kv, sinks=sinks)


_with_sinks = jax.jit(_step)
_without = jax.jit(lambda plan, q, kv: _step(plan, q, kv, None))


def measure(workload, backend: str, timer: Timer, rounds: int) -> Row:
    """Time ``workload`` (a scaled :class:`~jaxinfer.bench.workloads.Workload`) on ``backend``."""
    reason = backend_registry.unavailable(backend)
    if reason is not None:
        return Row(workload.name, backend, note=f"unavailable: {reason}")
    problem = workload.build(seed=0)
    try:
        plan = problem.make_wrapper(backend=backend).plan(*problem.plan_args, **problem.plan_kwargs,
                                                          q_data_type=problem.q.dtype)
    except NotImplementedError as e:
        return Row(workload.name, backend, note=f"unsupported: {e}")
    hq = problem.q.shape[1]
    sinks = jnp.asarray(np.random.default_rng(0).normal(0.0, 1.0, hq), jnp.float32)
    plain, sunk = [], []
    for _ in range(rounds):
        plain.append(timer(_without, [(plan, problem.q, problem.kv)])[0])
        sunk.append(timer(_with_sinks, [(plan, problem.q, problem.kv, sinks)])[0])
    return Row(workload.name, backend, statistics.median(plain), statistics.median(sunk))


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table (ratio marked ``!`` above :data:`GOAL`)."""
    lines = [f"{'workload':<16} {'backend':<8} {'ms':>10} {'ms sinks':>10} {'ratio':>7}"]
    for r in rows:
        if r.ms is None:
            lines.append(f"{r.workload:<16} {r.backend:<8} {r.note}")
        else:
            flag = " !" if r.ratio > GOAL else ""
            lines.append(f"{r.workload:<16} {r.backend:<8} {r.ms:>10.4f} {r.ms_sinks:>10.4f} {r.ratio:>7.3f}{flag}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Command line: measure, print the table, return the rows."""
    parser = argparse.ArgumentParser(prog="python -m jaxinfer.bench.sinks", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "cpu", "full"), default="full" if on_gpu() else "tiny",
                        help="workload sizes (default: full on a GPU, tiny elsewhere)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {BACKENDS}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {WORKLOADS}")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (without, with sinks)")
    args = parser.parse_args(argv)
    names = [n for n in args.backends.split(",") if n]
    bad = [n for n in names if n not in BACKENDS]
    workloads = [n for n in args.workloads.split(",") if n]
    if bad or any(w not in WORKLOADS for w in workloads):
        parser.error(f"--backends takes {BACKENDS}, --workloads takes {WORKLOADS}")
    timer = Timer(repeats=args.repeats, warmup=2, min_repeat_s=0.05 if on_gpu() else 0.0)
    print(f"device: {jax.devices()[0].device_kind}; size {args.size}; timing: {timer.describe()}; "
          f"{args.rounds} alternating rounds, their median; goal: ratio <= {GOAL}")
    rows = [measure(w, b, timer, args.rounds) for w in select(workloads, args.size) for b in names]
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
