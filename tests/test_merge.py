"""merge_state, merge_states and merge_state_in_place against the float64 merge formula."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, assert_close, rand
from ref64 import ref_attention, ref_merge

BF16, FP16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
MERGE_BACKENDS = list(dict.fromkeys(["auto", *BACKENDS]))


def _lse(rng, shape, p_minus_inf: float = 0.25):
    """Random base-2 lse values (spread over +-20) with some -inf states."""
    s = (rng.standard_normal(shape) * 8).astype(np.float32)
    s[rng.random(shape) < p_minus_inf] = -np.inf
    return jnp.asarray(s)


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP16, F32])
def test_merge_state(rng, backend, dtype):
    L, H, D = 37, 4, 64
    v_a, v_b = rand(rng, (L, H, D), dtype), rand(rng, (L, H, D), dtype)
    s_a, s_b = _lse(rng, (L, H)), _lse(rng, (L, H))
    s_b = s_b.at[0].set(-jnp.inf).at[1].set(s_a[1])  # row 0: b empty; row 1: equal lse
    s_a = s_a.at[2].set(-jnp.inf)
    s_b = s_b.at[2, 0].set(-jnp.inf).at[2, 1].set(3.0)  # row 2: head 0 both empty, head 1 only b
    v, s = jaxinfer.merge_state(v_a, s_a, v_b, s_b, backend=backend)
    want_v, want_s = ref_merge([v_a, v_b], [s_a, s_b])
    assert v.dtype == dtype and s.dtype == jnp.float32
    assert_close(v, want_v, dtype, "v")
    assert_close(s, want_s, F32, "s")
    assert np.asarray(s)[2, 0] == -np.inf and not np.asarray(v, np.float32)[2, 0].any()


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("dtype,n", [(BF16, 3), (F32, 7), (FP16, 1)])
def test_merge_states(rng, backend, dtype, n):
    L, H, D = 29, 8, 128
    v = rand(rng, (L, n, H, D), dtype)
    s = _lse(rng, (L, n, H))
    s = s.at[5].set(-jnp.inf)  # a row with only empty states
    out_v, out_s = jaxinfer.merge_states(v, s, backend=backend)
    want_v, want_s = ref_merge([v[:, i] for i in range(n)], [s[:, i] for i in range(n)])
    assert out_v.shape == (L, H, D) and out_s.shape == (L, H)
    assert_close(out_v, want_v, dtype, "v")
    assert_close(out_s, want_s, F32, "s")


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_merge_state_in_place(rng, backend, use_mask):
    L, H, D, dtype = 19, 4, 64, BF16
    v, v_o = rand(rng, (L, H, D), dtype), rand(rng, (L, H, D), dtype)
    s, s_o = _lse(rng, (L, H)), _lse(rng, (L, H))
    mask = rng.random(L) < 0.5 if use_mask else None
    got_v, got_s = jaxinfer.merge_state_in_place(
        v, s, v_o, s_o, None if mask is None else jnp.asarray(mask), backend=backend
    )
    want_v, want_s = ref_merge([v, v_o], [s, s_o])
    if mask is not None:
        want_v = np.where(mask[:, None, None], want_v, np.asarray(v, np.float64))
        want_s = np.where(mask[:, None], want_s, np.asarray(s, np.float64))
    assert_close(got_v, want_v, dtype, "v")
    assert_close(got_s, want_s, F32, "s")


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merged_partial_attention_equals_full_attention(rng, backend):
    """States of attention over disjoint KV chunks merge into attention over all of it."""
    q = rng.standard_normal((6, 4, 64))
    k, v = rng.standard_normal((50, 2, 64)), rng.standard_normal((50, 2, 64))
    chunks = [(0, 13), (13, 13), (13, 40), (40, 50)]  # includes an empty chunk (-inf states)
    states = [ref_attention(q, k[a:b], v[a:b]) for a, b in chunks]
    vs = jnp.asarray(np.stack([o for o, _ in states], axis=1), F32)
    ss = jnp.asarray(np.stack([s for _, s in states], axis=1), F32)
    out_v, out_s = jaxinfer.merge_states(vs, ss, backend=backend)
    want_v, want_s = ref_attention(q, k, v)
    assert_close(out_v, want_v, F32, "v")
    assert_close(out_s, want_s, F32, "s")


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_empty_states_values_are_never_read(rng, backend):
    """States with lse = -inf contribute nothing even when their values hold inf or NaN (they
    are what an attention pass over no visible key may leave); rows of only such states give
    (0, -inf)."""
    L, n, H, D = 11, 3, 2, 32
    v = rand(rng, (L, n, H, D), F32)
    s = np.asarray(_lse(rng, (L, n, H), p_minus_inf=0.4)).copy()
    s[0] = -np.inf  # a row of only empty states
    s[1, :2] = -np.inf  # one live state
    s[1, 2] = 1.5
    empty = s == -np.inf
    poison = rng.choice(np.array([np.inf, -np.inf, np.nan], np.float32), size=v.shape)
    v_bad = jnp.asarray(np.where(empty[..., None], poison, np.asarray(v)))
    s = jnp.asarray(s)
    want_v, want_s = ref_merge([v[:, i] for i in range(n)], [s[:, i] for i in range(n)])
    out_v, out_s = jaxinfer.merge_states(v_bad, s, backend=backend)
    assert_close(out_v, want_v, F32, "merge_states v")
    assert_close(out_s, want_s, F32, "merge_states s")
    assert not np.asarray(out_v)[0].any()
    want_v, want_s = ref_merge([v[:, 0], v[:, 1]], [s[:, 0], s[:, 1]])
    out_v, out_s = jaxinfer.merge_state(v_bad[:, 0], s[:, 0], v_bad[:, 1], s[:, 1], backend=backend)
    assert_close(out_v, want_v, F32, "merge_state v")
    assert_close(out_s, want_s, F32, "merge_state s")
    out_v, out_s = jaxinfer.merge_state_in_place(v_bad[:, 0], s[:, 0], v_bad[:, 1], s[:, 1], backend=backend)
    assert_close(out_v, want_v, F32, "merge_state_in_place v")
