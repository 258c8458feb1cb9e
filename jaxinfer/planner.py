"""Load-balanced work planner: numpy on the host, static-capacity int32 work buffers for the device.

After the dynamism-aware scheduler of the FlashInfer paper (arXiv 2501.01005, sec. 3.3):

1. A *work tile* is (request, KV head, query tile, KV chunk). Its rows are the query tokens of the
   tile times the ``group_size`` query heads that share the KV head (GQA head-group packing), so
   one tile reads each key once for the whole group.
2. The KV range of a query tile is trimmed to the keys some row of it can see (causal and
   sliding-window bounds, bottom-right aligned), then split into chunks of ``chunk`` tokens
   (split-KV). ``chunk`` is the smallest multiple of ``block_n`` (and at least ``min_chunk``)
   whose total tile count fits ``split_budget``; when the unsplit tiles already fill it, no
   request is split.
3. Tiles are sorted by cost ``kv_len + 2 * rows`` (the paper's cost model) and assigned to
   ``num_ctas`` persistent CTAs longest-processing-time first, a round of ``num_ctas`` tiles at a
   time against the loads sorted ascending: the vectorised form of the min-heap assignment, with
   the same bound (a CTA's load exceeds the mean by at most one tile's cost).
4. Tiles of a split (request, KV head, query tile) write partial ``(o, lse)`` rows into
   contiguous *partial slots*; ``merge_indptr`` delimits each group of slots, which the merge
   kernel folds into the final rows.

Every buffer has a static capacity (``max_work_tiles`` tiles, ``split_budget`` partial slots,
``split_budget // 2`` merge groups), so a new batch composition never changes a shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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


def _ceil_div(a, b):
    return -(-a // b)


def _expand(counts):
    """``(owner, rank)``: ``owner = repeat(arange(n), counts)`` and each entry's index within its
    owner (the common all-ones case, e.g. decode, skips the repeats)."""
    if counts.size and counts.min() == 1 == counts.max():
        return np.arange(counts.size), np.zeros(counts.size, np.int64)
    owner = np.repeat(np.arange(counts.size), counts)
    return owner, np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)


def _query_tiles(qo_lens, kv_lens, tokens_per_tile, causal, window_left):
    """Per query tile: request, first token offset, tokens, q_pos0 and the visible key range."""
    req, j = _expand(_ceil_div(qo_lens, tokens_per_tile))
    tok0 = j * tokens_per_tile
    ntok = np.minimum(tokens_per_tile, qo_lens[req] - tok0)
    kv_len = kv_lens[req]
    q_pos0 = tok0 + kv_len - qo_lens[req]
    hi = np.minimum(np.maximum(q_pos0 + ntok, 0), kv_len) if causal else kv_len
    lo = np.minimum(np.maximum(q_pos0 - window_left, 0), hi) if window_left >= 0 else np.zeros_like(hi)
    return req, tok0, ntok, q_pos0, lo, hi


def _chunk_size(kv_span, num_kv_heads, block_n, split_budget, min_chunk):
    """Smallest chunk (multiple of block_n, >= min_chunk) whose tile count fits split_budget."""
    longest = int(kv_span.max(initial=0))
    kmin = max(1, _ceil_div(min_chunk, block_n))
    if kv_span.size * num_kv_heads >= split_budget or longest <= kmin * block_n:
        return 0

    def count(k):
        return num_kv_heads * int(np.maximum(1, _ceil_div(kv_span, k * block_n)).sum())

    lo, hi = kmin, max(kmin, _ceil_div(longest, block_n))
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= split_budget:
            hi = mid
        else:
            lo = mid + 1
    return lo * block_n


def _assign_lpt(cost, num_ctas):
    """Tile order grouped by CTA (longest first) and tiles per CTA: LPT in rounds (module doc)."""
    order = np.argsort(-cost, kind="stable")
    cta = np.empty(cost.size, np.int64)  # CTA of the tile at each position of ``order``
    load = np.zeros(num_ctas, np.int64)
    sorted_cost = cost[order]
    for start in range(0, cost.size, num_ctas):
        least = np.argsort(load, kind="stable")
        if sorted_cost[start] == sorted_cost[-1]:
            # Equal costs from here on keep the load order, so the rest goes round-robin.
            cta[start:] = least[np.arange(cost.size - start) % num_ctas]
            break
        c = sorted_cost[start : start + num_ctas]
        cta[start : start + c.size] = least[: c.size]
        load[least[: c.size]] += c
    by_cta = np.argsort(cta, kind="stable")
    return order[by_cta], np.bincount(cta, minlength=num_ctas)


def plan_work(
    qo_indptr,
    kv_lens,
    kv_base,
    *,
    num_kv_heads: int,
    group_size: int,
    block_m: int,
    block_n: int,
    causal: bool,
    window_left: int,
    num_ctas: int,
    split_budget: int,
    max_work_tiles: int,
    split_kv: bool = True,
    min_chunk: int = 256,
    mask_offsets=None,
) -> WorkBuffers:
    """Plan one batch (host, numpy).

    Args:
      qo_indptr: ``[B+1]`` query row pointer.
      kv_lens: ``[B]`` keys per request.
      kv_base: ``[B]`` first page of each request in ``kv_indices`` (paged) or first token of the
        ragged KV; copied into the tiles.
      num_kv_heads, group_size: ``Hkv`` and ``Hq / Hkv``.
      block_m, block_n: the kernel's row tile (query tokens x group heads) and key step.
      causal, window_left: the mask, used to trim each query tile's key range.
      num_ctas: persistent CTAs of the attention kernel.
      split_budget: most tiles a split plan may have; also the partial-slot capacity.
      max_work_tiles: capacity of ``work``.
      split_kv: ``False`` never splits a request's KV.
      min_chunk: smallest KV chunk (tokens) of a split.
      mask_offsets: ``[B]`` offset of each request's row-major ``[qo_len, kv_len]`` custom mask in
        the flat mask (``None``: no custom mask; ``mask_base`` is then 0).

    Returns:
      :class:`WorkBuffers`.

    Raises:
      ValueError: the batch needs more than ``max_work_tiles`` tiles.
    """
    qo_indptr = np.asarray(qo_indptr, np.int64)
    kv_lens = np.asarray(kv_lens, np.int64)
    kv_base = np.asarray(kv_base, np.int64)
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]
    tpt = max(1, block_m // group_size)
    req, tok0, ntok, q_pos0, lo, hi = _query_tiles(qo_lens, kv_lens, tpt, causal, window_left)
    span = hi - lo
    chunk = _chunk_size(span, num_kv_heads, block_n, split_budget, min_chunk) if split_kv else 0
    nch = np.maximum(1, _ceil_div(span, chunk)) if chunk else np.ones_like(span)

    # Tiles ordered (query tile, KV head, chunk) so that a split group's slots are contiguous.
    pair_q = np.repeat(np.arange(req.size), num_kv_heads)
    pair_head = np.arange(pair_q.size) % num_kv_heads
    pair_nch = nch[pair_q]
    t_pair, t_chunk = _expand(pair_nch)
    t_q = pair_q[t_pair]
    num_tiles = t_pair.size
    if num_tiles > max_work_tiles:
        raise ValueError(f"max_work_tiles={max_work_tiles} is smaller than the batch's {num_tiles} work tiles")
    kv_lo = lo[t_q] + t_chunk * chunk
    kv_hi = np.minimum(hi[t_q], kv_lo + chunk) if chunk else hi[t_q]
    if chunk:
        split = pair_nch[t_pair] > 1
        slot = np.where(split, np.cumsum(split) - 1, -1)
    else:
        slot = np.full(num_tiles, -1)

    cost = (kv_hi - kv_lo) + 2 * ntok[t_q] * group_size
    perm, per_cta = _assign_lpt(cost, num_ctas)

    work = np.zeros((max_work_tiles, len(WORK_FIELDS)), np.int32)
    work[:, F["out_slot"]] = -1
    t_req = req[t_q]
    cols = np.empty((len(WORK_FIELDS), num_tiles), np.int32)
    cols[F["kv_head"]] = pair_head[t_pair]
    cols[F["q_row0"]] = qo_indptr[t_req] + tok0[t_q]
    cols[F["q_len"]] = ntok[t_q]
    cols[F["q_pos0"]] = q_pos0[t_q]
    cols[F["kv_lo"]] = kv_lo
    cols[F["kv_hi"]] = kv_hi
    cols[F["kv_base"]] = kv_base[t_req]
    cols[F["out_slot"]] = slot
    cols[F["valid"]] = 1
    cols[F["kv_len"]] = kv_lens[t_req]
    base = 0 if mask_offsets is None else np.asarray(mask_offsets, np.int64)[t_req]
    cols[F["mask_base"]] = base + tok0[t_q] * kv_lens[t_req]
    work[:num_tiles] = cols.T[perm]
    cta_indptr = np.zeros(num_ctas + 1, np.int32)
    np.cumsum(per_cta, out=cta_indptr[1:])

    groups = np.flatnonzero(pair_nch > 1)
    max_groups = split_budget // 2
    merge_indptr = np.zeros(max_groups + 1, np.int32)
    merge_indptr[1 : groups.size + 1] = np.cumsum(pair_nch[groups])
    merge_indptr[groups.size + 1 :] = merge_indptr[groups.size]
    merge_dest = np.zeros((max_groups, len(MERGE_FIELDS)), np.int32)
    gq = pair_q[groups]
    merge_dest[: groups.size, 0] = pair_head[groups]
    merge_dest[: groups.size, 1] = qo_indptr[req[gq]] + tok0[gq]
    merge_dest[: groups.size, 2] = ntok[gq]
    merge_dest[: groups.size, 3] = q_pos0[gq]
    return WorkBuffers(work, cta_indptr, merge_indptr, merge_dest, num_tiles, int(groups.size), int(chunk))


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
