"""The ``e2e`` workload: inter-token latency of a Llama-3-8B-shaped decode step (issue 6).

One decode step of the whole model (embedding, every layer's projections, RoPE, KV append,
attention, MLP, logits) at batch 64 and context 4096, with attention through a jaxinfer backend
over a paged cache, or through ``jax.nn.dot_product_attention`` over a dense cache: the
reference XLA attention (``dense-xla``) and cuDNN (``dense-cudnn``). The step is
:func:`jaxinfer.models.llama.decode_step_benchmark_setup`; weights are random (bf16).
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np

from jaxinfer.bench.harness import Timer, environment, on_gpu, rel_error
from jaxinfer.models.llama import LlamaConfig, decode_step_benchmark_setup

PEERS = ("dense-xla", "dense-cudnn")
JAXINFER_BACKENDS = ("xla", "pallas", "fa2", "fa3")
REFERENCE = "dense-xla"
# CPU and test sizes: the same step on a tiny model (the 8B shape does not fit a CPU run).
TINY = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_qo_heads=4, num_kv_heads=2,
                   head_dim=64, num_layers=2)


@dataclasses.dataclass(frozen=True)
class E2EWorkload:
    """Decode step of a Llama-style model; ``config`` None = Llama-3-8B with ``num_layers``."""

    name: str = "e2e"
    # 8 of Llama-3-8B's 32 layers: every layer does the same work, so latency scales by 4 and the
    # ratios between backends hold, at a quarter of the compile time and memory of the GPU run.
    num_layers: int = 8
    batch: int = 64
    context: int = 4096
    config: LlamaConfig | None = None
    unit: str = "tok/s"

    @property
    def definition(self) -> str:
        return "llama_decode_step"

    def axes(self) -> dict:
        return {"num_layers": self.num_layers, "batch": self.batch, "context": self.context,
                "model": "llama3-8b" if self.config is None else "tiny"}

    def scaled(self, factor: int) -> E2EWorkload:
        if factor == 1:
            return self
        return dataclasses.replace(self, num_layers=TINY.num_layers, batch=max(2, 64 // factor),
                                   context=max(16, 4096 // factor), config=TINY)


def _run_one(workload: E2EWorkload, backend: str, timer: Timer):
    bench = decode_step_benchmark_setup(workload.num_layers, workload.batch, workload.context, backend,
                                        config=workload.config)
    latency_ms, logits = timer(lambda: bench(), [()])
    logits = np.asarray(logits[: workload.batch], np.float32)
    del bench
    gc.collect()
    return latency_ms, logits


def run_e2e(workload: E2EWorkload, backends, timer: Timer) -> list[dict]:
    """One record per backend (same fields as the attention workloads); speedup is against
    ``dense-xla`` and ``max_error`` the relative error of the logits against it."""
    names = [REFERENCE] + [b for b in backends if b in JAXINFER_BACKENDS]
    if on_gpu():
        names += [p for p in PEERS if p not in names]
    env = environment()
    results = {}
    for backend in names:
        try:
            results[backend] = dict(zip(("latency_ms", "logits"), _run_one(workload, backend, timer)), status="ok")
        except NotImplementedError as e:
            results[backend] = {"status": "unsupported", "reason": str(e)}
        except Exception as e:  # one failing backend must not stop the others
            results[backend] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
    ref = results[REFERENCE]
    peer_latency = results.get("dense-cudnn", {}).get("latency_ms")
    records = []
    for backend, r in results.items():
        latency = r.get("latency_ms")
        err = rel_error(r["logits"], ref["logits"]) if "logits" in r and "logits" in ref else None
        ref_latency = ref.get("latency_ms")
        records.append({
            "definition": workload.definition, "workload": workload.name, "axes": workload.axes(),
            "backend": backend, "status": r["status"], "reason": r.get("reason"), "max_error": err,
            "max_error_f64": None, "latency_ms": latency, "reference_latency_ms": ref_latency,
            "speedup": ref_latency / latency if latency and ref_latency else None,
            "cudnn_latency_ms": peer_latency, "vs_cudnn": peer_latency / latency if latency and peer_latency else None,
            "plan_ms": None, "plan_call_ms": None,
            "input_copies": 1, "throughput": workload.batch / (latency * 1e-3) if latency else None,
            "unit": workload.unit, "bytes": None, "flops": None, "floor_ms": None, "of_floor": None,
            "timing": timer.describe(), **env,
        })
    return records


def latency_lines(records) -> list[str]:
    """Inter-token latency of jaxinfer against the peers, as the issue asks for."""
    by = {r["backend"]: r["latency_ms"] for r in records if r["workload"] == "e2e" and r["latency_ms"]}
    lines = []
    for backend, ms in by.items():
        if backend in PEERS:
            continue
        for peer in PEERS:
            if peer in by:
                change = 100 * (ms / by[peer] - 1)
                lines.append(f"e2e inter-token latency, {backend} {ms:.3f} ms vs {peer} {by[peer]:.3f} ms: "
                             f"{abs(change):.0f}% {'higher' if change > 0 else 'lower'}")
    return lines
