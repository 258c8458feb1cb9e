"""Load-balanced work planner: compiled C++ on the host, static-capacity int32 work buffers for the device.

After the dynamism-aware scheduler of the FlashInfer paper (arXiv 2501.01005, sec. 3.3):

1. A *work tile* is (request, KV head, query tile, KV chunk). Its rows are the query tokens of the
   tile times the ``group_size`` query heads that share the KV head (GQA head-group packing), so
   one tile reads each key once for the whole group.
2. The KV range of a query tile is trimmed to the keys some row of it can see (causal and
   sliding-window bounds, bottom-right aligned), then split into chunks of ``chunk`` tokens
   (split-KV). ``chunk`` is the smallest multiple of ``block_n`` (and at least ``min_chunk``)
   whose total tile count fits ``split_budget``; when the unsplit tiles already fill it, no
   request is split.
3. Tiles are sorted by cost ``kv_len + 2 * rows`` (the paper's cost model), stable, and assigned
   to ``num_ctas`` persistent CTAs longest-processing-time first, a round of ``num_ctas`` tiles at
   a time against the loads sorted ascending (ties by CTA id): the round form of the min-heap
   assignment, with the same bound (a CTA's load exceeds the mean by at most one tile's cost).
4. Tiles of a split (request, KV head, query tile) write partial ``(o, lse)`` rows into
   contiguous *partial slots*; ``merge_indptr`` delimits each group of slots, which the merge
   kernel folds into the final rows.

Every buffer has a static capacity (``max_work_tiles`` tiles, ``split_budget`` partial slots,
``split_budget // 2`` merge groups), so a new batch composition never changes a shape.

The planner runs in C++ (``jaxinfer/csrc/planner.cc``, built and loaded by :mod:`jaxinfer.native`), one
call per plan, as FlashInfer's scheduler does: its numpy form cost ~50 numpy calls of 2-3 us each
at B=256 (benchmarks/NOTES-planner.md) and is kept as the test oracle, tests/planner_ref.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import native

# Columns of the ``work`` buffer, one row per work tile.
WORK_FIELDS = (
    "kv_head",  # KV head of the tile; its rows are query heads kv_head*G .. kv_head*G+G-1
    "q_row0",  # first query token of the tile (global row of the ragged q)
    "q_len",  # query tokens of the tile (rows = q_len * group_size)
    "q_pos0",  # position of the first token among the request's keys: index + kv_len - qo_len
    "kv_lo",  # first key of the tile's chunk (token index inside the request)
    "kv_hi",  # one past its last key
    "kv_base",  # request's first page in kv_indices (paged) or first token of the ragged KV
    "out_slot",  # -1: writes final rows; s >= 0: writes partial rows of slot s
    "valid",  # 1 for a real tile, 0 for padding
    "kv_len",  # keys of the request: the row stride of its custom mask
    "mask_base",  # custom-mask index of the tile's (first token, key 0): request offset + tok0 * kv_len
)
F = {name: i for i, name in enumerate(WORK_FIELDS)}
MERGE_FIELDS = ("kv_head", "q_row0", "q_len", "q_pos0")


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


def _int_array(name: str, x, dtype, size: int) -> np.ndarray:
    """``x`` as a C-contiguous ``[size]`` array of ``dtype`` (no copy when it is one already)."""
    a = np.ascontiguousarray(x, dtype)
    if a.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {a.shape}")
    return a


def count_query_tiles(qo_indptr: np.ndarray, tokens_per_tile: int) -> int:
    """Query tiles of a batch, ``sum(ceil(qo_len / tokens_per_tile))``: the unsplit plan's tiles
    per KV head. ``qo_indptr``: ``[B+1]`` int32, C-contiguous, non-decreasing."""
    return native.load().jaxinfer_count_query_tiles(qo_indptr.size - 1, native.address(qo_indptr), tokens_per_tile)


def _plan(qo_indptr, kv_lens, kv_base, mask_offsets, outputs, pages, page_capacity, *, num_kv_heads, group_size,
          block_m, block_n, causal, window_left, num_ctas, split_budget, max_work_tiles, split_kv=True, min_chunk=256):
    """Validate the inputs and run the native planner into the output addresses (``outputs``:
    work, cta_indptr, merge_indptr, merge_dest, page ids or ``None``). Returns ``(num_tiles,
    num_groups, chunk)``."""
    batch = np.size(kv_lens)
    qo_indptr = _int_array("qo_indptr", qo_indptr, np.int32, batch + 1)
    kv_lens = _int_array("kv_lens", kv_lens, np.int32, batch)
    kv_base = _int_array("kv_base", kv_base, np.int32, batch)
    if mask_offsets is not None:
        mask_offsets = _int_array("mask_offsets", mask_offsets, np.int64, batch)
    num_pages = 0
    if pages is not None:
        pages = np.ascontiguousarray(pages, np.int32)
        num_pages = pages.size
        if num_pages > page_capacity:
            raise ValueError(f"{num_pages} page ids do not fit the plan buffer's {page_capacity}")
    result = (ctypes.c_int64 * 3)()
    msg = ctypes.create_string_buffer(256)
    status = native.load().jaxinfer_plan_work(
        batch, native.address(qo_indptr), native.address(kv_lens), native.address(kv_base),
        None if mask_offsets is None else native.address(mask_offsets),
        num_kv_heads, group_size, block_m, block_n, bool(causal), window_left, num_ctas, split_budget, max_work_tiles,
        bool(split_kv), min_chunk, *outputs[:4], None if pages is None else native.address(pages), num_pages, outputs[4],
        page_capacity, result, msg, len(msg),
    )  # fmt: skip
    if status:
        raise ValueError(msg.value.decode())
    return tuple(result)


def _shapes(max_work_tiles: int, num_ctas: int, split_budget: int) -> tuple[tuple[int, ...], ...]:
    max_groups = split_budget // 2
    return (max_work_tiles, len(WORK_FIELDS)), (num_ctas + 1,), (max_groups + 1,), (max_groups, len(MERGE_FIELDS))


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
      mask_offsets: ``[B]`` offset of each request's row-major ``[qo_len, kv_len]`` custom mask in
        the flat mask (``None``: no custom mask; ``mask_base`` is then 0).
      out: ``(work, cta_indptr, merge_indptr, merge_dest)`` C-contiguous int32 arrays of the
        shapes of :class:`WorkBuffers` to write into; every entry is written. ``None``
        allocates them.

    Returns:
      :class:`WorkBuffers` (holding ``out``'s arrays when given).

    Raises:
      ValueError: the batch needs more than ``max_work_tiles`` tiles, an input has the wrong
        length, a size argument is out of range, or ``out`` has a wrong shape, dtype or layout.
      jaxinfer.native.NativeBuildError: the planner library cannot be built (no C++ compiler).
    """
    shapes = _shapes(kw["max_work_tiles"], kw["num_ctas"], kw["split_budget"])
    if out is None:
        out = tuple(np.empty(s, np.int32) for s in shapes)
    for name, a, shape in zip(("work", "cta_indptr", "merge_indptr", "merge_dest"), out, shapes):
        if a.shape != shape or a.dtype != np.int32 or not a.flags.c_contiguous:
            raise ValueError(f"out's {name} must be C-contiguous int32{shape}, got {a.dtype}{a.shape}")
    tiles, groups, chunk = _plan(qo_indptr, kv_lens, kv_base, mask_offsets, (*map(native.address, out), None), None, 0, **kw)
    return WorkBuffers(*out, num_tiles=tiles, num_groups=groups, chunk=chunk)


def plan_work_packed(buffer: np.ndarray, qo_indptr, kv_lens, kv_base, *, kv_indices=None, mask_offsets=None,
                     **kw) -> tuple[int, int, int]:
    """:func:`plan_work` into one packed host buffer, page ids included (the Pallas backend's
    plan buffer, one host-to-device copy).

    Args:
      buffer: C-contiguous int32 ``work [max_work_tiles, len(WORK_FIELDS)] | cta_indptr
        [num_ctas+1] | merge_indptr [G+1] | merge_dest [G, 4] | kv_indices [rest]`` with
        ``G = split_budget // 2`` (the layout of
        :class:`~jaxinfer.pallas.attention.KernelSpec`); every entry is written.
      kv_indices: ``[nnz_pages]`` integer page ids to copy, zero-padded to the end of
        ``buffer`` (``None``: zeros).
      qo_indptr, kv_lens, kv_base, mask_offsets, **kw: as :func:`plan_work`.

    Returns:
      ``(num_tiles, num_groups, chunk)`` as in :class:`WorkBuffers`.

    Raises:
      ValueError: as :func:`plan_work`; ``buffer`` is not C-contiguous int32 or too small.
    """
    sizes = [math.prod(s) for s in _shapes(kw["max_work_tiles"], kw["num_ctas"], kw["split_budget"])]
    offsets = list(itertools.accumulate(sizes, initial=0))
    if buffer.dtype != np.int32 or buffer.ndim != 1 or not buffer.flags.c_contiguous or buffer.size < offsets[-1]:
        raise ValueError(f"buffer must be C-contiguous int32 of at least {offsets[-1]} entries, got {buffer.dtype}{buffer.shape}")
    base = native.address(buffer)
    return _plan(qo_indptr, kv_lens, kv_base, mask_offsets, [base + 4 * o for o in offsets], kv_indices,
                 buffer.size - offsets[-1], **kw)


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
