"""Tensor- and data-parallel Llama steps over a device mesh, with JAX's own machinery.

A :class:`ParallelConfig` ``(tp, dp)`` lays ``dp * tp`` devices out as a 2-D
``jax.sharding.Mesh`` with axes ``("dp", "tp")`` (:func:`make_mesh`); :class:`ShardedLlama`
places a :class:`~jaxinfer.models.llama.LlamaModel`'s weights on it with ``NamedSharding`` and
runs the model's paged step (:func:`jaxinfer.models.llama.paged_logits`, unchanged) under
``jax.shard_map``, once per device on its shard.

Tensor parallel over heads (Megatron-LM, Shoeybi et al. 2019, sec. 3): the q/k/v projections
and the MLP's gate/up projections are split by output column (a shard computes its query heads,
its KV heads and its slice of the MLP's hidden units), o_proj and down_proj by input row, so each
decoder block ends its attention and its MLP with one ``psum`` of ``[T, hidden]``
(``LlamaConfig.tensor_parallel_axis``). Each TP shard owns its KV heads' slice of every cache
page (the caches are split on their KV-head axis) and runs the same plan: plans depend on the
page table and on the per-shard head geometry only, so one plan made with ``num_qo_heads / tp``
and ``num_kv_heads / tp`` serves every TP shard. Embedding, norms and LM head are replicated.

Data parallel over requests: each of the ``dp`` groups serves its own requests from its own pages
(the caches are split on their page axis; a group's page ids are local to its block of pages)
with its own host pool and plan (:class:`~jaxinfer.nn.StepPlanner`). The groups' step batches,
planned with equal capacities, are stacked on a leading ``[dp]`` axis and placed with
``NamedSharding(mesh, P("dp"))`` (:meth:`ShardedLlama.shard_batches`), so the jitted step takes
them without resharding.

:func:`greedy_generate` is a lockstep greedy loop over the sharded step (one prefill step, then
decode steps). The serving engine (:mod:`jaxinfer.serve`) runs tensor parallel with
``EngineConfig(tensor_parallel_size=tp)`` (:class:`TensorParallelStep`: one scheduler, one host
pool and planner with a shard's head geometry, the caches split on their KV heads); data parallel
serving is one engine per group (:class:`jaxinfer.serve_dp.DataParallelEngine`).
Across hosts and at 8+ GPUs: docs/multi_gpu.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import fp8
from jaxinfer.backends import device
from jaxinfer.models.llama import LlamaConfig, LlamaModel
from jaxinfer.models.static import split_model
from jaxinfer.nn.attention import StepBatch, StepPlanner
from jaxinfer.nn.kv_pool import KVCachePool
from jaxinfer.plan.checks import check_int

DP_AXIS = "dp"
TP_AXIS = "tp"

# Column-parallel (output features split) and row-parallel (input features split) kernels of a
# decoder layer, by module name; every other parameter is replicated.
_COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
_ROW_PARALLEL = frozenset({"o_proj", "down_proj"})


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How a model is split over devices.

    Attributes:
      tp: tensor-parallel degree: devices that split each layer's heads and MLP columns.
      dp: data-parallel degree: groups of ``tp`` devices, each serving its own requests.
      check_vma: ``jax.shard_map``'s varying-manual-axes check. ``None``: on, unless a plan of
        the step runs the Pallas kernels in interpret mode (no GPU) with ``dp > 1``, which jax
        0.11.2's interpreter cannot evaluate under the check (docs/multi_gpu.md, "check_vma").

    Raises:
      ValueError: ``tp`` or ``dp`` not a positive integer, or ``check_vma`` not a bool or None.
    """

    tp: int = 1
    dp: int = 1
    check_vma: bool | None = None

    def __post_init__(self):
        check_int("tp", self.tp, minimum=1)
        check_int("dp", self.dp, minimum=1)
        if self.check_vma is not None and not isinstance(self.check_vma, bool):
            raise ValueError(f"check_vma must be a bool or None, got {self.check_vma!r}")

    @property
    def num_devices(self) -> int:
        return self.tp * self.dp

    def shard_config(self, cfg: LlamaConfig) -> LlamaConfig:
        """The geometry of one tensor-parallel shard of ``cfg``: ``num_qo_heads / tp``,
        ``num_kv_heads / tp`` and ``intermediate_size / tp``, summing its blocks over ``"tp"``.

        Raises:
          ValueError: naming ``tp``: it does not divide ``num_kv_heads`` (a shard owns whole KV
            heads; SmolLM2-135M's 3 KV heads allow tp 1 or 3), ``num_qo_heads`` or
            ``intermediate_size``.
        """
        for name in ("num_kv_heads", "num_qo_heads", "intermediate_size"):
            n = getattr(cfg, name)
            if n % self.tp:
                divisors = [d for d in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % d == 0]
                raise ValueError(f"tp={self.tp} must divide the model's {name}={n} (a tensor-parallel shard owns "
                                 f"whole KV heads and their query heads; this model allows tp in {divisors})")
        return dataclasses.replace(cfg, num_qo_heads=cfg.num_qo_heads // self.tp,
                                   num_kv_heads=cfg.num_kv_heads // self.tp,
                                   intermediate_size=cfg.intermediate_size // self.tp, tensor_parallel_axis=TP_AXIS)


def make_mesh(config: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``("dp", "tp")`` mesh of ``config``: ``devices[g * tp : (g + 1) * tp]`` are DP group
    ``g`` (consecutive devices share a group's all-reduces: on one host, the NVLink neighbours).

    Args:
      config: the degrees.
      devices: at least ``config.num_devices`` devices (default ``jax.devices()``, every
        process's under ``jax.distributed``); the first ``num_devices`` are used.

    Raises:
      ValueError: naming ``devices``: fewer than ``config.num_devices``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < config.num_devices:
        raise ValueError(f"devices: tp={config.tp} x dp={config.dp} needs {config.num_devices} devices, "
                         f"got {len(devices)}")
    return Mesh(np.asarray(devices[: config.num_devices]).reshape(config.dp, config.tp), (DP_AXIS, TP_AXIS))


def param_spec(path: tuple) -> P:
    """The ``PartitionSpec`` of a :class:`LlamaModel` parameter from its ``nnx`` state path:
    column-parallel kernels ``[in, out]`` split on ``out``, row-parallel ones on ``in``, the rest
    replicated."""
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    if names & _COLUMN_PARALLEL:
        return P(None, TP_AXIS)
    if names & _ROW_PARALLEL:
        return P(TP_AXIS, None)
    return P()


def cache_spec(kv_layout: str, *, split_pages: bool = True) -> P:
    """``PartitionSpec`` of a layer's ``k_cache``/``v_cache``: pages over ``"dp"`` (unless
    ``split_pages=False``: one DP group), KV heads over ``"tp"`` (NHD ``[pages, page_size, Hkv, D]``,
    HND ``[pages, Hkv, page_size, D]``).

    Raises:
      ValueError: ``kv_layout`` not ``"NHD"`` or ``"HND"``.
    """
    pages = DP_AXIS if split_pages else None
    if kv_layout == "NHD":
        return P(pages, None, TP_AXIS, None)
    if kv_layout == "HND":
        return P(pages, TP_AXIS, None, None)
    raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")


def _plans(batch: StepBatch):
    decode = batch.decode_plan if isinstance(batch.decode_plan, tuple) else (batch.decode_plan,)
    return [p for p in (batch.prefill_plan, *decode) if p is not None]


class ShardedLlama:
    """A :class:`LlamaModel` split over a ``("dp", "tp")`` mesh and its sharded paged step.

    Build it with :meth:`from_model` (weights of a model in memory, e.g.
    :meth:`LlamaModel.from_gguf`) or :meth:`random` (random weights created on their devices,
    shard by shard: for models that do not fit one device).

    Attributes:
      config: the :class:`ParallelConfig`; mesh: its mesh.
      model_config: the whole model's geometry; shard_config: one TP shard's
        (:meth:`ParallelConfig.shard_config`).
      model: the shard's structure (:class:`~jaxinfer.models.static.ModelDef`).
      params: the whole model's parameter arrays (flattened ``nnx`` state), each placed with its
        ``NamedSharding`` (:func:`param_spec`).
      param_specs: their ``PartitionSpec`` s.
      group_spec: ``PartitionSpec`` of the per-group arrays ``[dp, ...]`` (tokens, step batch,
        logits): ``P("dp")``, or ``P()`` (replicated) with one group.
      step: the jitted sharded step ``step(params, caches, tokens, batch) -> (logits, caches)``:
        ``tokens [dp, T]`` int32 (:meth:`shard_tokens`), ``batch`` the groups' stacked
        :class:`~jaxinfer.nn.StepBatch` (:meth:`shard_batches`), ``caches`` per layer
        ``(k_cache, v_cache)`` (:meth:`make_caches`, donated); ``logits [dp, Bc, vocab]``
        float32 at each group's ``last_rows``. Each device runs
        :func:`~jaxinfer.models.llama.paged_logits` of its shard under ``jax.shard_map``.
    """

    def __init__(self, cfg: LlamaConfig, params: Sequence[jax.Array], mesh: Mesh, config: ParallelConfig,
                 param_specs: Sequence[P]):
        self.config, self.mesh, self.model_config = config, mesh, cfg
        self.shard_config = config.shard_config(cfg)
        self.model, _ = split_model(nnx.eval_shape(lambda: LlamaModel(self.shard_config, rngs=nnx.Rngs(0))))
        self.params, self.param_specs = list(params), tuple(param_specs)
        # Per-group arrays ([dp, ...]) and the caches' pages. With one group nothing is split over
        # "dp": a value split over a size-1 axis is typed as varying over it, which the Pallas
        # kernels' interpret mode cannot run under check_vma (docs/multi_gpu.md).
        self.group_spec = P(DP_AXIS) if config.dp > 1 else P()
        # One compiled program per (mesh, shapes, check_vma): the step closes over this model.
        self.step = jax.jit(self._step, donate_argnums=1)
        self._stack = jax.jit(lambda batches: jax.tree.map(lambda *x: jnp.stack(x), *batches),
                              out_shardings=NamedSharding(mesh, self.group_spec))

    @staticmethod
    def _layout(cfg: LlamaConfig, mesh: Mesh, config: ParallelConfig):
        if dict(mesh.shape) != {DP_AXIS: config.dp, TP_AXIS: config.tp}:
            raise ValueError(f"mesh: expected axes dp={config.dp}, tp={config.tp} (make_mesh), got {dict(mesh.shape)}")
        config.shard_config(cfg)  # refuse a tp that does not divide the heads before any work
        _, state = nnx.split(nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0))))
        paths, _ = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
        specs = [param_spec(p) for p in paths]
        return specs, [NamedSharding(mesh, s) for s in specs]

    @classmethod
    def from_model(cls, model: LlamaModel, mesh: Mesh, config: ParallelConfig) -> ShardedLlama:
        """``model``'s weights placed on ``mesh`` (each device receives its shard).

        Raises:
          ValueError: ``mesh`` is not ``make_mesh(config)``'s shape, or ``tp`` does not divide the
            heads (:meth:`ParallelConfig.shard_config`).
        """
        if model.config.tensor_parallel_axis is not None:
            raise ValueError("model: pass the whole model (its config has tensor_parallel_axis=None), not a shard")
        specs, shardings = cls._layout(model.config, mesh, config)
        _, model_leaves = split_model(model)
        return cls(model.config, jax.device_put(model_leaves, shardings), mesh, config, specs)

    @classmethod
    def random(cls, cfg: LlamaConfig, mesh: Mesh, config: ParallelConfig, seed: int = 0) -> ShardedLlama:
        """Random weights (``LlamaModel(cfg, rngs=nnx.Rngs(seed))``'s initializers), each device
        computing only its shard: a jitted initializer with the parameters' shardings as
        ``out_shardings`` (XLA partitions the random number generation).

        Raises:
          ValueError: as :meth:`from_model`.
        """
        specs, shardings = cls._layout(cfg, mesh, config)
        init = jax.jit(lambda: split_model(LlamaModel(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)
        return cls(cfg, init(), mesh, config, specs)

    # ------------------------------------------------------------------ caches and batches

    def cache_spec(self, kv_layout: str) -> P:
        """:func:`cache_spec` of this mesh (pages split over ``"dp"`` when ``dp > 1``)."""
        return cache_spec(kv_layout, split_pages=self.config.dp > 1)

    def make_caches(self, num_pages: int, page_size: int, kv_layout: str = "NHD", dtype=None):
        """Zeroed paged caches of every layer: ``(k_cache, v_cache)`` of ``dp * num_pages`` pages
        and all KV heads (NHD ``[dp * num_pages, page_size, Hkv, D]``), each device holding its
        DP group's ``num_pages`` pages of its TP shard's KV heads (:meth:`cache_spec`).

        Args:
          num_pages: pages per DP group (its pool's ``num_pages``).
          page_size: tokens per page.
          kv_layout: ``"NHD"`` or ``"HND"``.
          dtype: cache dtype (default the model's).

        Raises:
          ValueError: a size that is not a positive integer, a bad ``kv_layout``, an fp8 ``dtype``
            (its scales would need splitting over the KV heads too: not implemented).
        """
        check_int("num_pages", num_pages, minimum=1)
        check_int("page_size", page_size, minimum=1)
        cfg = self.model_config
        if dtype is not None and fp8.is_fp8(fp8.kv_dtype(dtype)):
            raise ValueError(f"dtype: fp8 caches are not supported by jaxinfer.parallel, got {dtype!r}")
        n = self.config.dp * num_pages
        shape = ((n, page_size, cfg.num_kv_heads, cfg.head_dim) if kv_layout == "NHD"
                 else (n, cfg.num_kv_heads, page_size, cfg.head_dim))
        sharding = NamedSharding(self.mesh, self.cache_spec(kv_layout))
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype or cfg.dtype), out_shardings=sharding)
        return tuple((zeros(), zeros()) for _ in range(cfg.num_layers))

    def make_pool(self, num_pages: int, page_size: int, kv_layout: str = "NHD", dtype=None) -> KVCachePool:
        """A DP group's host pool: page bookkeeping and prefix tree over ``num_pages`` pages of one
        TP shard's KV heads (plan with it through a :class:`~jaxinfer.nn.StepPlanner` made with
        ``shard_config.num_qo_heads``). The cache arrays are :meth:`make_caches`' (the pool's own
        ``caches`` is empty). ``dtype``: the caches' (default the model's; plans read it).

        Raises:
          ValueError: as :class:`~jaxinfer.nn.KVCachePool`.
        """
        s = self.shard_config
        # One layer's worth of zeros is allocated by the pool and dropped here: planning reads
        # only the pool's pages and geometry.
        pool = KVCachePool(num_pages, page_size, 1, s.num_kv_heads, s.head_dim, dtype=dtype or s.dtype,
                           kv_layout=kv_layout)
        pool.caches = ()
        return pool

    def shard_batches(self, batches: Sequence[StepBatch]) -> StepBatch:
        """The DP groups' step batches as one: every array stacked on a leading ``[dp]`` axis and
        placed with ``NamedSharding(mesh, group_spec)`` (``P("dp")``; ``P()`` when ``dp == 1``),
        replicated over ``"tp"``, in one jitted call.

        Args:
          batches: ``dp`` batches from each group's planner, of one structure: the same
            capacities, row buckets and kinds of rows (prefill, decode) in each.

        Raises:
          ValueError: naming ``batches``: not ``dp`` of them, or structures or shapes that differ.
        """
        batches = list(batches)
        if len(batches) != self.config.dp:
            raise ValueError(f"batches: expected dp={self.config.dp} step batches, got {len(batches)}")
        tree = jax.tree.structure(batches[0])
        for g, b in enumerate(batches[1:], 1):
            if jax.tree.structure(b) != tree:
                raise ValueError(f"batches: group {g}'s step differs in structure from group 0's (plan every group "
                                 "with the same planner capacities and the same kinds of rows)")
            shapes = [np.shape(x) for x in jax.tree.leaves(b)]
            if shapes != [np.shape(x) for x in jax.tree.leaves(batches[0])]:
                raise ValueError(f"batches: group {g}'s arrays differ in shape from group 0's")
        return self._stack(batches)

    def shard_tokens(self, tokens) -> jax.Array:
        """``[dp, T]`` int32 tokens of each group's rows, placed with ``group_spec``.

        Raises:
          ValueError: naming ``tokens``: not ``[dp, T]``.
        """
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[0] != self.config.dp:
            raise ValueError(f"tokens must be [dp={self.config.dp}, T], got shape {tokens.shape}")
        return jax.device_put(tokens, NamedSharding(self.mesh, self.group_spec))

    # ------------------------------------------------------------------ the step

    def _step(self, params, caches, tokens, batch: StepBatch):
        check_vma = self.config.check_vma
        if check_vma is None:
            interpreted = device.platform() != "gpu" and any(p.backend == "pallas" for p in _plans(batch))
            check_vma = not (interpreted and self.config.dp > 1)
        caches_spec = tuple((self.cache_spec(batch.kv_layout),) * 2 for _ in caches)

        def local(params, caches, tokens, batch):
            batch = jax.tree.map(lambda x: x[0], batch)
            logits, caches = self.model.paged_logits(params, caches, tokens[0], batch)
            return logits[None], caches

        in_specs = (list(self.param_specs), caches_spec, self.group_spec, self.group_spec)
        return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=(self.group_spec, caches_spec),
                             check_vma=check_vma)(params, caches, tokens, batch)



class TensorParallelStep:
    """A one-group :class:`ShardedLlama` as the serving engine's model: the static first argument
    of :func:`jaxinfer.serve.serve_step` (:class:`~jaxinfer.serve.ServingEngine` with
    ``EngineConfig(tensor_parallel_size=tp)``), hashed once, like
    :class:`~jaxinfer.models.static.ModelDef` for one device.

    Raises:
      ValueError: naming ``sharded``: its ``dp`` is not 1 (the engine schedules one group).
    """

    def __init__(self, sharded: ShardedLlama):
        if sharded.config.dp != 1:
            raise ValueError(f"sharded: the serving engine runs one data-parallel group, got dp={sharded.config.dp}")
        self.sharded = sharded
        self._key = (sharded.model, sharded.mesh, sharded.param_specs, sharded.config)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, TensorParallelStep) and self._key == other._key)

    def paged_logits(self, params: Sequence[jax.Array], caches, tokens: jax.Array, batch: StepBatch):
        """The sharded paged step of one group (to trace inside a jitted step): ``tokens [T]``
        and ``batch`` replicated over ``"tp"``; ``(logits [Bc, vocab] float32, caches)``, the
        logits replicated."""
        logits, caches = self.sharded._step(params, caches, tokens[None], jax.tree.map(lambda x: x[None], batch))
        return logits[0], caches


def _greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


_greedy_jit = jax.jit(_greedy)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """What :func:`greedy_generate` returns.

    Attributes:
      tokens: per request (in the order given) its ``max_new_tokens`` generated token ids.
      logits: ``[max_new_tokens, B, vocab]`` float32 logits each token was the argmax of, or
        ``None`` unless asked for.
    """

    tokens: list[list[int]]
    logits: np.ndarray | None


def greedy_generate(
    model: ShardedLlama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    page_size: int = 16,
    kv_layout: str = "NHD",
    backend: str = "auto",
    return_logits: bool = False,
) -> GenerateResult:
    """Greedy generation of a fixed number of tokens per request through the sharded step.

    Request ``i`` goes to DP group ``i // (B / dp)``. Every group runs in lockstep: one step
    prefills every prompt (whole), then ``max_new_tokens - 1`` decode steps feed back each
    request's last token. Each group plans its steps on its own pool with the same capacities
    (batch ``B / dp``, prefill rows: the largest group's prompt tokens), so the groups' batches
    stack (:meth:`ShardedLlama.shard_batches`). No stop tokens, no sampling.

    Args:
      model: the sharded model.
      prompts: ``B`` non-empty prompts (token ids), ``B`` a multiple of ``dp``.
      max_new_tokens: tokens generated per request (>= 1).
      page_size, kv_layout: the paged cache's.
      backend: jaxinfer attention backend of the plans.
      return_logits: also return every step's logits (moved to the host: for checks).

    Returns:
      A :class:`GenerateResult`.

    Raises:
      ValueError: naming the argument: no prompts, an empty prompt, ``B`` not a multiple of
        ``dp``, ``max_new_tokens < 1``, a token id outside the vocabulary.
    """
    cfg, dp = model.model_config, model.config.dp
    prompts = [[int(t) for t in p] for p in prompts]
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if len(prompts) % dp:
        raise ValueError(f"prompts: {len(prompts)} requests do not split evenly over dp={dp} groups")
    if any(t < 0 or t >= cfg.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompts: token ids must be in [0, vocab_size={cfg.vocab_size})")
    b = len(prompts) // dp
    groups = [prompts[g * b : (g + 1) * b] for g in range(dp)]
    max_seq_len = max(len(p) for p in prompts) + max_new_tokens
    prefill_rows = max(sum(len(p) for p in grp) for grp in groups)
    num_pages = max(sum(-(-(len(p) + max_new_tokens) // page_size) for p in grp) for grp in groups)
    pools = [model.make_pool(num_pages, page_size, kv_layout) for _ in range(dp)]
    planners = [StepPlanner(pool, model.shard_config.num_qo_heads, max_seq_len=max_seq_len, max_batch_size=b,
                            max_prefill_tokens=prefill_rows, backend=backend, q_data_type=cfg.dtype)
                for pool in pools]
    caches = model.make_caches(num_pages, page_size, kv_layout)

    def run(batches, rows):
        nonlocal caches
        batch = model.shard_batches(batches)
        tokens = np.zeros((dp, batch.positions.shape[-1]), np.int32)
        for g, r in enumerate(rows):
            tokens[g, : len(r)] = r
        logits, caches = model.step(model.params, caches, model.shard_tokens(tokens), batch)
        return logits

    batches = []
    for pool, planner, grp in zip(pools, planners, groups):
        for r, p in enumerate(grp):
            pool.add(r)
            pool.extend(r, len(p))
        batches.append(planner.plan({r: len(p) for r, p in enumerate(grp)}, []))
    steps_logits = []
    logits = run(batches, [sum(grp, []) for grp in groups])
    out = [[] for _ in prompts]
    for step in range(max_new_tokens):
        if step:
            batches = []
            for pool, planner in zip(pools, planners):
                for r in range(b):
                    pool.extend(r, 1)
                batches.append(planner.plan([], list(range(b))))
            logits = run(batches, [[out[g * b + r][-1] for r in range(b)] for g in range(dp)])
        for i, t in enumerate(np.asarray(_greedy_jit(logits)).reshape(-1)):
            out[i].append(int(t))
        if return_logits:
            steps_logits.append(np.asarray(logits, np.float32).reshape(dp * b, -1))
    return GenerateResult(out, np.stack(steps_logits) if return_logits else None)
