"""Build the CUDA sources of ``jaxinfer/csrc/`` into a shared library of XLA FFI handlers, on first use.

Like FlashInfer's JIT, a library is compiled once per (source hash, GPU arch, jaxlib version,
extra defines) into a cache directory (``$JAXINFER_CACHE_DIR`` or ``~/.cache/jaxinfer``) and
reused afterwards. Build ahead of time with::

    python -m jaxinfer.backends.ffi.build --kernel fa2 --arch sm_90
    python -m jaxinfer.backends.ffi.build --kernel fa3 --arch sm_90a
    python -m jaxinfer.backends.ffi.build --kernel mla --arch sm_90a

The headers are jaxlib's XLA FFI API (``jax.ffi.include_dir()``; build against the oldest
supported jaxlib, 0.11.2: a library built on newer headers breaks backend start-up on older
ones) and CUTLASS/CuTe from the ``nvidia-cutlass`` wheel (``cutlass_library/source/include``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

from jaxinfer.buildcache import cache_dir, cached_library, compile_library

CSRC = Path(__file__).resolve().parents[2] / "csrc"

# Translation unit of each kernel family. FA2 runs on any sm80+ GPU, compiled for the device's
# own arch (SASS of sm_80 does not run on sm_90); FA3 and MLA need sm_90a (wgmma, setmaxnreg) and
# run on sm_90 devices only (sm_90a code runs on no other arch).
KERNELS = {"fa2": "fa2_ffi.cu", "fa3": "fa3_ffi.cu", "mla": "mla_ffi.cu"}
KERNEL_ARCHS = {"fa3": ("sm_90a",), "mla": ("sm_90a",)}
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_120")

NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-Xcompiler",
    "-fPIC",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    # Cold start (issue 23): cicc and ptxas optimize the kernel instances in parallel on every core
    # (the front end, cudafe++ and the host compile stay serial). fa3 for sm_90a on 2 cores: 43 s
    # -> 32 s; the SASS of every kernel is byte-identical with and without it (fa3 and fa2).
    "-split-compile=0",
    # Warnings inside jaxlib's FFI headers, not ours.
    "-diag-suppress",
    "940,2473",
)


class BuildError(RuntimeError):
    """The CUDA toolchain or CUTLASS is missing, or nvcc failed (the message says which and how to fix it)."""


def find_nvcc() -> str:
    """Path of ``nvcc`` (``$CUDA_HOME/bin`` first, then ``PATH``).

    Raises:
      BuildError: no nvcc; install the CUDA toolkit (12.x or 13.x) or set ``CUDA_HOME``.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        raise BuildError(
            "nvcc not found: install the CUDA toolkit (12.x or 13.x) and put its bin/ on PATH or set CUDA_HOME "
            "to build jaxinfer's fa2/fa3 kernels"
        )
    return found


def cutlass_include_dir() -> Path:
    """CUTLASS/CuTe headers of the ``nvidia-cutlass`` wheel (found without importing it).

    Raises:
      BuildError: the wheel is not installed; ``pip install 'jaxinfer[cuda]'`` (nvidia-cutlass).
    """
    spec = importlib.util.find_spec("cutlass_library")
    for root in (spec.submodule_search_locations or []) if spec else []:
        include = Path(root) / "source" / "include"
        if (include / "cute" / "tensor.hpp").is_file():
            return include
    raise BuildError(
        "CUTLASS/CuTe headers not found: pip install 'nvidia-cutlass==4.2.0.0' (the 'cuda' extra of jaxinfer) "
        "to build jaxinfer's fa2/fa3 kernels"
    )


def jax_ffi_include_dir() -> Path:
    import jax

    return Path(jax.ffi.include_dir())


def jaxlib_version() -> str:
    import jaxlib

    return jaxlib.__version__


def gencode(arch: str) -> list[str]:
    """nvcc ``-gencode`` flags of ``arch`` (``"sm_90a"`` -> ``arch=compute_90a,code=sm_90a``).

    Raises:
      ValueError: ``arch`` is not one of :data:`ARCHS`.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]


SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp")
_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


def kernel_sources(kernel: str) -> list[Path]:
    """The files of ``jaxinfer/csrc/`` that ``kernel``'s translation unit compiles: the unit and every
    file it includes with ``#include "..."``, transitively, that resolves inside ``jaxinfer/csrc/``
    (relative to the including file, as nvcc resolves it: csrc/ is not on the include path), e.g.
    ``fa3_ffi.cu``, ``fa3/*.cuh`` and the ``common/*.cuh`` it uses. Includes found elsewhere (jaxlib's,
    CUTLASS's) are not followed; an ``#include`` inside a disabled ``#if`` still counts.
    """
    root = CSRC / KERNELS[kernel]
    found: set[Path] = set()
    todo = [Path(os.path.normpath(root))]
    while todo:
        path = todo.pop()
        if path in found or not path.is_file():
            continue
        found.add(path)
        for name in _QUOTED_INCLUDE.findall(path.read_text(errors="replace")):
            dep = Path(os.path.normpath(path.parent / name))
            if dep.is_relative_to(CSRC) and dep.suffix in SOURCE_SUFFIXES:
                todo.append(dep)
    return sorted(found)


def source_hash(defines: tuple[str, ...] = (), kernel: str | None = None) -> str:
    """SHA-256 (16 hex digits) of the sources and the flags: the cache key's code part.

    With ``kernel``, exactly the files its translation unit includes (:func:`kernel_sources`: its own
    ``<kernel>_ffi.cu`` and ``<kernel>/``, and the ``common/`` code the families share), so that
    editing one kernel does not rebuild the other while editing shared code rebuilds both; otherwise
    every source file under ``jaxinfer/csrc/``.
    """
    h = hashlib.sha256()
    paths = kernel_sources(kernel) if kernel else [p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES]
    for path in sorted(paths):
        h.update(path.relative_to(CSRC).as_posix().encode())
        h.update(path.read_bytes())
    h.update(" ".join(NVCC_FLAGS + tuple(defines)).encode())
    return h.hexdigest()[:16]


def env_defines(kernel: str = "fa2") -> tuple[str, ...]:
    """Tuning defines of ``kernel`` from ``$JAXINFER_FA2_DEFINES`` / ``$JAXINFER_FA3_DEFINES``
    (comma-separated ``NAME=VALUE``), part of the cache key."""
    return tuple(d for d in os.environ.get(f"JAXINFER_{kernel.upper()}_DEFINES", "").split(",") if d)


def library_path(kernel: str, arch: str, defines: tuple[str, ...] = ()) -> Path:
    """Where the library of (kernel, arch, jaxlib, sources, defines) lives in the cache."""
    key = f"{kernel}-{arch}-jaxlib{jaxlib_version()}-{source_hash(defines, kernel)}"
    return cache_dir() / "ffi" / key / f"libjaxinfer_{kernel}.so"


def nvcc_command(kernel: str, arch: str, output: Path, defines: tuple[str, ...] = ()) -> list[str]:
    """The nvcc command line that builds ``kernel`` for ``arch`` into ``output``.

    Raises:
      BuildError: nvcc or CUTLASS missing. ValueError: unknown kernel, or an arch the kernel
        cannot target (fa3: sm_90a only).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
    if arch not in KERNEL_ARCHS.get(kernel, ARCHS):
        raise ValueError(f"{kernel} builds for {KERNEL_ARCHS.get(kernel, ARCHS)} only, got {arch!r}")
    return [
        find_nvcc(),
        *NVCC_FLAGS,
        *gencode(arch),
        f"-I{jax_ffi_include_dir()}",
        f"-I{cutlass_include_dir()}",
        *(f"-D{d}" for d in defines),
        str(CSRC / KERNELS[kernel]),
        "-o",
        str(output),
    ]


def build(kernel: str = "fa2", arch: str = "sm_80", *, output: Path | None = None, defines: tuple[str, ...] = (),
          force: bool = False) -> Path:
    """Compile ``kernel`` for ``arch`` (cached) and return the library's path.

    Args:
      kernel: ``"fa2"``, ``"fa3"`` or ``"mla"``.
      arch: target such as ``"sm_80"``, ``"sm_90"``, ``"sm_90a"`` (fa3, mla: ``"sm_90a"`` only).
      output: build here instead of the cache (no reuse).
      defines: extra preprocessor defines (``NAME=VALUE``), e.g. tile-shape overrides for tuning.
      force: rebuild even if the cached library exists.

    Raises:
      BuildError: nvcc or CUTLASS missing, or nvcc failed (its output is in the message).
      ValueError: unknown kernel or arch.
    """
    command = lambda tmp: nvcc_command(kernel, arch, Path(tmp), tuple(defines))  # noqa: E731
    what = f"nvcc building {kernel} for {arch}"
    if output is not None:
        return compile_library(Path(output), command, BuildError, what)
    # Verified against the checksum of its build, rebuilt when damaged; a temporary directory when
    # the cache cannot be written (jaxinfer.buildcache.cached_library).
    return cached_library(library_path(kernel, arch, tuple(defines)), command, BuildError, what, force=force)


def kernel_arch(kernel: str, cc: int) -> str:
    """Build target of ``kernel`` for a device of compute capability ``cc`` (major*10+minor).

    Raises:
      ValueError: the kernel cannot run there (fa3 needs cc 9.0).
    """
    if kernel in ("fa3", "mla"):
        if cc != 90:
            raise ValueError(f"{kernel} runs on sm_90 (H100/H200) only, got compute capability {cc / 10:.1f}")
        return "sm_90a"
    return f"sm_{cc}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build jaxinfer's CUDA FFI kernels ahead of time.")
    parser.add_argument("--kernel", default="fa2", choices=sorted(KERNELS))
    parser.add_argument("--arch", default=None, help="e.g. sm_80, sm_90 (default: the local GPU's)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    arch = args.arch
    if arch is None:
        from jaxinfer.backends.device import gpu_arch

        cc = gpu_arch()
        if cc is None:
            parser.error("no GPU found: pass --arch")
        arch = kernel_arch(args.kernel, cc)
    print(build(args.kernel, arch, defines=env_defines(args.kernel), force=args.force))


if __name__ == "__main__":
    main()
