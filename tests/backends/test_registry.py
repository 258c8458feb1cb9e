"""The "auto" choice: per-op order by device, falling through backends that cannot serve a call."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import backends
from jaxinfer.plan.batch import BatchSpec
from jaxinfer.variants import AttentionVariant


@pytest.mark.parametrize(
    "arch,op,want",
    [
        (None, "decode", ("xla",)),
        (None, "prefill", ("xla",)),
        (90, "decode", ("pallas", "xla")),
        (90, "prefill", ("fa3", "fa2", "pallas", "xla")),
        (90, "other", ("pallas", "xla")),
        (80, "prefill", ("fa2", "pallas", "xla")),
        (75, "prefill", ("pallas", "xla")),
    ],
)
def test_auto_order(monkeypatch, arch, op, want):
    monkeypatch.setattr(backends.device, "gpu_arch", lambda: arch)
    assert backends.auto_order(op) == want


def test_auto_order_rejects_unknown_op():
    with pytest.raises(ValueError, match="op"):
        backends.auto_order("training")


def test_auto_falls_through_to_first_backend_that_serves(monkeypatch):
    class Refuses:
        name = "fa2"

        def unsupported(self, spec):
            return "not this one"

    real_get = backends.get_backend
    monkeypatch.setattr(backends.device, "gpu_arch", lambda: 80)
    monkeypatch.setattr(backends, "get_backend", lambda name: Refuses() if name == "fa2" else real_get(name))
    spec = BatchSpec.create(np.array([0, 3]), np.array([0, 5]), None, None, page_size=1, num_qo_heads=2,
                            num_kv_heads=1, head_dim=16, variant=AttentionVariant(), q_dtype=jnp.bfloat16)
    assert backends.resolve("auto", spec, op="prefill").name == "pallas"
    with pytest.raises(NotImplementedError, match="not this one"):
        backends.resolve("fa2", spec)
