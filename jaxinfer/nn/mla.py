"""Multi-head latent attention (MLA) layer of DeepSeek-V2/V3 for Flax nnx, on paged latent caches.

DeepSeek-V2 (arXiv 2405.04434, sec. 2.1, eq. 9-19) and DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.1):
per token ``x``,

    c_q  = RMSNorm(x W_DQ)                      [q_lora_rank]   (x W_Q when q_lora_rank is None)
    q_h  = [q_nope_h, q_pe_h] = c_q W_UQ_h      [qk_nope_head_dim + qk_rope_head_dim]
    [c_kv, k_pe] = x W_DKV_and_KR               [kv_lora_rank + qk_rope_head_dim]   (one for all heads)
    c_kv = RMSNorm(c_kv);   q_pe, k_pe = RoPE(q_pe, k_pe)
    k_h  = [W_UK_h c_kv, k_pe],  v_h = W_UV_h c_kv,  o_h = softmax(q_h . k_h * sm_scale) v_h
    y    = [o_1 .. o_H] W_O

and only ``(c_kv, k_pe)`` is cached. The layer keeps ``W_UK`` and ``W_UV`` as per-head matrices
and runs the absorbed form (ibid., appendix C): ``q_nope_h W_UK_h`` is the query against the
cached latent, attention returns the latent output ``sum_j p_j c_kv_j`` per head
(:func:`jaxinfer.batch_mla`), and ``W_UV_h`` maps it to ``o_h``. RoPE pairs dimensions
``(2i, 2i+1)`` (``interleave=True``), DeepSeek's layout up to a fixed permutation of the rotated
dims that q and k share (dot products are unchanged).

:func:`plan_mla_step` builds a step's :class:`MLAStep` on the host; the layer is jit-compatible
with the step as an argument.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from jaxinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlan


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Shape of an MLA layer; the defaults are DeepSeek-V3's (arXiv 2412.19437, sec. 4.2).

    Attributes:
      hidden_size: model width (7168).
      num_heads: query heads ``H`` (128).
      q_lora_rank: rank of the query compression (1536); ``None``: a plain query projection
        (DeepSeek-V2-Lite).
      kv_lora_rank: latent width ``Dc`` cached per token (512).
      qk_nope_head_dim, qk_rope_head_dim: query/key dims without and with RoPE (128, 64); the
        cached RoPE key is ``qk_rope_head_dim`` wide.
      v_head_dim: value dim per head (128).
      rope_theta: RoPE base (10000).
      rms_norm_eps: epsilon of the latent RMSNorms (1e-6).
      softmax_scale: logits scale; ``None``: ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.
      dtype: weights and activations.
    """

    hidden_size: int = 7168
    num_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    softmax_scale: float | None = None
    dtype: jnp.dtype = jnp.bfloat16

    @property
    def sm_scale(self) -> float:
        """The logits scale of the un-absorbed heads."""
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return 1.0 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLAStep:
    """Host-built inputs of one step over ``T`` rows (new tokens of the batch's requests).

    Attributes:
      positions: ``[T]`` int32 position of each row in its request (RoPE and cache slot).
      batch_indices: ``[T]`` int32 request of each row; ``-1`` for padding rows (write nothing).
      kv_indptr, kv_indices, kv_last_page_len: the page table *after* this step's append.
      plan: the causal MLA plan of the rows over each request's pages.
    """

    positions: jax.Array
    batch_indices: jax.Array
    kv_indptr: jax.Array
    kv_indices: jax.Array
    kv_last_page_len: jax.Array
    plan: MLAPlan


def plan_mla_step(wrapper: BatchMLAPagedAttentionWrapper, config: MLAConfig, qo_indptr, kv_indptr, kv_indices,
                  kv_lens, page_size: int, kv_data_type=None, num_rows: int | None = None) -> MLAStep:
    """Plan one step on the host: request ``b`` appends ``qo_indptr[b+1] - qo_indptr[b]`` new
    tokens and then holds ``kv_lens[b]`` (>= the new tokens) in pages
    ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``; its rows attend causally to all of them
    (prefill, chunked prefill and decode rows in one plan).

    Args:
      wrapper: makes the plan (its backend and capacity).
      config: the layer's :class:`MLAConfig` (heads, dims, scale, dtype).
      qo_indptr: ``[B+1]``; kv_indptr: ``[B+1]``; kv_indices: page ids; kv_lens: ``[B]`` (host).
      page_size: tokens per page.
      kv_data_type: the latent caches' dtype (``None``: ``config.dtype``).
      num_rows: rows of the step, ``>= qo_indptr[-1]`` (``None``: exactly those): padding rows
        write nothing and attend to nothing, so steps of one ``num_rows`` (and a wrapper with a
        fixed :class:`~jaxinfer.plan.batch.PlanCapacity`) share one compiled program.

    Returns:
      The :class:`MLAStep` (rows in ``qo_indptr`` order, then padding).

    Raises:
      ValueError: as :meth:`BatchMLAPagedAttentionWrapper.plan`, or a request with more new
        tokens than keys.
    """
    qo_indptr = np.asarray(qo_indptr, np.int64)
    kv_lens = np.asarray(kv_lens, np.int64)
    kv_indptr_h = np.asarray(kv_indptr, np.int64)
    qo_lens = np.diff(qo_indptr)
    if (qo_lens > kv_lens).any():
        b = int(np.flatnonzero(qo_lens > kv_lens)[0])
        raise ValueError(f"request {b} appends {qo_lens[b]} tokens (qo_indptr) but holds kv_lens[{b}] = "
                         f"{kv_lens[b]} after the append")
    nnz = int(qo_indptr[-1])
    num_rows = nnz if num_rows is None else num_rows
    if num_rows < nnz:
        raise ValueError(f"num_rows = {num_rows} is less than the step's qo_indptr[-1] = {nnz} rows")
    plan = wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, config.num_heads, config.kv_lora_rank,
                        config.qk_rope_head_dim, page_size, True, config.sm_scale, config.dtype,
                        kv_data_type or config.dtype)
    batch = np.repeat(np.arange(kv_lens.size), qo_lens)
    positions = np.arange(nnz) - qo_indptr[batch] + (kv_lens - qo_lens)[batch]
    batch = np.pad(batch, (0, num_rows - nnz), constant_values=-1)
    positions = np.pad(positions, (0, num_rows - nnz))
    pages = np.diff(kv_indptr_h)
    last = np.where(pages > 0, kv_lens - (pages - 1) * page_size, 0)
    i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))  # noqa: E731
    return MLAStep(positions=i32(positions), batch_indices=i32(batch), kv_indptr=i32(kv_indptr_h),
                   kv_indices=i32(kv_indices), kv_last_page_len=i32(last), plan=plan)


class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek MLA with absorbed weights over paged latent caches (module docstring).

    Args:
      config: :class:`MLAConfig`.
      rngs: initialisation keys (random init: projections as :class:`flax.nnx.Linear`,
        ``W_UK``/``W_UV`` normal with variance ``1 / kv_lora_rank``).
    """

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dt = config, config.dtype
        h, qk = c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)

        def norm(n):
            return nnx.RMSNorm(n, epsilon=c.rms_norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)

        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, h * qk)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = norm(c.q_lora_rank)
            self.q_b_proj = linear(c.q_lora_rank, h * qk)
        self.kv_a_proj_with_mqa = linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = norm(c.kv_lora_rank)
        scale = 1.0 / math.sqrt(c.kv_lora_rank)
        # W_UK_h maps the latent to head h's no-RoPE key, W_UV_h to its value (rows: output dims).
        def per_head(rows):
            return nnx.Param((jax.random.normal(rngs.params(), (h, rows, c.kv_lora_rank)) * scale).astype(dt))

        self.w_uk = per_head(c.qk_nope_head_dim)
        self.w_uv = per_head(c.v_head_dim)
        self.o_proj = linear(h * c.v_head_dim, c.hidden_size)

    def latent_qkv(self, x: jax.Array, positions: jax.Array):
        """``x [T, hidden]``, ``positions [T]`` -> ``(q_latent [T, H, Dc], q_pe [T, H, Dp],
        ckv [T, Dc], kpe [T, Dp])``: the absorbed query and this step's cache rows (RoPE applied)."""
        c = self.config
        t = x.shape[0]
        c_q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = c_q.reshape(t, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        kv = self.kv_a_proj_with_mqa(x)
        ckv, kpe = self.kv_a_layernorm(kv[:, : c.kv_lora_rank]), kv[:, c.kv_lora_rank :]
        q_pe, kpe = jaxinfer.apply_rope_pos_ids(q_pe, kpe[:, None], positions, interleave=True, rope_theta=c.rope_theta)
        return jnp.einsum("thn,hnc->thc", q_nope, self.w_uk[...]), q_pe, ckv, kpe[:, 0]

    def __call__(self, x: jax.Array, step: MLAStep, caches: tuple[jax.Array, jax.Array]):
        """One step over the rows of ``step``.

        Args:
          x: ``[T, hidden]`` activations, rows as in ``step``.
          step: the step's :class:`MLAStep` (:func:`plan_mla_step`).
          caches: this layer's ``(ckv_cache [P, page_size, Dc], kpe_cache [P, page_size, Dp])``.

        Returns:
          ``(y [T, hidden], caches)``: the output (padding rows unspecified) and the caches with
          this step's latents written (:func:`jaxinfer.append_paged_mla_kv_cache`; an fp8 cache
          saturates them).
        """
        c = self.config
        q_latent, q_pe, ckv, kpe = self.latent_qkv(x, step.positions)
        caches = jaxinfer.append_paged_mla_kv_cache(
            ckv, kpe, step.batch_indices, step.positions, *caches, step.kv_indices, step.kv_indptr,
            step.kv_last_page_len)
        o_latent = jaxinfer.batch_mla(q_latent, q_pe, *caches, step.plan)
        o = jnp.einsum("thc,hvc->thv", o_latent, self.w_uv[...])
        return self.o_proj(o.reshape(x.shape[0], c.num_heads * c.v_head_dim)), caches
