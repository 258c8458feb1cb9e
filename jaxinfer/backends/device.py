"""Facts about the device the backends run on: GPU arch and SM count, read once from jax's default
device.

Off a GPU (CPU tests, interpret mode, deviceless lowering checks) the plan targets an H100, the
machine of shared/DESIGN.md section 7: :data:`DEFAULT_NUM_SMS` SMs.
"""

from __future__ import annotations

import functools

import jax

DEFAULT_NUM_SMS = 132  # NVIDIA H100 SXM: the plan geometry used when jax's default device is no GPU


def _default_device():
    try:
        return jax.devices()[0]
    except RuntimeError:
        return None


def platform() -> str | None:
    """Platform of jax's default device (``"gpu"``, ``"cpu"``, ...), ``None`` when there is none."""
    dev = _default_device()
    return None if dev is None else dev.platform


@functools.cache
def gpu_arch() -> int | None:
    """Compute capability of jax's default device as ``major*10+minor`` (H100: 90), ``None`` when it
    is no GPU or does not report one. Read once per process, as :func:`num_sms` (every
    ``backend="auto"`` plan asks)."""
    dev = _default_device()
    cc = getattr(dev, "compute_capability", None)
    if dev is None or dev.platform != "gpu" or cc is None:
        return None
    major, minor = (int(x) for x in str(cc).split("."))
    return major * 10 + minor


@functools.cache
def num_sms() -> int:
    """Streaming multiprocessors of jax's default GPU (``Device.core_count``), or
    :data:`DEFAULT_NUM_SMS` off a GPU; persistent grids are sized by it."""
    dev = _default_device()
    count = getattr(dev, "core_count", None) if dev is not None and dev.platform == "gpu" else None
    return int(count) if count else DEFAULT_NUM_SMS
