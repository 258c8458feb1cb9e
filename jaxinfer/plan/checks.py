"""Host-side checks of a batch before planning: row pointers and BSR page tables (numpy, with one
native pass of ``jaxinfer/csrc/planner.cc`` for the serving path's integer arrays,
:func:`checked_batch`).

A page table is CSR over pages: request ``b`` owns pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``
and holds ``page_size * (num_pages_b - 1) + kv_last_page_len[b]`` tokens (0 for a request with no
pages); see :mod:`jaxinfer.page` for the device side.
"""

from __future__ import annotations

import ctypes
import functools
import operator
from collections.abc import Mapping

import numpy as np

from jaxinfer.plan import native

_INT32_MAX = int(np.iinfo(np.int32).max)
_INT32_MIN = int(np.iinfo(np.int32).min)

# The argument names of a page table in messages; a front door with FlashInfer's other names
# (the decode wrapper's ``indptr``, ``indices``, ``last_page_len``) passes its own.
PAGE_TABLE_NAMES = {"kv_indptr": "kv_indptr", "kv_indices": "kv_indices", "kv_last_page_len": "kv_last_page_len"}


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = _INT32_MAX) -> int:
    """A host integer argument (a count, a size, a length) as a Python ``int``.

    Accepts Python and numpy integers (and 0-d integer arrays); rejects bools, floats (even
    integral ones: ``2.0`` is not a head count), NaN and anything else.

    Args:
      name: argument name used in error messages.
      value: the argument.
      minimum, maximum: inclusive bounds (``None``: unbounded); ``maximum`` defaults to the int32
        limit, as every size ends up in an int32 buffer.

    Raises:
      ValueError: naming ``name``: not an integer, or out of bounds.
    """
    if type(value) is not int:
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be an integer, got the bool {value!r}")
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"in {minimum}..{maximum}" if minimum is not None and maximum is not None else (
            f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name} must be an integer {bounds}, got {value}")
    return value


def _check_int32_range(name: str, arr: np.ndarray) -> None:
    """``arr`` (integer dtype) fits int32, checked before any int32 cast (which would wrap)."""
    if arr.size and arr.dtype.itemsize >= 4 and arr.dtype != np.int32 and (
        arr.max() > _INT32_MAX or arr.min() < _INT32_MIN
    ):  # fmt: skip
        raise ValueError(
            f"{name} must fit int32 ({_INT32_MIN}..{_INT32_MAX}), got values in {arr.min()}..{arr.max()}"
        )


def check_indptr(name: str, indptr, *, batch_size: int | None = None) -> np.ndarray:
    """Validate a CSR row pointer on the host.

    Args:
      name: argument name used in error messages.
      indptr: ``[B+1]`` integer array-like.
      batch_size: expected ``B`` when known.

    Returns:
      ``indptr`` as an int32 numpy array.

    Raises:
      ValueError: not 1-D, empty, non-integer, ``indptr[0] != 0``, decreasing, over int32, or
        of the wrong length.
    """
    arr = np.asarray(indptr)
    fast = _checked_indptr(arr, batch_size)
    if fast is not None:
        return fast
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a 1-D array of length batch_size + 1, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if batch_size is not None and arr.size != batch_size + 1:
        raise ValueError(f"{name} must have length batch_size + 1 = {batch_size + 1}, got {arr.size}")
    if arr[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {arr[0]}")
    if (arr[1:] < arr[:-1]).any():
        raise ValueError(f"{name} must be non-decreasing (sorted), got {arr.tolist()[:16]}...")
    if arr[-1] > _INT32_MAX:
        raise ValueError(f"{name} exceeds the int32 range")
    return arr.astype(np.int32, copy=False)


@functools.cache
def _native_lib():
    """The host library, or ``None`` where it cannot be built or loaded (no C++ compiler, no
    writable directory, a library that does not load): the checks then stay in numpy, with one
    warning, so the backends that need no native planner never fail on the build cache."""
    try:
        return native.load()
    except Exception as e:  # noqa: BLE001 - any failure here only costs the fast path
        import warnings

        warnings.warn(f"jaxinfer's native batch checks are unavailable, checking in numpy instead: {e}",
                      RuntimeWarning, stacklevel=2)
        return None


def _checked_indptr(arr: np.ndarray, batch_size: int | None) -> np.ndarray | None:
    """The native pass of :func:`check_indptr` for a C-contiguous int32/int64 row pointer of the
    right length: the int32 row pointer when valid, ``None`` when the numpy checks must run."""
    lib = _native_lib()
    if lib is None or arr.ndim != 1 or not arr.size or not arr.flags.c_contiguous or (
        batch_size is not None and arr.size != batch_size + 1
    ):
        return None
    if arr.dtype == np.int32:
        return arr if lib.jaxinfer_check_indptr_i32(native.address(arr), arr.size, None) else None
    if arr.dtype == np.int64:
        out = np.empty(arr.size, np.int32)
        return out if lib.jaxinfer_check_indptr_i64(native.address(arr), arr.size, native.address(out)) else None
    return None


def check_page_table(
    kv_indptr, kv_indices, kv_last_page_len, page_size: int, num_pages: int | None = None,
    *, names: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a BSR page table on the host.

    Args:
      kv_indptr: ``[B+1]`` page row pointer.
      kv_indices: ``[nnz_pages]`` page ids, ``nnz_pages >= kv_indptr[-1]``, all within int32.
      kv_last_page_len: ``[B]`` tokens in each request's last page: ``1..page_size``, or ``0``
        for a request with no pages.
      page_size: tokens per page, ``>= 1``.
      num_pages: pages in the cache when known; page ids must lie in ``[0, num_pages)``.
      names: the caller's names of the three arrays in messages, keyed by the names above
        (default: :data:`PAGE_TABLE_NAMES`).

    Returns:
      ``(kv_indptr, kv_indices, kv_last_page_len)`` as int32 numpy arrays.

    Raises:
      ValueError: naming the argument and the rule it broke.
    """
    n = PAGE_TABLE_NAMES if names is None else {**PAGE_TABLE_NAMES, **names}
    n_indptr, n_indices, n_last = n["kv_indptr"], n["kv_indices"], n["kv_last_page_len"]
    page_size = check_int("page_size", page_size, minimum=1)
    last = np.asarray(kv_last_page_len)
    if last.ndim != 1:
        raise ValueError(f"{n_last} must be 1-D [batch_size], got shape {last.shape}")
    if last.size and last.dtype.kind not in "iu":
        raise ValueError(f"{n_last} must hold integers, got dtype {last.dtype}")
    indptr = check_indptr(n_indptr, kv_indptr)
    if last.size != indptr.size - 1:
        raise ValueError(
            f"{n_last} has {last.size} entries and {n_indptr} {indptr.size}: {n_last} must have one entry "
            f"per request and {n_indptr} must have length batch_size + 1"
        )
    indices = np.asarray(kv_indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise ValueError(f"{n_indices} must be a 1-D integer array, got {indices.dtype}{indices.shape}")
    _check_int32_range(n_indices, indices)
    if indices.size < indptr[-1]:
        raise ValueError(
            f"{n_indices} has {indices.size} entries but {n_indptr}[-1] = {indptr[-1]} pages"
        )
    used = indices[: indptr[-1]]
    if used.size and used.min() < 0:
        raise ValueError(f"{n_indices} must be >= 0, got {used.min()}")
    if num_pages is not None and used.size and used.max() >= num_pages:
        raise ValueError(
            f"{n_indices} must be < num_pages = {num_pages} (pages in the cache), got {used.max()}"
        )
    has_pages = indptr[1:] > indptr[:-1]
    bad = np.where(has_pages, (last < 1) | (last > page_size), last != 0)
    if np.any(bad):
        b = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{n_last}[{b}] = {last[b]} must be in 1..page_size={page_size} for a request "
            f"with pages, and 0 for a request with none"
        )
    return indptr, indices.astype(np.int32, copy=False), last.astype(np.int32, copy=False)


def check_page_table_lens(kv_indptr, kv_indices, kv_last_page_len, page_size: int, *,
                          names: Mapping[str, str] | None = None) -> tuple[np.ndarray, ...]:
    """:func:`check_page_table`, :func:`check_seq_lens_fit` and :func:`seq_lens_host` in one call.

    Returns:
      ``(kv_indptr, kv_indices, kv_last_page_len, kv_lens)`` as int32 numpy arrays.

    Raises:
      ValueError: as :func:`check_page_table` and :func:`check_seq_lens_fit`.
    """
    indptr, indices, last = check_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, names=names)
    check_seq_lens_fit(indptr, last, page_size, names=names)
    return indptr, indices, last, seq_lens_host(indptr, last, page_size)


def check_seq_lens_fit(kv_indptr: np.ndarray, kv_last_page_len: np.ndarray, page_size: int, *,
                       names: Mapping[str, str] | None = None) -> None:
    """Every request of a validated page table holds at most int32-max tokens (its length is an
    int32 everywhere). One comparison unless the whole table spans more than 2**31 - 1 tokens.

    Raises:
      ValueError: naming ``kv_indptr``: a request longer than the int32 range.
    """
    if int(kv_indptr[-1]) * page_size <= _INT32_MAX:
        return
    pages = np.diff(kv_indptr.astype(np.int64))
    lens = np.where(pages > 0, (pages - 1) * page_size + kv_last_page_len.astype(np.int64), 0)
    if lens.size and lens.max() > _INT32_MAX:
        b = int(lens.argmax())
        name = (names or PAGE_TABLE_NAMES).get("kv_indptr", "kv_indptr")
        raise ValueError(f"{name}: request {b} holds {lens[b]} tokens, more than the int32 range")


_WIDTH = {np.dtype(np.int32): 0, np.dtype(np.int64): 1}


def _int_width(a) -> int | None:
    """0 for a C-contiguous 1-D int32 numpy array, 1 for int64, ``None`` for anything else."""
    if type(a) is not np.ndarray or a.ndim != 1 or not a.flags.c_contiguous:
        return None
    return _WIDTH.get(a.dtype)


def checked_batch(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, page_size) -> tuple | None:
    """The checks of :class:`~jaxinfer.plan.batch.BatchSpec` in one native pass (jaxinfer/csrc/planner.cc):
    :func:`check_indptr` of both row pointers and, for a page table, :func:`check_page_table`.

    Takes C-contiguous 1-D numpy arrays: ``qo_indptr``, ``kv_indptr`` ``[B+1]`` and
    ``kv_last_page_len`` ``[B]`` int32 or int64, ``kv_indices`` int32 (``None`` with
    ``kv_last_page_len`` ``None``: ragged KV, ``kv_indptr`` over tokens). The library reads the
    arrays' data pointers itself (:func:`~jaxinfer.plan.native.array_data_offset`).

    Returns:
      ``(qo_indptr, kv_indptr, kv_lens, kv_last_page_len, addresses)``: int32 views of one fresh
      array (``kv_last_page_len`` ``None`` for ragged KV; ``kv_lens`` the tokens per request) and
      the data addresses of ``qo_indptr``, ``kv_indptr``, ``kv_lens`` and ``kv_indices`` (0 for
      ragged KV); or ``None`` where the numpy checks must run (another type, dtype or layout, a
      batch that fails a check, so that numpy names the error, or no C++ compiler).
    """
    lib = _native_lib()
    offset = None if lib is None else native.array_data_offset()
    ragged = kv_indices is None
    qo, kv = _int_width(qo_indptr), _int_width(kv_indptr)
    last = 0 if ragged else _int_width(kv_last_page_len)
    if offset is None or qo is None or kv is None or last is None:
        return None
    batch = kv_indptr.size - 1
    if batch < 0 or qo_indptr.size != batch + 1 or batch >= 2**31:
        return None
    if not ragged and (
        _int_width(kv_indices) != 0 or kv_last_page_len.size != batch or type(page_size) is not int
        or not 1 <= page_size < 2**31
    ):  # fmt: skip
        return None
    out = np.empty(4 * batch + 2, np.int32)
    addresses = (ctypes.c_int64 * 2)()
    layout = qo | kv << 1 | last << 2 | (not ragged) << 3
    if not lib.jaxinfer_check_batch(batch, qo_indptr, kv_indptr, kv_indices, 0 if ragged else kv_indices.size,
                                    kv_last_page_len, 1 if ragged else page_size, layout, offset, out, addresses):
        return None
    n = batch + 1
    address, pages = addresses[0], addresses[1]  # indexed: unpacking a ctypes array takes 10x longer
    return (out[:n], out[n : 2 * n], out[2 * n : 2 * n + batch], None if ragged else out[2 * n + batch :],
            (address, address + 4 * n, address + 8 * n, pages))


def seq_lens_host(kv_indptr: np.ndarray, kv_last_page_len: np.ndarray, page_size: int) -> np.ndarray:
    """``[B]`` int32 tokens per request of a validated page table (numpy twin of get_seq_lens)."""
    num_pages = kv_indptr[1:] - kv_indptr[:-1]
    return np.where(num_pages > 0, (num_pages - 1) * page_size + kv_last_page_len, 0).astype(np.int32, copy=False)
