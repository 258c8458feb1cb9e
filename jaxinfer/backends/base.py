"""The backend interface: what a backend is, what it declares it serves, how its inputs are checked.

A backend serves the one batch attention op of jaxinfer (shared/DESIGN.md sec. 1: page table ->
plan -> kernel -> merge -> output).

Every backend serves both paged-cache layouts (NHD, HND) and ragged KV. A backend has:

- ``capabilities``: a frozen :class:`Capabilities` record, declared once per backend, from which
  ``unsupported(spec)`` (why a :class:`~jaxinfer.plan.batch.BatchSpec` cannot be served) and
  ``device_unsupported()`` (why it cannot run on this machine) are derived;
- ``plan(spec, capacity)`` on the host: a plan pytree of device arrays whose shapes depend only on
  the :class:`~jaxinfer.plan.batch.PlanCapacity`;
- ``run(plan, q, k, v, kv_layout=, return_lse=, k_scale=None, v_scale=None, variant_params=None,
  sinks=None)``, jit-compatible: ``(o [nnz_q, Hq, D], lse [nnz_q, Hq] float32 base 2 or None)``;
  its trace-time checks go through :func:`check_run_args`. ``k_scale``/``v_scale`` arrive as
  ``[Hkv]`` float32 (or ``None``) and must be honoured (:mod:`jaxinfer.fp8`: ``k_scale``
  multiplies the logits of KV head ``h``'s queries, ``v_scale`` their output, before any output
  transform); ``variant_params`` (checked by :func:`jaxinfer.variants.check_variant_params`)
  reaches the callables of a ``takes_params`` variant (only backends with
  ``Capabilities.user_callables`` get one); ``sinks`` (``[Hq]`` float32 natural-log logits or
  ``None``) join every final row's softmax once, after any split-KV merge and before the output
  transform, and the returned lse includes them (:func:`jaxinfer.variants.apply_sink`);
- ``merge_states(v [L, N, H, D], s [L, N, H])``: folds attention states (``None`` when the
  backend has no merge of its own; the front doors then use the reference's).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax.numpy as jnp

from jaxinfer.fp8 import is_fp8
from jaxinfer.hashing import hash_once
from jaxinfer.page import check_kv_layout
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import POS_ENCODING_MODES, AttentionVariant


def _dtype_names(dtypes) -> str:
    return " or ".join(jnp.dtype(d).name for d in dtypes)


@hash_once  # a key of _first_broken_rule's cache on every plan
@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend serves; ``None`` in a field means "any".

    Attributes:
      dtypes: q (and 16-bit KV) dtypes served.
      kv_dtype_is_q_dtype: a KV cache of one of ``dtypes`` must have q's dtype.
      fp8_kv: fp8 KV cache dtypes (:data:`jaxinfer.fp8.FP8_KV_DTYPES`) served with any q of
        ``dtypes``; fp8_kv_declined: why the others are not (the reason a call gets).
      head_dims: head dims served.
      max_group_size: largest ``num_qo_heads / num_kv_heads``.
      pos_encoding_modes: ``pos_encoding_mode`` values served.
      rope_min_head_dim: smallest head_dim with ``ROPE_LLAMA``.
      custom_mask: serves ``custom_mask``; max_mask_elements: its largest size.
      user_callables: runs the variant's user callables; non_softmax: serves ``use_softmax=False``.
      gpu: needs an NVIDIA GPU; min_arch: its smallest compute capability (``major*10+minor``);
        archs: the only archs it runs on (fa3: sm_90a code runs on sm_90 alone).
    """

    dtypes: tuple[Any, ...] | None = None
    kv_dtype_is_q_dtype: bool = False
    fp8_kv: tuple[Any, ...] | None = None
    fp8_kv_declined: str = "not implemented"
    head_dims: tuple[int, ...] | None = None
    max_group_size: int | None = None
    pos_encoding_modes: tuple[str, ...] = POS_ENCODING_MODES
    rope_min_head_dim: int = 0
    custom_mask: bool = True
    max_mask_elements: int | None = None
    user_callables: bool = True
    non_softmax: bool = True
    gpu: bool = False
    min_arch: int | None = None
    archs: tuple[int, ...] | None = None

    def dtype_unsupported(self, q_dtype, kv_dtype) -> str | None:
        """Why ``(q_dtype, kv_dtype)`` cannot be served, or ``None``."""
        q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
        allowed = None if self.dtypes is None else tuple(jnp.dtype(d) for d in self.dtypes)
        if allowed is not None and q_dtype not in allowed:
            return f"q dtype {q_dtype.name} (needs {_dtype_names(allowed)})"
        if is_fp8(kv_dtype):
            if self.fp8_kv is None or kv_dtype in self.fp8_kv:
                return None
            served = f" (serves {_dtype_names(self.fp8_kv)})" if self.fp8_kv else ""
            return f"kv dtype {kv_dtype.name}{served}: {self.fp8_kv_declined}"
        if allowed is not None and kv_dtype not in allowed:
            return f"kv dtype {kv_dtype.name} (needs {_dtype_names(allowed)})"
        if self.kv_dtype_is_q_dtype and q_dtype != kv_dtype:
            return f"kv dtype {kv_dtype.name} differs from q dtype {q_dtype.name}"
        return None

    def unsupported(self, spec: BatchSpec) -> str | None:
        """Why ``spec`` cannot be served (the first rule it breaks), or ``None``."""
        mask_size = None if spec.custom_mask is None else spec.custom_mask.size
        return _first_broken_rule(self, spec.head_dim, spec.group_size, spec.variant, jnp.dtype(spec.q_dtype),
                                  jnp.dtype(spec.kv_dtype), mask_size)

    def device_unsupported(self, platform: str | None, arch: int | None) -> str | None:
        """Why this machine (jax's default device: ``platform``, compute capability ``arch``)
        cannot run the backend, or ``None``."""
        if not self.gpu:
            return None
        if arch is None:
            return f"needs an NVIDIA GPU; jax's default device is {platform}"
        if self.min_arch is not None and arch < self.min_arch:
            return f"needs compute capability {self.min_arch / 10:.1f} or newer, got {arch / 10:.1f}"
        if self.archs is not None and arch not in self.archs:
            return f"runs on compute capability {' or '.join(f'{a / 10:.1f}' for a in self.archs)} only, got {arch / 10:.1f}"
        return None


# plan() is on the serving path: a spec's static facts are judged once.
@functools.lru_cache(maxsize=1024)
def _first_broken_rule(caps: Capabilities, d: int, group_size: int, v: AttentionVariant, q_dtype, kv_dtype,
                       mask_size: int | None) -> str | None:
    rules = (
        (caps.head_dims is not None and d not in caps.head_dims,
         lambda: f"head_dim={d} (needs one of {caps.head_dims})"),
        (caps.max_group_size is not None and group_size > caps.max_group_size,
         lambda: f"num_qo_heads / num_kv_heads = {group_size} > {caps.max_group_size}"),
        (v.pos_encoding_mode not in caps.pos_encoding_modes,
         lambda: f"pos_encoding_mode={v.pos_encoding_mode!r} (serves {caps.pos_encoding_modes})"),
        (v.pos_encoding_mode == "ROPE_LLAMA" and d < caps.rope_min_head_dim,
         lambda: f"ROPE_LLAMA with head_dim={d} (needs head_dim >= {caps.rope_min_head_dim})"),
        (True, lambda: caps.dtype_unsupported(q_dtype, kv_dtype)),
        (mask_size is not None and not caps.custom_mask, lambda: "custom_mask is not implemented"),
        (mask_size is not None and caps.max_mask_elements is not None and mask_size > caps.max_mask_elements,
         lambda: f"custom_mask of {mask_size} elements (at most {caps.max_mask_elements})"),
        (v.has_user_callables and not caps.user_callables,
         lambda: "user callables (logits/query/key/output transforms, logits_mask) are not supported"),
        (not v.use_softmax and not caps.non_softmax, lambda: "use_softmax=False is not implemented"),
    )
    for broken, reason in rules:
        if broken and (text := reason()) is not None:
            return text
    return None


class Backend(Protocol):
    name: str
    capabilities: Capabilities
    merge_states: Callable | None

    def unsupported(self, spec: BatchSpec) -> str | None: ...

    def device_unsupported(self) -> str | None: ...

    def plan(self, spec: BatchSpec, capacity: PlanCapacity) -> Any: ...

    def run(self, plan: Any, q, k, v, *, kv_layout: str, return_lse: bool, k_scale=None, v_scale=None,
            variant_params=None, sinks=None): ...


def check_run_args(q, k, v, *, paged: bool, kv_layout: str, page_size: int, num_qo_heads: int, num_kv_heads: int,
                   head_dim: int, q_dtype=None, kv_dtype=None, nnz_q: int = 0, nnz_kv: int = 0) -> None:
    """Trace-time checks of ``run``'s arrays against a plan (shapes and dtypes are static under jit).

    Args:
      q: ``[>= nnz_q, num_qo_heads, head_dim]``.
      k, v: paged caches ``[num_pages, page_size, Hkv, D]`` (NHD) / ``[num_pages, Hkv, page_size,
        D]`` (HND), or ragged ``[>= nnz_kv, Hkv, D]``; equal shapes and dtypes.
      q_dtype, kv_dtype: the dtypes the plan was made for (``None``: not checked here).

    Raises:
      ValueError: naming the argument whose shape or dtype disagrees with the plan.
    """
    check_kv_layout(kv_layout)
    want_q = (num_qo_heads, head_dim)
    if q.ndim != 3 or tuple(q.shape[1:]) != want_q or q.shape[0] < nnz_q:
        rows = f">= {nnz_q}" if nnz_q else "nnz_q"
        raise ValueError(f"q must be [{rows}, {want_q[0]}, {want_q[1]}], got {tuple(q.shape)}")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k, v must match in shape and dtype, got {k.shape}{k.dtype} and {v.shape}{v.dtype}")
    if paged:
        tail = (page_size, num_kv_heads, head_dim) if kv_layout == "NHD" else (num_kv_heads, page_size, head_dim)
        if k.ndim != 4 or tuple(k.shape[1:]) != tail:
            raise ValueError(f"paged_kv_cache must be [num_pages, {', '.join(map(str, tail))}] ({kv_layout}) with "
                             f"{num_kv_heads} kv heads and page_size {page_size}, got {tuple(k.shape)}")
    else:
        want = (num_kv_heads, head_dim)
        if k.ndim != 3 or tuple(k.shape[1:]) != want or k.shape[0] < nnz_kv:
            rows = f">= {nnz_kv}" if nnz_kv else "nnz_kv"
            raise ValueError(f"k must be [{rows}, {want[0]}, {want[1]}] (ragged: {num_kv_heads} kv heads), "
                             f"got {tuple(k.shape)}")
    if q_dtype is not None and q.dtype != q_dtype:
        raise ValueError(f"q has dtype {q.dtype} but the plan was made for q_data_type {jnp.dtype(q_dtype)}")
    if kv_dtype is not None and k.dtype != kv_dtype:
        raise ValueError(f"the KV has dtype {k.dtype} but the plan was made for kv_data_type {jnp.dtype(kv_dtype)}")
