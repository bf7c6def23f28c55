"""Where and when a result was measured: one record for `train` (metrics.json), `flow`
(flow.json) and `bench` (every row), so that their numbers can be compared by the same keys.

    >>> from jax_resnet import environment
    >>> sorted(environment.record())[:4]
    ['cpu_count', 'date', 'device', 'device_count']
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

import jax

__all__ = ["PACKAGES", "record"]

PACKAGES = ("jaxlib", "flax", "optax")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def record() -> dict:
    """{"device", "platform", "device_count", "process_count", "cpu_count", "jax" and the versions of `PACKAGES`,
    "python", "date"}: the first device's kind and platform, all processes' devices, this host's
    CPU cores, the UTC date to the second."""
    device = jax.devices()[0]
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        **{name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
