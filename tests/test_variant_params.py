"""Variant parameters (``AttentionVariant(takes_params=True)`` and ``run(..., variant_params=)``).

The callables of a ``takes_params`` variant get the rows' slices of a pytree of arrays as their
last argument (jaxinfer/variants.py). Checked: the params path equals the same variant written
with constants (arithmetic on ``qo_head``) and the float64 reference, on the reference and Pallas
(interpret mode, split-KV so that the merge kernel's output transform loads params too) engines;
new param values under one ``jax.jit`` never retrace; bad params raise; fa2/fa3 decline callables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, make_paged_kv, rand
from ref64 import ref_batch

import jaxinfer
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant

F16 = jnp.float16
HQ, HKV, D = 4, 2, 32
SPLIT = PallasBackend(num_ctas=64, split_factor=16, config=TileConfig(16, 16, 4, 1), min_chunk=16)


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


# Per-head values as constants: arithmetic on qo_head (what a variant could do before params) ...
def _slope(qh):
    return 0.05 * (qh + 1)


def _gate(qh):
    return 1.0 - 0.1 * qh


CONSTANTS = AttentionVariant(
    logits_transform=lambda x, qp, kp, qh, kh: x - _slope(qh) * (qp - kp),
    logits_mask=lambda qp, kp, qh, kh: (kp % 5 != 2) | (qh % 2 == 0),
    query_transform=lambda q: q * 0.5,
    output_transform=lambda o, lse, qp, qh: o * _xp(o).tanh(_gate(qh) + 0.1 * lse)[..., None],
)
# ... and the same variant with the values as arrays: [Hq] slopes and gates, a [Hq, D] query
# scale, a scalar and an int [Hq] mask phase.
PARAMS = AttentionVariant(
    takes_params=True,
    logits_transform=lambda x, qp, kp, qh, kh, p: x - p["slope"] * (qp - kp),
    logits_mask=lambda qp, kp, qh, kh, p: (kp % 5 != 2) | (p["phase"] == 0),
    query_transform=lambda q, p: q * p["q_scale"] * p["half"],
    output_transform=lambda o, lse, qp, qh, p: o * _xp(o).tanh(p["gate"] + 0.1 * lse)[..., None],
)


def _params(h=HQ, d=D):
    heads = np.arange(h)
    return {"slope": jnp.asarray(_slope(heads), jnp.float32), "gate": jnp.asarray(_gate(heads), jnp.float32),
            "q_scale": jnp.ones((h, d), jnp.float32), "half": jnp.float32(0.5),
            "phase": jnp.asarray(heads % 2, jnp.int32)}


@pytest.mark.parametrize("engine", ["xla", "pallas"])
def test_params_equal_constants(rng, engine):
    qo_lens, kv_lens = np.array([1, 1, 6, 1]), np.array([70, 0, 40, 33])
    kv = make_paged_kv(rng, kv_lens, 4, HKV, D, F16)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q = rand(rng, (int(qo_indptr[-1]), HQ, D), F16)
    outs = []
    for variant, params in ((CONSTANTS, None), (PARAMS, _params())):
        v = variant.replace(causal=True, logits_soft_cap=8.0)
        spec = BatchSpec.create(qo_indptr, kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, page_size=4,
                                num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, variant=v, q_dtype=F16)
        be = SPLIT if engine == "pallas" else jaxinfer.backends.get_backend("xla")
        plan = be.plan(spec, PlanCapacity())
        if engine == "pallas":
            assert int(np.diff(plan.unpack()["merge_indptr"]).max(initial=1)) >= 2  # the merge kernel runs
        checked = None if params is None else jaxinfer.variants.check_variant_params(v, params, HQ)
        run = jax.jit(lambda p, q, k, c, prm: be.run(p, q, k, c, return_lse=True, variant_params=prm))
        outs.append(run(plan, q, *kv.cache, checked))
        want_o, want_lse = ref_batch(q, kv.k_list, kv.v_list, qo_indptr, variant=v, variant_params=params)
        assert_close(outs[-1][0], want_o, F16)
        assert_close(outs[-1][1], want_lse, F16, "lse")
    np.testing.assert_allclose(np.asarray(outs[0][0], np.float32), np.asarray(outs[1][0], np.float32), atol=2e-3)


def test_new_params_never_retrace(rng):
    """New param values (and new sinks) under one jit: one trace, and the outputs follow them."""
    kv = make_paged_kv(rng, [20, 7], 4, HKV, D, F16)
    q = rand(rng, (2, HQ, D), F16)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(None, backend="xla")
    plan = w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, HQ, HKV, D, 4, q_data_type=F16, variant=PARAMS)
    traces = []

    @jax.jit
    def step(q, cache, plan, params, sinks):
        traces.append(1)
        return jaxinfer.batch_decode(q, cache, plan, variant_params=params, sinks=sinks)

    a = step(q, kv.cache, plan, _params(), jnp.zeros(HQ))
    p2 = dict(_params(), slope=jnp.full(HQ, 0.3, jnp.float32))
    b = step(q, kv.cache, plan, p2, jnp.ones(HQ))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32))
    want, _ = ref_batch(q, kv.k_list, kv.v_list, [0, 1, 2], variant=PARAMS, variant_params=p2, sinks=np.ones(HQ))
    assert_close(b, want, F16)


def test_bad_params():
    q, k = jnp.zeros((1, HQ, D), F16), jnp.zeros((3, HKV, D), F16)

    def run(variant, params):
        return jaxinfer.single_prefill_with_kv_cache(q, k, k, variant=variant, variant_params=params, backend="xla")

    with pytest.raises(ValueError, match="variant_params"):
        run(CONSTANTS, _params())  # the variant takes no params
    with pytest.raises(ValueError, match="variant_params"):
        run(PARAMS, None)  # params missing
    with pytest.raises(ValueError, match=r"variant_params\['slope'\]"):
        run(PARAMS, dict(_params(), slope=jnp.zeros(HQ + 1)))
    with pytest.raises(ValueError, match=r"variant_params\['gate'\]"):
        run(PARAMS, dict(_params(), gate=jnp.zeros(HQ, bool)))
    with pytest.raises(ValueError, match="takes_params"):
        AttentionVariant(takes_params=True, key_transform=lambda k: k)  # key_transform takes no params
    with pytest.raises(ValueError, match="power of 2"):
        jaxinfer.single_prefill_with_kv_cache(q, k, k, variant=PARAMS, backend="pallas",
                                              variant_params=dict(_params(), q_scale=jnp.ones((HQ, 3))))


def test_ffi_backends_decline_callables():
    spec = BatchSpec.create(np.array([0, 1]), np.array([0, 5]), None, None, page_size=1, num_qo_heads=HQ,
                            num_kv_heads=HKV, head_dim=64, variant=PARAMS, q_dtype=jnp.bfloat16)
    for name in ("fa2", "fa3"):
        assert "user callables" in jaxinfer.backends.get_backend(name).capabilities.unsupported(spec)
