"""Remove (or zero) the units of dependency groups: physically smaller models."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.structure._groups import Analysis
from jaxcompress.structure._trace import Path, forward_fn, key_path


def check_keep(keep: Any, analysis: Analysis) -> dict[str, np.ndarray]:
    """Validate ``keep`` (group name -> boolean unit mask) against the traced groups."""
    if not isinstance(keep, Mapping):
        raise TypeError(
            f"keep must be a mapping from group name to a boolean unit mask, got "
            f"{type(keep).__name__}"
        )
    groups = analysis.groups
    out: dict[str, np.ndarray] = {}
    for name, mask in keep.items():
        if name not in groups:
            raise ValueError(
                f"keep names an unknown group {name!r}; the model's groups are {list(groups)}"
            )
        group = groups[name]
        arr = np.asarray(mask)
        if arr.dtype != np.bool_:
            raise TypeError(
                f"keep[{name!r}] must be a boolean mask of {group.size} units, got dtype "
                f"{arr.dtype}"
            )
        if arr.shape != (group.size,):
            raise ValueError(
                f"keep[{name!r}] must have shape ({group.size},) (the group's unit count), got "
                f"shape {arr.shape}"
            )
        if not arr.any():
            raise ValueError(
                f"keep[{name!r}] removes every one of the group's {group.size} units; keep at "
                "least one"
            )
        if not arr.all() and not group.prunable:
            raise ValueError(
                f"group {name!r} is not prunable ({'; '.join(group.reasons)}); its variables are "
                f"{[f'{m.name}[{m.axis}]' for m in group.members]}"
            )
        if not arr.all():
            out[name] = arr
    return out


def _axis_keep(
    analysis: Analysis, masks: dict[str, np.ndarray]
) -> dict[tuple[Path, int], np.ndarray]:
    """Per (variable path, axis): which indices survive (the AND over the groups on it)."""
    out: dict[tuple[Path, int], np.ndarray] = {}
    for name, mask in masks.items():
        for m in analysis.groups[name].members:
            drop = (m.units >= 0) & ~mask[np.clip(m.units, 0, None)]
            key = (m.path, m.axis)
            keep = out.get(key, np.ones(m.units.shape, bool))
            out[key] = keep & ~drop
    return out


def _map_state(model: nnx.Module, fn) -> nnx.Module:
    """A new model whose state leaf at each path is ``fn(path, leaf)``."""
    graphdef, state = nnx.split(model)
    new_state = jax.tree_util.tree_map_with_path(lambda kp, x: fn(key_path(kp), x), state)
    return nnx.merge(graphdef, new_state)


def zero(model: nnx.Module, analysis: Analysis, masks: dict[str, np.ndarray]) -> nnx.Module:
    axis_keep = _axis_keep(analysis, masks)
    params = {
        p for p, (kind, _, _) in analysis.trace.variables.items() if issubclass(kind, nnx.Param)
    }
    by_path: dict[Path, list[tuple[int, np.ndarray]]] = {}
    for (path, axis), keep in axis_keep.items():
        if path in params and not keep.all():
            by_path.setdefault(path, []).append((axis, keep))

    def fn(path, x):
        if path not in by_path:
            return x
        mask = np.ones(x.shape, bool)
        for axis, keep in by_path[path]:
            shape = [1] * x.ndim
            shape[axis] = keep.shape[0]
            mask = mask & keep.reshape(shape)
        return jnp.where(jnp.asarray(mask), x, jnp.zeros((), x.dtype))

    return _map_state(model, fn)


def _take(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
    """``x`` restricted to ``idx`` along ``axis``; a named sharding keeps its other axes (the
    pruned axis, whose new size need not divide the mesh, becomes replicated)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = [*sharding.spec, *([None] * (x.ndim - len(sharding.spec)))]
        spec[axis] = None
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        index = (slice(None),) * axis + (jnp.asarray(idx),)
        return jax.device_put(x.at[index].get(out_sharding=out), out)
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def _pruned(
    model: nnx.Module, analysis: Analysis, masks: dict[str, np.ndarray], abstract: bool
) -> nnx.Module:
    """The pruned model with Flax attributes updated; ``abstract``: shapes only."""
    axis_keep = _axis_keep(analysis, masks)
    by_path: dict[Path, list[tuple[int, np.ndarray]]] = {}
    for (path, axis), keep in axis_keep.items():
        if not keep.all():
            by_path.setdefault(path, []).append((axis, np.flatnonzero(keep)))

    def fn(path, x):
        if path in by_path and abstract:
            shape = list(x.shape)
            for axis, idx in by_path[path]:
                shape[axis] = idx.shape[0]
            return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
        for axis, idx in by_path.get(path, ()):
            x = _take(x, idx, axis)
        return x

    new = _map_state(model, fn)
    _update_attributes(new, analysis, masks)
    return new


def prune(
    model: nnx.Module, analysis: Analysis, masks: dict[str, np.ndarray], inputs
) -> nnx.Module:
    new = _pruned(model, analysis, masks, abstract=False)
    _check_traces(model, new, analysis, inputs)
    return new


def probe(model: nnx.Module, analysis: Analysis, inputs) -> Analysis:
    """Mark not prunable the groups whose model no longer runs with one unit removed.

    The tracer proves that removing a unit equals zeroing it; it cannot see sizes that code
    checks or hard-codes (``jax.nn.dot_product_attention`` requires the value head size to equal
    the key head size; a module may reshape to a constant). Each prunable group is removed one
    unit at a time, abstractly, and the forward pass traced again.
    """
    for name, group in list(analysis.groups.items()):
        if not group.prunable or group.size < 2:
            continue
        mask = np.arange(group.size) < group.size - 1
        try:
            _check_traces(model, _pruned(model, analysis, {name: mask}, True), analysis, inputs)
        except ValueError as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            reason = f"the model does not run with a unit removed ({type(cause).__name__}: "
            reason += str(cause).strip().splitlines()[0][:200] + ")"
            analysis.groups[name] = dataclasses.replace(group, reasons=(reason,))
    return analysis


def _kept(analysis: Analysis, masks: dict[str, np.ndarray], seq) -> int:
    atoms = analysis.trace.atoms
    names = analysis.group_of_class()
    total = 1
    for r in atoms.leaves(seq):
        name = names.get(r)
        total *= int(masks[name].sum()) if name in masks else atoms.size[r]
    return total


def _update_attributes(model: nnx.Module, analysis: Analysis, masks: dict[str, np.ndarray]) -> None:
    """Refresh the size attributes of Flax's layers from their new parameter shapes."""
    for path, module in nnx.iter_graph(model):
        path = tuple(path)
        if isinstance(module, nnx.Conv):
            kernel_shape = _shape(module.kernel)
            groups = module.feature_group_count
            seq = analysis.trace.grouped_convs.get((*path, "kernel"))
            if seq is not None:
                groups = _kept(analysis, masks, seq)
            module.feature_group_count = groups
            module.in_features = groups * kernel_shape[-2]
            module.out_features = kernel_shape[-1]
        elif isinstance(module, nnx.LinearGeneral):
            shape = _shape(module.kernel)
            n_in, n_out = len(module.in_features), len(module.out_features)
            module.out_features = tuple(shape[len(shape) - n_out :])
            module.in_features = tuple(shape[len(shape) - n_out - n_in : len(shape) - n_out])
        elif isinstance(module, nnx.Linear):
            module.in_features, module.out_features = _shape(module.kernel)
        elif isinstance(module, nnx.Embed):
            module.num_embeddings, module.features = _shape(module.embedding)
        elif isinstance(module, nnx.MultiHeadAttention):
            q = _shape(module.query.kernel)  # (in, heads, head_dim)
            k = _shape(module.key.kernel)
            module.in_features = q[0]
            module.num_heads, module.head_dim = q[1], q[2]
            module.qkv_features = q[1] * q[2]
            module.in_kv_features, module.num_kv_heads = k[0], k[1]
            module.out_features = _shape(module.out.kernel)[-1]
        elif isinstance(module, nnx.GroupNorm):
            features = _norm_features(module)
            if features is not None:
                module.num_features = features  # pyrefly: ignore[missing-attribute]
                module.num_groups = features // module.group_size
        elif isinstance(module, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.InstanceNorm)):
            features = _norm_features(module)
            if features is not None:
                module.num_features = features


def _shape(var: nnx.Variable) -> tuple[int, ...]:
    """The shape of a variable's value (an array or, for abstract models, a shape struct)."""
    return tuple(var.get_value().shape)


def _norm_features(module) -> int | None:
    for name in ("scale", "bias", "mean"):
        var = getattr(module, name, None)
        if isinstance(var, nnx.Variable):
            return int(_shape(var)[-1])
    return None


def _check_traces(old: nnx.Module, new: nnx.Module, analysis: Analysis, inputs) -> None:
    """The pruned model must run on the same inputs with outputs of the same shapes."""
    fn, leaves, _, _ = forward_fn(new)
    try:
        shapes = jax.eval_shape(fn, leaves, *inputs)
    except Exception as e:  # noqa: BLE001 - reported with the cause
        raise ValueError(
            f"the pruned {type(old).__name__} does not run on the inputs any more "
            f"({type(e).__name__}: {e}); a module of it derives shapes from attributes that "
            "structure.prune does not update (it updates those of Flax's layers)"
        ) from e
    want = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), analysis.trace.out_shapes)
    got = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes)
    if want != got:
        raise ValueError(
            f"the pruned {type(old).__name__} returns outputs of shapes {got}, expected {want}"
        )
