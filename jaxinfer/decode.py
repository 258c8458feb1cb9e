"""Decode attention: one query token per request against its paged KV (FlashInfer's decode API).

Decode is batch prefill with ``qo_len = 1``: the same plan/kernel path, with GQA head-group
packing making the ``Hq / Hkv`` query heads of one KV head the rows of a tile (FlashInfer paper,
arXiv 2501.01005, sec. 3.2.1). Signatures follow FlashInfer's ``flashinfer.decode``: code written
for FlashInfer runs after changing imports and ``torch`` to ``jax.numpy``.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant, make_variant
from jaxinfer.wrapper import (
    BatchWrapper, Plan, as_host_int, check_run_extras, fold_q_scale, plan_dtypes, plan_variant,
    run_paged_plan, run_single, single_kv,
)


def single_decode_with_kv_cache(
    q, k, v, kv_layout: str = "NHD", pos_encoding_mode: str = "NONE", use_tensor_cores: bool = False,
    q_scale=None, k_scale=None, v_scale=None, window_left: int = -1, logits_soft_cap: float | None = None,
    sm_scale: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
    return_lse: bool = False, *, backend: str = "auto", variant: AttentionVariant | None = None, sinks=None,
    variant_params=None,
):
    """Decode attention of one request: ``softmax(q k^T * sm_scale) v`` over its ``L`` keys.

    FlashInfer's ``single_decode_with_kv_cache`` (same positional order); the method is
    FlashAttention's online softmax (Dao et al. 2022, sec. 3.1) with split-KV merging (FlashInfer
    paper, arXiv 2501.01005, sec. 2.2).

    Example::

        import jax, jax.numpy as jnp, jaxinfer
        q = jax.random.normal(jax.random.key(0), (32, 128), jnp.float16)        # [Hq, D]
        k = jax.random.normal(jax.random.key(1), (2048, 8, 128), jnp.float16)   # [L, Hkv, D]
        v = jax.random.normal(jax.random.key(2), (2048, 8, 128), jnp.float16)
        o = jaxinfer.single_decode_with_kv_cache(q, k, v)                       # [32, 128] float16

    Args:
      q: ``[Hq, D]`` query (bf16, fp16 or float32).
      k, v: ``[L, Hkv, D]`` (``"NHD"``) or ``[Hkv, L, D]`` (``"HND"``), equal dtypes: q's, or
        fp8 (``float8_e4m3fn``/``float8_e5m2``) with a bf16/fp16 q.
      kv_layout: ``"NHD"`` or ``"HND"``.
      pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` (RoPE applied inside attention, query at
        position ``L - 1``) or ``"ALIBI"``.
      use_tensor_cores: FlashInfer's kernel choice; accepted and unused (the backend picks).
      q_scale, k_scale, v_scale: dequantization scales, Python floats or float arrays of shape
        ``()`` (``k_scale``/``v_scale`` also ``[Hkv]``): the logits are multiplied by
        ``q_scale * k_scale`` and the output by ``v_scale``; a Python value must be finite and > 0.
      window_left: keys more than ``window_left`` positions left of the query are masked; -1: off.
      logits_soft_cap: ``cap * tanh(logits / cap)`` before softmax (Gemma 2); ``None``: off.
      sm_scale: logit scale; ``None`` means ``1 / sqrt(D)``.
      rope_scale, rope_theta: RoPE position scale and base (``None``: 1.0 and 1e4).
      return_lse: also return the log-sum-exp of the scaled logits.
      backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"`` (keyword only).
      variant: optional :class:`~jaxinfer.variants.AttentionVariant` with user callables;
        keyword options that differ from their defaults override its fields.
      sinks: ``[Hq]`` float32 attention-sink logits (natural log), or ``None``
        (:data:`jaxinfer.wrapper.SINKS_DOC`).
      variant_params: arrays of a ``takes_params`` variant's callables, or ``None``
        (:data:`jaxinfer.wrapper.VARIANT_PARAMS_DOC`).

    Returns:
      ``o [Hq, D]`` in q's dtype, or ``(o, lse)`` with ``lse [Hq]`` float32 in base 2
      (``log2 sum exp``, FlashInfer's convention). With no keys (``L = 0``): ``o = 0``,
      ``lse = -inf`` (``sinks / ln 2`` with sinks).

    Raises:
      ValueError: ``q`` not 2-D, ``k``/``v`` of different shapes, a head_dim or head count that
        disagrees, ``k`` of another dtype than ``q`` that is not fp8, a bad scale or option, bad
        ``sinks`` or ``variant_params``.
      NotImplementedError: the named backend cannot serve the call.
    """
    if q.ndim != 2:
        raise ValueError(f"q must be [num_qo_heads, head_dim], got shape {q.shape}")
    variant = make_variant(variant, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                           pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
    k, v = single_kv(k, v, kv_layout)
    out = run_single(q[None], k, v, variant, backend, op="decode", return_lse=return_lse,
                     k_scale=fold_q_scale(q_scale, k_scale), v_scale=v_scale, variant_params=variant_params,
                     sinks=sinks)
    return (out[0][0], out[1][0]) if return_lse else out[0]


@functools.lru_cache(maxsize=64)
def _one_query_each(n: int) -> np.ndarray:
    """``[n]`` int32 ``0..n-1``, read-only: the query row pointer of a decode batch of ``n - 1``
    requests, made once per batch size (BatchSpec.create copies it)."""
    indptr = np.arange(n, dtype=np.int32)
    indptr.flags.writeable = False
    return indptr


# FlashInfer's names of the decode page table, for the messages of BatchSpec.create.
_PAGE_TABLE_NAMES = {"kv_indptr": "indptr", "kv_indices": "indices", "kv_last_page_len": "last_page_len"}


class BatchDecodeWithPagedKVCacheWrapper(BatchWrapper):
    """Batch decode over a paged KV cache (FlashInfer's wrapper of the same name).

    ``plan`` once per batch composition on the host, then ``run`` per layer; ``run`` is
    jit-compatible, and :func:`batch_decode` runs the returned plan inside a jitted step.
    Request ``b`` owns pages ``indices[indptr[b]:indptr[b+1]]`` and holds
    ``page_size * (num_pages_b - 1) + last_page_len[b]`` tokens (PagedAttention, Kwon et al. 2023;
    FlashInfer paper, arXiv 2501.01005, sec. 3.1).

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_layers, num_qo_heads, num_kv_heads, head_dim, max_num_pages, page_size = 2, 8, 2, 64, 16, 4
        batch_size = 3
        ws = jnp.zeros(128 * 1024 * 1024, jnp.uint8)   # accepted and unused
        wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        kv_page_indptr = jnp.array([0, 5, 10, 15], jnp.int32)
        kv_page_indices = jnp.arange(15, dtype=jnp.int32)
        kv_last_page_len = jnp.array([4, 1, 3], jnp.int32)
        wrapper.plan(kv_page_indptr, kv_page_indices, kv_last_page_len, num_qo_heads, num_kv_heads,
                     head_dim, page_size, pos_encoding_mode="NONE", data_type=jnp.float16)
        q = jax.random.normal(jax.random.key(0), (batch_size, num_qo_heads, head_dim), jnp.float16)
        kv_cache = jax.random.normal(jax.random.key(1), (max_num_pages, 2, page_size, num_kv_heads,
                                     head_dim), jnp.float16)
        o = wrapper.run(q, kv_cache)                    # [batch_size, num_qo_heads, head_dim]
    """

    _op = "decode"

    def __init__(
        self, float_workspace_buffer=None, kv_layout: str = "NHD", use_cuda_graph: bool = False,
        use_tensor_cores: bool = False, paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
        paged_kv_last_page_len_buffer=None, backend: str = "auto", jit_args=None, *,
        capacity: PlanCapacity | None = None, deterministic: bool = False,
    ):
        """Make a wrapper (no device work).

        Args:
          float_workspace_buffer: FlashInfer's scratch buffer: any array or ``None``, accepted and
            unused (XLA allocates kernel scratch itself).
          kv_layout: ``"NHD"`` (cache ``[num_pages, 2, page_size, Hkv, D]``) or ``"HND"``
            (``[num_pages, 2, Hkv, page_size, D]``).
          use_cuda_graph, use_tensor_cores, jit_args, paged_kv_*_buffer: FlashInfer's CUDA-graph
            and kernel-choice options (``paged_kv_indptr_buffer``, ``paged_kv_indices_buffer``,
            ``paged_kv_last_page_len_buffer``); accepted and unused. A jitted step is already one captured program; for plans
            of one fixed shape (a step that never recompiles) pass ``capacity``.
          backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"``.
          capacity: static maxima of plans (:class:`~jaxinfer.plan.batch.PlanCapacity`); default:
            sizes rounded up to powers of two.
          deterministic: batch invariance, FlashInfer's ``fixed_split_size``
            (:meth:`~jaxinfer.plan.batch.PlanCapacity.as_deterministic`).

        Raises:
          ValueError: a string as ``float_workspace_buffer`` (``kv_layout`` one position early),
            a bad ``kv_layout`` or ``backend``.
        """
        self._setup(float_workspace_buffer, kv_layout, backend, capacity, deterministic)

    def plan(
        self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
        page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1,
        logits_soft_cap: float | None = None, q_data_type=None, kv_data_type=None, data_type=None,
        sm_scale: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
        non_blocking: bool = True, block_tables=None, seq_lens=None, *, variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a batch on the host (FlashInfer's positional order).

        Example: see the class docstring.

        Args:
          indptr: ``[B+1]`` int page row pointer; ``indices``: ``[indptr[-1]]`` int page ids;
            ``last_page_len``: ``[B]`` int tokens in each request's last page, in ``1..page_size``
            (0 only for a request with no pages). Host arrays (numpy/JAX/list), not traced.
          num_qo_heads, num_kv_heads, head_dim, page_size: geometry (``num_qo_heads`` a multiple of
            ``num_kv_heads``).
          pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta: as in
            :func:`single_decode_with_kv_cache` (query at position ``kv_len - 1``).
          q_data_type, kv_data_type: dtypes ``run`` will receive (strings or dtypes; kv defaults to
            q's; an fp8 cache goes with a bf16/fp16 q). ``q_data_type=None`` (default): taken from
            ``q`` at the wrapper's ``run`` (one re-plan per new dtype pair, kept until the next
            ``plan``); the returned plan is then for bfloat16.
          data_type: FlashInfer's deprecated name setting both dtypes.
          non_blocking: accepted and unused (plans are host work).
          block_tables, seq_lens: FlashInfer's TRT-LLM backend inputs; must be ``None``.
          variant: optional user :class:`~jaxinfer.variants.AttentionVariant` (keyword only).

        Returns:
          The plan pytree (also kept for ``run``), for :func:`batch_decode` inside ``jax.jit``.

        Raises:
          ValueError: an invalid page table or option; the message names the argument
            (``indptr``, ``indices``, ``last_page_len``, ...).
          NotImplementedError: the wrapper's named backend cannot serve the batch.
        """
        if block_tables is not None or seq_lens is not None:  # (the call alone costs 0.5 us a plan)
            check_run_extras((), block_tables=block_tables, seq_lens=seq_lens)
        q_dtype, kv_dtype, infer = plan_dtypes(q_data_type, kv_data_type, data_type)
        indptr = as_host_int("indptr", indptr)
        variant = plan_variant(variant, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                               pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
        spec = BatchSpec.create(
            # One query per request of indptr (not of last_page_len: its length is checked against indptr's).
            _one_query_each(max(np.size(indptr), 1)), indptr, as_host_int("indices", indices),
            as_host_int("last_page_len", last_page_len),
            page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            variant=variant, q_dtype=q_dtype, kv_dtype=kv_dtype, names=_PAGE_TABLE_NAMES,
        )
        return self._set_plan(spec, infer)

    begin_forward = plan  # FlashInfer's pre-0.2 name

    def run(
        self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
        return_lse: bool = False, enable_pdl=None, window_left: int | None = None, sinks=None,
        variant_params=None,
    ):
        """Decode ``q`` against ``paged_kv_cache`` with the last plan; jit-compatible.

        Args:
          q: ``[B, Hq, D]``, exactly the plan's ``B`` rows (to pad rows to a bucket, use
            :func:`batch_decode` with the plan), dtype ``q_data_type``.
          paged_kv_cache: ``[num_pages, 2, page_size, Hkv, D]`` (NHD; ``HND`` swaps page_size and
            Hkv) or a tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, Hkv, D]``.
          q_scale, k_scale, v_scale: as in :func:`single_decode_with_kv_cache`.
          out, lse: FlashInfer's preallocated outputs; anything but ``None`` is a ``ValueError``
            (JAX arrays are immutable): use the return value.
          return_lse: also return ``lse [B, Hq]`` float32 (base 2).
          enable_pdl: accepted and unused.
          window_left: must be ``None`` or the plan's (set it in ``plan``).
          sinks: ``[Hq]`` float32 attention-sink logits (natural log), or ``None``
            (:data:`jaxinfer.wrapper.SINKS_DOC`).
          variant_params: arrays of a ``takes_params`` variant's callables, or ``None``
            (:data:`jaxinfer.wrapper.VARIANT_PARAMS_DOC`).

        Returns:
          ``o [B, Hq, D]`` in q's dtype, or ``(o, lse)``.

        Raises:
          ValueError: ``run`` before ``plan``; ``q`` rows, heads, head_dim or dtype that disagree
            with the plan; a cache of another shape; ``out``/``lse`` given; bad ``sinks`` or
            ``variant_params``.
        """
        check_run_extras(args, out, lse)
        self._check_window(window_left)
        return self._run_paged(q, paged_kv_cache, return_lse, fold_q_scale(q_scale, k_scale), v_scale,
                               variant_params=variant_params, sinks=sinks)

    forward = run  # FlashInfer's pre-0.2 name


def batch_decode(q, paged_kv_cache, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None,
                 sinks=None, variant_params=None):
    """Run a decode plan inside ``jax.jit`` (no host work, the plan is an argument).

    Example::

        plan = wrapper.plan(indptr, indices, last_page_len, 8, 2, 64, 4, q_data_type=jnp.float16)
        step = jax.jit(jaxinfer.batch_decode)
        o = step(q, kv_cache, plan)          # o [B, Hq, D]

    Args:
      q: ``[R, Hq, D]`` with ``R >= B`` (the plan's requests); rows past ``B`` are padding and come
        back as zeros, so a serving step can pad to a fixed bucket. dtype: the plan's q_data_type.
      paged_kv_cache: the cache in the plan's layout (see
        :meth:`BatchDecodeWithPagedKVCacheWrapper.run`).
      plan: from :meth:`BatchDecodeWithPagedKVCacheWrapper.plan`.
      return_lse: also return ``lse [R, Hq]`` float32 (base 2).
      k_scale, v_scale: as in :func:`single_decode_with_kv_cache`.
      sinks: ``[Hq]`` float32 attention-sink logits (natural log), or ``None``
        (:data:`jaxinfer.wrapper.SINKS_DOC`).
      variant_params: arrays of a ``takes_params`` variant's callables, or ``None``
        (:data:`jaxinfer.wrapper.VARIANT_PARAMS_DOC`).

    Returns:
      ``o [R, Hq, D]`` (, ``lse``).

    Raises:
      ValueError: at trace time, an array whose shape or dtype disagrees with the plan, fewer
        rows than the plan (checked by the wrapper's ``run`` only), or a bad scale.
    """
    return run_paged_plan(plan, q, paged_kv_cache, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                          variant_params=variant_params, sinks=sinks)
