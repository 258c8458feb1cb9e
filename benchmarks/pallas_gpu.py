"""GPU check and timing of the Pallas backend (run on the H100: ``PYTHONPATH=. python3 benchmarks/pallas_gpu.py``).

For each workload: builds a random bf16 paged cache (shuffled pages) or ragged KV on the device,
checks the kernel against a float32 reference on sampled requests (``||o - ref|| / ||ref||``),
then times the Pallas backend with and without split-KV and cuDNN / XLA
``jax.nn.dot_product_attention`` on the dense equivalent. Variant workloads: decode_uniform with
in-kernel ROPE_LLAMA against the same call without it (target <= 1.1x), and block-sparse
attention M=N=8192, Hq=Hkv=32 at 10 % density with R=C=64 against vector-sparse R=64, C=1
(target: C=1 at >= 80 % of the C=64 throughput). Also measures the two ceilings
(device-to-device copy bandwidth, bf16 matmul rate) and the host planner. Prints a table last;
writes ``$OUT/pallas_gpu.json`` when ``OUT`` is set.

Timing: a jitted step dispatched ``iters`` times back to back, synchronised once, median over
``reps`` repeats (JAX's dispatch is asynchronous, so launches overlap the previous step).

Sweeps (skipped with ``--no-sweep``) time tile configs and grids (for prefill, the backend's
one-tile-per-CTA (request, KV head)-major grid against the persistent one), each output compared
with the first variant's. ``--compile-only`` compiles the
decode_rope and prefill kernels without running them, under names of their own, for XLA's dumps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import timeit

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer.bench.harness import median_seconds
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.plan.planner import plan_work
from jaxinfer.backends.xla import apply_rope_rotate_half
from jaxinfer.variants import AttentionVariant

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = jnp.bfloat16


def bench(f, *args, iters=20, reps=7):
    """Median seconds per call of ``f(*args)`` (see module doc)."""
    return median_seconds(f, *args, iters=iters, reps=reps, warmup=1)


def copy_bandwidth():
    x = jax.random.normal(jax.random.key(0), (1 << 30,), DT)  # 2 GiB
    f = jax.jit(lambda a: a * 2)
    t = bench(f, x, iters=10)
    return 2 * x.nbytes / t


def matmul_rate():
    a = jax.random.normal(jax.random.key(1), (8192, 8192), DT)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), DT)
    t = bench(jax.jit(lambda a, b: a @ b), a, b, iters=10)
    return 2 * 8192**3 / t


def decode_batch(kv_lens, rng):
    kv_lens = np.asarray(kv_lens, np.int64)
    n_pages = -(-kv_lens // PAGE)
    kv_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    num_pages = int(n_pages.sum()) + 8
    kv_indices = rng.permutation(num_pages)[: kv_indptr[-1]].astype(np.int32)
    last = (kv_lens - PAGE * (n_pages - 1)).astype(np.int32)
    b = kv_lens.size
    spec = BatchSpec.create(np.arange(b + 1), kv_indptr, kv_indices, last, page_size=PAGE, num_qo_heads=HQ,
                            num_kv_heads=HKV, head_dim=D, variant=AttentionVariant(), q_dtype=DT)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    q = jax.random.normal(keys[0], (b, HQ, D), DT)
    k = jax.random.normal(keys[1], (num_pages, PAGE, HKV, D), DT)
    v = jax.random.normal(keys[2], (num_pages, PAGE, HKV, D), DT)
    return spec, q, k, v


def _ref_one(q, k, v, causal, rope: AttentionVariant | None = None):
    """float32 attention of one request: q [Lq,Hq,D], k/v [Lk,Hkv,D] -> (o, lse base 2); ``rope``:
    a ROPE_LLAMA variant whose rotation is applied to q and k first."""
    if rope is not None:
        lq, lk = q.shape[0], k.shape[0]
        q = apply_rope_rotate_half(q.astype(jnp.float32), jnp.arange(lq) + lk - lq, rope)
        k = apply_rope_rotate_half(k.astype(jnp.float32), jnp.arange(lk), rope)
    g = q.shape[1] // k.shape[1]
    k = jnp.repeat(k.astype(jnp.float32), g, axis=1)
    v = jnp.repeat(v.astype(jnp.float32), g, axis=1)
    s = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k, precision="highest") / np.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        s = jnp.where(jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + lk - lq, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("hqk,khd->qhd", jnp.exp(s - lse[..., None]), v, precision="highest")
    return o, (lse / np.log(2)).T


def check_decode(spec, q, k, v, o, lse, sample, rope=None):
    errs = []
    for b in sample:
        pages = spec.kv_indices[spec.kv_indptr[b] : spec.kv_indptr[b + 1]]
        n = int(spec.kv_lens[b])
        kb = k[pages].reshape(-1, HKV, D)[:n]
        vb = v[pages].reshape(-1, HKV, D)[:n]
        o_ref, lse_ref = _ref_one(q[b : b + 1], kb, vb, False, rope)
        errs.append(_errs(o[b : b + 1], lse[b : b + 1], o_ref, lse_ref))
    return max(e[0] for e in errs), max(e[1] for e in errs)


def _errs(o, lse, o_ref, lse_ref):
    o = np.asarray(o, np.float32)
    o_ref = np.asarray(o_ref)
    rel = float(np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref))
    assert not np.isnan(o).any()
    return rel, float(np.abs(np.asarray(lse) - np.asarray(lse_ref)).max())


def cudnn_decode(spec, q, k, impl):
    """``jax.nn.dot_product_attention`` on the dense equivalent (uniform lengths only)."""
    b, n = spec.batch_size, int(spec.kv_lens.max())
    kd = jax.random.normal(jax.random.key(5), (b, n, HKV, D), DT)
    vd = jax.random.normal(jax.random.key(6), (b, n, HKV, D), DT)
    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation=impl))
    return bench(f, q, kd, vd)


def run_decode(name, kv_lens, rng, rows, bw):
    spec, q, k, v = decode_batch(kv_lens, rng)
    kv_bytes = 2 * int(spec.kv_lens.sum()) * HKV * D * 2
    res = {"workload": name, "B": spec.batch_size, "kv_tokens": int(spec.kv_lens.sum()), "kv_bytes": kv_bytes}
    for label, be in (("split", PallasBackend()), ("nosplit", PallasBackend(split_factor=0))):
        plan = be.plan(spec, PlanCapacity())
        f = jax.jit(lambda p, q, k, v, be=be: be.run(p, q, k, v, kv_layout="NHD", return_lse=True))
        o, lse = f(plan, q, k, v)
        sample = sorted({0, spec.batch_size // 2, spec.batch_size - 1, int(np.argmax(spec.kv_lens))})
        res[f"{label}_rel_err"], res[f"{label}_lse_err"] = check_decode(spec, q, k, v, o, lse, sample)
        t = bench(f, plan, q, k, v)
        res[f"{label}_us"] = t * 1e6
        res[f"{label}_TBps"] = kv_bytes / t / 1e12
        res[f"{label}_tiles"] = int(plan.unpack()["cta_indptr"][-1])
    res["floor_us"] = kv_bytes / bw * 1e6
    if len(set(spec.kv_lens.tolist())) == 1:
        for impl in ("cudnn", "xla"):
            try:
                t = cudnn_decode(spec, q, k, impl)
                res[f"{impl}_us"], res[f"{impl}_TBps"] = t * 1e6, kv_bytes / t / 1e12
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                res[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    rows.append(res)
    print(json.dumps(res), flush=True)


# Tile configs of decode_rope: the heuristic's and 2 pipeline stages (the rotated keys and
# their cos/sin raise the register count; fewer stages hold fewer prefetched index tensors).
ROPE_CONFIGS = {"default": None, "bm16_bn64_w4_s2_c396": TileConfig(16, 64, 4, 2, ctas_per_sm=3)}


def run_decode_rope(rows, bw, B=64, kv_len=4096):
    """decode_uniform with ROPE_LLAMA fused into the kernel vs the same batch and tile config
    without RoPE, for each of ``ROPE_CONFIGS``."""
    spec, q, k, v = decode_batch(np.full(B, kv_len), np.random.default_rng(3))
    kv_bytes = 2 * int(spec.kv_lens.sum()) * HKV * D * 2
    rope_variant = AttentionVariant(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5)
    for cfg_label, cfg in ROPE_CONFIGS.items():
        res = {"workload": "decode_rope", "config_label": cfg_label, "B": B, "kv_len": kv_len, "kv_bytes": kv_bytes}
        be = PallasBackend(config=cfg)
        f = jax.jit(lambda p, q, k, v, be=be: be.run(p, q, k, v, kv_layout="NHD", return_lse=True))
        for label, variant in (("plain", AttentionVariant()), ("rope", rope_variant)):
            plan = be.plan(dataclasses.replace(spec, variant=variant), PlanCapacity())
            o, lse = f(plan, q, k, v)
            rope = variant if variant.pos_encoding_mode == "ROPE_LLAMA" else None
            res[f"{label}_rel_err"], res[f"{label}_lse_err"] = check_decode(spec, q, k, v, o, lse, [0, B - 1], rope)
            t = bench(f, plan, q, k, v)
            res[f"{label}_us"], res[f"{label}_TBps"] = t * 1e6, kv_bytes / t / 1e12
            res["config"] = str(plan.config)
        res["rope_over_plain"] = res["rope_us"] / res["plain_us"]
        res["floor_us"] = kv_bytes / bw * 1e6
        rows.append(res)
        print(json.dumps(res), flush=True)


def _bsr(rng, M, N, R, C, keys_per_row):
    """BSR of ``keys_per_row`` random keys (``keys_per_row / C`` column blocks) per block row."""
    mb, nb, per = M // R, N // C, keys_per_row // C
    indices = np.concatenate([np.sort(rng.choice(nb, per, replace=False)) for _ in range(mb)]).astype(np.int32)
    return np.arange(mb + 1, dtype=np.int32) * per, indices


def run_block_sparse(rows, M=8192, N=8192, H=32, density=0.1):
    """Block-sparse (R=C=64) vs vector-sparse (R=64, C=1) at equal density, no mask inside blocks."""
    keys_per_row = int(round(density * N / 64)) * 64
    kk = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(kk[0], (M, H, D), DT)
    k = jax.random.normal(kk[1], (N, H, D), DT)
    v = jax.random.normal(kk[2], (N, H, D), DT)
    flops = 4 * M * H * D * keys_per_row
    res = {"workload": "block_sparse", "M": M, "N": N, "H": H, "keys_per_row": keys_per_row, "flops": flops}
    rng = np.random.default_rng(4)
    for R, C in ((64, 64), (64, 1)):
        indptr, indices = _bsr(rng, M, N, R, C, keys_per_row)
        w = jaxinfer.BlockSparseAttentionWrapper(backend="pallas")
        plan = w.plan(indptr, indices, M, N, R, C, H, H, D, q_data_type=DT)
        f = jax.jit(lambda q, k, v, p: jaxinfer.sparse.batch_block_sparse(q, k, v, p, return_lse=True))
        o, lse = f(q, k, v, plan)
        cols = (indices[: indptr[1]][:, None] * C + np.arange(C)[None, :]).reshape(-1)
        o_ref, lse_ref = _ref_one(q[:R], k[cols], v[cols], False)
        label = f"R{R}_C{C}"
        res[f"{label}_rel_err"], res[f"{label}_lse_err"] = _errs(o[:R], lse[:R], o_ref, lse_ref)
        t = bench(f, q, k, v, plan, iters=10)
        res[f"{label}_us"], res[f"{label}_TFLOPs"] = t * 1e6, flops / t / 1e12
        res[f"{label}_config"] = str(plan.inner.config)
    res["C1_over_C64_throughput"] = res["R64_C64_us"] / res["R64_C1_us"]
    rows.append(res)
    print(json.dumps(res), flush=True)


def run_prefill(rows, mm_rate, B=4, S=4096, H=32):
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (B * S, H, D), DT)
    k = jax.random.normal(keys[1], (B * S, H, D), DT)
    v = jax.random.normal(keys[2], (B * S, H, D), DT)
    indptr = np.arange(B + 1) * S
    spec = BatchSpec.create(indptr, indptr, None, None, page_size=1, num_qo_heads=H, num_kv_heads=H, head_dim=D,
                            variant=AttentionVariant(causal=True), q_dtype=DT)
    flops = 4 * B * H * D * S * S / 2
    res = {"workload": "prefill_causal", "B": B, "S": S, "flops": flops, "floor_us": flops / mm_rate * 1e6}
    for label, be in (("split", PallasBackend()), ("nosplit", PallasBackend(split_factor=0))):
        plan = be.plan(spec, PlanCapacity())
        f = jax.jit(lambda p, q, k, v, be=be: be.run(p, q, k, v, kv_layout="NHD", return_lse=True))
        o, lse = f(plan, q, k, v)
        o_ref, lse_ref = _ref_one(q[:S], k[:S], v[:S], True)
        res[f"{label}_rel_err"], res[f"{label}_lse_err"] = _errs(o[:S], lse[:S], o_ref, lse_ref)
        t = bench(f, plan, q, k, v, iters=5)
        res[f"{label}_us"], res[f"{label}_TFLOPs"] = t * 1e6, flops / t / 1e12
        res[f"{label}_config"] = str(plan.config)
    qd, kd, vd = (x.reshape(B, S, H, D) for x in (q, k, v))
    for impl in ("cudnn", "xla"):
        try:
            f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
            t = bench(f, qd, kd, vd, iters=5)
            res[f"{impl}_us"], res[f"{impl}_TFLOPs"] = t * 1e6, flops / t / 1e12
        except Exception as e:  # noqa: BLE001
            res[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    rows.append(res)
    print(json.dumps(res), flush=True)


def sweep(name, spec, q, k, v, variants, unit_amount, unit, sweeps):
    """Time the Pallas backend over ``variants`` (label -> backend) on one batch."""
    first = None
    for label, be in variants.items():
        try:
            plan = be.plan(spec, PlanCapacity())
            f = jax.jit(lambda p, q, k, v, be=be: be.run(p, q, k, v, kv_layout="NHD", return_lse=True))
            o = np.asarray(f(plan, q, k, v)[0], np.float32)
            first = o if first is None else first
            t = bench(f, plan, q, k, v, iters=5 if unit == "TFLOPs" else 20)
            row = {"workload": name, "variant": label, "config": str(plan.config), "num_ctas": plan.kernel.num_ctas,
                   "us": t * 1e6, unit: unit_amount / t / 1e12,
                   "rel_vs_first": float(np.linalg.norm(o - first) / np.linalg.norm(first))}
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
            row = {"workload": name, "variant": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        sweeps.append(row)
        print(json.dumps(row), flush=True)


DECODE_SWEEP = {
    "default": PallasBackend(),
    "bm16_bn64_w4_s2_c396": PallasBackend(config=TileConfig(16, 64, 4, 2, ctas_per_sm=3)),
}
# "kvmajor": the default prefill plan, one CTA per tile in (request, KV head)-major order;
# "c264": the persistent grid of 2 CTAs per SM in the planner's cost order.
PREFILL_SWEEP = {
    "bm128_bn64_w8_s3_kvmajor_ahead": PallasBackend(),
    "bm128_bn64_w8_s3_c264_ahead": PallasBackend(kv_major_grid=False),
    "bm128_bn64_w8_s3_kvmajor": PallasBackend(config=TileConfig(128, 64, 8, 3)),
    "bm128_bn64_w8_s3_c264": PallasBackend(kv_major_grid=False, config=TileConfig(128, 64, 8, 3)),
}


def run_sweeps(sweeps):
    rng = np.random.default_rng(1)
    for name, lens in (("decode_zipf", np.clip(np.random.default_rng(0).zipf(1.5, 64) * 256, 16, 32768)),):
        spec, q, k, v = decode_batch(lens, rng)
        sweep(name, spec, q, k, v, DECODE_SWEEP, 2 * int(spec.kv_lens.sum()) * HKV * D * 2, "TBps", sweeps)
    B, S, H = 4, 4096, 32
    keys = jax.random.split(jax.random.key(9), 3)
    q, k, v = (jax.random.normal(kk, (B * S, H, D), DT) for kk in keys)
    indptr = np.arange(B + 1) * S
    spec = BatchSpec.create(indptr, indptr, None, None, page_size=1, num_qo_heads=H, num_kv_heads=H, head_dim=D,
                            variant=AttentionVariant(causal=True), q_dtype=DT)
    sweep("prefill_causal", spec, q, k, v, PREFILL_SWEEP, 4 * B * H * D * S * S / 2, "TFLOPs", sweeps)


def planner_time():
    """Host time of plan_work and of the full backend.plan (with host-to-device copies), B=256 decode."""
    rng = np.random.default_rng(0)
    spec, *_ = decode_batch(np.full(256, 1024), rng)
    be = PallasBackend()
    cfg = be.tile_config(spec, PlanCapacity())
    kw = be._plan_kwargs(spec, cfg, 4096)
    base = spec.kv_indptr[:-1]
    t_core = min(timeit.repeat(lambda: plan_work(spec.qo_indptr, spec.kv_lens, base, **kw), number=200, repeat=5)) / 200
    zipf = np.clip(rng.zipf(1.5, 256) * 256, 16, 32768)
    t_zipf = min(timeit.repeat(lambda: plan_work(spec.qo_indptr, zipf, base, **kw), number=200, repeat=5)) / 200
    t_full = min(timeit.repeat(lambda: jax.block_until_ready(be.plan(spec, PlanCapacity())), number=50, repeat=5)) / 50
    t_async = min(timeit.repeat(lambda: be.plan(spec, PlanCapacity()), number=50, repeat=5)) / 50
    buf = np.zeros(40000, np.int32)
    t_put = min(timeit.repeat(lambda: jax.block_until_ready(jnp.asarray(buf)), number=50, repeat=5)) / 50
    return {"plan_work_B256_decode_us": t_core * 1e6, "plan_work_B256_zipf_us": t_zipf * 1e6,
            "backend_plan_B256_us": t_full * 1e6, "backend_plan_B256_noblock_us": t_async * 1e6, "device_put_160KB_us": t_put * 1e6}


def compile_kernels():
    """Compile (without running) decode with and without RoPE for each of ``ROPE_CONFIGS`` and the
    default causal prefill, one jitted function each, so that ``XLA_FLAGS=--xla_dump_to=DIR``
    leaves their modules under the functions' names (jaxlib 0.11.2 writes HLO and MLIR there,
    no PTX of the Triton calls)."""
    spec, q, k, v = decode_batch(np.full(64, 4096), np.random.default_rng(3))
    rope_variant = AttentionVariant(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5)
    for cfg_label, cfg in ROPE_CONFIGS.items():
        be = PallasBackend(config=cfg)
        for label, variant in (("plain", AttentionVariant()), ("rope", rope_variant)):
            plan = be.plan(dataclasses.replace(spec, variant=variant), PlanCapacity())

            def run(p, q, k, v, be=be):
                return be.run(p, q, k, v, kv_layout="NHD", return_lse=True)

            run.__name__ = f"decode_{label}_{cfg_label}"
            jax.jit(run).lower(plan, q, k, v).compile()
            print("compiled", run.__name__, plan.config, flush=True)
    B, S, H = 4, 4096, 32
    qd = jax.ShapeDtypeStruct((B * S, H, D), DT)
    indptr = np.arange(B + 1) * S
    spec = BatchSpec.create(indptr, indptr, None, None, page_size=1, num_qo_heads=H, num_kv_heads=H, head_dim=D,
                            variant=AttentionVariant(causal=True), q_dtype=DT)
    be = PallasBackend(split_factor=0)
    plan = be.plan(spec, PlanCapacity())

    def prefill_causal(p, q, k, v):
        return be.run(p, q, k, v, kv_layout="NHD", return_lse=True)

    jax.jit(prefill_causal).lower(plan, qd, qd, qd).compile()
    print("compiled prefill_causal", plan.config, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated workload names")
    ap.add_argument("--no-sweep", "--quick", action="store_true", help="skip the tile-config / CTA-count sweeps")
    ap.add_argument("--compile-only", action="store_true", help="only compile the decode_rope and prefill kernels (for XLA's PTX dump)")
    args = ap.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    if args.compile_only:
        compile_kernels()
        return
    rng = np.random.default_rng(0)
    rows = []
    bw, mm = copy_bandwidth(), matmul_rate()
    info = {"copy_TBps": bw / 1e12, "matmul_TFLOPs": mm / 1e12, **planner_time()}
    print(json.dumps(info), flush=True)
    wl = {
        "decode_uniform": lambda: run_decode("decode_uniform", np.full(64, 4096), rng, rows, bw),
        "decode_zipf": lambda: run_decode("decode_zipf", np.clip(np.random.default_rng(0).zipf(1.5, 64) * 256, 16, 32768), rng, rows, bw),
        "decode_long": lambda: run_decode("decode_long", np.full(8, 32768), rng, rows, bw),
        "decode_wide": lambda: run_decode("decode_wide", np.full(256, 1024), rng, rows, bw),
        "prefill_causal": lambda: run_prefill(rows, mm),
        "decode_rope": lambda: run_decode_rope(variant_rows, bw),
        "block_sparse": lambda: run_block_sparse(variant_rows),
    }
    variant_rows = []
    sweeps = []
    only = [w for w in args.only.split(",") if w]
    for name, fn in wl.items():
        if not only or name in only:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep timing the other workloads
                print(f"{name} FAILED: {type(e).__name__}: {e}"[:2000], file=sys.stderr, flush=True)
    if not args.no_sweep:
        run_sweeps(sweeps)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "pallas_gpu.json"), "w") as fh:
            json.dump({"info": info, "rows": rows, "variant_rows": variant_rows, "sweeps": sweeps}, fh, indent=1)
    for r in sweeps:
        rate = r.get("TBps", r.get("TFLOPs", float("nan")))
        print(f"sweep {r['workload']:15s} {r['variant']:31s} {r.get('us', float('nan')):9.1f} us {rate:7.2f} "
              f"{r.get('rel_vs_first', float('nan')):8.1e} {r.get('error', '')[:60]}")
    print(f"\ncopy {info['copy_TBps']:.2f} TB/s, matmul {info['matmul_TFLOPs']:.0f} TFLOP/s, "
          f"plan_work B=256 {info['plan_work_B256_decode_us']:.0f} us (zipf {info['plan_work_B256_zipf_us']:.0f}), "
          f"backend.plan {info['backend_plan_B256_us']:.0f} us (not blocking {info['backend_plan_B256_noblock_us']:.0f}), "
          f"device_put 160 KB {info['device_put_160KB_us']:.0f} us")
    print(f"{'workload':16s} {'split us':>9s} {'rate':>7s} {'nosplit':>9s} {'rate':>7s} {'cudnn':>9s} {'xla':>9s} {'floor':>8s} {'err':>8s}")
    for r in rows:
        unit = "TFLOPs" if "split_TFLOPs" in r else "TBps"
        print(f"{r['workload']:16s} {r['split_us']:9.1f} {r['split_' + unit]:7.2f} {r['nosplit_us']:9.1f} {r['nosplit_' + unit]:7.2f} "
              f"{r.get('cudnn_us', float('nan')):9.1f} {r.get('xla_us', float('nan')):9.1f} {r['floor_us']:8.1f} "
              f"{max(r['split_rel_err'], r['nosplit_rel_err']):8.1e}")
    for r in variant_rows:
        if r["workload"] == "decode_rope":
            print(f"decode_rope {r['config_label']:22s} plain {r['plain_us']:.1f} us ({r['plain_TBps']:.2f} TB/s), rope "
                  f"{r['rope_us']:.1f} us ({r['rope_TBps']:.2f} TB/s): rope/plain {r['rope_over_plain']:.3f} (target <= 1.1), "
                  f"err {r['rope_rel_err']:.1e}")
        else:
            print(f"block_sparse     R=C=64 {r['R64_C64_us']:.1f} us ({r['R64_C64_TFLOPs']:.0f} TFLOP/s), R=64 C=1 "
                  f"{r['R64_C1_us']:.1f} us ({r['R64_C1_TFLOPs']:.0f} TFLOP/s): C=1 / C=64 throughput "
                  f"{r['C1_over_C64_throughput']:.2f} (target >= 0.8), err {max(r['R64_C64_rel_err'], r['R64_C1_rel_err']):.1e}")


if __name__ == "__main__":
    main()
