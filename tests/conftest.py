"""Test configuration: 8 emulated CPU devices, set before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED_DATA = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data"))
if "JAXCOMPRESS_DATA_DIR" not in os.environ and os.path.isdir(_SHARED_DATA):
    os.environ["JAXCOMPRESS_DATA_DIR"] = _SHARED_DATA
