"""jaxinfer.nn (KV-cache pool and prefix cache, step planner, paged attention) and the Llama model built on it."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxinfer
from jaxinfer.models.llama import LlamaConfig, LlamaModel, decode_step_benchmark_setup, paged_logits
from jaxinfer.nn import KVCachePool, OutOfPagesError, StepPlanner
from jaxinfer.plan.checks import check_page_table
from jaxinfer.plan import transfer

TINY = LlamaConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
    head_dim=8, rope_theta=1e4, dtype=jnp.float32,
)


# ---------------------------------------------------------------- KVCachePool


def check_pool_invariants(pool: KVCachePool):
    """Every page is free, cached or held, exactly one of them; a page's refcount is the number of
    requests listing it; shared pages are full in every holder; the free list has no duplicates;
    each request has the pages its length needs and a valid page table."""
    held = collections.Counter(p for r in pool.requests for p in pool.pages(r))
    free = list(pool._free)
    assert len(free) == len(set(free)) == pool.num_free_pages, "a page is on the free list twice"
    cached = {p for p in range(pool.num_pages) if pool.in_prefix_tree(p) and pool.refcount(p) == 0}
    assert len(cached) == pool.num_cached_pages
    assert set(free).isdisjoint(held) and set(free).isdisjoint(cached) and cached.isdisjoint(held)
    assert len(free) + len(cached) + len(held) == pool.num_pages
    for p in range(pool.num_pages):
        assert pool.refcount(p) == held[p], f"page {p}: refcount {pool.refcount(p)}, held by {held[p]}"
        if p in free:
            assert not pool.in_prefix_tree(p)
    for r in pool.requests:
        pages = pool.pages(r)
        assert len(pages) == -(-pool.seq_len(r) // pool.page_size)
        assert len(set(pages)) == len(pages), "a request lists a page twice"
        for i, p in enumerate(pages):
            if held[p] > 1:  # shared: full in this request, never written again
                assert (i + 1) * pool.page_size <= pool.seq_len(r), f"request {r} shares its partial page {p}"
    rids = list(pool.requests)
    indptr, indices, last = pool.page_table(rids)
    indptr, indices, last = check_page_table(indptr, indices, last, pool.page_size, pool.num_pages)
    lens = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * pool.page_size + last, 0)
    assert lens.tolist() == [pool.seq_len(r) for r in rids]
    assert indices.tolist() == [p for r in rids for p in pool.pages(r)]


def test_pool_allocates_grows_and_frees():
    pool = KVCachePool(8, 4, 1, 2, 8, dtype=jnp.float32)
    assert pool.add("a") == 0
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


def test_pool_prefix_cache_shares_full_pages_only():
    pool = KVCachePool(16, 4, 1, 1, 4, dtype=jnp.float32)
    tokens = list(range(100, 114))  # 14 tokens: 3 full pages and a partial one
    pool.add("a")
    pool.extend("a", 14)
    pool.cache_prefix("a", tokens[:10])  # only 2 pages are full among the first 10 tokens
    a = pool.pages("a")
    assert [pool.in_prefix_tree(p) for p in a] == [True, True, False, False]
    pool.cache_prefix("a", tokens)  # adds the third full page, never the partial fourth
    assert [pool.in_prefix_tree(p) for p in a] == [True, True, True, False]
    # b matches whole pages only: 11 tokens cover 2 full pages.
    assert pool.add("b", tokens[:11]) == 8 and pool.pages("b") == a[:2]
    # c differs in its 6th token: one page.
    assert pool.add("c", tokens[:5] + [0] + tokens[6:]) == 4 and pool.pages("c") == a[:1]
    assert pool.add("d", [7] * 12) == 0 and pool.pages("d") == ()
    assert [pool.refcount(p) for p in a] == [3, 2, 1, 1]
    pool.extend("b", 3)  # b writes past its prefix into a page of its own
    assert pool.pages("b")[:2] == a[:2] and pool.refcount(pool.pages("b")[2]) == 1
    check_pool_invariants(pool)
    pool.free("a")
    # a's registered pages stay cached (page 2) or held (0, 1); its partial page is free again.
    assert pool.num_cached_pages == 1 and pool.refcount(a[2]) == 0 and pool.in_prefix_tree(a[2])
    assert a[3] in pool._free
    check_pool_invariants(pool)
    for r in ("b", "c", "d"):
        pool.free(r)
    assert pool.num_cached_pages == 3 and pool.num_available_pages == 16
    assert all(pool.refcount(p) == 0 for p in range(16))
    check_pool_invariants(pool)
    # A later request attaches the cached pages again.
    assert pool.add("e", tokens) == 12 and pool.pages("e") == a[:3] and pool.num_cached_pages == 0
    pool.free("e")
    pool.clear_prefix_cache()
    assert pool.num_free_pages == 16 and pool.num_cached_pages == 0 and pool.add("f", tokens) == 0


def test_pool_reclaims_least_recently_used_cached_pages():
    pool = KVCachePool(6, 2, 1, 1, 4, dtype=jnp.float32)
    for rid, tokens in (("x", [1, 2, 3, 4]), ("y", [5, 6, 7, 8])):
        pool.add(rid)
        pool.extend(rid, 4)
        pool.cache_prefix(rid, tokens)
    x, y = pool.pages("x"), pool.pages("y")
    pool.free("x")
    pool.free("y")
    assert pool.add("x2", [1, 2, 3, 4]) == 4  # x is used again: y is now the least recent
    pool.free("x2")
    pool.add("z")
    pool.extend("z", 6)  # 3 pages: 2 free, then y's leaf (its second page) is reclaimed
    assert pool.in_prefix_tree(y[0]) and not pool.in_prefix_tree(y[1]) and y[1] in pool.pages("z")
    assert all(pool.in_prefix_tree(p) for p in x)
    check_pool_invariants(pool)
    pool.extend("z", 2)  # then y's first page, a leaf now; x's chain stays
    assert not pool.in_prefix_tree(y[0]) and all(pool.in_prefix_tree(p) for p in x)
    check_pool_invariants(pool)
    with pytest.raises(OutOfPagesError, match="2 cached of 6 pages"):
        pool.extend("z", 6)
    check_pool_invariants(pool)


def test_pool_two_requests_caching_the_same_prefix_keep_their_own_pages():
    # Both computed the same tokens at once: the first registration wins; the second request keeps
    # its own (private) pages and registers nothing below a page it does not hold.
    pool = KVCachePool(8, 2, 1, 1, 4, dtype=jnp.float32)
    for rid in ("a", "b"):
        pool.add(rid)
        pool.extend(rid, 4)
    pool.cache_prefix("a", [1, 2, 3, 4])
    pool.cache_prefix("b", [1, 2, 3, 4])
    assert all(pool.in_prefix_tree(p) for p in pool.pages("a"))
    assert not any(pool.in_prefix_tree(p) for p in pool.pages("b"))
    pool.free("a")
    assert pool.add("c", [1, 2, 3]) == 2 and pool.pages("c")[0] == pool._root.children[(1, 2)].page
    check_pool_invariants(pool)


def test_pool_random_operations_keep_invariants():
    rng = np.random.default_rng(0)
    pool = KVCachePool(13, 3, 1, 1, 4, dtype=jnp.float32)
    prefixes = [rng.integers(0, 3, 12).tolist() for _ in range(3)]  # few token values: many matches
    tokens, next_id = {}, 0
    for _ in range(400):
        op = rng.integers(4)
        if op == 0 or not pool.requests:
            seq = prefixes[rng.integers(3)][: rng.integers(13)] + rng.integers(0, 3, 8).tolist()
            attached = pool.add(next_id, seq[: rng.integers(len(seq) + 1)])
            assert attached % 3 == 0 and pool.seq_len(next_id) == attached
            tokens[next_id] = seq
            next_id += 1
        elif op == 1:
            rid = pool.requests[rng.integers(len(pool.requests))]
            before = (pool.num_free_pages, pool.num_cached_pages, pool.pages(rid), pool.seq_len(rid))
            n = int(rng.integers(0, 8))
            try:
                pool.extend(rid, min(n, len(tokens[rid]) - pool.seq_len(rid)))
            except OutOfPagesError:
                assert (pool.num_free_pages, pool.num_cached_pages, pool.pages(rid), pool.seq_len(rid)) == before
        elif op == 2:
            rid = pool.requests[rng.integers(len(pool.requests))]
            pool.cache_prefix(rid, tokens[rid][: pool.seq_len(rid)])
        else:
            pool.free(pool.requests[rng.integers(len(pool.requests))])
        check_pool_invariants(pool)
    for rid in pool.requests:
        pool.free(rid)
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    pool.clear_prefix_cache()
    assert pool.num_free_pages == pool.num_pages


def test_pool_out_of_pages_is_clear_and_atomic():
    pool = KVCachePool(4, 2, 1, 1, 4, dtype=jnp.float32)
    pool.add(0)
    pool.extend(0, 5)  # 3 pages
    pool.add(1)
    with pytest.raises(OutOfPagesError, match=r"needs 2 more page\(s\).*only 1 free and 0 cached of 4 pages"):
        pool.extend(1, 3)
    assert pool.seq_len(1) == 0 and pool.pages(1) == () and pool.num_free_pages == 1
    pool.extend(1, 2)  # exactly the last page
    assert pool.num_free_pages == 0


def test_pool_errors():
    with pytest.raises(ValueError, match="page_size"):
        KVCachePool(4, 0, 1, 1, 4)
    with pytest.raises(ValueError, match="kv_layout"):
        KVCachePool(4, 2, 1, 1, 4, kv_layout="NDH")
    for kw, name in ((dict(dtype="e4m4"), "kv_dtype"), (dict(k_scale=1.0), "k_scale"),
                     (dict(dtype="e4m3", k_scale=(1.0, 2.0, 3.0)), "k_scale"),
                     (dict(dtype="e5m2", v_scale=0.0), "v_scale"),
                     (dict(dtype="e4m3", v_scale=float("inf")), "v_scale"),
                     (dict(dtype="e4m3", k_scale=True), "k_scale"), (dict(dtype="e4m3", k_scale="1"), "k_scale")):
        with pytest.raises(ValueError, match=name):
            KVCachePool(4, 2, 1, 2, 4, **kw)
    pool = KVCachePool(4, 2, 1, 2, 4, dtype="e4m3", k_scale=(0.5, 2.0))
    assert pool.dtype == jnp.float8_e4m3fn and pool.caches[0][0].dtype == jnp.float8_e4m3fn
    assert pool.k_scale.tolist() == [0.5, 2.0] and pool.v_scale.tolist() == [1.0, 1.0]
    assert KVCachePool(4, 2, 1, 2, 4).k_scale is None
    pool = KVCachePool(4, 2, 1, 1, 4)
    pool.add(0)
    with pytest.raises(ValueError, match="already"):
        pool.add(0)
    with pytest.raises(ValueError, match="num_tokens"):
        pool.extend(0, -1)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        pool.cache_prefix(0, [1, 2])
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


def np_llama_logits(p: dict, cfg: LlamaConfig, tokens, kv=None, computed=None) -> np.ndarray:
    """Float64 numpy forward of one sequence (causal, from position 0): logits ``[L, vocab]``.
    ``kv``: per layer ``(k, v)`` ``[L, Hkv, D]`` (k rotated) that attention reads instead of the
    computed ones (the dequantized values of an fp8 cache); ``computed``: a list that receives
    each layer's computed ``(k, v)``."""

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
    for i, lp in enumerate(p["layers"]):
        h = rms(x, lp["attn_norm"])
        q = rope((h @ lp["wq"]).reshape(L, hq, d))
        k, v = rope((h @ lp["wk"]).reshape(L, hkv, d)), (h @ lp["wv"]).reshape(L, hkv, d)
        if computed is not None:
            computed.append((k, v))
        if kv is not None:
            k, v = kv[i]
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
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


def run_step(planner, graphdef, params, seqs, prefill: dict, decode: list):
    """Extend the pool for one step, plan and run it; returns ``{rid: logits [vocab]}`` of the
    last row of each request (``seqs[rid]`` holds at least the request's tokens)."""
    pool = planner.pool
    for r, n in prefill.items():
        pool.extend(r, n)
    for r in decode:
        pool.extend(r, 1)
    batch = planner.plan(prefill, decode)
    tokens = np.full(batch.num_rows, -1, np.int32)  # padding rows must not matter (-1 is no token)
    row = 0
    for r, n in prefill.items():
        tokens[row : row + n] = seqs[r][pool.seq_len(r) - n : pool.seq_len(r)]
        row += n
    p = batch.num_prefill_rows
    tokens[p : p + len(decode)] = [seqs[r][pool.seq_len(r) - 1] for r in decode]
    logits, pool.caches = paged_logits(graphdef, params, pool.caches, tokens, batch)
    return dict(zip([*prefill, *decode], np.asarray(logits)))


@pytest.mark.parametrize("cascade_levels", [1, 2, 4])
def test_chunked_prefill_prefix_sharing_and_cascade_match_float64_forward(tiny_model, cascade_levels):
    # A prompt prefilled in two chunks (5 new tokens on 9 cached: paged append attention), two
    # requests attaching A's cached pages (nested sharing: page 0 by three requests, page 1 by
    # two), a mixed step, and decode steps whose rows read the shared pages through cascade
    # levels (1: flat decode; 2: the nested level folded into the requests' own pages; 4: an
    # empty level in front). Each request's last-row logits must equal a float64 forward of its
    # whole sequence. The cache starts NaN-filled: a read of an unwritten slot shows.
    cfg, rng = TINY, np.random.default_rng(4)
    pool = KVCachePool(24, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    pool.caches = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), pool.caches)
    planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=32, max_batch_size=4, max_prefill_tokens=16,
                          backend="xla", q_data_type=cfg.dtype, cascade_levels=cascade_levels)
    graphdef, params = nnx.split(tiny_model)
    ref = params64(tiny_model)
    a = rng.integers(0, cfg.vocab_size, 14).tolist()
    seqs = {"a": a, "b": a[:8] + rng.integers(0, cfg.vocab_size, 5).tolist(),
            "c": a[:4] + rng.integers(0, cfg.vocab_size, 7).tolist()}

    def check(logits):
        for r, got in logits.items():
            want = np_llama_logits(ref, cfg, seqs[r][: pool.seq_len(r)])[-1]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"request {r}")

    pool.add("a")
    check(run_step(planner, graphdef, params, seqs, {"a": 9}, []))
    check(run_step(planner, graphdef, params, seqs, {"a": 5}, []))
    pool.cache_prefix("a", seqs["a"])
    assert pool.add("b", seqs["b"][:-1]) == 8 and pool.add("c", seqs["c"][:-1]) == 4
    seqs["a"].append(int(rng.integers(cfg.vocab_size)))
    check(run_step(planner, graphdef, params, seqs, {"b": 5, "c": 7}, ["a"]))
    a_pages = pool.pages("a")
    assert pool.refcount(a_pages[0]) == 3 and pool.refcount(a_pages[1]) == 2
    for _ in range(2):
        for r in seqs:
            seqs[r].append(int(rng.integers(cfg.vocab_size)))
        decode = sorted(seqs, key=pool.pages)
        if cascade_levels > 1:
            qo, _, indices, _ = planner.decode_levels(decode)
            first = cascade_levels - 3 if cascade_levels > 2 else 0  # the most shared real level
            assert qo[first].tolist() == [0, 3] and indices[first].tolist() == [a_pages[0]], "page 0 read once"
        check(run_step(planner, graphdef, params, seqs, {}, decode))


def dequantized_kv(pool: KVCachePool, rid, layer: int) -> list[np.ndarray]:
    """Float64 ``[k, v]`` ``[seq_len, Hkv, D]`` of one request as an fp8 NHD pool holds them,
    times the pool's scales."""
    pages = np.asarray(pool.pages(rid))
    out = []
    for cache, scale in zip(pool.caches[layer], (pool.k_scale, pool.v_scale)):
        x = np.asarray(cache[pages].astype(jnp.float32), np.float64).reshape(-1, pool.num_kv_heads, pool.head_dim)
        out.append(x[: pool.seq_len(rid)] * scale[:, None].astype(np.float64))
    return out


@pytest.mark.parametrize("kv_dtype, k_scale, v_scale, cascade_levels", [
    ("float8_e4m3fn", (0.004, 1.0), (0.5, 2.0), 2),  # per KV head; head 0's keys (|k| ~ 2.5) saturate
    ("e5m2", 0.25, 1.0, 1),
])
def test_fp8_cache_step_matches_float64_forward_on_dequantized_values(tiny_model, kv_dtype, k_scale, v_scale,
                                                                       cascade_levels):
    # The steps of the test above (chunked prefill, attached prefix, mixed step, decode through
    # cascade levels or flat) on an fp8 pool: each request's logits must equal a float64 forward
    # whose attention reads the request's dequantized cache values, and those must be the float64
    # K/V divided by the scales, saturated, within half an fp8 step.
    cfg, rng = TINY, np.random.default_rng(7)
    pool = KVCachePool(24, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=kv_dtype,
                       k_scale=k_scale, v_scale=v_scale)
    pool.caches = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), pool.caches)
    planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=32, max_batch_size=4, max_prefill_tokens=16,
                          backend="xla", q_data_type=cfg.dtype, cascade_levels=cascade_levels)
    graphdef, params = nnx.split(tiny_model)
    ref = params64(tiny_model)
    finfo = jnp.finfo(pool.dtype)
    limit, half_step, tiny = float(finfo.max), 2.0 ** -(finfo.nmant + 1), float(finfo.smallest_subnormal) / 2
    a = rng.integers(0, cfg.vocab_size, 14).tolist()
    seqs = {"a": a, "b": a[:8] + rng.integers(0, cfg.vocab_size, 5).tolist()}
    saturated = []

    def check(logits):
        for r, got in logits.items():
            tokens = seqs[r][: pool.seq_len(r)]
            kv = [dequantized_kv(pool, r, layer) for layer in range(cfg.num_layers)]
            exact = []
            want = np_llama_logits(ref, cfg, tokens, kv, exact)[-1]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"request {r}")
            for (k, v), (k_exact, v_exact) in zip(kv, exact):
                for x, x_exact, scale in ((k, k_exact, pool.k_scale), (v, v_exact, pool.v_scale)):
                    scale = scale[:, None].astype(np.float64)
                    x_exact = np.clip(x_exact / scale, -limit, limit)
                    np.testing.assert_array_less(np.abs(x / scale - x_exact),
                                                 1.01 * half_step * np.abs(x_exact) + tiny + 1e-6)
                    saturated.append(np.abs(x / scale).max() == limit)

    pool.add("a")
    check(run_step(planner, graphdef, params, seqs, {"a": 9}, []))
    check(run_step(planner, graphdef, params, seqs, {"a": 5}, []))
    pool.cache_prefix("a", seqs["a"])
    assert pool.add("b", seqs["b"][:-1]) == 8
    seqs["a"].append(int(rng.integers(cfg.vocab_size)))
    check(run_step(planner, graphdef, params, seqs, {"b": 5}, ["a"]))
    for _ in range(2):
        for r in seqs:
            seqs[r].append(int(rng.integers(cfg.vocab_size)))
        check(run_step(planner, graphdef, params, seqs, {}, sorted(seqs, key=pool.pages)))
    assert any(saturated) == (kv_dtype == "float8_e4m3fn")


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def all_row_logits(graphdef, params, caches, tokens, batch):
    """Logits ``[T, vocab]`` of every row of a step (not only ``batch.last_rows``) and the caches."""
    model = nnx.merge(graphdef, params)
    hidden, caches = model(tokens, batch, caches)
    return model.logits(hidden), caches


def prefill_in_chunks(model, prompt, chunks, *, backend="xla", max_prefill_tokens=72):
    """Prefill ``prompt`` chunk by chunk in a fresh NaN-filled pool; returns the logits ``[L, vocab]``
    of every prompt position, gathered from the chunks' rows."""
    cfg = model.config
    pool = KVCachePool(16, 8, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    pool.caches = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), pool.caches)
    planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=128, max_batch_size=1, backend=backend,
                          max_prefill_tokens=max_prefill_tokens, q_data_type=cfg.dtype)
    graphdef, params = nnx.split(model)
    pool.add(0)
    out, done = [], 0
    for n in chunks:
        pool.extend(0, n)
        batch = planner.plan({0: n}, [])
        tokens = np.zeros(batch.num_rows, np.int32)
        tokens[:n] = prompt[done : done + n]
        logits, pool.caches = all_row_logits(graphdef, params, pool.caches, tokens, batch)
        out.append(np.asarray(logits[:n]))
        done += n
    return np.concatenate(out)


def chunks_of(length: int, size: int) -> list[int]:
    return [min(size, length - s) for s in range(0, length, size)]


@pytest.fixture(scope="module")
def long_prompt():
    return np.random.default_rng(5).integers(0, TINY.vocab_size, 70).tolist()  # 9 pages of 8


@pytest.fixture(scope="module")
def one_shot(tiny_model, long_prompt):
    logits = prefill_in_chunks(tiny_model, long_prompt, [len(long_prompt)])
    want = np_llama_logits(params64(tiny_model), TINY, long_prompt)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    return logits


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_gives_the_logits_of_one_shot_prefill(tiny_model, long_prompt, one_shot, chunk):
    # Every chunk after the first attends to the request's cached pages plus its own rows.
    got = prefill_in_chunks(tiny_model, long_prompt, chunks_of(len(long_prompt), chunk))
    np.testing.assert_allclose(got, one_shot, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_pallas(tiny_model, long_prompt):
    # The Pallas kernels (interpret mode) on bfloat16: chunks of 7 over cached pages against a
    # float64 forward, at bfloat16's tolerance.
    model = LlamaModel(dataclasses.replace(TINY, dtype=jnp.bfloat16, head_dim=16), rngs=nnx.Rngs(3))
    prompt = long_prompt[:20]
    got = prefill_in_chunks(model, prompt, chunks_of(20, 7), backend="pallas", max_prefill_tokens=8)
    want = np_llama_logits(params64(model), model.config, prompt)
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


def test_prefix_cached_request_gives_the_logits_of_the_request_alone(tiny_model):
    # Request b attaches the first two pages of a's prompt from the prefix cache, prefills the rest
    # next to a's decode rows, then decodes next to a through a shared cascade level. Served alone
    # (fresh pool, one-shot prefill, flat decode) it must give the same logits.
    cfg, rng = TINY, np.random.default_rng(6)
    graphdef, params = nnx.split(tiny_model)
    a = rng.integers(0, cfg.vocab_size, 13).tolist()
    b = a[:8] + rng.integers(0, cfg.vocab_size, 6).tolist() + rng.integers(0, cfg.vocab_size, 3).tolist()
    prompt_b = 14  # b's last 3 tokens are fed by decode steps

    def engine(cascade_levels):
        pool = KVCachePool(24, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
        pool.caches = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), pool.caches)
        planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=32, max_batch_size=2, max_prefill_tokens=16,
                              backend="xla", q_data_type=cfg.dtype, cascade_levels=cascade_levels)
        return pool, planner

    def step(pool, planner, seqs, prefill, decode):
        for r, n in prefill.items():
            pool.extend(r, n)
        for r in decode:
            pool.extend(r, 1)
        batch = planner.plan(prefill, decode)
        tokens, row = np.zeros(batch.num_rows, np.int32), 0
        for r, n in prefill.items():
            tokens[row : row + n] = seqs[r][pool.seq_len(r) - n : pool.seq_len(r)]
            row += n
        p = batch.num_prefill_rows
        tokens[p : p + len(decode)] = [seqs[r][pool.seq_len(r) - 1] for r in decode]
        logits, pool.caches = all_row_logits(graphdef, params, pool.caches, tokens, batch)
        logits, rows = np.asarray(logits), {}
        row = 0
        for r, n in prefill.items():
            rows[r] = logits[row : row + n]
            row += n
        for i, r in enumerate(decode):
            rows[r] = logits[batch.num_prefill_rows + i : batch.num_prefill_rows + i + 1]
        return rows

    pool, planner = engine(1)
    pool.add("b")
    alone = [step(pool, planner, {"b": b}, {"b": prompt_b}, [])["b"][8:]]
    alone += [step(pool, planner, {"b": b}, {}, ["b"])["b"] for _ in range(3)]

    pool, planner = engine(2)
    seqs = {"a": a + [1, 2, 3, 4], "b": b}
    pool.add("a")
    step(pool, planner, seqs, {"a": 13}, [])
    pool.cache_prefix("a", a)
    assert pool.add("b", b[: prompt_b - 1]) == 8
    shared = [step(pool, planner, seqs, {"b": prompt_b - 8}, ["a"])["b"]]
    for _ in range(3):
        decode = sorted(["a", "b"], key=pool.pages)
        assert planner.decode_levels(decode)[2][0].tolist() == list(pool.pages("a")[:2])  # read once
        shared.append(step(pool, planner, seqs, {}, decode)["b"])
    for got, want in zip(shared, alone):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_planner_shapes_depend_only_on_buckets():
    # Two batches of different composition in the same buckets give plans of identical pytree
    # structure and shapes, so the jitted step does not recompile.
    pool = KVCachePool(32, 4, 1, 2, 8, dtype=jnp.float32)
    planner = StepPlanner(pool, 4, max_seq_len=64, max_batch_size=8, max_prefill_tokens=32, backend="xla",
                          q_data_type=jnp.float32, min_prefill_rows=16, min_decode_rows=2, cascade_levels=2)
    assert planner.prefill_buckets == (16, 32) and planner.decode_buckets == (2, 4, 8)
    assert planner.num_step_programs == 3 * 4 - 1
    for r, n in enumerate((3, 9, 17, 2, 6, 5)):
        pool.add(r)
        pool.extend(r, n)
    a = planner.plan({0: 3, 1: 9}, [2, 3, 4])
    b = planner.plan({5: 2, 2: 1}, [0, 3, 1])
    sig = lambda x: jax.tree.map(lambda y: (y.shape, y.dtype), x)  # noqa: E731
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert sig(a) == sig(b)
    assert a.num_rows == 16 + 4
    assert planner.plan({1: 9}, []).decode_plan is None and planner.plan({}, [1]).prefill_plan is None


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_cascade_is_chosen_by_the_bytes_it_saves(seed):
    # Requests sharing prefix pages: the shared levels save (sharers - 1) x shared tokens x the
    # bytes a token holds over all layers, counted here from the page lists; the planner cascades
    # at or above its threshold, reads one level below it, and obeys cascade=True/False.
    rng = np.random.default_rng(seed)
    layers, kv_heads, head_dim, page_size = 3, 2, 8, 4
    pool = KVCachePool(256, page_size, layers, kv_heads, head_dim, dtype=jnp.bfloat16)
    trunks = [rng.integers(0, 3, int(rng.integers(0, 30))).tolist() for _ in range(2)]
    for r in range(int(rng.integers(1, 12))):
        tokens = trunks[r % 2] + rng.integers(0, 3, int(rng.integers(1, 20))).tolist()
        pool.add(r, tokens[:-1])
        pool.extend(r, len(tokens) - pool.seq_len(r))
        pool.cache_prefix(r, tokens)
    planner = StepPlanner(pool, 4, max_seq_len=64, max_batch_size=16, backend="xla", cascade_levels=2)
    decode = planner.sharing_order(list(pool.requests))
    # One level reads every request's tokens; the cascade reads each level's segments once.
    qo, indptr, _, last = planner.decode_levels(decode)
    cascade_reads = sum(int(((np.diff(ip) - 1) * page_size + lp)[np.diff(ip) > 0].sum())
                        for ip, lp in zip(indptr, last))
    want = int(pool.seq_lens(decode).sum()) - cascade_reads
    token_bytes = 2 * kv_heads * head_dim * 2 * layers
    assert planner.saved_bytes(qo, indptr, last) == want * token_bytes
    for threshold, cascade in ((want * token_bytes, bool(want)), (want * token_bytes + 1, False)):
        planner.cascade_min_saved_bytes = threshold
        assert isinstance(planner.plan_host({}, decode).decode_plan, tuple) == (cascade or threshold == 0)
        assert planner.may_cascade(decode) or not cascade  # a bound: never False where cascade pays
    planner.cascade_min_saved_bytes = 2 * len(decode) * pool.pages_for(64) * page_size * token_bytes
    assert not planner.may_cascade(decode)  # more than every page held twice could save
    assert isinstance(planner.plan_host({}, decode, cascade=True).decode_plan, tuple)
    assert not isinstance(planner.plan_host({}, decode, cascade=False).decode_plan, tuple)
    with pytest.raises(ValueError, match="cascade_levels >= 2"):
        StepPlanner(pool, 4, max_seq_len=64, max_batch_size=16, backend="xla").plan_host({}, decode, cascade=True)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_packed_host_plan_is_the_plan(backend):
    # The engine sends plan_host's arrays as one buffer (transfer.pack): unpacked, they are
    # plan()'s arrays, and two batches of the same buckets pack to one structure (no recompile).
    pool = KVCachePool(32, 4, 1, 2, 16, dtype=jnp.bfloat16)
    planner = StepPlanner(pool, 4, max_seq_len=64, max_batch_size=8, max_prefill_tokens=32, backend=backend,
                          q_data_type=jnp.bfloat16, min_prefill_rows=16, min_decode_rows=2, cascade_levels=2)
    for r, n in enumerate((3, 9, 17, 2, 6, 5)):
        pool.add(r)
        pool.extend(r, n)
    packs = []
    for prefill, decode in (({0: 3, 1: 9}, [2, 3, 4]), ({5: 2, 2: 1}, [0, 3, 1])):
        want = planner.plan(prefill, decode)
        host = planner.plan_host(prefill, decode)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
        packs.append(transfer.pack(host))
        got = packs[-1].unpack()
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert jax.tree.structure(packs[0]) == jax.tree.structure(packs[1])


def test_planner_positions_and_rows_of_chunks():
    pool = KVCachePool(16, 4, 1, 2, 8, dtype=jnp.float32)
    planner = StepPlanner(pool, 4, max_seq_len=32, max_batch_size=4, max_prefill_tokens=8, backend="xla",
                          q_data_type=jnp.float32)
    for r, n in ((0, 9), (1, 2), (2, 5)):
        pool.add(r)
        pool.extend(r, n)
    batch = planner.plan({0: 3, 1: 2}, [2])  # 3 new on 6 cached, a whole 2-token prompt, a decode
    # One bucket each by default: 8 prefill rows, 4 decode rows.
    assert np.asarray(batch.positions).tolist() == [6, 7, 8, 0, 1, 0, 0, 0, 4, 0, 0, 0]
    assert np.asarray(batch.batch_indices).tolist() == [0, 0, 0, 1, 1, -1, -1, -1, 2, -1, -1, -1]
    assert np.asarray(batch.last_rows).tolist() == [2, 4, 8, 0]


def test_planner_errors():
    pool = KVCachePool(8, 4, 1, 2, 8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        StepPlanner(pool, 3, max_seq_len=8, max_batch_size=2)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        StepPlanner(pool, 4, max_seq_len=8, max_batch_size=2, max_prefill_tokens=0)
    planner = StepPlanner(pool, 4, max_seq_len=8, max_batch_size=2, max_prefill_tokens=4)
    for r in range(3):
        pool.add(r)
        pool.extend(r, 1)
    pool.add(3)
    with pytest.raises(ValueError, match="at least one"):
        planner.plan({}, [])
    with pytest.raises(ValueError, match="only once"):
        planner.plan({0: 1}, [0])
    with pytest.raises(ValueError, match="max_batch_size"):
        planner.plan({0: 1}, [1, 2])
    with pytest.raises(ValueError, match="not in the pool"):
        planner.plan({}, [7])
    with pytest.raises(ValueError, match=r"prefill\[0\] must be an integer in 1..1"):
        planner.plan({0: 2}, [])  # more new tokens than the request holds
    with pytest.raises(ValueError, match=r"prefill\[0\]"):
        planner.plan({0: 0}, [])
    with pytest.raises(ValueError, match="at least one token"):
        planner.plan({}, [3])
    pool.extend(2, 4)
    with pytest.raises(ValueError, match="max_prefill_tokens=4"):
        planner.plan({2: 5}, [])
    pool.extend(2, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        planner.plan({}, [2])


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
