"""Overlapped serving (EngineConfig.overlap): the same token streams as the synchronous engine,
greedy and seeded sampling, with stop tokens (a stopped request's extra row discarded), prefix
caching and cancellations; the two modes share their compiled step programs."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer.models.llama import LlamaConfig, LlamaModel
from jaxinfer.serve import EngineConfig, SamplingParams, ServingEngine

# float32 on the xla backend: the logits do not depend on the batch a request ran in, so tokens
# compare exactly.
CFG = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=1e4, dtype=jnp.float32)
ENGINE = dict(num_pages=40, page_size=4, max_seq_len=40, max_batch_size=4, max_prefill_tokens=8, backend="xla",
              cascade_min_saved_bytes=1)  # cascade levels in the steps that share pages


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, rngs=nnx.Rngs(3))


def traffic(seed: int, n: int = 14):
    """``n`` requests ``(arrival call, prompt, max_new_tokens, sampling)``: prompts that share
    prefixes of one or two pages, half of them sampled (temperature, top-k/p, min-p, seeds)."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, CFG.vocab_size, 9).tolist()
    out = []
    for i in range(n):
        tail = rng.integers(0, CFG.vocab_size, rng.integers(1, 12)).tolist()
        prompt = shared[: int(rng.choice([0, 4, 9]))] + tail
        sampling = SamplingParams() if i % 2 else SamplingParams(
            temperature=float(rng.choice([0.7, 1.5])), top_k=int(rng.integers(0, 8)),
            top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.0, 0.05])), seed=int(rng.integers(1 << 31)))
        out.append((int(rng.integers(0, 12)), prompt, int(rng.integers(1, 16)), sampling))
    return out


def serve(model, requests, *, overlap, cancel_at=None, **kw):
    """Run ``requests`` with their arrivals (and ``cancel_at = (call, index)``); returns the
    finished requests in submission order, the step results and the engine."""
    engine = ServingEngine(model, EngineConfig(**ENGINE, overlap=overlap, **kw), log=None)
    rids, results, call = {}, [], 0
    while call <= max(a for a, *_ in requests) or not engine.idle:
        for i, (arrival, prompt, n, sampling) in enumerate(requests):
            if arrival == call:
                rids[i] = engine.submit(prompt, n, sampling)
        if cancel_at is not None and cancel_at[0] == call:
            assert engine.cancel(rids[cancel_at[1]])
        results.append(engine.step())
        call += 1
        assert call < 500, "the loop does not finish"
    return [engine.finished[rids[i]] for i in range(len(requests))], results, engine


def assert_released(engine):
    pool = engine.pool
    assert engine.idle and pool.requests == () and not engine.running
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    assert pool.num_available_pages == pool.num_pages


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_overlap_gives_the_synchronous_token_streams(model, prefix_caching):
    requests = traffic(0)
    # Two frequent tokens of the synchronous run stop requests early: rows past a stop token are
    # then in flight and must be discarded.
    first, _, _ = serve(model, requests, overlap=False, prefix_caching=prefix_caching)
    counts = collections.Counter(t for r in first for t in r.output)
    stop = tuple(t for t, _ in counts.most_common(2))
    sync, sync_results, sync_engine = serve(model, requests, overlap=False, prefix_caching=prefix_caching,
                                            stop_token_ids=stop)
    over, over_results, engine = serve(model, requests, overlap=True, prefix_caching=prefix_caching,
                                       stop_token_ids=stop)
    assert [r.output for r in over] == [r.output for r in sync]
    assert [r.finish_reason for r in over] == [r.finish_reason for r in sync]
    reasons = collections.Counter(r.finish_reason for r in sync)
    assert reasons["stop"] >= 3 and reasons["length"] >= 3, reasons
    # Each token is reported once, by the call that brought it to the host, in order.
    for results, finished in ((sync_results, sync), (over_results, over)):
        streams = collections.defaultdict(list)
        for res in results:
            for rid, tok in res.tokens.items():
                streams[rid].append(tok)
        assert [streams[r.rid] for r in finished] == [r.output for r in finished]
    # A stopped request's row one step past its stop token ran and was dropped.
    assert engine.stats["discarded_rows"] > 0 and sync_engine.stats["discarded_rows"] == 0
    for key in ("decode_tokens", "prefill_tokens"):
        assert engine.stats[key] == sync_engine.stats[key] or (key == "prefill_tokens" and prefix_caching)
    assert engine.stats["decode_tokens"] == sum(len(res.decode) for res in over_results)
    if prefix_caching:
        assert engine.stats["cached_tokens"] > 0 and sync_engine.stats["cached_tokens"] > 0
    assert_released(engine)
    assert_released(sync_engine)


def test_overlap_dispatches_the_next_step_before_the_tokens_of_the_last(model):
    engine = ServingEngine(model, EngineConfig(**ENGINE), log=None)
    assert engine.config.overlap  # the default
    rid = engine.submit([1, 2, 3], 3)
    first = engine.step()  # dispatched step 0, nothing back yet
    assert first.tokens == {} and engine.stats["steps"] == 1 and not engine.idle
    second = engine.step()  # dispatched step 1 (its input token still on the device), step 0 back
    assert engine.stats["steps"] == 2 and list(second.tokens) == [rid] and second.prefill == (rid,)
    assert engine.running[0].num_generated == 2 and len(engine.running[0].output) == 1
    engine.run()
    assert len(engine.finished[rid].output) == 3 and engine.stats["steps"] == 3
    assert len(engine.step_times) == 3 and all(t >= 0 for row in engine.step_times for t in row)
    assert_released(engine)


def test_cancel_with_a_step_in_flight(model):
    requests = traffic(1, n=6)
    sync, _, _ = serve(model, requests, overlap=False)
    over, _, engine = serve(model, requests, overlap=True, cancel_at=(14, 2))
    assert over[2].finish_reason == "cancelled" and over[2].output == sync[2].output[: len(over[2].output)]
    # It was decoding: its row of the step in flight came back after the cancel and was dropped.
    assert 0 < len(over[2].output) < len(sync[2].output) and engine.stats["discarded_rows"] == 1
    assert [r.output for i, r in enumerate(over) if i != 2] == [r.output for i, r in enumerate(sync) if i != 2]
    assert_released(engine)


def test_overlap_and_synchronous_steps_share_their_programs(model):
    # After the modules' other runs compiled this geometry, neither mode compiles anything.
    requests = traffic(2, n=5)
    serve(model, requests, overlap=False)
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        serve(model, requests, overlap=True)
        serve(model, traffic(3, n=5), overlap=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_overlap_must_be_a_bool():
    with pytest.raises(ValueError, match="overlap"):
        EngineConfig(num_pages=4, overlap=1)
