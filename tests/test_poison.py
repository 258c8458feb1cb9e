"""Poisoned keys and values (inf, -inf, NaN) that a row cannot see never reach it.

shared/DESIGN.md sections 2 and 5: masked or invisible keys contribute nothing, even when their
values are inf or NaN, and a row with no visible key gives ``o = 0, lse = -inf``. Each test fills
K and V with poison wherever a row cannot see: other requests' pages, pages of no request, the
slots past a request's last token, ragged rows past the batch, keys that causal, a window or a
custom mask hides, and the first key of the request after an empty one (where a padded gather
of the empty request lands). Rows that see no poisoned key must equal the float64 reference of
the clean inputs (tests/ref64.py), with no NaN; a row that does see one may be anything.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import BACKENDS, assert_close, indptr_of, jit_call, make_paged_kv, rand
from ref64 import ref_attention, ref_batch

BF16 = jnp.bfloat16
POISON = np.array([np.inf, -np.inf, np.nan], np.float32)


def _visibility(qo: int, kv: int, causal: bool = False, window_left: int = -1, mask=None) -> np.ndarray:
    """``[qo, kv]`` keys each query row sees (bottom-right aligned, DESIGN.md section 2)."""
    i = np.arange(qo)[:, None] + kv - qo
    j = np.arange(kv)[None, :]
    vis = np.ones((qo, kv), bool)
    if causal:
        vis &= j <= i
    if window_left >= 0:
        vis &= j >= i - window_left
    if mask is not None:
        vis &= mask
    return vis


def _poisoned_keys(rng, vis_list) -> list[np.ndarray]:
    """Per request, the keys to poison: all keys no row sees, the key fewest rows see (when some
    row does not see it), and key 0 of a request right after an empty one."""
    out = []
    for b, vis in enumerate(vis_list):
        kv = vis.shape[1]
        keys = np.zeros(kv, bool)
        if kv:
            seen_by = vis.sum(axis=0)
            keys |= seen_by == 0
            j = int(rng.choice(np.flatnonzero(seen_by == seen_by.min())))
            if seen_by[j] < vis.shape[0]:
                keys[j] = True
            if b > 0 and vis_list[b - 1].shape[1] == 0:
                keys[0] = True
        out.append(keys)
    return out


def _poison_rows(rng, x: np.ndarray, rows) -> np.ndarray:
    """``x`` with each of ``rows`` (leading index tuples) set to one random poison value."""
    x = x.copy()
    for r in rows:
        x[r] = rng.choice(POISON)
    return x


def _clean_rows(vis_list, poisoned) -> np.ndarray:
    """``[nnz_q]`` bool: query rows that see no poisoned key."""
    return np.concatenate([~(vis & p[None, :]).any(axis=1) for vis, p in zip(vis_list, poisoned)])


def _check(o, lse, want_o, want_lse, clean, dtype):
    assert clean.sum() >= 3, "the case leaves too few rows to check"
    assert_close(np.asarray(o, np.float32)[clean], want_o[clean], dtype, "o (rows that see no poison)")
    assert_close(np.asarray(lse)[clean], want_lse[clean], dtype, "lse (rows that see no poison)")


def _lens(rng):
    """Five requests, two of them empty (one first, one in the middle), one with more queries
    than keys (causal leaves its first rows without keys)."""
    kv_lens = np.array([0, rng.integers(5, 13), 0, rng.integers(15, 31), rng.integers(3, 7)])
    qo_lens = np.array([2, rng.integers(2, 5), 1, rng.integers(4, 9), 0])
    qo_lens[4] = kv_lens[4] + 2
    return kv_lens, qo_lens


def _masks(rng, qo_lens, kv_lens):
    """Random custom masks, each with a fully masked row and a fully masked key column."""
    masks = []
    for qo, kv in zip(qo_lens, kv_lens):
        m = rng.random((qo, kv)) < 0.6
        if qo and kv:
            m[rng.integers(qo)] = False
            m[:, rng.integers(kv)] = False
        masks.append(m)
    return masks


MASKS = {
    "causal": dict(causal=True),
    "causal-window": dict(causal=True, window_left=3),
    "custom-mask": dict(custom_mask=True),
    "none": {},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_kind", ["paged", "ragged"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_poison_batch_prefill(rng, backend, kv_kind, mask_kind):
    page_size, hq, hkv, d, dtype = 4, 4, 2, 32, BF16
    options = dict(MASKS[mask_kind])
    kv_lens, qo_lens = _lens(rng)
    masks = _masks(rng, qo_lens, kv_lens) if options.pop("custom_mask", False) else None
    vis_list = [_visibility(a, b, mask=None if masks is None else masks[i], **options)
                for i, (a, b) in enumerate(zip(qo_lens, kv_lens))]
    poisoned = _poisoned_keys(rng, vis_list)
    qo_indptr = indptr_of(qo_lens)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    flat_mask = None if masks is None else np.concatenate([m.reshape(-1) for m in masks])
    if kv_kind == "paged":
        paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype)
        k_list, v_list = paged.k_list, paged.v_list
        k_cache, v_cache = (np.asarray(x, np.float32) for x in paged.cache)
        # Every slot outside the requests' tokens, and the poisoned keys inside them.
        owned = np.zeros(k_cache.shape[:2], bool)
        rows = []
        for b, kv in enumerate(kv_lens):
            pages = paged.kv_indices[paged.kv_indptr[b] : paged.kv_indptr[b + 1]]
            for j in range(kv):
                owned[pages[j // page_size], j % page_size] = True
            rows += [(pages[j // page_size], j % page_size) for j in np.flatnonzero(poisoned[b])]
        rows += list(zip(*np.nonzero(~owned)))
        cache = tuple(jnp.asarray(_poison_rows(rng, x, rows), dtype) for x in (k_cache, v_cache))
        wrapper = jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend)
        wrapper.plan(qo_indptr, paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size,
                     custom_mask=flat_mask, q_data_type=dtype, **options)
        o, lse = jit_call(wrapper.run, q, cache, return_lse=True)
    else:
        kv_indptr = indptr_of(kv_lens)
        extra = 3  # rows of no request after the batch
        k = np.asarray(rand(rng, (kv_indptr[-1] + extra, hkv, d), dtype), np.float32)
        v = np.asarray(rand(rng, k.shape, dtype), np.float32)
        k_list = [k[a:b] for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        v_list = [v[a:b] for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        rows = [(kv_indptr[b] + j,) for b in range(kv_lens.size) for j in np.flatnonzero(poisoned[b])]
        rows += [(r,) for r in range(kv_indptr[-1], k.shape[0])]
        k, v = (jnp.asarray(_poison_rows(rng, x, rows), dtype) for x in (k, v))
        wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
        wrapper.plan(qo_indptr, kv_indptr, hq, hkv, d, custom_mask=flat_mask, q_data_type=dtype, **options)
        o, lse = jit_call(wrapper.run, q, k, v, return_lse=True)
    want_o, want_lse = ref_batch(q, k_list, v_list, qo_indptr, custom_mask=flat_mask, **options)
    clean = _clean_rows(vis_list, poisoned)
    _check(o, lse, want_o, want_lse, clean, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poison_batch_decode_window(rng, backend):
    """Decode with a window: keys before the window, pages of no request, slots past each last
    token and the empty requests' neighbours hold poison."""
    page_size, hq, hkv, d, dtype, window = 4, 4, 1, 32, BF16, 5
    kv_lens = np.array([0, rng.integers(10, 40), rng.integers(1, 4), 0, rng.integers(10, 40)])
    paged = make_paged_kv(rng, kv_lens, page_size, hkv, d, dtype)
    k_cache, v_cache = (np.asarray(x, np.float32) for x in paged.cache)
    visible = np.zeros(k_cache.shape[:2], bool)
    for b, kv in enumerate(kv_lens):
        pages = paged.kv_indices[paged.kv_indptr[b] : paged.kv_indptr[b + 1]]
        for j in range(max(0, kv - 1 - window), kv):
            visible[pages[j // page_size], j % page_size] = True
    rows = list(zip(*np.nonzero(~visible)))
    cache = tuple(jnp.asarray(_poison_rows(rng, x, rows), dtype) for x in (k_cache, v_cache))
    q = rand(rng, (kv_lens.size, hq, d), dtype)
    wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend)
    wrapper.plan(paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size,
                 window_left=window, q_data_type=dtype)
    o, lse = jit_call(wrapper.run, q, cache, return_lse=True)
    want_o, want_lse = ref_batch(q, paged.k_list, paged.v_list, indptr_of(np.ones_like(kv_lens)), window_left=window)
    _check(o, lse, want_o, want_lse, np.ones(kv_lens.size, bool), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poison_cascade_empty_level(rng, backend):
    """Two cascade levels; request 1 has no keys of its own (an empty last-level request): its
    rows are the shared level's state alone, whatever its neighbour's first key holds."""
    page_size, hq, hkv, d, dtype = 4, 4, 2, 32, BF16
    own = np.array([rng.integers(3, 10), 0, rng.integers(3, 10)])
    seg_lens = np.concatenate([[rng.integers(4, 12)], own])
    paged = make_paged_kv(rng, seg_lens, page_size, hkv, d, dtype)
    qo_lens = rng.integers(2, 5, size=3)
    qo_indptr = indptr_of(qo_lens)
    k_cache, v_cache = (np.asarray(x, np.float32) for x in paged.cache)
    # Poison: every slot outside the segments, and own key 0 of request 2 (after the empty one).
    owned = np.zeros(k_cache.shape[:2], bool)
    for s, n in enumerate(seg_lens):
        pages = paged.kv_indices[paged.kv_indptr[s] : paged.kv_indptr[s + 1]]
        for j in range(n):
            owned[pages[j // page_size], j % page_size] = True
    rows = list(zip(*np.nonzero(~owned)))
    rows.append((paged.kv_indices[paged.kv_indptr[3]], 0))
    cache = tuple(jnp.asarray(_poison_rows(rng, x, rows), dtype) for x in (k_cache, v_cache))
    ptr = paged.kv_indptr
    tables = [
        (np.array([0, ptr[1]], np.int32), paged.kv_indices[: ptr[1]], paged.kv_last_page_len[:1]),
        ((ptr[1:] - ptr[1]).astype(np.int32), paged.kv_indices[ptr[1] : ptr[-1]], paged.kv_last_page_len[1:]),
    ]
    wrapper = jaxinfer.MultiLevelCascadeAttentionWrapper(2, backend=backend)
    wrapper.plan([np.array([0, qo_indptr[-1]], np.int32), qo_indptr], [t[0] for t in tables], [t[1] for t in tables],
                 [t[2] for t in tables], hq, hkv, d, page_size, q_data_type=dtype)
    q = rand(rng, (qo_indptr[-1], hq, d), dtype)
    o, lse = jit_call(wrapper.run, q, cache, return_lse=True)
    want = [ref_attention(q[qo_indptr[b] : qo_indptr[b + 1]],
                          np.concatenate([paged.k_list[0], paged.k_list[1 + b]]),
                          np.concatenate([paged.v_list[0], paged.v_list[1 + b]])) for b in range(3)]
    clean = np.repeat([True, True, False], qo_lens)  # request 2 sees its poisoned key 0
    _check(o, lse, np.concatenate([w[0] for w in want]), np.concatenate([w[1] for w in want]), clean, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [np.inf, np.nan], ids=["inf", "nan"])
def test_poison_single_prefill_causal(rng, backend, poison):
    """V's last key (only the last query sees it under causal) holds poison; K's last key too.
    A second call adds a fully masked row (custom mask) that must give o = 0, lse = -inf."""
    lq, lk, hq, hkv, d, dtype = 5, 9, 4, 2, 32, BF16
    q = rand(rng, (lq, hq, d), dtype)
    k, v = rand(rng, (lk, hkv, d), dtype), rand(rng, (lk, hkv, d), dtype)
    kp, vp = k.at[lk - 1].set(poison), v.at[lk - 1].set(poison)
    o, lse = jit_call(jaxinfer.single_prefill_with_kv_cache, q, kp, vp, causal=True, return_lse=True, backend=backend)
    want_o, want_lse = ref_attention(q, k, v, causal=True)
    clean = np.arange(lq) < lq - 1
    _check(o, lse, want_o, want_lse, clean, dtype)
    mask = np.asarray(_visibility(lq, lk, causal=True)) & (rng.random((lq, lk)) < 0.7)
    mask[1] = False
    mask[:, lk - 1] = False  # nobody sees the poisoned key now
    # The custom mask is read on the host (the plan), so this call is not jitted.
    o, lse = jaxinfer.single_prefill_with_kv_cache(q, kp, vp, custom_mask=mask, return_lse=True, backend=backend)
    want_o, want_lse = ref_attention(q, k, v, custom_mask=mask)
    _check(o, lse, want_o, want_lse, np.ones(lq, bool), dtype)
    assert not np.asarray(o[1], np.float32).any() and (np.asarray(lse[1]) == -np.inf).all()


# --- The "xla" backend's padded plan size (issue 16): a clear ValueError at plan time instead of
# an out-of-memory kill. Not poison, but the same hardening issue and the same backends.


def _limited_data_memory(extra_bytes: int):
    """Context manager: the process may map at most ``extra_bytes`` more private memory (Linux
    RLIMIT_DATA), so that a regression that tries to allocate tens of GB fails with MemoryError
    here instead of being killed by the OOM killer."""
    import contextlib
    import resource

    @contextlib.contextmanager
    def limit():
        try:
            with open("/proc/self/status") as f:
                vm_data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
        except (OSError, StopIteration):
            yield
            return
        saved = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (vm_data + extra_bytes, saved[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_DATA, saved)

    return limit()


def test_xla_plan_rejects_a_request_of_2_pow_31_tokens():
    """One paged request of 2**31 - 1 tokens (2**15 pages of 2**16): the xla plan would pad to
    2**31 key slots (about 50 GB of host index arrays); it raises at plan time, naming the
    lengths, before allocating anything of that size."""
    ps, n_pages = 2**16, 2**15
    wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
    with _limited_data_memory(2 << 30), pytest.raises(
        ValueError, match=r"max_kv_len=2147483648 \(the longest request has kv_len=2147483647.*MAX_PADDED_ELEMENTS"
    ):
        wrapper.plan(np.array([0, n_pages]), np.arange(n_pages), np.array([ps - 1]), 4, 4, 64, ps)
    ragged = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend="xla")
    with _limited_data_memory(2 << 30), pytest.raises(ValueError, match=r"max_batch_size=2 x max_qo_len=536870912 .*qo_indptr"):
        ragged.plan(np.array([0, 1, 2**29 + 1]), np.array([0, 1, 2]), 4, 4, 64)


def test_xla_plan_limit_counts_padded_slots(rng, monkeypatch):
    """With the limit lowered to 4096: a batch of 3 padded to 4 x 2048 key slots, and a custom
    mask padded to 2 x 16 x 256, are refused; 4 x 1024 key slots fit and run exactly."""
    from jaxinfer.backends import xla

    monkeypatch.setattr(xla, "MAX_PADDED_ELEMENTS", 4096)
    page_size, hq, hkv, d, dtype = 16, 4, 2, 32, BF16
    paged = make_paged_kv(rng, [0, 1000, 1500], page_size, hkv, d, dtype)
    table = (paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size)
    with pytest.raises(ValueError, match=r"max_batch_size=4 x max_kv_len=2048 .* 8192 padded key slots"):
        jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla").plan(*table)
    paged = make_paged_kv(rng, [0, 1000, 1024], page_size, hkv, d, dtype)
    wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend="xla")
    wrapper.plan(paged.kv_indptr, paged.kv_indices, paged.kv_last_page_len, hq, hkv, d, page_size, q_data_type=dtype)
    q = rand(rng, (3, hq, d), dtype)
    o, lse = jit_call(wrapper.run, q, paged.cache, return_lse=True)
    want_o, want_lse = ref_batch(q, paged.k_list, paged.v_list, indptr_of([1, 1, 1]))
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, dtype, "lse")
    mask = rng.random(2 * 16 * 256) < 0.5
    with pytest.raises(ValueError, match=r"max_qo_len=16 x max_kv_len=256 gives 8192 padded custom_mask"):
        jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend="xla").plan(
            indptr_of([16, 16]), indptr_of([256, 256]), hq, hkv, d, custom_mask=mask)


def test_xla_plan_limit_admits_the_benchmarks():
    """The benchmarks run xla at full size: their padded batches stay under the limit."""
    from jaxinfer.backends.xla import MAX_PADDED_ELEMENTS
    from jaxinfer.bench.workloads import WORKLOADS
    from jaxinfer.plan.batch import next_pow2

    wide = WORKLOADS["decode_wide_zipf"]
    assert next_pow2(wide.batch_size) * next_pow2(int(wide.kv_lens().max())) == 256 * 32768
    for w in WORKLOADS.values():
        if hasattr(w, "kv_lens"):  # decode
            slots = [next_pow2(w.batch_size) * next_pow2(int(w.kv_lens().max()))]
        elif hasattr(w, "qo_len"):  # prefill / append
            slots = [next_pow2(w.batch_size) * next_pow2(w.qo_len + w.prefix_len)]
        elif hasattr(w, "prefill_len"):  # a mixed step: xla would pad every decode to the prefill's rows
            problem = w.scaled(1).build(0)
            with pytest.raises(ValueError, match="float32 logits"):
                problem.make_wrapper(backend="xla").plan(*problem.plan_args, **problem.plan_kwargs)
            continue
        elif hasattr(w, "shared_len"):  # cascade levels and its flat form
            slots = [next_pow2(w.shared_len), next_pow2(w.batch_size) * next_pow2(w.shared_len + w.unique_len)]
        else:  # block-sparse: one request of N keys, M queries, a dense [M, N] mask
            slots = [w.N, w.M, w.M * w.N]
        assert max(slots) <= MAX_PADDED_ELEMENTS, (w.name, slots)
