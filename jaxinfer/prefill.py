"""Prefill and append attention: ragged queries against paged or ragged KV (FlashInfer's API).

Append is prefill whose queries are the last ``qo_len`` of ``kv_len`` tokens: the bottom-right
aligned causal mask (shared/DESIGN.md sec. 2) makes the two one op.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxinfer.variants import AttentionVariant, make_variant
from jaxinfer.wrapper import BatchWrapper, Plan, batch_spec, check_spec_run_args, run_paged_plan, run_plan, run_single, single_kv


def single_prefill_with_kv_cache(
    q, k, v, *, custom_mask=None, causal: bool = False, kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE", sm_scale: float | None = None, window_left: int = -1,
    logits_soft_cap: float | None = None, rope_scale: float = 1.0, rope_theta: float = 1e4,
    return_lse: bool = False, backend: str = "auto", variant: AttentionVariant | None = None,
    k_scale=None, v_scale=None,
):
    """Prefill attention of one request.

    Args:
      q: ``[Lq, Hq, D]``.
      k, v: ``[Lk, Hkv, D]`` (NHD) or ``[Hkv, Lk, D]`` (HND), in q's dtype or fp8.
      custom_mask: optional ``[Lq, Lk]`` bool (True keeps the key), a concrete host array.
      causal: bottom-right aligned causal mask.
      k_scale, v_scale: see :data:`jaxinfer.wrapper.SCALES_DOC`.
      Other options: see :class:`~jaxinfer.variants.AttentionVariant`.

    Returns:
      ``o [Lq, Hq, D]`` in q's dtype, or ``(o, lse [Lq, Hq] float32 base 2)``.

    Raises:
      ValueError: shapes, dtypes or options that break shared/DESIGN.md section 5.
      NotImplementedError: the named backend cannot serve the call.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [qo_len, num_qo_heads, head_dim], got shape {q.shape}")
    variant = make_variant(variant, causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap,
                           sm_scale=sm_scale, pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                           rope_theta=rope_theta)
    k, v = single_kv(k, v, kv_layout)
    return run_single(q, k, v, variant, backend, op="prefill", return_lse=return_lse, custom_mask=custom_mask,
                      k_scale=k_scale, v_scale=v_scale)


class BatchPrefillWithPagedKVCacheWrapper(BatchWrapper):
    """Batch prefill/append of ragged queries over a paged KV cache (FlashInfer's wrapper)."""

    def plan(
        self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
        num_kv_heads: int, head_dim: int, page_size: int, *, custom_mask=None, causal: bool = False,
        pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
        sm_scale: float | None = None, rope_scale: float = 1.0, rope_theta: float = 1e4,
        q_data_type=jnp.bfloat16, kv_data_type=None, variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a batch on the host.

        Args:
          qo_indptr: ``[B+1]`` query row pointer; paged_kv_indptr ``[B+1]``, paged_kv_indices
            ``[nnz_pages]``, paged_kv_last_page_len ``[B]``: the page table (DESIGN.md sec. 3).
          custom_mask: flat bool, the concatenation of each request's row-major
            ``[qo_len, kv_len]`` mask.
          q_data_type, kv_data_type: dtypes ``run`` will receive (kv defaults to q's; an fp8
            cache, ``float8_e4m3fn``/``float8_e5m2``, goes with a bf16/fp16 q).
          Other options: see :class:`~jaxinfer.variants.AttentionVariant`.

        Returns:
          The plan pytree (also kept for ``run``).

        Raises:
          ValueError: invalid indptr, page table, mask or options (message names the argument).
          NotImplementedError: the wrapper's named backend cannot serve the batch.
        """
        for name, val in (("paged_kv_indices", paged_kv_indices), ("paged_kv_last_page_len", paged_kv_last_page_len)):
            if val is None:  # batch_spec would plan ragged KV: BatchPrefillWithRaggedKVCacheWrapper's job
                raise ValueError(f"{name} must be an array (the page table), got None")
        spec = batch_spec(
            qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
            head_dim, page_size, custom_mask, q_data_type, kv_data_type, variant, causal=causal,
            window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
            pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        return self._set_plan(spec)

    def run(self, q, paged_kv_cache, *, return_lse: bool = False, k_scale=None, v_scale=None):
        """``q [nnz_q, Hq, D]`` -> ``o [nnz_q, Hq, D]`` (, ``lse [nnz_q, Hq]``); ``k_scale``/``v_scale``:
        :data:`jaxinfer.wrapper.SCALES_DOC`."""
        return self._run_paged(q, paged_kv_cache, return_lse, k_scale, v_scale)


class BatchPrefillWithRaggedKVCacheWrapper(BatchWrapper):
    """Batch prefill of ragged queries over ragged (unpaged) KV (FlashInfer's wrapper)."""

    def plan(
        self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
        custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE", window_left: int = -1,
        logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float = 1.0,
        rope_theta: float = 1e4, q_data_type=jnp.bfloat16, kv_data_type=None,
        variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a batch on the host: ``qo_indptr``, ``kv_indptr`` ``[B+1]`` in tokens.

        Raises:
          ValueError: invalid indptr, mask or options (message names the argument).
          NotImplementedError: the wrapper's named backend cannot serve the batch.
        """
        spec = batch_spec(
            qo_indptr, kv_indptr, None, None, num_qo_heads, num_kv_heads, head_dim, 1, custom_mask,
            q_data_type, kv_data_type, variant, causal=causal, window_left=window_left,
            logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, pos_encoding_mode=pos_encoding_mode,
            rope_scale=rope_scale, rope_theta=rope_theta,
        )
        return self._set_plan(spec)

    def run(self, q, k, v, *, return_lse: bool = False, k_scale=None, v_scale=None):
        """``q [nnz_q, Hq, D]``, ``k/v [nnz_kv, Hkv, D]`` -> ``o [nnz_q, Hq, D]`` (, ``lse``);
        ``k_scale``/``v_scale``: :data:`jaxinfer.wrapper.SCALES_DOC`."""
        spec, plan = self._require_plan()
        check_spec_run_args(spec, q, k, v, "NHD")
        return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)


def batch_prefill_paged(q, paged_kv_cache, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None):
    """Run a paged prefill plan inside jit: ``q [nnz_q, Hq, D]`` -> ``o`` (, ``lse``);
    ``k_scale``/``v_scale``: :data:`jaxinfer.wrapper.SCALES_DOC`."""
    return run_paged_plan(plan, q, paged_kv_cache, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)


def batch_prefill_ragged(q, k, v, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None):
    """Run a ragged prefill plan inside jit: ``q [nnz_q, Hq, D]``, ``k/v [nnz_kv, Hkv, D]``;
    ``k_scale``/``v_scale``: :data:`jaxinfer.wrapper.SCALES_DOC`."""
    return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)
