"""Host-to-device copy of plan buffers: ``jax.device_put`` semantics (asynchronous, uncommitted,
on the default device) at a fraction of its host time, for the planners' per-step copies."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np


def to_device(host: np.ndarray) -> jax.Array:
    """``jax.device_put(host)``: enqueue the host-to-device copy of a plan buffer; returns without
    waiting for it (the array is ready when the copy lands).

    ``jax.device_put`` gives the numpy buffer to PJRT and returns before the copy is done (jax
    0.11.2 on an H100: 0.28 ms for 64 MiB that land 10.7 ms later); ``jnp.asarray`` and a
    jitted identity wait for it. The copy reads ``host`` after the call returns (even with
    ``may_alias=False``), so the planners (the Pallas and FFI backends' ``plan``) never reuse or
    change it (benchmarks/decisions/plan.md). Where it can, this makes ``jax.device_put``'s C++ call
    directly (:func:`direct_device_put`).
    """
    put = direct_device_put()
    return jax.device_put(host) if put is None else put(host)


@functools.cache
def direct_device_put() -> Callable[[np.ndarray], jax.Array] | None:
    """``jax.device_put`` of a numpy array without its Python: jaxlib's ``batched_device_put``
    with the default device's sharding, uncommitted, zero-copy host semantics and the transfer
    guard's explicit scope, the C++ call ``jax.device_put`` ends in after ~60-90 us of tree
    flattening, aval and sharding checks (~5 us instead; benchmarks/decisions/plan.md).

    Private jax API, so decided once per process: ``None`` (callers use ``jax.device_put``) when
    it is missing, raises, or gives an array that differs from ``jax.device_put``'s on a probe.
    """
    try:
        from jax._src import core
        from jax._src.interpreters import pxla
        from jax._src.lib import guard_lib, xla_client

        aval = functools.lru_cache(maxsize=64)(core.ShapedArray)
        sharding = functools.lru_cache(maxsize=64)(jax.sharding.SingleDeviceSharding)

        def put(host: np.ndarray) -> jax.Array:
            device = pxla.get_default_device()  # jax.default_device's, as jax.device_put
            state = guard_lib.thread_local_state()
            explicit = state.explicit_device_put
            state.explicit_device_put = True  # the transfer guard counts device_put as explicit
            try:
                return xla_client.batched_device_put(aval(host.shape, host.dtype), sharding(device), [host], [device],
                                                     False)
            finally:
                state.explicit_device_put = explicit

        probe = np.arange(5, dtype=np.int32)
        with jax.transfer_guard("allow"):
            got, want = put(probe), jax.device_put(probe)
            same = (type(got) is type(want) and got.aval == want.aval and got.sharding == want.sharding
                    and got.committed == want.committed and np.array_equal(np.asarray(got), probe))
    except Exception:  # any failure of the private path means jax.device_put
        return None
    return put if same else None
