"""``jax.ffi.ffi_call`` wrappers of jaxinfer's CUDA kernels (``jaxinfer/csrc/``), registered lazily.

The handler library is built on first use (:mod:`jaxinfer.backends.ffi.build`) for the arch of the local
GPU and registered with ``jax.ffi.register_ffi_target(..., platform="CUDA")``. Without a GPU
nothing is built or registered, and the wrappers still trace and lower (for the ``cuda``
platform through ``jax.export``), which is how CI checks the wiring.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.backends import device
from jaxinfer.backends.ffi import build
from jaxinfer.backends.vma import varying_like

FA2_TARGET = "jaxinfer_fa2_forward"
FA3_TARGET = "jaxinfer_fa3_forward"
MLA_TARGET = "jaxinfer_mla_forward"
# Custom-call target and handler symbol of each kernel family (jaxinfer/csrc/<kernel>_ffi.cu).
TARGETS = {"fa2": FA2_TARGET, "fa3": FA3_TARGET, "mla": MLA_TARGET}
SYMBOLS = {"fa2": "JaxinferFa2Forward", "fa3": "JaxinferFa3Forward", "mla": "JaxinferMlaForward"}
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


_REGISTERED: dict[str, str | Exception] = {}


def ensure_registered(kernel: str = "fa2") -> str:
    """Build (cached) and register ``kernel``'s handler for the local GPU; returns the target name.

    A failure is remembered, so that later calls (``unsupported`` of ``"auto"``) do not rebuild.

    Raises:
      build.BuildError: nvcc or CUTLASS missing, or the build failed.
      RuntimeError: no GPU of a supported arch (fa3: sm_90 only).
    """
    if kernel not in _REGISTERED:
        try:
            cc = device.gpu_arch()
            if cc is None or f"sm_{cc}" not in build.ARCHS:
                raise RuntimeError(f"jaxinfer's {kernel} kernels need an NVIDIA GPU of arch {build.ARCHS}, got {cc}")
            try:
                arch = build.kernel_arch(kernel, cc)
            except ValueError as e:
                raise RuntimeError(str(e)) from None
            lib = ctypes.cdll.LoadLibrary(str(build.build(kernel, arch, defines=build.env_defines(kernel))))
            target = TARGETS[kernel]
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, SYMBOLS[kernel])), platform="CUDA")
            _REGISTERED[kernel] = target
        except (build.BuildError, RuntimeError, OSError) as e:
            _REGISTERED[kernel] = e
    result = _REGISTERED[kernel]
    if isinstance(result, Exception):
        raise result
    return result


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    qo_indptr: jax.Array,
    kv_indptr: jax.Array,
    kv_indices: jax.Array,
    kv_lens: jax.Array,
    tile_batch: jax.Array,
    tile_qstart: jax.Array,
    *,
    causal: bool,
    window_left: int,
    logits_soft_cap: float | None,
    sm_scale: float,
    page_size: int,
    paged: bool,
    kv_layout: str = "NHD",
    kernel: str = "fa2",
    sinks_log2: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """FlashAttention forward over a planned ragged batch: FlashAttention-2 (Dao 2023, arXiv
    2307.08691; ``kernel="fa2"``, sm80+) or FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608;
    ``kernel="fa3"``, sm90a).

    Args:
      q: ``[nnz_q, Hq, D]`` bfloat16/float16, D in 64/128/256.
      k, v: ragged ``[nnz_kv, Hkv, D]`` (``paged=False``) or paged caches ``[P, page_size, Hkv, D]``
        (NHD) / ``[P, Hkv, page_size, D]`` (HND), q's dtype.
      qo_indptr, kv_indptr: ``[B+1]`` int32 (kv_indptr over pages when paged, tokens otherwise).
      kv_indices: ``[nnz_pages]`` int32 (any ``[>=1]`` array when ragged).
      kv_lens: ``[B]`` int32 keys per request.
      tile_batch, tile_qstart: ``[T]`` int32 query tiles (request, first row); ``-1`` = padding.
      causal, window_left, logits_soft_cap, sm_scale: the variant (shared/DESIGN.md sec. 2).
      page_size: tokens per page (ignored when ragged). kv_layout: ``"NHD"`` or ``"HND"``.
      kernel: ``"fa2"`` or ``"fa3"`` (the query tiles must be planned for its tile height).
      sinks_log2: ``[Hq]`` float32 attention sinks in base 2 (the natural-log sinks times
        ``log2(e)``) or ``None``. The kernels' epilogues join each head's sink to its rows'
        softmax denominator (``o = sum_j 2^{x_j} v_j / (sum_j 2^{x_j} + 2^{s_h})``, the lse
        includes it; the form of :func:`jaxinfer.variants.apply_sink`): the kernels write final
        rows, so each row counts it once. Without sinks the call passes a 1-element dummy and
        ``has_sinks=False`` (the custom call takes the operand in every call).

    Returns:
      ``(o [nnz_q, Hq, D] in q.dtype, lse [nnz_q, Hq] float32 base 2)``; a row with no visible
      key gets ``o = 0`` and ``lse = -inf`` (with sinks: ``lse = sinks_log2[h]``); rows past
      ``qo_indptr[B]`` (no request's) get ``o = 0``, ``lse = -inf``.

    Raises:
      ValueError: shape, dtype or option mismatch (checked at trace time).
    """
    _check(q.ndim == 3 and q.shape[2] in HEAD_DIMS, f"q must be [nnz_q, Hq, D] with D in {HEAD_DIMS}, got {q.shape}")
    _check(jnp.dtype(q.dtype) in DTYPES, f"q must be bfloat16 or float16, got {q.dtype}")
    _check(k.shape == v.shape and k.dtype == v.dtype == q.dtype, f"k, v must match each other and q's dtype {q.dtype}, got {k.shape}{k.dtype}, {v.shape}{v.dtype}")
    _check(kv_layout in ("NHD", "HND"), f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    _check(kernel in ("fa2", "fa3"), f"kernel must be 'fa2' or 'fa3', got {kernel!r}")
    head_dim, hq = q.shape[2], q.shape[1]
    if paged:
        _check(k.ndim == 4, f"paged k must be [P, page_size, Hkv, D] or [P, Hkv, page_size, D], got {k.shape}")
        hkv, ps = (k.shape[2], k.shape[1]) if kv_layout == "NHD" else (k.shape[1], k.shape[2])
        _check(ps == page_size, f"the cache's page dimension {ps} != page_size {page_size} ({kv_layout})")
    else:
        _check(k.ndim == 3, f"ragged k must be [nnz_kv, Hkv, D], got {k.shape}")
        hkv = k.shape[1]
    _check(k.shape[-1] == head_dim and hq % hkv == 0, f"k head geometry {k.shape} does not match q {q.shape}")
    for name, a in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                    ("kv_lens", kv_lens), ("tile_batch", tile_batch), ("tile_qstart", tile_qstart)):
        _check(a.ndim == 1 and a.dtype == jnp.int32, f"{name} must be a 1-D int32 array, got {a.shape}{a.dtype}")
    _check(qo_indptr.shape == kv_indptr.shape and qo_indptr.shape[0] == kv_lens.shape[0] + 1,
           f"qo_indptr {qo_indptr.shape}, kv_indptr {kv_indptr.shape} must be [B+1] for kv_lens {kv_lens.shape}")
    _check(tile_batch.shape == tile_qstart.shape, "tile_batch and tile_qstart must have one shape")
    has_sinks = sinks_log2 is not None
    if has_sinks:
        _check(sinks_log2.shape == (hq,) and sinks_log2.dtype == jnp.float32,
               f"sinks_log2 must be float32 [Hq={hq}], got {sinks_log2.shape}{sinks_log2.dtype}")
    else:
        sinks_log2 = jnp.zeros((1,), jnp.float32)  # never read (has_sinks=False)
    if device.gpu_arch() is not None:
        ensure_registered(kernel)
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
    if kernel == "fa3":  # the persistent grid's work counter (scratch, zeroed by the handler)
        results += (jax.ShapeDtypeStruct((1,), jnp.int32),)
    results = varying_like(results, q, k, v, qo_indptr, kv_indptr, kv_indices, kv_lens, tile_batch, tile_qstart,
                           sinks_log2)
    call = jax.ffi.ffi_call(
        TARGETS[kernel],
        results,
        # Each batch element is its own planned batch: run the handler once per element.
        vmap_method="sequential",
    )
    o, lse, *_ = call(
        q, k, v, qo_indptr, kv_indptr, kv_indices, kv_lens, tile_batch, tile_qstart, sinks_log2,
        causal=bool(causal),
        window_left=np.int32(window_left),
        logits_soft_cap=np.float32(logits_soft_cap or 0.0),
        sm_scale=np.float32(sm_scale),
        page_size=np.int32(page_size if paged else 1),
        paged=bool(paged),
        kv_layout_hnd=kv_layout == "HND",
        has_sinks=has_sinks,
    )
    return o, lse


fa2_forward = functools.partial(flash_forward, kernel="fa2")
fa3_forward = functools.partial(flash_forward, kernel="fa3")


# The latent and RoPE widths the MLA kernel is built for (jaxinfer/csrc/mla/kernel.cuh: DeepSeek-V2/V3,
# Kimi-K2), and the query rows of its work tiles.
MLA_DIMS = (512, 64)
MLA_BLOCK_M = 64


def mla_unsupported(head_dim_ckv: int, head_dim_kpe: int, q_dtype, kv_dtype) -> str | None:
    """Why the sm90a MLA kernel cannot serve these dims and dtypes here (``None`` if it can); never
    raises. It is built for ``Dc = 512``, ``Dp = 64`` and a 16-bit latent cache of q's dtype (an fp8
    cache goes to the Pallas kernel, which widens it on load), and runs on sm_90 GPUs; on one, the
    first call builds the library (cached on disk) so that a failing build is the reason."""
    if (head_dim_ckv, head_dim_kpe) != MLA_DIMS:
        return (f"the fa3 MLA kernel is built for head_dim_ckv = {MLA_DIMS[0]}, head_dim_kpe = {MLA_DIMS[1]} "
                f"(DeepSeek-V2/V3, Kimi-K2), got {head_dim_ckv}, {head_dim_kpe}")
    if jnp.dtype(q_dtype) not in DTYPES or jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return (f"the fa3 MLA kernel takes bfloat16 or float16 queries and a latent cache of q's dtype, got "
                f"{jnp.dtype(q_dtype).name} and {jnp.dtype(kv_dtype).name}; backend 'pallas' serves fp8 caches")
    cc = device.gpu_arch()
    if cc is None:
        return "the fa3 MLA kernel needs an NVIDIA GPU (sm_90), and this machine has none"
    try:
        ensure_registered("mla")  # also declines a GPU other than sm_90 (build.kernel_arch)
    except Exception as e:  # noqa: BLE001 - any arch, build or load failure is a reason, never an error here
        return f"the fa3 MLA kernel is unavailable: {e}"
    return None


def mla_forward(plan_buffer: jax.Array, q_nope: jax.Array, q_pe: jax.Array, ckv_cache: jax.Array,
                kpe_cache: jax.Array, *, num_ctas: int, off_cta: int, off_kv_indices: int, group_size: int,
                num_slots: int, causal: bool, sm_scale: float):
    """The sm90a MLA kernel (``jaxinfer/csrc/mla/``) over the work tiles of a Pallas MLA plan
    (:func:`jaxinfer.backends.pallas.mla.plan`); the split-KV partial rows are left for the merge.

    Multi-head latent attention in the absorbed form (DeepSeek-V2, arXiv 2405.04434, appendix C):
    ``logits = (q_nope . ckv + q_pe . kpe) * sm_scale``, ``o = softmax(logits) . ckv``, with two
    consumer warpgroups splitting the 512 output columns over one P (FlashMLA's layout).

    Args:
      plan_buffer: ``[buffer_size]`` int32, the plan's packed buffers (WorkLayout).
      q_nope: ``[nnz_q, H, 512]`` bfloat16/float16; q_pe: ``[nnz_q, H, 64]``.
      ckv_cache: ``[P, page_size, 512]``; kpe_cache: ``[P, page_size, 64]``; q's dtype, ``P >= 1``.
      num_ctas, off_cta, off_kv_indices: the plan's CTA count and buffer offsets.
      group_size: query heads of one query token in a tile (a tile's 64 rows are ``64 //
        group_size`` tokens of ``group_size`` heads); num_slots: partial slots (0: no split);
        causal, sm_scale: the variant.

    Returns:
      ``(o [nnz_q, H, 512] q.dtype, lse [nnz_q, H] float32 base 2, po [max(num_slots, 1) * 64, 512],
      plse [max(num_slots, 1) * 64] float32)``: final rows written, rows no tile covers ``(0, -inf)``,
      partial rows of split tiles in ``po``/``plse``.

    Raises:
      ValueError: shapes or dtypes the kernel is not built for (checked at trace time).
    """
    nnz_q, h = q_nope.shape[:2]
    _check(q_nope.ndim == 3 and q_nope.shape[2] == MLA_DIMS[0] and q_pe.shape == (nnz_q, h, MLA_DIMS[1]),
           f"q_nope, q_pe must be [nnz_q, H, {MLA_DIMS[0]}] and [nnz_q, H, {MLA_DIMS[1]}], got {q_nope.shape}, "
           f"{q_pe.shape}")
    _check(jnp.dtype(q_nope.dtype) in DTYPES and q_pe.dtype == ckv_cache.dtype == kpe_cache.dtype == q_nope.dtype,
           f"q_nope, q_pe, ckv_cache, kpe_cache must share one of {DTYPES}, got {q_nope.dtype}, {q_pe.dtype}, "
           f"{ckv_cache.dtype}, {kpe_cache.dtype}")
    _check(ckv_cache.ndim == 3 and ckv_cache.shape[2] == MLA_DIMS[0] and ckv_cache.shape[0] >= 1
           and kpe_cache.shape == (*ckv_cache.shape[:2], MLA_DIMS[1]),
           f"ckv_cache, kpe_cache must be [P >= 1, page_size, {MLA_DIMS[0]}] and [P, page_size, {MLA_DIMS[1]}], "
           f"got {ckv_cache.shape}, {kpe_cache.shape}")
    _check(plan_buffer.ndim == 1 and plan_buffer.dtype == jnp.int32, "plan_buffer must be 1-D int32")
    if device.gpu_arch() is not None:
        ensure_registered("mla")
    slots = max(num_slots, 1) * MLA_BLOCK_M
    results = (jax.ShapeDtypeStruct(q_nope.shape, q_nope.dtype), jax.ShapeDtypeStruct((nnz_q, h), jnp.float32),
               jax.ShapeDtypeStruct((slots, MLA_DIMS[0]), jnp.float32), jax.ShapeDtypeStruct((slots,), jnp.float32))
    results = varying_like(results, plan_buffer, q_nope, q_pe, ckv_cache, kpe_cache)
    call = jax.ffi.ffi_call(MLA_TARGET, results, vmap_method="sequential")
    return call(plan_buffer, q_nope, q_pe, ckv_cache, kpe_cache, num_ctas=np.int32(num_ctas),
                off_cta=np.int32(off_cta), off_kv_indices=np.int32(off_kv_indices), group_size=np.int32(group_size),
                page_size=np.int32(ckv_cache.shape[1]), causal=bool(causal), sm_scale=np.float32(sm_scale))
