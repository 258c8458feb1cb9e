"""The named workloads of ``jaxinfer-bench`` (issue 2, item 6), their groups, and the inputs they build.

Each workload is a frozen dataclass of its shape parameters; :meth:`Workload.scaled` divides the
fields marked as sizes (batch, lengths) by a factor, which gives the CPU and test sizes. ``build``
makes a :class:`Problem`: random bf16 inputs (normal, never zeros), a page table with shuffled page
ids (numpy), the arguments of the public wrapper's ``plan``, the jitted step that runs the plan,
and the batch as padded dense attention (:class:`Dense`) for the cuDNN peer, the float64 check and
the byte/FLOP counts.

Block-sparse choice: ``vector_sparse`` is FlashInfer's vector-sparse case (``C = 1``, one key
column per block) with ``R = 64`` query rows per block row, at the same 10% density as
``block_sparse`` (``R = C = 64``). Keeping ``R = 64`` makes the two differ only in column
granularity (the KV gathered per token instead of per 64-token block); ``R = C = 1`` at
``M = 8192`` would give 6.7 M block indices whose planning, not attention, would dominate.

With ``--kv-dtype e4m3`` (or ``e5m2``) each workload also runs over an fp8 KV cache made from the
same inputs (:meth:`Problem.quantized`: per-KV-head scales ``amax / fp8 max``, the cache holds
``K / k_scale``; the plan and the step take the dtype and the scales), and its bytes count one
per cached element.

Groups (:data:`GROUPS`): ``default`` is what a bare run measures (``make bench``); the others are
opt-in by name: ``prefill_shapes`` (the prefill variations the FFI kernels are tuned on),
``rope`` (fused ROPE_LLAMA decode, read against ``decode_uniform``), ``plan`` (the B=256
decode batches whose host ``plan()`` time issue 3 targets), ``mixed`` (a prefill beside decodes in
one step, FlashInfer's POD shape) and ``all``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer import fp8

SIZE = {"scaled": True}  # field metadata: ``Workload.scaled`` divides this field
SIZE_FACTORS = {"full": 1, "cpu": 8, "tiny": 64}


@dataclasses.dataclass(frozen=True)
class Dense:
    """A batch as padded dense attention: request ``b`` has queries ``q[q_index[b, :qo_lens[b]]]``
    and keys ``kv_flat[kv_index[b, :kv_lens[b]]]`` (``kv_flat`` = the cache or ragged KV viewed as
    ``[tokens, Hkv, D]``).

    Attributes:
      q_index: ``[B, T]`` int rows of the ragged ``q`` (padding repeats a valid row).
      kv_index: ``[B, S]`` int token rows of the flattened KV (padding repeats a valid row).
      qo_lens, kv_lens: ``[B]`` int.
      causal: bottom-right aligned causal mask (shared/DESIGN.md sec. 2).
      mask: ``[T, S]`` bool applied to every request (block-sparse pattern), or ``None``.
      rope_theta: if set, rotate-half (ROPE_LLAMA) RoPE with this base is applied to q (at
        position ``kv_len - qo_len + i``) and k (at ``j``) inside attention.
    """

    q_index: np.ndarray
    kv_index: np.ndarray
    qo_lens: np.ndarray
    kv_lens: np.ndarray
    causal: bool = False
    mask: np.ndarray | None = None
    rope_theta: float | None = None

    def visible(self) -> np.ndarray:
        """``[B, T, S]`` bool: key ``j`` is visible to query ``i`` of request ``b``."""
        i = np.arange(self.q_index.shape[1])[None, :, None]
        j = np.arange(self.kv_index.shape[1])[None, None, :]
        qo, kv = self.qo_lens[:, None, None], self.kv_lens[:, None, None]
        vis = (i < qo) & (j < kv)
        if self.causal:
            vis &= j <= i + kv - qo
        if self.mask is not None:
            vis &= self.mask[None]
        return vis

    def kv_tokens_read(self) -> int:
        """Distinct KV tokens some query sees (each is read at least once)."""
        used = np.arange(self.kv_index.shape[1])[None] < self.kv_lens[:, None]
        if self.mask is not None:
            used &= self.mask.any(axis=0)[None]
        return np.unique(self.kv_index[used]).size

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs attention computes, summed over requests."""
        if self.mask is None and not self.causal:
            return int(np.dot(self.qo_lens.astype(np.int64), self.kv_lens))
        return int(self.visible().sum())

    @property
    def uniform(self) -> bool:
        """Every request has the padded lengths (no per-request lengths needed)."""
        return bool((self.qo_lens == self.q_index.shape[1]).all() and (self.kv_lens == self.kv_index.shape[1]).all())


@dataclasses.dataclass(frozen=True)
class Problem:
    """Inputs of one workload, shared by every backend.

    Attributes:
      make_wrapper: ``backend -> wrapper`` (a public jaxinfer wrapper class, partially applied).
      plan_args, plan_kwargs: arguments of ``wrapper.plan`` (``q_data_type`` is added per run).
      step: ``(plan, q, kv, kv_scales=None) -> o`` jit-compatible; runs a plan pytree through
        the public module-level functions, so the jitted step takes the plan as an argument.
      q: ``[nnz_q, Hq, D]`` bf16.
      kv: ``(k, v)``: paged caches ``[num_pages, page_size, Hkv, D]`` (NHD) or ragged
        ``[nnz_kv, Hkv, D]``, bf16 or fp8.
      dense: the batch as padded dense attention.
      reference: the same batch (same ``q`` and ``kv``) in a form whose float32 reference is
        cheaper, or ``None`` to use this one.
      kv_scales: ``(k_scale, v_scale)`` ``[Hkv]`` float32 of an fp8 ``kv`` (it holds the values
        divided by them), or ``None``; the step's fourth argument.
    """

    make_wrapper: Callable[..., Any]
    plan_args: tuple
    plan_kwargs: dict
    step: Callable
    q: jax.Array
    kv: tuple[jax.Array, jax.Array]
    dense: Dense
    reference: Problem | None = None
    kv_scales: tuple[jax.Array, jax.Array] | None = None

    @property
    def kv_flat(self) -> tuple[jax.Array, jax.Array]:
        """``kv`` viewed as ``[tokens, Hkv, D]`` (the rows :attr:`Dense.kv_index` points to)."""
        return tuple(x.reshape(-1, *x.shape[-2:]) for x in self.kv)

    @property
    def kv_dtype(self) -> jnp.dtype:
        return self.kv[0].dtype

    def kv_values(self, flat: bool = False) -> tuple[jax.Array, jax.Array]:
        """The K/V values attention reads: ``kv`` (``flat``: :attr:`kv_flat`) as stored, or float32
        ``cache * scale`` per KV head for an fp8 cache."""
        kv = self.kv_flat if flat else self.kv
        if self.kv_scales is None:
            return kv
        return tuple(x.astype(jnp.float32) * s[:, None] for x, s in zip(kv, self.kv_scales))

    def quantized(self, kv_dtype) -> Problem:
        """The same batch over a KV cache of ``kv_dtype`` (:mod:`jaxinfer.fp8`): per-KV-head
        scales ``amax / max`` of the dtype (the largest value maps to its largest finite one),
        the cache ``K / k_scale`` rounded to nearest even; ``reference`` shares the new cache."""
        limit = float(jnp.finfo(kv_dtype).max)
        scales = tuple(jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, *x.shape[-2:]), axis=(0, 2)) / limit
                       for x in self.kv)
        kv = tuple(fp8.quantize(x, s, kv_dtype) for x, s in zip(self.kv, scales))
        reference = None if self.reference is None else dataclasses.replace(self.reference, kv=kv, kv_scales=scales)
        return dataclasses.replace(self, kv=kv, kv_scales=scales, reference=reference)

    @functools.cached_property
    def flops(self) -> int:
        """``4 * visible_pairs * Hq * D``: QK^T and PV, causal and masks counted as visible pairs."""
        return 4 * self.dense.visible_pairs() * self.q.shape[1] * self.q.shape[2]

    @functools.cached_property
    def bytes(self) -> int:
        """Floor of memory traffic: q read and o written once, each distinct KV token read once
        (at the cache's bytes per element: one for fp8)."""
        _, hkv, d = self.kv_flat[0].shape
        return (2 * self.q.size * self.q.dtype.itemsize
                + 2 * self.dense.kv_tokens_read() * hkv * d * self.kv_dtype.itemsize)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """Common shape parameters; subclasses add the batch shape and ``build``.

    Attributes:
      name: workload name (the CLI's ``--workloads``).
      num_qo_heads, num_kv_heads, head_dim, page_size: geometry; bf16, NHD.
    """

    name: str
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16

    unit: ClassVar[str] = "TB/s"  # throughput reported: bytes/s (memory-bound) or FLOP/s

    def scaled(self, factor: int) -> Workload:
        """The same workload with every size field divided by ``factor`` (at least 1; a zero field,
        such as prefill_causal's ``prefix_len``, stays zero)."""
        changes = {
            f.name: min(getattr(self, f.name), max(1, getattr(self, f.name) // factor))
            for f in dataclasses.fields(self)
            if f.metadata.get("scaled")
        }
        return dataclasses.replace(self, **changes)

    @property
    def definition(self) -> str:
        """FlashInfer-Bench style name of the op and its fixed geometry."""
        raise NotImplementedError

    def axes(self) -> dict:
        """The shape parameters as a JSON-able dict."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def build(self, seed: int) -> Problem:
        """Random inputs and the page table of this workload (seeded, reproducible)."""
        raise NotImplementedError

    def _geometry(self) -> str:
        return f"h{self.num_qo_heads}_kv{self.num_kv_heads}_d{self.head_dim}"

    def _random(self, key, *shapes) -> list[jax.Array]:
        keys = jax.random.split(key, len(shapes))
        return [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]

    def _paged_kv(self, key, num_pages: int) -> tuple[jax.Array, jax.Array]:
        shape = (num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        return tuple(self._random(key, shape, shape))


@dataclasses.dataclass(frozen=True)
class PageTable:
    """A BSR page table with shuffled page ids (shared/DESIGN.md sec. 3), built on the host."""

    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray
    kv_lens: np.ndarray
    page_size: int

    @classmethod
    def from_pages(cls, pages: list[np.ndarray], kv_lens: np.ndarray, page_size: int) -> PageTable:
        """Table of requests owning ``pages[b]`` (page ids) and holding ``kv_lens[b]`` tokens."""
        counts = np.array([p.size for p in pages])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        indices = np.concatenate(pages).astype(np.int32) if pages else np.zeros(0, np.int32)
        last = np.where(counts > 0, kv_lens - (counts - 1) * page_size, 0).astype(np.int32)
        return cls(indptr, indices, last, np.asarray(kv_lens, np.int32), page_size)

    @classmethod
    def shuffled(cls, kv_lens: np.ndarray, page_size: int, rng: np.random.Generator) -> PageTable:
        """Each request gets ``ceil(kv_len / page_size)`` pages drawn from one random permutation."""
        counts = -(-np.asarray(kv_lens) // page_size)
        perm = rng.permutation(int(counts.sum()))
        return cls.from_pages(np.split(perm, np.cumsum(counts)[:-1]), kv_lens, page_size)

    @property
    def num_pages(self) -> int:
        return int(self.indices.max(initial=-1)) + 1

    def token_index(self) -> np.ndarray:
        """``[B, max_kv_len]`` flat token row ``page * page_size + slot`` (padding repeats row 0)."""
        j = np.arange(int(self.kv_lens.max(initial=1)))[None, :]
        valid = j < self.kv_lens[:, None]
        ptr = np.minimum(self.indptr[:-1, None] + j // self.page_size, max(self.indices.size - 1, 0))
        return np.where(valid, self.indices[ptr] * self.page_size + j % self.page_size, self.indices[0] * self.page_size)


def _decode_dense(table: PageTable) -> Dense:
    batch = table.kv_lens.size
    return Dense(np.arange(batch)[:, None], table.token_index(), np.ones(batch, np.int64), table.kv_lens)


def _scale_kwargs(scales) -> dict:
    return {} if scales is None else dict(k_scale=scales[0], v_scale=scales[1])


def _decode_step(plan, q, kv, scales=None):
    return jaxinfer.batch_decode(q, kv, plan, **_scale_kwargs(scales))


def _paged_prefill_step(plan, q, kv, scales=None):
    return jaxinfer.batch_prefill_paged(q, kv, plan, **_scale_kwargs(scales))


def _ragged_prefill_step(plan, q, kv, scales=None):
    return jaxinfer.batch_prefill_ragged(q, *kv, plan, **_scale_kwargs(scales))


def _cascade_step(plans, q, kv, scales=None):
    return jaxinfer.batch_cascade(q, kv, plans, **_scale_kwargs(scales))


def _block_sparse_step(plan, q, kv, scales=None):
    return jaxinfer.batch_block_sparse(q, *kv, plan, **_scale_kwargs(scales))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeWorkload(Workload):
    """Batch decode, one query per request over a paged KV cache.

    Attributes:
      batch_size: requests.
      kv_len: tokens per request; with ``zipf_a``, the multiplier of the Zipf draw.
      zipf_a: if set, ``kv_len_b = clip(zipf(zipf_a) * kv_len, kv_len_min, kv_len_max)`` drawn
        from ``numpy.random.default_rng(0)`` (the lengths are part of the workload's definition).
      rope_theta: if set, ROPE_LLAMA (rotate-half RoPE with this base) fused into attention
        (``pos_encoding_mode="ROPE_LLAMA"``); the inputs are those of the same batch without it.
    """

    batch_size: int = dataclasses.field(metadata=SIZE)
    kv_len: int = dataclasses.field(metadata=SIZE)
    zipf_a: float | None = None
    kv_len_min: int = dataclasses.field(default=16, metadata=SIZE)
    kv_len_max: int = dataclasses.field(default=32768, metadata=SIZE)
    rope_theta: float | None = None

    @property
    def definition(self) -> str:
        rope = "_rope_llama" if self.rope_theta is not None else ""
        return f"gqa_paged_decode{rope}_{self._geometry()}_ps{self.page_size}"

    def kv_lens(self) -> np.ndarray:
        if self.zipf_a is None:
            return np.full(self.batch_size, self.kv_len, np.int64)
        draw = np.random.default_rng(0).zipf(self.zipf_a, self.batch_size) * self.kv_len
        return np.clip(draw, self.kv_len_min, self.kv_len_max)

    def build(self, seed: int) -> Problem:
        table = PageTable.shuffled(self.kv_lens(), self.page_size, np.random.default_rng(seed))
        kq, kkv = jax.random.split(jax.random.key(seed))
        (q,) = self._random(kq, (self.batch_size, self.num_qo_heads, self.head_dim))
        return Problem(
            make_wrapper=functools.partial(jaxinfer.BatchDecodeWithPagedKVCacheWrapper, kv_layout="NHD"),
            plan_args=(table.indptr, table.indices, table.last_page_len, self.num_qo_heads,
                       self.num_kv_heads, self.head_dim, self.page_size),
            plan_kwargs={} if self.rope_theta is None else {"pos_encoding_mode": "ROPE_LLAMA",
                                                            "rope_theta": self.rope_theta},
            step=_decode_step,
            q=q,
            kv=self._paged_kv(kkv, table.num_pages),
            dense=dataclasses.replace(_decode_dense(table), rope_theta=self.rope_theta),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillWorkload(Workload):
    """Batch prefill (``prefix_len = 0``) or append (``qo_len`` new tokens after a prefix).

    Attributes:
      batch_size: requests, each with ``qo_len`` queries over ``prefix_len + qo_len`` keys.
      paged: KV in a paged cache (BatchPrefillWithPagedKVCacheWrapper) or ragged
        (BatchPrefillWithRaggedKVCacheWrapper).
      causal: bottom-right aligned causal mask (off: every query sees every key).
    """

    unit: ClassVar[str] = "TFLOP/s"

    batch_size: int = dataclasses.field(metadata=SIZE)
    qo_len: int = dataclasses.field(metadata=SIZE)
    prefix_len: int = dataclasses.field(default=0, metadata=SIZE)
    paged: bool = False
    causal: bool = True

    @property
    def definition(self) -> str:
        mask = "causal" if self.causal else "noncausal"
        if self.paged:
            return f"gqa_paged_prefill_{mask}_{self._geometry()}_ps{self.page_size}"
        return f"gqa_ragged_prefill_{mask}_{self._geometry()}"

    def build(self, seed: int) -> Problem:
        kv_len = self.prefix_len + self.qo_len
        qo_lens = np.full(self.batch_size, self.qo_len)
        kv_lens = np.full(self.batch_size, kv_len)
        qo_indptr = np.arange(self.batch_size + 1, dtype=np.int32) * self.qo_len
        q_index = qo_indptr[:-1, None] + np.arange(self.qo_len)[None]
        kq, kkv = jax.random.split(jax.random.key(seed))
        (q,) = self._random(kq, (int(qo_indptr[-1]), self.num_qo_heads, self.head_dim))
        geometry = (self.num_qo_heads, self.num_kv_heads, self.head_dim)
        if self.paged:
            table = PageTable.shuffled(kv_lens, self.page_size, np.random.default_rng(seed))
            make = functools.partial(jaxinfer.BatchPrefillWithPagedKVCacheWrapper, kv_layout="NHD")
            plan_args = (qo_indptr, table.indptr, table.indices, table.last_page_len, *geometry, self.page_size)
            kv, kv_index, step = self._paged_kv(kkv, table.num_pages), table.token_index(), _paged_prefill_step
        else:
            kv_indptr = np.arange(self.batch_size + 1, dtype=np.int32) * kv_len
            make = functools.partial(jaxinfer.BatchPrefillWithRaggedKVCacheWrapper, kv_layout="NHD")
            plan_args = (qo_indptr, kv_indptr, *geometry)
            shape = (int(kv_indptr[-1]), self.num_kv_heads, self.head_dim)
            kv = tuple(self._random(kkv, shape, shape))
            kv_index, step = kv_indptr[:-1, None] + np.arange(kv_len)[None], _ragged_prefill_step
        return Problem(
            make_wrapper=make,
            plan_args=plan_args,
            plan_kwargs={"causal": self.causal},
            step=step,
            q=q,
            kv=kv,
            dense=Dense(q_index, kv_index, qo_lens, kv_lens, causal=self.causal),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CascadeWorkload(Workload):
    """Decode of ``batch_size`` requests that share a ``shared_len``-token prefix, each followed
    by ``unique_len`` tokens of its own.

    ``flat=False`` runs MultiLevelCascadeAttentionWrapper with 2 levels (level 0 the prefix, read
    once for all requests); ``flat=True`` is plain batch decode of the same batch (each request's
    page list is the prefix's pages then its own), the baseline cascade is compared with. Both
    count the same floor bytes (each distinct KV token once).
    """

    batch_size: int = dataclasses.field(metadata=SIZE)
    shared_len: int = dataclasses.field(metadata=SIZE)
    unique_len: int = dataclasses.field(metadata=SIZE)
    flat: bool = False

    def __post_init__(self):
        if self.shared_len % self.page_size:
            raise ValueError(f"shared_len ({self.shared_len}) must be a multiple of page_size ({self.page_size})")

    @property
    def definition(self) -> str:
        op = "paged_decode" if self.flat else "cascade2_decode"
        return f"gqa_{op}_shared_prefix_{self._geometry()}_ps{self.page_size}"

    def build(self, seed: int) -> Problem:
        B, ps = self.batch_size, self.page_size
        n_shared, n_unique = self.shared_len // ps, -(-self.unique_len // ps)
        perm = np.random.default_rng(seed).permutation(n_shared + B * n_unique)
        shared, unique = perm[:n_shared], perm[n_shared:].reshape(B, n_unique)
        flat = PageTable.from_pages([np.concatenate([shared, u]) for u in unique],
                                    np.full(B, self.shared_len + self.unique_len), ps)
        kq, kkv = jax.random.split(jax.random.key(seed))
        (q,) = self._random(kq, (B, self.num_qo_heads, self.head_dim))
        kv, dense = self._paged_kv(kkv, flat.num_pages), _decode_dense(flat)
        geometry = (self.num_qo_heads, self.num_kv_heads, self.head_dim, ps)
        prefix = PageTable.from_pages([shared], np.array([self.shared_len]), ps)
        suffix = PageTable.from_pages(list(unique), np.full(B, self.unique_len), ps)
        cascade = Problem(
            make_wrapper=functools.partial(jaxinfer.MultiLevelCascadeAttentionWrapper, 2, kv_layout="NHD"),
            plan_args=(
                [np.array([0, B], np.int32), np.arange(B + 1, dtype=np.int32)],
                [prefix.indptr, suffix.indptr],
                [prefix.indices, suffix.indices],
                [prefix.last_page_len, suffix.last_page_len],
                *geometry,
            ),
            plan_kwargs={},
            step=_cascade_step,
            q=q,
            kv=kv,
            dense=dense,
        )
        if not self.flat:
            return cascade
        # The xla backend pads each request of the flat batch to a power of two of keys (128 x
        # 65536 x 8 x 128 at full size: 68 GB of float32 K/V); the cascade form of the same
        # batch gives the same attention at a fraction of that, so it is the reference.
        return Problem(
            make_wrapper=functools.partial(jaxinfer.BatchDecodeWithPagedKVCacheWrapper, kv_layout="NHD"),
            plan_args=(flat.indptr, flat.indices, flat.last_page_len, *geometry),
            plan_kwargs={},
            step=_decode_step,
            q=q,
            kv=kv,
            dense=dense,
            reference=cascade,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSparseWorkload(Workload):
    """Attention of ``M`` queries over ``N`` keys under a random BSR mask of ``(R, C)`` blocks.

    Each block row keeps ``max(1, round(density * N / C))`` distinct column blocks drawn at
    random; ``C = 1`` is vector-sparse attention. Run through BlockSparseAttentionWrapper.
    """

    num_kv_heads: int = 32
    M: int = dataclasses.field(metadata=SIZE)
    N: int = dataclasses.field(metadata=SIZE)
    R: int = 64
    C: int = 64
    density: float = 0.1

    @property
    def definition(self) -> str:
        return f"block_sparse_r{self.R}_c{self.C}_{self._geometry()}"

    def build(self, seed: int) -> Problem:
        rng = np.random.default_rng(seed)
        row_blocks, col_blocks = -(-self.M // self.R), self.N // self.C
        per_row = max(1, round(self.density * col_blocks))
        indices = np.concatenate([np.sort(rng.choice(col_blocks, per_row, replace=False)) for _ in range(row_blocks)])
        indptr = np.arange(row_blocks + 1, dtype=np.int32) * per_row
        kv_shape = (self.N, self.num_kv_heads, self.head_dim)
        q, k, v = self._random(jax.random.key(seed), (self.M, self.num_qo_heads, self.head_dim), kv_shape, kv_shape)
        mask = jaxinfer.bsr_to_dense(indptr, indices, self.M, self.N, self.R, self.C)
        return Problem(
            make_wrapper=jaxinfer.BlockSparseAttentionWrapper,
            plan_args=(indptr, indices.astype(np.int32), self.M, self.N, self.R, self.C,
                       self.num_qo_heads, self.num_kv_heads, self.head_dim),
            plan_kwargs={},
            step=_block_sparse_step,
            q=q,
            kv=(k, v),
            dense=Dense(np.arange(self.M)[None], np.arange(self.N)[None], np.array([self.M]), np.array([self.N]),
                        mask=mask),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedWorkload(Workload):
    """One serving step that mixes a prefill with decodes (the shape of POD-Attention, Kamath et
    al., arXiv 2410.18038, and FlashInfer's ``PODWithPagedKVCacheWrapper``): request 0 prefills
    ``prefill_len`` tokens (causal over themselves), requests 1..``decode_batch`` decode one token
    each over ``decode_len`` keys; one shuffled paged cache. jaxinfer runs it as one batch of
    BatchPrefillWithPagedKVCacheWrapper (mixed query lengths, one plan, one launch). The decodes'
    KV reads dominate, so the unit is TB/s.
    """

    prefill_len: int = dataclasses.field(metadata=SIZE)
    decode_batch: int = dataclasses.field(metadata=SIZE)
    decode_len: int = dataclasses.field(metadata=SIZE)

    @property
    def definition(self) -> str:
        return f"gqa_paged_mixed_prefill_decode_{self._geometry()}_ps{self.page_size}"

    def build(self, seed: int) -> Problem:
        qo_lens = np.array([self.prefill_len] + [1] * self.decode_batch)
        kv_lens = np.array([self.prefill_len] + [self.decode_len] * self.decode_batch)
        qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
        t = np.arange(int(qo_lens.max()))[None]
        q_index = qo_indptr[:-1, None] + np.minimum(t, qo_lens[:, None] - 1)  # padding repeats a valid row
        table = PageTable.shuffled(kv_lens, self.page_size, np.random.default_rng(seed))
        kq, kkv = jax.random.split(jax.random.key(seed))
        (q,) = self._random(kq, (int(qo_indptr[-1]), self.num_qo_heads, self.head_dim))
        return Problem(
            make_wrapper=functools.partial(jaxinfer.BatchPrefillWithPagedKVCacheWrapper, kv_layout="NHD"),
            plan_args=(qo_indptr, table.indptr, table.indices, table.last_page_len, self.num_qo_heads,
                       self.num_kv_heads, self.head_dim, self.page_size),
            plan_kwargs={"causal": True},
            step=_paged_prefill_step,
            q=q,
            kv=self._paged_kv(kkv, table.num_pages),
            dense=Dense(q_index, table.token_index(), qo_lens, kv_lens, causal=True),
        )


# The same shape with one thing changed each: the prefill table of the FFI kernels (B=4, S=4096,
# Hq=32, D=128, causal, ragged, unless the name says otherwise).
_PREFILL = dict(batch_size=4, qo_len=4096, num_kv_heads=32)

# prefill_causal runs first: its float32 reference takes ~26 GB of temporaries in one block, which
# an H100's allocator could not find after five other workloads had run (benchmarks/RESULTS.md).
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        PrefillWorkload(name="prefill_causal", **_PREFILL),
        DecodeWorkload(name="decode_uniform", batch_size=64, kv_len=4096),
        DecodeWorkload(name="decode_zipf", batch_size=64, kv_len=256, zipf_a=1.5),
        DecodeWorkload(name="decode_long", batch_size=8, kv_len=32768),
        DecodeWorkload(name="decode_wide", batch_size=256, kv_len=1024),
        PrefillWorkload(name="append", batch_size=16, qo_len=128, prefix_len=2048, paged=True),
        CascadeWorkload(name="cascade", batch_size=128, shared_len=32768, unique_len=256),
        CascadeWorkload(name="cascade_flat", batch_size=128, shared_len=32768, unique_len=256, flat=True),
        BlockSparseWorkload(name="block_sparse", M=8192, N=8192, R=64, C=64),
        BlockSparseWorkload(name="vector_sparse", M=8192, N=8192, R=64, C=1),
        # Opt-in (see GROUPS). The prefill shapes of the retired benchmarks/ffi_gpu.py:
        PrefillWorkload(name="prefill_noncausal", **_PREFILL, causal=False),
        PrefillWorkload(name="prefill_gqa_hkv8", **{**_PREFILL, "num_kv_heads": 8}),
        PrefillWorkload(name="prefill_d64", **_PREFILL, head_dim=64),
        PrefillWorkload(name="prefill_d256", **_PREFILL, head_dim=256),
        PrefillWorkload(name="prefill_paged16", **_PREFILL, paged=True, page_size=16),
        PrefillWorkload(name="prefill_paged1", **_PREFILL, paged=True, page_size=1),
        # decode_uniform's batch and inputs with ROPE_LLAMA fused (issue 4: <= 1.1x decode_uniform;
        # theta 5e5 as Llama 3), from the retired benchmarks/pallas_gpu.py.
        DecodeWorkload(name="decode_rope", batch_size=64, kv_len=4096, rope_theta=5e5),
        # decode_zipf's draw at B=256 (85,536 pages): with decode_wide (uniform 1024), the batches
        # of issue 3's plan() target (under 300 us on the host), from the retired plan_gpu.py.
        DecodeWorkload(name="decode_wide_zipf", batch_size=256, kv_len=256, zipf_a=1.5),
        # One 2048-token prefill beside 63 decodes at 4096 in one step (issue 23, FlashInfer's POD shape).
        MixedWorkload(name="pod_mixed", prefill_len=2048, decode_batch=63, decode_len=4096),
    )
}

# Named sets of workloads for ``--workloads`` (``e2e`` is the Llama decode step of bench/e2e.py).
GROUPS: dict[str, tuple[str, ...]] = {
    "default": ("prefill_causal", "decode_uniform", "decode_zipf", "decode_long", "decode_wide", "append",
                "cascade", "cascade_flat", "block_sparse", "vector_sparse", "e2e"),
    "prefill_shapes": ("prefill_causal", "prefill_noncausal", "prefill_gqa_hkv8", "prefill_d64", "prefill_d256",
                       "prefill_paged16", "prefill_paged1"),
    "rope": ("decode_uniform", "decode_rope"),
    "plan": ("decode_wide", "decode_wide_zipf"),
    "mixed": ("pod_mixed",),
}
# Every workload, the large prefill references first (see the note on prefill_causal above).
GROUPS["all"] = tuple(dict.fromkeys([*GROUPS["prefill_shapes"], *GROUPS["default"], *WORKLOADS]))
E2E = "e2e"


def expand(names: list[str] | None) -> list[str]:
    """Workload names of ``names`` (workload or group names, in order, each once; ``None`` is the
    ``default`` group); may include ``"e2e"``.

    Raises:
      ValueError: a name that is neither a workload, ``e2e`` nor a group.
    """
    out = []
    for name in GROUPS["default"] if names is None else names:
        members = GROUPS.get(name, (name,))
        unknown = [n for n in members if n not in WORKLOADS and n != E2E]
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; known: {', '.join([*WORKLOADS, E2E])}; "
                             f"groups: {', '.join(GROUPS)}")
        out += [n for n in members if n not in out]
    return out


def select(names: list[str] | None, size: str) -> list[Workload]:
    """The attention workloads of ``names`` (workload or group names, see :func:`expand`; the
    ``default`` group when ``None``; ``e2e`` left out) at ``size`` (``"full"``, ``"cpu"``, ``"tiny"``).

    Raises:
      ValueError: unknown workload name or size.
    """
    if size not in SIZE_FACTORS:
        raise ValueError(f"size must be one of {tuple(SIZE_FACTORS)}, got {size!r}")
    return [WORKLOADS[n].scaled(SIZE_FACTORS[size]) for n in expand(names) if n != E2E]
