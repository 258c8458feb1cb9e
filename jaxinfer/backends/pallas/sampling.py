"""Pallas sorting-free sampling kernels (Triton lowering on GPU, interpret mode elsewhere).

Two kernels, one program per row, each streaming its row of the vocabulary in ``block``-wide
steps (so any vocabulary, up to 256k and beyond, runs in registers):

* :func:`sample` -- rejection sampling for top-k / top-p / min-p, after FlashInfer's sorting-free
  kernels ("Sorting-Free GPU Kernels for LLM Sampling", flashinfer.ai/2025/03/10/sampling.html):
  draw a candidate in proportion to the weights above a lower bound ``low``; accept it when it
  passes the filter (``#{w > w_c} < top_k``, ``sum_{w > w_c} w < top_p * Z``, ``x_c >= floor``);
  else raise ``low`` and draw again. The accepted candidate is distributed as the exactly
  renormalized filtered row: every proposal restricted to the kept set ``T`` is proportional to
  the weights there, since ``T`` always lies above ``low``. FlashInfer's dual pivot bounds the
  rounds: each pass also tests the midpoint ``(w_c + high) / 2`` and bisects ``[low, high]``.

  Two changes make each round one pass over the row instead of FlashInfer's two: a candidate is
  drawn by weighted reservoir sampling over blocks (block ``j`` replaces the pick with probability
  ``s_j / (s_1 + ... + s_j)``, then one reload of the picked block finds the token by inverse CDF),
  which needs no normalizer in advance and yields the set's total on the way; and the pass that
  tests candidate ``c`` already draws the next candidate from ``{w > low}`` with the *old* ``low``
  (kept only if it lies above the new one -- a rejection step, so still exact). For probabilities
  the first candidate is drawn by inverse CDF against ``Z_BOUND`` (a bound on a normalized row's
  sum), so the first pass ends at the drawn entry's block, as FlashInfer's sampling pass does;
  rows that sum above the bound are caught by the first round, which sums the row, and drawn
  again. The first pass also
  finds the row's maximum (online softmax for logits: Milakov & Gimelshein 2018, arXiv
  1805.02867), its sum and, for min-p, the floor ``min_p * max``. Filters that have nothing to test
  (plain sampling) end after that pass. Counts and masses above the pivots accumulate per lane
  and are reduced once per pass; the reservoir's block sum is a pass's only per-block reduction.

* :func:`threshold` -- the exact threshold of a top-k (count) or top-p (mass) filter:
  ``t = min{x_i : g(x_i) < c}`` with ``g(t)`` the count (or mass) of entries above ``t``, so that
  the filter keeps ``x >= t`` with ties on one side (:func:`_search`: a bracket on the entries'
  order-preserving int32 keys, three interpolated pivots and the midpoint per pass, at most 32
  passes, about 3-4 in practice). The top-k-first sampler runs it to find its floor.

Randomness: each output row carries two uint32 words (its Threefry ``jax.random`` key's own data,
or two words drawn from a key of another implementation); pass ``r`` derives two words by
Threefry-2x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; the 20-round
function of ``jax.random``), one for the in-block uniform and one seeding the per-block reservoir
uniforms (a ``lowbias32`` integer hash of seed + block * golden ratio).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.backends.pallas.merge import interpret_mode
from jaxinfer.backends.vma import varying_like
from jaxinfer.plan.batch import next_pow2
from jaxinfer.sampling import RowParams, SamplerSpec

LOG2E = math.log2(math.e)
INT32_MAX = 2**31 - 1
Z_BOUND = 1.0 + 2.0**-6  # above a normalized row's sum with float32 or bf16 rounding (the early-exit draw)
SEARCH_PASSES = 40  # > 32: the midpoint pivot halves a bracket of int32 keys every pass
_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Launch geometry of the sampling kernels.

    Attributes:
      block: vocabulary entries per step, a power of 2 (Triton's tensors must be).
      num_warps: warps per program (one program per row).
      max_rounds: cap on rejection rounds; a row that reaches it returns its largest entry (always
        in the kept set). The dual pivot halves the bracket each round, so it is never reached by
        float32 weights in practice.
    """

    # The fastest block over the benchmark's batches on an H100 (benchmarks/decisions/pallas.md).
    block: int = 4096
    num_warps: int = 8
    max_rounds: int = 64

    def __post_init__(self):
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of 2 >= 16, got {self.block}")

    def for_vocab(self, vocab: int) -> SamplingConfig:
        """Blocks no wider than the vocabulary needs (small vocabularies, tests)."""
        return dataclasses.replace(self, block=min(self.block, max(16, next_pow2(vocab))))


DEFAULT_CONFIG = SamplingConfig()


# --------------------------------------------------------------------------------------------
# Scalar helpers traced into the kernels (plain jnp: they also run outside, for tests)
# --------------------------------------------------------------------------------------------


def _u32(x):
    return jnp.asarray(x, jnp.uint32)


def _rotl(x, r: int):
    return lax.shift_left(x, _u32(r)) | lax.shift_right_logical(x, _u32(32 - r))


def threefry2x32(k0, k1, c0, c1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011; the function behind ``jax.random``):
    key ``(k0, k1)``, counter ``(c0, c1)``, all uint32; returns two uint32 words."""
    k0, k1, c0, c1 = _u32(k0), _u32(k1), _u32(c0), _u32(c1)
    ks = (k0, k1, k0 ^ k1 ^ _u32(0x1BD11BDA))
    x0, x1 = c0 + ks[0], c1 + ks[1]
    for i in range(5):
        for r in _ROT[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + _u32(i + 1)
    return x0, x1


def _hash32(x):
    """``lowbias32`` (C. Wellons): a full-avalanche uint32 -> uint32 mix."""
    x = x ^ lax.shift_right_logical(x, _u32(16))
    x = x * _u32(0x7FEB352D)
    x = x ^ lax.shift_right_logical(x, _u32(15))
    x = x * _u32(0x846CA68B)
    return x ^ lax.shift_right_logical(x, _u32(16))


def _uniform(bits):
    """uint32 -> float32 uniform in [0, 1) (24 bits)."""
    return lax.shift_right_logical(bits, _u32(8)).astype(jnp.int32).astype(jnp.float32) * (1.0 / (1 << 24))


def float_key(x):
    """Order-preserving int32 key of float32 ``x`` (``-0.0`` maps with ``+0.0``)."""
    bits = lax.bitcast_convert_type(x + 0.0, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ jnp.int32(INT32_MAX))


def key_float(k):
    """Inverse of :func:`float_key`."""
    return lax.bitcast_convert_type(jnp.where(k >= 0, k, k ^ jnp.int32(INT32_MAX)), jnp.float32)


def _midpoint(lo, hi):
    """``floor((lo + hi) / 2)`` of int32 without overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


# --------------------------------------------------------------------------------------------
# Row access
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Row:
    """Blocks of one row of the flat ``[R * V]`` input ref."""

    ref: object
    base: jax.Array  # row * vocab
    vocab: int
    block: int
    fill: float  # the value of entries past the row's end

    @property
    def num_blocks(self) -> int:
        return pl.cdiv(self.vocab, self.block)

    def _cols(self, j):
        col = j * self.block + lax.iota(jnp.int32, self.block)
        return col, col < self.vocab

    def _fetch(self, j):
        col, ok = self._cols(j)
        # Unclamped contiguous offsets (masked past the row's end) let Triton vectorize the load.
        return pltriton.load(self.ref.at[self.base + col], mask=ok, other=self.fill)

    def _view(self, j, raw):
        col, ok = self._cols(j)
        return col, ok, jnp.where(ok, raw.astype(jnp.float32), self.fill)

    def load(self, j):
        """``(col, ok, x)`` of block ``j``: columns, in-row mask, entries as float32 (``fill`` past
        the row's end)."""
        return self._view(j, self._fetch(j))

    def fold(self, body, init, num_blocks=None):
        """``fori_loop`` of ``acc = body(j, (col, ok, x), acc)`` over blocks ``j < num_blocks``
        (default: all).

        Block ``j + 1``'s load is issued before block ``j``'s body (the loop carries the raw
        block, in the input's dtype), so a program keeps two blocks in flight: it streams its row
        alone, and with one block in flight every step waits a full memory latency (a small batch
        runs one program per SM)."""
        n = self.num_blocks if num_blocks is None else num_blocks
        return lax.fori_loop(0, n, lambda j, carry: self._prefetched(body, j, *carry), (self._fetch(0), init))[1]

    def fold_while(self, body, init, stop):
        """:meth:`fold` over all blocks that ends after the first block whose result satisfies
        ``stop(acc)``."""

        def step(c):
            return c[0] + 1, *self._prefetched(body, *c)

        def more(c):
            return (c[0] < self.num_blocks) & ~stop(c[2])

        return lax.while_loop(more, step, (jnp.int32(0), self._fetch(0), init))[2]

    def _prefetched(self, body, j, raw, acc):
        """``(block j + 1 raw, body's result on block j)``; the last block reloads itself."""
        ahead = self._fetch(jnp.minimum(j + 1, self.num_blocks - 1))
        return ahead, body(j, self._view(j, raw), acc)


def _row(ref, r, vocab: int, cfg: SamplingConfig, fill: float) -> _Row:
    """Row ``r`` of a flat ``[R * V]`` ref; the alignment hint lets Triton emit wide loads."""
    align = math.gcd(vocab, 16)
    base = r * vocab
    return _Row(ref, pl.multiple_of(base, align) if align > 1 else base, vocab, cfg.block, fill)


def _pick_in_block(w, u):
    """Index of the first entry of ``w`` (one block, >= 0) whose inclusive prefix sum exceeds
    ``u * sum(w)``; the last positive entry when rounding leaves none."""
    cum = jnp.cumsum(w)
    n = w.shape[0]
    idx = jnp.sum((cum <= u * jnp.max(cum)).astype(jnp.int32))
    last = jnp.max(jnp.where(w > 0, lax.iota(jnp.int32, n), 0))
    return jnp.minimum(idx, last)


# --------------------------------------------------------------------------------------------
# Exact threshold search (shared by both kernels)
# --------------------------------------------------------------------------------------------


def _search(row: _Row, measure, lo, g_lo, hi, g_hi, c, active, *, linear: bool):
    """``t = min{x_i : g(x_i) < c}`` with ``g(t)`` the measure of the entries above ``t``.

    The bracket ``(lo, hi]`` holds ``t`` (``g(lo) >= c > g(hi)``); it lives on int32 keys
    (:func:`float_key`) so that its midpoint halves it on every pass, and entries are compared as
    floats with the pivots' floats. Three pivots bracket the crossing estimated by interpolating
    ``log g`` (in value when ``linear``; in key, i.e. about log-scale, otherwise). Each pass also
    finds the smallest entry above ``lo`` and the largest at or below ``hi``; the search ends when
    one of them is ``t`` (``g`` crosses ``c`` at it), else ``lo`` moves up to the former. Measured
    on bf16 N(0, s^2) logits and their softmax (V 32k-152k): about 3 passes for top-k of logits,
    4 for top-k of probabilities (key space) and for top-p masses (value space).

    Args:
      row: the row whose blocks are searched.
      measure: ``(ok, x) -> float32`` measure of a block's entries (0 where not ok).
      lo, g_lo: an int32 key with ``g(lo) >= c`` and an estimate of its ``g`` (each pass counts
        it; the estimate only places the first pass's pivots); hi, g_hi: a key with
        ``g(hi) < c`` and its ``g``.
      c: the bound (> 0).
      active: bool; when false no pass runs (the result is then meaningless).
      linear: interpolate in value rather than in key.

    Returns:
      ``t`` (float32, an entry).
    """
    bottom_key = float_key(jnp.float32(-jnp.inf))

    def one_pass(state):
        lo, g_lo, hi, g_hi, _, _, it = state
        off = 0.01 * c
        frac = jnp.clip(jnp.log((g_lo + off) / (c + off)) / jnp.maximum(jnp.log((g_lo + off) / (g_hi + off)), 1e-30), 0.0, 1.0)
        mid = _midpoint(lo, hi)
        if linear:
            lo_v, hi_v = key_float(jnp.maximum(lo, bottom_key)), key_float(hi)
            est, spread = lo_v + frac * (hi_v - lo_v), (hi_v - lo_v) * 0.125
            guesses = tuple(jnp.where(jnp.isfinite(v), float_key(v), mid) for v in (est - spread, est, est + spread))
        else:
            lo_f, hi_f = lo.astype(jnp.float32), hi.astype(jnp.float32)
            est, spread = lo_f + frac * (hi_f - lo_f), (hi_f - lo_f) * 0.125
            guesses = tuple(jnp.clip(v, lo_f, hi_f).astype(jnp.int32) for v in (est - spread, est, est + spread))
        # (hi - lo can wrap in int32; the float difference decides)
        inner = (hi - lo >= 2) | (hi.astype(jnp.float32) - lo.astype(jnp.float32) >= 4.0)
        pivots = tuple(jnp.where(inner, jnp.clip(k, lo + 1, hi - 1), lo) for k in (*guesses, mid))
        pivot_x = tuple(key_float(k) for k in pivots)
        lo_x, bottom, hi_x = key_float(lo), lo < bottom_key, key_float(hi)  # (bottom: below every entry, -inf too)

        def body(j, blk, acc):
            gs, g_l, m_l, e_l, mh_l, eh_l = acc
            _, ok, x = blk
            meas = measure(ok, x)
            gs = tuple(g + jnp.where(x > p, meas, 0.0) for g, p in zip(gs, pivot_x))
            # Per lane: the measure above lo, the smallest entry above lo, the largest at or below
            # hi, and the measure of their copies.
            gt = ok & ((x > lo_x) | bottom)
            g_l = g_l + jnp.where(gt, meas, 0.0)
            new_min, same = gt & (x < m_l), gt & (x == m_l)
            e_l = jnp.where(new_min, meas, jnp.where(same, e_l + meas, e_l))
            le = ok & (x <= hi_x)
            new_max, same_h = le & (x > mh_l), le & (x == mh_l)
            eh_l = jnp.where(new_max, meas, jnp.where(same_h, eh_l + meas, eh_l))
            return gs, g_l, jnp.where(new_min, x, m_l), e_l, jnp.where(new_max, x, mh_l), eh_l

        zero = jnp.zeros((row.block,), jnp.float32)
        gs, g_l, m_l, e_l, mh_l, eh_l = row.fold(body, ((zero,) * len(pivots), zero, zero + jnp.inf, zero, zero - jnp.inf, zero))
        gs = tuple(jnp.sum(g) for g in gs)
        m, mh = jnp.min(m_l), jnp.max(mh_l)
        g_m = jnp.sum(g_l) - jnp.sum(jnp.where(m_l == m, e_l, 0.0))
        g_below_mh = g_hi + jnp.sum(jnp.where(mh_l == mh, eh_l, 0.0))
        found_lo, found_hi = g_m < c, g_below_mh >= c
        found, t = found_lo | found_hi, jnp.where(found_lo, m, mh)
        new_lo, new_g_lo, new_hi, new_g_hi = float_key(m), g_m, hi, g_hi
        for p, g in zip(pivots, gs):
            above = (g >= c) & (p > new_lo)
            new_lo, new_g_lo = jnp.where(above, p, new_lo), jnp.where(above, g, new_g_lo)
            below = (g < c) & (p < new_hi) & (p > lo)
            new_hi, new_g_hi = jnp.where(below, p, new_hi), jnp.where(below, g, new_g_hi)
        return new_lo, new_g_lo, new_hi, new_g_hi, found, t, it + 1

    def cond(state):
        return ~state[4] & (state[6] < SEARCH_PASSES)

    init = (lo, g_lo, hi, g_hi, ~active, key_float(hi), jnp.int32(0))
    return lax.while_loop(cond, one_pass, init)[5]


def _top_k_floor(lanes, k, lo):
    """A key below the row's ``k``-th largest entry, from ``lanes`` (``[block]``, each lane's
    largest entry over the row's blocks; ``k`` float32): the ``k``-th largest lane maximum is an
    entry with at least ``k`` entries at or above it, and when the row's top ``k`` sit in distinct
    lanes (the usual case for ``k`` far below the lanes) it is the ``k``-th largest entry itself,
    which the search's first pass then finds. ``lo`` (another such key) when there are fewer
    lanes than ``k``. Bisection on the lanes' int32 keys, in registers (no pass over the row)."""
    keys = float_key(lanes)

    def step(_, bracket):
        a, b = bracket  # count(keys >= a) >= k; the answer is in [a, b]
        mid = _midpoint(jnp.minimum(a + 1, b), b)
        enough = jnp.sum(jnp.where(keys >= mid, 1.0, 0.0)) >= k
        return jnp.where(enough, mid, a), jnp.where(enough, b, mid - 1)

    kth = lax.fori_loop(0, 32, step, (jnp.min(keys), jnp.max(keys)))[0]
    return jnp.where(k <= lanes.shape[0], jnp.maximum(lo, kth - 1), lo)


# --------------------------------------------------------------------------------------------
# Threshold kernel
# --------------------------------------------------------------------------------------------


def _threshold_kernel(x_ref, param_ref, out_ref, *, vocab: int, cfg: SamplingConfig, criterion: str, logits: bool):
    r = pl.program_id(0)
    fill = -jnp.inf if logits else 0.0
    row = _row(x_ref, r, vocab, cfg, fill)
    block = cfg.block

    def measure(ok, x):
        return jnp.where(ok, 1.0, 0.0) if criterion == "top_k" else jnp.where(ok, x, 0.0)

    def stats(j, blk, acc):
        xmin, xmax, total = acc
        _, ok, x = blk
        return jnp.minimum(xmin, jnp.where(ok, x, jnp.inf)), jnp.maximum(xmax, x), total + measure(ok, x)

    init = (jnp.full((block,), jnp.inf, jnp.float32), jnp.full((block,), fill, jnp.float32), jnp.zeros((block,), jnp.float32))
    xmin, xmax, total = row.fold(stats, init)
    total = jnp.sum(total)
    param = param_ref[r]
    lo = float_key(jnp.min(xmin)) - 1  # below every entry
    if criterion == "top_k":
        off = (param <= 0) | (param >= vocab)
        c = param.astype(jnp.float32)
        lo, g_lo = _top_k_floor(xmax, c, lo), c
    else:
        off = param >= 1.0
        c = jnp.maximum(param * total, jnp.float32(1e-30))
        g_lo = total
    # Counts of probabilities interpolate best in log scale (keys); logits and masses linearly.
    t = _search(row, measure, lo, g_lo, float_key(jnp.max(xmax)), jnp.float32(0.0), c, ~off,
                linear=logits or criterion == "top_p")
    out_ref[r] = jnp.where(off, -jnp.inf, t)


def threshold(x, param, *, criterion: str, logits: bool, config: SamplingConfig = DEFAULT_CONFIG):
    """Exact threshold of a top-k or top-p filter per row (Pallas).

    Args:
      x: ``[R, V]`` logits (``logits=True``) or nonnegative probabilities (any float dtype;
        compared in float32).
      param: ``[R]`` int32 ``top_k`` (``criterion="top_k"``; ``<= 0`` or ``>= V`` is off) or
        float32 ``top_p`` in [0, 1] (``"top_p"``; mass relative to the row's sum; 1 is off).

    Returns:
      ``[R]`` float32 ``t``: the filter keeps ``x >= t`` (``-inf`` when off).
    """
    rows, vocab = x.shape
    cfg = config.for_vocab(vocab)
    kernel = functools.partial(_threshold_kernel, vocab=vocab, cfg=cfg, criterion=criterion, logits=logits)
    return pl.pallas_call(
        kernel,
        out_shape=varying_like(jax.ShapeDtypeStruct((rows,), jnp.float32), x, param),
        grid=(rows,),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret_mode(),
    )(x.reshape(-1), param)


# --------------------------------------------------------------------------------------------
# Sampling kernel
# --------------------------------------------------------------------------------------------


def _sample_kernel(*refs, spec: SamplerSpec, vocab: int, cfg: SamplingConfig, has_rows: bool):
    rows_ref, (x_ref, top_k_ref, top_p_ref, min_p_ref, temp_ref, key_ref, out_ref) = (refs[0], refs[1:]) if has_rows else (None, refs)
    b = pl.program_id(0)
    r = rows_ref[b] if has_rows else b
    fill = -jnp.inf if spec.from_logits else 0.0
    row = _row(x_ref, r, vocab, cfg, fill)
    k0, k1 = key_ref[2 * b], key_ref[2 * b + 1]
    scale = LOG2E / jnp.where(temp_ref[r] > 0, temp_ref[r], 1.0) if spec.from_logits else None
    top_k = top_k_ref[r]
    top_k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    top_p = top_p_ref[r]
    counts = spec.top_k or spec.top_p  # filters whose test needs the mass/count above a pivot
    search = spec.top_k and spec.top_p and not spec.joint  # top-k first: the top-k threshold is a floor

    def weights(x, m):
        """Unnormalized probabilities; lanes past the row's end hold ``fill`` and weigh 0."""
        return jnp.exp2((x - m) * scale) if spec.from_logits else jnp.maximum(x, 0.0)

    def block_uniform(seed, j):
        return _uniform(_hash32(seed + _u32(j) * _u32(0x9E3779B9)))

    def pick(blk, u, m, low, floor):
        """``(token, w, x)`` of the inverse-CDF pick inside block ``blk`` of ``{w > low, x >= floor}``
        (token ``V - 1`` when no block was picked: a row with no mass)."""
        col, _, x = row.load(jnp.maximum(blk, 0))
        w = weights(x, m)
        w = jnp.where((w > low) & (x >= floor), w, 0.0)
        sel = lax.iota(jnp.int32, cfg.block) == _pick_in_block(w, u)
        return (jnp.where(blk >= 0, jnp.sum(jnp.where(sel, col, 0)), vocab - 1),
                jnp.where(blk >= 0, jnp.sum(jnp.where(sel, w, 0.0)), -1.0), jnp.sum(jnp.where(sel, x, 0.0)))

    has_floor = spec.min_p or search  # else floor is -inf: no test per entry

    def in_set(w, x, low, floor):
        return (w > low) & (x >= floor) if has_floor else w > low

    def draw(pass_idx, m, low, floor, pivots):
        """One pass: a candidate from ``{w > low, x >= floor}`` (reservoir over blocks, then a pick),
        that set's total mass, and the count (top-k) and mass (top-p) of entries above each pivot."""
        seed, u_in = threefry2x32(k0, k1, pass_idx, 0)

        def body(j, blk, acc):
            tot, sel, aggs = acc
            _, _, x = blk
            w = weights(x, m)
            s = jnp.sum(jnp.where(in_set(w, x, low, floor), w, 0.0))  # the pass's one reduction per block
            tot = tot + s
            sel = jnp.where(block_uniform(seed, j) * tot < s, j, sel)
            # Per-lane sums, reduced once after the pass.
            aggs = tuple((c + (w > p).astype(jnp.float32) if spec.top_k else c, g + jnp.where(w > p, w, 0.0) if spec.top_p else g)
                         for (c, g), p in zip(aggs, pivots))
            return tot, sel, aggs

        zero = jnp.zeros((cfg.block,), jnp.float32)
        tot, sel, aggs = row.fold(body, (jnp.float32(0.0), jnp.int32(-1), ((zero, zero),) * len(pivots)))
        aggs = tuple((jnp.sum(c), jnp.sum(g)) for c, g in aggs)
        return tot, pick(sel, _uniform(u_in), m, low, floor), aggs

    # Pass 0: maximum (online rescaling for logits), sum, a first candidate and, for the search,
    # the range of the entries.
    seed0, in0 = threefry2x32(k0, k1, 0, 0)

    def first(j, blk, acc):
        m, z, sel, xmin, xmax = acc
        _, ok, x = blk
        if spec.from_logits:
            m_new = jnp.maximum(m, jnp.max(x))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            z = z * jnp.where(m == m_new, 1.0, jnp.exp2((m - m_safe) * scale))
            w = weights(x, m_safe)
        else:
            w = weights(x, 0.0)
            m_new = jnp.maximum(m, w)  # per lane
        s = jnp.sum(w)
        z = z + s
        sel = jnp.where(block_uniform(seed0, j) * z < s, j, sel)
        if search:
            xmin, xmax = jnp.minimum(xmin, jnp.where(ok, x, jnp.inf)), jnp.maximum(xmax, x)
        return m_new, z, sel, xmin, xmax

    m0 = jnp.float32(-jnp.inf) if spec.from_logits else jnp.zeros((cfg.block,), jnp.float32)
    lanes = (jnp.full((cfg.block,), jnp.inf, jnp.float32), jnp.full((cfg.block,), fill, jnp.float32))
    early = counts and not (spec.from_logits or search)
    z_bound = jnp.float32(jnp.inf)  # the largest row sum for which the current candidate is exact
    if early:
        # Inverse CDF at u * Z_BOUND, ending at the block where the running sum crosses it. When
        # the row's sum z <= Z_BOUND, token i is drawn with probability p_i / Z_BOUND and none
        # with 1 - z / Z_BOUND; the pass has then read the whole row and draws by its reservoir
        # instead: p_i / z overall, exact. The first round's pass sums the row and discards the
        # candidate when z > Z_BOUND (round_), so rows of any scale stay exact.
        target = _uniform(in0) * Z_BOUND

        def first_early(j, blk, acc):
            w_lane, z, sel, _, _ = acc
            w = weights(blk[2], 0.0)
            s = jnp.sum(w)
            sel = jnp.where(block_uniform(seed0, j) * (z + s) < s, j, sel)
            return jnp.maximum(w_lane, w), z + s, sel, j, z

        init = (m0, jnp.float32(0.0), jnp.int32(-1), jnp.int32(0), jnp.float32(0.0))
        w_lane, z, sel, last, before = row.fold_while(first_early, init, lambda acc: acc[1] > target)
        crossed = z > target
        m, w_max = jnp.float32(0.0), jnp.where(crossed, Z_BOUND, jnp.max(w_lane))
        u = jnp.where(crossed, (target - before) / jnp.maximum(z - before, 1e-30), _uniform(_hash32(in0)))
        tok, cw, cx = pick(jnp.where(crossed, last, sel), u, m, jnp.float32(-1.0), jnp.float32(-jnp.inf))
        z_bound = jnp.where(crossed, Z_BOUND, z_bound)
        no_mass = ~crossed & (z <= 0.0)
        z = jnp.where(crossed, -1.0, z)  # (the row's sum is then the first round's)
    else:
        init = (m0, jnp.float32(0.0), jnp.int32(-1), *lanes)
        m, z, sel, xmin, xmax = row.fold(first, init)
        # Weights are exp2((x - m) * scale) <= 1 for logits, the entries themselves for probabilities.
        m, w_max = (jnp.where(m == -jnp.inf, 0.0, m), jnp.float32(1.0)) if spec.from_logits else (jnp.float32(0.0), jnp.max(m))
        tok, cw, cx = pick(sel, _uniform(in0), m, jnp.float32(-1.0), jnp.float32(-jnp.inf))
        no_mass = z <= 0.0
    if not (spec.top_k or spec.top_p or spec.min_p):
        out_ref[b] = tok
        return
    if not counts:  # min-p alone: its kept set is the floor set, one more draw from it if needed
        floor = min_p_ref[r] * w_max
        out_ref[b] = lax.cond(cx >= floor, lambda: tok, lambda: draw(1, m, jnp.float32(-1.0), floor, ())[1][0])
        return

    # Rows with no mass keep token V - 1; greedy rows (temperature 0) are the caller's.
    settled = no_mass
    if spec.from_logits:
        settled = settled | (temp_ref[r] == 0.0)
    # Top-k first with top-p: the exact top-k threshold (x-space) is a floor, and the top-p test
    # compares with the top-k set's mass, which the first round's proposal set sums to (zref < 0
    # until then).
    floor, k_test, zref = jnp.float32(-jnp.inf), top_k if spec.top_k else vocab, z
    if search:
        active = (top_k < vocab) & (top_p < 1.0) & ~settled

        k = top_k.astype(jnp.float32)
        lo = _top_k_floor(xmax, k, float_key(jnp.min(xmin)) - 1)
        t_k = _search(row, lambda ok, x: jnp.where(ok, 1.0, 0.0), lo, k, float_key(jnp.max(xmax)), jnp.float32(0.0), k,
                      active, linear=spec.from_logits)
        floor = jnp.where(active, t_k, -jnp.inf)
        k_test = jnp.where(active, vocab, top_k)
        zref = jnp.where(active, -1.0, z)

    def passes(count_gt, mass_gt, zref):
        ok = count_gt < k_test.astype(jnp.float32) if spec.top_k else jnp.bool_(True)
        if spec.top_p:
            ok = ok & ((top_p >= 1.0) | (mass_gt < top_p * zref) | (mass_gt <= 0.0))
        return ok

    def round_(state):
        it, low, high, tok, cw, cx, has, done, zref, z_bound = state
        p1 = 0.5 * (cw + high)
        tot, (ntok, nw, nx), ((c0, s0), (c1, s1)) = draw(it + 1, m, low, floor, (cw, p1))
        zref = jnp.where(zref < 0, tot, zref)  # (low = -1 in the first round)
        has = has & (zref <= z_bound)  # (an early-exit candidate of a row that sums above Z_BOUND)
        accept = has & passes(c0, s0, zref) & (cx >= floor)
        mid_ok = passes(c1, s1, zref)
        new_low = jnp.where(has, jnp.where(mid_ok, cw, p1), low)
        new_high = jnp.where(has & mid_ok, p1, high)
        nhas = nw > new_low
        return (it + 1, new_low, new_high, jnp.where(accept, tok, ntok), jnp.where(accept, cw, nw), jnp.where(accept, cx, nx),
                accept | nhas, accept, zref, jnp.maximum(z_bound, jnp.inf))  # (an op: a literal is no loop value in Triton)

    def cond(state):
        return ~state[7] & (state[0] < cfg.max_rounds)

    state = (jnp.int32(0), jnp.float32(-1.0), w_max, tok, cw, cx, jnp.bool_(True), settled, zref, z_bound)
    state = lax.while_loop(cond, round_, state)
    # Past max_rounds: the row's largest entry, which every filter keeps.
    out_ref[b] = jnp.where(state[7], state[3], _argmax(row, ~state[7]))


def _argmax(row: _Row, needed):
    """First index of the row's largest entry (no pass when ``needed`` is false)."""

    def body(j, blk, acc):
        best, idx = acc
        col, ok, x = blk
        bm = jnp.max(x)
        bi = jnp.min(jnp.where(x == bm, col, row.vocab))
        return jnp.where(bm > best, bm, best), jnp.where(bm > best, bi, idx)

    # The trip count as int32 arithmetic: jnp.where(needed, n, 0) of two literals lowers to an i1
    # bound, which Triton's scf.for rejects on the device (tests/backends/pallas/conftest.py).
    num_blocks = needed.astype(jnp.int32) * row.num_blocks
    return row.fold(body, (jnp.float32(-jnp.inf), jnp.int32(0)), num_blocks)[1]


def sample(x, rows, key_data, params: RowParams, *, spec: SamplerSpec, config: SamplingConfig = DEFAULT_CONFIG):
    """Draw one token per output row (Pallas; the module docstring's rejection sampling).

    Args:
      x: ``[R, V]`` probabilities (``spec.from_logits=False``, nonnegative, any scale) or logits.
      rows: ``[B]`` int32 row of each output, in ``[0, R)``; ``None``: output ``b`` draws from row
        ``b`` (``B = R``).
      key_data: ``[B, 2]`` uint32 key words of each output row.
      params: per-row ``[R]`` parameters (top_k <= 0 or >= V off; top_p, min_p in [0, 1];
        temperature > 0 -- rows at 0 are the caller's to replace by the argmax).
      spec: which filters apply.

    Returns:
      ``[B]`` int32 token ids.
    """
    rows_in, vocab = x.shape
    if rows_in * vocab >= 2**31:
        raise ValueError(f"the pallas sampler indexes [R * V] in int32: R * V = {rows_in * vocab} is too large")
    cfg = config.for_vocab(vocab)
    batch = rows_in if rows is None else rows.shape[0]
    kernel = functools.partial(_sample_kernel, spec=spec, vocab=vocab, cfg=cfg, has_rows=rows is not None)
    inputs = (x.reshape(-1), params.top_k, params.top_p, params.min_p, params.temperature, key_data.reshape(-1))
    inputs = inputs if rows is None else (rows, *inputs)
    return pl.pallas_call(
        kernel,
        out_shape=varying_like(jax.ShapeDtypeStruct((batch,), jnp.int32), *inputs),
        grid=(batch,),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret_mode(),
    )(*inputs)
