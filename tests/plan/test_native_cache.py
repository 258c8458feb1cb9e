"""A damaged or unwritable build cache never takes down a backend (issue 16, item 9).

The host planner (jaxinfer/csrc/planner.cc) is compiled into ``$JAXINFER_CACHE_DIR`` and loaded with
ctypes; a truncated library there killed the process with SIGBUS on load, another ``.so`` in its place
failed with "undefined symbol", and an unwritable cache broke even the xla backend (its batch checks
use the library). The dangerous parts run in a subprocess, with the cache of a single build copied
and damaged per test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxinfer import buildcache
from jaxinfer.backends.ffi import build as ffi_build
from jaxinfer.plan import checks, native
from jaxinfer.plan.batch import BatchSpec
from jaxinfer.variants import AttentionVariant

# Plans one small paged batch per backend named in argv (and runs it on xla), printing "ok <backend>"
# or "error <backend> <exception>" for each.
SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("always")
    import tempfile
    if len(sys.argv) > 1 and sys.argv[1].startswith("--tmp="):
        tempfile.tempdir = sys.argv.pop(1)[6:]  # an unusable temporary directory too
    import jax.numpy as jnp, numpy as np
    import jaxinfer

    for backend in sys.argv[1:]:
        w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
        try:
            w.plan(np.array([0, 3, 5]), np.array([0, 2, 3]), np.array([0, 1, 2]), np.array([4, 2]), 4, 2, 16, 4,
                   causal=True, q_data_type=jnp.bfloat16)
            if backend == "xla":
                o = w.run(jnp.ones((5, 4, 16), jnp.bfloat16), jnp.ones((3, 2, 4, 2, 16), jnp.bfloat16))
                assert o.shape == (5, 4, 16) and bool(jnp.isfinite(o).all())
            print("ok", w.backend, flush=True)
        except Exception as e:
            print("error", backend, type(e).__name__, e, flush=True)
    """
)


def run_script(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXINFER_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache holding one build of the planner (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXINFER_CACHE_DIR", str(root))
        native.build()
    return root


def cache_copy(built_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the built cache and the path of its planner library."""
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    (lib,) = cache.glob("native/*/libjaxinfer_planner.so")
    return cache, lib


def other_shared_library() -> Path:
    return next(p for p in sorted(Path(np.__file__).parent.rglob("*.so")) if p.stat().st_size > 10_000)


@pytest.mark.parametrize("damage", ["truncated", "other_library"])
def test_damaged_library_is_rebuilt_never_loaded(built_cache, tmp_path, damage):
    """Truncated to half (dlopen: SIGBUS) or another .so in its place (undefined symbol): the
    checksum recorded at build time no longer matches, so the library is rebuilt, with a warning,
    before anything loads it; both backends plan."""
    cache, lib = cache_copy(built_cache, tmp_path)
    good = lib.read_bytes()
    if damage == "truncated":
        os.truncate(lib, len(good) // 2)
    else:
        shutil.copyfile(other_shared_library(), lib)
    proc = run_script(cache, "xla", "pallas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["ok xla", "ok pallas"], proc.stdout + proc.stderr[-3000:]
    assert "CacheWarning" in proc.stderr and "damaged or replaced" in proc.stderr, proc.stderr[-3000:]
    assert buildcache.damage(lib) is None and lib.stat().st_size == len(good), "rebuilt in place, checksum recorded"


def unwritable_cache(tmp_path: Path, how: str) -> Path:
    if how == "chmod":
        cache = tmp_path / "readonly"
        cache.mkdir()
        cache.chmod(0o555)
        try:
            (cache / "probe").mkdir()
        except OSError:
            return cache
        cache.chmod(0o755)
        pytest.skip("root writes through chmod 0o555 (the 'under_a_file' case covers it)")
    (tmp_path / "a_file").write_text("")
    return tmp_path / "a_file" / "cache"  # cannot be created: a path through a regular file


@pytest.mark.parametrize("how", ["under_a_file", "chmod"])
def test_unwritable_cache_builds_in_a_temporary_directory(tmp_path, how):
    cache = unwritable_cache(tmp_path, how)
    try:
        proc = run_script(cache, "xla", "pallas")
    finally:
        if how == "chmod":
            cache.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["ok xla", "ok pallas"], proc.stdout + proc.stderr[-3000:]
    assert "CacheWarning" in proc.stderr and "JAXINFER_CACHE_DIR" in proc.stderr, proc.stderr[-3000:]


def test_unwritable_cache_and_temp_dir_xla_works_pallas_errors_clearly(tmp_path):
    """Nowhere to build: the xla backend plans and runs on the numpy checks (one warning); pallas,
    which needs the planner, raises NativeBuildError naming $JAXINFER_CACHE_DIR."""
    cache = unwritable_cache(tmp_path, "under_a_file")
    proc = run_script(cache, f"--tmp={tmp_path / 'a_file' / 'tmp'}", "xla", "pallas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "ok xla", proc.stdout + proc.stderr[-3000:]
    assert lines[1].startswith("error pallas NativeBuildError") and "JAXINFER_CACHE_DIR" in lines[1], proc.stdout
    assert proc.stderr.count("native batch checks are unavailable") == 1, proc.stderr[-3000:]


def test_batch_checks_fall_back_on_any_library_failure(rng, monkeypatch):
    """Not only NativeBuildError: a library that fails to load (OSError, AttributeError) leaves
    BatchSpec.create (every backend) on the numpy checks, with one warning."""
    calls = []

    def broken_library():
        calls.append(1)
        raise OSError("libjaxinfer_planner.so: undefined symbol: jaxinfer_error (test)")

    monkeypatch.setattr(native, "load", broken_library)
    checks._native_lib.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="numpy"):
            for _ in range(2):
                spec = BatchSpec.create(np.array([0, 1, 3]), np.array([0, 2, 3]), np.array([0, 1, 2]), np.array([4, 2]),
                                        page_size=4, num_qo_heads=2, num_kv_heads=1, head_dim=16,
                                        variant=AttentionVariant())
        np.testing.assert_array_equal(spec.kv_lens, [8, 2])
        assert len(calls) == 1, "tried and warned once"
    finally:
        checks._native_lib.cache_clear()


# ------------------------------------------------------------ the mechanism, with a fake compiler


def fake_compiler(source: Path):
    """A "compiler" that copies ``source`` to its output (fast, no toolchain)."""
    return lambda tmp: ["cp", str(source), tmp]


def test_cached_library_records_verifies_and_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "lib.bin"
    source.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    target = buildcache.cache_dir() / "kind" / "key" / "lib.so"
    assert buildcache.cached_library(target, fake_compiler(source), RuntimeError, "building x") == target
    assert buildcache.damage(target) is None and target.read_bytes() == source.read_bytes()
    assert list(target.parent.iterdir()) == [target], "the key directory holds the library alone"
    assert buildcache.checksum_path(target).read_text().split()[1] == "key/lib.so"  # sha256sum -c format
    mtime = target.stat().st_mtime_ns
    assert buildcache.cached_library(target, fake_compiler(tmp_path / "missing"), RuntimeError, "x") == target
    assert target.stat().st_mtime_ns == mtime, "a verified library is reused"

    os.truncate(target, 100)
    with pytest.warns(buildcache.CacheWarning, match="damaged or replaced"):
        buildcache.cached_library(target, fake_compiler(source), RuntimeError, "building x")
    assert target.read_bytes() == source.read_bytes()

    buildcache.checksum_path(target).unlink()  # a build of an older jaxinfer: rebuilt, quietly
    buildcache.cached_library(target, fake_compiler(source), RuntimeError, "building x")
    assert buildcache.damage(target) is None


def test_cached_library_unwritable_cache(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    source = tmp_path / "lib.bin"
    source.write_bytes(b"library")
    target = buildcache.cache_dir() / "kind" / "key" / "lib.so"
    with pytest.warns(buildcache.CacheWarning, match="JAXINFER_CACHE_DIR"):
        built = buildcache.cached_library(target, fake_compiler(source), RuntimeError, "building x")
    assert built != target and built.read_bytes() == b"library" and buildcache.damage(built) is None
    assert buildcache.cached_library(target, fake_compiler(tmp_path / "missing"), RuntimeError, "x") == built

    monkeypatch.setattr(buildcache, "_fallback_root", lambda: tmp_path / "a_file" / "tmp")
    with pytest.raises(RuntimeError, match=r"\$JAXINFER_CACHE_DIR"):
        buildcache.cached_library(target, fake_compiler(source), RuntimeError, "building x")


def test_ffi_build_verifies_its_cached_library(tmp_path, monkeypatch):
    """The FFI kernels (loaded on a GPU only) use the same mechanism: a damaged cached library is rebuilt."""
    source = tmp_path / "kernel.bin"
    source.write_bytes(b"kernel" * 1000)
    target = tmp_path / "cache" / "ffi" / "fa2-key" / "libjaxinfer_fa2.so"
    monkeypatch.setattr(ffi_build, "library_path", lambda kernel, arch, defines=(): target)
    monkeypatch.setattr(ffi_build, "nvcc_command", lambda kernel, arch, out, defines=(): ["cp", str(source), str(out)])
    assert ffi_build.build("fa2", "sm_80") == target and buildcache.damage(target) is None
    os.truncate(target, 10)
    with pytest.warns(buildcache.CacheWarning, match="damaged or replaced"):
        assert ffi_build.build("fa2", "sm_80") == target
    assert target.read_bytes() == source.read_bytes()
