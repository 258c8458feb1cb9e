"""Backend objects made once: the registry's ``get_backend`` returns one object per name (and
refuses bad names with a ValueError every time), and the Pallas backend's kv-major grid backend
of a prefill plan is one object per grid size, equal to the backend it stands for."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kv_major_prefill

from jaxinfer import backends
from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.variants import AttentionVariant


@pytest.mark.parametrize("name", ["pallas", "xla"])
def test_get_backend_returns_one_object_per_name(name):
    first = backends.get_backend(name)
    assert first.name == name and backends.get_backend(name) is first
    assert backends.unavailable(name) is None


@pytest.mark.parametrize("name", ["auto", "cuda", "", None, ["pallas"], 3])
def test_get_backend_refuses_bad_names_every_time(name):
    for _ in range(2):
        with pytest.raises(ValueError, match="backend must be one of"):
            backends.get_backend(name)


def test_kv_major_grid_backend_is_made_once_per_grid(rng):
    backend, spec = kv_major_prefill(rng)
    cfg = backend.tile_config(spec, PlanCapacity())
    grid = backend._grid_backend(6, cfg, PlanCapacity())
    assert grid == dataclasses.replace(backend, num_ctas=8, split_factor=0, kv_major_grid=False)
    assert backend._grid_backend(5, cfg, PlanCapacity()) is grid  # the same power-of-2 grid
    assert backend._grid_backend(9, cfg, PlanCapacity()).num_ctas == 16
    assert backend._grid_backend(1, cfg, PlanCapacity()) is backend  # fewer tiles than CTAs
    assert backend._grid_backend(6, cfg, PlanCapacity(max_work_tiles=64)) is backend
    first, again = backend.plan(spec, PlanCapacity()), backend.plan(spec, PlanCapacity())
    assert first.kernel is again.kernel and first.kernel.num_ctas == first.kernel.max_tiles > backend.grid_size(cfg)
    np.testing.assert_array_equal(np.asarray(first.buffer), np.asarray(again.buffer))


def _spec():
    return BatchSpec.create(np.array([0, 3]), np.array([0, 5]), None, None, page_size=1, num_qo_heads=2,
                            num_kv_heads=1, head_dim=16, variant=AttentionVariant(), q_dtype=jnp.bfloat16)


@pytest.mark.parametrize("op,measured,down,want,asked_want", [
    ("decode", ("pallas", "fa3", "xla"), (), ("pallas", "fa3", "xla"), ["pallas"]),
    # an unavailable measured backend keeps its place in auto_order
    ("prefill", ("fa3", "pallas", "fa2"), ("fa3",), ("pallas", "fa2", "fa3", "xla"), ["fa3", "pallas"]),
    ("prefill", ("cuda", "auto", "xla"), ("fa3", "fa2"), ("xla", "fa3", "fa2", "pallas"), ["xla"]),
])
def test_auto_asks_availability_only_up_to_the_backend_that_serves(monkeypatch, op, measured, down, want,
                                                                    asked_want):
    asked = []

    def unavailable(name):
        asked.append(name)
        return "down" if name in down else None

    monkeypatch.setattr(backends.device, "gpu_arch", lambda: 90)
    monkeypatch.setattr(backends, "unavailable", unavailable)
    monkeypatch.setattr(backends, "_preference", lambda spec, op: measured)
    assert backends.preferred_order(_spec(), op) == want
    asked.clear()
    assert backends.resolve("auto", _spec(), op=op).name == want[0]
    assert asked == asked_want
