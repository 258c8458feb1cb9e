"""Every Triton module the Pallas lowering builds in these tests is verified by MLIR.

The deviceless lowering check (shared/DESIGN.md sec. 6) serializes the module without verifying
it; the GPU runtime parses and verifies it, so an invalid op (an ``scf.for`` whose bounds differ
in type) used to pass on the CPU and fail only on the device.
"""

import pytest

try:  # private: the check is skipped where a jax version moves it
    from jax._src.pallas.triton import lowering as _triton_lowering
    from jax._src.pallas.triton import pallas_call_registration as _registration
except ImportError:  # pragma: no cover
    _triton_lowering = _registration = None


@pytest.fixture(autouse=True)
def _verify_triton_modules(monkeypatch):
    if _triton_lowering is None or not hasattr(_triton_lowering, "lower_jaxpr_to_triton_module"):
        yield
        return
    lower = _triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises MLIRError naming the invalid op
        return result

    monkeypatch.setattr(_registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    yield
