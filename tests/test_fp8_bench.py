"""``jaxinfer-bench --kv-dtype``: fp8 caches quantized from the bf16 inputs, fp8 bytes counted, the
same-run ratio to the bf16 cache, and references on the dequantized values."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.bench import harness
from jaxinfer.bench.__main__ import main
from jaxinfer.bench.workloads import SIZE_FACTORS, WORKLOADS

TINY = SIZE_FACTORS["tiny"]


def test_cli_kv_dtype_runs_bf16_then_fp8(tmp_path, capsys):
    if harness.on_gpu():
        pytest.skip("checks the CPU run (float64 check on)")
    code = main(["--size", "tiny", "--workloads", "decode_zipf", "--backends", "xla", "--repeats", "1",
                 "--kv-dtype", "e5m2", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["workload"], r["kv_dtype"]) for r in records] == [("decode_zipf", "bf16"), ("decode_zipf:e5m2", "e5m2")]
    bf16, fp8 = records
    assert fp8["status"] == "ok" and 0 < fp8["max_error"] < 1e-2 and 0 < fp8["max_error_f64"] < 1e-2, fp8
    assert fp8["vs_bf16"] == pytest.approx(bf16["latency_ms"] / fp8["latency_ms"])
    assert bf16["vs_bf16"] is None and fp8["definition"].endswith("_kv_e5m2")
    problem = WORKLOADS["decode_zipf"].scaled(TINY).build(0)
    q_bytes = 2 * problem.q.size * 2
    assert bf16["bytes"] == problem.bytes and fp8["bytes"] - q_bytes == (bf16["bytes"] - q_bytes) // 2
    assert "decode_zipf:e5m2 (xla)" in printed and "x the speed of the bf16 cache" in printed
    assert "fp8 KV cache against the bf16 cache" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("name,kv_dtype", [("decode_long", jnp.float8_e4m3fn), ("cascade_flat", jnp.float8_e5m2)])
def test_quantized_problem(name, kv_dtype):
    """Per-KV-head amax scales map each head's largest value to the dtype's largest one; the cache
    is K / k_scale rounded to nearest even; a reference form shares the quantized cache; the
    float64 check reads the dequantized values."""
    problem = WORKLOADS[name].scaled(TINY).build(0)
    quant = problem.quantized(kv_dtype)
    limit = float(jnp.finfo(kv_dtype).max)
    for x, x8, scale in zip(problem.kv_flat, quant.kv_flat, quant.kv_scales):
        x32, s = np.asarray(x, np.float32), np.asarray(scale)
        np.testing.assert_allclose(s, np.abs(x32).max(axis=(0, 2)) / limit, rtol=1e-6)
        want = (x32 / s[:, None]).astype(kv_dtype)
        np.testing.assert_array_equal(np.asarray(x8).astype(np.float32), want.astype(np.float32))
        assert np.abs(np.asarray(x8, np.float32)).max(axis=(0, 2)) == pytest.approx(limit)
    if quant.reference is not None:
        assert quant.reference.kv is quant.kv and quant.reference.kv_scales is quant.kv_scales
    got = harness.f64_output(quant)
    ref = np.asarray(harness.reference_output(quant), np.float64)
    assert np.abs(got - ref).max() / np.abs(got).max() < 1e-5
    # The dequantized values are close to the bf16 inputs (3 or 2 mantissa bits).
    bf16 = harness.f64_output(problem)
    assert np.abs(got - bf16).max() / np.abs(bf16).max() < (0.1 if kv_dtype == jnp.float8_e4m3fn else 0.2)
