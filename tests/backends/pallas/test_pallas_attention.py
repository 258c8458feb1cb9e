"""The Pallas attention kernel (interpret mode here) against the float64 reference (tests/ref64.py).

Small shapes; the backend is called directly. Plans are forced to split requests several times
with a small CTA budget, a 16-key step and a 16-token minimum chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rand, tol
from ref64 import gather_paged_kv, random_page_table, ref_batch

from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.backends.pallas.backend import PallasBackend, get_backend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.plan.layout import F
from jaxinfer.variants import AttentionVariant

# 64 CTAs: the planner splits a key range where that shortens the estimated makespan; on a few
# CTAs these short, many requests would already balance unsplit.
SPLIT = PallasBackend(num_ctas=64, split_factor=16, config=TileConfig(16, 16, 4, 1), min_chunk=16)
NO_SPLIT = PallasBackend(num_ctas=3, split_factor=0)
# The prefill tile's software pipelining across key steps (the next step's q.k before the softmax).
AHEAD = PallasBackend(num_ctas=64, split_factor=16, config=TileConfig(32, 16, 4, 1, qk_ahead=True), min_chunk=16)
# Two tile bodies in one launch: tiles whose rows fit 16 (a mixed batch's decodes) run 16 rows.
MIXED = PallasBackend(num_ctas=64, split_factor=16, config=TileConfig(64, 16, 4, 1, qk_ahead=True, small_block_m=16),
                      min_chunk=16)


def _run_case(rng, qo_lens, kv_lens, *, backend, page_size=None, hq=4, hkv=2, d=32, dtype=jnp.bfloat16, layout="NHD",
              variant=None, custom_mask=None, return_lse=True, **options):
    """Plan and run one batch (paged when ``page_size`` is set, ragged KV otherwise); compare.

    ``variant`` (else built from ``options``) and the flat ``custom_mask`` go to both sides."""
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q = rand(rng, (int(qo_indptr[-1]), hq, d), dtype)
    variant = variant or AttentionVariant(**options)
    if page_size is None:
        kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
        k = rand(rng, (int(kv_indptr[-1]) + 3, hkv, d), dtype)
        v = rand(rng, k.shape, dtype)
        spec = BatchSpec.create(qo_indptr, kv_indptr, None, None, page_size=1, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, variant=variant, custom_mask=custom_mask, q_dtype=dtype)
        k_list = [np.asarray(k[a:b], np.float64) for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        v_list = [np.asarray(v[a:b], np.float64) for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
    else:
        kv_indptr, kv_indices, last, num_pages = random_page_table(rng, kv_lens, page_size)
        shape = (num_pages, page_size, hkv, d) if layout == "NHD" else (num_pages, hkv, page_size, d)
        k, v = rand(rng, shape, dtype), rand(rng, shape, dtype)
        spec = BatchSpec.create(qo_indptr, kv_indptr, kv_indices, last, page_size=page_size, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, variant=variant, custom_mask=custom_mask, q_dtype=dtype)
        k_list, v_list = gather_paged_kv(k, v, kv_indptr, kv_indices, last, layout)
    assert backend.unsupported(spec) is None
    plan = backend.plan(spec, PlanCapacity())
    run = jax.jit(lambda p, q, k, v: backend.run(p, q, k, v, kv_layout=layout, return_lse=return_lse))
    o, lse = run(plan, q, k, v)
    o_ref, lse_ref = ref_batch(q, k_list, v_list, qo_indptr, custom_mask=custom_mask, variant=variant)
    assert o.dtype == dtype
    if variant.use_softmax:
        assert_close(o, o_ref, dtype, "o")
    else:
        # A plain weighted sum over kv_len keys grows like sqrt(kv_len): its rounding error
        # (16-bit P times V) scales with the output's magnitude, not with O(1).
        scale = max(1.0, float(np.max(np.abs(o_ref))))
        np.testing.assert_allclose(np.asarray(o, np.float64) / scale, o_ref / scale, err_msg="o", **tol(dtype))
    if return_lse:
        assert lse.dtype == jnp.float32
        assert_close(lse, lse_ref, dtype, "lse")
    return plan


def _chunks_per_group(plan) -> int:
    """Most chunks any split (query tile, KV head) got."""
    mi = plan.unpack()["merge_indptr"]
    return int(np.diff(mi).max(initial=1))


@pytest.mark.parametrize(
    "page_size,hq,hkv,layout,dtype",
    [(1, 4, 4, "NHD", jnp.bfloat16), (5, 8, 2, "HND", jnp.float16), (16, 8, 1, "NHD", jnp.bfloat16)],
)
def test_decode_split(rng, page_size, hq, hkv, layout, dtype):
    kv_lens = np.array([70, 0, 33, 5, 120])
    plan = _run_case(rng, np.ones(5, np.int64), kv_lens, backend=SPLIT, page_size=page_size, hq=hq, hkv=hkv, layout=layout, dtype=dtype)
    assert _chunks_per_group(plan) >= 3


def test_decode_default_backend_soft_cap(rng):
    kv_lens = rng.integers(1, 60, size=6)
    _run_case(rng, np.ones(6, np.int64), kv_lens, backend=get_backend("pallas"), page_size=16, hq=8, hkv=2, d=64, logits_soft_cap=5.0, sm_scale=0.3)


def test_paged_prefill_causal_split(rng):
    qo_lens = np.array([9, 1, 17, 4])
    kv_lens = np.array([40, 0, 17, 64])
    plan = _run_case(rng, qo_lens, kv_lens, backend=SPLIT, page_size=5, hq=4, hkv=1, causal=True)
    assert _chunks_per_group(plan) >= 3


def test_ragged_prefill_window_soft_cap(rng):
    qo_lens = np.array([20, 7, 33])
    kv_lens = np.array([20, 7, 33])
    _run_case(rng, qo_lens, kv_lens, backend=SPLIT, hq=4, hkv=4, causal=True, window_left=6, logits_soft_cap=3.0, dtype=jnp.float16)


def test_ragged_prefill_non_causal_no_split(rng):
    qo_lens = np.array([3, 12, 0, 25])
    kv_lens = np.array([50, 12, 9, 31])
    plan = _run_case(rng, qo_lens, kv_lens, backend=NO_SPLIT, hq=8, hkv=2)
    assert int(plan.unpack()["work"][:, F["out_slot"]].max()) == -1


def test_append_paged(rng):
    qo_lens = np.array([3, 5, 1])
    kv_lens = np.array([60, 5, 33])
    _run_case(rng, qo_lens, kv_lens, backend=SPLIT, page_size=16, hq=8, hkv=1, causal=True, layout="HND")


def test_qo_longer_than_kv_and_empty(rng):
    # Rows whose causal window holds no key, and a request with no keys: o = 0, lse = -inf.
    qo_lens = np.array([12, 4, 2])
    kv_lens = np.array([5, 0, 30])
    _run_case(rng, qo_lens, kv_lens, backend=SPLIT, page_size=5, hq=4, hkv=2, causal=True)


def test_window_non_causal_gqa8(rng):
    qo_lens = np.array([2, 6])
    kv_lens = np.array([45, 38])
    _run_case(rng, qo_lens, kv_lens, backend=SPLIT, page_size=16, hq=8, hkv=1, window_left=10, dtype=jnp.float16)


@pytest.mark.parametrize("page_size,options", [(5, dict(causal=True)), (None, dict(window_left=6, logits_soft_cap=3.0))])
def test_qk_ahead_split(rng, page_size, options):
    # Chunks that end inside a key step, empty requests and a query tile with no visible key.
    qo_lens = np.array([9, 0, 17, 12])
    kv_lens = np.array([40, 7, 17, 5])
    plan = _run_case(rng, qo_lens, kv_lens, backend=AHEAD, page_size=page_size, hq=4, hkv=2, dtype=jnp.float16, **options)
    assert plan.config.qk_ahead and _chunks_per_group(plan) >= 2


@pytest.mark.parametrize("page_size,hq,hkv", [(16, 8, 2), (5, 4, 4), (None, 8, 1)])
def test_mixed_tile_bodies(rng, page_size, hq, hkv):
    # A prefill (64-row tiles, qk_ahead) beside decodes and short appends that fit the 16-row
    # body, split into chunks whose partial slots the merge folds; an empty request.
    qo_lens = np.array([37, 1, 1, 0, 2, 1])
    kv_lens = np.array([37, 70, 9, 12, 45, 33])
    plan = _run_case(rng, qo_lens, kv_lens, backend=MIXED, page_size=page_size, hq=hq, hkv=hkv, causal=True)
    work = plan.unpack()["work"]
    rows = work[:, F["q_len"]] * (hq // hkv)
    real = work[:, F["valid"]] == 1
    assert (real & (rows <= 16)).any() and (real & (rows > 16)).any() and _chunks_per_group(plan) >= 2


def test_heuristic_gives_mostly_decode_batches_64_row_tiles_with_the_decode_body():
    # POD's shape (a prefill beside decodes) by the batch's median request; prefill batches, a
    # fixed max_qo_len and head_dim 256 keep the 128-row tiles.
    def config(qo_lens, head_dim=128, capacity=PlanCapacity()):
        qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
        kv_indptr = np.concatenate([[0], np.cumsum(np.maximum(qo_lens, 1) + 64)])
        spec = BatchSpec.create(qo_indptr, kv_indptr, None, None, page_size=1, num_qo_heads=32, num_kv_heads=8,
                                head_dim=head_dim, variant=AttentionVariant(), q_dtype=jnp.bfloat16)
        return get_backend("pallas").tile_config(spec, capacity)

    pod = [2048] + [1] * 63
    assert config(pod) == TileConfig(64, 64, 4, 3, ctas_per_sm=2, small_block_m=16)
    assert config([0, 0] + pod) == config(pod)  # empty requests run no tiles
    for qo_lens, kw in (([2048, 2048, 2048, 1], {}), ([2048, 1], {}), (pod, {"head_dim": 256}),
                        (pod, {"capacity": PlanCapacity(max_qo_len=2048)})):
        cfg = config(qo_lens, **kw)
        assert (cfg.block_m, cfg.small_block_m) == (128, 16), (qo_lens[:3], kw)


def test_pod_shaped_batch_on_the_heuristic_config(rng):
    # A causal prefill beside decodes, split into chunks: the heuristic's 64-row tiles with the
    # 16-row body (no forced config).
    qo_lens = np.array([200] + [1] * 7)
    kv_lens = np.concatenate([[200], rng.integers(20, 300, 7)])
    backend = PallasBackend(num_ctas=64, split_factor=16, min_chunk=16)
    plan = _run_case(rng, qo_lens, kv_lens, backend=backend, page_size=16, hq=8, hkv=2, d=64, causal=True)
    assert plan.config == TileConfig(64, 64, 4, 3, ctas_per_sm=2, small_block_m=16)
    assert _chunks_per_group(plan) >= 2


def test_run_rejects_mismatched_arrays(rng):
    spec = BatchSpec.create(np.array([0, 1]), np.array([0, 2]), np.array([0, 1]), np.array([3]), page_size=4,
                            num_qo_heads=4, num_kv_heads=2, head_dim=16, variant=AttentionVariant(), q_dtype=jnp.bfloat16)
    plan = NO_SPLIT.plan(spec, PlanCapacity())
    q = rand(rng, (1, 4, 16), jnp.bfloat16)
    k = rand(rng, (2, 4, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="kv_layout"):
        NO_SPLIT.run(plan, q, k, k, kv_layout="NDH", return_lse=False)
    with pytest.raises(ValueError, match="q must be"):
        NO_SPLIT.run(plan, q[:, :2], k, k, kv_layout="NHD", return_lse=False)
    with pytest.raises(ValueError, match=r"\(HND\)"):
        NO_SPLIT.run(plan, q, k, k, kv_layout="HND", return_lse=False)
    with pytest.raises(ValueError, match="dtype"):
        NO_SPLIT.run(plan, q, k.astype(jnp.float16), k.astype(jnp.float16), kv_layout="NHD", return_lse=False)


def test_unsupported_reasons():
    def spec(**kw):
        args = dict(page_size=1, num_qo_heads=2, num_kv_heads=1, head_dim=64, variant=AttentionVariant(), q_dtype=jnp.bfloat16)
        args.update(kw)
        return BatchSpec.create(np.array([0, 1]), np.array([0, 1]), None, None, **args)

    be = get_backend("pallas")
    assert be.unsupported(spec()) is None
    assert "head_dim" in be.unsupported(spec(head_dim=96))
    assert "ROPE_LLAMA" in be.unsupported(spec(head_dim=16, variant=AttentionVariant(pos_encoding_mode="ROPE_LLAMA")))
    assert "float32" in be.unsupported(spec(q_dtype=jnp.float32))


# Two persistent CTAs, so that a few 64-row prefill tiles already fill the grid.
KV_MAJOR = PallasBackend(num_sms=1, split_factor=4, config=TileConfig(64, 16, 4, 1, ctas_per_sm=2))


@pytest.mark.parametrize("page_size", [None, 5])
def test_kv_major_grid(rng, page_size):
    """A prefill plan that fills the persistent grid runs one tile per CTA, (request, KV head)-major
    and longest first within, and computes the same attention."""
    qo_lens, kv_lens = np.array([40, 0, 70, 9]), np.array([40, 3, 90, 9])
    plan = _run_case(rng, qo_lens, kv_lens, backend=KV_MAJOR, page_size=page_size, hq=4, hkv=2, causal=True)
    u, ks = plan.unpack(), plan.kernel
    n = int(u["cta_indptr"][-1])
    assert ks.num_slots == 0 and ks.num_ctas >= n > KV_MAJOR.grid_size(KV_MAJOR.config)
    np.testing.assert_array_equal(u["cta_indptr"], np.minimum(np.arange(ks.num_ctas + 1), n))
    w = u["work"][:n]
    key = list(zip(w[:, F["kv_base"]], w[:, F["kv_head"]], w[:, F["kv_lo"]] - w[:, F["kv_hi"]]))
    assert key == sorted(key)
    # A fixed tile capacity keeps the persistent grid (one compiled shape for every batch).
    indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    spec = BatchSpec.create(np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32), indptr, None, None, page_size=1,
                            num_qo_heads=4, num_kv_heads=2, head_dim=32, variant=AttentionVariant(causal=True))
    assert KV_MAJOR.plan(spec, PlanCapacity(max_work_tiles=64)).kernel.num_ctas == KV_MAJOR.grid_size(KV_MAJOR.config)


@pytest.mark.parametrize("backend", [SPLIT, AHEAD, NO_SPLIT], ids=["split", "qk-ahead", "no-split"])
@pytest.mark.parametrize("poison", [np.inf, np.nan], ids=["inf", "nan"])
def test_poison_on_causal_diagonal_and_split_chunks(rng, backend, poison):
    """Causal ragged prefill whose last key (seen only by each request's last query) and the rows
    past the batch hold poison: every other row equals the reference, through masked diagonal
    steps and split chunks that some rows see nothing of (partials (0, -inf))."""
    qo_lens, kv_lens, hq, hkv, d, dtype = [40, 3, 17], [40, 21, 17], 4, 2, 32, jnp.bfloat16
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = rand(rng, (int(qo_indptr[-1]), hq, d), dtype)
    k = rand(rng, (int(kv_indptr[-1]) + 3, hkv, d), dtype)
    v = rand(rng, k.shape, dtype)
    k_list = [np.asarray(k[a:b], np.float64) for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
    v_list = [np.asarray(v[a:b], np.float64) for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
    bad = np.concatenate([kv_indptr[1:] - 1, np.arange(kv_indptr[-1], k.shape[0])])
    k, v = k.at[bad].set(poison), v.at[bad].set(poison)
    spec = BatchSpec.create(qo_indptr, kv_indptr, None, None, page_size=1, num_qo_heads=hq, num_kv_heads=hkv,
                            head_dim=d, variant=AttentionVariant(causal=True), q_dtype=dtype)
    o, lse = jax.jit(lambda p, q, k, v: backend.run(p, q, k, v, return_lse=True))(backend.plan(spec, PlanCapacity()), q, k, v)
    o_ref, lse_ref = ref_batch(q, k_list, v_list, qo_indptr, causal=True)
    clean = np.ones(int(qo_indptr[-1]), bool)
    clean[qo_indptr[1:] - 1] = False  # the last query of each request sees the poisoned key
    assert_close(np.asarray(o, np.float32)[clean], o_ref[clean], dtype, "o")
    assert_close(np.asarray(lse)[clean], lse_ref[clean], dtype, "lse")
