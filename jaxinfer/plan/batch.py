"""Host-side description of one batch of attention work: the input of every backend's planner.

Every batch op of jaxinfer (decode, paged or ragged prefill, append, a cascade level,
block-sparse) is described by one :class:`BatchSpec`: ragged queries (``qo_indptr``), ragged KV
given either as a BSR page table (``kv_indptr`` over pages, ``kv_indices``, ``kv_last_page_len``)
or as token ranges of a ragged KV tensor (``kv_indptr`` over tokens), the head geometry and the
:class:`~jaxinfer.variants.AttentionVariant`. A backend turns a spec into a plan pytree of device
arrays (``backend.plan(spec, capacity)``) and runs it (``backend.run(plan, q, k, v, ...)``).

:class:`PlanCapacity` fixes the static shapes of plans: two batches planned with the same capacity
give plans of identical shapes, so a jitted step that takes the plan never recompiles. Left unset,
a capacity is the actual size rounded up to a power of two (a few compilations at most). Its
``fixed_split_size`` makes plans batch invariant (:meth:`PlanCapacity.as_deterministic`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from jaxinfer.plan import native
from jaxinfer.plan.checks import check_indptr, check_int, check_page_table_lens, check_seq_lens_fit, checked_batch
from jaxinfer.variants import AttentionVariant


# The split size of ``deterministic=True`` (tokens): a request up to this long is one tile; a
# longer one costs a partial write and a merge per 2048 keys (a few percent of reading them).
DETERMINISTIC_SPLIT_SIZE = 2048
# The query length a deterministic plan without ``max_qo_len`` picks prefill tiles by (the
# largest row tile of the Pallas kernel for any GQA group).
DETERMINISTIC_QO_LEN = 128


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class PlanCapacity:
    """Static maxima of a plan; ``None`` means "actual size rounded up to a power of two".

    Attributes:
      max_batch_size: requests per batch.
      max_qo_len: queries of one request.
      max_kv_len: keys of one request (tokens).
      max_work_tiles: work tiles of the Pallas planner (split-KV chunks included).
      fixed_split_size: ``None``, or the KV chunk (tokens, ``>= 1``) of every split-KV plan,
        fixed independently of the batch (FlashInfer's ``fixed_split_size``): every request
        longer than it is split at its multiples, and the tile config is chosen without the
        batch's mean query length (:meth:`config_qo_len`), so that a request's output is
        bit-identical whatever batch it is in (:meth:`as_deterministic`). ``None``: the planner
        picks the chunk per batch (fewer tiles, better balance; outputs may differ in the last
        bits from batch to batch).

    Raises:
      ValueError: ``fixed_split_size`` is not an integer ``>= 1``.
    """

    max_batch_size: int | None = None
    max_qo_len: int | None = None
    max_kv_len: int | None = None
    max_work_tiles: int | None = None
    fixed_split_size: int | None = None

    def __post_init__(self):
        if self.fixed_split_size is not None:
            object.__setattr__(self, "fixed_split_size", check_int("fixed_split_size", self.fixed_split_size, minimum=1))

    @property
    def deterministic(self) -> bool:
        """Whether plans of this capacity are batch invariant (``fixed_split_size`` is set)."""
        return self.fixed_split_size is not None

    def as_deterministic(self, fixed_split_size: int | None = None) -> PlanCapacity:
        """This capacity with a fixed split size: ``fixed_split_size``, else the one already set,
        else :data:`DETERMINISTIC_SPLIT_SIZE` (the wrappers' ``deterministic=True``). A request's
        output bits then do not depend on the batch it is planned in: its keys split at the same
        points and its tile shape does not follow the batch; large batches get more work tiles.

        Raises:
          ValueError: ``fixed_split_size`` is not an integer ``>= 1``.
        """
        size = next(s for s in (fixed_split_size, self.fixed_split_size, DETERMINISTIC_SPLIT_SIZE) if s is not None)
        return dataclasses.replace(self, fixed_split_size=size)

    def config_qo_len(self, spec: BatchSpec) -> float:
        """The query length a backend picks its tile config by for ``spec``: ``max_qo_len`` when
        fixed (one compiled program for every batch that fits); else, with ``fixed_split_size``,
        :data:`DETERMINISTIC_QO_LEN` (the tile shape changes a row's arithmetic, so it must not
        follow the batch: a decode wrapper fixes ``max_qo_len=1`` to keep its decode tiles);
        else the batch's mean query length."""
        if self.max_qo_len is not None:
            return float(self.max_qo_len)
        if self.fixed_split_size is not None:
            return float(DETERMINISTIC_QO_LEN)
        return int(spec.qo_indptr[-1]) / max(spec.batch_size, 1)

    def config_median_qo_len(self, spec: BatchSpec) -> float:
        """The median query length of ``spec``'s non-empty requests, by which a backend tells a
        batch of mostly decodes beside a prefill (POD's shape) from a batch of prefills; or
        :meth:`config_qo_len` where that is fixed (the config must not follow the batch's mix
        either)."""
        if self.max_qo_len is not None or self.fixed_split_size is not None:
            return self.config_qo_len(spec)
        qo_lens = np.diff(spec.qo_indptr)
        qo_lens = np.sort(qo_lens[qo_lens > 0])
        n = qo_lens.size
        # The two middle entries of the sorted lengths: np.median's generic path costs several
        # times this, on every plan() call.
        return (float(qo_lens[(n - 1) // 2]) + float(qo_lens[n // 2])) / 2 if n else 1.0

    def resolve(self, field: str, actual: int) -> int:
        """The capacity of ``field`` for a batch whose actual maximum is ``actual``.

        Raises:
          ValueError: the batch is larger than a fixed capacity.
        """
        cap = getattr(self, field)
        if cap is None:
            return next_pow2(max(int(actual), 1))
        if actual > cap:
            raise ValueError(f"{field}={cap} of the wrapper's capacity is smaller than the batch's {actual}")
        return int(cap)


def pad_to(a: np.ndarray, size: int, value: int) -> np.ndarray:
    """``[max(size, 1)]`` int32: ``a`` followed by ``value``."""
    out = np.full(max(size, 1), value, dtype=np.int32)
    out[: a.size] = a
    return out


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """A batch's per-request arrays padded to the plan capacity (int32 numpy): the padded requests
    are empty (their row pointers repeat the last value, their lengths are 0).

    Attributes:
      max_batch_size, max_qo_len, max_kv_len: the resolved capacities ``Bc``, ``Lq``, ``Lk``.
      qo_indptr, kv_indptr: ``[Bc+1]``; qo_lens, kv_lens: ``[Bc]``.
    """

    max_batch_size: int
    max_qo_len: int
    max_kv_len: int
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    qo_lens: np.ndarray
    kv_lens: np.ndarray


def pad_batch(spec: BatchSpec, capacity: PlanCapacity) -> PaddedBatch:
    """``spec``'s requests padded to ``capacity`` (its batch size, query and key lengths).

    Raises:
      ValueError: the batch is larger than a fixed field of ``capacity``.
    """
    bc = capacity.resolve("max_batch_size", spec.batch_size)
    return PaddedBatch(
        max_batch_size=bc,
        max_qo_len=capacity.resolve("max_qo_len", int(spec.qo_lens.max(initial=0))),
        max_kv_len=capacity.resolve("max_kv_len", int(spec.kv_lens.max(initial=0))),
        qo_indptr=pad_to(spec.qo_indptr, bc + 1, int(spec.qo_indptr[-1])),
        kv_indptr=pad_to(spec.kv_indptr, bc + 1, int(spec.kv_indptr[-1])),
        qo_lens=pad_to(spec.qo_lens, bc, 0),
        kv_lens=pad_to(spec.kv_lens, bc, 0),
    )


def filled(cls, **fields):
    """``cls(**fields)`` of a frozen dataclass without ``__post_init__``, given every field: its
    generated ``__init__`` sets each field through ``object.__setattr__`` (2.4 us for BatchSpec's
    13, on every plan); filling ``__dict__`` makes the same object in 0.6 us."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


@dataclasses.dataclass(frozen=True, eq=False)
class BatchSpec:
    """A validated batch on the host (numpy int32 arrays).

    Attributes:
      qo_indptr: ``[B+1]`` query row pointer (tokens).
      kv_indptr: ``[B+1]`` over pages when ``paged``, over tokens of the ragged KV otherwise.
      kv_indices: ``[nnz_pages]`` page ids (paged) or ``None``.
      kv_last_page_len: ``[B]`` (paged) or ``None``.
      kv_lens: ``[B]`` keys per request (tokens).
      page_size: tokens per page (1 for ragged KV).
      num_qo_heads, num_kv_heads, head_dim: head geometry (``num_qo_heads % num_kv_heads == 0``).
      variant: the attention variant.
      custom_mask: flat bool, the concatenation of each request's row-major ``[qo_len, kv_len]``
        mask, or ``None``.
      q_dtype, kv_dtype: the dtypes ``run`` will receive.
    """

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray | None
    kv_last_page_len: np.ndarray | None
    kv_lens: np.ndarray
    page_size: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    variant: AttentionVariant
    custom_mask: np.ndarray | None = None
    q_dtype: jnp.dtype = jnp.bfloat16
    kv_dtype: jnp.dtype = jnp.bfloat16

    @property
    def paged(self) -> bool:
        return self.kv_indices is not None

    @property
    def batch_size(self) -> int:
        return self.kv_lens.size

    @property
    def qo_lens(self) -> np.ndarray:
        return np.diff(self.qo_indptr)

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @functools.cached_property
    def native_addresses(self) -> tuple[int, int, int, int]:
        """Data addresses of ``qo_indptr``, ``kv_indptr``, ``kv_lens`` and ``kv_indices`` (0 for
        ragged KV) as C-contiguous int32 arrays, for the native planner (jaxinfer/csrc/planner.cc):
        the spec's own arrays when :meth:`create` checked them natively, else int32 copies that
        the spec keeps (:attr:`_int32_arrays`)."""
        return tuple(0 if a is None else native.address(a) for a in self._int32_arrays)

    @functools.cached_property
    def _int32_arrays(self) -> tuple[np.ndarray | None, ...]:
        return tuple(None if a is None else np.ascontiguousarray(a, np.int32)
                     for a in (self.qo_indptr, self.kv_indptr, self.kv_lens, self.kv_indices))

    def __getstate__(self) -> dict:
        # Addresses belong to this object's arrays: a copy or a pickle looks its own up.
        return {k: v for k, v in self.__dict__.items() if k not in ("native_addresses", "_int32_arrays")}

    @property
    def mask_indptr(self) -> np.ndarray:
        """``[B+1]`` offsets of each request's mask in the flat ``custom_mask``."""
        return np.concatenate([[0], np.cumsum(self.qo_lens.astype(np.int64) * self.kv_lens)]).astype(np.int64)

    @classmethod
    def create(
        cls,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        *,
        page_size: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        variant: AttentionVariant,
        custom_mask=None,
        q_dtype=jnp.bfloat16,
        kv_dtype=None,
        names=None,
    ) -> BatchSpec:
        """Validate and build a spec; ``kv_indices is None`` means ragged KV (``kv_indptr`` in tokens).

        ``names`` maps ``"kv_indptr"``, ``"kv_indices"``, ``"kv_last_page_len"`` to the caller's
        argument names for messages (:func:`~jaxinfer.plan.checks.check_page_table`).

        Raises:
          ValueError: on any rule of shared/DESIGN.md section 5 (the message names the argument).
        """
        num_qo_heads = check_int("num_qo_heads", num_qo_heads, minimum=1)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
        head_dim = check_int("head_dim", head_dim, minimum=1)
        if num_qo_heads % num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if not isinstance(variant, AttentionVariant):
            raise ValueError(f"variant must be an AttentionVariant, got {type(variant).__name__}")
        if variant.pos_encoding_mode == "ROPE_LLAMA" and head_dim % 2:
            raise ValueError(f"head_dim must be even for ROPE_LLAMA, got {head_dim}")
        page_size = 1 if kv_indices is None else check_int("page_size", page_size, minimum=1)
        checked = checked_batch(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, page_size)
        if checked is not None:
            # The native pass only takes int32 page ids and int32/int64 row pointers and last page
            # lengths that it bounds by int32: nothing wrapped; only a request's length may have.
            qo_indptr, kv_indptr, kv_lens, last, addresses = checked
            if last is not None:
                check_seq_lens_fit(kv_indptr, last, page_size, names=names)
        else:
            addresses = None
            if kv_indices is None:
                kv_indptr = check_indptr("kv_indptr", kv_indptr)
                kv_lens, last = np.diff(kv_indptr).astype(np.int32), None
            else:
                kv_indptr, kv_indices, last, kv_lens = check_page_table_lens(kv_indptr, kv_indices, kv_last_page_len,
                                                                             page_size, names=names)
            qo_indptr = check_indptr("qo_indptr", qo_indptr, batch_size=kv_lens.size)
        spec = filled(
            cls,
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            kv_last_page_len=last,
            kv_lens=kv_lens,
            page_size=page_size,
            num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            variant=variant,
            custom_mask=None,
            q_dtype=jnp.dtype(q_dtype),
            kv_dtype=jnp.dtype(kv_dtype if kv_dtype is not None else q_dtype),
        )
        if custom_mask is not None:
            mask = np.asarray(custom_mask)
            if mask.dtype != np.bool_ or mask.ndim != 1 or mask.size != spec.mask_indptr[-1]:
                raise ValueError(
                    "custom_mask must be a flat bool array of sum(qo_len * kv_len) = "
                    f"{spec.mask_indptr[-1]} elements, got {mask.dtype}{mask.shape}"
                )
            spec = dataclasses.replace(spec, custom_mask=mask)
        if addresses is not None:
            # The native check read them already (~0.6 us a lookup otherwise): fill the cached property.
            spec.__dict__["native_addresses"] = addresses
        return spec
