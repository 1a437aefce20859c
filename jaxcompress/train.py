"""A small jitted train/eval loop for Flax NNX classifiers, shared by experiments and notebooks.

The core is functional. A model is split once into

* ``graphdef``: the static structure (including mode flags such as BatchNorm's
  ``use_running_average``),
* ``params``: the ``nnx.Param`` state, the only thing the optimizer sees, and
* ``rest``: everything else (``nnx.BatchStat`` running statistics, RNG stream counters, ...),

and one pure step ``(params, rest, opt_state, x, y) -> (params, rest, opt_state, metrics)`` is
jitted over those pytrees. The step compiles once per input shape; later calls reuse the
executable. ``params``, ``rest`` and ``opt_state`` are donated, so XLA may update them in place.
:func:`fit` keeps the user's model safe from donation by giving the step copies and writing copies
back into the model after each epoch.

Two-pass optimizers (CrAM, SAM)
-------------------------------
``optax.GradientTransformationExtraArgs`` such as :func:`jaxcompress.optim.cram` need the gradient
at a second point. With ``pass_grad_fn=True`` the step calls::

    tx.update(grads, opt_state, params, grad_fn=grad_fn)

where ``grad_fn(p) = ∇_p L(f(x; p, rest), y)`` on the *same* batch, in train mode: BatchNorm
normalises with the statistics of the batch, exactly as in the first pass, but the running
statistics computed by that second pass are discarded. Only the first pass at ``params`` updates
``rest``. This is what the CrAM reference does by setting every BatchNorm momentum to 0 for the
second pass (``disable_running_stats``, after SAM; Peste et al., "CrAM: A Compression-Aware
Minimizer", ICLR 2023, arXiv:2207.14200).

Meshes (data parallel, FSDP, multi-host)
----------------------------------------
With ``mesh=`` the step builders and :func:`fit` place ``params``, ``rest`` and ``opt_state``
once with the rules of :mod:`jaxcompress.sharding` (replicated, FSDP or a ``PartitionSpec``
tree; masks and every transform's state follow their params, scalars are replicated), split the
batch over the data axes, and jit the step with explicit in/out shardings, so the step compiles
once per input shape and XLA inserts the gradient all-reduces. In a multi-process run every
process calls :func:`fit` with the same arguments; each reads only its rows of every global
batch, and only process 0 prints and writes the metrics file.

Resuming
--------
With ``checkpoint_dir=`` :func:`fit` saves params, ``rest``, the optimizer state (masks, PRNG
keys), the step and the per-epoch records through :class:`jaxcompress.checkpoint.Checkpointer`,
and a rerun with the same directory resumes from the latest complete checkpoint. The data
order is a pure function of ``(seed, epoch)``, so the step count is the data position and a
resumed run equals an uninterrupted one bit for bit on one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxcompress import _sharding as jc_sharding
from jaxcompress._checks import check_int
from jaxcompress.checkpoint import Checkpointer

__all__ = [
    "History",
    "ShardedStep",
    "cross_entropy",
    "evaluate",
    "fit",
    "make_eval_step",
    "make_train_step",
    "split_model",
    "train_view",
    "eval_view",
]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Mean softmax cross-entropy with integer labels.

    :math:`L = -\frac{1}{B}\sum_b \log \operatorname{softmax}(z_b)_{y_b}`.
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------------------------------------
# Model views and splitting
# --------------------------------------------------------------------------------------------


def train_view(model: nnx.Module) -> nnx.Module:
    """A view of ``model`` in train mode (BatchNorm batch statistics, Dropout active).

    The model itself is not modified; the view holds the same arrays.
    """
    return nnx.view(model, deterministic=False, use_running_average=False, raise_if_not_found=False)


def eval_view(model: nnx.Module) -> nnx.Module:
    """A view of ``model`` in eval mode (BatchNorm running statistics, Dropout off)."""
    return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Split ``model`` into ``(graphdef, params, rest)``.

    ``params`` holds the ``nnx.Param`` variables, ``rest`` every other variable
    (``nnx.BatchStat``, RNG state, ...). ``nnx.merge(graphdef, params, rest)`` rebuilds the model.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _copy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _check_tx(tx: Any) -> None:
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(
            f"tx must be an optax.GradientTransformation (with init and update), got {tx!r}"
        )


def _host(a: Any) -> np.ndarray:
    """A replicated (or single-device) array's value on the host, in any process."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(a.addressable_data(0))
    return np.asarray(a)


def _resolve_mesh(
    mesh: Mesh | str | Mapping[str, int] | None,
    param_sharding: Any = "replicated",
    data_axes: Any = None,
) -> Mesh | None:
    """The mesh from its spelling; sharding arguments without a mesh are an error."""
    if mesh is None:
        if not (isinstance(param_sharding, str) and param_sharding == "replicated"):
            raise ValueError(
                f"param_sharding={param_sharding!r} needs a mesh (mesh='data=8', ...); without "
                "one everything runs on one device"
            )
        if data_axes is not None:
            raise ValueError(f"data_axes={data_axes!r} needs a mesh (mesh='data=8', ...)")
        return None
    return jc_sharding.make_mesh(mesh)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x: jax.Array):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(x)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return logits, new_rest


def _signature(*trees: Any) -> tuple:
    """Hashable structure, shapes and dtypes of ``trees``: one executable per signature."""
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple(
        (tuple(np.shape(a)), str(getattr(a, "dtype", type(a))), bool(getattr(a, "weak_type", 0)))
        for a in leaves
    )


def _strong(tree: Any) -> Any:
    """Drops weak types (``jnp.asarray(0.0)``), whose output would be strong and recompile."""
    return jax.tree.map(
        lambda a: jnp.asarray(a, dtype=a.dtype) if getattr(a, "weak_type", False) else a, tree
    )


class _OnMesh:
    """A mesh with the sharding rule of a step: the shardings of its arguments."""

    def __init__(self, mesh: Mesh, param_sharding: Any, data_axes: Any, min_size: int):
        self.mesh = mesh
        self._param_sharding = param_sharding
        self._data_axes = jc_sharding.data_axes_of(mesh, data_axes)
        self._min_size = min_size

    def _shardings(self, params: Any, rest: Any, opt_state: Any) -> jc_sharding.StepShardings:
        return jc_sharding.step_shardings(
            self.mesh,
            params,
            rest,
            opt_state,
            param_sharding=self._param_sharding,
            data_axes=self._data_axes,
            min_size=self._min_size,
        )


class ShardedStep(_OnMesh):
    """A training step jitted on a mesh with explicit in/out shardings.

    Made by :func:`make_train_step` with ``mesh=``. Call it like the plain step,
    ``step(params, rest, opt_state, x, y) -> (params, rest, opt_state, metrics)``; the arguments
    must already be placed (:meth:`place`) and ``x``, ``y`` are numpy arrays (one process) or
    global arrays on the batch sharding (``step.shardings(...).batch``). Outputs keep the input
    shardings; metrics are replicated. One executable is compiled per signature of its
    arguments (structure, shapes, dtypes); a new batch size compiles a new one.
    """

    def __init__(
        self,
        fn: Callable,
        mesh: Mesh,
        *,
        param_sharding: Any,
        data_axes: Sequence[str] | None,
        donate: bool,
        min_size: int,
    ):
        super().__init__(mesh, param_sharding, data_axes, min_size)
        self._fn = fn
        self._donate = donate
        self._jitted: dict[tuple, tuple[Any, jc_sharding.StepShardings]] = {}

    def shardings(self, params: Any, rest: Any, opt_state: Any) -> jc_sharding.StepShardings:
        """The shardings of the step's arguments (arrays or ``jax.ShapeDtypeStruct`` trees).

        Raises:
          ValueError: a ``PartitionSpec`` that does not fit the mesh or a leaf.
        """
        return self._shardings(params, rest, opt_state)

    def place(self, params: Any, rest: Any, opt_state: Any) -> tuple[Any, Any, Any]:
        """Copies of ``(params, rest, opt_state)`` on their shardings (never aliasing the input,
        which a donating step would invalidate), weak types made strong."""
        sh = self.shardings(params, rest, opt_state)
        put = [
            jax.device_put(_strong(t), s, may_alias=False)
            for t, s in ((params, sh.params), (rest, sh.rest), (opt_state, sh.opt_state))
        ]
        return put[0], put[1], put[2]

    def _get(self, params: Any, rest: Any, opt_state: Any) -> tuple[Any, Any]:
        key = _signature(params, rest, opt_state)
        hit = self._jitted.get(key)
        if hit is None:
            sh = self.shardings(params, rest, opt_state)
            metrics = {"loss": sh.replicated, "accuracy": sh.replicated}
            jitted = jax.jit(
                self._fn,
                in_shardings=(sh.params, sh.rest, sh.opt_state, sh.batch, sh.batch),
                out_shardings=(sh.params, sh.rest, sh.opt_state, metrics),
                donate_argnums=(0, 1, 2) if self._donate else (),
            )
            hit = self._jitted[key] = (jitted, sh)
        return hit

    def _check_batch(self, sh: jc_sharding.StepShardings, x: Any, y: Any) -> None:
        n = sh.data_size()
        for name, a in (("x", x), ("y", y)):
            b = np.shape(a)[0] if np.ndim(a) else None
            if b is None or b % n:
                raise ValueError(
                    f"{name} has batch size {b}, not divisible by the {n} slices of the data "
                    f"axes {sh.data_axes} of mesh {dict(self.mesh.shape)}"
                )

    def __call__(self, params: Any, rest: Any, opt_state: Any, x: Any, y: Any):
        jitted, sh = self._get(params, rest, opt_state)
        self._check_batch(sh, x, y)
        return jitted(params, rest, opt_state, x, y)

    def lower(self, params: Any, rest: Any, opt_state: Any, x: Any, y: Any) -> Any:
        """``jax.stages.Lowered`` of the step for these arguments (e.g. to read the HLO)."""
        jitted, sh = self._get(params, rest, opt_state)
        self._check_batch(sh, x, y)
        return jitted.lower(params, rest, opt_state, x, y)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss_fn: LossFn = cross_entropy,
    pass_grad_fn: bool = False,
    donate: bool = True,
    mesh: Mesh | str | Mapping[str, int] | None = None,
    param_sharding: str | Any = "replicated",
    data_axes: str | Sequence[str] | None = None,
    fsdp_min_size: int = jc_sharding.FSDP_MIN_SIZE,
) -> Callable[..., tuple[nnx.State, nnx.State, Any, dict[str, jax.Array]]]:
    r"""Build a jitted training step for a model split by :func:`split_model`.

    ``graphdef`` must come from the model in train mode (see :func:`train_view`). The step is

    .. math::  g = \nabla_\theta L(f(x;\theta, r), y),\quad
               (u, s') = \mathrm{tx.update}(g, s, \theta),\quad \theta' = \theta + u,

    and the new ``rest`` ``r'`` (BatchNorm running statistics, RNG counters) comes from the
    forward pass at ``θ``.

    Args:
      graphdef: static model structure (train mode).
      tx: an optax transformation.
      loss_fn: ``loss_fn(logits, labels) -> scalar``; defaults to :func:`cross_entropy`.
      pass_grad_fn: call ``tx.update(..., grad_fn=grad_fn)`` with ``grad_fn(p)`` the gradient of
        the loss on the same batch at params ``p``, in train mode, whose BatchNorm running
        statistics are discarded (see the module docstring). Needed for CrAM/SAM-style transforms.
      donate: donate ``params``, ``rest`` and ``opt_state`` to the step: their buffers (and any
        array they share with the caller, such as masks placed in the optimizer state by
        ``tx.init``) are invalid after the call. :func:`fit` passes copies.
      mesh: ``None`` (one device, plain ``jax.jit``), a ``jax.sharding.Mesh`` with Auto axes,
        or a mesh string such as ``"data=4,fsdp=2"`` (:func:`jaxcompress.sharding.make_mesh`).
      param_sharding: with a mesh: ``"replicated"`` (data parallel), ``"fsdp"``, or a
        ``PartitionSpec`` tree over the params (:func:`jaxcompress.sharding.param_specs`).
      data_axes: mesh axes the batch is split over (default: all).
      fsdp_min_size: leaves with fewer elements stay replicated under ``"fsdp"``.

    Returns:
      ``step(params, rest, opt_state, x, y) -> (params, rest, opt_state, metrics)`` where
      ``metrics = {"loss": scalar, "accuracy": scalar}`` are those of the first pass. With a mesh
      this is a :class:`ShardedStep` (place the state with ``step.place`` first).
    """
    _check_tx(tx)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logits, labels) -> scalar, got {loss_fn!r}")
    if not isinstance(pass_grad_fn, bool):
        raise TypeError(f"pass_grad_fn must be a bool, got {pass_grad_fn!r}")
    mesh = _resolve_mesh(mesh, param_sharding, data_axes)
    if mesh is not None:
        jc_sharding.data_axes_of(mesh, data_axes)
        check_int("fsdp_min_size", fsdp_min_size)

    def objective(params, rest, x, y):
        logits, new_rest = _forward(graphdef, params, rest, x)
        return loss_fn(logits, y), (logits, new_rest)

    grad_objective = jax.value_and_grad(objective, has_aux=True)

    def step(params, rest, opt_state, x, y):
        (loss, (logits, new_rest)), grads = grad_objective(params, rest, x, y)
        if pass_grad_fn:

            def grad_fn(p):
                # Same batch, train mode; the running statistics of this pass are dropped.
                return jax.grad(lambda q: objective(q, rest, x, y)[0])(p)

            extra_args: dict[str, Any] = {"grad_fn": grad_fn}  # GradientTransformationExtraArgs
            updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
        return params, new_rest, opt_state, {"loss": loss, "accuracy": accuracy}

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())
    return ShardedStep(
        step,
        mesh,
        param_sharding=param_sharding,
        data_axes=data_axes,
        donate=donate,
        min_size=fsdp_min_size,
    )


def _eval_sums(graphdef, params, rest, x, y, weight, loss_fn):
    logits, _ = _forward(graphdef, params, rest, x)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    if loss_fn is not None:
        per_example = jax.vmap(lambda z, t: loss_fn(z[None], t[None]))(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return jnp.sum(per_example * weight), jnp.sum(correct * weight)


_eval_sums_jit = jax.jit(_eval_sums, static_argnums=(0, 6))


class _ShardedEval(_OnMesh):
    """``step(params, rest, x, y, weight)`` on a mesh: params and ``rest`` go to their
    shardings and the batch to the data axes (no-ops when they are already there), then the
    shared jitted sums run; jit caches on the input shardings, so repeated evaluations of one
    model reuse one executable."""

    def __init__(self, graphdef, loss_fn, mesh, param_sharding, data_axes, min_size):
        super().__init__(mesh, param_sharding, data_axes, min_size)
        self._graphdef, self._loss_fn = graphdef, loss_fn

    def shardings(self, params: Any, rest: Any) -> jc_sharding.StepShardings:
        return self._shardings(params, rest, None)

    def __call__(self, params, rest, x, y, weight):
        sh = self.shardings(params, rest)
        params = jax.device_put(params, sh.params)
        rest = jax.device_put(rest, sh.rest)
        x, y, weight = (jax.device_put(a, sh.batch) for a in (x, y, weight))
        return _eval_sums_jit(self._graphdef, params, rest, x, y, weight, self._loss_fn)


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    loss_fn: LossFn | None = None,
    mesh: Mesh | str | Mapping[str, int] | None = None,
    param_sharding: str | Any = "replicated",
    data_axes: str | Sequence[str] | None = None,
    fsdp_min_size: int = jc_sharding.FSDP_MIN_SIZE,
) -> Callable:
    """Build a jitted evaluation step for a model split by :func:`split_model` in eval mode.

    Returns ``step(params, rest, x, y, weight) -> (loss_sum, correct_sum)``, sums over the batch
    weighted by ``weight`` (1 for real examples, 0 for padding), so that a short last batch can be
    padded to the common batch size without recompiling. The loss is per-example cross-entropy,
    or ``loss_fn`` applied to each example.

    With ``mesh`` (see :func:`make_train_step` for ``param_sharding``/``data_axes``) params and
    ``rest`` are put on their shardings, ``x``, ``y``, ``weight`` are split over the data axes
    (batch sizes must be multiples of their size) and the sums come back replicated.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {loss_fn!r}")
    mesh = _resolve_mesh(mesh, param_sharding, data_axes)
    if mesh is not None:
        check_int("fsdp_min_size", fsdp_min_size)
        return _ShardedEval(graphdef, loss_fn, mesh, param_sharding, data_axes, fsdp_min_size)

    def step(params, rest, x, y, weight):
        return _eval_sums_jit(graphdef, params, rest, x, y, weight, loss_fn)

    return step


# --------------------------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------------------------


def _as_arrays(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of an ``ArrayDataset``-like (``.x``, ``.y``) or an ``(x, y)`` pair."""
    if hasattr(ds, "x") and hasattr(ds, "y"):
        x, y = ds.x, ds.y
    elif isinstance(ds, tuple | list) and len(ds) == 2:
        x, y = ds
    else:
        raise TypeError(
            f"{name} must be a dataset with .x and .y arrays (jaxcompress.data.ArrayDataset) or an "
            f"(x, y) pair, got {type(ds).__name__}"
        )
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: expected x of shape (N, ...) and y of shape (N,), "
            f"got x {x.shape}, y {y.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x, y


class _Batcher:
    """Rows of global batches for this process, as the step's inputs."""

    def __init__(self, sharding: Any, batch_size: int):
        self._sharding, self._batch_size = sharding, batch_size
        self.rows = (0, batch_size)
        if sharding is not None:
            self.rows = jc_sharding.process_rows(sharding, batch_size)

    def __call__(self, *arrays: np.ndarray) -> tuple[Any, ...]:
        """Each argument holds this process's rows (or the whole batch without a mesh)."""
        if self._sharding is None:
            return arrays
        return tuple(jc_sharding.global_array(self._sharding, a, self._batch_size) for a in arrays)


# --------------------------------------------------------------------------------------------
# Evaluate and fit
# --------------------------------------------------------------------------------------------


def evaluate(
    model: nnx.Module,
    ds: Any,
    *,
    batch_size: int = 1000,
    mesh: Mesh | str | Mapping[str, int] | None = None,
    param_sharding: str | Any = "replicated",
    data_axes: str | Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``ds`` in eval mode.

    The model's own mode flags are not changed (an eval view is used). Every example is counted
    once; the last batch is zero-padded and masked, so one executable serves all batches. With
    ``mesh`` the batches are split over the data axes (``batch_size`` is rounded up to a
    multiple of their size) and each process reads only its rows of every batch.

    Returns:
      ``{"accuracy": float, "loss": float}``.
    """
    check_int("batch_size", batch_size)
    x, y = _as_arrays(ds, "ds")
    mesh = _resolve_mesh(mesh, param_sharding, data_axes)
    graphdef, params, rest = split_model(eval_view(model))
    n = x.shape[0]
    bs = min(batch_size, n)
    if mesh is None:
        step, batcher = make_eval_step(graphdef), _Batcher(None, bs)
    else:
        step = _ShardedEval(
            graphdef, None, mesh, param_sharding, data_axes, jc_sharding.FSDP_MIN_SIZE
        )
        sh = step.shardings(params, rest)
        bs = -(-bs // sh.data_size()) * sh.data_size()
        batcher = _Batcher(sh.batch, bs)
    lo, hi = batcher.rows
    loss_sum = correct_sum = None
    for start in range(0, n, bs):
        xb, yb = x[start : start + bs], y[start : start + bs]
        k = xb.shape[0]
        weight = np.ones((bs,), np.float32)
        if k < bs:
            weight[k:] = 0.0
            xb = np.concatenate([xb, np.zeros((bs - k, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((bs - k,), yb.dtype)])
        ls, cs = step(params, rest, *batcher(xb[lo:hi], yb[lo:hi], weight[lo:hi]))
        loss_sum = ls if loss_sum is None else loss_sum + ls
        correct_sum = cs if correct_sum is None else correct_sum + cs
    return {"accuracy": float(_host(correct_sum)) / n, "loss": float(_host(loss_sum)) / n}


@dataclasses.dataclass
class History:
    """What :func:`fit` returns.

    Attributes:
      epochs: one record per epoch: ``epoch``, ``train_loss``, ``train_accuracy`` (means over the
        epoch's steps, first pass), ``seconds``, and ``eval_loss``/``eval_accuracy`` when an
        ``eval_ds`` was given. A resumed run includes the records of the epochs it restored.
      opt_state: the optimizer state after the last step (e.g. CrAM/AC-DC masks live here).
      steps: the number of optimizer steps of the run (restored steps included).
      resumed_from: the checkpoint step the run resumed from, or ``None``.
    """

    epochs: list[dict[str, float]]
    opt_state: Any
    steps: int
    resumed_from: int | None = None

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's record."""
        return self.epochs[-1]


def _check_config(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a JSON-serialisable mapping, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(dict(config), allow_nan=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"config is not JSON-serialisable: {err}") from err


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix or "<config>": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, name) if isinstance(v, Mapping) and v else {name: v})
    return out


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    missing = object()
    return [
        f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        tree,
    )


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    train_ds: Any,
    *,
    epochs: int,
    batch_size: int,
    eval_ds: Any = None,
    seed: int = 0,
    progress: bool = True,
    metrics_path: str | os.PathLike | None = None,
    pass_grad_fn: bool = False,
    loss_fn: LossFn = cross_entropy,
    opt_state: Any = None,
    eval_batch_size: int = 1000,
    callback: Callable[[int, dict[str, float], nnx.Module], None] | None = None,
    mesh: Mesh | str | Mapping[str, int] | None = None,
    param_sharding: str | Any = "replicated",
    data_axes: str | Sequence[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> History:
    """Train ``model`` in place with ``tx`` for ``epochs`` passes over ``train_ds``.

    Each epoch shuffles the training set with ``numpy.random.default_rng((seed, epoch))`` and drops
    the last incomplete batch, so every step has the same shape and the step compiles once.
    After each epoch the trained state is written back into ``model`` (so ``callback`` and the
    caller see it), ``eval_ds`` is evaluated if given, and a record is appended to the history
    (and, with ``metrics_path``, written as one JSON line to that file, truncated at the start,
    rewritten with the restored records on a resume).

    Args:
      model: a Flax NNX model; trained in train mode (via :func:`train_view`), its mode flags are
        left as they were.
      tx: an optax transformation; ``opt_state`` defaults to ``tx.init(params)``.
      train_ds: ``jaxcompress.data.ArrayDataset`` (``.x``, ``.y``) or an ``(x, y)`` pair.
      epochs: number of epochs (positive).
      batch_size: training batch size (the global batch), at most the training set size.
      eval_ds: optional dataset evaluated at the end of each epoch.
      seed: shuffling seed.
      progress: show a tqdm progress bar (process 0 only).
      metrics_path: optional JSON-lines file for the per-epoch records (process 0 only).
      pass_grad_fn: see :func:`make_train_step` (CrAM/SAM-style transforms).
      loss_fn: training loss ``(logits, labels) -> scalar``.
      opt_state: start from this optimizer state (ignored when resuming from a checkpoint).
      eval_batch_size: batch size for ``eval_ds``.
      callback: ``callback(epoch, record, model)`` after each epoch, before the record is
        printed, logged and checkpointed. It may read the model freely and add JSON-serialisable
        entries to ``record`` (e.g. a sparsity or a probe accuracy): they are saved with the
        checkpoint and come back in the history of a resumed run, so a caller's per-epoch
        curves survive a restart. On a resume it is not called again for restored epochs.
      mesh: ``None`` (one device), a ``jax.sharding.Mesh`` with Auto axes or a string such as
        ``"data=8"`` / ``"data=4,fsdp=2"``. ``batch_size`` must be a multiple of the data axes'
        size.
      param_sharding: ``"replicated"``, ``"fsdp"`` or a ``PartitionSpec`` tree over the params
        (see :mod:`jaxcompress.sharding`); the optimizer state follows the params.
      data_axes: mesh axes the batch is split over (default: every axis).
      checkpoint_dir: save training state there and resume from its latest complete
        checkpoint when it holds one (see the module docstring).
      checkpoint_every: save every this many steps (default: at the end of every epoch); the
        last step is always saved.
      config: a JSON-serialisable description of the run, saved with every checkpoint; a
        resume whose ``config`` differs is refused. ``batch_size``, ``seed`` and the training
        set size are always compared.

    Returns:
      A :class:`History` with the per-epoch records and the final optimizer state.

    Raises:
      ValueError: bad arguments, a mesh or sharding that does not fit (batch size, a sharded
        dimension, an axis name, the device count), or a checkpoint of another run (naming the
        differing fields or leaves), all before any training step.
    """
    _check_tx(tx)
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    check_int("eval_batch_size", eval_batch_size)
    x, y = _as_arrays(train_ds, "train_ds")
    if batch_size > x.shape[0]:
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({x.shape[0]} examples)"
        )
    if eval_ds is not None:
        _as_arrays(eval_ds, "eval_ds")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every is set but checkpoint_dir is None")
    config = _check_config(config)
    mesh = _resolve_mesh(mesh, param_sharding, data_axes)
    primary = jax.process_index() == 0

    # The directory is checked (a file, unwritable) before any work.
    ckpt = None if checkpoint_dir is None else Checkpointer(checkpoint_dir)
    try:
        graphdef, params, rest = split_model(train_view(model))
        step = make_train_step(
            graphdef,
            tx,
            loss_fn=loss_fn,
            pass_grad_fn=pass_grad_fn,
            mesh=mesh,
            param_sharding=param_sharding,
            data_axes=data_axes,
        )
        if isinstance(step, ShardedStep):
            abstract_state = jax.eval_shape(tx.init, params) if opt_state is None else opt_state
            shardings = step.shardings(params, rest, abstract_state)  # checks specs before any work
            if batch_size % shardings.data_size():
                raise ValueError(
                    f"batch_size={batch_size} is not divisible by the {shardings.data_size()} "
                    f"slices of the data axes {shardings.data_axes} of mesh "
                    f"{dict(step.mesh.shape)}"
                )
            batcher = _Batcher(shardings.batch, batch_size)
            params, rest = (
                jax.device_put(_strong(t), s, may_alias=False)
                for t, s in ((params, shardings.params), (rest, shardings.rest))
            )
            # tx.init runs on the placed params; its output (which may hold the caller's arrays,
            # e.g. masks) is copied onto the state's shardings.
            opt_state = tx.init(params) if opt_state is None else opt_state
            opt_state = jax.device_put(_strong(opt_state), shardings.opt_state, may_alias=False)
        else:
            batcher = _Batcher(None, batch_size)
            # The step donates its inputs: work on copies so the model's own arrays stay valid.
            params, rest = _copy_tree(params), _copy_tree(rest)
            # tx.init may put the caller's arrays (e.g. masks) into the state: copy it too.
            # Weak types (jnp.asarray(0.0) in a state) would come back strong and recompile.
            opt_state = _strong(_copy_tree(tx.init(params) if opt_state is None else opt_state))

        steps_per_epoch = x.shape[0] // batch_size
        total = epochs * steps_per_epoch
        every = steps_per_epoch if checkpoint_every is None else checkpoint_every
        run_meta = {"batch_size": batch_size, "seed": seed, "train_examples": int(x.shape[0])}
        records: list[dict[str, float]] = []
        epoch_metrics: list[list[float]] = []
        start_step = 0
        resumed_from = None
        if ckpt is not None and ckpt.latest_step() is not None:
            latest = ckpt.latest_step()
            extra = ckpt.extra(latest) or {}
            saved_run = extra.get("fit")
            if not isinstance(saved_run, Mapping):
                raise ValueError(
                    f"fit(): checkpoint step {latest} in {ckpt.directory!r} was not written by "
                    "jaxcompress.train.fit; use another checkpoint_dir"
                )
            diffs = _differences(saved_run, run_meta)
            diffs += _differences(extra.get("config") or {}, config or {})
            if diffs:
                raise ValueError(
                    f"fit(): refusing to resume from {ckpt.directory!r} (step {latest}): the run "
                    f"differs from the saved one in {'; '.join(diffs)}. Use a new checkpoint_dir "
                    "or the saved settings."
                )
            if latest > total:
                raise ValueError(
                    f"fit(): checkpoint step {latest} in {ckpt.directory!r} is beyond this run's "
                    f"{total} steps ({epochs} epochs of {steps_per_epoch})"
                )
            target = {
                "params": _abstract(params),
                "model_state": _abstract(rest),
                "opt_state": _abstract(opt_state),
            }
            restored = ckpt.restore(latest, target=target)
            params = restored["params"]
            rest = restored["model_state"]
            opt_state = restored["opt_state"]
            records = [dict(r) for r in extra["records"]]
            epoch_metrics = [list(m) for m in extra["epoch_metrics"]]
            start_step = resumed_from = latest
            nnx.update(model, _copy_tree(params), _copy_tree(rest))

        if primary and metrics_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            with open(metrics_path, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in records)

        def save(t: int) -> None:
            assert ckpt is not None
            ckpt.save(
                t,
                params=params,
                model_state=rest,
                opt_state=opt_state,
                extra={
                    "fit": run_meta,
                    "config": config,
                    "records": records,
                    "epoch_metrics": epoch_metrics,
                    "step": t,
                    "epoch": t // steps_per_epoch,
                    "epoch_step": t % steps_per_epoch,
                },
            )

        lo, hi = batcher.rows
        for epoch in range(start_step // steps_per_epoch, epochs):
            start = time.perf_counter()
            order = np.random.default_rng((seed, epoch)).permutation(x.shape[0])
            first = max(start_step - epoch * steps_per_epoch, 0)
            pending: list[Any] = []
            bar = tqdm(
                total=steps_per_epoch,
                initial=first,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=not (progress and primary),
                leave=False,
            )
            for i in range(first, steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                params, rest, opt_state, m = step(
                    params, rest, opt_state, *batcher(x[idx[lo:hi]], y[idx[lo:hi]])
                )
                pending.append(m)
                bar.update(1)
                t = epoch * steps_per_epoch + i + 1
                if ckpt is not None and i + 1 < steps_per_epoch and t % every == 0:
                    epoch_metrics += _to_floats(pending)
                    pending = []
                    save(t)
            epoch_metrics += _to_floats(pending)
            losses = np.asarray([m[0] for m in epoch_metrics], np.float64)
            accuracies = np.asarray([m[1] for m in epoch_metrics], np.float64)
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "train_accuracy": float(np.mean(accuracies)),
            }
            epoch_metrics = []
            nnx.update(model, _copy_tree(params), _copy_tree(rest))
            if eval_ds is not None:
                ev = evaluate(
                    model,
                    eval_ds,
                    batch_size=eval_batch_size,
                    mesh=mesh,
                    param_sharding=param_sharding,
                    data_axes=data_axes,
                )
                record["eval_loss"], record["eval_accuracy"] = ev["loss"], ev["accuracy"]
            record["seconds"] = time.perf_counter() - start
            bar.close()
            if callback is not None:
                # before the record is logged and checkpointed: entries it adds are restored
                callback(epoch + 1, record, model)
            if progress and primary:
                tqdm.write(
                    " ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items()
                    )
                )
            records.append(record)
            if primary and metrics_path is not None:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            t = (epoch + 1) * steps_per_epoch
            if ckpt is not None and (t % every == 0 or t == total) and t > start_step:
                save(t)
    finally:
        if ckpt is not None:
            ckpt.close()
    return History(epochs=records, opt_state=opt_state, steps=total, resumed_from=resumed_from)


def _to_floats(metrics: list[dict[str, jax.Array]]) -> list[list[float]]:
    """Per-step ``[loss, accuracy]`` on the host (one transfer for all of them)."""
    if not metrics:
        return []
    host = [(_host(m["loss"]), _host(m["accuracy"])) for m in metrics]
    return [[float(a), float(b)] for a, b in host]
