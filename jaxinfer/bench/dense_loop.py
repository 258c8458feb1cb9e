"""A plain JAX serving loop with dense attention: the baseline of the serving benchmark.

What a continuous-batching loop written directly in JAX does (the shape of JetStream/MaxText's
``prefill`` / ``insert`` / ``generate`` loop): every running request owns a *slot* of a contiguous
KV cache ``[max_batch_size, max_seq_len, Hkv, D]`` per layer; a prompt is prefilled into its slot
one request at a time, its rows padded to a bucket (by default the prompt budget, as the engine
pads); then one decode step runs every
slot at once (``max_batch_size`` rows, free slots included) through
``jax.nn.dot_product_attention`` over the whole ``max_seq_len`` of each slot, masked by its length.
Attention is XLA's (``implementation=None``) unless :class:`DenseLoopConfig` says otherwise.

The scheduling is :class:`jaxinfer.serve.ServingEngine`'s, so the two differ in attention and the
cache only: FIFO admission into free slots, a per-step budget of prompt tokens (a prompt longer
than it is prefilled in chunks, each attending to the slot's cached tokens with the causal mask
aligned bottom-right), one decode token of every request past its prompt, greedy sampling, the
same request ids. The model's weights and layers are the
:class:`~jaxinfer.models.llama.LlamaModel`'s: decode is :meth:`LlamaModel.dense_decode`, prefill
runs each layer's :meth:`~jaxinfer.models.llama.LlamaDecoderLayer.block` around a dense attention.

Bounded programs: one decode program and one prefill program per row bucket
(:func:`jaxinfer.nn.row_buckets` from ``min_prefill_rows`` to ``max_prefill_tokens``; one by
default), compiled ahead by :meth:`DenseServingLoop.compile_all`.

What it does and does not do, against the engine (so that the benchmark compares attention and
cache layout, not one side's neglected host code):

- the same host fixes where the code is shared: :func:`jaxinfer.serve.schedule_step`, the
  model passed as a :class:`jaxinfer.models.static.ModelDef` (its graph hashed once, parameters as a flat
  list) instead of an nnx ``GraphDef`` whose hash walks the graph on every jitted call (about
  3 ms per call for SmolLM2, paid here once per prompt chunk and once per decode), and the
  step's compiler options (:data:`jaxinfer.serve.STEP_COMPILER_OPTIONS`: CUDA graphs over every
  run of kernels);
- synchronous steps: it waits for a step's tokens before it plans the next (the engine overlaps
  them, ``EngineConfig(overlap=True)``); a plain loop written directly in JAX has no reason to
  carry its tokens on the device, and its per-step host work is small (no planner: one
  prefill call per chunk with four scalars, one decode call with two ``[max_batch_size]``
  arrays), so :attr:`DenseServingLoop.step_times` shows mostly the wait for the device;
- no prefix caching (every prompt is computed), greedy sampling only, no stop tokens, no
  cancellation; every decode attends over the whole ``max_seq_len`` of every slot (masked).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import time
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.models.llama import LlamaModel
from jaxinfer.nn.attention import bucket, row_buckets
from jaxinfer.plan.checks import check_int
from jaxinfer.models.static import ModelDef, split_model
from jaxinfer.serve import STEP_COMPILER_OPTIONS, Request, SamplingParams, StepResult, schedule_step


@dataclasses.dataclass(frozen=True)
class DenseLoopConfig:
    """Sizes of a :class:`DenseServingLoop`.

    Attributes:
      max_batch_size: slots (requests running at once); every decode step runs all of them.
      max_seq_len: tokens per slot (prompt plus generated).
      max_prefill_tokens: prompt tokens prefilled per step (the chunk budget, as the engine's).
      min_prefill_rows: smallest prefill row bucket (powers of two up to ``max_prefill_tokens``);
        ``None``: one bucket, ``max_prefill_tokens`` (the engine's default padding).
      implementation: ``jax.nn.dot_product_attention``'s (``None``: XLA, ``"cudnn"``).

    Raises:
      ValueError: a size that is not a positive integer, or an unknown ``implementation``.
    """

    max_batch_size: int = 64
    max_seq_len: int = 2048
    max_prefill_tokens: int = 512
    min_prefill_rows: int | None = None
    implementation: str | None = None

    def __post_init__(self):
        for name in ("max_batch_size", "max_seq_len", "max_prefill_tokens"):
            check_int(name, getattr(self, name), minimum=1)
        if self.min_prefill_rows is not None:
            check_int("min_prefill_rows", self.min_prefill_rows, minimum=1)
        if self.implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"implementation must be None, 'xla' or 'cudnn', got {self.implementation!r}")


def _prefill_attention(attn, positions, write_pos, slot, implementation, h, kv_cache):
    """Dense attention of one slot's prompt chunk: ``h [C, hidden]`` -> ``(y [C, hidden], kv_cache)``.

    Rows at ``positions [C]`` write their keys and values at ``write_pos`` (out of range for the
    padding rows: JAX drops out-of-bounds scatter updates) and see every cached key up to their own
    position (causal, bottom-right aligned).
    """
    q, k, v = attn.qkv(h, positions)
    kc, vc = kv_cache
    kc = kc.at[slot, write_pos].set(k.astype(kc.dtype))
    vc = vc.at[slot, write_pos].set(v.astype(vc.dtype))
    visible = jnp.arange(kc.shape[1])[None, :] <= positions[:, None]  # [C, max_seq_len]
    o = jax.nn.dot_product_attention(
        q[None].astype(kc.dtype), kc[slot][None], vc[slot][None], mask=visible[None, None],
        implementation=implementation,
    )[0]
    return attn.o_proj(o.reshape(h.shape[0], -1).astype(h.dtype)), (kc, vc)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=2, compiler_options=STEP_COMPILER_OPTIONS)
def dense_prefill_step(model: ModelDef, params, caches, tokens, start, length, slot, implementation=None):
    """Prefill a chunk of one slot; returns the greedy next token (int32 scalar) and the caches.

    Args:
      model, params: :func:`jaxinfer.models.static.split_model` of the model.
      tokens: ``[C]`` int32, the chunk's ``length`` tokens then padding.
      start: int32 position of the chunk's first token (the slot's cached tokens).
      length: int32 tokens of the chunk, ``1 <= length <= C``.
      slot: int32 slot of the request.
      caches: per layer ``(k, v) [max_batch_size, max_seq_len, Hkv, D]`` (donated).
    """
    model = nnx.merge(model.graphdef, model.params(params))
    rows = jnp.arange(tokens.shape[0])
    positions = start + rows
    write_pos = jnp.where(rows < length, positions, caches[0][0].shape[1])
    x = model.embed(tokens).astype(jnp.float32)
    new = []
    for layer, cache in zip(model.layers, caches):
        attention = functools.partial(_prefill_attention, layer.self_attn, positions, write_pos, slot, implementation)
        x, cache = layer.block(x, attention, cache)
        new.append(cache)
    logits = model.logits(model.norm(x[length - 1]))
    return jnp.argmax(logits).astype(jnp.int32), tuple(new)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2, compiler_options=STEP_COMPILER_OPTIONS)
def dense_decode_step(model: ModelDef, params, caches, tokens, positions, implementation=None):
    """One decode token of every slot (:meth:`LlamaModel.dense_decode`); returns the greedy tokens
    ``[max_batch_size]`` int32 and the caches. A slot at position ``max_seq_len`` writes nothing."""
    model = nnx.merge(model.graphdef, model.params(params))
    hidden, caches = model.dense_decode(tokens, positions, caches, implementation)
    return jnp.argmax(model.logits(hidden), axis=-1).astype(jnp.int32), caches


class DenseServingLoop:
    """Continuous batching with a contiguous per-slot cache and dense attention (greedy only).

    The interface is :class:`jaxinfer.serve.ServingEngine`'s subset that a benchmark drives:
    :meth:`submit`, :meth:`step` (returns a :class:`~jaxinfer.serve.StepResult`), :attr:`idle`,
    :attr:`finished`, :meth:`run`; ``stats`` counts ``steps``, ``prefill_tokens`` and
    ``decode_tokens``; ``step_times`` holds per step ``(host before dispatch, wait for the
    device, host after)`` seconds, as the engine's.

    Args:
      model: the model (weights captured at construction).
      config: sizes.
      log: where the start-up line (program bound, sizes) goes; ``None``: nowhere.

    Raises:
      ValueError: ``max_seq_len`` over the model's ``max_position_embeddings``.
    """

    def __init__(self, model: LlamaModel, config: DenseLoopConfig, *, log: TextIO | None = sys.stderr):
        cfg = model.config
        if config.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.config = config
        self.prefill_buckets = row_buckets(config.min_prefill_rows or config.max_prefill_tokens,
                                           config.max_prefill_tokens)
        shape = (config.max_batch_size, config.max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        self.caches = tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.num_layers))
        self._model, self._params = split_model(model)
        self._free_slots = list(range(config.max_batch_size - 1, -1, -1))
        self._slot: dict[int, int] = {}
        self._next_rid = 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.stats = dict(steps=0, prefill_tokens=0, decode_tokens=0)
        self.step_times: list[tuple[float, float, float]] = []
        if log is not None:
            print(self.describe(), file=log)

    @property
    def num_step_programs(self) -> int:
        return len(self.prefill_buckets) + 1

    def describe(self) -> str:
        c = self.config
        return (f"dense loop: at most {self.num_step_programs} programs (prefill rows {list(self.prefill_buckets)}, "
                f"one decode of {c.max_batch_size} slots); cache [{c.max_batch_size}, {c.max_seq_len}] per layer, "
                f"max_prefill_tokens={c.max_prefill_tokens}, attention jax.nn.dot_product_attention "
                f"implementation={c.implementation}")

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def submit(self, prompt, max_new_tokens: int) -> int:
        """Queue a greedy request; returns its id (0, 1, ... as the engine's).

        Raises:
          ValueError: empty prompt, ``max_new_tokens < 1`` or a request over ``max_seq_len``.
        """
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("a request needs a non-empty prompt")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
        if len(tokens) + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        self.waiting.append(Request(self._next_rid, tokens, max_new_tokens, SamplingParams()))
        self._next_rid += 1
        return self._next_rid - 1

    def compile_all(self) -> None:
        """Run every program once on dummy inputs (slot 0, position 0: overwritten before any
        request reads it), so that a timed run compiles nothing."""
        c = self.config
        for rows in self.prefill_buckets:
            _, self.caches = dense_prefill_step(self._model, self._params, self.caches, np.zeros(rows, np.int32),
                                                np.int32(0), np.int32(1), np.int32(0), c.implementation)
        out, self.caches = dense_decode_step(self._model, self._params, self.caches,
                                             np.zeros(c.max_batch_size, np.int32),
                                             np.full(c.max_batch_size, c.max_seq_len, np.int32), c.implementation)
        jax.block_until_ready(out)

    def _schedule(self) -> tuple[dict[Request, int], list[Request]]:
        """The engine's: decode every request past its prompt, then prompt chunks under the budget
        (running requests first, then FIFO admission into free slots)."""
        def admit(req: Request) -> bool:
            self._slot[req.rid] = self._free_slots.pop()
            return True

        c = self.config
        return schedule_step(self.running, self.waiting, c.max_prefill_tokens, c.max_batch_size, admit)

    def step(self) -> StepResult:
        """Prefill this step's chunks (one call each) and decode every slot once (one call), then
        wait for the tokens (synchronous: the next step is planned once they are on the host)."""
        start = time.perf_counter()
        chunks, decode = self._schedule()
        if not chunks and not decode:
            return StepResult({}, (), (), ())
        c = self.config
        sampled = []
        for req, n in chunks.items():
            tokens = np.zeros(bucket(n, self.prefill_buckets), np.int32)
            tokens[:n] = req.prompt[req.num_computed : req.num_computed + n]
            tok, self.caches = dense_prefill_step(self._model, self._params, self.caches, tokens,
                                                  np.int32(req.num_computed), np.int32(n),
                                                  np.int32(self._slot[req.rid]), c.implementation)
            sampled.append(tok)
        if decode:
            tokens = np.zeros(c.max_batch_size, np.int32)
            positions = np.full(c.max_batch_size, c.max_seq_len, np.int32)  # slots not decoding write nothing
            for req in decode:
                tokens[self._slot[req.rid]] = req.output[-1]
                positions[self._slot[req.rid]] = req.num_computed
            out, self.caches = dense_decode_step(self._model, self._params, self.caches, tokens, positions,
                                                 c.implementation)
            sampled.append(out)
        dispatched = time.perf_counter()
        host = jax.device_get(sampled)
        arrived = time.perf_counter()
        next_token = {req: int(t) for req, t in zip(chunks, host)}
        if decode:
            next_token |= {req: int(host[-1][self._slot[req.rid]]) for req in decode}

        new, finished = {}, []
        for req, tok in next_token.items():
            n = chunks.get(req, 1)
            req.num_computed += n
            self.stats["prefill_tokens" if req in chunks else "decode_tokens"] += n
            if req.prefilling:
                continue
            req.output.append(tok)
            req.num_generated += 1
            new[req.rid] = tok
            if len(req.output) == req.max_new_tokens:
                self.running.remove(req)
                self._free_slots.append(self._slot.pop(req.rid))
                req.finish_reason = "length"
                self.finished[req.rid] = req
                finished.append(req.rid)
        self.stats["steps"] += 1
        self.step_times.append((dispatched - start, arrived - dispatched, time.perf_counter() - arrived))
        return StepResult(new, tuple(r.rid for r in chunks), tuple(r.rid for r in decode), tuple(finished))

    def run(self) -> dict[int, list[int]]:
        """Step until every submitted request finished; returns ``{rid: generated tokens}``."""
        while not self.idle:
            self.step()
        return {rid: req.output for rid, req in sorted(self.finished.items())}
