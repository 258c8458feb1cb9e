"""FP8 KV caches: the cache dtypes, the scales of attention, and saturating quantization.

A KV cache in ``float8_e4m3fn`` or ``float8_e5m2`` (OCP 8-bit floating point, Micikevicius et al.
2022, "FP8 Formats for Deep Learning") holds the keys and values divided by per-tensor or
per-KV-head scales: ``k_cache = K / k_scale``, ``v_cache = V / v_scale``. Attention then reads
the dequantized values ``k_cache * k_scale`` and ``v_cache * v_scale``, which, as FlashInfer
defines its ``k_scale``/``v_scale`` arguments, is the same as multiplying the logits ``q . k`` by
``k_scale`` and the output by ``v_scale``: every backend applies them that way, in float32, and
widens the fp8 values on load (exactly: every e4m3/e5m2 value is a bf16 and an fp16 value).

Scales are Python numbers (checked here: finite, > 0) or float arrays of shape ``()`` or
``[num_kv_heads]`` (per-KV-head scales), traced or not: a jitted step takes calibrated scales as
arguments without recompiling.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

FP8_KV_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
"""KV cache dtypes read with a 16-bit query (bf16/fp16) and widened on load."""

KV_DTYPE_NAMES = {"bf16": jnp.dtype(jnp.bfloat16), "fp16": jnp.dtype(jnp.float16),
                  "e4m3": FP8_KV_DTYPES[0], "e5m2": FP8_KV_DTYPES[1]}
"""Short names of the KV cache dtypes (``jaxinfer-bench --kv-dtype``, serving configs)."""


def is_fp8(dtype) -> bool:
    """``dtype`` is one of :data:`FP8_KV_DTYPES`."""
    return jnp.dtype(dtype) in FP8_KV_DTYPES


def kv_dtype(name) -> jnp.dtype:
    """A KV cache dtype from a short name of :data:`KV_DTYPE_NAMES` or anything ``jnp.dtype`` takes.

    Raises:
      ValueError: neither (the message lists the short names).
    """
    if isinstance(name, str) and name in KV_DTYPE_NAMES:
        return KV_DTYPE_NAMES[name]
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPE_NAMES)} or a dtype, got {name!r}") from None


def saturate_cast(x: jax.Array, dtype) -> jax.Array:
    """``x`` rounded to ``dtype`` (round to nearest even) after clipping to its finite range
    ``[-max, max]`` (448 for e4m3, 57344 for e5m2): values past the range, infinities included,
    become the largest finite value of their sign (e4m3 has no infinity, and a plain cast would
    make them NaN); NaN stays NaN. Computed from float32."""
    limit = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32), -limit, limit).astype(dtype)


def check_scale_value(name: str, scale) -> None:
    """Host checks of a scale whose value is known (a Python or numpy number or numpy array):
    finite and > 0, so that a bad calibration cannot make every output NaN or flip the logits.
    Traced and device arrays are checked for shape and dtype only (:func:`scale_array`).

    Raises:
      ValueError: naming ``name``: a bool, a non-number, or a value that is not finite and > 0.
    """
    if scale is None or isinstance(scale, (jax.Array, jax.core.Tracer)):
        return
    if isinstance(scale, (bool, np.bool_)):
        raise ValueError(f"{name} must be a float or a float array, got the bool {scale!r}")
    if isinstance(scale, numbers.Real) or isinstance(scale, np.ndarray):
        values = np.asarray(scale)
        if values.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be a float or a float array, got {values.dtype}")
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
        return
    raise ValueError(f"{name} must be a float or a float array, got {type(scale).__name__}")


def scale_array(name: str, scale, num_kv_heads: int) -> jax.Array | None:
    """A scale as ``[num_kv_heads]`` float32 (``None`` stays ``None``); jit-compatible.

    Args:
      name: argument name for messages (``"k_scale"``, ``"v_scale"``).
      scale: a Python number, or a float array of shape ``()``, ``[1]`` or ``[num_kv_heads]``.
      num_kv_heads: KV heads of the cache.

    Raises:
      ValueError: naming ``name``: a bool, a non-float array, or another shape (trace time).
    """
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)):
        raise ValueError(f"{name} must be a float or a float array, got the bool {scale!r}")
    if isinstance(scale, numbers.Real):
        return jnp.full((num_kv_heads,), scale, jnp.float32)
    dtype = getattr(scale, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a float or a float array, got {dtype or type(scale).__name__}")
    shape = tuple(scale.shape)
    if shape not in ((), (1,), (num_kv_heads,)):
        raise ValueError(f"{name} must be a scalar or [num_kv_heads = {num_kv_heads}] (per KV head), got shape {shape}")
    return jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (num_kv_heads,))


def quantize(x: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """``x [..., Hkv, D] / scale [Hkv]`` in float32, :func:`saturate_cast` to ``dtype``
    (``scale=None``: no division)."""
    x = x.astype(jnp.float32)
    if scale is not None:
        x = x / scale[:, None]
    return saturate_cast(x, dtype)
