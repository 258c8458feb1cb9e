"""Data-parallel serving: one :class:`~jaxinfer.serve.ServingEngine` per group of devices.

Data-parallel groups share nothing during a step (each holds the whole model, or its tensor-parallel
shards, and its own requests' pages), so each group keeps its own scheduler, KV-cache pool and
planner, as vLLM's and SGLang's data-parallel ranks do; a request goes to the group with the fewest
unfinished requests at submission. :meth:`DataParallelEngine.step` steps every group: a group's
step dispatches its device work and returns without waiting for it (with overlap, the default), so
the groups' devices run at the same time while the host plans the next group.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import jax

from jaxinfer.models.llama import LlamaModel
from jaxinfer.plan.checks import check_int
from jaxinfer.serve import EngineConfig, Request, SamplingParams, ServingEngine, StepResult


class DataParallelEngine:
    """``data_parallel_size`` serving engines of one configuration, each on its own
    ``config.tensor_parallel_size`` devices: group ``g`` runs on
    ``devices[g * tp : (g + 1) * tp]``.

    Args:
      model: the model (each group copies its weights to its devices once).
      config: every group's :class:`~jaxinfer.serve.EngineConfig` (sizes per group).
      data_parallel_size: number of groups (>= 1).
      log: where the groups' start-up line goes (``None``: nowhere).
      devices: at least ``data_parallel_size * tensor_parallel_size`` devices (default
        ``jax.devices()``).

    Attributes:
      engines: the groups' engines.
      finished: ``{rid: Request}`` of every group (this engine's request ids).

    Raises:
      ValueError: ``data_parallel_size`` not a positive integer, or too few devices (naming
        ``devices``); an engine's own errors (:class:`~jaxinfer.serve.ServingEngine`).
    """

    def __init__(self, model: LlamaModel, config: EngineConfig, *, data_parallel_size: int,
                 log: TextIO | None = sys.stderr, devices: Sequence[jax.Device] | None = None):
        dp = check_int("data_parallel_size", data_parallel_size, minimum=1)
        tp = config.tensor_parallel_size
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < dp * tp:
            raise ValueError(f"devices: data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} "
                             f"devices, got {len(devices)}")
        self.engines = [ServingEngine(model, config, log=log if g == 0 else None, devices=devices[g * tp:(g + 1) * tp])
                        for g in range(dp)]
        if log is not None:
            print(f"jaxinfer.serve_dp: {dp} data-parallel groups of {tp} device(s)", file=log)
        self._route: dict[int, tuple[int, int]] = {}  # rid -> (group, the group's rid)
        self._rid: list[dict[int, int]] = [{} for _ in range(dp)]  # per group: its rid -> rid
        self.finished: dict[int, Request] = {}

    def submit(self, prompt, max_new_tokens: int, sampling: SamplingParams | None = None) -> int:
        """Queue a request on the group with the fewest unfinished requests; returns its id.

        Raises:
          ValueError: as :meth:`ServingEngine.submit`.
        """
        g = min(range(len(self.engines)), key=lambda i: len(self.engines[i].waiting) + len(self.engines[i].running))
        local = self.engines[g].submit(prompt, max_new_tokens, sampling)
        rid = len(self._route)
        self._route[rid] = (g, local)
        self._rid[g][local] = rid
        return rid

    def cancel(self, rid: int) -> bool:
        """:meth:`ServingEngine.cancel` on the request's group."""
        if rid not in self._route:
            return False
        g, local = self._route[rid]
        done = self.engines[g].cancel(local)
        if local in self.engines[g].finished:
            self.finished[rid] = self.engines[g].finished[local]
        return done

    @property
    def idle(self) -> bool:
        return all(e.idle for e in self.engines)

    def warm_up(self, sampling: bool = True) -> None:
        """:meth:`ServingEngine.warm_up` of every group.

        Raises:
          ValueError: a group is not idle.
        """
        for engine in self.engines:
            engine.warm_up(sampling)

    def step(self) -> StepResult:
        """One :meth:`ServingEngine.step` of every group, their results joined (this engine's
        request ids)."""
        tokens, prefill, decode, finished = {}, [], [], []
        for g, engine in enumerate(self.engines):
            r, ids = engine.step(), self._rid[g]
            tokens.update({ids[k]: t for k, t in r.tokens.items()})
            prefill += [ids[k] for k in r.prefill]
            decode += [ids[k] for k in r.decode]
            for k in r.finished:
                finished.append(ids[k])
                self.finished[ids[k]] = engine.finished[k]
        return StepResult(tokens, tuple(prefill), tuple(decode), tuple(finished))

    def run(self) -> dict[int, list[int]]:
        """Step until every submitted request finished; returns ``{rid: generated tokens}``."""
        while not self.idle:
            self.step()
        return {rid: req.output for rid, req in sorted(self.finished.items())}
