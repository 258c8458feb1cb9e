"""cascade_levels_from_prefix_tree: levels built from shared page prefixes give flat attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS, assert_close, rand
from ref64 import f64, ref_batch

import jaxinfer


def _random_radix_batch(rng, page_size: int):
    """Requests drawn from a random prefix tree of pages, listed depth-first (as a radix cache)."""
    next_page = iter(rng.permutation(400).tolist())
    trunks = [[next(next_page) for _ in range(rng.integers(1, 4))] for _ in range(rng.integers(1, 3))]
    page_lists = []
    for trunk in trunks:
        for _ in range(rng.integers(1, 3)):
            branch = trunk + [next(next_page) for _ in range(rng.integers(0, 3))]
            for _ in range(rng.integers(1, 3)):
                page_lists.append(branch + [next(next_page) for _ in range(rng.integers(1, 3))])
    # A sibling of request 0 guarantees at least one shared prefix (request 0 has >= 2 pages).
    page_lists.insert(1, page_lists[0][:-1] + [next(next_page)])
    page_lists.append([next(next_page)])  # a request that shares nothing
    last = rng.integers(1, page_size + 1, size=len(page_lists))
    return page_lists, last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_levels_from_prefix_tree_match_flat_attention(rng, backend, causal):
    page_size, Hq, Hkv, D, dtype = 4, 4, 2, 32, jnp.float32
    page_lists, last = _random_radix_batch(rng, page_size)
    B = len(page_lists)
    # Queries are each request's newest tokens, so they lie in its own (last-level) pages.
    _, own_indptr, _, own_last = (x[-1] for x in jaxinfer.cascade_levels_from_prefix_tree(page_lists, last, np.ones(B, int), page_size))
    own_len = (np.diff(own_indptr) - 1) * page_size + own_last
    qo_lens = rng.integers(1, np.minimum(own_len, 3) + 1)
    k_cache = rand(rng, (400, page_size, Hkv, D), dtype)
    v_cache = rand(rng, (400, page_size, Hkv, D), dtype)
    q = rand(rng, (int(qo_lens.sum()), Hq, D), dtype)

    levels = jaxinfer.cascade_levels_from_prefix_tree(page_lists, last, qo_lens, page_size)
    assert len(levels[0]) >= 2, "the random tree must share at least one prefix"
    wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(len(levels[0]), backend=backend)
    wrapper.plan(*levels, Hq, Hkv, D, page_size, causal=causal, q_data_type=dtype)
    o = wrapper.run(q, (k_cache, v_cache))

    k_np, v_np = f64(k_cache), f64(v_cache)
    lens = [(len(p) - 1) * page_size + int(l) for p, l in zip(page_lists, last)]
    k_list = [k_np[p].reshape(-1, Hkv, D)[:n] for p, n in zip(page_lists, lens)]
    v_list = [v_np[p].reshape(-1, Hkv, D)[:n] for p, n in zip(page_lists, lens)]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    want, _ = ref_batch(f64(q), k_list, v_list, qo_indptr, causal=causal)
    assert_close(o, want, dtype)


def test_shared_segment_is_one_group_per_level():
    # Requests 0-2 share pages [1, 2]; 0 and 1 also share [3]; request 3 shares nothing.
    qo, indptr, indices, last = jaxinfer.cascade_levels_from_prefix_tree(
        [[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 4, 12], [5, 6]], [3, 3, 3, 2], [1, 1, 1, 1], page_size=4
    )
    assert len(qo) == 3
    np.testing.assert_array_equal(qo[0], [0, 3, 4])
    np.testing.assert_array_equal(indices[0], [1, 2])
    np.testing.assert_array_equal(indices[1], [3])
    np.testing.assert_array_equal(indices[2], [10, 11, 4, 12, 5, 6])
    np.testing.assert_array_equal(last[2], [3, 3, 3, 2])
