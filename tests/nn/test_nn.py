"""jaxinfer.nn (KV-cache pool, step planner, paged attention) and the Llama model built on it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS
from flax import nnx

import jaxinfer
from jaxinfer.models.llama import LlamaConfig, LlamaModel, decode_step_benchmark_setup, paged_logits
from jaxinfer.nn import KVCachePool, OutOfPagesError, StepPlanner
from jaxinfer.plan.checks import check_page_table

TINY = LlamaConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
    head_dim=8, rope_theta=1e4, dtype=jnp.float32,
)


# ---------------------------------------------------------------- KVCachePool


def check_pool_invariants(pool: KVCachePool):
    """Live requests own disjoint pages, exactly as many as their length needs; the rest are free."""
    owned = [p for r in pool.requests for p in pool.pages(r)]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    assert len(owned) + pool.num_free_pages == pool.num_pages
    for r in pool.requests:
        assert len(pool.pages(r)) == -(-pool.seq_len(r) // pool.page_size)
    rids = list(pool.requests)
    indptr, indices, last = pool.page_table(rids)
    indptr, indices, last = check_page_table(indptr, indices, last, pool.page_size, pool.num_pages)
    lens = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * pool.page_size + last, 0)
    assert lens.tolist() == [pool.seq_len(r) for r in rids]
    assert indices.tolist() == owned


def test_pool_allocates_grows_and_frees():
    pool = KVCachePool(8, 4, 1, 2, 8, dtype=jnp.float32)
    pool.add("a")
    np.testing.assert_array_equal(pool.extend("a", 6), np.arange(6))
    pool.add("b")
    np.testing.assert_array_equal(pool.extend("b", 1), [0])
    np.testing.assert_array_equal(pool.extend("a", 3), [6, 7, 8])
    indptr, indices, last = pool.page_table(["a", "b"])
    assert indptr.tolist() == [0, 3, 4] and last.tolist() == [1, 1]
    assert indices.dtype == np.int32 and len(set(indices.tolist())) == 4
    check_pool_invariants(pool)
    pool.free("a")
    assert pool.num_free_pages == 7 and pool.requests == ("b",)
    check_pool_invariants(pool)


def test_pool_random_operations_keep_invariants():
    rng = np.random.default_rng(0)
    pool = KVCachePool(13, 3, 1, 1, 4, dtype=jnp.float32)
    next_id = 0
    for _ in range(300):
        op = rng.integers(3)
        if op == 0 or not pool.requests:
            pool.add(next_id)
            next_id += 1
        elif op == 1:
            rid = pool.requests[rng.integers(len(pool.requests))]
            before = (pool.num_free_pages, pool.pages(rid), pool.seq_len(rid))
            n = int(rng.integers(0, 8))
            try:
                pool.extend(rid, n)
            except OutOfPagesError:
                assert (pool.num_free_pages, pool.pages(rid), pool.seq_len(rid)) == before
        else:
            pool.free(pool.requests[rng.integers(len(pool.requests))])
        check_pool_invariants(pool)


def test_pool_out_of_pages_is_clear_and_atomic():
    pool = KVCachePool(4, 2, 1, 1, 4, dtype=jnp.float32)
    pool.add(0)
    pool.extend(0, 5)  # 3 pages
    pool.add(1)
    with pytest.raises(OutOfPagesError, match=r"needs 2 more page\(s\).*only 1 of 4 pages are free"):
        pool.extend(1, 3)
    assert pool.seq_len(1) == 0 and pool.pages(1) == () and pool.num_free_pages == 1
    pool.extend(1, 2)  # exactly the last page
    assert pool.num_free_pages == 0


def test_pool_errors():
    with pytest.raises(ValueError, match="page_size"):
        KVCachePool(4, 0, 1, 1, 4)
    with pytest.raises(ValueError, match="kv_layout"):
        KVCachePool(4, 2, 1, 1, 4, kv_layout="NDH")
    pool = KVCachePool(4, 2, 1, 1, 4)
    pool.add(0)
    with pytest.raises(ValueError, match="already"):
        pool.add(0)
    with pytest.raises(ValueError, match="num_tokens"):
        pool.extend(0, -1)
    with pytest.raises(KeyError):
        pool.extend(7, 1)
    with pytest.raises(KeyError):
        pool.free(7)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_pool_pages_reused_after_free_never_overwrite_live_tokens(kv_layout):
    # Request 0 stays live while request 1 is freed and request 2 reuses its pages: writing
    # request 2 through the pool's page table must leave request 0's tokens intact.
    rng = np.random.default_rng(1)
    pool = KVCachePool(6, 2, 1, 2, 4, dtype=jnp.float32, kv_layout=kv_layout)
    caches = (jnp.full(pool.caches[0][0].shape, jnp.nan), jnp.full(pool.caches[0][1].shape, jnp.nan))

    def write(rids, lens):
        nonlocal caches
        for r, n in zip(rids, lens):
            pool.add(r)
            pool.extend(r, n)
        indptr, indices, last = pool.page_table(rids)
        seq = np.asarray([pool.seq_len(r) for r in rids])
        nnz = int(sum(lens))
        b, pos = jaxinfer.get_batch_indices_positions(np.concatenate([[0], np.cumsum(lens)]), seq, nnz)
        kv = rng.standard_normal((2, nnz, 2, 4)).astype(np.float32)
        caches = jaxinfer.append_paged_kv_cache(kv[0], kv[1], b, pos, caches, indices, indptr, last, kv_layout=kv_layout)
        return kv

    def read(rid):
        pages = np.asarray(pool.pages(rid))
        t = np.arange(pool.seq_len(rid))
        k = np.asarray(caches[0])
        return k[pages[t // 2], t % 2] if kv_layout == "NHD" else k[pages[t // 2], :, t % 2]

    kv0 = write([0, 1], [3, 4])
    pool.free(1)
    kv2 = write([2], [5])
    assert set(pool.pages(2)) & set(pool.pages(0)) == set()
    np.testing.assert_array_equal(read(0), kv0[0][:3])
    np.testing.assert_array_equal(read(2), kv2[0])


# ---------------------------------------------------------------- Llama model vs float64 numpy


def params64(model: LlamaModel) -> dict:
    def get(x):
        return np.asarray(x[...], np.float64)

    layers = [
        dict(
            attn_norm=get(l.input_norm.scale), mlp_norm=get(l.post_attention_norm.scale),
            wq=get(l.self_attn.q_proj.kernel), wk=get(l.self_attn.k_proj.kernel),
            wv=get(l.self_attn.v_proj.kernel), wo=get(l.self_attn.o_proj.kernel),
            wg=get(l.mlp.gate_proj.kernel), wu=get(l.mlp.up_proj.kernel), wd=get(l.mlp.down_proj.kernel),
        )
        for l in model.layers
    ]
    return dict(embed=get(model.embed.embedding), norm=get(model.norm.scale), lm_head=get(model.lm_head.kernel), layers=layers)


def np_llama_logits(p: dict, cfg: LlamaConfig, tokens) -> np.ndarray:
    """Float64 numpy forward of one sequence (causal, from position 0): logits ``[L, vocab]``."""

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w

    def rope(x):  # x [L, H, D], rotate-half
        d = cfg.head_dim
        ang = np.arange(len(x))[:, None] * cfg.rope_theta ** (-2.0 * np.arange(d // 2) / d)
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    L, hq, hkv, d = len(tokens), cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
    x = p["embed"][np.asarray(tokens)]
    causal = np.tril(np.ones((L, L), bool))
    for lp in p["layers"]:
        h = rms(x, lp["attn_norm"])
        q = rope((h @ lp["wq"]).reshape(L, hq, d))
        k = np.repeat(rope((h @ lp["wk"]).reshape(L, hkv, d)), hq // hkv, axis=1)
        v = np.repeat((h @ lp["wv"]).reshape(L, hkv, d), hq // hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), v).reshape(L, hq * d)
        x = x + o @ lp["wo"]
        h = rms(x, lp["mlp_norm"])
        g = h @ lp["wg"]
        x = x + (g / (1 + np.exp(-g)) * (h @ lp["wu"])) @ lp["wd"]
    return rms(x, p["norm"]) @ p["lm_head"]


@pytest.fixture(scope="module")
def tiny_model():
    return LlamaModel(TINY, rngs=nnx.Rngs(3))


def test_paged_prefill_then_decode_matches_float64_forward(tiny_model):
    # Step 1 prefills two prompts (ragged, causal); step 2 prefills a third while the first two
    # decode one token each (mixed step). Each sampled row's logits must equal a float64 forward
    # of that request's whole sequence. The cache starts NaN-filled: a read of an unwritten slot shows.
    cfg, rng = TINY, np.random.default_rng(4)
    pool = KVCachePool(16, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    pool.caches = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), pool.caches)
    planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=32, max_batch_size=4, q_data_type=cfg.dtype)
    graphdef, params = nnx.split(tiny_model)
    ref = params64(tiny_model)
    seqs = {r: rng.integers(0, cfg.vocab_size, n).tolist() for r, n in ((0, 7), (1, 5), (2, 9))}

    def step(prefill, decode):
        for r in prefill:
            pool.add(r)
            pool.extend(r, len(seqs[r]))
        for r in decode:
            seqs[r].append(int(rng.integers(cfg.vocab_size)))
            pool.extend(r, 1)
        batch = planner.plan(prefill, decode)
        tokens = np.zeros(batch.num_rows, np.int32)
        flat = [t for r in prefill for t in seqs[r]]
        tokens[: len(flat)] = flat
        tokens[batch.num_prefill_rows : batch.num_prefill_rows + len(decode)] = [seqs[r][-1] for r in decode]
        logits, pool.caches = paged_logits(graphdef, params, pool.caches, tokens, batch)
        for i, r in enumerate(list(prefill) + list(decode)):
            want = np_llama_logits(ref, cfg, seqs[r])[-1]
            np.testing.assert_allclose(np.asarray(logits[i]), want, rtol=1e-4, atol=1e-4, err_msg=f"request {r}")

    step([0, 1], [])
    step([2], [0, 1])
    step([], [2, 0])


def test_planner_shapes_depend_only_on_buckets():
    # Two batches of different composition in the same buckets give plans of identical pytree
    # structure and shapes, so the jitted step does not recompile.
    pool = KVCachePool(32, 4, 1, 2, 8, dtype=jnp.float32)
    planner = StepPlanner(pool, 4, max_seq_len=64, max_batch_size=8, backend="xla", q_data_type=jnp.float32)
    for r, n in enumerate((3, 9, 17, 2, 6, 5)):
        pool.add(r)
        pool.extend(r, n)
    a = planner.plan([0, 1], [2, 3, 4])
    b = planner.plan([5], [0, 2, 1])
    sig = lambda x: jax.tree.map(lambda y: (y.shape, y.dtype), x)  # noqa: E731
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert sig(a) == sig(b)
    assert a.num_rows == 16 + 4


def test_planner_errors():
    pool = KVCachePool(8, 4, 1, 2, 8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        StepPlanner(pool, 3, max_seq_len=8, max_batch_size=2)
    planner = StepPlanner(pool, 4, max_seq_len=8, max_batch_size=2)
    for r in range(3):
        pool.add(r)
        pool.extend(r, 1)
    with pytest.raises(ValueError, match="only once"):
        planner.plan([0], [0])
    with pytest.raises(ValueError, match="max_batch_size"):
        planner.plan([0], [1, 2])
    pool.extend(2, 8)
    with pytest.raises(ValueError, match="max_seq_len"):
        planner.plan([], [2])


# ---------------------------------------------------------------- e2e benchmark step


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_benchmark_paged_matches_dense(backend):
    # The paged jaxinfer step and the dense jax.nn.dot_product_attention step hold the same cache
    # contents and weights; batch 3 is not a power of two (padded decode rows). Pallas takes
    # 16-bit inputs only, so its model runs in bfloat16 (and the dense one with it).
    dtype, tol = (jnp.float32, 1e-4) if backend == "xla" else (jnp.bfloat16, 5e-2)
    cfg = dataclasses.replace(TINY, head_dim=16)
    kw = dict(num_layers=2, batch=3, context=11, dtype=dtype, config=cfg, page_size=4, seed=5)
    paged = decode_step_benchmark_setup(backend=backend, **kw)
    dense = decode_step_benchmark_setup(backend="dense-xla", **kw)
    lp, ld = paged(), dense()
    assert lp.shape == ld.shape == (3, cfg.vocab_size) and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ld), rtol=tol, atol=tol)
    # The step overwrites the same slot, so running it again gives the same logits.
    np.testing.assert_array_equal(np.asarray(paged()), np.asarray(lp))
    assert np.ptp(np.asarray(lp), axis=0).max() > 1e-3, "requests should differ"
