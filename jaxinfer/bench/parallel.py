"""Tensor- and data-parallel decode on several GPUs of one host (issue 22).

    python -m jaxinfer.bench.parallel [--size full|tiny] [--points 8b-tp1,8b-tp8,...] [--layers N]
                                      [--batch 64] [--context 4096] [--backend auto] [--out DIR]

The step is the ``e2e`` workload's (:mod:`jaxinfer.bench.e2e`: one decode token of every request,
every layer appending its key and value to a paged cache of random contents, random bf16
weights), sharded by :mod:`jaxinfer.parallel` over a ``("dp", "tp")`` mesh: the weights created
shard by shard on their devices, each DP group with its own requests, pool and plan. Points
(default at full size):

- ``8b-tp{1,2,4,8}``: Llama-3-8B shape, 32 layers, B=64, context 4096, tensor parallel:
  inter-token latency (ITL, the step's time) against TP 1; goal TP-8 ITL <= 0.2x TP-1, the
  all-reduces included;
- ``8b-dp{2,4,8}``: the same model, data parallel with B=64 requests per group (``dp * 64`` in
  all: each GPU's work stays that of the TP-1 point, weak scaling): tokens/s against TP 1;
  goal scaling ``tokens/s / (dp * tokens/s of TP 1) >= 0.9``;
- ``70b-tp8``: Llama-3-70B shape (80 layers, 64 query and 8 KV heads, hidden 8192, MLP 28672),
  random bf16 weights, TP 8: ITL and tokens/s at B=64, context 4096.

A point that needs more devices than the host has is recorded as ``skipped``. ``max_error`` of a
TP point: ``max|logits - ref| / max|ref|`` against the TP-1 point of the same model (the random
weights and cache do not depend on the sharding: jax's partitionable threefry). ``--size tiny``
(the CPU default) runs a 2-layer model with 8 KV heads on B=4, context 32: with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` every point runs on fake CPU devices
(timings there are not GPU performance).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxinfer.bench.__main__ import CPU_REPEATS, GPU_MIN_REPEAT_S, GPU_REPEATS, GPU_WARMUP
from jaxinfer.bench.harness import Timer, environment, on_gpu, rel_error
from jaxinfer.models.llama import DecodeBenchmark, LlamaConfig
from jaxinfer.nn.attention import StepPlanner
from jaxinfer.parallel import ParallelConfig, ShardedLlama, make_mesh

RECORDS_FILE = "parallel.jsonl"
GOAL_TP8_ITL = 0.2  # TP-8 ITL / TP-1 ITL
GOAL_DP_SCALING = 0.9  # tokens/s / (dp * TP-1 tokens/s)

LLAMA3_8B = LlamaConfig()
LLAMA3_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80, num_qo_heads=64, num_kv_heads=8)
# CPU size: 8 KV heads so that every point down to TP 8 divides them.
TINY = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_qo_heads=16,
                   num_kv_heads=8, head_dim=16)
MODELS = {"8b": LLAMA3_8B, "70b": LLAMA3_70B}
FULL_POINTS = ("8b-tp1", "8b-tp2", "8b-tp4", "8b-tp8", "8b-dp2", "8b-dp4", "8b-dp8", "70b-tp8")


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: ``model`` (a key of :data:`MODELS`), its degrees, ``batch`` requests per
    DP group of ``context`` tokens each, ``num_layers`` (``None``: the model's)."""

    model: str
    tp: int = 1
    dp: int = 1
    batch: int = 64
    context: int = 4096
    num_layers: int | None = None

    @property
    def name(self) -> str:
        return f"{self.model}-tp{self.tp}" if self.dp == 1 else f"{self.model}-dp{self.dp}" + (
            f"-tp{self.tp}" if self.tp > 1 else "")

    @classmethod
    def parse(cls, name: str, **sizes) -> Point:
        """``"8b-tp4"``, ``"8b-dp2"``, ``"70b-dp2-tp4"`` -> a point.

        Raises:
          ValueError: naming ``points``: an unknown model or degree.
        """
        model, *parts = name.split("-")
        degrees = {}
        for part in parts:
            key, digits = part[:2], part[2:]
            if key not in ("tp", "dp") or not digits.isdigit() or int(digits) < 1:
                raise ValueError(f"points: {name!r} is not MODEL-tpN or MODEL-dpN[-tpM]")
            degrees[key] = int(digits)
        if model not in MODELS and model != "tiny":
            raise ValueError(f"points: unknown model {model!r} in {name!r} (one of {sorted(MODELS)} or tiny)")
        return cls(model, **degrees, **sizes)

    def config(self) -> LlamaConfig:
        cfg = TINY if self.model == "tiny" else MODELS[self.model]
        return cfg if self.num_layers is None else dataclasses.replace(cfg, num_layers=self.num_layers)


def parallel_decode_setup(point: Point, backend: str = "auto", *, page_size: int = 16, seed: int = 0,
                          devices=None, check_vma: bool | None = None) -> DecodeBenchmark:
    """A sharded decode step of ``point``: each of its ``dp`` groups holds ``batch`` requests of
    ``context - 1`` cached tokens (random keys and values, the pages of a group's requests
    interleaved) plus the new one that each layer appends before attention. ``check_vma``: as
    :class:`~jaxinfer.parallel.ParallelConfig`'s.

    Returns:
      A :class:`~jaxinfer.models.llama.DecodeBenchmark` whose call returns the logits
      ``[dp, batch, vocab]`` float32.

    Raises:
      ValueError: too few devices (naming ``devices``), or a ``tp`` that does not divide the heads.
    """
    cfg, par = point.config(), ParallelConfig(tp=point.tp, dp=point.dp, check_vma=check_vma)
    mesh = make_mesh(par, devices)
    model = ShardedLlama.random(cfg, mesh, par, seed)
    num_pages = point.batch * -(-point.context // page_size)  # per group
    shape = (point.dp * num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    random_kv = jax.jit(lambda key: jax.random.normal(key, shape, cfg.dtype),
                        out_shardings=NamedSharding(mesh, model.cache_spec("NHD")))
    key = jax.random.key(seed + 1)
    caches = tuple((random_kv(jax.random.fold_in(key, 2 * i)), random_kv(jax.random.fold_in(key, 2 * i + 1)))
                   for i in range(cfg.num_layers))
    batches = []
    for _ in range(point.dp):
        pool = model.make_pool(num_pages, page_size)
        for b in range(point.batch):
            pool.add(b)
        for start in range(0, point.context, page_size):
            for b in range(point.batch):
                pool.extend(b, min(page_size, point.context - start))
        planner = StepPlanner(pool, model.shard_config.num_qo_heads, max_seq_len=point.context,
                              max_batch_size=point.batch, backend=backend, q_data_type=cfg.dtype,
                              min_decode_rows=point.batch)
        batches.append(planner.plan([], list(range(point.batch))))
    batch = model.shard_batches(batches)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (point.dp, batch.positions.shape[-1]))
    return DecodeBenchmark(model.step, model.params, caches, (model.shard_tokens(tokens), batch))


def run_points(points: list[Point], backend: str, timer: Timer, devices=None,
               check_vma: bool | None = None) -> list[dict]:
    """One record per point, in order; each point's weights and cache are freed before the next."""
    env = environment()
    n_devices = len(jax.devices() if devices is None else devices)
    ref_logits: dict = {}
    records = []
    for point in points:
        rec = {"workload": "parallel_decode", "point": point.name, **dataclasses.asdict(point),
               "num_layers": point.config().num_layers, "global_batch": point.batch * point.dp,
               "num_devices": point.tp * point.dp, "backend": backend, "check_vma": check_vma, "status": "ok",
               "reason": None,
               "latency_ms": None, "tokens_per_s": None, "tokens_per_s_per_device": None, "max_error": None,
               "timing": timer.describe(), **env}
        if rec["num_devices"] > n_devices:
            rec.update(status="skipped", reason=f"needs {rec['num_devices']} devices, this host has {n_devices}")
            records.append(rec)
            continue
        bench = None
        try:
            bench = parallel_decode_setup(point, backend, devices=devices, check_vma=check_vma)
            latency_ms, logits = timer(bench, [()])
            logits = np.asarray(logits[0, : point.batch], np.float32)
        except NotImplementedError as e:
            rec.update(status="unsupported", reason=str(e)[:500])
        except Exception as e:  # one failing point must not stop the others
            rec.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
        else:
            tps = rec["global_batch"] / (latency_ms * 1e-3)
            rec.update(latency_ms=latency_ms, tokens_per_s=tps, tokens_per_s_per_device=tps / rec["num_devices"])
            same = (point.model, point.batch, point.context, rec["num_layers"])
            if point.tp == 1 and point.dp == 1:
                ref_logits[same] = logits
            elif point.dp == 1 and same in ref_logits:
                rec["max_error"] = rel_error(logits, ref_logits[same])
        bench = None  # free this point's weights and cache before the next point's
        gc.collect()
        records.append(rec)
    return records


def summary_lines(records: list[dict]) -> list[str]:
    """ITL against TP 1 and DP scaling, with the issue's goals."""
    ok = [r for r in records if r["status"] == "ok"]
    base = {(r["model"], r["batch"], r["context"], r["num_layers"]): r for r in ok if r["tp"] == r["dp"] == 1}
    lines = []
    for r in ok:
        b = base.get((r["model"], r["batch"], r["context"], r["num_layers"]))
        head = (f"{r['point']}: ITL {r['latency_ms']:.3f} ms, {r['tokens_per_s']:.0f} tok/s "
                f"({r['tokens_per_s_per_device']:.0f} per device)")
        if b is None or r is b:
            lines.append(head)
        elif r["dp"] == 1:
            ratio = r["latency_ms"] / b["latency_ms"]
            goal = f" (goal at TP 8: <= {GOAL_TP8_ITL}: {'met' if ratio <= GOAL_TP8_ITL else 'not met'})" \
                if r["tp"] == 8 else ""
            err = f", logits rel. error {r['max_error']:.2e} vs TP 1" if r["max_error"] is not None else ""
            lines.append(f"{head}; {ratio:.3f}x TP-1 ITL{goal}{err}")
        else:
            scaling = r["tokens_per_s"] / (r["num_devices"] * b["tokens_per_s"])
            lines.append(f"{head}; DP scaling {scaling:.3f} per device (goal >= {GOAL_DP_SCALING}: "
                         f"{'met' if scaling >= GOAL_DP_SCALING else 'not met'})")
    lines += [f"{r['point']}: {r['status']}: {r['reason']}" for r in records if r["status"] != "ok"]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.parallel", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("full", "tiny"), default=None,
                   help="full (the issue's points; the GPU default) or tiny (CPU default: the tiny model)")
    p.add_argument("--points", default=None,
                   help=f"comma-separated points, MODEL-tpN or MODEL-dpN[-tpM] (default {','.join(FULL_POINTS)}; "
                        "tiny: the same degrees on the tiny model)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--batch", type=int, default=None, help="requests per DP group (default 64; tiny 4)")
    p.add_argument("--context", type=int, default=None, help="tokens per request (default 4096; tiny 32)")
    p.add_argument("--backend", default="auto", help="jaxinfer attention backend (default auto)")
    p.add_argument("--check-vma", choices=("auto", "on", "off"), default="auto",
                   help="shard_map's varying-axes check (auto: off when the plans run on the Pallas backend)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repeats (default {GPU_REPEATS} on GPU, {CPU_REPEATS} elsewhere)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help=f"directory of {RECORDS_FILE}")
    args = p.parse_args(argv)
    for name in ("layers", "batch", "context"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the points; returns 1 when one errored."""
    args = parse_args(argv)
    gpu = on_gpu()
    tiny = (args.size or ("full" if gpu else "tiny")) == "tiny"
    sizes = dict(batch=args.batch or (4 if tiny else 64), context=args.context or (32 if tiny else 4096),
                 num_layers=args.layers)
    names = args.points.split(",") if args.points else list(dict.fromkeys(  # tiny: 70b-tp8 is tiny-tp8 again
        ("tiny" + n[n.index("-"):]) if tiny else n for n in FULL_POINTS))
    try:
        points = [Point.parse(n.strip(), **sizes) for n in names if n.strip()]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    timer = Timer(args.repeats or (GPU_REPEATS if gpu else CPU_REPEATS), warmup=GPU_WARMUP if gpu else 1,
                  min_repeat_s=GPU_MIN_REPEAT_S if gpu else 0.0)
    print(f"parallel decode on {len(jax.devices())} x {jax.devices()[0].device_kind}; backend {args.backend}; "
          f"timing: {timer.describe()}", file=sys.stderr)
    check_vma = {"auto": None, "on": True, "off": False}[args.check_vma]
    records = run_points(points, args.backend, timer, check_vma=check_vma)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RECORDS_FILE
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    print(f"wrote {path}")
    if not gpu:
        print(f"NOTE: CPU run ({records[0]['device']}): timings are not GPU performance.")
    for line in summary_lines(records):
        print(line)
    return int(any(r["status"] == "error" for r in records))


if __name__ == "__main__":
    sys.exit(main())
