"""A serving loop with continuous batching on jaxinfer (greedy sampling).

Requests join and leave between steps (Orca's iteration-level scheduling, Yu et al. OSDI 2022):
each step prefills the prompts of newly admitted requests (ragged, causal) and decodes one token
of every running request (paged) in the same jitted call, samples greedily, and frees the pages
of finished requests. The step is planned on the host (:class:`~jaxinfer.nn.StepPlanner`) and
compiles once per bucket of row and request counts.

Admission control keeps the pool from running dry mid-generation: a request is admitted only when
the pages of its worst case (prompt plus ``max_new_tokens - 1`` cached tokens) fit next to the
worst cases of the running requests, so the pool's ``OutOfPagesError`` never fires in the loop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.models.llama import LlamaModel, paged_logits
from jaxinfer.nn.attention import StepBatch, StepPlanner
from jaxinfer.nn.kv_pool import KVCachePool


@dataclasses.dataclass
class Request:
    """A generation request; ``output`` grows by one token per step once admitted."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = dataclasses.field(default_factory=list)

    @property
    def cached_tokens_at_most(self) -> int:
        # The last sampled token is never fed back, so its K/V is never cached.
        return len(self.prompt) + self.max_new_tokens - 1


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did: the token sampled for each request, and which requests ran how."""

    tokens: dict[int, int]
    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    finished: tuple[int, ...]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def greedy_step(graphdef, params, caches, tokens, batch: StepBatch):
    """Jitted step: ``argmax`` of the logits at ``batch.last_rows`` (``[R]`` int32) and the new caches."""
    logits, caches = paged_logits(graphdef, params, caches, tokens, batch)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches


class ServingEngine:
    """Continuous-batching greedy generation for a :class:`~jaxinfer.models.llama.LlamaModel`.

    Args:
      model: the model (its weights are captured at construction).
      num_pages: pages of the KV-cache pool (per layer).
      page_size: tokens per page.
      max_seq_len: longest request (prompt plus generated tokens).
      max_batch_size: requests running at once.
      max_prefill_tokens: prompt tokens admitted per step (a longer prompt is admitted alone).
      backend: jaxinfer attention backend.
      eos_token_id: stop a request when it samples this token (``None``: only ``max_new_tokens``).
      min_prefill_rows, min_decode_rows: smallest row buckets of the step (fewer compilations).

    Raises:
      ValueError: non-positive limits.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        num_pages: int,
        page_size: int,
        max_seq_len: int,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 256,
        backend: str = "auto",
        eos_token_id: int | None = None,
        min_prefill_rows: int = 16,
        min_decode_rows: int = 1,
    ):
        if min(max_seq_len, max_batch_size, max_prefill_tokens) < 1:
            raise ValueError("max_seq_len, max_batch_size and max_prefill_tokens must be >= 1")
        cfg = model.config
        self.pool = KVCachePool(num_pages, page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
        self.planner = StepPlanner(
            self.pool, cfg.num_qo_heads, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
            backend=backend, q_data_type=cfg.dtype, min_prefill_rows=min_prefill_rows,
            min_decode_rows=min_decode_rows,
        )
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_id = eos_token_id
        self._graphdef, self._params = nnx.split(model)
        self._next_rid = 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}

    def submit(self, prompt: list[int], max_new_tokens: int) -> int:
        """Queue a request; returns its id.

        Raises:
          ValueError: empty prompt, ``max_new_tokens < 1``, a request longer than ``max_seq_len``
            or one that could never fit in the pool.
        """
        req = Request(self._next_rid, [int(t) for t in prompt], int(max_new_tokens))
        if not req.prompt or req.max_new_tokens < 1:
            raise ValueError("a request needs a non-empty prompt and max_new_tokens >= 1")
        if len(req.prompt) + req.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(req.prompt)}) + max_new_tokens ({req.max_new_tokens}) exceeds max_seq_len={self.max_seq_len}"
            )
        if self.pool.pages_for(req.cached_tokens_at_most) > self.pool.num_pages:
            raise ValueError(f"request needs more than the pool's {self.pool.num_pages} pages")
        self._next_rid += 1
        self.waiting.append(req)
        return req.rid

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self) -> list[Request]:
        """Pop the waiting requests (FIFO) that fit in this step's batch, token and page budgets."""
        committed = sum(self.pool.pages_for(r.cached_tokens_at_most) for r in self.running)
        admitted, tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            req = self.waiting[0]
            need = self.pool.pages_for(req.cached_tokens_at_most)
            over_tokens = admitted and tokens + len(req.prompt) > self.max_prefill_tokens
            if over_tokens or committed + need > self.pool.num_pages:
                break
            admitted.append(self.waiting.popleft())
            committed += need
            tokens += len(req.prompt)
        return admitted

    def step(self) -> StepResult:
        """Admit, prefill and decode once; finished requests leave the batch and free their pages."""
        prefill, decode = self._admit(), self.running
        if not prefill and not decode:
            return StepResult({}, (), (), ())
        for req in prefill:
            self.pool.add(req.rid)
            self.pool.extend(req.rid, len(req.prompt))
        for req in decode:
            self.pool.extend(req.rid, 1)
        batch = self.planner.plan([r.rid for r in prefill], [r.rid for r in decode])
        tokens = np.zeros(batch.num_rows, np.int32)
        if prefill:
            prompts = np.concatenate([r.prompt for r in prefill])
            tokens[: prompts.size] = prompts
        p = batch.num_prefill_rows
        tokens[p : p + len(decode)] = [r.output[-1] for r in decode]
        sampled, self.pool.caches = greedy_step(self._graphdef, self._params, self.pool.caches, tokens, batch)
        # last_rows lists the prefill requests, then the decode requests.
        new = dict(zip([r.rid for r in prefill + decode], np.asarray(sampled).tolist()))
        running, finished = [], []
        for req in decode + prefill:
            req.output.append(new[req.rid])
            if len(req.output) == req.max_new_tokens or new[req.rid] == self.eos_token_id:
                self.pool.free(req.rid)
                self.finished[req.rid] = req
                finished.append(req.rid)
            else:
                running.append(req)
        self.running = running
        return StepResult(new, tuple(r.rid for r in prefill), tuple(r.rid for r in decode), tuple(finished))

    def run(self) -> dict[int, list[int]]:
        """Step until every submitted request finished; returns ``{rid: generated tokens}``."""
        while not self.idle:
            self.step()
        return {rid: req.output for rid, req in sorted(self.finished.items())}
