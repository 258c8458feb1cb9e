"""The project's main job, ``python -m jaxinfer.bench`` (console script ``jaxinfer-bench``).

Named workloads (:mod:`jaxinfer.bench.workloads`) run on every backend asked for; the harness
(:mod:`jaxinfer.bench.harness`) times and checks them, :mod:`jaxinfer.bench.report` prints the
table and writes JSON records and a chart. How to run it: benchmarks/README.md.
"""

from jaxinfer.bench.harness import BACKENDS, Ceilings, Timer, measure_ceilings, run_benchmark
from jaxinfer.bench.workloads import WORKLOADS, Workload, select

__all__ = ["BACKENDS", "WORKLOADS", "Ceilings", "Timer", "Workload", "measure_ceilings", "run_benchmark", "select"]
