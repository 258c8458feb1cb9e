"""Reference XLA attention: pure ``jnp`` attention for every op, and the ``"xla"`` backend.

Every op of jaxinfer reduces to :func:`attention_dense` over a padded batch: queries
``[B, Lq, Hq, D]`` and keys ``[B, Lk, Hkv, D]`` with per-request lengths, the variant's pipeline
(jaxinfer/variants.py) applied in float32, and a numerically safe softmax (row max subtracted, a
row with no visible key giving ``o = 0, lse = -inf``, keys a row does not see contributing nothing
even when they hold inf or NaN). The ``"xla"`` backend gathers a batch's
ragged queries and paged or ragged KV into that padded form with index arrays planned on the host,
so it is jit-compatible with static shapes fixed by a :class:`~jaxinfer.plan.batch.PlanCapacity`;
padding every request to the longest one, it refuses batches past :data:`MAX_PADDED_ELEMENTS`.
It is the "reference XLA attention" of the benchmarks: simple and exact, not fast. fp8 caches
(:mod:`jaxinfer.fp8`) are gathered as fp8 and widened exactly; their ``P . V`` runs in float32
(probabilities rounded to the cache's 3 mantissa bits would cost a 10x larger error), and the
``k_scale``/``v_scale`` of a run multiply the logits and the output in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxinfer.backends.base import Capabilities
from jaxinfer.fp8 import is_fp8
from jaxinfer.plan.batch import BatchSpec, PlanCapacity, pad_batch
from jaxinfer.plan.transfer import to_device
from jaxinfer.variants import LOG2E, AttentionVariant, alibi_slopes, apply_sink, params_at, rope_inv_freq


def apply_rope_rotate_half(x: Float[Array, "... L H D"], pos: Int[Array, "... L"], variant: AttentionVariant):
    """Rotate-half (LLaMA/GPT-NeoX) RoPE of ``x`` at positions ``pos`` in float32 (RoFormer, Su et al.
    2021, eq. 34): pairs ``(d, d + D/2)`` rotate by ``pos * inv_freq[d]``."""
    d = x.shape[-1]
    angle = pos[..., None, None].astype(jnp.float32) * rope_inv_freq(d, variant.rope_scale, variant.rope_theta)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _matmul_dtype(x):
    # bf16/fp16 operands go to the matrix units with float32 accumulation, as FlashAttention does;
    # float32 operands keep full float32 products (no TF32) so the reference stays exact.
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _product_without_hidden_poison(product, v, visible, group: int, Lq: int):
    """``product(v)`` ``[B, Lq, Hkv, G, D]`` with V's non-finite entries zeroed, and NaN in the rows
    that see a key holding one (as the plain product makes them): poison reaches only the rows
    that see it. Exact: finite values are unchanged."""
    B, _, Hkv, _ = v.shape
    finite = jnp.isfinite(v)
    o = product(jnp.where(finite, v, jnp.zeros((), v.dtype)))
    bad_key = jnp.transpose(~jnp.all(finite, axis=-1), (0, 2, 1))[:, :, None, None, :]  # [B, Hkv, 1, 1, Lk]
    sees_bad = jnp.any(visible & bad_key, axis=-1)  # [B, Hkv, G or 1, Lq]
    sees_bad = jnp.transpose(jnp.broadcast_to(sees_bad, (B, Hkv, group, Lq)), (0, 3, 1, 2))[..., None]
    return jnp.where(sees_bad, jnp.nan, o)


def attention_dense(
    q: Float[Array, "B Lq Hq D"],
    k: Float[Array, "B Lk Hkv D"],
    v: Float[Array, "B Lk Hkv D"],
    qo_lens: Int[Array, "B"],
    kv_lens: Int[Array, "B"],
    variant: AttentionVariant,
    custom_mask: Bool[Array, "B Lq Lk"] | None = None,
    k_scale: Float[Array, "Hkv"] | None = None,
    v_scale: Float[Array, "Hkv"] | None = None,
    variant_params=None,
    sinks: Float[Array, "Hq"] | None = None,
) -> tuple[Float[Array, "B Lq Hq D"], Float[Array, "B Lq Hq"] | None]:
    """Attention of a padded batch, the variant pipeline of jaxinfer/variants.py.

    Args:
      q: queries; rows ``i >= qo_lens[b]`` are padding (their output is unspecified).
      k, v: keys and values; rows ``j >= kv_lens[b]`` are masked out. A key a row does not see
        contributes nothing to it even when it holds inf or NaN; a row that sees a non-finite
        value of ``v`` gets NaN (only that row). fp8 K is widened (exactly) to q's dtype for
        ``q . k`` and fp8 V to float32, so that ``P . V`` keeps float32 probabilities.
      qo_lens, kv_lens: ``[B]`` int32 lengths.
      variant: the attention variant (static).
      custom_mask: optional ``[B, Lq, Lk]`` bool, True keeps a key.
      k_scale, v_scale: optional ``[Hkv]`` float32 (:mod:`jaxinfer.fp8`): ``k_scale[h]``
        multiplies the logits ``q . k`` of KV head ``h`` (the keys, when a key transform is to
        see them), ``v_scale[h]`` its output (before the output transform), i.e. attention over
        ``k * k_scale`` and ``v * v_scale``.
      variant_params: the pytree of a ``takes_params`` variant (checked leaves ``[]``, ``[Hq]``
        or ``[Hq, T]``), sliced per row for its callables (jaxinfer/variants.py); else ``None``.
      sinks: optional ``[Hq]`` float32 natural-log sink logits (step 9 of jaxinfer/variants.py,
        applied after ``v_scale``, before the output transform).

    Returns:
      ``(o [B, Lq, Hq, D] float32, lse [B, Lq, Hq] float32 base 2)``; ``lse`` is ``None`` without
      softmax. Rows with no visible key give ``o = 0`` and ``lse = -inf`` (``sinks / ln 2`` with
      sinks).
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if is_fp8(q.dtype):
        q = q.astype(jnp.float32)
    if is_fp8(k.dtype):
        k = k.astype(q.dtype)
    if is_fp8(v.dtype):
        v = v.astype(jnp.float32)
    q_pos = jnp.arange(Lq)[None, :] + (kv_lens - qo_lens)[:, None]  # [B, Lq]
    kv_pos = jnp.arange(Lk)
    # Index grids broadcast against x [B, Hkv, G, Lq, Lk] and against the output rows [B, Lq, Hq].
    qo_head = (jnp.arange(Hkv)[:, None] * group + jnp.arange(group)[None, :])[None, :, :, None, None]
    out_head = jnp.arange(Hq)[None, None, :]
    if variant_params is not None:
        variant = variant.bind(params_at(variant_params, out_head), params_at(variant_params, qo_head))
    if variant.query_transform or variant.key_transform or variant.pos_encoding_mode == "ROPE_LLAMA":
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        if variant.query_transform:
            q = variant.query_transform(q)
        if variant.key_transform:
            k = variant.key_transform(k if k_scale is None else k * k_scale[None, None, :, None])
        if variant.pos_encoding_mode == "ROPE_LLAMA":
            q = apply_rope_rotate_half(q, q_pos, variant)
            k = apply_rope_rotate_half(k, jnp.broadcast_to(kv_pos, (B, Lk)), variant)
    qg = q.reshape(B, Lq, Hkv, group, D)
    x = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, precision=_matmul_dtype(q), preferred_element_type=jnp.float32)
    x = x * variant.scale(D)
    if k_scale is not None and not variant.key_transform:
        x = x * k_scale[None, :, None, None, None]
    if variant.has_soft_cap:
        c = variant.logits_soft_cap
        x = c * jnp.tanh(x / c)
    qp = q_pos[:, None, None, :, None]
    kp = kv_pos[None, None, None, None, :]
    kv_head = jnp.arange(Hkv)[None, :, None, None, None]
    if variant.pos_encoding_mode == "ALIBI":
        slopes = jnp.asarray(alibi_slopes(Hq)).reshape(Hkv, group)[None, :, :, None, None]
        x = x + slopes * (kp - qp).astype(jnp.float32)
    if variant.logits_transform:
        x = variant.logits_transform(x, qp, kp, qo_head, kv_head)
    visible = kp < kv_lens[:, None, None, None, None]
    if variant.causal:
        visible &= kp <= qp
    if variant.window_left >= 0:
        visible &= kp >= qp - variant.window_left
    if custom_mask is not None:
        visible &= custom_mask[:, None, None, :, :]
    if variant.logits_mask:
        visible &= variant.logits_mask(qp, kp, qo_head, kv_head)
    vdt = v.dtype if v.dtype != jnp.float32 else jnp.float32
    if variant.use_softmax:
        x = jnp.where(visible, x, -jnp.inf)
        m = jnp.max(x, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(x - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        weights, values, precision = p.astype(vdt), v, _matmul_dtype(v)
    else:
        weights, values, precision = jnp.where(visible, x, 0.0), v.astype(jnp.float32), jax.lax.Precision.HIGHEST

    def product(vals):
        return jnp.einsum("bhgqk,bkhd->bqhgd", weights, vals, precision=precision, preferred_element_type=jnp.float32)

    o = product(values)
    # Hidden keys have weight 0, but 0 * inf = NaN: a non-finite value anywhere in the gathered V
    # (a padding key, another request's row read for an empty one, a key that causal or a mask
    # hides) would reach rows that cannot see it. A finite product proves no such value was
    # touched; otherwise (rare: the check is on the small output) the product is redone without
    # the poison (_product_without_hidden_poison), exactly.
    o = jax.lax.cond(jnp.all(jnp.isfinite(o)), lambda: o,
                     lambda: _product_without_hidden_poison(product, values, visible, group, Lq))
    if variant.use_softmax:
        inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)[..., 0]  # [B,Hkv,G,Lq]
        o = o * jnp.transpose(inv, (0, 3, 1, 2))[..., None]
        lse = jnp.where(denom[..., 0] > 0, (m[..., 0] + jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0))) * LOG2E, -jnp.inf)
        lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, Lq, Hq)
    else:
        lse = None
    if v_scale is not None:
        o = o * v_scale[None, None, :, None, None]
    o = o.reshape(B, Lq, Hq, D)
    if sinks is not None:
        o, lse = apply_sink(o, lse, sinks * LOG2E)
    if variant.output_transform:
        o = variant.output_transform(o, lse, q_pos[:, :, None], out_head)
    return o, lse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RefPlan:
    """Index arrays that turn a ragged batch into the padded form of :func:`attention_dense`.

    Array fields (int32 unless noted; ``Bc``, ``Lq``, ``Lk`` are capacities):
      qo_indptr ``[Bc+1]``; qo_lens, kv_lens ``[Bc]``;
      q_rows ``[Bc, Lq]`` row of ``q`` for each padded query (clamped for padding);
      kv_page, kv_slot ``[Bc, Lk]`` page and slot of each padded key (ragged KV: row and 0);
      custom_mask ``[Bc, Lq, Lk]`` bool or ``None``.
    """

    qo_indptr: jax.Array
    qo_lens: jax.Array
    kv_lens: jax.Array
    q_rows: jax.Array
    kv_page: jax.Array
    kv_slot: jax.Array
    custom_mask: jax.Array | None
    variant: AttentionVariant = dataclasses.field(metadata=dict(static=True))
    paged: bool = dataclasses.field(metadata=dict(static=True))
    num_qo_heads: int = dataclasses.field(metadata=dict(static=True))
    num_kv_heads: int = dataclasses.field(metadata=dict(static=True))
    head_dim: int = dataclasses.field(metadata=dict(static=True))
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))


MAX_PADDED_ELEMENTS = 2**28
"""Most elements one padded index array of an ``"xla"`` plan may hold: ``q_rows`` (max_batch_size
x max_qo_len query slots), ``kv_page``/``kv_slot`` (max_batch_size x max_kv_len key slots) and a
custom mask (max_batch_size x max_qo_len x max_kv_len). The reference pads every request to the
longest one, so its host and device memory grow with ``batch x longest request``: planning takes
about 24 bytes of host memory per key slot (measured; 2**28 slots: ~6 GB), and running gathers K
and V to ``[slots, Hkv, D]`` each (2**28 slots of one bf16 KV head of 64 dims: 64 GB for the
two). A larger batch gets a ``ValueError`` at plan time instead of an out-of-memory kill.
The largest benchmark on this backend, decode_wide_zipf, pads to 256 x 32768 = 2**23 key slots.
"""

MAX_LOGITS_ELEMENTS = 2**31
"""Most elements of the padded float32 logits ``[max_batch_size, Hq, max_qo_len, max_kv_len]`` of
an ``"xla"`` run (8 GiB): a 2048-token prefill beside 4096-token decodes pads every decode to 2048
query rows and would need 64 GiB; a plan past it raises before anything is allocated."""


def check_padded_size(spec: BatchSpec, Bc: int, Lq: int, Lk: int) -> None:
    """Raise a ``ValueError`` naming the lengths when a padded index array would exceed
    :data:`MAX_PADDED_ELEMENTS` or the padded logits :data:`MAX_LOGITS_ELEMENTS` (before anything
    of that size is allocated)."""
    kv_args = "kv_indptr and kv_last_page_len" if spec.paged else "kv_indptr"
    longest_kv = int(spec.kv_lens.max(initial=0))
    longest_qo = int(spec.qo_lens.max(initial=0))
    index = ("MAX_PADDED_ELEMENTS", MAX_PADDED_ELEMENTS)
    arrays = [
        ("key slots", Bc * Lk, index, f"max_batch_size={Bc} x max_kv_len={Lk} (the longest request has "
                                      f"kv_len={longest_kv}, from {kv_args})"),
        ("query slots", Bc * Lq, index, f"max_batch_size={Bc} x max_qo_len={Lq} (the longest request has "
                                        f"qo_len={longest_qo}, from qo_indptr)"),
        # The float32 logits [Bc, Hq, Lq, Lk], the largest array of a run.
        ("float32 logits", Bc * spec.num_qo_heads * Lq * Lk, ("MAX_LOGITS_ELEMENTS", MAX_LOGITS_ELEMENTS),
         f"max_batch_size={Bc} x num_qo_heads={spec.num_qo_heads} x max_qo_len={Lq} x max_kv_len={Lk}"),
    ]
    if spec.custom_mask is not None:
        arrays.append(("custom_mask elements", Bc * Lq * Lk, index,
                       f"max_batch_size={Bc} x max_qo_len={Lq} x max_kv_len={Lk}"))
    for what, n, (limit_name, limit), dims in arrays:
        if n > limit:
            raise ValueError(
                f"backend 'xla' pads every request of a batch to the longest one: {dims} gives {n} padded {what}, "
                f"over its limit of {limit} (2**{limit.bit_length() - 1}, jaxinfer.backends.xla.{limit_name}); "
                "use backend='pallas' (or 'fa2'/'fa3'), or plan smaller batches"
            )


def _padded_rows(starts: np.ndarray, lens: np.ndarray, width: int) -> np.ndarray:
    """``[B, width]`` of ``starts[b] + j``, clamped to the request's last row (or its start)."""
    j = np.arange(width)[None, :]
    return (starts[:, None] + np.minimum(j, np.maximum(lens[:, None] - 1, 0))).astype(np.int32)


def plan_reference(spec: BatchSpec, capacity: PlanCapacity) -> RefPlan:
    """Host planning of the ``"xla"`` backend (numpy; see :class:`RefPlan`).

    Raises:
      ValueError: the batch exceeds a fixed capacity, or a padded index array would hold more
        than :data:`MAX_PADDED_ELEMENTS` elements.
    """
    padded = pad_batch(spec, capacity)
    Bc, Lq, Lk = padded.max_batch_size, padded.max_qo_len, padded.max_kv_len
    check_padded_size(spec, Bc, Lq, Lk)
    pad = Bc - spec.batch_size
    qo_indptr, qo_lens, kv_lens = padded.qo_indptr, padded.qo_lens, padded.kv_lens
    q_rows = _padded_rows(qo_indptr[:-1], qo_lens, Lq)
    if spec.paged:
        tok = _padded_rows(np.zeros(Bc, np.int64), kv_lens, Lk)
        page_ptr = np.pad(spec.kv_indptr[:-1], (0, pad))[:, None] + tok // spec.page_size
        kv_page = spec.kv_indices[np.minimum(page_ptr, max(spec.kv_indices.size - 1, 0))] if spec.kv_indices.size else np.zeros_like(page_ptr)
        kv_slot = tok % spec.page_size
    else:
        kv_page = _padded_rows(np.pad(spec.kv_indptr[:-1], (0, pad)), kv_lens, Lk)
        kv_slot = np.zeros_like(kv_page)
    mask = None
    if spec.custom_mask is not None:
        mask = np.zeros((Bc, Lq, Lk), dtype=bool)
        offs = spec.mask_indptr
        for b in range(spec.batch_size):
            ql, kl = spec.qo_lens[b], spec.kv_lens[b]
            mask[b, :ql, :kl] = spec.custom_mask[offs[b] : offs[b + 1]].reshape(ql, kl)
        mask = to_device(mask)
    index = lambda x: to_device(np.asarray(x, np.int32))  # noqa: E731
    return RefPlan(
        qo_indptr=index(qo_indptr),
        qo_lens=index(qo_lens),
        kv_lens=index(kv_lens),
        q_rows=index(q_rows),
        kv_page=index(kv_page),
        kv_slot=index(kv_slot),
        custom_mask=mask,
        variant=spec.variant,
        paged=spec.paged,
        num_qo_heads=spec.num_qo_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
    )


def run_reference(plan: RefPlan, q, k, v, *, kv_layout: str = "NHD", return_lse: bool = False, k_scale=None,
                  v_scale=None, variant_params=None, sinks=None):
    """Run a :class:`RefPlan` (jit-compatible).

    Args:
      q: ``[nnz_q, Hq, D]`` ragged queries.
      k, v: paged caches (``[P, page_size, Hkv, D]`` NHD, ``[P, Hkv, page_size, D]`` HND) for a
        paged plan, ragged ``[nnz_kv, Hkv, D]`` otherwise. Out-of-range page ids are clamped,
        never read outside the arrays.
      kv_layout: ``"NHD"`` or ``"HND"`` (paged only).
      return_lse: also return ``lse [nnz_q, Hq]`` float32, base 2.
      k_scale, v_scale: ``[Hkv]`` float32 scales or ``None`` (see :func:`attention_dense`).
      variant_params, sinks: see :func:`attention_dense`.

    Returns:
      ``(o [nnz_q, Hq, D] in q.dtype, lse or None)``; rows past ``qo_indptr[-1]`` are zero.
    """
    qp = q[plan.q_rows]  # [Bc, Lq, Hq, D]
    if plan.paged and kv_layout == "HND":
        kp, vp = (c[plan.kv_page, :, plan.kv_slot] for c in (k, v))
    elif plan.paged:
        kp, vp = (c[plan.kv_page, plan.kv_slot] for c in (k, v))
    else:
        kp, vp = k[plan.kv_page], v[plan.kv_page]
    o, lse = attention_dense(qp, kp, vp, plan.qo_lens, plan.kv_lens, plan.variant, plan.custom_mask, k_scale, v_scale,
                             variant_params, sinks)
    # Scatter back: token t of the ragged q is query t - qo_indptr[b] of request b.
    t = jnp.arange(q.shape[0])
    b = jnp.clip(jnp.searchsorted(plan.qo_indptr, t, side="right") - 1, 0, plan.qo_lens.shape[0] - 1)
    i = jnp.clip(t - plan.qo_indptr[b], 0, qp.shape[1] - 1)
    valid = (t < plan.qo_indptr[-1])[:, None]
    o_flat = jnp.where(valid[..., None], o[b, i], 0.0).astype(q.dtype)
    if not return_lse:
        return o_flat, None
    if lse is None:
        raise ValueError("return_lse=True needs a softmax variant (use_softmax=False has no lse)")
    return o_flat, jnp.where(valid, lse[b, i], -jnp.inf)


class ReferenceBackend:
    """The ``"xla"`` backend: serves every spec, on any device."""

    name = "xla"
    capabilities = Capabilities()

    def unsupported(self, spec: BatchSpec) -> str | None:
        return self.capabilities.unsupported(spec)

    def device_unsupported(self) -> str | None:
        return None

    @staticmethod
    def merge_states(v, s):
        return merge_states_reference(v, s)

    def plan(self, spec: BatchSpec, capacity: PlanCapacity) -> RefPlan:
        return plan_reference(spec, capacity)

    def run(self, plan: RefPlan, q, k, v, *, kv_layout: str = "NHD", return_lse: bool = False, k_scale=None,
            v_scale=None, variant_params=None, sinks=None):
        return run_reference(plan, q, k, v, kv_layout=kv_layout, return_lse=return_lse, k_scale=k_scale,
                             v_scale=v_scale, variant_params=variant_params, sinks=sinks)


def get_backend(name: str) -> ReferenceBackend:
    return ReferenceBackend()


def merge_states_reference(v: Float[Array, "L N H D"], s: Float[Array, "L N H"]):
    """Merge ``N`` attention states per row (FlashInfer paper, sec. 2.2, eq. 3; lse base 2).

    ``s = log2(sum_n 2^s_n)``, ``v = sum_n 2^(s_n - s) v_n``; states with ``s_n = -inf``
    contribute nothing (whatever their ``v_n`` holds, inf and NaN included) and a row of only
    ``-inf`` states gives ``v = 0, s = -inf``.
    Returns ``(v [L, H, D] in v.dtype, s [L, H] float32)``.
    """
    s = s.astype(jnp.float32)
    m = jnp.max(s, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(s - m)  # [L, N, H]
    total = jnp.sum(w, axis=1)
    safe = jnp.where(total > 0, total, 1.0)
    # A -inf state's values are never read (weight 0 times inf or NaN would be NaN).
    v_live = jnp.where((s == -jnp.inf)[..., None], 0.0, v.astype(jnp.float32))
    out = jnp.einsum("lnh,lnhd->lhd", w, v_live, precision=jax.lax.Precision.HIGHEST) / safe[..., None]
    lse = jnp.where(total > 0, m[:, 0] + jnp.log2(safe), -jnp.inf)
    return out.astype(v.dtype), lse


__all__ = [
    "attention_dense",
    "apply_rope_rotate_half",
    "RefPlan",
    "plan_reference",
    "run_reference",
    "merge_states_reference",
    "get_backend",
    "MAX_PADDED_ELEMENTS",
]
