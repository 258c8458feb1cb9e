"""A serving engine on jaxinfer: continuous batching, chunked prefill, prefix caching, sampling.

Requests join and leave between steps (Orca's iteration-level scheduling, Yu et al. OSDI 2022).
Each step runs, in one jitted call, one decode token of every request past its prompt and chunks
of prompts under a per-step token budget (chunked prefill: Sarathi-Serve, Agrawal et al. OSDI
2024): a prompt longer than the budget is prefilled over several steps, each chunk attending to
the request's cached tokens (:class:`~jaxinfer.nn.StepPlanner`). Decode tokens go first, then
the chunks of requests already prefilling, then newly admitted requests (FIFO).

Prefix caching: the full pages of every request are registered in the pool's prefix tree by their
token ids (:class:`~jaxinfer.nn.KVCachePool`); a new request attaches the longest cached prefix
of its prompt (a chat template's system prompt, a few-shot prefix) instead of computing it, and
the decode rows read prefix pages that several requests share once per group of requests, through
cascade attention (FlashInfer paper, arXiv 2501.01005, sec. 3.1). Pages no request holds stay
cached until an allocation needs them (least recently used first).

Sampling per request (:class:`SamplingParams`): greedy (temperature 0), or temperature, top-k,
top-p and min-p with a per-request seed. The ``t``-th token of a request draws with key
``fold_in(key(seed), t)``, so its tokens do not depend on the batch it ran in.

No recompiles: every plan capacity comes from the :class:`EngineConfig` (batch size, token budget,
sequence length) and row counts are padded to fixed buckets, so a whole run compiles at most
:attr:`ServingEngine.num_step_programs` step programs (3 by default), printed at start.

Admission control keeps the pool from running dry mid-generation: a request is admitted only when
the pages of its worst case (prompt plus ``max_new_tokens - 1`` cached tokens, less the prefix it
attached) fit, with the worst cases of the running requests, in the free and cached pages, so the
pool's ``OutOfPagesError`` never fires in the loop.

FP8 KV cache (``kv_dtype="float8_e4m3fn"``/``"e4m3"`` or ``"float8_e5m2"``/``"e5m2"``): half the
bytes of a bf16 cache per token read. The cache holds ``K / k_scale`` and ``V / v_scale``
(:mod:`jaxinfer.fp8`) with fixed scales from the config, per tensor or per KV head; they reach
the step as arrays, so other values never recompile. ``backend="auto"`` routes fp8 caches to
the Pallas kernels (fa2/fa3 decline them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import fp8, sampling
from jaxinfer.models.llama import LlamaModel, paged_logits
from jaxinfer.nn.attention import StepBatch, StepPlanner
from jaxinfer.nn.kv_pool import KVCachePool
from jaxinfer.plan.checks import check_int

KV_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2")
"""KV-cache dtypes of the engine; the short names of :data:`jaxinfer.fp8.KV_DTYPE_NAMES`
(``bf16``, ``fp16``, ``e4m3``, ``e5m2``) are accepted too."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request picks its next token.

    Attributes:
      temperature: ``0`` greedy (argmax), else logits are divided by it before the softmax.
      top_k: keep the ``k`` most probable tokens (``0``: all).
      top_p: keep the smallest set of most probable tokens whose mass reaches ``top_p``
        (nucleus sampling, Holtzman et al. ICLR 2020), after top-k; ``1``: all.
      min_p: keep tokens whose probability is at least ``min_p`` times the largest (Nguyen et
        al. 2024, "Min-p sampling"), after top-k and top-p; ``0``: all.
      seed: the request's random seed (any int; taken modulo 2**32).

    Raises:
      ValueError: a negative or non-finite temperature, ``top_k < 0``, ``top_p`` outside
        ``(0, 1]`` or ``min_p`` outside ``[0, 1]``, naming the field.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name, lo, hi, lo_open in (("temperature", 0.0, math.inf, False), ("top_p", 0.0, 1.0, True),
                                      ("min_p", 0.0, 1.0, False)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {val!r}")
            if not math.isfinite(val) or val < lo or val > hi or (lo_open and val == lo):
                interval = f"{'(' if lo_open else '['}{lo}, {hi}]" if math.isfinite(hi) else f">= {lo} and finite"
                raise ValueError(f"{name} must be in {interval}, got {val!r}")
        check_int("top_k", self.top_k, minimum=0)
        check_int("seed", self.seed, minimum=None, maximum=None)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes and policies of a :class:`ServingEngine`; every plan capacity derives from them.

    Attributes:
      num_pages: pages of the KV-cache pool (per layer).
      page_size: tokens per page.
      max_seq_len: longest request (prompt plus generated tokens).
      max_batch_size: requests running at once (prefilling or decoding).
      max_prefill_tokens: prompt tokens prefilled per step (the chunked-prefill budget).
      backend: jaxinfer attention backend (``"auto"``, ``"pallas"``, ``"fa2"``, ``"fa3"``, ``"xla"``).
      kv_dtype: cache dtype, one of :data:`KV_DTYPES` or a short name (``"e4m3"``); ``None``:
        the model's.
      k_scale, v_scale: scales of an fp8 cache: a float (per tensor) or ``num_kv_heads`` floats
        (per KV head), finite and > 0; the cache holds ``K / k_scale`` saturated to the fp8 range
        (:class:`~jaxinfer.nn.KVCachePool`); other caches take only 1.0. The default 1.0 suits
        Llama-family models: their K (RoPE preserves norms) and V are linear maps of an
        RMS-normalized hidden state, so they stay within tens (SmolLM2-135M on a chat prompt:
        ``|K| <= 21``, ``|V| <= 13`` over its 30 layers), far inside e4m3's ±448 with its full
        relative precision (3 mantissa bits) down to 2^-6. A model whose K/V pass 448 needs
        ``amax / 448``; the scales are shared by all layers.
      kv_layout: ``"NHD"`` or ``"HND"``.
      prefix_caching: share full pages of common prompt prefixes between requests.
      cascade_levels: attention levels of the decode rows with prefix caching (``>= 2``: shared
        prefixes read once per group; see :class:`~jaxinfer.nn.StepPlanner`); without prefix
        caching the decode rows always use one level.
      min_prefill_rows, min_decode_rows: smallest row buckets (``None``: one bucket, the
        maximum). Lower values pad less and compile more programs.
      stop_token_ids: a request finishes when it samples one of these.
      sampling_backend: :mod:`jaxinfer.sampling`'s backend (``"auto"``, ``"xla"``, ``"pallas"``).

    Raises:
      ValueError: a size that is not a positive integer, a KV dtype the engine does not support
        (naming ``kv_dtype``), a bad scale or one other than 1.0 for a cache that is not fp8
        (naming it), a bad ``kv_layout``.
    """

    num_pages: int
    page_size: int = 16
    max_seq_len: int = 2048
    max_batch_size: int = 32
    max_prefill_tokens: int = 256
    backend: str = "auto"
    kv_dtype: Any = None
    k_scale: float | tuple[float, ...] = 1.0
    v_scale: float | tuple[float, ...] = 1.0
    kv_layout: str = "NHD"
    prefix_caching: bool = True
    cascade_levels: int = 2
    min_prefill_rows: int | None = None
    min_decode_rows: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    sampling_backend: str = "auto"

    def __post_init__(self):
        for name in ("num_pages", "page_size", "max_seq_len", "max_batch_size", "max_prefill_tokens", "cascade_levels"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("min_prefill_rows", "min_decode_rows"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.kv_dtype is not None:
            check_kv_dtype(self.kv_dtype)
        for name in ("k_scale", "v_scale"):
            scale = getattr(self, name)
            if not isinstance(scale, numbers.Real):
                if isinstance(scale, str) or not isinstance(scale, Sequence):
                    raise ValueError(f"{name} must be a float or a tuple of floats (per KV head), got {scale!r}")
                object.__setattr__(self, name, tuple(scale))  # hashable, as the config is frozen
            fp8.check_scale_value(name, np.asarray(getattr(self, name)) if not isinstance(scale, bool) else scale)
            if np.any(np.asarray(getattr(self, name)) != 1) and not (
                self.kv_dtype is not None and fp8.is_fp8(check_kv_dtype(self.kv_dtype))
            ):
                raise ValueError(f"{name} is for fp8 caches (kv_dtype e4m3 or e5m2), got kv_dtype={self.kv_dtype!r}")
        if self.sampling_backend not in sampling.BACKENDS:
            raise ValueError(f"sampling_backend must be one of {sampling.BACKENDS}, got {self.sampling_backend!r}")
        if self.kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {self.kv_layout!r}")
        object.__setattr__(self, "stop_token_ids", tuple(check_int("stop_token_ids", t, minimum=0)
                                                         for t in self.stop_token_ids))


def check_kv_dtype(dtype) -> jnp.dtype:
    """``dtype`` (a dtype, its name or a short name: ``bf16``, ``fp16``, ``e4m3``, ``e5m2``) as
    a jnp dtype if the engine's KV cache supports it.

    Raises:
      ValueError: naming ``kv_dtype``: an unknown name or a dtype outside :data:`KV_DTYPES`.
    """
    choices = f"{KV_DTYPES} or {tuple(fp8.KV_DTYPE_NAMES)}"
    try:
        dt = fp8.kv_dtype(dtype)
    except ValueError:
        raise ValueError(f"kv_dtype must be one of {choices}, got {dtype!r}") from None
    if dt.name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {choices}, got {dt.name}")
    return dt


@dataclasses.dataclass(eq=False)
class Request:
    """A generation request and its progress.

    Attributes:
      rid: its id.
      prompt: prompt token ids.
      max_new_tokens: most tokens to generate.
      sampling: how it samples.
      output: generated tokens so far.
      num_computed: tokens whose keys and values are in the cache (the prompt prefix attached
        from the prefix cache included).
      num_cached: prompt tokens attached from the prefix cache at admission.
      finish_reason: ``None`` while running or waiting, then ``"length"``, ``"stop"`` or
        ``"cancelled"``.
    """

    rid: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0
    finish_reason: str | None = None

    @property
    def cached_tokens_at_most(self) -> int:
        # The last sampled token is never fed back, so its K/V is never cached.
        return len(self.prompt) + self.max_new_tokens - 1

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did.

    Attributes:
      tokens: ``{rid: token}`` sampled this step (requests that finished their prompt or decoded).
      prefill: requests that ran a prompt chunk; decode: requests that decoded one token.
      finished: requests that finished this step.
    """

    tokens: dict[int, int]
    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    finished: tuple[int, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-slot sampling parameters of a step, ``[Bc]`` each (``Bc``: the engine's batch size;
    padding slots are greedy): temperature, top_p, min_p float32; top_k, seed (uint32), offset
    (the request's generated-token count) int32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    offset: jax.Array


def sample_tokens(logits: jax.Array, s: SamplingBatch, backend: str = "auto") -> jax.Array:
    """Next token per row of ``logits [Bc, vocab]`` -> ``[Bc]`` int32, through :mod:`jaxinfer.sampling`.

    Rows with ``temperature == 0`` take the (first) argmax; the others draw from
    ``softmax(logits / temperature)`` restricted by top-k, then top-p on the renormalized top-k
    distribution, then min-p (vLLM's order), with key ``fold_in(key(seed), offset)``. When no row
    samples, only the argmax runs (``lax.cond``). ``backend``: :mod:`jaxinfer.sampling`'s.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        probs = sampling.softmax(logits, s.temperature)
        probs = sampling.top_k_renorm_probs(probs, s.top_k, backend=backend)
        probs = sampling.top_p_renorm_probs(probs, s.top_p, backend=backend)
        tokens = sampling.min_p_sampling_from_probs(probs, s.min_p, seed=s.seed, offset=s.offset, backend=backend)
        return jnp.where(s.temperature > 0, tokens.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), sampled, lambda: greedy)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=2)
def serve_step(graphdef, params, caches, tokens, batch: StepBatch, row_sampling: SamplingBatch,
               sampling_backend: str = "auto"):
    """Jitted step: the next token ``[Bc]`` int32 of each request of ``batch`` (rows
    ``batch.last_rows``) and the new caches (``caches`` donated)."""
    logits, caches = paged_logits(graphdef, params, caches, tokens, batch)
    return sample_tokens(logits, row_sampling, sampling_backend), caches


def schedule_step(running: list[Request], waiting: collections.deque[Request], budget: int,
                  admit: Callable[[Request], bool]) -> tuple[dict[Request, int], list[Request]]:
    """One step's work under a prompt-token budget (Sarathi-style chunked prefill): every running
    request past its prompt decodes; prompt chunks take up to ``budget`` tokens, requests already
    prefilling first, then waiting requests in arrival order while ``admit(request)`` takes them
    (it reserves their resources; they move from ``waiting`` to ``running``).

    Returns:
      ``({request: prompt tokens this step}, decode requests)``.
    """
    decode = [r for r in running if not r.prefilling]
    chunks = {}
    for req in running:
        if req.prefilling and budget:
            chunks[req] = min(len(req.prompt) - req.num_computed, budget)
            budget -= chunks[req]
    while waiting and budget and admit(waiting[0]):
        req = waiting.popleft()
        running.append(req)
        chunks[req] = min(len(req.prompt) - req.num_computed, budget)
        budget -= chunks[req]
    return chunks, decode


class ServingEngine:
    """Continuous-batching generation for a :class:`~jaxinfer.models.llama.LlamaModel`.

    Args:
      model: the model (its weights are captured at construction).
      config: sizes and policies.
      log: where the start-up line (step-program bound, capacities) goes; ``None``: nowhere.

    Attributes:
      pool: the KV-cache pool; planner: the step planner.
      waiting, running: queued and admitted requests; finished: ``{rid: Request}``.
      num_step_programs: the most step programs a run compiles (see :class:`EngineConfig`).
      stats: counters: ``steps``, ``prefill_tokens`` (computed), ``cached_tokens`` (attached
        from the prefix cache), ``decode_tokens``.

    Raises:
      ValueError: ``max_seq_len`` over the model's ``max_position_embeddings`` when it has one,
        or a bad config.
    """

    def __init__(self, model: LlamaModel, config: EngineConfig, *, log: TextIO | None = sys.stderr):
        cfg = model.config
        trained = getattr(cfg, "max_position_embeddings", None)
        if trained is not None and config.max_seq_len > trained:
            raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's max_position_embeddings={trained}")
        kv_dtype = check_kv_dtype(cfg.dtype if config.kv_dtype is None else config.kv_dtype)
        self.config = config
        self.pool = KVCachePool(config.num_pages, config.page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                dtype=kv_dtype, kv_layout=config.kv_layout,
                                **(dict(k_scale=config.k_scale, v_scale=config.v_scale)
                                   if fp8.is_fp8(kv_dtype) else {}))
        self.planner = StepPlanner(
            self.pool, cfg.num_qo_heads, max_seq_len=config.max_seq_len, max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens, backend=config.backend, q_data_type=cfg.dtype,
            min_prefill_rows=config.min_prefill_rows, min_decode_rows=config.min_decode_rows,
            cascade_levels=config.cascade_levels if config.prefix_caching else 1,
        )
        self._graphdef, self._params = nnx.split(model)
        self._next_rid = 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.stats = dict(steps=0, prefill_tokens=0, cached_tokens=0, decode_tokens=0)
        if log is not None:
            print(self.describe(), file=log)

    @property
    def num_step_programs(self) -> int:
        return self.planner.num_step_programs

    def describe(self) -> str:
        """One line: the step-program bound and the capacities it comes from."""
        c, p = self.config, self.planner
        scales = "" if self.pool.k_scale is None else f", k_scale={c.k_scale}, v_scale={c.v_scale}"
        return (
            f"jaxinfer.serve: at most {self.num_step_programs} step program(s) "
            f"(prefill rows {list(p.prefill_buckets)} or none x decode rows {list(p.decode_buckets)} or none); "
            f"max_batch_size={c.max_batch_size}, max_prefill_tokens={c.max_prefill_tokens}, "
            f"max_seq_len={c.max_seq_len}, {c.num_pages} pages of {c.page_size} tokens "
            f"({self.pool.dtype.name}{scales}), "
            f"backend={c.backend}, prefix caching {'on' if c.prefix_caching else 'off'}, "
            f"decode attention levels={p.cascade_levels}"
        )

    def submit(self, prompt, max_new_tokens: int, sampling: SamplingParams | None = None) -> int:
        """Queue a request; returns its id.

        Args:
          prompt: token ids (a sequence of ints).
          max_new_tokens: most tokens to generate (>= 1).
          sampling: :class:`SamplingParams` (default: greedy).

        Raises:
          ValueError: empty prompt, ``max_new_tokens < 1``, a request longer than ``max_seq_len``
            or one that could never fit in the pool.
        """
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("a request needs a non-empty prompt")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
        sampling = sampling if sampling is not None else SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        req = Request(self._next_rid, tokens, max_new_tokens, sampling)
        if len(tokens) + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        if self.pool.pages_for(req.cached_tokens_at_most) > self.pool.num_pages:
            raise ValueError(f"request needs more than the pool's {self.pool.num_pages} pages")
        self._next_rid += 1
        self.waiting.append(req)
        return req.rid

    def cancel(self, rid: int) -> bool:
        """Stop request ``rid`` (waiting or running) and free its pages; returns whether it was
        still queued or running. Its tokens so far stay in ``finished[rid].output``."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    if queue is self.running:
                        self.pool.free(rid)
                    self._finish(req, "cancelled")
                    return True
        return False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _remaining_pages(self, req: Request) -> int:
        return self.pool.pages_for(req.cached_tokens_at_most) - len(self.pool.pages(req.rid))

    def _admit(self, req: Request) -> bool:
        """Add ``req`` to the pool (attaching its cached prefix) if every running request's worst
        case still fits; else leave the pool as it was."""
        prefix = req.prompt[:-1] if self.config.prefix_caching else ()
        req.num_computed = req.num_cached = self.pool.add(req.rid, prefix)
        need = sum(self._remaining_pages(r) for r in self.running) + self._remaining_pages(req)
        if need > self.pool.num_available_pages:
            self.pool.free(req.rid)
            req.num_computed = req.num_cached = 0
            return False
        self.stats["cached_tokens"] += req.num_cached
        return True

    def _schedule(self) -> tuple[dict[Request, int], list[Request]]:
        """This step's prompt chunks ``{request: tokens}`` and decode requests."""
        return schedule_step(self.running, self.waiting, self.config.max_prefill_tokens,
                             lambda req: len(self.running) < self.config.max_batch_size and self._admit(req))

    def step(self) -> StepResult:
        """Admit, prefill chunks and decode once; finished requests leave and release their pages."""
        chunks, decode = self._schedule()
        if not chunks and not decode:
            return StepResult({}, (), (), ())
        pool = self.pool
        for req, n in chunks.items():
            pool.extend(req.rid, n)
        for req in decode:
            pool.extend(req.rid, 1)
        if self.planner.cascade_levels > 1:
            decode.sort(key=lambda r: pool.pages(r.rid))  # sharers stand together: one cascade group each
        batch = self.planner.plan({r.rid: n for r, n in chunks.items()}, [r.rid for r in decode])
        tokens = np.zeros(batch.num_rows, np.int32)
        row = 0
        for req, n in chunks.items():
            tokens[row : row + n] = req.prompt[req.num_computed : req.num_computed + n]
            row += n
        p = batch.num_prefill_rows
        tokens[p : p + len(decode)] = [r.output[-1] for r in decode]
        order = list(chunks) + decode
        next_tokens, pool.caches = serve_step(self._graphdef, self._params, pool.caches, tokens, batch,
                                              self._sampling_batch(order), self.config.sampling_backend)
        sampled = np.asarray(next_tokens).tolist()

        new, finished = {}, []
        for req, tok in zip(order, sampled):
            n = chunks.get(req, 1)
            full_pages_before = req.num_computed // pool.page_size
            req.num_computed += n
            self.stats["prefill_tokens" if req in chunks else "decode_tokens"] += n
            if self.config.prefix_caching and req.num_computed // pool.page_size > full_pages_before:
                pool.cache_prefix(req.rid, (req.prompt + req.output)[: req.num_computed])
            if req.prefilling:
                continue  # a chunk short of the prompt's end: its logits are not a next token
            req.output.append(tok)
            new[req.rid] = tok
            if tok in self.config.stop_token_ids or len(req.output) == req.max_new_tokens:
                self.running.remove(req)
                pool.free(req.rid)
                self._finish(req, "stop" if tok in self.config.stop_token_ids else "length")
                finished.append(req.rid)
        self.stats["steps"] += 1
        return StepResult(new, tuple(r.rid for r in chunks), tuple(r.rid for r in decode), tuple(finished))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.finished[req.rid] = req

    def _sampling_batch(self, order: list[Request]) -> SamplingBatch:
        bc = self.config.max_batch_size
        temperature, top_p, min_p = np.zeros(bc, np.float32), np.ones(bc, np.float32), np.zeros(bc, np.float32)
        top_k, seed, offset = np.zeros(bc, np.int32), np.zeros(bc, np.uint32), np.zeros(bc, np.int32)
        for i, req in enumerate(order):
            s = req.sampling
            temperature[i], top_k[i], top_p[i], min_p[i] = s.temperature, s.top_k, s.top_p, s.min_p
            seed[i], offset[i] = s.seed % 2**32, len(req.output)
        return SamplingBatch(*(jnp.asarray(a) for a in (temperature, top_k, top_p, min_p, seed, offset)))

    def run(self) -> dict[int, list[int]]:
        """Step until every submitted request finished; returns ``{rid: generated tokens}``."""
        while not self.idle:
            self.step()
        return {rid: req.output for rid, req in sorted(self.finished.items())}
