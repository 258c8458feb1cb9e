"""The Pallas sampling kernels (interpret mode here) against the float64 reference of
tests/test_sampling.py, their deviceless Triton lowering under an abstract H100, and GPU tests.

Small blocks (16 entries) make every row span several blocks, so the reservoir over blocks, the
online maximum of logits and the bracket search across blocks are exercised; interpret mode runs
4,000 draws per distribution case (the 10^5-draw cases run on the GPU in tests/test_sampling.py).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from test_sampling import chi2_pvalue, llm_like_probs, ref_dist, ref_softmax, ref_top_k_keep, ref_top_p_keep, safe_top_p

from jaxinfer import sampling
from jaxinfer.backends.pallas import sampling as ps
from jaxinfer.backends.pallas.merge import force_triton_lowering
from jaxinfer.sampling import RowParams, SamplerSpec

SMALL = ps.SamplingConfig(block=16, num_warps=4)
N = 4000
P_MIN = 1e-3


def _params(rows, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0):
    return sampling._params(rows, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)


# One jitted function per kernel (static spec/config), so that cases of equal shapes share a compile.
_sample_jit = jax.jit(ps.sample, static_argnames=("spec", "config"))
_threshold_jit = jax.jit(ps.threshold, static_argnames=("criterion", "logits", "config"))


def _sample(x, spec, params, rows, key, config=SMALL):
    keys = sampling.row_keys(rows.shape[0], key=key)
    return np.asarray(_sample_jit(jnp.asarray(x), jnp.asarray(rows, jnp.int32), jax.random.key_data(keys), params, spec=spec,
                                  config=config))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def test_threefry_known_answers():
    """Random123's known-answer vectors of Threefry-2x32-20."""
    cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
    for (k0, k1), (c0, c1), want in cases:
        assert tuple(int(v) for v in ps.threefry2x32(k0, k1, c0, c1)) == want


def test_float_key_is_order_preserving():
    rng = np.random.default_rng(0)
    # (no denormals: XLA flushes them to zero, and so does the key)
    x = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500), [0.0, -0.0, np.inf, -np.inf, 2e-38, -2e-38]])
    x = x.astype(np.float32)
    k = np.asarray(ps.float_key(jnp.asarray(x)))
    i, j = np.meshgrid(np.arange(x.size), np.arange(x.size))
    np.testing.assert_array_equal(k[i] < k[j], x[i] < x[j])
    np.testing.assert_array_equal(k[i] == k[j], x[i] == x[j])
    np.testing.assert_array_equal(np.asarray(ps.key_float(jnp.asarray(k))), x + np.float32(0.0))


# ------------------------------------------------------------------------------------------------
# Threshold kernel: exact
# ------------------------------------------------------------------------------------------------


def _threshold(x, param, criterion, logits, config=SMALL):
    return np.asarray(_threshold_jit(jnp.asarray(x), jnp.asarray(param), criterion=criterion, logits=logits, config=config))


def test_threshold_top_k_exact():
    rng = np.random.default_rng(1)
    rows, vocab = 8, 100
    levels = rng.integers(1, 9, size=(rows, vocab)).astype(np.float32)  # many ties
    logits = np.log(levels / levels.sum(axis=1, keepdims=True))
    logits[2, :40] = -np.inf  # masked vocabulary
    logits[3] = rng.standard_normal(vocab) * 50  # wide, distinct, both signs
    sorted_desc = -np.sort(-logits, axis=1)
    top_k = np.array([int(np.flatnonzero(sorted_desc[0] == sorted_desc[0, 5])[-1]) + 1, 1, 30, 77, 0, vocab, 99, 2], np.int32)
    t = _threshold(logits, top_k, "top_k", True)
    for r in range(rows):
        keep = ref_top_k_keep(logits[r].astype(np.float64), int(top_k[r]))
        np.testing.assert_array_equal(logits[r] >= t[r], keep, err_msg=f"row {r} k={top_k[r]}")


def test_threshold_top_p_exact():
    rng = np.random.default_rng(2)
    rows, vocab = 8, 100
    probs = np.stack([llm_like_probs(rng, vocab, ties=r % 2 == 0) for r in range(rows)])
    probs[5, :30] = 0.0
    top_p = np.array([safe_top_p(probs[r].astype(np.float64), rng) for r in range(rows)], np.float32)
    top_p[0], top_p[1] = 0.0, 1.0
    t = _threshold(probs, top_p, "top_p", False)
    for r in range(rows):
        want = ref_dist(probs[r], top_p=float(top_p[r])) > 0
        got = probs[r] >= t[r]
        if top_p[r] < 1:
            np.testing.assert_array_equal(got & (probs[r] > 0), want, err_msg=f"row {r} top_p={top_p[r]}")
        else:
            assert got.all()


def test_public_masks_match_xla():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((6, 300)) * 3, jnp.bfloat16)
    top_k = np.array([1, 5, 50, 0, 299, 17], np.int32)
    np.testing.assert_array_equal(np.asarray(sampling.top_k_mask_logits(logits, top_k, backend="pallas"), np.float32),
                                  np.asarray(sampling.top_k_mask_logits(logits, top_k, backend="xla"), np.float32))
    probs = sampling.softmax(logits)
    top_p = np.array([safe_top_p(np.asarray(probs[r], np.float64), rng) for r in range(6)], np.float32)
    for fn, param in ((sampling.top_k_renorm_probs, top_k), (sampling.top_p_renorm_probs, top_p)):
        a, b = np.asarray(fn(probs, param, backend="xla")), np.asarray(fn(probs, param, backend="pallas"))
        np.testing.assert_array_equal(a > 0, b > 0)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Sampling kernel: distributions and support
# ------------------------------------------------------------------------------------------------

CASES = [
    ("plain", SamplerSpec(), {}),
    ("top_p", SamplerSpec(top_p=True), {"top_p": "safe"}),
    ("top_k", SamplerSpec(top_k=True), {"top_k": 12}),
    ("min_p", SamplerSpec(min_p=True), {"min_p": 0.1}),
    ("top_k_first", SamplerSpec(top_k=True, top_p=True), {"top_k": 25, "top_p": "safe"}),
    ("joint", SamplerSpec(top_k=True, top_p=True, joint=True), {"top_k": 25, "top_p": "safe"}),
]


# Ties matter where a filter has a threshold to tie with.
DIST = [pytest.param(*c, ties, id=f"{c[0]}-{'ties' if ties else 'distinct'}") for c in CASES for ties in (False, True)
        if ties or c[1].top_k or c[1].top_p]


@pytest.mark.parametrize("name,spec,kw,ties", DIST)
def test_sample_probs_distribution(name, spec, kw, ties):
    rng = np.random.default_rng(10 + ties)
    vocab = 100
    probs = llm_like_probs(rng, vocab, ties=ties) * np.float32(0.7)  # unnormalized rows are fine
    kw = dict(kw)
    if kw.get("top_p") == "safe":
        base = ref_dist(probs, top_k=kw["top_k"]) if "top_k" in kw and not spec.joint else probs.astype(np.float64)
        kw["top_p"] = safe_top_p(base, rng)
    target = ref_dist(probs, joint=spec.joint, **kw)
    # A key fixed across processes (str hash() is salted per process), so a case's chi-square test
    # passes or fails the same way on every run rather than failing one run in a thousand.
    key = jax.random.key(zlib.crc32(name.encode()))
    tokens = _sample(probs[None], spec, _params(1, **kw), np.zeros(N), key)
    assert chi2_pvalue(tokens, target) > P_MIN


@pytest.mark.parametrize("scale", [1.0, 1.6, 0.3])
@pytest.mark.parametrize("name,spec,kw", [c for c in CASES if c[0] in ("top_p", "top_k", "joint")])
def test_sample_probs_any_scale(name, spec, kw, scale):
    """Rows summing to 1 (the early-exit draw ends inside the row), above ``Z_BOUND`` (its
    candidate is discarded by the first round) and far below it (it falls back to the reservoir
    draw most of the time): the same distribution."""
    rng = np.random.default_rng(30)
    vocab = 100
    probs = llm_like_probs(rng, vocab) * np.float32(scale)
    kw = dict(kw)
    if kw.get("top_p") == "safe":
        kw["top_p"] = safe_top_p(probs.astype(np.float64), rng)
    target = ref_dist(probs, joint=spec.joint, **kw)
    tokens = _sample(probs[None], spec, _params(1, **kw), np.zeros(N), jax.random.key(int(scale * 10) + len(name)))
    assert chi2_pvalue(tokens, target) > P_MIN


@pytest.mark.parametrize("order", ["top_k_first", "joint"])
def test_sample_logits_distribution(order):
    """Logits rising across the row (the online maximum changes block after block), masked -inf
    entries, a temperature and two rows with their own parameters."""
    rng = np.random.default_rng(20)
    vocab = 120
    logits = np.stack([np.sort(rng.standard_normal(vocab) * 2).astype(np.float32), rng.standard_normal(vocab).astype(np.float32) * 3])
    logits[1, rng.choice(vocab, 30, replace=False)] = -np.inf
    temperature = np.array([0.7, 1.3], np.float32)
    top_k = np.array([40, 15], np.int32)
    p = [ref_softmax(logits[r], temperature[r]) for r in range(2)]
    top_p = np.array([safe_top_p(p[r] if order == "joint" else ref_dist(p[r], top_k=int(top_k[r])), rng) for r in range(2)], np.float32)
    spec = SamplerSpec(from_logits=True, top_k=True, top_p=True, joint=order == "joint")
    rows = np.tile([0, 1], N // 2)
    tokens = _sample(logits, spec, _params(2, top_k=top_k, top_p=top_p, temperature=temperature), rows, jax.random.key(3))
    for r in range(2):
        target = ref_dist(p[r], top_k=int(top_k[r]), top_p=float(top_p[r]), joint=order == "joint")
        assert chi2_pvalue(tokens[r::2], target) > P_MIN


def test_sample_extremes_pick_the_maximum():
    """top_k = 1, top_p = 0 and min_p = 1 keep only the largest entries (ties sampled)."""
    rng = np.random.default_rng(30)
    levels = rng.integers(1, 6, size=(4, 70)).astype(np.float32)
    rows = np.repeat(np.arange(4), 50)
    for spec, params in ((SamplerSpec(top_k=True), _params(4, top_k=1)), (SamplerSpec(top_p=True), _params(4, top_p=0.0)),
                         (SamplerSpec(min_p=True), _params(4, min_p=1.0)),
                         (SamplerSpec(top_k=True, top_p=True), _params(4, top_k=3, top_p=0.0))):
        tokens = _sample(levels, spec, params, rows, jax.random.key(0))
        assert (levels[rows, tokens] == levels.max(axis=1)[rows]).all(), spec


def test_top_p_exact_boundary():
    """Dyadic rows (exact in float32), spread over blocks: a token whose larger tokens hold exactly
    top_p is dropped (FlashInfer's ``mass above < top_p``), by both kernels."""
    probs = np.zeros((2, 40), np.float32)
    probs[:, [3, 17, 22, 38]] = [0.125, 0.5, 0.125, 0.25]
    top_p = np.array([0.75, 0.5], np.float32)
    t = _threshold(probs, top_p, "top_p", False)
    np.testing.assert_array_equal(probs >= t[:, None], probs >= np.array([[0.25], [0.5]]))
    tokens = _sample(probs, SamplerSpec(top_p=True), _params(2, top_p=top_p), np.repeat([0, 1], 200), jax.random.key(2))
    assert set(tokens[:200].tolist()) == {17, 38} and set(tokens[200:].tolist()) == {17}


def test_sample_deterministic_and_batch_independent():
    rng = np.random.default_rng(40)
    probs = np.stack([llm_like_probs(rng, 90) for _ in range(5)])
    spec, params = SamplerSpec(top_k=True, top_p=True), _params(5, top_k=20, top_p=0.8)
    keys = sampling.row_keys(5, seed=np.arange(5), offset=3)
    def run(rows, k):
        return np.asarray(_sample_jit(probs, jnp.asarray(rows, jnp.int32), jax.random.key_data(k), params, spec=spec, config=SMALL))

    a = run(np.arange(5), keys)
    np.testing.assert_array_equal(a, run(np.arange(5), keys))
    perm = np.array([3, 0, 4, 1, 2])
    b = run(perm, keys[perm])
    np.testing.assert_array_equal(b, a[perm])


def test_sample_row_without_mass():
    """A row of zeros has no distribution: the kernel returns V - 1 (as FlashInfer) instead of
    running away."""
    probs = np.zeros((2, 50), np.float32)
    probs[1, 7] = 1.0
    for spec in (SamplerSpec(), SamplerSpec(top_k=True, top_p=True)):
        tokens = _sample(probs, spec, _params(2, top_k=3, top_p=0.5), np.array([0, 1]), jax.random.key(1))
        np.testing.assert_array_equal(tokens, [49, 7])


def test_public_api_on_pallas():
    rng = np.random.default_rng(50)
    logits = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    t = np.array([0.0, 1.0, 0.5], np.float32)
    tok = np.asarray(sampling.top_k_top_p_sampling_from_logits(logits, 5, 0.9, key=jax.random.key(0), temperature=t, backend="pallas"))
    assert tok[0] == int(jnp.argmax(logits[0].astype(jnp.float32)))
    x = np.asarray(logits, np.float64)
    for r in (1, 2):
        assert ref_top_k_keep(x[r], 5)[tok[r]]
    probs = np.asarray(sampling.softmax(logits))
    out, accepted, emitted = sampling.chain_speculative_sampling(
        probs[:, None], jnp.argmax(logits, axis=1)[:, None], np.stack([probs, probs], axis=1), key=jax.random.key(1), backend="pallas")
    np.testing.assert_array_equal(emitted, [1, 1, 1])  # draft == target: always accepted
    assert (np.asarray(out)[:, 1] >= 0).all()


def test_public_rows_and_key_kinds_on_pallas():
    # Without indices output b draws from row b (no row array reaches the kernel): the same tokens
    # as indices = arange(R). Threefry keys seed the kernel with their own words (typed or raw
    # data alike); other key implementations with two words drawn from the key.
    rng = np.random.default_rng(51)
    probs = np.stack([llm_like_probs(rng, 300) for _ in range(6)])
    top_p = np.array([safe_top_p(p, rng) for p in probs], np.float32)
    key = jax.random.key(3)

    def draw(key, **kw):
        return np.asarray(sampling.top_p_sampling_from_probs(probs, top_p, key=key, backend="pallas", **kw))

    plain = draw(key)
    np.testing.assert_array_equal(plain, draw(key, indices=jnp.arange(6)))
    np.testing.assert_array_equal(plain, draw(jax.random.key_data(key)))
    rbg = draw(jax.random.key(3, impl="rbg"))
    np.testing.assert_array_equal(rbg, draw(jax.random.key(3, impl="rbg")))
    for r in range(6):
        keep = ref_top_p_keep(probs[r].astype(np.float64), float(top_p[r]))
        assert keep[plain[r]] and keep[rbg[r]]


# ------------------------------------------------------------------------------------------------
# Deviceless Triton lowering under an abstract H100
# ------------------------------------------------------------------------------------------------

S = jax.ShapeDtypeStruct


def _export_cuda(f, *args):
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
        exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                                disabled_checks=[DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*args)
    text = exp.mlir_module()
    assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 1
    return text


LOWER_SPECS = [SamplerSpec(), SamplerSpec(top_p=True), SamplerSpec(top_k=True), SamplerSpec(min_p=True),
               SamplerSpec(top_k=True, top_p=True), SamplerSpec(top_k=True, top_p=True, joint=True),
               SamplerSpec(from_logits=True), SamplerSpec(from_logits=True, top_k=True, top_p=True),
               SamplerSpec(from_logits=True, top_k=True, top_p=True, joint=True)]


@pytest.mark.parametrize("spec", LOWER_SPECS, ids=lambda s: "-".join(f.name for f in __import__("dataclasses").fields(s) if getattr(s, f.name)) or "plain")
@pytest.mark.parametrize("vocab,batch,dtype,indexed", [(32000, 1, jnp.float32, False), (151936, 512, jnp.bfloat16, True),
                                                        (262144, 64, jnp.float16, True)])
def test_sample_lowers(spec, vocab, batch, dtype, indexed):
    rows = max(1, batch // 2) if indexed else batch
    params = RowParams(S((rows,), jnp.int32), S((rows,), jnp.float32), S((rows,), jnp.float32), S((rows,), jnp.float32))
    if indexed:
        _export_cuda(lambda x, r, k, p: ps.sample(x, r, k, p, spec=spec), S((rows, vocab), dtype), S((batch,), jnp.int32),
                     S((batch, 2), jnp.uint32), params)
    else:
        _export_cuda(lambda x, k, p: ps.sample(x, None, k, p, spec=spec), S((rows, vocab), dtype), S((batch, 2), jnp.uint32), params)


@pytest.mark.parametrize("criterion,param_dtype,logits", [("top_k", jnp.int32, True), ("top_k", jnp.int32, False),
                                                          ("top_p", jnp.float32, False)])
@pytest.mark.parametrize("vocab,dtype", [(128256, jnp.bfloat16), (262144, jnp.float32)])
def test_threshold_lowers(criterion, param_dtype, logits, vocab, dtype):
    _export_cuda(lambda x, p: ps.threshold(x, p, criterion=criterion, logits=logits), S((16, vocab), dtype), S((16,), param_dtype))


def test_sample_rejects_int32_overflow():
    params = RowParams(S((9000,), jnp.int32), S((9000,), jnp.float32), S((9000,), jnp.float32), S((9000,), jnp.float32))
    with pytest.raises(ValueError, match="R \\* V"):
        jax.eval_shape(lambda x, r, k, p: ps.sample(x, r, k, p, spec=SamplerSpec()), S((9000, 262144), jnp.bfloat16),
                       S((1,), jnp.int32), S((1, 2), jnp.uint32), params)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 262144])
@pytest.mark.parametrize("batch", [1, 512])
def test_gpu_sample_support_large(vocab, batch):
    """Full-size rows on the GPU: every token lies in the float32 reference's kept set."""
    rng = np.random.default_rng(vocab + batch)
    logits = jnp.asarray(rng.standard_normal((batch, vocab)) * 3, jnp.bfloat16)
    top_k = jnp.asarray(rng.integers(0, 200, batch), jnp.int32)
    top_p = jnp.asarray(rng.uniform(0.05, 1.0, batch), jnp.float32)
    temperature = jnp.asarray(rng.uniform(0.3, 1.5, batch), jnp.float32)
    for order in ("top_k_first", "joint"):
        spec = SamplerSpec(from_logits=True, top_k=True, top_p=True, joint=order == "joint")
        params = sampling._params(batch, top_k=top_k, top_p=top_p, temperature=temperature)
        w = sampling._weights(logits, params.temperature, True)
        kept = np.asarray(sampling._keep_mask(spec, w, params))
        tok = np.asarray(sampling.top_k_top_p_sampling_from_logits(logits, top_k, top_p, filter_apply_order=order,
                                                                   key=jax.random.key(0), temperature=temperature, backend="pallas"))
        assert (~kept[np.arange(batch), tok]).sum() <= max(1, batch // 100), order  # float32 sums at the top-p edge


@pytest.mark.gpu
def test_gpu_threshold_large():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.standard_normal((64, 151936)) * 3, jnp.bfloat16)
    top_k = jnp.asarray(rng.integers(1, 5000, 64), jnp.int32)
    np.testing.assert_array_equal(np.asarray(sampling.top_k_mask_logits(logits, top_k, backend="pallas"), np.float32),
                                  np.asarray(sampling.top_k_mask_logits(logits, top_k, backend="xla"), np.float32))
