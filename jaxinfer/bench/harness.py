"""Measurement of ``jaxinfer-bench``: run every (workload, backend), time it, check it, stamp it.

For each workload the inputs are built once; the reference is the ``"xla"`` backend run on float32
copies of the same inputs (for a batch whose padded float32 form would not fit a GPU, the dense
equivalent in float32, request group by request group), and off GPU (scaled-down sizes) also a
float64 numpy evaluation of the dense equivalent. Each backend then gets: ``plan()`` time on the
host, the median latency of timed repeats after warm-up (:class:`Timer`, the one timing method of
every figure), and the max relative error ``max|o - ref| / max|ref|`` against both references.
``"cudnn"`` is the peer ``jax.nn.dot_product_attention(implementation="cudnn")`` on the padded
dense equivalent.

With fp8 KV dtypes (``jaxinfer-bench --kv-dtype``) every workload runs over the bf16 cache and then
over the fp8 cache quantized from it (:meth:`~jaxinfer.bench.workloads.Problem.quantized`), in the
same run: the references take the dequantized values, the bytes count the cache's bytes, and each
fp8 record carries ``vs_bf16``, the same backend's bf16-cache latency over its own (the tokens/s
ratio on the same batch).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxinfer
from jaxinfer import backends as backend_registry
from jaxinfer import fp8
from jaxinfer.bench.workloads import Dense, Problem, Workload

REFERENCE_BACKEND = "xla"
# Backends served through jaxinfer's wrappers, the reference first (it is the table's baseline).
WRAPPER_BACKENDS = (REFERENCE_BACKEND, *(n for n in backend_registry.BACKEND_NAMES if n not in ("auto", REFERENCE_BACKEND)))
BACKENDS = (*WRAPPER_BACKENDS, "cudnn")
# L2 of the H100 and H200 (50 MB): inputs smaller than twice this would be timed from cache.
L2_BYTES = 50 * 2**20
# The float64 numpy check runs off GPU when the dense equivalent costs at most this (about 1 s).
F64_CHECK_MAX_FLOPS = 5e9
# The cuDNN peer materializes the padded dense K/V; beyond this it is reported unsupported.
DENSE_MAX_BYTES = 24 * 2**30
# Error above which a result is reported as "mismatch" (bf16 inputs and output).
BF16_TOLERANCE = 2e-2
# Above this estimate of the float32 reference's footprint on the xla backend (padded K/V plus
# scores), the reference is the dense form computed in request groups (decode_wide_zipf: 70 GB).
REFERENCE_MAX_BYTES = 32 * 2**30
# Float32 K/V and scores per request group of that chunked reference.
REFERENCE_CHUNK_BYTES = 2**30


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def default_backends() -> tuple[str, ...]:
    """Backends that can run here: ``("xla",)`` off GPU; on GPU every importable one plus cuDNN."""
    if not on_gpu():
        return (REFERENCE_BACKEND,)
    available = []
    for name in WRAPPER_BACKENDS:
        try:
            backend_registry.get_backend(name)
        except NotImplementedError:
            continue
        available.append(name)
    return (*available, "cudnn")


def environment() -> dict:
    """Device, versions, git commit and UTC date stamped on every record."""
    dev = jax.devices()[0]
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=Path(jaxinfer.__file__).parent,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def torch_sync(torch) -> Callable:
    """The :class:`Timer`'s wait for a torch peer: ``torch.cuda.synchronize``, then the output
    unchanged (``torch``: the imported module, which jaxinfer does not depend on)."""

    def sync(out):
        torch.cuda.synchronize()
        return out

    return sync


@dataclasses.dataclass(frozen=True)
class Timer:
    """Median wall time of ``repeats`` timed repeats after ``warmup`` calls (the first compiles).

    With ``min_repeat_s > 0`` a repeat times two bursts of back-to-back calls, each ended by one
    wait for the device: ``C`` calls (as many as last ``min_repeat_s``) and ``2C``; its sample is
    ``(t(2C) - t(C)) / C``, the steady cost of one more call in a stream of calls (kernels plus
    their launch gaps, dispatch where it does not overlap them). A burst's fixed cost, the first
    call's dispatch onto an idle device and the final wait, cancels: it differs by framework
    (measured in benchmarks/README.md) and a serving loop pays it once per step, not once per
    attention call. With ``min_repeat_s = 0`` (the CPU runs) a repeat is one call. The same method times
    jaxinfer and its peers: the wait is ``sync`` (``jax.block_until_ready``; a torch peer passes
    one that calls ``torch.cuda.synchronize``).
    """

    repeats: int
    warmup: int = 1
    min_repeat_s: float = 0.0

    def describe(self) -> str:
        """The timing method in words (printed with the table and stored in every record)."""
        sync = "one device sync (jax.block_until_ready; torch.cuda.synchronize for a torch peer)"
        burst = (f"a burst of C back-to-back calls (C calls last at least {self.min_repeat_s * 1e3:g} ms) and one "
                 f"of 2C, each ended by {sync}; latency = (t(2C) - t(C)) / C, so a burst's fixed cost (first "
                 "dispatch, final sync) cancels" if self.min_repeat_s > 0 else f"one call ended by {sync}")
        return (f"median of {self.repeats} timed repeats after {self.warmup} warm-up call(s) (the first "
                f"compiles); a repeat is {burst}")

    def __call__(self, fn: Callable, args_list: Sequence[tuple], sync: Callable = jax.block_until_ready):
        """``(latency in ms of fn(*args) rotating over args_list, the first call's output)``.

        ``sync(out)`` waits until the device has finished ``out`` (and everything before it on
        the device) and returns ``out``.
        """
        first = sync(fn(*args_list[0]))
        for i in range(1, self.warmup):
            sync(fn(*args_list[i % len(args_list)]))

        def burst(calls: int) -> float:
            start = time.perf_counter()
            for c in range(calls):
                out = fn(*args_list[c % len(args_list)])
            sync(out)
            return time.perf_counter() - start

        if self.min_repeat_s > 0:
            calls = max(1, math.ceil(self.min_repeat_s / max(burst(1), 1e-9)))
            samples = [(burst(2 * calls) - burst(calls)) / calls for _ in range(self.repeats)]
        else:
            samples = [burst(1) for _ in range(self.repeats)]
        return statistics.median(samples) * 1e3, first


def input_copies(args: tuple, nbytes: int, copy: Callable = jnp.copy) -> list[tuple]:
    """``args`` and copies of it (``copy`` of each leaf) to rotate through, so that timing does not
    read warm L2.

    Only on GPU and only when the inputs fit in twice the L2; none of the full-size workloads
    does (the smallest, append, moves about 180 MB), so this guards custom sizes only.
    """
    if not on_gpu() or nbytes >= 2 * L2_BYTES:
        return [args]
    n = min(16, 1 + math.ceil(2 * L2_BYTES / max(nbytes, 1)))
    return [args] + [jax.tree.map(copy, args) for _ in range(n - 1)]


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured device ceilings: copy bandwidth (bytes read + written) and bf16 matmul rate."""

    copy_tb_s: float
    matmul_tflop_s: float
    copy_bytes: int
    matmul_n: int

    def floor_ms(self, nbytes: int, flops: int) -> float:
        """Roofline floor of a workload: the larger of bytes/bandwidth and FLOPs/matmul rate."""
        return max(nbytes / (self.copy_tb_s * 1e12), flops / (self.matmul_tflop_s * 1e12)) * 1e3


def measure_ceilings(timer: Timer, *, full: bool) -> Ceilings:
    """Copy ``-x`` over 1 GiB (64 MiB when not ``full``) and an ``n^3`` bf16 matmul, n = 8192 (1024)."""
    nbytes, n = (2**30, 8192) if full else (2**26, 1024)
    kx, ka, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (nbytes // 2,), jnp.bfloat16)
    copy_ms, _ = timer(jax.jit(jnp.negative), [(x,)])
    del x
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in (ka, kb))
    matmul_ms, _ = timer(jax.jit(jnp.matmul), [(a, b)])
    return Ceilings(
        copy_tb_s=2 * nbytes / (copy_ms * 1e-3) / 1e12,
        matmul_tflop_s=2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        copy_bytes=2 * nbytes,
        matmul_n=n,
    )


def rel_error(o, ref) -> float:
    """``max|o - ref| / max|ref|`` in float32 (float64 if ``ref`` is numpy float64)."""
    if isinstance(ref, np.ndarray):
        o = np.asarray(jnp.asarray(o, jnp.float32), np.float64)
        return float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
    o = jnp.asarray(o, jnp.float32)
    return float(jnp.max(jnp.abs(o - ref)) / jnp.max(jnp.abs(ref)))


def padded_reference_bytes(problem: Problem) -> int:
    """Estimate of the float32 footprint of the xla backend on ``problem``: the batch padded to
    its longest request (K and V, and the scores ``[B, Hq, T, S]``)."""
    d = problem.dense
    _, hkv, dim = problem.kv_flat[0].shape
    hq = problem.q.shape[1]
    t, s = int(d.qo_lens.max(initial=1)), int(d.kv_lens.max(initial=1))
    return 4 * d.kv_lens.size * s * (2 * hkv * dim + hq * t)


def _rope(xp, x, pos, theta: float):
    """Rotate-half (ROPE_LLAMA) RoPE of ``x [..., L, H, D]`` at positions ``pos [..., L]``
    (``xp``: numpy in float64, jax.numpy in float32): pairs ``(d, d + D/2)`` rotate by
    ``pos * theta ** (-2d / D)``."""
    dim = x.shape[-1]
    freq = theta ** (-2.0 * xp.arange(dim // 2, dtype=x.dtype) / dim)
    angle = pos[..., None, None].astype(x.dtype) * freq
    cos, sin = xp.cos(angle), xp.sin(angle)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@functools.partial(jax.jit, static_argnames="rope_theta")
def _attention32(q, k, v, visible, q_pos, rope_theta):
    """Softmax attention in float32 of a request group: ``q [n, T, Hq, D]``, ``k/v [n, S, Hkv, D]``,
    ``visible [n, T, S]``, ``q_pos [n, T]``; a row with no visible key gives 0."""
    n, t, hq, dim = q.shape
    hkv = k.shape[2]
    if rope_theta is not None:
        q = _rope(jnp, q, q_pos, rope_theta)
        k = _rope(jnp, k, jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2]), rope_theta)
    qg = q.reshape(n, t, hkv, hq // hkv, dim)
    s = jnp.einsum("ntkgd,nskd->nkgts", qg, k, precision="highest") / math.sqrt(dim)
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = s.max(axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("nkgts,nskd->ntkgd", p / jnp.where(l > 0, l, 1.0), v, precision="highest")
    return o.reshape(n, t, hq, dim)


def _pad_edge(index: np.ndarray, width: int) -> np.ndarray:
    return np.pad(index, ((0, 0), (0, width - index.shape[1])), mode="edge") if width > index.shape[1] else index[:, :width]


def _values32(x, problem: Problem, which: int):
    """Gathered K (``which`` 0) or V (1) rows as float32 values: dequantized for an fp8 cache."""
    x = x.astype(jnp.float32)
    return x if problem.kv_scales is None else x * problem.kv_scales[which][:, None]


def chunked_reference(problem: Problem, chunk_bytes: int = REFERENCE_CHUNK_BYTES) -> jax.Array:
    """``o [nnz_q, Hq, D]`` float32 of the dense equivalent, request group by request group.

    Requests are bucketed by the power of two above their KV length (and query length); a bucket
    runs in groups of as many of its requests as fit ``chunk_bytes`` of float32 K/V and scores, the
    last group padded with a repeated request, so there is one compiled shape per bucket.
    """
    d = problem.dense
    q32 = problem.q.astype(jnp.float32)
    k_flat, v_flat = problem.kv_flat
    _, hkv, dim = k_flat.shape
    hq = q32.shape[1]
    visible = d.visible()
    out = np.zeros(q32.shape, np.float32)
    pow2 = lambda x: 1 << max(int(x) - 1, 0).bit_length()  # noqa: E731
    buckets: dict[tuple[int, int], list[int]] = {}
    for b in np.argsort(-d.kv_lens, kind="stable"):
        buckets.setdefault((pow2(d.qo_lens[b]), pow2(d.kv_lens[b])), []).append(int(b))
    for (t, s), reqs in buckets.items():
        n = min(len(reqs), max(1, chunk_bytes // (4 * s * (2 * hkv * dim + hq * t))))
        for i in range(0, len(reqs), n):
            group = np.array(reqs[i : i + n] + reqs[i : i + 1] * (n - len(reqs[i : i + n])))
            q_idx, kv_idx = _pad_edge(d.q_index[group], t), _pad_edge(d.kv_index[group], s)
            vis = np.zeros((n, t, s), bool)
            tv, sv = min(t, visible.shape[1]), min(s, visible.shape[2])
            vis[:, :tv, :sv] = visible[group, :tv, :sv]
            q_pos = (d.kv_lens[group] - d.qo_lens[group])[:, None] + np.arange(t)[None]
            o = _attention32(q32[q_idx], _values32(k_flat[kv_idx], problem, 0), _values32(v_flat[kv_idx], problem, 1),
                             jnp.asarray(vis), jnp.asarray(q_pos), d.rope_theta)
            o = np.asarray(o)
            for j, b in enumerate(reqs[i : i + n]):
                out[d.q_index[b, : d.qo_lens[b]]] = o[j, : d.qo_lens[b]]
    return jnp.asarray(out)


def reference_output(problem: Problem) -> jax.Array:
    """``o`` of the ``"xla"`` backend on float32 copies of the inputs ``[nnz_q, Hq, D]`` (the
    dequantized values of an fp8 cache; through ``problem.reference`` when the problem names a
    cheaper form of its batch; by :func:`chunked_reference` when the padded float32 batch would
    exceed ``REFERENCE_MAX_BYTES``)."""
    if problem.reference is None and padded_reference_bytes(problem) > REFERENCE_MAX_BYTES:
        return chunked_reference(problem)
    problem = problem.reference or problem
    wrapper = problem.make_wrapper(backend=REFERENCE_BACKEND)
    plan = wrapper.plan(*problem.plan_args, q_data_type=jnp.float32, **problem.plan_kwargs)
    kv32 = tuple(x.astype(jnp.float32) for x in problem.kv_values())
    return jax.jit(problem.step)(plan, problem.q.astype(jnp.float32), kv32)


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray,
                 rope_theta: float | None = None) -> np.ndarray:
    """Softmax attention of one request in float64: ``q [T, Hq, D]``, ``k/v [S, Hkv, D]``,
    ``visible [T, S]``; GQA by repeating KV heads; a row with no visible key gives 0; with
    ``rope_theta``, RoPE at query positions ``S - T + i`` and key positions ``j``."""
    if rope_theta is not None:
        t, s = q.shape[0], k.shape[0]
        q = _rope(np, q, np.arange(s - t, s), rope_theta)
        k = _rope(np, k, np.arange(s), rope_theta)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[2])
    s = np.where(visible[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p / np.where(l > 0, l, 1.0), v)


def f64_output(problem: Problem) -> np.ndarray:
    """``o [nnz_q, Hq, D]`` float64 by numpy on the dense equivalent (per request; the
    dequantized values of an fp8 cache)."""
    d = problem.dense
    q = np.asarray(problem.q, np.float64)
    k, v = (np.asarray(x, np.float64) for x in problem.kv_flat)
    if problem.kv_scales is not None:
        k, v = (x * np.asarray(s, np.float64)[:, None] for x, s in zip((k, v), problem.kv_scales))
    visible = d.visible()
    out = np.zeros_like(q)
    for b, (t, s) in enumerate(zip(d.qo_lens, d.kv_lens)):
        rows, keys = d.q_index[b, :t], d.kv_index[b, :s]
        out[rows] = _attention64(q[rows], k[keys], v[keys], visible[b, :t, :s], d.rope_theta)
    return out


def wants_f64_check(problem: Problem) -> bool:
    """Off GPU, on sizes whose dense equivalent costs at most ``F64_CHECK_MAX_FLOPS`` (the full
    sizes would move gigabytes to the host for it)."""
    d = problem.dense
    dense_flops = 4 * float(np.dot(d.qo_lens, d.kv_lens)) * problem.q.shape[1] * problem.q.shape[2]
    return not on_gpu() and dense_flops <= F64_CHECK_MAX_FLOPS


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A backend ready to time: ``fn(*args)`` gives ``o``; ``rows(o)`` are the rows matching
    ``q_rows`` of the ragged reference, as a jax array; ``sync`` is the :class:`Timer`'s wait
    and ``copy`` copies one leaf of ``args`` (:func:`input_copies`): JAX's, or a torch peer's."""

    plan_ms: float | None
    plan_call_ms: float | None
    fn: Callable
    args: tuple
    rows: Callable
    q_rows: np.ndarray
    sync: Callable = jax.block_until_ready
    copy: Callable = jnp.copy


def _time_plan(problem: Problem, wrapper, repeats: int):
    """Plan once (warm-up), then ``repeats`` times on the host, each call alone (the previous plan
    on the device first); returns ``(plan, median ms until the plan is on the device, median ms
    until plan() returns)``. The second is what FlashInfer's plan() and issue 3's target count:
    plan() returns with the host-to-device copy enqueued."""
    def call():
        return wrapper.plan(*problem.plan_args, q_data_type=problem.q.dtype, kv_data_type=problem.kv_dtype,
                            **problem.plan_kwargs)

    plan = jax.block_until_ready(call())
    ready, returned = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = call()
        returned.append(time.perf_counter() - start)
        jax.block_until_ready(plan)
        ready.append(time.perf_counter() - start)
    return plan, statistics.median(ready) * 1e3, statistics.median(returned) * 1e3


def prepare_wrapper(problem: Problem, backend: str, plan_repeats: int) -> Prepared:
    """Plan with the public wrapper of ``backend``; the jitted step takes the plan as an argument.

    Raises:
      NotImplementedError: the backend cannot serve the workload.
    """
    plan, plan_ms, plan_call_ms = _time_plan(problem, problem.make_wrapper(backend=backend), plan_repeats)
    nnz_q = problem.q.shape[0]
    return Prepared(plan_ms, plan_call_ms, jax.jit(problem.step), (plan, problem.q, problem.kv, problem.kv_scales),
                    lambda o: o, np.arange(nnz_q))


def prepare_dense_peer(problem: Problem, implementation: str,
                       attention: Callable = jax.nn.dot_product_attention) -> Prepared:
    """``attention(..., implementation=...)`` (``jax.nn.dot_product_attention`` or a function of
    the same signature, such as tokamax's) on the padded dense equivalent ``[B, T, H, D]`` of the
    batch (gathered outside the timing).

    Per-request lengths become ``query_seq_lengths``/``key_value_seq_lengths``; a causal batch of
    square requests uses the built-in causal mask; any other mask (bottom-right causal with
    ``qo_len != kv_len``, block-sparse) is passed as a dense bool mask.

    Raises:
      NotImplementedError: a dense equivalent over ``DENSE_MAX_BYTES``, a RoPE workload (the
        peer has no fused RoPE; rotating q and k outside the timing would not be the same work),
        or an fp8 cache (the peer takes K/V in q's dtype).
    """
    d: Dense = problem.dense
    if d.rope_theta is not None:
        raise NotImplementedError("jax.nn.dot_product_attention has no fused RoPE")
    if problem.kv_scales is not None:
        raise NotImplementedError("jax.nn.dot_product_attention takes K/V in q's dtype, not an fp8 cache; "
                                  "its bf16-cache row is the comparison")
    k_flat, v_flat = problem.kv_flat
    dense_bytes = 2 * d.kv_index.size * k_flat.shape[1] * k_flat.shape[2] * k_flat.dtype.itemsize
    if dense_bytes > DENSE_MAX_BYTES:
        raise NotImplementedError(f"the dense equivalent needs {dense_bytes / 2**30:.1f} GiB of K/V")
    square_causal = d.causal and d.mask is None and bool((d.qo_lens == d.kv_lens).all())
    extra = {}
    if d.mask is not None or (d.causal and not square_causal):
        extra["mask"] = jnp.asarray(d.visible()[:, None])
    elif not d.uniform:
        extra["query_seq_lengths"] = jnp.asarray(d.qo_lens, jnp.int32)
        extra["key_value_seq_lengths"] = jnp.asarray(d.kv_lens, jnp.int32)

    def fn(q, k, v, extra):
        return attention(q, k, v, is_causal=square_causal, implementation=implementation, **extra)

    args = (problem.q[d.q_index], k_flat[d.kv_index], v_flat[d.kv_index], extra)
    b, i = np.nonzero(np.arange(d.q_index.shape[1])[None] < d.qo_lens[:, None])
    return Prepared(None, None, jax.jit(fn), args, lambda o: o[b, i], d.q_index[b, i])


def prepare_cudnn(problem: Problem) -> Prepared:
    """The cuDNN peer (:func:`prepare_dense_peer` with ``implementation="cudnn"``).

    Raises:
      NotImplementedError: no GPU, or a dense equivalent over ``DENSE_MAX_BYTES``.
    """
    if not on_gpu():
        raise NotImplementedError("cuDNN attention needs a GPU")
    return prepare_dense_peer(problem, "cudnn")


def measure(problem: Problem, backend: str, timer: Timer, ref, ref64, plan_repeats: int) -> dict:
    """Time and check one backend (a jaxinfer wrapper backend or ``"cudnn"``); see
    :func:`measure_prepared`."""
    if backend == "cudnn":
        return measure_prepared(problem, lambda: prepare_cudnn(problem), timer, ref, ref64)
    return measure_prepared(problem, lambda: prepare_wrapper(problem, backend, plan_repeats), timer, ref, ref64)


def measure_prepared(problem: Problem, prepare: Callable[[], Prepared], timer: Timer, ref, ref64) -> dict:
    """Time and check what ``prepare()`` readies against ``ref`` (and ``ref64``; ``None`` = not
    available), with ``timer`` and the prepared ``sync``.

    Never raises: status ``"ok"``, ``"mismatch"`` (error over ``BF16_TOLERANCE``),
    ``"unchecked"`` (no reference), ``"unsupported"`` (``prepare`` raised NotImplementedError) or
    ``"error"``, with the reason.
    """
    try:
        prep = prepare()
        copies = input_copies(prep.args, problem.bytes, prep.copy)
        latency_ms, o = timer(prep.fn, copies, prep.sync)
        o = prep.rows(o)
        err = None if ref is None else rel_error(o, ref[prep.q_rows])
        err64 = None if ref64 is None else rel_error(o, ref64[prep.q_rows])
    except NotImplementedError as e:
        return {"status": "unsupported", "reason": str(e)}
    except Exception as e:  # a failing backend must not stop the other measurements
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
    errors = [e for e in (err, err64) if e is not None]
    if not errors:
        status = "unchecked"
    else:
        status = "ok" if all(e <= BF16_TOLERANCE for e in errors) else "mismatch"  # NaN: mismatch
    return {
        "status": status,
        "latency_ms": latency_ms,
        "input_copies": len(copies),
        "plan_ms": prep.plan_ms,
        "plan_call_ms": prep.plan_call_ms,
        "max_error": err,
        "max_error_f64": err64,
    }


def best_own(results: dict[str, dict]) -> tuple[str, dict] | None:
    """``(backend, result)`` of the fastest jaxinfer wrapper backend whose result is ``"ok"``
    (the xla backend included), or ``None``."""
    own = [(b, r) for b, r in results.items() if b in WRAPPER_BACKENDS and r["status"] == "ok"]
    return min(own, key=lambda br: br[1]["latency_ms"], default=None)


def make_record(workload: Workload, problem: Problem, backend: str, result: dict, reference: dict | None,
                ceilings: Ceilings | None, env: dict, cudnn: dict | None = None, timing: str | None = None,
                kv_dtype: str = "bf16", bf16: dict | None = None, peer: str | None = None,
                best: tuple[str, dict] | None = None) -> dict:
    """One JSON record (FlashInfer-Bench trace fields plus throughput, floor, the same-run ratios
    to the xla backend (``speedup``), to cuDNN (``vs_cudnn``, given its result ``cudnn``) and, for
    an fp8 cache, to the same backend on the bf16 cache (``vs_bf16``, given its result ``bf16``),
    timing method and environment). A ``kv_dtype`` other than bf16 names the workload
    ``<name>:<kv_dtype>``. A same-run peer's record (:mod:`jaxinfer.bench.peers`) names its
    ``peer`` and, given ``best`` (:func:`best_own`), jaxinfer's fastest backend on the same inputs
    (``best_backend``, ``best_latency_ms``) and ``best_vs_peer``: the peer's latency over that
    one's (above 1: jaxinfer is faster)."""
    latency = result.get("latency_ms")
    ref_latency = reference.get("latency_ms") if reference else None
    peer_latency = cudnn.get("latency_ms") if cudnn else None
    best_backend, best_latency = (best[0], best[1]["latency_ms"]) if best and peer else (None, None)
    bf16_latency = bf16.get("latency_ms") if bf16 else None
    work = problem.flops if workload.unit == "TFLOP/s" else problem.bytes
    floor = ceilings.floor_ms(problem.bytes, problem.flops) if ceilings else None
    suffix = "" if kv_dtype == "bf16" else f":{kv_dtype}"
    return {
        "definition": workload.definition + ("" if kv_dtype == "bf16" else f"_kv_{kv_dtype}"),
        "workload": workload.name + suffix,
        "kv_dtype": kv_dtype,
        "axes": workload.axes(),
        "backend": backend,
        "status": result["status"],
        "reason": result.get("reason"),
        "max_error": result.get("max_error"),
        "max_error_f64": result.get("max_error_f64"),
        "latency_ms": latency,
        "reference_latency_ms": ref_latency,
        "speedup": ref_latency / latency if latency and ref_latency else None,
        "cudnn_latency_ms": peer_latency,
        "vs_cudnn": peer_latency / latency if latency and peer_latency else None,
        "bf16_latency_ms": bf16_latency,
        "vs_bf16": bf16_latency / latency if latency and bf16_latency else None,
        "plan_ms": result.get("plan_ms"),
        "plan_call_ms": result.get("plan_call_ms"),
        "input_copies": result.get("input_copies"),
        "throughput": work / (latency * 1e-3) / 1e12 if latency else None,
        "unit": workload.unit,
        "bytes": problem.bytes,
        "flops": problem.flops,
        "floor_ms": floor,
        "of_floor": latency / floor if latency and floor else None,
        "timing": timing,
        "peer": peer,
        "best_backend": best_backend,
        "best_latency_ms": best_latency,
        "best_vs_peer": latency / best_latency if latency and best_latency else None,
        **env,
    }


def run_benchmark(
    workloads: Sequence[Workload],
    backends: Sequence[str],
    timer: Timer,
    *,
    ceilings: Ceilings | None = None,
    seed: int = 0,
    plan_repeats: int = 5,
    progress: bool = True,
    kv_dtypes: Sequence[str] = ("bf16",),
    peers: Sequence = (),
) -> list[dict]:
    """Measure every (workload, KV dtype, backend); returns one record per triple (see
    :func:`make_record`), then one per case of each same-run peer.

    The reference latency of a record is that of the ``"xla"`` backend in the same run (``None``
    when ``"xla"`` is not among ``backends``), the cuDNN latency that of ``"cudnn"`` likewise.
    ``kv_dtypes`` are names of :data:`jaxinfer.fp8.KV_DTYPE_NAMES`, ``"bf16"`` first: the other
    caches are quantized from the bf16 inputs, and their records' ``vs_bf16`` compare the same
    backend on the two caches. ``peers`` are :class:`jaxinfer.bench.peers.Peer` objects: each
    case of ``peer.cases(workload, problem, plan_repeats)`` is timed by ``timer`` on the same
    inputs, checked against the same references, and its record carries the ratio to the
    fastest jaxinfer backend (:func:`best_own`).
    """
    env = environment()
    records = []
    with tqdm(total=len(workloads) * len(kv_dtypes) * len(backends), unit="run", disable=not progress) as bar:
        for workload in workloads:
            bar.set_description(f"{workload.name}: inputs")
            base = workload.build(seed)
            bf16_results = {}
            for kv in kv_dtypes:
                name = workload.name if kv == "bf16" else f"{workload.name}:{kv}"
                bar.set_description(f"{name}: reference")
                problem = base if kv == "bf16" else base.quantized(fp8.kv_dtype(kv))
                ref, ref_failure = None, None
                try:
                    ref = reference_output(problem)
                except Exception as e:  # e.g. out of memory: time the backends anyway, unchecked
                    ref_failure = f"float32 reference failed: {type(e).__name__}: {e}"[:500]
                ref64 = f64_output(problem) if wants_f64_check(problem) else None
                results, peer_of = {}, {}
                for backend in backends:
                    bar.set_description(f"{name} / {backend}")
                    results[backend] = measure(problem, backend, timer, ref, ref64, plan_repeats)
                    bar.update()
                for peer in peers:
                    for label, prepare in peer.cases(workload, problem, plan_repeats).items():
                        bar.set_description(f"{name} / {label}")
                        results[label] = measure_prepared(problem, prepare, timer, ref, ref64)
                        peer_of[label] = peer.name
                for result in results.values():
                    if result["status"] == "unchecked":
                        result["reason"] = ref_failure
                if kv == "bf16":
                    bf16_results = results
                reference, cudnn, best = results.get(REFERENCE_BACKEND), results.get("cudnn"), best_own(results)
                records += [make_record(workload, problem, b, r, reference, ceilings, env, cudnn, timer.describe(),
                                        kv, None if kv == "bf16" else bf16_results.get(b), peer_of.get(b), best)
                            for b, r in results.items()]
                del problem, ref, ref64  # free the device before the next inputs
            del base
    return records
