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
