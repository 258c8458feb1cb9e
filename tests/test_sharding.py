"""Attention under multi-device sharding: heads split (tensor parallel), batch split (data parallel).

The sharded runs need 4 CPU devices, i.e. ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
before jax initialises; other test modules initialise jax first in the same pytest process, so the
runs happen in a subprocess (this file run as a script) that saves inputs and outputs to an ``.npz``.
The checks against the float64 reference (tests/ref64.py) happen here in the parent.

Cases, each per available backend:
- ``tp_decode``: ``jax.shard_map`` over 4 devices, heads split (each device 2 query heads of 1 KV
  head, its slice of the cache, one replicated plan made for the per-device head counts);
- ``dp_decode``: ``jax.shard_map`` over 4 devices, each its own requests, cache pages and plan
  (plans of equal capacity stacked on a leading device axis);
- ``dp_tp_prefill``: a 2 x 2 mesh, ragged causal prefill with the batch on ``dp`` and heads on ``tp``;
- ``gspmd_decode`` (xla backend): plain ``jax.jit`` on ``NamedSharding``-placed inputs.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import BACKENDS, run_on_cpu_devices

HQ, HKV, D, PAGE = 8, 4, 16, 4
NUM_DEVICES = 4
CASES = ("tp_decode", "dp_decode", "dp_tp_prefill", "gspmd_decode")


# ---------------------------------------------------------------- worker (subprocess)


def _dtype(backend):
    import jax.numpy as jnp

    # Pallas takes 16-bit inputs only; the reference runs in float32 for a tighter check.
    return jnp.float32 if backend == "xla" else jnp.bfloat16


def _check_vma(backend, plan_varies):
    # The kernels' outputs declare the varying axes of their operands (jaxinfer/backends/vma.py),
    # so shard_map's varying-axes check is on, except for Pallas in interpret mode when the plan
    # varies over devices: jax's interpreter evaluates the kernel op by op without the casts that
    # traced code gets, and an index made from program_id meets one loaded from the per-device
    # plan ("dynamic_slice requires varying manual axes to match", jax 0.11.2). On a GPU the
    # Triton lowering takes the check (test_pallas_lowering's sharded export).
    return not (backend == "pallas" and plan_varies)


def _random_cache(rng, num_pages, dtype):
    import jax.numpy as jnp

    shape = (num_pages, PAGE, HKV, D)
    return tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype) for _ in range(2))


def _page_table(rng, kv_lens, num_pages):
    from ref64 import random_page_table

    n = int(sum(-(-np.asarray(kv_lens) // PAGE)))
    return random_page_table(rng, kv_lens, PAGE, num_pages_extra=num_pages - n)[:3]


def _decode_plan(backend, table, num_qo_heads, num_kv_heads, dtype, batch_capacity, num_pages):
    import jaxinfer

    capacity = jaxinfer.PlanCapacity(max_batch_size=batch_capacity, max_qo_len=1, max_kv_len=64)
    wrapper = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(backend=backend, capacity=capacity)
    return wrapper.plan(*table, num_qo_heads, num_kv_heads, D, PAGE, q_data_type=dtype)


def _stack(plans):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *plans)


def _unstack(plan):
    import jax

    return jax.tree.map(lambda x: x[0], plan)


def _tp_decode(rng, backend, mesh_1d, out):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxinfer

    dtype, num_pages = _dtype(backend), 16  # 3 requests of up to 5 pages, plus unused pages
    kv_lens = rng.integers(1, 20, 3)
    table = _page_table(rng, kv_lens, num_pages)
    cache = _random_cache(rng, num_pages, dtype)
    q = jnp.asarray(rng.standard_normal((3, HQ, D)).astype(np.float32), dtype)
    plan = _decode_plan(backend, table, HQ // NUM_DEVICES, HKV // NUM_DEVICES, dtype, 4, num_pages)
    heads = P(None, "x", None)
    cache_heads = P(None, None, "x", None)
    fn = jax.jit(
        jax.shard_map(
            lambda q, k, v, plan: jaxinfer.batch_decode(q, (k, v), plan),
            mesh=mesh_1d, in_specs=(heads, cache_heads, cache_heads, P()), out_specs=heads, check_vma=_check_vma(backend, False),
        )
    )
    q, k, v = (jax.device_put(x, NamedSharding(mesh_1d, s)) for x, s in zip((q, *cache), (heads, cache_heads, cache_heads)))
    o = fn(q, k, v, plan)
    out.update(q=q, k=k, v=v, o=o, qo_indptr=np.arange(4), kv_indptr=table[0], kv_indices=table[1], last=table[2])


def _dp_decode(rng, backend, mesh_1d, out):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jaxinfer

    dtype, local_pages, local_batch = _dtype(backend), 12, 2  # 2 requests of up to 5 pages per device
    tables = [_page_table(rng, rng.integers(1, 20, local_batch), local_pages) for _ in range(NUM_DEVICES)]
    plans = [_decode_plan(backend, t, HQ, HKV, dtype, local_batch, local_pages) for t in tables]
    cache = _random_cache(rng, NUM_DEVICES * local_pages, dtype)
    q = jnp.asarray(rng.standard_normal((NUM_DEVICES * local_batch, HQ, D)).astype(np.float32), dtype)
    fn = jax.jit(
        jax.shard_map(
            lambda q, k, v, plan: jaxinfer.batch_decode(q, (k, v), _unstack(plan)),
            mesh=mesh_1d, in_specs=(P("x"), P("x"), P("x"), P("x")), out_specs=P("x"), check_vma=_check_vma(backend, True),
        )
    )
    o = fn(q, *cache, _stack(plans))
    out.update(q=q, k=cache[0], v=cache[1], o=o)
    for s, t in enumerate(tables):
        out.update({f"kv_indptr{s}": t[0], f"kv_indices{s}": t[1], f"last{s}": t[2]})


def _dp_tp_prefill(rng, backend, mesh_2d, out):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jaxinfer

    dtype, rows = _dtype(backend), 32
    q, k, v, plans = [], [], [], []
    for s in range(2):
        lens = rng.integers(1, 12, 2)
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        capacity = jaxinfer.PlanCapacity(max_batch_size=2, max_qo_len=16, max_kv_len=16)
        wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend, capacity=capacity)
        plans.append(wrapper.plan(indptr, indptr, HQ // 2, HKV // 2, D, causal=True, q_data_type=dtype))
        for lst, h in ((q, HQ), (k, HKV), (v, HKV)):
            lst.append(rng.standard_normal((rows, h, D)).astype(np.float32))
        out[f"qo_indptr{s}"] = indptr
    q, k, v = (jnp.asarray(np.concatenate(x), dtype) for x in (q, k, v))
    spec = P("dp", "tp", None)
    fn = jax.jit(
        jax.shard_map(
            lambda q, k, v, plan: jaxinfer.batch_prefill_ragged(q, k, v, _unstack(plan)),
            mesh=mesh_2d, in_specs=(spec, spec, spec, P("dp")), out_specs=spec, check_vma=_check_vma(backend, True),
        )
    )
    out.update(q=q, k=k, v=v, o=fn(q, k, v, _stack(plans)))


def _gspmd_decode(rng, backend, mesh_1d, out):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxinfer

    dtype, num_pages = _dtype(backend), 24  # 4 requests of up to 5 pages, plus unused pages
    table = _page_table(rng, rng.integers(1, 20, 4), num_pages)
    heads, cache_heads = NamedSharding(mesh_1d, P(None, "x", None)), NamedSharding(mesh_1d, P(None, None, "x", None))
    k, v = (jax.device_put(c, cache_heads) for c in _random_cache(rng, num_pages, dtype))
    q = jax.device_put(jnp.asarray(rng.standard_normal((4, HQ, D)).astype(np.float32), dtype), heads)
    plan = _decode_plan(backend, table, HQ, HKV, dtype, 4, num_pages)
    o = jax.jit(lambda q, k, v, plan: jaxinfer.batch_decode(q, (k, v), plan))(q, k, v, plan)
    out.update(q=q, k=k, v=v, o=o, qo_indptr=np.arange(5), kv_indptr=table[0], kv_indices=table[1], last=table[2])
    out["num_output_shards"] = np.asarray(len({str(s.index) for s in o.addressable_shards}))


def cases_of(backend: str) -> tuple[str, ...]:
    # GSPMD does not partition a pallas_call; shard_map is the Pallas kernels' multi-device path.
    return CASES if backend == "xla" else CASES[:-1]


def worker(path: str) -> None:
    import jax
    from jax.sharding import Mesh

    from jaxinfer.backends import unavailable

    devices = np.asarray(jax.devices())
    assert devices.size == NUM_DEVICES, f"expected {NUM_DEVICES} devices, got {devices.size}"
    mesh_1d, mesh_2d = Mesh(devices, ("x",)), Mesh(devices.reshape(2, 2), ("dp", "tp"))
    rng = np.random.default_rng(0)
    saved = {}
    for backend in BACKENDS:
        # A backend that cannot run on these CPU devices (fa2/fa3), or declines a case, leaves its
        # reason for the parent to skip with; the "xla" reference never skips.
        reason = None if backend == "xla" else unavailable(backend)
        for case in cases_of(backend):
            if reason is not None:
                saved[f"{backend}__{case}__skip"] = np.asarray(f"unavailable on {NUM_DEVICES} CPU devices: {reason}")
                continue
            out = {}
            fn = globals()[f"_{case}"]
            try:
                fn(rng, backend, mesh_2d if case == "dp_tp_prefill" else mesh_1d, out)
            except NotImplementedError as e:
                if backend == "xla":
                    raise
                saved[f"{backend}__{case}__skip"] = np.asarray(f"does not serve this case: {e}")
                continue
            saved.update({f"{backend}__{case}__{n}": np.asarray(x).astype(np.float32) for n, x in out.items()})
    np.savez(path, **saved)


# ---------------------------------------------------------------- tests (parent process)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    data = run_on_cpu_devices(__file__, tmp_path_factory.mktemp("sharding") / "out.npz", NUM_DEVICES, timeout=300)
    by_case = {}
    for key in data:
        backend, case, name = key.split("__")
        by_case.setdefault((backend, case), {})[name] = data[key]
    return by_case


def _tol(backend):
    return dict(rtol=2e-5, atol=2e-5) if backend == "xla" else dict(rtol=2e-2, atol=2e-2)


def _paged_reference(d, suffix=""):
    from ref64 import gather_paged_kv, ref_batch

    table = (d[f"kv_indptr{suffix}"], d[f"kv_indices{suffix}"], d[f"last{suffix}"])
    return table, lambda q, k, v: ref_batch(q, *gather_paged_kv(k, v, *table), np.arange(q.shape[0] + 1))[0]


@pytest.mark.parametrize("backend,case", [(b, c) for b in BACKENDS for c in cases_of(b)])
def test_sharded_attention_matches_reference(sharded, backend, case):
    from ref64 import ref_batch

    assert (backend, case) in sharded, f"{case} did not run on {backend} in the subprocess"
    d = sharded[(backend, case)]
    if "skip" in d:
        pytest.skip(f"backend {backend!r}: {d['skip']}")
    assert not np.isnan(d["o"]).any()
    if case in ("tp_decode", "gspmd_decode"):
        _, ref = _paged_reference(d)
        want = ref(d["q"], d["k"], d["v"])
    elif case == "dp_decode":
        local_b, local_p = d["q"].shape[0] // NUM_DEVICES, d["k"].shape[0] // NUM_DEVICES
        want = np.concatenate([
            _paged_reference(d, str(s))[1](
                d["q"][s * local_b : (s + 1) * local_b], d["k"][s * local_p : (s + 1) * local_p],
                d["v"][s * local_p : (s + 1) * local_p],
            )
            for s in range(NUM_DEVICES)
        ])
    else:
        rows = d["q"].shape[0] // 2
        want = np.zeros_like(d["o"], dtype=np.float64)
        for s in range(2):
            indptr = d[f"qo_indptr{s}"].astype(np.int64)
            sl = slice(s * rows, s * rows + indptr[-1])
            q, k, v = (d[n][sl] for n in ("q", "k", "v"))
            ks = [k[indptr[b] : indptr[b + 1]] for b in range(len(indptr) - 1)]
            vs = [v[indptr[b] : indptr[b + 1]] for b in range(len(indptr) - 1)]
            want[sl] = ref_batch(q, ks, vs, indptr, causal=True)[0]
        # Rows past a shard's requests are padding: only the requests' rows are compared.
        valid = np.zeros(d["o"].shape[0], bool)
        for s in range(2):
            valid[s * rows : s * rows + d[f"qo_indptr{s}"][-1].astype(int)] = True
        d = dict(d, o=d["o"][valid])
        want = want[valid]
    np.testing.assert_allclose(d["o"], want, **_tol(backend))
    if case == "gspmd_decode":
        assert int(d["num_output_shards"]) > 1, "the output should stay sharded over the head axis"


if __name__ == "__main__":
    worker(sys.argv[1])
