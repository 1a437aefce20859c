"""Choosing between the Mosaic GPU N:M kernel and dense ``jnp.dot`` from a measured table.

The sparse kernel only wins where reading fewer bytes matters (small batches, large
weights) and the break-even batch depends on the GPU, shape and dtype. The decision
therefore comes from a JSON table keyed by ``jax.Device.device_kind``, written by
``experiments/benchmarks/nm_kernels.py`` from its own measurements. The shipped table
(``nm_policy.json`` next to this file) holds the CPU rule (always dense: the kernel needs an
sm90 GPU) and one entry per GPU kind that has been measured; an entry's ``max_batch`` is
the largest batch at which the kernel was not slower than dense by more than the
benchmark's tolerance (0: never). A device without an entry uses the dense path.
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

from jaxcompress.kernels._common import MetaLayout, is_hopper
from jaxcompress.kernels._nm_matmul.api import check_operands, nm_matmul
from jaxcompress.kernels._nm_matmul.config import NMMatmulConfig
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


def _kernel_runs(batch: int, shape: tuple[int, int], dtype, n: int, m: int) -> bool:
    """Whether the Mosaic kernel takes this problem with its default tiles."""
    k, cols = shape
    if k % m:
        return False
    layout = MetaLayout(n, m, jnp.dtype(dtype).itemsize)
    try:
        config = NMMatmulConfig.default(batch, k, cols, layout)
        config.check(batch, k, cols, layout, layout.stride(k // m))
    except (ValueError, KeyError):
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
    """``'mosaic'`` or ``'dense'`` for ``x (batch, K) @ W (K, N)`` on ``device``.

    ``'dense'`` on any device but an sm90 GPU, on a GPU kind without a table entry, for
    problems the kernel cannot run, and for batches above the measured ``max_batch`` of the
    nearest entry (same dtype and ``n:m``; the same ``(K, N)``, else the nearest ``K*N`` on a
    log scale, ties to the smaller ``max_batch``). Pure Python on
    static values: call it at trace time.
    """
    device = jax.devices()[0] if device is None else device
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got batch={batch!r}")
    if len(shape) != 2:
        raise ValueError(f"shape must be (K, N), got shape={shape!r}")
    table = load_policy(policy)
    rule = table["devices"].get(device.device_kind) or table["devices"].get(device.platform)
    if not is_hopper(device) or rule is None or rule["mode"] == "dense":
        return "dense"
    if not _kernel_runs(int(batch), tuple(shape), dtype, n, m):
        return "dense"
    name = jnp.dtype(dtype).name
    entries = [e for e in rule.get("entries", ()) if e["dtype"] == name and e["nm"] == f"{n}:{m}"]
    if not entries:
        return "dense"
    exact = [e for e in entries if (e["k"], e["n"]) == tuple(shape)]
    size = math.log(max(1, shape[0] * shape[1]))
    # the measured shape itself, else the nearest K*N (log scale); ties: the cautious entry
    best = min(
        exact or entries,
        key=lambda e: (abs(math.log(max(1, e["k"] * e["n"])) - size), e["max_batch"]),
    )
    return "mosaic" if batch <= best["max_batch"] else "dense"


def nm_linear(
    x: jax.Array,
    packed: PackedNM,
    bias: jax.Array | None = None,
    *,
    policy: str | os.PathLike | Mapping | None = None,
) -> jax.Array:
    """``x @ W + bias`` choosing the faster path per call site from the policy table.

    ``'mosaic'`` runs :func:`nm_matmul` with the kernel; ``'dense'`` runs the reference
    (unpack to the dense weight + ``jnp.dot``, float32 accumulation, fused by XLA). The
    choice is made from static shapes at trace time, so a jitted caller compiles one path.
    Off an sm90 GPU it is always dense. Differentiable in ``x``, ``packed.values`` and
    ``bias``.
    """
    x, packed = check_operands(x, packed)
    batch = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    choice = "dense"
    if is_hopper():
        choice = select_implementation(
            batch, packed.shape, x.dtype, n=packed.n, m=packed.m, policy=policy
        )
    y = nm_matmul(x, packed, implementation="mosaic" if choice == "mosaic" else "xla")
    if bias is not None:
        if tuple(bias.shape) != (packed.shape[1],):
            raise ValueError(f"bias must have shape ({packed.shape[1]},), got {tuple(bias.shape)}")
        y = y + bias.astype(y.dtype)
    return y
