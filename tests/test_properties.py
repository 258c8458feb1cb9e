"""Property-based suite over the public batch entry points (issue 16): random valid batches against
the float64 reference, random invalid plan arguments that must raise a ValueError naming the
argument, and random poisoned cache values that must stay out of the rows that cannot see them.

Hypothesis draws the batches (request lengths including 0, page sizes, GQA ratios, layouts, mask
options); the backends are those of the conformance suite (a backend with no device here skips).
Shapes stay tiny: the Pallas kernels run in interpret mode on a CPU.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS, assert_close, indptr_of, make_paged_kv, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ref64 import ref_batch

import jaxinfer

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
D = 32

geometry = st.sampled_from([(2, 2), (4, 2), (6, 2), (4, 1)])  # (Hq, Hkv): GQA 1, 2, 3, 4
page_sizes = st.sampled_from([1, 3, 4, 16])
options = st.sampled_from([{}, dict(causal=True), dict(causal=True, window_left=3), dict(logits_soft_cap=4.0)])


@st.composite
def batches(draw, max_batch: int = 4, max_len: int = 24):
    """``(qo_lens, kv_lens)`` of a batch: 0-4 requests, lengths 0..max_len, qo_len <= kv_len."""
    kv = draw(st.lists(st.integers(0, max_len), min_size=0, max_size=max_batch))
    qo = [draw(st.integers(0, k)) for k in kv]
    return qo, kv


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), geom=geometry, page_size=page_sizes, opts=options, layout=st.sampled_from(["NHD", "HND"]),
       seed=st.integers(0, 2**32 - 1))
def test_paged_prefill_matches_reference(backend, batch, geom, page_size, opts, layout, seed):
    rng = np.random.default_rng(seed)
    (qo_lens, kv_lens), (hq, hkv) = batch, geom
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, jnp.bfloat16, layout)
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(kv_layout=layout, backend=backend)
    w.plan(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size, **opts)
    q = rand(rng, (sum(qo_lens), hq, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, kv.k_list, kv.v_list, indptr_of(qo_lens), **opts)
    assert_close(o, want_o, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), geom=geometry, opts=options, seed=st.integers(0, 2**32 - 1))
def test_ragged_prefill_matches_reference(backend, batch, geom, opts, seed):
    rng = np.random.default_rng(seed)
    (qo_lens, kv_lens), (hq, hkv) = batch, geom
    w = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
    w.plan(indptr_of(qo_lens), indptr_of(kv_lens), hq, hkv, D, **opts)
    q = rand(rng, (sum(qo_lens), hq, D), jnp.bfloat16)
    k, v = rand(rng, (sum(kv_lens), hkv, D), jnp.bfloat16), rand(rng, (sum(kv_lens), hkv, D), jnp.bfloat16)
    o = w.run(q, k, v)
    kv_ptr = indptr_of(kv_lens)
    ks = [k[kv_ptr[b] : kv_ptr[b + 1]] for b in range(len(kv_lens))]
    vs = [v[kv_ptr[b] : kv_ptr[b + 1]] for b in range(len(kv_lens))]
    want, _ = ref_batch(q, ks, vs, indptr_of(qo_lens), **opts)
    assert_close(o, want, jnp.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(kv_lens=st.lists(st.integers(0, 40), min_size=0, max_size=5), geom=geometry, page_size=page_sizes,
       poison=st.sampled_from([np.inf, -np.inf, np.nan]), seed=st.integers(0, 2**32 - 1))
def test_decode_poison_stays_in_its_own_rows(backend, kv_lens, geom, page_size, poison, seed):
    """Every cache slot that no request owns (free pages, the tail of each last page) holds
    poison; the outputs must equal the reference over the owned values."""
    rng = np.random.default_rng(seed)
    hq, hkv = geom
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, jnp.bfloat16)
    owned = np.zeros(kv.cache[0].shape[:2], bool)  # [num_pages, page_size]
    for b, n in enumerate(kv_lens):
        pages = kv.kv_indices[kv.kv_indptr[b] : kv.kv_indptr[b + 1]]
        for t in range(n):
            owned[pages[t // page_size], t % page_size] = True
    cache = tuple(jnp.where(jnp.asarray(owned)[:, :, None, None], c, poison).astype(c.dtype) for c in kv.cache)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size)
    q = rand(rng, (len(kv_lens), hq, D), jnp.bfloat16)
    o, lse = w.run(q, cache, return_lse=True)
    want_o, want_lse = ref_batch(q, kv.k_list, kv.v_list, indptr_of([1] * len(kv_lens)))
    assert_close(o, want_o, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16, "lse")


# ------------------------------------------------------------------ invalid arguments

def _valid_decode_args(rng):
    kv_lens = [5, 0, 9]
    page_size = 4
    pages = [-(-n // page_size) for n in kv_lens]
    indptr = indptr_of(pages)
    indices = rng.permutation(int(indptr[-1]) + 2)[: indptr[-1]].astype(np.int32)
    last = np.array([n - page_size * (p - 1) if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    return dict(indptr=indptr, indices=indices, last_page_len=last, num_qo_heads=4, num_kv_heads=2, head_dim=64,
                page_size=page_size)


# (argument, bad value or function of the valid arguments, what the message must name)
DECODE_MUTATIONS = [
    ("indptr", lambda a: a["indptr"][::-1].copy(), r"indptr"),
    ("indptr", lambda a: a["indptr"] + 1, r"indptr"),
    ("indptr", lambda a: a["indptr"].astype(np.float64), r"indptr"),
    ("indices", lambda a: np.where(np.arange(a["indices"].size) == 0, -1, a["indices"]), r"indices"),
    ("indices", lambda a: a["indices"].astype(np.int64) + 2**32, r"indices"),
    ("indices", lambda a: a["indices"].astype(np.float32), r"indices"),
    ("last_page_len", lambda a: a["last_page_len"][:-1], r"last_page_len"),
    ("last_page_len", lambda a: a["last_page_len"] + a["page_size"], r"last_page_len"),
    ("num_qo_heads", lambda a: 3, r"num_qo_heads"),
    ("num_kv_heads", lambda a: 0, r"num_kv_heads"),
    ("head_dim", lambda a: float("nan"), r"head_dim"),
    ("head_dim", lambda a: 2.5, r"head_dim"),
    ("page_size", lambda a: 0, r"page_size"),
    ("page_size", lambda a: float("nan"), r"page_size"),
    ("logits_soft_cap", lambda a: float("inf"), r"logits_soft_cap"),
    ("logits_soft_cap", lambda a: float("nan"), r"logits_soft_cap"),
    ("sm_scale", lambda a: float("inf"), r"sm_scale"),
    ("sm_scale", lambda a: -1.0, r"sm_scale"),
    ("window_left", lambda a: -2, r"window_left"),
    ("window_left", lambda a: float("nan"), r"window_left"),
]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@settings(max_examples=len(DECODE_MUTATIONS) * 2, deadline=None)
@given(mutation=st.sampled_from(DECODE_MUTATIONS), seed=st.integers(0, 2**32 - 1))
def test_invalid_decode_plan_names_the_argument(backend, mutation, seed):
    rng = np.random.default_rng(seed)
    args = _valid_decode_args(rng)
    name, bad, pattern = mutation
    value = bad(args)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    positional = ("indptr", "indices", "last_page_len", "num_qo_heads", "num_kv_heads", "head_dim", "page_size")
    if name in positional:
        args[name] = value
        call = lambda: w.plan(*(args[k] for k in positional))  # noqa: E731
    else:
        call = lambda: w.plan(*(args[k] for k in positional), **{name: value})  # noqa: E731
    with pytest.raises(ValueError, match=pattern):
        call()
