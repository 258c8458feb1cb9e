"""The planners' host-to-device copy of a plan (``jaxinfer.plan.transfer.to_device``): jaxlib's
``batched_device_put`` called directly gives what ``jax.device_put`` gives, honours the transfer
guard the same way, and falls back to ``jax.device_put`` where the private API is missing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinfer.plan import transfer
from jaxinfer.backends.pallas import backend


def _same_as_device_put(x: np.ndarray) -> jax.Array:
    got, want = transfer.to_device(x), jax.device_put(x)
    assert type(got) is type(want)
    assert got.dtype == want.dtype and got.shape == want.shape and got.aval == want.aval
    assert got.sharding == want.sharding and got.devices() == want.devices()
    assert got.committed == want.committed
    np.testing.assert_array_equal(np.asarray(got), x)
    return got


@pytest.mark.parametrize("dtype", [np.int32, np.int8])
@pytest.mark.parametrize("size", [1, 7, 43270])
def test_direct_put_equals_device_put(rng, dtype, size):
    assert transfer.direct_device_put() is not None, "this jax has the direct path"
    x = rng.integers(-100, 100, size).astype(dtype)
    _same_as_device_put(x)


def test_direct_put_of_an_aligned_plan_buffer(rng):
    host, address = backend._aligned_empty(1000)
    assert address % 64 == 0 and address == host.__array_interface__["data"][0]
    host[:] = rng.integers(0, 1 << 30, host.size)
    want = host.copy()
    got = _same_as_device_put(host)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_direct_put_follows_the_transfer_guard(rng):
    """An explicit transfer, like jax.device_put: allowed under "disallow", refused under
    "disallow_explicit"."""
    x = rng.integers(0, 9, 5).astype(np.int32)
    with jax.transfer_guard("disallow"):
        _same_as_device_put(x)
    with jax.transfer_guard("disallow_explicit"):
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.device_put(x)
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            transfer.to_device(x)


def test_missing_private_api_falls_back_to_device_put(rng, monkeypatch):
    from jax._src.lib import xla_client

    monkeypatch.delattr(xla_client, "batched_device_put")
    assert transfer.direct_device_put.__wrapped__() is None
    monkeypatch.undo()  # jax.device_put needs it too
    monkeypatch.setattr(transfer, "direct_device_put", lambda: None)
    _same_as_device_put(rng.integers(0, 9, 5).astype(np.int32))


def _tree(rng):
    """A step-like tree: int32, uint32 and float32 host arrays of odd sizes (one empty, one 2-D),
    an int8 host array and a device array that are not packed, and a None."""
    return {
        "rows": rng.integers(-(1 << 31), 1 << 31, 37, dtype=np.int64).astype(np.int32),
        "seed": rng.integers(0, 1 << 32, (3, 5), dtype=np.uint64).astype(np.uint32),
        "scale": rng.standard_normal(17).astype(np.float32),
        "empty": np.zeros(0, np.int32),
        "mask": rng.integers(0, 2, 9).astype(np.int8),
        "device": jax.device_put(rng.standard_normal(4).astype(np.float32)),
        "none": None,
    }


def _assert_same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_pack_unpacks_to_the_same_tree_eagerly_and_in_jit(rng):
    tree = _tree(rng)
    want = jax.tree.map(np.array, tree)  # copies: pack must not rely on the caller's arrays staying
    packed = transfer.pack(tree)
    assert packed.buffer.dtype == np.int32 and len(packed.arrays) == 2  # the int8 and the device array
    _assert_same_tree(packed.unpack(), want)
    # Inside jit the leaves are slices of the traced buffer.
    out = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p.unpack()))(packed)
    _assert_same_tree(out, want)


def test_pack_offsets_are_static_per_shape(rng):
    """Two trees of the same shapes pack to the same layout: one compiled program for both."""
    a, b = transfer.pack(_tree(rng)), transfer.pack(_tree(rng))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(len(e) == 1 or e[0] % 16 == 0 for e in a.layout)  # 64-byte aligned starts


def test_pack_needs_a_packable_leaf(rng):
    with pytest.raises(ValueError, match="tree"):
        transfer.pack({"mask": np.zeros(3, np.int8)})


def test_host_only_keeps_plans_on_the_host(rng):
    x = rng.integers(0, 9, 5).astype(np.int32)
    with transfer.host_only():
        assert transfer.to_device(x) is x
    assert isinstance(transfer.to_device(x), jax.Array)
