"""The ``"pallas"`` backend: host planner + Pallas attention and merge kernels.

``plan`` runs the compiled host planner (:func:`jaxinfer.plan.planner.plan_packed_at`) on the spec's
numpy arrays and returns a :class:`PallasPlan` pytree of int32 device arrays whose shapes depend
only on the :class:`~jaxinfer.plan.batch.PlanCapacity` and the backend's CTA budget; ``run`` is
jit-compatible.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.backends import device
from jaxinfer.backends.base import Capabilities, check_run_args
from jaxinfer.backends.pallas import merge
from jaxinfer.backends.pallas.attention import KernelSpec, attention
from jaxinfer.backends.pallas.config import MAX_BLOCK_M, TileConfig, heuristic_config
from jaxinfer.fp8 import FP8_KV_DTYPES
from jaxinfer.hashing import hash_once
from jaxinfer.plan import native
from jaxinfer.plan.batch import BatchSpec, PlanCapacity, filled, next_pow2
from jaxinfer.plan.planner import PlanArgs, count_query_tiles_at, count_work_at, plan_packed_at, plan_work_in_jit
from jaxinfer.plan.transfer import to_device
from jaxinfer.variants import LOG2E, AttentionVariant

# What the Pallas kernels serve: tl.dot needs power-of-2 head dims of at least 16 (and RoPE's
# rotated halves at least 16 each), a GQA group fits one row tile of at most MAX_BLOCK_M rows, and
# the custom mask is addressed with int32 offsets. fp8 caches are widened to q's dtype on load.
CAPABILITIES = Capabilities(
    dtypes=(jnp.bfloat16, jnp.float16),
    kv_dtype_is_q_dtype=True,
    fp8_kv=FP8_KV_DTYPES,
    head_dims=(16, 32, 64, 128, 256),
    max_group_size=MAX_BLOCK_M,
    rope_min_head_dim=32,
    max_mask_elements=2**31 - 1,
)


@dataclasses.dataclass(frozen=True)
class PallasPlan:
    """A plan of the Pallas backend (pytree: ``buffer`` is the child, the rest static metadata).

    Attributes:
      buffer: ``[kernel.buffer_size]`` int32 on the device: the work tiles, per-CTA ranges, merge
        groups and page ids packed into one array (one host-to-device copy; layout
        :class:`~jaxinfer.plan.layout.WorkLayout`, which the plan's ``kernel`` extends).
      kernel: static :class:`~jaxinfer.backends.pallas.attention.KernelSpec`.
      config: static :class:`~jaxinfer.backends.pallas.config.TileConfig`.
      mask: ``[n]`` int8 flat custom mask (the spec's, 1 = keep, zero-padded to a power of 2) when
        ``kernel.custom_mask``, else ``None``.
    """

    buffer: jax.Array
    kernel: KernelSpec
    config: TileConfig
    mask: jax.Array | None = None

    def unpack(self) -> dict[str, np.ndarray]:
        """The plan's buffers as named numpy arrays (for tests and debugging)."""
        return self.kernel.unpack(self.buffer)


jax.tree_util.register_dataclass(PallasPlan, data_fields=["buffer", "mask"], meta_fields=["kernel", "config"])


@hash_once  # a key of _cached_layout's cache on every plan
@dataclasses.dataclass(frozen=True)
class PallasBackend:
    """Pallas backend object.

    Attributes:
      name: ``"pallas"``.
      num_sms: SMs of the target GPU, ``None`` for the device's
        (:func:`jaxinfer.backends.device.num_sms`); the grid is ``num_sms * config.ctas_per_sm``
        persistent CTAs.
      num_ctas: overrides that grid size when set.
      split_factor: split-KV plans may have up to ``split_factor * num_ctas`` tiles (also the
        partial-slot capacity); ``0`` disables split-KV.
      config: a fixed :class:`TileConfig`, or ``None`` for :func:`heuristic_config`.
      min_chunk: smallest KV chunk of a split (tokens).
      tile_startup: a work tile's fixed cost in key steps, by which the planner weighs fewer,
        longer chunks against more, shorter ones (``tile_startup`` of
        :func:`jaxinfer.plan.planner.plan_work`; ``0`` splits as finely as that shortens the
        estimated makespan).
      kv_major_grid: prefill-class plans (``config.block_m >= 64``) whose unsplit tiles fill the
        persistent grid run one tile per CTA instead, in (request, KV head)-major order, longest
        first within: CTAs the hardware runs together then share a few requests' KV in L2,
        where the persistent grid's cost order spreads them over every (request, KV head)
        (H100, prefill_causal: +10 %, benchmarks/decisions/pallas.md). Only with ``num_ctas``
        and ``max_work_tiles`` unset: the grid is the tile capacity, a per-batch shape.
    """

    name: str = "pallas"
    num_sms: int | None = None
    num_ctas: int | None = None
    split_factor: int = 4
    config: TileConfig | None = None
    min_chunk: int = 256
    tile_startup: int = 2
    kv_major_grid: bool = True

    capabilities = CAPABILITIES

    def unsupported(self, spec: BatchSpec) -> str | None:
        """Why this backend cannot serve ``spec`` (``None`` if it can)."""
        return CAPABILITIES.unsupported(spec)

    def device_unsupported(self) -> str | None:
        """``None``: the kernels run on a GPU and in interpret mode elsewhere."""
        return None

    @property
    def merge_states(self):
        """The Pallas merge kernel of attention states (:func:`jaxinfer.backends.pallas.merge.merge_states`)."""
        return merge.merge_states

    def tile_config(self, spec: BatchSpec, capacity: PlanCapacity) -> TileConfig:
        """The tile config of ``spec``: by the query lengths of
        :meth:`~jaxinfer.plan.batch.PlanCapacity.config_qo_len` (the batch's mean, or
        ``capacity.max_qo_len`` when that is fixed, or a fixed one for a deterministic capacity)
        and :meth:`~jaxinfer.plan.batch.PlanCapacity.config_median_qo_len` (its median request),
        and by the bytes of a KV element."""
        if self.config is not None:
            return self.config
        return _cached_heuristic_config(spec.head_dim, spec.page_size, spec.group_size, capacity.config_qo_len(spec),
                                        jnp.dtype(spec.kv_dtype).itemsize, capacity.config_median_qo_len(spec))

    def grid_size(self, cfg: TileConfig) -> int:
        """Persistent CTAs of the attention kernel for tile config ``cfg``."""
        if self.num_ctas is not None:
            return self.num_ctas
        return (self.num_sms if self.num_sms is not None else device.num_sms()) * cfg.ctas_per_sm

    def _kernel_spec(self, spec: BatchSpec, cfg: TileConfig, max_tiles: int, page_capacity: int, custom_mask: bool,
                     kv_major: bool = False, fixed_chunk: int = 0, slots: int = 0) -> tuple[KernelSpec, PlanArgs]:
        """The kernel spec and the planner's static arguments of a plan (cached per geometry)."""
        return _cached_layout(self, spec.paged, spec.page_size, spec.num_qo_heads, spec.num_kv_heads, spec.head_dim,
                              spec.variant, cfg, max_tiles, page_capacity, custom_mask, kv_major, fixed_chunk, slots)

    def _split_budget(self, cfg: TileConfig, max_tiles: int, slots: int = 0) -> int:
        """Partial slots of a plan: ``slots`` when given (a fixed chunk splits by the batch, not by
        the grid), else ``split_factor`` per CTA within the tile capacity."""
        if slots:
            return max(2, slots)
        return max(2, min(self.split_factor * self.grid_size(cfg), max_tiles))

    def _slot_capacity(self, slots: int, max_tiles: int, capacity: PlanCapacity) -> int:
        """Partial slots of a fixed-chunk plan with ``slots`` split tiles: every tile may be one
        under a fixed ``max_work_tiles`` (one shape for every batch), else the batch's rounded up."""
        return max_tiles if capacity.max_work_tiles is not None else next_pow2(max(2, slots))

    def _fixed_chunk(self, capacity: PlanCapacity) -> int:
        """The planner's ``fixed_chunk``: the capacity's split size (0 when unset, or when this
        backend never splits, which is batch invariant as it is)."""
        return (capacity.fixed_split_size or 0) if self.split_factor > 0 else 0

    def _plan_args(self, num_kv_heads: int, group_size: int, variant: AttentionVariant, cfg: TileConfig,
                   max_work_tiles: int, kv_major: bool = False, fixed_chunk: int = 0, slots: int = 0) -> PlanArgs:
        return PlanArgs(
            num_kv_heads=num_kv_heads,
            group_size=group_size,
            block_m=cfg.block_m,
            block_n=cfg.block_n,
            causal=variant.causal,
            window_left=variant.window_left,
            num_ctas=self.grid_size(cfg),
            split_budget=self._split_budget(cfg, max_work_tiles, slots),
            max_work_tiles=max_work_tiles,
            split_kv=self.split_factor > 0,
            min_chunk=self.min_chunk,
            kv_major=kv_major,
            fixed_chunk=fixed_chunk,
            tile_startup=self.tile_startup,
        )

    def _plan_kwargs(self, spec: BatchSpec, cfg: TileConfig, max_work_tiles: int, fixed_chunk: int = 0,
                     slots: int = 0) -> dict:
        """:func:`jaxinfer.plan.planner.plan_work`'s keyword arguments for ``spec`` (the persistent grid)."""
        return dataclasses.asdict(self._plan_args(spec.num_kv_heads, spec.group_size, spec.variant, cfg, max_work_tiles,
                                                  fixed_chunk=fixed_chunk, slots=slots))

    def _page_capacity(self, spec: BatchSpec, capacity: PlanCapacity) -> int:
        """Entries of the plan's ``kv_indices``: room for ``max_batch_size`` requests of
        ``max_kv_len`` keys when either is fixed (one shape for every batch that fits), else
        the batch's pages rounded up to a power of 2 (a skewed batch would otherwise copy
        ``B * longest`` page ids, most of them padding)."""
        if not spec.paged:
            return 1
        if capacity.max_batch_size is None and capacity.max_kv_len is None:
            return next_pow2(max(1, int(spec.kv_indptr[-1])))
        batch = capacity.resolve("max_batch_size", spec.batch_size)
        kv = capacity.resolve("max_kv_len", int(spec.kv_lens.max(initial=0)))
        return max(1, batch * -(-kv // spec.page_size))

    def _work_capacity(self, unsplit: int, cfg: TileConfig, capacity: PlanCapacity) -> int:
        """``max_work_tiles``: fixed, it caps the split; unset, it leaves room for a full split
        plan (``split_factor * num_ctas`` tiles) or the ``unsplit`` tiles, whichever is more."""
        wanted = unsplit if capacity.max_work_tiles is not None else max(unsplit, self.split_factor * self.grid_size(cfg))
        return capacity.resolve("max_work_tiles", wanted)

    def _grid_backend(self, unsplit: int, cfg: TileConfig, capacity: PlanCapacity) -> PallasBackend:
        """This backend, or for a ``kv_major_grid`` plan the one with a CTA per tile (no split;
        its plan is ``kv_major``, see :func:`jaxinfer.plan.planner.plan_work`)."""
        if (not self.kv_major_grid or self.num_ctas is not None or capacity.max_work_tiles is not None
                or capacity.deterministic or cfg.block_m < 64 or unsplit < self.grid_size(cfg)):
            return self
        return _kv_major_backend(self, next_pow2(unsplit))

    def plan(self, spec: BatchSpec, capacity: PlanCapacity) -> PallasPlan:
        """Plan ``spec`` on the host (the compiled planner) into static-capacity device buffers.

        The planner writes the work buffers and page ids straight into one packed int32 host
        buffer (layout of :class:`~jaxinfer.plan.layout.WorkLayout`), which goes to the
        device in one asynchronous copy: ``plan`` returns once the copy is enqueued, and the
        plan's ``buffer`` is ready when the copy lands (``jax.block_until_ready``; a jitted step
        that takes the plan waits for it on the device).

        Raises:
          ValueError: the batch exceeds a fixed field of ``capacity``.
        """
        cfg = self.tile_config(spec, capacity)
        qo_indptr, kv_indptr, kv_lens, kv_indices = spec.native_addresses
        batch = spec.batch_size
        fixed_chunk, slots = self._fixed_chunk(capacity), 0
        if fixed_chunk:
            # The tiles and slots of a fixed chunk grow with the batch: the capacity holds this batch's.
            _, counting = self._kernel_spec(spec, cfg, 0, 1, False, fixed_chunk=fixed_chunk)
            counts = count_work_at(counting, batch, qo_indptr, kv_lens)
            backend = self
            max_tiles = capacity.resolve("max_work_tiles", counts.num_tiles)
            slots = self._slot_capacity(counts.num_slots, max_tiles, capacity)
        else:
            unsplit = count_query_tiles_at(batch, qo_indptr, cfg.tokens_per_tile(spec.group_size)) * spec.num_kv_heads
            backend = self._grid_backend(unsplit, cfg, capacity)
            max_tiles = backend._work_capacity(unsplit, cfg, capacity)
        mask = _device_mask(spec.custom_mask)
        ks, args = backend._kernel_spec(spec, cfg, max_tiles, backend._page_capacity(spec, capacity), mask is not None,
                                        backend is not self, fixed_chunk=fixed_chunk, slots=slots)
        # A fresh host buffer per plan: the copy may read it after ``plan`` returns (see
        # _to_device), so it is never reused.
        host, address = _aligned_empty(ks.buffer_size)
        mask_offsets = spec.mask_indptr if mask is not None else None  # int64, alive for the call
        plan_packed_at(args, address, ks.buffer_size, batch, qo_indptr, kv_lens, kv_indptr,
                       None if mask_offsets is None else native.address(mask_offsets), kv_indices or None,
                       int(spec.kv_indptr[-1]) if spec.paged else 0)
        return filled(PallasPlan, buffer=to_device(host), kernel=ks, config=cfg, mask=mask)

    def plan_in_jit(self, spec: BatchSpec, capacity: PlanCapacity, qo_indptr, kv_indptr, kv_indices, kv_last_page_len) -> PallasPlan:
        """Plan inside ``jit`` from traced index arrays (``jax.pure_callback``; one host round trip).

        ``spec`` is a template batch giving the static geometry, variant and tile config; the
        traced arrays give this step's batch (``kv_indices`` padded to a static length). ``capacity``
        must fix ``max_work_tiles``; a batch needing more tiles fails in the callback at run time.

        Raises:
          ValueError: ``capacity.max_work_tiles`` is unset, or ``spec`` has a custom mask (its
            offsets are planned on the host only).
        """
        if capacity.max_work_tiles is None:
            raise ValueError("plan_in_jit needs capacity.max_work_tiles (a static shape)")
        if spec.custom_mask is not None:
            raise ValueError("plan_in_jit does not take a custom_mask; plan on the host with plan()")
        cfg = self.tile_config(spec, capacity)
        if spec.paged:
            n_pages = jnp.diff(kv_indptr)
            kv_lens = jnp.where(n_pages > 0, (n_pages - 1) * spec.page_size + kv_last_page_len, 0)
        else:
            kv_lens = jnp.diff(kv_indptr)
        fixed_chunk = self._fixed_chunk(capacity)
        slots = capacity.max_work_tiles if fixed_chunk else 0
        work, cta, mi, md = plan_work_in_jit(qo_indptr, kv_lens.astype(jnp.int32), kv_indptr[:-1],
                                             **self._plan_kwargs(spec, cfg, capacity.max_work_tiles, fixed_chunk, slots))
        pages = kv_indices if spec.paged else jnp.zeros((1,), jnp.int32)
        ks, _ = self._kernel_spec(spec, cfg, capacity.max_work_tiles, pages.shape[0], False, fixed_chunk=fixed_chunk,
                                  slots=slots)
        return PallasPlan(ks.pack(work, cta, mi, md, pages), ks, cfg)

    def run(self, plan: PallasPlan, q, k, v, *, kv_layout: str = "NHD", return_lse: bool = False, k_scale=None,
            v_scale=None, variant_params=None, sinks=None):
        """Attention of a plan (jit-compatible).

        Args:
          q: ``[nnz_q, Hq, D]`` bf16/fp16.
          k, v: paged caches (``kv_layout`` NHD ``[num_pages, page_size, Hkv, D]`` or HND
            ``[num_pages, Hkv, page_size, D]``) or ragged ``[nnz_kv, Hkv, D]``, in q's dtype or
            fp8 (widened on load).
          k_scale, v_scale: ``[Hkv]`` float32 or ``None`` (:mod:`jaxinfer.fp8`); with either,
            the kernel reads both (a missing one is 1).
          variant_params: the checked params of a ``takes_params`` variant
            (:func:`jaxinfer.variants.check_variant_params`), kernel inputs whose rows each
            tile loads for the callables; ``None`` otherwise.
          sinks: ``[Hq]`` float32 natural-log sink logits or ``None``; fused into the epilogue
            of final rows (the attention kernel's for unsplit tiles, the merge kernel's for
            split ones).

        Returns:
          ``(o [nnz_q, Hq, D] q.dtype, lse [nnz_q, Hq] float32 base 2 or None)``.

        Raises:
          ValueError: ``kv_layout`` is not NHD/HND, an array's shape or dtype disagrees with
            the plan (trace time), ``return_lse`` with ``use_softmax=False`` (no lse), or a
            ``[Hq, T]`` variant param with ``T`` not a power of 2.
        """
        scales = None
        if k_scale is not None or v_scale is not None:
            ones = jnp.ones((plan.kernel.num_kv_heads,), jnp.float32)
            scales = jnp.concatenate([ones if x is None else x for x in (k_scale, v_scale)])
        layout, params = (None, ()) if variant_params is None else merge.ParamLayout.of(variant_params)
        ks = dataclasses.replace(plan.kernel, kv_layout=kv_layout, kv_scales=scales is not None,
                                 sinks=sinks is not None, params=layout)
        _check_run_args(ks, q, k, v)
        if return_lse and not ks.use_softmax:
            raise ValueError("return_lse=True needs a softmax variant (use_softmax=False has no lse)")
        sinks_log2 = None if sinks is None else sinks.astype(jnp.float32) * LOG2E
        o, lse = attention(plan.buffer, q, k, v, plan.mask, scales, sinks_log2, params, ks=ks, cfg=plan.config)
        return o, (lse if return_lse else None)


# plan() is on the serving path (FlashInfer's runs in 105-390 us): the static parts of a plan,
# a few microseconds each, are built once per geometry.
_cached_heuristic_config = functools.lru_cache(maxsize=256)(heuristic_config)


@functools.lru_cache(maxsize=256)
def _cached_layout(backend: PallasBackend, paged: bool, page_size: int, num_qo_heads: int, num_kv_heads: int,
                   head_dim: int, v: AttentionVariant, cfg: TileConfig, max_tiles: int, page_capacity: int,
                   custom_mask: bool, kv_major: bool, fixed_chunk: int = 0, slots: int = 0) -> tuple[KernelSpec, PlanArgs]:
    split_budget = backend._split_budget(cfg, max_tiles, slots)
    ks = KernelSpec(
        paged=paged,
        kv_layout="NHD",
        page_size=page_size,
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        sm_scale=float(v.scale(head_dim)),
        causal=v.causal,
        window_left=v.window_left,
        logits_soft_cap=v.logits_soft_cap,
        num_ctas=backend.grid_size(cfg),
        num_slots=split_budget if slots else backend.split_factor * backend.grid_size(cfg),
        num_groups=split_budget // 2,
        max_tiles=max_tiles,
        page_capacity=page_capacity,
        pos_encoding_mode=v.pos_encoding_mode,
        rope_scale=float(v.rope_scale),
        rope_theta=float(v.rope_theta),
        custom_mask=custom_mask,
        use_softmax=v.use_softmax,
        callables=v if v.has_user_callables else None,
    )
    return ks, backend._plan_args(num_kv_heads, num_qo_heads // num_kv_heads, v, cfg, max_tiles, kv_major, fixed_chunk,
                                  slots)


@functools.lru_cache(maxsize=64)
def _kv_major_backend(backend: PallasBackend, num_ctas: int) -> PallasBackend:
    """``backend`` with a grid of ``num_ctas`` CTAs, one tile each (no split): made once per
    grid size, so that prefill plans skip ``dataclasses.replace`` (~2 us) and find it, hashed
    already, in :func:`_cached_layout`."""
    return dataclasses.replace(backend, num_ctas=num_ctas, split_factor=0, kv_major_grid=False)


def _aligned_empty(size: int, align: int = 64) -> tuple[np.ndarray, int]:
    """``np.empty(size, int32)`` starting on an ``align``-byte boundary (XLA's CPU client takes
    such a buffer without copying it; numpy's own alignment is 16 bytes), and its address."""
    raw = np.empty(size + align // 4, np.int32)
    address = native.address(raw)
    start = (-address % align) // 4
    return raw[start : start + size], address + 4 * start


def _device_mask(custom_mask: np.ndarray | None) -> jax.Array | None:
    """The spec's flat bool mask as int8 on the device, zero-padded to a power-of-2 length (few
    shapes, few compilations); ``None`` when absent or all True (a block-sparse plan whose blocks
    are fully visible then runs its steps without masks)."""
    if custom_mask is None or custom_mask.all():
        return None
    out = np.zeros(next_pow2(custom_mask.size), np.int8)
    out[: custom_mask.size] = custom_mask
    return to_device(out)


def _check_run_args(ks: KernelSpec, q, k, v) -> None:
    """Trace-time shape/dtype checks of ``run``'s arrays against the plan."""
    check_run_args(q, k, v, paged=ks.paged, kv_layout=ks.kv_layout, page_size=ks.page_size,
                   num_qo_heads=ks.num_qo_heads, num_kv_heads=ks.num_kv_heads, head_dim=ks.head_dim)
    reason = CAPABILITIES.dtype_unsupported(q.dtype, k.dtype)
    if reason is not None:
        raise ValueError(f"the pallas backend cannot run {reason}")


def get_backend(name: str = "pallas") -> PallasBackend:
    """The default Pallas backend (H100 CTA budget; one shared immutable object)."""
    if name != "pallas":
        raise ValueError(f"jaxinfer.backends.pallas.backend serves 'pallas', not {name!r}")
    return _DEFAULT


_DEFAULT = PallasBackend()
