"""single_decode_with_kv_cache and single_prefill_with_kv_cache against the float64 reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, DECODE_OPTIONS, PREFILL_OPTIONS, assert_close, case_grid, jit_call, rand
from ref64 import ref_attention

BF16, FP16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (num_qo_heads, num_kv_heads, head_dim, kv_layout, dtype): GQA ratios 1/4/8, both layouts and
# head dims, every dtype.
GEOMS = [
    (4, 4, 64, "NHD", BF16),
    (8, 2, 128, "HND", FP16),
    (8, 1, 64, "NHD", F32),
    (16, 2, 128, "NHD", BF16),
    (4, 1, 64, "HND", F32),
]

def _kv(rng, kv_len, hkv, d, dtype, layout):
    k, v = rand(rng, (kv_len, hkv, d), dtype), rand(rng, (kv_len, hkv, d), dtype)
    if layout == "HND":
        return k, v, jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
    return k, v, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom,kv_len,options", case_grid(GEOMS, DECODE_OPTIONS, [1, 37, 300]))
def test_single_decode(rng, backend, geom, kv_len, options):
    hq, hkv, d, layout, dtype = geom
    q = rand(rng, (hq, d), dtype)
    k, v, k_in, v_in = _kv(rng, kv_len, hkv, d, dtype, layout)
    o, lse = jit_call(
        jaxinfer.single_decode_with_kv_cache, q, k_in, v_in, kv_layout=layout, return_lse=True, backend=backend,
        **options,
    )
    want_o, want_lse = ref_attention(q[None], k, v, **options)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    assert_close(o, want_o[0], dtype, "o")
    assert_close(lse, want_lse[0], dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_decode_without_lse_and_empty_kv(rng, backend):
    q = rand(rng, (8, 64), BF16)
    k, v, _, _ = _kv(rng, 20, 2, 64, BF16, "NHD")
    o = jaxinfer.single_decode_with_kv_cache(q, k, v, backend=backend)
    assert not isinstance(o, tuple) and o.shape == (8, 64)
    assert_close(o, ref_attention(q[None], k, v)[0][0], BF16)
    o, lse = jaxinfer.single_decode_with_kv_cache(q, k[:0], v[:0], return_lse=True, backend=backend)
    assert_close(o, np.zeros((8, 64)), BF16, "o")
    assert_close(lse, np.full((8,), -np.inf), BF16, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom,lens,options", case_grid(GEOMS, PREFILL_OPTIONS, [(1, 1), (17, 45), (64, 300), (9, 4)]))
def test_single_prefill(rng, backend, geom, lens, options):
    hq, hkv, d, layout, dtype = geom
    qo_len, kv_len = lens
    q = rand(rng, (qo_len, hq, d), dtype)
    k, v, k_in, v_in = _kv(rng, kv_len, hkv, d, dtype, layout)
    o, lse = jit_call(
        jaxinfer.single_prefill_with_kv_cache, q, k_in, v_in, kv_layout=layout, return_lse=True, backend=backend,
        **options,
    )
    want_o, want_lse = ref_attention(q, k, v, **options)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_single_prefill_custom_mask(rng, backend, causal, dtype):
    qo_len, kv_len = 13, 40
    q = rand(rng, (qo_len, 8, 64), dtype)
    k, v, _, _ = _kv(rng, kv_len, 2, 64, dtype, "NHD")
    mask = rng.random((qo_len, kv_len)) < 0.5
    mask[3] = False  # a row with no visible key
    o, lse = jaxinfer.single_prefill_with_kv_cache(
        q, k, v, custom_mask=jnp.asarray(mask), causal=causal, return_lse=True, backend=backend
    )
    want_o, want_lse = ref_attention(q, k, v, custom_mask=mask, causal=causal)
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")
    o2 = jaxinfer.single_prefill_with_kv_cache(q, k, v, custom_mask=jnp.asarray(mask), causal=causal, backend=backend)
    assert not isinstance(o2, tuple)
    np.testing.assert_array_equal(np.asarray(o2, np.float32), np.asarray(o, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_prefill_variant_callables(rng, backend):
    """A user variant (sigmoid-style logits transform + logits mask) reaches the kernel."""
    variant = jaxinfer.variants.AttentionVariant(
        logits_transform=lambda x, qp, kp, qh, kh: x + 0.05 * qh,
        logits_mask=lambda qp, kp, qh, kh: (kp + qh) % 3 != 1,
        causal=True,
    )
    q = rand(rng, (11, 4, 64), F32)
    k, v, _, _ = _kv(rng, 23, 2, 64, F32, "NHD")
    o, lse = jit_call(jaxinfer.single_prefill_with_kv_cache, q, k, v, variant=variant, return_lse=True, backend=backend)
    want_o, want_lse = ref_attention(q, k, v, variant=variant)
    assert_close(o, want_o, F32, "o")
    assert_close(lse, want_lse, F32, "lse")
