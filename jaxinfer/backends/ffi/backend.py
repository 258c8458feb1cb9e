"""Backends ``"fa2"`` and ``"fa3"``: jaxinfer's CUDA FlashAttention kernels behind the backend API.

``plan`` runs the plan stage's native planner (:func:`jaxinfer.plan.planner.plan_work`) with the
kernels' tile size, cost model and CTA budget as its parameters: every request's queries cut into
tiles of ``BLOCK_M`` rows (the CTA tile of the kernels in ``jaxinfer/csrc/``), one queue ordered
longest KV range first (a longest-processing-time schedule: causal prefill tiles differ up to
``kv_len / BLOCK_M``-fold in work), and every array padded to the plan capacity, so a new batch of the same capacity never
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

from jaxinfer.backends import device
from jaxinfer.backends.base import Capabilities, check_run_args
from jaxinfer.backends.ffi import build, ops
from jaxinfer.plan.batch import BatchSpec, PlanCapacity, pad_batch, pad_to
from jaxinfer.plan.layout import F
from jaxinfer.plan.planner import PlanArgs, plan_work
from jaxinfer.plan.transfer import to_device
from jaxinfer.variants import LOG2E

# Query rows of one CTA per kernel and head_dim: fa2, 16 * kMT * kWarps of Fa2Traits in
# jaxinfer/csrc/fa2/kernel.cuh; fa3, kBM of jaxinfer/csrc/fa3/config.cuh (two consumer warpgroups of 64 rows).
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


# What both kernel families serve (fa2 on sm80+, fa3 on sm90a alone): the head dims they were
# instantiated for, 16-bit q and KV of one dtype, the plain softmax with causal / window / soft cap.
# fp8 KV caches are declined: widening a cache in JAX before the call would read and write the
# whole cache on every call (more bytes than the 16-bit cache moves), so the FFI kernels would
# need widening loads of their own.
FP8_KV_DECLINED = ("the fa2/fa3 CUDA kernels are built for K/V in q's 16-bit dtype (no fp8 widening load in "
                   "jaxinfer/csrc); backend='pallas' serves fp8 KV caches, and 'auto' routes them there")
CAPABILITIES = {
    name: Capabilities(dtypes=ops.DTYPES, kv_dtype_is_q_dtype=True, fp8_kv=(), fp8_kv_declined=FP8_KV_DECLINED,
                       head_dims=ops.HEAD_DIMS,
                       pos_encoding_modes=("NONE",), custom_mask=False, user_callables=False, non_softmax=False,
                       gpu=True, min_arch=80, archs=archs)
    for name, archs in (("fa2", None), ("fa3", (90,)))
}


@functools.lru_cache(maxsize=256)
def _plan_args(causal: bool, window_left: int, block_m: int, max_tiles: int) -> PlanArgs:
    """The planner's arguments for the FFI kernels: query tiles of ``block_m`` tokens over all heads
    (the kernels run every head of a tile), never split, ordered by visible keys alone
    (``row_cost=0``) into one queue (``num_ctas=1``): fa3's persistent CTAs take work items from
    an atomic counter in this order, fa2's grid launches them in it."""
    return PlanArgs(num_kv_heads=1, group_size=1, block_m=block_m, block_n=block_m, causal=causal,
                    window_left=window_left, num_ctas=1, split_budget=2, max_work_tiles=max_tiles, split_kv=False,
                    min_chunk=0, row_cost=0)


@dataclasses.dataclass(frozen=True)
class FlashAttentionBackend:
    """The ``"fa2"`` / ``"fa3"`` backend (see the module docstring)."""

    name: str

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES[self.name]

    merge_states = None  # no merge kernel: the kernels write final rows (no split-KV)

    def unsupported(self, spec: BatchSpec) -> str | None:
        """Why this backend cannot serve ``spec``, or ``None``; never raises.

        Cheap on a machine without a GPU (no build is attempted there); on a GPU the first call
        builds the kernel library (cached on disk) so that a failing build is reported here.
        """
        return self.capabilities.unsupported(spec) or self.device_unsupported()

    def device_unsupported(self) -> str | None:
        """Why this backend cannot run on this machine (no NVIDIA GPU of its arch, a failing build),
        or ``None``; never raises. On a GPU the first call builds the kernel library (cached)."""
        cc = device.gpu_arch()
        reason = self.capabilities.device_unsupported(device.platform(), cc)
        if reason is not None:
            return reason
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
        """Host planning: the query tiles in the native planner's order (widest key range first)
        and the padded page table.

        Raises:
          NotImplementedError: the backend cannot serve ``spec`` (see :attr:`capabilities`; the
            device is checked by :meth:`unsupported`, which the wrappers call first).
          ValueError: the batch exceeds a fixed capacity.
        """
        reason = self.capabilities.unsupported(spec)
        if reason is not None:
            raise NotImplementedError(f"backend {self.name!r}: {reason}")
        block_m = BLOCK_M[self.name][spec.head_dim]
        padded = pad_batch(spec, capacity)
        max_tiles = padded.max_batch_size * -(-padded.max_qo_len // block_m)
        # kv_base = the request's index: the kernels look a request's rows up themselves.
        wb = plan_work(spec.qo_indptr, spec.kv_lens, np.arange(spec.batch_size, dtype=np.int32),
                       **dataclasses.asdict(_plan_args(spec.variant.causal, spec.variant.window_left, block_m,
                                                       max_tiles)))
        tiles = wb.work[: wb.num_tiles]
        tile_batch = tiles[:, F["kv_base"]]
        tile_qstart = tiles[:, F["q_row0"]] - spec.qo_indptr[tile_batch]
        if spec.paged:
            pages = spec.kv_indices[: spec.kv_indptr[-1]]
            kv_indices = pad_to(pages, padded.max_batch_size * -(-padded.max_kv_len // spec.page_size), 0)
        else:
            kv_indices = np.zeros(1, np.int32)
        return Fa2Plan(
            qo_indptr=to_device(padded.qo_indptr),
            kv_indptr=to_device(padded.kv_indptr),
            kv_indices=to_device(kv_indices),
            kv_lens=to_device(padded.kv_lens),
            tile_batch=to_device(pad_to(tile_batch, max_tiles, -1)),
            tile_qstart=to_device(pad_to(tile_qstart, max_tiles, 0)),
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

    def run(self, plan: Fa2Plan, q, k, v, *, kv_layout: str = "NHD", return_lse: bool = False, k_scale=None,
            v_scale=None, variant_params=None, sinks=None):
        """``(o [nnz_q, Hq, D], lse [nnz_q, Hq] float32 base 2 or None)``; jit-compatible.

        ``k_scale``/``v_scale`` (``[Hkv]`` float32 or ``None``, :mod:`jaxinfer.fp8`) are applied
        around the kernels, whose ``sm_scale`` is a compile-time attribute: q's rows of KV head
        ``h`` multiplied by ``k_scale[h]`` in float32 and rounded to q's dtype before the call
        (which scales the logits and the lse alike; the rounding is one more of q's, relative
        ``2**-9`` in bf16), the output rows by ``v_scale[h]`` after it (the softmax variant they
        serve has no output transform to come before).

        ``sinks`` (``[Hq]`` float32 natural-log logits or ``None``) join the softmax denominator
        inside the kernels' epilogues (``sinks * log2(e)`` passed to
        :func:`jaxinfer.backends.ffi.ops.flash_forward`; the math of
        :func:`jaxinfer.variants.apply_sink` on the running max and sum): the kernels write final
        rows (no split-KV), so each row counts its sink once, with no extra pass over ``o``. The
        sink is not scaled by ``k_scale``, and ``v_scale`` commutes with it (a sink has no value).

        Raises:
          ValueError: q/k/v shapes or dtypes disagree with the plan (at trace time), or
            ``variant_params`` given (these kernels run no user callables).
        """
        if variant_params is not None:
            raise ValueError(f"backend {self.name!r} runs no user callables: variant_params must be None")
        check_run_args(q, k, v, paged=plan.paged, kv_layout=kv_layout, page_size=plan.page_size,
                       num_qo_heads=plan.num_qo_heads, num_kv_heads=plan.num_kv_heads, head_dim=plan.head_dim,
                       q_dtype=plan.q_dtype, kv_dtype=plan.q_dtype)
        # A module-level run may pass a smaller cache than the traced plan's page ids address (the
        # wrapper checks them on the host): clamped here, once per call, not per key in the kernels.
        kv_indices = jnp.clip(plan.kv_indices, 0, k.shape[0] - 1) if plan.paged else plan.kv_indices
        if k_scale is not None:
            q = _scale_heads(q, k_scale, plan.num_qo_heads)
        o, lse = ops.flash_forward(
            q, k, v, plan.qo_indptr, plan.kv_indptr, kv_indices, plan.kv_lens, plan.tile_batch, plan.tile_qstart,
            causal=plan.causal,
            window_left=plan.window_left,
            logits_soft_cap=plan.logits_soft_cap,
            sm_scale=plan.sm_scale,
            page_size=plan.page_size,
            paged=plan.paged,
            kv_layout=kv_layout,
            kernel=self.name,
            sinks_log2=None if sinks is None else jnp.asarray(sinks, jnp.float32) * LOG2E,
        )
        if v_scale is not None:
            o = _scale_heads(o, v_scale, plan.num_qo_heads)
        return o, (lse if return_lse else None)


def _scale_heads(x, scale, num_qo_heads: int):
    """``x [n, Hq, D]`` with query head ``h``'s rows times ``scale[h // (Hq / Hkv)]`` (float32 product,
    rounded back to ``x``'s dtype)."""
    per_head = jnp.repeat(scale, num_qo_heads // scale.shape[0])
    return (x.astype(jnp.float32) * per_head[None, :, None]).astype(x.dtype)


def get_backend(name: str) -> FlashAttentionBackend:
    """The backend object of ``name`` (``"fa2"`` or ``"fa3"``).

    Raises:
      ValueError: another name.
    """
    if name not in ("fa2", "fa3"):
        raise ValueError(f"jaxinfer.backends.ffi.backend serves 'fa2' and 'fa3', got {name!r}")
    return FlashAttentionBackend(name)
