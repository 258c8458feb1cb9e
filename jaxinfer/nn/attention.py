"""Paged attention layer for Flax nnx models, and the host planning of one serving step.

A serving step runs the rows of a mixed batch through one jitted function: first the prefill rows
(a chunk of new tokens per request: the request's whole prompt, or a piece of it under a per-step
token budget, on top of whatever the request already has in the cache), then one decode row per
running request. Every row's key and value are appended to the paged cache first; then the
prefill rows attend through a paged, causal prefill plan over each request's pages (append
attention, ``qo_len <= kv_len``, the causal mask aligned bottom-right: chunked prefill, Sarathi,
Agrawal et al. OSDI 2024) and the decode rows through a decode plan, or through cascade levels
(FlashInfer paper, arXiv 2501.01005, sec. 3.1) when requests share prefix pages, so a shared
prefix is read once per group of requests instead of once per request. This is FlashInfer's
serving recipe (ibid., sec. 3.3: plan once per step on the host, run the same plan in every layer).

FP8 caches (:mod:`jaxinfer.fp8`): with a pool in ``float8_e4m3fn``/``float8_e5m2`` the step
carries the pool's scales as ``[Hkv]`` float32 arrays (traced: other values never recompile); the
layer writes ``K / k_scale``, ``V / v_scale`` saturated to the fp8 range through the quantizing
append and passes the scales to every attention call (prefill, decode, each cascade level).

:class:`StepPlanner` builds a :class:`StepBatch` on the host from a :class:`KVCachePool`. Every
plan capacity comes from the planner's configuration (batch size, prefill rows, sequence length):
row counts are padded to a few fixed buckets and nothing else about a batch changes a shape, so
the jitted step compiles at most :attr:`StepPlanner.num_step_programs` programs in a whole run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from jaxinfer.backends import device
from jaxinfer.cascade import _prefix_tree_levels
from jaxinfer.nn.kv_pool import KVCachePool
from jaxinfer.plan.batch import PlanCapacity
from jaxinfer.plan.checks import check_int
from jaxinfer.plan.transfer import host_only, tree_to_device
from jaxinfer.wrapper import Plan

# Work tiles the Pallas planner may split long key ranges into: up to its split_factor (4) times
# its persistent grid (SMs x ctas_per_sm, at most 3), what it allows when max_work_tiles is unset.
_SPLIT_TILES_PER_SM = 12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Host-built inputs of one jitted step over ``T = num_prefill_rows + num_decode_rows`` rows.

    Attributes:
      positions: ``[T]`` int32 position of each row in its request (RoPE and cache slot).
      batch_indices: ``[T]`` int32 request of each row in the page table below; ``-1`` for padding
        rows, which write nothing.
      kv_indptr, kv_indices, kv_last_page_len: page table of the prefill then the decode requests
        *after* this step's append (``[Bc+1]``, ``[Bc * pages_per_seq]``, ``[Bc]`` int32 with
        ``Bc`` the planner's ``max_batch_size`` and ``pages_per_seq`` the pages of
        ``max_seq_len`` tokens, padded with empty requests and page 0).
      last_rows: ``[Bc]`` int32 last row of each prefill then decode request (padded with 0): the
        rows whose logits sample the next token.
      prefill_plan: paged causal prefill plan of rows ``[0, num_prefill_rows)``, or ``None``.
      decode_plan: rows ``[num_prefill_rows, T)``: a paged decode plan, a tuple of cascade level
        plans (the most shared level first, the requests' own pages last), or ``None``.
      num_prefill_rows: static; prefill rows including padding.
      kv_layout: static; layout of the caches.
      k_scale, v_scale: ``[Hkv]`` float32 scales of an fp8 cache (the pool's), ``None`` for
        other caches.
    """

    positions: jax.Array
    batch_indices: jax.Array
    kv_indptr: jax.Array
    kv_indices: jax.Array
    kv_last_page_len: jax.Array
    last_rows: jax.Array
    prefill_plan: Plan | None
    decode_plan: Plan | tuple[Plan, ...] | None
    num_prefill_rows: int = dataclasses.field(metadata=dict(static=True))
    kv_layout: str = dataclasses.field(metadata=dict(static=True))
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]


def row_buckets(minimum: int, maximum: int) -> tuple[int, ...]:
    """Padded row counts from ``minimum`` up to ``maximum``: powers of two, then ``maximum``.

    Raises:
      ValueError: ``minimum`` or ``maximum`` not a positive integer.
    """
    minimum = check_int("minimum", minimum, minimum=1)
    maximum = check_int("maximum", maximum, minimum=1)
    out, b = [], 1
    while b < min(minimum, maximum):
        b *= 2
    while b < maximum:
        out.append(b)
        b *= 2
    return (*out, maximum)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Padded size of ``n`` rows: 0 stays 0, else the smallest of ``buckets`` (ascending) ``>= n``.

    Raises:
      ValueError: ``n`` is larger than every bucket.
    """
    if n == 0:
        return 0
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows do not fit the largest row bucket ({buckets[-1]})")


class StepPlanner:
    """Plans the steps of a serving loop on the host (numpy), for one model geometry.

    Args:
      pool: the KV-cache pool the requests live in.
      num_qo_heads: query heads (``num_kv_heads`` and ``head_dim`` come from the pool).
      max_seq_len: longest request (tokens); every plan's KV capacity.
      max_batch_size: most requests (prefill plus decode) in one step.
      max_prefill_tokens: most prefill rows (new tokens of prefill requests) in one step; default
        ``max_seq_len``.
      backend: jaxinfer attention backend.
      q_data_type: dtype of the queries the step passes to attention (the KV dtype is the pool's).
      min_prefill_rows, min_decode_rows: smallest row buckets; the buckets are powers of two from
        there up to ``max_prefill_tokens`` / ``max_batch_size``, which are buckets too. Default
        (``None``): one bucket each, the maximum (more padding, fewest programs).
      cascade_levels: levels of the decode rows' attention. 1: a decode plan over each request's
        pages. ``L >= 2``: cascade over the prefix pages the decode requests share
        (:func:`jaxinfer.cascade_levels_from_prefix_tree`, order the decode requests by their page
        lists, :meth:`sharing_order`, so that sharers stand together), always
        ``L`` levels: missing ones are empty, sharing deeper than ``L - 1`` levels is read per
        request in the last level.
      cascade_min_saved_bytes: with ``L >= 2``, a step's decode rows go through the cascade
        levels only when these save at least this many bytes of KV reads over all layers (each
        shared page read once per group instead of once per request); else through one decode
        plan over each request's pages (another step program: the cascade's extra launches and
        planning cost host time, which bounds a small model's step). 0 (the default): always.

    Attributes:
      prefill_buckets, decode_buckets: the padded row counts.
      chooses_levels: whether steps with decode rows come in two programs, one level or cascade
        levels (``L >= 2`` and ``cascade_min_saved_bytes > 0``).
      num_step_programs: the most programs a jitted step over these batches compiles: one per
        pair of (prefill bucket or none, decode bucket or none), not both none; with
        ``chooses_levels`` one more per pair with decode rows.

    Raises:
      ValueError: ``num_qo_heads`` not a multiple of the pool's ``num_kv_heads``, or a size that
        is not a positive integer.
    """

    def __init__(
        self,
        pool: KVCachePool,
        num_qo_heads: int,
        *,
        max_seq_len: int,
        max_batch_size: int,
        max_prefill_tokens: int | None = None,
        backend: str = "auto",
        q_data_type=jnp.bfloat16,
        min_prefill_rows: int | None = None,
        min_decode_rows: int | None = None,
        cascade_levels: int = 1,
        cascade_min_saved_bytes: int = 0,
    ):
        if num_qo_heads % pool.num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({pool.num_kv_heads})")
        self.pool = pool
        self.num_qo_heads = num_qo_heads
        self.max_seq_len = check_int("max_seq_len", max_seq_len, minimum=1)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        self.max_prefill_tokens = check_int(
            "max_prefill_tokens", self.max_seq_len if max_prefill_tokens is None else max_prefill_tokens, minimum=1
        )
        self.cascade_levels = check_int("cascade_levels", cascade_levels, minimum=1)
        self.cascade_min_saved_bytes = check_int("cascade_min_saved_bytes", cascade_min_saved_bytes, minimum=0,
                                                 maximum=None)
        # KV bytes one token holds over all layers: what a level that a group reads once saves.
        self._token_bytes = 2 * pool.num_kv_heads * pool.head_dim * pool.dtype.itemsize * len(pool.caches)
        self.backend = backend
        self.q_data_type = jnp.dtype(q_data_type)
        self.prefill_buckets = row_buckets(
            self.max_prefill_tokens if min_prefill_rows is None else min_prefill_rows, self.max_prefill_tokens
        )
        self.decode_buckets = row_buckets(
            self.max_batch_size if min_decode_rows is None else min_decode_rows, self.max_batch_size
        )
        self.pages_per_seq = pool.pages_for(self.max_seq_len)
        self._k_scale = None if pool.k_scale is None else jnp.asarray(pool.k_scale)
        self._v_scale = None if pool.v_scale is None else jnp.asarray(pool.v_scale)
        self._wrappers: dict[tuple[str, int], Any] = {}
        self._levels_cache: dict = {}  # shared cascade levels of the last decode batch

    @property
    def chooses_levels(self) -> bool:
        return self.cascade_levels > 1 and self.cascade_min_saved_bytes > 0

    @property
    def num_step_programs(self) -> int:
        p, d = len(self.prefill_buckets) + 1, len(self.decode_buckets)
        return p * (d + 1) - 1 + (p * d if self.chooses_levels else 0)

    def plan(self, prefill: Mapping[Hashable, int] | Sequence[tuple[Hashable, int]],
             decode: Sequence[Hashable], *, cascade: bool | None = None) -> StepBatch:
        """Plan a step after the pool was extended for it: :meth:`plan_host` with its arrays
        copied to the device (each on its own; the serving engine packs them into one copy).
        """
        return tree_to_device(self.plan_host(prefill, decode, cascade=cascade))

    def plan_host(self, prefill: Mapping[Hashable, int] | Sequence[tuple[Hashable, int]],
                  decode: Sequence[Hashable], *, cascade: bool | None = None) -> StepBatch:
        """Plan a step after the pool was extended for it, its arrays left on the host (numpy;
        the pool's fp8 scales stay device arrays): :func:`jaxinfer.plan.transfer.pack` them with
        the step's other host arrays into one copy, or use :meth:`plan`.

        Args:
          prefill: ``{rid: n}`` (or ``(rid, n)`` pairs): request ``rid`` was extended by ``n >= 1``
            tokens for this step (a whole prompt or a chunk of one); they are its last ``n``
            tokens and attend, causally, to everything the request holds.
          decode: requests extended by one token; the row attends to all of the request's tokens.
          cascade: with ``cascade_levels >= 2``, ``True``/``False`` read the decode rows through
            the cascade levels / one level whatever they save (a warm-up compiles both programs
            this way); ``None``: by ``cascade_min_saved_bytes``, from the levels' exact
            :meth:`saved_bytes` (pass ``False`` where :meth:`may_cascade`'s cheaper bound says no:
            the levels are then not built).

        Returns:
          The step's :class:`StepBatch` (rows: prefill tokens in request order, padding, decode
          tokens in request order, padding).

        Raises:
          ValueError: no request, a request listed twice or not in the pool, more than
            ``max_batch_size`` requests or ``max_prefill_tokens`` prefill rows, a prefill count
            that is not an integer in ``1..seq_len``, an empty decode request, or a request longer
            than ``max_seq_len``, ``cascade=True`` with one level.
        """
        if cascade and self.cascade_levels == 1:
            raise ValueError("cascade=True needs a planner with cascade_levels >= 2")
        pairs = list(prefill.items()) if isinstance(prefill, Mapping) else [tuple(x) for x in prefill]
        prefill_ids = [r for r, _ in pairs]
        decode = list(decode)
        rids = prefill_ids + decode
        if not rids:
            raise ValueError("a step needs at least one prefill or decode request")
        if len(set(rids)) != len(rids):
            raise ValueError("a request may appear only once per step (prefill or decode)")
        if len(rids) > self.max_batch_size:
            raise ValueError(f"{len(rids)} requests in one step, over max_batch_size={self.max_batch_size}")
        pool = self.pool
        try:
            seq_lens = pool.seq_lens(rids)
        except KeyError as e:
            raise ValueError(f"request {e.args[0]!r} is not in the pool") from None
        num_prefill = len(pairs)
        qo_lens = np.ones(len(rids), np.int64)
        for i, (r, n) in enumerate(pairs):
            qo_lens[i] = check_int(f"prefill[{r!r}]", n, minimum=1, maximum=int(seq_lens[i]))
        if (seq_lens[num_prefill:] == 0).any():
            raise ValueError("every decode request needs at least one token in the pool")
        if seq_lens.max() > self.max_seq_len:
            raise ValueError(f"a request has {seq_lens.max()} tokens, over max_seq_len={self.max_seq_len}")
        nnz_prefill = int(qo_lens[:num_prefill].sum())
        if nnz_prefill > self.max_prefill_tokens:
            raise ValueError(
                f"{nnz_prefill} prefill rows in one step, over max_prefill_tokens={self.max_prefill_tokens}"
            )
        p_rows = bucket(nnz_prefill, self.prefill_buckets)
        d_rows = bucket(len(decode), self.decode_buckets)

        # Rows of request i: [row_start[i], row_start[i] + qo_lens[i]); its tokens are its last qo_len.
        row_start = np.concatenate([np.cumsum(qo_lens[:num_prefill]) - qo_lens[:num_prefill],
                                    p_rows + np.arange(len(decode))]).astype(np.int64)
        req = np.repeat(np.arange(len(rids)), qo_lens)
        local = np.arange(req.size) - np.repeat(np.cumsum(qo_lens) - qo_lens, qo_lens)
        rows = np.repeat(row_start, qo_lens) + local
        positions = np.zeros(p_rows + d_rows, np.int32)
        batch_indices = np.full(p_rows + d_rows, -1, np.int32)
        positions[rows] = np.repeat(seq_lens - qo_lens, qo_lens) + local
        batch_indices[rows] = req

        # One page table for the step; the prefill and decode plans read their slices of it.
        kv_indptr, kv_indices, last = pool.page_table(rids)
        table_indptr = np.full(self.max_batch_size + 1, kv_indptr[-1], np.int32)
        table_indptr[: len(kv_indptr)] = kv_indptr
        table_indices = np.zeros(self.max_batch_size * self.pages_per_seq, np.int32)
        table_indices[: kv_indices.size] = kv_indices
        table_last = np.zeros(self.max_batch_size, np.int32)
        table_last[: len(last)] = last
        last_rows = np.zeros(self.max_batch_size, np.int32)
        last_rows[: len(rids)] = row_start + qo_lens - 1
        split = int(kv_indptr[num_prefill])
        prefill_table = (kv_indptr[: num_prefill + 1], kv_indices[:split], last[:num_prefill])
        decode_table = (kv_indptr[num_prefill:] - split, kv_indices[split:], last[num_prefill:])
        # None of these host arrays is written again: a device copy may read them after this returns.
        with host_only():
            prefill_plan = self._prefill_plan(qo_lens[:num_prefill], prefill_table, p_rows) if pairs else None
            decode_plan = self._decode_plan(decode_table, d_rows, cascade) if decode else None
        return StepBatch(
            positions=positions,
            batch_indices=batch_indices,
            kv_indptr=table_indptr,
            kv_indices=table_indices,
            kv_last_page_len=table_last,
            last_rows=last_rows,
            prefill_plan=prefill_plan,
            decode_plan=decode_plan,
            num_prefill_rows=p_rows,
            kv_layout=pool.kv_layout,
            k_scale=self._k_scale,
            v_scale=self._v_scale,
        )

    def sharing_order(self, decode: Sequence[Hashable]) -> list[Hashable]:
        """``decode`` sorted by page lists (lexicographically, a list before its extensions),
        ``sorted(decode, key=pool.pages)`` without building the tuples: requests that share
        prefix pages stand together, one cascade group per shared segment.

        Raises:
          KeyError: a request not in the pool.
        """
        decode = list(decode)
        width = 32  # lists that share a prefix differ soon after it; wider only while that leaves ties
        while len(decode) > 1:
            rows = self.pool.page_rows(decode, width)
            keys = (rows.astype(np.int64) + 1).astype(">u4")  # memcmp order: a list before its extensions
            order = np.argsort(keys.view(np.dtype((np.void, 4 * width))).ravel(), kind="stable")
            ties = (keys[order[1:]] == keys[order[:-1]]).all(1) & (rows[order[1:], -1] >= 0)
            if not ties.any():
                return [decode[i] for i in order.tolist()]
            width *= 2
        return decode

    def _capacity(self, batch: int, qo_len: int, num_queries: int) -> PlanCapacity:
        """Fixed capacity of a plan of ``batch`` requests, ``qo_len`` queries each at most and
        ``num_queries`` in all: the same for every batch of a bucket, so the step's shapes are."""
        # The Pallas planner cuts each request's queries into tiles of >= 1 token per KV head.
        tiles = max((num_queries + batch) * self.pool.num_kv_heads, _SPLIT_TILES_PER_SM * device.num_sms())
        return PlanCapacity(max_batch_size=batch, max_qo_len=qo_len, max_kv_len=self.max_seq_len,
                            max_work_tiles=1 << (tiles - 1).bit_length())

    def _wrapper(self, kind: str, rows: int):
        """The wrapper of one kind of plan and row bucket, made once: each step only plans with it."""
        key = (kind, rows)
        if key not in self._wrappers:
            options = dict(kv_layout=self.pool.kv_layout, backend=self.backend)
            if kind == "prefill":
                capacity = self._capacity(min(self.max_batch_size, rows), rows, rows)
                self._wrappers[key] = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(capacity=capacity, **options)
            elif kind == "decode":
                capacity = self._capacity(rows, 1, rows)
                self._wrappers[key] = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(capacity=capacity, **options)
            else:
                capacity = self._capacity(rows, rows, rows)
                self._wrappers[key] = jaxinfer.MultiLevelCascadeAttentionWrapper(1, capacity=capacity, **options)
        return self._wrappers[key]

    def _geometry(self) -> tuple:
        pool = self.pool
        return self.num_qo_heads, pool.num_kv_heads, pool.head_dim, pool.page_size

    def _prefill_plan(self, qo_lens: np.ndarray, table: tuple, p_rows: int) -> Plan:
        qo_indptr = np.zeros(len(qo_lens) + 1, np.int32)
        np.cumsum(qo_lens, out=qo_indptr[1:])
        return self._wrapper("prefill", p_rows).plan(
            qo_indptr, *table, *self._geometry(), causal=True, q_data_type=self.q_data_type,
            kv_data_type=self.pool.dtype,
        )

    def _decode_plan(self, table: tuple, d_rows: int, cascade: bool | None) -> Plan | tuple[Plan, ...]:
        dtypes = dict(q_data_type=self.q_data_type, kv_data_type=self.pool.dtype)
        own = self._wrapper("decode", d_rows)
        if self.cascade_levels > 1 and cascade is not False:
            qo, indptr, indices, last = self._levels(*table)
            if cascade or self.saved_bytes(qo, indptr, last) >= self.cascade_min_saved_bytes:
                shared = self._wrapper("cascade", d_rows)
                plans = [shared.plan([qo[lvl]], [indptr[lvl]], [indices[lvl]], [last[lvl]], *self._geometry(),
                                     **dtypes)[0] for lvl in range(self.cascade_levels - 1)]
                return (*plans, own.plan(indptr[-1], indices[-1], last[-1], *self._geometry(), **dtypes))
        return own.plan(*table, *self._geometry(), **dtypes)

    def may_cascade(self, decode: Sequence[Hashable]) -> bool:
        """Whether :meth:`plan_host` may read these decode requests through cascade levels: with
        ``cascade_levels >= 2``, unless an upper bound of what the levels save (every page that
        several requests hold, counted once per holder) is under ``cascade_min_saved_bytes``.
        ``False``: the step reads one level, and the requests need no :meth:`sharing_order`.

        Raises:
          KeyError: a request not in the pool.
        """
        if self.cascade_levels == 1:
            return False
        shared = int(np.count_nonzero(self.pool.refcounts(self.pool.page_table(decode)[1]) > 1))
        return shared * self.pool.page_size * self._token_bytes >= self.cascade_min_saved_bytes

    def saved_bytes(self, qo_indptr_arr: Sequence[np.ndarray], kv_indptr_arr: Sequence[np.ndarray],
                    kv_last_page_len_arr: Sequence[np.ndarray]) -> int:
        """KV bytes over all layers that cascade levels (:meth:`decode_levels`) save against one
        level: a shared level's group of ``n`` requests reads its pages once instead of ``n``
        times. The requests' own pages (the last level) save nothing."""
        tokens = 0
        for qo, indptr, last in zip(qo_indptr_arr[:-1], kv_indptr_arr[:-1], kv_last_page_len_arr[:-1]):
            pages = np.diff(indptr).astype(np.int64)
            length = np.where(pages > 0, (pages - 1) * self.pool.page_size + last, 0)
            tokens += int(((np.diff(qo) - 1) * length).sum())
        return tokens * self._token_bytes

    def decode_levels(self, decode: Sequence[Hashable]) -> tuple[list, list, list, list]:
        """The ``cascade_levels`` levels of the decode requests' pages (one query each): the
        prefix-tree levels of :func:`jaxinfer.cascade_levels_from_prefix_tree`, empty ones in
        front when there are fewer, the deepest shared ones folded into each request's own pages
        when there are more.

        Returns:
          ``(qo_indptr_arr, kv_indptr_arr, kv_indices_arr, kv_last_page_len_arr)``, one int32
          array per level, the most shared first (the cascade wrapper's ``plan`` arguments).

        Raises:
          KeyError: a request not in the pool.
        """
        return self._levels(*self.pool.page_table(decode))

    def _levels(self, kv_indptr: np.ndarray, kv_indices: np.ndarray, last: np.ndarray) -> tuple[list, list, list, list]:
        """:meth:`decode_levels` of the decode requests' page table."""
        n = len(last)
        qo, indptr, indices, last = _prefix_tree_levels(kv_indptr, kv_indices, last, np.arange(n + 1, dtype=np.int32),
                                                        self.pool.page_size, max_levels=self.cascade_levels,
                                                        cache=self._levels_cache)
        missing = self.cascade_levels - len(qo)
        empty = (np.array([0, n], np.int32), np.zeros(2, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int32))
        return ([empty[0]] * missing + qo, [empty[1]] * missing + indptr, [empty[2]] * missing + indices,
                [empty[3]] * missing + last)


class PagedAttention(nnx.Module):
    """Multi-head attention with GQA, rotate-half RoPE and a paged KV cache.

    ``q = x Wq``, ``k = x Wk``, ``v = x Wv`` (no biases, Llama style), RoPE at each row's position
    (:func:`jaxinfer.apply_rope_pos_ids`; RoFormer, Su et al. 2021), keys and values appended to
    the paged cache, attention through jaxinfer's plans, ``o Wo``.

    Args:
      hidden_size: model width.
      num_qo_heads, num_kv_heads, head_dim: head geometry (``num_qo_heads % num_kv_heads == 0``).
      rope_theta, rope_scale: RoPE base and linear position scale.
      dtype: activation and weight dtype.
      rngs: initialisation keys.

    Raises:
      ValueError: ``num_qo_heads % num_kv_heads != 0``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float = 1e4,
        rope_scale: float = 1.0,
        dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.rope_theta, self.rope_scale = float(rope_theta), float(rope_scale)

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.q_proj = linear(hidden_size, num_qo_heads * head_dim)
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim)
        self.v_proj = linear(hidden_size, num_kv_heads * head_dim)
        self.o_proj = linear(num_qo_heads * head_dim, hidden_size)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [T, hidden]``, ``positions [T]`` -> ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (q, k rotated)."""
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.num_qo_heads, self.head_dim)
        k = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        q, k = jaxinfer.apply_rope_pos_ids(q, k, positions, rope_theta=self.rope_theta, rope_scale=self.rope_scale)
        return q, k, v

    def __call__(self, x: jax.Array, batch: StepBatch, kv_cache) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One step over the rows of ``batch``.

        Args:
          x: ``[T, hidden]`` activations, rows as in ``batch``.
          batch: the step's :class:`StepBatch`.
          kv_cache: this layer's ``(k_cache, v_cache)`` in ``batch.kv_layout``.

        Returns:
          ``(y [T, hidden], kv_cache)``: the output (padding rows unspecified) and the cache with
          this step's keys and values written (into an fp8 cache: divided by ``batch.k_scale`` /
          ``batch.v_scale`` and saturated, :func:`jaxinfer.append_paged_kv_cache`).
        """
        q, k, v = self.qkv(x, batch.positions)
        if batch.k_scale is None:
            dtype = kv_cache[0].dtype
            k, v = k.astype(dtype), v.astype(dtype)
        # else the quantizing append divides and saturates in float32: a plain cast to e4m3
        # would turn values past 448 into NaN.
        scales = dict(k_scale=batch.k_scale, v_scale=batch.v_scale)
        kv_cache = jaxinfer.append_paged_kv_cache(
            k, v, batch.batch_indices, batch.positions, kv_cache, batch.kv_indices, batch.kv_indptr,
            batch.kv_last_page_len, kv_layout=batch.kv_layout, **scales,
        )
        p = batch.num_prefill_rows
        parts = []
        if batch.prefill_plan is not None:
            parts.append(jaxinfer.batch_prefill_paged(q[:p], kv_cache, batch.prefill_plan, **scales))
        if isinstance(batch.decode_plan, tuple):
            parts.append(jaxinfer.batch_cascade(q[p:], kv_cache, list(batch.decode_plan), **scales))
        elif batch.decode_plan is not None:
            parts.append(jaxinfer.batch_decode(q[p:], kv_cache, batch.decode_plan, **scales))
        o = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        return self.o_proj(o.reshape(x.shape[0], -1).astype(x.dtype)), kv_cache

    def dense_decode(
        self, x: jax.Array, positions: jax.Array, kv_cache, *, implementation: str | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Decode with a contiguous cache and ``jax.nn.dot_product_attention`` (the dense baseline).

        Args:
          x: ``[B, hidden]``, one new token per request.
          positions: ``[B]`` int32 position of the new token; the request then has
            ``positions + 1`` tokens.
          kv_cache: ``(k, v)`` each ``[B, S, Hkv, D]``; row ``positions[b]`` is overwritten.
          implementation: ``jax.nn.dot_product_attention``'s ``implementation`` (``None`` = XLA,
            ``"cudnn"``).

        Returns:
          ``(y [B, hidden], kv_cache)``.
        """
        q, k, v = self.qkv(x, positions)
        b = jnp.arange(x.shape[0])
        dtype = kv_cache[0].dtype
        kc = kv_cache[0].at[b, positions].set(k.astype(dtype))
        vc = kv_cache[1].at[b, positions].set(v.astype(dtype))
        o = jax.nn.dot_product_attention(
            q[:, None].astype(dtype), kc, vc, key_value_seq_lengths=positions + 1, implementation=implementation
        )
        return self.o_proj(o.reshape(x.shape[0], -1).astype(x.dtype)), (kc, vc)
