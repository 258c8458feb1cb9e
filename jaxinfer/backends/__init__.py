"""Backend registry and the ``"auto"`` choice.

A backend serves the one batch attention op of jaxinfer (the interface is
:class:`jaxinfer.backends.base.Backend`): ``plan(spec, capacity)`` on the host turns a
:class:`~jaxinfer.plan.batch.BatchSpec` into a plan pytree of device arrays (static shapes fixed by
the :class:`~jaxinfer.plan.batch.PlanCapacity`), ``run(plan, q, k, v, kv_layout=...,
return_lse=..., k_scale=, v_scale=, variant_params=, sinks=)`` is jit-compatible and returns
``(o [nnz_q, Hq, D], lse [nnz_q, Hq] or None)`` (attention sinks included in both),
and ``merge_states`` folds attention states. A backend that cannot serve a spec says why in
``unsupported(spec)``, derived from its :class:`~jaxinfer.backends.base.Capabilities`; asking
for it explicitly then raises :class:`BackendUnsupportedError` with that reason, and ``"auto"``
moves on to the next one.

Adding a backend:

1. Write ``jaxinfer/backends/<name>.py`` (or a package) with a ``get_backend(name)`` returning an
   object of the :class:`~jaxinfer.backends.base.Backend` interface: ``name``, a frozen
   ``capabilities`` record (dtypes, head dims, variants, GPU archs it serves), ``unsupported``
   and ``device_unsupported`` derived from it, ``plan`` (planning through
   :mod:`jaxinfer.plan.planner` with the kernel's tile size, cost model and CTA budget as
   parameters), ``run`` (checking its arrays with :func:`~jaxinfer.backends.base.check_run_args`)
   and ``merge_states`` (or ``None``).
2. Add its name to :data:`BACKEND_NAMES` and its module to ``_MODULES``; place it in
   :func:`auto_order` where same-run measurements put it.

Measured preferences: :func:`jaxinfer.apply` installs a table, read from FlashInfer-Bench traces
measured on the user's device, that ``"auto"`` consults before :func:`auto_order` (see
:func:`set_preference`).
3. The conformance suite (tests/conftest.py) then runs every shared API test on it; the cases
   it declines skip with its reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

from jaxinfer.backends import device
from jaxinfer.backends.base import Backend
from jaxinfer.plan.batch import BatchSpec

BACKEND_NAMES = ("auto", "pallas", "fa2", "fa3", "xla")


class BackendUnsupportedError(NotImplementedError, ValueError):
    """A named backend cannot serve a call (an unsupported head_dim, variant, device...).

    shared/DESIGN.md asks for ``NotImplementedError`` naming what is missing (sec. 4) and for a
    ``ValueError`` on a head_dim the chosen backend does not support (sec. 5): this is both.
    """

# Module that implements each backend, imported on first use so that a missing optional part
# (a CUDA toolchain for the FFI kernels, say) never breaks ``import jaxinfer``.
_MODULES = {
    "xla": "jaxinfer.backends.xla",
    "pallas": "jaxinfer.backends.pallas.backend",
    "fa2": "jaxinfer.backends.ffi.backend",
    "fa3": "jaxinfer.backends.ffi.backend",
}


# Backend objects already made (they are immutable): plan() asks for one on every call, and
# importlib.import_module costs 0.4 us (hot loop; more inside plan()) even once the module is imported.
_BACKENDS: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend object of ``name`` (not ``"auto"``); the same object on every call.

    Raises:
      ValueError: unknown name.
      NotImplementedError: the backend's module is not part of this installation.
    """
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):  # first use, or an unhashable name (refused below)
        pass
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as e:
        raise NotImplementedError(f"backend {name!r} is not available: {e}") from e
    backend = _BACKENDS[name] = module.get_backend(name)
    return backend


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all (no device of its kind, a kernel
    library that does not build), or ``None`` when it can serve some call here.

    Raises:
      ValueError: unknown name.
    """
    try:
        backend = get_backend(name)
    except NotImplementedError as e:
        return str(e)
    return backend.device_unsupported()


OPS = ("decode", "prefill", "other")


def auto_order(op: str = "prefill") -> tuple[str, ...]:
    """Backends ``"auto"`` tries for ``op`` on the current default device, fastest first.

    From same-run H100 measurements (benchmarks/RESULTS.md): the FFI kernels lead plain prefill and
    append (fa3, then fa2, then pallas, on every prefill shape), pallas leads decode, cascade levels
    and block-sparse patterns, where the FFI kernels run several times slower. A backend that
    cannot serve a call's dtypes declines it in its capabilities, so :func:`resolve` passes over
    it: an fp8 KV cache (which fa2/fa3 decline) goes to pallas for every op.

    Args:
      op: ``"decode"``, ``"prefill"`` (plain batch or single prefill/append) or ``"other"``
        (cascade levels, block-sparse).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    arch = device.gpu_arch()
    if arch is None:
        return ("xla",)
    if op != "prefill":
        return ("pallas", "xla")
    if arch >= 90:
        return ("fa3", "fa2", "pallas", "xla")
    if arch >= 80:
        return ("fa2", "pallas", "xla")
    return ("pallas", "xla")


# Backends measured fastest for a call, fastest first (set by jaxinfer.apply); ``None`` until
# first use, when the table packaged with jaxinfer (if any) is loaded.
Preference = Callable[[BatchSpec, str], tuple[str, ...]]
_preference: Preference | None = None


def set_preference(preference: Preference | None) -> None:
    """Install ``preference(spec, op) -> backend names, fastest first`` for ``"auto"``, which
    tries those (where this machine can run them) before :func:`auto_order`; ``None`` goes back to
    the table packaged with jaxinfer. :func:`jaxinfer.apply` is the usual way to call this."""
    global _preference
    _preference = preference


def preferred_order(spec: BatchSpec, op: str = "prefill") -> tuple[str, ...]:
    """Backends ``"auto"`` tries for ``spec``: those the installed preference (measured traces)
    names, then :func:`auto_order` of ``op``, each once.

    Raises:
      ValueError: unknown ``op``.
    """
    return tuple(_candidates(spec, op))


def _candidates(spec: BatchSpec, op: str) -> Iterator[str]:
    """:func:`preferred_order` one name at a time: :func:`resolve` stops at the first that serves,
    so no measured backend after it is asked whether this machine runs it (fa2/fa3 look at the
    device and their kernel library each time)."""
    builtin = auto_order(op)
    if _preference is None:
        # The packaged default table; imported late, as jaxinfer.apply imports this module.
        from jaxinfer.apply import default_table

        set_preference(default_table())
    seen = set()
    for n in _preference(spec, op):
        if n in _MODULES and n not in seen and unavailable(n) is None:
            seen.add(n)
            yield n
    yield from (n for n in builtin if n not in seen)


def resolve(name: str, spec: BatchSpec, *, op: str = "prefill") -> Backend:
    """The backend that serves ``spec``: ``name`` itself, or for ``"auto"`` the first of
    :func:`preferred_order` that can (measured traces installed by :func:`jaxinfer.apply` first,
    then :func:`auto_order` for ``op``).

    Raises:
      ValueError: unknown backend name.
      BackendUnsupportedError: an explicitly named backend cannot serve the spec (says why); it
        is both a ``NotImplementedError`` and a ``ValueError``.
    """
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unsupported(spec)
        if reason is not None:
            raise BackendUnsupportedError(f"backend {name!r} cannot serve this call: {reason}")
        return backend
    for candidate in _candidates(spec, op):
        try:
            backend = get_backend(candidate)
        except NotImplementedError:
            continue
        if backend.unsupported(spec) is None:
            return backend
    return get_backend("xla")


def merge_states_impl(name: str) -> Callable:
    """The merge of attention states of backend ``name``: its own, else the reference's; for
    ``"auto"`` that of the first backend of :func:`auto_order` (``"other"``) that has one.

    Raises:
      ValueError: unknown backend name.
      NotImplementedError: a named backend is not part of this installation.
    """
    names = auto_order("other") if name == "auto" else (name,)
    for candidate in names:
        try:
            merge = get_backend(candidate).merge_states
        except NotImplementedError:
            if name != "auto":
                raise
            continue
        if merge is not None:
            return merge
    return get_backend("xla").merge_states
