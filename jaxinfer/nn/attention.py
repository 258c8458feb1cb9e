"""Paged attention layer for Flax nnx models, and the host planning of one serving step.

A serving step runs the rows of a mixed batch through one jitted function: first the prompt rows
of newly admitted requests (prefill: ragged, causal, each request attending to its own new
tokens), then one row per running request (decode: paged, against everything the request has
cached). Every row's key and value are appended to the paged cache first, so a prefilled request
decodes from the cache on the next step. This is FlashInfer's serving recipe (FlashInfer paper,
arXiv 2501.01005, sec. 3.3: plan once per step on the host, run the same plan in every layer).

:class:`StepPlanner` builds a :class:`StepBatch` on the host from a :class:`KVCachePool`; row
counts are padded to power-of-two buckets, request counts to the planner's ``max_batch_size`` and
the page table to the pool's size, so the jitted step compiles once per bucket and never for a new
batch composition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from jaxinfer.plan.batch import PlanCapacity, next_pow2
from jaxinfer.nn.kv_pool import KVCachePool
from jaxinfer.wrapper import Plan


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Host-built inputs of one jitted step over ``T = num_prefill_rows + num_decode_rows`` rows.

    Attributes:
      positions: ``[T]`` int32 position of each row in its request (RoPE and cache slot).
      batch_indices: ``[T]`` int32 request of each row in the page table below; ``-1`` for padding
        rows, which write nothing.
      kv_indptr, kv_indices, kv_last_page_len: page table of the prefill then the decode requests
        *after* this step's append (``[Bc+1]``, ``[num_pages]``, ``[Bc]`` int32 with ``Bc`` the
        planner's ``max_batch_size``, padded with empty requests and unused page ids).
      last_rows: ``[Bc]`` int32 last row of each prefill then decode request (padded with 0): the
        rows whose logits sample the next token.
      prefill_plan: ragged causal plan of rows ``[0, num_prefill_rows)``, or ``None``.
      decode_plan: paged decode plan of rows ``[num_prefill_rows, T)``, or ``None``.
      num_prefill_rows: static; prefill rows including padding.
      kv_layout: static; layout of the caches.
    """

    positions: jax.Array
    batch_indices: jax.Array
    kv_indptr: jax.Array
    kv_indices: jax.Array
    kv_last_page_len: jax.Array
    last_rows: jax.Array
    prefill_plan: Plan | None
    decode_plan: Plan | None
    num_prefill_rows: int = dataclasses.field(metadata=dict(static=True))
    kv_layout: str = dataclasses.field(metadata=dict(static=True))

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]


def bucket(n: int, minimum: int = 1) -> int:
    """Padded size of ``n`` rows or requests: 0 stays 0, else a power of two ``>= minimum``."""
    return 0 if n == 0 else max(next_pow2(n), minimum)


class StepPlanner:
    """Plans the steps of a serving loop on the host (numpy), for one model geometry.

    Args:
      pool: the KV-cache pool the requests live in.
      num_qo_heads: query heads (``num_kv_heads`` and ``head_dim`` come from the pool).
      max_seq_len: longest request (tokens); fixes the decode plan's KV capacity.
      max_batch_size: most requests (prefill plus decode) in one step.
      backend: jaxinfer attention backend.
      q_data_type: dtype of the queries the step passes to attention.
      min_prefill_rows, min_decode_rows: smallest row buckets (fewer buckets, more padding).

    Raises:
      ValueError: ``num_qo_heads`` not a multiple of the pool's ``num_kv_heads``.
    """

    def __init__(
        self,
        pool: KVCachePool,
        num_qo_heads: int,
        *,
        max_seq_len: int,
        max_batch_size: int,
        backend: str = "auto",
        q_data_type=jnp.bfloat16,
        min_prefill_rows: int = 16,
        min_decode_rows: int = 1,
    ):
        if num_qo_heads % pool.num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({pool.num_kv_heads})")
        self.pool = pool
        self.num_qo_heads = num_qo_heads
        self.max_seq_len = int(max_seq_len)
        self.max_batch_size = int(max_batch_size)
        self.backend = backend
        self.q_data_type = jnp.dtype(q_data_type)
        self.min_prefill_rows = min_prefill_rows
        self.min_decode_rows = min_decode_rows

    def plan(self, prefill: Sequence[Hashable], decode: Sequence[Hashable]) -> StepBatch:
        """Plan a step after the pool was extended for it.

        Args:
          prefill: requests whose whole content was just added to the pool (``pool.extend`` with
            the prompt length); they attend to their own tokens only.
          decode: requests extended by one token; the row attends to all of the request's tokens.

        Returns:
          The step's :class:`StepBatch` (rows: prefill tokens in request order, padding, decode
          tokens in request order, padding).

        Raises:
          ValueError: a request listed twice, more than ``max_batch_size`` requests, a prefill
            request with no tokens or a decode request longer than ``max_seq_len``.
        """
        rids = list(prefill) + list(decode)
        if len(set(rids)) != len(rids):
            raise ValueError("a request may appear only once per step (prefill or decode)")
        if len(rids) > self.max_batch_size:
            raise ValueError(f"{len(rids)} requests in one step, over max_batch_size={self.max_batch_size}")
        pool = self.pool
        prefill_lens = np.asarray([pool.seq_len(r) for r in prefill], np.int32)
        decode_lens = np.asarray([pool.seq_len(r) for r in decode], np.int32)
        if prefill_lens.size and prefill_lens.min() == 0:
            raise ValueError("every prefill request needs at least one token in the pool")
        if decode_lens.size and decode_lens.max() > self.max_seq_len:
            raise ValueError(f"a decode request has {decode_lens.max()} tokens, over max_seq_len={self.max_seq_len}")
        qo_indptr = np.concatenate([[0], np.cumsum(prefill_lens)]).astype(np.int32)
        p_rows = bucket(int(qo_indptr[-1]), self.min_prefill_rows)
        d_rows = bucket(len(decode), self.min_decode_rows)
        rows = p_rows + d_rows

        positions = np.zeros(rows, np.int32)
        batch_indices = np.full(rows, -1, np.int32)
        prefill_req = np.repeat(np.arange(len(prefill), dtype=np.int32), prefill_lens)
        positions[: qo_indptr[-1]] = np.arange(qo_indptr[-1]) - qo_indptr[prefill_req]
        batch_indices[: qo_indptr[-1]] = prefill_req
        positions[p_rows : p_rows + len(decode)] = decode_lens - 1
        batch_indices[p_rows : p_rows + len(decode)] = len(prefill) + np.arange(len(decode))

        kv_indptr, kv_indices, last = pool.page_table(rids)
        pad = self.max_batch_size - len(rids)
        last_rows = np.zeros(self.max_batch_size, np.int32)
        last_rows[: len(prefill)] = qo_indptr[1:] - 1
        last_rows[len(prefill) : len(rids)] = p_rows + np.arange(len(decode))
        return StepBatch(
            positions=jnp.asarray(positions),
            batch_indices=jnp.asarray(batch_indices),
            kv_indptr=jnp.asarray(np.pad(kv_indptr, (0, pad), mode="edge")),
            kv_indices=jnp.asarray(np.pad(kv_indices, (0, pool.num_pages - kv_indices.size))),
            kv_last_page_len=jnp.asarray(np.pad(last, (0, pad))),
            last_rows=jnp.asarray(last_rows),
            prefill_plan=self._prefill_plan(qo_indptr, p_rows) if len(prefill) else None,
            decode_plan=self._decode_plan(decode, d_rows) if len(decode) else None,
            num_prefill_rows=p_rows,
            kv_layout=pool.kv_layout,
        )

    def _prefill_plan(self, qo_indptr: np.ndarray, p_rows: int) -> Plan:
        # One prompt is at most p_rows long, so that bound keeps the plan's shapes per bucket.
        capacity = PlanCapacity(max_batch_size=self.max_batch_size, max_qo_len=p_rows, max_kv_len=p_rows)
        wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=self.backend, capacity=capacity)
        pool = self.pool
        return wrapper.plan(
            qo_indptr, qo_indptr, self.num_qo_heads, pool.num_kv_heads, pool.head_dim, causal=True,
            q_data_type=self.q_data_type, kv_data_type=pool.dtype,
        )

    def _decode_plan(self, decode: Sequence[Hashable], d_rows: int) -> Plan:
        capacity = PlanCapacity(max_batch_size=d_rows, max_qo_len=1, max_kv_len=self.max_seq_len)
        wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(
            kv_layout=self.pool.kv_layout, backend=self.backend, capacity=capacity
        )
        pool = self.pool
        return wrapper.plan(
            *pool.page_table(decode), self.num_qo_heads, pool.num_kv_heads, pool.head_dim, pool.page_size,
            q_data_type=self.q_data_type, kv_data_type=pool.dtype,
        )


class PagedAttention(nnx.Module):
    """Multi-head attention with GQA, rotate-half RoPE and a paged KV cache.

    ``q = x Wq``, ``k = x Wk``, ``v = x Wv`` (no biases, Llama style), RoPE at each row's position
    (:func:`jaxinfer.apply_rope_pos_ids`; RoFormer, Su et al. 2021), keys and values appended to
    the paged cache, attention through jaxinfer's plans, ``o Wo``.

    Args:
      hidden_size: model width.
      num_qo_heads, num_kv_heads, head_dim: head geometry (``num_qo_heads % num_kv_heads == 0``).
      rope_theta, rope_scale: RoPE base and linear position scale.
      dtype: activation and weight dtype (also the cache dtype).
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
          this step's keys and values written.
        """
        q, k, v = self.qkv(x, batch.positions)
        dtype = kv_cache[0].dtype
        k, v = k.astype(dtype), v.astype(dtype)
        kv_cache = jaxinfer.append_paged_kv_cache(
            k, v, batch.batch_indices, batch.positions, kv_cache, batch.kv_indices, batch.kv_indptr,
            batch.kv_last_page_len, kv_layout=batch.kv_layout,
        )
        p = batch.num_prefill_rows
        parts = []
        if batch.prefill_plan is not None:
            parts.append(jaxinfer.batch_prefill_ragged(q[:p], k[:p], v[:p], batch.prefill_plan))
        if batch.decode_plan is not None:
            parts.append(jaxinfer.batch_decode(q[p:], kv_cache, batch.decode_plan))
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
