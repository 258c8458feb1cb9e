"""Host-to-device copy of plan buffers: ``jax.device_put`` semantics (asynchronous, uncommitted,
on the default device) at a fraction of its host time, for the planners' per-step copies; and a
step's host arrays packed into one copy (:func:`pack`), unpacked inside ``jit``."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

_HOST_ONLY = contextvars.ContextVar("jaxinfer_plan_host_only", default=False)


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
    if _HOST_ONLY.get():
        return host
    put = direct_device_put()
    return jax.device_put(host) if put is None else put(host)


@contextlib.contextmanager
def host_only() -> Iterator[None]:
    """Within this block :func:`to_device` returns its numpy argument: plans made here keep their
    buffers on the host, for :func:`pack` to send with the step's other host arrays in one copy."""
    token = _HOST_ONLY.set(True)
    try:
        yield
    finally:
        _HOST_ONLY.reset(token)


def tree_to_device(tree):
    """``tree`` with each numpy leaf replaced by :func:`to_device` of it (other leaves kept)."""
    return jax.tree.map(lambda x: to_device(x) if isinstance(x, np.ndarray) else x, tree)


# Each packed array starts on a 64-byte boundary of the buffer, as a separate allocation would.
_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class PackedTree:
    """A pytree whose 4-byte numpy leaves travel to the device as one int32 buffer (:func:`pack`).

    A step's plans and inputs are a dozen small host arrays and each host-to-device copy costs
    host time (benchmarks/decisions/serving.md), so the serving step sends them as one. Inside
    ``jit``, :meth:`unpack` slices the buffer back into the tree (its offsets and shapes are
    static: a step's buffers have fixed sizes per row bucket, so the packed step compiles as often
    as the unpacked one).

    Attributes:
      buffer: ``[N]`` int32, the packed leaves.
      arrays: the leaves that were not packed (device arrays, other dtypes), as they were.
      treedef, layout: static; per leaf ``(offset, shape, numpy dtype)`` in ``buffer`` or ``(index,)``
        in ``arrays``.
    """

    buffer: jax.Array
    arrays: tuple
    treedef: Any
    layout: tuple

    def unpack(self):
        """The tree, its packed leaves sliced from :attr:`buffer` (inside ``jit`` or eagerly)."""
        leaves = []
        for entry in self.layout:
            if len(entry) == 1:
                leaves.append(self.arrays[entry[0]])
                continue
            offset, shape, dtype = entry
            flat = jax.lax.slice(self.buffer, (offset,), (offset + int(np.prod(shape, dtype=np.int64)),))
            if dtype != np.int32:
                flat = jax.lax.bitcast_convert_type(flat, dtype)
            leaves.append(flat.reshape(shape))
        return jax.tree.unflatten(self.treedef, leaves)


jax.tree_util.register_dataclass(PackedTree, data_fields=["buffer", "arrays"], meta_fields=["treedef", "layout"])


def pack(tree) -> PackedTree:
    """``tree``'s numpy leaves of 4-byte dtypes (int32, uint32, float32) copied to the device as
    one int32 buffer (one :func:`to_device`); its other leaves are kept as they are.

    Raises:
      ValueError: ``tree`` has no leaf to pack.
    """
    leaves, treedef = jax.tree.flatten(tree)
    layout, arrays, host, size = [], [], [], 0
    for leaf in leaves:
        if isinstance(leaf, np.ndarray) and leaf.dtype.itemsize == 4 and leaf.dtype.kind in "iuf":
            layout.append((size, leaf.shape, leaf.dtype))  # the dtype: its .name is a slow Python property
            host.append((size, leaf))
            size += -(-max(leaf.size, 1) // _ALIGN) * _ALIGN
        else:
            layout.append((len(arrays),))
            arrays.append(to_device(leaf) if isinstance(leaf, np.ndarray) else leaf)
    if not host:
        raise ValueError("tree: no numpy leaf of a 4-byte dtype to pack")
    buffer = np.zeros(size, np.int32)
    for offset, leaf in host:
        buffer[offset : offset + leaf.size] = leaf.reshape(-1).view(np.int32)
    return PackedTree(to_device(buffer), tuple(arrays), treedef, tuple(layout))


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
        sharding = functools.lru_cache(maxsize=64)(jax.sharding.make_single_device_sharding)

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
