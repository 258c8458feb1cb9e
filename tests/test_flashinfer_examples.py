"""FlashInfer's documented examples, with ``import flashinfer`` -> ``import jaxinfer`` and ``torch``
-> ``jax.numpy`` changed only, against the float64 reference (tests/ref64.py).

Each example keeps FlashInfer's code shape (workspace buffer first, positional plan arguments,
no ``q_data_type`` where FlashInfer's example passes none, ``run`` / ``*_inplace`` calls); sizes
are shrunk (fewer layers, heads and pages) so the file runs in seconds on a CPU. Inputs are fresh
random values: ``torch.randn(...)`` becomes ``jax.random.normal(key, ...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from conftest import assert_close
from ref64 import f64, gather_paged_kv, ref_attention, ref_batch, ref_merge, rope_rotate_half

FP16 = jnp.float16


def _keys(seed: int, n: int):
    return jax.random.split(jax.random.key(seed), n)


def test_batch_decode_example():
    num_layers, num_qo_heads, num_kv_heads, head_dim, max_num_pages, page_size = 2, 8, 2, 64, 16, 4
    workspace_buffer = jnp.zeros(128 * 1024 * 1024, dtype=jnp.uint8)
    decode_wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(workspace_buffer, "NHD")
    batch_size = 3
    kv_page_indices = jnp.arange(max_num_pages, dtype=jnp.int32)
    kv_page_indptr = jnp.array([0, 5, 9, 16], dtype=jnp.int32)
    kv_last_page_len = jnp.array([1, 4, 3], dtype=jnp.int32)
    ks = _keys(0, 2 * num_layers)
    kv_cache_at_layer = [
        jax.random.normal(ks[i], (max_num_pages, 2, page_size, num_kv_heads, head_dim), dtype=FP16)
        for i in range(num_layers)
    ]
    decode_wrapper.plan(kv_page_indptr, kv_page_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
                        page_size, pos_encoding_mode="NONE", data_type=FP16)
    outputs = []
    for i in range(num_layers):
        q = jax.random.normal(ks[num_layers + i], (batch_size, num_qo_heads, head_dim), dtype=FP16)
        o = decode_wrapper.run(q, kv_cache_at_layer[i])
        outputs.append((q, o))
    for (q, o), cache in zip(outputs, kv_cache_at_layer):
        k_list, v_list = gather_paged_kv(cache[:, 0], cache[:, 1], kv_page_indptr, kv_page_indices, kv_last_page_len)
        want, _ = ref_batch(q, k_list, v_list, np.arange(batch_size + 1))
        assert o.shape == (batch_size, num_qo_heads, head_dim) and o.dtype == FP16
        assert_close(o, want, FP16)


def test_batch_prefill_paged_example():
    num_layers, num_qo_heads, num_kv_heads, head_dim, max_num_pages, page_size = 2, 8, 2, 64, 16, 4
    workspace_buffer = jnp.zeros(128 * 1024 * 1024, dtype=jnp.uint8)
    prefill_wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(workspace_buffer, "NHD")
    nnz_qo = 12
    qo_indptr = jnp.array([0, 3, 7, 12], dtype=jnp.int32)
    paged_kv_indices = jnp.arange(max_num_pages, dtype=jnp.int32)
    paged_kv_indptr = jnp.array([0, 5, 9, 16], dtype=jnp.int32)
    paged_kv_last_page_len = jnp.array([1, 4, 3], dtype=jnp.int32)
    ks = _keys(1, 2 * num_layers)
    q_at_layer = jax.random.normal(ks[0], (num_layers, nnz_qo, num_qo_heads, head_dim), dtype=FP16)
    kv_cache_at_layer = jax.random.normal(ks[1], (num_layers, max_num_pages, 2, page_size, num_kv_heads, head_dim),
                                          dtype=FP16)
    prefill_wrapper.plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                         num_kv_heads, head_dim, page_size, causal=True)
    for i in range(num_layers):
        q = q_at_layer[i]
        kv_cache = kv_cache_at_layer[i]
        o = prefill_wrapper.run(q, kv_cache)
        k_list, v_list = gather_paged_kv(kv_cache[:, 0], kv_cache[:, 1], paged_kv_indptr, paged_kv_indices,
                                         paged_kv_last_page_len)
        want, _ = ref_batch(q, k_list, v_list, qo_indptr, causal=True)
        assert_close(o, want, FP16)


def test_batch_prefill_ragged_example():
    num_qo_heads, num_kv_heads, head_dim = 8, 2, 64
    workspace_buffer = jnp.zeros(128 * 1024 * 1024, dtype=jnp.uint8)
    prefill_wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace_buffer, "NHD")
    qo_indptr = jnp.array([0, 3, 7, 12], dtype=jnp.int32)
    kv_indptr = jnp.array([0, 5, 9, 21], dtype=jnp.int32)
    ks = _keys(2, 3)
    q = jax.random.normal(ks[0], (12, num_qo_heads, head_dim), dtype=FP16)
    k = jax.random.normal(ks[1], (21, num_kv_heads, head_dim), dtype=FP16)
    v = jax.random.normal(ks[2], (21, num_kv_heads, head_dim), dtype=FP16)
    prefill_wrapper.plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, causal=True)
    o, lse = prefill_wrapper.run(q, k, v, return_lse=True)
    kv = np.asarray(kv_indptr)
    want, want_lse = ref_batch(q, [k[a:b] for a, b in zip(kv[:-1], kv[1:])], [v[a:b] for a, b in zip(kv[:-1], kv[1:])],
                               qo_indptr, causal=True)
    assert_close(o, want, FP16)
    assert_close(lse, want_lse, jnp.float32, "lse")


def test_cascade_example():
    num_layers, num_qo_heads, num_kv_heads, head_dim, page_size = 2, 8, 2, 64, 4
    workspace_buffer = jnp.zeros(128 * 1024 * 1024, dtype=jnp.uint8)
    wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(2, workspace_buffer, "NHD")
    batch_size = 3
    shared_kv_num_pages = 4
    unique_kv_num_pages = 6
    total_num_pages = shared_kv_num_pages + unique_kv_num_pages
    shared_kv_page_indices = jnp.arange(shared_kv_num_pages, dtype=jnp.int32)
    shared_kv_page_indptr = jnp.array([0, shared_kv_num_pages], dtype=jnp.int32)
    unique_kv_page_indices = jnp.arange(shared_kv_num_pages, total_num_pages, dtype=jnp.int32)
    unique_kv_page_indptr = jnp.array([0, 2, 3, 6], dtype=jnp.int32)
    shared_kv_last_page_len = jnp.array([page_size], dtype=jnp.int32)
    unique_kv_last_page_len = jnp.array([1, 3, 4], dtype=jnp.int32)
    ks = _keys(3, 2 * num_layers)
    kv_cache_at_layer = [
        jax.random.normal(ks[i], (total_num_pages, 2, page_size, num_kv_heads, head_dim), dtype=FP16)
        for i in range(num_layers)
    ]
    qo_indptr_arr = [jnp.array([0, batch_size], dtype=jnp.int32), jnp.arange(batch_size + 1, dtype=jnp.int32)]
    wrapper.plan(qo_indptr_arr, [shared_kv_page_indptr, unique_kv_page_indptr],
                 [shared_kv_page_indices, unique_kv_page_indices], [shared_kv_last_page_len, unique_kv_last_page_len],
                 num_qo_heads, num_kv_heads, head_dim, page_size)
    for i in range(num_layers):
        q = jax.random.normal(ks[num_layers + i], (batch_size, num_qo_heads, head_dim), dtype=FP16)
        o = wrapper.run(q, kv_cache_at_layer[i])
        cache = kv_cache_at_layer[i]
        shared_k, shared_v = gather_paged_kv(cache[:, 0], cache[:, 1], shared_kv_page_indptr, shared_kv_page_indices,
                                             shared_kv_last_page_len)
        own_k, own_v = gather_paged_kv(cache[:, 0], cache[:, 1], unique_kv_page_indptr, unique_kv_page_indices,
                                       unique_kv_last_page_len)
        want, _ = ref_batch(q, [np.concatenate([shared_k[0], kb]) for kb in own_k],
                            [np.concatenate([shared_v[0], vb]) for vb in own_v], np.arange(batch_size + 1))
        assert_close(o, want, FP16)


def test_shared_prefix_decode_example():
    num_qo_heads, num_kv_heads, head_dim, page_size, shared_prefix_len = 8, 2, 64, 4, 10
    workspace_buffer = jnp.zeros(128 * 1024 * 1024, dtype=jnp.uint8)
    wrapper = jaxinfer.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace_buffer, "NHD")
    batch_size, max_num_pages = 3, 8
    unique_kv_page_indices = jnp.arange(7, dtype=jnp.int32)
    unique_kv_page_indptr = jnp.array([0, 2, 3, 7], dtype=jnp.int32)
    unique_kv_last_page_len = jnp.array([4, 1, 2], dtype=jnp.int32)
    ks = _keys(4, 4)
    k_shared = jax.random.normal(ks[0], (shared_prefix_len, num_kv_heads, head_dim), dtype=FP16)
    v_shared = jax.random.normal(ks[1], (shared_prefix_len, num_kv_heads, head_dim), dtype=FP16)
    unique_kv_cache = jax.random.normal(ks[2], (max_num_pages, 2, page_size, num_kv_heads, head_dim), dtype=FP16)
    wrapper.begin_forward(unique_kv_page_indptr, unique_kv_page_indices, unique_kv_last_page_len, num_qo_heads,
                          num_kv_heads, head_dim, page_size)
    q = jax.random.normal(ks[3], (batch_size, num_qo_heads, head_dim), dtype=FP16)
    o = wrapper.forward(q, k_shared, v_shared, unique_kv_cache)
    own_k, own_v = gather_paged_kv(unique_kv_cache[:, 0], unique_kv_cache[:, 1], unique_kv_page_indptr,
                                   unique_kv_page_indices, unique_kv_last_page_len)
    want, _ = ref_batch(q, [np.concatenate([f64(k_shared), kb]) for kb in own_k],
                        [np.concatenate([f64(v_shared), vb]) for vb in own_v], np.arange(batch_size + 1))
    assert_close(o, want, FP16)


def test_block_sparse_example():
    num_qo_heads, num_kv_heads, head_dim = 2, 1, 64
    M, N, R, C = 6, 8, 2, 2
    workspace_buffer = jnp.zeros(128 * 1024 * 1024, dtype=jnp.uint8)
    bsr_wrapper = jaxinfer.BlockSparseAttentionWrapper(workspace_buffer)
    indptr = jnp.array([0, 1, 2, 4], dtype=jnp.int32)
    indices = jnp.array([0, 1, 1, 3], dtype=jnp.int32)
    bsr_wrapper.plan(indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim)
    ks = _keys(5, 3)
    q = jax.random.normal(ks[0], (M, num_qo_heads, head_dim), dtype=FP16)
    k = jax.random.normal(ks[1], (N, num_kv_heads, head_dim), dtype=FP16)
    v = jax.random.normal(ks[2], (N, num_kv_heads, head_dim), dtype=FP16)
    o = bsr_wrapper.run(q, k, v)
    dense = np.zeros((M, N), bool)
    for r, (a, b) in enumerate(zip(np.asarray(indptr)[:-1], np.asarray(indptr)[1:])):
        for c in np.asarray(indices)[a:b]:
            dense[r * R : (r + 1) * R, c * C : (c + 1) * C] = True
    want, _ = ref_attention(q, k, v, custom_mask=dense)
    assert_close(o, want, FP16)


def test_merge_state_examples():
    seq_len, num_heads, head_dim = 16, 4, 64
    ks = _keys(6, 6)
    va = jax.random.normal(ks[0], (seq_len, num_heads, head_dim), dtype=FP16)
    sa = jax.random.normal(ks[1], (seq_len, num_heads), dtype=jnp.float32)
    vb = jax.random.normal(ks[2], (seq_len, num_heads, head_dim), dtype=FP16)
    sb = jax.random.normal(ks[3], (seq_len, num_heads), dtype=jnp.float32)
    v_want, s_want = ref_merge([va, vb], [sa, sb])
    v_merged, s_merged = jaxinfer.merge_state(va, sa, vb, sb)
    assert_close(v_merged, v_want, FP16)
    assert_close(s_merged, s_want, jnp.float32, "s")
    # merge_state_in_place returns the merged state (JAX arrays are immutable).
    v, s = jaxinfer.merge_state_in_place(va, sa, vb, sb)
    assert_close(v, v_want, FP16)
    assert_close(s, s_want, jnp.float32, "s")
    num_states = 5
    v_all = jax.random.normal(ks[4], (seq_len, num_states, num_heads, head_dim), dtype=FP16)
    s_all = jax.random.normal(ks[5], (seq_len, num_states, num_heads), dtype=jnp.float32)
    v_merged, s_merged = jaxinfer.merge_states(v_all, s_all)
    v_want, s_want = ref_merge([v_all[:, i] for i in range(num_states)], [s_all[:, i] for i in range(num_states)])
    assert_close(v_merged, v_want, FP16)
    assert_close(s_merged, s_want, jnp.float32, "s")


def test_append_paged_kv_cache_example():
    nnz_kv, num_kv_heads, head_dim, max_num_pages, page_size = 20, 2, 16, 12, 4
    ks = _keys(7, 2)
    k_append = jax.random.normal(ks[0], (nnz_kv, num_kv_heads, head_dim), dtype=FP16)
    v_append = jax.random.normal(ks[1], (nnz_kv, num_kv_heads, head_dim), dtype=FP16)
    kv_append_length = jnp.array([9, 2, 5, 4], dtype=jnp.int32)
    kv_append_indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(kv_append_length, dtype=jnp.int32)])
    num_pages_per_req = jnp.array([3, 1, 2, 2], dtype=jnp.int32)
    kv_page_indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(num_pages_per_req, dtype=jnp.int32)])
    kv_page_indices = jnp.array([11, 0, 5, 3, 7, 2, 9, 1], dtype=jnp.int32)
    kv_last_page_len = jnp.array([1, 2, 1, 4], dtype=jnp.int32)
    paged_kv_cache = jnp.full((max_num_pages, 2, page_size, num_kv_heads, head_dim), jnp.nan, dtype=FP16)
    seq_lens = jaxinfer.get_seq_lens(kv_page_indptr, kv_last_page_len, page_size)
    batch_indices, positions = jaxinfer.get_batch_indices_positions(kv_append_indptr, seq_lens, nnz_kv)
    paged_kv_cache = jaxinfer.append_paged_kv_cache(k_append, v_append, batch_indices, positions, paged_kv_cache,
                                                    kv_page_indices, kv_page_indptr, kv_last_page_len)
    np.testing.assert_array_equal(np.asarray(seq_lens), [9, 2, 5, 8])
    k_list, v_list = gather_paged_kv(paged_kv_cache[:, 0], paged_kv_cache[:, 1], kv_page_indptr, kv_page_indices,
                                     kv_last_page_len)
    appended = np.split(np.arange(nnz_kv), np.cumsum(np.asarray(kv_append_length))[:-1])
    for b, rows in enumerate(appended):
        np.testing.assert_array_equal(k_list[b][-rows.size :], f64(k_append)[rows])
        np.testing.assert_array_equal(v_list[b][-rows.size :], f64(v_append)[rows])


def test_rope_examples():
    batch_size, qkv_len, num_qo_heads, num_kv_heads, head_dim = 3, 5, 4, 2, 32
    nnz = batch_size * qkv_len
    ks = _keys(8, 2)
    q = jax.random.normal(ks[0], (nnz, num_qo_heads, head_dim), dtype=FP16)
    k = jax.random.normal(ks[1], (nnz, num_kv_heads, head_dim), dtype=FP16)
    indptr = jnp.array([i * qkv_len for i in range(batch_size + 1)], dtype=jnp.int32)
    offsets = jnp.full((batch_size,), 10, dtype=jnp.int32)
    pos = 10 + np.arange(nnz) % qkv_len
    q_want, k_want = rope_rotate_half(f64(q), pos, 1.0, 1e4), rope_rotate_half(f64(k), pos, 1.0, 1e4)
    q_rope, k_rope = jaxinfer.apply_rope(q, k, indptr, offsets)
    assert_close(q_rope, q_want, FP16, "q_rope")
    assert_close(k_rope, k_want, FP16, "k_rope")
    # FlashInfer's apply_rope_inplace(q, k, indptr, offsets) rotates q and k; here it returns them.
    q2, k2 = jaxinfer.apply_rope_inplace(q, k, indptr, offsets)
    assert_close(q2, q_want, FP16, "q_rope")
    assert_close(k2, k_want, FP16, "k_rope")
    # apply_rope_with_cos_sin_cache: vLLM-style flattened heads and a float32 cos/sin table.
    max_seq_len = 64
    inv_freq = 1.0 / (1e4 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    t = jnp.arange(max_seq_len, dtype=jnp.float32)
    freqs = jnp.einsum("i,j->ij", t, inv_freq)
    cos_sin_cache = jnp.concatenate([jnp.cos(freqs), jnp.sin(freqs)], axis=-1)
    positions = jnp.asarray(pos, dtype=jnp.int32)
    query = q.reshape(nnz, num_qo_heads * head_dim)
    key = k.reshape(nnz, num_kv_heads * head_dim)
    query_rope, key_rope = jaxinfer.apply_rope_with_cos_sin_cache(positions, query, key, head_dim, cos_sin_cache,
                                                                  is_neox=True)
    assert query_rope.shape == query.shape and key_rope.shape == key.shape
    assert_close(query_rope.reshape(q.shape), q_want, FP16, "query")
    assert_close(key_rope.reshape(k.shape), k_want, FP16, "key")


def test_single_decode_and_prefill_examples():
    kv_len, num_kv_heads, num_qo_heads, head_dim = 40, 2, 8, 64
    ks = _keys(9, 4)
    k = jax.random.normal(ks[0], (kv_len, num_kv_heads, head_dim), dtype=FP16)
    v = jax.random.normal(ks[1], (kv_len, num_kv_heads, head_dim), dtype=FP16)
    q = jax.random.normal(ks[2], (num_qo_heads, head_dim), dtype=FP16)
    o = jaxinfer.single_decode_with_kv_cache(q, k, v)
    want, _ = ref_attention(q[None], k, v)
    assert_close(o, want[0], FP16)
    qo_len = 16
    q = jax.random.normal(ks[3], (qo_len, num_qo_heads, head_dim), dtype=FP16)
    o = jaxinfer.single_prefill_with_kv_cache(q, k, v, causal=True, use_fp16_qk_reduction=True)
    want, _ = ref_attention(q, k, v, causal=True)
    assert_close(o, want, FP16)
    mask = jnp.tril(jnp.full((qo_len, kv_len), True), k=kv_len - qo_len)
    o_custom = jaxinfer.single_prefill_with_kv_cache(q, k, v, custom_mask=mask)
    assert_close(o_custom, want, FP16)
    packed_mask = jaxinfer.packbits(np.asarray(mask).reshape(-1), bitorder="little")
    o_packed = jaxinfer.single_prefill_with_kv_cache(q, k, v, packed_custom_mask=packed_mask)
    assert_close(o_packed, want, FP16)
