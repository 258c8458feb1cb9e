"""jaxinfer.nn.MultiHeadLatentAttention against a float64 numpy DeepSeek MLA written un-absorbed.

The reference (:func:`ref_layer`) follows DeepSeek-V2's equations 9-19 (arXiv 2405.04434) on the
layer's own weights: per head it expands every cached token's latent into a key
``[W_UK_h c_kv, RoPE(k_pe)]`` and a value ``W_UV_h c_kv`` and attends causally over the whole
sequence, with no cache and no absorption. The layer runs two jitted steps (a ragged prefill, then
one decode row per request) through paged latent caches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import indptr_of
from flax import nnx

import jaxinfer
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.nn import MLAConfig, MultiHeadLatentAttention, plan_mla_step

SMALL = dict(hidden_size=48, num_heads=4, q_lora_rank=32, kv_lora_rank=64, qk_nope_head_dim=16,
             qk_rope_head_dim=16, v_head_dim=24, rope_theta=500.0)


def _w(p) -> np.ndarray:
    return np.asarray(jnp.asarray(p[...], jnp.float32), np.float64)


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope_pairs(x, pos, theta):
    """RoPE on adjacent pairs ``(2i, 2i+1)`` of ``x [L, ..., D]`` at positions ``pos [L]``."""
    d = x.shape[-1]
    ang = pos.reshape((-1,) + (1,) * (x.ndim - 1)) * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return out


def ref_layer(layer: MultiHeadLatentAttention, xs: np.ndarray) -> np.ndarray:
    """``y [L, hidden]`` of one request's whole sequence ``xs [L, hidden]``, causal, float64."""
    c = layer.config
    h, dn = c.num_heads, c.qk_nope_head_dim
    pos = np.arange(xs.shape[0], dtype=np.float64)
    c_q = _rms(xs @ _w(layer.q_a_proj.kernel), _w(layer.q_a_layernorm.scale), c.rms_norm_eps)
    q = (c_q @ _w(layer.q_b_proj.kernel)).reshape(len(xs), h, -1)
    q = np.concatenate([q[..., :dn], _rope_pairs(q[..., dn:], pos, c.rope_theta)], axis=-1)
    kv = xs @ _w(layer.kv_a_proj_with_mqa.kernel)
    c_kv = _rms(kv[:, : c.kv_lora_rank], _w(layer.kv_a_layernorm.scale), c.rms_norm_eps)
    k_pe = _rope_pairs(kv[:, c.kv_lora_rank :], pos, c.rope_theta)
    w_uk, w_uv = _w(layer.w_uk), _w(layer.w_uv)
    causal = np.tril(np.ones((len(xs), len(xs)), bool))
    heads = []
    for hh in range(h):
        k = np.concatenate([c_kv @ w_uk[hh].T, k_pe], axis=1)
        s = np.where(causal, q[:, hh] @ k.T * c.sm_scale, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        heads.append((p / p.sum(axis=1, keepdims=True)) @ (c_kv @ w_uv[hh].T))
    return np.concatenate(heads, axis=1) @ _w(layer.o_proj.kernel)


@pytest.mark.parametrize("backend,dtype,tol", [("xla", jnp.float32, 1e-4), ("pallas", jnp.bfloat16, 3e-2)])
def test_mla_layer_prefill_then_decode(backend, dtype, tol):
    cfg = MLAConfig(**SMALL, dtype=dtype)
    layer = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompt, page_size = [5, 9], 4
    seqs = [rng.standard_normal((n + 1, cfg.hidden_size)) for n in prompt]  # prompt + one decoded token
    kv_indptr, kv_indices = indptr_of([2, 3]), np.array([3, 0, 5, 1, 2])
    caches = (jnp.full((6, page_size, cfg.kv_lora_rank), jnp.nan, dtype),
              jnp.full((6, page_size, cfg.qk_rope_head_dim), jnp.nan, dtype))
    pallas = PallasBackend(num_ctas=3, split_factor=8, min_chunk=16, config=TileConfig(16, 16, 4, 1))
    # One fixed capacity and row count: both steps run one compiled program.
    capacity = jaxinfer.PlanCapacity(max_batch_size=2, max_qo_len=16, max_kv_len=16, max_work_tiles=32)
    wrapper = jaxinfer.BatchMLAPagedAttentionWrapper(backend=backend, capacity=capacity, pallas=pallas)
    graphdef, state = nnx.split(layer)
    run = jax.jit(lambda state, x, step, caches: nnx.merge(graphdef, state)(x, step, caches))
    rows = 16
    prefill = plan_mla_step(wrapper, cfg, indptr_of(prompt), kv_indptr, kv_indices, prompt, page_size, num_rows=rows)
    x1 = np.concatenate([s[:-1] for s in seqs])
    y1, caches = run(state, jnp.asarray(np.pad(x1, ((0, rows - 14), (0, 0))), dtype), prefill, caches)
    decode = plan_mla_step(wrapper, cfg, indptr_of([1, 1]), kv_indptr, kv_indices, [n + 1 for n in prompt], page_size,
                           num_rows=rows)
    x2 = np.stack([s[-1] for s in seqs])
    y2, caches = run(state, jnp.asarray(np.pad(x2, ((0, rows - 2), (0, 0))), dtype), decode, caches)
    y1, y2 = y1[:14], y2[:2]
    want = [ref_layer(layer, np.asarray(jnp.asarray(s, dtype).astype(jnp.float32), np.float64)) for s in seqs]
    got1 = np.asarray(y1.astype(jnp.float32), np.float64)
    got2 = np.asarray(y2.astype(jnp.float32), np.float64)
    scale = max(np.abs(w).max() for w in want)
    np.testing.assert_allclose(got1 / scale, np.concatenate([w[:-1] for w in want]) / scale, atol=tol, rtol=tol)
    np.testing.assert_allclose(got2 / scale, np.stack([w[-1] for w in want]) / scale, atol=tol, rtol=tol)
    assert np.isfinite(np.asarray(caches[0][kv_indices].astype(jnp.float32))).sum() == 16 * cfg.kv_lora_rank


def test_mla_config_defaults_are_deepseek_v3():
    c = MLAConfig()
    assert (c.hidden_size, c.num_heads, c.q_lora_rank, c.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert c.sm_scale == pytest.approx(192**-0.5)


def test_mla_layer_without_q_lora_and_step_errors():
    cfg = MLAConfig(**{**SMALL, "q_lora_rank": None}, dtype=jnp.float32)
    layer = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(2))
    assert layer.q_proj.kernel.shape == (48, 4 * 32)
    wrapper = jaxinfer.BatchMLAPagedAttentionWrapper(backend="xla")
    with pytest.raises(ValueError, match="appends 3 tokens"):
        plan_mla_step(wrapper, cfg, [0, 3], [0, 1], [0], [2], 4)
