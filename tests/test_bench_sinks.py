"""``python -m jaxinfer.bench.sinks`` at tiny size on the CPU (the reference backend): it times
both steps per backend, prints the table with the ratio, reports unavailable backends, and its
sinks step really applies the sinks (its output differs from the plain step's)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxinfer.bench import sinks as bench
from jaxinfer.bench.workloads import select


def test_bench_sinks_tiny(capsys):
    rows = bench.main(["--size", "tiny", "--backends", "xla,fa3", "--workloads", "decode_uniform", "--repeats", "1",
                       "--rounds", "1"])
    out = capsys.readouterr().out
    assert "ratio" in out and "decode_uniform" in out
    by_backend = {r.backend: r for r in rows}
    assert by_backend["xla"].ms > 0 and by_backend["xla"].ratio > 0
    assert by_backend["fa3"].ms is None and by_backend["fa3"].note  # no GPU here: says why
    # The timed sinks step applies them: outputs differ from the plain step's.
    problem = select(["decode_uniform"], "tiny")[0].build(seed=0)
    plan = problem.make_wrapper(backend="xla").plan(*problem.plan_args, q_data_type=problem.q.dtype)
    sinks = jnp.full(problem.q.shape[1], 2.0, jnp.float32)
    a = np.asarray(bench._without(plan, problem.q, problem.kv), np.float32)
    b = np.asarray(bench._with_sinks(plan, problem.q, problem.kv, sinks), np.float32)
    assert np.abs(a - b).max() > 1e-3
