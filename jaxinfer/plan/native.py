"""Build and load jaxinfer's host library (``jaxinfer/csrc/planner.cc``: the Pallas backend's planner and
the page-table check of the serving path).

Plain C++17, no CUDA: compiled on first use with the system C++ compiler (``$CXX``, else
``c++``, ``g++`` or ``clang++`` on ``PATH``; about 1 s) into the cache directory of the FFI
kernels (``$JAXINFER_CACHE_DIR`` or ``~/.cache/jaxinfer``, see :mod:`jaxinfer.buildcache`), keyed
by a hash of the source, the flags and the CPU architecture, verified against the checksum its
build recorded (:func:`jaxinfer.buildcache.cached_library`: a damaged or replaced library is
rebuilt, an unwritable cache falls back to a temporary directory) and loaded with ``ctypes``.
Build ahead of time with ``python -m jaxinfer.plan.native``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
from pathlib import Path

import numpy as np

from jaxinfer.buildcache import cache_dir, cached_library

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "planner.cc"
# The header the source includes (the work-row columns it shares with the CUDA MLA kernel): part of
# the cache key.
HEADERS = (SOURCE.parent / "common" / "work_layout.h",)
# -O3: GCC vectorizes the page-id scans only there (3x faster than -O2 on 16k ids).
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
COMPILERS = ("c++", "g++", "clang++")


class NativeBuildError(RuntimeError):
    """No C++ compiler, a missing source, or a failed compile (the message says which and how to fix it)."""


def find_compiler() -> str:
    """Path of the C++ compiler: ``$CXX``, else the first of :data:`COMPILERS` on ``PATH``.

    Raises:
      NativeBuildError: none found.
    """
    for name in (os.environ.get("CXX"), *COMPILERS):
        found = name and shutil.which(name)
        if found:
            return found
    raise NativeBuildError(
        "no C++ compiler found ($CXX, c++, g++ or clang++): jaxinfer compiles its host planner "
        f"({SOURCE.name}) on first use; install one (Debian/Ubuntu: apt-get install g++) or set CXX"
    )


def library_path() -> Path:
    """Where the library built from the current source lives in the cache (keyed by the source,
    the flags and the CPU architecture, so a cached build loads without a compiler).

    Raises:
      NativeBuildError: the source is missing (an installation without ``jaxinfer/csrc/``).
    """
    if not SOURCE.is_file():
        raise NativeBuildError(f"{SOURCE} not found: install jaxinfer from a source checkout (pip install -e .)")
    h = hashlib.sha256(SOURCE.read_bytes())
    for header in HEADERS:
        h.update(header.read_bytes())
    h.update(" ".join((platform.machine(), *CXX_FLAGS)).encode())
    return cache_dir() / "native" / f"planner-{h.hexdigest()[:16]}" / "libjaxinfer_planner.so"


def build(force: bool = False) -> Path:
    """Compile ``jaxinfer/csrc/planner.cc`` (cached) and return the path of the library, verified
    and safe to load: :func:`library_path`, or a temporary directory of this process where the
    cache cannot be written (with a :class:`jaxinfer.buildcache.CacheWarning`).

    Raises:
      NativeBuildError: no compiler, no source, the compiler failed (its output is in the
        message), or no writable directory to build in.
    """
    target = library_path()
    return cached_library(target, lambda tmp: [find_compiler(), *CXX_FLAGS, str(SOURCE), "-o", tmp], NativeBuildError,
                          "building jaxinfer's host planner", force=force)


@functools.cache
def load() -> ctypes.CDLL:
    """The host library with the ctypes signatures of its entry points (``jaxinfer/csrc/planner.cc``
    documents them), built on first use and loaded once per process.

    Raises:
      NativeBuildError: see :func:`build`; or the library does not load (the message names it and
        the fix).
    """
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as e:  # verified bytes that still do not load (another libc/libstdc++)
        raise NativeBuildError(
            f"jaxinfer's host planner {path} does not load ({e}): rebuild it with `python -m jaxinfer.plan.native` "
            "(or delete the directory), or set $JAXINFER_CACHE_DIR to a cache of this machine's own"
        ) from e
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Set the ctypes signatures of the library's entry points (AttributeError: one is missing)."""
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.jaxinfer_error.argtypes = []
    lib.jaxinfer_error.restype = ctypes.c_char_p
    lib.jaxinfer_plan_work.argtypes = [ptr, i32, *([ptr] * 9)]
    lib.jaxinfer_plan_packed.argtypes = [ptr, i32, *([ptr] * 5), i64, ptr, i64, ptr]
    lib.jaxinfer_count_work.argtypes = [ptr, i32, ptr, ptr, ptr]
    lib.jaxinfer_count_query_tiles.argtypes = [i32, ptr, i32]
    lib.jaxinfer_count_query_tiles.restype = i64
    obj = ctypes.py_object
    lib.jaxinfer_array_data.argtypes = [obj, i64]
    lib.jaxinfer_array_data.restype = ptr
    lib.jaxinfer_check_batch.argtypes = [i32, obj, obj, obj, i64, obj, i32, i32, i64, obj, ptr]
    for fn in (lib.jaxinfer_check_indptr_i32, lib.jaxinfer_check_indptr_i64):
        fn.argtypes = [ptr, i64, ptr]
    for fn in (lib.jaxinfer_plan_work, lib.jaxinfer_plan_packed, lib.jaxinfer_count_work, lib.jaxinfer_check_batch,
               lib.jaxinfer_check_indptr_i32, lib.jaxinfer_check_indptr_i64):
        fn.restype = ctypes.c_int


def address(a) -> int:
    """Address of a C-contiguous numpy array's data, for the library's pointer arguments.

    A numpy array's is read by the library from the array object (0.45 us;
    :func:`array_data_offset`); anything else's (or where that offset is unknown) from
    ``__array_interface__`` (0.9 us), which raises no audit event: ``ctypes.c_char.from_buffer``
    and ``ctypes.addressof`` do, and with an audit hook installed (filelock, which jax imports,
    adds one) they take ~2 us together.
    """
    if type(a) is np.ndarray:
        offset = array_data_offset()
        if offset is not None:
            return load().jaxinfer_array_data(a, offset)
    return a.__array_interface__["data"][0]


@functools.cache
def array_data_offset() -> int | None:
    """Where a numpy array's data pointer sits in its object, for entry points that take arrays as
    objects (``ctypes.py_object``: ``jaxinfer_array_data``, ``jaxinfer_check_batch``) instead of
    their addresses: numpy's ``PyArray_DATA`` reads the first field after ``PyObject_HEAD``, whose
    size is ``object.__basicsize__``. Checked once per process against ``__array_interface__`` on
    arrays and views; ``None`` where it disagrees or the library does not load (callers then look
    addresses up in Python).
    """
    try:
        lib = load()
    except Exception:  # noqa: BLE001 - any failure only costs the fast path
        return None
    offset = object.__basicsize__
    base = np.arange(16, dtype=np.int64)
    probes = (base, base[5:], base[::-1][:3].copy(), np.empty(0, np.int32), np.zeros((2, 3), np.int32)[1])
    if all(lib.jaxinfer_array_data(a, offset) == a.__array_interface__["data"][0] for a in probes):
        return offset
    return None


if __name__ == "__main__":
    print(build(force=True))
