"""The sharding rules behind :mod:`jaxcompress.sharding` and :mod:`jaxcompress.train`.

Private: the public names (``make_mesh``, ``param_specs``, ``initialize``, ``is_primary``,
``process_rows``) are re-exported by :mod:`jaxcompress.sharding`, whose docstring states the
rules; the rest (state specs, the step's sharding trees, global batch arrays, the axis names
and the FSDP size threshold) serve the training loop.
"""

from __future__ import annotations

import numbers
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress._tree import is_none

#: Axis names a mesh string may use: ``data`` splits the batch, ``fsdp`` splits the batch and
#: the params (under ``param_sharding="fsdp"``).
AXIS_NAMES = ("data", "fsdp")

#: Leaves with fewer elements stay replicated under the ``"fsdp"`` rule: sharding them saves
#: little memory and costs one collective each.
FSDP_MIN_SIZE = 1024

_AXIS_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([0-9]+)\s*$")


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, P)


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------


def _parse(spec: str | Mapping[str, int]) -> dict[str, int]:
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("mesh: empty mesh string; expected e.g. 'data=8' or 'data=4,fsdp=2'")
        axes: dict[str, int] = {}
        for part in spec.split(","):
            match = _AXIS_RE.match(part)
            if match is None:
                raise ValueError(
                    f"mesh {spec!r}: cannot parse {part.strip()!r}; expected 'name=size' "
                    "entries separated by commas, e.g. 'data=4,fsdp=2'"
                )
            name, size = match.group(1), int(match.group(2))
            if name in axes:
                raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
            axes[name] = size
        spec_items = axes
    elif isinstance(spec, Mapping):
        spec_items = dict(spec)
    else:
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, a string such as 'data=4,fsdp=2' or a mapping "
            f"of axis name to size, got {type(spec).__name__}: {spec!r}"
        )
    if not spec_items:
        raise ValueError("mesh: no axes given; expected e.g. 'data=8'")
    for name, size in spec_items.items():
        if name not in AXIS_NAMES:
            raise ValueError(
                f"mesh {spec!r}: unknown axis name {name!r}; expected names from {AXIS_NAMES} "
                "(build a jax.sharding.Mesh yourself for other axes)"
            )
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} has size {size!r}; expected >= 1")
    return {name: int(size) for name, size in spec_items.items()}


def check_mesh(mesh: Mesh) -> Mesh:
    """Returns ``mesh`` if the training loop can use it, else raises a ``ValueError``.

    The mesh must be a concrete ``jax.sharding.Mesh`` whose axes are all ``AxisType.Auto``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    explicit = [
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind != AxisType.Auto
    ]
    if explicit:
        n = len(mesh.axis_names)
        raise ValueError(
            f"mesh axes {explicit} are not AxisType.Auto (jax.make_mesh makes Explicit axes by "
            "default; Flax layers do not support them). Build the mesh with "
            f"jax.make_mesh({tuple(mesh.axis_sizes)}, {tuple(mesh.axis_names)}, "
            f"axis_types=(jax.sharding.AxisType.Auto,) * {n}) or "
            "jaxcompress.sharding.make_mesh('data=...')"
        )
    return mesh


def make_mesh(
    spec: str | Mapping[str, int] | Mesh, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A mesh with ``AxisType.Auto`` axes from ``"data=4,fsdp=2"`` or ``{"data": 4, "fsdp": 2}``.

    Axis names come from :data:`AXIS_NAMES`. The mesh uses the first ``prod(sizes)`` of
    ``devices`` (default ``jax.devices()``: every device of every process), laid out by
    ``jax.make_mesh``. A ``Mesh`` is checked (:func:`check_mesh`) and returned as is.

    Raises:
      ValueError: unparsable string, unknown axis name, size < 1, or more devices than exist.
    """
    if isinstance(spec, Mesh):
        return check_mesh(spec)
    axes = _parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = int(np.prod(list(axes.values())))
    if need > len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {need} devices but only {len(devices)} exist "
            f"({devices[0].platform if devices else 'none'}; jax.device_count() = "
            f"{jax.device_count()})"
        )
    return jax.make_mesh(
        tuple(axes.values()),
        tuple(axes),
        axis_types=(AxisType.Auto,) * len(axes),
        devices=devices[:need],
    )


def data_axes_of(mesh: Mesh, data_axes: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ``data_axes``, or every axis of ``mesh``."""
    if data_axes is None:
        return tuple(mesh.axis_names)
    axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or not axes or len(set(axes)) != len(axes):
        raise ValueError(
            f"data_axes={data_axes!r}: expected distinct names among the mesh axes "
            f"{tuple(mesh.axis_names)}"
        )
    return axes


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def _spec_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


# --------------------------------------------------------------------------------------------
# Sharding rules
# --------------------------------------------------------------------------------------------


def _fsdp_spec(shape: Sequence[int], axes: tuple[str, ...], size: int, min_size: int) -> P:
    """Split the largest dimension divisible by ``size`` (the first such on ties)."""
    if size == 1 or int(np.prod(shape)) < min_size:
        return P()
    dims = [d for d, n in enumerate(shape) if n % size == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda d: (shape[d], -d))
    entry = axes[0] if len(axes) == 1 else axes
    return P(*[entry if d == dim else None for d in range(len(shape))])


def _fsdp_axes(mesh: Mesh, data_axes: tuple[str, ...]) -> tuple[str, ...]:
    return ("fsdp",) if "fsdp" in mesh.axis_names else data_axes


def _check_spec(path: str, shape: Sequence[int], spec: Any, mesh: Mesh) -> P:
    if spec is None:
        return P()
    if not isinstance(spec, P):
        raise TypeError(
            f"param_sharding: leaf {path} has {spec!r}; expected a jax.sharding.PartitionSpec "
            "or None"
        )
    if len(spec) > len(shape):
        raise ValueError(
            f"param_sharding: leaf {path} of shape {tuple(shape)} has the {len(spec)}-entry "
            f"spec {spec}"
        )
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = _spec_axes(entry)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"param_sharding: leaf {path} names mesh axis {axis!r}; the mesh has "
                    f"{tuple(mesh.axis_names)}"
                )
        used += axes
        size = _axes_size(mesh, axes) if axes else 1
        if shape[dim] % size:
            raise ValueError(
                f"param_sharding: leaf {path} dimension {dim} has size {shape[dim]}, not "
                f"divisible by the size {size} of mesh axes {axes}"
            )
    if len(set(used)) != len(used):
        raise ValueError(f"param_sharding: leaf {path} uses a mesh axis twice in {spec}")
    return spec


def param_specs(
    params: Any,
    mesh: Mesh,
    rule: str | Any = "replicated",
    *,
    data_axes: str | Sequence[str] | None = None,
    min_size: int = FSDP_MIN_SIZE,
) -> Any:
    """A ``PartitionSpec`` per leaf of ``params`` (``None`` leaves stay ``None``).

    Args:
      params: a pytree of arrays or ``jax.ShapeDtypeStruct``.
      mesh: the mesh (Auto axes).
      rule: ``"replicated"``, ``"fsdp"`` (see the module docstring), or a pytree with the
        structure of ``params`` whose leaves are ``PartitionSpec`` or ``None`` (replicated),
        e.g. ``nnx.get_partition_spec(params)`` for Flax NNX sharding metadata.
      data_axes: the batch axes (default: every mesh axis); ``"fsdp"`` shards over the
        ``fsdp`` axis when the mesh has one, else over these.
      min_size: leaves with fewer elements stay replicated under ``"fsdp"``.

    Raises:
      ValueError: an explicit spec naming an axis the mesh lacks, or a dimension the axis size
        does not divide (naming the leaf, the dimension and the size); an unknown rule.
    """
    check_mesh(mesh)
    axes = data_axes_of(mesh, data_axes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
    if isinstance(rule, str):
        if rule not in ("replicated", "fsdp"):
            raise ValueError(
                f"param_sharding={rule!r}: expected 'replicated', 'fsdp' or a PartitionSpec tree"
            )
        fsdp = _fsdp_axes(mesh, axes)
        size = _axes_size(mesh, fsdp)
        specs = [
            None
            if leaf is None
            else (P() if rule == "replicated" else _fsdp_spec(leaf.shape, fsdp, size, min_size))
            for _, leaf in leaves
        ]
        return jax.tree_util.tree_unflatten(treedef, specs)
    rule_leaves, rule_def = jax.tree_util.tree_flatten(rule, is_leaf=_is_spec)
    if rule_def != treedef:
        try:
            rule_leaves = treedef.flatten_up_to(rule)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "param_sharding: the PartitionSpec tree does not have the structure of the "
                f"params: {err}"
            ) from err
    specs = [
        None if leaf is None else _check_spec(jax.tree_util.keystr(path), leaf.shape, spec, mesh)
        for (path, leaf), spec in zip(leaves, rule_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, specs)


def _path_key(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


def state_specs(
    state: Any,
    params: Any,
    specs: Any,
    mesh: Mesh,
    *,
    rule: str | Any = "replicated",
    data_axes: str | Sequence[str] | None = None,
    min_size: int = FSDP_MIN_SIZE,
) -> Any:
    """``PartitionSpec`` per leaf of an optimizer (or model) state that follows ``params``.

    A leaf whose key path ends with the key path of a param leaf and whose shape is that
    param's shape gets that param's spec (``mu``/``nu``/masks/...); every other leaf is
    replicated, except that under ``rule="fsdp"`` a large leaf is split by the FSDP size rule.
    Scalars and PRNG keys are always replicated. ``None`` leaves stay ``None``.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), (_, spec) in zip(
        jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)[0],
        jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0],
        strict=True,
    ):
        if leaf is not None:
            by_path[_path_key(path)] = (tuple(leaf.shape), spec)
    axes = data_axes_of(mesh, data_axes)
    fsdp = _fsdp_axes(mesh, axes)
    size = _axes_size(mesh, fsdp)
    depth = max((len(k) for k in by_path), default=0)

    def spec_of(path: Sequence[Any], leaf: Any) -> Any:
        if leaf is None:
            return None
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        if not shape or (dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)):
            return P()
        key = _path_key(path)
        for n in range(min(depth, len(key)), 0, -1):
            hit = by_path.get(key[-n:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        if isinstance(rule, str) and rule == "fsdp":
            return _fsdp_spec(shape, fsdp, size, min_size)
        return P()

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_none)
    return jax.tree_util.tree_unflatten(treedef, [spec_of(p, leaf) for p, leaf in leaves])


class StepShardings(NamedTuple):
    """The ``NamedSharding`` trees of a training step's arguments.

    Attributes:
      params, rest, opt_state: one ``NamedSharding`` per leaf (``None`` where the tree has
        ``None``).
      batch: the sharding of ``x`` and ``y`` (first dimension over the data axes).
      replicated: ``NamedSharding(mesh, P())``, for metrics and scalars.
      mesh: the mesh.
      data_axes: the batch axes.
    """

    params: Any
    rest: Any
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding
    mesh: Mesh
    data_axes: tuple[str, ...]

    def data_size(self) -> int:
        """How many slices a batch is split into; batch sizes must be multiples of it."""
        return _axes_size(self.mesh, self.data_axes)


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(
        lambda s: None if s is None else NamedSharding(mesh, s),
        specs,
        is_leaf=_is_spec,
    )


def step_shardings(
    mesh: Mesh,
    params: Any,
    rest: Any,
    opt_state: Any,
    *,
    param_sharding: str | Any = "replicated",
    data_axes: str | Sequence[str] | None = None,
    min_size: int = FSDP_MIN_SIZE,
) -> StepShardings:
    """Shardings of ``(params, rest, opt_state)`` and of the batch for a training step.

    ``params`` follow ``param_sharding`` (:func:`param_specs`); ``rest`` (BatchNorm statistics,
    RNG state) and ``opt_state`` follow the params by path and shape (:func:`state_specs`). The
    trees may hold arrays or ``jax.ShapeDtypeStruct``.
    """
    check_mesh(mesh)
    axes = data_axes_of(mesh, data_axes)
    pspecs = param_specs(params, mesh, param_sharding, data_axes=axes, min_size=min_size)
    other_rule = param_sharding if isinstance(param_sharding, str) else "replicated"
    kwargs = {"rule": other_rule, "data_axes": axes, "min_size": min_size}
    rspecs = state_specs(rest, params, pspecs, mesh, **kwargs)
    ospecs = state_specs(opt_state, params, pspecs, mesh, **kwargs)
    return StepShardings(
        params=_named(mesh, pspecs),
        rest=_named(mesh, rspecs),
        opt_state=_named(mesh, ospecs),
        batch=batch_sharding(mesh, axes),
        replicated=NamedSharding(mesh, P()),
        mesh=mesh,
        data_axes=axes,
    )


# --------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------


def is_primary() -> bool:
    """True on process 0, the one that prints, logs and writes result files."""
    return jax.process_index() == 0


def batch_sharding(mesh: Mesh, data_axes: str | Sequence[str] | None = None) -> NamedSharding:
    """The sharding of a batch: its first dimension split over the data axes."""
    axes = data_axes_of(check_mesh(mesh), data_axes)
    return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def process_rows(
    mesh: Mesh | NamedSharding | str | Mapping[str, int],
    batch_size: int,
    *,
    data_axes: str | Sequence[str] | None = None,
) -> tuple[int, int]:
    """``(start, stop)``: the rows of a global batch of ``batch_size`` that this process's
    devices hold when the batch is split over ``data_axes`` (default: every axis) of ``mesh``
    (a ``Mesh``, a mesh string, or the batch's ``NamedSharding``).

    Every process computes the same global batch and reads only ``rows[start:stop]`` of it; one
    process gets ``(0, batch_size)``.

    Raises:
      ValueError: ``batch_size`` not divisible by the batch axes, or a device layout that gives
        this process non-contiguous rows.
    """
    if isinstance(mesh, NamedSharding):
        sharding = mesh
    else:
        sharding = batch_sharding(make_mesh(mesh), data_axes)
    mesh = cast(Mesh, sharding.mesh)
    n = _axes_size(mesh, _spec_axes(sharding.spec[0]) if len(sharding.spec) else ())
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n} slices of mesh axes "
            f"{_spec_axes(sharding.spec[0])} ({dict(mesh.shape)})"
        )
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    slices = [cast(slice, cast(tuple, idx)[0]).indices(batch_size) for idx in index_map.values()]
    starts = sorted({s[0] for s in slices})
    stops = sorted({s[1] for s in slices})
    start, stop = starts[0], stops[-1]
    if (stop - start) != len(starts) * (batch_size // n):
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous rows {starts} of the batch; "
            "order the mesh devices by process (jax.make_mesh does)"
        )
    return start, stop


def global_array(sharding: NamedSharding, local: np.ndarray, batch_size: int) -> jax.Array:
    """The global batch array from this process's rows ``local`` (see :func:`process_rows`)."""
    return jax.make_array_from_process_local_data(
        sharding, local, (batch_size, *np.shape(local)[1:])
    )


def _wait_for(address: str, timeout_s: float) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"coordinator_address={address!r}: expected 'host:port'")
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as err:
            last = err
            time.sleep(0.2)
    raise TimeoutError(
        f"jax.distributed: the coordinator {address} could not be reached within {timeout_s:g} "
        f"s ({last}). Start process 0 first, check the address and port, or raise timeout_s."
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = 120.0,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Start JAX's multi-controller runtime, with a bounded wait for the coordinator.

    Arguments left ``None`` are read from ``JAXCOMPRESS_COORDINATOR`` (``host:port`` of process
    0), ``JAXCOMPRESS_NUM_PROCESSES`` and ``JAXCOMPRESS_PROCESS_ID``. With none of them set and
    ``num_processes`` unset or 1, nothing is done (one process) and ``False`` is returned. On a
    managed cluster (TPU pod, SLURM) where JAX detects everything itself, call
    ``jax.distributed.initialize()`` directly instead.

    Processes other than 0 first poll the coordinator's port for at most ``timeout_s``
    seconds and raise a ``TimeoutError`` naming the address when it stays unreachable; the
    runtime's own initialisation is bounded by the same timeout.

    Returns:
      ``True`` when the runtime was initialised.
    """
    coordinator_address = coordinator_address or os.environ.get("JAXCOMPRESS_COORDINATOR")
    if num_processes is None:
        num_processes = _env_int("JAXCOMPRESS_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAXCOMPRESS_PROCESS_ID")
    if num_processes is None or num_processes == 1:
        if coordinator_address is None and process_id in (None, 0):
            return False
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(
                f"initialize(): {name}={value!r}; expected a non-negative integer (argument or "
                f"JAXCOMPRESS_{name.upper()})"
            )
    num_processes, process_id = int(cast(int, num_processes)), int(cast(int, process_id))
    if num_processes < 1 or process_id >= num_processes:
        raise ValueError(
            f"initialize(): process_id={process_id} must be in [0, num_processes={num_processes})"
        )
    if not isinstance(coordinator_address, str):
        raise ValueError(
            "initialize(): coordinator_address (or JAXCOMPRESS_COORDINATOR) is required, "
            "e.g. '10.0.0.1:1234'"
        )
    if not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
        raise ValueError(f"initialize(): timeout_s={timeout_s!r}; expected a positive number")
    if process_id != 0:
        _wait_for(coordinator_address, float(timeout_s))
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=max(1, int(np.ceil(timeout_s))),
        )
    except Exception as err:
        raise RuntimeError(
            f"jax.distributed.initialize failed for process {process_id} of {num_processes} "
            f"with coordinator {coordinator_address} (timeout {timeout_s:g} s): {err}"
        ) from err
    return True
