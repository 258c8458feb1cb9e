"""Plan/run machinery shared by every front door (decode, prefill, cascade, block-sparse).

``plan`` validates a batch on the host (:class:`~jaxinfer.plan.batch.BatchSpec`), picks a backend and
lets it plan; the result is a :class:`Plan` pytree that a jitted step takes as an argument.
``run_plan`` is the one jit-compatible entry that every module-level run function calls.

Every run takes FlashInfer's ``k_scale``/``v_scale`` (:data:`SCALES_DOC`, :mod:`jaxinfer.fp8`),
attention sinks and variant parameters (:data:`SINKS_DOC`, :data:`VARIANT_PARAMS_DOC`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import backends
from jaxinfer.backends.base import check_run_args
from jaxinfer.fp8 import check_scale_value, is_fp8, scale_array
from jaxinfer.page import check_kv_layout, unpack_paged_kv_cache
from jaxinfer.plan.batch import BatchSpec, PlanCapacity, filled
from jaxinfer.variants import AttentionVariant, check_sinks, check_variant_params, make_variant

SCALES_DOC = """k_scale, v_scale: optional dequantization scales (FlashInfer's): a Python float or a float
        array of shape ``()`` or ``[num_kv_heads]`` (per KV head), traced or not (new values never
        recompile). Attention reads ``k * k_scale`` and ``v * v_scale``: ``k_scale`` multiplies
        the logits ``q . k`` as ``sm_scale`` does (step 3 of jaxinfer/variants.py, before the soft
        cap, ALiBi and a logits transform; the lse includes it; a key transform sees the keys
        ``k * k_scale``), ``v_scale`` the output (before an output transform). A Python or numpy
        value must be finite and > 0 (``ValueError``); an array of another shape or a non-float
        dtype is a ``ValueError``."""

SINKS_DOC = """sinks: optional ``[num_qo_heads]`` float32 attention-sink logits (natural log, as gpt-oss ships
        them; traced, new values never recompile): head ``h``'s sink joins the softmax
        denominator once per query row, ``o * sigmoid(lse ln 2 - sinks[h])``, and the returned
        lse includes it (base 2: a row with no visible key gives ``o = 0``,
        ``lse = sinks[h] / ln 2``); combines with window, soft cap (which caps ``q . k`` only) and
        every mask (step 9 of jaxinfer/variants.py). A non-floating array or another shape is a
        ``ValueError``, as is a ``use_softmax=False`` variant."""

VARIANT_PARAMS_DOC = """variant_params: the arrays of a ``takes_params=True`` variant's callables (a pytree of
        ``[]``, ``[num_qo_heads]`` or ``[num_qo_heads, T]`` float/int arrays; traced, new values
        never recompile; jaxinfer/variants.py); ``None`` for other variants (``ValueError``
        either way round)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """A backend's plan (pytree of int32 device arrays) with the static facts ``run`` needs and
    checks its arrays against at trace time: the backend, the KV layout and page size (``paged``:
    a page table over a cache, else ragged KV), the head geometry and the dtypes (names)."""

    inner: Any
    backend: str = dataclasses.field(metadata=dict(static=True))
    kv_layout: str = dataclasses.field(metadata=dict(static=True))
    page_size: int = dataclasses.field(metadata=dict(static=True))
    paged: bool = dataclasses.field(metadata=dict(static=True))
    num_qo_heads: int = dataclasses.field(metadata=dict(static=True))
    num_kv_heads: int = dataclasses.field(metadata=dict(static=True))
    head_dim: int = dataclasses.field(metadata=dict(static=True))
    q_dtype: str = dataclasses.field(metadata=dict(static=True))
    kv_dtype: str = dataclasses.field(metadata=dict(static=True))
    variant: AttentionVariant = dataclasses.field(default=AttentionVariant(), metadata=dict(static=True))


# The dataclass's generated constructor gets its own docstring (help() shows it).
Plan.__init__.__doc__ = """Build a plan from its fields; users get plans from a wrapper's ``plan`` instead.

    Example::

        plan = jaxinfer.BatchDecodeWithPagedKVCacheWrapper().plan(indptr, indices, last, 8, 2, 64, 16)
        o = jax.jit(jaxinfer.batch_decode)(q, kv_cache, plan)   # the plan is an ordinary argument
    """


def make_plan(
    spec: BatchSpec,
    backend: str,
    kv_layout: str,
    capacity: PlanCapacity,
    *,
    op: str = "prefill",
) -> Plan:
    """Resolve the backend for ``spec`` and plan on the host.

    Raises:
      ValueError: unknown backend, or a capacity smaller than the batch.
      NotImplementedError: an explicitly named backend cannot serve the spec.
    """
    impl = backends.resolve(backend, spec, op=op)
    return filled(Plan, inner=impl.plan(spec, capacity), backend=impl.name, kv_layout=kv_layout,
                  page_size=spec.page_size, paged=spec.paged, num_qo_heads=spec.num_qo_heads,
                  num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, q_dtype=_dtype_name(spec.q_dtype),
                  kv_dtype=_dtype_name(spec.kv_dtype), variant=spec.variant)


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype) -> str:
    """``jnp.dtype(dtype).name``, once per dtype (~0.6 us a call; plan() names two)."""
    return jnp.dtype(dtype).name


def plan_variant(variant: AttentionVariant | None, **options) -> AttentionVariant:
    """:func:`~jaxinfer.variants.make_variant` for a ``plan`` call: without a user ``variant``,
    the variant of each set of options is built and checked once (~4 us on every plan otherwise);
    options are the same when their values and types are (``1``, ``1.0`` and ``True`` differ).

    Raises:
      ValueError: as :func:`~jaxinfer.variants.make_variant` (a failed build is not kept).
    """
    if variant is None:
        try:
            return _options_variant(tuple((name, type(value), value) for name, value in options.items()))
        except TypeError:  # an unhashable option (an array): make_variant judges it
            pass
    return make_variant(variant, **options)


@functools.lru_cache(maxsize=256)
def _options_variant(options: tuple) -> AttentionVariant:
    return make_variant(None, **{name: value for name, _, value in options})


def run_plan(plan: Plan, q, k, v, *, return_lse: bool = False, k_scale=None, v_scale=None, variant_params=None,
             sinks=None):
    """Run a plan; ``k``/``v`` are caches (paged) or ragged tensors, ``k_scale``/``v_scale`` as
    in :data:`SCALES_DOC`, ``sinks`` as in :data:`SINKS_DOC`, ``variant_params`` as in
    :data:`VARIANT_PARAMS_DOC`.

    The run is jitted so that an eager ``wrapper.run`` is one compiled program, not op-by-op
    dispatch; inside a caller's jit it inlines. The module-level run functions of the front doors come
    here: the arrays' shapes and dtypes are checked against the plan's static facts at trace time
    (the row counts live in the plan's device arrays: rows of ``q`` past the plan's queries come
    back as zeros, and a ``q`` with fewer rows than the plan's queries is the caller's error, which
    the wrapper's ``run`` checks on the host).

    Raises:
      ValueError: an array's shape, layout or dtype disagrees with the plan (trace time), a
        bad scale, bad ``sinks`` or ``variant_params``.
    """
    check_scale_value("k_scale", k_scale)
    check_scale_value("v_scale", v_scale)
    variant_params = check_variant_params(plan.variant, variant_params, plan.num_qo_heads)
    sinks = check_sinks(sinks, plan.num_qo_heads, plan.variant)
    return _run_plan(plan, q, k, v, k_scale, v_scale, variant_params, sinks, return_lse=return_lse)


@functools.partial(jax.jit, static_argnames="return_lse")
def _run_plan(plan: Plan, q, k, v, k_scale, v_scale, variant_params, sinks, *, return_lse: bool):
    check_run_args(q, k, v, paged=plan.paged, kv_layout=plan.kv_layout, page_size=plan.page_size,
                   num_qo_heads=plan.num_qo_heads, num_kv_heads=plan.num_kv_heads, head_dim=plan.head_dim,
                   q_dtype=jnp.dtype(plan.q_dtype), kv_dtype=jnp.dtype(plan.kv_dtype))
    if q.shape[0] == 0:
        # No query rows (a batch of zero requests): empty outputs, no kernel to launch.
        o = jnp.zeros(q.shape, q.dtype)
        return (o, jnp.zeros(q.shape[:2], jnp.float32)) if return_lse else o
    if k.shape[0] == 0:
        # A batch with no keys at all: give the kernels one row to gather from (nothing is
        # visible, every output row is o = 0, lse = -inf).
        k = v = jnp.zeros((1, *k.shape[1:]), k.dtype)
    k_scale = scale_array("k_scale", k_scale, plan.num_kv_heads)
    v_scale = scale_array("v_scale", v_scale, plan.num_kv_heads)
    impl = backends.get_backend(plan.backend)
    extras = {} if variant_params is None and sinks is None else dict(variant_params=variant_params, sinks=sinks)
    o, lse = impl.run(plan.inner, q, k, v, kv_layout=plan.kv_layout, return_lse=return_lse, k_scale=k_scale,
                      v_scale=v_scale, **extras)
    return (o, lse) if return_lse else o


def run_paged_plan(plan: Plan, q, paged_kv_cache, *, return_lse: bool = False, k_scale=None, v_scale=None,
                   variant_params=None, sinks=None):
    """Run a plan over a paged cache (tuple or single array, in the plan's layout) inside jit.

    Page ids outside the cache are clamped (never read out of bounds); validation happens in the
    wrapper's ``plan``. ``k_scale``/``v_scale``: :data:`SCALES_DOC`; ``sinks``:
    :data:`SINKS_DOC`; ``variant_params``: :data:`VARIANT_PARAMS_DOC`.
    """
    k, v = unpack_paged_kv_cache(paged_kv_cache, plan.kv_layout)
    return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                    variant_params=variant_params, sinks=sinks)


# What FlashInfer's constructors take that has no meaning in JAX (documented, accepted, unused):
# a float workspace buffer (XLA owns scratch memory), CUDA-graph buffers and flags (a jitted step is
# already one captured program; fix ``capacity`` for shapes that never change) and JIT arguments.
WORKSPACE_DOC = """float_workspace_buffer: FlashInfer's scratch buffer; any array or ``None``, accepted and
        unused (XLA allocates kernel scratch itself). A string here is a ``ValueError``: it is
        ``kv_layout`` passed one position early."""

RUN_OPTIONS_DOC = """out, lse: FlashInfer's preallocated outputs; JAX arrays are immutable, so anything but
        ``None`` is a ``ValueError``: use the return value.
      enable_pdl: accepted and unused (programmatic dependent launch is a CUDA-stream detail)."""


def check_workspace(float_workspace_buffer) -> None:
    """A FlashInfer workspace buffer is unused; a string in its place is a misplaced ``kv_layout``.

    Raises:
      ValueError: ``float_workspace_buffer`` is a string.
    """
    if isinstance(float_workspace_buffer, str):
        raise ValueError(
            f"float_workspace_buffer must be an array or None (accepted and unused), got {float_workspace_buffer!r}; "
            "pass kv_layout by keyword or after the workspace buffer"
        )


def check_run_extras(args: tuple, out=None, lse=None, **unsupported) -> None:
    """Reject FlashInfer run arguments that cannot work here (``unsupported``: name -> value,
    each must be ``None``).

    Raises:
      ValueError: ``out``/``lse`` given (JAX cannot write into them), extra positional arguments,
        or an unsupported option set.
    """
    for name, value in (("out", out), ("lse", lse)):
        if value is not None:
            raise ValueError(f"{name}= cannot be written in place in JAX (arrays are immutable): "
                             f"use the return value instead")
    if args:
        raise ValueError(f"run takes no extra positional arguments (FlashInfer's JIT-variant arguments), "
                         f"got {len(args)}; pass a jaxinfer.AttentionVariant to plan instead")
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(f"{name} is not supported by jaxinfer, got {value!r}")


def fold_q_scale(q_scale, k_scale):
    """FlashInfer's ``q_scale`` multiplies the logits as ``k_scale`` does: fold it into ``k_scale``."""
    if q_scale is None:
        return k_scale
    check_scale_value("q_scale", q_scale)
    return q_scale if k_scale is None else q_scale * k_scale


def pick_scales(scale_q, scale_k, scale_v, k_scale, v_scale):
    """``(k_scale, v_scale)`` of FlashInfer's ``scale_q/scale_k/scale_v`` names (prefill and
    block-sparse) or the decode API's ``k_scale/v_scale``; ``scale_q`` folds into ``k_scale``.

    Raises:
      ValueError: both names of one scale given.
    """
    for a, x, b, y in (("scale_k", scale_k, "k_scale", k_scale), ("scale_v", scale_v, "v_scale", v_scale)):
        if x is not None and y is not None:
            raise ValueError(f"pass {a} or {b}, not both")
    return fold_q_scale(scale_q, scale_k if k_scale is None else k_scale), scale_v if v_scale is None else v_scale


def plan_dtypes(q_data_type, kv_data_type, data_type=None):
    """``(q_dtype, kv_dtype, infer)`` of a plan's dtype arguments; ``infer`` names what ``run``
    takes from its arrays: ``""`` (nothing), ``"q"`` or ``"q, kv"``.

    ``data_type`` is FlashInfer's deprecated name for both dtypes. With ``q_data_type=None`` the
    plan is made for bfloat16 (the KV for ``kv_data_type``, or bfloat16) and ``infer`` is true: the
    wrapper's ``run`` then re-plans once for the dtype of the ``q`` it receives (and of the KV,
    when ``kv_data_type`` is ``None`` too; an explicit ``kv_data_type`` is always checked).
    """
    if data_type is not None:
        if q_data_type is not None or kv_data_type is not None:
            raise ValueError("data_type (deprecated) cannot be combined with q_data_type or kv_data_type")
        q_data_type = kv_data_type = data_type
    if q_data_type is None:
        return jnp.bfloat16, kv_data_type, "q" if kv_data_type is not None else "q, kv"
    return q_data_type, kv_data_type, ""


class BatchWrapper:
    """Base of the FlashInfer-style wrappers: keeps the host spec and the plan between calls.

    ``plan`` may be called from several threads: each call returns its own plan, and ``run`` uses
    the spec and plan of one call (the last to finish), never a mix.

    A plan made with ``q_data_type=None`` (the default) is for bfloat16; ``run`` given arrays of
    other dtypes re-plans once for them (kept until the next ``plan``), so FlashInfer's float16
    code runs unchanged. A plan passed to a module-level run function inside ``jax.jit`` is
    checked against its dtypes: pass ``q_data_type`` (and ``kv_data_type``) there.
    """

    _op = "prefill"  # which auto_order "auto" follows (backends.auto_order)

    def _setup(self, float_workspace_buffer, kv_layout: str, backend: str, capacity: PlanCapacity | None,
               deterministic: bool = False) -> None:
        check_workspace(float_workspace_buffer)
        if backend not in backends.BACKEND_NAMES:
            raise ValueError(f"backend must be one of {backends.BACKEND_NAMES}, got {backend!r}")
        self._kv_layout = check_kv_layout(kv_layout)
        self._backend = backend
        self._capacity = capacity or PlanCapacity()
        if deterministic:  # batch invariance: split points fixed whatever the batch (PlanCapacity.as_deterministic)
            self._capacity = self._capacity.as_deterministic()
        if self._op == "decode":
            # One query per request: the decode tiles in every batch (deterministic plans), and
            # plan() skips the median query length it would pick them by.
            self._capacity = dataclasses.replace(self._capacity, max_qo_len=self._capacity.max_qo_len or 1)
        # (specs, plans, infer, replans) of the last plan() call, replaced in one assignment:
        # plan() may run in several threads, each gets its own plan back and run() always sees a
        # matching set.
        self._planned: tuple[Any, Any, str, dict] | None = None

    @property
    def backend(self) -> str | None:
        """The backend the last plan resolved to (``None`` before ``plan``)."""
        planned = self._planned
        if planned is None:
            return None
        plan = planned[1]
        return (plan[0] if isinstance(plan, list) else plan).backend

    def _make(self, spec: BatchSpec) -> Plan:
        return make_plan(spec, self._backend, self._kv_layout, self._capacity, op=self._op)

    def _keep(self, spec, plan, infer: str = ""):
        """Keep a batch's spec(s) and plan(s) for ``run`` (the last ``plan`` call wins) and
        return the plan."""
        self._planned = (spec, plan, infer, {})
        return plan

    def _set_plan(self, spec: BatchSpec, infer: str = "") -> Plan:
        return self._keep(spec, self._make(spec), infer)

    def _require_plan(self, q=None, k=None) -> tuple[Any, Any]:
        """The kept ``(spec, plan)`` (lists for cascade), re-planned for ``q``'s and ``k``'s
        dtypes when the plan's dtypes were left to ``run``."""
        planned = self._planned
        if planned is None:
            raise ValueError(f"{type(self).__name__}.run called before plan")
        spec, plan, infer, replans = planned
        first = spec[0] if isinstance(spec, list) else spec
        if not infer or q is None or (q.dtype, k.dtype) == (first.q_dtype, first.kv_dtype):
            return spec, plan
        # An explicit kv_data_type stays (check_spec_run_args then names a cache of another dtype).
        kv_dtype = k.dtype if "kv" in infer else first.kv_dtype
        key = (jnp.dtype(q.dtype), jnp.dtype(kv_dtype))
        if key not in replans:
            redo = lambda s: dataclasses.replace(s, q_dtype=key[0], kv_dtype=key[1])  # noqa: E731
            specs = [redo(s) for s in spec] if isinstance(spec, list) else redo(spec)
            plans = [self._make(s) for s in specs] if isinstance(spec, list) else self._make(specs)
            replans[key] = (specs, plans)
        return replans[key]

    def _check_window(self, window_left) -> None:
        """FlashInfer's run-time ``window_left`` override: only the planned value (or ``None``)."""
        if window_left is None:
            return
        spec = self._require_plan()[0]
        planned = (spec[-1] if isinstance(spec, list) else spec).variant.window_left
        if window_left != planned:
            raise ValueError(f"window_left = {window_left} differs from the plan's {planned}: set it in plan")

    def _run_paged(self, q, paged_kv_cache, return_lse: bool, k_scale=None, v_scale=None, variant_params=None,
                   sinks=None):
        k, v = unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        spec, plan = self._require_plan(q, k)
        check_spec_run_args(spec, q, k, v, self._kv_layout)
        return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                        variant_params=variant_params, sinks=sinks)


def as_host_int(name: str, x) -> np.ndarray:
    """A host int array from a numpy/JAX array or list (plan inputs live on the host)."""
    if type(x) is np.ndarray:  # np.asarray's answer, without its call
        return x
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(f"{name} must be a concrete host array at plan time, not a traced value") from e


def check_spec_run_args(spec: BatchSpec, q, k, v, kv_layout: str) -> None:
    """Trace-time checks of ``run``'s arrays against the batch a wrapper planned
    (:func:`jaxinfer.backends.base.check_run_args`), and its page ids against the cache.

    ``q`` must have exactly the plan's ``nnz_q`` rows: a wrapper's ``run`` never pads. Ragged
    ``k``/``v`` may have rows past ``nnz_kv`` (a preallocated buffer), which are never read, as a
    paged cache's pages outside the page table are not. Padding rows to a fixed bucket is what the module-level run
    functions with a plan are for (rows past the plan's queries come back as zeros).

    Raises:
      ValueError: naming the argument whose shape or dtype disagrees with the plan.
    """
    nnz_q = int(spec.qo_indptr[-1])
    if q.ndim == 3 and q.shape[0] != nnz_q:
        raise ValueError(f"q has {q.shape[0]} rows but the plan has nnz_q = {nnz_q} queries (qo_indptr[-1], or "
                         f"the batch size for decode); to pad rows to a bucket, run the returned plan with the "
                         f"module-level function (e.g. jaxinfer.batch_decode), which returns zeros past nnz_q")
    check_run_args(q, k, v, paged=spec.paged, kv_layout=kv_layout, page_size=spec.page_size,
                   num_qo_heads=spec.num_qo_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                   q_dtype=spec.q_dtype, kv_dtype=spec.kv_dtype, nnz_q=int(spec.qo_indptr[-1]),
                   nnz_kv=0 if spec.paged else int(spec.kv_indptr[-1]))
    if spec.paged:
        used = spec.kv_indices[: spec.kv_indptr[-1]]
        if used.size and used.max() >= k.shape[0]:
            raise ValueError(f"kv_indices must be < num_pages = {k.shape[0]} (pages in the cache), got {used.max()}")


def batch_spec(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
                  page_size, custom_mask, q_data_type, kv_data_type, variant, *, names=None,
                  **options) -> BatchSpec:
    """The validated :class:`BatchSpec` of a batch wrapper's ``plan`` arguments (host arrays);
    ``names`` maps ``qo_indptr``, ``kv_indptr``, ``kv_indices``, ``kv_last_page_len`` to the
    caller's argument names for messages."""
    names = {"qo_indptr": "qo_indptr", "kv_indptr": "kv_indptr", "kv_indices": "kv_indices",
             "kv_last_page_len": "kv_last_page_len", **(names or {})}
    variant = plan_variant(variant, **options)
    return BatchSpec.create(
        as_host_int(names["qo_indptr"], qo_indptr), as_host_int(names["kv_indptr"], kv_indptr),
        None if kv_indices is None else as_host_int(names["kv_indices"], kv_indices),
        None if kv_last_page_len is None else as_host_int(names["kv_last_page_len"], kv_last_page_len),
        page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        variant=variant, custom_mask=None if custom_mask is None else np.asarray(custom_mask),
        q_dtype=q_data_type, kv_dtype=kv_data_type, names={k: v for k, v in names.items() if k != "qo_indptr"},
    )


def single_kv(k, v, kv_layout: str):
    """Single-request ``k``/``v`` as ragged NHD ``[L, Hkv, D]``."""
    check_kv_layout(kv_layout)
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must be 3-D of equal shape, got {k.shape} and {v.shape}")
    if kv_layout == "HND":
        k, v = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
    return k, v


def run_single(q, k, v, variant: AttentionVariant, backend: str, *, op: str, return_lse: bool, custom_mask=None,
               k_scale=None, v_scale=None, variant_params=None, sinks=None):
    """Attention of one request ``q [Lq, Hq, D]``, ``k/v [Lk, Hkv, D]`` as a batch of one."""
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    if k.dtype != q.dtype and not is_fp8(k.dtype):
        raise ValueError(f"k and v must have q's dtype {q.dtype} or be fp8 (float8_e4m3fn/float8_e5m2), got "
                         f"{k.dtype}; cast one of them (attention never converts silently)")
    if d != k.shape[2]:
        raise ValueError(f"q head_dim {d} differs from k head_dim {k.shape[2]}")
    if custom_mask is not None:
        if tuple(custom_mask.shape) != (lq, lk):
            raise ValueError(f"custom_mask must be [qo_len={lq}, kv_len={lk}] bool, got {tuple(custom_mask.shape)}")
        custom_mask = as_host_int("custom_mask", custom_mask).astype(bool).reshape(-1)
    spec = BatchSpec.create(
        np.array([0, lq]), np.array([0, lk]), None, None,
        page_size=1, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, variant=variant,
        custom_mask=custom_mask, q_dtype=q.dtype, kv_dtype=k.dtype,
    )
    check_spec_run_args(spec, q, k, v, "NHD")
    capacity = PlanCapacity(max_batch_size=1, max_qo_len=max(lq, 1), max_kv_len=max(lk, 1))
    plan = make_plan(spec, backend, "NHD", capacity, op=op)
    return run_plan(plan, q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                    variant_params=variant_params, sinks=sinks)
