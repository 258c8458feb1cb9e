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
9. attention sinks (``run(..., sinks=)``, ``[Hq]`` natural-log logits ``s_h``, gpt-oss /
   StreamingLLM): the sink joins the softmax denominator, ``o = o * sigmoid(lse ln 2 - s_h)`` and
   ``lse = logaddexp(lse ln 2, s_h) / ln 2`` (:func:`apply_sink`; exact, so a row with no visible
   key gets ``o = 0, lse = s_h / ln 2``). A sink is counted once per row: split-KV partials and
   cascade levels merge first, the sink comes after the merge. Softmax variants only;
10. ``o = output_transform(o, lse, q_pos, qo_head)`` (float32, ``lse`` including the sink).

Every callable receives arrays that broadcast against each other (index arguments are int32).

Variant parameters (arrays inside the callables). The Pallas kernels cannot capture arrays in a
callable, so per-head values (slopes, scales, sink logits of an output transform) come in as
``run(..., variant_params=)``: a pytree (e.g. a dict) of arrays, traced, so new values never
recompile. Each leaf is a scalar ``[]`` or has the query head as its leading axis: ``[Hq]`` or
``[Hq, T]`` (``T`` a power of 2 on the Pallas backend); floating leaves are float32, integer
leaves int32. A variant made with ``takes_params=True`` hands the pytree to its callables as one
more LAST argument, each leaf ``p`` of shape ``[Hq, ...]`` sliced to the rows of the call,
``p[qo_head]``, broadcasting like the callable's ``qo_head`` (``logits_transform``,
``logits_mask``, ``output_transform``) or like its rows without the head_dim axis
(``query_transform``: ``rows.shape[:-1]``); scalar leaves arrive as they are:

- ``logits_transform(x, q_pos, kv_pos, qo_head, kv_head, params)``,
- ``logits_mask(q_pos, kv_pos, qo_head, kv_head, params)``,
- ``query_transform(rows, params)``, ``output_transform(o, lse, q_pos, qo_head, params)``,
- ``key_transform(rows)`` takes no params: key rows belong to a KV head, shared by several
  query heads (a per-KV-head key factor is ``k_scale``).

For example a per-head ALiBi-like bias with learned slopes ``[Hq]``::

    v = AttentionVariant(takes_params=True,
                         logits_transform=lambda x, qp, kp, qh, kh, p: x + p["slope"] * (kp - qp))
    o = wrapper.run(q, kv_cache, variant_params={"slope": slopes})

The backends that run user callables (``"xla"``, ``"pallas"``) take ``variant_params``; the Pallas
kernels load each tile's rows of every leaf once per tile (a gather from memory by ``qo_head``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.hashing import hash_once
from jaxinfer.plan.checks import check_int

PARAM_CALLABLES = ("logits_transform", "logits_mask", "query_transform", "output_transform")
PosEncodingMode = Literal["NONE", "ROPE_LLAMA", "ALIBI"]
POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")
LOG2E = 1.4426950408889634


@hash_once  # hashed on every plan (lru keys) and every jit dispatch (a static argument)
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
      takes_params: the callables (all but ``key_transform``) take ``params``, the rows' slices of
        ``run(..., variant_params=)``, as one more last argument (module docstring).

    Raises:
      ValueError: on an unknown ``pos_encoding_mode``, a ``window_left`` that is not an integer
        ``>= -1``, a negative or non-finite soft cap, or a ``sm_scale``/``rope_scale``/``rope_theta``
        that is not a finite number ``> 0`` (inf or NaN would make every output NaN), or
        ``takes_params=True`` without a callable that takes them.
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
    takes_params: bool = False

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
        if self.takes_params and not any(getattr(self, name) for name in PARAM_CALLABLES):
            raise ValueError(f"takes_params=True needs one of {PARAM_CALLABLES} (key_transform takes no params)")
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

    def bind(self, rows, cells) -> AttentionVariant:
        """The variant whose callables have their ``params`` argument bound (engines call this
        inside a trace): ``rows`` for ``query_transform``/``output_transform``, ``cells`` for
        ``logits_transform``/``logits_mask`` (the slices of the module docstring). A variant
        without ``takes_params`` is returned as it is."""
        if not self.takes_params:
            return self

        def bound(fn, params):
            return None if fn is None else (lambda *args: fn(*args, params))

        return dataclasses.replace(
            self, takes_params=False,
            logits_transform=bound(self.logits_transform, cells), logits_mask=bound(self.logits_mask, cells),
            query_transform=bound(self.query_transform, rows), output_transform=bound(self.output_transform, rows),
        )


# The dataclass's generated constructor gets its own docstring (help() shows it).
AttentionVariant.__init__.__doc__ = """Make a variant; every argument is the attribute of the same name (see the class).

    Raises:
      ValueError: an unknown ``pos_encoding_mode``, a ``window_left`` that is not an integer
        ``>= -1``, a negative or non-finite soft cap, a non-finite or non-positive
        ``sm_scale``/``rope_scale``/``rope_theta``, or ``takes_params`` without a callable.
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
    overrides = {k: v for k, v in options.items() if v != getattr(_DEFAULT, k)}
    # The user's own object when nothing overrides it: its hash is kept, and the plan's caches
    # find it by identity (a copy would be built, checked and hashed on every plan).
    return variant.replace(**overrides) if overrides else variant


_DEFAULT = AttentionVariant()


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


def params_at(params, qo_head):
    """The rows' slices of ``variant_params`` (jnp): ``p[qo_head]`` for a leaf ``p`` of shape
    ``[Hq, ...]`` (shape ``qo_head.shape + p.shape[1:]``), scalar leaves as they are."""
    return jax.tree.map(lambda p: p if p.ndim == 0 else p[qo_head], params)


def check_variant_params(variant: AttentionVariant, variant_params, num_qo_heads: int):
    """``variant_params`` as a run takes it: leaves as float32 (floating) or int32 (integer)
    arrays of shape ``[]``, ``[Hq]`` or ``[Hq, T]`` (traced leaves are fine: shapes are static).

    Raises:
      ValueError: ``variant_params`` given to a variant without ``takes_params`` or missing for
        one with it, or a leaf of another dtype kind or shape (the message names its path).
    """
    if variant_params is None:
        if variant.takes_params:
            raise ValueError("the variant has takes_params=True: run needs variant_params (a pytree of arrays)")
        return None
    if not variant.takes_params:
        raise ValueError("variant_params given, but the plan's variant has takes_params=False (its callables "
                         "take no params): make the variant with takes_params=True")

    def leaf(path, p):
        name = "variant_params" + jax.tree_util.keystr(path)
        try:
            p = jnp.asarray(p)
        except TypeError as e:
            raise ValueError(f"{name} must be an array, got {type(p).__name__}") from e
        if jnp.issubdtype(p.dtype, jnp.floating):
            p = p.astype(jnp.float32)
        elif jnp.issubdtype(p.dtype, jnp.integer):
            p = p.astype(jnp.int32)
        else:
            raise ValueError(f"{name} must be a floating or integer array, got {p.dtype}")
        if p.ndim > 2 or (p.ndim and p.shape[0] != num_qo_heads):
            raise ValueError(f"{name} must be a scalar, [num_qo_heads={num_qo_heads}] or "
                             f"[num_qo_heads={num_qo_heads}, T], got shape {tuple(p.shape)}")
        return p

    return jax.tree_util.tree_map_with_path(leaf, variant_params)


def check_sinks(sinks, num_qo_heads: int, variant: AttentionVariant | None = None):
    """``sinks`` as ``[num_qo_heads]`` float32 (``None`` stays ``None``; traced arrays are fine).

    Raises:
      ValueError: ``sinks`` not a floating array of shape ``[num_qo_heads]``, or given with a
        ``use_softmax=False`` variant (no softmax denominator to join).
    """
    if sinks is None:
        return None
    try:
        sinks = jnp.asarray(sinks)
    except TypeError as e:
        raise ValueError(f"sinks must be a float32 array [num_qo_heads], got {type(sinks).__name__}") from e
    if not jnp.issubdtype(sinks.dtype, jnp.floating) or sinks.shape != (num_qo_heads,):
        raise ValueError(f"sinks must be a float32 array [num_qo_heads={num_qo_heads}] (natural-log sink logits), "
                         f"got {sinks.dtype}{list(sinks.shape)}")
    if variant is not None and not variant.use_softmax:
        raise ValueError("sinks need a softmax variant (use_softmax=False has no softmax denominator)")
    return sinks.astype(jnp.float32)


def apply_sink(o, lse, sink_log2):
    """Step 9 of the pipeline on final rows: ``(o [..., D], lse [...] base 2)`` with a sink of
    ``sink_log2`` (the natural-log sink times ``log2(e)``, broadcasting against ``lse``) joined
    to the denominator: ``o * 2**lse / (2**lse + 2**sink_log2)`` and
    ``lse' = log2(2**lse + 2**sink_log2)`` (gpt-oss / FlashInfer AttentionSink semantics).

    Exact for every ``lse``: a row with no visible key (``lse = -inf``) gets ``o * 0 = 0`` and
    ``lse' = sink_log2``; a sink of ``-inf`` changes nothing. Plain ``jnp``, so the Pallas
    kernels trace it in their epilogue as the other engines do.
    """
    m = jnp.maximum(lse, sink_log2)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    a = jnp.exp2(lse - m_safe)
    total = a + jnp.exp2(sink_log2 - m_safe)
    keep = jnp.where(total > 0.0, a / jnp.where(total > 0.0, total, 1.0), 0.0)
    return o * keep[..., None], jnp.where(total > 0.0, m_safe + jnp.log2(jnp.where(total > 0.0, total, 1.0)), -jnp.inf)
