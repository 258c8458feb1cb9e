"""Attention variants: everything that changes the logits, the mask or the output of attention.

An :class:`AttentionVariant` is a frozen, hashable dataclass, so it is a static argument of every
jitted function and kernel: two calls with equal variants share one compiled program. It is the
JAX counterpart of FlashInfer's JIT attention specs (FlashInfer paper, arXiv 2501.01005, sec. 3.2):
the user callables below are plain ``jnp`` functions traced into the reference engine and into the
Pallas kernels.

The logits pipeline, for query row ``i`` of a request with ``qo_len`` queries and key ``j`` of its
``kv_len`` keys (natural-log units; ``q_pos = i + kv_len - qo_len``, bottom-right alignment):

1. ``q = query_transform(q)``, ``k = key_transform(k)`` (float32 rows of ``head_dim``);
2. ``ROPE_LLAMA``: rotate-half RoPE, ``q`` at position ``q_pos``, ``k`` at position ``j``,
   angle ``pos / rope_scale * rope_theta ** (-2 d / head_dim)`` for ``d < head_dim / 2``;
3. ``x = (q . k) * sm_scale``;
4. soft cap ``c > 0``: ``x = c * tanh(x / c)`` (Gemma 2);
5. ``ALIBI``: ``x += slope[qo_head] * (j - q_pos)`` (Press et al. 2022, power-of-2 schedule);
6. ``x = logits_transform(x, q_pos, j, qo_head, kv_head)``;
7. key ``j`` is visible iff causal (``j <= q_pos``), window (``j >= q_pos - window_left``),
   the custom mask and ``logits_mask(q_pos, j, qo_head, kv_head)`` all allow it;
8. ``use_softmax``: ``o = sum_j softmax(x)_j v_j`` over visible keys and
   ``lse = log2(sum_j exp(x_j))`` (base 2, as FlashInfer); a row with no visible key gets
   ``o = 0, lse = -inf``. Without softmax, ``o = sum_j x_j v_j`` over visible keys (e.g. sigmoid
   attention, FlashSigmoid) and there is no lse;
9. ``o = output_transform(o, lse, q_pos, qo_head)`` (float32; e.g. attention sinks).

Every callable receives arrays that broadcast against each other (index arguments are int32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp
import numpy as np

from jaxinfer.plan.checks import check_int

PosEncodingMode = Literal["NONE", "ROPE_LLAMA", "ALIBI"]
POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttentionVariant:
    """Static description of an attention variant (see the module docstring for the pipeline).

    Example (a sliding-window variant with a soft cap, and a user logits transform)::

        import jax, jax.numpy as jnp, jaxinfer
        q = jax.random.normal(jax.random.key(0), (16, 4, 64), jnp.float32)    # [Lq, Hq, D]
        k = jax.random.normal(jax.random.key(1), (32, 2, 64), jnp.float32)    # [Lk, Hkv, D]
        window = jaxinfer.AttentionVariant(causal=True, window_left=8, logits_soft_cap=30.0)
        bias = jaxinfer.AttentionVariant(logits_transform=lambda x, qp, kp, qh, kh: x - 0.1 * (qp - kp))
        o = jaxinfer.single_prefill_with_kv_cache(q, k, k, variant=window)   # [16, 4, 64]
        o = jaxinfer.single_prefill_with_kv_cache(q, k, k, variant=bias)

    Attributes:
      causal: bottom-right aligned causal mask.
      window_left: sliding window size to the left, ``-1`` disables it.
      logits_soft_cap: ``c > 0`` applies ``c * tanh(x / c)``; ``None`` or ``0.0`` disables it.
      sm_scale: logits scale; ``None`` means ``1 / sqrt(head_dim)``.
      pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"``.
      rope_scale, rope_theta: RoPE parameters (``ROPE_LLAMA`` only).
      logits_transform: ``(x, q_pos, kv_pos, qo_head, kv_head) -> x``.
      logits_mask: ``(q_pos, kv_pos, qo_head, kv_head) -> bool`` (True keeps the key).
      query_transform, key_transform: ``(rows [..., head_dim] float32) -> rows``.
      output_transform: ``(o [..., head_dim] float32, lse [...] base 2, q_pos, qo_head) -> o``.
      use_softmax: ``False`` gives the plain weighted sum ``sum_j x_j v_j``.

    Raises:
      ValueError: on an unknown ``pos_encoding_mode``, a ``window_left`` that is not an integer
        ``>= -1``, a negative or non-finite soft cap, or a ``sm_scale``/``rope_scale``/``rope_theta``
        that is not a finite number ``> 0`` (inf or NaN would make every output NaN).
    """

    causal: bool = False
    window_left: int = -1
    logits_soft_cap: float | None = None
    sm_scale: float | None = None
    pos_encoding_mode: PosEncodingMode = "NONE"
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    logits_transform: Callable | None = None
    logits_mask: Callable | None = None
    query_transform: Callable | None = None
    key_transform: Callable | None = None
    output_transform: Callable | None = None
    use_softmax: bool = True

    def __post_init__(self):
        if self.pos_encoding_mode not in POS_ENCODING_MODES:
            raise ValueError(
                f"pos_encoding_mode must be one of {POS_ENCODING_MODES}, got {self.pos_encoding_mode!r}"
            )
        window_left = check_int("window_left", self.window_left, minimum=-1)
        if self.logits_soft_cap is not None and not (_is_finite(self.logits_soft_cap) and self.logits_soft_cap >= 0):
            raise ValueError(f"logits_soft_cap must be a finite number >= 0, or None, got {self.logits_soft_cap}")
        for name in ("sm_scale", "rope_scale", "rope_theta"):
            val = getattr(self, name)
            if (val is not None or name != "sm_scale") and not (_is_finite(val) and val > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {val}")
        # Normalise so that equal variants hash equal (one compiled program each).
        object.__setattr__(self, "window_left", window_left)
        if self.logits_soft_cap == 0.0:
            object.__setattr__(self, "logits_soft_cap", None)
        if self.logits_soft_cap is not None:
            object.__setattr__(self, "logits_soft_cap", float(self.logits_soft_cap))
        if self.sm_scale is not None:
            object.__setattr__(self, "sm_scale", float(self.sm_scale))

    @property
    def has_soft_cap(self) -> bool:
        return self.logits_soft_cap is not None

    @property
    def has_user_callables(self) -> bool:
        return any(
            f is not None
            for f in (
                self.logits_transform,
                self.logits_mask,
                self.query_transform,
                self.key_transform,
                self.output_transform,
            )
        )

    def scale(self, head_dim: int) -> float:
        """The resolved ``sm_scale`` (``1/sqrt(head_dim)`` when unset)."""
        return self.sm_scale if self.sm_scale is not None else 1.0 / math.sqrt(head_dim)

    def replace(self, **changes) -> AttentionVariant:
        return dataclasses.replace(self, **changes)


# The dataclass's generated constructor gets its own docstring (help() shows it).
AttentionVariant.__init__.__doc__ = """Make a variant; every argument is the attribute of the same name (see the class).

    Raises:
      ValueError: an unknown ``pos_encoding_mode``, a ``window_left`` that is not an integer
        ``>= -1``, a negative or non-finite soft cap, or a non-finite or non-positive
        ``sm_scale``/``rope_scale``/``rope_theta``.
    """


def _is_finite(x) -> bool:
    """``x`` is a real, finite number (not a bool, a string or a complex)."""
    try:
        return not isinstance(x, (bool, np.bool_, str)) and math.isfinite(x)
    except TypeError:
        return False


def make_variant(
    variant: AttentionVariant | None = None,
    *,
    causal: bool = False,
    window_left: int = -1,
    logits_soft_cap: float | None = None,
    sm_scale: float | None = None,
    pos_encoding_mode: str = "NONE",
    rope_scale: float | None = 1.0,
    rope_theta: float | None = 1e4,
) -> AttentionVariant:
    """Build the variant of a call from FlashInfer-style keyword options.

    ``rope_scale=None`` and ``rope_theta=None`` (FlashInfer's defaults) mean 1.0 and 1e4.

    A user ``variant`` carries its own callables; keyword options that differ from their defaults
    override its fields, so ``plan(..., causal=True, variant=v)`` means ``v`` made causal.
    """
    rope_scale = 1.0 if rope_scale is None else rope_scale
    rope_theta = 1e4 if rope_theta is None else rope_theta
    options = dict(
        causal=causal,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        sm_scale=sm_scale,
        pos_encoding_mode=pos_encoding_mode,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
    )
    if variant is None:
        return AttentionVariant(**options)
    defaults = AttentionVariant()
    overrides = {k: v for k, v in options.items() if v != getattr(defaults, k)}
    return variant.replace(**overrides)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes ``[num_heads]`` float32 of the standard schedule (Press et al. 2022, sec. 3).

    For ``n`` a power of 2, head ``h`` gets ``2 ** (-8 (h + 1) / n)``; otherwise the slopes of the
    closest smaller power of 2 ``m`` are followed by every other slope of the ``2m`` schedule.

    Example::

        jaxinfer.alibi_slopes(8)   # [0.5, 0.25, ..., 0.00390625] float32
    """
    m = 2 ** math.floor(math.log2(num_heads))
    base = [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]
    extra = [2.0 ** (-4.0 * (h + 1) / m) for h in range(0, 2 * (num_heads - m), 2)]
    return np.asarray(base + extra, dtype=np.float32)


def rope_inv_freq(head_dim: int, rope_scale: float, rope_theta: float) -> jnp.ndarray:
    """RoPE angle per position ``[head_dim // 2]`` float32: ``theta ** (-2d/D) / rope_scale``."""
    d = jnp.arange(head_dim // 2, dtype=jnp.float32)
    return (rope_theta ** (-2.0 * d / head_dim)) / rope_scale
