"""Backends ``"fa2"`` and ``"fa3"``: jaxinfer's CUDA FlashAttention kernels behind the backend API.

``plan`` cuts every request's queries into tiles of ``BLOCK_M`` rows (the CTA tile of
``jaxinfer/csrc/fa2_kernel.cuh`` / ``jaxinfer/csrc/fa3_kernel.cuh``), orders the tiles longest KV range first (a
longest-processing-time schedule: causal prefill tiles differ up to ``kv_len / BLOCK_M``-fold in
work) and pads every array to the plan capacity, so a new batch of the same capacity never
recompiles. ``run`` is one ``ffi_call`` (:func:`jaxinfer.backends.ffi.ops.flash_forward`) over the work
items (tile, qo head), heavy tiles first.

``"fa2"``: mma.sync + cp.async, any sm80+ GPU, one CTA per work item. ``"fa3"``: sm90a only
(H100/H200), a persistent grid (one CTA per SM takes work items from a counter; head_dim 256: one
CTA per item): a producer warpgroup loading Q and ragged K/V with TMA (paged K/V: gathered
through the page table with cp.async) into an mbarrier ring, two consumer warpgroups on wgmma
(FlashAttention-3, arXiv 2407.08608, sec. 3.1).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.backends import device
from jaxinfer.backends.ffi import build, ops
from jaxinfer.plan.transfer import to_device

# Query rows of one CTA per kernel and head_dim: fa2, 16 * kMT * kWarps of Fa2Traits in
# jaxinfer/csrc/fa2_kernel.cuh; fa3, kBM of jaxinfer/csrc/fa3_kernel.cuh (two consumer warpgroups of 64 rows).
BLOCK_M = {"fa2": {64: 128, 128: 128, 256: 64}, "fa3": {64: 128, 128: 128, 256: 128}}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["qo_indptr", "kv_indptr", "kv_indices", "kv_lens", "tile_batch", "tile_qstart"],
    meta_fields=["causal", "window_left", "logits_soft_cap", "sm_scale", "page_size", "paged",
                 "num_qo_heads", "num_kv_heads", "head_dim", "q_dtype"],
)
@dataclasses.dataclass(frozen=True)
class Fa2Plan:
    """Device work buffers of one batch (int32, padded to the capacity) and the static variant.

    Attributes:
      qo_indptr, kv_indptr: ``[B_cap+1]`` (kv over pages when paged, tokens otherwise; padding
        repeats the last value, so padded requests are empty).
      kv_indices: ``[nnz_pages_cap]`` page ids (``[1]`` zeros when ragged).
      kv_lens: ``[B_cap]`` keys per request.
      tile_batch, tile_qstart: ``[T_cap]`` request and first query row of each tile, ``-1`` padding.
    """

    qo_indptr: jax.Array
    kv_indptr: jax.Array
    kv_indices: jax.Array
    kv_lens: jax.Array
    tile_batch: jax.Array
    tile_qstart: jax.Array
    causal: bool
    window_left: int
    logits_soft_cap: float | None
    sm_scale: float
    page_size: int
    paged: bool
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: np.dtype


def _pad(a: np.ndarray, size: int, value: int) -> np.ndarray:
    out = np.full(max(size, 1), value, dtype=np.int32)
    out[: a.size] = a
    return out


def query_tiles(spec: BatchSpec, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tile_batch, tile_qstart)`` of every query tile, the widest KV range first.

    A tile's cost is the number of keys any of its rows can see (causal and window clip it).
    """
    batch, qstart, cost = [], [], []
    for b, (qo_len, kv_len) in enumerate(zip(spec.qo_lens.tolist(), spec.kv_lens.tolist())):
        for qs in range(0, qo_len, block_m):
            last = min(qs + block_m, qo_len) - 1 + kv_len - qo_len
            hi = min(kv_len, last + 1) if spec.variant.causal else kv_len
            lo = max(0, qs + kv_len - qo_len - spec.variant.window_left) if spec.variant.window_left >= 0 else 0
            batch.append(b)
            qstart.append(qs)
            cost.append(max(hi - lo, 0))
    order = np.argsort(-np.asarray(cost, dtype=np.int64), kind="stable")
    return np.asarray(batch, np.int32)[order], np.asarray(qstart, np.int32)[order]


@dataclasses.dataclass(frozen=True)
class FlashAttentionBackend:
    """The ``"fa2"`` / ``"fa3"`` backend (see the module docstring)."""

    name: str

    def spec_unsupported(self, spec: BatchSpec) -> str | None:
        """The part of :meth:`unsupported` that depends on ``spec`` alone (no device, no build)."""
        v = spec.variant
        checks = (
            (spec.head_dim not in ops.HEAD_DIMS, f"head_dim must be one of {ops.HEAD_DIMS}, got {spec.head_dim}"),
            (jnp.dtype(spec.q_dtype) not in ops.DTYPES, f"q dtype must be bfloat16 or float16, got {spec.q_dtype}"),
            (spec.kv_dtype != spec.q_dtype, f"kv dtype {spec.kv_dtype} must equal q dtype {spec.q_dtype}"),
            (v.pos_encoding_mode != "NONE", f"pos_encoding_mode={v.pos_encoding_mode!r} is not implemented (only 'NONE')"),
            (spec.custom_mask is not None, "custom_mask is not implemented"),
            (v.has_user_callables, "user callables (logits/query/key/output transforms, logits_mask) are not supported"),
            (not v.use_softmax, "use_softmax=False is not implemented"),
        )
        return next((reason for failed, reason in checks if failed), None)

    def unsupported(self, spec: BatchSpec) -> str | None:
        """Why this backend cannot serve ``spec``, or ``None``; never raises.

        Cheap on a machine without a GPU (no build is attempted there); on a GPU the first call
        builds the kernel library (cached on disk) so that a failing build is reported here.
        """
        return self.spec_unsupported(spec) or self.device_unsupported()

    def device_unsupported(self) -> str | None:
        """Why this backend cannot run on this machine (no NVIDIA GPU of its arch, a failing build),
        or ``None``; never raises. On a GPU the first call builds the kernel library (cached)."""
        cc = device.gpu_arch()
        if cc is None:
            return f"needs an NVIDIA GPU; jax's default device is {jax.devices()[0].platform}"
        if cc < 80:
            return f"needs compute capability 8.0 or newer, got {cc / 10:.1f}"
        try:
            build.kernel_arch(self.name, cc)  # fa3: sm_90 only
        except ValueError as e:
            return str(e)
        try:
            ops.ensure_registered(self.name)
        except Exception as e:  # noqa: BLE001 - any build or load failure is a reason, never an error here
            return f"the {self.name} kernel library is unavailable: {e}"
        return None

    def plan(self, spec: BatchSpec, capacity: PlanCapacity) -> Fa2Plan:
        """Host planning: query tiles (LPT order) and the padded page table.

        Raises:
          NotImplementedError: the backend cannot serve ``spec`` (see :meth:`spec_unsupported`; the
            device is checked by :meth:`unsupported`, which the wrappers call first).
          ValueError: the batch exceeds a fixed capacity.
        """
        reason = self.spec_unsupported(spec)
        if reason is not None:
            raise NotImplementedError(f"backend {self.name!r}: {reason}")
        block_m = BLOCK_M[self.name][spec.head_dim]
        b = spec.batch_size
        b_cap = capacity.resolve("max_batch_size", b)
        qo_cap = capacity.resolve("max_qo_len", int(spec.qo_lens.max(initial=0)))
        kv_cap = capacity.resolve("max_kv_len", int(spec.kv_lens.max(initial=0)))
        tile_batch, tile_qstart = query_tiles(spec, block_m)
        t_cap = b_cap * -(-qo_cap // block_m)
        if spec.paged:
            pages = spec.kv_indices[: spec.kv_indptr[-1]]
            kv_indices = _pad(pages, b_cap * -(-kv_cap // spec.page_size), 0)
        else:
            kv_indices = np.zeros(1, np.int32)
        return Fa2Plan(
            qo_indptr=to_device(_pad(spec.qo_indptr, b_cap + 1, int(spec.qo_indptr[-1]))),
            kv_indptr=to_device(_pad(spec.kv_indptr, b_cap + 1, int(spec.kv_indptr[-1]))),
            kv_indices=to_device(kv_indices),
            kv_lens=to_device(_pad(spec.kv_lens, b_cap, 0)),
            tile_batch=to_device(_pad(tile_batch, t_cap, -1)),
            tile_qstart=to_device(_pad(tile_qstart, t_cap, 0)),
            causal=bool(spec.variant.causal),
            window_left=int(spec.variant.window_left),
            logits_soft_cap=spec.variant.logits_soft_cap,
            sm_scale=float(spec.variant.scale(spec.head_dim)),
            page_size=int(spec.page_size),
            paged=spec.paged,
            num_qo_heads=spec.num_qo_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            q_dtype=np.dtype(spec.q_dtype),
        )

    def run(self, plan: Fa2Plan, q, k, v, *, kv_layout: str = "NHD", return_lse: bool = False):
        """``(o [nnz_q, Hq, D], lse [nnz_q, Hq] float32 base 2 or None)``; jit-compatible.

        Raises:
          ValueError: q/k/v shapes or dtypes disagree with the plan (at trace time).
        """
        want = (plan.num_qo_heads, plan.head_dim)
        if q.ndim != 3 or tuple(q.shape[1:]) != want or np.dtype(q.dtype) != plan.q_dtype:
            raise ValueError(f"q must be [nnz_q, {want[0]}, {want[1]}] {plan.q_dtype}, got {q.shape} {q.dtype}")
        hkv_axis = (2 if kv_layout == "NHD" else 1) if plan.paged else 1
        if k.ndim != (4 if plan.paged else 3) or k.shape[hkv_axis] != plan.num_kv_heads:
            raise ValueError(f"k must have {plan.num_kv_heads} kv heads on axis {hkv_axis} "
                             f"({'paged ' + kv_layout if plan.paged else 'ragged'}), got {k.shape}")
        o, lse = ops.flash_forward(
            q, k, v, plan.qo_indptr, plan.kv_indptr, plan.kv_indices, plan.kv_lens, plan.tile_batch, plan.tile_qstart,
            causal=plan.causal,
            window_left=plan.window_left,
            logits_soft_cap=plan.logits_soft_cap,
            sm_scale=plan.sm_scale,
            page_size=plan.page_size,
            paged=plan.paged,
            kv_layout=kv_layout,
            kernel=self.name,
        )
        return o, (lse if return_lse else None)


def get_backend(name: str) -> FlashAttentionBackend:
    """The backend object of ``name`` (``"fa2"`` or ``"fa3"``).

    Raises:
      ValueError: another name.
    """
    if name not in ("fa2", "fa3"):
        raise ValueError(f"jaxinfer.backends.ffi.backend serves 'fa2' and 'fa3', got {name!r}")
    return FlashAttentionBackend(name)
