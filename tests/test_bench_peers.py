"""jaxinfer-bench --peers: the plumbing of same-run peers (a fake peer stands in for FlashInfer, which
needs a GPU), the one timing method with a peer's own device sync, the POD-shaped mixed workload,
and the staging commands."""

from __future__ import annotations

import functools
import json
import types

import jax
import numpy as np
import pytest

from jaxinfer import fp8
from jaxinfer.bench import harness, peers
from jaxinfer.bench.__main__ import main
from jaxinfer.bench.workloads import SIZE_FACTORS, WORKLOADS, DecodeWorkload, MixedWorkload

TINY = SIZE_FACTORS["tiny"]


class CountingSync:
    """A peer's device sync (as torch.cuda.synchronize would be), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, out):
        self.calls += 1
        return jax.block_until_ready(out)


def fake_peer(sync: CountingSync, scale: float = 1.0) -> peers.Peer:
    """A peer whose one case is XLA's dense attention on the padded batch (times ``scale``, to make
    a wrong peer), timed with ``sync``."""

    def cases(workload, problem, plan_repeats):
        def prepare():
            prep = harness.prepare_dense_peer(problem, "xla")
            fn = prep.fn if scale == 1.0 else jax.jit(lambda *a: prep.fn(*a) * scale)
            return harness.Prepared(None, None, fn, prep.args, prep.rows, prep.q_rows, sync)

        return {"flashinfer-fake": prepare}

    return peers.Peer("flashinfer", "fake 0.0", cases)


def jax_paged_attention():
    """JAX's Pallas paged_attention module (the jax-pallas peer), or ``None`` where this JAX dropped it."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in JAX, shipped through 0.11
            from jax.experimental.pallas.ops.gpu import paged_attention
    except ImportError:
        return None
    return paged_attention


def run_cli(tmp_path, capsys, *extra):
    code = main(["--size", "tiny", "--workloads", "decode_zipf", "--backends", "xla", "--repeats", "2",
                 "--out", str(tmp_path), "--no-progress", *extra])
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    return code, capsys.readouterr().out, records


def test_a_peer_runs_on_the_same_inputs_with_the_same_timer_and_reports_the_ratio(tmp_path, capsys, monkeypatch):
    if harness.on_gpu():
        pytest.skip("checks the CPU run with a fake peer")
    sync = CountingSync()
    monkeypatch.setitem(peers.LOADERS, "flashinfer", lambda: fake_peer(sync))
    code, printed, records = run_cli(tmp_path, capsys, "--peers", "flashinfer,tokamax,jax-pallas")
    assert code == 0
    assert "peer flashinfer: fake 0.0, same inputs, same timing as jaxinfer" in printed
    assert "peer tokamax: not installed (ModuleNotFoundError" in printed
    reason = "needs a GPU" if jax_paged_attention() else "no longer ships jax.experimental.pallas.ops.gpu"
    assert "peer jax-pallas: cannot run here: " in printed and reason in printed
    assert [(r["backend"], r["peer"]) for r in records] == [("xla", None), ("flashinfer-fake", "flashinfer")]
    own, peer = records
    # warm-up, then one sync per timed repeat (no min_repeat_s off GPU): the Timer used the peer's sync.
    assert sync.calls == 1 + 2
    assert peer["status"] == "ok" and 0 < peer["max_error"] < 1e-2 and 0 < peer["max_error_f64"] < 1e-2, peer
    assert peer["timing"] == own["timing"] and "torch.cuda.synchronize" in peer["timing"]
    assert peer["best_backend"] == "xla" and peer["best_latency_ms"] == own["latency_ms"]
    assert peer["best_vs_peer"] == pytest.approx(peer["latency_ms"] / own["latency_ms"])
    assert own["best_vs_peer"] is None and own["best_backend"] is None
    assert "decode_zipf: jaxinfer xla " in printed and "vs flashinfer-fake" in printed
    md = (tmp_path / "table.md").read_text()
    assert "- peer tokamax: not installed" in md
    row = next(line for line in md.splitlines() if line.startswith("| decode_zipf | flashinfer-fake | ok |"))
    assert row.endswith(f"| {peer['best_vs_peer']:.2f} |")
    assert "flashinfer-fake" not in md.split("Same-run peers")[0]  # the peers have their own table


def test_a_wrong_peer_is_reported_as_a_mismatch_without_failing_the_run(tmp_path, capsys, monkeypatch):
    if harness.on_gpu():
        pytest.skip("checks the CPU run with a fake peer")
    monkeypatch.setitem(peers.LOADERS, "flashinfer", lambda: fake_peer(CountingSync(), scale=1.5))
    code, printed, records = run_cli(tmp_path, capsys, "--peers", "flashinfer")
    assert code == 0, "a peer's failure is not jaxinfer's"
    peer = records[-1]
    assert peer["status"] == "mismatch" and peer["max_error"] > harness.BF16_TOLERANCE


def test_unknown_peer_is_rejected():
    with pytest.raises(SystemExit):
        main(["--peers", "flashinfer,vllm"])
    with pytest.raises(ValueError, match="unknown peers"):
        peers.load(["vllm"])


def test_timer_makes_back_to_back_calls_and_syncs_once_per_burst(monkeypatch):
    # A fake clock: a call costs 1 ms, a wait for the device 7 ms (a burst's fixed cost).
    clock, calls, syncs = [0.0], [], []
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    timer = harness.Timer(repeats=3, warmup=2, min_repeat_s=5e-3)

    def fn(x):
        calls.append(x)
        clock[0] += 1e-3
        return x

    def sync(out):
        syncs.append(len(calls))
        clock[0] += 7e-3
        return out

    ms, first = timer(fn, [(1,), (2,)], sync)
    assert first == 1
    # The sizing burst (1 call: 8 ms) gives C = 1; each repeat then times C and 2C calls and the
    # fixed 7 ms cancels: 1 ms a call, where the burst's mean would read 1 + 7 / C.
    assert ms == pytest.approx(1.0)
    assert len(calls) == 2 + 1 + 3 * 3 and calls[3:6] == [1, 2, 1]
    assert syncs == [1, 2, 3] + [3 + 3 * i + j for i in range(3) for j in (2, 3)]


def test_timer_without_min_repeat_times_one_call_per_repeat(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += 2e-3

    ms, _ = harness.Timer(repeats=4)(fn, [()], lambda out: out)
    assert ms == pytest.approx(2.0)


def test_pod_mixed_is_a_prefill_beside_decodes_and_matches_float64(tmp_path, capsys):
    if harness.on_gpu():
        pytest.skip("checks the CPU run")
    w = WORKLOADS["pod_mixed"]
    assert isinstance(w, MixedWorkload) and (w.prefill_len, w.decode_batch, w.decode_len) == (2048, 63, 4096)
    small = MixedWorkload(name="pod_mixed", prefill_len=24, decode_batch=3, decode_len=40)
    problem = small.build(seed=1)
    d = problem.dense
    assert list(d.qo_lens) == [24, 1, 1, 1] and list(d.kv_lens) == [24, 40, 40, 40]
    assert problem.q.shape[0] == 27 and problem.plan_kwargs == {"causal": True}
    np.testing.assert_array_equal(d.q_index[1], np.full(24, 24))  # a decode row padded with itself
    ref, ref64 = harness.reference_output(problem), harness.f64_output(problem)
    assert harness.rel_error(ref, ref64) < 1e-2
    code = main(["--size", "tiny", "--workloads", "mixed", "--backends", "xla", "--repeats", "1",
                 "--out", str(tmp_path), "--no-progress"])
    (record,) = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert code == 0 and record["status"] == "ok" and record["unit"] == "TB/s", record
    assert record["definition"] == "gqa_paged_mixed_prefill_decode_h32_kv8_d128_ps16"


def test_extra_requirements_reads_the_installed_metadata():
    assert peers.extra_requirements("cuda") == ["nvidia-cutlass==4.2.0.0"]
    with pytest.raises(ValueError, match="extra must name"):
        peers.extra_requirements("no-such-extra")


def test_stage_downloads_flashinfer_source_and_linux_wheels(tmp_path):
    sdist, wheels = peers.stage_commands(tmp_path, python="python3")
    assert sdist[-1] == "flashinfer-python==0.3.1" and "--no-binary" in sdist
    assert "tokamax==0.0.17" in wheels and "--only-binary" in wheels and "manylinux2014_x86_64" in wheels
    assert wheels[wheels.index("--python-version") + 1] == "3.12" and str(tmp_path) in wheels
    assert "nvidia-cutlass==4.2.0.0" in wheels  # the 'cuda' extra: the FFI kernels build on the GPU machine
    with pytest.raises(FileNotFoundError, match="run --stage first"):
        peers.install(tmp_path, tmp_path / "site")


@pytest.mark.parametrize("kv_dtype", ["bf16", "e4m3"])
def test_jax_pallas_peer_matches_the_reference_in_interpret_mode(kv_dtype):
    """The adapter of JAX's paged_attention (block tables, cache layout, q's softmax scale, fp8
    scale pages) on a Zipf decode batch, run by Pallas' interpreter off GPU."""
    pa = jax_paged_attention()
    if pa is None:
        pytest.skip(f"jax {jax.__version__} no longer ships the peer's kernel")
    w = DecodeWorkload(name="zipf", batch_size=3, kv_len=100, zipf_a=1.5, kv_len_min=5, kv_len_max=300,
                       num_qo_heads=8, num_kv_heads=2, head_dim=64)
    problem = w.build(seed=3)
    if kv_dtype != "bf16":
        problem = problem.quantized(fp8.kv_dtype(kv_dtype))
    ref = harness.reference_output(problem)
    prep = peers.prepare_jax_paged(problem, 2, functools.partial(pa.paged_attention, interpret=True))
    err = harness.rel_error(prep.rows(prep.fn(*prep.args)), ref[prep.q_rows])
    assert 0 < err < 1e-2, err


def test_torch_sync_waits_for_the_stream_and_returns_the_output():
    waits = []
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(synchronize=lambda: waits.append(1)))
    out = object()
    assert harness.torch_sync(fake_torch)(out) is out and waits == [1]
