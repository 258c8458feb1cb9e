"""Paged KV cache utilities against numpy: page table checks, seq lens, append positions, append."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.page import append_paged_kv_cache, get_batch_indices_positions, get_seq_lens, unpack_paged_kv_cache
from jaxinfer.plan.checks import check_indptr, check_page_table, seq_lens_host

SETTINGS = settings(max_examples=25, deadline=None)


def make_batch(rng, page_size, old_lens, app_lens, *, spare_pages=3, junk_indices=2):
    """A page table sized for ``old + app`` tokens per request, on shuffled pages of a larger pool.

    ``kv_indices`` carries ``junk_indices`` trailing entries past ``kv_indptr[-1]`` (valid page
    ids that belong to no request) so that a lookup past a request's pages would show.
    """
    new_lens = np.asarray(old_lens) + np.asarray(app_lens)
    pages_per_req = -(-new_lens // page_size)
    num_pages = int(pages_per_req.sum()) + spare_pages
    perm = rng.permutation(num_pages).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages_per_req)]).astype(np.int32)
    kv_indices = np.concatenate([perm[: kv_indptr[-1]], perm[kv_indptr[-1] :][:junk_indices]]).astype(np.int32)
    last = np.where(pages_per_req > 0, new_lens - (pages_per_req - 1) * page_size, 0).astype(np.int32)
    append_indptr = np.concatenate([[0], np.cumsum(app_lens)]).astype(np.int32)
    return num_pages, kv_indptr, kv_indices, last, append_indptr, new_lens


def make_cache(rng, num_pages, page_size, hkv, d, kv_layout, single, dtype=np.float32):
    """Random (never zero) cache in the requested structure, plus its numpy (k, v) in NHD."""
    k = rng.standard_normal((num_pages, page_size, hkv, d)).astype(dtype)
    v = rng.standard_normal((num_pages, page_size, hkv, d)).astype(dtype)
    return to_layout(k, v, kv_layout, single), (k, v)


def to_layout(k_nhd, v_nhd, kv_layout, single):
    k, v = (x if kv_layout == "NHD" else x.transpose(0, 2, 1, 3) for x in (k_nhd, v_nhd))
    return jnp.asarray(np.stack([k, v], axis=1)) if single else (jnp.asarray(k), jnp.asarray(v))


def to_nhd(cache, kv_layout):
    k, v = unpack_paged_kv_cache(cache, kv_layout)
    k, v = np.asarray(k), np.asarray(v)
    return (k, v) if kv_layout == "NHD" else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def numpy_append(k_nhd, v_nhd, keys, values, old_lens, app_lens, kv_indptr, kv_indices, page_size):
    k, v = k_nhd.copy(), v_nhd.copy()
    row = 0
    for b, (old, n) in enumerate(zip(old_lens, app_lens)):
        for pos in range(old, old + n):
            page = kv_indices[kv_indptr[b] + pos // page_size]
            k[page, pos % page_size] = keys[row]
            v[page, pos % page_size] = values[row]
            row += 1
    return k, v


batches = st.integers(1, 4).flatmap(
    lambda b: st.tuples(st.lists(st.integers(0, 20), min_size=b, max_size=b), st.lists(st.integers(0, 12), min_size=b, max_size=b))
)


@SETTINGS
@given(
    page_size=st.sampled_from([1, 5, 16]),
    lens=batches,
    kv_layout=st.sampled_from(["NHD", "HND"]),
    single=st.booleans(),
    hkv=st.integers(1, 2),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_append_matches_numpy_and_reads_back(page_size, lens, kv_layout, single, hkv, pad, seed):
    rng = np.random.default_rng(seed)
    old_lens, app_lens = lens
    d = 4
    num_pages, kv_indptr, kv_indices, last, append_indptr, new_lens = make_batch(rng, page_size, old_lens, app_lens)
    cache, (k0, v0) = make_cache(rng, num_pages, page_size, hkv, d, kv_layout, single)
    nnz = int(append_indptr[-1]) + pad
    # Padding rows carry real values: if they were written anywhere the comparison shows it.
    keys = rng.standard_normal((nnz, hkv, d)).astype(np.float32)
    values = rng.standard_normal((nnz, hkv, d)).astype(np.float32)

    seq_lens = get_seq_lens(kv_indptr, last, page_size)
    np.testing.assert_array_equal(seq_lens, new_lens)
    batch_indices, positions = get_batch_indices_positions(append_indptr, seq_lens, nnz)
    out = append_paged_kv_cache(
        jnp.asarray(keys), jnp.asarray(values), batch_indices, positions, cache,
        jnp.asarray(kv_indices), jnp.asarray(kv_indptr), jnp.asarray(last), kv_layout=kv_layout,
    )

    assert type(out) is type(cache)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == jax.tree.map(lambda x: (x.shape, x.dtype), cache)
    k, v = to_nhd(out, kv_layout)
    want_k, want_v = numpy_append(k0, v0, keys, values, old_lens, app_lens, kv_indptr, kv_indices, page_size)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    # Read the appended tokens back through the page table.
    for b in range(len(old_lens)):
        pos = np.arange(old_lens[b], new_lens[b])
        pages = kv_indices[kv_indptr[b] + pos // page_size]
        rows = slice(append_indptr[b], append_indptr[b + 1])
        np.testing.assert_array_equal(k[pages, pos % page_size], keys[rows])
        np.testing.assert_array_equal(v[pages, pos % page_size], values[rows])


@SETTINGS
@given(lens=batches, pad=st.integers(0, 4))
def test_get_batch_indices_positions_matches_numpy(lens, pad):
    old_lens, app_lens = lens
    seq_lens = np.asarray(old_lens) + np.asarray(app_lens)
    append_indptr = np.concatenate([[0], np.cumsum(app_lens)]).astype(np.int32)
    nnz = int(append_indptr[-1]) + pad
    want_b = np.full(nnz, -1)
    want_p = np.full(nnz, -1)
    for b in range(len(app_lens)):
        for t in range(app_lens[b]):
            want_b[append_indptr[b] + t] = b
            want_p[append_indptr[b] + t] = seq_lens[b] - app_lens[b] + t
    batch_indices, positions = get_batch_indices_positions(jnp.asarray(append_indptr), jnp.asarray(seq_lens), nnz)
    assert batch_indices.dtype == positions.dtype == jnp.int32
    np.testing.assert_array_equal(batch_indices, want_b)
    np.testing.assert_array_equal(positions, want_p)


@SETTINGS
@given(
    page_size=st.sampled_from([1, 5, 16]),
    num_pages=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_get_seq_lens_matches_numpy(page_size, num_pages, seed):
    rng = np.random.default_rng(seed)
    kv_indptr = np.concatenate([[0], np.cumsum(num_pages)]).astype(np.int32)
    last = np.where(np.asarray(num_pages) > 0, rng.integers(1, page_size + 1, len(num_pages)), 0).astype(np.int32)
    want = [(n - 1) * page_size + l if n else 0 for n, l in zip(num_pages, last)]
    got = jax.jit(get_seq_lens, static_argnums=2)(jnp.asarray(kv_indptr), jnp.asarray(last), page_size)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(seq_lens_host(kv_indptr, last, page_size), want)


def test_get_batch_indices_positions_no_requests():
    b, p = get_batch_indices_positions(jnp.zeros((1,), jnp.int32), jnp.zeros((0,), jnp.int32), 3)
    np.testing.assert_array_equal(b, [-1, -1, -1])
    np.testing.assert_array_equal(p, [-1, -1, -1])


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("single", [False, True])
def test_invalid_rows_and_pages_never_write(kv_layout, single):
    rng = np.random.default_rng(0)
    page_size, hkv, d = 4, 2, 4
    # Request 0: 6 tokens on pages [3, bad]; request 1: 3 tokens on page [1].
    num_pages = 5
    kv_indptr = np.array([0, 2, 3], np.int32)
    last = np.array([2, 3], np.int32)
    cache, (k0, v0) = make_cache(rng, num_pages, page_size, hkv, d, kv_layout, single)
    batch_indices = np.array([0, 1, -1, 2, 7, 0, 0, 1, 0, 1], np.int32)
    positions = np.array([1, 2, 0, 0, 0, -1, 6, 3, 5, 0], np.int32)
    # Only rows 0 (page 3, slot 1), 1 (page 1, slot 2) and 9 (page 1, slot 0) are valid:
    # -1 / out-of-range batch indices, negative positions, positions >= seq_len and rows whose
    # page id is out of the cache (row 8: kv_indices[1]) must write nothing.
    valid = {0: (3, 1), 1: (1, 2), 9: (1, 0)}
    keys = rng.standard_normal((10, hkv, d)).astype(np.float32)
    values = rng.standard_normal((10, hkv, d)).astype(np.float32)
    want_k, want_v = k0.copy(), v0.copy()
    for row, (page, slot) in valid.items():
        want_k[page, slot], want_v[page, slot] = keys[row], values[row]
    for bad_page in (-1, num_pages, 2**30):
        kv_indices = np.array([3, bad_page, 1], np.int32)
        out = jax.jit(append_paged_kv_cache, static_argnames="kv_layout")(
            jnp.asarray(keys), jnp.asarray(values), jnp.asarray(batch_indices), jnp.asarray(positions), cache,
            jnp.asarray(kv_indices), jnp.asarray(kv_indptr), jnp.asarray(last), kv_layout=kv_layout,
        )
        k, v = to_nhd(out, kv_layout)
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("single", [False, True])
def test_jit_with_donation_updates_in_place(kv_layout, single):
    rng = np.random.default_rng(1)
    page_size, hkv, d = 5, 2, 8
    old_lens, app_lens = [3, 9], [4, 1]
    num_pages, kv_indptr, kv_indices, last, append_indptr, _ = make_batch(rng, page_size, old_lens, app_lens)
    cache, (k0, v0) = make_cache(rng, num_pages, page_size, hkv, d, kv_layout, single, dtype=jnp.bfloat16)
    nnz = 8
    keys = jnp.asarray(rng.standard_normal((nnz, hkv, d)), jnp.bfloat16)
    values = jnp.asarray(rng.standard_normal((nnz, hkv, d)), jnp.bfloat16)

    @jax.jit
    def index_step(append_indptr, kv_indptr, last):
        return get_batch_indices_positions(append_indptr, get_seq_lens(kv_indptr, last, page_size), nnz)

    batch_indices, positions = index_step(append_indptr, kv_indptr, last)
    step = jax.jit(append_paged_kv_cache, static_argnames="kv_layout", donate_argnums=4)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*donated buffers were not usable.*")
        out = step(keys, values, batch_indices, positions, cache, kv_indices, kv_indptr, last, kv_layout=kv_layout)
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(out)] == pointers
    k, v = to_nhd(out, kv_layout)
    want_k, want_v = numpy_append(
        np.asarray(k0), np.asarray(v0), np.asarray(keys), np.asarray(values), old_lens, app_lens,
        kv_indptr, kv_indices, page_size,
    )
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_unpack_paged_kv_cache(kv_layout):
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 4, 2, 8)).astype(np.float32)
    v = rng.standard_normal((3, 4, 2, 8)).astype(np.float32)
    for single in (False, True):
        got_k, got_v = to_nhd(to_layout(k, v, kv_layout, single), kv_layout)
        np.testing.assert_array_equal(got_k, k)
        np.testing.assert_array_equal(got_v, v)


def _append_args(**overrides):
    args = dict(
        append_key=jnp.ones((3, 2, 8), jnp.float32),
        append_value=jnp.ones((3, 2, 8), jnp.float32),
        batch_indices=jnp.zeros((3,), jnp.int32),
        positions=jnp.arange(3, dtype=jnp.int32),
        paged_kv_cache=(jnp.ones((4, 5, 2, 8)), jnp.ones((4, 5, 2, 8))),
        kv_indices=jnp.arange(4, dtype=jnp.int32),
        kv_indptr=jnp.array([0, 1], jnp.int32),
        kv_last_page_len=jnp.array([3], jnp.int32),
        kv_layout="NHD",
    )
    return args | overrides


@pytest.mark.parametrize(
    "name, value",
    [
        ("append_key", jnp.ones((3, 2, 8), jnp.bfloat16)),
        ("append_key", jnp.ones((3, 1, 8), jnp.float32)),
        ("append_value", jnp.ones((3, 2, 4), jnp.float32)),
        ("append_value", jnp.ones((2, 2, 8), jnp.float32)),
        ("batch_indices", jnp.zeros((4,), jnp.int32)),
        ("positions", jnp.zeros((3,), jnp.float32)),
        ("kv_indices", jnp.zeros((2, 2), jnp.int32)),
        ("kv_indptr", jnp.array([0, 1, 2], jnp.int32)),
        ("kv_last_page_len", jnp.array(3, jnp.int32)),
        ("kv_layout", "NDH"),
        ("paged_kv_cache", jnp.ones((4, 5, 2, 8))),
        ("paged_kv_cache", jnp.ones((4, 3, 5, 2, 8))),
        ("paged_kv_cache", (jnp.ones((4, 5, 2, 8)),) * 3),
        ("paged_kv_cache", (jnp.ones((4, 5, 2, 8)), jnp.ones((4, 5, 2, 8), jnp.bfloat16))),
        ("paged_kv_cache", (jnp.ones((5, 2, 8)), jnp.ones((5, 2, 8)))),
    ],
)
def test_append_errors_name_the_argument(name, value):
    with pytest.raises(ValueError, match=re.escape(name)):
        append_paged_kv_cache(**_append_args(**{name: value}))


def test_append_accepts_valid_args():
    k, _ = append_paged_kv_cache(**_append_args(append_key=jnp.full((3, 2, 8), 7.0)))
    np.testing.assert_array_equal(k[0, :3], 7.0)
    np.testing.assert_array_equal(k[0, 3:], 1.0)


@pytest.mark.parametrize(
    "indptr, batch_size, match",
    [
        (np.zeros((2, 2), np.int32), None, "qo_indptr must be a 1-D"),
        (np.zeros((0,), np.int32), None, "qo_indptr must be a 1-D"),
        (np.array([0.0, 1.0]), None, "qo_indptr must hold integers"),
        (np.array([0, 1, 2]), 3, "qo_indptr must have length"),
        (np.array([1, 2]), None, r"qo_indptr\[0\] must be 0"),
        (np.array([0, 3, 2]), None, "qo_indptr must be non-decreasing"),
        (np.array([0, 2**31], np.int64), None, "qo_indptr exceeds the int32"),
    ],
)
def test_check_indptr_errors(indptr, batch_size, match):
    with pytest.raises(ValueError, match=match):
        check_indptr("qo_indptr", indptr, batch_size=batch_size)


def test_check_indptr_ok():
    out = check_indptr("qo_indptr", np.array([0, 0, 4], np.int64), batch_size=2)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [0, 0, 4])


@pytest.mark.parametrize(
    "table, match",
    [
        (dict(page_size=0), "page_size"),
        (dict(kv_last_page_len=np.array([[2, 0, 1]])), "kv_last_page_len must be 1-D"),
        (dict(kv_last_page_len=np.array([2, 1])), "kv_indptr must have length"),
        (dict(kv_indptr=np.array([0, 2, 1, 3])), "kv_indptr must be non-decreasing"),
        (dict(kv_indices=np.array([0, 1])), "kv_indices has 2 entries"),
        (dict(kv_indices=np.array([[0, 1, 2]])), "kv_indices must be a 1-D"),
        (dict(kv_indices=np.array([0, -1, 2])), "kv_indices must be >= 0"),
        (dict(num_pages=2), "kv_indices must be < num_pages"),
        (dict(kv_last_page_len=np.array([5, 0, 1])), r"kv_last_page_len\[0\] = 5"),
        (dict(kv_last_page_len=np.array([0, 0, 1])), r"kv_last_page_len\[0\] = 0"),
        (dict(kv_last_page_len=np.array([2, 1, 1])), r"kv_last_page_len\[1\] = 1"),
        (dict(kv_last_page_len=np.array([2.0, 0.0, 1.0])), "kv_last_page_len must hold integers"),
    ],
)
def test_check_page_table_errors(table, match):
    args = dict(
        kv_indptr=np.array([0, 2, 2, 3]), kv_indices=np.array([0, 1, 2, 9]), kv_last_page_len=np.array([2, 0, 1]),
        page_size=4, num_pages=3,
    )
    with pytest.raises(ValueError, match=match):
        check_page_table(**(args | table))


def test_check_page_table_ok():
    indptr, indices, last = check_page_table(np.array([0, 2, 2, 3]), np.array([0, 1, 2, 9]), np.array([2, 0, 4]), 4, 3)
    assert indptr.dtype == indices.dtype == last.dtype == np.int32
    np.testing.assert_array_equal(seq_lens_host(indptr, last, 4), [6, 0, 4])


def model_append_targets(batch_indices, positions, kv_indices, kv_indptr, last, page_size, num_pages):
    """Numpy model of where each row lands (``None``: writes nothing), from the docstring's rules:
    its own request's page ``j = pos // page_size < kv_indptr[b+1] - kv_indptr[b]``, entry
    ``kv_indptr[b] + j`` inside ``kv_indices``, in the last page a slot below ``last`` clamped to
    ``1..page_size``, and a page id inside the cache (Python ints: no overflow)."""
    out = []
    B = len(last)
    for b, pos in zip(batch_indices.tolist(), positions.tolist()):
        if not (0 <= b < B and pos >= 0):
            out.append(None)
            continue
        start, end = int(kv_indptr[b]), int(kv_indptr[b + 1])
        j, slot = divmod(pos, page_size)
        flat = start + j
        ok = flat < end and 0 <= flat < len(kv_indices)
        ok = ok and (flat != end - 1 or slot < min(max(int(last[b]), 1), page_size))
        page = int(kv_indices[flat]) if ok else -1
        out.append((page, slot) if ok and 0 <= page < num_pages else None)
    return out


def own_pages(b, kv_indices, kv_indptr):
    """Page ids request ``b`` owns: entries ``[kv_indptr[b], kv_indptr[b+1]) ∩ [0, len)``."""
    lo, hi = max(int(kv_indptr[b]), 0), min(int(kv_indptr[b + 1]), len(kv_indices))
    return set(kv_indices[lo:hi].tolist()) if lo < hi else set()


LAST_KINDS = ["keep", "zero", "negative", "big"]
INT32 = np.iinfo(np.int32)


@SETTINGS
@given(
    page_size=st.sampled_from([1, 4, 5]),
    lens=batches,
    last_kinds=st.lists(st.sampled_from(LAST_KINDS), min_size=4, max_size=4),
    bad_indptr=st.sampled_from(["no", "shuffle", "random", "extreme"]),
    extra_rows=st.integers(0, 6),
    kv_layout=st.sampled_from(["NHD", "HND"]),
    single=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_append_with_garbage_last_page_len_and_indptr_writes_only_own_pages(
    page_size, lens, last_kinds, bad_indptr, extra_rows, kv_layout, single, seed
):
    """Traced kv_last_page_len > page_size, 0 or negative (and garbage kv_indptr): every slot the
    append changes is in a page of the writing row's own request, and where the rows land is the
    docstring's rule; kv_indices' padding entries (page 0, as StepPlanner fills them) stay unread."""
    rng = np.random.default_rng(seed)
    old_lens, app_lens = lens
    B, hkv, d = len(old_lens), 2, 4
    num_pages, kv_indptr, kv_indices, last, append_indptr, _ = make_batch(rng, page_size, old_lens, app_lens)
    kv_indices = np.concatenate([kv_indices, np.zeros(3, np.int32)])  # StepPlanner-style padding
    for b in range(B):
        kind = last_kinds[b]
        if kind == "zero":
            last[b] = 0
        elif kind == "negative":
            last[b] = -int(rng.integers(1, 2 * page_size + 2))
        elif kind == "big":
            last[b] = page_size + int(rng.integers(1, 3 * page_size + 2))
    if bad_indptr == "shuffle":
        kv_indptr = rng.permutation(kv_indptr).astype(np.int32)
    elif bad_indptr == "random":
        kv_indptr = rng.integers(-3, len(kv_indices) + 4, size=B + 1).astype(np.int32)
    elif bad_indptr == "extreme":
        kv_indptr = rng.choice([INT32.min, INT32.min + 1, -1, 0, 1, INT32.max - 1, INT32.max], size=B + 1).astype(np.int32)
    cache, (k0, v0) = make_cache(rng, num_pages, page_size, hkv, d, kv_layout, single)
    # The rows a jitted step would compute from these tables (positions from get_seq_lens, which
    # trusts last_page_len), then random rows (any batch index, positions up to far past the end).
    seq_lens = get_seq_lens(kv_indptr, last, page_size)
    nnz = int(append_indptr[-1])
    batch_indices, positions = (np.asarray(x) for x in get_batch_indices_positions(append_indptr, seq_lens, nnz))
    batch_indices = np.concatenate([batch_indices, rng.integers(-1, B + 1, extra_rows)]).astype(np.int32)
    positions = np.concatenate([positions, rng.integers(-2, 4 * page_size * 8, extra_rows)]).astype(np.int32)
    n = batch_indices.size
    # Row r writes the values r + 1 (keys) and -(r + 1) (values): the cache tells who wrote a slot.
    keys = np.broadcast_to(np.arange(1, n + 1, dtype=np.float32)[:, None, None], (n, hkv, d)).copy()
    out = jax.jit(append_paged_kv_cache, static_argnames="kv_layout")(
        jnp.asarray(keys), jnp.asarray(-keys), jnp.asarray(batch_indices), jnp.asarray(positions), cache,
        jnp.asarray(kv_indices), jnp.asarray(kv_indptr), jnp.asarray(last), kv_layout=kv_layout,
    )
    k, v = to_nhd(out, kv_layout)
    np.testing.assert_array_equal(v, np.where(k != k0, -k, v0))  # k and v move together
    targets = model_append_targets(batch_indices, positions, kv_indices, kv_indptr, last, page_size, num_pages)
    for page, slot in zip(*np.nonzero((k != k0).any(axis=(2, 3)))):
        writer = int(k[page, slot, 0, 0]) - 1
        assert (k[page, slot] == writer + 1).all(), (page, slot)
        b = int(batch_indices[writer])
        assert 0 <= b < B and page in own_pages(b, kv_indices, kv_indptr), (
            f"row {writer} (request {b}, position {positions[writer]}) wrote page {page}, not one of its own "
            f"{sorted(own_pages(b, kv_indices, kv_indptr)) if 0 <= b < B else []}"
        )
        assert targets[writer] == (page, slot), (writer, targets[writer], (page, slot))
    for row, target in enumerate(targets):
        if target is not None:  # written by this row or another aimed at the same slot
            assert targets[int(k[target][0, 0]) - 1] == target, (row, target)


@pytest.mark.parametrize("last_len", [5, 9, 0, -1, -4])
def test_append_last_page_len_out_of_range_stays_in_own_pages(last_len):
    """Request 0 owns page 2 only (page_size 4); its traced last_page_len is out of range: rows
    past its page must not reach request 1's page 3 nor kv_indices' padding entry (page 0)."""
    page_size, hkv, d = 4, 1, 2
    kv_indptr = jnp.array([0, 1, 2], jnp.int32)
    kv_indices = jnp.array([2, 3, 0], jnp.int32)  # entry 2: padding (page 0)
    last = jnp.array([last_len, 2], jnp.int32)
    cache = (jnp.zeros((4, page_size, hkv, d)), jnp.zeros((4, page_size, hkv, d)))
    positions = jnp.arange(12, dtype=jnp.int32)  # request 0, positions 0..11
    keys = jnp.ones((12, hkv, d))
    k, v = jax.jit(append_paged_kv_cache)(keys, keys, jnp.zeros(12, jnp.int32), positions, cache, kv_indices, kv_indptr, last)
    written = np.asarray(k[..., 0, 0]) != 0
    want = np.zeros_like(written)
    want[2, : min(max(last_len, 1), page_size)] = True
    np.testing.assert_array_equal(written, want)
    np.testing.assert_array_equal(np.asarray(v[..., 0, 0]) != 0, want)
