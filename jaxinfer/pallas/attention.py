"""Pallas block-sparse paged attention (Triton lowering on GPU, interpret mode elsewhere).

One kernel serves decode, prefill, append, paged and ragged KV (FlashInfer paper, arXiv
2501.01005, sec. 3.1-3.3): a persistent grid of ``num_ctas`` programs, each running the work tiles
``cta_indptr[c]:cta_indptr[c+1]`` of the planner's ``work`` buffer (see :mod:`jaxinfer.planner`).
A tile's rows are query tokens x the GQA group's heads, gathered from ``q [nnz_q * Hq, D]``; its
keys are gathered ``block_n`` at a time through the page table (page ids loaded from
``kv_indices`` inside the kernel, ``row = page * page_size + offset``) or from a contiguous range
of the ragged KV. Online softmax in float32 with ``exp2`` on logits scaled by
``sm_scale * log2(e)`` (FlashAttention-2); the result goes to the final rows when the tile is
its query tile's only chunk, else to a partial ``(o, lse)`` slot that
:func:`jaxinfer.pallas.merge.merge_partials` folds afterwards.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.pallas.config import TileConfig
from jaxinfer.pallas.merge import NEG_INF, finish, interpret_mode, merge_partials, row_block
from jaxinfer.planner import F, MERGE_FIELDS, WORK_FIELDS
from jaxinfer.variants import LOG2E


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static parameters of one attention kernel instance (besides the tile config).

    Attributes:
      paged: KV is a page table over caches (else a ragged ``[nnz_kv, Hkv, D]`` tensor).
      kv_layout: ``"NHD"`` or ``"HND"`` (paged only; ``run`` sets it from its argument).
      page_size, num_qo_heads, num_kv_heads, head_dim: geometry.
      sm_scale: resolved logits scale.
      causal, window_left, logits_soft_cap: mask and soft cap (bottom-right aligned; the planner
        already put ``kv_len - qo_len`` into each tile's ``q_pos0``).
      num_ctas: persistent programs.
      num_slots: partial slots (0 when split-KV is off).
      num_groups: merge groups of the merge kernel.
      max_tiles, page_capacity: capacities of the work tiles and of ``kv_indices``.

    The plan's int32 buffers travel as one array (one host-to-device copy) laid out as
    ``work [max_tiles, len(WORK_FIELDS)] | cta_indptr [num_ctas+1] | merge_indptr
    [num_groups+1] | merge_dest [num_groups, 3] | kv_indices [page_capacity]``; the ``off_*``
    properties give the offsets.
    """

    paged: bool
    kv_layout: str
    page_size: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    causal: bool
    window_left: int
    logits_soft_cap: float | None
    num_ctas: int
    num_slots: int
    num_groups: int
    max_tiles: int
    page_capacity: int

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def off_cta(self) -> int:
        return self.max_tiles * len(WORK_FIELDS)

    @property
    def off_merge_indptr(self) -> int:
        return self.off_cta + self.num_ctas + 1

    @property
    def off_merge_dest(self) -> int:
        return self.off_merge_indptr + self.num_groups + 1

    @property
    def off_kv_indices(self) -> int:
        return self.off_merge_dest + self.num_groups * len(MERGE_FIELDS)

    @property
    def buffer_size(self) -> int:
        return self.off_kv_indices + self.page_capacity

    def pack(self, work, cta_indptr, merge_indptr, merge_dest, kv_indices):
        """The one int32 buffer of a plan (numpy on the host, jnp inside jit)."""
        xp = np if isinstance(work, np.ndarray) else jnp
        parts = (work, cta_indptr, merge_indptr, merge_dest, kv_indices)
        out = xp.concatenate([xp.asarray(a).astype(np.int32).reshape(-1) for a in parts])
        if out.shape != (self.buffer_size,):
            raise ValueError(f"plan buffers have {out.shape[0]} entries, the kernel spec expects {self.buffer_size}")
        return out


def _logits(s, ks: KernelSpec):
    """Raw ``q.k`` to ``(x, c)`` with base-2 logits ``x * c``: the scale ``c = sm_scale*log2(e)``
    is left out of ``x`` so that it folds into the exponent's FMA (``c*cap*log2(e)`` with the
    soft cap ``cap*tanh(q.k*sm_scale/cap)``). ``c > 0``, so row maxima commute with it."""
    if ks.logits_soft_cap is None:
        return s, ks.sm_scale * LOG2E
    cap = ks.logits_soft_cap
    return jnp.tanh(s * (ks.sm_scale / cap)), cap * LOG2E


def _kv_rows(pos, ok, kv_head, kv_base, buf_ref, num_pages, ks: KernelSpec):
    """Rows of the flattened ``[-1, D]`` KV array holding keys ``pos`` of the tile's request.

    ``ok`` masks keys past the chunk (``None``: all keys of the step are in range).
    """
    if not ks.paged:
        row = (kv_base + pos) * ks.num_kv_heads + kv_head
        return row if ok is None else jnp.where(ok, row, 0)
    slot = ks.off_kv_indices + kv_base + pos // ks.page_size
    if ok is None:
        page = buf_ref[slot]
    else:
        page = pltriton.load(buf_ref.at[jnp.where(ok, slot, 0)], mask=ok, other=0)
    # Clamped so that a bad page id inside jit can never read outside the cache.
    page = jnp.clip(page, 0, num_pages - 1)
    off = pos % ks.page_size
    if ks.kv_layout == "NHD":
        row = (page * ks.page_size + off) * ks.num_kv_heads + kv_head
    else:
        row = (page * ks.num_kv_heads + kv_head) * ks.page_size + off
    return row if ok is None else jnp.where(ok, row, 0)


def _full_steps(q_pos0, q_len, kv_lo, kv_hi, n_steps, bn, ks: KernelSpec):
    """Steps ``[a, b)`` whose keys every row of the tile sees: they run without masks.

    Rows see keys ``< q_pos + 1`` (causal) and ``>= q_pos - window_left``; the tile's rows span
    ``q_pos0 .. q_pos0 + q_len - 1``, so only a few steps at the ends of the range need masks.
    """
    hi = jnp.minimum(kv_hi, q_pos0 + 1) if ks.causal else kv_hi
    b = jnp.minimum(jnp.maximum(hi - kv_lo, 0) // bn, n_steps)
    if ks.window_left < 0:
        return 0, b
    lo = q_pos0 + q_len - 1 - ks.window_left
    a = jnp.minimum(pl.cdiv(jnp.maximum(lo - kv_lo, 0), bn), b)
    return a, b


def _attention_kernel(buf_ref, q_ref, k_ref, v_ref, _o_in, _lse_in, o_ref, lse_ref, po_ref, plse_ref, *, ks: KernelSpec, cfg: TileConfig, num_pages: int):
    bm, bn, d, g = cfg.block_m, cfg.block_n, ks.head_dim, ks.group_size
    r = lax.iota(jnp.int32, bm)
    tok, head_in_group = r // g, r % g
    nf = len(WORK_FIELDS)

    def tile(t, carry):
        def field(name):
            return buf_ref[t * nf + F[name]]

        kv_head, q_row0, q_len, q_pos0 = field("kv_head"), field("q_row0"), field("q_len"), field("q_pos0")
        kv_lo, kv_hi, kv_base, out_slot = field("kv_lo"), field("kv_hi"), field("kv_base"), field("out_slot")
        row_ok = tok < q_len
        row_ok2 = jnp.broadcast_to(row_ok[:, None], (bm, d))
        rows_raw = (q_row0 + tok) * ks.num_qo_heads + kv_head * g + head_in_group
        q = pltriton.load(row_block(q_ref, jnp.where(row_ok, rows_raw, 0), d), mask=row_ok2, other=0.0)
        q_pos = q_pos0 + tok

        def step(i, state, masked):
            m, l, acc = state
            pos = kv_lo + i * bn + lax.iota(jnp.int32, bn)
            if masked:
                ok = pos < kv_hi
                ok2 = jnp.broadcast_to(ok[:, None], (bn, d))
                rows = _kv_rows(pos, ok, kv_head, kv_base, buf_ref, num_pages, ks)
                k = pltriton.load(row_block(k_ref, rows, d), mask=ok2, other=0.0)
                v = pltriton.load(row_block(v_ref, rows, d), mask=ok2, other=0.0)
            else:
                rows = _kv_rows(pos, None, kv_head, kv_base, buf_ref, num_pages, ks)
                k = pltriton.load(row_block(k_ref, rows, d))
                v = pltriton.load(row_block(v_ref, rows, d))
            s, scale = _logits(pltriton.dot(q, k, trans_b=True), ks)
            if masked:
                visible = ok[None, :]
                if ks.causal:
                    visible = visible & (pos[None, :] <= q_pos[:, None])
                if ks.window_left >= 0:
                    visible = visible & (pos[None, :] >= q_pos[:, None] - ks.window_left)
                s = jnp.where(visible, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
            # Only masked steps can leave a row with no key so far (m = -inf).
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
            p = jnp.exp2(s * scale - m_safe[:, None])
            alpha = jnp.exp2(m - m_safe)
            acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v)
            return m_new, l * alpha + jnp.sum(p, axis=1), acc

        state = (jnp.full((bm,), NEG_INF, jnp.float32), jnp.zeros((bm,), jnp.float32), jnp.zeros((bm, d), jnp.float32))
        n_steps = pl.cdiv(kv_hi - kv_lo, bn)
        a, b = _full_steps(q_pos0, q_len, kv_lo, kv_hi, n_steps, bn, ks)
        masked, full = functools.partial(step, masked=True), functools.partial(step, masked=False)
        if ks.window_left >= 0:
            state = lax.fori_loop(0, a, masked, state)
        state = lax.fori_loop(a, b, full, state)
        o, lse = finish(lax.fori_loop(b, n_steps, masked, state))
        # Masked-off lanes store to an index past the end: never written on the GPU, dropped by
        # the scatter of interpret mode (a clamped index would race with a real row there).
        final = row_ok & (out_slot < 0)
        o_rows = jnp.where(final, rows_raw, o_ref.shape[0])
        pltriton.store(row_block(o_ref, o_rows, d), o.astype(o_ref.dtype), mask=row_ok2 & (out_slot < 0))
        pltriton.store(lse_ref.at[o_rows], lse, mask=final)
        if ks.num_slots:
            part = row_ok & (out_slot >= 0)
            p_rows = jnp.where(part, out_slot * bm + r, po_ref.shape[0])
            pltriton.store(row_block(po_ref, p_rows, d), o, mask=row_ok2 & (out_slot >= 0))
            pltriton.store(plse_ref.at[p_rows], lse, mask=part)
        return carry

    c = pl.program_id(0)
    lax.fori_loop(buf_ref[ks.off_cta + c], buf_ref[ks.off_cta + c + 1], tile, 0)


def attention(plan_buffer, q, k, v, *, ks: KernelSpec, cfg: TileConfig):
    """Run a plan: the attention kernel, then the merge kernel when split-KV is on.

    Args:
      plan_buffer: ``[ks.buffer_size]`` int32, the plan's buffers packed by :meth:`KernelSpec.pack`.
      q: ``[nnz_q, Hq, D]`` bf16/fp16.
      k, v: paged caches ``[num_pages, page_size, Hkv, D]`` (NHD) / ``[num_pages, Hkv, page_size,
        D]`` (HND), or ragged ``[nnz_kv, Hkv, D]``.

    Returns:
      ``(o [nnz_q, Hq, D] q.dtype, lse [nnz_q, Hq] float32 base 2)``; rows no tile covers are
      ``(0, -inf)``.
    """
    nnz_q = q.shape[0]
    rows = nnz_q * ks.num_qo_heads
    d = ks.head_dim
    slots = max(ks.num_slots, 1) * cfg.block_m
    num_pages = k.shape[0] if ks.paged else 1
    kernel = functools.partial(_attention_kernel, ks=ks, cfg=cfg, num_pages=num_pages)
    o, lse, po, plse = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((rows, d), q.dtype),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((slots, d), jnp.float32),
            jax.ShapeDtypeStruct((slots,), jnp.float32),
        ),
        grid=(ks.num_ctas,),
        input_output_aliases={4: 0, 5: 1},
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret_mode(),
    )(
        plan_buffer,
        q.reshape(rows, d),
        k.reshape(-1, d),  # [rows, D] view of a paged cache (NHD/HND) or a ragged KV tensor
        v.reshape(-1, d),
        jnp.zeros((rows, d), q.dtype),
        jnp.full((rows,), NEG_INF, jnp.float32),
    )
    if ks.num_slots:
        o, lse = merge_partials(
            plan_buffer, po, plse, o, lse,
            off_indptr=ks.off_merge_indptr, off_dest=ks.off_merge_dest, num_groups=ks.num_groups,
            block_m=cfg.block_m, group_size=ks.group_size, num_qo_heads=ks.num_qo_heads,
        )
    return o.reshape(nnz_q, ks.num_qo_heads, d), lse.reshape(nnz_q, ks.num_qo_heads)
