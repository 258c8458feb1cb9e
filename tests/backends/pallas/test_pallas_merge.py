"""Pallas merge-state kernels (interpret mode here) against the float64 reference ``ref_merge``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rand
from ref64 import ref_merge

from jaxinfer.backends.pallas.merge import merge_partials, merge_state, merge_states
from jaxinfer.plan.layout import MERGE_FIELDS


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


def test_merge_partials_skips_values_of_empty_partials(rng):
    """Split-KV partial rows with lse = -inf (a chunk none of whose keys the row sees) add
    nothing to the merge even when their values hold inf or NaN."""
    assert MERGE_FIELDS == ("kv_head", "q_row0", "q_len", "q_pos0")  # the dest rows below
    block_m, g, hq, d, nnz_q = 16, 2, 4, 32, 9
    # Group 0: KV head 0, tokens 0..7, partial slots 0..2; group 1: KV head 1, tokens 3..8, slots 3..4.
    indptr = [0, 3, 5]
    dest = [(0, 0, 8, 0), (1, 3, 6, 0)]
    buffer = jnp.asarray(np.concatenate([indptr, np.ravel(dest)]).astype(np.int32))
    slots = indptr[-1]
    po = np.asarray(rand(rng, (slots * block_m, d), jnp.float32)).copy()
    plse = rng.uniform(-10.0, 10.0, slots * block_m).astype(np.float32)
    plse[rng.random(plse.size) < 0.4] = -np.inf
    plse[0 * block_m + 5] = plse[1 * block_m + 5] = plse[2 * block_m + 5] = -np.inf  # a row with no keys at all
    empty = plse == -np.inf
    poison = rng.choice(np.array([np.inf, -np.inf, np.nan], np.float32), size=po.shape)
    po_bad = np.where(empty[:, None], poison, po)
    o0 = jnp.full((nnz_q * hq, d), 7.0, jnp.float32)
    lse0 = jnp.full((nnz_q * hq,), 7.0, jnp.float32)
    run = jax.jit(lambda b, po, pl, o, l: merge_partials(
        b, po, pl, o, l, off_indptr=0, off_dest=len(indptr), num_groups=2, block_m=block_m, group_size=g,
        num_qo_heads=hq))
    o, lse = (np.asarray(x) for x in run(buffer, jnp.asarray(po_bad), jnp.asarray(plse), o0, lse0))
    want_o, want_lse = np.full(o.shape, 7.0), np.full(lse.shape, 7.0)
    for grp, (kv_head, q_row0, q_len, _) in enumerate(dest):
        for r in range(min(block_m, q_len * g)):
            row = (q_row0 + r // g) * hq + kv_head * g + r % g
            prows = [p * block_m + r for p in range(indptr[grp], indptr[grp + 1])]
            want_o[row], want_lse[row] = ref_merge([po[i] for i in prows], [plse[i] for i in prows])
    assert_close(o, want_o, jnp.float32, "o")
    assert_close(lse, want_lse, jnp.float32, "lse")
    assert not o[5 // g * hq + 5 % g].any() and lse[5 // g * hq + 5 % g] == -np.inf
