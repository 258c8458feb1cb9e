"""Pallas paged MLA attention (multi-head latent attention; Triton lowering on GPU, interpret mode elsewhere).

With the weight absorption of DeepSeek-V2 (arXiv 2405.04434, sec. 2.1.2 and appendix C: ``W_UK``
folded into the query, ``W_UV`` into the output projection), MLA is attention of ``H`` query heads
over ONE latent KV head: each cached token holds ``ckv [Dc]`` (the compressed KV, 512 in
DeepSeek-V3) and ``kpe [Dp]`` (the decoupled RoPE key, 64), and

    logits[h, j] = (q_nope[h] . ckv[j] + q_pe[h] . kpe[j]) * sm_scale,   o[h] = softmax(logits[h]) . ckv,

the value being the same ``ckv`` tile as the key (loaded once per key step, FlashMLA's and
FlashInfer's MLA kernels do the same: FlashInfer blog "FlashInfer for DeepSeek MLA", 2025-02-10).

The kernel runs on the plan stage of every other op (jaxinfer/plan/planner.py): a work tile's
rows are ``block_m`` query rows of one latent head, i.e. ``G`` query heads times
``block_m // G`` query tokens (``G`` = :func:`head_group`, ``min(H, block_m)`` for power-of-2
``H``). The planner is given ``H / G`` *virtual* KV heads of group size ``G``: each tile's
``kv_head`` field names its head group, every group reads the one latent cache, and the split-KV
partial rows fold in :func:`jaxinfer.backends.pallas.merge.merge_partials` unchanged. The loop is
the attention kernel's (jaxinfer/backends/pallas/attention.py, whose page-table gather, masks and
non-finite guards it imports): online softmax in float32 with ``exp2``, two ``q . k`` dots of
``K = Dc`` and ``K = Dp`` (no concatenation), one ``P . ckv`` dot, causal bottom-right aligned.
fp8 latent caches are widened to q's dtype on load (exact), as in the attention kernel. The same
plans and merge also drive the sm90a CUDA MLA kernel (``MLAKernelSpec.kernel == "fa3"``,
``jaxinfer/csrc/mla/``), which takes these tiles in place of :func:`_mla_kernel`.

A 64-head tile's float32 accumulator is ``[64, 512]``: 128 registers a thread over 8 warps, so
the tile config (a :class:`~jaxinfer.backends.pallas.config.TileConfig`, :data:`DEFAULT_CONFIG`)
is an argument that the GPU benchmark A/Bs (``python -m jaxinfer.bench.mla --configs``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.backends.ffi import ops as ffi_ops
from jaxinfer.backends.pallas.attention import (
    _finite_values, _full_steps, _kv_rows, _load, _poison_rows, _visible, _widen, output_shapes, store_tile,
)
from jaxinfer.backends.pallas.backend import PallasBackend, PallasPlan, _aligned_empty
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.backends.pallas.merge import NEG_INF, finish, interpret_mode, merge_partials
from jaxinfer.backends.vma import varying_like
from jaxinfer.fp8 import FP8_KV_DTYPES
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.plan.layout import WORK_FIELDS, F, WorkLayout
from jaxinfer.plan.planner import count_query_tiles_at, plan_packed_at
from jaxinfer.plan.transfer import to_device
from jaxinfer.variants import LOG2E

# 64 heads x 64 keys, 8 warps: the [64, 512] float32 accumulator is 128 registers a thread; one
# CTA per SM (the registers of a second one do not fit). Three stages: the next latent tiles load
# while a step's dots run. The fastest or within 8 % of it of the candidates on DeepSeek-V3
# decode on an H100 (benchmarks/decisions/pallas.md, MLA).
DEFAULT_CONFIG = TileConfig(block_m=64, block_n=64, num_warps=8, num_stages=3, ctas_per_sm=1)

# The configs the lowering test checks and the benchmark's --configs A/B starts from.
CANDIDATE_CONFIGS = (
    DEFAULT_CONFIG,
    TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=2, ctas_per_sm=1),
    TileConfig(block_m=32, block_n=64, num_warps=4, num_stages=2, ctas_per_sm=2),
    TileConfig(block_m=32, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=2),
    TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=2, ctas_per_sm=2),
)

Q_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def head_group(num_heads: int, block_m: int) -> int:
    """Query heads of one tile's rows: the largest divisor of ``num_heads`` that is ``<= block_m``."""
    return max(g for g in range(1, min(num_heads, block_m) + 1) if num_heads % g == 0)


def unsupported(head_dim_ckv: int, head_dim_kpe: int, q_dtype, kv_dtype) -> str | None:
    """Why the Pallas MLA kernel cannot serve these dims and dtypes (``None`` if it can): the dots
    need power-of-2 dims of at least 16; q is bf16/fp16, the cache q's dtype or fp8."""
    for name, d in (("head_dim_ckv", head_dim_ckv), ("head_dim_kpe", head_dim_kpe)):
        if d < 16 or d & (d - 1):
            return f"{name} must be a power of 2 >= 16 for the pallas MLA kernel, got {d}"
    if jnp.dtype(q_dtype) not in Q_DTYPES:
        return f"the pallas MLA kernel takes bfloat16 or float16 queries, got {jnp.dtype(q_dtype).name}"
    if jnp.dtype(kv_dtype) != jnp.dtype(q_dtype) and jnp.dtype(kv_dtype) not in FP8_KV_DTYPES:
        return (f"the pallas MLA kernel takes a latent cache of q's dtype or fp8, got {jnp.dtype(kv_dtype).name} "
                f"with {jnp.dtype(q_dtype).name} queries")
    return None


@dataclasses.dataclass(frozen=True)
class MLAKernelSpec(WorkLayout):
    """Static parameters of one MLA kernel instance (besides the tile config).

    Attributes:
      page_size: tokens per page of the latent caches.
      num_heads: query heads ``H``.
      group_size: query heads per tile row group (:func:`head_group`); the plan's ``kv_head``
        field is the head group ``0 .. H / group_size - 1``.
      head_dim_ckv, head_dim_kpe: ``Dc`` and ``Dp``.
      sm_scale: logits scale.
      causal: bottom-right aligned causal mask (the planner put ``kv_len - qo_len`` into
        ``q_pos0``).
      num_slots: split-KV partial slots (0: no split).
      kernel: the attention kernel that runs the plan's tiles: ``"pallas"`` (:func:`_mla_kernel`) or
        ``"fa3"``, the sm90a CUDA kernel of ``jaxinfer/csrc/mla/`` (64-row tiles, Dc = 512, Dp =
        64, 16-bit caches; :func:`jaxinfer.backends.ffi.ops.mla_forward`). Both write the same
        final and partial rows, which the same merge kernel folds.

    The class attributes below make the spec readable by the attention kernel's helpers
    (``_kv_rows``, ``_full_steps``, ``_visible``): a paged NHD cache of one KV head (the latent
    one: its row stride), no window, no custom mask, no user callables.
    """

    page_size: int
    num_heads: int
    group_size: int
    head_dim_ckv: int
    head_dim_kpe: int
    sm_scale: float
    causal: bool
    num_slots: int
    kernel: str = "pallas"

    paged = True
    kv_layout = "NHD"
    num_kv_heads = 1
    window_left = -1
    custom_mask = False
    masks_every_step = False

    @staticmethod
    def fn(name: str):
        return None


def _mla_kernel(buf_ref, qn_ref, qp_ref, ckv_ref, kpe_ref, _o_in, _lse_in, o_ref, lse_ref, po_ref, plse_ref, *,
                ks: MLAKernelSpec, cfg: TileConfig, num_pages: int):
    """``num_pages``: pages of the latent caches (page ids are clamped to them)."""
    bm, bn, g, h = cfg.block_m, cfg.block_n, ks.group_size, ks.num_heads
    dc, dp = ks.head_dim_ckv, ks.head_dim_kpe
    cdt = qn_ref.dtype  # fp8 latent tiles are widened to it
    c = ks.sm_scale * LOG2E
    r = lax.iota(jnp.int32, bm)
    tok, head_in_group = r // g, r % g
    nf = len(WORK_FIELDS)

    def tile(t, carry):
        def field(name):
            return buf_ref[t * nf + F[name]]

        group, q_row0, q_len, q_pos0 = field("kv_head"), field("q_row0"), field("q_len"), field("q_pos0")
        kv_lo, kv_hi, kv_base, out_slot = field("kv_lo"), field("kv_hi"), field("kv_base"), field("out_slot")
        # A module-level run may pass fewer q rows than the traced plan covers: keep to those.
        row_ok = tok < jnp.minimum(q_len, qn_ref.shape[0] // h - q_row0)
        qo_head = group * g + head_in_group
        rows_raw = (q_row0 + tok) * h + qo_head
        q_rows = jnp.where(row_ok, rows_raw, 0)
        qn = _load(qn_ref, q_rows, row_ok, dc)
        qp = _load(qp_ref, q_rows, row_ok, dp)
        rows = (q_pos0 + tok, qo_head, None)

        def step(i, state, masked):
            m, l, acc = state
            pos = kv_lo + i * bn + lax.iota(jnp.int32, bn)
            ok = pos < kv_hi if masked else None
            kv_rows = _kv_rows(pos, ok, 0, kv_base, buf_ref, num_pages, ks)
            ckv = _widen(_load(ckv_ref, kv_rows, ok, dc), cdt)
            kpe = _widen(_load(kpe_ref, kv_rows, ok, dp), cdt)
            s = pltriton.dot(qn, ckv, trans_b=True) + pltriton.dot(qp, kpe, trans_b=True)
            # ckv is also V: on a causal step's diagonal some rows see a key that others do not.
            guard = masked and ks.causal
            if masked:
                visible = _visible(ok, pos, rows, 0, None, ks)
                s = jnp.where(visible, s, NEG_INF)
            if guard:
                (ckv,), sees_bad = _finite_values((ckv,), visible)
            m_new = jnp.maximum(m, jnp.max(s, axis=1) * c)
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
            p = jnp.exp2(s * c - m_safe[:, None])
            alpha = jnp.exp2(m - m_safe)
            acc = acc * alpha[:, None] + pltriton.dot(p.astype(cdt), ckv)
            if guard:
                acc = _poison_rows(acc, sees_bad)
            return m_new, l * alpha + jnp.sum(p, axis=1), acc

        state = (jnp.full((bm,), NEG_INF, jnp.float32), jnp.zeros((bm,), jnp.float32), jnp.zeros((bm, dc), jnp.float32))
        n_steps = pl.cdiv(kv_hi - kv_lo, bn)
        _, b = _full_steps(q_pos0, q_len, kv_lo, kv_hi, n_steps, bn, ks)
        state = lax.fori_loop(0, b, functools.partial(step, masked=False), state)
        state = lax.fori_loop(b, n_steps, functools.partial(step, masked=True), state)
        o, lse = finish(state)
        store_tile((o_ref, lse_ref, po_ref, plse_ref), (o, lse), (o, lse), rows_raw, row_ok, out_slot, ks.num_slots)
        return carry

    cta = pl.program_id(0)
    lax.fori_loop(buf_ref[ks.off_cta + cta], buf_ref[ks.off_cta + cta + 1], tile, 0)


def mla_attention(plan_buffer, q_nope, q_pe, ckv_cache, kpe_cache, *, ks: MLAKernelSpec, cfg: TileConfig):
    """Run an MLA plan: the attention kernel (``ks.kernel``: the Pallas one, or the sm90a CUDA one
    through the FFI), then the merge kernel when split-KV is on.

    Args:
      plan_buffer: ``[ks.buffer_size]`` int32, the plan's packed buffers.
      q_nope: ``[nnz_q, H, Dc]`` bf16/fp16 (the absorbed no-RoPE query); q_pe: ``[nnz_q, H, Dp]``.
      ckv_cache: ``[num_pages, page_size, Dc]``; kpe_cache: ``[num_pages, page_size, Dp]``; q's
        dtype or fp8 (widened on load; Pallas only); at least one page.

    Returns:
      ``(o [nnz_q, H, Dc] q.dtype, lse [nnz_q, H] float32 base 2)``; rows no tile covers are
      ``(0, -inf)``.
    """
    nnz_q, h = q_nope.shape[:2]
    rows = nnz_q * h
    dc, dp = ks.head_dim_ckv, ks.head_dim_kpe
    if ks.kernel == "fa3":
        o, lse, po, plse = ffi_ops.mla_forward(
            plan_buffer, q_nope, q_pe, ckv_cache, kpe_cache, num_ctas=ks.num_ctas, off_cta=ks.off_cta,
            off_kv_indices=ks.off_kv_indices, group_size=ks.group_size, num_slots=ks.num_slots, causal=ks.causal,
            sm_scale=ks.sm_scale)
        o, lse = o.reshape(rows, dc), lse.reshape(rows)
    else:
        slots = max(ks.num_slots, 1) * cfg.block_m
        kernel = functools.partial(_mla_kernel, ks=ks, cfg=cfg, num_pages=ckv_cache.shape[0])
        o, lse, po, plse = pl.pallas_call(
            kernel,
            out_shape=varying_like(output_shapes(rows, slots, dc, q_nope.dtype), plan_buffer, q_nope, q_pe,
                                   ckv_cache, kpe_cache),
            grid=(ks.num_ctas,),
            input_output_aliases={5: 0, 6: 1},
            compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            interpret=interpret_mode(),
        )(
            plan_buffer,
            q_nope.reshape(rows, dc),
            q_pe.reshape(rows, dp),
            ckv_cache.reshape(-1, dc),  # [tokens, Dc]: row = page * page_size + slot
            kpe_cache.reshape(-1, dp),
            jnp.zeros((rows, dc), q_nope.dtype),
            jnp.full((rows,), NEG_INF, jnp.float32),
        )
    if ks.num_slots:
        o, lse = merge_partials(
            plan_buffer, po, plse, o, lse,
            off_indptr=ks.off_merge_indptr, off_dest=ks.off_merge_dest, num_groups=ks.num_groups,
            block_m=cfg.block_m, group_size=ks.group_size, num_qo_heads=h, num_warps=cfg.num_warps,
        )
    return o.reshape(nnz_q, h, dc), lse.reshape(nnz_q, h)


def plan(spec: BatchSpec, capacity: PlanCapacity, backend: PallasBackend, *, head_dim_kpe: int,
         kernel: str = "pallas") -> PallasPlan:
    """Plan an MLA batch on the host (the compiled planner) into static-capacity device buffers.

    ``spec`` is the batch as the planner sees it: ``num_kv_heads = H / G`` virtual KV heads of
    ``G = head_group(H, block_m)`` query heads each and ``head_dim = Dc``; ``backend`` gives the
    CTA grid, the split-KV budget and the tile config (``backend.config``, else
    :data:`DEFAULT_CONFIG`). ``kernel`` (``"pallas"`` or ``"fa3"``) is the attention kernel that
    will run the tiles (:class:`MLAKernelSpec`); ``"fa3"``'s tiles are 64 rows, so its config
    must have ``block_m = 64``.

    Raises:
      ValueError: the batch exceeds a fixed field of ``capacity``, ``spec``'s head grouping is not
        ``head_group``'s for the config, or ``kernel`` is ``"fa3"`` and the config's
        ``block_m`` is not 64.
    """
    cfg = backend.config or DEFAULT_CONFIG
    if kernel == "fa3" and cfg.block_m != ffi_ops.MLA_BLOCK_M:
        raise ValueError(f"the fa3 MLA kernel runs tiles of {ffi_ops.MLA_BLOCK_M} query rows, the pallas config "
                         f"has block_m={cfg.block_m}")
    if cfg.qk_ahead or cfg.small_block_m:
        raise ValueError("the pallas MLA kernel has one plain tile body (no qk_ahead, no small_block_m); use a "
                         "TileConfig with qk_ahead=False and small_block_m=0")
    g = spec.group_size
    if g != head_group(spec.num_qo_heads, cfg.block_m):
        raise ValueError(f"the MLA plan groups {g} heads per tile, the config's block_m={cfg.block_m} needs "
                         f"{head_group(spec.num_qo_heads, cfg.block_m)}")
    qo_indptr, _, kv_lens, kv_indices = spec.native_addresses
    batch = spec.batch_size
    unsplit = count_query_tiles_at(batch, qo_indptr, cfg.tokens_per_tile(g)) * spec.num_kv_heads
    max_tiles = backend._work_capacity(unsplit, cfg, capacity)
    args = backend._plan_args(spec.num_kv_heads, g, spec.variant, cfg, max_tiles)
    ks = _cached_spec(args.num_ctas, args.split_budget // 2, max_tiles, backend._page_capacity(spec, capacity),
                      spec.page_size, spec.num_qo_heads, g, spec.head_dim, head_dim_kpe,
                      float(spec.variant.scale(spec.head_dim)), spec.variant.causal,
                      args.split_budget if args.split_kv else 0, kernel)
    host, address = _aligned_empty(ks.buffer_size)
    plan_packed_at(args, address, ks.buffer_size, batch, qo_indptr, kv_lens, spec.native_addresses[1], None,
                   kv_indices or None, int(spec.kv_indptr[-1]))
    return PallasPlan(buffer=to_device(host), kernel=ks, config=cfg)


# plan() runs per serving step: the spec, a few microseconds to build, once per geometry.
@functools.lru_cache(maxsize=256)
def _cached_spec(num_ctas, num_groups, max_tiles, page_capacity, page_size, num_heads, group_size, head_dim_ckv,
                 head_dim_kpe, sm_scale, causal, num_slots, kernel) -> MLAKernelSpec:
    return MLAKernelSpec(num_ctas=num_ctas, num_groups=num_groups, max_tiles=max_tiles, page_capacity=page_capacity,
                         page_size=page_size, num_heads=num_heads, group_size=group_size, head_dim_ckv=head_dim_ckv,
                         head_dim_kpe=head_dim_kpe, sm_scale=sm_scale, causal=causal, num_slots=num_slots,
                         kernel=kernel)


def run(plan: PallasPlan, q_nope, q_pe, ckv_cache, kpe_cache):
    """:func:`mla_attention` of a plan from :func:`plan` (jit-compatible; shapes checked by the caller)."""
    return mla_attention(plan.buffer, q_nope, q_pe, ckv_cache, kpe_cache, ks=plan.kernel, cfg=plan.config)
