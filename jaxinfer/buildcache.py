"""The on-disk cache of jaxinfer's compiled libraries (host planner, FFI kernels).

Like FlashInfer's JIT, each library is compiled once on first use into ``$JAXINFER_CACHE_DIR``
(default ``~/.cache/jaxinfer``), under a path keyed by what went into it (sources, flags, target),
and reused afterwards.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Root of the cache: ``$JAXINFER_CACHE_DIR``, else ``~/.cache/jaxinfer``."""
    return Path(os.environ.get("JAXINFER_CACHE_DIR", Path.home() / ".cache" / "jaxinfer"))


def compile_library(target: Path, command: Callable[[str], list[str]], error: type[Exception], what: str) -> Path:
    """Run the compiler command ``command(output_path)`` into a private file beside ``target``, then
    rename it to ``target``: a process racing this one never loads a half-written file, and either
    finished build is a valid result.

    Raises:
      error: the command failed (the message holds ``what``, the command and the end of its stderr).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = command(tmp)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise error(f"{what} failed:\n{' '.join(cmd)}\n{proc.stderr[-8000:]}")
    os.replace(tmp, target)
    return target
