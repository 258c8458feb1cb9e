"""``python -m jaxinfer.bench.mla``: paged MLA decode (DeepSeek-V3 shape) in TB/s, tile configs A/B.

Cases (``--size full``, the H100 targets of issue 20): 128 query heads, latent ``Dc = 512``, RoPE
key ``Dp = 64``, bf16 queries and caches, one query per request, ``sm_scale = 1/sqrt(192)``:

* ``b128_kv4096_p{64,1}`` -- 128 requests of 4096 keys, page size 64 and 1;
* ``b128_zipf_p64`` -- 128 requests of ``clip(zipf(1.5) * 512, 64, 16384)`` keys (seed 0).

``--size tiny`` is the same code at CPU scale (16 heads, ``Dc = 64``, ``Dp = 16``; Pallas in
interpret mode), for the test suite.

Each case runs :func:`jaxinfer.batch_mla` under ``jax.jit`` for each Pallas tile config
(:data:`jaxinfer.backends.pallas.mla.DEFAULT_CONFIG`, or ``--configs`` such as
``64x32x8x2,32x64x4x2``: ``block_m x block_n x num_warps x num_stages``), for the sm90a CUDA
kernel (``"fa3"``; on a GPU that it serves, else a row saying why not) and for the ``"xla"``
float32 reference path (on the GPU only with ``--with-xla``: it pads to the longest request).
Timing: :class:`jaxinfer.bench.harness.Timer`. Bytes moved per call: the latent cache rows the
batch reads (``sum(kv_len) * (Dc + Dp)`` elements) plus q and o; TB/s is bytes / latency, the
figure FlashMLA reports (2.8 TB/s on H100; issue 20's goal is >= 2.4). Every result is checked
against the xla path's output (``max|o - ref| / max|ref|``; above 2e-2 is ``mismatch``). When
``torch`` and ``flashinfer`` import, FlashInfer's ``BatchMLAPagedAttentionWrapper`` runs the
same inputs in the same process and each row carries ``vs_flashinfer`` (FlashInfer's latency
over ours).

Output: a table on stdout, and with ``--out PATH`` a JSON record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer.backends.ffi import ops as ffi_ops
from jaxinfer.backends.pallas import mla as pallas_mla
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.bench import harness

TOLERANCE = 2e-2
SM_SCALE = 1.0 / 192**0.5  # DeepSeek-V3: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)


@dataclasses.dataclass(frozen=True)
class Case:
    """One decode batch: ``kv_lens`` keys per request over pages of ``page_size``."""

    name: str
    kv_lens: tuple[int, ...]
    page_size: int
    num_heads: int
    head_dim_ckv: int
    head_dim_kpe: int


def zipf_lens(batch: int, scale: int, lo: int, hi: int) -> tuple[int, ...]:
    return tuple(int(x) for x in np.clip(np.random.default_rng(0).zipf(1.5, batch) * scale, lo, hi))


def cases(size: str) -> list[Case]:
    if size == "tiny":
        dims = (16, 64, 16)
        return [Case("b4_kv40_p16", (40, 3, 77, 0), 16, *dims), Case("b3_zipf_p1", zipf_lens(3, 8, 4, 64), 1, *dims)]
    dims = (128, 512, 64)
    return [Case("b128_kv4096_p64", (4096,) * 128, 64, *dims), Case("b128_kv4096_p1", (4096,) * 128, 1, *dims),
            Case("b128_zipf_p64", zipf_lens(128, 512, 64, 16384), 64, *dims)]


def parse_config(text: str) -> TileConfig:
    """``"64x32x8x2"`` -> ``TileConfig(64, 32, num_warps=8, num_stages=2)`` (one CTA per SM for
    64-row tiles, two for smaller ones)."""
    try:
        bm, bn, warps, stages = (int(x) for x in text.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"a config is block_m x block_n x num_warps x num_stages, e.g. 64x32x8x2; got {text!r}") from e
    return TileConfig(bm, bn, warps, stages, ctas_per_sm=1 if bm >= 64 else 2)


def build(case: Case, seed: int = 0):
    """``(plan_args, (q_nope, q_pe, ckv_cache, kpe_cache))``: random bf16 inputs, pages shuffled."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(case.kv_lens, np.int64)
    pages = -(-lens // case.page_size)
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    num_pages = int(kv_indptr[-1]) + 1
    kv_indices = rng.permutation(num_pages)[: kv_indptr[-1]].astype(np.int32)
    b, h, dc, dp = lens.size, case.num_heads, case.head_dim_ckv, case.head_dim_kpe
    keys = jax.random.split(jax.random.key(seed), 4)
    q_nope = jax.random.normal(keys[0], (b, h, dc), jnp.bfloat16)
    q_pe = jax.random.normal(keys[1], (b, h, dp), jnp.bfloat16)
    ckv = jax.random.normal(keys[2], (num_pages, case.page_size, dc), jnp.bfloat16)
    kpe = jax.random.normal(keys[3], (num_pages, case.page_size, dp), jnp.bfloat16)
    plan_args = (np.arange(b + 1, dtype=np.int32), kv_indptr, kv_indices, lens.astype(np.int32), h, dc, dp,
                 case.page_size, False, SM_SCALE, jnp.bfloat16, jnp.bfloat16)
    return plan_args, (q_nope, q_pe, ckv, kpe)


def bytes_moved(case: Case) -> int:
    """Latent rows read plus q read and o written (bf16)."""
    b, h, dc, dp = len(case.kv_lens), case.num_heads, case.head_dim_ckv, case.head_dim_kpe
    return 2 * (sum(case.kv_lens) * (dc + dp) + b * h * (dc + dp) + b * h * dc)


def rel_error(o, ref) -> float:
    o, ref = np.asarray(o, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(o - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _flashinfer_peer(plan_args, arrays, timer: harness.Timer):
    """``(latency_ms, o)`` of FlashInfer's MLA wrapper on the same inputs, or ``(None, reason)``."""
    try:
        import flashinfer
        import torch
    except ImportError as e:
        return None, f"not installed ({e})"
    try:
        t = [torch.from_dlpack(x) for x in arrays]
        q_nope, q_pe, ckv, kpe = t
        qo, kv_indptr, kv_indices, kv_lens = (torch.from_numpy(np.asarray(a)).cuda() for a in plan_args[:4])
        w = flashinfer.mla.BatchMLAPagedAttentionWrapper(torch.empty(128 * 2**20, dtype=torch.int8, device="cuda"))
        w.plan(qo, kv_indptr, kv_indices, kv_lens, *plan_args[4:10], torch.bfloat16, torch.bfloat16)
        ms, o = timer(lambda: w.run(q_nope, q_pe, ckv, kpe), [()], harness.torch_sync(torch))
        return ms, np.asarray(o.float().cpu())
    except Exception as e:  # noqa: BLE001 - a peer failure is reported, not fatal
        return None, f"error: {type(e).__name__}: {e}"


def run_case(case: Case, configs: list[TileConfig], timer: harness.Timer, with_xla: bool) -> list[dict]:
    plan_args, arrays = build(case)
    ref_wrapper = jaxinfer.BatchMLAPagedAttentionWrapper(backend="xla")
    ref_plan = ref_wrapper.plan(*plan_args)
    step = jax.jit(jaxinfer.batch_mla)
    ref = np.asarray(step(*arrays, ref_plan).astype(jnp.float32))
    nbytes = bytes_moved(case)
    rows = []
    impls = [(f"pallas {c.block_m}x{c.block_n}x{c.num_warps}x{c.num_stages}", "pallas", c) for c in configs]
    if harness.on_gpu():
        reason = ffi_ops.mla_unsupported(case.head_dim_ckv, case.head_dim_kpe, jnp.bfloat16, jnp.bfloat16)
        if reason is None:
            impls.append(("fa3", "fa3", None))
        else:
            rows.append(dict(case=case.name, impl="fa3", status=f"cannot run here: {reason}"))
    if with_xla:
        impls.append(("xla", "xla", None))
    for label, backend, cfg in impls:
        # Off the GPU interpret mode runs the grid's programs one by one: a grid of 8, not the H100's.
        pallas = PallasBackend(config=cfg, num_ctas=None if harness.on_gpu() else 8)
        wrapper = jaxinfer.BatchMLAPagedAttentionWrapper(backend=backend, pallas=pallas)
        plan = wrapper.plan(*plan_args)
        ms, o = timer(step, [(*arrays, plan)])
        err = rel_error(o.astype(jnp.float32), ref)
        rows.append(dict(case=case.name, impl=label, latency_ms=ms, tb_per_s=nbytes / (ms * 1e-3) / 1e12,
                         rel_error=err, status="ok" if err <= TOLERANCE else "mismatch"))
    if harness.on_gpu():
        ms, o = _flashinfer_peer(plan_args, arrays, timer)
        if ms is not None:
            err = rel_error(o, ref)
            rows.append(dict(case=case.name, impl="flashinfer", latency_ms=ms, tb_per_s=nbytes / (ms * 1e-3) / 1e12,
                             rel_error=err, status="ok" if err <= TOLERANCE else "mismatch"))
            for r in rows[:-1]:
                if "latency_ms" in r:
                    r["vs_flashinfer"] = ms / r["latency_ms"]
        else:
            rows.append(dict(case=case.name, impl="flashinfer", status=o))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.mla", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("tiny", "full"), default="full" if harness.on_gpu() else "tiny")
    p.add_argument("--configs", help="comma-separated block_m x block_n x num_warps x num_stages tile configs "
                   "(default: the kernel's default); 'candidates' for the lowering-tested set, 'none' for no Pallas row")
    p.add_argument("--with-xla", action="store_true", help="also time the xla reference path (always on CPU)")
    p.add_argument("--repeats", type=int, default=20 if harness.on_gpu() else 2)
    p.add_argument("--out", type=Path, help="write a JSON record here")
    args = p.parse_args(argv)
    if args.configs == "candidates":
        configs = list(pallas_mla.CANDIDATE_CONFIGS)
    elif args.configs == "none":
        configs = []
    elif args.configs:
        configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    else:
        configs = [pallas_mla.DEFAULT_CONFIG]
    gpu = harness.on_gpu()
    timer = harness.Timer(args.repeats, warmup=3 if gpu else 1, min_repeat_s=5e-3 if gpu else 0.0)
    rows = []
    for case in cases(args.size):
        rows += run_case(case, configs, timer, args.with_xla or not gpu)
    print(f"# {timer.describe()}")
    print(f"{'case':<18} {'impl':<22} {'ms':>9} {'TB/s':>7} {'rel_err':>9} {'vs_fi':>6}  status")
    for r in rows:
        if "latency_ms" not in r:
            print(f"{r['case']:<18} {r['impl']:<22} {'':>9} {'':>7} {'':>9} {'':>6}  {r['status']}")
            continue
        vs = f"{r['vs_flashinfer']:.2f}" if "vs_flashinfer" in r else ""
        print(f"{r['case']:<18} {r['impl']:<22} {r['latency_ms']:9.4f} {r['tb_per_s']:7.3f} {r['rel_error']:9.2e} "
              f"{vs:>6}  {r['status']}")
    if args.out:
        record = dict(environment=harness.environment(), timing=timer.describe(), size=args.size, rows=rows)
        args.out.write_text(json.dumps(record, indent=1))
    return rows


if __name__ == "__main__":
    main()
