"""Decode attention: one query token per request against its paged KV (FlashInfer's decode API).

Decode is batch prefill with ``qo_len = 1``: the same plan/kernel path (shared/DESIGN.md sec. 1),
with GQA head-group packing making the ``Hq / Hkv`` query heads of one KV head the rows of a tile.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxinfer.plan.batch import BatchSpec
from jaxinfer.variants import AttentionVariant, make_variant
from jaxinfer.wrapper import BatchWrapper, Plan, as_host_int, run_paged_plan, run_single, single_kv


def single_decode_with_kv_cache(
    q, k, v, *, kv_layout: str = "NHD", pos_encoding_mode: str = "NONE", window_left: int = -1,
    logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float = 1.0,
    rope_theta: float = 1e4, return_lse: bool = False, backend: str = "auto",
    variant: AttentionVariant | None = None, k_scale=None, v_scale=None,
):
    """Decode attention of one request.

    Args:
      q: ``[Hq, D]`` query (bf16, fp16 or float32).
      k, v: ``[L, Hkv, D]`` (NHD) or ``[Hkv, L, D]`` (HND), same dtype as each other: q's, or
        fp8 (``float8_e4m3fn``/``float8_e5m2``, :mod:`jaxinfer.fp8`).
      kv_layout, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale,
        rope_theta: see :class:`~jaxinfer.variants.AttentionVariant`.
      return_lse: also return ``lse [Hq]`` float32 (base 2).
      backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"``.
      variant: optional user variant (callables); keyword options override its fields.
      k_scale, v_scale: see :data:`jaxinfer.wrapper.SCALES_DOC`.

    Returns:
      ``o [Hq, D]`` in q's dtype, or ``(o, lse)``. With no keys (``L = 0``): ``o = 0``, ``lse = -inf``.

    Raises:
      ValueError: shapes, dtypes or options that break shared/DESIGN.md section 5.
      NotImplementedError: the named backend cannot serve the call.
    """
    if q.ndim != 2:
        raise ValueError(f"q must be [num_qo_heads, head_dim], got shape {q.shape}")
    variant = make_variant(variant, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                           pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
    k, v = single_kv(k, v, kv_layout)
    out = run_single(q[None], k, v, variant, backend, op="decode", return_lse=return_lse, k_scale=k_scale,
                     v_scale=v_scale)
    return (out[0][0], out[1][0]) if return_lse else out[0]


# FlashInfer's names of the decode page table, for the messages of BatchSpec.create.
_PAGE_TABLE_NAMES = {"kv_indptr": "indptr", "kv_indices": "indices", "kv_last_page_len": "last_page_len"}


class BatchDecodeWithPagedKVCacheWrapper(BatchWrapper):
    """Batch decode over a paged KV cache (FlashInfer's wrapper of the same name).

    ``plan`` once per batch composition on the host, then ``run`` per layer; ``run`` is
    jit-compatible, and :func:`batch_decode` runs the returned plan inside a jitted step.
    """

    _op = "decode"

    def plan(
        self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
        page_size: int, *, pos_encoding_mode: str = "NONE", window_left: int = -1,
        logits_soft_cap: float | None = None, q_data_type=jnp.bfloat16, kv_data_type=None,
        sm_scale: float | None = None, rope_scale: float = 1.0, rope_theta: float = 1e4,
        variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a batch on the host.

        Args:
          indptr: ``[B+1]`` page row pointer; indices ``[nnz_pages]`` page ids; last_page_len
            ``[B]`` (shared/DESIGN.md section 3).
          num_qo_heads, num_kv_heads, head_dim, page_size: geometry.
          q_data_type, kv_data_type: dtypes ``run`` will receive (kv defaults to q's; an fp8
            cache, ``float8_e4m3fn``/``float8_e5m2``, goes with a bf16/fp16 q).
          Other options: see :class:`~jaxinfer.variants.AttentionVariant`.

        Returns:
          The plan pytree (also kept for ``run``).

        Raises:
          ValueError: invalid page table or options (message names the argument).
          NotImplementedError: the wrapper's named backend cannot serve the batch.
        """
        last = as_host_int("last_page_len", last_page_len)
        variant = make_variant(variant, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                               pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
        spec = BatchSpec.create(
            np.arange(np.size(last) + 1), as_host_int("indptr", indptr), as_host_int("indices", indices), last,
            page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            variant=variant, q_dtype=q_data_type, kv_dtype=kv_data_type, names=_PAGE_TABLE_NAMES,
        )
        return self._set_plan(spec)

    def run(self, q, paged_kv_cache, *, return_lse: bool = False, k_scale=None, v_scale=None):
        """Decode ``q [B, Hq, D]`` against ``paged_kv_cache`` -> ``o [B, Hq, D]`` (, ``lse [B, Hq]``);
        ``k_scale``/``v_scale``: :data:`jaxinfer.wrapper.SCALES_DOC`."""
        return self._run_paged(q, paged_kv_cache, return_lse, k_scale, v_scale)


def batch_decode(q, paged_kv_cache, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None):
    """Run a decode plan inside jit: ``q [B, Hq, D]`` -> ``o [B, Hq, D]`` (, ``lse [B, Hq]``);
    ``k_scale``/``v_scale``: :data:`jaxinfer.wrapper.SCALES_DOC`."""
    return run_paged_plan(plan, q, paged_kv_cache, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)
