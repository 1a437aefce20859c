"""Orbax checkpoints of training state, guarded by a structure fingerprint.

A :class:`Checkpointer` saves, per step, any of ``params`` (or an NNX ``model_state``), an optax
``opt_state`` (masks and all), a PRNG ``key``, free-form JSON ``extra`` metadata, and a JSON
*structure fingerprint*: for every item, the list of ``(key path, shape, dtype)`` of its leaves,
``None`` leaves included. The fingerprint lets the checkpointer

* refuse to save into a directory whose checkpoints hold a different structure (a common way to
  silently mix two experiments), and
* refuse to restore into a target of another structure, naming the first differing leaf, before
  Orbax reads anything.

Restores are made against an *abstract* target (``jax.eval_shape`` output, or trees of
``jax.ShapeDtypeStruct`` with shardings), so arrays come back directly on the target's
shardings. PRNG keys may be raw ``uint32`` keys or typed keys from ``jax.random.key``; typed keys
are stored as ``jax.random.key_data`` with their implementation recorded, and re-wrapped with
``jax.random.wrap_key_data`` on restore. When the target holds ``NamedSharding`` leaves on one
mesh, its leaves without one (scalar counters from ``tx.init``, keys) restore replicated on that
mesh, so a state saved on one device count steps on another.

Integrity: every array leaf's checksum is stored in the fingerprint and verified after a
restore; a leaf whose bytes changed on disk raises a ``ValueError`` naming the step and the
leaf. The checksum is a pair of position-weighted sums modulo :math:`2^{32}` of the leaf's
32-bit words :math:`w_i`,

.. math::  c_k = \\sum_i h_k(i)\\,(w_i \\oplus a_k) \bmod 2^{32}, \\quad k = 1, 2,

with odd weights :math:`h_k(i)` (an integer hash of the flat index). It is computed on the
devices where the leaf lives (a shard-local reduction plus a scalar all-reduce, no gather) and
does not depend on the sharding; since the weights are odd, any single changed word changes
both sums. :func:`write_json_atomic` writes result files atomically.

Example::

    with Checkpointer(workdir / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(step, params=params, opt_state=opt_state, key=key, extra={"loss": 0.1})
        ...
        target = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state, "key": key})
        restored = ckpt.restore(target=target)
        params, opt_state, key = restored["params"], restored["opt_state"], restored["key"]
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxcompress._io import write_json_atomic
from jaxcompress._tree import is_none

__all__ = ["ITEMS", "Checkpointer", "structure_fingerprint", "write_json_atomic"]

#: The pytree items a checkpoint may hold, in the order they are fingerprinted.
ITEMS = ("params", "model_state", "opt_state", "key")

_FORMAT = "jaxcompress.checkpoint/1"
_STRUCTURE = "structure"
_EXTRA = "extra"
_WRAP = "tree"


def _is_key_dtype(dtype: Any) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_entry(path: tuple, leaf: Any, item: str) -> dict[str, Any]:
    """JSON-able ``{path, shape, dtype}`` for one leaf (``None`` leaves included)."""
    entry: dict[str, Any] = {"path": jax.tree_util.keystr(path)}
    if leaf is None:
        entry.update(shape=None, dtype=None)
        return entry
    if isinstance(leaf, (bool, int, float, complex)) and not isinstance(leaf, np.generic):
        leaf = jax.eval_shape(lambda: leaf)
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"{item}: leaf {entry['path'] or '<root>'} is a {type(leaf).__name__}; expected an "
            "array, a jax.ShapeDtypeStruct, a Python scalar or None"
        )
    entry.update(shape=[int(d) for d in shape], dtype=str(dtype))
    if _is_key_dtype(dtype) and hasattr(leaf, "block_until_ready"):
        entry["impl"] = str(jax.random.key_impl(leaf))
    return entry


def structure_fingerprint(tree: Any, *, item: str = "tree") -> list[dict[str, Any]]:
    """The JSON-able structure of ``tree``: ``[{"path", "shape", "dtype"}, ...]`` in flatten order.

    ``path`` is ``jax.tree_util.keystr`` of the leaf's key path; ``None`` leaves are listed with
    ``shape`` and ``dtype`` set to ``None`` (so a mask tree's unpruned leaves are part of the
    structure); typed PRNG key leaves also record their ``impl`` when concrete. Works on arrays,
    tracers and ``jax.ShapeDtypeStruct`` trees alike, so a saved tree and its ``eval_shape``
    give the same fingerprint (up to ``impl``).

    Args:
      tree: any pytree (dicts, NamedTuple optimizer states, ``nnx.State``, ...).
      item: the name used for the tree in error messages.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    return [_leaf_entry(path, leaf, item) for path, leaf in leaves]


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "no such leaf"
    if entry["dtype"] is None:
        return "None"
    return f"shape {tuple(entry['shape'])} dtype {entry['dtype']}"


def _first_difference(
    saved: list[dict[str, Any]], other: list[dict[str, Any]]
) -> tuple[str, str, str] | None:
    """``(path, saved description, other description)`` of the first differing leaf, or None."""

    def strip(entry: dict[str, Any]) -> tuple:
        return entry["path"], entry["shape"], entry["dtype"]

    if [strip(e) for e in saved] == [strip(e) for e in other]:
        return None
    saved_by_path = {e["path"]: e for e in saved}
    other_by_path = {e["path"]: e for e in other}
    index = next(
        (i for i, (a, b) in enumerate(zip(saved, other, strict=False)) if strip(a) != strip(b)),
        min(len(saved), len(other)),
    )
    a = saved[index] if index < len(saved) else None
    b = other[index] if index < len(other) else None
    if a is not None and (b is None or a["path"] == b["path"] or a["path"] not in other_by_path):
        path = a["path"]  # a leaf the other side lacks, or the same leaf with another type
    else:
        assert b is not None
        path = b["path"]
    return (
        path or "<root>",
        _describe(saved_by_path.get(path)),
        _describe(other_by_path.get(path)),
    )


def _structure_difference(
    saved: Mapping[str, list], other: Mapping[str, list]
) -> tuple[str, str, str, str] | None:
    """``(item, path, saved, other)`` naming the first difference between two fingerprints."""
    for item in ITEMS:
        if item not in saved and item not in other:
            continue
        if item not in other:
            return item, "<item>", "present", "absent"
        if item not in saved:
            return item, "<item>", "absent", "present"
        diff = _first_difference(saved[item], other[item])
        if diff is not None:
            return (item, *diff)
    return None


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

_MULTIPLIERS = ((0x9E3779B1, 0x85EBCA77, 0x7F4A7C15), (0xC2B2AE3D, 0x27D4EB2F, 0x165667B1))


def _words(a: jax.Array) -> jax.Array:
    """The leaf's bits as ``uint32`` words (one per element; two for 64-bit dtypes)."""
    dtype = a.dtype
    if dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.stack([_words(jnp.real(a)), _words(jnp.imag(a))], axis=-1)
    info = jnp.finfo(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype)
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}.get(info.bits)
    if unsigned is None:
        return a.astype(jnp.uint32)  # sub-byte types: their integer values
    return jax.lax.bitcast_convert_type(a, unsigned).astype(jnp.uint32)


def _leaf_checksum(a: jax.Array) -> jax.Array:
    w = _words(a)
    flat = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in range(w.ndim - 1, -1, -1):  # the row-major flat index, without a reshape
        flat = flat + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
        stride = (stride * w.shape[d]) % (1 << 32)
    sums = []
    for m1, m2, salt in _MULTIPLIERS:
        h = flat * jnp.uint32(m1) + jnp.uint32(salt)
        h = (h ^ (h >> 15)) * jnp.uint32(m2)
        h = h ^ (h >> 13)
        sums.append(jnp.sum((w ^ jnp.uint32(salt)) * (h | jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(sums)


@jax.jit
def _checksums_jit(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_checksum(a) for a in leaves])


def _checksums(leaves: list[Any]) -> list[str]:
    """Hex checksums of array leaves, one jitted reduction per set of devices they live on."""
    arrays = [a if isinstance(a, jax.Array) else jnp.asarray(a) for a in leaves]
    groups: dict[frozenset, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(frozenset(a.sharding.device_set), []).append(i)
    out: list[str] = [""] * len(arrays)
    for indices in groups.values():
        sums = _checksums_jit([arrays[i] for i in indices])
        if not sums.is_fully_addressable:
            sums = sums.addressable_data(0)
        for i, (c1, c2) in zip(indices, np.asarray(sums).tolist(), strict=True):
            out[i] = f"{c1:08x}{c2:08x}"
    return out


def _to_storable(leaf: Any) -> Any:
    """Typed PRNG keys are stored as their raw ``key_data``; Python scalars as arrays."""
    if isinstance(leaf, (bool, int, float, complex)) and not isinstance(leaf, np.generic):
        return jnp.asarray(leaf)
    if _is_key_dtype(getattr(leaf, "dtype", None)):
        return jax.random.key_data(leaf)
    return leaf


def _key_data_sharding(sharding: Any, extra_dims: int) -> Any:
    """The sharding of ``key_data`` for keys sharded as ``sharding`` (trailing dims replicated)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * extra_dims
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def _target_mesh(items: Mapping[str, Any]) -> jax.sharding.Mesh | None:
    """The mesh of the target's ``NamedSharding`` leaves when there is exactly one."""
    meshes = []
    for tree in items.values():
        for leaf in jax.tree.leaves(tree):
            sharding = getattr(leaf, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding) and all(
                sharding.mesh is not m and sharding.mesh != m for m in meshes
            ):
                meshes.append(sharding.mesh)
    return meshes[0] if len(meshes) == 1 else None


def _abstract_leaf(leaf: Any, mesh: jax.sharding.Mesh | None = None) -> jax.ShapeDtypeStruct:
    """The ``ShapeDtypeStruct`` Orbax restores a target leaf as: on the leaf's sharding, or on
    the default device when the leaf has none (``jax.eval_shape`` output). Orbax would otherwise
    use the sharding saved in the checkpoint, which fails on another platform or device count
    (a checkpoint written on a GPU or an 8-device mesh, read on one CPU). With ``mesh``, leaves
    without a ``NamedSharding`` (scalar counters on device 0) restore replicated on it."""
    if isinstance(leaf, (bool, int, float, complex)) and not isinstance(leaf, np.generic):
        leaf = jax.eval_shape(lambda: leaf)
    sharding = getattr(leaf, "sharding", None)
    if mesh is not None and not isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key_dtype(leaf.dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        sharding = _key_data_sharding(sharding, len(data.shape) - len(leaf.shape))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _check_step(step: Any, argname: str = "step") -> int:
    if isinstance(step, (jax.Array, np.ndarray, np.generic)) and np.ndim(step) == 0:
        if jnp.issubdtype(step.dtype, jnp.integer):
            step = int(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{argname} must be a non-negative integer, got {step!r}")
    return int(step)


def _check_local_directory(directory: str, *, create: bool) -> None:
    """Rejects a path that is a file, cannot be created or cannot be written, before any work."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"Checkpointer: directory {directory!r} exists and is not a directory; pass a "
            "directory path"
        )
    if not os.path.isdir(directory):
        if not create:
            raise FileNotFoundError(
                f"Checkpointer: directory {directory!r} does not exist and create=False"
            )
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"Checkpointer: cannot create directory {directory!r}: {err.strerror or err}"
            ) from err
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxcompress-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"Checkpointer: directory {directory!r} is not writable: {err.strerror or err}"
        ) from err


class Checkpointer:
    """Saves and restores training state with Orbax, refusing structure mismatches.

    A thin wrapper over ``orbax.checkpoint.CheckpointManager`` (synchronous saves; each step is
    written to a temporary directory and committed atomically by Orbax). Every step holds the
    items given to :meth:`save` (each a ``StandardSave`` pytree), an optional JSON ``extra``
    item, and a JSON ``structure`` item with :func:`structure_fingerprint` of each pytree item.

    Args:
      directory: where the steps live (one sub-directory per step).
      max_to_keep: how many most recent steps to keep (older ones are deleted after a save);
        ``None`` keeps all.
      create: create ``directory`` if it does not exist; with ``False`` a missing directory is a
        ``FileNotFoundError``.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, create: bool = True
    ):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"Checkpointer: argument 'directory' must be a str or os.PathLike, got "
                f"{type(directory).__name__}: {directory!r}"
            )
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool)
            or not isinstance(max_to_keep, numbers.Integral)
            or max_to_keep < 1
        ):
            raise ValueError(
                f"Checkpointer: argument 'max_to_keep' must be a positive integer or None, got "
                f"{max_to_keep!r}"
            )
        directory = str(os.fspath(directory))
        if "://" not in directory:  # local path; remote ones (gs://...) are left to Orbax
            directory = os.path.abspath(directory)
            _check_local_directory(directory, create=bool(create))
        elif not create and not epath.Path(directory).is_dir():
            raise FileNotFoundError(
                f"Checkpointer: directory {directory!r} does not exist and create=False"
            )
        self._directory: str = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if max_to_keep is None else int(max_to_keep),
            create=bool(create),
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    @property
    def directory(self) -> str:
        """The checkpoint directory (absolute for local paths)."""
        return self._directory

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending work and releases Orbax resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The most recent saved step, or ``None`` when the directory holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _read_json(self, step: int, item: str) -> Any:
        """The JSON item ``item`` of ``step``; a ``ValueError`` naming the file if unreadable."""
        path = os.path.join(self._directory, str(step), item, "metadata")
        if "://" not in self._directory:
            if not os.path.isfile(path):
                raise ValueError(
                    f"Checkpointer: step {step} in {self._directory!r} has no {item} file "
                    f"{path!r}; it was not written by jaxcompress.checkpoint.Checkpointer"
                )
            try:
                with open(path, "rb") as handle:
                    return json.loads(handle.read().decode("utf-8"))
            except ValueError as err:  # UnicodeDecodeError and JSONDecodeError included
                raise ValueError(
                    f"Checkpointer: the {item} file {path!r} of step {step} is empty or corrupt "
                    f"({type(err).__name__}: {err})"
                ) from err
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )
            return restored[item]
        except Exception as err:  # any failure to read it means it is not ours
            raise ValueError(
                f"Checkpointer: step {step} in {self._directory!r} has no readable {item} file "
                f"{path!r}: {type(err).__name__}: {err}"
            ) from err

    def structure(self, step: int | None = None) -> dict[str, Any]:
        """The structure fingerprint saved with ``step`` (default: the latest step)."""
        step = self._resolve_step(step)
        structure = self._read_json(step, _STRUCTURE)
        if not isinstance(structure, Mapping) or structure.get("format") != _FORMAT:
            raise ValueError(
                f"Checkpointer: step {step} in {self._directory!r} has an unknown structure "
                f"format {structure.get('format') if isinstance(structure, Mapping) else None!r};"
                f" expected {_FORMAT!r}"
            )
        return dict(structure)

    def extra(self, step: int | None = None) -> dict[str, Any] | None:
        """The JSON ``extra`` saved with ``step`` (default: the latest), or ``None``."""
        step = self._resolve_step(step)
        if not self.structure(step).get("has_extra"):
            return None
        return self._read_json(step, _EXTRA)

    def save(
        self,
        step: int,
        *,
        params: Any = None,
        model_state: Any = None,
        opt_state: Any = None,
        key: jax.Array | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Saves the given items as ``step``.

        Everything is checked before anything is written: ``step`` must be new and later than
        every saved step, ``extra`` must be JSON-serialisable, every leaf must be an array (or a
        Python scalar, stored as an array), and the structure of the items must equal the
        structure already saved in the directory. A rejected call leaves the directory as it
        was. Saving blocks until the step is committed; older steps beyond ``max_to_keep`` are
        then deleted.

        Args:
          step: the training step, a non-negative integer.
          params: a params pytree.
          model_state: an NNX ``nnx.State`` (or any pytree) of the model, e.g. params and
            batch statistics.
          opt_state: an optax state, including ``None`` leaves (mask trees).
          key: a PRNG key, raw ``uint32`` or typed (``jax.random.key``), or a pytree of keys.
          extra: JSON-serialisable metadata (config, metrics), restored as-is.

        Raises:
          ValueError: bad ``step``, nothing to save, or a structure that differs from the
            checkpoints already in the directory (naming the first differing leaf).
          TypeError: ``extra`` not JSON-serialisable, or a leaf that is not an array.
        """
        step = _check_step(step)
        trees = {
            name: tree
            for name, tree in zip(ITEMS, (params, model_state, opt_state, key), strict=True)
            if tree is not None
        }
        if not trees:
            raise ValueError(
                f"Checkpointer.save(): nothing to save; pass at least one of {', '.join(ITEMS)}"
            )
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise TypeError(
                    "Checkpointer.save(): argument 'extra' must be a JSON-serialisable mapping, "
                    f"got {type(extra).__name__}"
                )
            try:
                extra = json.loads(json.dumps(dict(extra), allow_nan=True))
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"Checkpointer.save(): argument 'extra' is not JSON-serialisable: {err}"
                ) from err
        fingerprint = {name: structure_fingerprint(t, item=name) for name, t in trees.items()}
        steps = self.all_steps()
        if steps:
            if step in steps:
                raise ValueError(
                    f"Checkpointer.save(): step {step} already exists in {self._directory!r}; "
                    "checkpoints are never overwritten (delete it first)"
                )
            if step < steps[-1]:
                raise ValueError(
                    f"Checkpointer.save(): step {step} is older than the latest saved step "
                    f"{steps[-1]} in {self._directory!r}; delete the newer steps first"
                )
            saved = self.structure(steps[-1])
            diff = _structure_difference(saved["items"], fingerprint)
            if diff is not None:
                item, path, was, now = diff
                raise ValueError(
                    f"Checkpointer.save(): refusing to save into {self._directory!r}: its "
                    f"checkpoints (latest step {steps[-1]}) have a different structure. First "
                    f"difference in item {item!r} at {path}: saved {was}, now {now}. Use a new "
                    "directory for a different model or optimizer."
                )
        storable = {name: jax.tree.map(_to_storable, tree) for name, tree in trees.items()}
        for name, tree in storable.items():
            sums = iter(_checksums(jax.tree.leaves(tree)))
            for entry in fingerprint[name]:
                if entry["dtype"] is not None:
                    entry["checksum"] = next(sums)
        structure = {"format": _FORMAT, "items": fingerprint, "has_extra": extra is not None}
        # Each item is stored wrapped in a one-entry dict: StandardSave takes no bare arrays.
        # Items without any array (e.g. an optimizer state made only of EmptyState) are fully
        # described by their fingerprint and are not written.
        args: dict[str, Any] = {
            name: ocp.args.StandardSave({_WRAP: tree})
            for name, tree in storable.items()
            if jax.tree.leaves(tree)
        }
        args[_STRUCTURE] = ocp.args.JsonSave(structure)
        if extra is not None:
            args[_EXTRA] = ocp.args.JsonSave(extra)
        saved_ok = self._manager.save(step, args=ocp.args.Composite(**args))
        self._manager.wait_until_finished()
        if not saved_ok:  # pragma: no cover - guarded by the checks above
            raise RuntimeError(f"Checkpointer.save(): Orbax declined to save step {step}")

    def restore(
        self, step: int | None = None, *, target: Mapping[str, Any], mesh: Any = None
    ) -> dict[str, Any]:
        """Restores ``step`` (default: the latest) into the structure of ``target``.

        Every restored array leaf is checked against the checksum saved with it.

        Args:
          step: the step to restore, or ``None`` for the latest.
          target: a mapping from item names (a subset of ``params``, ``model_state``,
            ``opt_state``, ``key``) to abstract trees: ``jax.eval_shape`` output, trees of
            ``jax.ShapeDtypeStruct`` (their ``sharding`` decides where arrays are placed) or
            concrete arrays (their shardings are used; their values are not). Leaves without
            a sharding (``jax.eval_shape`` output) restore onto the default device, whatever
            the platform and device count the checkpoint was saved from, unless the target
            has ``NamedSharding`` leaves on one mesh (or ``mesh`` is given): then they restore
            replicated on that mesh.
          mesh: a ``jax.sharding.Mesh`` on which leaves without a ``NamedSharding`` restore
            replicated (default: the one mesh of the target's ``NamedSharding`` leaves, if any).

        Returns:
          A dict with the restored items, ``"step"`` and ``"extra"`` (the JSON metadata or
          ``None``). Typed PRNG keys come back typed, with the implementation they were saved
          with.

        Raises:
          FileNotFoundError: the directory holds no checkpoint.
          ValueError: unknown ``step`` or item name, an item absent from the checkpoint, or a
            target whose structure differs from the saved one (naming the first differing
            leaf), raised before Orbax reads any array; data that cannot be read or a leaf
            whose checksum differs (naming the step and the leaf).
        """
        if not isinstance(target, Mapping):
            raise TypeError(
                "Checkpointer.restore(): argument 'target' must be a mapping from item names "
                f"{ITEMS} to abstract trees, got {type(target).__name__}"
            )
        unknown = [name for name in target if name not in ITEMS]
        if unknown or not target:
            raise ValueError(
                f"Checkpointer.restore(): argument 'target' has keys {sorted(target)}; expected a "
                f"non-empty subset of {ITEMS}"
            )
        step = self._resolve_step(step)
        saved = self.structure(step)
        items = {name: target[name] for name in ITEMS if name in target}
        for name, tree in items.items():
            if name not in saved["items"]:
                raise ValueError(
                    f"Checkpointer.restore(): step {step} in {self._directory!r} holds no item "
                    f"{name!r} (it holds {sorted(saved['items'])})"
                )
            diff = _first_difference(saved["items"][name], structure_fingerprint(tree, item=name))
            if diff is not None:
                path, was, now = diff
                raise ValueError(
                    f"Checkpointer.restore(): target item {name!r} does not match step {step} "
                    f"in {self._directory!r}. First difference at {path}: saved {was}, target "
                    f"{now}."
                )
        if mesh is None:
            mesh = _target_mesh(items)
        elif not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(
                f"Checkpointer.restore(): argument 'mesh' must be a jax.sharding.Mesh or None, "
                f"got {type(mesh).__name__}"
            )
        args: dict[str, Any] = {
            name: ocp.args.StandardRestore(
                {_WRAP: jax.tree.map(lambda leaf: _abstract_leaf(leaf, mesh), tree)}
            )
            for name, tree in items.items()
            if jax.tree.leaves(tree)
        }
        extra = self._read_json(step, _EXTRA) if saved.get("has_extra") else None
        if "://" not in self._directory:  # Orbax's JSON metadata: name the file if unreadable
            for name in args:
                path = os.path.join(self._directory, str(step), name, "_METADATA")
                if os.path.isfile(path):
                    try:
                        with open(path, "rb") as handle:
                            json.loads(handle.read().decode("utf-8"))
                    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError included
                        raise ValueError(
                            f"Checkpointer.restore(): the metadata file {path!r} of step {step} "
                            f"is empty or corrupt ({type(err).__name__}: {err})"
                        ) from err
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:
            raise ValueError(
                f"Checkpointer.restore(): step {step} in {self._directory!r} could not be read "
                f"(corrupt or incomplete data, items {sorted(args)}): {type(err).__name__}: {err}"
            ) from err
        for name in args:
            self._verify(step, name, saved["items"][name], restored[name][_WRAP])
        out: dict[str, Any] = {}
        for name, tree in items.items():
            if name not in args:
                out[name] = tree  # no arrays: the (validated) target structure is the value
                continue
            impls = iter(
                e.get("impl") for e in saved["items"][name] if _is_key_dtype_str(e["dtype"])
            )
            out[name] = jax.tree.map(
                lambda t, r, impls=impls: _from_storable(t, r, impls), tree, restored[name][_WRAP]
            )
        out["step"] = step
        out["extra"] = extra
        return out

    def _verify(self, step: int, name: str, entries: list[dict[str, Any]], tree: Any) -> None:
        """Compares the checksums of restored leaves with the saved ones (if any were saved)."""
        entries = [e for e in entries if e["dtype"] is not None]
        if not any("checksum" in e for e in entries):
            return  # written before checksums existed
        leaves = jax.tree.leaves(tree)
        if len(leaves) != len(entries):  # pragma: no cover - guarded by the fingerprint
            raise ValueError(
                f"Checkpointer.restore(): step {step} item {name!r}: {len(leaves)} leaves read, "
                f"{len(entries)} saved"
            )
        for entry, got in zip(entries, _checksums(leaves), strict=True):
            if entry.get("checksum") not in (None, got):
                raise ValueError(
                    f"Checkpointer.restore(): step {step} in {self._directory!r} is corrupt: "
                    f"item {name!r} leaf {entry['path'] or '<root>'} has checksum {got}, saved "
                    f"{entry['checksum']}"
                )

    def delete(self, step: int) -> None:
        """Deletes a saved step."""
        step = _check_step(step)
        if step not in self.all_steps():
            raise ValueError(
                f"Checkpointer.delete(): no step {step} in {self._directory!r}; saved steps are "
                f"{self.all_steps()}"
            )
        self._manager.delete(step)

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"Checkpointer: no checkpoint in {self._directory!r}")
        if step is None:
            return steps[-1]
        step = _check_step(step)
        if step not in steps:
            raise ValueError(
                f"Checkpointer: no step {step} in {self._directory!r}; saved steps are {steps}"
            )
        return step


def _is_key_dtype_str(dtype: str | None) -> bool:
    return dtype is not None and dtype.startswith("key<")


def _from_storable(target_leaf: Any, restored: Any, impls: Any) -> Any:
    """Re-wraps raw key data as a typed key where the target leaf is a typed key."""
    dtype = getattr(target_leaf, "dtype", None)
    if _is_key_dtype(dtype):
        impl = next(impls)
        if impl is None:
            raise ValueError(f"Checkpointer.restore(): no PRNG implementation saved for {dtype}")
        return jax.random.wrap_key_data(restored, impl=impl)
    return restored
