"""Attention states and cascade attention (FlashInfer paper, arXiv 2501.01005, sec. 2.2 and 3.1).

An attention state is ``(v, s)``: the softmax-normalised output over a subset of keys and its
base-2 log-sum-exp. States over disjoint key subsets merge exactly (``merge_state``), which is how
split-KV partials fold and how cascade levels combine: each level is a batch prefill/decode over
its own page table with ``return_lse``, and the levels' states merge into the output.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxinfer import backends
from jaxinfer.plan.batch import PlanCapacity
from jaxinfer.plan.checks import check_int
from jaxinfer.page import unpack_paged_kv_cache
from jaxinfer.variants import LOG2E, AttentionVariant, apply_sink, check_sinks
from jaxinfer.wrapper import BatchWrapper, Plan, batch_spec, check_run_extras, check_spec_run_args, plan_dtypes, run_paged_plan


def merge_states(v, s, *, backend: str = "auto"):
    """Merge ``N`` attention states per row (FlashInfer's ``merge_states``).

    With ``m = max_i s_i``: ``s = m + log2 sum_i 2^(s_i - m)`` and ``v = sum_i 2^(s_i - s) v_i``
    (FlashInfer paper, arXiv 2501.01005, sec. 2.2, eq. 2-3).

    Example::

        import jax, jax.numpy as jnp, jaxinfer
        v = jax.random.normal(jax.random.key(0), (2048, 10, 32, 128), jnp.float16)   # [L, N, H, D]
        s = jax.random.normal(jax.random.key(1), (2048, 10, 32), jnp.float32)        # [L, N, H]
        v_merged, s_merged = jaxinfer.merge_states(v, s)   # [2048, 32, 128], [2048, 32]

    Args:
      v: ``[L, N, H, D]`` states' outputs; s: ``[L, N, H]`` float32 base-2 lse.
      backend: ``"auto"`` (Pallas kernel on GPU, jnp elsewhere), ``"pallas"`` or ``"xla"``.

    Returns:
      ``(v [L, H, D] in v.dtype, s [L, H] float32)``; rows whose states are all ``-inf`` give
      ``v = 0, s = -inf``.

    Raises:
      ValueError: shapes that disagree.
    """
    if v.ndim != 4 or s.shape != v.shape[:3]:
        raise ValueError(f"merge_states needs v [L, N, H, D] and s [L, N, H], got {v.shape} and {s.shape}")
    return backends.merge_states_impl(backend)(v, s)


def merge_state(v_a, s_a, v_b, s_b, *, backend: str = "auto"):
    """Merge two attention states over disjoint key sets (FlashInfer's ``merge_state``).

    Same formula as :func:`merge_states` with ``N = 2``.

    Example::

        import jax, jax.numpy as jnp, jaxinfer
        va = jax.random.normal(jax.random.key(0), (2048, 32, 128), jnp.float16)
        sa = jax.random.normal(jax.random.key(1), (2048, 32), jnp.float32)
        vb = jax.random.normal(jax.random.key(2), (2048, 32, 128), jnp.float16)
        sb = jax.random.normal(jax.random.key(3), (2048, 32), jnp.float32)
        v, s = jaxinfer.merge_state(va, sa, vb, sb)      # [2048, 32, 128], [2048, 32]

    Args:
      v_a, v_b: ``[L, H, D]``; s_a, s_b: ``[L, H]`` float32 base-2 lse.
      backend: as in :func:`merge_states`.

    Returns:
      ``(v [L, H, D] in v_a's dtype, s [L, H] float32)``.

    Raises:
      ValueError: shapes that disagree.
    """
    if v_a.shape != v_b.shape or s_a.shape != s_b.shape or s_a.shape != v_a.shape[:2]:
        raise ValueError(
            f"merge_state needs v_a, v_b [L, H, D] and s_a, s_b [L, H], got {v_a.shape}, {s_a.shape}, "
            f"{v_b.shape}, {s_b.shape}"
        )
    return merge_states(jnp.stack([v_a, v_b], axis=1), jnp.stack([s_a, s_b], axis=1), backend=backend)


def merge_state_in_place(v, s, v_other, s_other, mask=None, *, backend: str = "auto"):
    """FlashInfer's ``merge_state_in_place``, functional: RETURNS the merged ``(v, s)``.

    JAX arrays are immutable: ``v`` and ``s`` are NOT modified, so write
    ``v, s = merge_state_in_place(v, s, v_other, s_other)`` where FlashInfer code discards the
    result. Under ``jax.jit`` with ``v`` and ``s`` donated, XLA reuses their buffers.

    Example::

        import jax, jax.numpy as jnp, jaxinfer
        v = jax.random.normal(jax.random.key(0), (2048, 32, 128), jnp.float16)
        s = jax.random.normal(jax.random.key(1), (2048, 32), jnp.float32)
        v_other = jax.random.normal(jax.random.key(2), (2048, 32, 128), jnp.float16)
        s_other = jax.random.normal(jax.random.key(3), (2048, 32), jnp.float32)
        v, s = jaxinfer.merge_state_in_place(v, s, v_other, s_other)

    Args:
      v, v_other: ``[L, H, D]``; s, s_other: ``[L, H]`` float32 base-2 lse.
      mask: optional ``[L]`` bool selecting the rows to merge; other rows keep ``(v, s)``.
      backend: as in :func:`merge_states`.

    Returns:
      ``(v [L, H, D], s [L, H])``, the merged state (formula of :func:`merge_states`).

    Raises:
      ValueError: shapes that disagree, or a ``mask`` that is not ``[L]``.
    """
    v_new, s_new = merge_state(v, s, v_other, s_other, backend=backend)
    if mask is None:
        return v_new, s_new
    if mask.shape != v.shape[:1]:
        raise ValueError(f"mask must be [L] = [{v.shape[0]}] bool, got {mask.shape}")
    return jnp.where(mask[:, None, None], v_new, v), jnp.where(mask[:, None], s_new, s)


class MultiLevelCascadeAttentionWrapper(BatchWrapper):
    """Cascade attention over ``num_levels`` page tables, level 0 the most shared.

    Each level is a batch prefill with ``return_lse`` whose ``qo_indptr`` groups the queries
    that share that level's KV (a shared prefix is one request holding all its queries, so its
    KV is read once per query tile, not once per request); the levels' states then merge.
    ``causal`` applies to the last level only: a shared prefix precedes every query of the
    requests that share it, so the result equals flat attention over the concatenated KV (the
    plan checks that each request's queries lie in its own last-level KV).

    Example (FlashInfer's example, imports and ``torch`` changed; 3 requests share 4 pages)::

        import jax, jax.numpy as jnp, jaxinfer
        Hq, Hkv, D, page_size, batch_size = 8, 2, 64, 4, 3
        wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(2, jnp.zeros(1024, jnp.uint8), "NHD")
        qo_indptr_arr = [jnp.array([0, batch_size]), jnp.arange(batch_size + 1)]
        kv_indptr_arr = [jnp.array([0, 4]), jnp.array([0, 2, 3, 6])]
        kv_indices_arr = [jnp.arange(4), jnp.arange(4, 10)]
        last_page_len_arr = [jnp.array([page_size]), jnp.array([1, 3, 4])]
        wrapper.plan(qo_indptr_arr, kv_indptr_arr, kv_indices_arr, last_page_len_arr, Hq, Hkv, D, page_size)
        q = jax.random.normal(jax.random.key(0), (batch_size, Hq, D), jnp.float16)
        kv_cache = jax.random.normal(jax.random.key(1), (10, 2, page_size, Hkv, D), jnp.float16)
        o = wrapper.run(q, kv_cache)       # [batch_size, Hq, D]
    """

    _op = "other"

    def __init__(
        self, num_levels: int, float_workspace_buffer=None, kv_layout: str = "NHD", use_cuda_graph: bool = False,
        qo_indptr_buf_arr=None, paged_kv_indptr_buf_arr=None, paged_kv_indices_buf_arr=None,
        paged_kv_last_page_len_buf_arr=None, *, backend: str = "auto", capacity: PlanCapacity | None = None,
        deterministic: bool = False,
    ):
        """Make a wrapper for ``num_levels`` levels (no device work).

        Args:
          num_levels: number of page-table levels (>= 1), level 0 the most shared.
          float_workspace_buffer: FlashInfer's scratch buffer: any array or ``None``, accepted and
            unused (XLA allocates kernel scratch itself).
          kv_layout: ``"NHD"`` or ``"HND"``.
          use_cuda_graph, *_buf_arr: FlashInfer's CUDA-graph options; accepted and unused (fix
            ``capacity`` for plans of one shape).
          backend: ``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"`` or ``"xla"`` (keyword only).
          capacity: static maxima of each level's plan.
          deterministic: batch invariance, FlashInfer's ``fixed_split_size``
            (:meth:`~jaxinfer.plan.batch.PlanCapacity.as_deterministic`).

        Raises:
          ValueError: ``num_levels < 1``, a string as ``float_workspace_buffer``, a bad
            ``kv_layout`` or ``backend``.
        """
        self._num_levels = check_int("num_levels", num_levels, minimum=1)
        self._setup(float_workspace_buffer, kv_layout, backend, capacity, deterministic)

    def plan(
        self, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len,
        num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, causal: bool = False,
        pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
        window_left: int = -1, logits_soft_cap: float | None = None, rope_scale: float | None = None,
        rope_theta: float | None = None, q_data_type=None, kv_data_type=None, *,
        variant: AttentionVariant | None = None,
    ) -> list[Plan]:
        """Plan every level (FlashInfer's positional order).

        Example: see the class docstring.

        Args:
          qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len: lists
            of one host array per level (level 0 first): ``[G_l+1]`` query groups, ``[G_l+1]`` page
            row pointer, page ids, ``[G_l]`` last page lengths.
          causal: applies to the last level only.
          use_fp16_qk_reduction: accepted and unused.
          q_data_type, kv_data_type: as in
            :meth:`~jaxinfer.BatchDecodeWithPagedKVCacheWrapper.plan` (``None``: from ``run``'s q).
          Other options: as in :func:`jaxinfer.single_decode_with_kv_cache`.

        Returns:
          The list of per-level plans (also kept for ``run``), for :func:`batch_cascade`.

        Raises:
          ValueError: wrong number of levels, levels whose queries disagree, or any batch error
            (the message names the argument and level).
          NotImplementedError: the wrapper's named backend cannot serve a level.
        """
        arrs = {"qo_indptr_arr": qo_indptr_arr, "paged_kv_indptr_arr": paged_kv_indptr_arr,
                "paged_kv_indices_arr": paged_kv_indices_arr, "paged_kv_last_page_len": paged_kv_last_page_len}
        for name, a in arrs.items():
            if len(a) != self._num_levels:
                raise ValueError(f"{name} must have num_levels = {self._num_levels} entries, got {len(a)}")
        q_dtype, kv_dtype, infer = plan_dtypes(q_data_type, kv_data_type)
        specs = []
        for level, (qo, kv_ptr, kv_idx, last) in enumerate(zip(*arrs.values())):
            specs.append(batch_spec(
                qo, kv_ptr, kv_idx, last, num_qo_heads, num_kv_heads, head_dim, page_size, None,
                q_dtype, kv_dtype, variant, causal=causal and level == self._num_levels - 1,
                names={"qo_indptr": f"qo_indptr_arr[{level}]", "kv_indptr": f"paged_kv_indptr_arr[{level}]",
                       "kv_indices": f"paged_kv_indices_arr[{level}]",
                       "kv_last_page_len": f"paged_kv_last_page_len[{level}]"},
                window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
            ))
        if causal and self._num_levels > 1 and np.any(specs[-1].qo_lens > specs[-1].kv_lens):
            raise ValueError(
                "causal cascade needs each request's queries inside its own last-level KV "
                "(qo_len <= kv_len of the last level): shared levels are visible to every query"
            )
        nnz = {int(s.qo_indptr[-1]) for s in specs}
        if len(nnz) != 1:
            raise ValueError(f"qo_indptr_arr levels must cover the same queries, got totals {sorted(nnz)}")
        return self._keep(specs, [self._make(s) for s in specs], infer)

    begin_forward = plan  # FlashInfer's pre-0.2 name

    def run(self, q, paged_kv_cache, *args, out=None, lse=None, return_lse: bool = False, k_scale=None,
            v_scale=None, sinks=None, variant_params=None):
        """Cascade attention of ``q`` with the last plans; jit-compatible.

        Args:
          q: ``[nnz_q, Hq, D]``, exactly the plan's ``nnz_q`` rows.
          paged_kv_cache: the cache every level's page table indexes (``[num_pages, 2, page_size,
            Hkv, D]`` NHD, or ``(k_cache, v_cache)``).
          out, lse: anything but ``None`` is a ``ValueError``: use the return value.
          return_lse: also return ``lse [nnz_q, Hq]`` float32 (base 2).
          k_scale, v_scale: as in :func:`jaxinfer.single_decode_with_kv_cache`.
          sinks, variant_params: as in :func:`batch_cascade`.

        Returns:
          ``o [nnz_q, Hq, D]`` (, ``lse``), equal to flat attention over each request's
          concatenated levels.

        Raises:
          ValueError: ``run`` before ``plan``, arrays that disagree with the plan, ``out``/``lse``,
            bad ``sinks`` or ``variant_params``.
        """
        check_run_extras(args, out, lse)
        k, v = unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        specs, plans = self._require_plan(q, k)
        for spec in specs:
            check_spec_run_args(spec, q, k, v, self._kv_layout)
        return batch_cascade(q, paged_kv_cache, plans, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                             sinks=sinks, variant_params=variant_params)

    forward = run  # FlashInfer's pre-0.2 name


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """Batch decode with one prefix shared by every request (FlashInfer's wrapper of the same name).

    Two-level cascade (FlashInfer paper, arXiv 2501.01005, sec. 3.1): the shared prefix ``k_shared``/
    ``v_shared`` is attended by all ``B`` queries as one request of ``B`` rows (its KV read once),
    each request's own pages by a batch decode, and the two states merge (:func:`merge_state`).

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_qo_heads, num_kv_heads, head_dim, page_size, shared_len = 8, 2, 64, 4, 32
        wrapper = jaxinfer.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(jnp.zeros(1024, jnp.uint8), "NHD")
        unique_kv_page_indptr = jnp.array([0, 2, 5], jnp.int32)
        unique_kv_page_indices = jnp.arange(5, dtype=jnp.int32)
        unique_kv_last_page_len = jnp.array([3, 1], jnp.int32)
        wrapper.begin_forward(unique_kv_page_indptr, unique_kv_page_indices, unique_kv_last_page_len,
                              num_qo_heads, num_kv_heads, head_dim, page_size)
        q = jax.random.normal(jax.random.key(0), (2, num_qo_heads, head_dim), jnp.float16)
        k_shared = jax.random.normal(jax.random.key(1), (shared_len, num_kv_heads, head_dim), jnp.float16)
        v_shared = jax.random.normal(jax.random.key(2), (shared_len, num_kv_heads, head_dim), jnp.float16)
        unique_kv_cache = jax.random.normal(jax.random.key(3), (8, 2, page_size, num_kv_heads, head_dim),
                                            jnp.float16)
        o = wrapper.forward(q, k_shared, v_shared, unique_kv_cache)   # [2, num_qo_heads, head_dim]
    """

    def __init__(self, float_workspace_buffer=None, kv_layout: str = "NHD", *, backend: str = "auto",
                 capacity: PlanCapacity | None = None, deterministic: bool = False):
        """Make a wrapper (no device work).

        Args:
          float_workspace_buffer: any array or ``None``, accepted and unused.
          kv_layout: ``"NHD"`` or ``"HND"``, of ``k_shared``/``v_shared`` and the unique cache.
          backend, capacity, deterministic: as in :class:`~jaxinfer.BatchDecodeWithPagedKVCacheWrapper`.

        Raises:
          ValueError: a string as ``float_workspace_buffer``, a bad ``kv_layout`` or ``backend``.
        """
        from jaxinfer.decode import BatchDecodeWithPagedKVCacheWrapper  # decode imports wrapper, not cascade

        self._kv_layout = kv_layout
        self._backend = backend
        self._decode = BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, backend=backend,
                                                          capacity=capacity, deterministic=deterministic)
        self._options: dict | None = None

    def begin_forward(
        self, unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads: int, num_kv_heads: int,
        head_dim: int, page_size: int, data_type=None,
    ) -> None:
        """Plan the unique (per-request) pages on the host.

        Args:
          unique_kv_indptr: ``[B+1]``; unique_kv_indices: page ids; unique_kv_last_page_len:
            ``[B]`` (the page table of :meth:`BatchDecodeWithPagedKVCacheWrapper.plan`).
          num_qo_heads, num_kv_heads, head_dim, page_size: geometry.
          data_type: dtype of q and the caches; ``None``: taken from ``forward``'s arrays.

        Raises:
          ValueError: an invalid page table (naming the argument).
        """
        try:
            self._decode.plan(unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads,
                              num_kv_heads, head_dim, page_size, data_type=data_type)
        except ValueError as e:  # the decode plan's names are indptr/indices/last_page_len
            raise ValueError(re.sub(r"\b(indptr|indices|last_page_len)\b", r"unique_kv_\1", str(e))) from None

    plan = begin_forward

    def forward(self, q, k_shared, v_shared, unique_kv_cache, allow_fp16_qk_reduction: bool = False,
                sm_scale: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None):
        """Decode ``q`` over the shared prefix then each request's own pages; jit-compatible.

        Args:
          q: ``[B, Hq, D]``.
          k_shared, v_shared: ``[shared_len, Hkv, D]`` (NHD) or ``[Hkv, shared_len, D]`` (HND).
          unique_kv_cache: the paged cache of the unique pages (``[num_pages, 2, page_size, Hkv,
            D]`` NHD, or ``(k_cache, v_cache)``).
          allow_fp16_qk_reduction: accepted and unused (float32 logits).
          sm_scale, rope_scale, rope_theta: as in :func:`jaxinfer.single_decode_with_kv_cache`
            (no positional encoding is applied here, as in FlashInfer's wrapper).

        Returns:
          ``o [B, Hq, D]`` in q's dtype.

        Raises:
          ValueError: ``forward`` before ``begin_forward``, shapes or dtypes that disagree.
        """
        from jaxinfer.prefill import single_prefill_with_kv_cache

        if self._decode._planned is None:
            raise ValueError("forward called before begin_forward")
        if sm_scale is not None and self._decode._planned[0].variant.sm_scale != sm_scale:
            spec = self._decode._planned[0]
            self._decode.plan(spec.kv_indptr, spec.kv_indices, spec.kv_last_page_len, spec.num_qo_heads,
                              spec.num_kv_heads, spec.head_dim, spec.page_size, sm_scale=sm_scale)
        v_s, s_s = single_prefill_with_kv_cache(q, k_shared, v_shared, kv_layout=self._kv_layout, sm_scale=sm_scale,
                                                return_lse=True, backend=self._backend)
        v_u, s_u = self._decode.run(q, unique_kv_cache, return_lse=True)
        return merge_state(v_s, s_s, v_u, s_u)[0]

    run = forward


def batch_cascade(q, paged_kv_cache, plans: list[Plan], *, return_lse: bool = False, k_scale=None, v_scale=None,
                  sinks=None, variant_params=None):
    """Run cascade level plans inside jit: each level's state, merged over levels.

    Example::

        plans = wrapper.plan(qo_indptr_arr, kv_indptr_arr, kv_indices_arr, last_arr, Hq, Hkv, D, page_size,
                             q_data_type=jnp.float16)
        o = jax.jit(jaxinfer.batch_cascade)(q, kv_cache, plans)

    Args:
      q: ``[nnz_q, Hq, D]``; paged_kv_cache: the cache every level's page table indexes.
      plans: the list returned by :meth:`MultiLevelCascadeAttentionWrapper.plan`.
      k_scale, v_scale: :data:`jaxinfer.wrapper.SCALES_DOC`, applied in every level (the merge
        of the levels' states is linear in their outputs, so ``v_scale`` commutes with it).
      sinks: :data:`jaxinfer.wrapper.SINKS_DOC`; counted once per row: the levels run without
        them and the sink joins the merged state (:func:`jaxinfer.variants.apply_sink`), so
        the result equals flat attention with sinks over the concatenated levels.
      variant_params: :data:`jaxinfer.wrapper.VARIANT_PARAMS_DOC`, given to every level.

    Returns:
      ``o [nnz_q, Hq, D]`` (, ``lse [nnz_q, Hq]``, including the sinks).

    Raises:
      ValueError: bad ``sinks`` or ``variant_params``, or sinks with an output transform over
        several levels (each level applies the transform before the merge, and the sink must come
        before it).
    """
    if len(plans) == 1:
        return run_paged_plan(plans[0], q, paged_kv_cache, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                              variant_params=variant_params, sinks=sinks)
    sinks = check_sinks(sinks, plans[-1].num_qo_heads, plans[-1].variant)
    if sinks is not None and plans[-1].variant.output_transform is not None:
        raise ValueError("sinks with an output_transform need a single-level cascade: each level applies the "
                         "transform before the merge, and the sink must join the softmax before it")
    states = [run_paged_plan(plan, q, paged_kv_cache, return_lse=True, k_scale=k_scale, v_scale=v_scale,
                             variant_params=variant_params)
              for plan in plans]
    merge_backend = "pallas" if plans[0].backend == "pallas" else "xla"
    o, lse = merge_states(jnp.stack([o for o, _ in states], 1), jnp.stack([s for _, s in states], 1),
                          backend=merge_backend)
    if sinks is not None:
        o_sink, lse = apply_sink(o.astype(jnp.float32), lse, sinks * LOG2E)
        o = o_sink.astype(o.dtype)
    return (o, lse) if return_lse else o


def _int32_values(name: str, values, *, minimum: int, maximum: int = np.iinfo(np.int32).max) -> np.ndarray:
    """``values`` as a 1-D int64 array, checked to be integers in ``[minimum, maximum]`` before the
    int32 cast of the levels (which would wrap a wider id)."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D sequence of integers, got {arr.dtype} of shape {arr.shape}")
    if arr.size and (arr.min() < minimum or arr.max() > maximum):
        raise ValueError(f"{name} must hold integers in {minimum}..{maximum}, got values in {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def cascade_levels_from_prefix_tree(page_lists, kv_last_page_len, qo_lens, page_size: int):
    """Cascade levels of a batch whose requests share prefix pages (radix-tree style).

    Requests that hold the same page ids at the start of their page lists share that prefix
    physically (a radix KV cache). The shared prefixes form a compressed trie; a trie node that
    two or more requests pass through is one shared segment, and the ``d``-th shared segment on
    a request's path is its entry at level ``d``. The last level holds each request's own pages
    after its deepest shared segment. A request's last page is never shared (it is still being
    written). Requests that share a segment and stand next to each other in the batch form one
    group, so the segment's KV is read once per group; order requests depth-first by prefix
    (as a radix cache lists them) to get one group per segment.

    Example::

        levels = jaxinfer.cascade_levels_from_prefix_tree([[0, 1, 2], [0, 1, 3]], [4, 2], [1, 1], 4)
        wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(len(levels[0]))
        wrapper.plan(*levels, num_qo_heads, num_kv_heads, head_dim, 4)   # pages 0, 1 read once

    Args:
      page_lists: per request, its page ids in order (``list[list[int]]``).
      kv_last_page_len: ``[B]`` tokens in each request's last page.
      qo_lens: ``[B]`` queries per request (1 for decode).
      page_size: tokens per page.

    Returns:
      ``(qo_indptr_arr, kv_indptr_arr, kv_indices_arr, kv_last_page_len_arr)``: lists with one
      int32 array per level, level 0 the most shared, ready for
      :meth:`MultiLevelCascadeAttentionWrapper.plan`. Queries of a request without a segment at
      some level sit in a group with no pages there (it contributes nothing to the merge).

    Raises:
      ValueError: lengths that disagree; page ids, last page lengths or query counts that are not
        integers in range (checked before the int32 cast, which would wrap them).
    """
    check_int("page_size", page_size, minimum=1)
    arrays = [np.asarray(pages) for pages in page_lists]
    B = len(arrays)
    valid = all(arr.ndim == 1 and (not arr.size or arr.dtype.kind in "iu") for arr in arrays)
    kv_indices = np.concatenate(arrays, dtype=np.int64, casting="unsafe") if B and valid else np.zeros(0, np.int64)
    if not valid or (kv_indices.size and (kv_indices.min() < 0 or kv_indices.max() > np.iinfo(np.int32).max)):
        for r, arr in enumerate(arrays):  # the first bad request raises, as when checked one by one
            _int32_values(f"page_lists[{r}]", arr, minimum=0)
    kv_indptr = np.zeros(B + 1, np.int64)
    np.cumsum([arr.size for arr in arrays], out=kv_indptr[1:])
    last = _int32_values("kv_last_page_len", kv_last_page_len, minimum=0, maximum=page_size)
    qo_lens = _int32_values("qo_lens", qo_lens, minimum=0)
    if last.shape != (B,) or qo_lens.shape != (B,):
        raise ValueError(f"kv_last_page_len and qo_lens must be [B = {B}], got {last.shape} and {qo_lens.shape}")
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    return _prefix_tree_levels(kv_indptr, kv_indices, last, qo_indptr, page_size)


def lexicographic_order(kv_indptr: np.ndarray, kv_indices: np.ndarray, lengths: np.ndarray,
                        width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Order of the requests of a page table by their first ``lengths[r]`` pages, compared
    lexicographically (a list before its extensions; equal lists keep their order), and the
    longest common prefix of each pair of neighbours in that order.

    Only the first ``width`` pages are compared while that decides every pair, then twice as
    many: lists that differ early (requests sharing a short prefix) cost ``B * width``, not their
    total length. Keys are big-endian ``page + 1`` (0 past the end) compared as bytes.

    Args:
      kv_indptr: ``[B+1]``, kv_indices: page ids (``0 <= id < 2**31``), lengths: ``[B]`` pages of
        each request to compare (at most its page count).
      width: pages compared first (>= 1).

    Returns:
      ``(order [B] int64, lcp [max(B - 1, 0)] int64)``: ``lcp[i]`` pages are common to requests
      ``order[i]`` and ``order[i + 1]``.
    """
    lengths = np.asarray(lengths, np.int64)
    longest = int(lengths.max(initial=0))
    width = max(min(width, longest), 1)
    while True:
        keys = _page_keys(kv_indptr, kv_indices, lengths, width)
        order = np.argsort(keys.view(np.dtype((np.void, 4 * width))).ravel(), kind="stable")
        rows, n = keys[order], lengths[order]
        differ = rows[1:] != rows[:-1]
        lcp = np.minimum(np.where(differ.any(1), differ.argmax(1), width), np.minimum(n[1:], n[:-1]))
        if width >= longest or not (lcp >= width).any():
            return order, lcp
        width *= 2


def _page_keys(kv_indptr: np.ndarray, kv_indices: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """``[B, width]`` big-endian uint32: ``page + 1`` of each request's first ``lengths[r]`` pages,
    0 past them (memcmp order of the rows is the lexicographic order of the lists)."""
    cols = np.arange(width)
    valid = cols < lengths[:, None]
    keys = np.zeros((len(lengths), width), ">u4")
    keys[valid] = kv_indices[(np.asarray(kv_indptr[:-1], np.int64)[:, None] + cols)[valid]] + 1
    return keys


def _prefix_tree_levels(kv_indptr: np.ndarray, kv_indices: np.ndarray, kv_last_page_len: np.ndarray,
                        qo_indptr: np.ndarray, page_size: int, max_levels: int | None = None, width: int = 32,
                        cache: dict | None = None):
    """:func:`cascade_levels_from_prefix_tree` of the page table ``(kv_indptr [B+1], kv_indices,
    kv_last_page_len [B])`` (checked integers) and queries ``qo_indptr [B+1]``, in numpy without a
    loop over requests or pages. ``max_levels``: at most that many levels, the shared segments
    past level ``max_levels - 2`` read in each request's own (last) level. ``width``: pages
    compared first (:func:`lexicographic_order`).

    A request's ``d``-th page (``d`` below its page count less one, the last page is never
    shared) is shared by the requests whose lists begin with the same ``d + 1`` pages; in
    lexicographic order of the lists those stand together, so their number follows from the
    longest common prefixes of neighbours. Along a request's list that number never grows, and a
    shared segment (a trie edge with two or more requests on it, radix-compressed) is a maximal
    run of depths with one number >= 2.

    ``cache``: a dict the caller keeps between calls (serving steps, whose requests mostly keep
    their prefixes): the shared levels depend only on the first ``max(lcp) + 1`` pages of the
    lists (every neighbour pair differs or ends within them), so when those pages, the queries,
    ``page_size`` and ``max_levels`` are as in the cached call, its shared levels (the same array
    objects: read them only) and segment ends are taken again; only the last level is new.
    """
    B = len(kv_indptr) - 1
    kv_indptr = np.asarray(kv_indptr, np.int64)
    kv_indices = np.asarray(kv_indices)
    counts = np.diff(kv_indptr)
    n = np.maximum(counts - 1, 0)
    signature = (B, page_size, max_levels, np.asarray(qo_indptr).tobytes())
    if cache and cache["signature"] == signature and np.array_equal(
            _page_keys(kv_indptr, kv_indices, n, cache["keys"].shape[1]), cache["keys"]):
        shared, own_start = cache["shared"], cache["own_start"]
    else:
        shared, own_start, deepest = _shared_levels(kv_indptr, kv_indices, n, qo_indptr, page_size, max_levels,
                                                    width)
        if cache is not None:
            cache.update(signature=signature, shared=shared, own_start=own_start,
                         keys=_page_keys(kv_indptr, kv_indices, n, deepest + 1))
    own_len = counts - own_start
    local = np.arange(int(own_len.sum())) - np.repeat(np.cumsum(own_len) - own_len, own_len)
    own = (np.asarray(qo_indptr, np.int32), np.append(0, np.cumsum(own_len)).astype(np.int32),
           kv_indices[np.repeat(kv_indptr[:-1] + own_start, own_len) + local].astype(np.int32),
           np.where(own_len > 0, kv_last_page_len, 0).astype(np.int32))
    return tuple([*levels, last] for levels, last in zip(shared, own))


def _shared_levels(kv_indptr: np.ndarray, kv_indices: np.ndarray, n: np.ndarray, qo_indptr: np.ndarray,
                   page_size: int, max_levels: int | None, width: int):
    """The shared levels of :func:`_prefix_tree_levels` (``n``: pages each request may share) as
    four lists of arrays, where each request's own pages start, and the longest common prefix of
    two requests (pages)."""
    B = len(n)
    seg_start = seg_end = np.zeros((B, 0), np.int64)
    num_seg = np.zeros(B, np.int64)
    order, lcp = lexicographic_order(kv_indptr, kv_indices, n, width) if B >= 2 else (None, np.zeros(0, np.int64))
    depth = np.arange(int(lcp.max(initial=0)))  # deeper pages have one holder each
    if depth.size:
        run = np.zeros((depth.size, B), np.int64)  # [d, i]: group of sorted request i among those sharing d + 1 pages
        np.cumsum(lcp[None, :] <= depth[:, None], axis=1, out=run[:, 1:])
        run += depth[:, None] * B
        sharers = np.empty((B, depth.size), np.int64)
        sharers[order] = np.bincount(run.ravel(), minlength=run.size)[run].T
        sharers[depth[None, :] >= n[:, None]] = 0
        shared = sharers >= 2
        edge = np.zeros((B, 1), np.int64)
        starts = shared & (sharers != np.concatenate([edge, sharers[:, :-1]], 1))
        ends = shared & (sharers != np.concatenate([sharers[:, 1:], edge], 1))
        num_seg = starts.sum(1)
        k = np.arange(int(num_seg.sum())) - np.repeat(np.cumsum(num_seg) - num_seg, num_seg)
        seg_start, seg_end = np.zeros((B, int(num_seg.max())), np.int64), np.zeros((B, int(num_seg.max())), np.int64)
        r, d = np.nonzero(starts)
        seg_start[r, k] = d
        r, d = np.nonzero(ends)
        seg_end[r, k] = d + 1
    shared_levels = seg_start.shape[1] if max_levels is None else min(seg_start.shape[1], max_levels - 1)
    first = kv_indptr[:-1]
    qo_arr, indptr_arr, indices_arr, last_arr = [], [], [], []
    for level in range(shared_levels):
        has = num_seg > level
        s = first + seg_start[:, level]  # positions in kv_indices
        length = np.where(has, seg_end[:, level] - seg_start[:, level], 0)
        # A request joins its neighbour's group when their segments hold the same pages.
        same = np.zeros(B, bool)
        cand = np.flatnonzero(has[1:] & has[:-1] & (length[1:] == length[:-1])) + 1
        if cand.size:
            k = np.arange(int(length[cand].max()))
            inside = k < length[cand, None]
            same[cand] = ((kv_indices[np.where(inside, s[cand, None] + k, 0)]
                           == kv_indices[np.where(inside, s[cand - 1, None] + k, 0)]) | ~inside).all(1)
        heads = np.flatnonzero(~same)
        tails = np.append(heads[1:] - 1, B - 1)
        glen = length[heads]
        local = np.arange(int(glen.sum())) - np.repeat(np.cumsum(glen) - glen, glen)
        qo_arr.append(np.append(0, qo_indptr[tails + 1]).astype(np.int32))
        indptr_arr.append(np.append(0, np.cumsum(glen)).astype(np.int32))
        indices_arr.append(kv_indices[np.repeat(s[heads], glen) + local].astype(np.int32))
        last_arr.append(np.where(glen > 0, page_size, 0).astype(np.int32))
    kept = np.minimum(num_seg, shared_levels)
    own_start = np.where(kept > 0, seg_end[np.arange(B), np.maximum(kept - 1, 0)] if shared_levels else 0, 0)
    return (qo_arr, indptr_arr, indices_arr, last_arr), own_start, depth.size
