"""Serving benchmark: SmolLM2-135M-Instruct (real weights) through jaxinfer's engine and a dense loop.

    python -m jaxinfer.bench.serving [--size full|tiny] [--workload chat|few-shot|long-system|both|all]
                                     [--backend auto] [--systems on,off,dense,sync,cascade|all] [--out DIR]

Issue 17's serving figures: output tokens/s, median time to first token (TTFT) and median
inter-token latency (ITL) of

- ``jaxinfer, prefix caching on``: :class:`jaxinfer.serve.ServingEngine` (paged cache, chunked
  prefill, prefix pages shared and read once per group through cascade attention; overlapped
  steps: the host plans step ``t + 1`` while the device runs step ``t``);
- ``jaxinfer, prefix caching off``: the same engine without prefix caching (one attention level);
- ``dense-xla loop``: the same scheduling with a contiguous per-slot cache and
  ``jax.nn.dot_product_attention`` with XLA's implementation
  (:class:`jaxinfer.bench.dense_loop.DenseServingLoop`), what a plain JAX serving loop does
  (synchronous steps);
- ``jaxinfer, prefix caching on, synchronous`` (only with ``--systems``, ``sync``): the engine with
  ``EngineConfig(overlap=False)``, to see what overlapping gains;
- ``jaxinfer, prefix caching on, always cascade`` and ``..., one level`` (only with ``--systems``,
  ``cascade`` and ``flat``): the engine with ``EngineConfig(cascade_min_saved_bytes=0)`` (every
  decode step through cascade levels) and with ``cascade_levels=1`` (shared pages read per
  request, prompt tokens still skipped), to see what choosing per step gains.

Each record also gives the median over steps of where a step's wall time goes (``time.perf_counter``
stamps in :meth:`ServingEngine.step` and :meth:`DenseServingLoop.step`): ``host_before_ms``
(scheduling, planning, building the inputs, dispatching), ``wait_ms`` (blocked on the sampled
tokens: the device's remaining work and the copy to the host) and ``host_after_ms`` (appending
tokens, prefix-tree registration, finishing requests). With overlap, ``wait_ms`` is the wait for
the *previous* step while the one just dispatched is queued behind it: a step whose host time
hides behind the device shows ``host_before_ms + host_after_ms`` well under the step time and
``wait_ms`` near the device's step time.

Goals (issue 17): prefix caching on >= 1.3x the tokens/s of off; jaxinfer >= 2x the dense-XLA
loop. Every system serves the same requests greedily; the table also gives the fraction of greedy
tokens that agree with the first system (bfloat16 rounding differs between the attention
algorithms, so a request may diverge after a near tie; after that its tokens differ anyway).

Workload (``--size full``; ``tiny`` is the same shape at CPU sizes, :data:`TINY`). 256 requests,
all arriving at t = 0 (vLLM's ``benchmark_serving`` with ``--request-rate inf``), served FIFO.
Lengths are ShareGPT-like: the vLLM paper (Kwon et al., SOSP 2023, sec. 6.1, fig. 11) reports
ShareGPT means of 161 input and 338 output tokens with long right tails; here, drawn with
``numpy.random.default_rng(0)``, independently per request (prompt lengths first):

- user message: ``round(LogNormal(mu=4.6, sigma=1.0))`` tokens clipped to ``[4, 1000]`` (median 99,
  mean 164 before clipping);
- output: ``round(LogNormal(mu=5.4, sigma=0.9))`` tokens clipped to ``[8, 1000]`` (median 221, mean
  332 before clipping). Stop tokens are ignored (vLLM's ``--ignore-eos``), so every system
  generates exactly these counts.

The user message is that many tokens drawn uniformly (same generator) from the vocabulary's
word tokens (a space and at least three lowercase letters, e.g. ``" house"``), put in the chat
template, so every prompt starts with the same tokens (the system turn and
``<|im_start|>user\\n``) and ends with the generation prompt. Two workloads (``--workload``;
the default runs ``chat``, ``both`` runs one then the other, each with its own ratios):

- ``chat``: ``ChatTokenizer.apply_chat_template([{"role": "user", ...}])`` with the template's
  default system prompt (``--system-prompt`` replaces it): a shared prefix of 24 tokens, one full
  page of 16, for SmolLM2's; prefix caching saves little there.
- ``few-shot``: :data:`FEW_SHOT_SYSTEM_PROMPT` as the system turn: instructions for a support
  assistant (route a customer's message to one of five teams, rate its urgency, draft a reply in
  three labelled lines) and five worked examples, 493 tokens of text, a shared prefix of 501
  tokens (31 full pages) in SmolLM2's template: the shape of a few-shot or long-instruction
  deployment, where every request repeats the same long system prompt.
- ``long-system``: a system prompt of ``ServingWorkload.long_system_tokens`` (2048 at full size)
  word tokens drawn like the user messages (``numpy.random.default_rng(seed + 1)``), the system
  prompt length of SGLang's prefix-caching benchmark (``bench_serving --dataset-name
  generated-shared-prefix``, ``--gsp-system-prompt-len`` 2048), here shared by every request: an
  agent's or a long-instruction deployment's shape, where prompt tokens outnumber output tokens.
  ``both`` runs ``chat`` and ``few-shot``; ``all`` the three.

Sizes: at most 64 requests at once, 512 prompt tokens per step (chunked prefill; both changed for
every system by ``--max-batch-size`` and ``--max-prefill-tokens``: vLLM runs up to 256 sequences at
once by default), sequences up to ``max_seq_len`` = 2048 tokens, pages of 16; a workload whose
longest possible request is longer raises ``max_seq_len`` to hold it, rounded up to a page
(``few-shot`` at full size: 2512), for both kinds of server. The engine's pool holds every running
request's worst case; the dense loop's cache is ``[64, max_seq_len]`` tokens per layer; both pad a
step's prompt rows to 512 (the engine per step, the dense loop per request's chunk).

Measurement: per system, a warm-up first compiles every step program on throw-away servers of
the same configuration (the engine: :meth:`ServingEngine.warm_up` without the sampling programs; the
dense loop: :meth:`DenseServingLoop.compile_all`), repeated until a pass compiles nothing, and a
JAX compile listener counts compilations during the timed run (0 expected). The timed run starts
on a fresh server (an empty prefix cache), submits all requests, then steps until idle; each
``step()`` call ends with a step's sampled tokens on the host (with overlap: the step dispatched by
the previous call), so a token's time is the end of the call that brought it to the host. tokens/s =
generated tokens / (end of the last step - start); TTFT = time of a request's first token (from t =
0: queueing included); ITL = every gap between consecutive tokens of a request, median over all
gaps; TPOT = a request's mean gap, median over requests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tabulate import tabulate

from jaxinfer.bench.dense_loop import DenseLoopConfig, DenseServingLoop
from jaxinfer.bench.harness import environment, on_gpu
from jaxinfer.plan.checks import check_int
from jaxinfer.serve import EngineConfig, ServingEngine

SYSTEMS = ("jaxinfer, prefix caching on", "jaxinfer, prefix caching off", "dense-xla loop")
SYNC_SYSTEM = "jaxinfer, prefix caching on, synchronous"
CASCADE_SYSTEM = "jaxinfer, prefix caching on, always cascade"
FLAT_SYSTEM = "jaxinfer, prefix caching on, one level"
ALL_SYSTEMS = (*SYSTEMS, SYNC_SYSTEM, CASCADE_SYSTEM, FLAT_SYSTEM)
SYSTEM_KEYS = dict(zip(("on", "off", "dense", "sync", "cascade", "flat"), ALL_SYSTEMS))  # --systems' short names
RECORDS_FILE = "serving.jsonl"
GOAL_PREFIX_CACHING = 1.3  # tokens/s of prefix caching on over off (issue 17)
GOAL_VS_DENSE = 2.0  # tokens/s of jaxinfer over the dense-XLA loop (issue 17)
_WORD_TOKEN = re.compile(r"Ġ[a-z]{3,}")  # byte-level BPE: "Ġ" is the leading space
WORKLOADS = ("chat", "few-shot", "long-system")

FEW_SHOT_SYSTEM_PROMPT = "\n".join([
    "You are a support assistant for a software company. You read a customer's message, decide which team"
    ' should handle it, how urgent it is, and write a short, friendly first reply. Answer in three lines:'
    ' "Team:", "Priority:" and "Reply:". Teams are Billing, Accounts, Bugs, Performance and Sales. '
    'Priorities are low, normal and urgent: urgent when the customer cannot work at all or loses money, '
    'low for questions and wishes. Keep the reply under forty words, never promise dates, and ask for the'
    ' details the team will need.',
    "",
    'Example 1.',
    'Customer: I was charged twice for my monthly plan this morning. Please refund the second payment.',
    'Team: Billing',
    'Priority: urgent',
    'Reply: Sorry about the double charge! I have passed this to our billing team. Could you send the '
    'last four digits of the card and the time of both payments?',
    "",
    'Example 2.',
    'Customer: The export button does nothing since the last update. I use Firefox on Linux.',
    'Team: Bugs',
    'Priority: normal',
    'Reply: Thanks for the report. Which version of Firefox do you use, and does the same happen with a '
    'small file? A screenshot of the browser console would help our developers.',
    "",
    'Example 3.',
    'Customer: Can I invite five more people to my team without changing plans?',
    'Team: Sales',
    'Priority: low',
    'Reply: Good question! Your plan includes ten seats; our sales team can tell you how many are free '
    'and what larger plans cost. How many people would you like to add in total?',
    "",
    'Example 4.',
    'Customer: Nobody in our office can log in since an hour ago. We get an error about an expired token.',
    'Team: Accounts',
    'Priority: urgent',
    "Reply: We are on it. Please send the exact error text and your company's account name. Does signing "
    'in from a private browser window work for anyone?',
    "",
    'Example 5.',
    'Customer: Reports with more than a year of data take minutes to load, they used to take seconds.',
    'Team: Performance',
    'Priority: normal',
    'Reply: Thanks for letting us know. Which report is slowest, and since when? Our performance team '
    "will look at your account's data and get back to you.",
    "",
    'Now answer the next customer in the same format.',
])
"""The ``few-shot`` workload's system prompt (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class LogNormalLengths:
    """Token counts ``round(LogNormal(mu, sigma))`` clipped to ``[low, high]``.

    Raises:
      ValueError: ``sigma < 0``, ``low < 1`` or ``high < low``.
    """

    mu: float
    sigma: float
    low: int
    high: int

    def __post_init__(self):
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        check_int("low", self.low, minimum=1)
        check_int("high", self.high, minimum=self.low)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``[n]`` int64 lengths."""
        return np.clip(np.rint(rng.lognormal(self.mu, self.sigma, n)), self.low, self.high).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ServingWorkload:
    """Requests and the serving sizes every system gets.

    Attributes:
      num_requests: requests, all submitted at t = 0.
      prompt: tokens of each user message (the chat template's tokens come on top).
      output: tokens each request generates.
      max_batch_size, max_prefill_tokens, max_seq_len, page_size: the engine's sizes (the dense
        loop's slots, prefill budget and slot length are the same).
      dense_min_prefill_rows: the dense loop's smallest prefill row bucket (``None``: one bucket,
        ``max_prefill_tokens``, as the engine pads its prompt rows).
      seed: the lengths' and the user messages' generator.
      kv_dtype: the engine's KV cache dtype (``EngineConfig.kv_dtype``, e.g. ``"e4m3"``; ``None``:
        the model's dtype). The dense loop keeps the model's dtype: it is the baseline.
      long_system_tokens: the ``long-system`` workload's system prompt, in word tokens.
    """

    num_requests: int
    prompt: LogNormalLengths
    output: LogNormalLengths
    max_batch_size: int
    max_prefill_tokens: int
    max_seq_len: int
    page_size: int = 16
    dense_min_prefill_rows: int | None = None
    seed: int = 0
    kv_dtype: str | None = None
    long_system_tokens: int = 2048

    def engine_config(self, backend: str, prefix_caching: bool, overlap: bool = True,
                      cascade: bool | None = None) -> EngineConfig:
        """The engine's configuration: a pool that holds ``max_batch_size`` requests of
        ``max_seq_len`` tokens, no stop tokens, and the xla sampler (greedy requests never run it;
        it only compiles faster than the Pallas one). ``cascade``: with prefix caching, every decode
        step through cascade levels (``True``: ``cascade_min_saved_bytes=0``), none (``False``:
        ``cascade_levels=1``) or the engine's choice per step (``None``)."""
        pages = self.max_batch_size * -(-self.max_seq_len // self.page_size)
        extra = {None: {}, True: dict(cascade_min_saved_bytes=0), False: dict(cascade_levels=1)}[cascade]
        return EngineConfig(num_pages=pages, page_size=self.page_size, max_seq_len=self.max_seq_len,
                            max_batch_size=self.max_batch_size, max_prefill_tokens=self.max_prefill_tokens,
                            backend=backend, prefix_caching=prefix_caching, sampling_backend="xla",
                            kv_dtype=self.kv_dtype, overlap=overlap, **extra)

    def fitted(self, prefix_len: int, suffix_len: int) -> ServingWorkload:
        """This workload with ``max_seq_len`` raised (to a multiple of ``page_size``) so that
        its longest possible request, ``prefix_len + prompt.high + suffix_len + output.high``
        tokens, fits; unchanged when it already does."""
        longest = prefix_len + self.prompt.high + suffix_len + self.output.high
        need = -(-longest // self.page_size) * self.page_size
        return self if need <= self.max_seq_len else dataclasses.replace(self, max_seq_len=need)

    def dense_config(self) -> DenseLoopConfig:
        return DenseLoopConfig(max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len,
                               max_prefill_tokens=self.max_prefill_tokens,
                               min_prefill_rows=self.dense_min_prefill_rows)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


FULL = ServingWorkload(256, LogNormalLengths(4.6, 1.0, 4, 1000), LogNormalLengths(5.4, 0.9, 8, 1000),
                       max_batch_size=64, max_prefill_tokens=512, max_seq_len=2048)
# CPU check of the whole path: a handful of short requests, a prompt budget that chunks some.
TINY = ServingWorkload(6, LogNormalLengths(2.5, 1.0, 2, 40), LogNormalLengths(2.0, 0.9, 2, 12),
                       max_batch_size=4, max_prefill_tokens=32, max_seq_len=96, long_system_tokens=40)
SIZES = {"full": FULL, "tiny": TINY}


def make_requests(workload: ServingWorkload, prefix: Sequence[int], suffix: Sequence[int],
                  word_ids: Sequence[int]) -> list[tuple[list[int], int]]:
    """``(prompt tokens, output tokens)`` of every request: ``prefix + user message + suffix``.

    Args:
      prefix: tokens every prompt starts with (the chat template up to the user's message).
      suffix: tokens every prompt ends with (end of the user turn, the generation prompt).
      word_ids: the tokens user messages are drawn from.

    Raises:
      ValueError: no ``word_ids``, or a request that could exceed ``workload.max_seq_len``.
    """
    if len(word_ids) == 0:
        raise ValueError("word_ids must not be empty")
    longest = len(prefix) + workload.prompt.high + len(suffix) + workload.output.high
    if longest > workload.max_seq_len:
        raise ValueError(f"the longest request ({longest} tokens) exceeds max_seq_len={workload.max_seq_len}")
    rng = np.random.default_rng(workload.seed)
    prompt_lens = workload.prompt.sample(rng, workload.num_requests)
    output_lens = workload.output.sample(rng, workload.num_requests)
    words = np.asarray(word_ids)
    return [([*prefix, *rng.choice(words, int(n)).tolist(), *suffix], int(m))
            for n, m in zip(prompt_lens, output_lens)]


def chat_requests(workload: ServingWorkload, tokenizer, system_prompt: str | None = None):
    """:func:`make_requests` through ``tokenizer``'s chat template (a
    :class:`~jaxinfer.models.tokenizer.ChatTokenizer`) on ``workload`` fitted to the template
    (:meth:`ServingWorkload.fitted`); returns ``(requests, shared prefix tokens, fitted workload)``."""
    marker = "\ue000"  # a private-use character: no prompt contains it
    messages = [{"role": "user", "content": marker}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    before, after = tokenizer.apply_chat_template(messages).split(marker)
    prefix = tokenizer.encode(before)
    suffix = tokenizer.encode(after, add_special_tokens=False)
    workload = workload.fitted(len(prefix), len(suffix))
    return make_requests(workload, prefix, suffix, word_token_ids(tokenizer)), len(prefix), workload


def word_token_ids(tokenizer) -> list[int]:
    """Ids of the vocabulary's word tokens (a space and at least three lowercase letters)."""
    vocab = tokenizer.tokenizer.get_vocab()
    return sorted(i for tok, i in vocab.items() if _WORD_TOKEN.fullmatch(tok))


def long_system_prompt(workload: ServingWorkload, tokenizer) -> str:
    """The ``long-system`` workload's system prompt: ``workload.long_system_tokens`` word tokens
    drawn with ``default_rng(workload.seed + 1)``, as text (each encodes back to its one token)."""
    rng = np.random.default_rng(workload.seed + 1)
    words = rng.choice(np.asarray(word_token_ids(tokenizer)), workload.long_system_tokens)
    return tokenizer.decode(words.tolist()).strip()


def make_server(system: str, model, workload: ServingWorkload, backend: str, log: TextIO | None):
    """A fresh engine or dense loop for one of :data:`SYSTEMS`."""
    if system == SYSTEMS[2]:
        return DenseServingLoop(model, workload.dense_config(), log=log)
    config = workload.engine_config(backend, prefix_caching=system != SYSTEMS[1], overlap=system != SYNC_SYSTEM,
                                    cascade={CASCADE_SYSTEM: True, FLAT_SYSTEM: False}.get(system))
    return ServingEngine(model, config, log=log)


@contextlib.contextmanager
def counting_compiles():
    """Counts XLA compilations in the ``with`` block: yields a list that gets one entry each."""
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


WARM_UP_PASSES = 3


def warm_up(system: str, model, workload: ServingWorkload, backend: str, log: TextIO | None):
    """Compile every step program of ``system``; returns ``(server to time, compilations)``, the
    server fresh for the engine so that its prefix cache starts empty.

    The warm-up pass repeats until one compiles nothing (at most :data:`WARM_UP_PASSES`): a module
    imported lazily during the first lowering can add a value to JAX's tracing context (in Pallas
    interpret mode, ``jax._src.pallas.fuser``), and programs traced before it then miss the cache.
    """
    total = 0
    for _ in range(WARM_UP_PASSES):
        server = make_server(system, model, workload, backend, log if total == 0 else None)
        with counting_compiles() as compiles:
            if isinstance(server, DenseServingLoop):
                server.compile_all()
            else:  # every request is greedy: the sampling programs never run
                server.warm_up(sampling=False)
        total += len(compiles)
        del server
        gc.collect()
        if not compiles:
            break
    return make_server(system, model, workload, backend, None), total


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A timed run: ``outputs {rid: tokens}``, ``token_times {rid: [s]}`` (seconds from the start,
    one per token), ``wall_s`` (start to the end of the last step), ``steps`` (dispatched),
    ``compiles`` (XLA compilations during the run), the server's ``stats`` and ``step_times``
    (its per-step ``(host before dispatch, wait, host after)`` seconds)."""

    outputs: dict[int, list[int]]
    token_times: dict[int, list[float]]
    wall_s: float
    steps: int
    compiles: int
    stats: dict
    step_times: list[tuple[float, float, float]]


def timed_run(server, requests: Sequence[tuple[Sequence[int], int]]) -> RunResult:
    """Submit every request, step until idle, time every token (see the module docstring)."""
    rids = [server.submit(prompt, n) for prompt, n in requests]
    times = {rid: [] for rid in rids}
    with counting_compiles() as compiles:
        start = now = time.perf_counter()
        while not server.idle:
            result = server.step()
            now = time.perf_counter()
            for rid in result.tokens:
                times[rid].append(now - start)
    outputs = {rid: list(server.finished[rid].output) for rid in rids}
    return RunResult(outputs, times, now - start, server.stats["steps"], len(compiles), dict(server.stats),
                     list(server.step_times))


def latency_metrics(run: RunResult) -> dict:
    """tokens/s, median TTFT, ITL and TPOT (ms) of a run."""
    tokens = sum(len(t) for t in run.outputs.values())
    gaps = [np.diff(t) for t in run.token_times.values()]
    tpot = [g.mean() for g in gaps if g.size]
    all_gaps = np.concatenate(gaps) if gaps else np.zeros(0)
    parts = np.median(np.asarray(run.step_times), axis=0) * 1e3 if run.step_times else [None] * 3
    return {
        "output_tokens": tokens,
        "wall_s": run.wall_s,
        "output_tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else None,
        "median_ttft_ms": 1e3 * statistics.median(t[0] for t in run.token_times.values()),
        "median_itl_ms": 1e3 * float(np.median(all_gaps)) if all_gaps.size else None,
        "median_tpot_ms": 1e3 * float(np.median(tpot)) if tpot else None,
        "steps": run.steps,
        "compiles_during_run": run.compiles,
        **{f"median_{k}_ms": None if v is None else float(v)
           for k, v in zip(("host_before", "wait", "host_after"), parts)},
    }


def first_divergence(outputs: dict[int, list[int]], reference: dict[int, list[int]]) -> list[int]:
    """Per reference request, the index of its first generated token that differs (the shorter
    output's length if none does)."""
    return [next((i for i, (a, b) in enumerate(zip(outputs[k], ref)) if a != b), min(len(outputs[k]), len(ref)))
            for k, ref in reference.items()]


def greedy_agreement(outputs: dict[int, list[int]], reference: dict[int, list[int]]) -> dict:
    """How far two runs' greedy tokens agree: ``prefix``: the fraction of reference tokens before a
    request's first differing token; ``identical``: the fraction of requests with equal outputs."""
    total = sum(map(len, reference.values()))
    same = sum(outputs[k] == ref for k, ref in reference.items())
    return {"prefix": sum(first_divergence(outputs, reference)) / total if total else 1.0,
            "identical": same / len(reference) if reference else 1.0}


def run_serving(model, requests, workload: ServingWorkload, backend: str = "auto", *,
                systems: Sequence[str] = SYSTEMS, log: TextIO | None = sys.stderr) -> list[dict]:
    """Warm up and time each of ``systems`` on ``requests``, one at a time (each server is freed
    before the next is built); returns one record per system (metrics, agreement with the first
    system, same-run tokens/s ratios)."""
    records, reference = [], None
    for system in systems:
        t0 = time.perf_counter()
        server, warm_up_compiles = warm_up(system, model, workload, backend, log)
        t1 = time.perf_counter()
        run = timed_run(server, requests)
        bound = server.num_step_programs
        del server
        gc.collect()
        if log is not None:
            print(f"{system}: warm-up {t1 - t0:.1f} s ({warm_up_compiles} compilations), timed run "
                  f"{run.wall_s:.2f} s ({run.steps} steps)", file=log)
        reference = reference or run.outputs
        records.append({
            "benchmark": "serving", "system": system, "backend": backend if system != SYSTEMS[2] else "dense-xla",
            "step_programs_bound": bound, "warm_up_compiles": warm_up_compiles, **latency_metrics(run),
            "prefill_tokens_computed": run.stats.get("prefill_tokens"), "cached_tokens": run.stats.get("cached_tokens"),
            "agreement_with": systems[0], **{f"greedy_agreement_{k}": v
                                             for k, v in greedy_agreement(run.outputs, reference).items()},
        })
    by = {r["system"]: r["output_tokens_per_s"] for r in records}
    for r in records:
        for name, other in (("vs_prefix_caching_off", SYSTEMS[1]), ("vs_dense_xla", SYSTEMS[2])):
            r[name] = r["output_tokens_per_s"] / by[other] if by.get(other) else None
    return records


def table(records: Sequence[dict]) -> str:
    headers = ["workload", "system", "output tok/s", "median TTFT ms", "median ITL ms", "median TPOT ms", "steps",
               "step host before / wait / after ms", "compiles", "vs off", "vs dense-xla",
               "greedy agree (prefix / identical)"]

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    rows = [[r.get("workload_name", ""), r["system"], fmt(r["output_tokens_per_s"], ".1f"),
             fmt(r["median_ttft_ms"], ".1f"), fmt(r["median_itl_ms"], ".2f"), fmt(r["median_tpot_ms"], ".2f"),
             r["steps"],
             " / ".join(fmt(r[f"median_{k}_ms"], ".2f") for k in ("host_before", "wait", "host_after")),
             r["compiles_during_run"], fmt(r["vs_prefix_caching_off"], ".2f"), fmt(r["vs_dense_xla"], ".2f"),
             f"{r['greedy_agreement_prefix']:.3f} / {r['greedy_agreement_identical']:.3f}"] for r in records]
    return tabulate(rows, headers=headers)


def goal_lines(records: Sequence[dict]) -> list[str]:
    """Issue 17's two goals against this run's ratios, per workload."""
    lines = []
    for name in dict.fromkeys(r.get("workload_name", "") for r in records):
        by = {r["system"]: r for r in records if r.get("workload_name", "") == name}
        label = f"{name}: " if name else ""
        on, off, dense = (by.get(s) for s in SYSTEMS)
        if on and off and on["vs_prefix_caching_off"]:
            x = on["vs_prefix_caching_off"]
            lines.append(f"{label}prefix caching on / off: {x:.2f}x tokens/s (goal >= {GOAL_PREFIX_CACHING}: "
                         f"{'met' if x >= GOAL_PREFIX_CACHING else 'not met'})")
        if dense:
            for r in (on, off):
                if r and r["vs_dense_xla"]:
                    x = r["vs_dense_xla"]
                    lines.append(f"{label}{r['system']} / dense-xla loop: {x:.2f}x tokens/s (goal >= {GOAL_VS_DENSE}: "
                                 f"{'met' if x >= GOAL_VS_DENSE else 'not met'})")
        for other in (CASCADE_SYSTEM, FLAT_SYSTEM):
            if on and by.get(other) and by[other]["output_tokens_per_s"]:
                lines.append(f"{label}prefix caching on (cascade chosen per step) / {other.split(', ')[-1]}: "
                             f"{on['output_tokens_per_s'] / by[other]['output_tokens_per_s']:.2f}x tokens/s")
        sync = by.get(SYNC_SYSTEM)
        if on and sync and sync["output_tokens_per_s"]:
            lines.append(f"{label}overlapped / synchronous steps (prefix caching on): "
                         f"{on['output_tokens_per_s'] / sync['output_tokens_per_s']:.2f}x tokens/s")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="full (256 requests; the GPU default) or tiny (6 short requests; the CPU default)")
    p.add_argument("--workload", choices=(*WORKLOADS, "both", "all"), default="chat",
                   help="chat (the template's 24-token system prompt; default), few-shot (a 501-token shared "
                        "few-shot system prompt), long-system (a 2048-token shared system prompt), both (chat "
                        "then few-shot) or all")
    p.add_argument("--systems", default="on,off,dense",
                   help="comma-separated systems to time: " + ", ".join(f"{k} ({v})" for k, v in SYSTEM_KEYS.items())
                        + ", or all (default on,off,dense)")
    p.add_argument("--backend", default="auto", help="the engine's attention backend (default auto)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help=f"directory of {RECORDS_FILE} (default bench_out/)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="weights, activations and caches (default bfloat16 on a GPU, float32 elsewhere)")
    p.add_argument("--kv-dtype", default=None,
                   help="the engine's KV cache dtype, e.g. e4m3 (default: the model's; the dense loop keeps it)")
    p.add_argument("--system-prompt", default=None,
                   help="the chat workload's shared system prompt (default: the chat template's own)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="requests running at once, for every system (default: the size's, 64 at full size; "
                        "vLLM's default max_num_seqs is 256)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens per step, for every system (default: the size's, 512 at full size)")
    args = p.parse_args(argv)
    for name in ("max_batch_size", "max_prefill_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    keys = tuple(SYSTEM_KEYS) if args.systems == "all" else tuple(x.strip() for x in args.systems.split(","))
    for key in keys:
        if key not in SYSTEM_KEYS:
            p.error(f"--systems: unknown system {key!r}; choose from {tuple(SYSTEM_KEYS)} or 'all'")
    args.systems = tuple(SYSTEM_KEYS[k] for k in keys)
    return args


def workload_of(args: argparse.Namespace, gpu: bool) -> ServingWorkload:
    """The :data:`SIZES` workload of ``args.size`` (default: full on a GPU, tiny elsewhere) with
    the command line's KV dtype and sizes."""
    size = SIZES[args.size or ("full" if gpu else "tiny")]
    return dataclasses.replace(size, kv_dtype=args.kv_dtype, max_batch_size=args.max_batch_size or size.max_batch_size,
                               max_prefill_tokens=args.max_prefill_tokens or size.max_prefill_tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxinfer.models.llama import LlamaModel  # needs gguf (the "models" extra)
    from jaxinfer.models.tokenizer import ChatTokenizer

    gpu = on_gpu()
    size = workload_of(args, gpu)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    start = time.perf_counter()
    model = LlamaModel.from_gguf(dtype=dtype)
    tokenizer = ChatTokenizer.from_gguf()
    print(f"SmolLM2-135M-Instruct ({dtype.name}) loaded in {time.perf_counter() - start:.1f} s on "
          f"{jax.devices()[0].device_kind}", file=sys.stderr)
    env = environment()
    records = []
    for name in dict(both=WORKLOADS[:2], all=WORKLOADS).get(args.workload, (args.workload,)):
        system_prompt = {"chat": args.system_prompt, "few-shot": FEW_SHOT_SYSTEM_PROMPT}.get(name)
        if name == "long-system":
            system_prompt = long_system_prompt(size, tokenizer)
        requests, shared, workload = chat_requests(size, tokenizer, system_prompt)
        prompt_lens = [len(p) for p, _ in requests]
        output_lens = [n for _, n in requests]
        print(f"workload {name}: {len(requests)} requests: prompt tokens median "
              f"{np.median(prompt_lens):.0f} mean {np.mean(prompt_lens):.0f} max {max(prompt_lens)}, output tokens "
              f"median {np.median(output_lens):.0f} mean {np.mean(output_lens):.0f} max {max(output_lens)} "
              f"(sum {sum(output_lens)}); shared prefix {shared} tokens "
              f"({shared // workload.page_size} full page(s) of {workload.page_size}); "
              f"max_seq_len {workload.max_seq_len}", file=sys.stderr)
        for r in run_serving(model, requests, workload, args.backend, systems=args.systems):
            r.update(workload_name=name, workload=workload.describe(), shared_prefix_tokens=shared,
                     dtype=dtype.name, **env)
            records.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RECORDS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {path}")
    for line in goal_lines(records):
        print(line)
    if not gpu:
        print(f"NOTE: CPU run ({env['device']}): timings are not GPU performance.")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
