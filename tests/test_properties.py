"""Property-based suite over the public batch entry points (issue 16): random valid batches against
the float64 reference, random invalid plan arguments that must raise a ValueError naming the
argument, and random poisoned cache values that must stay out of the rows that cannot see them.

Hypothesis draws the batches (request lengths including 0, page sizes, GQA ratios, layouts, mask
options) and, for the paged properties, the KV cache dtype (bf16, or fp8 where the backend serves
it, issue 18) and ``k_scale``/``v_scale`` (none, per tensor, per KV head; the reference reads the
dequantized values); the backends are those of the conformance suite (a backend with no device
here skips). Shapes stay tiny: the Pallas kernels run in interpret mode on a CPU.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BACKENDS, assert_between, assert_close, indptr_of, make_paged_kv, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ref64 import dequantize, quantized_bounds, ref_batch

import jaxinfer
from jaxinfer import backends

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
D = 32

geometry = st.sampled_from([(2, 2), (4, 2), (6, 2), (4, 1)])  # (Hq, Hkv): GQA 1, 2, 3, 4
page_sizes = st.sampled_from([1, 3, 4, 16])
options = st.sampled_from([{}, dict(causal=True), dict(causal=True, window_left=3), dict(logits_soft_cap=4.0)])
kv_dtypes = st.sampled_from([jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2])
scale_kinds = st.sampled_from([None, "tensor", "head"])


def served_kv_dtype(backend: str, kv_dtype):
    """``kv_dtype`` when ``backend`` serves it with a bf16 q, else bf16 (fa2/fa3 decline fp8)."""
    caps = backends.get_backend(backend).capabilities
    return kv_dtype if caps.dtype_unsupported(jnp.bfloat16, kv_dtype) is None else jnp.bfloat16


def draw_scales(rng, kind, hkv):
    """``(k_scale, v_scale)``: none, Python floats, or per-KV-head float32 arrays."""
    if kind is None:
        return None, None
    if kind == "tensor":
        return float(rng.uniform(0.25, 4.0)), float(rng.uniform(0.25, 4.0))
    return tuple(jnp.asarray(rng.uniform(0.25, 4.0, hkv), jnp.float32) for _ in range(2))


@st.composite
def batches(draw, max_batch: int = 4, max_len: int = 24):
    """``(qo_lens, kv_lens)`` of a batch: 0-4 requests, lengths 0..max_len, qo_len <= kv_len."""
    kv = draw(st.lists(st.integers(0, max_len), min_size=0, max_size=max_batch))
    qo = [draw(st.integers(0, k)) for k in kv]
    return qo, kv


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), geom=geometry, page_size=page_sizes, opts=options, layout=st.sampled_from(["NHD", "HND"]),
       kv_dtype=kv_dtypes, scales=scale_kinds, seed=st.integers(0, 2**32 - 1))
def test_paged_prefill_matches_reference(backend, batch, geom, page_size, opts, layout, kv_dtype, scales, seed):
    rng = np.random.default_rng(seed)
    (qo_lens, kv_lens), (hq, hkv) = batch, geom
    kv_dtype = served_kv_dtype(backend, kv_dtype)
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype, layout)
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    w = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(kv_layout=layout, backend=backend)
    w.plan(indptr_of(qo_lens), kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size,
           kv_data_type=kv_dtype, **opts)
    q = rand(rng, (sum(qo_lens), hq, D), jnp.bfloat16)
    o, lse = w.run(q, kv.cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale),
                                 indptr_of(qo_lens), **opts)
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
       poison=st.sampled_from([np.inf, -np.inf, np.nan]), kv_dtype=kv_dtypes, scales=scale_kinds,
       seed=st.integers(0, 2**32 - 1))
def test_decode_poison_stays_in_its_own_rows(backend, kv_lens, geom, page_size, poison, kv_dtype, scales, seed):
    """Every cache slot that no request owns (free pages, the tail of each last page) holds
    poison (an infinity becomes NaN in an e4m3 cache, which has none); the outputs must equal the
    reference over the owned values."""
    rng = np.random.default_rng(seed)
    hq, hkv = geom
    kv_dtype = served_kv_dtype(backend, kv_dtype)
    kv = make_paged_kv(rng, kv_lens, page_size, hkv, D, kv_dtype)
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    owned = np.zeros(kv.cache[0].shape[:2], bool)  # [num_pages, page_size]
    for b, n in enumerate(kv_lens):
        pages = kv.kv_indices[kv.kv_indptr[b] : kv.kv_indptr[b + 1]]
        for t in range(n):
            owned[pages[t // page_size], t % page_size] = True
    cache = tuple(jnp.where(jnp.asarray(owned)[:, :, None, None], c, poison).astype(c.dtype) for c in kv.cache)
    w = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    w.plan(kv.kv_indptr, kv.kv_indices, kv.kv_last_page_len, hq, hkv, D, page_size, kv_data_type=kv_dtype)
    q = rand(rng, (len(kv_lens), hq, D), jnp.bfloat16)
    o, lse = w.run(q, cache, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    want_o, want_lse = ref_batch(q, dequantize(kv.k_list, k_scale), dequantize(kv.v_list, v_scale),
                                 indptr_of([1] * len(kv_lens)))
    assert_close(o, want_o, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16, "lse")


@SETTINGS
@given(lens=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)), min_size=1, max_size=4),
       page_size=page_sizes, kv_dtype=st.sampled_from([jnp.float8_e4m3fn, jnp.float8_e5m2]),
       row_dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]), scales=scale_kinds,
       layout=st.sampled_from(["NHD", "HND"]), single=st.booleans(), pad=st.integers(0, 3),
       seed=st.integers(0, 2**32 - 1))
def test_fp8_append_quantizes_into_own_slots_only(lens, page_size, kv_dtype, row_dtype, scales, layout, single, pad,
                                                  seed):
    """append_paged_kv_cache into an fp8 cache: each request's new tokens land in its own slots as
    K / k_scale rounded to nearest even and saturated at the fp8 limits (rows reach past them; the
    quotient within a float32 ulp, ref64.quantized_bounds); padding rows write nothing and every
    other slot keeps its bits."""
    rng = np.random.default_rng(seed)
    old_lens, app_lens = (np.array(x, np.int64) for x in zip(*lens))
    hkv = 2
    new_lens = old_lens + app_lens
    pages = -(-new_lens // page_size)
    num_pages = int(pages.sum()) + 2
    kv_indptr = indptr_of(pages)
    kv_indices = rng.permutation(num_pages)[: kv_indptr[-1]].astype(np.int32)
    last = np.where(pages > 0, new_lens - (pages - 1) * page_size, 0).astype(np.int32)
    shape = (num_pages, page_size, hkv, D) if layout == "NHD" else (num_pages, hkv, page_size, D)
    k0, v0 = rand(rng, shape, kv_dtype, scale=4.0), rand(rng, shape, kv_dtype, scale=4.0)
    cache = jnp.stack([k0, v0], axis=1) if single else (k0, v0)
    nnz = int(app_lens.sum()) + pad
    limit = float(jnp.finfo(kv_dtype).max)
    # Magnitudes up to 4x the fp8 limit (times the scale): some entries saturate.
    keys, values = (rng.standard_normal((nnz, hkv, D)) * limit * rng.uniform(0.01, 2.0) for _ in range(2))
    keys, values = (jnp.asarray(np.clip(x, -6e4, 6e4), row_dtype) for x in (keys, values))
    k_scale, v_scale = draw_scales(rng, scales, hkv)
    seq_lens = jaxinfer.get_seq_lens(kv_indptr, last, page_size)
    batch_indices, positions = jaxinfer.get_batch_indices_positions(indptr_of(app_lens), seq_lens, nnz)
    out = jaxinfer.append_paged_kv_cache(keys, values, batch_indices, positions, cache, kv_indices, kv_indptr, last,
                                         kv_layout=layout, k_scale=k_scale, v_scale=v_scale)
    got = [np.asarray(x, np.float32) for x in jaxinfer.page.unpack_paged_kv_cache(out, layout)]
    # [lo, hi] per slot: the old bits in both where nothing is written.
    lo, hi = ([np.array(x, np.float32) for x in (k0, v0)] for _ in range(2))
    if layout == "HND":
        got, lo, hi = ([x.transpose(0, 2, 1, 3) for x in xs] for xs in (got, lo, hi))
    bounds = [quantized_bounds(np.asarray(x, np.float32)[: nnz - pad], scale, kv_dtype)
              for x, scale in ((keys, k_scale), (values, v_scale))]
    row = 0
    for b in range(len(old_lens)):
        for pos in range(old_lens[b], new_lens[b]):
            page, slot = kv_indices[kv_indptr[b] + pos // page_size], pos % page_size
            for i in range(2):
                lo[i][page, slot], hi[i][page, slot] = bounds[i][0][row], bounds[i][1][row]
            row += 1
    for i, what in enumerate(("k", "v")):
        assert_between(got[i], lo[i], hi[i], what)


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
