"""MultiLevelCascadeAttentionWrapper against flat attention over each request's concatenated KV."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, assert_close, indptr_of, jit_call, make_paged_kv, rand
from ref64 import ref_attention

BF16, FP16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _level_table(paged, first: int, last: int):
    """Page table of segments ``first..last-1`` of ``paged`` (one table holding every segment)."""
    ptr = paged.kv_indptr[first : last + 1]
    return (
        (ptr - ptr[0]).astype(np.int32),
        paged.kv_indices[ptr[0] : ptr[-1]],
        paged.kv_last_page_len[first:last],
    )


# (num_levels, causal, page_size, num_qo_heads, num_kv_heads, head_dim, kv_layout, single-array, dtype, options)
CASES = [
    (2, False, 16, 8, 2, 64, "NHD", False, BF16, {}),
    (2, True, 1, 4, 4, 128, "HND", True, F32, {}),
    (3, False, 5, 8, 1, 64, "HND", False, FP16, dict(logits_soft_cap=5.0, sm_scale=0.3)),
    (3, True, 16, 16, 2, 128, "NHD", True, BF16, {}),
    (3, True, 5, 4, 1, 64, "NHD", False, F32, dict(sm_scale=0.2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_levels,causal,page_size,hq,hkv,d,layout,single,dtype,options",
    CASES,
    ids=[f"L{c[0]}-causal{c[1]}-p{c[2]}-{c[3]}x{c[4]}-{c[5]}-{c[6]}-{c[8].__name__}-{c[9]}" for c in CASES],
)
def test_cascade(rng, backend, num_levels, causal, page_size, hq, hkv, d, layout, single, dtype, options):
    batch = 4
    qo_lens = rng.integers(1, 9, size=batch)
    qo_lens[rng.integers(batch)] = 1  # a decode-like request
    qo_indptr = indptr_of(qo_lens)
    # Segments: level 0 shared by all; level 1 (3 levels) shared by requests {0,1} and {2,3};
    # last level each request's own KV, at least qo_len long so that causal never reaches back
    # into shared KV (there flat causal attention would hide shared keys that cascade shows).
    shared = [int(rng.integers(1, 60))]
    groups = [(0, 2), (2, 4)]
    if num_levels == 3:
        shared += [int(rng.integers(0, 40)), int(rng.integers(1, 40))]
    own = qo_lens + rng.integers(0, 50, size=batch)
    seg_lens = np.array(shared + own.tolist())
    paged = make_paged_kv(rng, seg_lens, page_size, hkv, d, dtype, layout, single)

    qo_arr = [np.array([0, qo_indptr[-1]], np.int32)]
    tables = [_level_table(paged, 0, 1)]
    if num_levels == 3:
        qo_arr.append(np.array([0, qo_indptr[2], qo_indptr[4]], np.int32))
        tables.append(_level_table(paged, 1, 3))
    qo_arr.append(qo_indptr)
    tables.append(_level_table(paged, len(shared), len(shared) + batch))

    wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(num_levels, kv_layout=layout, backend=backend)
    wrapper.plan(
        qo_arr, [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], hq, hkv, d, page_size,
        causal=causal, q_data_type=dtype, **options,
    )
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    o, lse = jit_call(wrapper.run, q, paged.cache, return_lse=True)

    want_o, want_lse = [], []
    for b in range(batch):
        segs = [0] + ([1 + (b >= 2)] if num_levels == 3 else []) + [len(shared) + b]
        k = np.concatenate([paged.k_list[s] for s in segs])
        v = np.concatenate([paged.v_list[s] for s in segs])
        ob, lb = ref_attention(q[qo_indptr[b] : qo_indptr[b + 1]], k, v, causal=causal, **options)
        want_o.append(ob)
        want_lse.append(lb)
    assert_close(o, np.concatenate(want_o), dtype, "o")
    assert_close(lse, np.concatenate(want_lse), dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cascade_one_level_is_batch_prefill(rng, backend):
    page_size, hq, hkv, d, dtype = 5, 8, 2, 64, F32
    kv_lens = np.array([7, 0, 33])
    qo_indptr = indptr_of([3, 2, 4])
    paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype)
    table = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len)
    wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(1, backend=backend)
    wrapper.plan([qo_indptr], *([t] for t in table), hq, hkv, d, page_size, causal=True, q_data_type=dtype)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    o = wrapper.run(q, paged.cache)
    want = np.concatenate(
        [
            ref_attention(q[qo_indptr[b] : qo_indptr[b + 1]], paged.k_list[b], paged.v_list[b], causal=True)[0]
            for b in range(3)
        ]
    )
    assert_close(o, want, dtype, "o")
