"""Result output shared by the benchmarks, importing only JAX and the standard library (so a
benchmark that needs no Flax, e.g. ``nm_kernels.py`` on a bare GPU image, can use it):
the machine record and atomic JSON writes. ``_timing`` re-exports both."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import jax

from jaxcompress._io import write_json_atomic

__all__ = ["machine_info", "package_versions", "write_json"]


def machine_info() -> dict:
    """Platform, first device, jax version, CPU count and load average, for a result JSON."""
    return {
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }


def package_versions(names) -> dict:
    """``{distribution name: installed version, or None when it is not installed}``."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: str | None, result: dict, indent: int = 1) -> None:
    """Write ``result`` to ``path`` atomically (:func:`jaxcompress.checkpoint.write_json_atomic`),
    creating its folder; nothing when ``path`` is None."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json_atomic(path, result, indent=indent)
