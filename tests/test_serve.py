"""Continuous-batching serving loop: tokens against an independent dense greedy decode, per backend."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import BACKENDS
from jaxinfer.models.llama import LlamaConfig, LlamaModel, dense_decode_logits
from jaxinfer.nn import bucket
from jaxinfer.serve import ServingEngine, greedy_step

CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
    head_dim=16, rope_theta=1e4, dtype=jnp.bfloat16,
)
# bfloat16 because the Pallas backend takes 16-bit inputs only. Greedy tokens are compared
# exactly: on this seeded workload the reference's smallest top-2 logit gap is about 0.03 (logits
# ~2.5, computed in float32), well above the backends' rounding differences.
MAX_SEQ_LEN = 32
# (prompt length, max_new_tokens, step at which the request arrives)
WORKLOAD = [(5, 5, 0), (11, 3, 0), (3, 6, 2), (14, 2, 3)]


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n, _, _ in WORKLOAD]


def dense_greedy(model, prompt, max_new_tokens) -> list[int]:
    """Greedy generation one token at a time with a contiguous cache and jax.nn.dot_product_attention."""
    graphdef, params = nnx.split(model)
    shape = (1, MAX_SEQ_LEN, CFG.num_kv_heads, CFG.head_dim)
    caches = tuple((jnp.zeros(shape, CFG.dtype), jnp.zeros(shape, CFG.dtype)) for _ in range(CFG.num_layers))
    seq, out = list(prompt), []
    for pos in range(len(prompt) + max_new_tokens - 1):
        logits, caches = dense_decode_logits(graphdef, params, caches, jnp.asarray([seq[pos]]), jnp.asarray([pos]))
        if pos >= len(prompt) - 1:
            out.append(int(np.argmax(np.asarray(logits[0]))))
            seq.append(out[-1])
    return out


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [dense_greedy(model, p, n) for p, (_, n, _) in zip(prompts, WORKLOAD)]


def serve(model, prompts, *, backend, num_pages=32, max_batch_size=4, workload=WORKLOAD, **kw):
    """Run ``workload`` with its arrivals; returns (outputs by submission order, step results, engine)."""
    engine = ServingEngine(
        model, num_pages=num_pages, page_size=4, max_seq_len=MAX_SEQ_LEN, max_batch_size=max_batch_size,
        max_prefill_tokens=16, backend=backend, **kw,
    )
    rids, results, step = {}, [], 0
    while step <= max(a for _, _, a in workload) or not engine.idle:
        for i, (_, n, arrival) in enumerate(workload):
            if arrival == step:
                rids[i] = engine.submit(prompts[i], n)
        results.append(engine.step())
        step += 1
        assert step < 200, "the loop does not finish"
    return [engine.finished[rids[i]].output for i in range(len(workload))], results, engine


@pytest.fixture(scope="module")
def served(model, prompts):
    """``served(backend)``: the WORKLOAD's run on ``backend``, computed once per module."""
    cache = {}

    def get(backend):
        if backend not in cache:
            # Few row buckets keep the number of compilations (and the Pallas interpret time) small.
            cache[backend] = serve(model, prompts, backend=backend, min_prefill_rows=32, min_decode_rows=4)
        return cache[backend]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_batching_matches_dense_greedy(served, expected, backend):
    outputs, results, engine = served(backend)
    assert outputs == expected
    # Requests joined while others decoded (mixed prefill + decode steps) and all left again.
    assert any(r.prefill and r.decode for r in results)
    assert engine.idle and engine.pool.requests == () and engine.pool.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "xla"])
def test_backends_give_the_same_tokens(served, backend):
    # Each backend against the reference: together, every backend that runs gives the same tokens.
    outputs = {b: served(b)[0] for b in ("xla", backend)}
    assert len(set(map(str, outputs.values()))) == 1, outputs


def test_small_pool_queues_requests_instead_of_running_dry(model, prompts, expected):
    # 6 pages of 4 tokens hold at most two requests' worst cases at once: later requests wait.
    outputs, results, _ = serve(model, prompts, backend="xla", num_pages=6, min_prefill_rows=32, min_decode_rows=4)
    assert outputs == expected
    assert max(len(r.prefill) + len(r.decode) for r in results) <= 2


def test_step_compiles_once_per_bucket(prompts):
    # A model of its own (one layer, another vocab size) so that no other test's compilations count.
    model = LlamaModel(dataclasses.replace(CFG, vocab_size=65, num_layers=1), rngs=nnx.Rngs(1))
    before = greedy_step._cache_size()
    workload = WORKLOAD[:3]
    _, results, _ = serve(model, prompts, backend="xla", max_batch_size=2, min_prefill_rows=32, workload=workload)
    # rids are given in submission order, which is the workload's order.
    buckets = {(bucket(sum(workload[i][0] for i in r.prefill), 32), bucket(len(r.decode))) for r in results}
    assert len(results) > len(buckets) > 2
    assert greedy_step._cache_size() - before == len(buckets)


def test_submit_validation(model):
    engine = ServingEngine(model, num_pages=2, page_size=4, max_seq_len=16, backend="xla")
    with pytest.raises(ValueError, match="non-empty prompt"):
        engine.submit([], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit([1] * 10, 7)
    with pytest.raises(ValueError, match="pool"):
        engine.submit([1] * 10, 3)  # 12 cached tokens need 3 pages of 4
    assert engine.step().tokens == {} and engine.idle


def test_run_drains_the_queue(model, prompts, expected):
    # Same engine geometry as the served fixture: the compiled xla steps are reused.
    engine = ServingEngine(
        model, num_pages=32, page_size=4, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, max_prefill_tokens=16,
        backend="xla", min_prefill_rows=32, min_decode_rows=4,
    )
    rids = [engine.submit(p, n) for p, (_, n, _) in zip(prompts, WORKLOAD)]
    assert engine.run() == dict(zip(rids, expected))
    assert engine.idle and engine.pool.num_free_pages == 32
