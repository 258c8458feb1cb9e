"""``jaxinfer.apply``: let ``backend="auto"`` follow FlashInfer-Bench traces measured on this device.

FlashInfer-Bench's ``apply`` (flashinfer-bench 0.1.2, ``flashinfer_bench.apply``) routes each
call of a kernel *definition* to the solution its trace set found fastest for the nearest
workload. This module does the same for jaxinfer's backends: the traces ``jaxinfer-bench
--fib-out DIR`` writes (solutions ``jaxinfer_<backend>``) become a table that ``"auto"`` consults
before its built-in order (:func:`jaxinfer.backends.auto_order`).

How a call is matched:

1. Its FlashInfer-Bench definition name, from the plan's geometry (:func:`definition_name`):
   ``gqa_paged_decode_h{Hq}_kv{Hkv}_d{D}_ps{page_size}`` for paged decode,
   ``gqa_paged_prefill_{causal|noncausal}_..._ps{page_size}`` and
   ``gqa_ragged_prefill_{causal|noncausal}_h{Hq}_kv{Hkv}_d{D}`` for prefill/append; bf16 q and KV
   and plain softmax attention only (other calls have no FlashInfer-Bench definition and use the
   built-in order).
2. Among that definition's workloads with at least one ``PASSED`` trace measured on this device
   (``environment.hardware`` equal to jax's ``device_kind``), the nearest to the call's axes
   (``batch_size``, ``total_q``, ``total_kv``, ``num_kv_indices``), by the sum of
   ``|log2(1 + a) - log2(1 + b)|`` over the axes both have.
3. Its backends ordered by measured latency, fastest first; traces that did not pass are never
   chosen. ``"auto"`` tries them (where this machine can run them and they can serve the call),
   then the built-in order.

The table packaged with jaxinfer (``jaxinfer/traces/``: definitions and traces of the runner's
bf16 decode and prefill workloads on an NVIDIA H100 80GB HBM3, benchmarks/RESULTS.md) is used
until :func:`apply` installs another; on other devices it has no entry, so the built-in order
applies there until you call :func:`apply` with traces of your own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer import backends
from jaxinfer.plan.batch import BatchSpec
from jaxinfer.variants import AttentionVariant

DEFAULT_TRACES = Path(__file__).parent / "traces"
SOLUTION_PREFIX = "jaxinfer_"
MATCH_AXES = ("batch_size", "total_q", "total_kv", "num_kv_indices")


# Made once: every plan with backend="auto" asks (two variants and a dtype were ~7 us a call).
_PLAIN_VARIANTS = (AttentionVariant(), AttentionVariant(causal=True))
_BF16 = jnp.dtype(jnp.bfloat16)


def definition_name(spec: BatchSpec, op: str) -> str | None:
    """FlashInfer-Bench definition name of a call, or ``None`` when it has none (see the module
    docstring, step 1). ``op`` as in :func:`jaxinfer.backends.auto_order`."""
    plain = spec.variant in _PLAIN_VARIANTS and spec.custom_mask is None
    bf16 = jnp.dtype(spec.q_dtype) == _BF16 and jnp.dtype(spec.kv_dtype) == _BF16
    if not (plain and bf16) or op == "other":
        return None
    geometry = f"h{spec.num_qo_heads}_kv{spec.num_kv_heads}_d{spec.head_dim}"
    if op == "decode":
        return f"gqa_paged_decode_{geometry}_ps{spec.page_size}" if spec.paged else None
    mask = "causal" if spec.variant.causal else "noncausal"
    if spec.paged:
        return f"gqa_paged_prefill_{mask}_{geometry}_ps{spec.page_size}"
    return f"gqa_ragged_prefill_{mask}_{geometry}"


def call_axes(spec: BatchSpec) -> dict[str, int]:
    """The call's values of :data:`MATCH_AXES` (``num_kv_indices`` for a paged cache,
    ``total_kv`` for ragged KV)."""
    axes = {"batch_size": spec.batch_size, "total_q": int(spec.qo_indptr[-1])}
    if spec.paged:
        axes["num_kv_indices"] = int(spec.kv_indices.size)
    else:
        axes["total_kv"] = int(spec.kv_indptr[-1])
    return axes


def _distance(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    shared = [k for k in MATCH_AXES if k in a and k in b]
    if not shared:
        return math.inf
    return sum(abs(math.log2(1 + a[k]) - math.log2(1 + b[k])) for k in shared)


@dataclasses.dataclass(frozen=True)
class Measured:
    """The passed runs of one workload: its axes and ``(latency_ms, backend)``, fastest first."""

    axes: Mapping[str, int]
    runs: tuple[tuple[float, str], ...]


@dataclasses.dataclass(frozen=True)
class ApplyTable:
    """Per definition name, the measured workloads (see :class:`Measured`) of one device.

    Calling it as ``table(spec, op)`` gives the backend names ``"auto"`` should try first
    (the :data:`jaxinfer.backends.Preference` protocol); an empty tuple when the table has no
    entry for the call.
    """

    device_kind: str
    entries: Mapping[str, tuple[Measured, ...]]

    def __call__(self, spec: BatchSpec, op: str) -> tuple[str, ...]:
        name = definition_name(spec, op)
        measured = self.entries.get(name, ()) if name is not None else ()
        if not measured:
            return ()
        axes = call_axes(spec)
        nearest = min(measured, key=lambda m: _distance(axes, m.axes))
        return tuple(backend for _, backend in nearest.runs)

    @classmethod
    def from_traces(cls, traces: Iterable[Mapping], device_kind: str) -> ApplyTable:
        """Build from FlashInfer-Bench Trace records (JSON dicts). Only ``PASSED`` traces of
        solutions ``jaxinfer_<backend>`` of a wrapper backend measured on ``device_kind`` count; per workload the
        fastest trace of each backend.

        Raises:
          ValueError: a trace without ``definition``, ``workload.uuid`` or ``workload.axes``.
        """
        workloads: dict[tuple[str, str], dict] = {}
        for t in traces:
            try:
                definition, workload = t["definition"], t["workload"]
                key, axes = (definition, workload["uuid"]), workload["axes"]
            except (KeyError, TypeError) as e:
                raise ValueError(f"trace_set: a trace lacks {e} (FlashInfer-Bench Trace schema)") from e
            evaluation, solution = t.get("evaluation") or {}, t.get("solution") or ""
            backend = solution[len(SOLUTION_PREFIX):] if solution.startswith(SOLUTION_PREFIX) else None
            if (evaluation.get("status") != "PASSED" or backend not in backends.BACKEND_NAMES or backend == "auto"
                    or (evaluation.get("environment") or {}).get("hardware") != device_kind):
                continue
            latency = float(evaluation["performance"]["latency_ms"])
            entry = workloads.setdefault(key, {"axes": axes, "best": {}})
            entry["best"][backend] = min(latency, entry["best"].get(backend, math.inf))
        entries: dict[str, list[Measured]] = {}
        for (definition, _), entry in workloads.items():
            runs = tuple(sorted((lat, b) for b, lat in entry["best"].items()))
            entries.setdefault(definition, []).append(Measured(dict(entry["axes"]), runs))
        return cls(device_kind, {k: tuple(v) for k, v in entries.items()})


def read_traces(root: str | os.PathLike) -> list[dict]:
    """Every Trace of a FlashInfer-Bench trace set directory (``traces/**/*.jsonl``).

    Raises:
      ValueError: ``root`` is not a directory, or a line is not JSON.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"trace_set must be a FlashInfer-Bench trace set directory, got {str(root)!r}")
    out = []
    for path in sorted((root / "traces").rglob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"trace_set: {path}:{n} is not JSON: {e}") from e
    return out


def _traces_of(trace_set) -> list[dict]:
    if isinstance(trace_set, (str, os.PathLike)):
        return read_traces(trace_set)
    traces = getattr(trace_set, "traces", None)  # a flashinfer_bench.TraceSet: name -> [Trace]
    if not isinstance(traces, Mapping):
        raise ValueError("trace_set must be a directory path or a flashinfer_bench.TraceSet, "
                         f"got {type(trace_set).__name__}")
    return [t.model_dump(mode="json") if hasattr(t, "model_dump") else t for ts in traces.values() for t in ts]


def current_device_kind() -> str:
    """jax's default device's ``device_kind`` (``"NVIDIA H100 80GB HBM3"``, ``"cpu"``), the
    ``environment.hardware`` jaxinfer-bench stamps on its traces."""
    return jax.devices()[0].device_kind


def apply(trace_set=None, *, device_kind: str | None = None) -> ApplyTable:
    """Make ``backend="auto"`` pick, per FlashInfer-Bench definition and nearest workload, the
    fastest backend whose trace passed; calls without an entry keep the built-in order.

    Example::

        # on the serving machine, once:  jaxinfer-bench --workloads all --fib-out traces/
        table = jaxinfer.apply("traces/")
        wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="auto")  # follows the table

    The choice is made when a plan is made (``wrapper.plan``), on the host; plans made earlier
    keep their backend.

    Args:
      trace_set: a FlashInfer-Bench trace set directory (as written by ``jaxinfer-bench
        --fib-out``), a ``flashinfer_bench.TraceSet``, or ``None`` to go back to the table
        packaged with jaxinfer (:data:`DEFAULT_TRACES`, measured on an H100).
      device_kind: use the traces measured on this device (default: jax's default device's
        ``device_kind``); traces of other devices are ignored.

    Returns:
      The installed :class:`ApplyTable`.

    Raises:
      ValueError: ``trace_set`` is neither a directory nor a TraceSet, or holds malformed traces.

    Source: FlashInfer-Bench's ``apply`` (flashinfer-bench 0.1.2), routing by definition and
    workload to the fastest passing solution.
    """
    kind = device_kind or current_device_kind()
    if trace_set is None:
        table = default_table(kind)
    else:
        table = ApplyTable.from_traces(_traces_of(trace_set), kind)
    backends.set_preference(table)
    return table


def default_table(device_kind: str | None = None) -> ApplyTable:
    """The table of the traces packaged with jaxinfer (:data:`DEFAULT_TRACES`), empty when the
    package has none."""
    kind = device_kind or current_device_kind()
    if not DEFAULT_TRACES.is_dir():
        return ApplyTable(kind, {})
    return ApplyTable.from_traces(read_traces(DEFAULT_TRACES), kind)

