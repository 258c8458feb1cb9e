"""Serving engine: tokens against an independent dense greedy decode per backend, admission, the
step-program bound, sampling parameters, validation."""

import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import BACKENDS, dense_greedy
from jax.experimental.pallas import triton as pltriton
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import jaxinfer.serve
from jaxinfer.backends.pallas.merge import force_triton_lowering
from jaxinfer.models.llama import LlamaConfig, LlamaModel
from jaxinfer.serve import EngineConfig, SamplingParams, ServingEngine, serve_step

CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
    head_dim=16, rope_theta=1e4, dtype=jnp.bfloat16,
)
# bfloat16 because the Pallas backend takes 16-bit inputs only. Greedy tokens are compared
# exactly: on this seeded workload the reference's smallest top-2 logit gap is about 0.03 (logits
# ~2.5, computed in float32), well above the backends' rounding differences.
MAX_SEQ_LEN = 32
# (prompt length, max_new_tokens, step at which the request arrives). Prompt 3 starts with the
# first 8 tokens of prompt 1 (two full pages of 4), and request 1 still decodes when 3 arrives:
# 3 attaches them from the prefix cache and the two decode through a shared cascade level. With
# 8 prompt tokens per step, prompt 1 is prefilled in two chunks. cascade_min_saved_bytes=1: the
# decode rows go through cascade levels exactly in the steps where requests share pages, so a run
# has steps of both kinds.
WORKLOAD = [(5, 5, 0), (11, 7, 0), (3, 6, 2), (14, 3, 3)]
ENGINE = dict(num_pages=32, page_size=4, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, max_prefill_tokens=8,
              cascade_min_saved_bytes=1)


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    out = [rng.integers(0, CFG.vocab_size, n).tolist() for n, _, _ in WORKLOAD]
    out[3][:8] = out[1][:8]
    return out


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [dense_greedy(model, p, n, MAX_SEQ_LEN) for p, (_, n, _) in zip(prompts, WORKLOAD)]


def serve(model, prompts, *, workload=WORKLOAD, log=None, sampling=None, **kw):
    """Run ``workload`` with its arrivals (every request with ``sampling``, default greedy);
    returns (outputs by submission order, step results, engine)."""
    engine = ServingEngine(model, EngineConfig(**(ENGINE | kw)), log=log)
    rids, results, step = {}, [], 0
    while step <= max(a for _, _, a in workload) or not engine.idle:
        for i, (_, n, arrival) in enumerate(workload):
            if arrival == step:
                rids[i] = engine.submit(prompts[i], n, sampling)
        results.append(engine.step())
        step += 1
        assert step < 200, "the loop does not finish"
    return [engine.finished[rids[i]].output for i in range(len(workload))], results, engine


def assert_pool_released(engine):
    pool = engine.pool
    assert engine.idle and pool.requests == ()
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    assert pool.num_available_pages == pool.num_pages


@pytest.fixture(scope="module")
def served(model, prompts):
    """``served(backend)``: the WORKLOAD's run on ``backend``, computed once per module."""
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = serve(model, prompts, backend=backend)
        return cache[backend]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_batching_matches_dense_greedy(served, expected, backend):
    outputs, results, engine = served(backend)
    assert outputs == expected
    # Requests joined while others decoded (mixed steps), prompt 1 ran in two chunks, request 3
    # attached prompt 1's first two pages and decoded next to request 1, and all left again.
    assert any(r.prefill and r.decode for r in results)
    assert sum(1 in r.prefill for r in results) == 2
    assert engine.finished[3].num_cached == 8
    assert any({1, 3} <= set(r.decode) for r in results)
    assert_pool_released(engine)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "xla"])
def test_backends_give_the_same_tokens(served, backend):
    # Each backend against the reference: together, every backend that runs gives the same tokens.
    outputs = {b: served(b)[0] for b in ("xla", backend)}
    assert len(set(map(str, outputs.values()))) == 1, outputs


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_small_pool_queues_requests_instead_of_running_dry(model, prompts, expected, prefix_caching):
    # 6 pages of 4 tokens hold at most two requests' worst cases at once: later requests wait.
    outputs, results, engine = serve(model, prompts, backend="xla", num_pages=6, prefix_caching=prefix_caching)
    assert outputs == expected
    assert max(len(set(r.prefill + r.decode)) for r in results) <= 2
    assert_pool_released(engine)


def test_run_drains_the_queue(model, prompts, expected):
    # Same engine geometry as the served fixture: the compiled xla steps are reused.
    engine = ServingEngine(model, EngineConfig(**ENGINE, backend="xla"), log=None)
    rids = [engine.submit(p, n) for p, (_, n, _) in zip(prompts, WORKLOAD)]
    assert engine.run() == dict(zip(rids, expected))
    assert {r.finish_reason for r in engine.finished.values()} == {"length"}
    assert_pool_released(engine)


def count_compiles(fn):
    """``fn()``'s XLA compilations."""
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(compiles)


def test_compile_count_equals_the_printed_bound(prompts, monkeypatch):
    # A model of its own (one layer, another vocab size) so that no other test's compilations count.
    model = LlamaModel(dataclasses.replace(CFG, vocab_size=65, num_layers=1), rngs=nnx.Rngs(1))
    before = serve_step._cache_size()
    log = io.StringIO()
    calls = []

    def recording(*args):
        calls.append(args[4].unpack()[0])
        return serve_step(*args)

    with monkeypatch.context() as m:
        m.setattr(jaxinfer.serve, "serve_step", recording)
        _, results, engine = serve(model, prompts, backend="xla", log=log)
    assert f"at most {engine.num_step_programs} step program(s)" in log.getvalue()
    # Prompt chunks only; mixed and decode only, each with one level or cascade levels; x2 sampling.
    assert engine.num_step_programs == 10
    kinds = {(bool(r.prefill), bool(r.decode)) for r in results} - {(False, False)}  # overlap's first call
    assert kinds == {(True, False), (True, True), (False, True)}
    levels = {type(b.decode_plan).__name__ for b in calls if b.decode_plan is not None}
    assert levels == {"Plan", "tuple"}, "the workload has decode steps with one level and with cascade levels"
    assert 3 < serve_step._cache_size() - before <= 5
    # warm_up compiles every program, greedy and sampling, and leaves the engine as it was.
    engine = ServingEngine(model, EngineConfig(**ENGINE, backend="xla"), log=None)
    engine.warm_up()
    assert serve_step._cache_size() - before == engine.num_step_programs
    assert engine.idle and engine.pool.requests == () and engine.step_times == []
    assert engine.pool.num_available_pages == engine.pool.num_pages and engine.stats["steps"] == 0
    # Other requests, arrivals and sampling compile nothing at all.
    rng = np.random.default_rng(7)
    other = [rng.integers(0, 65, int(n)).tolist() for n in rng.integers(1, 15, 6)]
    workload = [(len(p), 2 + i % 4, i) for i, p in enumerate(other)]
    assert count_compiles(lambda: serve(model, other, workload=workload, backend="xla")) == 0
    assert count_compiles(lambda: serve(model, prompts, backend="xla",
                                        sampling=SamplingParams(temperature=1.0, seed=3))) == 0


def test_warm_up_compiles_every_row_bucket(model, prompts):
    config = EngineConfig(**ENGINE, backend="xla", min_prefill_rows=4, min_decode_rows=2)
    engine = ServingEngine(model, config, log=None)
    assert engine.planner.prefill_buckets == (4, 8) and engine.planner.decode_buckets == (2, 4)
    # (3 x 3 - 1) batch shapes, 3 x 2 of them with decode rows twice (one level, cascade); x2 sampling.
    assert engine.num_step_programs == 2 * (8 + 6)
    assert count_compiles(lambda: engine.warm_up(sampling=False)) <= 14
    assert count_compiles(lambda: serve(model, prompts, backend="xla", min_prefill_rows=4, min_decode_rows=2)) == 0


def test_warm_up_needs_an_idle_engine(model, prompts):
    engine = ServingEngine(model, EngineConfig(**ENGINE, backend="xla"), log=None)
    engine.submit(prompts[0], 2)
    with pytest.raises(ValueError, match="idle"):
        engine.warm_up()


def test_cascade_threshold_bounds_the_programs(model):
    # Always cascade (0) or one level (no prefix caching): one decode program per batch shape.
    for kw in (dict(cascade_min_saved_bytes=0), dict(prefix_caching=False)):
        assert ServingEngine(model, EngineConfig(**(ENGINE | kw), backend="xla"), log=None).num_step_programs == 6
    with pytest.raises(ValueError, match="cascade_min_saved_bytes"):
        EngineConfig(**(ENGINE | dict(cascade_min_saved_bytes=-1)))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampling"])
def test_step_program_has_no_device_side_branch(model, prompts, monkeypatch, temperature):
    # XLA's GPU runtime copies a conditional's predicate (and a while loop's, every iteration) to
    # the host and blocks until the stream reaches it: a step holding one would return from its
    # dispatch only after the device had run up to there, and planning would stop overlapping the
    # device. The mixed step with cascade levels (pallas attention and sampling kernels), exported
    # for CUDA without a device (shared/DESIGN.md sec. 6), has neither.
    calls = []

    def recording(*args):
        calls.append(args)
        return serve_step(*args)

    monkeypatch.setattr(jaxinfer.serve, "serve_step", recording)
    serve(model, prompts, backend="pallas", sampling_backend="pallas", sampling=SamplingParams(temperature, seed=1),
          cascade_min_saved_bytes=0)
    batches = [(a, a[4].unpack()[0]) for a in calls]
    mixed = [a for a, b in batches if b.num_prefill_rows and b.num_rows > b.num_prefill_rows
             and isinstance(b.decode_plan, tuple)]
    assert mixed, "the workload has a mixed step with cascade levels"
    model_def, *arrays, sampling_backend, sampled = mixed[-1]
    assert sampled == (temperature > 0)
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        # __wrapped__: the step's compiler options belong to a top-level jit only.
        step = jax.jit(lambda *a: serve_step.__wrapped__(model_def, *a, sampling_backend, sampled))
        exported = jax.export.export(step, platforms=["cuda"], disabled_checks=[
            DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*arrays)
    text = exported.mlir_module()
    assert "custom_call @__gpu$xla.gpu.triton" in text
    assert not re.findall(r"stablehlo\.(?:case|if|while)\b", text)


def test_sampling_is_per_request_and_reproducible(model, prompts, expected):
    engine = ServingEngine(model, EngineConfig(**ENGINE, backend="xla"), log=None)
    hot = [SamplingParams(temperature=3.0, seed=s) for s in (1, 1, 2)]
    rids = [engine.submit(prompts[0], 5, s) for s in hot]
    # top_k=1 (and tiny top_p, min_p=1) leave only the most probable token: greedy.
    rids += [engine.submit(prompts[0], 5, s) for s in (SamplingParams(temperature=3.0, top_k=1, seed=5),
                                                        SamplingParams(temperature=3.0, top_p=1e-6, seed=6),
                                                        SamplingParams(temperature=3.0, min_p=1.0, seed=7))]
    out = engine.run()
    assert out[rids[0]] == out[rids[1]] != out[rids[2]]  # same seed, same draws; another seed differs
    assert out[rids[0]] != expected[0]
    for rid in rids[3:]:
        assert out[rid] == expected[0]


def test_cancel_frees_pages(model, prompts):
    engine = ServingEngine(model, EngineConfig(**ENGINE, backend="xla"), log=None)
    a, b = engine.submit(prompts[1], 6), engine.submit(prompts[0], 6)
    engine.step()
    assert engine.cancel(a) and not engine.cancel(a) and not engine.cancel(99)
    assert engine.finished[a].finish_reason == "cancelled" and a not in engine.pool.requests
    engine.run()
    assert engine.finished[b].finish_reason == "length" and len(engine.finished[b].output) == 6
    assert_pool_released(engine)


def test_stop_tokens_finish_a_request(model, prompts, expected):
    stop = expected[0][2]
    engine = ServingEngine(model, EngineConfig(**ENGINE, backend="xla", stop_token_ids=(stop,)), log=None)
    rid = engine.submit(prompts[0], 5)
    out = engine.run()[rid]
    assert out == expected[0][: expected[0].index(stop) + 1] and engine.finished[rid].finish_reason == "stop"


def test_validation(model):
    engine = ServingEngine(model, EngineConfig(num_pages=2, page_size=4, max_seq_len=16, backend="xla"), log=None)
    with pytest.raises(ValueError, match="non-empty prompt"):
        engine.submit([], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit([1], 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit([1] * 10, 7)
    with pytest.raises(ValueError, match="pool"):
        engine.submit([1] * 10, 3)  # 12 cached tokens need 3 pages of 4
    with pytest.raises(ValueError, match="sampling"):
        engine.submit([1], 3, dict(temperature=1.0))
    assert engine.step().tokens == {} and engine.idle
    for kw, name in ((dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                     (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_p=0.0), "top_p"),
                     (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(seed=1.5), "seed")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kw)
    for kw, name in ((dict(num_pages=0), "num_pages"), (dict(max_prefill_tokens=0), "max_prefill_tokens"),
                     (dict(kv_dtype=jnp.int8), "kv_dtype"), (dict(kv_dtype="int8"), "kv_dtype"),
                     (dict(kv_layout="NDH"), "kv_layout"), (dict(stop_token_ids=(-1,)), "stop_token_ids")):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**({"num_pages": 4} | kw))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ServingEngine(model, EngineConfig(num_pages=4, max_seq_len=10**6), log=None)
