"""MLA (jaxinfer.mla) against an independent float64 reference of the UN-absorbed attention.

The reference (:func:`ref_mla`) never sees the absorbed form: per head it expands the cached latent
into keys ``[ckv W_UK_h^T, kpe]`` and values ``ckv W_UV_h^T`` with random ``W_UK``/``W_UV``
(DeepSeek-V2, arXiv 2405.04434, eq. 9-11) and attends with the un-absorbed query
``[q_nope_h, q_pe_h]``. jaxinfer gets the absorbed query ``q_nope_h W_UK_h`` (rounded to bf16)
and its latent output is projected with ``W_UV_h`` afterwards (ibid., appendix C). Caches hold
NaN/inf wherever no row may look (unused pages, slots past a request's last token), so a stray
read shows. Pallas runs in interpret mode here, with plans forced to split the KV; the real Triton
lowering is checked deviceless (shared/DESIGN.md sec. 6); GPU cases are marked ``gpu``. The sm90a
CUDA kernel (``backend="fa3"``) lowers here as its custom call and runs in the GPU cases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, indptr_of, rand
from jax.experimental.pallas import triton as pltriton
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from ref64 import random_page_table

import jaxinfer
from jaxinfer.backends import device
from jaxinfer.backends.ffi import ops as ffi_ops
from jaxinfer.backends.pallas import mla as pallas_mla
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.backends.pallas.merge import force_triton_lowering
from jaxinfer.plan.batch import BatchSpec, PlanCapacity

BF16 = jnp.bfloat16
# Small grids that split every long request (16-key chunks) so the merge path runs.
SPLIT16 = PallasBackend(num_ctas=64, split_factor=16, min_chunk=16, config=TileConfig(16, 16, 4, 1))
SPLIT64 = PallasBackend(num_ctas=64, split_factor=16, min_chunk=16, config=TileConfig(64, 16, 4, 1))
POISON = (np.nan, np.inf, -np.inf)


@dataclasses.dataclass
class Case:
    """One random MLA batch: the absorbed inputs jaxinfer gets and the un-absorbed ones of the
    reference (float64)."""

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_lens: np.ndarray
    page_size: int
    sm_scale: float
    q_nope: jax.Array  # [nnz_q, H, Dc] absorbed
    q_pe: jax.Array  # [nnz_q, H, Dp]
    ckv_cache: jax.Array  # [P, page_size, Dc], poisoned outside the requests
    kpe_cache: jax.Array
    q_orig: np.ndarray  # [nnz_q, H, Dn] un-absorbed no-RoPE query
    w_uk: np.ndarray  # [H, Dn, Dc]: k_nope_h = W_UK_h ckv
    w_uv: np.ndarray  # [H, Dv, Dc]: v_h = W_UV_h ckv
    ckv: list  # per request [L, Dc] float64 (clean)
    kpe: list

    @property
    def num_heads(self) -> int:
        return self.q_nope.shape[1]

    def plan_args(self, causal: bool):
        h, dc, dp = self.num_heads, self.ckv_cache.shape[2], self.kpe_cache.shape[2]
        return (self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_lens, h, dc, dp, self.page_size, causal,
                self.sm_scale, self.q_nope.dtype, self.ckv_cache.dtype)


def make_case(rng, qo_lens, kv_lens, page_size, h, *, dc=64, dp=16, dn=32, dv=32, dtype=BF16, kv_dtype=None) -> Case:
    kv_dtype = kv_dtype or dtype
    kv_lens = np.asarray(kv_lens)
    qo_indptr = indptr_of(qo_lens)
    kv_indptr, kv_indices, last, num_pages = random_page_table(rng, kv_lens, page_size)
    nnz = int(qo_indptr[-1])
    w_uk = rng.standard_normal((h, dn, dc)) / np.sqrt(dn)
    w_uv = rng.standard_normal((h, dv, dc)) / np.sqrt(dc)
    q_orig = rng.standard_normal((nnz, h, dn))
    q_nope = jnp.asarray(np.einsum("thn,hnc->thc", q_orig, w_uk).astype(np.float32), dtype)
    q_pe = rand(rng, (nnz, h, dp), dtype)
    ckv = np.asarray(rand(rng, (num_pages, page_size, dc), kv_dtype).astype(jnp.float32), np.float64)
    kpe = np.asarray(rand(rng, (num_pages, page_size, dp), kv_dtype).astype(jnp.float32), np.float64)
    ckv_list, kpe_list = [], []
    used = np.zeros((num_pages, page_size), bool)
    for b, n in enumerate(kv_lens):
        pages = kv_indices[kv_indptr[b] : kv_indptr[b + 1]]
        ckv_list.append(ckv[pages].reshape(-1, dc)[:n])
        kpe_list.append(kpe[pages].reshape(-1, dp)[:n])
        used[pages] = True
        if pages.size:
            used[pages[-1], last[b]:] = False
    # Poison every slot no request owns (unused pages, past each last token).
    for x in (ckv, kpe):
        x[~used] = rng.choice(POISON, size=(int((~used).sum()), 1))
    return Case(qo_indptr, kv_indptr, kv_indices, kv_lens, page_size, 1.0 / np.sqrt(dn + dp), q_nope, q_pe,
                jnp.asarray(ckv.astype(np.float32), kv_dtype), jnp.asarray(kpe.astype(np.float32), kv_dtype),
                q_orig, w_uk, w_uv, ckv_list, kpe_list)


def ref_mla(case: Case, causal: bool):
    """Un-absorbed MLA in float64: ``(o [nnz_q, H, Dv], lse [nnz_q, H] base 2)``."""
    q_pe = np.asarray(case.q_pe.astype(jnp.float32), np.float64)
    nnz, h = case.q_orig.shape[:2]
    o = np.zeros((nnz, h, case.w_uv.shape[1]))
    lse = np.full((nnz, h), -np.inf)
    for b in range(len(case.kv_lens)):
        q0, q1 = case.qo_indptr[b], case.qo_indptr[b + 1]
        lq, lk = q1 - q0, len(case.ckv[b])
        vis = np.ones((lq, lk), bool)
        if causal:
            vis = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
        for hh in range(h):
            k = np.concatenate([case.ckv[b] @ case.w_uk[hh].T, case.kpe[b]], axis=1)  # [L, Dn + Dp]
            v = case.ckv[b] @ case.w_uv[hh].T  # [L, Dv]
            q = np.concatenate([case.q_orig[q0:q1, hh], q_pe[q0:q1, hh]], axis=1)
            s = np.where(vis, q @ k.T * case.sm_scale, -np.inf)
            for i in range(lq):
                if vis[i].any():
                    m = s[i].max()
                    p = np.exp(s[i] - m)
                    o[q0 + i, hh] = p @ v / p.sum()
                    lse[q0 + i, hh] = (m + np.log(p.sum())) / np.log(2.0)
    return o, lse


def check(case: Case, o, lse, causal: bool, dtype=BF16) -> None:
    """jaxinfer's latent output projected by ``W_UV`` against the un-absorbed reference."""
    o_ref, lse_ref = ref_mla(case, causal)
    assert o.dtype == case.q_nope.dtype and lse.dtype == jnp.float32
    assert o.shape == case.q_nope.shape and lse.shape == case.q_nope.shape[:2]
    o_lat = np.asarray(o.astype(jnp.float32), np.float64)
    assert_close(np.einsum("thc,hvc->thv", o_lat, case.w_uv), o_ref, dtype, "o (projected by W_UV)")
    assert_close(lse, lse_ref, dtype, "lse")
    empty = ~np.isfinite(lse_ref)
    assert (o_lat[empty] == 0).all(), "rows with no visible key must be 0"


def run_wrapper(case: Case, backend: str, causal: bool, pallas=None, return_lse=True):
    w = jaxinfer.BatchMLAPagedAttentionWrapper(None, backend=backend, pallas=pallas)
    w.plan(*case.plan_args(causal))
    assert w.backend == backend
    return w.run(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, return_lse=return_lse)


# (name, qo_lens, kv_lens, page_size, heads, dims, causal, pallas settings)
CASES = [
    ("decode-h16-p16-split", [1] * 5, [70, 0, 33, 5, 120], 16, 16, {}, False, SPLIT16),
    ("decode-h128-p1-dsv3dims", [1] * 3, [37, 0, 20], 1, 128, dict(dc=512, dp=64, dn=128, dv=128), False, SPLIT64),
    ("prefill-causal-h16-p64", [3, 0, 17, 1, 5], [3, 0, 70, 9, 2], 64, 16, {}, True, SPLIT16),
    ("append-causal-h128-p16", [4, 2], [35, 2], 16, 128, {}, True, SPLIT64),
]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("name,qo,kv,page_size,h,dims,causal,pallas", CASES, ids=[c[0] for c in CASES])
def test_mla_vs_unabsorbed_reference(rng, backend, name, qo, kv, page_size, h, dims, causal, pallas):
    case = make_case(rng, qo, kv, page_size, h, **dims)
    o, lse = run_wrapper(case, backend, causal, pallas)
    check(case, o, lse, causal)


def check_hidden_poison(case: Case, backend: str, pallas=None):
    """Puts NaN/inf into each request's last key (seen by its last query only), runs ``case``
    causal and checks the other rows against the clean reference; returns ``(o, rows that see
    the poison)``."""
    ckv = np.array(case.ckv_cache, np.float32)
    seen_by_last = []
    for b, n in enumerate(case.kv_lens):
        pages = case.kv_indices[case.kv_indptr[b] : case.kv_indptr[b + 1]]
        ckv[pages[(n - 1) // 16], (n - 1) % 16, :3] = POISON
        seen_by_last.append(case.qo_indptr[b + 1] - 1)
    poisoned = dataclasses.replace(case, ckv_cache=jnp.asarray(ckv, BF16))
    o, lse = run_wrapper(poisoned, backend, True, pallas)
    clean = np.setdiff1d(np.arange(case.qo_indptr[-1]), seen_by_last)
    o_ref, lse_ref = ref_mla(case, True)
    o_proj = np.einsum("thc,hvc->thv", np.asarray(o.astype(jnp.float32), np.float64), case.w_uv)
    assert_close(o_proj[clean], o_ref[clean], BF16, "o (rows that cannot see the poison)")
    assert_close(np.asarray(lse)[clean], lse_ref[clean], BF16, "lse")
    return o, seen_by_last


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_mla_causal_hidden_poison(rng, backend):
    """A NaN/inf latent that causal hides from some rows of a tile (each request's last key, seen by
    its last query only) never reaches the rows that cannot see it, although ckv is also V."""
    check_hidden_poison(make_case(rng, [4, 6], [20, 37], 16, 4), backend, SPLIT16)  # 4 tokens x 4 heads a tile


def test_mla_pallas_splits_kv(rng):
    """The forced-split settings above do split: a 120-token request runs as several chunks."""
    case = make_case(rng, [1, 1], [120, 7], 16, 16)
    plan = jaxinfer.BatchMLAPagedAttentionWrapper(backend="pallas", pallas=SPLIT16).plan(*case.plan_args(False))
    merge_indptr = plan.inner.unpack()["merge_indptr"]
    assert np.diff(merge_indptr).max() >= 3


@pytest.mark.parametrize("option", [dict(qk_ahead=True), dict(small_block_m=16)])
def test_mla_pallas_declines_tile_options_it_lacks(rng, option):
    case = make_case(rng, [1, 2], [40, 9], 16, 16)
    pallas = PallasBackend(num_ctas=4, config=TileConfig(64, 16, 4, 1, **option))
    with pytest.raises(ValueError, match="one plain tile body"):
        jaxinfer.BatchMLAPagedAttentionWrapper(backend="pallas", pallas=pallas).plan(*case.plan_args(False))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_mla_fp8_latent_cache(rng, backend):
    """An e4m3 latent cache with bf16 queries: attention reads the stored fp8 values (exactly widened)."""
    case = make_case(rng, [1, 2], [40, 9], 16, 16, kv_dtype=jnp.float8_e4m3fn)
    o, lse = run_wrapper(case, backend, True, SPLIT16)
    check(case, o, lse, True)


def test_batch_mla_in_jit_pads_rows(rng):
    """The module-level function takes the plan as a pytree inside jit; rows past nnz_q are 0 / -inf;
    the base-e lse option is the base-2 lse times ln 2."""
    case = make_case(rng, [2, 1], [20, 5], 16, 16)
    w = jaxinfer.BatchMLAPagedAttentionWrapper(backend="xla", capacity=PlanCapacity(8, 4, 64))
    plan = w.plan(*case.plan_args(True))
    pad = lambda x: jnp.concatenate([x, jnp.full((2, *x.shape[1:]), 7.0, x.dtype)])  # noqa: E731
    o, lse = jax.jit(jaxinfer.batch_mla, static_argnames="return_lse")(
        pad(case.q_nope), pad(case.q_pe), case.ckv_cache, case.kpe_cache, plan, return_lse=True)
    assert (np.asarray(o[3:], np.float32) == 0).all() and (np.asarray(lse[3:]) == -np.inf).all()
    check(case, o[:3], lse[:3], True)
    _, lse_e = w.run(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, return_lse=True, return_lse_base_on_e=True)
    np.testing.assert_allclose(np.asarray(lse_e), np.asarray(lse[:3]) * np.log(2.0), rtol=1e-6)


def test_append_paged_mla_kv_cache(rng):
    """New tokens land in their request's page and slot; every other slot keeps its value (NaN
    included); padding rows (batch index -1) write nothing."""
    page_size, dc, dp = 4, 32, 16
    kv_lens = np.array([6, 0, 9])  # after the append
    append_lens = np.array([3, 0, 9])
    kv_indptr, kv_indices, last, num_pages = random_page_table(rng, kv_lens, page_size)
    ckv = rand(rng, (num_pages, page_size, dc), BF16).at[0, 0, 0].set(jnp.nan)
    kpe = rand(rng, (num_pages, page_size, dp), BF16)
    nnz = int(append_lens.sum()) + 2
    new_ckv, new_kpe = rand(rng, (nnz, dc), BF16), rand(rng, (nnz, dp), BF16)
    bi, pos = jaxinfer.get_batch_indices_positions(indptr_of(append_lens), jnp.asarray(kv_lens), nnz)
    out_ckv, out_kpe = jaxinfer.append_paged_mla_kv_cache(new_ckv, new_kpe, bi, pos, ckv, kpe, jnp.asarray(kv_indices),
                                                          jnp.asarray(kv_indptr), jnp.asarray(last))
    want_ckv, want_kpe = np.array(ckv, np.float32), np.array(kpe, np.float32)
    for i, (b, p) in enumerate(zip(np.asarray(bi), np.asarray(pos))):
        if b >= 0:
            page = kv_indices[kv_indptr[b] + p // page_size]
            want_ckv[page, p % page_size] = np.asarray(new_ckv[i], np.float32)
            want_kpe[page, p % page_size] = np.asarray(new_kpe[i], np.float32)
    np.testing.assert_array_equal(np.asarray(out_ckv, np.float32), want_ckv)
    np.testing.assert_array_equal(np.asarray(out_kpe, np.float32), want_kpe)


def test_append_mla_fp8_saturates(rng):
    ckv = jnp.zeros((2, 4, 16), jnp.float8_e4m3fn)
    kpe = jnp.zeros((2, 4, 16), jnp.float8_e4m3fn)
    x = jnp.asarray([[1000.0] * 16, [-0.5] * 16], jnp.bfloat16)
    c, _ = jaxinfer.append_paged_mla_kv_cache(x, x, jnp.array([0, 0]), jnp.array([0, 1]), ckv, kpe, jnp.array([1]),
                                              jnp.array([0, 1]), jnp.array([2]))
    np.testing.assert_array_equal(np.asarray(c[1, :2, 0], np.float32), [448.0, -0.5])


@pytest.mark.parametrize("what,match", [
    ("ckv_dim", "ckv_cache must be"),
    ("kpe_rows", "kpe_cache must be"),
    ("q_pe_heads", "q_pe must be"),
    ("q_dtype", "q_nope has dtype"),
    ("kv_dtype", "ckv_cache has dtype"),
    ("nnz_q", "q_nope has 3 rows"),
    ("page_ids", "kv_indices must be < num_pages"),
    ("kv_len", r"kv_len_arr\[1\] = 9"),
    ("kv_len_shape", "kv_len_arr must be"),
    ("out", "out= cannot be written"),
])
def test_mla_errors(rng, what, match):
    case = make_case(rng, [1, 1], [5, 3], 4, 16)
    w = jaxinfer.BatchMLAPagedAttentionWrapper(backend="xla")
    args = list(case.plan_args(False))
    q_nope, q_pe, ckv, kpe = case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache
    kw = {}
    with pytest.raises(ValueError, match=match):
        if what == "kv_len":
            args[3] = np.array([5, 9])
        elif what == "kv_len_shape":
            args[3] = np.array([5])
        w.plan(*args)
        if what == "ckv_dim":
            ckv = jnp.zeros((ckv.shape[0], 4, 32), ckv.dtype)
        elif what == "kpe_rows":
            kpe = kpe[:-1]
        elif what == "q_pe_heads":
            q_pe = q_pe[:, :8]
        elif what == "q_dtype":
            q_nope = q_nope.astype(jnp.float16)
        elif what == "kv_dtype":
            ckv, kpe = ckv.astype(jnp.float16), kpe.astype(jnp.float16)
        elif what == "nnz_q":
            q_nope, q_pe = jnp.concatenate([q_nope, q_nope[:1]]), jnp.concatenate([q_pe, q_pe[:1]])
        elif what == "page_ids":
            ckv, kpe = ckv[:1], kpe[:1]
        elif what == "out":
            kw["out"] = q_nope
        w.run(q_nope, q_pe, ckv, kpe, **kw)


def test_mla_fa3_declines_a_gpu_other_than_sm90(monkeypatch):
    """On an sm_80 GPU the reason is the arch, found before any build is tried."""
    monkeypatch.setattr(ffi_ops, "_REGISTERED", {})
    monkeypatch.setattr(ffi_ops.device, "gpu_arch", lambda: 80)
    reason = ffi_ops.mla_unsupported(512, 64, BF16, BF16)
    assert reason is not None and "mla runs on sm_90 (H100/H200) only, got compute capability 8.0" in reason


def test_mla_fa3_declines_with_reasons():
    """The CUDA kernel serves Dc = 512, Dp = 64 and a 16-bit cache of q's dtype on sm_90; a
    wrapper that names it elsewhere raises with the reason, 'auto' passes over it."""
    assert "head_dim_ckv = 512" in ffi_ops.mla_unsupported(64, 16, BF16, BF16)
    assert "serves fp8" in ffi_ops.mla_unsupported(512, 64, BF16, jnp.float8_e4m3fn)
    assert "bfloat16 or float16" in ffi_ops.mla_unsupported(512, 64, jnp.float32, jnp.float32)
    args = ([0, 1], [0, 1], [0], [1], 16, 512, 64, 1, False, 0.1, BF16, BF16)
    if device.gpu_arch() is None:
        assert "needs an NVIDIA GPU" in ffi_ops.mla_unsupported(512, 64, BF16, BF16)
        with pytest.raises(NotImplementedError, match="backend 'fa3' cannot serve this MLA batch: .*GPU"):
            jaxinfer.BatchMLAPagedAttentionWrapper(backend="fa3").plan(*args)
        w = jaxinfer.BatchMLAPagedAttentionWrapper(backend="auto")
        w.plan(*args)
        assert w.backend == "xla"
    # The plan's tiles must be the kernel's 64 rows.
    spec = BatchSpec.create(np.array([0, 1]), np.array([0, 1]), np.array([0]), np.array([1]), page_size=1,
                            num_qo_heads=16, num_kv_heads=1, head_dim=512,
                            variant=jaxinfer.AttentionVariant(sm_scale=0.1))
    pallas = PallasBackend(num_ctas=4, config=TileConfig(32, 16, 4, 1))
    with pytest.raises(ValueError, match="runs tiles of 64 query rows"):
        pallas_mla.plan(spec, PlanCapacity(), pallas, head_dim_kpe=64, kernel="fa3")


def test_mla_backend_and_order_errors():
    with pytest.raises(NotImplementedError, match="'fa2' has no MLA kernel"):
        jaxinfer.BatchMLAPagedAttentionWrapper(None, backend="fa2")
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        jaxinfer.BatchMLAPagedAttentionWrapper("NHD")
    with pytest.raises(ValueError, match="run called before plan"):
        z = jnp.zeros((1, 16, 64), BF16)
        jaxinfer.BatchMLAPagedAttentionWrapper(backend="xla").run(z, z, z, z)
    with pytest.raises(NotImplementedError, match="head_dim_kpe must be a power of 2"):
        jaxinfer.BatchMLAPagedAttentionWrapper(backend="pallas").plan(
            [0, 1], [0, 1], [0], [1], 16, 64, 24, 1, False, 0.1, BF16, BF16)


def test_append_mla_errors(rng):
    ckv, kpe = jnp.zeros((2, 4, 32), BF16), jnp.zeros((2, 4, 16), BF16)
    idx = (jnp.array([0]), jnp.array([0]), ckv, kpe, jnp.array([0]), jnp.array([0, 1]), jnp.array([1]))
    with pytest.raises(ValueError, match=r"append_ckv must be \[nnz, 32\]"):
        jaxinfer.append_paged_mla_kv_cache(jnp.zeros((1, 16), BF16), jnp.zeros((1, 16), BF16), *idx)
    with pytest.raises(ValueError, match="append_kpe has dtype float32"):
        jaxinfer.append_paged_mla_kv_cache(jnp.zeros((1, 32), BF16), jnp.zeros((1, 16), jnp.float32), *idx)
    with pytest.raises(ValueError, match="kv_last_page_len must be"):
        jaxinfer.append_paged_mla_kv_cache(jnp.zeros((1, 32), BF16), jnp.zeros((1, 16), BF16), *idx[:-1],
                                           jnp.array([1.0]))


# Deviceless Triton lowering (shared/DESIGN.md sec. 6): every candidate tile config at the
# DeepSeek-V3 shape, causal/split and page sizes varying over them, one fp8 cache.
S = jax.ShapeDtypeStruct
LOWER = [(cfg, i % 2 == 0, (1, 64)[i % 2], jnp.float8_e4m3fn if i == 2 else BF16)
         for i, cfg in enumerate(pallas_mla.CANDIDATE_CONFIGS)]


LOWER_IDS = [f"{c.block_m}x{c.block_n}-w{c.num_warps}-p{p}-{jnp.dtype(t).name}" for c, _, p, t in LOWER]


@pytest.mark.parametrize("cfg,masks,page_size,kv_dtype", LOWER, ids=LOWER_IDS)
def test_mla_lowers(cfg, masks, page_size, kv_dtype):
    h, dc, dp = 128, 512, 64
    g = pallas_mla.head_group(h, cfg.block_m)
    ks = pallas_mla.MLAKernelSpec(num_ctas=132, num_groups=264, max_tiles=1024, page_capacity=4096,
                                  page_size=page_size, num_heads=h, group_size=g, head_dim_ckv=dc, head_dim_kpe=dp,
                                  sm_scale=0.07, causal=masks, num_slots=528 if masks else 0)
    args = (S((ks.buffer_size,), jnp.int32), S((33, h, dc), BF16), S((33, h, dp), BF16),
            S((300, page_size, dc), kv_dtype), S((300, page_size, dp), kv_dtype))
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        text = jax.export.export(
            jax.jit(lambda *a: pallas_mla.mla_attention(*a, ks=ks, cfg=cfg)), platforms=["cuda"],
            disabled_checks=[DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
        )(*args).mlir_module()
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == (2 if masks else 1)


@pytest.mark.parametrize("causal,split", [(False, False), (True, True)])
def test_mla_fa3_lowers(causal, split):
    """The fa3 MLA path is one custom call of the CUDA kernel, then the Triton merge kernel when the
    plan splits the KV; the call takes the plan's geometry as attributes."""
    h, dc, dp, page_size = 128, 512, 64, 16
    ks = pallas_mla.MLAKernelSpec(num_ctas=132, num_groups=264, max_tiles=1024, page_capacity=4096,
                                  page_size=page_size, num_heads=h, group_size=64, head_dim_ckv=dc, head_dim_kpe=dp,
                                  sm_scale=0.07, causal=causal, num_slots=528 if split else 0, kernel="fa3")
    args = (S((ks.buffer_size,), jnp.int32), S((33, h, dc), BF16), S((33, h, dp), BF16),
            S((300, page_size, dc), BF16), S((300, page_size, dp), BF16))
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    checks = [DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME),
              DisabledSafetyCheck.custom_call(ffi_ops.MLA_TARGET)]
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(lambda *a: pallas_mla.mla_attention(*a, ks=ks, cfg=pallas_mla.DEFAULT_CONFIG)),
            platforms=["cuda"], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert text.count(f"@{ffi_ops.MLA_TARGET}") == 1
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == (1 if split else 0)
    assert f"causal = {'true' if causal else 'false'}" in text and "group_size = 64 : i32" in text
    assert f"off_kv_indices = {ks.off_kv_indices} : i32" in text
    assert [o.shape for o in exported.out_avals] == [(33, h, dc), (33, h)]


# GPU: the DeepSeek-V3 shape with the default tile config against the xla reference path, on both
# kernels, then the fa3 kernel on the CPU cases above at DeepSeek-V3's dims (its only dims).
def _gpu_backend(name):
    if name == "fa3" and (reason := ffi_ops.mla_unsupported(512, 64, BF16, BF16)) is not None:
        pytest.skip(reason)
    return name


DSV3 = dict(dc=512, dp=64, dn=128, dv=128)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["pallas", "fa3"])
@pytest.mark.parametrize("page_size,causal,qo", [(64, False, 1), (1, False, 1), (16, True, 7)])
def test_mla_gpu_deepseek_shape(rng, backend, page_size, causal, qo):
    kv = [1000, 0, 4097, 31, 2048, 777]
    case = make_case(rng, [min(qo, k) if causal else qo for k in kv], kv, page_size, 128, **DSV3)
    o, lse = run_wrapper(case, _gpu_backend(backend), causal)
    check(case, o, lse, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("name,qo,kv,page_size,h,dims,causal,pallas", CASES, ids=[c[0] for c in CASES])
def test_mla_gpu_fa3_cases(rng, name, qo, kv, page_size, h, dims, causal, pallas):
    """The forced-split settings of the CPU cases (a 64-row config: the kernel's tile), so the fa3
    kernel writes partial rows that the merge folds; fp16 on one case."""
    cfg = dataclasses.replace(pallas, config=TileConfig(64, 16, 4, 1))
    dtype = jnp.float16 if name.startswith("prefill") else BF16
    case = make_case(rng, qo, kv, page_size, h, dtype=dtype, **DSV3)
    o, lse = run_wrapper(case, _gpu_backend("fa3"), causal, cfg)
    check(case, o, lse, causal, dtype)


@pytest.mark.gpu
def test_mla_gpu_fa3_causal_hidden_poison(rng):
    case = make_case(rng, [4, 6, 70], [20, 37, 130], 16, 16, **DSV3)
    o, seen_by_last = check_hidden_poison(case, _gpu_backend("fa3"))
    assert np.isnan(np.asarray(o.astype(jnp.float32))[seen_by_last]).any(axis=-1).all(), "rows that see it: NaN"
