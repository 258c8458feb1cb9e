"""Paged KV cache as a block-sparse-row (BSR) matrix: the device-side page API.

A page table is CSR over pages: request ``b`` owns pages
``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` and holds
``page_size * (num_pages_b - 1) + kv_last_page_len[b]`` tokens (0 for a request with no pages).
Token ``pos`` of request ``b`` lives in page ``kv_indices[kv_indptr[b] + pos // page_size]``,
slot ``pos % page_size`` (PagedAttention, Kwon et al. 2023; FlashInfer paper, arXiv 2501.01005,
sec. 3.1).

These device-side functions are ``jax.jit``-compatible and never read or write outside the cache
when given bad values; the host-side checks of a page table, before planning, are in
:mod:`jaxinfer.plan.checks`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.fp8 import check_scale_value, is_fp8, quantize, scale_array

KV_LAYOUTS = ("NHD", "HND")


@functools.partial(jax.jit, static_argnames="page_size")
def get_seq_lens(kv_indptr: jax.Array, kv_last_page_len: jax.Array, page_size: int) -> jax.Array:
    """Tokens per request of a page table, jit-compatible (FlashInfer's ``get_seq_lens``).

    Example::

        jaxinfer.get_seq_lens(jnp.array([0, 2, 3]), jnp.array([3, 16]), 16)   # [19, 16] int32

    Args:
      kv_indptr: ``[B+1]`` integer page row pointer.
      kv_last_page_len: ``[B]`` integer tokens in each request's last page.
      page_size: tokens per page (static).

    Returns:
      ``[B]`` int32: ``page_size * (num_pages_b - 1) + kv_last_page_len[b]``, or 0 for a request
      with no pages.
    """
    kv_indptr = jnp.asarray(kv_indptr, jnp.int32)
    num_pages = kv_indptr[1:] - kv_indptr[:-1]
    last = jnp.asarray(kv_last_page_len, jnp.int32)
    return jnp.where(num_pages > 0, (num_pages - 1) * page_size + last, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="nnz")
def get_batch_indices_positions(
    append_indptr: jax.Array, seq_lens: jax.Array, nnz: int
) -> tuple[jax.Array, jax.Array]:
    """Request and position of each appended token (FlashInfer's ``get_batch_indices_positions``).

    Row ``i`` with ``append_indptr[b] <= i < append_indptr[b+1]`` gets batch index ``b`` and
    position ``seq_lens[b] - (append_indptr[b+1] - append_indptr[b]) + (i - append_indptr[b])``:
    ``seq_lens`` are the lengths *after* the append, so the appended tokens are each request's
    last ones.

    Rows ``i >= append_indptr[-1]`` are padding (``nnz`` is static, so a jitted step can take
    batches of any total length up to ``nnz``). FlashInfer leaves them undefined; here they get
    batch index ``-1`` and position ``-1``, which :func:`append_paged_kv_cache` never writes.

    Example::

        seq_lens = jaxinfer.get_seq_lens(kv_page_indptr, kv_last_page_len, page_size)
        batch_indices, positions = jaxinfer.get_batch_indices_positions(append_indptr, seq_lens, nnz)

    Args:
      append_indptr: ``[B+1]`` integer row pointer of the appended tokens.
      seq_lens: ``[B]`` integer lengths after the append (e.g. :func:`get_seq_lens`).
      nnz: number of rows to produce (static), usually ``append_indptr[-1]`` or a capacity.

    Returns:
      ``(batch_indices [nnz] int32, positions [nnz] int32)``.
    """
    append_indptr = jnp.asarray(append_indptr, jnp.int32)
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    rows = jnp.arange(nnz, dtype=jnp.int32)
    if seq_lens.shape[0] == 0:
        return jnp.full_like(rows, -1), jnp.full_like(rows, -1)
    # Last b with append_indptr[b] <= row: skips requests that append nothing.
    batch = jnp.searchsorted(append_indptr, rows, side="right").astype(jnp.int32) - 1
    batch = jnp.clip(batch, 0, seq_lens.shape[0] - 1)
    valid = rows < append_indptr[-1]
    positions = seq_lens[batch] - (append_indptr[batch + 1] - rows)
    return jnp.where(valid, batch, -1), jnp.where(valid, positions, -1)


def unpack_paged_kv_cache(paged_kv_cache, kv_layout: str = "NHD") -> tuple[jax.Array, jax.Array]:
    """Split a paged KV cache into ``(k_cache, v_cache)``.

    Args:
      paged_kv_cache: a tuple ``(k_cache, v_cache)``, each ``[num_pages, page_size, Hkv, D]``
        (NHD) or ``[num_pages, Hkv, page_size, D]`` (HND), or a single array
        ``[num_pages, 2, page_size, Hkv, D]`` / ``[num_pages, 2, Hkv, page_size, D]``.
      kv_layout: ``"NHD"`` or ``"HND"``.

    Returns:
      ``(k_cache, v_cache)`` in ``kv_layout``.

    Raises:
      ValueError: on an unknown ``kv_layout``, or a ``paged_kv_cache`` of the wrong structure,
        rank, shape or dtype (k and v must agree).
    """
    check_kv_layout(kv_layout)
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError(
                f"paged_kv_cache must be a pair (k_cache, v_cache), got {len(paged_kv_cache)} arrays"
            )
        k_cache, v_cache = paged_kv_cache
        if k_cache.ndim != 4:
            raise ValueError(
                f"paged_kv_cache[0] (k_cache) must be 4-D ({_layout_dims(kv_layout)}), got shape {k_cache.shape}"
            )
        if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
            raise ValueError(
                "paged_kv_cache: k_cache and v_cache must agree in shape and dtype, got "
                f"{k_cache.dtype}{k_cache.shape} and {v_cache.dtype}{v_cache.shape}"
            )
        return k_cache, v_cache
    _check_single_cache(paged_kv_cache, kv_layout)
    return paged_kv_cache[:, 0], paged_kv_cache[:, 1]


def append_paged_kv_cache(
    append_key: jax.Array,
    append_value: jax.Array,
    batch_indices: jax.Array,
    positions: jax.Array,
    paged_kv_cache,
    kv_indices: jax.Array,
    kv_indptr: jax.Array,
    kv_last_page_len: jax.Array,
    kv_layout: str = "NHD",
    *,
    k_scale=None,
    v_scale=None,
):
    """Write appended keys and values into a paged KV cache (FlashInfer's ``append_paged_kv_cache``).

    Row ``i`` goes to page ``kv_indices[kv_indptr[b] + positions[i] // page_size]``, slot
    ``positions[i] % page_size``, with ``b = batch_indices[i]``. The page table describes the cache
    *after* the append (as in FlashInfer). A row writes nothing when it is padding or invalid, so
    that it never lands in another request's pages, whatever values a jitted step passes:

    - ``b`` outside ``[0, B)`` or ``positions[i] < 0``;
    - page ``j = positions[i] // page_size`` not one of the request's own: ``j >= num_pages_b =
      kv_indptr[b+1] - kv_indptr[b]`` (a non-monotone ``kv_indptr`` owns nothing), or the entry
      ``kv_indptr[b] + j`` outside ``[0, len(kv_indices))`` (no other entry of ``kv_indices`` is
      ever read: neither the next request's nor padding entries past ``kv_indptr[B]``);
    - in the last page (``j = num_pages_b - 1``), slot ``positions[i] % page_size`` not below
      ``kv_last_page_len[b]`` clamped to ``1..page_size``: together, ``positions[i] < seq_len_b``;
    - a page id outside ``[0, num_pages)``.

    Two valid rows aimed at one slot leave either value.

    Quantizing writes (:mod:`jaxinfer.fp8`): into an fp8 cache (``float8_e4m3fn``/``float8_e5m2``)
    the rows may come in any float dtype and are written as ``K / k_scale`` and ``V / v_scale``
    computed in float32, saturated to the cache dtype's finite range (``±448`` for e4m3, ``±57344``
    for e5m2; infinities too; NaN stays NaN) and rounded to nearest even; attention then reads the
    cache with the same ``k_scale``/``v_scale``. A scale into a 16-bit cache is honoured the same
    way (the rows in the cache's dtype). Without scales, rows already in the cache's dtype are
    written unchanged.

    RETURNS the updated cache; ``paged_kv_cache`` itself is NOT modified (JAX arrays are
    immutable). Where FlashInfer code calls ``append_paged_kv_cache(...)`` for its effect, write
    ``paged_kv_cache = append_paged_kv_cache(...)``. The whole update is one scatter per cache
    array, so under ``jax.jit(..., donate_argnums=...)`` donating ``paged_kv_cache`` updates its
    buffer in place.

    Example (FlashInfer's documented example, imports and ``torch`` changed)::

        import jax.numpy as jnp, jaxinfer
        nnz_kv, num_kv_heads, head_dim, max_num_pages, page_size = 100, 32, 128, 1000, 16
        k_append = jnp.ones((nnz_kv, num_kv_heads, head_dim), jnp.float16)
        v_append = jnp.ones((nnz_kv, num_kv_heads, head_dim), jnp.float16)
        kv_append_length = jnp.array([45, 8, 25, 22], jnp.int32)
        kv_append_indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(kv_append_length)])
        num_pages_per_req = jnp.array([3, 1, 2, 2], jnp.int32)
        kv_page_indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(num_pages_per_req)])
        kv_page_indices = jnp.arange(int(kv_page_indptr[-1]), dtype=jnp.int32)
        kv_last_page_len = jnp.array([13, 8, 9, 6], jnp.int32)
        paged_kv_cache = jnp.zeros((max_num_pages, 2, page_size, num_kv_heads, head_dim), jnp.float16)
        batch_indices, positions = jaxinfer.get_batch_indices_positions(
            kv_append_indptr, jaxinfer.get_seq_lens(kv_page_indptr, kv_last_page_len, page_size), nnz_kv)
        paged_kv_cache = jaxinfer.append_paged_kv_cache(
            k_append, v_append, batch_indices, positions, paged_kv_cache, kv_page_indices,
            kv_page_indptr, kv_last_page_len)

    Args:
      append_key: ``[nnz, Hkv, D]`` in the cache's dtype, or any float dtype for an fp8 cache.
      append_value: ``[nnz, Hkv, D]``, the dtype of ``append_key``.
      batch_indices: ``[nnz]`` integer request of each row (:func:`get_batch_indices_positions`).
      positions: ``[nnz]`` integer token position of each row within its request.
      paged_kv_cache: ``(k_cache, v_cache)`` or a single array, see :func:`unpack_paged_kv_cache`.
      kv_indices: ``[nnz_pages]`` integer page ids.
      kv_indptr: ``[B+1]`` integer page row pointer.
      kv_last_page_len: ``[B]`` integer tokens in each request's last page (after the append).
      kv_layout: ``"NHD"`` or ``"HND"`` (static).
      k_scale, v_scale: optional quantization scales: a Python float or a float array of shape
        ``()`` or ``[Hkv]`` (per KV head), traced or not (new values never recompile).

    Returns:
      The updated cache, of the same structure, shapes and dtype as ``paged_kv_cache``.

    Raises:
      ValueError: at trace time, naming the argument whose rank, shape or dtype is wrong; or a
        scale given as a Python/numpy value that is not finite and > 0.
    """
    check_scale_value("k_scale", k_scale)
    check_scale_value("v_scale", v_scale)
    return _append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices,
                                  kv_indptr, kv_last_page_len, k_scale, v_scale, kv_layout=kv_layout)


@functools.partial(jax.jit, static_argnames="kv_layout")
def _append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
                           kv_last_page_len, k_scale, v_scale, *, kv_layout: str):
    k_cache, _ = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    single = not isinstance(paged_kv_cache, (tuple, list))
    page_axis_size = k_cache.shape[0]
    page_size, num_kv_heads, head_dim = _cache_dims(k_cache.shape, kv_layout)
    _check_append_args(
        append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len,
        want=(num_kv_heads, head_dim), dtype=k_cache.dtype,
    )
    k_scale = scale_array("k_scale", k_scale, num_kv_heads)
    v_scale = scale_array("v_scale", v_scale, num_kv_heads)
    if kv_indices.shape[0] == 0 or kv_last_page_len.shape[0] == 0:
        return paged_kv_cache  # no page to write to
    if append_key.dtype != k_cache.dtype or k_scale is not None or v_scale is not None:
        append_key = quantize(append_key, k_scale, k_cache.dtype)
        append_value = quantize(append_value, v_scale, k_cache.dtype)
    page, slot = _page_and_slot(
        batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size, page_axis_size
    )
    # Advanced indices on the page and slot axes: the indexed view is [nnz, rest...] in every
    # layout ([nnz, Hkv, D] per cache, [nnz, 2, Hkv, D] for the single array).
    slot_axis = (1 if kv_layout == "NHD" else 2) + single
    index = (page,) + (slice(None),) * (slot_axis - 1) + (slot,)

    def scatter(cache, rows):
        return cache.at[index].set(rows, mode="drop")

    if single:
        return scatter(paged_kv_cache, jnp.stack([append_key, append_value], axis=1))
    return type(paged_kv_cache)((scatter(paged_kv_cache[0], append_key), scatter(paged_kv_cache[1], append_value)))


def _page_and_slot(batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size, num_pages):
    """``[nnz]`` page id and slot of each row; invalid rows get page ``num_pages`` (dropped).

    A row is valid only when its page is one of its own request's (see
    :func:`append_paged_kv_cache`); every bound is checked with comparisons that cannot overflow
    int32, whatever garbage ``kv_indptr`` or ``kv_last_page_len`` hold.
    """
    batch_size = kv_last_page_len.shape[0]
    n_entries = kv_indices.shape[0]
    kv_indptr = kv_indptr.astype(jnp.int32)
    kv_indices = kv_indices.astype(jnp.int32)
    b = batch_indices.astype(jnp.int32)
    pos = positions.astype(jnp.int32)
    valid = (b >= 0) & (b < batch_size) & (pos >= 0)
    b_safe = jnp.where(valid, b, 0)
    pos_safe = jnp.where(valid, pos, 0)
    start, end = kv_indptr[b_safe], kv_indptr[b_safe + 1]
    page_of_req, slot = pos_safe // page_size, pos_safe % page_size
    # Entry start + j of kv_indices: in range and inside [start, end). start <= n - 1 - j first,
    # so that start + j cannot overflow (n - 1 - j >= -2**31 for j >= 0).
    valid &= start <= (n_entries - 1) - page_of_req
    flat = jnp.where(valid, start + page_of_req, 0)
    valid &= (flat >= 0) & (flat < end)
    # The last page holds kv_last_page_len tokens, read as 1..page_size (0 or garbage for a
    # request with pages would otherwise let positions past its length through).
    last = jnp.clip(kv_last_page_len.astype(jnp.int32)[b_safe], 1, page_size)
    valid &= (flat != end - 1) | (slot < last)
    page = jnp.take(kv_indices, jnp.where(valid, flat, 0), mode="clip")
    valid &= (page >= 0) & (page < num_pages)
    # scatter's mode="drop" drops an update only for a positive out-of-bounds index.
    return jnp.where(valid, page, num_pages), jnp.where(valid, slot, 0)


def check_kv_layout(kv_layout: str) -> str:
    """``kv_layout`` itself.

    Raises:
      ValueError: not ``"NHD"`` or ``"HND"``.
    """
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    return kv_layout


def _layout_dims(kv_layout: str) -> str:
    return "num_pages, page_size, Hkv, D" if kv_layout == "NHD" else "num_pages, Hkv, page_size, D"


def _cache_dims(shape, kv_layout: str) -> tuple[int, int, int]:
    """``(page_size, Hkv, D)`` of a 4-D cache array of ``kv_layout``."""
    _, a, b, d = shape
    return (a, b, d) if kv_layout == "NHD" else (b, a, d)


def _check_single_cache(cache, kv_layout: str) -> None:
    shape = getattr(cache, "shape", None)
    if shape is None or len(shape) != 5 or shape[1] != 2:
        dims = _layout_dims(kv_layout).replace("num_pages, ", "num_pages, 2, ")
        raise ValueError(
            f"paged_kv_cache must be a pair (k_cache, v_cache) or one array [{dims}], got "
            f"{type(cache).__name__} of shape {shape}"
        )


def check_append_rows_dtype(name: str, x, dtype) -> None:
    """Rows appended to a cache of ``dtype`` must have it, or be floats quantized into an fp8 one."""
    if is_fp8(dtype) and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array to quantize into the {dtype} cache, got {x.dtype}")
    if not is_fp8(dtype) and x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but the cache holds {dtype}")


def check_append_index_args(nnz: int, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len) -> None:
    """Trace-time checks of an append's ``nnz`` rows' index arrays and the page table they go
    through (1-D integers of matching lengths), naming the argument."""
    batch_size = kv_last_page_len.shape[0] if kv_last_page_len.ndim == 1 else None
    for name, x, n in (
        ("batch_indices", batch_indices, nnz),
        ("positions", positions, nnz),
        ("kv_indices", kv_indices, None),
        ("kv_indptr", kv_indptr, None if batch_size is None else batch_size + 1),
        ("kv_last_page_len", kv_last_page_len, batch_size),
    ):
        if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer) or (n is not None and x.shape[0] != n):
            size = "" if n is None else f" of length {n}"
            raise ValueError(f"{name} must be a 1-D integer array{size}, got {x.dtype}{tuple(x.shape)}")


def _check_append_args(
    append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, *, want, dtype
) -> None:
    """Trace-time shape and dtype checks of :func:`append_paged_kv_cache`'s arguments."""
    for name, x in (("append_key", append_key), ("append_value", append_value)):
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{name} must be [nnz, {want[0]}, {want[1]}] to match the cache, got {tuple(x.shape)}")
        check_append_rows_dtype(name, x, dtype)
    if append_value.dtype != append_key.dtype:
        raise ValueError(f"append_value has dtype {append_value.dtype} but append_key has {append_key.dtype}")
    nnz = append_key.shape[0]
    if append_value.shape[0] != nnz:
        raise ValueError(f"append_value has {append_value.shape[0]} rows but append_key has {nnz}")
    check_append_index_args(nnz, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len)
