"""Prefill and append attention: ragged queries against paged or ragged KV (FlashInfer's API).

Append is prefill whose queries are the last ``qo_len`` of ``kv_len`` tokens: the bottom-right
aligned causal mask (query ``i`` of ``qo_len`` sees keys ``j <= kv_len - qo_len + i``) makes the
two one op. Signatures follow FlashInfer's ``flashinfer.prefill``: code written for FlashInfer runs
after changing imports and ``torch`` to ``jax.numpy``. Method: FlashAttention-2 tiling with online
softmax (Dao 2023) over a load-balanced work list (FlashInfer paper, arXiv 2501.01005, sec. 3).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.mask import resolve_custom_mask
from jaxinfer.plan.batch import PlanCapacity
from jaxinfer.variants import AttentionVariant, make_variant
from jaxinfer.wrapper import (
    BatchWrapper, Plan, batch_spec, check_run_extras, check_spec_run_args, fold_q_scale, pick_scales, plan_dtypes,
    run_paged_plan, run_plan, run_single, single_kv,
)


def prefill_head_dim(head_dim_qk, head_dim_vo, head_dim) -> int:
    """The one head_dim of FlashInfer's ``head_dim_qk``/``head_dim_vo`` (and the older ``head_dim``).

    Raises:
      ValueError: both ``head_dim_qk`` and ``head_dim`` given, neither, or ``head_dim_vo`` differing
        from it (jaxinfer has one head_dim for q, k and v).
    """
    if (head_dim_qk is None) == (head_dim is None):
        raise ValueError("pass head_dim_qk (FlashInfer's name, or head_dim, its older one), exactly one")
    d = head_dim_qk if head_dim is None else head_dim
    if head_dim_vo is not None and head_dim_vo != d:
        raise ValueError(f"head_dim_vo = {head_dim_vo} must equal head_dim_qk = {d} (one head_dim for q, k and v)")
    return d


def _mask_bits(qo_indptr, kv_indptr, kv_last_page_len=None, page_size: int = 1):
    """``() -> [B]`` bits of each request's ``[qo_len, kv_len]`` mask (paged when
    ``kv_last_page_len`` is given), for unpacking a ``packed_custom_mask``."""
    def lengths():
        qo = np.diff(np.asarray(qo_indptr, np.int64))
        kv = np.diff(np.asarray(kv_indptr, np.int64))
        if kv_last_page_len is not None:
            kv = np.where(kv > 0, (kv - 1) * page_size + np.asarray(kv_last_page_len, np.int64), 0)
        if qo.shape != kv.shape:
            raise ValueError(f"qo_indptr describes {qo.size} requests, the KV arguments {kv.size}")
        return qo * kv
    return lengths


def single_prefill_with_kv_cache(
    q, k, v, scale_q=None, scale_k=None, scale_v=None, o_dtype=None, custom_mask=None, packed_custom_mask=None,
    causal: bool = False, kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
    use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
    logits_soft_cap: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
    backend: str = "auto", return_lse: bool = False, *, variant: AttentionVariant | None = None,
    k_scale=None, v_scale=None, sinks=None, variant_params=None,
):
    """Prefill attention of one request (FlashInfer's ``single_prefill_with_kv_cache``).

    Example::

        import jax, jax.numpy as jnp, jaxinfer
        qo_len, kv_len, num_qo_heads, num_kv_heads, head_dim = 128, 256, 8, 2, 64
        q = jax.random.normal(jax.random.key(0), (qo_len, num_qo_heads, head_dim), jnp.float16)
        k = jax.random.normal(jax.random.key(1), (kv_len, num_kv_heads, head_dim), jnp.float16)
        v = jax.random.normal(jax.random.key(2), (kv_len, num_kv_heads, head_dim), jnp.float16)
        o = jaxinfer.single_prefill_with_kv_cache(q, k, v, causal=True)   # [128, 8, 64] float16

    Args:
      q: ``[Lq, Hq, D]`` (bf16, fp16 or float32).
      k, v: ``[Lk, Hkv, D]`` (NHD) or ``[Hkv, Lk, D]`` (HND), in q's dtype or fp8.
      scale_q, scale_k, scale_v: FlashInfer's names of the dequantization scales (``scale_q *
        scale_k`` multiplies the logits, ``scale_v`` the output); ``k_scale``/``v_scale`` are the
        same, by the decode API's names (give one of each pair).
      o_dtype: output dtype; ``None`` or q's dtype (anything else is a ``ValueError``).
      custom_mask: optional ``[Lq, Lk]`` bool (True keeps the key), a concrete host array.
      packed_custom_mask: the same mask packed as FlashInfer's ``packbits(custom_mask.reshape(-1),
        bitorder="little")`` (uint8, ``ceil(Lq * Lk / 8)`` bytes; :mod:`jaxinfer.mask`), instead
        of ``custom_mask``.
      causal: bottom-right aligned causal mask.
      use_fp16_qk_reduction: accepted and unused (logits are always reduced in float32).
      backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"``.
      Other options (``sinks``, ``variant_params`` included): as in
        :func:`jaxinfer.single_decode_with_kv_cache`.

    Returns:
      ``o [Lq, Hq, D]`` in q's dtype, or ``(o, lse [Lq, Hq] float32 base 2)``.

    Raises:
      ValueError: shapes or dtypes that disagree (``k`` neither q's dtype nor fp8), a mask of
        another shape, a bad option or scale.
      NotImplementedError: the named backend cannot serve the call.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [qo_len, num_qo_heads, head_dim], got shape {q.shape}")
    if packed_custom_mask is not None:
        custom_mask = resolve_custom_mask(custom_mask, packed_custom_mask,
                                          lambda: np.array([q.shape[0] * k.shape[0 if kv_layout == "NHD" else 1]]))
        custom_mask = custom_mask.reshape(q.shape[0], -1)
    if o_dtype is not None and np.dtype(o_dtype) != q.dtype:
        raise ValueError(f"o_dtype must be None or q's dtype {q.dtype}, got {o_dtype}; cast the output")
    k_scale, v_scale = pick_scales(scale_q, scale_k, scale_v, k_scale, v_scale)
    variant = make_variant(variant, causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap,
                           sm_scale=sm_scale, pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                           rope_theta=rope_theta)
    k, v = single_kv(k, v, kv_layout)
    return run_single(q, k, v, variant, backend, op="prefill", return_lse=return_lse, custom_mask=custom_mask,
                      k_scale=k_scale, v_scale=v_scale, variant_params=variant_params, sinks=sinks)


_INIT_ARGS_DOC = """
        Args:
          float_workspace_buffer: FlashInfer's scratch buffer: any array or ``None``, accepted and
            unused (XLA allocates kernel scratch itself).
          kv_layout: ``"NHD"`` or ``"HND"``.
          use_cuda_graph, *_buf, jit_args: FlashInfer's CUDA-graph buffers and JIT options;
            accepted and unused. A jitted step is already one captured program; for plans of one
            fixed shape (a step that never recompiles) pass ``capacity``.
          backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"``.
          capacity: static maxima of plans (:class:`~jaxinfer.plan.batch.PlanCapacity`).
          deterministic: batch invariance, FlashInfer's ``fixed_split_size``
            (:meth:`~jaxinfer.plan.batch.PlanCapacity.as_deterministic`).

        Raises:
          ValueError: a string as ``float_workspace_buffer`` (``kv_layout`` one position early),
            a bad ``kv_layout`` or ``backend``.
"""


class BatchPrefillWithPagedKVCacheWrapper(BatchWrapper):
    """Batch prefill/append of ragged queries over a paged KV cache (FlashInfer's wrapper).

    Request ``b`` has queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` and the pages
    ``paged_kv_indices[paged_kv_indptr[b]:paged_kv_indptr[b+1]]``; causal masking is bottom-right
    aligned (the queries are the last ``qo_len`` tokens of the request).

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_qo_heads, num_kv_heads, head_dim, page_size, max_num_pages = 8, 2, 64, 4, 16
        ws = jnp.zeros(128 * 1024 * 1024, jnp.uint8)
        wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        qo_indptr = jnp.array([0, 5, 12], jnp.int32)
        paged_kv_indptr = jnp.array([0, 3, 7], jnp.int32)
        paged_kv_indices = jnp.arange(7, dtype=jnp.int32)
        paged_kv_last_page_len = jnp.array([2, 4], jnp.int32)
        wrapper.plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                     num_qo_heads, num_kv_heads, head_dim, page_size, causal=True)
        q = jax.random.normal(jax.random.key(0), (12, num_qo_heads, head_dim), jnp.float16)
        kv_cache = jax.random.normal(jax.random.key(1), (max_num_pages, 2, page_size, num_kv_heads,
                                     head_dim), jnp.float16)
        o = wrapper.run(q, kv_cache)          # [12, num_qo_heads, head_dim] float16
    """

    def __init__(
        self, float_workspace_buffer=None, kv_layout: str = "NHD", use_cuda_graph: bool = False,
        qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None,
        custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto", jit_args=None, *,
        capacity: PlanCapacity | None = None, deterministic: bool = False,
    ):
        self._setup(float_workspace_buffer, kv_layout, backend, capacity, deterministic)

    __init__.__doc__ = "Make a wrapper (no device work).\n" + _INIT_ARGS_DOC

    def plan(
        self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
        num_kv_heads: int, head_dim_qk: int | None = None, page_size: int | None = None, head_dim_vo: int | None = None,
        custom_mask=None, packed_custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
        logits_soft_cap: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
        q_data_type=None, kv_data_type=None, non_blocking: bool = True, *, head_dim: int | None = None,
        variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a batch on the host (FlashInfer's positional order).

        Example: see the class docstring.

        Args:
          qo_indptr: ``[B+1]`` query row pointer (tokens); paged_kv_indptr ``[B+1]``,
            paged_kv_indices ``[nnz_pages]``, paged_kv_last_page_len ``[B]``: the page table.
            Host arrays (numpy/JAX/list), not traced.
          head_dim_qk: head_dim (``head_dim``, FlashInfer's older name, by keyword also works);
            head_dim_vo: ``None`` or the same value.
          custom_mask: flat bool, the concatenation of each request's row-major
            ``[qo_len, kv_len]`` mask (True keeps the key). packed_custom_mask: the same masks
            packed as FlashInfer's ``segment_packbits(custom_mask, qo_len * kv_len offsets,
            bitorder="little")`` (uint8; :mod:`jaxinfer.mask`), instead of ``custom_mask``.
          use_fp16_qk_reduction, non_blocking: accepted and unused.
          q_data_type, kv_data_type: dtypes ``run`` will receive; ``q_data_type=None`` (default):
            taken from ``q`` at the wrapper's ``run`` (the returned plan is then for bfloat16).
          Other options: as in :func:`jaxinfer.single_decode_with_kv_cache`.

        Returns:
          The plan pytree (also kept for ``run``), for :func:`batch_prefill_paged` inside jit.

        Raises:
          ValueError: invalid indptr, page table, mask or options (message names the argument).
          NotImplementedError: the wrapper's named backend cannot serve the batch.
        """
        for name, val in (("paged_kv_indices", paged_kv_indices), ("paged_kv_last_page_len", paged_kv_last_page_len)):
            if val is None:  # batch_spec would plan ragged KV: BatchPrefillWithRaggedKVCacheWrapper's job
                raise ValueError(f"{name} must be an array (the page table), got None")
        if page_size is None:
            raise ValueError("page_size is required (tokens per page of the cache)")
        custom_mask = resolve_custom_mask(custom_mask, packed_custom_mask, _mask_bits(
            qo_indptr, paged_kv_indptr, paged_kv_last_page_len, page_size))
        q_dtype, kv_dtype, infer = plan_dtypes(q_data_type, kv_data_type)
        spec = batch_spec(
            qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
            prefill_head_dim(head_dim_qk, head_dim_vo, head_dim), page_size, custom_mask, q_dtype, kv_dtype, variant,
            names={"kv_indptr": "paged_kv_indptr", "kv_indices": "paged_kv_indices",
                   "kv_last_page_len": "paged_kv_last_page_len"},
            causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
            pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        return self._set_plan(spec, infer)

    begin_forward = plan  # FlashInfer's pre-0.2 name

    def run(
        self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
        return_lse: bool = False, enable_pdl=None, window_left: int | None = None, sinks=None, variant_params=None,
    ):
        """Attention of ``q`` over ``paged_kv_cache`` with the last plan; jit-compatible.

        Args:
          q: ``[nnz_q, Hq, D]``, exactly ``qo_indptr[-1]`` rows (to pad rows, use
            :func:`batch_prefill_paged` with the plan).
          paged_kv_cache: ``[num_pages, 2, page_size, Hkv, D]`` (NHD) or ``(k_cache, v_cache)``.
          q_scale, k_scale, v_scale: as in :func:`jaxinfer.single_decode_with_kv_cache`.
          out, lse: anything but ``None`` is a ``ValueError`` (JAX arrays are immutable): use the
            return value. enable_pdl: unused. window_left: ``None`` or the plan's.
          return_lse: also return ``lse [nnz_q, Hq]`` float32 (base 2).
          sinks: ``[Hq]`` float32 attention-sink logits (natural log), or ``None``
            (:data:`jaxinfer.wrapper.SINKS_DOC`).
          variant_params: arrays of a ``takes_params`` variant's callables, or ``None``
            (:data:`jaxinfer.wrapper.VARIANT_PARAMS_DOC`).

        Returns:
          ``o [nnz_q, Hq, D]`` in q's dtype (, ``lse``).

        Raises:
          ValueError: ``run`` before ``plan``, arrays that disagree with the plan, ``out``/``lse``,
            bad ``sinks`` or ``variant_params``.
        """
        check_run_extras(args, out, lse)
        self._check_window(window_left)
        return self._run_paged(q, paged_kv_cache, return_lse, fold_q_scale(q_scale, k_scale), v_scale,
                               variant_params=variant_params, sinks=sinks)

    forward = run  # FlashInfer's pre-0.2 name


class BatchPrefillWithRaggedKVCacheWrapper(BatchWrapper):
    """Batch prefill of ragged queries over ragged (unpaged) KV (FlashInfer's wrapper).

    Request ``b`` has queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` and keys
    ``k[kv_indptr[b]:kv_indptr[b+1]]``.

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_qo_heads, num_kv_heads, head_dim = 8, 2, 64
        wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(jnp.zeros(1024, jnp.uint8), "NHD")
        qo_indptr = jnp.array([0, 3, 10], jnp.int32)
        kv_indptr = jnp.array([0, 5, 17], jnp.int32)
        wrapper.plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, causal=True)
        q = jax.random.normal(jax.random.key(0), (10, num_qo_heads, head_dim), jnp.float16)
        k = jax.random.normal(jax.random.key(1), (17, num_kv_heads, head_dim), jnp.float16)
        v = jax.random.normal(jax.random.key(2), (17, num_kv_heads, head_dim), jnp.float16)
        o = wrapper.run(q, k, v)              # [10, num_qo_heads, head_dim] float16
    """

    def __init__(
        self, float_workspace_buffer=None, kv_layout: str = "NHD", use_cuda_graph: bool = False,
        qo_indptr_buf=None, kv_indptr_buf=None, custom_mask_buf=None, mask_indptr_buf=None,
        backend: str = "auto", jit_args=None, *, capacity: PlanCapacity | None = None,
        deterministic: bool = False,
    ):
        self._setup(float_workspace_buffer, kv_layout, backend, capacity, deterministic)

    __init__.__doc__ = "Make a wrapper (no device work); ``k``/``v`` are always ``[nnz_kv, Hkv, D]``.\n" + _INIT_ARGS_DOC

    def plan(
        self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int | None = None,
        head_dim_vo: int | None = None, custom_mask=None, packed_custom_mask=None, causal: bool = False,
        pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
        logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
        rope_theta: float | None = None, q_data_type=None, kv_data_type=None, non_blocking: bool = True, *,
        head_dim: int | None = None, variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a batch on the host (FlashInfer's positional order).

        Example: see the class docstring.

        Args:
          qo_indptr, kv_indptr: ``[B+1]`` row pointers in tokens (host arrays).
          Other arguments: as in :meth:`BatchPrefillWithPagedKVCacheWrapper.plan`.

        Returns:
          The plan pytree (also kept for ``run``), for :func:`batch_prefill_ragged` inside jit.

        Raises:
          ValueError: invalid indptr, mask or options (message names the argument).
          NotImplementedError: the wrapper's named backend cannot serve the batch.
        """
        custom_mask = resolve_custom_mask(custom_mask, packed_custom_mask, _mask_bits(qo_indptr, kv_indptr))
        q_dtype, kv_dtype, infer = plan_dtypes(q_data_type, kv_data_type)
        spec = batch_spec(
            qo_indptr, kv_indptr, None, None, num_qo_heads, num_kv_heads,
            prefill_head_dim(head_dim_qk, head_dim_vo, head_dim), 1, custom_mask, q_dtype, kv_dtype, variant,
            causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
            pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        return self._set_plan(spec, infer)

    begin_forward = plan  # FlashInfer's pre-0.2 name

    def run(self, q, k, v, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
            return_lse: bool = False, enable_pdl=None, sinks=None, variant_params=None):
        """Attention of ``q`` over ragged ``k``/``v`` with the last plan; jit-compatible.

        Args:
          q: ``[nnz_q, Hq, D]``, exactly ``qo_indptr[-1]`` rows.
          k, v: ``[>= nnz_kv, Hkv, D]``, q's dtype or fp8; rows past ``kv_indptr[-1]`` (a
            preallocated buffer) are never read.
          q_scale, k_scale, v_scale: as in :func:`jaxinfer.single_decode_with_kv_cache`.
          out, lse: anything but ``None`` is a ``ValueError``: use the return value.
          return_lse: also return ``lse [nnz_q, Hq]`` float32 (base 2). enable_pdl: unused.
          sinks: ``[Hq]`` float32 attention-sink logits (natural log), or ``None``
            (:data:`jaxinfer.wrapper.SINKS_DOC`).
          variant_params: arrays of a ``takes_params`` variant's callables, or ``None``
            (:data:`jaxinfer.wrapper.VARIANT_PARAMS_DOC`).

        Returns:
          ``o [nnz_q, Hq, D]`` in q's dtype (, ``lse``).

        Raises:
          ValueError: ``run`` before ``plan``, arrays that disagree with the plan, ``out``/``lse``,
            bad ``sinks`` or ``variant_params``.
        """
        check_run_extras(args, out, lse)
        spec, plan = self._require_plan(q, k)
        check_spec_run_args(spec, q, k, v, "NHD")
        return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=fold_q_scale(q_scale, k_scale),
                        v_scale=v_scale, variant_params=variant_params, sinks=sinks)

    forward = run  # FlashInfer's pre-0.2 name


def batch_prefill_paged(q, paged_kv_cache, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None,
                        sinks=None, variant_params=None):
    """Run a paged prefill plan inside ``jax.jit``.

    Example::

        plan = wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, 8, 2, 64, 4, causal=True,
                            q_data_type=jnp.float16)
        o = jax.jit(jaxinfer.batch_prefill_paged)(q, kv_cache, plan)

    Args:
      q: ``[R, Hq, D]`` with ``R >= nnz_q``; rows past ``nnz_q`` are padding and come back as zeros.
      paged_kv_cache: the cache in the plan's layout.
      plan: from :meth:`BatchPrefillWithPagedKVCacheWrapper.plan`.
      k_scale, v_scale, sinks, variant_params: as in :func:`jaxinfer.single_decode_with_kv_cache`.

    Returns:
      ``o [R, Hq, D]`` (, ``lse [R, Hq]`` float32 base 2 with ``return_lse``).

    Raises:
      ValueError: at trace time, arrays whose shape or dtype disagrees with the plan.
    """
    return run_paged_plan(plan, q, paged_kv_cache, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                          variant_params=variant_params, sinks=sinks)


def batch_prefill_ragged(q, k, v, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None, sinks=None,
                         variant_params=None):
    """Run a ragged prefill plan inside ``jax.jit``.

    Example::

        plan = wrapper.plan(qo_indptr, kv_indptr, 8, 2, 64, causal=True, q_data_type=jnp.float16)
        o = jax.jit(jaxinfer.batch_prefill_ragged)(q, k, v, plan)

    Args:
      q: ``[R, Hq, D]`` with ``R >= nnz_q`` (rows past ``nnz_q`` come back as zeros).
      k, v: ``[>= nnz_kv, Hkv, D]``.
      plan: from :meth:`BatchPrefillWithRaggedKVCacheWrapper.plan`.
      k_scale, v_scale, sinks, variant_params: as in :func:`jaxinfer.single_decode_with_kv_cache`.

    Returns:
      ``o [R, Hq, D]`` (, ``lse [R, Hq]`` float32 base 2 with ``return_lse``).

    Raises:
      ValueError: at trace time, arrays whose shape or dtype disagrees with the plan.
    """
    return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                    variant_params=variant_params, sinks=sinks)
