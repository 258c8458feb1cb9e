"""Attention states and cascade attention (FlashInfer paper, arXiv 2501.01005, sec. 2.2 and 3.1).

An attention state is ``(v, s)``: the softmax-normalised output over a subset of keys and its
base-2 log-sum-exp. States over disjoint key subsets merge exactly (``merge_state``), which is how
split-KV partials fold and how cascade levels combine: each level is a batch prefill/decode over
its own page table with ``return_lse``, and the levels' states merge into the output.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxinfer import backends
from jaxinfer.plan.batch import PlanCapacity
from jaxinfer.plan.checks import check_int
from jaxinfer.page import unpack_paged_kv_cache
from jaxinfer.variants import AttentionVariant
from jaxinfer.wrapper import BatchWrapper, Plan, batch_spec, check_spec_run_args, make_plan, run_paged_plan


def merge_states(v, s, *, backend: str = "auto"):
    """Merge ``N`` attention states per row.

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
    """Merge two attention states: ``v_a, v_b [L, H, D]``, ``s_a, s_b [L, H]`` -> ``(v, s)``.

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
    """FlashInfer's in-place merge, functional: returns the merged ``(v, s)``.

    JAX arrays are immutable, so the result is returned; under ``jax.jit`` with donated ``v``
    and ``s`` XLA reuses their buffers. ``mask [L]`` bool selects the rows to merge; other rows
    keep ``(v, s)``.
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
    """

    def __init__(self, num_levels: int, kv_layout: str = "NHD", backend: str = "auto", *,
                 capacity: PlanCapacity | None = None):
        self._num_levels = check_int("num_levels", num_levels, minimum=1)
        super().__init__(kv_layout, backend, capacity=capacity)

    def plan(
        self, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len_arr,
        num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, *, causal: bool = False,
        pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
        sm_scale: float | None = None, rope_scale: float = 1.0, rope_theta: float = 1e4,
        q_data_type=jnp.bfloat16, kv_data_type=None, variant: AttentionVariant | None = None,
    ) -> list[Plan]:
        """Plan every level: each ``*_arr`` is a list of one array per level (level 0 first).

        Returns:
          The list of per-level plans (also kept for ``run``).

        Raises:
          ValueError: wrong number of levels, levels whose queries disagree, or any batch error.
          NotImplementedError: the wrapper's named backend cannot serve a level.
        """
        arrs = (qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len_arr)
        if any(len(a) != self._num_levels for a in arrs):
            raise ValueError(f"each *_arr argument must have num_levels = {self._num_levels} entries")
        specs = []
        for level, (qo, kv_ptr, kv_idx, last) in enumerate(zip(*arrs)):
            specs.append(batch_spec(
                qo, kv_ptr, kv_idx, last, num_qo_heads, num_kv_heads, head_dim, page_size, None,
                q_data_type, kv_data_type, variant, causal=causal and level == self._num_levels - 1,
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
        return self._keep(specs, [make_plan(s, self._backend, self._kv_layout, self._capacity, op="other")
                                  for s in specs])

    def run(self, q, paged_kv_cache, *, return_lse: bool = False, k_scale=None, v_scale=None):
        """``q [nnz_q, Hq, D]`` -> ``o [nnz_q, Hq, D]`` (, ``lse [nnz_q, Hq]``), jit-compatible;
        ``k_scale``/``v_scale``: :data:`jaxinfer.wrapper.SCALES_DOC`."""
        specs, plans = self._require_plan()
        k, v = unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        for spec in specs:
            check_spec_run_args(spec, q, k, v, self._kv_layout)
        return batch_cascade(q, paged_kv_cache, plans, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)


def batch_cascade(q, paged_kv_cache, plans: list[Plan], *, return_lse: bool = False, k_scale=None, v_scale=None):
    """Run cascade level plans inside jit: each level's state, merged over levels.

    Args:
      q: ``[nnz_q, Hq, D]``; paged_kv_cache: the cache every level's page table indexes.
      plans: the list returned by :meth:`MultiLevelCascadeAttentionWrapper.plan`.
      k_scale, v_scale: :data:`jaxinfer.wrapper.SCALES_DOC`, applied in every level (the merge
        of the levels' states is linear in their outputs, so ``v_scale`` commutes with it).

    Returns:
      ``o [nnz_q, Hq, D]`` (, ``lse [nnz_q, Hq]``).
    """
    states = [run_paged_plan(plan, q, paged_kv_cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
              for plan in plans]
    if len(states) == 1:
        o, lse = states[0]
    else:
        merge_backend = "pallas" if plans[0].backend == "pallas" else "xla"
        o, lse = merge_states(jnp.stack([o for o, _ in states], 1), jnp.stack([s for _, s in states], 1),
                              backend=merge_backend)
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
    page_lists = [_int32_values(f"page_lists[{r}]", pages, minimum=0) for r, pages in enumerate(page_lists)]
    B = len(page_lists)
    last = _int32_values("kv_last_page_len", kv_last_page_len, minimum=0, maximum=page_size)
    qo_lens = _int32_values("qo_lens", qo_lens, minimum=0)
    if last.shape != (B,) or qo_lens.shape != (B,):
        raise ValueError(f"kv_last_page_len and qo_lens must be [B = {B}], got {last.shape} and {qo_lens.shape}")
    shareable = [tuple(p[:-1]) for p in page_lists]

    def segments(members: list[int], depth: int) -> dict[int, list[tuple]]:
        """Shared segments (start, end) per request below a trie node at page ``depth``."""
        out = {r: [] for r in members}
        by_page: dict[int, list[int]] = {}
        for r in members:
            if len(shareable[r]) > depth:
                by_page.setdefault(shareable[r][depth], []).append(r)
        for group in by_page.values():
            if len(group) < 2:
                continue
            end = depth + 1  # extend the edge while every member agrees (radix compression)
            while all(len(shareable[r]) > end for r in group) and len({shareable[r][end] for r in group}) == 1:
                end += 1
            below = segments(group, end)
            for r in group:
                out[r] = [(depth, end)] + below[r]
        return out

    paths = segments(list(range(B)), 0)
    num_levels = 1 + max((len(p) for p in paths.values()), default=0)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    levels = []
    for level in range(num_levels - 1):
        groups = []  # (segment pages or (), query start, query end)
        for r in range(B):
            pages = ()
            if level < len(paths[r]):
                s, e = paths[r][level]
                pages = tuple(page_lists[r][s:e])
            if groups and pages and groups[-1][0] == pages:
                groups[-1][2] = qo_indptr[r + 1]
            else:
                groups.append([pages, qo_indptr[r], qo_indptr[r + 1]])
        levels.append((
            np.array([0] + [g[2] for g in groups], np.int32),
            [list(g[0]) for g in groups],
            [page_size if g[0] else 0 for g in groups],
        ))
    own = [list(page_lists[r][paths[r][-1][1] if paths[r] else 0 :]) for r in range(B)]
    levels.append((qo_indptr, own, [int(x) if own[r] else 0 for r, x in enumerate(last)]))
    qo_arr, indptr_arr, indices_arr, last_arr = [], [], [], []
    for qo, pages, lpl in levels:
        qo_arr.append(qo)
        indptr_arr.append(np.concatenate([[0], np.cumsum([len(p) for p in pages])]).astype(np.int32))
        indices_arr.append(np.array([x for p in pages for x in p], np.int32))
        last_arr.append(np.array(lpl, np.int32))
    return qo_arr, indptr_arr, indices_arr, last_arr
