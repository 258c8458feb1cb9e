"""Deviceless Triton lowering of the Pallas kernels under an abstract H100 (shared/DESIGN.md sec. 6).

Interpret mode does not check what Triton needs (power-of-2 tensors, supported primitives,
pointer layouts); exporting for ``cuda`` runs the real Pallas-to-Triton lowering without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.backends.pallas.attention import KernelSpec, attention
from jaxinfer.backends.pallas.config import TileConfig, candidate_configs
from jaxinfer.backends.pallas.merge import force_triton_lowering, merge_state, merge_states
from jaxinfer.variants import AttentionVariant

S = jax.ShapeDtypeStruct


def _export_cuda(f, *args):
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        exp = jax.export.export(
            jax.jit(f), platforms=["cuda"], disabled_checks=[DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)]
        )(*args)
    text = exp.mlir_module()
    assert pltriton.CUSTOM_CALL_TARGET_NAME in text
    return text


def _kv_shapes(mode, hkv, d, dtype):
    if mode == "ragged":
        return S((1000, hkv, d), dtype)
    return S((300, 16, hkv, d), dtype) if mode == "NHD" else S((300, hkv, 16, d), dtype)


def _spec(d, mode, masks, hkv, group, **extra):
    """A kernel spec of the mode (``"NHD"``/``"HND"``/``"ragged"``); ``masks`` turns on causal,
    window, soft cap and split-KV slots."""
    return KernelSpec(
        paged=mode != "ragged", kv_layout="HND" if mode == "HND" else "NHD", page_size=16 if mode != "ragged" else 1,
        num_qo_heads=hkv * group, num_kv_heads=hkv, head_dim=d, sm_scale=0.1, causal=masks,
        window_left=64 if masks else -1, logits_soft_cap=30.0 if masks else None,
        num_ctas=264, num_slots=1056 if masks else 0, num_groups=528, max_tiles=2048, page_capacity=4096,
        **extra,
    )


# Each (config, head_dim) the heuristic can pick, with a mask/soft-cap combination that varies.
CASES = [(cfg, d, ("NHD", "HND", "ragged")[i % 3], i % 2 == 0) for i, (cfg, d) in enumerate(candidate_configs())]


@pytest.mark.parametrize("cfg,d,mode,masks", CASES, ids=[f"{c.block_m}x{c.block_n}-d{d}-{m}{'-ahead' if c.qk_ahead else ''}{f'-small{c.small_block_m}' if c.small_block_m else ''}" for c, d, m, _ in CASES])
def test_attention_lowers(cfg, d, mode, masks):
    hkv, group = 2, max(1, min(cfg.block_m // 2, 8))
    ks = _spec(d, mode, masks, hkv, group)
    dtype = jnp.bfloat16 if masks else jnp.float16
    kv = _kv_shapes(mode, hkv, d, dtype)
    args = (S((ks.buffer_size,), jnp.int32), S((77, hkv * group, d), dtype), kv, kv)
    text = _export_cuda(lambda *a: attention(*a, ks=ks, cfg=cfg), *args)
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == (2 if masks else 1)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


SIGMOID = AttentionVariant(logits_transform=lambda x, qp, kp, qh, kh: _sigmoid(x + 0.1 * qh), use_softmax=False)
ALL_CALLABLES = AttentionVariant(
    logits_transform=lambda x, qp, kp, qh, kh: x - 0.01 * (qp - kp),
    logits_mask=lambda qp, kp, qh, kh: (kp % 4 != 3) | (qh == kh),
    query_transform=_rms,
    key_transform=_rms,
    output_transform=lambda o, lse, qp, qh: o * _sigmoid(lse * 0.69 - 0.5 * qh)[..., None],
)
# Every variant flag on at least once: (name, kernel-spec fields, with a custom mask).
VARIANTS = [
    ("alibi-causal", dict(pos_encoding_mode="ALIBI", causal=True, logits_soft_cap=30.0), False),
    ("rope-window", dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, window_left=64), False),
    ("custom-mask", dict(causal=True), True),
    ("callables-rope", dict(pos_encoding_mode="ROPE_LLAMA", callables=ALL_CALLABLES), True),
    ("sigmoid-no-softmax", dict(use_softmax=False, callables=SIGMOID, pos_encoding_mode="ALIBI"), False),
]
VARIANT_CFGS = [TileConfig(16, 64, 4, 3), TileConfig(128, 64, 8, 3), TileConfig(64, 32, 4, 2, qk_ahead=True)]


@pytest.mark.parametrize("cfg", VARIANT_CFGS, ids=lambda c: f"{c.block_m}x{c.block_n}{'-ahead' if c.qk_ahead else ''}")
@pytest.mark.parametrize("name,fields,with_mask", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_attention_variants_lower(cfg, name, fields, with_mask):
    hkv, group, d = 2, 4, 128
    base = dict(causal=False, window_left=-1, logits_soft_cap=None)
    base.update(fields)
    ks = KernelSpec(
        paged=True, kv_layout="NHD", page_size=16, num_qo_heads=hkv * group, num_kv_heads=hkv, head_dim=d,
        sm_scale=0.1, num_ctas=264, num_slots=1056, num_groups=528, max_tiles=2048,
        page_capacity=4096, custom_mask=with_mask, **base,
    )
    kv = _kv_shapes("NHD", hkv, d, jnp.bfloat16)
    args = [S((ks.buffer_size,), jnp.int32), S((77, hkv * group, d), jnp.bfloat16), kv, kv]
    if with_mask:
        args.append(S((1 << 16,), jnp.int8))
    text = _export_cuda(lambda *a: attention(*a, ks=ks, cfg=cfg), *args)
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2


def test_merge_kernels_lower():
    _export_cuda(merge_states, S((100, 3, 5, 96), jnp.bfloat16), S((100, 3, 5), jnp.float32))
    _export_cuda(merge_state, S((70, 4, 128), jnp.float16), S((70, 4), jnp.float32), S((70, 4, 128), jnp.float16), S((70, 4), jnp.float32))


@pytest.mark.parametrize("plan_varies", [False, True], ids=["tp-plan-replicated", "dp-plan-per-device"])
def test_attention_lowers_under_shard_map_check_vma(plan_varies):
    """On a 4-GPU abstract mesh with shard_map's varying-axes check on: the kernel's outputs
    declare the axes its operands vary over (jaxinfer/backends/vma.py); without that, pallas_call
    rejects the out_shape. Heads split (a replicated plan) or batches split (a plan per device)."""
    mesh = AbstractMesh((4,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 132, "cuda"))
    cfg, d = candidate_configs()[0]
    ks = _spec(d, "NHD", True, 2, 4)  # per device: 2 KV heads of 8 query heads
    plan = P("x") if plan_varies else P()
    rows, cache = (P("x"), P("x")) if plan_varies else (P(None, "x", None), P(None, None, "x", None))
    f = jax.shard_map(lambda b, q, k, v: attention(b, q, k, v, ks=ks, cfg=cfg)[0], mesh=mesh,
                      in_specs=(plan, rows, cache, cache), out_specs=rows, check_vma=True)
    n = 4 if plan_varies else 1
    hq, hkv = (8, 2) if plan_varies else (32, 8)
    args = (S((n * ks.buffer_size,), jnp.int32, sharding=NamedSharding(mesh, plan)),
            S((4 * 77, hq, d), jnp.bfloat16, sharding=NamedSharding(mesh, rows)),
            *[S((4 * 300, 16, hkv, d), jnp.bfloat16, sharding=NamedSharding(mesh, cache))] * 2)
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                                disabled_checks=[DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*args)
    assert exp.nr_devices == 4
    assert exp.mlir_module().count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2  # attention + merge


# Every (config, head_dim) the heuristic can pick for an fp8 cache, with the fp8 dtypes, bf16/fp16
# q, the three KV forms and scales (the kernel's kv_scales input) on and off varying over them.
FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
FP8_CASES = [
    (cfg, d, ("NHD", "HND", "ragged")[i % 3], i % 2 == 0, FP8[i // 2 % 2], i % 5 < 3)
    for i, (cfg, d) in enumerate(candidate_configs(kv_itemsize=1))
]


@pytest.mark.parametrize(
    "cfg,d,mode,masks,kv_dtype,scales", FP8_CASES,
    ids=[f"{c.block_m}x{c.block_n}-d{d}-{m}-{jnp.dtype(t).name}{'-scales' if s else ''}"
         for c, d, m, _, t, s in FP8_CASES],
)
def test_attention_fp8_lowers(cfg, d, mode, masks, kv_dtype, scales):
    hkv, group = 2, max(1, min(cfg.block_m // 2, 8))
    ks = _spec(d, mode, masks, hkv, group, kv_scales=scales)
    q_dtype = jnp.bfloat16 if masks else jnp.float16
    kv = _kv_shapes(mode, hkv, d, kv_dtype)
    args = [S((ks.buffer_size,), jnp.int32), S((77, hkv * group, d), q_dtype), kv, kv]
    extra = (S((2 * hkv,), jnp.float32),) if scales else ()
    text = _export_cuda(lambda buf, q, k, v, *sc: attention(buf, q, k, v, None, *sc, ks=ks, cfg=cfg), *args, *extra)
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == (2 if masks else 1)
    # The cache reaches the kernel as fp8 (one byte per element), not as a widened copy.
    fp8_name = {jnp.dtype(jnp.float8_e4m3fn): "f8E4M3FN", jnp.dtype(jnp.float8_e5m2): "f8E5M2"}[jnp.dtype(kv_dtype)]
    assert f"x{d}x{fp8_name}>" in text


FP8_VARIANTS = [(VARIANT_CFGS[i % len(VARIANT_CFGS)], *v) for i, v in enumerate(VARIANTS)]


@pytest.mark.parametrize("cfg,name,fields,with_mask", FP8_VARIANTS,
                         ids=[f"{v[1]}-{v[0].block_m}x{v[0].block_n}" for v in FP8_VARIANTS])
def test_attention_fp8_variants_lower(cfg, name, fields, with_mask):
    """The variants' paths that widen fp8 tiles differently (RoPE halves, key transforms in float32,
    no softmax) lower with an e4m3 cache and per-head scales."""
    hkv, group, d = 2, 4, 128
    base = dict(causal=False, window_left=-1, logits_soft_cap=None)
    base.update(fields)
    ks = KernelSpec(
        paged=True, kv_layout="NHD", page_size=16, num_qo_heads=hkv * group, num_kv_heads=hkv, head_dim=d,
        sm_scale=0.1, num_ctas=264, num_slots=1056, num_groups=528, max_tiles=2048,
        page_capacity=4096, custom_mask=with_mask, kv_scales=True, **base,
    )
    kv = _kv_shapes("NHD", hkv, d, jnp.float8_e4m3fn)
    mask = (S((1 << 16,), jnp.int8),) if with_mask else ()

    def run(buf, q, k, v, *rest):  # rest: (mask,) scales
        return attention(buf, q, k, v, rest[0] if with_mask else None, rest[-1], ks=ks, cfg=cfg)

    text = _export_cuda(run, S((ks.buffer_size,), jnp.int32), S((77, hkv * group, d), jnp.bfloat16), kv, kv, *mask,
                        S((2 * hkv,), jnp.float32))
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2
