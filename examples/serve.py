"""Continuous batching with jaxinfer on a small random Llama-style model.

    python examples/serve.py --backend xla --requests 8

Requests arrive one per step, their prompts a shared 20-token prefix (a system prompt) and a
random tail; the engine prefills newcomers in chunks of at most 32 tokens per step next to the
decode rows of running requests, attaches the shared prefix from its prefix cache, and prints
each request's greedy tokens. Real text from SmolLM2: ``python -m jaxinfer.generate``.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.models.llama import LlamaConfig, LlamaModel
from jaxinfer.serve import EngineConfig, ServingEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="jaxinfer attention backend")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=args.layers, num_qo_heads=4,
        num_kv_heads=2, head_dim=32, dtype=jnp.bfloat16,
    )
    config = EngineConfig(num_pages=256, page_size=16, max_seq_len=128, max_batch_size=16, max_prefill_tokens=32,
                          backend=args.backend)
    engine = ServingEngine(LlamaModel(cfg, rngs=nnx.Rngs(0)), config)  # prints its step-program bound
    rng = np.random.default_rng(0)
    system = rng.integers(0, cfg.vocab_size, 20).tolist()
    pending = [system + rng.integers(0, cfg.vocab_size, rng.integers(4, 48)).tolist() for _ in range(args.requests)]
    start, steps = time.perf_counter(), 0
    while pending or not engine.idle:
        if pending:
            engine.submit(pending.pop(0), args.max_new_tokens)
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - start
    for rid, req in sorted(engine.finished.items()):
        print(f"request {rid} (prompt {len(req.prompt)} tokens, {req.num_cached} from the prefix cache): {req.output}")
    print(f"{steps} steps in {elapsed:.2f} s (compilation included), {engine.stats}")


if __name__ == "__main__":
    main()
