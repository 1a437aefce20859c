"""Choosing between the Pallas N:M kernel and dense ``jnp.dot`` from a measured table.

The sparse kernel only wins where reading fewer bytes matters (small batches, large
weights) and the break-even batch depends on the GPU, shape and dtype. The decision
therefore comes from a JSON table keyed by ``jax.Device.device_kind``, written by
``experiments/benchmarks/nm_kernels.py`` from its own measurements. The shipped table
(``nm_policy.json`` next to this file) holds the CPU rule (always dense: there is no Pallas
backend on CPU) and one entry per GPU kind that has been measured; an entry's
``max_batch`` is the largest batch at which the kernel beat dense (0: never). A device
without an entry uses the dense path.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.kernels._common import MetaLayout, is_gpu_backend
from jaxcompress.kernels._nm_matmul.api import check_operands, nm_matmul
from jaxcompress.kernels._nm_matmul.config import MIN_GPU_DOT, NMMatmulConfig
from jaxcompress.kernels._nm_pack.format import PackedNM

POLICY_ENV = "JAXCOMPRESS_NM_POLICY"
"""Environment variable naming a policy JSON file that replaces the shipped table."""


def _check_policy(policy: Any, source: str) -> dict:
    if not isinstance(policy, Mapping) or not isinstance(policy.get("devices"), Mapping):
        raise ValueError(f"policy from {source} must be a mapping with a 'devices' mapping")
    for kind, rule in policy["devices"].items():
        mode = rule.get("mode") if isinstance(rule, Mapping) else None
        if mode not in ("dense", "table"):
            raise ValueError(
                f"policy from {source}: devices[{kind!r}].mode must be 'dense' or 'table', "
                f"got {mode!r}"
            )
        if mode == "table":
            entries = rule.get("entries", ())
            if not isinstance(entries, list | tuple):
                raise ValueError(
                    f"policy from {source}: devices[{kind!r}].entries must be a list, got "
                    f"{type(entries).__name__}"
                )
            for i, entry in enumerate(entries):
                at = f"policy from {source}: devices[{kind!r}].entries[{i}]"
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{at} must be a mapping, got {entry!r}")
                missing = {"k", "n", "dtype", "nm", "max_batch"} - set(entry)
                if missing:
                    raise ValueError(f"{at} lacks {sorted(missing)}")
                for key in ("k", "n", "max_batch"):
                    v = entry[key]
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise ValueError(f"{at}.{key} must be an int >= 0, got {v!r}")
                if not isinstance(entry["dtype"], str) or not isinstance(entry["nm"], str):
                    raise ValueError(f"{at}: dtype and nm must be strings ('bfloat16', '2:4')")
    return dict(policy)


@functools.cache
def _load_path(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not a UTF-8 JSON policy file ({e.reason} at byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not a valid JSON policy file: {e.msg}") from None
    return _check_policy(doc, path)


@functools.cache
def _load_shipped() -> dict:
    text = resources.files("jaxcompress.kernels").joinpath("nm_policy.json").read_text("utf-8")
    return _check_policy(json.loads(text), "jaxcompress/kernels/nm_policy.json")


def load_policy(policy: str | os.PathLike | Mapping | None = None) -> dict:
    """The policy table: a mapping, a JSON path, ``$JAXCOMPRESS_NM_POLICY``, or the shipped
    ``nm_policy.json`` (in that order of precedence)."""
    if isinstance(policy, Mapping):
        return _check_policy(policy, "the policy argument")
    if policy is not None:
        return _load_path(os.fspath(policy))
    env = os.environ.get(POLICY_ENV)
    if env:
        return _load_path(env)
    return _load_shipped()


def _pallas_tiling_exists(batch: int, shape: tuple[int, int], n: int, m: int) -> bool:
    try:
        NMMatmulConfig.default(batch, shape[0], shape[1], MetaLayout(n, m), min_dot=MIN_GPU_DOT)
    except ValueError:
        return False
    return True


def select_implementation(
    batch: int,
    shape: tuple[int, int],
    dtype,
    device: jax.Device | None = None,
    *,
    n: int = 2,
    m: int = 4,
    policy: str | os.PathLike | Mapping | None = None,
) -> str:
    """``'pallas'`` or ``'dense'`` for ``x (batch, K) @ W (K, N)`` on ``device``.

    ``'dense'`` on any non-GPU device, on a GPU kind without a table entry, for shapes the
    kernel cannot tile, and for batches above the measured break-even ``max_batch`` of the
    nearest entry (same dtype and ``n:m``, nearest ``K*N`` on a log scale). Pure Python on
    static values: call it at trace time.
    """
    device = jax.devices()[0] if device is None else device
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got batch={batch!r}")
    if len(shape) != 2:
        raise ValueError(f"shape must be (K, N), got shape={shape!r}")
    table = load_policy(policy)
    rule = table["devices"].get(device.device_kind) or table["devices"].get(device.platform)
    if device.platform not in ("gpu", "cuda", "rocm") or rule is None or rule["mode"] == "dense":
        return "dense"
    if not _pallas_tiling_exists(int(batch), tuple(shape), n, m):
        return "dense"
    name = jnp.dtype(dtype).name
    entries = [e for e in rule.get("entries", ()) if e["dtype"] == name and e["nm"] == f"{n}:{m}"]
    if not entries:
        return "dense"
    size = math.log(max(1, shape[0] * shape[1]))
    best = min(entries, key=lambda e: abs(math.log(max(1, e["k"] * e["n"])) - size))
    return "pallas" if batch <= best["max_batch"] else "dense"


def nm_linear(
    x: jax.Array,
    packed: PackedNM,
    bias: jax.Array | None = None,
    *,
    policy: str | os.PathLike | Mapping | None = None,
) -> jax.Array:
    """``x @ W + bias`` choosing the faster path per call site from the policy table.

    ``'pallas'`` runs :func:`nm_matmul` with the kernel; ``'dense'`` runs the reference
    (unpack to the dense weight + ``jnp.dot``, float32 accumulation). The choice is made
    from static shapes at trace time, so a jitted caller compiles one path. On CPU it is
    always dense. Differentiable in ``x``, ``packed.values`` and ``bias``.
    """
    x, packed = check_operands(x, packed)
    batch = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    choice = "dense"
    if is_gpu_backend():
        choice = select_implementation(
            batch, packed.shape, x.dtype, n=packed.n, m=packed.m, policy=policy
        )
    y = nm_matmul(x, packed, implementation="pallas" if choice == "pallas" else "xla")
    if bias is not None:
        if tuple(bias.shape) != (packed.shape[1],):
            raise ValueError(f"bias must have shape ({packed.shape[1]},), got {tuple(bias.shape)}")
        y = y + bias.astype(y.dtype)
    return y
