"""jaxinfer-bench: the CLI end to end on tiny sizes, and the workloads' inputs, references and counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinfer.bench import harness
from jaxinfer.bench.__main__ import main
from jaxinfer.bench.workloads import GROUPS, SIZE_FACTORS, WORKLOADS, BlockSparseWorkload, PageTable, expand, select
from ref64 import gather_paged_kv, ref_attention, ref_batch

TINY = SIZE_FACTORS["tiny"]
RECORD_FIELDS = {
    "definition", "workload", "backend", "status", "max_error", "latency_ms", "reference_latency_ms", "speedup",
    "device", "jax_version", "git_commit", "date", "throughput", "unit", "plan_ms", "floor_ms", "of_floor",
    "plan_call_ms", "vs_cudnn", "cudnn_latency_ms", "timing",
}
# The workloads a bare run measures (make bench); the groups added later are opt-in.
DEFAULT_WORKLOADS = ["prefill_causal", "decode_uniform", "decode_zipf", "decode_long", "decode_wide", "append",
                     "cascade", "cascade_flat", "block_sparse", "vector_sparse", "e2e"]
# The opt-in workloads: the prefill shapes of the retired ffi_gpu.py, fused RoPE decode, B=256 zipf.
OPT_IN = ["prefill_noncausal", "prefill_gqa_hkv8", "prefill_d64", "prefill_d256", "prefill_paged16",
          "prefill_paged1", "decode_rope", "decode_wide_zipf"]
BF16_ERROR = 1e-2  # normwise relative error of bf16 outputs against a float32/float64 reference
# One workload per jitted step (decode, ragged prefill, paged prefill, cascade, block-sparse) and the
# cascade baseline; the other decode shapes and vector-sparse run the same code.
CLI_WORKLOADS = ["decode_zipf", "prefill_causal", "append", "cascade", "cascade_flat", "block_sparse"]


def test_cli_tiny_run_writes_checked_records_and_chart(tmp_path, capsys):
    if harness.on_gpu():
        pytest.skip("checks the CPU run: cuDNN unsupported, float64 check on")
    code = main(["--size", "tiny", "--workloads", ",".join(CLI_WORKLOADS), "--backends", "xla,cudnn",
                 "--repeats", "1", "--ceilings", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "CPU timings are not GPU performance" in printed
    assert "cascade vs plain batch decode" in printed
    assert "timing: median of 1 timed repeats" in printed
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["workload"], r["backend"]) for r in records] == [(w, b) for w in CLI_WORKLOADS for b in ("xla", "cudnn")]
    for r in records:
        assert RECORD_FIELDS <= r.keys(), RECORD_FIELDS - r.keys()
        assert r["workload"] in printed
        if r["backend"] == "cudnn":  # no GPU here
            assert r["status"] == "unsupported" and "GPU" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        # Strictly positive: the bf16 run is compared with a float32 reference, never with itself.
        assert 0 < r["max_error"] < BF16_ERROR, r
        assert 0 < r["max_error_f64"] < BF16_ERROR, r
        assert r["latency_ms"] > 0 and r["throughput"] > 0 and r["plan_ms"] > 0
        assert 0 < r["plan_call_ms"] <= r["plan_ms"]  # each call returns before its plan is ready
        assert r["speedup"] == 1.0 and r["reference_latency_ms"] == r["latency_ms"]
        assert r["vs_cudnn"] is None and r["timing"].startswith("median of 1 timed repeats")
        assert r["floor_ms"] > 0 and r["of_floor"] == pytest.approx(r["latency_ms"] / r["floor_ms"])
        assert r["unit"] == ("TFLOP/s" if r["workload"] in ("prefill_causal", "append") else "TB/s")
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "table.md").read_text()
    assert "- command: `jaxinfer-bench --size tiny --workloads decode_zipf," in md
    for w in CLI_WORKLOADS:
        assert f"| {w} | " in md


def test_cli_tiny_run_of_the_opt_in_groups(tmp_path, capsys):
    """The workloads folded in from the retired GPU scripts, at tiny size on the xla backend: each
    checked against the float32 and float64 references, RoPE read against the same plain batch."""
    if harness.on_gpu():
        pytest.skip("checks the CPU run")
    code = main(["--size", "tiny", "--workloads", "prefill_shapes,rope,plan", "--backends", "xla,cudnn",
                 "--repeats", "1", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    names = list(dict.fromkeys(r["workload"] for r in records))
    assert names == [*GROUPS["prefill_shapes"], *GROUPS["rope"], *GROUPS["plan"]]
    assert set(OPT_IN) <= set(names)
    for r in records:
        if r["backend"] == "cudnn":
            assert r["status"] == "unsupported", r
            continue
        assert r["status"] == "ok", r
        assert 0 < r["max_error"] < BF16_ERROR and 0 < r["max_error_f64"] < BF16_ERROR, r
        assert 0 < r["plan_call_ms"] <= r["plan_ms"]
    assert "decode_rope (fused ROPE_LLAMA) vs decode_uniform, same inputs (xla):" in printed
    definitions = {r["workload"]: r["definition"] for r in records}
    assert definitions["prefill_noncausal"] == "gqa_ragged_prefill_noncausal_h32_kv32_d128"
    assert definitions["prefill_paged1"] == "gqa_paged_prefill_causal_h32_kv32_d128_ps1"
    assert definitions["decode_rope"] == "gqa_paged_decode_rope_llama_h32_kv8_d128_ps16"

def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        main(["--workloads", "decode_nope"])
    with pytest.raises(SystemExit):
        main(["--workloads", "default,prefill_nope"])
    with pytest.raises(SystemExit):
        main(["--backends", "xla,flashinfer"])


def test_groups_keep_the_default_run_and_name_every_workload_once():
    assert expand(None) == expand(["default"]) == DEFAULT_WORKLOADS  # make bench measures what it did
    assert expand(["plan", "decode_wide", "rope"]) == ["decode_wide", "decode_wide_zipf", "decode_uniform", "decode_rope"]
    everything = expand(["all"])
    assert sorted(everything) == sorted([*WORKLOADS, "e2e"]) and len(everything) == len(set(everything))
    assert everything[: len(GROUPS["prefill_shapes"])] == list(GROUPS["prefill_shapes"])  # large references first
    assert [w.name for w in select(["e2e", "rope"], "tiny")] == ["decode_uniform", "decode_rope"]
    with pytest.raises(ValueError, match="groups: default"):
        select(["rope", "nope"], "tiny")


def test_measure_flags_mismatch_and_missing_reference():
    problem = WORKLOADS["decode_uniform"].scaled(TINY).build(seed=2)
    ref, timer = harness.reference_output(problem), harness.Timer(1)
    assert harness.measure(problem, "xla", timer, ref, None, plan_repeats=1)["status"] == "ok"
    wrong = harness.measure(problem, "xla", timer, ref * 1.1, None, plan_repeats=1)
    assert wrong["status"] == "mismatch" and wrong["max_error"] > harness.BF16_TOLERANCE
    assert harness.measure(problem, "xla", timer, None, None, plan_repeats=1)["status"] == "unchecked"


def _ref64(name: str, problem):
    """The workload's batch through tests/ref64.py, from the wrapper's plan arguments."""
    w = WORKLOADS[name]
    q = np.asarray(problem.q, np.float64)
    k, v = (np.asarray(x, np.float64) for x in problem.kv)
    args = problem.plan_args
    if name.startswith(("decode", "cascade")):
        k_list, v_list = gather_paged_kv(k, v, *args[:3])
        rope = {} if getattr(w, "rope_theta", None) is None else dict(pos_encoding_mode="ROPE_LLAMA",
                                                                       rope_theta=w.rope_theta)
        return ref_batch(q, k_list, v_list, np.arange(len(k_list) + 1), **rope)[0]
    if isinstance(w, BlockSparseWorkload):
        indptr, indices, M, N, R, C = args[:6]
        mask = np.zeros((M, N), bool)
        for r in range(len(indptr) - 1):
            for c in indices[indptr[r] : indptr[r + 1]]:
                mask[r * R : (r + 1) * R, c * C : (c + 1) * C] = True
        return ref_attention(q, k, v, custom_mask=mask)[0]
    if w.paged:
        k_list, v_list = gather_paged_kv(k, v, *args[1:4])
        return ref_batch(q, k_list, v_list, args[0], causal=w.causal)[0]
    qo_indptr, kv_indptr = args[:2]
    split = lambda x: np.split(x, kv_indptr[1:-1])  # noqa: E731
    return ref_batch(q, split(k), split(v), qo_indptr, causal=w.causal)[0]


@pytest.mark.parametrize("name", ["decode_zipf", "prefill_causal", "append", "cascade_flat", "block_sparse",
                                  "vector_sparse", *OPT_IN])
def test_float64_check_matches_independent_reference(name):
    problem = WORKLOADS[name].scaled(TINY).build(seed=3)
    got = harness.f64_output(problem)
    np.testing.assert_allclose(got, _ref64(name, problem), rtol=1e-10, atol=1e-12)


def test_rope_workload_is_decode_uniform_with_rope_applied():
    plain, rope = (WORKLOADS[n].scaled(TINY).build(seed=6) for n in ("decode_uniform", "decode_rope"))
    np.testing.assert_array_equal(np.asarray(plain.q), np.asarray(rope.q))
    np.testing.assert_array_equal(np.asarray(plain.kv[1]), np.asarray(rope.kv[1]))
    assert rope.plan_kwargs == {"pos_encoding_mode": "ROPE_LLAMA", "rope_theta": 5e5}
    o_plain, o_rope = harness.f64_output(plain), harness.f64_output(rope)
    assert np.linalg.norm(o_rope - o_plain) > 0.1 * np.linalg.norm(o_plain)  # the rotation changes attention
    with pytest.raises(NotImplementedError, match="RoPE"):
        harness.prepare_dense_peer(rope, "xla")  # the cuDNN peer would compute plain attention


# Decode with per-request lengths, causal GQA prefill, bottom-right causal paged prefill, RoPE, a BSR mask.
@pytest.mark.parametrize("name", ["decode_wide_zipf", "prefill_gqa_hkv8", "append", "decode_rope", "block_sparse"])
def test_chunked_reference_matches_the_xla_reference(name, monkeypatch):
    """The float32 reference of batches too large for the xla backend's padded form, in groups of
    requests small enough that every bucket runs in several (padded) groups."""
    problem = WORKLOADS[name].scaled(TINY).build(seed=7)
    want = harness.reference_output(problem)
    got = harness.chunked_reference(problem, chunk_bytes=harness.padded_reference_bytes(problem) // 5)
    assert harness.rel_error(got, want) < 1e-5
    monkeypatch.setattr(harness, "REFERENCE_MAX_BYTES", 0)  # reference_output switches to it
    assert harness.rel_error(harness.reference_output(problem), harness.f64_output(problem)) < 1e-5


def test_cascade_and_flat_share_inputs_and_floor_bytes():
    cascade, flat = (WORKLOADS[n].scaled(TINY).build(seed=5) for n in ("cascade", "cascade_flat"))
    np.testing.assert_array_equal(np.asarray(cascade.q), np.asarray(flat.q))
    np.testing.assert_array_equal(np.asarray(cascade.kv[0]), np.asarray(flat.kv[0]))
    w = WORKLOADS["cascade"].scaled(TINY)
    tokens = w.shared_len + w.batch_size * w.unique_len  # the shared prefix counted once
    assert cascade.bytes == flat.bytes == (2 * cascade.q.size + 2 * tokens * w.num_kv_heads * w.head_dim) * 2


# One workload per branch: uniform, per-request lengths, square causal, bottom-right causal, BSR mask.
@pytest.mark.parametrize("name", ["decode_uniform", "decode_zipf", "prefill_causal", "append", "vector_sparse",
                                  "prefill_noncausal", "prefill_paged1"])
def test_dense_peer_inputs_give_the_same_attention(name):
    """The padded dense form the cuDNN peer runs, checked here through jax's xla implementation."""
    problem = WORKLOADS[name].scaled(TINY).build(seed=4)
    prep = harness.prepare_dense_peer(problem, "xla")
    o = prep.rows(prep.fn(*prep.args))
    assert harness.rel_error(o, harness.f64_output(problem)[prep.q_rows]) < BF16_ERROR
    assert np.array_equal(np.sort(prep.q_rows), np.arange(problem.q.shape[0]))  # every row once


def _expected_pairs(w) -> int:
    """Visible (query, key) pairs from the workload's definition, in closed form."""
    if w.name.startswith("decode"):
        return int(w.kv_lens().sum())
    if w.name.startswith("cascade"):
        return w.batch_size * (w.shared_len + w.unique_len)
    if w.name == "pod_mixed":  # a square causal prefill, then one query per decode request
        return w.prefill_len * (w.prefill_len + 1) // 2 + w.decode_batch * w.decode_len
    if w.name.startswith("prefill") or w.name == "append":
        t, p = w.qo_len, w.prefix_len
        return w.batch_size * (t * p + (t * (t + 1) // 2 if w.causal else t * t))
    per_row = max(1, round(w.density * w.N / w.C))
    return (w.M // w.R) * per_row * w.R * w.C


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_flops_count_visible_pairs(name):
    w = WORKLOADS[name].scaled(TINY)
    problem = w.build(seed=0)
    assert problem.flops == 4 * _expected_pairs(w) * w.num_qo_heads * w.head_dim
    assert np.count_nonzero(np.asarray(problem.kv[0], np.float32)) > 0.99 * problem.kv[0].size  # random, not zeros


def test_scaled_divides_sizes_only():
    full = WORKLOADS["decode_long"]
    cpu = full.scaled(SIZE_FACTORS["cpu"])
    assert (cpu.batch_size, cpu.kv_len) == (1, 4096)
    assert (cpu.num_qo_heads, cpu.num_kv_heads, cpu.head_dim, cpu.page_size) == (32, 8, 128, 16)
    assert full.scaled(1) == full
    prefill = WORKLOADS["prefill_causal"]
    assert prefill.scaled(1) == prefill and prefill.scaled(SIZE_FACTORS["cpu"]).prefix_len == 0  # square causal
    sparse = WORKLOADS["vector_sparse"].scaled(TINY)
    assert (sparse.M, sparse.N, sparse.R, sparse.C, sparse.density) == (128, 128, 64, 1, 0.1)


def test_zipf_lengths_are_fixed_and_clipped():
    w = WORKLOADS["decode_zipf"]
    lens = w.kv_lens()
    np.testing.assert_array_equal(lens, w.kv_lens())  # part of the definition, not of the seed
    assert lens.size == 64 and lens.min() >= 16 and lens.max() <= 32768 and np.unique(lens).size > 4


def test_page_table_is_a_shuffled_partition(rng):
    kv_lens = rng.integers(1, 100, size=12)
    table = PageTable.shuffled(kv_lens, 16, rng)
    assert sorted(table.indices.tolist()) == list(range(table.num_pages))
    assert not np.array_equal(table.indices, np.sort(table.indices))
    tokens = table.token_index()
    for b, n in enumerate(kv_lens):
        pages = table.indices[table.indptr[b] : table.indptr[b + 1]]
        want = (pages[:, None] * 16 + np.arange(16)[None]).reshape(-1)[:n]
        np.testing.assert_array_equal(tokens[b, :n], want)
