"""Rotary positional embeddings (RoPE) on ragged query/key tensors, FlashInfer's ``apply_*rope*``.

RoPE (Su et al. 2021, "RoFormer", sec. 3.4) rotates each pair of dimensions ``(x_a, x_b)`` of a
row at position ``pos`` by the angle ``pos * f_i``:
``(x_a cos - x_b sin, x_b cos + x_a sin)``, with ``f_i = rope_theta ** (-2 i / rotary_dim) /
rope_scale`` for pair ``i < rotary_dim / 2`` (``rope_scale`` is linear position interpolation,
FlashInfer's ``rope_rcp_scale``). Pairs are ``(i, i + rotary_dim / 2)`` (rotate-half, GPT-NeoX /
Llama style, ``interleave=False``) or ``(2 i, 2 i + 1)`` (GPT-J style, ``interleave=True``). Only
the first ``rotary_dim`` dimensions rotate; the others pass through.

Llama 3.1 (Meta, "The Llama 3 Herd of Models", 2024, and its reference ``apply_scaling``) scales
only the low frequencies: with wavelength ``w_i = 2 pi / f_i``, frequencies with
``w_i < old_context_len / high_freq_factor`` are kept, those with
``w_i > old_context_len / low_freq_factor`` are divided by ``rope_scale``, and in between
``f = (1 - s) f / rope_scale + s f`` with ``s = (old_context_len / w_i - low_freq_factor) /
(high_freq_factor - low_freq_factor)``.

Everything is computed in float32 and returned in the input dtypes. Every function is
``jax.jit``-compatible; the keyword options are static.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinfer.variants import rope_inv_freq

_STATIC = ("rotary_dim", "interleave", "rope_scale", "rope_theta", "llama31")


class Llama31Scaling(NamedTuple):
    """Llama 3.1 frequency smoothing parameters (hashable: a static argument)."""

    low_freq_factor: float
    high_freq_factor: float
    old_context_len: float


def rope_frequencies(
    rotary_dim: int, rope_scale: float, rope_theta: float, llama31: Llama31Scaling | None = None
) -> jax.Array:
    """Angle per unit position of each rotated pair, ``[rotary_dim // 2]`` float32.

    Plain RoPE: ``rope_theta ** (-2 i / rotary_dim) / rope_scale``. With ``llama31``, the Llama 3.1
    smoothing of the module docstring (written, as in FlashInfer, as
    ``s = clip(f * a + b, 0, 1)``, ``a = old_context_len / (2 pi (high - low))``,
    ``b = -low / (high - low)``, which equals the published piecewise form).
    """
    freq = rope_inv_freq(rotary_dim, 1.0, rope_theta)
    if llama31 is None:
        return freq / rope_scale
    low, high, old_context_len = llama31
    smooth = jnp.clip(freq * (old_context_len / (2 * math.pi * (high - low))) - low / (high - low), 0.0, 1.0)
    return (1.0 - smooth) * (freq / rope_scale) + smooth * freq


def _rotate(x: jax.Array, angles: jax.Array, rotary_dim: int, interleave: bool) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of ``x [nnz, H, D]`` by ``angles [nnz, rotary_dim/2]``."""
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    if interleave:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    rot = jnp.stack([ra, rb], axis=-1).reshape(rot.shape) if interleave else jnp.concatenate([ra, rb], -1)
    return jnp.concatenate([rot, rest], axis=-1).astype(x.dtype)


def _check_qk(q, k, rotary_dim: int | None) -> int:
    """Trace-time checks; returns the resolved ``rotary_dim``."""
    for name, x in (("q", q), ("k", k)):
        if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating [nnz, num_heads, head_dim] array, got {x.dtype}{tuple(x.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be [nnz, Hk, head_dim] with q's nnz and head_dim, got q {q.shape} and k {k.shape}")
    head_dim = q.shape[2]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if int(rotary_dim) != rotary_dim or not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even integer in 2..head_dim={head_dim}, got {rotary_dim}")
    return int(rotary_dim)


def _check_index(name: str, x, length: int | None) -> None:
    if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer) or (length is not None and x.shape[0] != length):
        size = "" if length is None else f" of length {length}"
        raise ValueError(f"{name} must be a 1-D integer array{size}, got {x.dtype}{tuple(x.shape)}")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _apply_pos_ids(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31):
    rotary_dim = _check_qk(q, k, rotary_dim)
    _check_index("pos_ids", pos_ids, q.shape[0])
    if not (rope_scale > 0 and rope_theta > 0):
        raise ValueError(f"rope_scale and rope_theta must be > 0, got {rope_scale}, {rope_theta}")
    freq = rope_frequencies(rotary_dim, rope_scale, rope_theta, llama31)
    angles = pos_ids.astype(jnp.float32)[:, None] * freq[None, :]
    return _rotate(q, angles, rotary_dim, interleave), _rotate(k, angles, rotary_dim, interleave)


@functools.partial(jax.jit, static_argnames="nnz")
def _ragged_pos_ids(indptr, offsets, nnz: int):
    """Position of every row: ``offsets[b] + t - indptr[b]``; rows past ``indptr[-1]`` get 0."""
    rows = jnp.arange(nnz, dtype=jnp.int32)
    indptr = indptr.astype(jnp.int32)
    batch = jnp.clip(jnp.searchsorted(indptr, rows, side="right") - 1, 0, offsets.shape[0] - 1)
    pos = offsets.astype(jnp.int32)[batch] + rows - indptr[batch]
    return jnp.where(rows < indptr[-1], pos, 0)


def _pos_ids_from_indptr(q, indptr, offsets) -> jax.Array:
    indptr, offsets = jnp.asarray(indptr), jnp.asarray(offsets)
    _check_index("indptr", indptr, None)
    _check_index("offsets", offsets, indptr.shape[0] - 1)
    if offsets.shape[0] == 0:
        return jnp.zeros((q.shape[0],), jnp.int32)
    return _ragged_pos_ids(indptr, offsets, q.shape[0])


def apply_rope_pos_ids(
    q: jax.Array,
    k: jax.Array,
    pos_ids: jax.Array,
    *,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
) -> tuple[jax.Array, jax.Array]:
    """Apply RoPE to every row at its own position (FlashInfer's ``apply_rope_pos_ids``).

    Args:
      q: ``[nnz, Hq, D]`` floating queries.
      k: ``[nnz, Hk, D]`` floating keys.
      pos_ids: ``[nnz]`` integer position of each row.
      rotary_dim: leading dims that rotate (even, ``<= D``); ``None`` means ``D``.
      interleave: ``False`` rotate-half pairs ``(i, i + rotary_dim/2)``; ``True`` pairs ``(2i, 2i+1)``.
      rope_scale: linear position interpolation factor (angles are divided by it).
      rope_theta: RoPE base.

    Returns:
      ``(q_rope, k_rope)`` of the shapes and dtypes of ``q`` and ``k``.

    Raises:
      ValueError: at trace time, naming the argument of the wrong rank, shape, dtype or value.
    """
    return _apply_pos_ids(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, None)


def apply_rope(
    q: jax.Array,
    k: jax.Array,
    indptr: jax.Array,
    offsets: jax.Array,
    *,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
) -> tuple[jax.Array, jax.Array]:
    """Apply RoPE to ragged ``q``/``k`` (FlashInfer's ``apply_rope``).

    Row ``t`` of request ``b`` (``indptr[b] <= t < indptr[b+1]``) is at position
    ``offsets[b] + t - indptr[b]``. Rows ``t >= indptr[-1]`` (padding) are at position 0, i.e.
    returned unchanged.

    Args:
      q: ``[nnz, Hq, D]`` floating queries.
      k: ``[nnz, Hk, D]`` floating keys.
      indptr: ``[B+1]`` integer row pointer of the requests.
      offsets: ``[B]`` integer position of each request's first row.
      rotary_dim, interleave, rope_scale, rope_theta: as in :func:`apply_rope_pos_ids`.

    Returns:
      ``(q_rope, k_rope)`` of the shapes and dtypes of ``q`` and ``k``.

    Raises:
      ValueError: at trace time, naming the argument of the wrong rank, shape, dtype or value.
    """
    pos_ids = _pos_ids_from_indptr(q, indptr, offsets)
    return _apply_pos_ids(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, None)


def apply_llama31_rope_pos_ids(
    q: jax.Array,
    k: jax.Array,
    pos_ids: jax.Array,
    *,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> tuple[jax.Array, jax.Array]:
    """Llama 3.1 RoPE at explicit positions (FlashInfer's ``apply_llama31_rope_pos_ids``).

    Args:
      q, k, pos_ids, rotary_dim, interleave: as in :func:`apply_rope_pos_ids`.
      rope_scale: factor by which the low frequencies are divided.
      rope_theta: RoPE base.
      low_freq_factor, high_freq_factor: wavelength thresholds ``old_context_len / factor``
        of the smoothing (``high_freq_factor > low_freq_factor > 0``).
      old_context_len: context length the model was pretrained with.

    Returns:
      ``(q_rope, k_rope)`` of the shapes and dtypes of ``q`` and ``k``.

    Raises:
      ValueError: at trace time, naming the argument of the wrong rank, shape, dtype or value.
    """
    scaling = _llama31_scaling(low_freq_factor, high_freq_factor, old_context_len)
    return _apply_pos_ids(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, scaling)


def apply_llama31_rope(
    q: jax.Array,
    k: jax.Array,
    indptr: jax.Array,
    offsets: jax.Array,
    *,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> tuple[jax.Array, jax.Array]:
    """Llama 3.1 RoPE on ragged ``q``/``k`` (FlashInfer's ``apply_llama31_rope``).

    Positions as in :func:`apply_rope`; frequencies as in :func:`apply_llama31_rope_pos_ids`.

    Raises:
      ValueError: at trace time, naming the argument of the wrong rank, shape, dtype or value.
    """
    scaling = _llama31_scaling(low_freq_factor, high_freq_factor, old_context_len)
    pos_ids = _pos_ids_from_indptr(q, indptr, offsets)
    return _apply_pos_ids(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, scaling)


def _llama31_scaling(low_freq_factor, high_freq_factor, old_context_len) -> Llama31Scaling:
    if not 0 < low_freq_factor < high_freq_factor:
        raise ValueError(
            "low_freq_factor and high_freq_factor must satisfy 0 < low_freq_factor < high_freq_factor, "
            f"got {low_freq_factor}, {high_freq_factor}"
        )
    if not old_context_len > 0:
        raise ValueError(f"old_context_len must be > 0, got {old_context_len}")
    return Llama31Scaling(float(low_freq_factor), float(high_freq_factor), float(old_context_len))
