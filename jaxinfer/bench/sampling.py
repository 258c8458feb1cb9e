"""``python -m jaxinfer.bench.sampling``: the sampling kernels against sort-based sampling and FlashInfer.

Ops (bf16 logits ``[B, V]``, per-request ``[B]`` parameters: top_k 50, top_p 0.9):

* ``top_k_top_p_sampling_from_logits`` (top-k first, FlashInfer's default order);
* ``top_p_sampling_from_probs`` on ``softmax(logits)`` in float32.

Implementations, timed in one process on the same inputs:

* ``pallas`` -- :mod:`jaxinfer.sampling` on the Pallas kernels (sorting-free rejection sampling);
* ``xla`` -- :mod:`jaxinfer.sampling`'s plain-jnp reference (sort-based, exact ties);
* ``sort`` -- the usual JAX sampler: one sort of the row (``lax.sort_key_val``), softmax, top-k
  and top-p masks in sorted order by ``cumsum``, ``jax.random.categorical``;
* ``flashinfer`` -- FlashInfer's same call through torch, when ``torch`` and ``flashinfer``
  import (shared/peers/README.md); JAX then runs without preallocating GPU memory.

Timing: :class:`jaxinfer.bench.harness.Timer` (median of repeats after warm-up; on the GPU
back-to-back calls per repeat) and the same method for torch (``torch.cuda.synchronize`` in
place of ``block_until_ready``); inputs are rotated through copies when they would sit in L2,
each copy with its own key (a call's time depends on its draw's rejection rounds; FlashInfer's
generator advances every call).
Every implementation's tokens are checked against the float32 reference's kept set
(``frac_outside``, the fraction of rows whose token lies outside it; a token exactly at a top-p
edge may differ by float rounding; the table shows pallas').

Output: a table on stdout and, with ``--out PATH``, a JSON record (environment, timing method,
one row per op x B x V x implementation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfer import sampling
from jaxinfer.bench import harness

OPS = ("top_k_top_p_sampling_from_logits", "top_p_sampling_from_probs")
IMPLS = ("pallas", "xla", "sort", "flashinfer")
GPU_BATCHES, GPU_VOCABS = (1, 16, 64, 256), (32000, 128256, 151936)
CPU_BATCHES, CPU_VOCABS = (1, 4), (2048,)
TOP_K, TOP_P = 50, 0.9
LOGIT_SCALE = 3.0  # standard deviation of the random logits (a peaked, LLM-like distribution)


# --------------------------------------------------------------------------------------------
# The sort-based JAX sampler (the baseline the sorting-free kernels must beat)
# --------------------------------------------------------------------------------------------


def _sorted_desc(x):
    """``(values, indices)`` of each row in descending order: one full sort."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    neg, order = lax.sort_key_val(-x, iota, dimension=1)
    return -neg, order


@jax.jit
def sort_top_k_top_p_from_logits(logits, top_k, top_p, key):
    """Top-k then top-p sampling by sorting (top-k by rank: ties at the k-th value not kept)."""
    s, order = _sorted_desc(logits.astype(jnp.float32))
    pos = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(pos < top_k[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    exclusive = jnp.cumsum(p, axis=-1) - p
    s = jnp.where(exclusive < top_p[:, None], s, -jnp.inf)
    choice = jax.random.categorical(key, s, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=1)[:, 0]


@jax.jit
def sort_top_p_from_probs(probs, top_p, key):
    """Top-p sampling by sorting."""
    p, order = _sorted_desc(probs)
    exclusive = jnp.cumsum(p, axis=-1) - p
    s = jnp.where(exclusive < top_p[:, None], jnp.log(p), -jnp.inf)
    choice = jax.random.categorical(key, s, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=1)[:, 0]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    batch: int
    vocab: int


def _inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((case.batch, case.vocab)) * LOGIT_SCALE, jnp.bfloat16)
    top_k = jnp.full((case.batch,), TOP_K, jnp.int32)
    top_p = jnp.full((case.batch,), TOP_P, jnp.float32)
    probs = sampling.softmax(logits)
    return logits, probs, top_k, top_p


def _jax_fn(case: Case, impl: str) -> Callable:
    """``(logits_or_probs, top_k, top_p, key) -> tokens`` for a JAX implementation."""
    if impl == "sort":
        if case.op == OPS[0]:
            return sort_top_k_top_p_from_logits
        return jax.jit(lambda x, k, p, key: sort_top_p_from_probs(x, p, key))
    if case.op == OPS[0]:
        return jax.jit(lambda x, k, p, key: sampling.top_k_top_p_sampling_from_logits(x, k, p, key=key, backend=impl))
    return jax.jit(lambda x, k, p, key: sampling.top_p_sampling_from_probs(x, p, key=key, backend=impl))


def _outside(case: Case, logits, probs, top_k, top_p, tokens) -> float:
    """Fraction of ``tokens`` outside the float32 reference's kept set."""
    if case.op == OPS[0]:
        spec = sampling.SamplerSpec(from_logits=True, top_k=True, top_p=True)
        params = sampling._params(case.batch, top_k=top_k, top_p=top_p)
        w = sampling._weights(logits, params.temperature, True)
    else:
        spec, params, w = sampling.SamplerSpec(top_p=True), sampling._params(case.batch, top_p=top_p), probs
    kept = np.asarray(sampling._keep_mask(spec, w, params))
    tokens = np.asarray(tokens)
    return float(np.mean(~kept[np.arange(case.batch), tokens]))


def _flashinfer_fn(case: Case, logits, probs, top_k, top_p, torch, flashinfer) -> Callable:
    def to_torch(a, dtype):
        return torch.from_numpy(np.asarray(a, np.float32)).to(device="cuda", dtype=dtype)

    k, p = to_torch(top_k, torch.float32).to(torch.int32), to_torch(top_p, torch.float32)
    if case.op == OPS[0]:
        x = to_torch(logits, torch.bfloat16)
        return lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(x, k, p)
    x = to_torch(probs, torch.float32)
    return lambda: flashinfer.sampling.top_p_sampling_from_probs(x, p)


def _import_flashinfer():
    """``(torch, flashinfer)`` or the reason they are not usable here."""
    try:
        import flashinfer
        import torch
    except Exception as e:  # any import failure of an optional peer is reported, not raised
        return None, f"not importable: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    return (torch, flashinfer), None


def run(cases, impls, timer: harness.Timer, seed: int = 0, progress: bool = True) -> list[dict]:
    """Time every case on every implementation; one record per (case, implementation)."""
    peer, peer_reason = _import_flashinfer() if "flashinfer" in impls else (None, None)
    key = jax.random.key(seed)
    records = []
    for case in cases:
        logits, probs, top_k, top_p = _inputs(case, seed)
        x = logits if case.op == OPS[0] else probs
        for impl in impls:
            rec = {**dataclasses.asdict(case), "impl": impl, "status": "ok", "ms": None, "frac_outside": None}
            try:
                if impl == "flashinfer":
                    if peer is None:
                        rec["status"] = f"skipped: {peer_reason}"
                    else:
                        fn = _flashinfer_fn(case, logits, probs, top_k, top_p, *peer)
                        rec["ms"], _ = timer(fn, [()], harness.torch_sync(peer[0]))
                        rec["frac_outside"] = _outside(case, logits, probs, top_k, top_p, fn().cpu().numpy())
                else:
                    fn = _jax_fn(case, impl)
                    args = harness.input_copies((x, top_k, top_p, key), x.size * x.dtype.itemsize)
                    # A key per copy: FlashInfer's generator advances every call, so both average
                    # the rejection rounds over draws instead of replaying one draw's rounds.
                    args = [(*a[:3], jax.random.fold_in(key, i)) for i, a in enumerate(args)]
                    rec["ms"], tokens = timer(fn, args)
                    rec["frac_outside"] = _outside(case, logits, probs, top_k, top_p, tokens)
            except Exception as e:  # one failing case must not end the run: it is reported
                rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            records.append(rec)
            if progress:
                ms = "" if rec["ms"] is None else f"{rec['ms']:.4f} ms"
                print(f"  {case.op} B={case.batch} V={case.vocab} {impl}: {rec['status']} {ms}", flush=True)
    return records


def table(records: list[dict]) -> str:
    """One line per case: each implementation's ms and the speedups of pallas."""
    by_case: dict[tuple, dict] = {}
    for r in records:
        by_case.setdefault((r["op"], r["batch"], r["vocab"]), {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(i in row for row in by_case.values())]
    head = f"{'op':34} {'B':>4} {'V':>7} " + " ".join(f"{i + ' ms':>14}" for i in impls) + f" {'sort/pallas':>11} {'fi/pallas':>9} {'outside':>8}"
    lines = [head, "-" * len(head)]
    for (op, b, v), row in by_case.items():
        ms = {i: row[i]["ms"] if i in row else None for i in impls}
        cells = " ".join(f"{'' if ms[i] is None else f'{ms[i]:.4f}':>14}" for i in impls)
        ratio = lambda other: "" if ms.get("pallas") in (None, 0) or ms.get(other) is None else f"{ms[other] / ms['pallas']:.2f}x"
        out = row.get("pallas", {}).get("frac_outside")
        lines.append(f"{op:34} {b:>4} {v:>7} {cells} {ratio('sort'):>11} {ratio('flashinfer'):>9} "
                     f"{'' if out is None else f'{out:.4f}':>8}")
    bad = [f"{r['op']} B={r['batch']} V={r['vocab']} {r['impl']}: {r['status']}" for r in records if r["status"] != "ok"]
    return "\n".join(lines + (["", "not timed:"] + bad if bad else []))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.sampling", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated from {','.join(OPS)}")
    p.add_argument("--impls", help=f"comma-separated from {','.join(IMPLS)} (default: all on GPU; pallas,xla,sort on CPU)")
    p.add_argument("--batch", help=f"batch sizes (default {','.join(map(str, GPU_BATCHES))} on GPU, "
                   f"{','.join(map(str, CPU_BATCHES))} on CPU)")
    p.add_argument("--vocab", help=f"vocabulary sizes (default {','.join(map(str, GPU_VOCABS))} on GPU, "
                   f"{','.join(map(str, CPU_VOCABS))} on CPU)")
    p.add_argument("--repeats", type=int, help="timed repeats (default 20 on GPU, 3 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON record here")
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    impls = [i.strip() for i in args.impls.split(",")] if args.impls else None
    for name, values, allowed in (("ops", ops, OPS), ("impls", impls or (), IMPLS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            p.error(f"unknown {name} {unknown}; choose from {','.join(allowed)}")
    if impls is None or "flashinfer" in impls:
        # torch shares the GPU: JAX must not take 75 % of its memory up front (read at backend start).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    gpu = harness.on_gpu()
    impls = impls or (list(IMPLS) if gpu else ["pallas", "xla", "sort"])
    batches = _ints(args.batch) if args.batch else (GPU_BATCHES if gpu else CPU_BATCHES)
    vocabs = _ints(args.vocab) if args.vocab else (GPU_VOCABS if gpu else CPU_VOCABS)
    timer = harness.Timer(args.repeats or (20 if gpu else 3), warmup=3 if gpu else 1, min_repeat_s=5e-3 if gpu else 0.0)
    env = harness.environment()
    print(f"device: {env['device']}; timing: {timer.describe()}")
    cases = [Case(op, b, v) for op in ops for v in vocabs for b in batches]
    records = run(cases, impls, timer, seed=args.seed, progress=not args.quiet)
    print(table(records))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "sampling", "environment": env, "timing": timer.describe(),
                  "parameters": {"top_k": TOP_K, "top_p": TOP_P, "logit_scale": LOGIT_SCALE, "seed": args.seed},
                  "results": records}
        args.out.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}")
    return 1 if any(r["status"].startswith("error") for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
