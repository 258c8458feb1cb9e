"""The FFI backends plan through the plan stage's native planner: their query tiles, in the order
the kernels run them, against an independent oracle (the tile list and the longest-KV-range-first
order that the fa2/fa3 kernels were measured with)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from conftest import indptr_of
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.backends.ffi.backend import BLOCK_M, get_backend
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant


def tiles_oracle(qo_lens, kv_lens, block_m, causal, window_left):
    """``(tile_batch, tile_qstart)``: every request's query tiles of ``block_m`` rows, ordered by
    the keys some row of the tile sees (causal and window clip it; bottom-right aligned), most
    first, ties in (request, tile) order."""
    batch, qstart, cost = [], [], []
    for b, (qo_len, kv_len) in enumerate(zip(qo_lens, kv_lens)):
        for qs in range(0, qo_len, block_m):
            last = min(qs + block_m, qo_len) - 1 + kv_len - qo_len
            hi = min(kv_len, last + 1) if causal else kv_len
            lo = max(0, qs + kv_len - qo_len - window_left) if window_left >= 0 else 0
            batch.append(b)
            qstart.append(qs)
            cost.append(max(hi - lo, 0))
    order = np.argsort(-np.asarray(cost, dtype=np.int64), kind="stable")
    return np.asarray(batch, np.int64)[order], np.asarray(qstart, np.int64)[order]


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 900)), min_size=0, max_size=9),
    name=st.sampled_from(["fa2", "fa3"]),
    head_dim=st.sampled_from([64, 128, 256]),
    causal=st.booleans(),
    window_left=st.sampled_from([-1, 0, 17, 300]),
    fixed=st.booleans(),
)
def test_plan_tiles_match_the_oracle(lens, name, head_dim, causal, window_left, fixed):
    qo_lens = [q for q, _ in lens]
    kv_lens = [max(k, q) if causal else k for q, k in lens]
    spec = BatchSpec.create(indptr_of(qo_lens), indptr_of(kv_lens), None, None, page_size=1, num_qo_heads=4,
                            num_kv_heads=2, head_dim=head_dim, q_dtype=jnp.float16,
                            variant=AttentionVariant(causal=causal, window_left=window_left))
    capacity = PlanCapacity(max_batch_size=16, max_qo_len=1024, max_kv_len=1024) if fixed else PlanCapacity()
    plan = get_backend(name).plan(spec, capacity)
    block_m = BLOCK_M[name][head_dim]
    want_batch, want_qstart = tiles_oracle(qo_lens, kv_lens, block_m, causal, window_left)
    tile_batch, tile_qstart = np.asarray(plan.tile_batch), np.asarray(plan.tile_qstart)
    n = want_batch.size
    np.testing.assert_array_equal(tile_batch[:n], want_batch)
    np.testing.assert_array_equal(tile_qstart[:n], want_qstart)
    assert np.all(tile_batch[n:] == -1) and np.all(tile_qstart[n:] == 0), "padding tiles must be (-1, 0)"
    if fixed:
        assert tile_batch.shape == (16 * -(-1024 // block_m),)
