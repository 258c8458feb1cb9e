"""A pool of KV-cache pages shared by the requests of a serving engine, with a prefix cache.

The host keeps the bookkeeping in numpy and plain Python (free list, pages and length of each
request, reference counts, the prefix tree); the device keeps the cache arrays, one
``(k_cache, v_cache)`` pair per layer in jaxinfer's paged layout (shared/DESIGN.md section 3). The
page table of any subset of requests comes out as a BSR triple ``(kv_indptr, kv_indices,
kv_last_page_len)`` ready for a wrapper's ``plan`` (FlashInfer paper, arXiv 2501.01005, sec. 3.1:
the KV cache as a block-sparse matrix).

Prefix caching (the radix KV cache of SGLang, Zheng et al. 2024, "SGLang: Efficient Execution of
Structured Language Model Programs", sec. 3, restricted to whole pages): a *full* page whose
tokens were written can be registered in a prefix tree whose edges are the page's token ids, so a
later request that starts with the same tokens attaches those pages instead of computing them
again. Pages are reference-counted: ``refcount(page)`` is the number of live requests holding it.
Only full pages are ever shared and a request writes only past its attached prefix, so a shared
page is never written (no copy-on-write). A page is in exactly one state:

- free: refcount 0, not in the tree (on the free list);
- cached: refcount 0, in the tree (its contents kept for a later match; reclaimed least recently
  used first when the free list runs dry);
- held: refcount >= 1; a page held by two or more requests is full and was matched through
  the tree (a request holding a page of the tree holds the page's whole path from the root).

FP8 caches (:mod:`jaxinfer.fp8`): a pool in ``float8_e4m3fn`` or ``float8_e5m2`` holds ``K /
k_scale`` and ``V / v_scale`` with fixed per-tensor or per-KV-head scales (:attr:`KVCachePool.k_scale`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Hashable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxinfer import fp8
from jaxinfer.plan.checks import check_int


def kv_scale(name: str, scale, num_kv_heads: int) -> np.ndarray:
    """A fixed KV-cache scale as ``[num_kv_heads]`` float32: from a number (per tensor) or a
    sequence / array of ``num_kv_heads`` numbers (per KV head).

    Raises:
      ValueError: naming ``name``: not a number or numbers, a value not finite and > 0, or a
        sequence whose length is not ``num_kv_heads``.
    """
    try:
        values = np.asarray(scale)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a float or {num_kv_heads} floats (per KV head), got {scale!r}") from e
    if values.shape not in ((), (num_kv_heads,)):
        raise ValueError(f"{name} must be a float or {num_kv_heads} floats (per KV head), got shape {values.shape}")
    fp8.check_scale_value(name, scale if isinstance(scale, (bool, np.bool_)) else values)
    return np.broadcast_to(values.astype(np.float32), (num_kv_heads,)).copy()


def _ints(tokens: Sequence[int]) -> list[int]:
    """Token ids as Python ints (the prefix tree's keys); an integer array converts at once."""
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind in "iu":
        return tokens.tolist()
    return [int(t) for t in tokens]


class OutOfPagesError(RuntimeError):
    """The pool has fewer free and cached pages than an allocation needs (nothing was allocated)."""


@dataclasses.dataclass(eq=False)
class _Node:
    """A page of the prefix tree: its id, its token ids (the edge from ``parent``) and children."""

    page: int
    key: tuple[int, ...]
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = dataclasses.field(default_factory=dict)
    last_use: int = 0


class KVCachePool:
    """Pages of a paged KV cache, allocated to requests on the host.

    Args:
      num_pages: pages in the cache (per layer).
      page_size: tokens per page.
      num_layers: decoder layers; each gets its own ``(k_cache, v_cache)``.
      num_kv_heads, head_dim: KV head geometry.
      dtype: cache dtype; a short name of :data:`jaxinfer.fp8.KV_DTYPE_NAMES` (``"e4m3"``) or
        anything ``jnp.dtype`` takes.
      k_scale, v_scale: scales of an fp8 cache (``float8_e4m3fn``/``float8_e5m2``), fixed for the
        pool's life: a float (per tensor) or ``num_kv_heads`` floats (per KV head), finite and
        > 0; ``None``: 1.0. The cache holds ``K / k_scale`` saturated to the fp8 range (so with
        unit scales e4m3 clips keys and values past ±448, e5m2 past ±57344). Not accepted for
        other dtypes (they store K and V as they are).
      kv_layout: ``"NHD"`` (caches ``[num_pages, page_size, Hkv, D]``) or ``"HND"``
        (``[num_pages, Hkv, page_size, D]``).

    Attributes:
      k_scale, v_scale: ``[num_kv_heads]`` float32 numpy scales of an fp8 pool; ``None`` otherwise.
      caches: tuple over layers of ``(k_cache, v_cache)``; a jitted step returns new caches and the
        caller stores them back here.

    Raises:
      ValueError: non-positive sizes, an unknown ``kv_layout`` or ``dtype`` (naming ``kv_dtype``),
        or a bad scale or a scale for a cache that is not fp8 (naming ``k_scale``/``v_scale``).
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype=jnp.bfloat16,
        kv_layout: str = "NHD",
        k_scale=None,
        v_scale=None,
    ):
        num_pages, page_size, num_layers, num_kv_heads, head_dim = (
            check_int(name, val, minimum=1)
            for name, val in (
                ("num_pages", num_pages),
                ("page_size", page_size),
                ("num_layers", num_layers),
                ("num_kv_heads", num_kv_heads),
                ("head_dim", head_dim),
            )
        )
        if kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_layout = kv_layout
        self.dtype = fp8.kv_dtype(dtype)
        if fp8.is_fp8(self.dtype):
            self.k_scale = kv_scale("k_scale", 1.0 if k_scale is None else k_scale, num_kv_heads)
            self.v_scale = kv_scale("v_scale", 1.0 if v_scale is None else v_scale, num_kv_heads)
        else:
            for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
                if scale is not None:
                    raise ValueError(f"{name} is for fp8 caches ({', '.join(d.name for d in fp8.FP8_KV_DTYPES)}), "
                                     f"not {self.dtype.name}")
            self.k_scale = self.v_scale = None
        if kv_layout == "NHD":
            shape = (num_pages, page_size, num_kv_heads, head_dim)
        else:
            shape = (num_pages, num_kv_heads, page_size, head_dim)
        self.caches = tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(num_layers))
        # Pop from the end: lowest page ids are handed out first, which keeps runs reproducible.
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = np.zeros(num_pages, np.int64)
        # Per request a row ("slot") of numpy tables, kept as requests come and grow, so a step's
        # page table is a gather of rows, not a rebuild from Python lists: its page ids
        # (_table[slot, :_counts[slot]]), its page count and its length in tokens. Slots of freed
        # requests are reused; rows and columns grow by doubling.
        self._slots: dict[Hashable, int] = {}  # in order of addition (``requests``)
        self._free_slots = list(range(7, -1, -1))
        self._table = np.zeros((8, min(num_pages, 64)), np.int32)
        self._counts = np.zeros(8, np.int64)
        self._lens = np.zeros(8, np.int64)
        self._root = _Node(page=-1, key=(), parent=None)
        self._nodes: dict[int, _Node] = {}  # page id -> its tree node
        self._num_cached = 0  # pages in the tree with refcount 0
        # Deepest tree node on each request's path (None: the request no longer registers pages)
        # and how many of its pages lie on that path.
        self._path: dict[Hashable, tuple[_Node | None, int]] = {}
        self._clock = itertools.count(1)

    # ------------------------------------------------------------------ counts

    @property
    def num_free_pages(self) -> int:
        """Pages on the free list (refcount 0, not in the prefix tree)."""
        return len(self._free)

    @property
    def num_cached_pages(self) -> int:
        """Pages kept by the prefix tree that no request holds (reclaimable)."""
        return self._num_cached

    @property
    def num_available_pages(self) -> int:
        """Pages an allocation may take: free plus cached (reclaimed least recently used first)."""
        return len(self._free) + self._num_cached

    @property
    def requests(self) -> tuple[Hashable, ...]:
        return tuple(self._slots)

    def refcount(self, page: int) -> int:
        """Live requests holding ``page``."""
        return int(self._refs[page])

    def refcounts(self, pages: np.ndarray) -> np.ndarray:
        """:meth:`refcount` of each of ``pages`` (int64, the shape of ``pages``)."""
        return self._refs[pages]

    def in_prefix_tree(self, page: int) -> bool:
        return page in self._nodes

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens.

        Raises:
          ValueError: ``num_tokens`` is not an integer ``>= 0`` (bools and floats are not).
        """
        return -(-check_int("num_tokens", num_tokens, minimum=0, maximum=None) // self.page_size)

    def seq_len(self, rid: Hashable) -> int:
        """Tokens stored (or reserved by ``extend``) for request ``rid``."""
        return int(self._lens[self._slots[rid]])

    def seq_lens(self, rids: Sequence[Hashable]) -> np.ndarray:
        """``[len(rids)]`` int64 :meth:`seq_len` of each request.

        Raises:
          KeyError: an unknown request (the first one, as the key).
        """
        return self._lens[self._slots_of(rids)]

    def pages(self, rid: Hashable) -> tuple[int, ...]:
        slot = self._slots[rid]
        return tuple(self._table[slot, : self._counts[slot]].tolist())

    # ------------------------------------------------------------------ requests

    def add(self, rid: Hashable, prefix_tokens: Sequence[int] = ()) -> int:
        """Register request ``rid``, attaching the longest cached prefix of ``prefix_tokens``.

        Only whole pages are matched: the request starts with ``k * page_size`` tokens, its
        first ``k`` pages shared with the requests that hold them (``refcount`` + 1). Pass the
        tokens whose keys and values the request may reuse (a serving engine passes the prompt
        less its last token, whose logits it needs).

        Returns:
          Tokens attached (a multiple of ``page_size``; 0 without a match).

        Raises:
          ValueError: ``rid`` is already in the pool.
        """
        if rid in self._slots:
            raise ValueError(f"request {rid!r} is already in the pool")
        node, pages = self._root, []
        ps, tokens = self.page_size, _ints(prefix_tokens)
        now = next(self._clock)
        for start in range(0, len(tokens) - ps + 1, ps):
            child = node.children.get(tuple(tokens[start : start + ps]))
            if child is None:
                break
            node = child
            node.last_use = now
            pages.append(node.page)
        for p in pages:
            self._hold(p)
        slot = self._new_slot(rid)
        self._reserve(len(pages))
        self._table[slot, : len(pages)] = pages
        self._counts[slot] = len(pages)
        self._lens[slot] = len(pages) * ps
        self._path[rid] = (node, len(pages))
        return len(pages) * ps

    def extend(self, rid: Hashable, num_tokens: int) -> np.ndarray:
        """Grow request ``rid`` by ``num_tokens`` tokens, allocating the pages this needs.

        Free pages go first; when they run out, cached pages that no request holds are reclaimed,
        least recently used leaves of the prefix tree first.

        Returns:
          ``[num_tokens]`` int32 positions of the new tokens in the request (its old length on).

        Raises:
          KeyError: unknown ``rid``.
          ValueError: ``num_tokens`` is not an integer ``>= 0`` (bools and floats are not), or the
            request would grow past the int32 range of positions.
          OutOfPagesError: not enough free and cached pages; the pool is left unchanged.
        """
        slot = self._slots[rid]
        old = int(self._lens[slot])
        num_tokens = check_int("num_tokens", num_tokens, minimum=0, maximum=np.iinfo(np.int32).max - old)
        count = int(self._counts[slot])
        need = self.pages_for(old + num_tokens) - count
        if need > self.num_available_pages:
            raise OutOfPagesError(
                f"request {rid!r} needs {need} more page(s) of {self.page_size} tokens for "
                f"{num_tokens} new token(s), but only {len(self._free)} free and {self._num_cached} cached "
                f"of {self.num_pages} pages are available"
            )
        if need > len(self._free):
            self._reclaim(need - len(self._free))
        if need:
            self._reserve(count + need)
            pages = self._free[: -need - 1 : -1]  # popped from the end, as ``list.pop`` would
            del self._free[-need:]
            self._refs[pages] = 1
            self._table[slot, count : count + need] = pages
            self._counts[slot] = count + need
        self._lens[slot] = old + num_tokens
        return np.arange(old, old + num_tokens, dtype=np.int32)

    def extend_batch(self, rids: Sequence[Hashable], num_tokens: Sequence[int]) -> None:
        """:meth:`extend` each request ``rids[i]`` by ``num_tokens[i]`` tokens, in that order (the
        same pages as those calls), all or nothing: a serving step's growth in one call.

        Raises:
          KeyError: an unknown request.
          ValueError: naming the argument: a request listed twice, lengths that differ, a count
            that is not an integer ``>= 0`` or one that takes a request past the int32 range.
          OutOfPagesError: the requests need more pages than are free and cached together; the
            pool is left unchanged.
        """
        slots = self._slots_of(rids)
        if len(set(slots.tolist())) != len(slots):
            raise ValueError("rids: a request may appear only once")
        n = np.asarray(num_tokens)
        if n.shape != slots.shape or (n.size and n.dtype.kind not in "iu"):
            raise ValueError(f"num_tokens must be {len(slots)} integers (one per request), got {n.dtype} of shape "
                             f"{n.shape}")
        n = n.astype(np.int64)
        new = self._lens[slots] + n
        if n.size and (n.min() < 0 or new.max() > np.iinfo(np.int32).max):
            raise ValueError("num_tokens must be integers >= 0 that keep every request within the int32 range, "
                             f"got {n.tolist()}")
        need = -(-new // self.page_size) - self._counts[slots]
        total = int(need.sum())
        if total > self.num_available_pages:
            raise OutOfPagesError(
                f"{len(slots)} requests need {total} more page(s) of {self.page_size} tokens, but only "
                f"{len(self._free)} free and {self._num_cached} cached of {self.num_pages} pages are available"
            )
        if total > len(self._free):
            # Reclaiming interleaves with the allocations (which pages each request gets):
            # one request at a time, as separate calls would.
            for rid, k in zip(rids, n.tolist()):
                self.extend(rid, k)
            return
        if total:
            grow = need > 0
            rows, counts, need = slots[grow], self._counts[slots][grow], need[grow]
            self._reserve(int((counts + need).max()))
            pages = np.asarray(self._free[: -total - 1 : -1], np.int32)
            del self._free[-total:]
            self._refs[pages] = 1
            starts = np.cumsum(need) - need
            local = np.arange(total) - np.repeat(starts, need)
            self._table[np.repeat(rows, need), np.repeat(counts, need) + local] = pages
            self._counts[rows] = counts + need
        self._lens[slots] = new

    def cache_prefix(self, rid: Hashable, tokens: Sequence[int]) -> None:
        """Register the full pages of request ``rid`` that hold ``tokens`` in the prefix tree.

        ``tokens`` are the request's first ``len(tokens)`` tokens, whose keys and values are in
        the cache (written by a step that already ran). Pages already registered are skipped;
        a page whose tokens the tree already holds on another page (two requests computed the
        same prefix at once) ends the request's registration: its later pages would hang below
        a page it does not hold.

        Raises:
          KeyError: unknown ``rid``.
          ValueError: more tokens than the request holds.
        """
        node, done = self._path[rid]
        slot = self._slots[rid]
        if len(tokens) > self._lens[slot]:
            raise ValueError(f"request {rid!r} holds {self._lens[slot]} tokens, got {len(tokens)} to cache")
        if node is None:
            return
        ps, first, full = self.page_size, done, len(tokens) // self.page_size
        pages = self._table[slot, first:full].tolist()
        ids = _ints(tokens[first * ps : full * ps])
        now = next(self._clock)
        for i in range(first, full):
            key, page = tuple(ids[(i - first) * ps : (i - first + 1) * ps]), pages[i - first]
            child = node.children.get(key)
            if child is not None:
                if child.page != page:
                    self._path[rid] = (None, i)
                    return
            else:
                child = _Node(page=page, key=key, parent=node)
                node.children[key] = child
                self._nodes[page] = child
            child.last_use = now
            node, done = child, i + 1
        self._path[rid] = (node, done)

    def free(self, rid: Hashable) -> None:
        """Remove request ``rid``: its pages' refcounts drop; a page no request holds goes back to
        the free list, or stays cached when the prefix tree has it.

        Raises:
          KeyError: unknown ``rid``.
        """
        slot = self._slots.pop(rid)
        del self._path[rid]
        self._free_slots.append(slot)
        pages = self._table[slot, self._counts[slot] - 1 :: -1] if self._counts[slot] else self._table[slot, :0]
        self._refs[pages] -= 1  # a request holds a page once
        now = next(self._clock)
        for page in pages[self._refs[pages] == 0].tolist():  # in reverse order, as before
            if page in self._nodes:
                self._nodes[page].last_use = now
                self._num_cached += 1
            else:
                self._free.append(page)

    def clear_prefix_cache(self) -> None:
        """Return every cached page (in the tree, held by no request) to the free list; pages that
        live requests hold stay (they leave the tree, so nothing new attaches to them)."""
        self._reclaim(self._num_cached)
        for node in self._nodes.values():
            node.children.clear()
        self._nodes.clear()
        self._root.children.clear()
        for rid in self._path:
            self._path[rid] = (None, 0)

    def page_table(self, rids: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BSR page table of ``rids`` in that order (shared pages appear once per request).

        Returns:
          ``(kv_indptr [B+1], kv_indices [nnz_pages], kv_last_page_len [B])`` int32; a request with
          no tokens has no pages and ``last_page_len`` 0.

        Raises:
          KeyError: unknown request.
        """
        slots = self._slots_of(rids)
        counts = self._counts[slots]
        kv_indptr = np.zeros(len(slots) + 1, np.int32)
        np.cumsum(counts, out=kv_indptr[1:])
        width = int(counts.max(initial=0))
        rows = self._table[slots, :width]
        kv_indices = rows[np.arange(width) < counts[:, None]]  # row-major: request by request
        lens = self._lens[slots]
        last = np.where(lens > 0, (lens - 1) % self.page_size + 1, 0)
        return kv_indptr, kv_indices, last.astype(np.int32)

    def page_rows(self, rids: Sequence[Hashable], width: int) -> np.ndarray:
        """The first ``width`` page ids of each request, ``-1`` past its pages.

        Returns:
          ``[len(rids), width]`` int32.

        Raises:
          KeyError: unknown request.
          ValueError: ``width`` is not an integer ``>= 0``.
        """
        width = check_int("width", width, minimum=0)
        slots = self._slots_of(rids)
        rows = np.full((len(slots), width), -1, np.int32)
        have = min(width, self._table.shape[1])
        rows[:, :have] = self._table[slots, :have]
        rows[np.arange(width) >= self._counts[slots][:, None]] = -1
        return rows

    # ------------------------------------------------------------------ internals

    def _slots_of(self, rids: Sequence[Hashable]) -> np.ndarray:
        slots = self._slots
        return np.asarray([slots[r] for r in rids], np.int64)

    def _new_slot(self, rid: Hashable) -> int:
        if not self._free_slots:
            rows = len(self._counts)
            self._free_slots = list(range(2 * rows - 1, rows - 1, -1))
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
        slot = self._free_slots.pop()
        self._slots[rid] = slot
        return slot

    def _reserve(self, num_pages: int) -> None:
        """Room for ``num_pages`` pages in every request's row of the table."""
        width = self._table.shape[1]
        if num_pages > width:
            while width < num_pages:
                width *= 2
            grown = np.zeros((self._table.shape[0], min(width, self.num_pages)), np.int32)
            grown[:, : self._table.shape[1]] = self._table
            self._table = grown

    def _hold(self, page: int) -> None:
        if self._refs[page] == 0:
            self._num_cached -= 1  # only cached pages (in the tree) are attached with refcount 0
        self._refs[page] += 1

    def _reclaim(self, n: int) -> None:
        """Move ``n`` cached pages to the free list: least recently used leaves first (a parent
        becomes a leaf once its children are gone; nobody holds a child of an unheld page, since
        a request holding a page holds its whole path)."""
        heap = [(node.last_use, node.page) for node in self._nodes.values()
                if not node.children and self._refs[node.page] == 0]
        heapq.heapify(heap)
        for _ in range(n):
            _, page = heapq.heappop(heap)
            node = self._nodes.pop(page)
            parent = node.parent
            del parent.children[node.key]
            self._num_cached -= 1
            self._free.append(page)
            if parent is not self._root and not parent.children and self._refs[parent.page] == 0:
                heapq.heappush(heap, (parent.last_use, parent.page))
