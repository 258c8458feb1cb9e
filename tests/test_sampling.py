"""jaxinfer.sampling against a float64 numpy reference (the "xla" backend here; the Pallas kernels
in tests/backends/pallas/test_sampling_kernel.py, and on the GPU the ``gpu`` tests below).

Masks are compared exactly (ties at the k-th value, top_p in {0, 1}); top_p values are drawn away
from the mass boundaries by a margin float32 rounding cannot cross. Distributions: 10^5 draws per
case (one row, ``indices`` pointing every output at it) pass a chi-square test (p > 1e-3) against
the exactly renormalized float64 target; inputs and keys come from fixed seeds, so every case is
a fixed, repeatable check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinfer import sampling

N_DRAWS = 100_000
P_MIN = 1e-3


# ------------------------------------------------------------------------------------------------
# float64 reference
# ------------------------------------------------------------------------------------------------


def ref_top_k_keep(p: np.ndarray, k: int) -> np.ndarray:
    """Tokens at least as large as the k-th largest (all of them when k <= 0 or k >= V)."""
    if k <= 0 or k >= p.size:
        return np.ones(p.shape, bool)
    return p >= np.sort(p)[::-1][k - 1]


def mass_above(p: np.ndarray) -> np.ndarray:
    """``S_i = sum_{p_j > p_i} p_j`` in float64 (O(V^2); V is small here)."""
    return np.where(p[None, :] > p[:, None], p[None, :], 0.0).sum(axis=1)


def ref_top_p_keep(p: np.ndarray, top_p: float) -> np.ndarray:
    if top_p >= 1.0:
        return np.ones(p.shape, bool)
    s = mass_above(p)
    return (s < top_p * p.sum()) | (s == 0)


def ref_min_p_keep(p: np.ndarray, min_p: float) -> np.ndarray:
    return p >= min_p * p.max()


def ref_dist(p, *, top_k=None, top_p=None, min_p=None, joint=False) -> np.ndarray:
    """The exactly renormalized target of a sampler on one float64 row."""
    p = np.asarray(p, np.float64)
    keep = np.ones(p.shape, bool)
    if top_k is not None:
        keep = ref_top_k_keep(p, top_k)
    if top_p is not None:
        base = np.where(keep, p, 0.0) if top_k is not None and not joint else p
        keep &= ref_top_p_keep(base, top_p)
    if min_p is not None:
        keep &= ref_min_p_keep(p, min_p)
    kept = np.where(keep, p, 0.0)
    return kept / kept.sum()


def ref_softmax(logits, temperature=1.0) -> np.ndarray:
    x = np.asarray(logits, np.float64) / temperature
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def safe_top_p(p: np.ndarray, rng: np.random.Generator) -> float:
    """A top_p strictly between two consecutive nucleus boundaries ``S_i / Z`` of ``p``, half a
    gap from each (so float32 rounding cannot move a token across)."""
    edges = np.unique(np.concatenate([[0.0], mass_above(p) / p.sum(), [1.0]]))
    gaps = np.diff(edges)
    i = rng.choice(np.flatnonzero(gaps > 1e-4))
    return float(edges[i] + gaps[i] / 2)


def chi2_pvalue(tokens: np.ndarray, target: np.ndarray) -> float:
    """Chi-square p-value of ``tokens`` against ``target`` (bins with expected counts below 5
    merged). Fails outright on a token outside the target's support."""
    tokens = np.asarray(tokens)
    counts = np.bincount(tokens, minlength=target.size)
    assert counts.size == target.size, f"token {tokens.max()} out of range"
    outside = counts[target == 0].sum()
    assert outside == 0, f"{outside} draws outside the support: {np.flatnonzero((target == 0) & (counts > 0))[:10]}"
    expected = target * tokens.size
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.array(obs, np.float64), np.array(exp, np.float64)
    if obs.size < 2:
        return 1.0
    return float(stats.chi2.sf(((obs - exp) ** 2 / exp).sum(), obs.size - 1))


def llm_like_probs(rng: np.random.Generator, vocab: int, *, ties: bool = False) -> np.ndarray:
    """A peaked row (softmax of scaled normals); with ``ties``, logits rounded to a coarse grid so
    many probabilities are exactly equal."""
    logits = rng.standard_normal(vocab) * 2.0
    if ties:
        logits = np.round(logits * 2) / 2
    return ref_softmax(logits).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Exact masks
# ------------------------------------------------------------------------------------------------


def _tied_rows(rng, rows, vocab):
    """Probability rows with many exact ties (values on a grid of 8 levels)."""
    levels = rng.integers(1, 9, size=(rows, vocab)).astype(np.float32)
    return (levels / levels.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("vocab", [7, 64, 300])
def test_top_k_mask_logits_and_renorm_exact(vocab):
    rng = np.random.default_rng(vocab)
    rows = 6
    probs = _tied_rows(rng, rows, vocab)
    logits = np.log(probs)
    sorted_desc = -np.sort(-probs, axis=1)
    # k inside a tie group, k on its first member, 1, V, past V, 0 and -1 (off).
    ks = np.array([int(np.flatnonzero(sorted_desc[0] == sorted_desc[0, min(3, vocab - 1)])[-1]) + 1, 1, vocab, vocab + 5, 0, -1])
    masked = np.asarray(sampling.top_k_mask_logits(logits, ks))
    renorm = np.asarray(sampling.top_k_renorm_probs(probs, ks))
    for r in range(rows):
        keep = ref_top_k_keep(probs[r].astype(np.float64), int(ks[r]))
        np.testing.assert_array_equal(np.isfinite(masked[r]), keep, err_msg=f"top_k_mask_logits row {r} k={ks[r]}")
        np.testing.assert_array_equal(masked[r][keep], logits[r][keep])
        np.testing.assert_array_equal(renorm[r] > 0, keep, err_msg=f"top_k_renorm_probs row {r} k={ks[r]}")
        np.testing.assert_allclose(renorm[r], ref_dist(probs[r], top_k=int(ks[r])), rtol=1e-5, atol=1e-7)


def test_top_k_scalar_and_bf16_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 100)), jnp.bfloat16)  # bf16 rounding makes ties
    out = sampling.top_k_mask_logits(logits, 10)
    assert out.dtype == jnp.bfloat16
    x = np.asarray(logits, np.float64)
    for r in range(4):
        np.testing.assert_array_equal(np.isfinite(np.asarray(out[r], np.float64)), ref_top_k_keep(x[r], 10))


@pytest.mark.parametrize("vocab", [5, 64, 257])
def test_top_p_renorm_exact(vocab):
    rng = np.random.default_rng(100 + vocab)
    probs = np.concatenate([_tied_rows(rng, 4, vocab), np.stack([llm_like_probs(rng, vocab) for _ in range(4)])])
    probs[5, : vocab // 3] = 0.0  # zero-probability tokens
    probs[5] /= probs[5].sum()
    top_p = np.array([safe_top_p(probs[r].astype(np.float64), rng) for r in range(probs.shape[0])], np.float32)
    top_p[0], top_p[1], top_p[4] = 0.0, 1.0, 0.0
    got = np.asarray(sampling.top_p_renorm_probs(probs, top_p))
    for r in range(probs.shape[0]):
        want = ref_dist(probs[r], top_p=float(top_p[r]))
        np.testing.assert_array_equal(got[r] > 0, want > 0, err_msg=f"row {r} top_p={top_p[r]}")
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-7)


def test_top_p_exact_boundary():
    """Dyadic rows (exact in float32): a token whose larger tokens hold exactly top_p is dropped,
    as in FlashInfer's kernel (accept iff mass above < top_p); ties go together."""
    probs = np.array([[0.125, 0.5, 0.125, 0.25]] * 4, np.float32)
    top_p = np.array([0.75, 0.5, 0.5000001, 0.7499999], np.float32)
    want = np.array([[0, 2 / 3, 0, 1 / 3], [0, 1, 0, 0], [0, 2 / 3, 0, 1 / 3], [0, 2 / 3, 0, 1 / 3]])
    np.testing.assert_allclose(np.asarray(sampling.top_p_renorm_probs(probs, top_p)), want, rtol=1e-6)
    for r in range(4):
        np.testing.assert_allclose(ref_dist(probs[r], top_p=float(top_p[r])), want[r], rtol=1e-6)
    tokens = np.asarray(sampling.top_p_sampling_from_probs(probs, top_p, jnp.asarray(np.repeat(np.arange(4), 500)),
                                                           key=jax.random.key(0), backend="xla"))
    assert set(tokens.tolist()) == {1, 3} and (tokens[500:1000] == 1).all()


def test_renorm_keeps_dtype_and_sums_to_one():
    rng = np.random.default_rng(2)
    probs = jnp.asarray(np.stack([llm_like_probs(rng, 50) for _ in range(3)]), jnp.bfloat16)
    for out in (sampling.top_k_renorm_probs(probs, 5), sampling.top_p_renorm_probs(probs, 0.7)):
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float64).sum(axis=1), 1.0, atol=2e-2)


@pytest.mark.parametrize("temperature", [None, 0.7, "rows"])
def test_softmax(temperature):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 33)).astype(np.float32) * 3
    logits[2, [4, 9]] = logits[2].max() + 1.0  # a tie at the maximum
    t = np.array([0.5, 1.0, 0.0, 2.0], np.float32) if temperature == "rows" else temperature
    got = np.asarray(sampling.softmax(logits, t))
    assert got.dtype == np.float32
    for r in range(4):
        tr = 1.0 if t is None else float(np.broadcast_to(t, (4,))[r])
        if tr == 0:
            want = np.zeros(33)
            want[[4, 9]] = 0.5
        else:
            want = ref_softmax(logits[r], tr)
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Distributions (10^5 draws, chi-square against the float64 target)
# ------------------------------------------------------------------------------------------------

# (name, sampler kwargs builder, reference kwargs) per case; probs built per vocab.
DIST_CASES = [
    ("sampling_from_probs", {}, {}),
    ("top_p_sampling_from_probs", {"top_p": "safe"}, {}),
    ("top_k_sampling_from_probs", {"top_k": 20}, {}),
    ("min_p_sampling_from_probs", {"min_p": 0.05}, {}),
    ("top_k_top_p_sampling_from_probs", {"top_k": 40, "top_p": "safe"}, {}),
    ("top_k_top_p_sampling_from_probs", {"top_k": 40, "top_p": "safe", "filter_apply_order": "joint"}, {"joint": True}),
]


def _draw(fn_name, x, n, key, **kwargs):
    fn = getattr(sampling, fn_name)
    return np.asarray(fn(x, indices=jnp.zeros((n,), jnp.int32), key=key, backend=kwargs.pop("backend", "xla"), **kwargs))


@pytest.mark.parametrize("case", range(len(DIST_CASES)), ids=[c[0] + ("-joint" if c[2] else "") for c in DIST_CASES])
@pytest.mark.parametrize("vocab,ties", [(64, True), (512, False)])
def test_sampler_distribution(case, vocab, ties):
    name, kwargs, ref_kw = DIST_CASES[case]
    rng = np.random.default_rng(1000 * case + vocab)
    probs = llm_like_probs(rng, vocab, ties=ties)
    kwargs = dict(kwargs)
    if kwargs.get("top_p") == "safe":
        base = ref_dist(probs, top_k=kwargs.get("top_k")) if "top_k" in kwargs and not ref_kw else probs.astype(np.float64)
        kwargs["top_p"] = safe_top_p(base, rng)
    ref_args = {k: kwargs[k] for k in ("top_k", "top_p", "min_p") if k in kwargs}
    target = ref_dist(probs, **ref_args, **ref_kw)
    tokens = _draw(name, probs[None], N_DRAWS, jax.random.key(case * 7 + vocab), **kwargs)
    assert chi2_pvalue(tokens, target) > P_MIN


@pytest.mark.parametrize("order", ["top_k_first", "joint"])
def test_top_k_top_p_from_logits_distribution(order):
    rng = np.random.default_rng(11 if order == "joint" else 12)
    vocab, temperature, top_k = 256, 0.8, 30
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    p = ref_softmax(logits, temperature)
    base = p if order == "joint" else ref_dist(p, top_k=top_k)
    top_p = safe_top_p(base, rng)
    target = ref_dist(p, top_k=top_k, top_p=top_p, joint=order == "joint")
    tokens = _draw("top_k_top_p_sampling_from_logits", logits[None], N_DRAWS, jax.random.key(5), top_k=top_k, top_p=top_p,
                   filter_apply_order=order, temperature=temperature)
    assert chi2_pvalue(tokens, target) > P_MIN


def test_sampling_from_logits_distribution_and_per_row_params():
    """Two rows with their own temperature, outputs interleaved through ``indices``."""
    rng = np.random.default_rng(13)
    logits = (rng.standard_normal((2, 128)) * 2).astype(np.float32)
    temperature = np.array([1.0, 0.5], np.float32)
    indices = jnp.asarray(np.tile([0, 1], N_DRAWS // 2), jnp.int32)
    tokens = np.asarray(sampling.sampling_from_logits(logits, indices, key=jax.random.key(9), temperature=temperature, backend="xla"))
    for r in range(2):
        assert chi2_pvalue(tokens[r::2], ref_softmax(logits[r], temperature[r])) > P_MIN


def test_per_row_top_k_top_p_support():
    """[R] parameters: every row's draws stay inside its own kept set and cover it."""
    rng = np.random.default_rng(14)
    rows, vocab = 6, 64
    probs = np.stack([llm_like_probs(rng, vocab, ties=r % 2 == 0) for r in range(rows)])
    top_k = np.array([1, 5, 0, 64, 10, 3], np.int32)
    top_p = np.array([0.5, 1.0, 0.0, 0.9, 1.0, 0.3], np.float32)
    top_p = np.array([safe_top_p(ref_dist(probs[r], top_k=int(top_k[r])), rng) if 0 < top_p[r] < 1 else top_p[r]
                      for r in range(rows)], np.float32)
    indices = jnp.asarray(np.repeat(np.arange(rows), 4000), jnp.int32)
    tokens = np.asarray(sampling.top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices, key=jax.random.key(3), backend="xla"))
    for r in range(rows):
        target = ref_dist(probs[r], top_k=int(top_k[r]), top_p=float(top_p[r]))
        got = set(np.unique(tokens[r * 4000 : (r + 1) * 4000]).tolist())
        assert got <= set(np.flatnonzero(target > 0).tolist())
        assert set(np.flatnonzero(target > 2e-3).tolist()) <= got


# ------------------------------------------------------------------------------------------------
# Speculative sampling
# ------------------------------------------------------------------------------------------------


def test_chain_speculative_sampling_flashinfer_example():
    draft = np.array([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], np.float32)
    target = np.array([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]], np.float32)
    for seed in range(5):
        out, accepted, emitted = sampling.chain_speculative_sampling(draft, np.array([[2, 1]]), target, seed=seed, offset=0,
                                                                     backend="xla")
        np.testing.assert_array_equal(out, [[2, 0, -1]])
        np.testing.assert_array_equal(accepted, [1])
        np.testing.assert_array_equal(emitted, [1])
    _, accepted, emitted = sampling.chain_speculative_sampling(draft, np.array([[2, 1]]), target, np.array([5]), np.array([7]),
                                                               key=jax.random.key(0), backend="xla")
    np.testing.assert_array_equal(accepted, [6])
    np.testing.assert_array_equal(emitted, [8])


def _categorical(rng, probs, n):
    """``n`` numpy draws from each row of ``probs [S, V]``, shape ``[n, S]``."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    u = rng.random((n, probs.shape[0])) * cdf[:, -1]
    return np.stack([np.searchsorted(cdf[s], u[:, s], side="right") for s in range(probs.shape[0])], axis=1)


def test_chain_speculative_sampling_emits_target_distribution():
    """With draft tokens drawn from the draft model, the first emitted token follows the target's
    first distribution, and the token after an accepted one follows the next (chi-square, 10^5)."""
    rng = np.random.default_rng(21)
    n, vocab = 2, 64
    p = np.stack([llm_like_probs(rng, vocab) for _ in range(n + 1)])
    q = (0.6 * p[:n] + 0.4 * np.stack([llm_like_probs(rng, vocab) for _ in range(n)])).astype(np.float32)  # a draft model close to the target
    ids = _categorical(rng, q, N_DRAWS).astype(np.int32)
    draft = jnp.broadcast_to(jnp.asarray(q), (N_DRAWS, n, vocab))
    target = jnp.broadcast_to(jnp.asarray(p), (N_DRAWS, n + 1, vocab))
    out, accepted, emitted = (np.asarray(a) for a in sampling.chain_speculative_sampling(
        draft, ids, target, key=jax.random.key(4), backend="xla"))
    assert chi2_pvalue(out[:, 0], p[0].astype(np.float64) / p[0].sum()) > P_MIN
    for j in (1, 2):
        emitted_j = out[:, j][out[:, j] >= 0]
        assert emitted_j.size > 10_000
        assert chi2_pvalue(emitted_j, p[j].astype(np.float64) / p[j].sum()) > P_MIN
    # Structure: accepted draft tokens, one sampled token, then -1; the counts agree.
    # (the token drawn at a rejected position never equals the draft's: max(p - q, 0) is 0 there)
    lead = (out[:, :n] == ids).cumprod(axis=1).sum(axis=1)
    np.testing.assert_array_equal(emitted, lead)
    assert (out[np.arange(N_DRAWS), emitted] >= 0).all()
    assert all((out[b, emitted[b] + 1 :] == -1).all() for b in range(200))
    assert (accepted >= emitted).all()
    # Acceptance rate of position 0 is sum_t min(p, q).
    want = np.minimum(p[0], q[0]).sum()
    assert abs((emitted >= 1).mean() - want) < 5 * np.sqrt(want * (1 - want) / N_DRAWS)


# ------------------------------------------------------------------------------------------------
# Greedy, determinism, jit
# ------------------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy():
    rng = np.random.default_rng(31)
    logits = rng.standard_normal((5, 40)).astype(np.float32)
    logits[1, [3, 17]] = 9.0  # tie: the first index wins
    t = np.array([0.0, 0.0, 1.0, 0.0, 0.5], np.float32)
    want = np.argmax(logits, axis=1)
    for seed in range(3):
        key = jax.random.key(seed)
        a = np.asarray(sampling.top_k_top_p_sampling_from_logits(logits, 5, 0.9, key=key, temperature=t, backend="xla"))
        b = np.asarray(sampling.sampling_from_logits(logits, key=key, temperature=t, backend="xla"))
        np.testing.assert_array_equal(a[t == 0], want[t == 0])
        np.testing.assert_array_equal(b[t == 0], want[t == 0])
    assert want[1] == 3


def test_top_p_zero_and_top_k_one_pick_the_maximum():
    rng = np.random.default_rng(32)
    probs = _tied_rows(rng, 8, 50)
    keys = jax.random.key(1)
    for tokens in (sampling.top_p_sampling_from_probs(probs, 0.0, key=keys, backend="xla"),
                   sampling.top_k_sampling_from_probs(probs, 1, key=keys, backend="xla")):
        tokens = np.asarray(tokens)
        assert (probs[np.arange(8), tokens] == probs.max(axis=1)).all()


def test_same_key_same_tokens_and_batch_independence():
    rng = np.random.default_rng(41)
    probs = np.stack([llm_like_probs(rng, 100) for _ in range(6)])
    seed, offset = np.array([3, 1, 4, 1, 5, 9]), np.array([2, 7, 1, 8, 2, 8])
    a = np.asarray(sampling.top_p_sampling_from_probs(probs, 0.9, seed=seed, offset=offset, backend="xla"))
    b = np.asarray(sampling.top_p_sampling_from_probs(probs, 0.9, seed=seed, offset=offset, backend="xla"))
    np.testing.assert_array_equal(a, b)
    # A request's token depends on its own seed/offset and row only, not on the batch around it.
    for r in range(6):
        one = sampling.top_p_sampling_from_probs(probs[r : r + 1], 0.9, seed=seed[r : r + 1], offset=offset[r : r + 1], backend="xla")
        assert int(one[0]) == a[r]
    perm = np.array([5, 3, 0, 1, 4, 2])
    c = np.asarray(sampling.top_p_sampling_from_probs(probs[perm], 0.9, seed=seed[perm], offset=offset[perm], backend="xla"))
    np.testing.assert_array_equal(c, a[perm])
    # One key for the batch: output b uses fold_in(key, b), whatever the batch size.
    k = jax.random.key(7)
    full = np.asarray(sampling.sampling_from_probs(probs, key=k, backend="xla"))
    np.testing.assert_array_equal(np.asarray(sampling.sampling_from_probs(probs[:2], key=k, backend="xla")), full[:2])
    # Raw uint32 key data is accepted.
    raw = np.asarray(sampling.sampling_from_probs(probs, key=jax.random.key_data(k), backend="xla"))
    np.testing.assert_array_equal(raw, full)


def test_different_seeds_are_independent():
    """Identical uniform rows with seeds 0..N-1: tokens are uniform, and consecutive requests'
    tokens are independent (chi-square on pairs)."""
    vocab, n = 8, 40_000
    probs = np.full((1, vocab), 1.0 / vocab, np.float32)
    tokens = np.asarray(sampling.sampling_from_probs(probs, jnp.zeros((n,), jnp.int32), seed=np.arange(n), offset=0, backend="xla"))
    assert chi2_pvalue(tokens, np.full(vocab, 1.0 / vocab)) > P_MIN
    pairs = tokens[0::2] * vocab + tokens[1::2]
    assert chi2_pvalue(pairs, np.full(vocab * vocab, 1.0 / vocab**2)) > P_MIN
    # Same seed, consecutive offsets: also independent.
    tokens = np.asarray(sampling.sampling_from_probs(probs, jnp.zeros((n,), jnp.int32), seed=7, offset=np.arange(n), backend="xla"))
    pairs = tokens[0::2] * vocab + tokens[1::2]
    assert chi2_pvalue(pairs, np.full(vocab * vocab, 1.0 / vocab**2)) > P_MIN


def test_jit_traced_parameters_do_not_recompile():
    rng = np.random.default_rng(51)
    logits = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    traces = []

    @jax.jit
    def step(logits, top_k, top_p, temperature, seed, offset):
        traces.append(1)
        return sampling.top_k_top_p_sampling_from_logits(logits, top_k, top_p, seed=seed, offset=offset,
                                                         temperature=temperature, backend="xla")

    for i in range(3):
        out = step(logits, jnp.array([1, 5, 0, 64]) + i, jnp.array([0.5, 0.9, 1.0, 0.0]), jnp.array([0.0, 1.0, 0.7, 1.2]) + i,
                   jnp.arange(4), jnp.full((4,), i))
        assert out.shape == (4,) and out.dtype == jnp.int32
        if i == 0:  # row 0 at temperature 0 is greedy
            assert int(out[0]) == int(jnp.argmax(logits[0].astype(jnp.float32)))
    assert len(traces) == 1


def test_jit_every_entry_point():
    rng = np.random.default_rng(52)
    probs = jnp.asarray(np.stack([llm_like_probs(rng, 32) for _ in range(3)]))
    key = jax.random.key(0)
    calls = [
        lambda p, k: sampling.sampling_from_probs(p, key=k, backend="xla"),
        lambda p, k: sampling.top_p_sampling_from_probs(p, jnp.full((3,), 0.8), key=k, backend="xla"),
        lambda p, k: sampling.top_k_sampling_from_probs(p, jnp.full((3,), 4), key=k, backend="xla"),
        lambda p, k: sampling.min_p_sampling_from_probs(p, jnp.full((3,), 0.1), key=k, backend="xla"),
        lambda p, k: sampling.top_k_top_p_sampling_from_probs(p, 4, 0.8, key=k, backend="xla"),
        lambda p, k: sampling.sampling_from_logits(jnp.log(p), key=k, backend="xla"),
        lambda p, k: sampling.top_k_renorm_probs(p, jnp.full((3,), 4), backend="xla"),
        lambda p, k: sampling.top_p_renorm_probs(p, jnp.full((3,), 0.8), backend="xla"),
        lambda p, k: sampling.top_k_mask_logits(jnp.log(p), jnp.full((3,), 4), backend="xla"),
        lambda p, k: sampling.softmax(jnp.log(p), jnp.full((3,), 0.9)),
    ]
    # One jitted program for all (compiles once); each output equals the eager call's: tokens
    # exactly, probabilities to float32 rounding (XLA may fuse the caller's log into the softmax
    # and round differently: jax 0.12.1 on the CPU, 9 ulp after exp).
    jitted = jax.jit(lambda p, k: [f(p, k) for f in calls])(probs, key)
    for f, got in zip(calls, jitted):
        want = f(probs, key)
        assert got.dtype == want.dtype
        if jnp.issubdtype(want.dtype, jnp.integer):
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_empty_batch():
    probs = np.zeros((0, 10), np.float32)
    assert sampling.top_p_sampling_from_probs(probs, 0.5, key=jax.random.key(0), backend="xla").shape == (0,)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

P = np.full((2, 5), 0.2, np.float32)
K = jax.random.key(0)

BAD = [
    (lambda: sampling.sampling_from_probs(P[0], key=K), "probs"),
    (lambda: sampling.sampling_from_probs(P.astype(np.int32), key=K), "probs"),
    (lambda: sampling.sampling_from_probs(P), "key"),
    (lambda: sampling.sampling_from_probs(P, key=K, seed=1, offset=0), "key"),
    (lambda: sampling.sampling_from_probs(P, seed=1), "offset"),
    (lambda: sampling.sampling_from_probs(P, seed=np.arange(3), offset=0), "seed"),
    (lambda: sampling.sampling_from_probs(P, seed=1.5, offset=0), "seed"),
    (lambda: sampling.sampling_from_probs(P, key=jax.random.split(K, 3)), "key"),
    (lambda: sampling.sampling_from_probs(P, key=np.zeros(3, np.float32)), "key"),
    (lambda: sampling.sampling_from_probs(P, np.array([0, 2]), key=K), "indices"),
    (lambda: sampling.sampling_from_probs(P, np.array([[0]]), key=K), "indices"),
    (lambda: sampling.sampling_from_probs(np.full((1, 3), np.nan, np.float32), key=K, check_nan=True), "NaN"),
    (lambda: sampling.sampling_from_probs(P, key=K, backend="cuda"), "backend"),
    (lambda: sampling.top_p_sampling_from_probs(P, 1.5, key=K), "top_p"),
    (lambda: sampling.top_p_sampling_from_probs(P, -0.1, key=K), "top_p"),
    (lambda: sampling.top_p_sampling_from_probs(P, np.nan, key=K), "top_p"),
    (lambda: sampling.top_p_sampling_from_probs(P, np.array([0.5, 0.5, 0.5]), key=K), "top_p"),
    (lambda: sampling.top_p_sampling_from_probs(P, None, key=K), "top_p"),
    (lambda: sampling.top_k_sampling_from_probs(P, 2.0, key=K), "top_k"),
    (lambda: sampling.top_k_sampling_from_probs(P, True, key=K), "top_k"),
    (lambda: sampling.top_k_sampling_from_probs(P, np.ones((2, 1), np.int32), key=K), "top_k"),
    (lambda: sampling.min_p_sampling_from_probs(P, 1.1, key=K), "min_p"),
    (lambda: sampling.top_k_top_p_sampling_from_probs(P, 2, 0.5, filter_apply_order="top_p_first", key=K), "filter_apply_order"),
    (lambda: sampling.top_k_top_p_sampling_from_logits(P, 2, 0.5, key=K, temperature=-1.0), "temperature"),
    (lambda: sampling.sampling_from_logits(P, key=K, temperature=np.array([1.0, np.nan])), "temperature"),
    (lambda: sampling.softmax(P, np.array([1.0, 1.0, 1.0])), "temperature"),
    (lambda: sampling.top_k_renorm_probs(P, 0.5), "top_k"),
    (lambda: sampling.top_p_renorm_probs(P, 2.0), "top_p"),
    (lambda: sampling.top_k_mask_logits(P[None], 2), "logits"),
    (lambda: sampling.chain_speculative_sampling(np.ones((2, 3, 5)), np.zeros((2, 3), np.int32), np.ones((2, 3, 5)), key=K),
     "target_probs"),
    (lambda: sampling.chain_speculative_sampling(np.ones((2, 3, 5)), np.zeros((2, 2), np.int32), np.ones((2, 4, 5)), key=K),
     "draft_token_ids"),
    (lambda: sampling.chain_speculative_sampling(np.ones((2, 3, 5)), np.full((2, 3), 5, np.int32), np.ones((2, 4, 5)), key=K),
     "draft_token_ids"),
    (lambda: sampling.chain_speculative_sampling(np.ones((2, 5)), np.zeros((2, 3), np.int32), np.ones((2, 4, 5)), key=K),
     "draft_probs"),
    (lambda: sampling.chain_speculative_sampling(np.ones((2, 3, 5)), np.zeros((2, 3), np.int32), np.ones((2, 4, 5)),
                                                 np.zeros(3, np.int32), key=K), "maybe_output_accepted_token_num"),
]


@pytest.mark.parametrize("call,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_raises_value_error_naming_it(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_check_nan_under_jit_is_refused():
    with pytest.raises(ValueError, match="check_nan"):
        jax.jit(lambda p: sampling.sampling_from_probs(p, key=K, check_nan=True))(P)


# ------------------------------------------------------------------------------------------------
# GPU: the Pallas kernels through the public API, 10^5 draws
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(DIST_CASES)), ids=[c[0] + ("-joint" if c[2] else "") for c in DIST_CASES])
@pytest.mark.parametrize("vocab,ties", [(64, True), (512, False), (151936, False)])
def test_gpu_sampler_distribution(case, vocab, ties):
    name, kwargs, ref_kw = DIST_CASES[case]
    rng = np.random.default_rng(1000 * case + vocab)
    probs = llm_like_probs(rng, vocab, ties=ties)
    kwargs = dict(kwargs)
    if kwargs.get("top_p") == "safe":
        base = ref_dist(probs, top_k=kwargs.get("top_k")) if "top_k" in kwargs and not ref_kw else probs.astype(np.float64)
        kwargs["top_p"] = safe_top_p(base, rng) if vocab <= 4096 else 0.9
    if vocab > 4096:
        # The O(V^2) reference is too big: draws stay in the float32 reference's kept set (up to
        # a token at the top-p edge) and their frequencies match the xla backend's.
        spec = sampling.SamplerSpec(top_k="top_k" in kwargs, top_p="top_p" in kwargs, min_p="min_p" in kwargs,
                                    joint=bool(ref_kw))
        params = sampling._params(1, **{k: kwargs[k] for k in ("top_k", "top_p", "min_p") if k in kwargs})
        kept = np.asarray(sampling._keep_mask(spec, jnp.asarray(probs[None]), params))[0]
        n = 20_000  # each draw scans the whole row on the GPU
        xla = _draw(name, probs[None], n, jax.random.key(1), **kwargs)
        got = _draw(name, probs[None], n, jax.random.key(2), backend="pallas", **kwargs)
        assert (~kept[got]).sum() <= 2
        table = np.stack([np.bincount(xla, minlength=vocab), np.bincount(got, minlength=vocab)])
        table = table[:, table.sum(axis=0) > 0]
        assert stats.chi2_contingency(table)[1] > P_MIN
        return
    ref_args = {k: kwargs[k] for k in ("top_k", "top_p", "min_p") if k in kwargs}
    target = ref_dist(probs, **ref_args, **ref_kw)
    tokens = _draw(name, probs[None], N_DRAWS, jax.random.key(case * 7 + vocab), backend="pallas", **kwargs)
    assert chi2_pvalue(tokens, target) > P_MIN


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["top_k_first", "joint"])
def test_gpu_top_k_top_p_from_logits_distribution(order):
    rng = np.random.default_rng(11 if order == "joint" else 12)
    vocab, temperature, top_k = 256, 0.8, 30
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    p = ref_softmax(logits, temperature)
    base = p if order == "joint" else ref_dist(p, top_k=top_k)
    top_p = safe_top_p(base, rng)
    target = ref_dist(p, top_k=top_k, top_p=top_p, joint=order == "joint")
    tokens = _draw("top_k_top_p_sampling_from_logits", logits[None], N_DRAWS, jax.random.key(5), top_k=top_k, top_p=top_p,
                   filter_apply_order=order, temperature=temperature, backend="pallas")
    assert chi2_pvalue(tokens, target) > P_MIN


@pytest.mark.gpu
def test_gpu_chain_speculative_sampling_emits_target_distribution():
    rng = np.random.default_rng(22)
    n, vocab = 3, 128
    q = np.stack([llm_like_probs(rng, vocab) for _ in range(n)])
    p = np.stack([llm_like_probs(rng, vocab) for _ in range(n + 1)])
    ids = _categorical(rng, q, N_DRAWS).astype(np.int32)
    out, _, _ = (np.asarray(a) for a in sampling.chain_speculative_sampling(
        jnp.broadcast_to(jnp.asarray(q), (N_DRAWS, n, vocab)), ids, jnp.broadcast_to(jnp.asarray(p), (N_DRAWS, n + 1, vocab)),
        key=jax.random.key(4), backend="pallas"))
    assert chi2_pvalue(out[:, 0], p[0].astype(np.float64) / p[0].sum()) > P_MIN


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
def test_gpu_masks_large_vocab(vocab):
    rng = np.random.default_rng(vocab)
    logits = jnp.asarray(rng.standard_normal((8, vocab)) * 3, jnp.bfloat16)
    top_k = np.array([1, 5, 50, 1000, 0, vocab, 17, 2], np.int32)
    want = sampling.top_k_mask_logits(logits, top_k, backend="xla")
    got = sampling.top_k_mask_logits(logits, top_k, backend="pallas")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    probs = sampling.softmax(logits)
    for fn, param in ((sampling.top_k_renorm_probs, top_k), (sampling.top_p_renorm_probs, np.linspace(0, 1, 8, dtype=np.float32))):
        a, b = np.asarray(fn(probs, param, backend="xla")), np.asarray(fn(probs, param, backend="pallas"))
        mismatch = (a > 0) != (b > 0)
        assert mismatch.sum() <= 8, f"{fn.__name__}: {mismatch.sum()} tokens differ"  # float32 sums at the top-p edge
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
