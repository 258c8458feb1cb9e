"""Same-run peers of ``jaxinfer-bench`` (issue 23): other libraries' kernels on the workloads' own
inputs, timed by the same :class:`~jaxinfer.bench.harness.Timer` (back-to-back calls per repeat,
one device sync at its end) and checked against the same references as jaxinfer's backends.

``jaxinfer-bench --peers flashinfer,tokamax,jax-pallas``; a peer that does not import, or cannot run
here (no GPU), is reported in one line and left out. Each peer has cases (the records' backend
names); a workload a peer has no kernel for gets no record of it:

- ``flashinfer`` (0.3.1, PyTorch; the inputs are shared with JAX through DLPack, no copy; plan()
  gets host tensors, as jaxinfer's plan gets numpy arrays). Batch decode (decode_*, cascade_flat,
  fused RoPE too): ``BatchDecodeWithPagedKVCacheWrapper`` on CUDA cores (``flashinfer``) and on
  tensor cores (``flashinfer-tc``). Prefill and append, ragged and paged (prefill_*, append,
  pod_mixed): ``BatchPrefillWith{Ragged,Paged}KVCacheWrapper`` with ``backend="fa2"`` and
  ``"fa3"``. Cascade: ``MultiLevelCascadeAttentionWrapper``. pod_mixed also
  ``PODWithPagedKVCacheWrapper`` (``flashinfer-pod``; POD takes the prefill's K/V ragged, gathered
  outside the timing). An fp8 cache: FlashInfer 0.3.1 takes one scale per tensor and jaxinfer's
  caches have one per KV head, so the timed call multiplies q by the K scales and the output by
  the V scales of each head's group (bf16; FlashInfer applies ``v_scale`` as such a multiply
  itself).
- ``tokamax`` (0.0.17): ``tokamax.dot_product_attention`` with ``implementation="mosaic"`` and
  ``"triton"`` on the padded dense equivalent of the prefill workloads, as the cuDNN peer
  (:func:`jaxinfer.bench.harness.prepare_dense_peer`).
- ``jax-pallas``: JAX's ``jax.experimental.pallas.ops.gpu.paged_attention`` (shipped through jax
  0.11; with a later JAX the peer reports that it cannot run) on the batch decode workloads
  without RoPE, ``k_splits`` 8 and 16 (``jax-pallas-ks8``, ``-ks16``), the cache transposed to its
  ``[Hkv, pages, page_size, D]`` layout and q scaled by ``1/sqrt(D)`` (the kernel applies no
  softmax scale) outside the timing (an fp8 cache with its per-token scale pages).

``python -m jaxinfer.bench.peers --stage DIR`` downloads the peers' packages here (pip);
``python -m jaxinfer.bench.peers --install DIR --target SITE`` installs them on a machine without a
package index (benchmarks/README.md, "Same-run peers"), with the CUTLASS headers of jaxinfer's
``cuda`` extra: with ``SITE`` on ``PYTHONPATH`` the fa2/fa3/MLA kernels build there too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.bench import harness
from jaxinfer.bench.workloads import MixedWorkload, PrefillWorkload, Problem, Workload

PEER_NAMES = ("flashinfer", "tokamax", "jax-pallas")
FLASHINFER_WORKSPACE_BYTES = 256 * 2**20
# FlashInfer wrappers the same-named jaxinfer wrapper maps to, with their variants
# (label suffix, constructor keywords).
FLASHINFER_VARIANTS = {
    "BatchDecodeWithPagedKVCacheWrapper": (("", {"use_tensor_cores": False}), ("-tc", {"use_tensor_cores": True})),
    "BatchPrefillWithPagedKVCacheWrapper": (("-fa2", {"backend": "fa2"}), ("-fa3", {"backend": "fa3"})),
    "BatchPrefillWithRaggedKVCacheWrapper": (("-fa2", {"backend": "fa2"}), ("-fa3", {"backend": "fa3"})),
    "MultiLevelCascadeAttentionWrapper": (("", {}),),
}
JAX_PALLAS_K_SPLITS = (8, 16)
JAX_PALLAS_PAGES_PER_BLOCK = 8
TOKAMAX_IMPLEMENTATIONS = ("mosaic", "triton")

# What --stage downloads (the versions of /work/shared/peers/README.md's same-run anchors):
# FlashInfer 0.3.1 as its source archive (its JIT builds the kernels on the GPU machine) and the
# pure-Python or manylinux wheels of its and tokamax's dependencies that the GPU machine lacks.
FLASHINFER_SDIST = "flashinfer-python==0.3.1"
PEER_WHEELS = ("einops", "click", "tabulate", "nvidia-ml-py", "tokamax==0.0.17", "absl-py", "jaxtyping",
               "wadler-lindig", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
               "typing-extensions", "immutabledict", "qwix", "einshape")
# jaxinfer's own 'cuda' extra (CUTLASS/CuTe headers) travels with the peers, so that an FFI library
# missing from a carried build cache (its sources edited after the build) compiles there instead of
# being declined.
BUILD_EXTRA = "cuda"
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer library ready to run.

    Attributes:
      name: one of :data:`PEER_NAMES`.
      version: its version (and its framework's) in words.
      cases: ``(workload, problem, plan_repeats) -> {label: prepare}``: each ``prepare()`` gives a
        :class:`~jaxinfer.bench.harness.Prepared` (raising ``NotImplementedError`` when the case
        cannot take this problem, e.g. an fp8 cache); ``{}`` when the peer has no kernel for it.
    """

    name: str
    version: str
    cases: Callable[[Workload, Problem, int], dict[str, Callable[[], harness.Prepared]]]


def wrapper_name(problem: Problem) -> str:
    """Class name of the jaxinfer wrapper that ``problem`` plans with."""
    make = problem.make_wrapper
    return getattr(make, "func", make).__name__


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_host(call: Callable[[], object], repeats: int, sync: Callable) -> tuple[float, float]:
    """``call()`` once, then ``repeats`` times: ``(median ms until the device is done, median ms
    until it returns)``, as jaxinfer's plan() is timed."""
    sync(call())
    ready, returned = [], []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        out = call()
        returned.append(time.perf_counter() - start)
        sync(out)
        ready.append(time.perf_counter() - start)
    return _median_ms(ready), _median_ms(returned)


class FlashInferCases:
    """The FlashInfer cases (see the module docstring); ``torch`` and ``flashinfer`` are the modules."""

    def __init__(self, torch, flashinfer):
        self.torch, self.fi = torch, flashinfer
        self.sync = harness.torch_sync(torch)
        self.workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    def copy(self, x):
        return x.clone() if isinstance(x, self.torch.Tensor) else x

    def tensor(self, x):
        """A jax array as a torch tensor on the same device memory (DLPack; an fp8 array through
        a uint8 view, a copy made here), or a numpy array as an int32 host tensor."""
        if isinstance(x, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(x, np.int32))
        if jnp.dtype(x.dtype).itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating):
            return self.torch.from_dlpack(jax.lax.bitcast_convert_type(x, jnp.uint8)).view(getattr(self.torch, x.dtype.name))
        return self.torch.from_dlpack(x)

    def plan_args(self, args: tuple) -> tuple:
        return tuple([self.tensor(a) for a in x] if isinstance(x, list) else
                     self.tensor(x) if isinstance(x, np.ndarray) else x for x in args)

    def dtypes(self, problem: Problem) -> dict:
        return {"q_data_type": self.tensor(problem.q[:1]).dtype, "kv_data_type": self.tensor(problem.kv[0][:1]).dtype}

    def head_scales(self, problem: Problem):
        """``(q multiplier, o multiplier)`` ``[1, Hq, 1]`` bf16 of an fp8 cache's per-KV-head
        scales (each KV head's scale repeated over its group of query heads), or ``None``."""
        if problem.kv_scales is None:
            return None
        group = problem.q.shape[1] // problem.kv[0].shape[-2]
        return tuple(self.tensor(jnp.repeat(s, group)[None, :, None].astype(problem.q.dtype)) for s in problem.kv_scales)

    def __call__(self, workload: Workload, problem: Problem, plan_repeats: int) -> dict:
        name = wrapper_name(problem)
        cases = {f"flashinfer{suffix}": functools.partial(self.prepare, problem, name, kwargs, plan_repeats)
                 for suffix, kwargs in FLASHINFER_VARIANTS.get(name, ())}
        if isinstance(workload, MixedWorkload):
            cases["flashinfer-pod"] = functools.partial(self.prepare_pod, problem, workload, plan_repeats)
        return cases

    def prepare(self, problem: Problem, name: str, kwargs: dict, plan_repeats: int) -> harness.Prepared:
        """The FlashInfer wrapper of the same name as jaxinfer's, planned from the same arguments."""
        make = problem.make_wrapper
        wrapper = getattr(self.fi, name)(*getattr(make, "args", ()), self.workspace,
                                         getattr(make, "keywords", {}).get("kv_layout", "NHD"), **kwargs)
        plan_args, plan_kwargs = self.plan_args(problem.plan_args), {**problem.plan_kwargs, **self.dtypes(problem)}
        plan_ms, plan_call_ms = time_host(lambda: wrapper.plan(*plan_args, **plan_kwargs), plan_repeats, self.sync)
        ragged = name == "BatchPrefillWithRaggedKVCacheWrapper"
        scales = self.head_scales(problem)

        def fn(q, k, v):
            out = wrapper.run(q if scales is None else q * scales[0], *((k, v) if ragged else ((k, v),)))
            return out if scales is None else out * scales[1]

        args = (self.tensor(problem.q), *(self.tensor(x) for x in problem.kv))
        return harness.Prepared(plan_ms, plan_call_ms, fn, args, jax.dlpack.from_dlpack, np.arange(problem.q.shape[0]),
                                self.sync, self.copy)

    def prepare_pod(self, problem: Problem, workload: MixedWorkload, plan_repeats: int) -> harness.Prepared:
        """``PODWithPagedKVCacheWrapper``: request 0's prefill (its K/V gathered from the cache into
        ragged tensors outside the timing) beside the decode requests' paged batch."""
        if problem.kv_scales is not None:
            raise NotImplementedError("FlashInfer's POD takes the prefill's ragged K/V in q's dtype, not fp8")
        qo_indptr, indptr, indices, last, hq, hkv, head_dim, page_size = problem.plan_args
        p = workload.prefill_len
        decode_table = (indptr[1:] - indptr[1], indices[indptr[1]:], last[1:])
        wrapper = self.fi.PODWithPagedKVCacheWrapper(self.workspace, "NHD")
        plan_args, dtypes = self.plan_args((*decode_table, hq, hkv, head_dim, page_size)), self.dtypes(problem)
        plan_ms, plan_call_ms = time_host(lambda: wrapper.plan(*plan_args, **dtypes), plan_repeats, self.sync)
        rows = problem.dense.kv_index[0, :p]
        k_p, v_p = (self.tensor(x[rows]) for x in problem.kv_flat)

        def fn(q_p, k_p, v_p, q_d, k, v):
            return wrapper.run(q_p, k_p, v_p, q_d, (k, v), causal_p=True)

        args = (self.tensor(problem.q[:p]), k_p, v_p, self.tensor(problem.q[p:]), *(self.tensor(x) for x in problem.kv))
        return harness.Prepared(plan_ms, plan_call_ms, fn, args,
                                lambda o: jnp.concatenate([jax.dlpack.from_dlpack(x) for x in o]),
                                np.arange(problem.q.shape[0]), self.sync, self.copy)


def load_flashinfer() -> Peer:
    """Raises ImportError (not installed) or NotImplementedError (no CUDA GPU for torch)."""
    import flashinfer
    import torch

    if not torch.cuda.is_available():
        raise NotImplementedError("FlashInfer needs a CUDA GPU visible to torch")
    return Peer("flashinfer", f"{flashinfer.__version__} (torch {torch.__version__})",
                FlashInferCases(torch, flashinfer))


def load_tokamax() -> Peer:
    """Raises ImportError (not installed) or NotImplementedError (no GPU)."""
    try:
        import xprof  # noqa: F401
    except ImportError:
        # tokamax imports xprof for its own benchmarking helpers only, which are not used here.
        for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
    import tokamax

    if not harness.on_gpu():
        raise NotImplementedError("tokamax's mosaic and triton kernels need a GPU")

    def cases(workload: Workload, problem: Problem, plan_repeats: int) -> dict:
        if not isinstance(workload, PrefillWorkload):
            return {}
        return {f"tokamax-{impl}": functools.partial(harness.prepare_dense_peer, problem, impl,
                                                     tokamax.dot_product_attention)
                for impl in TOKAMAX_IMPLEMENTATIONS}

    return Peer("tokamax", tokamax.__version__, cases)


def prepare_jax_paged(problem: Problem, k_splits: int, paged_attention: Callable) -> harness.Prepared:
    """``paged_attention`` on the decode batch: block tables padded (with page 0) to a multiple of
    ``pages_per_compute_block * k_splits`` pages, the cache as ``[Hkv, pages, page_size, D]``, q
    scaled by ``1/sqrt(D)`` (all outside the timing); an fp8 cache with its per-KV-head scales as
    per-token scale pages."""
    indptr, indices = problem.plan_args[:2]
    counts = np.diff(indptr)
    width = -(-max(int(counts.max(initial=1)), 1) // (JAX_PALLAS_PAGES_PER_BLOCK * k_splits))
    tables = np.zeros((counts.size, width * JAX_PALLAS_PAGES_PER_BLOCK * k_splits), np.int32)
    for b, (start, n) in enumerate(zip(indptr[:-1], counts)):
        tables[b, :n] = indices[start:start + n]
    k_pages, v_pages = (jnp.transpose(x, (2, 0, 1, 3)) for x in problem.kv)
    scale_pages = () if problem.kv_scales is None else tuple(
        jnp.broadcast_to(s[:, None, None], k_pages.shape[:3]) for s in problem.kv_scales)
    fn = jax.jit(functools.partial(paged_attention, pages_per_compute_block=JAX_PALLAS_PAGES_PER_BLOCK,
                                   k_splits=k_splits))
    # The kernel applies no softmax scale: its callers fold 1/sqrt(D) into q, done here once.
    q = (problem.q.astype(jnp.float32) / np.sqrt(problem.q.shape[-1])).astype(problem.q.dtype)
    args = (q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(problem.dense.kv_lens, jnp.int32), *scale_pages)
    return harness.Prepared(None, None, fn, args, lambda o: o, np.arange(problem.q.shape[0]))


def load_jax_pallas() -> Peer:
    """Raises NotImplementedError: no GPU, or a JAX that no longer ships the kernel."""
    try:
        with warnings.catch_warnings():  # deprecated in JAX (shipped through 0.11): the peer the issue measured
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import paged_attention
    except ImportError as e:
        # Nothing to install: JAX dropped its Triton ops (pointing to tokamax) after deprecating them.
        raise NotImplementedError(f"jax {jax.__version__} no longer ships jax.experimental.pallas.ops.gpu."
                                  f"paged_attention (JAX's Triton ops were deprecated for tokamax; the peer needs "
                                  f"jax <= 0.11) ({type(e).__name__}: {e})") from e
    if not harness.on_gpu():
        raise NotImplementedError("JAX's Pallas paged_attention (Triton) needs a GPU")

    def cases(workload: Workload, problem: Problem, plan_repeats: int) -> dict:
        if wrapper_name(problem) != "BatchDecodeWithPagedKVCacheWrapper" or problem.dense.rope_theta is not None:
            return {}
        return {f"jax-pallas-ks{k}": functools.partial(prepare_jax_paged, problem, k, paged_attention.paged_attention)
                for k in JAX_PALLAS_K_SPLITS}

    return Peer("jax-pallas", f"jax {jax.__version__}", cases)


LOADERS = {"flashinfer": load_flashinfer, "tokamax": load_tokamax, "jax-pallas": load_jax_pallas}


def load(names: Sequence[str]) -> tuple[list[Peer], list[str]]:
    """The peers of ``names`` that import and can run here, and one line per name saying which
    version runs or why it does not ("not installed", "cannot run here").

    Raises:
      ValueError: a name not in :data:`PEER_NAMES`.
    """
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEER_NAMES)}")
    peers, lines = [], []
    for name in names:
        try:
            peer = LOADERS[name]()
        except ImportError as e:
            lines.append(f"peer {name}: not installed ({type(e).__name__}: {e}); benchmarks/README.md says how to "
                         "stage it")
            continue
        except NotImplementedError as e:
            lines.append(f"peer {name}: cannot run here: {e}")
            continue
        peers.append(peer)
        lines.append(f"peer {name}: {peer.version}, same inputs, same timing as jaxinfer")
    return peers, lines


def extra_requirements(extra: str) -> list[str]:
    """The requirements of jaxinfer's optional dependency group ``extra`` (pyproject.toml), without
    their markers, e.g. ``["nvidia-cutlass==4.2.0.0"]`` for ``"cuda"``.

    Raises:
      ValueError: jaxinfer is not installed (no package metadata), or has no such extra.
    """
    from importlib.metadata import PackageNotFoundError, requires

    try:
        found = requires("jaxinfer") or []
    except PackageNotFoundError as e:
        raise ValueError(f"extra {extra!r}: jaxinfer is not installed (pip install -e .)") from e
    marker = f'extra == "{extra}"'
    reqs = [r.split(";")[0].strip() for r in found if marker in r]
    if not reqs:
        raise ValueError(f"extra must name an optional dependency group of jaxinfer, got {extra!r}")
    return reqs


def stage_commands(directory: Path, python: str = sys.executable) -> list[list[str]]:
    """The pip commands that download the peers into ``directory``: FlashInfer's source archive,
    then the wheels for CPython 3.12 on x86-64 Linux (the GPU machine), with jaxinfer's CUTLASS
    headers (:data:`BUILD_EXTRA`)."""
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    return [
        [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "flashinfer-python", "-d", str(directory),
         FLASHINFER_SDIST],
        [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(directory), *PEER_WHEELS, *extra_requirements(BUILD_EXTRA)],
    ]


def install(directory: Path, target: Path, python: str = sys.executable) -> None:
    """Install what :func:`stage_commands` downloaded into ``target`` without a package index: the
    wheels, then FlashInfer built into a wheel from its source archive (no compilation: its JIT
    compiles each kernel on first use, cached under ~/.cache/flashinfer).

    Raises:
      FileNotFoundError: no FlashInfer source archive in ``directory``.
      subprocess.CalledProcessError: pip or tar failed.
    """
    sdist = sorted(directory.glob("flashinfer_python-*.tar.gz"))
    if not sdist:
        raise FileNotFoundError(f"no flashinfer_python-*.tar.gz in {directory}: run --stage first")
    build = target.parent / (target.name + "-build")
    build.mkdir(parents=True, exist_ok=True)
    pip_install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target)]
    subprocess.run([*pip_install, *map(str, sorted(directory.glob("*.whl")))], check=True)
    subprocess.run(["tar", "xzf", str(sdist[-1]), "-C", str(build)], check=True)
    source = build / sdist[-1].name.removesuffix(".tar.gz")
    subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(build),
                    str(source)], check=True)
    subprocess.run([*pip_install, *map(str, sorted(build.glob("flashinfer_python-*.whl")))], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.peers",
                                description="Stage jaxinfer-bench's same-run peers for a machine without a "
                                "package index, or install them there.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stage", type=Path, metavar="DIR", help="download the peers into DIR (here, with pip)")
    mode.add_argument("--install", type=Path, metavar="DIR", help="install the peers staged in DIR (there)")
    p.add_argument("--target", type=Path, default=Path("/tmp/peers"),
                   help="with --install: the directory to install into, for PYTHONPATH (default /tmp/peers)")
    args = p.parse_args(argv)
    if args.stage:
        args.stage.mkdir(parents=True, exist_ok=True)
        for command in stage_commands(args.stage):
            subprocess.run(command, check=True)
        print(f"staged in {args.stage}")
    else:
        install(args.install, args.target)
        print(f"installed in {args.target}: run jaxinfer-bench with PYTHONPATH={args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
