"""Multi-head latent attention (MLA) over paged latent caches: FlashInfer's ``flashinfer.mla`` API.

DeepSeek-V2/V3 (arXiv 2405.04434, sec. 2.1) cache per token a compressed latent ``ckv [Dc]``
(``kv_lora_rank``, 512) and a decoupled RoPE key ``kpe [Dp]`` (64) shared by all heads. With the
weight absorption trick (ibid., appendix C; ``W_UK`` folded into the query, ``W_UV`` into the
output projection) attention reads the latent directly:

    logits[t, h, j] = (q_nope[t, h] . ckv[j] + q_pe[t, h] . kpe[j]) * sm_scale
    o[t, h] = sum_j softmax_j(logits[t, h]) ckv[j]                       -> [nnz_q, H, Dc]

i.e. attention with head_dim ``Dc + Dp`` for ``q . k`` and ``Dc`` for the output, ``H`` query
heads over one latent KV head. ``sm_scale`` is the pre-absorption ``1 / sqrt(qk_nope_head_dim +
qk_rope_head_dim)`` (DeepSeek-V3: ``1/sqrt(192)``), which is why FlashInfer requires it.

The caches are paged: ``ckv_cache [num_pages, page_size, Dc]``, ``kpe_cache [num_pages,
page_size, Dp]``; request ``b`` owns pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` and holds
``kv_len_arr[b]`` tokens (FlashInfer's MLA page table: lengths instead of ``last_page_len``).
Decode (one query per request), prefill and append (``qo_len <= kv_len``, causal aligned
bottom-right) are one plan/run path, on the planner and split-KV merge of every other op
(:mod:`jaxinfer.backends.pallas.mla`), whose tiles run on the Pallas kernel (``"pallas"``) or on
the sm90a CUDA kernel (``"fa3"``, ``jaxinfer/csrc/mla/``); ``"xla"`` is the float32 reference.

:func:`append_paged_mla_kv_cache` writes new tokens' ``ckv``/``kpe`` into the caches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.backends import BackendUnsupportedError, device
from jaxinfer.backends.ffi import ops as ffi_ops
from jaxinfer.backends.pallas import mla as pallas_mla
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.xla import RefPlan, plan_reference
from jaxinfer.fp8 import quantize
from jaxinfer.page import _page_and_slot, check_append_index_args, check_append_rows_dtype
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.plan.checks import check_indptr, check_int
from jaxinfer.variants import LOG2E, AttentionVariant
from jaxinfer.wrapper import as_host_int, check_run_extras, check_workspace

MLA_BACKENDS = ("auto", "fa3", "pallas", "xla")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLAPlan:
    """An MLA plan: the backend's plan pytree (``inner``) and the static facts :func:`batch_mla`
    checks its arrays against at trace time (dtypes by name)."""

    inner: Any
    backend: str = dataclasses.field(metadata=dict(static=True))
    page_size: int = dataclasses.field(metadata=dict(static=True))
    num_heads: int = dataclasses.field(metadata=dict(static=True))
    head_dim_ckv: int = dataclasses.field(metadata=dict(static=True))
    head_dim_kpe: int = dataclasses.field(metadata=dict(static=True))
    q_dtype: str = dataclasses.field(metadata=dict(static=True))
    kv_dtype: str = dataclasses.field(metadata=dict(static=True))


MLAPlan.__init__.__doc__ = """Build a plan from its fields; users get plans from
    :meth:`BatchMLAPagedAttentionWrapper.plan` instead.

    Example::

        plan = wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, 128, 512, 64, 1, False, 1 / 192**0.5,
                            jnp.bfloat16, jnp.bfloat16)
        o = jax.jit(jaxinfer.batch_mla)(q_nope, q_pe, ckv_cache, kpe_cache, plan)
    """


def _last_page_len(kv_indptr: np.ndarray, kv_len_arr, page_size: int) -> np.ndarray:
    """``kv_last_page_len`` of FlashInfer's MLA page table (lengths per request).

    Raises:
      ValueError: ``kv_len_arr`` is not ``[B]`` non-negative integers, or a request's pages are
        not ``ceil(kv_len / page_size)``.
    """
    kv_len = as_host_int("kv_len_arr", kv_len_arr)
    batch = kv_indptr.size - 1
    if kv_len.shape != (batch,) or not np.issubdtype(kv_len.dtype, np.integer):
        raise ValueError(f"kv_len_arr must be [batch_size = {batch}] integers (kv_indptr has {batch + 1} entries), "
                         f"got {kv_len.dtype}{kv_len.shape}")
    kv_len = kv_len.astype(np.int64)
    if (kv_len < 0).any():
        raise ValueError(f"kv_len_arr must be >= 0, got {int(kv_len.min())}")
    pages = np.diff(kv_indptr.astype(np.int64))
    need = -(-kv_len // page_size)
    bad = np.flatnonzero(pages != need)
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"kv_len_arr[{b}] = {kv_len[b]} tokens need ceil(kv_len / page_size = {page_size}) = "
                         f"{need[b]} pages, but kv_indptr gives request {b} {pages[b]}")
    return np.where(pages > 0, kv_len - (pages - 1) * page_size, 0)


def _resolve_backend(name: str, head_dim_ckv: int, head_dim_kpe: int, q_dtype, kv_dtype) -> str:
    """The backend that runs a plan: ``"auto"`` is the first of ``"fa3"`` (the sm90a CUDA kernel),
    ``"pallas"`` (on a GPU) and ``"xla"`` that serves the call.

    Raises:
      BackendUnsupportedError: ``"fa3"`` or ``"pallas"`` named for dims, dtypes or a device it
        cannot serve (the message says why).
    """
    reasons = {"fa3": lambda: ffi_ops.mla_unsupported(head_dim_ckv, head_dim_kpe, q_dtype, kv_dtype),
               "pallas": lambda: pallas_mla.unsupported(head_dim_ckv, head_dim_kpe, q_dtype, kv_dtype),
               "xla": lambda: None}
    if name == "auto":
        on_gpu = device.platform() == "gpu"
        return next(n for n in ("fa3", "pallas", "xla") if (on_gpu or n == "xla") and reasons[n]() is None)
    reason = reasons[name]()
    if reason is not None:
        raise BackendUnsupportedError(f"backend {name!r} cannot serve this MLA batch: {reason}")
    return name


class BatchMLAPagedAttentionWrapper:
    """Batch MLA over paged latent caches (FlashInfer's wrapper of the same name; module docstring).

    ``plan`` once per batch composition on the host, then ``run`` per layer; ``run`` is
    jit-compatible, and :func:`batch_mla` runs the returned plan inside a jitted step.

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_local_heads, batch_size, head_dim_ckv, head_dim_kpe, page_size = 128, 114, 512, 64, 1
        mla_wrapper = jaxinfer.BatchMLAPagedAttentionWrapper(jnp.empty(128 * 1024 * 1024, jnp.int8))
        q_indptr = jnp.arange(0, batch_size + 1, dtype=jnp.int32)       # decode: one query each
        kv_lens = jnp.full((batch_size,), 999, jnp.int32)
        kv_indptr = jnp.arange(0, batch_size + 1, dtype=jnp.int32) * 999
        kv_indices = jnp.arange(0, batch_size * 999, dtype=jnp.int32)
        q_nope = jax.random.normal(jax.random.key(0), (batch_size, num_local_heads, head_dim_ckv), jnp.bfloat16)
        q_pe = jnp.zeros((batch_size, num_local_heads, head_dim_kpe), jnp.bfloat16)
        ckv = jax.random.normal(jax.random.key(1), (batch_size * 999, 1, head_dim_ckv), jnp.bfloat16)
        kpe = jnp.zeros((batch_size * 999, 1, head_dim_kpe), jnp.bfloat16)
        sm_scale = 1.0 / ((128 + 64) ** 0.5)   # the head dimension before matrix absorption
        mla_wrapper.plan(q_indptr, kv_indptr, kv_indices, kv_lens, num_local_heads, head_dim_ckv,
                         head_dim_kpe, page_size, False, sm_scale, q_nope.dtype, ckv.dtype)
        o = mla_wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=False)   # [114, 128, 512]
    """

    def __init__(self, float_workspace_buffer=None, use_cuda_graph: bool = False, qo_indptr=None, kv_indptr=None,
                 kv_indices=None, kv_len_arr=None, backend: str = "auto", *, capacity: PlanCapacity | None = None,
                 pallas: PallasBackend | None = None):
        """Make a wrapper (no device work).

        Args:
          float_workspace_buffer: FlashInfer's scratch buffer: any array or ``None``, accepted and
            unused (XLA allocates kernel scratch itself).
          use_cuda_graph, qo_indptr, kv_indptr, kv_indices, kv_len_arr: FlashInfer's CUDA-graph
            flag and buffers; accepted and unused (a jitted step is one captured program; for
            plans of one fixed shape pass ``capacity``).
          backend: ``"auto"`` (``"fa3"`` where it serves the plan, else ``"pallas"`` on a GPU, else
            ``"xla"``), ``"fa3"`` (jaxinfer's sm90a CUDA kernel, FlashInfer's name for its Hopper
            MLA kernel: H100/H200, Dc = 512, Dp = 64, a 16-bit cache), ``"pallas"`` or ``"xla"``.
            FlashInfer's ``"fa2"`` and ``"cutlass"`` name CUDA kernels jaxinfer does not have for
            MLA: ``NotImplementedError``.
          capacity: static maxima of plans (:class:`~jaxinfer.plan.batch.PlanCapacity`).
          pallas: the Pallas backend's grid, split-KV and tile settings
            (:class:`~jaxinfer.backends.pallas.backend.PallasBackend`; its ``config`` is the MLA
            tile, default :data:`jaxinfer.backends.pallas.mla.DEFAULT_CONFIG`); ``"fa3"`` plans
            with the same planner and settings (its tiles are 64 rows: ``block_m`` 64).

        Raises:
          ValueError: a string as ``float_workspace_buffer``, or an unknown ``backend``.
          NotImplementedError: ``backend`` is ``"fa2"`` or ``"cutlass"``.
        """
        check_workspace(float_workspace_buffer)
        if backend in ("fa2", "cutlass"):
            raise BackendUnsupportedError(f"backend {backend!r} has no MLA kernel in jaxinfer; use 'fa3', "
                                          "'pallas', 'xla' or 'auto'")
        if backend not in MLA_BACKENDS:
            raise ValueError(f"backend must be one of {MLA_BACKENDS}, got {backend!r}")
        self._backend = backend
        self._capacity = capacity or PlanCapacity()
        self._pallas = pallas or PallasBackend()
        self._planned: tuple[BatchSpec, MLAPlan] | None = None

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_heads: int, head_dim_ckv: int,
             head_dim_kpe: int, page_size: int, causal: bool, sm_scale: float, q_data_type=jnp.bfloat16,
             kv_data_type=None, use_profiler: bool = False) -> MLAPlan:
        """Plan a batch on the host (FlashInfer's positional order).

        Args:
          qo_indptr: ``[B+1]`` query row pointer (decode: ``arange(B+1)``).
          kv_indptr: ``[B+1]`` page row pointer; kv_indices: ``[>= kv_indptr[-1]]`` page ids.
          kv_len_arr: ``[B]`` tokens per request; request ``b`` must own exactly
            ``ceil(kv_len_arr[b] / page_size)`` pages. Host arrays (numpy/JAX/list).
          num_heads: query heads ``H``.
          head_dim_ckv, head_dim_kpe: ``Dc`` (``kv_lora_rank``) and ``Dp`` (``qk_rope_head_dim``).
          page_size: tokens per page.
          causal: causal mask, bottom-right aligned (query ``i`` of a request sees keys
            ``j <= i + kv_len - qo_len``); decode rows see every key either way.
          sm_scale: logits scale (> 0), usually ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.
          q_data_type, kv_data_type: dtypes ``run`` will receive (kv defaults to q's; an fp8
            latent cache goes with bf16/fp16 queries).
          use_profiler: FlashInfer's kernel profiler; must be ``False``.

        Returns:
          The plan pytree (also kept for ``run``), for :func:`batch_mla` inside ``jax.jit``.

        Raises:
          ValueError: an invalid page table, ``kv_len_arr`` that disagrees with it, a bad
            geometry, ``sm_scale`` or ``use_profiler``; the message names the argument.
          NotImplementedError: ``backend="fa3"`` or ``"pallas"`` for dims, dtypes or a device it
            cannot serve.
        """
        if use_profiler:
            raise ValueError("use_profiler=True is not supported by jaxinfer (no intra-kernel profiler)")
        num_heads = check_int("num_heads", num_heads, minimum=1)
        head_dim_ckv = check_int("head_dim_ckv", head_dim_ckv, minimum=1)
        head_dim_kpe = check_int("head_dim_kpe", head_dim_kpe, minimum=1)
        page_size = check_int("page_size", page_size, minimum=1)
        if not isinstance(causal, (bool, np.bool_)):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        q_dtype = jnp.dtype(q_data_type)
        kv_dtype = jnp.dtype(kv_data_type if kv_data_type is not None else q_dtype)
        backend = _resolve_backend(self._backend, head_dim_ckv, head_dim_kpe, q_dtype, kv_dtype)
        cfg = self._pallas.config or pallas_mla.DEFAULT_CONFIG
        group = pallas_mla.head_group(num_heads, cfg.block_m) if backend != "xla" else num_heads
        kv_indptr = check_indptr("kv_indptr", as_host_int("kv_indptr", kv_indptr))
        last = _last_page_len(kv_indptr, kv_len_arr, page_size)
        spec = BatchSpec.create(
            as_host_int("qo_indptr", qo_indptr), kv_indptr, as_host_int("kv_indices", kv_indices), last,
            page_size=page_size, num_qo_heads=num_heads, num_kv_heads=num_heads // group, head_dim=head_dim_ckv,
            variant=AttentionVariant(causal=bool(causal), sm_scale=sm_scale), q_dtype=q_dtype, kv_dtype=kv_dtype,
            names={"kv_last_page_len": "kv_len_arr"},
        )
        if backend != "xla":
            inner = pallas_mla.plan(spec, self._capacity, self._pallas, head_dim_kpe=head_dim_kpe, kernel=backend)
        else:
            inner = plan_reference(spec, self._capacity)
        plan = MLAPlan(inner=inner, backend=backend, page_size=page_size, num_heads=num_heads,
                       head_dim_ckv=head_dim_ckv, head_dim_kpe=head_dim_kpe, q_dtype=q_dtype.name,
                       kv_dtype=kv_dtype.name)
        self._planned = (spec, plan)  # one assignment: run() never sees a mixed pair
        return plan

    @property
    def backend(self) -> str | None:
        """The backend the last plan resolved to (``None`` before ``plan``)."""
        return None if self._planned is None else self._planned[1].backend

    def run(self, q_nope, q_pe, ckv_cache, kpe_cache, out=None, lse=None, return_lse: bool = False,
            profiler_buffer=None, kv_len=None, page_table=None, return_lse_base_on_e: bool = False):
        """MLA of ``q_nope``/``q_pe`` over the latent caches with the last plan; jit-compatible.

        Args:
          q_nope: ``[nnz_q, H, Dc]`` absorbed no-RoPE query (exactly the plan's ``nnz_q`` rows);
            q_pe: ``[nnz_q, H, Dp]`` RoPE part; dtype ``q_data_type``.
          ckv_cache: ``[num_pages, page_size, Dc]``; kpe_cache: ``[num_pages, page_size, Dp]``;
            dtype ``kv_data_type``.
          out, lse: FlashInfer's preallocated outputs; anything but ``None`` is a ``ValueError``.
          return_lse: also return ``lse [nnz_q, H]`` float32, base 2 (FlashInfer's default).
          profiler_buffer, kv_len, page_table: FlashInfer's profiler and cutlass-backend inputs;
            must be ``None``.
          return_lse_base_on_e: the lse in natural-log units instead of base 2.

        Returns:
          ``o [nnz_q, H, Dc]`` in q's dtype, or ``(o, lse)``. A row with no visible key (an
          empty request, or a causal row before the first key) gives ``o = 0``, ``lse = -inf``.

        Raises:
          ValueError: ``run`` before ``plan``; an array whose shape or dtype disagrees with the
            plan (the message names it); page ids of the plan outside the caches; ``out``/``lse``
            or an unsupported option given.
        """
        check_run_extras((), out, lse, profiler_buffer=profiler_buffer, kv_len=kv_len, page_table=page_table)
        if self._planned is None:
            raise ValueError("BatchMLAPagedAttentionWrapper.run called before plan")
        spec, plan = self._planned
        nnz_q = int(spec.qo_indptr[-1])
        if q_nope.ndim == 3 and q_nope.shape[0] != nnz_q:
            raise ValueError(f"q_nope has {q_nope.shape[0]} rows but the plan has nnz_q = {nnz_q} queries "
                             f"(qo_indptr[-1]); to pad rows to a bucket use jaxinfer.batch_mla with the plan")
        used = spec.kv_indices[: spec.kv_indptr[-1]]
        if used.size and ckv_cache.ndim == 3 and used.max() >= ckv_cache.shape[0]:
            raise ValueError(f"kv_indices must be < num_pages = {ckv_cache.shape[0]} (pages in ckv_cache), "
                             f"got {used.max()}")
        result = batch_mla(q_nope, q_pe, ckv_cache, kpe_cache, plan, return_lse=return_lse)
        if return_lse and return_lse_base_on_e:
            return result[0], result[1] * np.float32(np.log(2.0))
        return result


def _check_run(q_nope, q_pe, ckv_cache, kpe_cache, plan: MLAPlan) -> None:
    """Trace-time shape and dtype checks of :func:`batch_mla`'s arrays against the plan."""
    h, dc, dp, ps = plan.num_heads, plan.head_dim_ckv, plan.head_dim_kpe, plan.page_size
    if q_nope.ndim != 3 or tuple(q_nope.shape[1:]) != (h, dc):
        raise ValueError(f"q_nope must be [nnz_q, num_heads = {h}, head_dim_ckv = {dc}], got {tuple(q_nope.shape)}")
    if q_pe.ndim != 3 or tuple(q_pe.shape) != (q_nope.shape[0], h, dp):
        raise ValueError(f"q_pe must be [nnz_q = {q_nope.shape[0]}, num_heads = {h}, head_dim_kpe = {dp}] "
                         f"(q_nope's rows), got {tuple(q_pe.shape)}")
    if ckv_cache.ndim != 3 or tuple(ckv_cache.shape[1:]) != (ps, dc):
        raise ValueError(f"ckv_cache must be [num_pages, page_size = {ps}, head_dim_ckv = {dc}], "
                         f"got {tuple(ckv_cache.shape)}")
    if kpe_cache.ndim != 3 or tuple(kpe_cache.shape) != (ckv_cache.shape[0], ps, dp):
        raise ValueError(f"kpe_cache must be [num_pages = {ckv_cache.shape[0]} (ckv_cache's), page_size = {ps}, "
                         f"head_dim_kpe = {dp}], got {tuple(kpe_cache.shape)}")
    for name, x, want in (("q_nope", q_nope, plan.q_dtype), ("q_pe", q_pe, plan.q_dtype),
                          ("ckv_cache", ckv_cache, plan.kv_dtype), ("kpe_cache", kpe_cache, plan.kv_dtype)):
        if x.dtype != jnp.dtype(want):
            kind = "q_data_type" if name.startswith("q") else "kv_data_type"
            raise ValueError(f"{name} has dtype {x.dtype} but the plan was made for {kind} {want}")


@functools.partial(jax.jit, static_argnames="return_lse")
def batch_mla(q_nope, q_pe, ckv_cache, kpe_cache, plan: MLAPlan, *, return_lse: bool = False):
    """Run an MLA plan inside ``jax.jit`` (no host work, the plan is an argument).

    Example::

        plan = wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, 16, 512, 64, 64, True, 1 / 192**0.5)
        step = jax.jit(jaxinfer.batch_mla)
        o = step(q_nope, q_pe, ckv_cache, kpe_cache, plan)        # o [R, H, 512]

    Args:
      q_nope: ``[R, H, Dc]`` with ``R >= nnz_q`` (the plan's queries); rows past ``nnz_q`` are
        padding and come back as zeros (lse ``-inf``). q_pe: ``[R, H, Dp]``.
      ckv_cache, kpe_cache: ``[num_pages, page_size, Dc]`` and ``[num_pages, page_size, Dp]``.
        Page ids outside the caches are clamped (never read out of bounds); the wrapper's
        ``run`` checks them on the host.
      plan: from :meth:`BatchMLAPagedAttentionWrapper.plan`.
      return_lse: also return ``lse [R, H]`` float32, base 2.

    Returns:
      ``o [R, H, Dc]`` in q's dtype (, ``lse``).

    Raises:
      ValueError: at trace time, an array whose shape or dtype disagrees with the plan.
    """
    _check_run(q_nope, q_pe, ckv_cache, kpe_cache, plan)
    if q_nope.shape[0] == 0:
        o, lse = jnp.zeros(q_nope.shape, q_nope.dtype), jnp.zeros(q_nope.shape[:2], jnp.float32)
    else:
        if ckv_cache.shape[0] == 0:
            # No pages at all: one page to gather from (nothing is visible: o = 0, lse = -inf).
            ckv_cache = jnp.zeros((1, *ckv_cache.shape[1:]), ckv_cache.dtype)
            kpe_cache = jnp.zeros((1, *kpe_cache.shape[1:]), kpe_cache.dtype)
        run = pallas_mla.run if plan.backend != "xla" else mla_reference
        o, lse = run(plan.inner, q_nope, q_pe, ckv_cache, kpe_cache)
    return (o, lse) if return_lse else o


def mla_reference(plan: RefPlan, q_nope, q_pe, ckv_cache, kpe_cache):
    """The ``"xla"`` MLA: the batch padded to ``[B, L, ...]`` by the reference plan's index
    arrays, float32 math (HIGHEST precision dots), any page size.

    A key a row does not see contributes nothing to it even when it holds inf or NaN; a row that
    sees a non-finite ``ckv`` gets NaN (only that row).

    Returns:
      ``(o [nnz_q, H, Dc] q.dtype, lse [nnz_q, H] float32 base 2)``; rows past the plan's
      queries are ``(0, -inf)``.
    """
    hi = jax.lax.Precision.HIGHEST
    qn = q_nope[plan.q_rows].astype(jnp.float32)  # [B, Lq, H, Dc]
    qp = q_pe[plan.q_rows].astype(jnp.float32)
    ckv = ckv_cache[plan.kv_page, plan.kv_slot].astype(jnp.float32)  # [B, Lk, Dc]
    kpe = kpe_cache[plan.kv_page, plan.kv_slot].astype(jnp.float32)
    s = jnp.einsum("bqhd,bkd->bhqk", qn, ckv, precision=hi) + jnp.einsum("bqhd,bkd->bhqk", qp, kpe, precision=hi)
    s = s * plan.variant.sm_scale
    lq, lk = qn.shape[1], ckv.shape[1]
    q_pos = jnp.arange(lq)[None, :] + (plan.kv_lens - plan.qo_lens)[:, None]  # [B, Lq]
    kv_pos = jnp.arange(lk)
    visible = (kv_pos[None, None, None, :] < plan.kv_lens[:, None, None, None])
    if plan.variant.causal:
        visible = visible & (kv_pos[None, None, None, :] <= q_pos[:, None, :, None])
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1)  # [B, H, Lq]
    finite = jnp.isfinite(ckv)
    o = jnp.einsum("bhqk,bkd->bqhd", p, jnp.where(finite, ckv, 0.0), precision=hi)
    sees_bad = jnp.any(visible & ~jnp.all(finite, axis=-1)[:, None, None, :], axis=-1)  # [B, H or 1, Lq]
    o = jnp.where(jnp.swapaxes(sees_bad, 1, 2)[..., None], jnp.nan, o)
    seen = denom > 0
    o = o * jnp.swapaxes(jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0), 1, 2)[..., None]
    lse = jnp.where(seen, (m[..., 0] + jnp.log(jnp.where(seen, denom, 1.0))) * LOG2E, -jnp.inf)
    lse = jnp.swapaxes(lse, 1, 2)  # [B, Lq, H]
    # Token t of the ragged q is query t - qo_indptr[b] of request b.
    t = jnp.arange(q_nope.shape[0])
    b = jnp.clip(jnp.searchsorted(plan.qo_indptr, t, side="right") - 1, 0, plan.qo_lens.shape[0] - 1)
    i = jnp.clip(t - plan.qo_indptr[b], 0, lq - 1)
    valid = (t < plan.qo_indptr[-1])[:, None]
    return (jnp.where(valid[..., None], o[b, i], 0.0).astype(q_nope.dtype),
            jnp.where(valid, lse[b, i], -jnp.inf))


def append_paged_mla_kv_cache(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices,
                              kv_indptr, kv_last_page_len):
    """Write appended latents into paged MLA caches (FlashInfer's ``append_paged_mla_kv_cache``).

    Row ``i`` goes to page ``kv_indices[kv_indptr[b] + positions[i] // page_size]``, slot
    ``positions[i] % page_size``, with ``b = batch_indices[i]``; the page table describes the
    caches *after* the append. Rows that are padding or invalid write nothing, by the rules of
    :func:`jaxinfer.append_paged_kv_cache` (a batch index outside ``[0, B)``, a negative
    position, a page not the request's own, a slot past ``kv_last_page_len`` in the last page,
    a page id outside the caches). Into an fp8 cache the rows (any float dtype) are saturated to
    its finite range and rounded to nearest even; otherwise they must have the cache's dtype.

    RETURNS ``(ckv_cache, kpe_cache)`` updated; the arguments are not modified (JAX arrays are
    immutable): write ``ckv_cache, kpe_cache = append_paged_mla_kv_cache(...)``. One scatter per
    cache, so donating the caches under ``jax.jit`` updates them in place.

    Example::

        seq_lens = jaxinfer.get_seq_lens(kv_indptr, kv_last_page_len, page_size)
        batch_indices, positions = jaxinfer.get_batch_indices_positions(append_indptr, seq_lens, nnz)
        ckv_cache, kpe_cache = jaxinfer.append_paged_mla_kv_cache(
            ckv, kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr, kv_last_page_len)

    Args:
      append_ckv: ``[nnz, Dc]``; append_kpe: ``[nnz, Dp]``, the same dtype.
      batch_indices, positions: ``[nnz]`` integers (:func:`jaxinfer.get_batch_indices_positions`).
      ckv_cache: ``[num_pages, page_size, Dc]``; kpe_cache: ``[num_pages, page_size, Dp]``, one dtype.
      kv_indices: ``[nnz_pages]``; kv_indptr: ``[B+1]``; kv_last_page_len: ``[B]`` integers.

    Returns:
      ``(ckv_cache, kpe_cache)`` of the input shapes and dtype.

    Raises:
      ValueError: at trace time, naming the argument whose rank, shape or dtype is wrong.
    """
    return _append(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr,
                   kv_last_page_len)


@jax.jit
def _append(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr,
            kv_last_page_len):
    _check_append(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr,
                  kv_last_page_len)
    if kv_indices.shape[0] == 0 or kv_last_page_len.shape[0] == 0:
        return ckv_cache, kpe_cache  # no page to write to
    page, slot = _page_and_slot(batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len,
                                ckv_cache.shape[1], ckv_cache.shape[0])

    def write(cache, rows):
        if rows.dtype != cache.dtype:
            rows = quantize(rows, None, cache.dtype)
        return cache.at[page, slot].set(rows, mode="drop")

    return write(ckv_cache, append_ckv), write(kpe_cache, append_kpe)


def _check_append(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr,
                  kv_last_page_len) -> None:
    """Trace-time checks of :func:`append_paged_mla_kv_cache`'s arguments."""
    if ckv_cache.ndim != 3 or kpe_cache.ndim != 3 or kpe_cache.shape[:2] != ckv_cache.shape[:2]:
        raise ValueError(f"ckv_cache and kpe_cache must be [num_pages, page_size, Dc] and [num_pages, page_size, "
                         f"Dp] of one num_pages and page_size, got {ckv_cache.shape} and {kpe_cache.shape}")
    if kpe_cache.dtype != ckv_cache.dtype:
        raise ValueError(f"kpe_cache has dtype {kpe_cache.dtype} but ckv_cache has {ckv_cache.dtype}")
    nnz = append_ckv.shape[0] if append_ckv.ndim == 2 else None
    for name, x, cache in (("append_ckv", append_ckv, ckv_cache), ("append_kpe", append_kpe, kpe_cache)):
        if x.ndim != 2 or x.shape[1] != cache.shape[2] or x.shape[0] != nnz:
            raise ValueError(f"{name} must be [nnz, {cache.shape[2]}] to match the cache (nnz = append_ckv's rows), "
                             f"got {tuple(x.shape)}")
        check_append_rows_dtype(name, x, cache.dtype)
    check_append_index_args(nnz, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len)
