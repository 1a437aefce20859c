"""Test configuration: 8 emulated CPU devices, set before JAX is imported; absolute data paths.

``JAXCOMPRESS_DATA_DIR`` and ``JAXCOMPRESS_CACHE_DIR`` may be given relative to the directory
pytest was started in (the README's ``JAXCOMPRESS_DATA_DIR=../shared/data``). They are resolved
once, here, against that directory, so that every process the tests start (xdist workers,
notebook kernels running inside ``notebooks/``, experiment subprocesses) inherits an absolute
path that means the same folder wherever it runs.
"""

import os
from importlib import metadata

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

for _name in ("JAXCOMPRESS_DATA_DIR", "JAXCOMPRESS_CACHE_DIR"):
    if os.environ.get(_name):
        os.environ[_name] = os.path.abspath(os.path.expanduser(os.environ[_name]))

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED_DATA = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data"))
if "JAXCOMPRESS_DATA_DIR" not in os.environ and os.path.isdir(_SHARED_DATA):
    os.environ["JAXCOMPRESS_DATA_DIR"] = _SHARED_DATA


def pytest_report_header(config):
    """Name the interpreter and the JAX stack the suite runs on (CI checks two combinations)."""
    versions = []
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    data = os.environ.get("JAXCOMPRESS_DATA_DIR", "(unset)")
    return [", ".join(versions), f"data: {data}"]
