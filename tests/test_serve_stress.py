"""200 random submissions, cancellations and completions on a tight pool with prefix caching:
the pool's bookkeeping holds after every step, nothing leaks, and every request's tokens equal the
same request served alone."""

import collections

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.models.llama import LlamaConfig, LlamaModel
from jaxinfer.serve import EngineConfig, SamplingParams, ServingEngine

CFG = LlamaConfig(
    vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
    head_dim=8, rope_theta=1e4, dtype=jnp.float32,
)
# 20 pages of 4 tokens for requests of up to 24 cached tokens (6 pages): the pool runs short, so
# requests queue and cached prefix pages are reclaimed; 6 prompt tokens per step chunk prompts.
ENGINE = dict(num_pages=20, page_size=4, max_seq_len=28, max_batch_size=4, max_prefill_tokens=6, backend="xla",
              cascade_min_saved_bytes=1)  # cascade levels in the steps that share pages


def check_pool(engine: ServingEngine):
    """Pages held match the running requests, each request's pages hold its computed tokens,
    refcounts count holders, a page is free, cached or held, and shared pages are full."""
    pool = engine.pool
    assert set(pool.requests) == {r.rid for r in engine.running}
    held = collections.Counter(p for r in pool.requests for p in pool.pages(r))
    free = list(pool._free)
    assert len(free) == len(set(free)) == pool.num_free_pages, "a page is free twice"
    cached = [p for p in range(pool.num_pages) if pool.in_prefix_tree(p) and pool.refcount(p) == 0]
    assert len(cached) == pool.num_cached_pages
    assert set(free).isdisjoint(held) and set(free).isdisjoint(cached) and set(cached).isdisjoint(held)
    assert len(free) + len(cached) + len(held) == pool.num_pages, "a page leaked"
    for p in range(pool.num_pages):
        assert pool.refcount(p) == held[p]
    for req in engine.running:
        pages = pool.pages(req.rid)
        assert pool.seq_len(req.rid) == req.num_computed and len(pages) == pool.pages_for(req.num_computed)
        for i, p in enumerate(pages):
            if held[p] > 1:
                assert (i + 1) * pool.page_size <= req.num_computed, "a partial page is shared"
    # Admission keeps every running request's worst case inside the pool.
    need = sum(pool.pages_for(r.cached_tokens_at_most) - len(pool.pages(r.rid)) for r in engine.running)
    assert need <= pool.num_available_pages


def test_random_traffic_keeps_the_pool_consistent_and_outputs_equal_to_alone():
    model = LlamaModel(CFG, rngs=nnx.Rngs(11))
    rng = np.random.default_rng(12)
    system = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (9, 12, 5)]
    engine = ServingEngine(model, EngineConfig(**ENGINE), log=None)
    requests = {}  # rid -> (prompt, max_new_tokens, sampling)
    submitted = cancelled = 0
    while submitted < 200 or not engine.idle:
        for _ in range(min(int(rng.integers(0, 3)), 200 - submitted)):
            tail = rng.integers(0, CFG.vocab_size, rng.integers(1, 9)).tolist()
            prompt = system[rng.integers(3)][: rng.integers(13)] + tail
            n = int(rng.integers(1, 7))
            temperature = float(rng.choice([0.0, 0.7, 1.5]))
            s = SamplingParams(temperature=temperature, top_k=int(rng.integers(0, 6)),
                               top_p=float(rng.choice([1.0, 0.8])), min_p=float(rng.choice([0.0, 0.1])),
                               seed=int(rng.integers(1 << 31)))
            requests[engine.submit(prompt, n, s)] = (prompt, n, s)
            submitted += 1
        if rng.random() < 0.1:
            live = [r.rid for r in (*engine.waiting, *engine.running)]
            if live:
                cancelled += engine.cancel(live[rng.integers(len(live))])
        engine.step()
        check_pool(engine)
    pool = engine.pool
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    assert pool.num_free_pages + pool.num_cached_pages == pool.num_pages
    pool.clear_prefix_cache()
    assert pool.num_free_pages == pool.num_pages
    reasons = collections.Counter(r.finish_reason for r in engine.finished.values())
    assert len(engine.finished) == 200 and reasons["cancelled"] == cancelled > 5 and reasons["length"] > 150
    assert engine.stats["cached_tokens"] > 200, "prefix caching should have attached many pages"

    # Alone: one engine per request (the compiled steps are shared), without prefix caching.
    alone_config = EngineConfig(**ENGINE, prefix_caching=False)
    for rid, (prompt, n, s) in requests.items():
        alone = ServingEngine(model, alone_config, log=None)
        alone_rid = alone.submit(prompt, n, s)
        want = alone.run()[alone_rid]
        got = engine.finished[rid]
        if got.finish_reason == "cancelled":
            assert got.output == want[: len(got.output)], rid
        else:
            assert got.output == want, rid
