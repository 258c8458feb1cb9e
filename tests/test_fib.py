"""FlashInfer-Bench interop: the trace sets ``jaxinfer-bench --fib-out`` writes, and
``jaxinfer.apply`` routing ``backend="auto"`` by measured traces."""

from __future__ import annotations

import ast
import json
import math
import sys
import types

import numpy as np
import pytest

from jaxinfer import backends
from jaxinfer.apply import ApplyTable, apply, current_device_kind, definition_name
from jaxinfer.bench import fib
from jaxinfer.bench.__main__ import main
from jaxinfer.bench.workloads import WORKLOADS
from jaxinfer.plan.batch import BatchSpec
from jaxinfer.variants import AttentionVariant

SEED = 3
# One workload of each FlashInfer-Bench op, one it has no op for (cascade), at tiny size.
FIB_WORKLOADS = ("decode_zipf", "append", "prefill_causal", "cascade")
STATUSES = {"pallas": "ok", "xla": "mismatch", "fa2": "error", "fa3": "unsupported"}


def _records(workloads):
    """Benchmark records as harness.make_record shapes them, one per (workload, backend)."""
    env = {"device": "NVIDIA H100 80GB HBM3", "platform": "gpu", "jax_version": "0.11.2", "git_commit": "abc",
           "date": "2026-12-06T00:00:00+00:00"}
    out = []
    for i, w in enumerate(workloads):
        for j, (backend, status) in enumerate(STATUSES.items()):
            ran = status in ("ok", "mismatch")
            out.append({"definition": w.definition, "workload": w.name, "kv_dtype": "bf16", "axes": w.axes(),
                        "backend": backend, "status": status, "reason": None if ran else "why",
                        "max_error": 1e-3 * (j + 1) if ran else None, "max_error_f64": None,
                        "latency_ms": 0.5 + i + j if status == "ok" else None, "reference_latency_ms": 2.0, **env})
    return out


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    workloads = [WORKLOADS[n].scaled(64) for n in FIB_WORKLOADS]
    out = tmp_path_factory.mktemp("fib")
    fib.write_trace_set(_records(workloads), workloads, out, seed=SEED)
    return out, workloads


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_names_follow_flashinfer_bench(trace_dir):
    out, _ = trace_dir
    names = sorted(p.stem for p in (out / "definitions").rglob("*.json"))
    assert names == ["gqa_paged_decode_h32_kv8_d128_ps16", "gqa_paged_prefill_causal_h32_kv8_d128_ps16",
                     "gqa_ragged_prefill_causal_h32_kv32_d128"]  # cascade: no FlashInfer-Bench op


def test_files_follow_the_documented_schema(trace_dir):
    """The Definition/Workload/Trace rules of flashinfer-bench 0.1.2's data models, checked
    without the package (which needs torch): axis references, the reference's ``run``, input
    specs, evaluation fields by status; and the index blobs are the page tables the benchmark
    built from the same seed."""
    from safetensors.numpy import load_file

    out, workloads = trace_dir
    by_fib = {fib.fib_name(w): w for w in workloads if fib.op_type(w)}
    for path in (out / "definitions").rglob("*.json"):
        d = json.loads(path.read_text())
        assert path.parent.name == d["op_type"] and path.stem == d["name"]
        for spec in [*d["inputs"].values(), *d["outputs"].values()]:
            assert spec["shape"] is None or set(spec["shape"]) <= set(d["axes"])
        assert not set(d["inputs"]) & set(d["outputs"])
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in ast.parse(d["reference"]).body)
        [ast.parse(c, mode="eval") for c in d["constraints"]]
        var = {a for a, ax in d["axes"].items() if ax["type"] == "var"}
        for line in _jsonl(out / "workloads" / d["op_type"] / f"{d['name']}.jsonl"):
            assert line["definition"] == d["name"]
            wl = line["workload"]
            assert set(wl["axes"]) == var and set(wl["inputs"]) == set(d["inputs"])
            blobs = {k: load_file(str(out / s["path"]))[s["tensor_key"]] for k, s in wl["inputs"].items()
                     if s["type"] == "safetensors"}
            problem = by_fib[d["name"]].build(SEED)
            indices = [a for a in problem.plan_args if isinstance(a, np.ndarray)]
            names = [k for k in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len") if k in blobs]
            assert len(indices) == len(names)
            for k, want in zip(names, indices):
                np.testing.assert_array_equal(blobs[k], want, err_msg=k)
            assert wl["axes"]["len_indptr"] == blobs["kv_indptr"].size
            assert wl["inputs"]["sm_scale"] == {"type": "scalar", "value": 1 / math.sqrt(d["axes"]["head_dim"]["value"])}
        traces = _jsonl(out / "traces" / d["op_type"] / f"{d['name']}.jsonl")
        assert sorted(t["solution"] for t in traces) == ["jaxinfer_fa2", "jaxinfer_pallas", "jaxinfer_xla"]
        for t in traces:
            ev = t["evaluation"]
            assert ev["status"] == {"jaxinfer_pallas": "PASSED", "jaxinfer_xla": "INCORRECT_NUMERICAL",
                                    "jaxinfer_fa2": "RUNTIME_ERROR"}[t["solution"]]
            assert ("correctness" in ev) == (ev["status"] != "RUNTIME_ERROR")
            assert ("performance" in ev) == (ev["status"] == "PASSED")
            assert ev["environment"]["hardware"] == "NVIDIA H100 80GB HBM3"


def test_round_trip_through_flashinfer_bench(trace_dir):
    fib_data = pytest.importorskip("flashinfer_bench.data", reason="flashinfer-bench (needs torch) not installed")
    out, _ = trace_dir
    ts = fib_data.TraceSet.from_path(str(out))
    assert sorted(ts.definitions) == sorted(p.stem for p in (out / "definitions").rglob("*.json"))
    for name, traces in ts.traces.items():
        assert {t.workload.uuid for t in traces} <= {w.workload.uuid for w in ts.workloads[name]}
        passed = [t for t in traces if t.is_successful()]
        assert [t.solution for t in passed] == ["jaxinfer_pallas"]


def test_cli_writes_trace_set(tmp_path):
    code = main(["--size", "tiny", "--workloads", "decode_uniform", "--backends", "xla", "--repeats", "1",
                 "--plan-repeats", "1", "--no-progress", "--out", str(tmp_path / "out"), "--fib-out",
                 str(tmp_path / "fib")])
    assert code == 0
    [line] = _jsonl(tmp_path / "fib" / "traces" / "gqa_paged_decode" / "gqa_paged_decode_h32_kv8_d128_ps16.jsonl")
    assert line["solution"] == "jaxinfer_xla" and line["evaluation"]["status"] == "PASSED"
    assert line["evaluation"]["environment"]["hardware"] == current_device_kind()


# --- apply ---

GEOMETRY = dict(page_size=16, num_qo_heads=4, num_kv_heads=2, head_dim=64)
DECODE = "gqa_paged_decode_h4_kv2_d64_ps16"


def _spec(batch_size, pages_each, **geometry):
    kv_indptr = np.arange(batch_size + 1) * pages_each
    return BatchSpec.create(np.arange(batch_size + 1), kv_indptr, np.arange(kv_indptr[-1]),
                            np.full(batch_size, 16), variant=AttentionVariant(), **{**GEOMETRY, **geometry})


def _trace(definition, uuid, axes, backend, latency, status="PASSED", hardware=None):
    ev = {"status": status, "environment": {"hardware": hardware or current_device_kind()}, "timestamp": "t"}
    if status == "PASSED":
        ev.update(correctness={"max_relative_error": 0.0}, performance={"latency_ms": latency})
    return {"definition": definition, "workload": {"uuid": uuid, "axes": axes, "inputs": {}},
            "solution": f"jaxinfer_{backend}", "evaluation": ev}


@pytest.fixture
def hand_made(tmp_path):
    small, large = {"batch_size": 2, "num_kv_indices": 4}, {"batch_size": 256, "num_kv_indices": 4096}
    traces = [
        _trace(DECODE, "small", small, "xla", 2.0), _trace(DECODE, "small", small, "pallas", 1.0),
        _trace(DECODE, "small", small, "fa2", 0.5),  # fastest, where the machine has an sm80+ GPU
        _trace(DECODE, "large", large, "pallas", 3.0), _trace(DECODE, "large", large, "xla", 1.0),
        _trace(DECODE, "large", large, "pallas", 0.1, hardware="another device"),  # not this device's
        _trace(DECODE, "large", large, "pallas", 0.0, status="INCORRECT_NUMERICAL"),
    ]
    failing = "gqa_paged_decode_h8_kv2_d64_ps16"
    traces += [_trace(failing, "w", small, "pallas", 0.0, status="RUNTIME_ERROR")]
    (tmp_path / "traces" / "gqa_paged_decode").mkdir(parents=True)
    (tmp_path / "traces" / "gqa_paged_decode" / "t.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    yield tmp_path, traces
    backends.set_preference(None)


def test_apply_picks_the_fastest_passing_backend(hand_made):
    root, traces = hand_made
    builtin = backends.resolve("auto", _spec(2, 2), op="decode").name
    table = apply(root)
    assert isinstance(table, ApplyTable)
    # a flashinfer_bench.TraceSet (definition name -> traces) gives the same table
    assert apply(types.SimpleNamespace(traces={DECODE: traces[:-1], "other": traces[-1:]})) == table
    fastest_small = "fa2" if backends.unavailable("fa2") is None else "pallas"
    assert backends.resolve("auto", _spec(2, 2), op="decode").name == fastest_small
    assert backends.resolve("auto", _spec(3, 2), op="decode").name == fastest_small  # nearest: small
    assert backends.resolve("auto", _spec(200, 16), op="decode").name == "xla"  # nearest: large
    # no entry: another geometry, a definition whose only trace failed, a non-plain variant
    assert backends.resolve("auto", _spec(2, 2, head_dim=128), op="decode").name == builtin
    assert backends.resolve("auto", _spec(2, 2, num_qo_heads=8), op="decode").name == builtin
    assert table(_spec(2, 2), "other") == ()
    apply(None)  # back to the packaged table (H100 traces only): here the built-in order
    assert backends.resolve("auto", _spec(2, 2), op="decode").name == builtin


def test_packaged_table_is_the_default(hand_made, monkeypatch):
    monkeypatch.setattr(sys.modules["jaxinfer.apply"], "DEFAULT_TRACES", hand_made[0])
    backends.set_preference(None)  # as at start-up: the packaged table is read on first use
    fastest_small = "fa2" if backends.unavailable("fa2") is None else "pallas"
    assert backends.resolve("auto", _spec(2, 2), op="decode").name == fastest_small


def test_definition_names_match_the_writer():
    assert definition_name(_spec(2, 2), "decode") == DECODE
    w = WORKLOADS["append"]
    spec = BatchSpec.create(np.array([0, 4]), np.array([0, 2]), np.arange(2), np.array([16]),
                            variant=AttentionVariant(causal=True), page_size=w.page_size,
                            num_qo_heads=w.num_qo_heads, num_kv_heads=w.num_kv_heads, head_dim=w.head_dim)
    assert definition_name(spec, "prefill") == fib.fib_name(w)
    assert definition_name(spec, "other") is None


def test_apply_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="trace_set"):
        apply(tmp_path / "missing")
    with pytest.raises(ValueError, match="trace_set"):
        apply(42)
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "bad.jsonl").write_text('{"definition": "x"}\n')
    with pytest.raises(ValueError, match="trace_set"):
        apply(tmp_path)


def test_shipped_h100_table():
    """The traces of the H100 run that ship with the package (jaxinfer/traces/) rank pallas first
    for the runner's paged decode and fa3 first for its causal prefill there, and say nothing on
    another device."""
    from jaxinfer.apply import default_table

    h100 = default_table("NVIDIA H100 80GB HBM3")
    decode = _spec(64, 256, num_qo_heads=32, num_kv_heads=8, head_dim=128)
    assert h100(decode, "decode")[0] == "pallas"
    w = WORKLOADS["prefill_causal"]
    prefill = BatchSpec.create(np.arange(5) * w.qo_len, np.arange(5) * w.qo_len, None, None,
                               variant=AttentionVariant(causal=True), page_size=1, num_qo_heads=w.num_qo_heads,
                               num_kv_heads=w.num_kv_heads, head_dim=w.head_dim)
    assert h100(prefill, "prefill")[0] == "fa3"
    assert default_table("cpu")(decode, "decode") == ()
