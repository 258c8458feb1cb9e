"""Pallas merge-state kernels (interpret mode here) against the float64 reference ``ref_merge``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rand
from ref64 import ref_merge

from jaxinfer.backends.pallas.merge import merge_state, merge_states


def _lse(rng, shape, frac_neg_inf=0.2):
    """Base-2 LSEs in a realistic range, some ``-inf`` (states that saw no key)."""
    s = rng.uniform(-20.0, 20.0, size=shape).astype(np.float32)
    s[rng.random(shape) < frac_neg_inf] = -np.inf
    return jnp.asarray(s)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_merge_state(rng, dtype):
    L, H, D = 37, 3, 64
    v_a, v_b = rand(rng, (L, H, D), dtype), rand(rng, (L, H, D), dtype)
    s_a, s_b = _lse(rng, (L, H)), _lse(rng, (L, H))
    s_a = s_a.at[0].set(-jnp.inf)
    s_b = s_b.at[0].set(-jnp.inf)  # row 0: both empty -> (0, -inf)
    v, s = merge_state(v_a, s_a, v_b, s_b)
    v_ref, s_ref = ref_merge([v_a, v_b], [s_a, s_b])
    assert v.dtype == dtype and s.dtype == jnp.float32
    assert_close(v, v_ref, dtype, "v")
    assert_close(s, s_ref, jnp.float32, "s")
    assert np.all(np.asarray(v[0], np.float64) == 0.0)


@pytest.mark.parametrize("n,d", [(1, 32), (5, 96), (12, 128)])
def test_merge_states(rng, n, d):
    L, H = 21, 4
    v = rand(rng, (L, n, H, d), jnp.bfloat16)
    s = _lse(rng, (L, n, H))
    out_v, out_s = merge_states(v, s)
    v_ref, s_ref = ref_merge([v[:, i] for i in range(n)], [s[:, i] for i in range(n)])
    assert_close(out_v, v_ref, jnp.bfloat16, "v")
    assert_close(out_s, s_ref, jnp.float32, "s")


def test_merge_states_rejects_bad_shapes(rng):
    with pytest.raises(ValueError, match="merge_states"):
        merge_states(rand(rng, (4, 2, 3, 8), jnp.float32), jnp.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match="merge_state"):
        merge_state(rand(rng, (4, 3, 8), jnp.float32), jnp.zeros((4, 3)), rand(rng, (4, 2, 8), jnp.float32), jnp.zeros((4, 2)))
