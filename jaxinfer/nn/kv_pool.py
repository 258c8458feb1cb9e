"""A pool of KV-cache pages shared by the requests of a serving engine.

The host keeps the bookkeeping in numpy and plain Python (free list, pages and length of each
request); the device keeps the cache arrays, one ``(k_cache, v_cache)`` pair per layer in
jaxinfer's paged layout (shared/DESIGN.md section 3). The page table of any subset of requests
comes out as a BSR triple ``(kv_indptr, kv_indices, kv_last_page_len)`` ready for a wrapper's
``plan`` (FlashInfer paper, arXiv 2501.01005, sec. 3.1: the KV cache as a block-sparse matrix).

A page is owned by at most one request from ``extend`` until ``free``; it is never handed out twice,
so appending to one request never writes into another's tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxinfer.plan.checks import check_int


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than an allocation needs (nothing was allocated)."""


class KVCachePool:
    """Pages of a paged KV cache, allocated to requests on the host.

    Args:
      num_pages: pages in the cache (per layer).
      page_size: tokens per page.
      num_layers: decoder layers; each gets its own ``(k_cache, v_cache)``.
      num_kv_heads, head_dim: KV head geometry.
      dtype: cache dtype.
      kv_layout: ``"NHD"`` (caches ``[num_pages, page_size, Hkv, D]``) or ``"HND"``
        (``[num_pages, Hkv, page_size, D]``).

    Attributes:
      caches: tuple over layers of ``(k_cache, v_cache)``; a jitted step returns new caches and the
        caller stores them back here.

    Raises:
      ValueError: non-positive sizes or an unknown ``kv_layout``.
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
        self.dtype = jnp.dtype(dtype)
        if kv_layout == "NHD":
            shape = (num_pages, page_size, num_kv_heads, head_dim)
        else:
            shape = (num_pages, num_kv_heads, page_size, head_dim)
        self.caches = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))
        # Pop from the end: lowest page ids are handed out first, which keeps runs reproducible.
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def requests(self) -> tuple[Hashable, ...]:
        return tuple(self._pages)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens.

        Raises:
          ValueError: ``num_tokens`` is not an integer ``>= 0`` (bools and floats are not).
        """
        return -(-check_int("num_tokens", num_tokens, minimum=0, maximum=None) // self.page_size)

    def seq_len(self, rid: Hashable) -> int:
        """Tokens stored (or reserved by ``extend``) for request ``rid``."""
        return self._lens[rid]

    def pages(self, rid: Hashable) -> tuple[int, ...]:
        return tuple(self._pages[rid])

    def add(self, rid: Hashable) -> None:
        """Register an empty request (no pages yet).

        Raises:
          ValueError: ``rid`` is already in the pool.
        """
        if rid in self._pages:
            raise ValueError(f"request {rid!r} is already in the pool")
        self._pages[rid] = []
        self._lens[rid] = 0

    def extend(self, rid: Hashable, num_tokens: int) -> np.ndarray:
        """Grow request ``rid`` by ``num_tokens`` tokens, allocating the pages this needs.

        Returns:
          ``[num_tokens]`` int32 positions of the new tokens in the request (its old length on).

        Raises:
          KeyError: unknown ``rid``.
          ValueError: ``num_tokens`` is not an integer ``>= 0`` (bools and floats are not), or the
            request would grow past the int32 range of positions.
          OutOfPagesError: not enough free pages; the pool is left unchanged.
        """
        old = self._lens[rid]
        num_tokens = check_int("num_tokens", num_tokens, minimum=0, maximum=np.iinfo(np.int32).max - old)
        need = self.pages_for(old + num_tokens) - len(self._pages[rid])
        if need > len(self._free):
            raise OutOfPagesError(
                f"request {rid!r} needs {need} more page(s) of {self.page_size} tokens for "
                f"{num_tokens} new token(s), but only {len(self._free)} of {self.num_pages} pages are free"
            )
        for _ in range(need):
            self._pages[rid].append(self._free.pop())
        self._lens[rid] = old + num_tokens
        return np.arange(old, old + num_tokens, dtype=np.int32)

    def free(self, rid: Hashable) -> None:
        """Remove request ``rid`` and return its pages to the free list.

        Raises:
          KeyError: unknown ``rid``.
        """
        pages = self._pages.pop(rid)
        del self._lens[rid]
        self._free.extend(reversed(pages))

    def page_table(self, rids: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BSR page table of ``rids`` in that order.

        Returns:
          ``(kv_indptr [B+1], kv_indices [nnz_pages], kv_last_page_len [B])`` int32; a request with
          no tokens has no pages and ``last_page_len`` 0.

        Raises:
          KeyError: unknown request.
        """
        counts = [len(self._pages[r]) for r in rids]
        kv_indptr = np.zeros(len(rids) + 1, np.int32)
        np.cumsum(counts, out=kv_indptr[1:])
        kv_indices = np.asarray([p for r in rids for p in self._pages[r]], np.int32)
        lens = np.asarray([self._lens[r] for r in rids], np.int64)
        last = np.where(lens > 0, (lens - 1) % self.page_size + 1, 0)
        return kv_indptr, kv_indices, last.astype(np.int32)
