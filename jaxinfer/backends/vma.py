"""Kernel outputs typed for ``jax.shard_map``'s varying-axes check (``check_vma=True``).

Under ``shard_map(check_vma=True)`` every value's type names the mesh axes it varies over
(``jax.typeof(x).manual_axis_type.varying``); jax's own ops derive it from their operands, a
custom kernel's outputs take it from the shapes the call declares. ``pallas_call`` refuses an
``out_shape`` without ``manual_axis_type`` there, and ``ffi_call`` types its results as
invarying (the same on every device), so ``out_specs=P()`` would pass the check for per-device
results. A kernel's outputs vary over every axis one of its operands varies over.
"""

from __future__ import annotations

import jax
from jax.sharding import ManualAxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def varying_like(shapes, *operands):
    """``shapes`` (a pytree of ``jax.ShapeDtypeStruct``) declared varying over the union of the
    varying manual axes of ``operands`` (arrays or pytrees of them); outside ``shard_map``,
    or with no varying operand, an empty ``ManualAxisType``."""
    vma = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in jax.tree.leaves(operands)))
    mat = ManualAxisType(varying=vma)
    # A varying type needs the (manual) mesh it varies on: the context's.
    sharding = NamedSharding(jax.sharding.get_abstract_mesh(), P()) if vma else None
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, manual_axis_type=mat),
                        shapes)
