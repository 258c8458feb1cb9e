"""Greedy tokens of SmolLM2-135M-Instruct with an fp8 KV cache against a bf16 one (issue 18).

    python -m jaxinfer.bench.kv_agreement [--tokens 48] [--kv-dtypes float32,bfloat16,e4m3,e5m2]

A fixed set of chat prompts (:data:`PROMPTS`, through the model's chat template) runs greedily on
the serving engine once per KV cache dtype, every run with the same model, batch and backend; each
run's tokens are compared with the reference cache's (``--reference``, bf16):

- free-running (:func:`jaxinfer.bench.serving.greedy_agreement`): ``prefix``, the share of
  generated tokens before a prompt's first differing token, and ``identical``, the share of
  prompts whose tokens all agree; one near tie flipped decides every later token of its prompt;
- teacher-forced (:func:`teacher_forced`): the share of positions at which the cache's greedy
  token after the prompt and the reference's tokens so far is the reference's next token (each
  context's K/V written into and read from the cache under test, as decoding does).

A float32 cache against the bf16 one is the floor to read the fp8 rows against: how far the bf16
cache's own rounding already moves the greedy tokens. ``e4m3 (amax scales)`` runs the e4m3 cache
with per-KV-head scales ``amax / 448`` taken from the reference run's cache (over all layers and
prompts) instead of 1.0. No stop tokens: every prompt generates ``--tokens`` tokens.

The model runs in bf16 on a GPU and float32 elsewhere (``--dtype``); the records (one per cache)
go to ``<out>/records.jsonl`` and a table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.bench.harness import environment, on_gpu
from jaxinfer.bench.report import RECORDS_FILE
from jaxinfer.bench.serving import first_divergence, greedy_agreement
from jaxinfer.serve import EngineConfig, ServingEngine, check_kv_dtype

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis in two sentences.",
    "Write a Python function that reverses a string.",
    "Give me three tips for a job interview.",
    "What is the difference between a virus and a bacterium?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "How do I make a cup of tea?",
    "What does a CPU do in a computer?",
    "Write a short story about a robot who learns to paint.",
    "What are the benefits of regular exercise?",
    "Explain what a prime number is, with examples.",
    "Suggest a name for a coffee shop and explain it.",
    "How does a refrigerator keep food cold?",
    "Write an email asking my manager for a day off.",
    "What is machine learning?",
    "Describe the water cycle.",
    "What causes the seasons on Earth?",
    "Give a recipe for pancakes.",
    "What is the Pythagorean theorem?",
    "Write a limerick about a cat.",
)
AMAX_NAME = "e4m3 (amax scales)"
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)


@dataclasses.dataclass(frozen=True)
class Run:
    """One cache's greedy run: the cache's ``kv_dtype`` and ``scales`` (``(k_scale, v_scale)``,
    ``None``: 1.0), ``outputs`` by prompt index, its wall time, and ``amax``, the per-KV-head
    ``(max |K|, max |V|)`` of its cache (``None`` unless asked for)."""

    kv_dtype: str
    scales: tuple | None
    outputs: dict[int, list[int]]
    seconds: float
    amax: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def engine_config(prompts: list[list[int]], tokens: int, backend: str, kv_dtype, scales=None) -> EngineConfig:
    """An engine that runs every prompt at once: a slot for each, of the longest request;
    ``scales``: ``(k_scale, v_scale)`` of an fp8 cache (``None``: 1.0)."""
    page = 16
    batch = len(prompts)
    max_seq_len = -(-(max(map(len, prompts)) + tokens) // page) * page
    extra = dict(k_scale=scales[0], v_scale=scales[1]) if scales is not None else {}
    return EngineConfig(num_pages=batch * max_seq_len // page, page_size=page, max_seq_len=max_seq_len,
                        max_batch_size=batch, max_prefill_tokens=512, backend=backend, kv_dtype=kv_dtype,
                        prefix_caching=False, sampling_backend="xla", **extra)


def cache_amax(engine: ServingEngine) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-KV-head ``max |K|`` and ``max |V|`` over every layer and page of the engine's pool
    (free pages hold zeros, so they do not raise it)."""
    axes = (0, 1, 3) if engine.config.kv_layout == "NHD" else (0, 2, 3)
    amax = [0.0, 0.0]
    for layer in engine.pool.caches:
        for i, x in enumerate(layer):
            amax[i] = np.maximum(amax[i], np.asarray(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes)))
    return tuple(tuple(float(a) for a in m) for m in amax)


def greedy(model, prompts: list[list[int]], tokens: int, backend: str, kv_dtype, scales=None,
           want_amax: bool = False) -> Run:
    """Every prompt's ``tokens`` greedy tokens, all prompts in one batch on a ``kv_dtype`` cache."""
    engine = ServingEngine(model, engine_config(prompts, tokens, backend, kv_dtype, scales), log=None)
    t0 = time.perf_counter()
    rids = [engine.submit(p, tokens) for p in prompts]
    out = engine.run()
    seconds = time.perf_counter() - t0
    return Run(kv_dtype, scales, {i: out[r] for i, r in enumerate(rids)}, seconds,
               cache_amax(engine) if want_amax else None)


def teacher_forced(model, prompts: list[list[int]], reference: dict[int, list[int]], backend: str, kv_dtype,
                   scales=None) -> float:
    """The share of positions ``j`` at which the greedy token after ``prompt + reference[:j]``
    is ``reference[j]``: each position judged on the reference's context, so that one early
    difference does not decide every later token as it does in a free-running comparison.

    Position ``j`` of every prompt is one wave of requests; with prefix caching, a wave attaches
    the full pages its previous wave cached (written through the cache under test, as decoding
    writes them) and prefills only the tokens after them."""
    tokens = max(map(len, reference.values()))
    config = dataclasses.replace(engine_config(prompts, tokens, backend, kv_dtype, scales), prefix_caching=True)
    engine = ServingEngine(model, config, log=None)
    agree = []
    for j in range(tokens):
        wave = [(i, engine.submit(p + reference[i][:j], 1)) for i, p in enumerate(prompts) if j < len(reference[i])]
        out = engine.run()
        agree += [out[r][0] == reference[i][j] for i, r in wave]
    return float(np.mean(agree))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.kv_agreement", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=48, help="greedy tokens generated per prompt (default 48)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS),
                   help=f"the first N of the fixed prompts (default all {len(PROMPTS)})")
    p.add_argument("--kv-dtypes", default="float32,bfloat16,e4m3,e5m2",
                   help="comma-separated KV cache dtypes to run (default float32,bfloat16,e4m3,e5m2)")
    p.add_argument("--reference", default="bfloat16", help="the cache the others are compared with (default bfloat16)")
    p.add_argument("--amax-scales", action="store_true",
                   help=f"also run '{AMAX_NAME}': per-KV-head scales amax / {FP8_MAX:g} from the reference's cache")
    p.add_argument("--backend", default="auto", help="the engine's attention backend (default auto)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="the model's weights and activations (default bfloat16 on a GPU, float32 elsewhere)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help=f"directory of {RECORDS_FILE}")
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in [1, {len(PROMPTS)}], got {args.prompts}")
    try:
        args.kv_dtypes = tuple(dict.fromkeys(x.strip() for x in args.kv_dtypes.split(",")))
        for name in (*args.kv_dtypes, args.reference):
            check_kv_dtype(name)
    except ValueError as e:
        p.error(f"--kv-dtypes/--reference: {e}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from jaxinfer.models.llama import LlamaModel  # needs gguf (the "models" extra)
    from jaxinfer.models.tokenizer import ChatTokenizer

    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu() else "float32"))
    model = LlamaModel.from_gguf(dtype=dtype)
    tokenizer = ChatTokenizer.from_gguf()
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                              add_generation_prompt=True))
               for t in PROMPTS[:args.prompts]]
    reference = greedy(model, prompts, args.tokens, args.backend, args.reference, want_amax=args.amax_scales)
    runs = {args.reference: reference}
    for name in args.kv_dtypes:
        if name not in runs:
            runs[name] = greedy(model, prompts, args.tokens, args.backend, name)
    if args.amax_scales:
        scales = tuple(tuple(max(a, 1e-6) / FP8_MAX for a in m) for m in reference.amax)
        runs[AMAX_NAME] = greedy(model, prompts, args.tokens, args.backend, "e4m3", scales)
    env = environment()
    records = []
    for name, run in runs.items():
        agree = greedy_agreement(run.outputs, reference.outputs)
        diverge = first_divergence(run.outputs, reference.outputs)
        records.append(dict(
            benchmark="kv_agreement", kv_dtype=name, reference=args.reference, model="SmolLM2-135M-Instruct",
            model_dtype=dtype.name, backend=args.backend, prompts=len(prompts), tokens=args.tokens,
            greedy_agreement_prefix=agree["prefix"], greedy_agreement_identical=agree["identical"],
            first_divergence=diverge, seconds=run.seconds,
            teacher_forced_agreement=teacher_forced(model, prompts, reference.outputs, args.backend, run.kv_dtype,
                                                    run.scales),
            k_v_scales=[list(s) for s in run.scales] if run.scales else None,
            k_v_amax=[list(m) for m in reference.amax] if name == args.reference and reference.amax else None,
            **env,
        ))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RECORDS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"SmolLM2-135M-Instruct ({dtype.name}), {len(prompts)} chat prompts x {args.tokens} greedy tokens, "
          f"backend {args.backend} on {jax.devices()[0].device_kind}; against the {args.reference} cache "
          f"(records: {path})")
    print(f"{'KV cache':<20} {'prefix':>7} {'identical':>10} {'forced':>7}  first divergence (median, min)")
    for r in records:
        d = r["first_divergence"]
        print(f"{r['kv_dtype']:<20} {r['greedy_agreement_prefix']:>7.3f} {r['greedy_agreement_identical']:>10.3f} "
              f"{r['teacher_forced_agreement']:>7.3f}  "
              f"{np.median(d):.0f}, {min(d)}")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
