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
  (kept only if it lies above the new one -- a rejection step, so still exact). The first pass also
  finds the row's maximum (online softmax for logits: Milakov & Gimelshein 2018, arXiv
  1805.02867), its sum and, for min-p, the floor ``min_p * max``. Filters that have nothing to test
  (plain sampling) end after that pass.

* :func:`threshold` -- the exact threshold of a top-k (count) or top-p (mass) filter:
  ``t = min{x_i : g(x_i) < c}`` with ``g(t)`` the count (or mass) of entries above ``t``, so that
  the filter keeps ``x >= t`` with ties on one side. A bracket ``(lo, hi]`` on the entries'
  order-preserving int32 keys shrinks per pass by three interpolated pivots and the midpoint
  (at most 32 passes); ``lo`` also jumps to the smallest entry above it each pass, and the search
  ends when that entry passes. The top-k-first sampler runs it to find its floor.

Randomness: each output row carries a ``jax.random`` key's two uint32 words; pass ``r`` derives
two words by Threefry-2x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3";
the 20-round function of ``jax.random``), one for the in-block uniform and one seeding the
per-block reservoir uniforms (a ``lowbias32`` integer hash of seed + block * golden ratio).
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
from jaxinfer.plan.batch import next_pow2
from jaxinfer.sampling import RowParams, SamplerSpec

LOG2E = math.log2(math.e)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
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

    block: int = 2048
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

    @property
    def num_blocks(self) -> int:
        return pl.cdiv(self.vocab, self.block)

    def load(self, j, fill: float):
        """``(col, ok, x)`` of block ``j``: columns, in-row mask, entries as float32 (``fill`` past
        the row's end)."""
        col = j * self.block + lax.iota(jnp.int32, self.block)
        ok = col < self.vocab
        # Unclamped contiguous offsets (masked past the row's end) let Triton vectorize the load.
        x = pltriton.load(self.ref.at[self.base + col], mask=ok, other=fill)
        return col, ok, jnp.where(ok, x.astype(jnp.float32), fill)


def _row(ref, r, vocab: int, block: int) -> _Row:
    """Row ``r`` of a flat ``[R * V]`` ref; the alignment hint lets Triton emit wide loads."""
    align = math.gcd(vocab, 16)
    base = r * vocab
    return _Row(ref, pl.multiple_of(base, align) if align > 1 else base, vocab, block)


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


def _search(load_km, num_blocks: int, lo, g_lo, hi, g_hi, c, active):
    """``t = min{key k_i : g(k_i) < c}`` with ``g(t) = sum of measure over keys > t``.

    Args:
      load_km: ``j -> (ok, keys int32, measure float32)`` of block ``j``.
      lo, g_lo: an int32 key with ``g(lo) >= c`` and its ``g``; hi, g_hi: one with ``g(hi) < c``.
      c: the bound (> 0).
      active: bool; when false no pass runs and ``hi`` is returned.

    Returns:
      ``t`` (int32 key of an entry).
    """

    def one_pass(state):
        lo, g_lo, hi, g_hi, _, _, it = state
        lo_f, hi_f = lo.astype(jnp.float32), hi.astype(jnp.float32)
        frac = jnp.clip((g_lo - c) / jnp.maximum(g_lo - g_hi, 1e-30), 0.0, 1.0)
        est, spread = lo_f + frac * (hi_f - lo_f), (hi_f - lo_f) * (1.0 / 16)
        inner = hi - lo >= 2  # (as int32 this can wrap; then the float test below decides)
        inner = inner | (hi_f - lo_f >= 4.0)

        def clamp(v):
            v = jnp.clip(v, lo_f + 1.0, hi_f - 1.0)
            k = v.astype(jnp.int32)
            return jnp.where(inner, jnp.clip(k, lo + 1, hi - 1), lo)

        pivots = (clamp(est - spread), clamp(est), clamp(est + spread), jnp.where(inner, _midpoint(lo, hi), lo))

        def body(j, acc):
            gs, m, e = acc
            ok, k, meas = load_km(j)
            gs = tuple(g + jnp.sum(jnp.where(ok & (k > p), meas, 0.0)) for g, p in zip(gs, pivots))
            mb = jnp.min(jnp.where(ok & (k > lo), k, INT32_MAX))
            eb = jnp.sum(jnp.where(ok & (k == mb), meas, 0.0))
            e = jnp.where(mb < m, eb, jnp.where(mb == m, e + eb, e))
            return gs, jnp.minimum(m, mb), e

        zero = jnp.float32(0.0)
        gs, m, e = lax.fori_loop(0, num_blocks, body, ((zero,) * 4, jnp.int32(INT32_MAX), zero))
        g_m = g_lo - e
        found = g_m < c
        new_lo, new_g_lo, new_hi, new_g_hi = m, g_m, hi, g_hi
        for p, g in zip(pivots, gs):
            above = (g >= c) & (p > new_lo)
            new_lo, new_g_lo = jnp.where(above, p, new_lo), jnp.where(above, g, new_g_lo)
            below = (g < c) & (p < new_hi) & (p > lo)
            new_hi, new_g_hi = jnp.where(below, p, new_hi), jnp.where(below, g, new_g_hi)
        return new_lo, new_g_lo, new_hi, new_g_hi, found, m, it + 1

    def cond(state):
        return ~state[4] & (state[6] < SEARCH_PASSES)

    init = (lo, g_lo, hi, g_hi, ~active, hi, jnp.int32(0))
    return lax.while_loop(cond, one_pass, init)[5]


# --------------------------------------------------------------------------------------------
# Threshold kernel
# --------------------------------------------------------------------------------------------


def _threshold_kernel(x_ref, param_ref, out_ref, *, vocab: int, block: int, criterion: str):
    r = pl.program_id(0)
    row = _row(x_ref, r, vocab, block)

    def load_km(j):
        _, ok, x = row.load(j, 0.0)
        return ok, float_key(x), (jnp.where(ok, 1.0, 0.0) if criterion == "top_k" else jnp.where(ok, x, 0.0))

    def stats(j, acc):
        kmin, kmax, total = acc
        ok, k, meas = load_km(j)
        return (jnp.minimum(kmin, jnp.min(jnp.where(ok, k, INT32_MAX))), jnp.maximum(kmax, jnp.max(jnp.where(ok, k, INT32_MIN))),
                total + jnp.sum(meas))

    kmin, kmax, total = lax.fori_loop(0, row.num_blocks, stats, (jnp.int32(INT32_MAX), jnp.int32(INT32_MIN), jnp.float32(0.0)))
    param = param_ref[r]
    if criterion == "top_k":
        off = (param <= 0) | (param >= vocab)
        c = param.astype(jnp.float32)
    else:
        off = param >= 1.0
        c = jnp.maximum(param * total, jnp.float32(1e-30))
    t = _search(load_km, row.num_blocks, kmin - 1, total, kmax, jnp.float32(0.0), c, ~off)
    out_ref[r] = jnp.where(off, -jnp.inf, key_float(t))


def threshold(x, param, *, criterion: str, config: SamplingConfig = DEFAULT_CONFIG):
    """Exact threshold of a top-k or top-p filter per row (Pallas).

    Args:
      x: ``[R, V]`` logits or probabilities (any float dtype; compared in float32).
      param: ``[R]`` int32 ``top_k`` (``criterion="top_k"``; ``<= 0`` or ``>= V`` is off) or
        float32 ``top_p`` in [0, 1] (``"top_p"``; mass relative to the row's sum; 1 is off).

    Returns:
      ``[R]`` float32 ``t``: the filter keeps ``x >= t`` (``-inf`` when off).
    """
    rows, vocab = x.shape
    cfg = config.for_vocab(vocab)
    kernel = functools.partial(_threshold_kernel, vocab=vocab, block=cfg.block, criterion=criterion)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows,), jnp.float32),
        grid=(rows,),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret_mode(),
    )(x.reshape(-1), param)


# --------------------------------------------------------------------------------------------
# Sampling kernel
# --------------------------------------------------------------------------------------------


def _sample_kernel(rows_ref, x_ref, top_k_ref, top_p_ref, min_p_ref, temp_ref, key_ref, out_ref, *, spec: SamplerSpec,
                   vocab: int, cfg: SamplingConfig):
    b = pl.program_id(0)
    r = rows_ref[b]
    row = _row(x_ref, r, vocab, cfg.block)
    nblk = row.num_blocks
    k0, k1 = key_ref[2 * b], key_ref[2 * b + 1]
    fill = -jnp.inf if spec.from_logits else 0.0
    scale = LOG2E / jnp.where(temp_ref[r] > 0, temp_ref[r], 1.0) if spec.from_logits else None
    top_k = top_k_ref[r]
    top_k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    top_p = top_p_ref[r]
    counts = spec.top_k or spec.top_p  # filters whose test needs the mass/count above a pivot

    def weights(x, ok, m):
        if spec.from_logits:
            return jnp.where(ok & (x > -jnp.inf), jnp.exp2((x - m) * scale), 0.0)
        return jnp.where(ok, jnp.maximum(x, 0.0), 0.0)

    def block_uniform(seed, j):
        return _uniform(_hash32(seed + _u32(j) * _u32(0x9E3779B9)))

    def pick(blk, u, m, low, floor):
        """``(token, w, x)`` of the inverse-CDF pick inside block ``blk`` of ``{w > low, x >= floor}``
        (token ``V - 1`` when no block was picked: a row with no mass)."""
        col, ok, x = row.load(jnp.maximum(blk, 0), fill)
        w = weights(x, ok, m)
        w = jnp.where((w > low) & (x >= floor), w, 0.0)
        sel = lax.iota(jnp.int32, cfg.block) == _pick_in_block(w, u)
        return (jnp.where(blk >= 0, jnp.sum(jnp.where(sel, col, 0)), vocab - 1),
                jnp.where(blk >= 0, jnp.sum(jnp.where(sel, w, 0.0)), -1.0), jnp.sum(jnp.where(sel, x, 0.0)))

    def draw(pass_idx, m, low, floor, pivots):
        """One pass: a candidate from ``{w > low, x >= floor}`` (reservoir over blocks, then a pick),
        that set's total mass, and the count and mass of entries above each pivot."""
        seed, u_in = threefry2x32(k0, k1, pass_idx, 0)

        def body(j, acc):
            tot, sel, aggs = acc
            _, ok, x = row.load(j, fill)
            w = weights(x, ok, m)
            s = jnp.sum(jnp.where((w > low) & (x >= floor), w, 0.0))
            tot = tot + s
            sel = jnp.where(block_uniform(seed, j) * tot < s, j, sel)
            aggs = tuple((c + jnp.sum((w > p).astype(jnp.float32)), g + jnp.sum(jnp.where(w > p, w, 0.0)))
                         for (c, g), p in zip(aggs, pivots))
            return tot, sel, aggs

        zero = jnp.float32(0.0)
        tot, sel, aggs = lax.fori_loop(0, nblk, body, (zero, jnp.int32(-1), ((zero, zero),) * len(pivots)))
        return tot, pick(sel, _uniform(u_in), m, low, floor), aggs

    # Pass 0: maximum (online rescaling for logits), sum, key range and a first candidate.
    seed0, in0 = threefry2x32(k0, k1, 0, 0)

    def first(j, acc):
        m, z, kmin, kmax, sel = acc
        _, ok, x = row.load(j, fill)
        if spec.from_logits:
            m_new = jnp.maximum(m, jnp.max(x))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            z = z * jnp.where(m == m_new, 1.0, jnp.exp2((m - m_safe) * scale))
            s = jnp.sum(weights(x, ok, m_safe))
        else:
            s = jnp.sum(weights(x, ok, 0.0))
            m_new = jnp.maximum(m, jnp.max(weights(x, ok, 0.0)))
        z = z + s
        sel = jnp.where(block_uniform(seed0, j) * z < s, j, sel)
        k = float_key(x)
        kmin = jnp.minimum(kmin, jnp.min(jnp.where(ok, k, INT32_MAX)))
        kmax = jnp.maximum(kmax, jnp.max(jnp.where(ok, k, INT32_MIN)))
        return m_new, z, kmin, kmax, sel

    m0 = jnp.float32(-jnp.inf if spec.from_logits else 0.0)
    init = (m0, jnp.float32(0.0), jnp.int32(INT32_MAX), jnp.int32(INT32_MIN), jnp.int32(-1))
    m, z, kmin, kmax, sel = lax.fori_loop(0, nblk, first, init)
    # Weights are exp2((x - m) * scale) <= 1 for logits, the entries themselves for probabilities.
    m, w_max = (jnp.where(m == -jnp.inf, 0.0, m), jnp.float32(1.0)) if spec.from_logits else (jnp.float32(0.0), m)
    tok, cw, cx = pick(sel, _uniform(in0), m, jnp.float32(-1.0), jnp.float32(-jnp.inf))
    if not (spec.top_k or spec.top_p or spec.min_p):
        out_ref[b] = tok
        return
    if not counts:  # min-p alone: its kept set is the floor set, one more draw from it if needed
        floor = min_p_ref[r] * w_max
        out_ref[b] = lax.cond(cx >= floor, lambda: tok, lambda: draw(1, m, jnp.float32(-1.0), floor, ())[1][0])
        return

    # Rows with no mass keep token V - 1; greedy rows (temperature 0) are the caller's.
    settled = z <= 0.0
    if spec.from_logits:
        settled = settled | (temp_ref[r] == 0.0)
    # Top-k first with top-p: the exact top-k threshold (x-space) is a floor, and the top-p test
    # compares with the top-k set's mass, which the first round's proposal set sums to (zref < 0
    # until then).
    floor, k_test, zref = jnp.float32(-jnp.inf), top_k if spec.top_k else vocab, z
    if spec.top_k and spec.top_p and not spec.joint:
        active = (top_k < vocab) & (top_p < 1.0) & ~settled

        def load_count(j):
            _, ok, x = row.load(j, fill)
            return ok, float_key(x), jnp.where(ok, 1.0, 0.0)

        t_k = _search(load_count, nblk, kmin - 1, jnp.float32(vocab), kmax, jnp.float32(0.0), top_k.astype(jnp.float32), active)
        floor = jnp.where(active, key_float(t_k), -jnp.inf)
        k_test = jnp.where(active, vocab, top_k)
        zref = jnp.where(active, -1.0, z)

    def passes(count_gt, mass_gt, zref):
        ok = count_gt < k_test.astype(jnp.float32) if spec.top_k else jnp.bool_(True)
        if spec.top_p:
            ok = ok & ((top_p >= 1.0) | (mass_gt < top_p * zref) | (mass_gt <= 0.0))
        return ok

    def round_(state):
        it, low, high, tok, cw, cx, has, done, zref = state
        p1 = 0.5 * (cw + high)
        tot, (ntok, nw, nx), ((c0, s0), (c1, s1)) = draw(it + 1, m, low, floor, (cw, p1))
        zref = jnp.where(zref < 0, tot, zref)  # (low = -1 in the first round)
        accept = has & passes(c0, s0, zref) & (cx >= floor)
        mid_ok = passes(c1, s1, zref)
        new_low = jnp.where(has, jnp.where(mid_ok, cw, p1), low)
        new_high = jnp.where(has & mid_ok, p1, high)
        nhas = nw > new_low
        return (it + 1, new_low, new_high, jnp.where(accept, tok, ntok), jnp.where(accept, cw, nw), jnp.where(accept, cx, nx),
                accept | nhas, accept, zref)

    def cond(state):
        return ~state[7] & (state[0] < cfg.max_rounds)

    state = (jnp.int32(0), jnp.float32(-1.0), w_max, tok, cw, cx, jnp.bool_(True), settled, zref)
    state = lax.while_loop(cond, round_, state)
    # Past max_rounds: the row's largest entry, which every filter keeps.
    out_ref[b] = jnp.where(state[7], state[3], _argmax(row, fill, ~state[7]))


def _argmax(row: _Row, fill: float, needed):
    """First index of the row's largest entry (no pass when ``needed`` is false)."""

    def body(j, acc):
        best, idx = acc
        col, ok, x = row.load(j, fill)
        bm = jnp.max(x)
        bi = jnp.min(jnp.where(x == bm, col, row.vocab))
        return jnp.where(bm > best, bm, best), jnp.where(bm > best, bi, idx)

    return lax.fori_loop(0, jnp.where(needed, row.num_blocks, 0), body, (jnp.float32(-jnp.inf), jnp.int32(0)))[1]


def sample(x, rows, key_data, params: RowParams, *, spec: SamplerSpec, config: SamplingConfig = DEFAULT_CONFIG):
    """Draw one token per output row (Pallas; the module docstring's rejection sampling).

    Args:
      x: ``[R, V]`` probabilities (``spec.from_logits=False``, nonnegative, any scale) or logits.
      rows: ``[B]`` int32 row of each output, in ``[0, R)``.
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
    kernel = functools.partial(_sample_kernel, spec=spec, vocab=vocab, cfg=cfg)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows.shape[0],), jnp.int32),
        grid=(rows.shape[0],),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret_mode(),
    )(rows, x.reshape(-1), params.top_k, params.top_p, params.min_p, params.temperature, key_data.reshape(-1))
