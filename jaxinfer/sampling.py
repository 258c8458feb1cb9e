"""Sampling and speculative decoding: FlashInfer's ``flashinfer.sampling`` API in JAX.

Every sampler draws one token per output row from a row of probabilities (or of logits, through
the softmax) after an optional filter:

* top-k (Fan et al. 2018, arXiv 1805.04833): keep the tokens whose probability is at least the
  k-th largest, ``{i : #{j : p_j > p_i} < k}`` -- every token tied with the k-th value is kept,
  as in FlashInfer's reference (``probs >= sorted[k - 1]``). ``top_k <= 0`` or ``>= vocab``
  keeps everything (the "-1 disables" convention of vLLM and SGLang).
* top-p / nucleus (Holtzman et al. 2020, arXiv 1904.09751): keep the tokens whose strictly
  larger tokens hold less than ``top_p`` of the mass, ``{i : sum_{p_j > p_i} p_j < top_p * Z}``
  (``Z`` the row's sum; ties are kept or dropped together); the largest token(s) are always
  kept, so ``top_p = 0`` is greedy (ties sampled uniformly) and ``top_p = 1`` keeps everything.
* min-p (Nguyen et al. 2024, arXiv 2407.01082): keep ``{i : p_i >= min_p * max_j p_j}``.

and samples from the kept tokens in proportion to their probability (exactly renormalized). Rows
need not be normalized: probabilities are taken relative to their row's sum.

Randomness. FlashInfer takes a torch ``generator=``; here the same positional slot is ``key=``,
a ``jax.random`` key (shape ``()``: output row ``b`` uses ``fold_in(key, b)``; shape ``[B]``: one
key per output row; raw ``uint32 [2]`` / ``[B, 2]`` keys are wrapped). Or, as FlashInfer 0.6,
``seed=`` and ``offset=`` (ints or ``[B]`` / ``[1]`` integer arrays, both required): output row
``b`` uses ``fold_in(jax.random.key(seed[b]), offset[b])``. A row's token depends only on its own
key, its row of probabilities and its parameters, never on the rest of the batch; the same key
gives the same token on the same backend and device. JAX has no global generator: one of the two
forms is required.

Parameters. ``top_k``, ``top_p``, ``min_p`` and ``temperature`` are Python scalars or ``[R]``
arrays, one value per row of ``probs`` / ``logits`` (``R`` rows; with ``indices=`` an output row
``b`` draws from row ``indices[b]`` with that row's parameters, as FlashInfer does). Arrays may be
traced: new values never recompile. Concrete values are checked (``ValueError`` naming the
argument); traced values are clamped into range (``top_p``, ``min_p`` to [0, 1], ``temperature``
to >= 0).

Temperature (a jaxinfer extension on the ``*_from_logits`` samplers, FlashInfer's ``softmax``
argument): logits are divided by it before softmax and filters. ``temperature = 0`` is greedy:
the samplers return the first index of the row's largest logit, ``softmax`` returns the limit
distribution (uniform over the row's largest logits).

Backends: ``"xla"`` is the plain-jnp reference (sort-based, float32) and the CPU path;
``"pallas"`` runs FlashInfer's sorting-free rejection sampling as Pallas kernels (Triton on the
GPU, interpret mode elsewhere; :mod:`jaxinfer.backends.pallas.sampling`); ``"auto"`` picks
``"pallas"`` on a GPU and ``"xla"`` elsewhere. Both sample the same distribution; their tokens for
one key differ.

Rows whose kept probabilities are all zero (or NaN) have no distribution: their token is
unspecified (``check_nan=True`` rejects NaN in concrete inputs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from jaxinfer.backends import device

BACKENDS = ("auto", "xla", "pallas")
FILTER_APPLY_ORDERS = ("top_k_first", "joint")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What a sampler does (static; one compiled program per spec).

    Attributes:
      from_logits: the rows are logits (softmax with temperature first), else probabilities.
      top_k, top_p, min_p: which filters apply.
      joint: with both top-k and top-p, apply them to the same distribution (FlashInfer's
        ``"joint"``) instead of top-p on the renormalized top-k distribution (``"top_k_first"``).
    """

    from_logits: bool = False
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    joint: bool = False


@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-row sampler parameters, each ``[R]`` (a pytree: traced values never recompile)."""

    top_k: Int[Array, " R"]
    top_p: Float[Array, " R"]
    min_p: Float[Array, " R"]
    temperature: Float[Array, " R"]


jax.tree_util.register_dataclass(RowParams, data_fields=["top_k", "top_p", "min_p", "temperature"], meta_fields=[])


# --------------------------------------------------------------------------------------------
# Argument checks (host side, before tracing the core)
# --------------------------------------------------------------------------------------------


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_rows(x, name: str) -> jax.Array:
    """``x`` as a ``[R, V]`` floating array (``V >= 1``)."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D [batch_size, vocab_size] array with vocab_size >= 1, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point (float32, bfloat16 or float16), got {x.dtype}")
    return x


def _row_param(value, name: str, rows: int, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None) -> jax.Array:
    """A scalar or ``[rows]`` parameter as a ``[rows]`` int32 / float32 array, checked when concrete."""
    if value is None or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number or a [{rows}] array, got {value!r}")
    traced = _is_traced(value)
    # Concrete values are checked (and integers clipped to int32) in numpy: Python ints past int32
    # cannot become JAX arrays without x64.
    arr = value if traced else np.asarray(value)
    if integer and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if not integer and not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim not in (0, 1) or (arr.ndim == 1 and arr.shape[0] != rows):
        raise ValueError(f"{name} must be a scalar or a [{rows}] array (one value per row), got shape {arr.shape}")
    if not traced:
        host = arr.astype(np.float64)
        if np.isnan(host).any():
            raise ValueError(f"{name} must not be NaN")
        if lo is not None and (host < lo).any():
            raise ValueError(f"{name} must be >= {lo}, got {host.min()}")
        if hi is not None and (host > hi).any():
            raise ValueError(f"{name} must be <= {hi}, got {host.max()}")
    if integer:
        # Values past int32 mean "no top-k" as much as vocab_size does.
        info = np.iinfo(np.int32)
        arr = jnp.asarray(np.clip(arr, info.min, info.max).astype(np.int32)) if not traced else arr.astype(jnp.int32)
    else:
        arr = jnp.asarray(arr, jnp.float32)
        arr = jnp.clip(arr, lo, hi) if lo is not None or hi is not None else arr
    return jnp.broadcast_to(arr, (rows,))


def _params(rows: int, *, top_k=0, top_p=1.0, min_p=0.0, temperature=None) -> RowParams:
    return RowParams(
        top_k=_row_param(top_k, "top_k", rows, integer=True),
        top_p=_row_param(top_p, "top_p", rows, lo=0.0, hi=1.0),
        min_p=_row_param(min_p, "min_p", rows, lo=0.0, hi=1.0),
        temperature=_row_param(1.0 if temperature is None else temperature, "temperature", rows, lo=0.0),
    )


def _check_indices(indices, rows: int) -> jax.Array | None:
    """``indices [B]`` integer row of each output, checked in ``[0, rows)`` when concrete."""
    if indices is None:
        return None
    arr = jnp.asarray(indices)
    if arr.ndim != 1 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"indices must be a 1-D integer array, got shape {arr.shape} and dtype {arr.dtype}")
    if not _is_traced(indices) and arr.size and (int(np.min(arr)) < 0 or int(np.max(arr)) >= rows):
        raise ValueError(f"indices must lie in [0, {rows}) (rows of the input), got {int(np.min(arr))}..{int(np.max(arr))}")
    return arr


def _check_choice(value, name: str, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_nan(x, name: str, check_nan: bool) -> None:
    if not check_nan:
        return
    if _is_traced(x):
        raise ValueError(f"check_nan=True reads {name} on the host: call it outside jax.jit (or use jax.experimental.checkify)")
    if bool(jnp.isnan(x).any()):
        raise ValueError(f"Input {name} contains NaN.")


def _seed_array(value, name: str, batch: int) -> jax.Array:
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer or an integer array, got dtype {arr.dtype}")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be an integer, or a 1-D array of length 1 or {batch} (batch_size), got shape {arr.shape}")
    return jnp.broadcast_to(arr.reshape(-1) if arr.ndim else arr, (batch,))


def row_keys(batch: int, key=None, seed=None, offset=None) -> jax.Array:
    """One typed ``jax.random`` key per output row, ``[batch]`` (see the module docstring).

    Raises:
      ValueError: neither or both of ``key`` and ``seed``/``offset``; only one of ``seed`` and
        ``offset``; wrong shapes or dtypes (the argument is named).
    """
    if key is not None and (seed is not None or offset is not None):
        raise ValueError("pass either key= or seed= and offset=, not both")
    if key is None:
        if seed is None and offset is None:
            raise ValueError("a random key is required: pass key= (a jax.random key) or seed= and offset= "
                             "(JAX has no global generator)")
        if seed is None or offset is None:
            raise ValueError("seed and offset must be given together")
        seeds, offsets = _seed_array(seed, "seed", batch), _seed_array(offset, "offset", batch)
        return jax.vmap(lambda s, o: jax.random.fold_in(jax.random.key(s), o))(seeds, offsets)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.ndim not in (1, 2) or key.shape[-1] != 2:
            raise ValueError(f"key must be a jax.random key (or raw uint32 [2] / [batch_size, 2] key data), "
                             f"got shape {key.shape} and dtype {key.dtype}")
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch, dtype=jnp.uint32))
    if key.shape != (batch,):
        raise ValueError(f"key must be one key or [{batch}] keys (one per output row), got shape {key.shape}")
    return key


def _resolve_backend(backend: str) -> str:
    _check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return "pallas" if device.gpu_arch() is not None else "xla"
    return backend


# --------------------------------------------------------------------------------------------
# The plain-jnp reference (sort-based, float32)
# --------------------------------------------------------------------------------------------


def _sorted_desc(w: jax.Array) -> jax.Array:
    return -jnp.sort(-w, axis=-1)


def _top_k_threshold(x: jax.Array, top_k: jax.Array) -> jax.Array:
    """``[R]``: the k-th largest value of each row (``-inf`` where top-k is off)."""
    vocab = x.shape[-1]
    off = (top_k <= 0) | (top_k >= vocab)
    kth = jnp.take_along_axis(_sorted_desc(x), jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(off, -jnp.inf, kth)


def _top_p_threshold(w: jax.Array, top_p: jax.Array) -> jax.Array:
    """``[R]``: the smallest weight whose strictly larger weights hold < ``top_p`` of the row's
    mass (``-inf`` where ``top_p >= 1``); in sorted order the first ``n`` tokens whose exclusive
    prefix sum is below ``top_p * Z`` (at least one), so ties fall on one side together."""
    ws = _sorted_desc(w)
    cs = jnp.cumsum(ws, axis=-1)
    exclusive = jnp.concatenate([jnp.zeros_like(cs[:, :1]), cs[:, :-1]], axis=-1)
    n = jnp.sum(exclusive < (top_p * cs[:, -1])[:, None], axis=-1)
    t = jnp.take_along_axis(ws, jnp.clip(n - 1, 0, w.shape[-1] - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(top_p >= 1.0, -jnp.inf, t)


def _weights(x: jax.Array, temperature: jax.Array, from_logits: bool) -> jax.Array:
    """Unnormalized float32 probabilities ``[R, V]``: the rows themselves, or
    ``exp(x / T - max(x / T))`` of logits (``T = 0`` rows use ``T = 1``: they are greedy)."""
    x = x.astype(jnp.float32)
    if not from_logits:
        return x
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    s = x / t
    m = jnp.max(s, axis=-1, keepdims=True)
    return jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))


def _keep_mask(spec: SamplerSpec, w: jax.Array, params: RowParams) -> jax.Array:
    """``[R, V]`` bool: the tokens the spec's filters keep."""
    keep = jnp.ones(w.shape, bool)
    if spec.top_k:
        keep = w >= _top_k_threshold(w, params.top_k)[:, None]
    if spec.top_p:
        base = jnp.where(keep, w, 0.0) if spec.top_k and not spec.joint else w
        keep = keep & (w >= _top_p_threshold(base, params.top_p)[:, None])
    if spec.min_p:
        keep = keep & (w >= (params.min_p * jnp.max(w, axis=-1))[:, None])
    return keep


def _first_above(cum: jax.Array, rows: jax.Array, target: jax.Array) -> jax.Array:
    """Per output ``b``: the first ``i`` with ``cum[rows[b], i] > target[b]`` (``V`` if none), by
    binary search (``O(B log V)``: ``cum[rows]`` is never materialized)."""
    vocab = cum.shape[-1]
    lo = jnp.zeros(rows.shape, jnp.int32)
    hi = jnp.full(rows.shape, vocab, jnp.int32)

    def step(_, state):
        lo, hi = state
        open_ = lo < hi
        mid = jnp.minimum((lo + hi) // 2, vocab - 1)
        right = cum[rows, mid] <= target
        return jnp.where(open_ & right, mid + 1, lo), jnp.where(open_ & ~right, mid, hi)

    lo, _ = lax.fori_loop(0, int(vocab).bit_length(), step, (lo, hi))
    return lo


def _xla_sample(spec: SamplerSpec, x, rows, keys, params: RowParams):
    """Inverse-CDF sampling from the exactly filtered rows (the reference)."""
    w = _weights(x, params.temperature, spec.from_logits)
    kept = jnp.where(_keep_mask(spec, w, params), w, 0.0)
    cum = jnp.cumsum(kept, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    tok = _first_above(cum, rows, u * cum[rows, -1])
    # u * Z can round up to Z: fall back to the row's last kept token.
    vocab = x.shape[-1]
    last = vocab - 1 - jnp.argmax((kept > 0)[:, ::-1], axis=-1).astype(jnp.int32)
    return jnp.where(tok >= vocab, last[rows], tok)


@functools.partial(jax.jit, static_argnames=("spec", "backend"))
def _sample(x, rows, keys, params: RowParams, *, spec: SamplerSpec, backend: str):
    if backend == "pallas":
        from jaxinfer.backends.pallas import sampling as pallas_sampling

        tok = pallas_sampling.sample(x, rows, _key_words(keys), params, spec=spec)
    else:
        tok = _xla_sample(spec, x, jnp.arange(x.shape[0], dtype=jnp.int32) if rows is None else rows, keys, params)
    if spec.from_logits:
        of_output = (lambda a: a) if rows is None else (lambda a: a[rows])  # each output's row of a [R] array
        greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
        tok = jnp.where(of_output(params.temperature) == 0, of_output(greedy), tok)
    return tok


def _key_words(keys):
    """``[B, 2]`` uint32 words seeding the kernel's Threefry streams, one pair per row key: a
    Threefry-2x32 key's own words (no computation), else two words drawn from the key."""
    if str(jax.random.key_impl(keys)) == "threefry2x32":
        return jax.random.key_data(keys)
    return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)


def _run_sampler(spec: SamplerSpec, x, name: str, indices, key, seed, offset, check_nan, backend, **params):
    """Check the arguments of a public sampler and run it."""
    x = _check_rows(x, name)
    _check_nan(x, name, check_nan)
    rows_in = x.shape[0]
    idx = _check_indices(indices, rows_in)
    # Without indices output b draws from row b: no row array (one XLA op fewer a call).
    rows = None if idx is None else jnp.clip(idx, 0, max(rows_in - 1, 0)).astype(jnp.int32)
    batch = rows_in if rows is None else rows.shape[0]
    keys = row_keys(batch, key, seed, offset)
    p = _params(rows_in, **params)
    backend = _resolve_backend(backend)
    if batch == 0:
        return jnp.zeros((0,), jnp.int32 if idx is None else idx.dtype)
    tok = _sample(x, rows, keys, p, spec=spec, backend=backend)
    return tok if idx is None else tok.astype(idx.dtype)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def softmax(logits: Float[Array, "B V"], temperature=None, enable_pdl=None) -> Float[Array, "B V"]:
    """Softmax with temperature (online safe softmax, Milakov & Gimelshein 2018, arXiv 1805.02867).

    Args:
      logits: ``[B, V]`` float32, bfloat16 or float16.
      temperature: ``None`` (1), a scalar or ``[B]``; the rows are ``softmax(logits / T)``.
        ``T = 0`` gives the limit: uniform over the row's largest logits.
      enable_pdl: accepted for FlashInfer compatibility (a CUDA launch option); no effect.

    Returns:
      ``[B, V]`` float32 probabilities.

    Raises:
      ValueError: ``logits`` not 2-D floating; ``temperature`` of the wrong shape, negative or NaN.
    """
    del enable_pdl
    logits = _check_rows(logits, "logits")
    t = _row_param(1.0 if temperature is None else temperature, "temperature", logits.shape[0], lo=0.0)
    return _softmax(logits, t)


@jax.jit
def _softmax(logits, t):
    x = logits.astype(jnp.float32)
    greedy = (x == jnp.max(x, axis=-1, keepdims=True)).astype(jnp.float32)
    greedy = greedy / jnp.sum(greedy, axis=-1, keepdims=True)
    scaled = jax.nn.softmax(x / jnp.where(t > 0, t, 1.0)[:, None], axis=-1)
    return jnp.where((t == 0)[:, None], greedy, scaled)


def sampling_from_probs(probs: Float[Array, "R V"], indices: Int[Array, " B"] | None = None, deterministic: bool = True,
                        key=None, check_nan: bool = False, seed=None, offset=None, *, backend: str = "auto") -> Int[Array, " B"]:
    """Sample one token per output row in proportion to ``probs`` (FlashInfer's category sampling).

    Args:
      probs: ``[R, V]`` nonnegative rows (normalized or not; float32, bfloat16 or float16). With a
        top-k or top-p filter, the pallas kernel's first draw reads a row only up to the drawn
        entry when the row sums to at most ``1 + 2**-6`` (normalized rows, as FlashInfer expects);
        a row summing to more costs it one more pass over the row, with the same result.
      indices: optional ``[B]`` integers, output ``b`` samples row ``indices[b]`` (default: ``B = R``,
        output ``b`` samples row ``b``).
      deterministic: accepted for FlashInfer compatibility; every backend here is deterministic.
      key: a ``jax.random`` key, one per output row or one for all (FlashInfer's ``generator``).
      check_nan: raise when ``probs`` holds NaN (concrete inputs only).
      seed, offset: per-row random streams instead of ``key`` (FlashInfer 0.6).
      backend: ``"auto"``, ``"xla"`` or ``"pallas"``.

    Returns:
      ``[B]`` token ids, int32 (``indices``' dtype when given).

    Raises:
      ValueError: naming the argument (shapes, dtypes, ranges, a missing key, NaN with check_nan).
    """
    del deterministic
    return _run_sampler(SamplerSpec(), probs, "probs", indices, key, seed, offset, check_nan, backend)


def sampling_from_logits(logits: Float[Array, "R V"], indices: Int[Array, " B"] | None = None, deterministic: bool = True,
                         key=None, check_nan: bool = False, seed=None, offset=None, *, temperature=None,
                         backend: str = "auto") -> Int[Array, " B"]:
    """Sample from ``softmax(logits / temperature)`` (FlashInfer's ``sampling_from_logits``).

    Args:
      logits: ``[R, V]`` float32, bfloat16 or float16.
      temperature: ``None`` (1), a scalar or ``[R]`` (a jaxinfer extension); 0 is greedy (first argmax).
      other arguments: as :func:`sampling_from_probs`.

    Returns:
      ``[B]`` token ids, int32 (``indices``' dtype when given).

    Raises:
      ValueError: naming the argument.
    """
    del deterministic
    return _run_sampler(SamplerSpec(from_logits=True), logits, "logits", indices, key, seed, offset, check_nan, backend,
                        temperature=temperature)


def top_p_sampling_from_probs(probs: Float[Array, "R V"], top_p, indices: Int[Array, " B"] | None = None,
                              deterministic: bool = True, key=None, check_nan: bool = False, seed=None, offset=None, *,
                              backend: str = "auto") -> Int[Array, " B"]:
    """Top-p (nucleus) sampling (Holtzman et al. 2020, arXiv 1904.09751; FlashInfer's sorting-free
    rejection sampling on the ``"pallas"`` backend).

    Args:
      probs: ``[R, V]``.
      top_p: scalar or ``[R]`` in [0, 1]: keep ``{i : sum_{p_j > p_i} p_j < top_p * sum(p)}``
        (module docstring); 0 is greedy, 1 keeps everything.
      other arguments: as :func:`sampling_from_probs`.

    Returns:
      ``[B]`` token ids.

    Raises:
      ValueError: naming the argument.
    """
    del deterministic
    return _run_sampler(SamplerSpec(top_p=True), probs, "probs", indices, key, seed, offset, check_nan, backend, top_p=top_p)


def top_k_sampling_from_probs(probs: Float[Array, "R V"], top_k, indices: Int[Array, " B"] | None = None,
                              deterministic: bool = True, key=None, check_nan: bool = False, seed=None, offset=None, *,
                              backend: str = "auto") -> Int[Array, " B"]:
    """Top-k sampling (Fan et al. 2018, arXiv 1805.04833).

    Args:
      probs: ``[R, V]``.
      top_k: integer scalar or ``[R]``: keep the tokens at least as probable as the k-th largest
        (ties kept); ``<= 0`` or ``>= V`` keeps everything.
      other arguments: as :func:`sampling_from_probs`.

    Returns:
      ``[B]`` token ids.

    Raises:
      ValueError: naming the argument.
    """
    del deterministic
    return _run_sampler(SamplerSpec(top_k=True), probs, "probs", indices, key, seed, offset, check_nan, backend, top_k=top_k)


def min_p_sampling_from_probs(probs: Float[Array, "R V"], min_p, indices: Int[Array, " B"] | None = None,
                              deterministic: bool = True, key=None, check_nan: bool = False, seed=None, offset=None, *,
                              backend: str = "auto") -> Int[Array, " B"]:
    """Min-p sampling (Nguyen et al. 2024, arXiv 2407.01082).

    Args:
      probs: ``[R, V]``.
      min_p: scalar or ``[R]`` in [0, 1]: keep ``{i : p_i >= min_p * max(p)}``.
      other arguments: as :func:`sampling_from_probs`.

    Returns:
      ``[B]`` token ids.

    Raises:
      ValueError: naming the argument.
    """
    del deterministic
    return _run_sampler(SamplerSpec(min_p=True), probs, "probs", indices, key, seed, offset, check_nan, backend, min_p=min_p)


def top_k_top_p_sampling_from_probs(probs: Float[Array, "R V"], top_k, top_p, indices: Int[Array, " B"] | None = None,
                                    filter_apply_order: str = "top_k_first", deterministic: bool = True, key=None,
                                    check_nan: bool = False, seed=None, offset=None, *,
                                    backend: str = "auto") -> Int[Array, " B"]:
    """Top-k and top-p sampling.

    Args:
      probs: ``[R, V]``.
      top_k, top_p: as :func:`top_k_sampling_from_probs` and :func:`top_p_sampling_from_probs`.
      filter_apply_order: ``"top_k_first"`` (top-p on the renormalized top-k distribution,
        FlashInfer's default) or ``"joint"`` (both filters on ``probs``).
      other arguments: as :func:`sampling_from_probs`.

    Returns:
      ``[B]`` token ids.

    Raises:
      ValueError: naming the argument.
    """
    del deterministic
    _check_choice(filter_apply_order, "filter_apply_order", FILTER_APPLY_ORDERS)
    spec = SamplerSpec(top_k=True, top_p=True, joint=filter_apply_order == "joint")
    return _run_sampler(spec, probs, "probs", indices, key, seed, offset, check_nan, backend, top_k=top_k, top_p=top_p)


def top_k_top_p_sampling_from_logits(logits: Float[Array, "R V"], top_k, top_p, indices: Int[Array, " B"] | None = None,
                                     filter_apply_order: str = "top_k_first", deterministic: bool = True, key=None,
                                     check_nan: bool = False, seed=None, offset=None, *, temperature=None,
                                     backend: str = "auto") -> Int[Array, " B"]:
    """Top-k and top-p sampling from ``softmax(logits / temperature)``: the serving engine's sampler.

    ``"top_k_first"`` equals FlashInfer's ``top_k_mask_logits`` + softmax + top-p sampling;
    ``"joint"`` equals softmax + :func:`top_k_top_p_sampling_from_probs` (``"joint"``).

    Args:
      logits: ``[R, V]`` float32, bfloat16 or float16.
      top_k, top_p, filter_apply_order: as :func:`top_k_top_p_sampling_from_probs`.
      temperature: ``None`` (1), a scalar or ``[R]`` (a jaxinfer extension); 0 is greedy (first
        argmax, whatever the filters).
      other arguments: as :func:`sampling_from_probs`.

    Returns:
      ``[B]`` token ids.

    Raises:
      ValueError: naming the argument.
    """
    del deterministic
    _check_choice(filter_apply_order, "filter_apply_order", FILTER_APPLY_ORDERS)
    spec = SamplerSpec(from_logits=True, top_k=True, top_p=True, joint=filter_apply_order == "joint")
    return _run_sampler(spec, logits, "logits", indices, key, seed, offset, check_nan, backend, top_k=top_k, top_p=top_p,
                        temperature=temperature)


@functools.partial(jax.jit, static_argnames=("criterion", "logits", "backend"))
def _threshold(x, param, *, criterion: str, logits: bool, backend: str):
    """``[R]`` float32: the filter keeps ``x >= threshold`` (``-inf``: everything)."""
    if backend == "pallas":
        from jaxinfer.backends.pallas import sampling as pallas_sampling

        return pallas_sampling.threshold(x, param, criterion=criterion, logits=logits)
    x = x.astype(jnp.float32)
    return _top_k_threshold(x, param) if criterion == "top_k" else _top_p_threshold(x, param)


def top_k_renorm_probs(probs: Float[Array, "R V"], top_k, *, backend: str = "auto") -> Float[Array, "R V"]:
    """Keep the top-k probabilities of each row (ties at the k-th value kept), zero the rest and
    renormalize (FlashInfer's ``top_k_renorm_probs``).

    Args:
      probs: ``[R, V]`` nonnegative.
      top_k: integer scalar or ``[R]``; ``<= 0`` or ``>= V`` keeps everything.

    Returns:
      ``[R, V]`` in ``probs``' dtype, rows summing to 1 (computed in float32).

    Raises:
      ValueError: naming the argument.
    """
    probs = _check_rows(probs, "probs")
    k = _row_param(top_k, "top_k", probs.shape[0], integer=True)
    return _renorm(probs, _threshold(probs, k, criterion="top_k", logits=False, backend=_resolve_backend(backend)))


def top_p_renorm_probs(probs: Float[Array, "R V"], top_p, *, backend: str = "auto") -> Float[Array, "R V"]:
    """Keep each row's top-p nucleus (module docstring), zero the rest and renormalize
    (FlashInfer's ``top_p_renorm_probs``).

    Args:
      probs: ``[R, V]`` nonnegative.
      top_p: scalar or ``[R]`` in [0, 1]; 0 keeps the largest probabilities, 1 everything.

    Returns:
      ``[R, V]`` in ``probs``' dtype, rows summing to 1 (computed in float32).

    Raises:
      ValueError: naming the argument.
    """
    probs = _check_rows(probs, "probs")
    p = _row_param(top_p, "top_p", probs.shape[0], lo=0.0, hi=1.0)
    return _renorm(probs, _threshold(probs, p, criterion="top_p", logits=False, backend=_resolve_backend(backend)))


@jax.jit
def _renorm(probs, threshold):
    w = probs.astype(jnp.float32)
    kept = jnp.where(w >= threshold[:, None], w, 0.0)
    return (kept / jnp.sum(kept, axis=-1, keepdims=True)).astype(probs.dtype)


def top_k_mask_logits(logits: Float[Array, "R V"], top_k, *, backend: str = "auto") -> Float[Array, "R V"]:
    """Set every logit below the row's k-th largest to ``-inf`` (ties at the k-th value kept;
    FlashInfer's ``top_k_mask_logits``). Softmax of the result equals :func:`top_k_renorm_probs`
    of the softmax.

    Args:
      logits: ``[R, V]`` float32, bfloat16 or float16.
      top_k: integer scalar or ``[R]``; ``<= 0`` or ``>= V`` keeps everything.

    Returns:
      ``[R, V]`` in ``logits``' dtype.

    Raises:
      ValueError: naming the argument.
    """
    logits = _check_rows(logits, "logits")
    k = _row_param(top_k, "top_k", logits.shape[0], integer=True)
    t = _threshold(logits, k, criterion="top_k", logits=True, backend=_resolve_backend(backend))
    return _mask_below(logits, t)


@jax.jit
def _mask_below(logits, threshold):
    return jnp.where(logits.astype(jnp.float32) >= threshold[:, None], logits, jnp.asarray(-jnp.inf, logits.dtype))


def chain_speculative_sampling(draft_probs: Float[Array, "B n V"], draft_token_ids: Int[Array, "B n"],
                               target_probs: Float[Array, "B n+1 V"], maybe_output_accepted_token_num=None,
                               maybe_output_emitted_draft_token_num=None, deterministic: bool = True, key=None, seed=None,
                               offset=None, *, backend: str = "auto"):
    """Speculative sampling of a chain of draft tokens (Chen et al. 2023, arXiv 2302.01318;
    Leviathan et al. 2023, arXiv 2211.17192, Algorithm 1; FlashInfer's ``chain_speculative_sampling``).

    Draft token ``t_i`` (drawn by the draft model from ``q_i = draft_probs[:, i]``) is accepted when
    ``u_i * q_i(t_i) < p_i(t_i)`` (``p_i = target_probs[:, i]``, ``u_i`` uniform), i.e. with
    probability ``min(1, p_i(t_i) / q_i(t_i))``. At the first rejected position ``j`` a token is
    drawn from ``max(p_j - q_j, 0)`` (renormalized; from ``p_j`` if that is all zero); if all
    ``n`` are accepted a bonus token is drawn from ``p_n``. Every emitted token is then distributed
    as the target model's.

    Args:
      draft_probs: ``[B, n, V]``; draft_token_ids: ``[B, n]`` integers in ``[0, V)``;
      target_probs: ``[B, n + 1, V]``.
      maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: optional ``[B]``
        integer counts the new counts are added to (FlashInfer adds in place; here a new array is
        returned).
      deterministic: accepted for FlashInfer compatibility.
      key, seed, offset: randomness, one stream per request (module docstring).
      backend: ``"auto"``, ``"xla"`` or ``"pallas"`` (the resampling step).

    Returns:
      ``(output_token_ids [B, n + 1] int32`` -- accepted draft tokens, then the resampled or bonus
      token, then ``-1`` --, ``output_accepted_token_num [B]`` -- draft tokens that pass the test
      when each position is tested independently --, ``output_emitted_draft_token_num [B]`` --
      draft tokens emitted before the first rejection``)``.

    Raises:
      ValueError: naming the argument (shapes, dtypes, token ids out of range when concrete).
    """
    del deterministic
    draft_probs, target_probs = jnp.asarray(draft_probs), jnp.asarray(target_probs)
    if draft_probs.ndim != 3 or not jnp.issubdtype(draft_probs.dtype, jnp.floating):
        raise ValueError(f"draft_probs must be a floating [batch_size, num_speculate_tokens, vocab_size] array, got "
                         f"shape {draft_probs.shape} and dtype {draft_probs.dtype}")
    b, n, vocab = draft_probs.shape
    if target_probs.shape != (b, n + 1, vocab) or not jnp.issubdtype(target_probs.dtype, jnp.floating):
        raise ValueError(f"target_probs must be floating [{b}, {n + 1}, {vocab}] (one more position than draft_probs), "
                         f"got shape {target_probs.shape} and dtype {target_probs.dtype}")
    ids = jnp.asarray(draft_token_ids)
    if ids.shape != (b, n) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"draft_token_ids must be integers of shape [{b}, {n}], got shape {ids.shape} and dtype {ids.dtype}")
    if not _is_traced(draft_token_ids) and ids.size and (int(np.min(ids)) < 0 or int(np.max(ids)) >= vocab):
        raise ValueError(f"draft_token_ids must lie in [0, {vocab}), got {int(np.min(ids))}..{int(np.max(ids))}")
    counts = []
    for value, name in ((maybe_output_accepted_token_num, "maybe_output_accepted_token_num"),
                        (maybe_output_emitted_draft_token_num, "maybe_output_emitted_draft_token_num")):
        arr = jnp.zeros((b,), jnp.int32) if value is None else jnp.asarray(value)
        if arr.shape != (b,) or not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers of shape [{b}], got shape {arr.shape} and dtype {arr.dtype}")
        counts.append(arr)
    keys = row_keys(b, key, seed, offset)
    return _chain_speculative(draft_probs, ids.astype(jnp.int32), target_probs, counts[0], counts[1], keys,
                              backend=_resolve_backend(backend))


@functools.partial(jax.jit, static_argnames=("backend",))
def _chain_speculative(draft_probs, ids, target_probs, accepted0, emitted0, keys, *, backend: str):
    b, n, vocab = draft_probs.shape
    accept_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(accept_keys)
    q = jnp.take_along_axis(draft_probs, ids[:, :, None], axis=-1)[..., 0].astype(jnp.float32)
    p = jnp.take_along_axis(target_probs[:, :n], ids[:, :, None], axis=-1)[..., 0].astype(jnp.float32)
    accept = u * q < p
    # Position of the first rejection (n when every draft token is accepted).
    pos = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
    rows = jnp.arange(b)
    target = target_probs[rows, pos].astype(jnp.float32)
    draft = jnp.where((pos < n)[:, None], draft_probs[rows, jnp.minimum(pos, n - 1)].astype(jnp.float32), 0.0) if n else 0.0
    residual = jnp.maximum(target - draft, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, target)
    resample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    token = _sample(residual, rows.astype(jnp.int32), resample_keys, _params(b), spec=SamplerSpec(), backend=backend)
    col = jnp.arange(n + 1)[None, :]
    padded_ids = jnp.concatenate([ids, jnp.zeros((b, 1), jnp.int32)], axis=-1)
    out = jnp.where(col < pos[:, None], padded_ids, jnp.where(col == pos[:, None], token[:, None], -1))
    accepted = accepted0 + jnp.sum(accept, axis=-1).astype(accepted0.dtype)
    emitted = emitted0 + pos.astype(emitted0.dtype)
    return out.astype(jnp.int32), accepted, emitted
