"""The on-disk cache of jaxinfer's compiled libraries (host planner, FFI kernels).

Like FlashInfer's JIT, each library is compiled once on first use into ``$JAXINFER_CACHE_DIR``
(default ``~/.cache/jaxinfer``), under a path keyed by what went into it (sources, flags, target),
and reused afterwards (:func:`cached_library`).

A cached library is loaded into the process, so it is verified first: the build records the
library's SHA-256 beside its key directory (``<key>.sha256``, ``sha256sum`` format), and a library
whose bytes do not match (truncated by a full disk or an interrupted copy, another ``.so`` put in
its place) is rebuilt instead of loaded: dlopen of a truncated file dies of SIGBUS, which no
``try`` catches. A cache that cannot be written (read-only filesystem, permission denied, a path
through a regular file) makes the build fall back to a private temporary directory of this
process, with a :class:`CacheWarning`.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path


class CacheWarning(UserWarning):
    """The build cache could not be used as it is (a damaged library, an unwritable directory) and
    jaxinfer rebuilt the library (in place, or in a temporary directory of this process)."""


def cache_dir() -> Path:
    """Root of the cache: ``$JAXINFER_CACHE_DIR``, else ``~/.cache/jaxinfer``."""
    return Path(os.environ.get("JAXINFER_CACHE_DIR", Path.home() / ".cache" / "jaxinfer"))


def compile_library(target: Path, command: Callable[[str], list[str]], error: type[Exception], what: str) -> Path:
    """Run the compiler command ``command(output_path)`` into a private file beside ``target``, then
    rename it to ``target``: a process racing this one never loads a half-written file, and either
    finished build is a valid result.

    Raises:
      error: the command failed or could not start (the message holds ``what``, the command and
        the end of its stderr).
      OSError: ``target``'s directory cannot be created or written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = command(tmp)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # the compiler itself cannot run: not a cache problem
            raise error(f"{what} failed:\n{' '.join(cmd)}\n{e}") from e
        if proc.returncode != 0:
            raise error(f"{what} failed:\n{' '.join(cmd)}\n{proc.stderr[-8000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return target


def checksum_path(target: Path) -> Path:
    """Where the SHA-256 of the cached library ``target`` is recorded: beside its key directory
    (``<cache>/native/planner-<key>.sha256`` for ``<cache>/native/planner-<key>/libjaxinfer_planner.so``),
    so the key directory holds the library alone."""
    return target.parent.with_name(target.parent.name + ".sha256")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record_checksum(target: Path) -> None:
    """Write ``target``'s SHA-256 to :func:`checksum_path` (temporary file + rename)."""
    record = checksum_path(target)
    fd, tmp = tempfile.mkstemp(suffix=".sha256", dir=record.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{_sha256(target)}  {target.parent.name}/{target.name}\n")
        os.replace(tmp, record)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def damage(target: Path) -> str | None:
    """Why the cached library ``target`` must not be loaded (``None`` when it may): ``"absent"``,
    ``"unrecorded"`` (no checksum: a build of an older jaxinfer, or a racing build not finished),
    or a sentence saying how it differs from what its build recorded."""
    try:
        if not target.is_file():
            return "absent"
        recorded = checksum_path(target).read_text().split()
    except OSError:
        return "unrecorded"
    if not recorded:
        return "unrecorded"
    try:
        actual = _sha256(target)
    except OSError as e:
        return f"cannot be read ({e})"
    if actual != recorded[0]:
        return (f"does not match the SHA-256 its build recorded in {checksum_path(target)} "
                f"({target.stat().st_size} bytes): damaged or replaced")
    return None


@functools.cache
def _fallback_root() -> Path:
    """A private temporary directory of this process (removed at exit) for builds that the cache
    cannot hold."""
    root = Path(tempfile.mkdtemp(prefix="jaxinfer-cache-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _build_verified(target: Path, command: Callable[[str], list[str]], error: type[Exception], what: str) -> Path:
    compile_library(target, command, error, what)
    _record_checksum(target)
    return target


def cached_library(target: Path, command: Callable[[str], list[str]], error: type[Exception], what: str, *,
                   force: bool = False) -> Path:
    """The library ``target`` of the cache, verified (:func:`damage`) and safe to load: reused when
    its bytes match the checksum its build recorded, else built with ``command`` (see
    :func:`compile_library`) and its checksum recorded. A damaged library is rebuilt with a
    :class:`CacheWarning`; where the cache cannot be written, the library is built into a
    temporary directory of this process instead (also with a :class:`CacheWarning`).

    Args:
      target: the library's path in the cache (:func:`cache_dir`), in a directory of its own key.
      command: ``command(output_path)``, the compiler command line.
      error: the exception class of a failed build.
      what: the build in words, for messages ("building jaxinfer's host planner").
      force: rebuild even if the cached library verifies.

    Raises:
      error: the compiler failed, or neither the cache nor a temporary directory can be written
        (the message names ``$JAXINFER_CACHE_DIR``).
    """
    problem = "forced" if force else damage(target)
    if problem is None:
        return target
    if problem not in ("forced", "absent", "unrecorded"):
        warnings.warn(f"jaxinfer's cached {target} {problem}; rebuilding it ({what})", CacheWarning, stacklevel=2)
    try:
        return _build_verified(target, command, error, what)
    except OSError as e:
        unwritable = e
    try:
        relative = target.relative_to(cache_dir())
    except ValueError:
        relative = Path(target.parent.name) / target.name
    try:
        fallback = _fallback_root() / relative
        if damage(fallback) is None:
            return fallback
        _build_verified(fallback, command, error, what)
    except OSError as e:
        raise error(
            f"{what}: the build cache {target.parent} cannot be written ({unwritable}), nor can a temporary "
            f"directory ({e}): set $JAXINFER_CACHE_DIR to a writable directory (now {cache_dir()})"
        ) from e
    warnings.warn(
        f"{what}: jaxinfer's build cache {cache_dir()} cannot be written ({unwritable}); built into "
        f"{fallback.parent} for this process only: set $JAXINFER_CACHE_DIR to a writable directory to build it "
        "once and keep it",
        CacheWarning, stacklevel=2)
    return fallback
