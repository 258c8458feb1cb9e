"""The serving engine's host structures against straightforward rebuilds, on random operation
sequences: the pool's per-request page tables (kept incrementally) against page lists a model
keeps from each operation's meaning, ``extend_batch`` against one ``extend`` per request, the
vectorized cascade levels against the recursive prefix-trie walk, the planner's sort and step
inputs against what they replace (``sorted(key=pool.pages)``, per-request page tables)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxinfer
from jaxinfer.cascade import _prefix_tree_levels, lexicographic_order
from jaxinfer.nn import KVCachePool, OutOfPagesError, StepPlanner

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pool_state(pool: KVCachePool) -> tuple:
    """Everything the pool's users can see, plus its free list order (which pages come next)."""
    return (pool.requests, {r: (pool.pages(r), pool.seq_len(r)) for r in pool.requests}, list(pool._free),
            pool.num_cached_pages, [pool.refcount(p) for p in range(pool.num_pages)],
            [pool.in_prefix_tree(p) for p in range(pool.num_pages)])


def rebuilt_page_table(lists: dict, lens: dict, rids, page_size: int):
    counts = [len(lists[r]) for r in rids]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = np.asarray([p for r in rids for p in lists[r]], np.int32)
    last = np.asarray([(lens[r] - 1) % page_size + 1 if lens[r] else 0 for r in rids], np.int32)
    return indptr, indices, last


def check_against_model(pool: KVCachePool, lists: dict, lens: dict, rng):
    assert set(pool.requests) == set(lists)
    held = np.zeros(pool.num_pages, np.int64)
    for r, pages in lists.items():
        assert pool.pages(r) == tuple(pages) and pool.seq_len(r) == lens[r]
        assert len(pages) == -(-lens[r] // pool.page_size)
        held[pages] += 1
    assert [pool.refcount(p) for p in range(pool.num_pages)] == held.tolist()
    assert len(pool._free) + pool.num_cached_pages + int((held > 0).sum()) == pool.num_pages
    rids = list(pool.requests)
    for order in (rids, [rids[i] for i in rng.permutation(len(rids))[: rng.integers(len(rids) + 1)]]):
        got, want = pool.page_table(order), rebuilt_page_table(lists, lens, order, pool.page_size)
        for g, w in zip(got, want):
            assert g.dtype == np.int32 and g.tolist() == w.tolist()
        assert pool.seq_lens(order).tolist() == [lens[r] for r in order]


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), page_size=st.integers(1, 4), num_pages=st.integers(4, 40))
def test_pool_tables_match_page_lists_kept_from_each_operation(seed, page_size, num_pages):
    # The model knows what each operation means: add attaches the tree's pages (they stay the
    # request's first pages), extend appends pages popped from the free list (reclaimed cached
    # pages when it runs dry), free drops the list. The pool's tables must give the same page
    # lists, lengths, refcounts and page tables (any subset, any order) after every operation.
    rng = np.random.default_rng(seed)
    pool = KVCachePool(num_pages, page_size, 1, 1, 4, dtype=jnp.float32)
    prompts = [rng.integers(0, 2, 3 * page_size).tolist() for _ in range(2)]  # shared prefixes
    tokens, lists, lens = {}, {}, {}
    for rid in range(60):
        op = rng.integers(5)
        live = list(pool.requests)
        if op == 0 or not live:
            seq = prompts[rng.integers(2)][: rng.integers(3 * page_size + 1)] + rng.integers(0, 2, 6).tolist()
            prefix = seq[: rng.integers(len(seq) + 1)]
            attached = pool.add(rid, np.asarray(prefix, np.int32) if rng.random() < 0.5 else prefix)  # both kinds
            lists[rid], lens[rid], tokens[rid] = list(pool.pages(rid)), attached, seq
            assert len(lists[rid]) * page_size == attached and all(pool.in_prefix_tree(p) for p in lists[rid])
        elif op in (1, 2):
            chosen = [live[i] for i in rng.permutation(len(live))[: rng.integers(1, len(live) + 1)]]
            counts = [int(rng.integers(0, 5)) for _ in chosen]
            free_before = list(pool._free)
            cached_before = {p for p in range(num_pages) if pool.in_prefix_tree(p) and pool.refcount(p) == 0}
            need = sum(-(-(lens[r] + k) // page_size) - len(lists[r]) for r, k in zip(chosen, counts))
            before, held_before = pool_state(pool), {r: len(lists[r]) for r in chosen}
            try:
                if op == 1:
                    for r, k in zip(chosen, counts):
                        pool.extend(r, k)  # may raise midway: the requests before it grew
                        lens[r] += k
                        lists[r] += pool.pages(r)[len(lists[r]) :]
                else:
                    pool.extend_batch(chosen, counts)
                    for r, k in zip(chosen, counts):
                        lens[r] += k
                        lists[r] += pool.pages(r)[len(lists[r]) :]
            except OutOfPagesError:
                assert need > len(free_before) + len(cached_before)
                if op == 2:
                    assert pool_state(pool) == before, "extend_batch is all or nothing"
                continue
            new = [p for r in chosen for p in lists[r][held_before[r] :]]
            if need <= len(free_before):  # popped from the end of the free list, request by request
                assert new == free_before[::-1][:need] and pool._free == free_before[: len(free_before) - need]
            else:  # the free list first, then reclaimed cached pages
                assert set(free_before) <= set(new) <= set(free_before) | cached_before and len(new) == need
        elif op == 3:
            r = live[rng.integers(len(live))]
            ids = tokens[r][: lens[r]] + [0] * max(0, lens[r] - len(tokens[r]))
            pool.cache_prefix(r, np.asarray(ids, np.int64) if rng.random() < 0.5 else ids)
        else:
            r = live[rng.integers(len(live))]
            free_before = list(pool._free)
            pool.free(r)
            # Pages no one holds any more go back to the free list, last page first, unless cached.
            back = [p for p in reversed(lists.pop(r)) if pool.refcount(p) == 0 and not pool.in_prefix_tree(p)]
            assert pool._free == free_before + back
            del lens[r]
        check_against_model(pool, lists, lens, rng)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_extend_batch_is_one_extend_per_request(seed):
    # Two pools run the same operations, one growing requests by extend_batch, the other by one
    # extend() per request: same pages, same free list, same prefix-tree state, including when
    # cached pages must be reclaimed between the allocations.
    rng = np.random.default_rng(seed)
    ps, num_pages = int(rng.integers(1, 5)), int(rng.integers(6, 30))
    batched, one_by_one = (KVCachePool(num_pages, ps, 1, 1, 4, dtype=jnp.float32) for _ in range(2))
    tokens = rng.integers(0, 2, 8 * ps).tolist()
    for rid in range(40):
        live = list(batched.requests)
        if rng.random() < 0.3 or not live:
            prefix = tokens[: rng.integers(len(tokens))]
            assert batched.add(rid, prefix) == one_by_one.add(rid, prefix)
            continue
        if rng.random() < 0.2:
            r = live[rng.integers(len(live))]
            for pool in (batched, one_by_one):
                pool.cache_prefix(r, tokens[: min(pool.seq_len(r), len(tokens))])
                pool.free(r)
            continue
        chosen = [live[i] for i in rng.permutation(len(live))[: rng.integers(1, len(live) + 1)]]
        counts = rng.integers(0, 2 * ps + 1, len(chosen)).tolist()
        need = sum(-(-(batched.seq_len(r) + k) // ps) - len(batched.pages(r)) for r, k in zip(chosen, counts))
        if need > batched.num_available_pages:
            before = pool_state(batched)
            with pytest.raises(OutOfPagesError, match="requests need"):
                batched.extend_batch(chosen, counts)
            assert pool_state(batched) == before
            continue
        batched.extend_batch(chosen, np.asarray(counts))
        for r, k in zip(chosen, counts):
            one_by_one.extend(r, k)
        assert pool_state(batched) == pool_state(one_by_one)


def test_extend_batch_errors():
    pool = KVCachePool(4, 2, 1, 1, 4, dtype=jnp.float32)
    pool.add("a")
    pool.add("b")
    with pytest.raises(ValueError, match="only once"):
        pool.extend_batch(["a", "a"], [1, 1])
    for bad in ([1], [1.0, 2.0], [True, False], [-1, 1]):
        with pytest.raises(ValueError, match="num_tokens"):
            pool.extend_batch(["a", "b"], bad)
    with pytest.raises(ValueError, match="num_tokens"):
        pool.extend_batch(["a", "b"], [2**31 - 1, 1 << 40])
    with pytest.raises(KeyError):
        pool.extend_batch(["a", "z"], [1, 1])
    with pytest.raises(KeyError):
        pool.seq_lens(["z"])
    before = pool_state(pool)
    pool.extend_batch([], [])
    assert pool_state(pool) == before
    pool.extend_batch(["b", "a"], [3, 1])
    assert pool.pages("b") == (0, 1) and pool.pages("a") == (2,) and pool.seq_lens(["a", "b"]).tolist() == [1, 3]


# ---------------------------------------------------------------- cascade levels


def levels_by_trie_walk(page_lists, last, qo_lens, page_size):
    """The prefix trie walked recursively (the straightforward construction): a node two or more
    requests pass through is a shared segment; neighbours with equal segments form a group."""
    shareable = [tuple(p[:-1]) for p in page_lists]
    B = len(page_lists)

    def segments(members, depth):
        out = {r: [] for r in members}
        by_page = {}
        for r in members:
            if len(shareable[r]) > depth:
                by_page.setdefault(shareable[r][depth], []).append(r)
        for group in by_page.values():
            if len(group) < 2:
                continue
            end = depth + 1
            while all(len(shareable[r]) > end for r in group) and len({shareable[r][end] for r in group}) == 1:
                end += 1
            below = segments(group, end)
            for r in group:
                out[r] = [(depth, end)] + below[r]
        return out

    paths = segments(list(range(B)), 0)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    out = []
    for level in range(max((len(p) for p in paths.values()), default=0)):
        groups = []
        for r in range(B):
            pages = tuple(page_lists[r][slice(*paths[r][level])]) if level < len(paths[r]) else ()
            if groups and pages and groups[-1][0] == pages:
                groups[-1][2] = qo_indptr[r + 1]
            else:
                groups.append([pages, qo_indptr[r], qo_indptr[r + 1]])
        out.append(([0] + [g[2] for g in groups], [list(g[0]) for g in groups],
                    [page_size if g[0] else 0 for g in groups]))
    own = [list(page_lists[r][paths[r][-1][1] if paths[r] else 0 :]) for r in range(B)]
    out.append((qo_indptr, own, [int(x) if own[r] else 0 for r, x in enumerate(last)]))
    return [[np.asarray(qo, np.int32) for qo, _, _ in out],
            [np.concatenate([[0], np.cumsum([len(p) for p in pages])]).astype(np.int32) for _, pages, _ in out],
            [np.asarray([x for p in pages for x in p], np.int32) for _, pages, _ in out],
            [np.asarray(lpl, np.int32) for _, _, lpl in out]], paths


def folded(levels, paths, page_lists, last, keep):
    """``levels`` with the shared levels past ``keep`` read in each request's own pages."""
    if len(levels[0]) - 1 <= keep:
        return levels
    own = [page_lists[r][(p[keep - 1][1] if len(p) >= keep else (p[-1][1] if p else 0)) :] if keep else page_lists[r]
           for r, p in sorted(paths.items())]
    return [levels[0][:keep] + [levels[0][-1]],
            levels[1][:keep] + [np.concatenate([[0], np.cumsum([len(p) for p in own])]).astype(np.int32)],
            levels[2][:keep] + [np.asarray([x for p in own for x in p], np.int32)],
            levels[3][:keep] + [np.where([len(p) > 0 for p in own], last, 0).astype(np.int32)]]


def page_lists_strategy():
    # Few page ids: lists share prefixes, repeat ids (also inside a list) and reach the same ids
    # under different parents, so equal segments of different trie nodes occur.
    return st.lists(st.tuples(st.integers(0, 11), st.integers(0, 6), st.lists(st.integers(0, 5), max_size=5)),
                    max_size=12)


def build_lists(spec):
    lists = []
    for parent, keep, tail in spec:
        base = lists[parent % len(lists)][:keep] if lists and parent < 8 else []
        lists.append(base + tail)
    return lists


def assert_levels_equal(got, want):
    assert len(got[0]) == len(want[0])
    for g_arrs, w_arrs in zip(got, want):
        for g, w in zip(g_arrs, w_arrs):
            assert g.dtype == np.int32 and g.tolist() == np.asarray(w).tolist()


@settings(max_examples=300, deadline=None)
@given(spec=page_lists_strategy(), sort=st.booleans(), seed=st.integers(0, 2**32 - 1),
       page_size=st.integers(1, 4), width=st.integers(1, 6), max_levels=st.integers(1, 4))
def test_cascade_levels_match_the_trie_walk(spec, sort, seed, page_size, width, max_levels):
    rng = np.random.default_rng(seed)
    lists = build_lists(spec)
    if sort:
        lists.sort()
    B = len(lists)
    last = rng.integers(0, page_size + 1, B)
    qo_lens = rng.integers(0, 4, B)
    want, paths = levels_by_trie_walk(lists, last, qo_lens, page_size)
    assert_levels_equal(jaxinfer.cascade_levels_from_prefix_tree(lists, last, qo_lens, page_size), want)
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in lists])]).astype(np.int32)
    indices = np.asarray([x for p in lists for x in p], np.int32)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    got = _prefix_tree_levels(indptr, indices, last.astype(np.int32), qo_indptr, page_size, max_levels, width)
    assert_levels_equal(got, folded(want, paths, lists, last, max_levels - 1))
    order, lcp = lexicographic_order(indptr, indices, np.diff(indptr), width)
    assert order.tolist() == sorted(range(B), key=lambda r: lists[r])
    common = [next((i for i, (a, b) in enumerate(zip(lists[x], lists[y])) if a != b), min(len(lists[x]), len(lists[y])))
              for x, y in zip(order[:-1], order[1:])]
    assert lcp.tolist() == common


@settings(max_examples=100, deadline=None)
@given(spec=page_lists_strategy(), seed=st.integers(0, 2**32 - 1), max_levels=st.sampled_from([None, 1, 2, 3]))
def test_cascade_levels_cache_across_changing_batches(spec, seed, max_levels):
    # Batches as serving steps make them: lists grow (pages appended), a request leaves and
    # another takes its place (often the same size, so only the pages tell), neighbours swap,
    # lists are rewritten. Each call with the kept cache must give the trie walk's levels.
    rng = np.random.default_rng(seed)
    lists = build_lists(spec) or [[0]]
    cache = {}
    for _ in range(12):
        op = rng.integers(5)
        r = int(rng.integers(len(lists)))
        if op == 0:
            lists[r] = lists[r] + rng.integers(0, 6, rng.integers(1, 3)).tolist()
        elif op == 1:
            other = lists[rng.integers(len(lists))]
            lists[r] = other[: rng.integers(len(other) + 1)] + rng.integers(0, 6, 1).tolist()
        elif op == 2 and len(lists) > 1:
            s = int(rng.integers(len(lists) - 1))
            lists[s], lists[s + 1] = lists[s + 1], lists[s]
        elif op == 3:
            lists[r] = [int(rng.integers(0, 6))] + lists[r][1:]
        # op 4: the same batch again
        last = rng.integers(0, 5, len(lists))
        indptr = np.concatenate([[0], np.cumsum([len(p) for p in lists])]).astype(np.int32)
        indices = np.asarray([x for p in lists for x in p], np.int32)
        qo_indptr = np.arange(len(lists) + 1, dtype=np.int32)
        got = _prefix_tree_levels(indptr, indices, last.astype(np.int32), qo_indptr, 4, max_levels, 2, cache)
        want, paths = levels_by_trie_walk(lists, last, np.ones(len(lists), int), 4)
        assert_levels_equal(got, want if max_levels is None else folded(want, paths, lists, last, max_levels - 1))


@pytest.mark.parametrize("page_lists, last, qo_lens, match", [
    ([[0, -1]], [1], [1], r"page_lists\[0\] must hold integers in 0..2147483647"),
    ([[0, 1], [1.5]], [1, 1], [1, 1], r"page_lists\[1\] must be a 1-D sequence of integers, got float64"),
    ([[0, -1], [0.5]], [1, 1], [1, 1], r"page_lists\[0\] must hold"),  # the first bad request names itself
    ([[0, 2**40]], [1], [1], r"page_lists\[0\] must hold integers in 0..2147483647, got values in 0..1099511627776"),
    ([[[1]]], [1], [1], r"page_lists\[0\] must be a 1-D sequence"),
    ([[1]], [5], [1], "kv_last_page_len must hold integers in 0..4"),
    ([[1]], [1, 1], [1], r"must be \[B = 1\]"),
])
def test_cascade_levels_errors_name_the_argument(page_lists, last, qo_lens, match):
    with pytest.raises(ValueError, match=match):
        jaxinfer.cascade_levels_from_prefix_tree(page_lists, last, qo_lens, 4)


# ---------------------------------------------------------------- the step planner


def random_pool(rng, num_requests: int, page_size: int = 4):
    """A pool of requests sharing prefixes through the prefix cache, with a few free/cached pages."""
    pool = KVCachePool(num_requests * 12 + 8, page_size, 1, 2, 16, dtype=jnp.bfloat16)
    prefixes = [rng.integers(0, 3, 4 * page_size).tolist() for _ in range(3)]
    for r in range(num_requests):
        tokens = prefixes[rng.integers(3)][: rng.integers(4 * page_size + 1)] + rng.integers(0, 50, 12).tolist()
        tokens = tokens[: rng.integers(1, len(tokens) + 1)]
        attached = pool.add(r, tokens[:-1])
        pool.extend(r, len(tokens) - attached)
        pool.cache_prefix(r, tokens)
        if rng.random() < 0.2:
            pool.free(r)
    return pool


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), cascade_levels=st.integers(1, 3), backend=st.sampled_from(["xla", "pallas"]))
def test_plan_matches_per_request_rebuild(seed, cascade_levels, backend):
    # The step's inputs against those built from each request's page list, and its plans against
    # plans made by fresh wrappers from per-request page tables (pool.page_table of the prefill and
    # of the decode requests, decode_levels' levels).
    rng = np.random.default_rng(seed)
    pool = random_pool(rng, int(rng.integers(2, 12)))
    planner = StepPlanner(pool, 4, max_seq_len=64, max_batch_size=12, max_prefill_tokens=24, backend=backend,
                          q_data_type=jnp.bfloat16, cascade_levels=cascade_levels, min_decode_rows=4)
    rids = list(pool.requests)
    assert planner.sharing_order(rids) == sorted(rids, key=pool.pages)
    perm = [rids[i] for i in rng.permutation(len(rids))]
    split = int(rng.integers(0, len(perm) + 1))  # every request prefilling too; a pool left empty plans nothing
    prefill = {r: int(rng.integers(1, min(pool.seq_len(r), 24 // max(split, 1)) + 1)) for r in perm[:split]}
    decode = planner.sharing_order(perm[split:]) if rng.random() < 0.7 else perm[split:]
    if not prefill and not decode:
        return
    batch = planner.plan(prefill, decode)

    order = [*prefill, *decode]
    qo = [prefill.get(r, 1) for r in order]
    p = batch.num_prefill_rows
    rows = [*(sum(qo[:i]) + j for i in range(len(prefill)) for j in range(qo[i])),
            *(p + i for i in range(len(decode)))]
    positions = np.zeros(batch.num_rows, np.int32)
    batch_indices = np.full(batch.num_rows, -1, np.int32)
    lasts = np.zeros(planner.max_batch_size, np.int32)
    k = 0
    for i, r in enumerate(order):
        for j in range(qo[i]):
            positions[rows[k]] = pool.seq_len(r) - qo[i] + j
            batch_indices[rows[k]] = i
            k += 1
        lasts[i] = rows[k - 1]
    lists = {r: pool.pages(r) for r in order}
    lens = {r: pool.seq_len(r) for r in order}
    indptr, indices, last = rebuilt_page_table(lists, lens, order, pool.page_size)
    want = dict(positions=positions, batch_indices=batch_indices,
                kv_indptr=np.pad(indptr, (0, planner.max_batch_size - len(order)), mode="edge"),
                kv_indices=np.pad(indices, (0, planner.max_batch_size * planner.pages_per_seq - indices.size)),
                kv_last_page_len=np.pad(last, (0, planner.max_batch_size - len(order))), last_rows=lasts)
    for name, w in want.items():
        assert np.asarray(getattr(batch, name)).tolist() == w.tolist(), name

    def fresh_plans():
        geometry = (planner.num_qo_heads, pool.num_kv_heads, pool.head_dim, pool.page_size)
        dtypes = dict(q_data_type=planner.q_data_type, kv_data_type=pool.dtype)
        out = []
        if prefill:
            rows_p = batch.num_prefill_rows
            cap = planner._capacity(min(planner.max_batch_size, rows_p), rows_p, rows_p)
            out.append(jaxinfer.BatchPrefillWithPagedKVCacheWrapper(backend=backend, capacity=cap).plan(
                np.concatenate([[0], np.cumsum(list(prefill.values()))]).astype(np.int32),
                *rebuilt_page_table(lists, lens, list(prefill), pool.page_size), *geometry, causal=True, **dtypes))
        if decode:
            d_rows = batch.num_rows - batch.num_prefill_rows
            wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend,
                                                                  capacity=planner._capacity(d_rows, 1, d_rows))
            table = rebuilt_page_table(lists, lens, decode, pool.page_size)
            if cascade_levels == 1:
                out.append(wrapper.plan(*table, *geometry, **dtypes))
            else:
                want_levels, paths = levels_by_trie_walk([list(lists[r]) for r in decode], table[2],
                                                         np.ones(len(decode), int), pool.page_size)
                lv = folded(want_levels, paths, [list(lists[r]) for r in decode], table[2], cascade_levels - 1)
                missing = cascade_levels - len(lv[0])
                lv = [[e] * missing + x for e, x in zip(
                    (np.array([0, len(decode)]), np.zeros(2), np.zeros(0), np.zeros(1)), lv)]
                lv = [[np.asarray(a, np.int32) for a in x] for x in lv]
                assert_levels_equal(planner.decode_levels(decode), lv)
                shared = jaxinfer.MultiLevelCascadeAttentionWrapper(
                    1, backend=backend, capacity=planner._capacity(d_rows, d_rows, d_rows))
                out += [shared.plan([lv[0][l]], [lv[1][l]], [lv[2][l]], [lv[3][l]], *geometry, **dtypes)[0]
                        for l in range(cascade_levels - 1)]
                out.append(wrapper.plan(lv[1][-1], lv[2][-1], lv[3][-1], *geometry, **dtypes))
        return out

    decode_plans = batch.decode_plan if isinstance(batch.decode_plan, tuple) else (batch.decode_plan,)
    got = [x for x in (batch.prefill_plan, *decode_plans) if x is not None]
    want_plans = fresh_plans()
    assert jax.tree.structure(got) == jax.tree.structure(want_plans)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want_plans)):
        assert np.array_equal(np.asarray(g), np.asarray(w))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_sharing_order_is_sorted_by_page_lists_past_the_first_keys(seed):
    # Pages of one token: requests share up to 90 pages, past the 32 compared first, and some
    # hold identical lists up to their last page.
    rng = np.random.default_rng(seed)
    pool = KVCachePool(3000, 1, 1, 1, 16, dtype=jnp.bfloat16)
    trunk = rng.integers(0, 4, 90).tolist()
    for r in range(int(rng.integers(2, 20))):
        tokens = trunk[: rng.integers(90)] + rng.integers(0, 4, rng.integers(1, 40)).tolist()
        pool.add(r, tokens[:-1])
        pool.extend(r, len(tokens) - pool.seq_len(r))
        pool.cache_prefix(r, tokens)
    rids = [r for r in rng.permutation(list(pool.requests)).tolist()]
    planner = StepPlanner(pool, 2, max_seq_len=256, max_batch_size=32, backend="xla", cascade_levels=2)
    assert planner.sharing_order(rids) == sorted(rids, key=pool.pages)
    width = int(rng.integers(0, 140))
    want = [list(pool.pages(r)[:width]) + [-1] * max(0, width - len(pool.pages(r))) for r in rids]
    assert pool.page_rows(rids, width).tolist() == want


def test_plan_errors_name_the_request():
    pool = KVCachePool(8, 2, 1, 1, 4)
    pool.add("a")
    pool.extend("a", 3)
    planner = StepPlanner(pool, 2, max_seq_len=8, max_batch_size=2, backend="xla")
    with pytest.raises(ValueError, match="request 'z' is not in the pool"):
        planner.plan({}, ["a", "z"])
    with pytest.raises(ValueError, match="only once"):
        planner.plan({"a": 1}, ["a"])
    with pytest.raises(KeyError):
        planner.sharing_order(["a", "z"])


@pytest.fixture(scope="module")
def tiny_engine_model():
    from flax import nnx

    from jaxinfer.models.llama import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_qo_heads=2,
                      num_kv_heads=1, head_dim=16, dtype=jnp.bfloat16)
    return LlamaModel(cfg, rngs=nnx.Rngs(0))


def test_submit_rejects_token_ids_outside_int32(tiny_engine_model):
    from jaxinfer.serve import EngineConfig, ServingEngine

    engine = ServingEngine(tiny_engine_model, EngineConfig(num_pages=8, page_size=4, max_seq_len=16, max_batch_size=2,
                                                           backend="xla"), log=None)
    with pytest.raises(ValueError, match="prompt token ids must fit int32"):
        engine.submit([1, 2**31], 2)
    assert not engine.waiting


@pytest.mark.parametrize("overlap", [False, True])
def test_pages_of_generated_tokens_are_registered_under_those_tokens(tiny_engine_model, overlap):
    # Outputs reach the engine's token-id arrays only when a page holding them is registered:
    # after the requests finish, a probe with each one's prompt and outputs (less the last,
    # never fed back) must attach every full page, and one differing in an output token not the
    # pages from there on.
    from jaxinfer.serve import EngineConfig, ServingEngine

    ps = 4
    engine = ServingEngine(tiny_engine_model, EngineConfig(num_pages=64, page_size=ps, max_seq_len=40, max_batch_size=3,
                                                           max_prefill_tokens=8, backend="xla", overlap=overlap),
                           log=None)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 16, n).tolist() for n in (5, 9, 3)]
    rids = [engine.submit(p, n) for p, n in zip(prompts, (14, 11, 17))]
    engine.run()
    for rid, prompt in zip(rids, prompts):
        seq = prompt + engine.finished[rid].output[:-1]
        assert engine.pool.add(("probe", rid), seq) == len(seq) // ps * ps
        changed = list(seq)
        changed[len(prompt) + 4] = (changed[len(prompt) + 4] + 1) % 16
        assert engine.pool.add(("changed", rid), changed) == (len(prompt) + 4) // ps * ps
