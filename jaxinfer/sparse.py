"""Block-sparse and vector-sparse attention over a BSR mask (FlashInfer paper, sec. 3.1).

A BSR matrix with blocks ``(R, C)`` over ``[M, N]`` (rows = queries, columns = keys) is a paged
KV cache whose pages are the ``C``-column blocks of ``k``/``v``: block row ``r`` is a request with
``R`` queries and pages ``indices[indptr[r]:indptr[r+1]]`` of size ``C``. ``C = 1`` is
vector-sparse attention. Causality and per-element masks are in matrix coordinates, so they reach
the kernel as the batch's custom mask; positions inside a block row are compact, which is why
RoPE and ALiBi (defined by absolute positions) are not offered here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.plan.checks import check_indptr, check_int
from jaxinfer.variants import AttentionVariant, make_variant
from jaxinfer.wrapper import (
    BatchWrapper, Plan, as_host_int, check_run_extras, check_spec_run_args, pick_scales, plan_dtypes, run_plan,
)


def dense_to_bsr(mask: np.ndarray, R: int, C: int):
    """BSR of a dense bool mask ``[M, N]`` (``N % C == 0``).

    Example::

        indptr, indices, block_mask = jaxinfer.dense_to_bsr(np.tril(np.ones((8, 8), bool)), R=4, C=4)
        wrapper.plan(indptr, indices, 8, 8, 4, 4, num_qo_heads, num_kv_heads, head_dim, mask=block_mask)

    Returns:
      ``(indptr [MB+1], indices [nnz_blocks], block_mask [nnz_blocks, R, C] bool)`` with
      ``MB = ceil(M / R)``; a block is kept when any of its elements is True.

    Raises:
      ValueError: ``mask`` is not 2-D, ``R``/``C`` are not positive integers, or ``N % C != 0``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D [M, N] array, got shape {mask.shape}")
    R, C = check_int("R", R, minimum=1), check_int("C", C, minimum=1)
    M, N = mask.shape
    if N % C:
        raise ValueError(f"N = {N} must be a multiple of C = {C}")
    MB = -(-M // R)
    padded = np.zeros((MB * R, N), dtype=bool)
    padded[:M] = mask
    blocks = padded.reshape(MB, R, N // C, C).transpose(0, 2, 1, 3)  # [MB, NB, R, C]
    keep = blocks.any(axis=(2, 3))
    rows, cols = np.nonzero(keep)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return indptr, cols.astype(np.int32), blocks[rows, cols]


def bsr_to_dense(indptr, indices, M: int, N: int, R: int, C: int, block_mask=None) -> np.ndarray:
    """Dense bool mask ``[M, N]`` of a BSR pattern (``block_mask [nnz_blocks, R, C]`` optional).

    Example::

        dense = jaxinfer.bsr_to_dense([0, 1, 2], [0, 1], M=4, N=4, R=2, C=2)   # block-diagonal [4, 4]

    Raises:
      ValueError: ``M``, ``N``, ``R`` or ``C`` is not a positive integer.
    """
    M, N, R, C = (check_int(name, val, minimum=1) for name, val in (("M", M), ("N", N), ("R", R), ("C", C)))
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    MB = -(-M // R)
    dense = np.zeros((MB * R, N), dtype=bool)
    rows = np.repeat(np.arange(MB), np.diff(indptr))
    blocks = np.ones((indices.size, R, C), bool) if block_mask is None else np.asarray(block_mask, bool)
    for r, c, blk in zip(rows, indices[: indptr[-1]], blocks):
        dense[r * R : (r + 1) * R, c * C : (c + 1) * C] = blk
    return dense[:M]


def bsr_custom_mask(indptr, indices, M: int, N: int, R: int, C: int, block_mask, causal: bool) -> np.ndarray | None:
    """The flat custom mask of the BSR batch (request = block row; each request's row-major ``[qo_len, kv_len]`` mask, concatenated).

    Key ``t`` of block row ``r`` is column ``indices[indptr[r] + t // C] * C + t % C``; causal
    keeps column ``j`` for row ``i`` iff ``j <= i + N - M`` (bottom-right, in matrix coordinates).
    Returns ``None`` when nothing is masked inside the blocks.
    """
    if block_mask is None and not causal:
        return None
    MB = indptr.size - 1
    nblk = np.diff(indptr)
    parts = []
    for r in range(MB):
        rows = np.arange(r * R, min((r + 1) * R, M))
        blk = indices[indptr[r] : indptr[r + 1]]
        cols = (blk[:, None] * C + np.arange(C)[None, :]).reshape(-1)  # [nblk*C]
        m = np.ones((rows.size, cols.size), dtype=bool)
        if block_mask is not None:
            bm = block_mask[indptr[r] : indptr[r + 1], : rows.size]  # [nblk, rows, C]
            m &= bm.transpose(1, 0, 2).reshape(rows.size, nblk[r] * C)
        if causal:
            m &= cols[None, :] <= rows[:, None] + N - M
        parts.append(m.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


class BlockSparseAttentionWrapper(BatchWrapper):
    """Attention of ``q [M, Hq, D]`` over ``k/v [N, Hkv, D]`` under a BSR mask (FlashInfer's wrapper).

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_qo_heads, num_kv_heads, head_dim = 1, 1, 128
        M, N, R, C = 3, 4, 1, 1            # 3x4 mask, 1x1 blocks (vector-sparse)
        bsr_wrapper = jaxinfer.BlockSparseAttentionWrapper(jnp.zeros(1024, jnp.uint8))
        indptr = jnp.array([0, 1, 2, 4], jnp.int32)
        indices = jnp.array([0, 1, 1, 3], jnp.int32)
        bsr_wrapper.plan(indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim)
        q = jax.random.normal(jax.random.key(0), (M, num_qo_heads, head_dim), jnp.float16)
        k = jax.random.normal(jax.random.key(1), (N, num_kv_heads, head_dim), jnp.float16)
        v = jax.random.normal(jax.random.key(2), (N, num_kv_heads, head_dim), jnp.float16)
        o = bsr_wrapper.run(q, k, v)       # [M, num_qo_heads, head_dim]
    """

    _op = "other"

    def __init__(self, float_workspace_buffer=None, backend: str = "auto", *, capacity: PlanCapacity | None = None,
                 deterministic: bool = False):
        """Make a wrapper (no device work).

        Args:
          float_workspace_buffer: FlashInfer's scratch buffer: any array or ``None``, accepted and
            unused (XLA allocates kernel scratch itself).
          backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"``.
          capacity: static maxima of plans (:class:`~jaxinfer.plan.batch.PlanCapacity`).
          deterministic: batch invariance, FlashInfer's ``fixed_split_size``
            (:meth:`~jaxinfer.plan.batch.PlanCapacity.as_deterministic`).

        Raises:
          ValueError: a string as ``float_workspace_buffer``, a bad ``backend``.
        """
        self._setup(float_workspace_buffer, "NHD", backend, capacity, deterministic)
        self._num_cols: int | None = None  # N: the only shape the spec does not hold

    def plan(
        self, indptr, indices, M: int, N: int, R: int, C: int, num_qo_heads: int, num_kv_heads: int,
        head_dim: int, mask=None, packed_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False, logits_soft_cap: float | None = None, sm_scale: float | None = None,
        rope_scale: float | None = None, rope_theta: float | None = None, q_data_type=None, kv_data_type=None,
        o_data_type=None, non_blocking: bool = True, *, variant: AttentionVariant | None = None,
    ) -> Plan:
        """Plan a BSR pattern on the host (FlashInfer's positional order).

        Example: see the class docstring.

        Args:
          indptr: ``[MB+1]`` block-row pointer, ``MB = ceil(M / R)``.
          indices: ``[nnz_blocks]`` column-block ids in ``[0, N / C)``.
          M, N, R, C: matrix and block shape; ``N % C == 0``.
          mask: optional ``[nnz_blocks, R, C]`` bool, True keeps an element.
          packed_mask: not supported alone (``ValueError``): pass ``mask``.
          causal: bottom-right causal mask in matrix coordinates.
          use_fp16_qk_reduction, non_blocking: accepted and unused.
          q_data_type, kv_data_type: as in :meth:`~jaxinfer.BatchDecodeWithPagedKVCacheWrapper.plan`
            (``None``: from ``run``'s arrays). o_data_type: ``None`` or q's dtype.
          Other options: as in :func:`jaxinfer.single_decode_with_kv_cache`.

        Returns:
          The plan pytree (also kept for ``run``), for :func:`batch_block_sparse`.

        Raises:
          ValueError: inconsistent BSR arrays or shapes (message names the argument).
          NotImplementedError: ``pos_encoding_mode`` other than ``"NONE"``, or a named backend
            that cannot serve the pattern.
        """
        M, N, R, C = (check_int(name, val, minimum=1) for name, val in (("M", M), ("N", N), ("R", R), ("C", C)))
        if N % C:
            raise ValueError(f"N = {N} must be a multiple of C = {C}")
        if packed_mask is not None and mask is None:
            raise ValueError("packed_mask is not supported: pass the unpacked bool mask")
        if pos_encoding_mode != "NONE":
            raise NotImplementedError(
                "block-sparse attention has no absolute key positions inside a block row; apply RoPE "
                "with jaxinfer.apply_rope_pos_ids before attention"
            )
        q_dtype, kv_dtype, infer = plan_dtypes(q_data_type, kv_data_type)
        if o_data_type is not None and (q_data_type is None or jnp.dtype(o_data_type) != jnp.dtype(q_data_type)):
            raise ValueError(f"o_data_type must be None or q_data_type, got {o_data_type}; cast the output")
        MB = -(-M // R)
        indptr = check_indptr("indptr", as_host_int("indptr", indptr), batch_size=MB)
        indices = as_host_int("indices", indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype}{indices.shape}")
        # Range before the int32 cast (a wider id would wrap); N/C <= N fits int32 (check_int).
        if indices.size < indptr[-1] or (indices.size and (indices.min() < 0 or indices.max() >= N // C)):
            raise ValueError(f"indices must hold indptr[-1] = {indptr[-1]} column blocks in [0, N/C = {N // C})")
        indices = indices.astype(np.int32, copy=False)
        block_mask = None
        if mask is not None:
            block_mask = np.asarray(mask)
            if block_mask.dtype != np.bool_ or block_mask.shape != (indptr[-1], R, C):
                raise ValueError(f"mask must be bool [nnz_blocks={indptr[-1]}, R={R}, C={C}], got {block_mask.dtype}{block_mask.shape}")
        variant = make_variant(variant, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale)
        qo_indptr = np.minimum(np.arange(MB + 1) * R, M)
        last = np.where(np.diff(indptr) > 0, C, 0)
        spec = BatchSpec.create(
            qo_indptr, indptr, indices, last, page_size=C, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, variant=variant,
            custom_mask=bsr_custom_mask(indptr, indices, M, N, R, C, block_mask, causal),
            q_dtype=q_dtype, kv_dtype=kv_dtype,
        )
        self._num_cols = int(N)
        return self._set_plan(spec, infer)

    begin_forward = plan  # FlashInfer's pre-0.2 name

    def run(self, q, k, v, scale_q=None, scale_k=None, scale_v=None, out=None, lse=None, return_lse: bool = False,
            enable_pdl=None, *, k_scale=None, v_scale=None, sinks=None, variant_params=None):
        """Attention of ``q`` over ``k``/``v`` under the planned BSR mask; jit-compatible.

        Args:
          q: ``[M, Hq, D]``; k, v: ``[N, Hkv, D]`` in q's dtype or fp8.
          scale_q, scale_k, scale_v: dequantization scales (``scale_q * scale_k`` multiplies the
            logits, ``scale_v`` the output), as ``k_scale``/``v_scale`` of
            :func:`jaxinfer.single_decode_with_kv_cache`; ``k_scale``/``v_scale`` are the same
            by the decode API's names (give one of each pair).
          out, lse: anything but ``None`` is a ``ValueError``: use the return value.
          return_lse: also return ``lse [M, Hq]`` float32 (base 2). enable_pdl: unused.
          sinks, variant_params: as in :func:`jaxinfer.single_decode_with_kv_cache`.

        Returns:
          ``o [M, Hq, D]`` in q's dtype (, ``lse``).

        Raises:
          ValueError: ``run`` before ``plan``, arrays that disagree with the plan, ``out``/``lse``,
            bad ``sinks`` or ``variant_params``.
        """
        check_run_extras((), out, lse)
        spec, plan = self._require_plan(q, k)
        M, N, C = int(spec.qo_indptr[-1]), self._num_cols, spec.page_size
        if q.shape[0] != M or k.shape[0] != N:
            raise ValueError(f"q must have M = {M} rows and k, v N = {N} rows, got {q.shape[0]} and {k.shape[0]}")
        check_spec_run_args(spec, q, *(_as_pages(x, C) for x in (k, v)), "NHD")
        k_scale, v_scale = pick_scales(scale_q, scale_k, scale_v, k_scale, v_scale)
        return batch_block_sparse(q, k, v, plan, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                                  sinks=sinks, variant_params=variant_params)

    forward = run  # FlashInfer's pre-0.2 name


def _as_pages(x, C: int):
    """``[N, Hkv, D]`` as ``[N / C, C, Hkv, D]``: the column blocks are the pages (a free reshape)."""
    return x.reshape(x.shape[0] // C, C, *x.shape[1:])


def batch_block_sparse(q, k, v, plan: Plan, *, return_lse: bool = False, k_scale=None, v_scale=None, sinks=None,
                       variant_params=None):
    """Run a block-sparse plan inside jit: ``q [M, Hq, D]``, ``k/v [N, Hkv, D]`` -> ``o [M, Hq, D]``.

    Example::

        plan = bsr_wrapper.plan(indptr, indices, M, N, R, C, Hq, Hkv, D, q_data_type=jnp.float16)
        o = jax.jit(jaxinfer.batch_block_sparse)(q, k, v, plan)

    Args:
      q: ``[M, Hq, D]``; k, v: ``[N, Hkv, D]`` (the plan knows the block width ``C``).
      plan: from :meth:`BlockSparseAttentionWrapper.plan`.
      k_scale, v_scale, sinks, variant_params: as in :func:`jaxinfer.single_decode_with_kv_cache`.

    Returns:
      ``o [M, Hq, D]`` (, ``lse [M, Hq]`` float32 base 2 with ``return_lse``).

    Raises:
      ValueError: at trace time, arrays whose shape or dtype disagrees with the plan.
    """
    C = plan.page_size
    return run_plan(plan, q, _as_pages(k, C), _as_pages(v, C), return_lse=return_lse, k_scale=k_scale,
                    v_scale=v_scale, variant_params=variant_params, sinks=sinks)
