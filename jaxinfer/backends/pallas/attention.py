"""Pallas block-sparse paged attention (Triton lowering on GPU, interpret mode elsewhere).

One kernel serves decode, prefill, append, paged and ragged KV (FlashInfer paper, arXiv
2501.01005, sec. 3.1-3.3): a persistent grid of ``num_ctas`` programs, each running the work tiles
``cta_indptr[c]:cta_indptr[c+1]`` of the planner's ``work`` buffer (see :mod:`jaxinfer.plan.planner`).
A tile's rows are query tokens x the GQA group's heads, gathered from ``q [nnz_q * Hq, D]``; its
keys are gathered ``block_n`` at a time through the page table (page ids loaded from
``kv_indices`` inside the kernel, ``row = page * page_size + offset``) or from a contiguous range
of the ragged KV. Online softmax in float32 with ``exp2`` on logits scaled by
``sm_scale * log2(e)`` (FlashAttention-2); with ``TileConfig.qk_ahead`` each key step issues the
next step's ``q.k`` before its softmax (FlashAttention-3's intra-warpgroup overlap, sec. 3.2, as
software pipelining of the loop). With :attr:`TileConfig.small_block_m` one launch has two tile
bodies: tiles whose rows fit it (a mixed batch's decodes) run that many rows, the others
``block_m`` (POD-Attention, Kamath et al., arXiv 2410.18038, runs a batch's prefill and decode
work in one launch the same way). The result goes to the final rows when the tile is its query
tile's only chunk, else to a partial ``(o, lse)`` slot that
:func:`jaxinfer.backends.pallas.merge.merge_partials` folds afterwards. Keys a row cannot see
contribute nothing to it even when they hold inf or NaN (shared/DESIGN.md sec. 5): keys past the
chunk load as 0, and masked steps that hide a key from some rows only zero V's non-finite
entries and mark the rows that do see one (:func:`_finite_values`).

fp8 KV caches (``float8_e4m3fn``/``float8_e5m2``, :mod:`jaxinfer.fp8`) are read as they are
stored, one byte per element, and widened in registers to fp16 before the dots (exact: every
fp8 value is an fp16 value; one conversion instruction per two values, where bf16 takes three),
so decode, memory-bound, moves half the bytes of a 16-bit cache. On the GPU an fp8 V comes in as
uint16 pairs of adjacent columns (a bitcast in :func:`attention`), so that the ``P.V`` dot's
operand loads from shared memory like a 16-bit one and splits into its even and odd columns
(:func:`_fp8_pairs_to_f16`); the two halves of the output are interleaved once per tile. The
dots run in fp16: a bf16 q tile is scaled by a power of two into fp16's range when its largest
entry needs it (the logits are scaled back: :func:`_to_fp16`), and ``P`` in ``[0, 1]`` is
rounded to fp16 for ``P.V``. With
:attr:`KernelSpec.kv_scales` the kernel reads a ``[2 * Hkv]`` float32 array of per-KV-head
``k_scale`` (multiplies the raw ``q.k``, or the keys before a key transform) and ``v_scale``
(multiplies the tile's output, before partials are written and before the output transform).
A 16-bit cache without scales traces to the same kernel as before either existed.

Attention variants (the pipeline of jaxinfer/variants.py) are static fields of the
:class:`KernelSpec`, so each compiles away when unused: ALiBi adds ``slope * (kv_pos - q_pos)``
per row (slopes in closed form), ROPE_LLAMA rotates the halves of q (once per tile) and k (per
key step, cos/sin from the GPU's MUFU approximations) on load and forms ``q.k = q1.k1 + q2.k2``,
a custom mask is gathered byte by byte from a flat int8 array, and the user callables of the
:class:`~jaxinfer.variants.AttentionVariant` are traced into the kernel. Rows are (token, head of
the GQA group), so the callables get per-row ``q_pos``/``qo_head`` of shape ``[bm, 1]``, keys'
``kv_pos`` of shape ``[1, bn]`` and the tile's ``kv_head`` as a scalar. Examples::

    # Sigmoid attention (FlashSigmoid, Ramapuram et al. 2024): o = sum_j sigmoid(x_j + b) v_j.
    AttentionVariant(logits_transform=lambda x, qp, kp, qh, kh: jax.nn.sigmoid(x - 1.0),
                     use_softmax=False)
    # A per-head output gate from an array: run(..., variant_params={"gate": gate [Hq]}).
    AttentionVariant(takes_params=True, output_transform=lambda o, lse, qp, qh, p: o * p["gate"][:, None])

Callables may not gather from captured arrays (Triton has no gather on values): arrays come in as
``variant_params`` (:attr:`KernelSpec.params`), kernel inputs of which each tile loads its rows'
slices once (a gather from memory by ``qo_head``) and hands them to the callables. Attention
sinks (:attr:`KernelSpec.sinks`, ``run(..., sinks=)``) are fused into the epilogue of final rows:
an unsplit tile applies its rows' sinks after the online softmax's finish, a split group in the
merge kernel after the fold (partials never see them, so each row counts its sink once), both
before the output transform (:func:`jaxinfer.backends.pallas.merge.final_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.backends import device
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.backends.pallas.merge import (
    NEG_INF, ParamLayout, final_rows, finish, interpret_mode, merge_partials, row_block,
)
from jaxinfer.backends.vma import varying_like
from jaxinfer.plan.layout import WORK_FIELDS, F, WorkLayout
from jaxinfer.variants import LOG2E, AttentionVariant


@dataclasses.dataclass(frozen=True)
class KernelSpec(WorkLayout):
    """Static parameters of one attention kernel instance (besides the tile config).

    Attributes:
      paged: KV is a page table over caches (else a ragged ``[nnz_kv, Hkv, D]`` tensor).
      kv_layout: ``"NHD"`` or ``"HND"`` (paged only; ``run`` sets it from its argument).
      page_size, num_qo_heads, num_kv_heads, head_dim: geometry.
      sm_scale: resolved logits scale.
      causal, window_left, logits_soft_cap: mask and soft cap (bottom-right aligned; the planner
        already put ``kv_len - qo_len`` into each tile's ``q_pos0``).
      num_slots: partial slots (0 when split-KV is off).
      pos_encoding_mode, rope_scale, rope_theta: ``"ALIBI"`` adds ``slope[qo_head] * (kv_pos -
        q_pos)`` to the natural logits; ``"ROPE_LLAMA"`` rotates q and k on load (step 2 of
        jaxinfer/variants.py).
      custom_mask: the plan carries a flat int8 mask (one byte per (query, key) of a request,
        row-major ``[qo_len, kv_len]``); tiles find theirs through ``kv_len``/``mask_base``.
      use_softmax: ``False`` gives ``o = sum_j x_j v_j`` (no lse; split-KV partials add).
      callables: the variant whose user callables (logits/query/key/output transforms,
        ``logits_mask``) are traced into the kernel, ``None`` when it has none. The
        ``output_transform`` sees final ``(o, lse)``: in this kernel for unsplit tiles, in the
        merge kernel for split ones.
      kv_scales: the kernel takes per-KV-head ``k_scale``/``v_scale`` (``run`` sets it from its
        arguments).
      sinks: the kernel takes ``[Hq]`` float32 sink logits in log2 units and applies them to
        final rows (``run`` sets it from its arguments).
      params: the layout of a ``takes_params`` variant's params, kernel inputs after the sinks
        (``run`` sets it from its arguments), or ``None``.

    Every feature is a static flag: a plan without it compiles to the plain kernel.

    The plan's int32 buffers travel as one array in the plan stage's
    :class:`~jaxinfer.plan.layout.WorkLayout` (``num_ctas`` persistent programs, ``num_groups``
    merge groups, ``max_tiles`` work rows, ``page_capacity`` page ids), which this spec extends.
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
    num_slots: int
    pos_encoding_mode: str = "NONE"
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    custom_mask: bool = False
    use_softmax: bool = True
    callables: AttentionVariant | None = None
    kv_scales: bool = False
    sinks: bool = False
    params: ParamLayout | None = None

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def rope(self) -> bool:
        return self.pos_encoding_mode == "ROPE_LLAMA"

    @property
    def alibi(self) -> bool:
        return self.pos_encoding_mode == "ALIBI"

    def fn(self, name: str):
        """The user callable ``name`` of the variant (``None`` when absent)."""
        return None if self.callables is None else getattr(self.callables, name)

    @property
    def natural_logits(self) -> bool:
        """The logits pass through natural-unit steps (ALiBi, a logits transform, no softmax)."""
        return self.alibi or self.fn("logits_transform") is not None or not self.use_softmax

    @property
    def masks_every_step(self) -> bool:
        """A custom mask or ``logits_mask`` can hide any key, so no step runs without masks."""
        return self.custom_mask or self.fn("logits_mask") is not None

    @property
    def rows_see_different_keys(self) -> bool:
        """Causal, a window or a mask can hide a key of a tile's chunk from some of its rows while
        others see it; masked steps then guard the ``P.V`` dot against non-finite values
        (:func:`_finite_values`). Without them every row sees every key of the chunk, and the
        keys past it load as 0."""
        return self.causal or self.window_left >= 0 or self.masks_every_step


def _logits(s, rows, pos, kv_head, ks: KernelSpec, k_scale=None):
    """Raw ``q.k`` to ``(x, c)`` with base-2 logits ``x * c`` (steps 3-6 of jaxinfer/variants.py).

    ``k_scale`` (the tile's KV head's, a float32 scalar, or ``None``) multiplies the raw ``q.k``
    first (a traced scale may have any sign; folded into ``c`` it would turn row maxima into
    minima). Plain logits leave the scale ``c = sm_scale*log2(e)`` out of ``x`` so that it folds
    into the exponent's FMA (``c*cap*log2(e)`` with the soft cap ``cap*tanh(q.k*sm_scale/cap)``); ``c > 0``,
    so row maxima commute with it. ALiBi and a logits transform need natural units, so there
    ``x`` is the natural logit and ``c = log2(e)``. ``rows = (q_pos, qo_head, slope)`` per row.
    """
    if k_scale is not None:
        s = s * k_scale
    if not ks.natural_logits:
        if ks.logits_soft_cap is None:
            return s, ks.sm_scale * LOG2E
        cap = ks.logits_soft_cap
        return jnp.tanh(s * (ks.sm_scale / cap)), cap * LOG2E
    q_pos, qo_head, slope = rows
    x = s * ks.sm_scale
    if ks.logits_soft_cap is not None:
        x = ks.logits_soft_cap * jnp.tanh(x * (1.0 / ks.logits_soft_cap))
    if ks.alibi:
        x = x + slope[:, None] * (pos[None, :] - q_pos[:, None]).astype(jnp.float32)
    transform = ks.fn("logits_transform")
    if transform is not None:
        x = jnp.broadcast_to(transform(x, q_pos[:, None], pos[None, :], qo_head[:, None], kv_head), s.shape)
    return x, LOG2E


def alibi_slope(qo_head, num_heads: int):
    """``jaxinfer.variants.alibi_slopes(num_heads)[qo_head]`` in closed form (float32), so that
    the kernel computes each row's slope instead of gathering it from a table: with ``m`` the
    largest power of 2 <= ``num_heads``, head ``h < m`` gets ``2**(-8 (h+1)/m)`` and head
    ``m + i`` gets ``2**(-4 (2i+1)/m)`` (Press et al. 2022, sec. 3)."""
    m = 2 ** int(math.floor(math.log2(num_heads)))
    h = qo_head.astype(jnp.float32)
    return jnp.exp2(jnp.where(qo_head < m, (h + 1.0) * (-8.0 / m), (2.0 * (h - m) + 1.0) * (-4.0 / m)))


def _inv_freq(ks: KernelSpec):
    """RoPE angle per position ``[D/2]`` float32: ``rope_theta**(-2d/D) / rope_scale``."""
    d = lax.iota(jnp.int32, ks.head_dim // 2).astype(jnp.float32)
    return jnp.exp2(d * (-2.0 * math.log2(ks.rope_theta) / ks.head_dim)) * (1.0 / ks.rope_scale)


def _approx(fn: str, x, native: bool):
    """``fn`` in ``{"cos", "sin"}`` of float32 ``x``: on the GPU (``native``) the MUFU instruction
    ``{fn}.approx.ftz.f32`` (one SFU operation; libdevice's ``cosf``/``sinf`` add a range
    reduction), which errs by about ``2**-23 |x|`` (the float32 scaling of ``x`` to
    revolutions); elsewhere (interpret mode) ``jnp.cos``/``jnp.sin``."""
    if not native:
        return getattr(jnp, fn)(x)
    # One asm per function: the Pallas lowering of jax 0.11.2 rejects multi-result inline asm.
    [y] = pltriton.elementwise_inline_asm(f"{fn}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def _cos_sin(pos, inv_freq, native: bool):
    """cos/sin ``[len(pos), D/2]`` float32 of the RoPE angles ``pos * inv_freq``.

    On the GPU the MUFU approximations (as FlashInfer's ``__sincosf`` on ``pos * freq``): their
    error is about twice the float32 rounding of the angle itself (~4e-3 rad at position 32k,
    the order of bf16's rounding of the rotated keys), and at two SFU operations per element
    the kernel evaluates them per key step, holding no table in registers (libdevice's
    range-reduced ``cosf``/``sinf`` there raised the register count so far that fewer CTAs fit
    an SM: benchmarks/decisions/pallas.md).
    """
    angle = pos.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return _approx("cos", angle, native), _approx("sin", angle, native)


def _load(ref, rows, ok, width: int, col0: int = 0):
    """Columns ``col0:col0+width`` of ``rows`` of a 2-D ref; rows where ``ok`` is False read 0
    (``ok=None``: every row is in range, an unmasked load)."""
    blk = row_block(ref, rows, width, col0)
    if ok is None:
        return pltriton.load(blk)
    # An integer ``other`` for the uint16 pairs of an fp8 V: a float one would promote them.
    other = 0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0
    return pltriton.load(blk, mask=jnp.broadcast_to(ok[:, None], (rows.shape[0], width)), other=other)


def _widen(x, dtype):
    """``x`` in ``dtype`` (an fp8 tile widened to q's dtype; no op when it has it already)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _fp8_pairs_to_f16(x, fp8_dtype, native: bool):
    """A ``[rows, D/2]`` uint16 tile of fp8 pairs (element ``2j`` in the low byte, ``2j+1`` in the
    high byte: a ``[rows, D]`` fp8 tile bitcast) as its two fp16 ``[rows, D/2]`` halves, the
    even and the odd columns (exact: every fp8 value is an fp16 value).

    The P.V dot takes V ``[keys, D]`` as its B operand, which the MMA wants with the keys (its K
    dimension) paired in a register; fp8 V is stored D-major, and Triton gathers such an 8-bit
    operand from shared memory byte by byte (one ``LDS.U8`` per value, an ``IMAD`` per pair,
    then the ``cvt``). As 16-bit pairs the tile takes ``ldmatrix.trans`` like a bf16 one, and
    each half is one ``PRMT`` (the two keys' bytes of a column) and one ``cvt.rn.f16x2`` per two
    values (offline SASS: benchmarks/decisions/pallas.md). On the GPU through inline asm (Triton
    has no packed byte ops: its integer ops here run one element per instruction); elsewhere
    (interpret mode) the bitcast and ``astype``.
    """
    if not native:
        b = lax.bitcast_convert_type(x, fp8_dtype)  # [rows, D/2, 2]
        return b[..., 0].astype(jnp.float16), b[..., 1].astype(jnp.float16)
    kind = "e5m2x2" if fp8_dtype == jnp.float8_e5m2 else "e4m3x2"

    def half(sel):
        # $1 holds two uint16 elements (two keys of one column pair); prmt gathers the low (0x20)
        # or high (0x31) bytes, cvt widens them to an f16x2 (the low element in the low half).
        [y] = pltriton.elementwise_inline_asm(
            f"{{ .reg .b32 t; .reg .b16 l, h; prmt.b32 t, $1, 0, {sel}; mov.b32 {{l, h}}, t; "
            f"cvt.rn.f16x2.{kind} $0, l; }}",
            args=[x], constraints="=r,r", pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float16)])
        return y

    return half("0x0020"), half("0x0031")


def _interleave(parts):
    """``[rows, D]`` from its even and odd columns (``parts``, two ``[rows, D/2]``), or the one
    part."""
    if len(parts) == 1:
        return parts[0]
    even, odd = parts
    return jnp.stack([even, odd], axis=-1).reshape(even.shape[0], 2 * even.shape[1])


def _fp16_dots(kv_dtype, ks: KernelSpec) -> bool:
    """Whether the dots run in fp16: an fp8 cache without a key transform (_attention_kernel)."""
    return jnp.dtype(kv_dtype).itemsize == 1 and ks.fn("key_transform") is None


def _fp8_v_pairs(kv_dtype, ks: KernelSpec) -> bool:
    """Whether V reaches the kernel as uint16 pairs of fp8 values (:func:`_fp8_pairs_to_f16`): an
    fp8 cache whose tiles widen to fp16 for the dots, unless a GPU older than sm_89 runs it
    (PTX's fp8 ``cvt`` needs sm_89; its V takes the plain fp8 path)."""
    arch = device.gpu_arch()
    return _fp16_dots(kv_dtype, ks) and (arch is None or arch >= 89)


def _load_operand(ref, rows, ok, transform, cos_sin, d: int, dtype, scale=None):
    """Rows of q or k as the column parts of the logits dot, in ``dtype`` (q's).

    Plain: one ``[rows, D]`` part. With RoPE (``cos_sin`` of ``[rows, D/2]``): the two halves,
    rotated in float32 (rotate-half), so that ``q.k = q1.k1 + q2.k2`` needs no concatenation.
    A user ``transform`` sees whole float32 rows before the rotation (step 1 before step 2),
    multiplied by ``scale`` (the dequantized keys; ``None``: no scale).
    """
    if transform is None and cos_sin is None:
        return (_widen(_load(ref, rows, ok, d), dtype),)
    if transform is None:
        parts = tuple(_load(ref, rows, ok, d // 2, c).astype(jnp.float32) for c in (0, d // 2))
    else:
        x = _load(ref, rows, ok, d).astype(jnp.float32)
        x = transform(x if scale is None else x * scale)
        parts = tuple(jnp.split(x, 2, axis=1)) if cos_sin is not None else (x,)
    if cos_sin is not None:
        (x1, x2), (cos, sin) = parts, cos_sin
        parts = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    return tuple(p.astype(dtype) for p in parts)


def _to_fp16(parts):
    """float32 q ``parts`` as fp16, scaled by ``2**-e`` (``e >= 0``, the least that brings the tile's
    largest ``|q|`` to at most ``2**15``, below fp16's 65504), and the factor ``2**e`` that the raw
    logits are multiplied by. A power of two: exact, and ``e = 0`` for any q of a real model."""
    # Two axis reductions: a full jnp.max does not lower under shard_map's abstract mesh.
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.max(jnp.abs(p), axis=1), axis=0) for p in parts])
    e = jnp.maximum(jnp.ceil(jnp.log2(jnp.maximum(amax, 1.0))) - 15.0, 0.0)
    return tuple((p * jnp.exp2(-e)).astype(jnp.float16) for p in parts), jnp.exp2(e)


def _dot_parts(qs, kp):
    s = pltriton.dot(qs[0], kp[0], trans_b=True)
    for a, b in zip(qs[1:], kp[1:]):
        s = s + pltriton.dot(a, b, trans_b=True)
    return s


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


def _visible(ok, pos, rows, kv_head, mask, ks: KernelSpec):
    """``[bm, bn]`` keys each row may see (step 7): chunk range, causal, window, custom mask and
    ``logits_mask``. ``mask = (mask_ref, mask_base, kv_len, tok, row_ok)`` or ``None``."""
    q_pos, qo_head, _ = rows
    visible = ok[None, :]
    if ks.causal:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    if ks.window_left >= 0:
        visible = visible & (pos[None, :] >= q_pos[:, None] - ks.window_left)
    if ks.custom_mask:
        mask_ref, mask_base, kv_len, tok, row_ok = mask
        inside = row_ok[:, None] & ok[None, :]
        idx = jnp.where(inside, mask_base + tok[:, None] * kv_len + pos[None, :], 0)
        visible = visible & (pltriton.load(mask_ref.at[idx], mask=inside, other=0) != 0)
    logits_mask = ks.fn("logits_mask")
    if logits_mask is not None:
        visible = visible & logits_mask(q_pos[:, None], pos[None, :], qo_head[:, None], kv_head)
    return visible


def _finite_values(vs, visible):
    """V ``[bn, D]`` of a masked step with its non-finite entries zeroed, and the ``[bm]`` rows
    that see a key holding one.

    Masks give hidden keys ``p = 0``, but ``0 * inf = NaN`` in the ``P.V`` dot: a key that some
    rows of the tile see and others do not (causal diagonal, window edge, custom mask) would
    poison the rows that cannot see it. With V made finite those rows are exact; the rows that
    do see a non-finite value are set to NaN afterwards (:func:`_poison_rows`), as the plain dot
    would make them. Elementwise work and two max-reductions (over D per key, over the step's
    keys per row), on masked steps of kernels whose rows can see different keys
    (:attr:`KernelSpec.rows_see_different_keys`) only: mask-free steps (every key visible to
    every row) keep the plain product, and keys past the chunk already load as 0. ``vs``: V's
    column parts (the tile, or the even and odd columns of an fp8 one), checked together.
    """
    finite = [jnp.abs(v.astype(jnp.float32)) < jnp.inf for v in vs]  # False for inf and NaN
    bad_key = functools.reduce(jnp.maximum, [jnp.max(jnp.where(f, 0.0, 1.0), axis=1) for f in finite])  # [bn]
    sees_bad = jnp.max(jnp.where(visible, bad_key[None, :], 0.0), axis=1) > 0.0  # [bm]
    return tuple(jnp.where(f, v, jnp.zeros((), v.dtype)) for f, v in zip(finite, vs)), sees_bad


def _poison_rows(acc, sees_bad):
    """``acc`` with the rows that saw a non-finite value set to NaN (they stay NaN)."""
    return jnp.where(sees_bad[:, None], jnp.nan, acc)


def output_shapes(rows: int, slots: int, d: int, dtype) -> tuple:
    """The outputs of an attention kernel: ``o [rows, d]`` in ``dtype``, ``lse [rows]``, and the
    float32 partial ``o [slots, d]`` and ``lse [slots]`` that :func:`store_tile` writes."""
    return (jax.ShapeDtypeStruct((rows, d), dtype), jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((slots, d), jnp.float32), jax.ShapeDtypeStruct((slots,), jnp.float32))


def store_tile(out_refs, final_rows, partial_rows, rows_raw, row_ok, out_slot, num_slots: int,
               slot_rows: int | None = None):
    """Store a tile's rows: ``final_rows = (o, lse)`` to the output rows ``rows_raw`` when the tile
    is its query tile's only chunk (``out_slot < 0``), else ``partial_rows`` to partial slot
    ``out_slot`` (``num_slots > 0``; a slot holds ``slot_rows`` rows, by default the tile's).
    ``out_refs = (o_ref, lse_ref, po_ref, plse_ref)``; rows where ``row_ok`` is False are not
    written."""
    o_ref, lse_ref, po_ref, plse_ref = out_refs
    (o_final, lse_final), (o, lse) = final_rows, partial_rows
    bm, d = o.shape
    slot_rows = bm if slot_rows is None else slot_rows
    ok2 = jnp.broadcast_to(row_ok[:, None], (bm, d))
    # Masked-off lanes store to an index past the end: never written on the GPU, dropped by
    # the scatter of interpret mode (a clamped index would race with a real row there).
    final = row_ok & (out_slot < 0)
    o_rows = jnp.where(final, rows_raw, o_ref.shape[0])
    pltriton.store(row_block(o_ref, o_rows, d), o_final.astype(o_ref.dtype), mask=ok2 & (out_slot < 0))
    pltriton.store(lse_ref.at[o_rows], lse_final, mask=final)
    if num_slots:
        part = row_ok & (out_slot >= 0)
        p_rows = jnp.where(part, out_slot * slot_rows + lax.iota(jnp.int32, bm), po_ref.shape[0])
        pltriton.store(row_block(po_ref, p_rows, d), o, mask=ok2 & (out_slot >= 0))
        pltriton.store(plse_ref.at[p_rows], lse, mask=part)


def _attention_kernel(*refs, ks: KernelSpec, cfg: TileConfig, num_pages: int, native: bool):
    """``num_pages``: ``k.shape[0]``, pages of a paged cache or tokens of a ragged K/V."""
    buf_ref, q_ref, k_ref, v_ref = refs[:4]
    mask_ref = refs[4] if ks.custom_mask else None
    scale_ref = refs[4 + ks.custom_mask] if ks.kv_scales else None
    sink_ref = refs[4 + ks.custom_mask + ks.kv_scales] if ks.sinks else None
    first_param = 4 + ks.custom_mask + ks.kv_scales + ks.sinks
    param_refs = refs[first_param : first_param + (len(ks.params.tails) if ks.params is not None else 0)]
    # The dots' operand dtype. fp8 K/V tiles widen to fp16 whatever q's dtype: e4m3/e5m2 -> fp16
    # is one cvt per two values on sm_89+, -> bf16 goes through fp16 and float32
    # (benchmarks/decisions/pallas.md). Every fp8 value is an fp16 value, and P in [0, 1] loses
    # nothing; a bf16 q is scaled into fp16's range below. A key transform's output (scaled
    # keys included) has no such bound, so with one the tiles widen to q's dtype.
    cdt = jnp.float16 if _fp16_dots(k_ref.dtype, ks) else q_ref.dtype
    # An fp8 V arrives as uint16 pairs (attention()); its tiles are the even and odd columns.
    pairs = v_ref.dtype == jnp.uint16
    n_parts = 2 if pairs else 1
    out_refs = refs[-4:]  # o, lse, partial o, partial lse
    bn, d, g = cfg.block_n, ks.head_dim, ks.group_size
    nf = len(WORK_FIELDS)
    inv_freq = _inv_freq(ks) if ks.rope else None

    def field(t, name):
        return buf_ref[t * nf + F[name]]

    def tile(t, bm: int, qk_ahead: bool):
        """Work tile ``t`` with ``bm`` rows (static; its rows must fit)."""
        r = lax.iota(jnp.int32, bm)
        tok, head_in_group = r // g, r % g
        field_t = functools.partial(field, t)
        kv_head, q_row0, q_len, q_pos0 = field_t("kv_head"), field_t("q_row0"), field_t("q_len"), field_t("q_pos0")
        kv_lo, kv_hi, kv_base, out_slot = field_t("kv_lo"), field_t("kv_hi"), field_t("kv_base"), field_t("out_slot")
        # A module-level run may pass q, or a ragged K/V, with fewer rows than the traced plan
        # covers (shapes are static, the plan's row counts are not): the tile keeps to the rows
        # that exist. Scalar clamps, so that the per-key code is the same as without them.
        row_ok = tok < jnp.minimum(q_len, q_ref.shape[0] // ks.num_qo_heads - q_row0)
        if not ks.paged:
            kv_hi = jnp.minimum(kv_hi, num_pages - kv_base)
        qo_head = kv_head * g + head_in_group
        rows_raw = (q_row0 + tok) * ks.num_qo_heads + qo_head
        q_pos = q_pos0 + tok
        rows = (q_pos, qo_head, alibi_slope(qo_head, ks.num_qo_heads) if ks.alibi else None)
        # The callables with this tile's rows of the variant params bound (loaded once per tile):
        # [bm] for the row transforms, [bm, 1] for the logits ones.
        kt = ks
        if ks.params is not None:
            prm = ks.params.load(param_refs, qo_head)
            cells = jax.tree.map(lambda p: p if p.ndim == 0 else p[:, None], prm)
            kt = dataclasses.replace(ks, callables=ks.callables.bind(prm, cells))
        q_cs = _cos_sin(q_pos, inv_freq, native) if ks.rope else None
        q_load = functools.partial(_load_operand, q_ref, jnp.where(row_ok, rows_raw, 0), row_ok,
                                   kt.fn("query_transform"), q_cs, d)
        qs, q_unscale = (q_load(cdt), None) if cdt == q_ref.dtype else _to_fp16(q_load(jnp.float32))
        mask = (mask_ref, field_t("mask_base"), field_t("kv_len"), tok, row_ok) if ks.custom_mask else None
        k_scale, v_scale = (scale_ref[kv_head], scale_ref[ks.num_kv_heads + kv_head]) if ks.kv_scales else (None, None)
        # A key transform sees the dequantized keys (it need not be linear); otherwise the scale
        # multiplies the raw logits, one multiply per logit instead of one per key element.
        k_transform = ks.fn("key_transform")
        k_scale_rows, k_scale_logits = (k_scale, None) if k_transform is not None else (None, k_scale)
        if q_unscale is not None:
            k_scale_logits = q_unscale if k_scale_logits is None else k_scale_logits * q_unscale

        def positions(i, masked):
            """Keys ``[bn]`` of step ``i`` and their in-chunk mask (``None``: all in range)."""
            pos = kv_lo + i * bn + lax.iota(jnp.int32, bn)
            return pos, (pos < kv_hi if masked else None)

        def qk(i, masked):
            """Raw ``q.k`` ``[bm, bn]`` and KV rows ``[bn]`` of step ``i`` (keys past the chunk
            read as 0 when ``masked``)."""
            pos, ok = positions(i, masked)
            kv_rows = _kv_rows(pos, ok, kv_head, kv_base, buf_ref, num_pages, ks)
            k_cs = _cos_sin(pos, inv_freq, native) if ks.rope else None
            return _dot_parts(qs, _load_operand(k_ref, kv_rows, ok, k_transform, k_cs, d, cdt, k_scale_rows)), kv_rows

        def step(i, state, masked):
            m, l, acc = state[:3]
            pos, ok = positions(i, masked)
            if qk_ahead:
                # Step i+1's logits dot is issued before this step's softmax, so that the tensor
                # cores run it while the softmax waits on the SFU (FlashAttention-3, sec. 3.2).
                (raw, kv_rows), nxt = state[3:], qk(i + 1, True)
            else:
                (raw, kv_rows), nxt = qk(i, masked), ()
            if pairs:
                vs = _fp8_pairs_to_f16(_load(v_ref, kv_rows, ok, d // 2), k_ref.dtype, native)
            else:
                vs = (_widen(_load(v_ref, kv_rows, ok, d), cdt),)
            s, scale = _logits(raw, rows, pos, kv_head, kt, k_scale_logits)
            guard = masked and ks.rows_see_different_keys
            if masked:
                visible = _visible(ok, pos, rows, kv_head, mask, kt)
            if guard:
                vs, sees_bad = _finite_values(vs, visible)
            if not ks.use_softmax:
                if masked:
                    s = jnp.where(visible, s, 0.0)
                acc = tuple(a + pltriton.dot(s, v.astype(jnp.float32)) for a, v in zip(acc, vs))
                return (m, l, tuple(_poison_rows(a, sees_bad) for a in acc) if guard else acc) + nxt
            if masked:
                s = jnp.where(visible, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
            # Only masked steps can leave a row with no key so far (m = -inf).
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
            p = jnp.exp2(s * scale - m_safe[:, None])
            alpha = jnp.exp2(m - m_safe)
            pv = p.astype(vs[0].dtype)
            acc = tuple(a * alpha[:, None] + pltriton.dot(pv, v) for a, v in zip(acc, vs))
            if guard:
                acc = tuple(_poison_rows(a, sees_bad) for a in acc)
            return (m_new, l * alpha + jnp.sum(p, axis=1), acc) + nxt

        acc0 = tuple(jnp.zeros((bm, d // n_parts), jnp.float32) for _ in range(n_parts))
        state = (jnp.full((bm,), NEG_INF, jnp.float32), jnp.zeros((bm,), jnp.float32), acc0)
        if qk_ahead:
            state += qk(0, True)
        n_steps = pl.cdiv(kv_hi - kv_lo, bn)
        masked, full = functools.partial(step, masked=True), functools.partial(step, masked=False)
        if ks.masks_every_step:
            state = lax.fori_loop(0, n_steps, masked, state)
        else:
            a, b = _full_steps(q_pos0, q_len, kv_lo, kv_hi, n_steps, bn, ks)
            if ks.window_left >= 0:
                state = lax.fori_loop(0, a, masked, state)
            state = lax.fori_loop(a, b, full, state)
            state = lax.fori_loop(b, n_steps, masked, state)
        state = (*state[:2], _interleave(state[2]))
        # Without softmax, o is the plain sum and the lse rows (unused) hold zeros.
        o, lse = finish(state) if ks.use_softmax else (state[2], state[1])
        if ks.kv_scales:
            o = o * v_scale
        o_final, lse_final = final_rows(o, lse, q_pos, qo_head, output_transform=kt.fn("output_transform"),
                                        sink=pltriton.load(sink_ref.at[qo_head]) if ks.sinks else None,
                                        use_softmax=ks.use_softmax)
        store_tile(out_refs, (o_final, lse_final), (o, lse), rows_raw, row_ok, out_slot, ks.num_slots, cfg.block_m)

    def run_tile(t, carry):
        big = functools.partial(tile, t, cfg.block_m, cfg.qk_ahead)
        if not cfg.small_block_m:
            big()
        else:
            # A mixed batch's decode tiles take the small body: the big one would run its dots
            # on 8x-32x the rows they have.
            small = functools.partial(tile, t, cfg.small_block_m, False)
            lax.cond(field(t, "q_len") * g <= cfg.small_block_m, small, big)
        return carry

    c = pl.program_id(0)
    lax.fori_loop(buf_ref[ks.off_cta + c], buf_ref[ks.off_cta + c + 1], run_tile, 0)


def attention(plan_buffer, q, k, v, mask=None, scales=None, sinks=None, params=(), *, ks: KernelSpec, cfg: TileConfig):
    """Run a plan: the attention kernel, then the merge kernel when split-KV is on.

    Args:
      plan_buffer: ``[ks.buffer_size]`` int32, the plan's buffers packed by :meth:`KernelSpec.pack`.
      q: ``[nnz_q, Hq, D]`` bf16/fp16.
      k, v: paged caches ``[num_pages, page_size, Hkv, D]`` (NHD) / ``[num_pages, Hkv, page_size,
        D]`` (HND), or ragged ``[nnz_kv, Hkv, D]``; q's dtype or fp8 (widened on load).
      mask: ``[n]`` int8 flat custom mask (nonzero keeps a key) when ``ks.custom_mask``, else None.
      scales: ``[2 * Hkv]`` float32, ``k_scale`` then ``v_scale`` per KV head, when
        ``ks.kv_scales``, else None.
      sinks: ``[Hq]`` float32 sink logits in log2 units (natural ones times ``log2(e)``) when
        ``ks.sinks``, else None.
      params: the 1-D leaves of :meth:`~jaxinfer.backends.pallas.merge.ParamLayout.of` when
        ``ks.params`` (its layout), else ``()``.

    Returns:
      ``(o [nnz_q, Hq, D] q.dtype, lse [nnz_q, Hq] float32 base 2)``; rows no tile covers are
      ``(0, -inf)``. Without softmax the lse rows are meaningless.

    Raises:
      ValueError: ``mask`` (``scales``, ``sinks``, ``params``) given without ``ks.custom_mask``
        (``ks.kv_scales``, ``ks.sinks``, ``ks.params``) or missing with it.
    """
    if (mask is not None) != ks.custom_mask:
        raise ValueError(f"mask must be given exactly when the kernel spec has custom_mask={ks.custom_mask}")
    if (scales is not None) != ks.kv_scales:
        raise ValueError(f"scales must be given exactly when the kernel spec has kv_scales={ks.kv_scales}")
    if (sinks is not None) != ks.sinks:
        raise ValueError(f"sinks must be given exactly when the kernel spec has sinks={ks.sinks}")
    if len(params) != (0 if ks.params is None else len(ks.params.tails)):
        raise ValueError("params must be the leaves of the kernel spec's params layout")
    nnz_q = q.shape[0]
    rows = nnz_q * ks.num_qo_heads
    d = ks.head_dim
    slots = max(ks.num_slots, 1) * cfg.block_m
    num_pages = k.shape[0]
    interpret = interpret_mode()
    if _fp8_v_pairs(v.dtype, ks):
        # [rows, D/2] uint16 pairs of the fp8 V (a bitcast, no copy): _fp8_pairs_to_f16.
        v = lax.bitcast_convert_type(v.reshape(-1, d // 2, 2), jnp.uint16)
    kernel = functools.partial(_attention_kernel, ks=ks, cfg=cfg, num_pages=num_pages, native=not interpret)
    extra = tuple(x for x in (mask, scales, sinks) if x is not None) + tuple(params)
    o, lse, po, plse = pl.pallas_call(
        kernel,
        out_shape=varying_like(output_shapes(rows, slots, d, q.dtype), plan_buffer, q, k, v, extra),
        grid=(ks.num_ctas,),
        input_output_aliases={len(extra) + 4: 0, len(extra) + 5: 1},
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )(
        plan_buffer,
        q.reshape(rows, d),
        k.reshape(-1, d),  # [rows, D] view of a paged cache (NHD/HND) or a ragged KV tensor
        v.reshape(-1, v.shape[-1]),
        *extra,
        jnp.zeros((rows, d), q.dtype),
        jnp.full((rows,), NEG_INF, jnp.float32),
    )
    if ks.num_slots:
        o, lse = merge_partials(
            plan_buffer, po, plse, o, lse,
            off_indptr=ks.off_merge_indptr, off_dest=ks.off_merge_dest, num_groups=ks.num_groups,
            block_m=cfg.block_m, group_size=ks.group_size, num_qo_heads=ks.num_qo_heads,
            use_softmax=ks.use_softmax, output_transform=ks.fn("output_transform"), sinks=sinks, params=params,
            param_layout=ks.params,
        )
    return o.reshape(nnz_q, ks.num_qo_heads, d), lse.reshape(nnz_q, ks.num_qo_heads)
