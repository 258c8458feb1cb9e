"""BlockSparseAttentionWrapper against dense attention under the equivalent element mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, assert_close, jit_call, rand
from ref64 import ref_attention

BF16, F32 = jnp.bfloat16, jnp.float32


def _random_bsr(rng, mb: int, nb: int, density: float = 0.5):
    """Random BSR pattern: unique column blocks per block row, some rows empty."""
    rows = []
    for _ in range(mb):
        n = rng.binomial(nb, density)
        rows.append(np.sort(rng.choice(nb, size=n, replace=False)))
    rows[rng.integers(mb)] = np.zeros(0, dtype=np.int64)  # a block row with no blocks
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    indices = np.concatenate(rows).astype(np.int32)
    return indptr, indices


def _dense_mask(indptr, indices, M, N, R, C, block_mask):
    """Element mask ``[M, N]`` of a BSR pattern (rows past M of the last block row dropped)."""
    dense = np.zeros((-(-M // R) * R, N), dtype=bool)
    for r in range(len(indptr) - 1):
        for n in range(indptr[r], indptr[r + 1]):
            c = indices[n]
            block = np.ones((R, C), bool) if block_mask is None else block_mask[n]
            dense[r * R : (r + 1) * R, c * C : (c + 1) * C] = block
    return dense[:M]


# (R, C, M, N): M not a multiple of R where R > 1 (a partial last block row).
SHAPES = [(1, 1, 21, 26), (4, 4, 30, 36), (16, 16, 40, 64), (4, 16, 27, 48)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R,C,M,N", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse(rng, backend, R, C, M, N, masked, causal):
    hq, hkv, d = (8, 2, 64) if R != C else (4, 4, 128)
    dtype = BF16 if masked else F32
    indptr, indices = _random_bsr(rng, -(-M // R), N // C)
    block_mask = rng.random((indices.size, R, C)) < 0.7 if masked else None
    options = dict(logits_soft_cap=6.0) if (R, C) == (4, 4) else {}
    wrapper = jaxinfer.BlockSparseAttentionWrapper(backend=backend)
    wrapper.plan(
        indptr, indices, M, N, R, C, hq, hkv, d, mask=block_mask, causal=causal, q_data_type=dtype, **options
    )
    q = rand(rng, (M, hq, d), dtype)
    k, v = rand(rng, (N, hkv, d), dtype), rand(rng, (N, hkv, d), dtype)
    o, lse = jit_call(wrapper.run, q, k, v, return_lse=True)
    dense = _dense_mask(indptr, indices, M, N, R, C, block_mask)
    want_o, want_lse = ref_attention(q, k, v, custom_mask=dense, causal=causal, **options)
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_eager_without_lse(rng, backend):
    R, C, M, N, hq, hkv, d = 4, 4, 16, 24, 4, 1, 64
    indptr, indices = _random_bsr(rng, M // R, N // C, density=0.7)
    wrapper = jaxinfer.BlockSparseAttentionWrapper(backend=backend)
    wrapper.plan(indptr, indices, M, N, R, C, hq, hkv, d, sm_scale=0.25, q_data_type=F32)
    q = rand(rng, (M, hq, d), F32)
    k, v = rand(rng, (N, hkv, d), F32), rand(rng, (N, hkv, d), F32)
    o = wrapper.run(q, k, v)
    want = ref_attention(q, k, v, custom_mask=_dense_mask(indptr, indices, M, N, R, C, None), sm_scale=0.25)[0]
    assert_close(o, want, F32, "o")
