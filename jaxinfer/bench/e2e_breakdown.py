"""Where a Llama-3-8B decode step's time goes: the ``e2e`` workload with all 32 layers, broken down.

    python -m jaxinfer.bench.e2e_breakdown [--layers 32] [--size full|tiny] [--backends pallas] [--out DIR]

Issue 17's e2e figures. The step is ``e2e``'s (:func:`jaxinfer.models.llama.decode_step_benchmark_setup`:
Llama-3-8B shape, random bf16 weights, B=64 requests of context 4096, every layer appending the
new token's key and value, then attending), here with all 32 layers by default.

1. Inter-token latency of the whole step with dense XLA attention (``dense-xla``, the reference),
   dense cuDNN (``dense-cudnn``, GPU only) and each jaxinfer backend (default ``pallas`` on a GPU,
   ``xla`` elsewhere) over the paged cache, in this process one after the other: each one's
   weights and cache are freed before the next is built (weights 16 GB and cache 34 GB at full
   size). Goals (issue 17): jaxinfer <= dense cuDNN and <= 0.40x dense XLA.
2. Where a jaxinfer step's time goes, by subtraction on the same weights, cache and plan: two
   variants of the step are timed, in which every layer's attention call is replaced by a
   placeholder of the same output shape that still consumes ``q, k, v`` (``q + k + v``, the KV
   head broadcast over its query group: one fused elementwise kernel, so no projection is
   optimized away):

   - ``no attention``: the placeholder; the paged KV append stays;
   - ``no attention, no append``: the placeholder and no append.

   attention = full - no attention; KV append = no attention - no attention, no append; the rest
   = no attention, no append (embedding, norms, projections, RoPE, MLP, LM head and launches).
   Each term is what removing that work saves inside the compiled step, its launches included.
3. Planning: the host time of :meth:`jaxinfer.nn.StepPlanner.plan` for this batch (all requests
   decoding, the setup's page tables), until the plan is on the device; median of repeated calls
   after one warm-up. It is not in the step latency above: a serving loop adds it to each step
   unless it overlaps planning with the device (FlashInfer paper, arXiv 2501.01005, sec. 3.3).

Timing is ``jaxinfer-bench``'s :class:`~jaxinfer.bench.harness.Timer` (median of timed repeats of
back-to-back calls after warm-up calls, the first of which compiles). ``max_error`` is the
relative error ``max|logits - ref| / max|ref|`` of the step's logits against ``dense-xla``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tabulate import tabulate

import jaxinfer
from jaxinfer.bench.__main__ import (CPU_PLAN_REPEATS, CPU_REPEATS, GPU_MIN_REPEAT_S, GPU_PLAN_REPEATS, GPU_REPEATS,
                                     GPU_WARMUP)
from jaxinfer.bench.e2e import PEERS, REFERENCE, E2EWorkload
from jaxinfer.bench.harness import Timer, environment, on_gpu, rel_error
from jaxinfer.models.llama import DENSE_BACKENDS, LlamaConfig, LlamaModel, decode_step_benchmark_setup
from jaxinfer.nn.attention import StepBatch, StepPlanner
from jaxinfer.nn.kv_pool import KVCachePool

RECORDS_FILE = "e2e_breakdown.jsonl"
GOAL_VS_CUDNN = 1.0  # latency of jaxinfer over dense cuDNN, at most (issue 17)
GOAL_VS_XLA = 0.40  # latency of jaxinfer over dense XLA, at most (issue 17)


def _placeholder_attention(attn, batch: StepBatch, append: bool, h, kv_cache):
    """A layer's attention with the attention itself replaced by ``q + k + v`` (same shape); the
    paged KV append when ``append``. ``h [T, hidden]`` -> ``(y [T, hidden], kv_cache)``."""
    q, k, v = attn.qkv(h, batch.positions)
    dtype = kv_cache[0].dtype
    k, v = k.astype(dtype), v.astype(dtype)
    if append:
        kv_cache = jaxinfer.append_paged_kv_cache(
            k, v, batch.batch_indices, batch.positions, kv_cache, batch.kv_indices, batch.kv_indptr,
            batch.kv_last_page_len, kv_layout=batch.kv_layout,
        )
    o = q.astype(dtype) + jnp.repeat(k + v, q.shape[1] // k.shape[1], axis=1)
    return attn.o_proj(o.reshape(h.shape[0], -1).astype(h.dtype)), kv_cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def step_without_attention(graphdef, append: bool, params, caches, tokens, batch: StepBatch):
    """:func:`jaxinfer.models.llama.paged_logits` with every attention replaced by the placeholder
    (see the module docstring), the KV append kept when ``append``; same outputs' shapes."""
    model = nnx.merge(graphdef, params)
    x = model.embed(tokens).astype(jnp.float32)
    new = []
    for layer, cache in zip(model.layers, caches):
        x, cache = layer.block(x, functools.partial(_placeholder_attention, layer.self_attn, batch, append), cache)
        new.append(cache)
    return model.logits(model.norm(x)[batch.last_rows]), tuple(new)


def model_config(workload: E2EWorkload) -> LlamaConfig:
    """The geometry :func:`decode_step_benchmark_setup` builds for ``workload`` (bf16)."""
    return dataclasses.replace(workload.config or LlamaConfig(), num_layers=workload.num_layers, dtype=jnp.bfloat16)


def time_plan(workload: E2EWorkload, backend: str, repeats: int) -> float:
    """Median host time (ms) of ``StepPlanner.plan`` for the workload's decode batch, until the
    plan is on the device; the pool's pages are interleaved across requests as the setup's."""
    cfg = model_config(workload)
    batch, context, page_size = workload.batch, workload.context, 16
    # One layer of cache: plan() reads only the page tables.
    pool = KVCachePool(batch * -(-context // page_size), page_size, 1, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    for b in range(batch):
        pool.add(b)
    for start in range(0, context, page_size):
        for b in range(batch):
            pool.extend(b, min(page_size, context - start))
    planner = StepPlanner(pool, cfg.num_qo_heads, max_seq_len=context, max_batch_size=batch, backend=backend,
                          q_data_type=cfg.dtype, min_decode_rows=batch)
    rids = list(range(batch))
    jax.block_until_ready(planner.plan([], rids))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(planner.plan([], rids))
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def measure(workload: E2EWorkload, backend: str, timer: Timer, log) -> dict:
    """Latency (and, for a jaxinfer backend, the two variants' latencies) of one backend."""
    t0 = time.perf_counter()
    bench = decode_step_benchmark_setup(workload.num_layers, workload.batch, workload.context, backend,
                                        config=workload.config)
    latency, logits = timer(bench, [()])
    out = {"latency_ms": latency, "logits": np.asarray(logits[: workload.batch], np.float32)}
    if backend not in DENSE_BACKENDS:
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlamaModel(model_config(workload), rngs=nnx.Rngs(0))))
        for name, append in (("no_attention_ms", True), ("no_attention_no_append_ms", False)):
            bench = dataclasses.replace(bench, step=functools.partial(step_without_attention, graphdef, append))
            out[name], _ = timer(bench, [()])
    del bench, logits
    gc.collect()
    print(f"{backend}: {time.perf_counter() - t0:.1f} s (setup, compiles, timing)", file=log)
    return out


def run_breakdown(workload: E2EWorkload, backends, timer: Timer, plan_repeats: int, *, log=sys.stderr) -> list[dict]:
    """One record per backend: ``dense-xla`` first, ``dense-cudnn`` on a GPU, then ``backends``."""
    names = [REFERENCE] + (["dense-cudnn"] if on_gpu() else []) + [b for b in backends if b not in PEERS]
    results = {}
    for backend in names:
        try:
            results[backend] = {"status": "ok", **measure(workload, backend, timer, log)}
        except NotImplementedError as e:
            results[backend] = {"status": "unsupported", "reason": str(e)}
        except Exception as e:  # one failing backend must not stop the others
            results[backend] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
        gc.collect()
    ref = results[REFERENCE]
    xla_ms, cudnn_ms = ref.get("latency_ms"), results.get("dense-cudnn", {}).get("latency_ms")
    env = environment()
    records = []
    for backend, r in results.items():
        ms = r.get("latency_ms")
        record = {
            "benchmark": "e2e_breakdown", "axes": workload.axes(), "backend": backend, "status": r["status"],
            "reason": r.get("reason"), "latency_ms": ms,
            "vs_dense_xla": ms / xla_ms if ms and xla_ms else None,
            "vs_dense_cudnn": ms / cudnn_ms if ms and cudnn_ms else None,
            "max_error": rel_error(r["logits"], ref["logits"]) if "logits" in r and "logits" in ref else None,
            "tokens_per_s": workload.batch / (ms * 1e-3) if ms else None, "timing": timer.describe(), **env,
        }
        if "no_attention_ms" in r:
            full, no_attn, bare = ms, r["no_attention_ms"], r["no_attention_no_append_ms"]
            record.update(no_attention_ms=no_attn, no_attention_no_append_ms=bare, attention_ms=full - no_attn,
                          append_ms=no_attn - bare, rest_ms=bare,
                          plan_ms=time_plan(workload, backend, plan_repeats))
        records.append(record)
    return records


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(records) -> str:
    headers = ["backend", "status", "latency ms", "x dense-xla", "x dense-cudnn", "max err", "attention ms",
               "KV append ms", "rest ms", "plan ms (host)"]
    rows = [[r["backend"], r["status"], _fmt(r["latency_ms"], ".3f"), _fmt(r["vs_dense_xla"], ".3f"),
             _fmt(r["vs_dense_cudnn"], ".3f"), _fmt(r["max_error"], ".1e"), _fmt(r.get("attention_ms"), ".3f"),
             _fmt(r.get("append_ms"), ".3f"), _fmt(r.get("rest_ms"), ".3f"), _fmt(r.get("plan_ms"), ".3f")]
            for r in records]
    return tabulate(rows, headers=headers)


def summary_lines(records) -> list[str]:
    """Each jaxinfer backend against the goals, and its step's shares."""
    lines = []
    for r in records:
        if r["backend"] in PEERS or r["latency_ms"] is None:
            if r["status"] != "ok":
                lines.append(f"{r['backend']}: {r['status']}: {r['reason']}")
            continue
        for ratio, goal, peer in (("vs_dense_cudnn", GOAL_VS_CUDNN, "dense cuDNN"),
                                  ("vs_dense_xla", GOAL_VS_XLA, "dense XLA")):
            if r[ratio] is not None:
                lines.append(f"{r['backend']}: {r['latency_ms']:.3f} ms = {r[ratio]:.3f}x {peer} (goal <= {goal}: "
                             f"{'met' if r[ratio] <= goal else 'not met'})")
        if "attention_ms" in r:
            ms = r["latency_ms"]
            parts = ", ".join(f"{name} {r[key]:.3f} ms ({100 * r[key] / ms:.0f}%)" for name, key in
                              (("attention", "attention_ms"), ("KV append", "append_ms"), ("rest", "rest_ms")))
            lines.append(f"{r['backend']} step: {parts}; planning {r['plan_ms']:.3f} ms on the host per step "
                         "(outside the step)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.e2e_breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 32 at full size, the tiny model's 2 at tiny size)")
    p.add_argument("--size", choices=("full", "tiny"), default=None,
                   help="full (Llama-3-8B shape, B=64, context 4096; the GPU default) or tiny (CPU default)")
    p.add_argument("--backends", default=None,
                   help="comma-separated jaxinfer backends (default pallas on a GPU, xla elsewhere)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repeats (default {GPU_REPEATS} on GPU, {CPU_REPEATS} elsewhere)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help=f"directory of {RECORDS_FILE}")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the breakdown; returns 1 when a backend errored."""
    args = parse_args(argv)
    gpu = on_gpu()
    full = (args.size or ("full" if gpu else "tiny")) == "full"
    workload = E2EWorkload(num_layers=32) if full else E2EWorkload().scaled(64)
    if args.layers is not None:
        workload = dataclasses.replace(workload, num_layers=args.layers)
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else (["pallas"] if gpu else ["xla"])
    timer = Timer(args.repeats or (GPU_REPEATS if gpu else CPU_REPEATS), warmup=GPU_WARMUP if gpu else 1,
                  min_repeat_s=GPU_MIN_REPEAT_S if gpu else 0.0)
    print(f"e2e breakdown: {workload.axes()}, backends {', '.join(backends)}; timing: {timer.describe()}",
          file=sys.stderr)
    records = run_breakdown(workload, backends, timer, GPU_PLAN_REPEATS if gpu else CPU_PLAN_REPEATS)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RECORDS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {path}")
    if not gpu:
        print(f"NOTE: CPU run ({records[0]['device']}, tiny sizes): timings are not GPU performance.")
    for line in summary_lines(records):
        print(line)
    print(table(records))
    return int(any(r["status"] == "error" for r in records))


if __name__ == "__main__":
    sys.exit(main())
