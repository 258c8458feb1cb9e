"""The numpy form of :func:`jaxinfer.plan.planner.plan_work`: the independent oracle of the native planner.

This is the planner jaxinfer shipped before ``jaxinfer/csrc/planner.cc`` replaced it (same algorithm, see
jaxinfer/plan/planner.py's module doc); tests/plan/test_planner.py compares the two bit for bit.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.plan.layout import F, MERGE_FIELDS, WORK_FIELDS
from jaxinfer.plan.planner import WorkBuffers


def _ceil_div(a, b):
    return -(-a // b)


# A padding row of ``work``: invalid, writes nothing (``out_slot = -1``).
_PAD_TILE = np.zeros(len(WORK_FIELDS), np.int32)
_PAD_TILE[F["out_slot"]] = -1
# The constant columns of a query tile: valid, unsplit (writes final rows), from key 0 and
# without a custom mask unless set.
_QUERY_TILE = _PAD_TILE.copy()
_QUERY_TILE[F["valid"]] = 1


def _expand(counts):
    """``(owner, rank)``: ``owner = repeat(arange(n), counts)`` and each entry's index within its
    owner."""
    owner = np.repeat(np.arange(counts.size), counts)
    return owner, np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)


def _query_tiles(qo_indptr, kv_lens, kv_base, mask_offsets, tokens_per_tile, causal, window_left):
    """``[n, len(WORK_FIELDS)]`` int32: one row per query tile with every column but ``kv_head``
    (each KV head's tile copies it), the tile's whole visible key range as ``kv_lo:kv_hi``, and
    ``mask_base`` 0 without ``mask_offsets``."""
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]
    if qo_lens.size and qo_lens.min() >= 1 and qo_lens.max() <= tokens_per_tile:
        # One tile per request (decode): ``slice(None)`` and 0 index and broadcast like the
        # expanded request ids and tile ranks without building or gathering anything.
        req, j = slice(None), 0
    else:
        req, j = _expand(_ceil_div(qo_lens, tokens_per_tile))
    tok0 = j * tokens_per_tile
    qo = qo_lens[req]
    kv_len = kv_lens[req]
    ntok = np.minimum(tokens_per_tile, qo - tok0)
    q_pos0 = kv_len - qo + tok0
    hi = np.minimum(np.maximum(q_pos0 + ntok, 0), kv_len) if causal else kv_len
    tiles = np.empty((ntok.size, len(WORK_FIELDS)), np.int32)
    tiles[:] = _QUERY_TILE
    tiles[:, F["q_row0"]] = qo_indptr[:-1][req] + tok0
    tiles[:, F["q_len"]] = ntok
    tiles[:, F["q_pos0"]] = q_pos0
    if window_left >= 0:
        tiles[:, F["kv_lo"]] = np.minimum(np.maximum(q_pos0 - window_left, 0), hi)
    tiles[:, F["kv_hi"]] = hi
    tiles[:, F["kv_base"]] = kv_base[req]
    tiles[:, F["kv_len"]] = kv_len
    if mask_offsets is not None:
        # int64: the request's offset plus tok0 * kv_len may pass 2**31 before the int32 store
        # (the backend refuses masks of 2**31 elements or more).
        tiles[:, F["mask_base"]] = np.asarray(mask_offsets, np.int64)[req] + tok0 * kv_len.astype(np.int64)
    return tiles


# The chunk choice's weight of the most loaded CTA (planner.cc's kTailEighths).
TAIL_EIGHTHS = 3


def _chunk_makespan(blocks, k, num_kv_heads, num_ctas, tile_startup):
    """The model's time (x 8 num_ctas) of chunks of ``k`` steps, from every tile's cost."""
    nch = np.maximum(1, _ceil_div(blocks, k))
    steps = np.concatenate([[k] * (n - 1) + [b - (n - 1) * k] for b, n in zip(blocks.tolist(), nch.tolist())])
    costs = np.sort(np.repeat(steps, num_kv_heads) + tile_startup)[::-1]
    total = int(costs.sum())
    ranks = np.arange(0, costs.size, num_ctas)
    most = max(int(((ranks // num_ctas + 1) * costs[ranks]).max()) * num_ctas, total)
    return (8 - TAIL_EIGHTHS) * total + TAIL_EIGHTHS * most


def _chunk_size(kv_span, num_kv_heads, block_n, split_budget, min_chunk, num_ctas, tile_startup):
    """The chunk (multiple of block_n, >= min_chunk) of least makespan whose tiles fit split_budget."""
    longest = int(kv_span.max(initial=0))
    kmin = max(1, _ceil_div(min_chunk, block_n))
    if kv_span.size * num_kv_heads >= split_budget or longest <= kmin * block_n:
        return 0
    # ceil(span / (k * block_n)) == ceil(ceil(span / block_n) / k): search on block counts.
    blocks = _ceil_div(kv_span, block_n).astype(np.int64)

    def count(k):
        return num_kv_heads * int(np.maximum(1, _ceil_div(blocks, k)).sum())

    longest_blocks = _ceil_div(longest, block_n)
    smallest = next(k for k in range(kmin, max(kmin, longest_blocks) + 1) if count(k) <= split_budget)
    # Chunk counts of the longest range from 1 up; the first of equal times (fewest tiles) wins.
    candidates = dict.fromkeys(max(smallest, _ceil_div(longest_blocks, m))
                               for m in range(1, _ceil_div(longest_blocks, smallest) + 1))
    best = min(candidates, key=lambda k: _chunk_makespan(blocks, k, num_kv_heads, num_ctas, tile_startup))
    return 0 if best >= longest_blocks else best * block_n


def _assign_lpt(sorted_cost, num_ctas):
    """LPT in rounds (module doc) over tiles sorted longest first.

    Returns ``(by_cta, per_cta)``: positions in the sorted order grouped by CTA (longest first
    within a CTA), and tiles per CTA.
    """
    n = sorted_cost.size
    # int16 CTA ids let numpy's stable argsort use radix sort (3x faster than int64 here).
    cta = np.empty(n, np.int16 if num_ctas < 2**15 else np.int64)
    load = np.zeros(num_ctas, np.int64)
    for start in range(0, n, num_ctas):
        least = np.argsort(load, kind="stable") if start else np.arange(num_ctas)
        if sorted_cost[start] == sorted_cost[-1]:
            # Equal costs from here on keep the load order, so the rest goes round-robin.
            cta[start:] = np.take(least, np.arange(n - start), mode="wrap")
            break
        c = sorted_cost[start : start + num_ctas]
        cta[start : start + c.size] = least[: c.size]
        load[least[: c.size]] += c
    return np.argsort(cta, kind="stable"), np.bincount(cta, minlength=num_ctas)


def _merge_groups(pair_nch, q_tiles, num_kv_heads, merge_indptr, merge_dest) -> int:
    """Fill ``merge_indptr``/``merge_dest`` for the (query tile, KV head) pairs split into more
    than one chunk (``pair_nch is None``: nothing is split); returns the number of groups."""
    merge_dest[:] = 0
    if pair_nch is None:
        merge_indptr[:] = 0
        return 0
    groups = np.flatnonzero(pair_nch > 1)
    ng = groups.size
    merge_indptr[0] = 0
    merge_indptr[1 : ng + 1] = pair_nch[groups].cumsum()
    merge_indptr[ng + 1 :] = merge_indptr[ng]
    gq, gh = np.divmod(groups, num_kv_heads)
    merge_dest[:ng] = q_tiles[gq][:, [F[name] for name in MERGE_FIELDS]]
    merge_dest[:ng, 0] = gh
    return ng


def plan_work_ref(
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
    kv_major: bool = False,
    row_cost: int = 2,
    tile_startup: int = 2,
    mask_offsets=None,
) -> WorkBuffers:
    """:func:`jaxinfer.plan.planner.plan_work` in numpy (same arguments but ``out``, same result).

    Raises:
      ValueError: the batch needs more than ``max_work_tiles`` tiles (``kv_major``: more than
        ``num_ctas``).
    """
    tpt = max(1, block_m // group_size)
    q_tiles = _query_tiles(np.asarray(qo_indptr), np.asarray(kv_lens), np.asarray(kv_base), mask_offsets, tpt, causal, window_left)
    lo, hi = q_tiles[:, F["kv_lo"]], q_tiles[:, F["kv_hi"]]
    span = hi - lo
    chunk = _chunk_size(span, num_kv_heads, block_n, split_budget, min_chunk, num_ctas, tile_startup) if split_kv else 0
    max_groups = split_budget // 2
    shapes = ((max_work_tiles, len(WORK_FIELDS)), (num_ctas + 1,), (max_groups + 1,), (max_groups, len(MERGE_FIELDS)))
    work, cta_indptr, merge_indptr, merge_dest = (np.empty(s, np.int32) for s in shapes)

    # Tiles are ordered (query tile, KV head, chunk), so a split group's slots are contiguous.
    q_cost = span + row_cost * group_size * q_tiles[:, F["q_len"]].astype(np.int64)
    nch = np.maximum(1, _ceil_div(span, chunk)) if chunk else None
    pair_nch = np.repeat(nch, num_kv_heads) if nch is not None and nch.max(initial=1) > 1 else None
    if pair_nch is not None:
        t_pair, t_chunk = _expand(pair_nch)
        t_q = t_pair // num_kv_heads
        kv_lo = lo[t_q] + t_chunk * chunk
        kv_hi = np.minimum(hi[t_q], kv_lo + chunk)
        split = pair_nch[t_pair] > 1
        slot = np.where(split, np.cumsum(split) - 1, -1)
        cost = (kv_hi - kv_lo) + (q_cost - span)[t_q]
        order = np.argsort(-cost, kind="stable")
        sorted_cost = cost[order]
    else:
        # Unsplit, tile = query tile * Hkv + head and the heads of a query tile cost the same:
        # sorting the query tiles (stable) gives the order a stable sort of all tiles would.
        q_order = np.argsort(-q_cost, kind="stable")
        sorted_cost = np.repeat(q_cost[q_order], num_kv_heads)
    num_tiles = sorted_cost.size
    if num_tiles > max_work_tiles:
        raise ValueError(f"max_work_tiles={max_work_tiles} is smaller than the batch's {num_tiles} work tiles")
    if kv_major:
        # One tile per CTA, (request, KV head)-major, longest key range first: lexsort (stable)
        # of the sorted positions by their tiles' kv_base, KV head and lo - hi.
        if num_tiles > num_ctas:
            raise ValueError(f"kv_major runs one tile per CTA: num_ctas={num_ctas} is less than the plan's {num_tiles} work tiles")
        if pair_nch is not None:
            s_q, s_head = np.divmod(t_pair[order], num_kv_heads)
            s_span = kv_hi[order] - kv_lo[order]
        else:
            rank, s_head = np.divmod(np.arange(num_tiles), num_kv_heads)
            s_q = q_order[rank]
            s_span = span[s_q]
        by_cta = np.lexsort((-s_span.astype(np.int64), s_head, q_tiles[s_q, F["kv_base"]]))
        per_cta = (np.arange(num_ctas) < num_tiles).astype(np.int64)
    else:
        by_cta, per_cta = _assign_lpt(sorted_cost, num_ctas)

    tiles = work[:num_tiles]
    if pair_nch is not None:
        perm = order[by_cta]  # tile at each row of ``work``
        tq, head = np.divmod(t_pair[perm], num_kv_heads)
    else:
        rank, head = np.divmod(by_cta, num_kv_heads)
        tq = q_order[rank]
    # The indices are in range; mode="clip" keeps numpy from buffering the write into ``out``.
    np.take(q_tiles, tq, axis=0, out=tiles, mode="clip")
    tiles[:, F["kv_head"]] = head
    if pair_nch is not None:
        tiles[:, F["kv_lo"]] = kv_lo[perm]
        tiles[:, F["kv_hi"]] = kv_hi[perm]
        tiles[:, F["out_slot"]] = slot[perm]
    work[num_tiles:] = _PAD_TILE
    cta_indptr[0] = 0
    cta_indptr[1:] = per_cta.cumsum()
    ng = _merge_groups(pair_nch, q_tiles, num_kv_heads, merge_indptr, merge_dest)
    return WorkBuffers(work, cta_indptr, merge_indptr, merge_dest, num_tiles, int(ng), int(chunk))
