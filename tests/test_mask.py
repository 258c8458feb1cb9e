"""Bit-packed custom masks (FlashInfer's packbits/segment_packbits layout) and their use by the
prefill wrappers: a packed mask gives the same attention as the bool mask, and the float64
reference agrees."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import assert_close
from ref64 import ref_batch
from jaxinfer.mask import unpack_segments


def _little_endian_reference(bits: np.ndarray) -> np.ndarray:
    """Bytes with bit j of byte i = bits[8 i + j], written out without numpy's packbits."""
    out = np.zeros((bits.size + 7) // 8, np.uint8)
    for i, b in enumerate(bits):
        out[i // 8] |= np.uint8(int(b) << (i % 8))
    return out


def test_packbits_layouts(rng):
    x = rng.random(37) < 0.5
    np.testing.assert_array_equal(jaxinfer.packbits(x, bitorder="little"), _little_endian_reference(x))
    big = jaxinfer.packbits(x)  # FlashInfer's default: big-endian
    np.testing.assert_array_equal(np.unpackbits(big)[:37].astype(bool), x)
    lens = np.array([5, 0, 17, 8])
    indptr = np.concatenate([[0], np.cumsum(lens)])
    y = rng.random(indptr[-1]) < 0.5
    packed, packed_indptr = jaxinfer.segment_packbits(y, indptr, bitorder="little")
    np.testing.assert_array_equal(packed_indptr, [0, 1, 1, 4, 5])
    for i in range(4):
        np.testing.assert_array_equal(packed[packed_indptr[i]:packed_indptr[i + 1]],
                                      _little_endian_reference(y[indptr[i]:indptr[i + 1]]))
    np.testing.assert_array_equal(unpack_segments(packed, lens), y)


def test_pack_errors():
    with pytest.raises(ValueError, match="bool"):
        jaxinfer.packbits(np.arange(4))
    with pytest.raises(ValueError, match="bitorder"):
        jaxinfer.packbits(np.ones(4, bool), bitorder="middle")
    with pytest.raises(ValueError, match="indptr"):
        jaxinfer.segment_packbits(np.ones(4, bool), np.array([0, 3, 2, 4]))
    with pytest.raises(ValueError, match="packed_custom_mask has 3 bytes"):
        unpack_segments(np.zeros(3, np.uint8), np.array([8, 17]))


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "ragged"])
def test_packed_custom_mask_matches_bool_mask(rng, paged):
    hq, hkv, d, ps = 4, 2, 32, 4
    qo_lens, kv_lens = np.array([3, 1, 6]), np.array([7, 9, 6])
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    mask = rng.random(int((qo_lens * kv_lens).sum())) < 0.6
    packed, _ = jaxinfer.segment_packbits(mask, np.concatenate([[0], np.cumsum(qo_lens * kv_lens)]), bitorder="little")
    q = jnp.asarray(rng.standard_normal((qo_indptr[-1], hq, d)), jnp.float32)
    if paged:
        pages = -(-kv_lens // ps)
        kv_indptr = np.concatenate([[0], np.cumsum(pages)])
        indices = rng.permutation(int(pages.sum()) + 3)[: pages.sum()]
        last = kv_lens - (pages - 1) * ps
        cache = jnp.asarray(rng.standard_normal((int(pages.sum()) + 3, 2, ps, hkv, d)), jnp.float32)
        w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend="xla")
        outs = []
        for kw in (dict(custom_mask=mask), dict(packed_custom_mask=packed)):
            w.plan(qo_indptr, kv_indptr, indices, last, hq, hkv, d, ps, q_data_type=jnp.float32, **kw)
            outs.append(w.run(q, cache))
        want = None  # the bool mask's paged path is checked against float64 in the prefill tests
    else:
        kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)])
        k = jnp.asarray(rng.standard_normal((kv_indptr[-1], hkv, d)), jnp.float32)
        w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend="xla")
        outs = []
        for kw in (dict(custom_mask=mask), dict(packed_custom_mask=packed)):
            w.plan(qo_indptr, kv_indptr, hq, hkv, d, q_data_type=jnp.float32, **kw)
            outs.append(w.run(q, k, k))
        ks = [k[a:b] for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        want, _ = ref_batch(q, ks, ks, qo_indptr, custom_mask=mask)
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    if want is not None:
        assert_close(outs[1], want, jnp.float32)
    with pytest.raises(ValueError, match="not both"):
        (w.plan(qo_indptr, kv_indptr, indices, last, hq, hkv, d, ps, custom_mask=mask, packed_custom_mask=packed)
         if paged else w.plan(qo_indptr, kv_indptr, hq, hkv, d, custom_mask=mask, packed_custom_mask=packed))
    with pytest.raises(ValueError, match="packed_custom_mask has"):
        (w.plan(qo_indptr, kv_indptr, indices, last, hq, hkv, d, ps, packed_custom_mask=packed[:-1])
         if paged else w.plan(qo_indptr, kv_indptr, hq, hkv, d, packed_custom_mask=packed[:-1]))
