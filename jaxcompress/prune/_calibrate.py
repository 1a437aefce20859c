"""Layer-wise calibration of Flax NNX models: the inputs of every Dense layer, sequentially.

The calibrated layers are the ``nnx.Linear`` modules, and the ``nnx.LinearGeneral`` modules that
contract the trailing input axes without batch axes (``nnx.MultiHeadAttention``'s projections),
whose kernel leaf a selector ``where(path, leaf)`` accepts (default
:func:`jaxcompress.masks.prunable`). A kernel of shape ``(*in, *out)`` is treated as the 2-D
``(prod(in), prod(out))`` Dense kernel; its inputs ``(..., *in)`` as ``(n, prod(in))`` rows.

**Capturing inputs.** Inside a jitted function the model is rebuilt from its ``nnx.split``
state (``nnx.merge``, fresh objects: the caller's model is never touched), and each selected
module of the rebuilt copy is switched to a subclass whose ``__call__`` records its input
before calling the original. Only the statistic the pruner needs leaves the jitted function:
``X^T X`` (float32, ``Precision.HIGHEST``) or the per-input sum of squares, summed over every
call of the layer; the rest of the forward pass is dead code that XLA removes. With a
calibration batch sharded over devices the ``jnp`` reduction over rows is an all-reduce.

**Plan.** One abstract trace (``jax.eval_shape``) records the call order of the selected
layers and which ones receive the *same* input array (``q``, ``k`` and ``v`` of an attention
block). Layers with the same input form a group, groups are ordered by their first call, and
a group's input depends only on earlier groups. Sequential pruning then runs, for each group,
one forward pass over the calibration set with every earlier group already pruned, so each
layer sees the outputs of the pruned layers before it (SparseGPT's "sequential" calibration;
the layers of a group share one statistic, its "true sequential" order within a block).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.masks import path_str, prunable

__all__ = ["Calibration", "Layer", "hessians", "prepare"]

Forward = Callable[[nnx.Module, Any], Any]
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Input interception.
# --------------------------------------------------------------------------------------

_RECORDER: contextvars.ContextVar = contextvars.ContextVar("jaxcompress_prune_recorder")
_CAPTURING: dict[type, type] = {}


class _Recorder:
    """Inputs of the selected modules (by ``id``) during one traced forward pass."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.inputs: dict[str, list[Any]] = {}
        self.order: list[str] = []

    def record(self, module: Any, x: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        if name not in self.inputs:
            self.inputs[name] = []
            self.order.append(name)
        self.inputs[name].append(x)


def _capturing(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` reports its input to the active recorder."""
    sub = _CAPTURING.get(cls)
    if sub is None:

        def __call__(self, inputs, *args, **kwargs):
            rec = _RECORDER.get(None)
            if rec is not None:
                rec.record(self, inputs)
            return cls.__call__(self, inputs, *args, **kwargs)

        sub = type(f"_Capturing{cls.__name__}", (cls,), {"__call__": __call__})
        _CAPTURING[cls] = sub
    return sub


def _default_forward(model: nnx.Module, batch: Any) -> Any:
    return model(batch_input(batch))


def batch_input(batch: Any) -> Any:
    """The model input of a batch: an array, ``(x, y)``, or a dict with an ``"x"`` key."""
    if isinstance(batch, tuple | list):
        return batch[0]
    if isinstance(batch, dict):
        return batch["x"]
    return batch


def _run(graphdef, params, rest, batch, forward, modules, names) -> _Recorder:
    """Forward pass of a rebuilt model, recording the inputs of the modules at ``modules``."""
    model = nnx.merge(graphdef, params, rest)
    by_path = dict(nnx.iter_graph(model))
    rec = _Recorder({id(by_path[p]): n for p, n in zip(modules, names, strict=True)})
    for p in modules:
        mod = by_path[p]
        mod.__class__ = _capturing(type(mod))
    token = _RECORDER.set(rec)
    try:
        forward(model, batch)
    finally:
        _RECORDER.reset(token)
    return rec


# --------------------------------------------------------------------------------------
# Layers and plan.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """A calibrated Dense layer.

    Attributes:
      name: the kernel leaf's :func:`jaxcompress.masks.path_str` (``"blocks/0/attn/q/kernel"``).
      module: the module's graph path (``("blocks", 0, "attn", "q")``).
      shape: the kernel's shape; ``d_in`` x ``d_out`` its 2-D view.
      d_in: product of the contracted (input) axes.
      rows: calibration rows (tokens) it sees over the whole calibration set.
    """

    name: str
    module: tuple
    shape: tuple[int, ...]
    d_in: int
    rows: int

    @property
    def d_out(self) -> int:
        return math.prod(self.shape) // self.d_in


def _dense_in_axes(mod: Any) -> int | None:
    """Number of leading kernel axes that are inputs, or None if ``mod`` is not supported."""
    if type(mod) is nnx.Linear:
        return 1
    if type(mod) is nnx.LinearGeneral:
        n_in = len(mod.in_features)
        axes = tuple(a if a < 0 else None for a in mod.axis)
        if len(mod.batch_axis) == 0 and axes == tuple(range(-n_in, 0)):
            return n_in
    return None


def _targets(model: nnx.Module, params: Any, where: Callable | None, fn: str) -> list[tuple]:
    """``(name, module path, kernel shape, d_in)`` of every selected Dense kernel."""
    dense = {}
    for path, mod in nnx.iter_graph(model):
        if isinstance(mod, nnx.Module):
            n_in = _dense_in_axes(mod)
            kernel = getattr(mod, "kernel", None)
            if n_in is not None and kernel is not None:
                dense[path_str(tuple(path) + ("kernel",))] = (tuple(path), n_in)
    select = prunable if where is None else where
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not select(path, leaf):
            continue
        name = path_str(path)
        if name not in dense:
            if where is None:
                continue  # prunable selects conv kernels too; only Dense layers are calibrated
            raise ValueError(
                f"{fn}: where selects {name!r} with shape {tuple(leaf.shape)}, which is not the "
                "kernel of an nnx.Linear or nnx.LinearGeneral (trailing input axes, no batch "
                "axes); layer-wise reconstruction supports Dense layers only"
            )
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"{fn}: kernel {name!r} has dtype {leaf.dtype}; expected floating")
        module, n_in = dense[name]
        out.append((name, module, tuple(leaf.shape), math.prod(leaf.shape[:n_in])))
    if not out:
        raise ValueError(
            f"{fn}: the model has no prunable Dense kernel (nnx.Linear / nnx.LinearGeneral "
            f"kernels selected by {'prunable' if where is None else 'where'})"
        )
    return out


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of a jitted statistic: hashable, so compiles are cached."""

    graphdef: Any
    forward: Forward
    modules: tuple
    names: tuple[str, ...]
    d_in: int
    kind: str  # "xtx" or "sumsq"


@functools.partial(jax.jit, static_argnums=0)
def _statistic(spec: _Spec, params, rest, batch):
    """``X^T X`` or ``sum_rows X^2`` (float32) of the first layer of ``spec`` over one batch."""
    rec = _run(spec.graphdef, params, rest, batch, spec.forward, spec.modules, spec.names)
    xs = [x.reshape(-1, spec.d_in).astype(jnp.float32) for x in rec.inputs[spec.names[0]]]
    if spec.kind == "xtx":
        return sum(jnp.matmul(x.T, x, precision=_HI) for x in xs)
    return sum(jnp.sum(jnp.square(x), axis=0) for x in xs)


# --------------------------------------------------------------------------------------
# Calibration data.
# --------------------------------------------------------------------------------------


def _leaves_of(batch: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(batch)


def _check_batch(batch: Any, i: int, fn: str) -> None:
    leaves = _leaves_of(batch)
    if not leaves:
        raise ValueError(f"{fn}: calib batch {i} holds no arrays")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        shape = getattr(leaf, "shape", None)
        if dtype is None or shape is None:
            raise TypeError(f"{fn}: calib batch {i} holds a {type(leaf).__name__}; expected arrays")
        kind = np.dtype(dtype).kind
        if kind not in "biuf" and dtype != jnp.bfloat16:
            raise TypeError(
                f"{fn}: calib batch {i} has dtype {dtype}; expected integer (token ids), bool or "
                "floating arrays"
            )
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(
                f"{fn}: calib batch {i} has shape {tuple(shape)}; expected a leading batch axis "
                "with at least one example"
            )
        if kind == "f" or dtype == jnp.bfloat16:
            if not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf)))):
                raise ValueError(f"{fn}: calib batch {i} has non-finite values")


def _signature(batch: Any) -> tuple:
    """Structure, trailing shapes and dtypes (the batch axis may vary between batches)."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((tuple(x.shape[1:]), np.dtype(x.dtype)) for x in leaves)


def _batches(calib: Any, batch_size: Any, mesh: Any, fn: str) -> list[Any]:
    """Validated calibration batches, placed on ``mesh`` (batch axis sharded) when given."""
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"{fn}: batch_size must be a positive int or None, got {batch_size!r}")
    if isinstance(calib, jax.Array | np.ndarray):
        if calib.ndim < 1 or calib.shape[0] < 1:
            raise ValueError(
                f"{fn}: calib must have a leading batch axis with at least one example, got "
                f"shape {tuple(calib.shape)}"
            )
        step = calib.shape[0] if batch_size is None else batch_size
        batches = [calib[i : i + step] for i in range(0, calib.shape[0], step)]
    elif isinstance(calib, Iterable) and not isinstance(calib, str | bytes | dict):
        if batch_size is not None:
            raise ValueError(f"{fn}: batch_size applies to an array calib, not to an iterable")
        batches = list(calib)
        if not batches:
            raise ValueError(f"{fn}: calib is empty")
    else:
        raise TypeError(
            f"{fn}: calib must be an array of inputs or an iterable of batches, got "
            f"{type(calib).__name__}"
        )
    for i, b in enumerate(batches):
        _check_batch(b, i, fn)
    sig = _signature(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if _signature(b) != sig:
            raise ValueError(
                f"{fn}: calib batch {i} does not match batch 0 (structure, per-example shape "
                f"and dtype must agree): {_signature(b)[1]} vs {sig[1]}"
            )
    if mesh is not None:
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
        axes = ("data",) if "data" in mesh.axis_names else tuple(mesh.axis_names)
        size = math.prod(mesh.shape[a] for a in axes)
        for i, b in enumerate(batches):
            rows = _leaves_of(b)[0].shape[0]
            if rows % size:
                raise ValueError(
                    f"{fn}: calib batch {i} has {rows} examples, not divisible by the {size} "
                    f"devices of mesh axes {axes}"
                )
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
        batches = [jax.device_put(b, sharding) for b in batches]
    else:
        batches = [jax.tree.map(jnp.asarray, b) for b in batches]
    return batches


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------
# Calibration session.
# --------------------------------------------------------------------------------------


class Calibration:
    """A model split for calibration, its batches, its layers and their groups.

    Built by :func:`prepare`; the pruners drive it group by group.

    Attributes:
      layers: every selected :class:`Layer`, in call order.
      groups: tuples of layer indices that receive the same input, in call order.
      params: the current params (``nnx.State``); :meth:`set_kernel` replaces kernels.
    """

    def __init__(self, model, calib, *, where, forward, batch_size, mesh, fn):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"{fn}: model must be a flax.nnx.Module, got {type(model).__name__}")
        if forward is not None and not callable(forward):
            raise TypeError(f"{fn}: forward must be a callable (model, batch) -> output")
        if where is not None and not callable(where):
            raise TypeError(f"{fn}: where must be a callable (path, leaf) -> bool or None")
        self.fn = fn
        self.forward = forward or _default_forward
        view = nnx.view(
            model, deterministic=True, use_running_average=True, raise_if_not_found=False
        )
        self.graphdef, self.params, self.rest = nnx.split(view, nnx.Param, ...)
        targets = _targets(view, self.params, where, fn)
        self.batches = _batches(calib, batch_size, mesh, fn)
        self._plan(targets)
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(self.params)
        self._paths = [p for p, _ in leaves]
        self._leaves = [x for _, x in leaves]
        self._index = {path_str(p): i for i, p in enumerate(self._paths)}
        self.masks: list[Any] = [None] * len(self._leaves)

    def _plan(self, targets: list[tuple]) -> None:
        modules = tuple(t[1] for t in targets)
        names = tuple(t[0] for t in targets)
        calls: dict[str, list] = {}

        def trace(params, rest, batch):
            rec = _run(self.graphdef, params, rest, batch, self.forward, modules, names)
            for name, xs in rec.inputs.items():
                calls[name] = [(id(x), tuple(x.shape)) for x in xs]
            calls["__order__"] = list(rec.order)

        by_name = {t[0]: t for t in targets}
        rows = {n: 0 for n in names}
        traced: dict[tuple, dict] = {}  # one abstract trace per distinct batch shape
        for batch in self.batches:
            key = tuple((tuple(x.shape), str(x.dtype)) for x in _leaves_of(batch))
            if key not in traced:
                calls.clear()
                try:
                    jax.eval_shape(trace, self.params, self.rest, batch)
                except Exception as err:  # the model rejected the data: say which data
                    raise ValueError(
                        f"{self.fn}: the model's forward pass failed on a calibration batch with "
                        f"(shape, dtype) {list(key)}: {type(err).__name__}: {err}"
                    ) from err
                traced[key] = dict(calls)
            seen = traced[key]
            for name in names:
                rows[name] += sum(math.prod(s) // by_name[name][3] for _, s in seen.get(name, []))
        first = next(iter(traced.values()))
        order = first["__order__"]
        missing = [n for n in names if n not in first]
        if missing:
            raise ValueError(
                f"{self.fn}: selected layers {missing} are never called by the forward pass; "
                "exclude them with where="
            )
        self.layers = []
        for name in order:
            _, module, shape, d_in = by_name[name]
            self.layers.append(Layer(name, module, shape, d_in, rows[name]))
        keys: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            keys.setdefault(tuple(x for x, _ in first[layer.name]), []).append(i)
        self.groups = [tuple(g) for g in keys.values()]  # insertion order = first call order

    def statistic(self, group: Sequence[int], kind: str) -> tuple[jax.Array, int]:
        """``(sum over the calibration set of X^T X or of X^2 per input, rows)`` of a group."""
        layers = [self.layers[i] for i in group]
        spec = _Spec(
            self.graphdef,
            self.forward,
            tuple(la.module for la in layers),
            tuple(la.name for la in layers),
            layers[0].d_in,
            kind,
        )
        params = self.current_params()
        total = None
        for batch in self.batches:
            s = _statistic(spec, params, self.rest, batch)
            total = s if total is None else total + s
        if total is None:
            raise ValueError(f"{self.fn}: the calibration data holds no batch")
        return total, layers[0].rows

    def kernel(self, layer: Layer) -> jax.Array:
        return self._leaves[self._index[layer.name]]

    def set_kernel(self, layer: Layer, kernel: jax.Array, mask: jax.Array) -> None:
        """Replace a kernel (and record its mask) with the old kernel's sharding."""
        i = self._index[layer.name]
        old = self._leaves[i]
        sharding = getattr(old, "sharding", None)
        kernel = kernel.reshape(old.shape).astype(old.dtype)
        mask = mask.reshape(old.shape)
        if sharding is not None:
            kernel, mask = jax.device_put(kernel, sharding), jax.device_put(mask, sharding)
        self._leaves[i], self.masks[i] = kernel, mask

    def current_params(self) -> Any:
        return self._treedef.unflatten(self._leaves)

    def result(self) -> tuple[Any, Any]:
        """``(params, masks)``: the params state and a mask tree mirroring it."""
        return self.current_params(), self._treedef.unflatten(self.masks)


class CalibrationOptions(TypedDict, total=False):
    """Keyword options of every sequentially calibrated function (:func:`hessians`,
    ``sparsegpt``, ``wanda``), documented in :func:`jaxcompress.prune.sparsegpt`; each
    defaults to None."""

    where: Callable | None
    forward: Forward | None
    batch_size: int | None
    mesh: Any


def prepare(model: nnx.Module, calib: Any, fn: str, options: Mapping[str, Any]) -> Calibration:
    """Validate everything and plan the calibration (one abstract trace, no computation)."""
    unknown = sorted(set(options) - set(CalibrationOptions.__annotations__))
    if unknown:
        raise TypeError(
            f"{fn}: unexpected keyword argument(s) {unknown}; the calibration options are "
            f"{list(CalibrationOptions.__annotations__)}"
        )
    return Calibration(
        model,
        calib,
        where=options.get("where"),
        forward=options.get("forward"),
        batch_size=options.get("batch_size"),
        mesh=options.get("mesh"),
        fn=fn,
    )


def local(x: jax.Array) -> jax.Array:
    """``x`` on one device (a sharded kernel or Hessian is gathered there for the solve)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or len(sharding.device_set) == 1:
        return x
    device = min(sharding.device_set, key=lambda d: d.id)
    return jax.device_put(x, device)


def hessians(
    model: nnx.Module, calib: Any, **options: Unpack[CalibrationOptions]
) -> dict[str, jax.Array]:
    """The dense model's layer Hessians ``H = 2 X^T X / n`` (float32), one per Dense layer.

    ``X`` (``n x d_in``) stacks the layer's inputs over every calibration token of the *dense*
    model (no pruning in between), e.g. for :func:`jaxcompress.spdy.obs_database`. Layers that
    share an input share one array. Arguments as :func:`jaxcompress.prune.sparsegpt`.

    Returns:
      ``{kernel name: H}`` in call order (names are :func:`jaxcompress.masks.path_str`).
    """
    cal = prepare(model, calib, "hessians", options)
    out = {}
    for group in cal.groups:
        xtx, rows = cal.statistic(group, "xtx")
        h = xtx * (2.0 / rows)
        for i in group:
            out[cal.layers[i].name] = h
    return {la.name: out[la.name] for la in cal.layers}
