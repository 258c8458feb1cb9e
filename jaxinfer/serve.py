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
cascade attention (FlashInfer paper, arXiv 2501.01005, sec. 3.1), in the steps where that saves
at least ``EngineConfig.cascade_min_saved_bytes`` of KV reads (vLLM decides per step too, from the
common prefix's length and the request count): below that, the cascade's extra kernels and
planning cost more host time than the bytes save, and the step reads each request's pages through
one level. Either way the prompt tokens of a cached prefix are not computed again. Pages no
request holds stay cached until an allocation needs them (least recently used first).

Sampling per request (:class:`SamplingParams`): greedy (temperature 0), or temperature, top-k,
top-p and min-p with a per-request seed. The ``t``-th token of a request draws with key
``fold_in(key(seed), t)``, so its tokens do not depend on the batch it ran in.

No recompiles: every plan capacity comes from the :class:`EngineConfig` (batch size, token budget,
sequence length) and row counts are padded to fixed buckets, so a whole run compiles at most
:attr:`ServingEngine.num_step_programs` step programs, printed at start (10 by default: prompt
chunks only, mixed and decode only, the latter two with one attention level or with cascade levels,
each greedy or with sampling rows; a greedy run compiles at most the five greedy ones), and
:meth:`ServingEngine.warm_up` compiles them all before the first request.

No device-side branch in a step: whether a step has rows that sample (temperature > 0) is known
on the host and selects the step program (a static argument). A ``lax.cond`` on a device value
would make XLA's GPU runtime copy its predicate to the host and block until the stream reaches it
(``ConditionalThunk::ExecuteOnStream``), so the call that dispatches a step would return only
after the device had run most of it: planning would no longer overlap the device.

Admission control keeps the pool from running dry mid-generation: a request is admitted only when
the pages of its worst case (prompt plus ``max_new_tokens - 1`` cached tokens, less the prefix it
attached) fit, with the worst cases of the running requests, in the free and cached pages, so the
pool's ``OutOfPagesError`` never fires in the loop.

FP8 KV cache (``kv_dtype="float8_e4m3fn"``/``"e4m3"`` or ``"float8_e5m2"``/``"e5m2"``): half the
bytes of a bf16 cache per token read. The cache holds ``K / k_scale`` and ``V / v_scale``
(:mod:`jaxinfer.fp8`) with fixed scales from the config, per tensor or per KV head; they reach
the step as arrays, so other values never recompile. ``backend="auto"`` routes fp8 caches to
the Pallas kernels (fa2/fa3 decline them).

Overlap scheduling (``EngineConfig(overlap=True)``, the default; SGLang's overlap scheduler,
Zheng et al. 2024, and vLLM's async scheduling): the host plans and dispatches step ``t + 1``
before it waits for step ``t``'s sampled tokens, then reads those while ``t + 1`` runs, so the
host's planning hides behind the device's work. It plans from lengths alone: every decode row's
input token is the previous step's sampled token, which the jitted step gathers from the previous
step's output array on the device (a row index per decode row), so no token needs to reach the
host first. A request that samples a stop token at step ``t`` is already in step ``t + 1``: that
extra token is discarded and its pages are freed one step later (the device runs steps in order,
so a page freed then and reused by a later step is written after the discarded row). Pages are
registered in the prefix tree when the step that wrote them has come back to the host (their
token ids, sampled ones included, are known then). Outputs are the synchronous engine's
(``overlap=False``: dispatch a step, wait for its tokens, then plan the next), token for token;
what a step returns lags one step (:meth:`ServingEngine.step`).

Host cost per step: the model's graph definition is a static argument of the jitted step whose
hash (a walk of the whole graph) is computed once (:class:`ModelDef`), not on every call; the
step's host inputs (prompt tokens, the decode rows' gather indices, the sampling parameters) go to
the device as one int32 array. Nothing per step loops over a request's pages in Python: the pool
keeps each request's page row in a numpy table (:meth:`~jaxinfer.nn.KVCachePool.extend_batch`
grows the step's requests in one call), the planner gathers one page table per step, sorts the
decode rows by byte keys (:meth:`~jaxinfer.nn.StepPlanner.sharing_order`) and keeps the shared
cascade levels while the requests' shared prefixes stay the same, and prompt chunks and pages to
register are slices of one int32 token array per request (benchmarks/decisions/serving.md).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import numbers
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import fp8, parallel, sampling
from jaxinfer.models.llama import LlamaModel
from jaxinfer.models.static import ModelDef, split_model
from jaxinfer.nn.attention import StepPlanner
from jaxinfer.nn.kv_pool import KVCachePool
from jaxinfer.plan.checks import check_int
from jaxinfer.plan.transfer import PackedTree, pack

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
      cascade_min_saved_bytes: a step with prefix caching reads its decode rows through the
        cascade levels only when they save at least this many bytes of KV reads over all layers
        (:meth:`~jaxinfer.nn.StepPlanner.saved_bytes`); else through one level. 0: always cascade
        (fewer step programs). The levels cost host time (planning, two more kernels a layer),
        and with overlapped steps host time is the step unless the device's work is longer: they
        pay once the shared reads alone outlast the host's step. The default, 16 GiB, is several
        milliseconds of HBM reads on an H100 or H200; a model whose steps are device-bound (its
        weights and KV reads outlast the host) gains from a lower value
        (benchmarks/decisions/serving.md).
      min_prefill_rows, min_decode_rows: smallest row buckets (``None``: one bucket, the
        maximum). Lower values pad less and compile more programs.
      stop_token_ids: a request finishes when it samples one of these.
      sampling_backend: :mod:`jaxinfer.sampling`'s backend (``"auto"``, ``"xla"``, ``"pallas"``).
        The xla sampler's top-k and min-p draws are ``lax.while_loop`` s: on a GPU each iteration
        blocks the host (see the module docstring), so steps with sampling rows stop overlapping;
        the Pallas sampler (``"auto"`` on a GPU) runs as kernels.
      overlap: plan and dispatch each step before waiting for the previous one's tokens (see the
        module docstring); ``False``: the synchronous loop. Both give the same tokens.
      tensor_parallel_size: devices that split every layer's heads and MLP (Megatron-style,
        :mod:`jaxinfer.parallel`): the step runs under ``jax.shard_map`` on the first
        ``tensor_parallel_size`` devices, each holding its KV heads' slice of every page; the host
        plans once with one shard's head geometry. 1: one device, no mesh.

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
    cascade_min_saved_bytes: int = 16 << 30
    min_prefill_rows: int | None = None
    min_decode_rows: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    sampling_backend: str = "auto"
    overlap: bool = True
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be a bool, got {self.overlap!r}")
        for name in ("num_pages", "page_size", "max_seq_len", "max_batch_size", "max_prefill_tokens", "cascade_levels",
                     "tensor_parallel_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("cascade_min_saved_bytes", self.cascade_min_saved_bytes, minimum=0, maximum=None)
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
      output: generated tokens so far (on the host).
      num_computed: tokens whose keys and values are in the cache once the steps dispatched so
        far have run (the prompt prefix attached from the prefix cache included).
      num_generated: tokens sampled by the steps dispatched so far (``len(output)`` plus those of
        a step in flight).
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
    num_generated: int = 0
    num_cached: int = 0
    finish_reason: str | None = None

    @property
    def cached_tokens_at_most(self) -> int:
        # The last sampled token is never fed back, so its K/V is never cached.
        return len(self.prompt) + self.max_new_tokens - 1

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt)

    @property
    def schedulable(self) -> bool:
        """Whether a next step has work for it (its last token is not dispatched yet)."""
        return self.num_generated < self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did.

    Attributes:
      tokens: ``{rid: token}`` sampled this step (requests that finished their prompt or decoded).
      prefill: requests that ran a prompt chunk; decode: requests that decoded one token (rows
        discarded because their request had finished are in neither).
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

    FIELDS = 6  # rows of the packed form

    @staticmethod
    def pack_row(s: SamplingParams) -> np.ndarray:
        """``s`` as the first 5 int32 words of a packed slot (floats and the seed bit-cast; the
        offset, last, is the engine's)."""
        floats = np.asarray([s.temperature, s.top_p, s.min_p], np.float32).view(np.int32)
        return np.asarray([floats[0], s.top_k, floats[1], floats[2],
                           np.uint32(s.seed % 2**32).view(np.int32)], np.int32)

    @classmethod
    def unpack(cls, packed: jax.Array) -> SamplingBatch:
        """From ``[6, Bc]`` int32 rows (temperature, top_k, top_p, min_p, seed, offset; floats and
        the seed bit-cast): one host-to-device copy for the whole batch instead of six."""
        as_f32 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
        return cls(temperature=as_f32(packed[0]), top_k=packed[1], top_p=as_f32(packed[2]), min_p=as_f32(packed[3]),
                   seed=jax.lax.bitcast_convert_type(packed[4], jnp.uint32), offset=packed[5])


# A padding slot: greedy, no top-k, top_p 1, min_p 0, seed 0, offset 0.
_PAD_SAMPLING = np.append(SamplingBatch.pack_row(SamplingParams()), 0).astype(np.int32)


def sample_tokens(logits: jax.Array, s: SamplingBatch, backend: str = "auto", *, sampled: bool = True) -> jax.Array:
    """Next token per row of ``logits [Bc, vocab]`` -> ``[Bc]`` int32, through :mod:`jaxinfer.sampling`.

    Rows with ``temperature == 0`` take the (first) argmax; the others draw from
    ``softmax(logits / temperature)`` restricted by top-k, then top-p on the renormalized top-k
    distribution, then min-p (vLLM's order), with key ``fold_in(key(seed), offset)``.
    ``backend``: :mod:`jaxinfer.sampling`'s. ``sampled`` (static): whether any row may sample;
    ``False`` runs only the argmax (every row is then taken as greedy).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sampled:
        return greedy
    probs = sampling.softmax(logits, s.temperature)
    probs = sampling.top_k_renorm_probs(probs, s.top_k, backend=backend)
    probs = sampling.top_p_renorm_probs(probs, s.top_p, backend=backend)
    tokens = sampling.min_p_sampling_from_probs(probs, s.min_p, seed=s.seed, offset=s.offset, backend=backend)
    return jnp.where(s.temperature > 0, tokens.astype(jnp.int32), greedy)


# A step is hundreds of small kernels, which the host launches one by one unless XLA records them
# into CUDA graphs (command buffers). By default XLA graphs only runs of several compatible commands
# and leaves dynamic-slice fusions out, and the launch loop is host time that bounds the engine;
# graphing every run cut it on the H100 (benchmarks/decisions/serving.md). Other backends ignore
# these options.
STEP_COMPILER_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION",
    "xla_gpu_graph_min_graph_size": 1,
}


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=2, compiler_options=STEP_COMPILER_OPTIONS)
def serve_step(model: ModelDef | parallel.TensorParallelStep, params, caches, prev_tokens, step: PackedTree,
               sampling_backend: str = "auto", sampled: bool = True):
    """Jitted engine step: the next token ``[Bc]`` int32 of each request of the step's batch
    (rows ``batch.last_rows``) and the new caches (``caches`` donated).

    Args:
      model, params: :func:`split_model` of the model, or a
        :class:`~jaxinfer.parallel.TensorParallelStep` and its sharded parameters.
      prev_tokens: ``[Bc]`` int32, the previous step's output.
      step: :func:`~jaxinfer.plan.transfer.pack` of ``(batch, inputs)``: the step's
        :class:`~jaxinfer.nn.StepBatch` (:meth:`~jaxinfer.nn.StepPlanner.plan_host`) and
        ``inputs [2 T + 6 Bc]`` int32 (``T = batch.num_rows``): the rows' host tokens; per row the
        slot of ``prev_tokens`` holding its input token, or ``-1`` for the host token (decode rows
        read the token their request sampled last step, prompt rows the host's); then the
        :meth:`SamplingBatch.unpack` rows. One host-to-device copy for all of them.
      sampled: whether any row samples (:func:`sample_tokens`).

    It carries :data:`STEP_COMPILER_OPTIONS`, which ``jax.jit`` takes only at the top level: inside
    another jitted function call ``serve_step.__wrapped__``.
    """
    batch, inputs = step.unpack()
    t, bc = batch.num_rows, prev_tokens.shape[0]
    src = inputs[t : 2 * t]
    tokens = jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], inputs[:t])
    logits, caches = model.paged_logits(params, caches, tokens, batch)
    row_sampling = SamplingBatch.unpack(inputs[2 * t :].reshape(SamplingBatch.FIELDS, bc))
    return sample_tokens(logits, row_sampling, sampling_backend, sampled=sampled), caches


def schedule_step(running: list[Request], waiting: collections.deque[Request], budget: int,
                  max_batch_size: int, admit) -> tuple[dict[Request, int], list[Request]]:
    """One step's work under a prompt-token budget (Sarathi-style chunked prefill): every running
    request past its prompt decodes (unless its last token is already dispatched:
    :attr:`Request.schedulable`); prompt chunks take up to ``budget`` tokens, requests already
    prefilling first, then waiting requests in arrival order while the step has fewer than
    ``max_batch_size`` requests and ``admit(request)`` takes them (it reserves their resources;
    they move from ``waiting`` to ``running``).

    Returns:
      ``({request: prompt tokens this step}, decode requests)``.
    """
    active = [r for r in running if r.schedulable]
    decode = [r for r in active if not r.prefilling]
    chunks = {}
    for req in active:
        if req.prefilling and budget:
            chunks[req] = min(len(req.prompt) - req.num_computed, budget)
            budget -= chunks[req]
    size = len(active)
    while waiting and budget and size < max_batch_size and admit(waiting[0]):
        req = waiting.popleft()
        running.append(req)
        size += 1
        chunks[req] = min(len(req.prompt) - req.num_computed, budget)
        budget -= chunks[req]
    return chunks, decode


@dataclasses.dataclass(frozen=True, eq=False)
class _Flight:
    """A dispatched step: its requests in row order, its output (on the device until waited for),
    and per request the prompt tokens it ran (``0``: a decode row), its ``num_computed`` after the
    step and whether it samples a token."""

    next_tokens: jax.Array
    order: list[Request]
    chunk: list[int]
    computed: list[int]
    samples: list[bool]


class ServingEngine:
    """Continuous-batching generation for a :class:`~jaxinfer.models.llama.LlamaModel`.

    Args:
      model: the model (its weights are captured at construction).
      config: sizes and policies.
      log: where the start-up line (step-program bound, capacities) goes; ``None``: nowhere.
      devices: the devices to run on (default: jax's default device, or ``jax.devices()`` with
        ``config.tensor_parallel_size > 1``); the first ``tensor_parallel_size`` are used. The
        weights are placed there (copied once) and the host's step arrays go to the first.

    Attributes:
      pool: the KV-cache pool; planner: the step planner.
      waiting: queued requests; running: admitted requests that hold pages (with overlap, a
        request whose last token is in flight stays until that step comes back);
      finished: ``{rid: Request}``.
      num_step_programs: the most step programs a run compiles (see :class:`EngineConfig`).
      stats: counters: ``steps`` (dispatched), ``prefill_tokens`` (computed), ``cached_tokens``
        (attached from the prefix cache), ``decode_tokens``, ``discarded_rows`` (requests' rows
        of a step that came back after they finished: one past a stop token with overlap, or
        cancelled; not in the other counts).
      step_times: per :meth:`step` call that waited for a step, ``(host before dispatch, wait
        for the device, host after)`` in seconds (``time.perf_counter`` stamps): scheduling,
        planning and dispatching the next step; blocking on the sampled tokens; bookkeeping.

    Raises:
      ValueError: ``max_seq_len`` over the model's ``max_position_embeddings`` when it has one,
        a bad config, a ``tensor_parallel_size`` that does not divide the model's heads or
        exceeds the devices, or an fp8 ``kv_dtype`` with ``tensor_parallel_size > 1``.
    """

    def __init__(self, model: LlamaModel, config: EngineConfig, *, log: TextIO | None = sys.stderr,
                 devices: Sequence[jax.Device] | None = None):
        cfg = model.config
        trained = getattr(cfg, "max_position_embeddings", None)
        if trained is not None and config.max_seq_len > trained:
            raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's max_position_embeddings={trained}")
        kv_dtype = check_kv_dtype(cfg.dtype if config.kv_dtype is None else config.kv_dtype)
        self.config = config
        # Where the host's per-step arrays go (the group's first device; None: jax's default).
        self._device = None if devices is None else list(devices)[0]
        if config.tensor_parallel_size == 1:
            with self._on_device():
                self.pool = KVCachePool(config.num_pages, config.page_size, cfg.num_layers, cfg.num_kv_heads,
                                        cfg.head_dim, dtype=kv_dtype, kv_layout=config.kv_layout,
                                        **(dict(k_scale=config.k_scale, v_scale=config.v_scale)
                                           if fp8.is_fp8(kv_dtype) else {}))
            self._model, self._params = split_model(model)
            if self._device is not None:
                self._params = jax.device_put(self._params, self._device)
            num_qo_heads = cfg.num_qo_heads
        else:
            sharded = self._tensor_parallel(model, config, kv_dtype, devices)
            self.pool = sharded.make_pool(config.num_pages, config.page_size, config.kv_layout, dtype=kv_dtype)
            self.pool.caches = sharded.make_caches(config.num_pages, config.page_size, config.kv_layout, kv_dtype)
            self._model, self._params = parallel.TensorParallelStep(sharded), sharded.params
            num_qo_heads = sharded.shard_config.num_qo_heads
        self.planner = StepPlanner(
            self.pool, num_qo_heads, max_seq_len=config.max_seq_len, max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens, backend=config.backend, q_data_type=cfg.dtype,
            min_prefill_rows=config.min_prefill_rows, min_decode_rows=config.min_decode_rows,
            cascade_levels=config.cascade_levels if config.prefix_caching else 1,
            cascade_min_saved_bytes=config.cascade_min_saved_bytes,
        )
        self._stop = frozenset(config.stop_token_ids)
        self._next_rid = 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.stats = dict(steps=0, prefill_tokens=0, cached_tokens=0, decode_tokens=0, discarded_rows=0)
        self.step_times: list[tuple[float, float, float]] = []
        # The last dispatched step's output and each of its requests' slot in it: the next
        # step's decode rows read their input tokens there.
        with self._on_device():
            self._prev_tokens = jnp.zeros(config.max_batch_size, jnp.int32)
        self._prev_slot: dict[Request, int] = {}
        self._flight: _Flight | None = None  # a dispatched step not yet waited for (overlap)
        self._sampling_rows: dict[Request, np.ndarray] = {}
        # Per request its token ids: the prompt, then each output as it reaches the host.
        self._token_ids: dict[Request, np.ndarray] = {}
        if log is not None:
            print(self.describe(), file=log)

    @staticmethod
    def _tensor_parallel(model: LlamaModel, config: EngineConfig, kv_dtype, devices) -> parallel.ShardedLlama:
        """``model`` split over the first ``tensor_parallel_size`` devices (one DP group)."""
        if fp8.is_fp8(kv_dtype):
            raise ValueError(f"kv_dtype: fp8 caches are not served with tensor_parallel_size > 1 (their per-head "
                             f"scales would need splitting over the shards), got {config.kv_dtype!r}")
        pc = parallel.ParallelConfig(tp=config.tensor_parallel_size)
        try:
            pc.shard_config(model.config)
            mesh = parallel.make_mesh(pc, devices)
        except ValueError as e:
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size}: {e}") from None
        return parallel.ShardedLlama.from_model(model, mesh, pc)

    def _on_device(self):
        return contextlib.nullcontext() if self._device is None else jax.default_device(self._device)

    @property
    def num_step_programs(self) -> int:
        """The planner's batch shapes, each greedy or with sampling rows."""
        return 2 * self.planner.num_step_programs

    def warm_up(self, sampling: bool = True) -> None:
        """Compile every step program (:attr:`num_step_programs`; without ``sampling`` only the
        greedy ones) by running one throw-away step of each: per pair of row buckets, the fewest
        rows that pad to them, decode rows through one level and through cascade levels. The
        steps write only pages that are free again afterwards; the prefix cache, the counters and
        the step times are as before.

        Raises:
          ValueError: requests are queued, running or in flight (warm up an idle engine).
        """
        if not self.idle:
            raise ValueError("warm_up needs an idle engine: requests are queued, running or in flight")
        planner, c = self.planner, self.config
        # The fewest rows that pad to each bucket (and none).
        prefill = [0, 1, *(b + 1 for b in planner.prefill_buckets[:-1])]
        decode = [0, 1, *(b + 1 for b in planner.decode_buckets[:-1])]
        cascades = [False, True] if planner.chooses_levels else [None]
        for sampled in (False, True) if sampling else (False,):
            for n_prefill in prefill:
                chunks = [min(c.max_seq_len, n_prefill - i) for i in range(0, n_prefill, c.max_seq_len)]
                for n_decode in decode:
                    if not 0 < len(chunks) + n_decode <= c.max_batch_size:
                        continue  # no step, or one the scheduler never forms
                    for cascade in cascades if n_decode else [None]:
                        self._warm_up_step(chunks, n_decode, cascade, sampled)
        self.step_times.clear()

    def _warm_up_step(self, chunks: list[int], n_decode: int, cascade: bool | None, sampled: bool) -> None:
        """One step of throw-away requests, freed again: one per prompt chunk of ``chunks``
        tokens, and ``n_decode`` of one token decoding."""
        pool, planner, c = self.pool, self.planner, self.config
        rids = [("warm-up", i) for i in range(len(chunks) + n_decode)]
        try:
            for rid in rids:
                pool.add(rid)
            pool.extend_batch(rids, [*chunks, *(1 for _ in range(n_decode))])
            batch = planner.plan_host(dict(zip(rids, chunks)), rids[len(chunks):], cascade=cascade)
            inputs = np.zeros(2 * batch.num_rows + SamplingBatch.FIELDS * c.max_batch_size, np.int32)
            inputs[batch.num_rows : 2 * batch.num_rows] = -1
            with self._on_device():
                self._launch(batch, inputs, sampled).block_until_ready()
        finally:
            for rid in rids:
                if rid in pool.requests:
                    pool.free(rid)

    def describe(self) -> str:
        """One line: the step-program bound and the capacities it comes from."""
        c, p = self.config, self.planner
        scales = "" if self.pool.k_scale is None else f", k_scale={c.k_scale}, v_scale={c.v_scale}"
        levels = " (one level or cascade)" if p.chooses_levels else ""
        return (
            f"jaxinfer.serve: at most {self.num_step_programs} step program(s) "
            f"(prefill rows {list(p.prefill_buckets)} or none x decode rows {list(p.decode_buckets)}{levels} or none "
            f"x greedy or sampling); "
            f"max_batch_size={c.max_batch_size}, max_prefill_tokens={c.max_prefill_tokens}, "
            f"max_seq_len={c.max_seq_len}, {c.num_pages} pages of {c.page_size} tokens "
            f"({self.pool.dtype.name}{scales}), "
            f"backend={c.backend}, prefix caching {'on' if c.prefix_caching else 'off'}, "
            f"decode attention levels={p.cascade_levels}, {'overlapped' if c.overlap else 'synchronous'} steps"
            + (f", tensor_parallel_size={c.tensor_parallel_size}" if c.tensor_parallel_size > 1 else "")
        )

    def submit(self, prompt, max_new_tokens: int, sampling: SamplingParams | None = None) -> int:
        """Queue a request; returns its id.

        Args:
          prompt: token ids (a sequence of ints).
          max_new_tokens: most tokens to generate (>= 1).
          sampling: :class:`SamplingParams` (default: greedy).

        Raises:
          ValueError: empty prompt, a token id outside int32, ``max_new_tokens < 1``, a request
            longer than ``max_seq_len``
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
        ids = np.zeros(len(tokens) + max_new_tokens, np.int32)
        try:
            ids[: len(tokens)] = tokens
        except OverflowError:
            raise ValueError(f"prompt token ids must fit int32, got {min(tokens)}..{max(tokens)}") from None
        self._next_rid += 1
        self.waiting.append(req)
        self._sampling_rows[req] = SamplingBatch.pack_row(sampling)
        self._token_ids[req] = ids
        return req.rid

    def cancel(self, rid: int) -> bool:
        """Stop request ``rid`` (waiting or running) and free its pages; returns whether it was
        still queued or running. Its tokens so far (those back on the host) stay in
        ``finished[rid].output``; a step in flight discards its row."""
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
        return not self.waiting and not self.running and self._flight is None

    def _remaining_pages(self, reqs: list[Request]) -> int:
        """Pages ``reqs`` may still allocate: their worst cases less the pages they hold (a
        request holds the pages of its length)."""
        ps = self.pool.page_size
        worst = np.fromiter((r.cached_tokens_at_most for r in reqs), np.int64, len(reqs))
        held = self.pool.seq_lens([r.rid for r in reqs])
        return int(((worst + ps - 1) // ps - (held + ps - 1) // ps).sum())

    def _admit(self, req: Request) -> bool:
        """Add ``req`` to the pool (attaching its cached prefix) if every running request's worst
        case still fits; else leave the pool as it was."""
        prefix = self._token_ids[req][: len(req.prompt) - 1] if self.config.prefix_caching else ()
        req.num_computed = req.num_cached = self.pool.add(req.rid, prefix)
        need = self._remaining_pages([*self.running, req])
        if need > self.pool.num_available_pages:
            self.pool.free(req.rid)
            req.num_computed = req.num_cached = 0
            return False
        self.stats["cached_tokens"] += req.num_cached
        return True

    def step(self) -> StepResult:
        """Admit, prefill chunks and decode once; finished requests leave and release their pages.

        Synchronous (``overlap=False``): dispatch a step, wait for it and return what it did.
        Overlapped: dispatch a step (if there is work), then wait for the previous one and return
        what *that* one did (the first call returns no tokens; once no work is left, a call only
        collects the step in flight). Either way every token reaches ``Request.output`` in order
        and :attr:`idle` turns true only after the last step came back.
        """
        start = time.perf_counter()
        with self._on_device():
            flight = self._dispatch()
        if self.config.overlap:
            flight, self._flight = self._flight, flight
        if flight is None:
            return StepResult({}, (), (), ())
        dispatched = time.perf_counter()
        sampled = np.asarray(flight.next_tokens).tolist()
        arrived = time.perf_counter()
        result = self._collect(flight, sampled)
        self.step_times.append((dispatched - start, arrived - dispatched, time.perf_counter() - arrived))
        return result

    def _dispatch(self) -> _Flight | None:
        """Schedule, plan and launch a step (without waiting for it); ``None`` when no request
        has work."""
        chunks, decode = schedule_step(self.running, self.waiting, self.config.max_prefill_tokens,
                                       self.config.max_batch_size, self._admit)
        if not chunks and not decode:
            return None
        pool, planner = self.pool, self.planner
        decode_rids = [r.rid for r in decode]
        pool.extend_batch([*(r.rid for r in chunks), *decode_rids], [*chunks.values(), *(1 for _ in decode)])
        may_cascade = planner.may_cascade(decode_rids)
        if may_cascade:  # sharers stand together: one cascade group each
            by_rid = dict(zip(decode_rids, decode))
            decode_rids = planner.sharing_order(decode_rids)
            decode = [by_rid[rid] for rid in decode_rids]
        batch = planner.plan_host({r.rid: n for r, n in chunks.items()}, decode_rids,
                                  cascade=None if may_cascade else False)
        t, bc, p = batch.num_rows, self.config.max_batch_size, batch.num_prefill_rows
        order = [*chunks, *decode]
        inputs = np.empty(2 * t + SamplingBatch.FIELDS * bc, np.int32)
        tokens, src = inputs[:t], inputs[t : 2 * t]
        tokens[:] = 0
        src[:] = -1
        row = 0
        for req, n in chunks.items():
            tokens[row : row + n] = self._token_ids[req][req.num_computed : req.num_computed + n]
            row += n
        src[p : p + len(decode)] = [self._prev_slot[r] for r in decode]
        slots = inputs[2 * t :].reshape(SamplingBatch.FIELDS, bc)
        slots[:] = _PAD_SAMPLING[:, None]
        slots[:-1, : len(order)] = np.array([self._sampling_rows[r] for r in order]).T
        slots[-1, : len(order)] = [r.num_generated for r in order]  # the draw's offset
        sampled = any(r.sampling.temperature > 0 for r in order)
        next_tokens = self._launch(batch, inputs, sampled)
        chunk, computed, samples = [], [], []
        for req in order:
            n = chunks.get(req, 0)
            req.num_computed += n or 1
            chunk.append(n)
            computed.append(req.num_computed)
            samples.append(not req.prefilling)
            req.num_generated += samples[-1]
        self._prev_tokens = next_tokens
        self._prev_slot = {req: i for i, req in enumerate(order)}
        self.stats["steps"] += 1
        return _Flight(next_tokens, order, chunk, computed, samples)

    def _launch(self, batch, inputs: np.ndarray, sampled: bool) -> jax.Array:
        """Dispatch :func:`serve_step` on ``batch`` and ``inputs`` (the pool's caches replaced by
        its output); returns the step's next tokens (not waited for)."""
        next_tokens, self.pool.caches = serve_step(self._model, self._params, self.pool.caches, self._prev_tokens,
                                                   pack((batch, inputs)), self.config.sampling_backend, sampled)
        return next_tokens

    def _collect(self, flight: _Flight, sampled: list[int]) -> StepResult:
        """Book a step that came back: register the pages it filled in the prefix tree, append
        its tokens, finish requests (length or stop token) and free their pages. Rows of requests
        that finished meanwhile (a stop token one step earlier, a cancel) are discarded."""
        pool, ps = self.pool, self.pool.page_size
        new, finished, prefill, decode = {}, [], [], []
        for req, n, computed, samples, tok in zip(flight.order, flight.chunk, flight.computed, flight.samples,
                                                  sampled):
            if req.finish_reason is not None:
                self.stats["discarded_rows"] += 1
                continue
            (prefill if n else decode).append(req.rid)
            self.stats["prefill_tokens" if n else "decode_tokens"] += n or 1
            if self.config.prefix_caching and computed // ps > (computed - (n or 1)) // ps:
                # Every token up to `computed` is on the host: prompt, and outputs of earlier steps.
                pool.cache_prefix(req.rid, self._token_ids[req][:computed])
            if not samples:
                continue  # a chunk short of the prompt's end: its logits are not a next token
            req.output.append(tok)
            self._token_ids[req][len(req.prompt) + len(req.output) - 1] = tok
            new[req.rid] = tok
            if tok in self._stop or len(req.output) == req.max_new_tokens:
                self.running.remove(req)
                pool.free(req.rid)
                self._finish(req, "stop" if tok in self._stop else "length")
                finished.append(req.rid)
        return StepResult(new, tuple(prefill), tuple(decode), tuple(finished))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.finished[req.rid] = req
        self._sampling_rows.pop(req, None)
        self._token_ids.pop(req, None)
        self._prev_slot.pop(req, None)

    def run(self) -> dict[int, list[int]]:
        """Step until every submitted request finished; returns ``{rid: generated tokens}``."""
        while not self.idle:
            self.step()
        return {rid: req.output for rid, req in sorted(self.finished.items())}
