"""Load-balanced work planner: compiled C++ on the host, static-capacity int32 work buffers for the device.

After the dynamism-aware scheduler of the FlashInfer paper (arXiv 2501.01005, sec. 3.3):

1. A *work tile* is (request, KV head, query tile, KV chunk). Its rows are the query tokens of the
   tile times the ``group_size`` query heads that share the KV head (GQA head-group packing), so
   one tile reads each key once for the whole group.
2. The KV range of a query tile is trimmed to the keys some row of it can see (causal and
   sliding-window bounds, bottom-right aligned), then split into chunks of ``chunk`` tokens
   (split-KV). ``chunk`` is a multiple of ``block_n`` (and at least ``min_chunk``) whose total
   tile count fits ``split_budget``: of the chunks that cut the longest key range into 1, 2, ...
   parts, the one of least estimated time (the fewest tiles among equals). The estimate counts
   a tile's key steps plus ``tile_startup`` (a tile's fixed cost), and is the mean CTA load plus
   3/8 of the most loaded CTA's excess over it, that load taken as the LPT lower bound
   ``max_r (r + 1) * cost[r * num_ctas]`` over the costs sorted descending (some CTA runs r + 1
   of the ``r * num_ctas + 1`` costliest tiles): whole waves of tiles and few tile starts win
   (fitted on an H100, benchmarks/decisions/pallas.md). When the unsplit tiles already fill
   ``split_budget``, no request is split.
   With ``fixed_chunk`` (FlashInfer's ``fixed_split_size``) the chunk is that size for every
   batch instead, and every key range longer than it is split: a request's tiles, split points
   and merge order then depend on the request alone, so its output is bit-identical in any batch
   (the kernels fold a tile's keys and a group's partials in a fixed order).
3. Tiles are sorted by cost ``kv_len + row_cost * rows`` (the paper's cost model has
   ``row_cost = 2``), stable, and assigned to ``num_ctas`` persistent CTAs
   longest-processing-time first, a round of ``num_ctas`` tiles at a time against the loads
   sorted ascending (ties by CTA id): the round form of the min-heap assignment, with the same bound (a CTA's load exceeds the mean by at most one tile's cost).
   With ``kv_major`` (a grid of one CTA per tile, for prefill plans that fill the GPU) CTA ``c``
   runs the ``c``-th tile of the (request, KV head)-major order instead, longest first within:
   CTAs that run together then share a few requests' KV in L2. With ``num_ctas = 1`` the plan is
   one queue, longest first: the order in which a grid that takes its work from a counter (the
   FFI kernels) should run it.
4. Tiles of a split (request, KV head, query tile) write partial ``(o, lse)`` rows into
   contiguous *partial slots*; ``merge_indptr`` delimits each group of slots, which the merge
   kernel folds into the final rows.

Every buffer has a static capacity (``max_work_tiles`` tiles, ``split_budget`` partial slots,
``split_budget // 2`` merge groups), so a new batch composition never changes a shape.

The planner runs in C++ (``jaxinfer/csrc/planner.cc``, built and loaded by :mod:`jaxinfer.plan.native`), one
call per plan, as FlashInfer's scheduler does (its numpy form, many small numpy calls, was slower
at B=256: benchmarks' planner decisions) and is kept as the test oracle, tests/planner_ref.py. The
``*_at`` functions take data addresses for callers that already hold them (a numpy address
lookup, :func:`jaxinfer.plan.native.address`, costs ~0.6 us;
:attr:`jaxinfer.plan.batch.BatchSpec.native_addresses`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.plan import native
from jaxinfer.plan.layout import MERGE_FIELDS, WORK_FIELDS

_I32 = np.dtype(np.int32)

@dataclasses.dataclass(frozen=True)
class WorkBuffers:
    """Output of :func:`plan_work` (numpy int32, padded to the capacities).

    Attributes:
      work: ``[max_work_tiles, len(WORK_FIELDS)]`` tiles ordered by CTA, longest first.
      cta_indptr: ``[num_ctas + 1]``: CTA c runs tiles ``cta_indptr[c]:cta_indptr[c+1]``.
      merge_indptr: ``[split_budget // 2 + 1]``: group g folds slots ``merge_indptr[g]:[g+1]``.
      merge_dest: ``[split_budget // 2, 4]`` final rows of group g (``MERGE_FIELDS``).
      num_tiles, num_groups: real tiles and merge groups; chunk: KV chunk size (0: no split).
    """

    work: np.ndarray
    cta_indptr: np.ndarray
    merge_indptr: np.ndarray
    merge_dest: np.ndarray
    num_tiles: int
    num_groups: int
    chunk: int


@dataclasses.dataclass(frozen=True)
class PlanArgs:
    """The static arguments of :func:`plan_work` (documented there), hashable: a backend builds
    them once per plan geometry and passes them to :func:`plan_packed_at` without re-reading
    keyword arguments."""

    num_kv_heads: int
    group_size: int
    block_m: int
    block_n: int
    causal: bool
    window_left: int
    num_ctas: int
    split_budget: int
    max_work_tiles: int
    split_kv: bool = True
    min_chunk: int = 256
    kv_major: bool = False
    row_cost: int = 2
    fixed_chunk: int = 0
    tile_startup: int = 2

    @functools.cached_property
    def native(self) -> ctypes.Array:
        """The fields as the native planner's ``int64`` params array (jaxinfer/csrc/planner.cc)."""
        fields = dataclasses.fields(self)
        return (ctypes.c_int64 * len(fields))(*(int(getattr(self, f.name)) for f in fields))

    @functools.cached_property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of ``work``, ``cta_indptr``, ``merge_indptr`` and ``merge_dest``."""
        g = self.split_budget // 2
        return (self.max_work_tiles, len(WORK_FIELDS)), (self.num_ctas + 1,), (g + 1,), (g, len(MERGE_FIELDS))

    @functools.cached_property
    def work_entries(self) -> int:
        """int32 entries of the four work buffers packed back to back (the page ids follow)."""
        return sum(math.prod(s) for s in self.shapes)


def _int_array(name: str, x, dtype, size: int) -> np.ndarray:
    """``x`` as a C-contiguous ``[size]`` array of ``dtype`` (no copy when it is one already)."""
    a = np.ascontiguousarray(x, dtype)
    if a.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {a.shape}")
    return a


def count_query_tiles(qo_indptr, tokens_per_tile: int) -> int:
    """Query tiles of a batch, ``sum(ceil(qo_len / tokens_per_tile))``: the unsplit plan's tiles
    per KV head. ``qo_indptr``: ``[B+1]`` integer, non-decreasing."""
    qo_indptr = np.ascontiguousarray(qo_indptr, _I32)
    return count_query_tiles_at(qo_indptr.size - 1, native.address(qo_indptr), tokens_per_tile)


def count_query_tiles_at(batch: int, qo_indptr: int, tokens_per_tile: int) -> int:
    """:func:`count_query_tiles` of the ``[batch + 1]`` int32 row pointer at address ``qo_indptr``."""
    return native.load().jaxinfer_count_query_tiles(batch, qo_indptr, tokens_per_tile)


@dataclasses.dataclass(frozen=True)
class WorkCounts:
    """What a batch's plan holds (:func:`count_work`).

    Attributes:
      num_tiles: work tiles (``max_work_tiles`` must hold them).
      num_slots: partial slots of the split tiles (``split_budget`` must hold them).
      num_groups: merge groups (``split_budget // 2`` must hold them).
      chunk: the KV chunk (0: no split).
    """

    num_tiles: int
    num_slots: int
    num_groups: int
    chunk: int


def count_work(qo_indptr, kv_lens, **kw) -> WorkCounts:
    """The tiles, partial slots and merge groups :func:`plan_work` would plan for a batch, without
    planning it: what a backend sizes its capacities by (with ``fixed_chunk`` they grow with the
    batch). Takes :func:`plan_work`'s arguments but ``kv_base`` and ``mask_offsets`` (the counts
    do not depend on them); no capacity is checked.

    Raises:
      ValueError: an input has the wrong length or a static argument is out of range (as
        :func:`plan_work`).
    """
    batch = np.size(kv_lens)
    qo = _int_array("qo_indptr", qo_indptr, np.int32, batch + 1)
    kv = _int_array("kv_lens", kv_lens, np.int32, batch)
    return count_work_at(PlanArgs(**kw), batch, native.address(qo), native.address(kv))


def count_work_at(args: PlanArgs, batch: int, qo_indptr: int, kv_lens: int) -> WorkCounts:
    """:func:`count_work` on the addresses of C-contiguous int32 ``qo_indptr`` ``[batch + 1]`` and
    ``kv_lens`` ``[batch]`` (:attr:`jaxinfer.plan.batch.BatchSpec.native_addresses`)."""
    result = (ctypes.c_int64 * 4)()
    _check(native.load().jaxinfer_count_work(args.native, batch, qo_indptr, kv_lens, result))
    return WorkCounts(*result)


def _inputs(qo_indptr, kv_lens, kv_base, mask_offsets) -> tuple[np.ndarray | None, ...]:
    """The planner's inputs as C-contiguous int32 arrays (``mask_offsets``: int64 or ``None``)."""
    batch = np.size(kv_lens)
    arrays = (_int_array("qo_indptr", qo_indptr, np.int32, batch + 1), _int_array("kv_lens", kv_lens, np.int32, batch),
              _int_array("kv_base", kv_base, np.int32, batch))
    return (*arrays, None if mask_offsets is None else _int_array("mask_offsets", mask_offsets, np.int64, batch))


def _check(status: int) -> None:
    if status:
        raise ValueError(native.load().jaxinfer_error().decode())


def plan_work(qo_indptr, kv_lens, kv_base, *, mask_offsets=None, out: tuple[np.ndarray, ...] | None = None,
              **kw) -> WorkBuffers:
    """Plan one batch on the host (the compiled planner of ``jaxinfer/csrc/planner.cc``, one call).

    Args:
      qo_indptr: ``[B+1]`` integer query row pointer.
      kv_lens: ``[B]`` integer keys per request.
      kv_base: ``[B]`` integer first page of each request in ``kv_indices`` (paged) or first
        token of the ragged KV; copied into the tiles.
      num_kv_heads, group_size: ``Hkv`` and ``Hq / Hkv``.
      block_m, block_n: the kernel's row tile (query tokens x group heads) and key step.
      causal, window_left: the mask, used to trim each query tile's key range.
      num_ctas: persistent CTAs of the attention kernel.
      split_budget: most tiles a split plan may have; also the partial-slot capacity (>= 2).
      max_work_tiles: capacity of ``work``.
      split_kv: ``False`` never splits a request's KV (default ``True``).
      min_chunk: smallest KV chunk (tokens) of a split (default 256).
      kv_major: skip the LPT assignment and run one tile per CTA (CTA ``c`` runs row ``c``,
        ``cta_indptr = min(arange(num_ctas + 1), num_tiles)``), rows ordered by (``kv_base``,
        KV head, longest key range first), stable over the cost order: CTAs that run together
        share a few requests' KV in L2 (default ``False``; needs ``num_ctas >= num_tiles``).
      row_cost: cost of a query row (query token x group head) in keys, the tile cost being
        ``kv_hi - kv_lo + row_cost * rows`` (default 2, the FlashInfer paper's model; 0 orders
        by the key range alone).
      fixed_chunk: ``> 0``: the KV chunk of every split, whatever the batch (FlashInfer's
        ``fixed_split_size``): each query tile's key range is cut at ``kv_lo + k * fixed_chunk``
        and split whenever it is longer, so a request's tiles, chunks and merge order depend on
        that request alone (batch invariance); ``split_budget`` then bounds the partial slots
        rather than choosing the chunk, and ``min_chunk`` is unused. ``0`` (default): the chunk
        of step 2 of the module doc, which depends on the batch. Needs ``split_kv``.
      tile_startup: the fixed cost of a work tile in key steps (``block_n`` keys) in the chunk
        choice's time estimate (step 2 of the module doc; default 2, the Pallas decode kernel's
        on an H100). ``0`` splits as finely as the budget lowers the estimate.
      mask_offsets: ``[B]`` offset of each request's row-major ``[qo_len, kv_len]`` custom mask in
        the flat mask (``None``: no custom mask; ``mask_base`` is then 0).
      out: ``(work, cta_indptr, merge_indptr, merge_dest)`` C-contiguous int32 arrays of the
        shapes of :class:`WorkBuffers` to write into; every entry is written. ``None``
        allocates them.

    Returns:
      :class:`WorkBuffers` (holding ``out``'s arrays when given).

    Raises:
      ValueError: the batch needs more than ``max_work_tiles`` tiles (``kv_major``: more than
        ``num_ctas``), more than ``split_budget`` partial slots or ``split_budget // 2`` merge
        groups (possible with ``fixed_chunk``), an input has the wrong length, a size argument
        is out of range, ``fixed_chunk`` without ``split_kv``, or ``out`` has a wrong shape,
        dtype or layout.
      jaxinfer.plan.native.NativeBuildError: the planner library cannot be built (no C++ compiler).
    """
    args = PlanArgs(**kw)
    if out is None:
        out = tuple(np.empty(s, np.int32) for s in args.shapes)
    for name, a, shape in zip(("work", "cta_indptr", "merge_indptr", "merge_dest"), out, args.shapes):
        if a.shape != shape or a.dtype != np.int32 or not a.flags.c_contiguous:
            raise ValueError(f"out's {name} must be C-contiguous int32{shape}, got {a.dtype}{a.shape}")
    inputs = _inputs(qo_indptr, kv_lens, kv_base, mask_offsets)
    result = (ctypes.c_int64 * 3)()
    addresses = [None if a is None else native.address(a) for a in (*inputs, *out)]
    _check(native.load().jaxinfer_plan_work(args.native, inputs[1].size, *addresses, result))
    return WorkBuffers(*out, num_tiles=result[0], num_groups=result[1], chunk=result[2])


def plan_work_packed(buffer: np.ndarray, qo_indptr, kv_lens, kv_base, *, kv_indices=None, mask_offsets=None,
                     **kw) -> tuple[int, int, int]:
    """:func:`plan_work` into one packed host buffer, page ids included (the Pallas backend's
    plan buffer, one host-to-device copy).

    Args:
      buffer: C-contiguous int32 ``work [max_work_tiles, len(WORK_FIELDS)] | cta_indptr
        [num_ctas+1] | merge_indptr [G+1] | merge_dest [G, 4] | kv_indices [rest]`` with
        ``G = split_budget // 2`` (:class:`~jaxinfer.plan.layout.WorkLayout`); every entry is
        written.
      kv_indices: ``[nnz_pages]`` integer page ids to copy, zero-padded to the end of
        ``buffer`` (``None``: zeros).
      qo_indptr, kv_lens, kv_base, mask_offsets, **kw: as :func:`plan_work`.

    Returns:
      ``(num_tiles, num_groups, chunk)`` as in :class:`WorkBuffers`.

    Raises:
      ValueError: as :func:`plan_work`; ``buffer`` is not C-contiguous int32 or too small, or
        the page ids do not fit it.
    """
    args = PlanArgs(**kw)
    if buffer.dtype != np.int32 or buffer.ndim != 1 or not buffer.flags.c_contiguous or buffer.size < args.work_entries:
        raise ValueError(f"buffer must be C-contiguous int32 of at least {args.work_entries} entries, got {buffer.dtype}{buffer.shape}")
    pages = None if kv_indices is None else np.ascontiguousarray(kv_indices, _I32).reshape(-1)
    inputs = (*_inputs(qo_indptr, kv_lens, kv_base, mask_offsets), pages)
    result = (ctypes.c_int64 * 3)()
    plan_packed_at(args, native.address(buffer), buffer.size, inputs[1].size,
                   *(None if a is None else native.address(a) for a in inputs), 0 if pages is None else pages.size, result)
    return tuple(result)


def plan_packed_at(args: PlanArgs, buffer: int, size: int, batch: int, qo_indptr: int, kv_lens: int, kv_base: int,
                   mask_offsets: int | None, kv_indices: int | None, num_pages: int, result=None) -> None:
    """:func:`plan_work_packed` on data addresses, one native call (the Pallas backend's per-step
    path; ~0.6 us per numpy address lookup saved): ``buffer`` holds ``size`` int32 entries; the
    inputs are C-contiguous ``qo_indptr`` ``[batch + 1]``, ``kv_lens``, ``kv_base`` ``[batch]``
    int32, ``mask_offsets`` ``[batch]`` int64 or ``None``, ``kv_indices`` ``[num_pages]`` int32 or
    ``None``; ``result`` is ``None`` or a ctypes ``int64[3]`` for ``(num_tiles, num_groups,
    chunk)``. The caller keeps the arrays behind the addresses alive.

    Raises:
      ValueError: as :func:`plan_work_packed`.
    """
    _check(native.load().jaxinfer_plan_packed(args.native, batch, qo_indptr, kv_lens, kv_base, mask_offsets, kv_indices,
                                              num_pages, buffer, size, result))


def plan_work_in_jit(qo_indptr, kv_lens, kv_base, **static) -> tuple[jax.Array, ...]:
    """:func:`plan_work` inside ``jit`` through ``jax.pure_callback`` on traced index arrays.

    Takes the same keyword arguments (all static; ``max_work_tiles`` fixes the shapes) and
    returns ``(work, cta_indptr, merge_indptr, merge_dest)`` as int32 arrays. Costs a
    device-to-host round trip per call; prefer planning on the host before the jitted step.
    """
    max_groups = static["split_budget"] // 2
    shapes = (
        jax.ShapeDtypeStruct((static["max_work_tiles"], len(WORK_FIELDS)), jnp.int32),
        jax.ShapeDtypeStruct((static["num_ctas"] + 1,), jnp.int32),
        jax.ShapeDtypeStruct((max_groups + 1,), jnp.int32),
        jax.ShapeDtypeStruct((max_groups, len(MERGE_FIELDS)), jnp.int32),
    )

    def host(qo, kv, base):
        wb = plan_work(np.asarray(qo), np.asarray(kv), np.asarray(base), **static)
        return wb.work, wb.cta_indptr, wb.merge_indptr, wb.merge_dest

    return jax.pure_callback(host, shapes, qo_indptr, kv_lens, kv_base)
