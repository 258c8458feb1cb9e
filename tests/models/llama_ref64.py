"""Float64 numpy forward of a llama-architecture GGUF, the reference of tests/models/test_llama_gguf.py.

It works on the tensors as llama.cpp stores them (GGUF names, ``[out, in]`` matrices, q/k rows in
llama.cpp's order) with llama.cpp's own RoPE for the llama architecture, which rotates interleaved
pairs ``(2i, 2i+1)`` (ggml ``rope`` mode 0). jaxinfer's model un-permutes the q/k rows and rotates
halves ``(i, i + D/2)``: the two agree only if the un-permutation is right. The geometry is read from
the metadata keys here, not through jaxinfer.models.gguf.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x: np.ndarray, theta: float) -> np.ndarray:
    """``x [T, H, D]`` at positions ``0..T-1``: pairs ``(2i, 2i+1)`` rotate by ``t * theta^(-2i/D)``."""
    t, _, d = x.shape
    angle = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)  # [T, D/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def causal_gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` -> ``[T, Hq, D]``; query head ``h`` reads KV head ``h // (Hq/Hkv)``."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v)


def llama_logits64(tensors: dict[str, np.ndarray], metadata: dict, sequences) -> list[np.ndarray]:
    """Logits ``[T, vocab]`` float64 of every position of each token sequence (each one causal).

    Args:
      tensors: dequantized GGUF tensors by name (any float dtype; computed in float64).
      metadata: the GGUF's metadata (``llama.*`` keys).
      sequences: token id lists; they share each weight's float64 copy, made once per layer.
    """
    w = lambda name: np.asarray(tensors[name], np.float64)  # noqa: E731 (per use: float64 of all is ~1 GB)
    hq = metadata["llama.attention.head_count"]
    hkv = metadata["llama.attention.head_count_kv"]
    eps = metadata["llama.attention.layer_norm_rms_epsilon"]
    theta = metadata["llama.rope.freq_base"]
    xs = [np.asarray(tensors["token_embd.weight"][np.asarray(s)], np.float64) for s in sequences]
    for i in range(metadata["llama.block_count"]):
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
        wq, wk, wv, wo, norm1, norm2, gate, up, down = (w(f"blk.{i}.{name}.weight") for name in names)
        for j, x in enumerate(xs):
            t = x.shape[0]
            h = rms_norm(x, norm1, eps)
            q = rope_interleaved((h @ wq.T).reshape(t, hq, -1), theta)
            k = rope_interleaved((h @ wk.T).reshape(t, hkv, -1), theta)
            v = (h @ wv.T).reshape(t, hkv, -1)
            x = x + causal_gqa_attention(q, k, v).reshape(t, -1) @ wo.T
            h = rms_norm(x, norm2, eps)
            g = h @ gate.T
            xs[j] = x + (g / (1 + np.exp(-g)) * (h @ up.T)) @ down.T
    head = w("output.weight" if "output.weight" in tensors else "token_embd.weight")  # tied: no output.weight
    norm = w("output_norm.weight")
    return [rms_norm(x, norm, eps) @ head.T for x in xs]
