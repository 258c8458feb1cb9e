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

:func:`rope_quantize_fp8_append_paged_kv_cache` is the serving step's fused form (FlashInfer's
name): RoPE from a ``cos_sin_cache``, K/V quantized into an fp8 paged cache, q returned rotated.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinfer.fp8 import check_scale_value, is_fp8, saturate_cast, scale_array
from jaxinfer.page import append_paged_kv_cache, check_kv_layout
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


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dim: int, interleave: bool,
            out_dtype=None) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of ``x [nnz, H, D]`` by the angles whose cosines and
    sines are ``cos``, ``sin [nnz, rotary_dim/2]``; the result in ``out_dtype`` (``None``: x's;
    float32: unrounded)."""
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleave:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    rot = jnp.stack([ra, rb], axis=-1).reshape(rot.shape) if interleave else jnp.concatenate([ra, rb], -1)
    return jnp.concatenate([rot, rest], axis=-1).astype(out_dtype or x.dtype)


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
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return _rotate(q, cos, sin, rotary_dim, interleave), _rotate(k, cos, sin, rotary_dim, interleave)


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
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
) -> tuple[jax.Array, jax.Array]:
    """Apply RoPE to every row at its own position (FlashInfer's ``apply_rope_pos_ids``).

    Example::

        import jax, jax.numpy as jnp, jaxinfer
        q = jax.random.normal(jax.random.key(0), (7, 4, 64), jnp.float16)   # [nnz, Hq, D]
        k = jax.random.normal(jax.random.key(1), (7, 2, 64), jnp.float16)   # [nnz, Hk, D]
        pos_ids = jnp.arange(7, dtype=jnp.int32)
        q_rope, k_rope = jaxinfer.apply_rope_pos_ids(q, k, pos_ids)

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
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
) -> tuple[jax.Array, jax.Array]:
    """Apply RoPE to ragged ``q``/``k`` (FlashInfer's ``apply_rope``).

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        batch_size, qkv_len, num_qo_heads, num_kv_heads, head_dim = 4, 10, 32, 32, 128
        nnz = batch_size * qkv_len
        q = jax.random.normal(jax.random.key(0), (nnz, num_qo_heads, head_dim), jnp.float16)
        k = jax.random.normal(jax.random.key(1), (nnz, num_kv_heads, head_dim), jnp.float16)
        indptr = jnp.arange(0, nnz + 1, qkv_len, dtype=jnp.int32)
        offsets = jnp.full((batch_size,), 10, jnp.int32)
        q_rope, k_rope = jaxinfer.apply_rope(q, k, indptr, offsets)

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
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> tuple[jax.Array, jax.Array]:
    """Llama 3.1 RoPE at explicit positions (FlashInfer's ``apply_llama31_rope_pos_ids``).

    Example::

        q_rope, k_rope = jaxinfer.apply_llama31_rope_pos_ids(q, k, jnp.arange(q.shape[0]))

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

    Example::

        q_rope, k_rope = jaxinfer.apply_llama31_rope(q, k, indptr, offsets)   # shapes of q, k

    Args:
      q, k, indptr, offsets: as in :func:`apply_rope`.
      Other options: as in :func:`apply_llama31_rope_pos_ids`.

    Returns:
      ``(q_rope, k_rope)`` of the shapes and dtypes of ``q`` and ``k``.

    Raises:
      ValueError: at trace time, naming the argument of the wrong rank, shape, dtype or value.
    """
    scaling = _llama31_scaling(low_freq_factor, high_freq_factor, old_context_len)
    pos_ids = _pos_ids_from_indptr(q, indptr, offsets)
    return _apply_pos_ids(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, scaling)


def apply_rope_with_cos_sin_cache(positions, query, key, head_size: int, cos_sin_cache, is_neox: bool = True):
    """RoPE from a precomputed cos/sin table on flattened heads (FlashInfer's and vLLM's
    ``apply_rope_with_cos_sin_cache``).

    Row ``i`` rotates by the angles whose cosines are ``cos_sin_cache[positions[i], :rotary_dim/2]``
    and sines ``cos_sin_cache[positions[i], rotary_dim/2:]`` (RoFormer, Su et al. 2021, sec. 3.4);
    only the first ``rotary_dim = cos_sin_cache.shape[1]`` dims of each head rotate.

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax, jax.numpy as jnp, jaxinfer
        num_tokens, num_q_heads, num_kv_heads, head_size, max_seq_len = 6, 4, 2, 64, 128
        inv_freq = 1.0 / (1e4 ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
        freqs = jnp.arange(max_seq_len, dtype=jnp.float32)[:, None] * inv_freq[None]
        cos_sin_cache = jnp.concatenate([jnp.cos(freqs), jnp.sin(freqs)], axis=-1)  # [128, 64] f32
        positions = jnp.arange(num_tokens, dtype=jnp.int32)
        query = jax.random.normal(jax.random.key(0), (num_tokens, num_q_heads * head_size), jnp.float16)
        key = jax.random.normal(jax.random.key(1), (num_tokens, num_kv_heads * head_size), jnp.float16)
        query_rope, key_rope = jaxinfer.apply_rope_with_cos_sin_cache(
            positions, query, key, head_size, cos_sin_cache, is_neox=True)

    Args:
      positions: ``[nnz]`` integer positions; values outside ``[0, max_position)`` are clamped
        into it (a jitted function cannot raise on values).
      query: ``[nnz, num_q_heads * head_size]`` (or ``[nnz, num_q_heads, head_size]``), float.
      key: ``[nnz, num_k_heads * head_size]`` (or 3-D), float.
      head_size: D.
      cos_sin_cache: ``[max_position, rotary_dim]`` float32, cosines then sines.
      is_neox: ``True`` rotate-half pairs ``(i, i + rotary_dim/2)``; ``False`` pairs ``(2i, 2i+1)``.

    Returns:
      ``(query_rope, key_rope)`` of the shapes and dtypes of ``query`` and ``key``.

    Raises:
      ValueError: at trace time, a width that is not a multiple of ``head_size``, a
        ``cos_sin_cache`` that is not 2-D float32 with an even ``rotary_dim <= head_size``, or
        ``positions`` that is not ``[nnz]`` integer.
    """
    return _rope_cos_sin(positions, query, key, cos_sin_cache, head_size=head_size, is_neox=is_neox)


@functools.partial(jax.jit, static_argnames=("head_size", "is_neox"))
def _rope_cos_sin(positions, query, key, cos_sin_cache, *, head_size: int, is_neox: bool):
    heads = []
    for name, x in (("query", query), ("key", key)):
        if x.ndim not in (2, 3) or x.shape[-1] % head_size or (x.ndim == 3 and x.shape[-1] != head_size):
            raise ValueError(f"{name} must be [nnz, num_heads * head_size={head_size}] or [nnz, num_heads, "
                             f"head_size], got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating, got {x.dtype}")
        heads.append(x.reshape(x.shape[0], -1, head_size))
    q, k = heads
    if cos_sin_cache.ndim != 2 or cos_sin_cache.dtype != jnp.float32:
        raise ValueError(f"cos_sin_cache must be [max_position, rotary_dim] float32, got "
                         f"{cos_sin_cache.dtype}{tuple(cos_sin_cache.shape)}")
    rotary_dim = _check_qk(q, k, cos_sin_cache.shape[1])
    _check_index("positions", positions, q.shape[0])
    table = cos_sin_cache[jnp.clip(positions.astype(jnp.int32), 0, cos_sin_cache.shape[0] - 1)]
    cos, sin = table[:, : rotary_dim // 2], table[:, rotary_dim // 2 :]
    return (_rotate(q, cos, sin, rotary_dim, not is_neox).reshape(query.shape),
            _rotate(k, cos, sin, rotary_dim, not is_neox).reshape(key.shape))


def _inplace(fn, name: str):
    """FlashInfer's ``*_inplace`` name of ``fn``: the same function, documented as returning."""

    def inplace(*args, **kwargs):
        return fn(*args, **kwargs)

    inplace.__name__ = inplace.__qualname__ = name
    inplace.__signature__ = inspect.signature(fn)
    inplace.__doc__ = f"""FlashInfer's ``{name}``, functional: RETURNS the rotated arrays.

    JAX arrays are immutable, so the inputs are NOT modified: where FlashInfer code calls
    ``{name}(q, k, ...)`` for its effect, write ``q, k = {name}(q, k, ...)``. Under ``jax.jit``
    with the inputs donated, XLA reuses their buffers. Arguments, shapes, dtypes, errors and
    method: :func:`{fn.__name__}`.

    Example::

        q, k = jaxinfer.{name}(q, k, ...)   # the arguments of jaxinfer.{fn.__name__}
    """
    return inplace


apply_rope_inplace = _inplace(apply_rope, "apply_rope_inplace")
apply_rope_pos_ids_inplace = _inplace(apply_rope_pos_ids, "apply_rope_pos_ids_inplace")
apply_llama31_rope_inplace = _inplace(apply_llama31_rope, "apply_llama31_rope_inplace")
apply_llama31_rope_pos_ids_inplace = _inplace(apply_llama31_rope_pos_ids, "apply_llama31_rope_pos_ids_inplace")
apply_rope_with_cos_sin_cache_inplace = _inplace(apply_rope_with_cos_sin_cache,
                                                 "apply_rope_with_cos_sin_cache_inplace")


def _llama31_scaling(low_freq_factor, high_freq_factor, old_context_len) -> Llama31Scaling:
    if not 0 < low_freq_factor < high_freq_factor:
        raise ValueError(
            "low_freq_factor and high_freq_factor must satisfy 0 < low_freq_factor < high_freq_factor, "
            f"got {low_freq_factor}, {high_freq_factor}"
        )
    if not old_context_len > 0:
        raise ValueError(f"old_context_len must be > 0, got {old_context_len}")
    return Llama31Scaling(float(low_freq_factor), float(high_freq_factor), float(old_context_len))


def rope_quantize_fp8_append_paged_kv_cache(
    q_rope: jax.Array,
    k_rope: jax.Array,
    q_nope: jax.Array | None,
    k_nope: jax.Array | None,
    v: jax.Array,
    cos_sin_cache: jax.Array,
    pos_ids: jax.Array,
    paged_kv_cache,
    kv_indices: jax.Array,
    kv_indptr: jax.Array,
    batch_indices: jax.Array,
    positions: jax.Array,
    *,
    kv_last_page_len: jax.Array,
    is_neox: bool = True,
    quantize_dtype=None,
    quant_scale_q=1.0,
    quant_scale_kv=1.0,
    kv_layout: str = "NHD",
):
    """RoPE, fp8 quantization and the paged append of one serving step, fused
    (FlashInfer's ``rope_quantize_fp8_append_paged_kv_cache``, GQA/MHA form).

    Row ``i`` is rotated at position ``pos_ids[i]`` with ``cos = cos_sin_cache[pos, :R/2]`` and
    ``sin = cos_sin_cache[pos, R/2:]`` (``R`` = rotary dims; rotate-half pairs ``(j, j + R/2)``
    with ``is_neox``, else ``(2j, 2j + 1)``; RoFormer, Su et al. 2021, sec. 3.4). The keys
    ``[rotated k_rope, k_nope]`` and the values, times ``quant_scale_kv`` in float32, are
    saturated to the fp8 cache's range (:func:`jaxinfer.fp8.saturate_cast`) and written as
    :func:`~jaxinfer.page.append_paged_kv_cache` writes (only into each row's own pages); the
    attention over the cache then takes ``k_scale = v_scale = 1 / quant_scale_kv``. Everything in
    float32, one rounding per output.

    Differences from FlashInfer: the updated cache is returned (JAX arrays are immutable; donate
    it under ``jax.jit`` to update in place); ``kv_last_page_len`` (the page table after the
    append) bounds the writes; q comes back in ``quantize_dtype`` defaulting to q's own dtype,
    since jaxinfer's attention takes 16-bit queries (FlashInfer's fp8 default would need fp8-q
    kernels); MLA's 2-D ``k_rope`` is not served.

    Args:
      q_rope: ``[nnz, Hq, R]`` bf16/fp16 (or float32) rotary part of q; q_nope ``[nnz, Hq, D - R]``
        or ``None`` (``D = R``).
      k_rope: ``[nnz, Hkv, R]``; k_nope ``[nnz, Hkv, D - R]`` or ``None``, q's dtype.
      v: ``[nnz, Hkv, D]``, q's dtype.
      cos_sin_cache: ``[max_position, R]`` float32 (cosines, then sines).
      pos_ids: ``[nnz]`` integer RoPE position of each row (clamped to the table).
      paged_kv_cache: ``(k_cache, v_cache)`` or one array (:func:`~jaxinfer.page.unpack_paged_kv_cache`)
        in ``float8_e4m3fn`` or ``float8_e5m2``.
      kv_indices, kv_indptr, batch_indices, positions, kv_last_page_len: as in
        :func:`~jaxinfer.page.append_paged_kv_cache`.
      is_neox: rotate-half pairs (``False``: interleaved pairs).
      quantize_dtype: dtype of the q outputs (``None``: q_rope's); an fp8 dtype saturates.
      quant_scale_q: multiplies the q outputs; quant_scale_kv: multiplies K and V before their
        cast. Python floats (finite, > 0) or float arrays (``()``, or ``[Hkv]`` for
        ``quant_scale_kv``), traced or not.
      kv_layout: ``"NHD"`` or ``"HND"`` (static).

    Returns:
      ``(q_rope_out [nnz, Hq, R], q_nope_out [nnz, Hq, D - R], paged_kv_cache)``.

    Raises:
      ValueError: naming the argument of the wrong rank, shape or dtype (the cache not fp8, a
        2-D ``k_rope``, an odd ``R``, a ``cos_sin_cache`` that is not ``[n, R]`` float32), or a
        bad scale.
    """
    check_scale_value("quant_scale_q", quant_scale_q)
    check_scale_value("quant_scale_kv", quant_scale_kv)
    check_kv_layout(kv_layout)
    if quantize_dtype is not None:
        quantize_dtype = jnp.dtype(quantize_dtype)
    return _rope_quantize_append(q_rope, k_rope, q_nope, k_nope, v, cos_sin_cache, pos_ids, paged_kv_cache,
                                 kv_indices, kv_indptr, batch_indices, positions, kv_last_page_len, quant_scale_q,
                                 quant_scale_kv, is_neox=is_neox, quantize_dtype=quantize_dtype, kv_layout=kv_layout)


@functools.partial(jax.jit, static_argnames=("is_neox", "quantize_dtype", "kv_layout"))
def _rope_quantize_append(q_rope, k_rope, q_nope, k_nope, v, cos_sin_cache, pos_ids, paged_kv_cache, kv_indices,
                          kv_indptr, batch_indices, positions, kv_last_page_len, quant_scale_q, quant_scale_kv, *,
                          is_neox, quantize_dtype, kv_layout):
    if k_rope.ndim != 3:
        raise ValueError(f"k_rope must be [nnz, num_kv_heads, rope_dim] (MLA's 2-D k_rope is not served), got "
                         f"{tuple(k_rope.shape)}")
    nnz, num_kv_heads, rope_dim = k_rope.shape
    if q_rope.ndim != 3 or q_rope.shape[0] != nnz or q_rope.shape[2] != rope_dim or rope_dim % 2:
        raise ValueError(f"q_rope must be [nnz={nnz}, num_qo_heads, rope_dim={rope_dim}] with an even rope_dim, got "
                         f"{tuple(q_rope.shape)}")
    if not jnp.issubdtype(q_rope.dtype, jnp.floating) or is_fp8(q_rope.dtype):
        raise ValueError(f"q_rope must be bf16, fp16 or float32, got {q_rope.dtype}")
    nope_dim = 0 if k_nope is None else k_nope.shape[-1]
    if q_nope is None:
        q_nope = jnp.zeros((nnz, q_rope.shape[1], nope_dim), q_rope.dtype)
    for name, x, heads in (("k_rope", k_rope, num_kv_heads), ("q_nope", q_nope, q_rope.shape[1]),
                           ("k_nope", k_nope, num_kv_heads), ("v", v, num_kv_heads)):
        if x is None:
            continue
        width = rope_dim + nope_dim if name == "v" else (rope_dim if name == "k_rope" else nope_dim)
        if x.ndim != 3 or tuple(x.shape) != (nnz, heads, width) or x.dtype != q_rope.dtype:
            raise ValueError(f"{name} must be [{nnz}, {heads}, {width}] {q_rope.dtype} (the shapes of q_rope, k_rope, "
                             f"k_nope), got {x.dtype}{tuple(x.shape)}")
    if cos_sin_cache.ndim != 2 or cos_sin_cache.shape[1] != rope_dim or cos_sin_cache.dtype != jnp.float32:
        raise ValueError(f"cos_sin_cache must be [max_position, rope_dim={rope_dim}] float32, got "
                         f"{cos_sin_cache.dtype}{tuple(cos_sin_cache.shape)}")
    _check_index("pos_ids", pos_ids, nnz)
    k_cache = paged_kv_cache[0] if isinstance(paged_kv_cache, (tuple, list)) else paged_kv_cache
    if not is_fp8(k_cache.dtype):
        raise ValueError(f"paged_kv_cache must be float8_e4m3fn or float8_e5m2, got {k_cache.dtype}")
    if tuple(getattr(quant_scale_q, "shape", ())) not in ((), (1,)):
        raise ValueError(f"quant_scale_q must be a scalar, got shape {tuple(quant_scale_q.shape)}")
    q_scale = scale_array("quant_scale_q", quant_scale_q, 1)[0]
    kv_scale = scale_array("quant_scale_kv", quant_scale_kv, num_kv_heads)[:, None]
    table = cos_sin_cache[jnp.clip(pos_ids.astype(jnp.int32), 0, cos_sin_cache.shape[0] - 1)]
    cos, sin = table[:, : rope_dim // 2], table[:, rope_dim // 2 :]
    interleave = not is_neox
    q_out = quantize_dtype or q_rope.dtype

    def q_cast(x):
        x = x.astype(jnp.float32) * q_scale
        return saturate_cast(x, q_out) if is_fp8(q_out) else x.astype(q_out)

    k = _rotate(k_rope, cos, sin, rope_dim, interleave, jnp.float32)
    if k_nope is not None:
        k = jnp.concatenate([k, k_nope.astype(jnp.float32)], axis=-1)
    paged_kv_cache = append_paged_kv_cache(
        saturate_cast(k * kv_scale, k_cache.dtype), saturate_cast(v.astype(jnp.float32) * kv_scale, k_cache.dtype),
        batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr, kv_last_page_len, kv_layout)
    q_rot = _rotate(q_rope, cos, sin, rope_dim, interleave, jnp.float32)
    return q_cast(q_rot), q_cast(q_nope), paged_kv_cache
