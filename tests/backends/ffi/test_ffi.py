"""Tests of the CUDA FFI backends ("fa2", "fa3").

On CPU (CI): the CUDA sources compile with nvcc (fa2 for sm_80, fa3 and the MLA kernel for sm_90a;
compile only; the MLA kernel's wiring and GPU cases are in tests/test_mla.py), the fa2 kernel's
KV addressing is checked on the host, the ffi_call wiring of both backends lowers for the cuda
platform, and the host planner and the ``unsupported`` reasons
behave. On a GPU (``-m gpu``): each backend the device supports (fa3: sm_90 only) against the
float64 reference of ``ref64`` on fresh random inputs; each case first runs on NaN inputs so that
XLA's reused output buffers hold NaN (best effort: XLA chooses the buffers), and rows past the
batch must come back as o = 0, lse = -inf.
"""

from __future__ import annotations

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, indptr_of, make_paged_kv, rand
from jax.export import DisabledSafetyCheck
from ref64 import ref_batch

from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.backends import device
from jaxinfer.backends.ffi import build, ops
from jaxinfer.backends.ffi.backend import BLOCK_M, get_backend
from jaxinfer.variants import AttentionVariant


def _has_toolchain() -> bool:
    try:
        build.find_nvcc()
        build.cutlass_include_dir()
    except build.BuildError:
        return False
    return True


needs_toolchain = pytest.mark.skipif(not _has_toolchain(), reason="needs nvcc and the nvidia-cutlass wheel")


def ragged_spec(qo_lens, kv_lens, hq, hkv, d, variant, dtype=jnp.bfloat16):
    return BatchSpec.create(indptr_of(qo_lens), indptr_of(kv_lens), None, None, page_size=1, num_qo_heads=hq,
                            num_kv_heads=hkv, head_dim=d, variant=variant, q_dtype=dtype)


# ---------------------------------------------------------------- CPU: build and wiring


BACKENDS = ["fa2", "fa3"]


# fa2 once, for sm_80: its sources (fa2/, common/) have no arch-dependent code (no __CUDA_ARCH__
# branch), so another arch only changes ptxas's target; fa3 and mla are sm_90a builds.
@needs_toolchain
@pytest.mark.parametrize("kernel,arch", [("fa2", "sm_80"), ("fa3", "sm_90a"), ("mla", "sm_90a")])
def test_sources_compile(kernel, arch, tmp_path):
    lib = build.build(kernel, arch, output=tmp_path / "lib.so")
    assert lib.stat().st_size > 0


def test_fa3_targets_sm90a_only():
    for kernel in ("fa3", "mla"):
        with pytest.raises(ValueError, match="sm_90a"):
            build.nvcc_command(kernel, "sm_90", build.CSRC / "x.so")
        assert build.kernel_arch(kernel, 90) == "sm_90a"
    assert build.kernel_arch("fa2", 90) == "sm_90"
    with pytest.raises(ValueError, match="sm_90"):
        build.kernel_arch("fa3", 100)


@needs_toolchain
def test_kv_addressing_on_host(tmp_path):
    """The kernel's KV address function against the page-table definition (runs on the CPU)."""
    exe = tmp_path / "kv_offset_host_test"
    src = build.CSRC / "tests" / "kv_offset_host_test.cu"
    cmd = [build.find_nvcc(), "-std=c++17", "--expt-relaxed-constexpr", "-diag-suppress", "940,2473",
           f"-I{build.cutlass_include_dir()}", str(src), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("0 mismatches")


def test_missing_nvcc_names_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(build.BuildError, match="CUDA toolkit"):
        build.find_nvcc()


def test_cache_key_depends_on_arch_and_defines(monkeypatch):
    a = build.library_path("fa2", "sm_80")
    assert a != build.library_path("fa2", "sm_90")
    assert a != build.library_path("fa2", "sm_80", ("JAXINFER_FA2_BN_D128=64",))
    assert build.jaxlib_version() in str(a)
    # Each family hashes its own sources only, and reads its own tuning defines.
    assert build.source_hash((), "fa2") != build.source_hash((), "fa3")
    monkeypatch.setenv("JAXINFER_FA3_DEFINES", "JAXINFER_FA3_STAGES_D128=3")
    monkeypatch.setenv("JAXINFER_FA2_DEFINES", "")
    assert build.env_defines("fa3") == ("JAXINFER_FA3_STAGES_D128=3",) and build.env_defines("fa2") == ()


def test_cache_key_covers_the_shared_ffi_code(monkeypatch, tmp_path):
    """Editing the code both families include (common/) rebuilds both; a family's own file only itself."""
    files = {
        "fa2_ffi.cu": '#include "common/ffi_forward.cuh"\n#include "fa2/kernel.cuh"\n',
        "fa3_ffi.cu": '#include "common/ffi_forward.cuh"\n#include "fa3/kernel.cuh"\n',
        "common/ffi_forward.cuh": '#include "ffi_params.cuh"\n#include "xla/ffi/api/ffi.h"\n',
        "common/ffi_params.cuh": "params",
        "fa2/kernel.cuh": '#include "../common/ffi_params.cuh"\n',
        "fa3/kernel.cuh": '#include "pipeline.cuh"\n',
        "fa3/pipeline.cuh": "pipeline",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(build, "CSRC", tmp_path)
    before = build.source_hash((), "fa2"), build.source_hash((), "fa3")
    (tmp_path / "common" / "ffi_params.cuh").write_text("changed")  # included by both, through common/ and fa2/
    shared = build.source_hash((), "fa2"), build.source_hash((), "fa3")
    assert shared[0] != before[0] and shared[1] != before[1]
    (tmp_path / "fa3" / "pipeline.cuh").write_text("changed")  # fa3's own, two includes deep
    assert build.source_hash((), "fa2") == shared[0] and build.source_hash((), "fa3") != shared[1]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("paged,kv_layout", [(False, "NHD"), (True, "NHD"), (True, "HND")])
def test_lowers_for_cuda(name, paged, kv_layout, rng):
    qo_lens, kv_lens, page_size = [5, 0, 130], [9, 4, 40], 16
    variant = AttentionVariant(causal=True, window_left=7, logits_soft_cap=30.0)
    if paged:
        kv = make_paged_kv(rng, kv_lens, page_size, 2, 64, jnp.bfloat16, kv_layout)
        spec = BatchSpec.create(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len,
                                page_size=page_size, num_qo_heads=8, num_kv_heads=2, head_dim=64, variant=variant)
        k = jax.ShapeDtypeStruct(kv.cache[0].shape, jnp.bfloat16)
    else:
        spec = ragged_spec(qo_lens, kv_lens, 8, 2, 64, variant)
        k = jax.ShapeDtypeStruct((sum(kv_lens), 2, 64), jnp.bfloat16)
    backend = get_backend(name)
    plan = backend.plan(spec, PlanCapacity())
    q = jax.ShapeDtypeStruct((sum(qo_lens), 8, 64), jnp.bfloat16)
    fn = jax.jit(lambda p, q, k, v: backend.run(p, q, k, v, kv_layout=kv_layout, return_lse=True))
    target = ops.TARGETS[name]
    exported = jax.export.export(fn, platforms=["cuda"],
                                 disabled_checks=[DisabledSafetyCheck.custom_call(target)])(plan, q, k, k)
    text = exported.mlir_module()
    assert f"@{target}" in text
    assert "window_left = 7 : i32" in text and "causal = true" in text
    assert f"kv_layout_hnd = {'true' if kv_layout == 'HND' else 'false'}" in text
    assert "has_sinks = false" in text
    assert [o.shape for o in exported.out_avals] == [(135, 8, 64), (135, 8)]


@pytest.mark.parametrize("name", BACKENDS)
def test_lowers_with_sinks(name):
    """Sinks go to the kernels (their epilogue joins them) as sinks * log2(e), an [Hq] float32
    operand with has_sinks = true; no elementwise pass over o follows the call."""
    spec = ragged_spec([5, 130], [9, 40], 8, 2, 64, AttentionVariant(causal=True))
    backend = get_backend(name)
    plan = backend.plan(spec, PlanCapacity())
    q = jax.ShapeDtypeStruct((135, 8, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((49, 2, 64), jnp.bfloat16)
    sinks = jax.ShapeDtypeStruct((8,), jnp.float32)
    fn = jax.jit(lambda p, q, k, v, s: backend.run(p, q, k, v, return_lse=True, sinks=s))
    target = ops.TARGETS[name]
    exported = jax.export.export(fn, platforms=["cuda"],
                                 disabled_checks=[DisabledSafetyCheck.custom_call(target)])(plan, q, k, k, sinks)
    text = exported.mlir_module()
    assert "has_sinks = true" in text
    call = next(line for line in text.splitlines() if f"@{target}" in line)
    assert "tensor<8xf32>" in call.split("->")[0]  # the sinks operand
    assert "stablehlo.exponential" not in text and "exp2" not in text  # no sink epilogue in JAX
    assert [o.shape for o in exported.out_avals] == [(135, 8, 64), (135, 8)]
    with pytest.raises(ValueError, match="sinks_log2"):
        ops.flash_forward(jnp.zeros((4, 8, 64), jnp.bfloat16), jnp.zeros((4, 2, 64), jnp.bfloat16),
                          jnp.zeros((4, 2, 64), jnp.bfloat16), *(jnp.zeros(n, jnp.int32) for n in (2, 2, 1, 1, 1, 1)),
                          causal=False, window_left=-1, logits_soft_cap=None, sm_scale=0.1, page_size=1, paged=False,
                          kernel=name, sinks_log2=jnp.zeros(4, jnp.float32))


def test_wrapper_checks_shapes():
    backend = get_backend("fa2")
    plan = backend.plan(ragged_spec([4], [4], 4, 2, 128, AttentionVariant()), PlanCapacity())
    q = jnp.zeros((4, 4, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="q must be"):
        backend.run(plan, q[:, :2], q[:, :2], q[:, :2], kv_layout="NHD", return_lse=False)
    with pytest.raises(ValueError, match="kv heads"):
        backend.run(plan, q, q, q, kv_layout="NHD", return_lse=False)
    with pytest.raises(ValueError, match="k, v must match"):
        backend.run(plan, q, q[:, :2], q[:, :2].astype(jnp.float16), kv_layout="NHD", return_lse=False)


def test_plan_is_static_and_longest_tiles_first():
    backend = get_backend("fa2")
    cap = PlanCapacity(max_batch_size=4, max_qo_len=512, max_kv_len=1024)
    variant = AttentionVariant(causal=True)
    p1 = backend.plan(ragged_spec([300, 7], [300, 1000], 4, 4, 128, variant), cap)
    p2 = backend.plan(ragged_spec([1, 2, 3], [5, 6, 7], 4, 4, 128, variant), cap)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    assert [a.shape for a in jax.tree.leaves(p1)] == [a.shape for a in jax.tree.leaves(p2)]
    tiles = [(int(b), int(s)) for b, s in zip(p1.tile_batch, p1.tile_qstart) if b >= 0]
    bm = BLOCK_M["fa2"][128]
    # Request 1 (7 queries over 1000 keys) sees the most keys; request 0's causal tiles then in
    # decreasing order of their last row.
    assert tiles == [(1, 0)] + [(0, s) for s in sorted(range(0, 300, bm), reverse=True)]


@pytest.mark.parametrize(
    "variant_kwargs,d,dtype,match",
    [
        (dict(pos_encoding_mode="ALIBI"), 128, jnp.bfloat16, "pos_encoding_mode"),
        (dict(pos_encoding_mode="ROPE_LLAMA"), 128, jnp.bfloat16, "pos_encoding_mode"),
        (dict(logits_transform=lambda x, *a: x), 128, jnp.bfloat16, "callables"),
        (dict(use_softmax=False), 128, jnp.bfloat16, "use_softmax"),
        (dict(), 96, jnp.bfloat16, "head_dim"),
        (dict(), 128, jnp.float32, "bfloat16 or float16"),
    ],
)
@pytest.mark.parametrize("name", BACKENDS)
def test_unsupported_reasons(name, variant_kwargs, d, dtype, match):
    spec = ragged_spec([3], [3], 2, 2, d, AttentionVariant(**variant_kwargs), dtype)
    assert match in get_backend(name).unsupported(spec)


@pytest.mark.parametrize("name", BACKENDS)
def test_unsupported_custom_mask_and_cpu(name):
    spec = ragged_spec([2], [3], 2, 2, 64, AttentionVariant())
    masked = BatchSpec.create(indptr_of([2]), indptr_of([3]), None, None, page_size=1, num_qo_heads=2,
                              num_kv_heads=2, head_dim=64, variant=AttentionVariant(), custom_mask=np.ones(6, bool))
    assert "custom_mask" in get_backend(name).unsupported(masked)
    if device.gpu_arch() is None:
        assert "GPU" in get_backend(name).unsupported(spec)


# ---------------------------------------------------------------- GPU: against the float64 reference


def _run_poisoned(backend, plan, q, k, v, kv_layout):
    """Run twice: first on NaN inputs (leaves NaN in XLA's reused output buffers), then for real."""
    fn = jax.jit(lambda p, q, k, v: backend.run(p, q, k, v, kv_layout=kv_layout, return_lse=True))
    nan = lambda a: jnp.full_like(a, jnp.nan)  # noqa: E731
    jax.block_until_ready(fn(plan, nan(q), nan(k), nan(v)))
    return fn(plan, q, k, v)


@pytest.fixture(params=BACKENDS)
def gpu_backend(request):
    """Each FFI backend, skipped where the device cannot run it (fa3: sm_90 only)."""
    cc = device.gpu_arch()
    if cc is not None:
        try:
            build.kernel_arch(request.param, cc)
        except ValueError as e:
            pytest.skip(str(e))
    return get_backend(request.param)


def _check_ragged(backend, rng, qo_lens, kv_lens, hq, hkv, d, dtype, **variant_kwargs):
    variant = AttentionVariant(**variant_kwargs)
    q = rand(rng, (sum(qo_lens), hq, d), dtype)
    k = rand(rng, (sum(kv_lens), hkv, d), dtype)
    v = rand(rng, (sum(kv_lens), hkv, d), dtype)
    spec = ragged_spec(qo_lens, kv_lens, hq, hkv, d, variant, dtype)
    assert backend.unsupported(spec) is None
    o, lse = _run_poisoned(backend, backend.plan(spec, PlanCapacity()), q, k, v, "NHD")
    kv_ptr = indptr_of(kv_lens)
    ks = [k[kv_ptr[b]:kv_ptr[b + 1]] for b in range(len(kv_lens))]
    vs = [v[kv_ptr[b]:kv_ptr[b + 1]] for b in range(len(kv_lens))]
    o_ref, lse_ref = ref_batch(q, ks, vs, indptr_of(qo_lens), **variant_kwargs)
    assert_close(o, o_ref, dtype, "o")
    assert_close(lse, lse_ref, dtype, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_ragged_causal(gpu_backend, rng, d, dtype):
    # Unequal lengths, a request with qo_len > kv_len, an empty request, tiles with a ragged tail.
    _check_ragged(gpu_backend, rng, [130, 1, 0, 40, 257], [300, 77, 5, 17, 257], 8, 2, d, dtype, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_gqa_noncausal(gpu_backend, rng, group):
    _check_ragged(gpu_backend, rng, [65, 200, 3], [129, 64, 0], 8, 8 // group, 128, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
def test_gpu_window_soft_cap(gpu_backend, rng, d):
    _check_ragged(gpu_backend, rng, [100, 333], [250, 333], 4, 2, d, jnp.bfloat16, causal=True, window_left=45,
                  logits_soft_cap=20.0, sm_scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_long_kv(gpu_backend, rng, d):
    # Enough KV tiles to cycle the K/V ring several times (fa3: mbarrier phases wrap).
    _check_ragged(gpu_backend, rng, [300, 129], [1500, 1100], 4, 4, d, jnp.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("d,variant_kwargs", [(128, {}), (64, dict(window_left=100, logits_soft_cap=20.0))])
def test_gpu_many_items_per_cta(gpu_backend, rng, d, variant_kwargs):
    # 16 tiles x 32 heads = 512 work items, more than 3 per CTA of fa3's persistent grid (132 SMs):
    # the item boundary, where fa3 issues the next item's first Q K^T with the last P V, runs
    # between tiles of different requests and heads, and before and after items with no visible
    # key (the kv_len = 0 request, and the first tile of the qo_len > kv_len one).
    _check_ragged(gpu_backend, rng, [1000, 300, 260, 200], [1000, 0, 900, 70], 32, 8, d, jnp.bfloat16,
                  causal=True, **variant_kwargs)


@pytest.mark.gpu
def test_gpu_window_noncausal(gpu_backend, rng):
    _check_ragged(gpu_backend, rng, [90, 7], [190, 300], 4, 4, 128, jnp.float16, window_left=31)


@pytest.mark.gpu
# fa3 loads pages of a power-of-2 size >= 8 by TMA, a box per page of a KV tile (8, 16, 64), or
# several tiles per page (256: each tile's box starts inside its page); other pages by cp.async.
@pytest.mark.parametrize("page_size,kv_layout", [(1, "NHD"), (5, "HND"), (8, "NHD"), (16, "NHD"), (16, "HND"),
                                                 (64, "HND"), (256, "NHD")])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_paged(gpu_backend, rng, page_size, kv_layout, d):
    # kv_len 300: whole tiles past the first of a 256-row page, then one crossing kv_len.
    qo_lens, kv_lens, hq, hkv, dtype = [17, 0, 150, 1], [200, 33, 150, 300], 8, 2, jnp.bfloat16
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype, kv_layout)
    q = rand(rng, (sum(qo_lens) + 3, hq, d), dtype)  # 3 rows past the batch: o = 0, lse = -inf
    backend = gpu_backend
    spec = BatchSpec.create(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len,
                            page_size=page_size, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                            variant=AttentionVariant(causal=True), q_dtype=dtype)
    o, lse = _run_poisoned(backend, backend.plan(spec, PlanCapacity(max_batch_size=8)), q, *kv.cache, kv_layout)
    o_ref, lse_ref = ref_batch(q[: sum(qo_lens)], kv.k_list, kv.v_list, indptr_of(qo_lens), causal=True)
    o_ref = np.concatenate([o_ref, np.zeros((3, hq, d))])
    lse_ref = np.concatenate([lse_ref, np.full((3, hq), -np.inf)])
    assert_close(o, o_ref, dtype, "o")
    assert_close(lse, lse_ref, dtype, "lse")


@pytest.mark.gpu
def test_gpu_vmap_sequential(gpu_backend, rng):
    qo_lens, kv_lens, d = [33, 70], [33, 90], 64
    backend = gpu_backend
    plan = backend.plan(ragged_spec(qo_lens, kv_lens, 4, 4, d, AttentionVariant(causal=True)), PlanCapacity())
    q = rand(rng, (2, sum(qo_lens), 4, d), jnp.bfloat16)
    k = rand(rng, (2, sum(kv_lens), 4, d), jnp.bfloat16)
    v = rand(rng, (2, sum(kv_lens), 4, d), jnp.bfloat16)
    o = jax.vmap(lambda q, k, v: backend.run(plan, q, k, v, kv_layout="NHD", return_lse=False)[0])(q, k, v)
    kp = indptr_of(kv_lens)
    for i in range(2):
        ks = [k[i, kp[b]:kp[b + 1]] for b in range(2)]
        vs = [v[i, kp[b]:kp[b + 1]] for b in range(2)]
        assert_close(o[i], ref_batch(q[i], ks, vs, indptr_of(qo_lens), causal=True)[0], jnp.bfloat16)


def test_no_gpu_means_nothing_is_built(monkeypatch):
    if device.gpu_arch() is not None:
        pytest.skip("a GPU is present")
    monkeypatch.setattr(shutil, "which", lambda *_: pytest.fail("unsupported() looked for nvcc on CPU"))
    assert get_backend("fa2").unsupported(ragged_spec([1], [1], 1, 1, 64, AttentionVariant())) is not None
