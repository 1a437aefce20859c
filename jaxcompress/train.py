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
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "History",
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


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x: jax.Array):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(x)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return logits, new_rest


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss_fn: LossFn = cross_entropy,
    pass_grad_fn: bool = False,
    donate: bool = True,
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

    Returns:
      ``step(params, rest, opt_state, x, y) -> (params, rest, opt_state, metrics)`` where
      ``metrics = {"loss": scalar, "accuracy": scalar}`` are those of the first pass.
    """
    _check_tx(tx)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logits, labels) -> scalar, got {loss_fn!r}")
    if not isinstance(pass_grad_fn, bool):
        raise TypeError(f"pass_grad_fn must be a bool, got {pass_grad_fn!r}")

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

            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
        return params, new_rest, opt_state, {"loss": loss, "accuracy": accuracy}

    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())


def _eval_sums(graphdef, params, rest, x, y, weight, loss_fn):
    logits, _ = _forward(graphdef, params, rest, x)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    if loss_fn is not None:
        per_example = jax.vmap(lambda z, t: loss_fn(z[None], t[None]))(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return jnp.sum(per_example * weight), jnp.sum(correct * weight)


_eval_sums_jit = jax.jit(_eval_sums, static_argnums=(0, 6))


def make_eval_step(graphdef: nnx.GraphDef, *, loss_fn: LossFn | None = None) -> Callable:
    """Build a jitted evaluation step for a model split by :func:`split_model` in eval mode.

    Returns ``step(params, rest, x, y, weight) -> (loss_sum, correct_sum)``, sums over the batch
    weighted by ``weight`` (1 for real examples, 0 for padding), so that a short last batch can be
    padded to the common batch size without recompiling. The loss is per-example cross-entropy,
    or ``loss_fn`` applied to each example.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {loss_fn!r}")

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


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# Evaluate and fit
# --------------------------------------------------------------------------------------------


def evaluate(model: nnx.Module, ds: Any, *, batch_size: int = 1000) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``ds`` in eval mode.

    The model's own mode flags are not changed (an eval view is used). Every example is counted
    once; the last batch is zero-padded and masked, so one executable serves all batches.

    Returns:
      ``{"accuracy": float, "loss": float}``.
    """
    _check_positive_int("batch_size", batch_size)
    x, y = _as_arrays(ds, "ds")
    graphdef, params, rest = split_model(eval_view(model))
    n = x.shape[0]
    bs = min(batch_size, n)
    loss_sum = jnp.zeros(())
    correct_sum = jnp.zeros(())
    for start in range(0, n, bs):
        xb, yb = x[start : start + bs], y[start : start + bs]
        k = xb.shape[0]
        weight = np.ones((bs,), np.float32)
        if k < bs:
            weight[k:] = 0.0
            xb = np.concatenate([xb, np.zeros((bs - k, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((bs - k,), yb.dtype)])
        ls, cs = _eval_sums_jit(graphdef, params, rest, xb, yb, weight, None)
        loss_sum, correct_sum = loss_sum + ls, correct_sum + cs
    return {"accuracy": float(correct_sum) / n, "loss": float(loss_sum) / n}


@dataclasses.dataclass
class History:
    """What :func:`fit` returns.

    Attributes:
      epochs: one record per epoch: ``epoch``, ``train_loss``, ``train_accuracy`` (means over the
        epoch's steps, first pass), ``seconds``, and ``eval_loss``/``eval_accuracy`` when an
        ``eval_ds`` was given.
      opt_state: the optimizer state after the last step (e.g. CrAM/AC-DC masks live here).
      steps: the number of optimizer steps taken.
    """

    epochs: list[dict[str, float]]
    opt_state: Any
    steps: int

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's record."""
        return self.epochs[-1]


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
) -> History:
    """Train ``model`` in place with ``tx`` for ``epochs`` passes over ``train_ds``.

    Each epoch shuffles the training set with ``numpy.random.default_rng((seed, epoch))`` and drops
    the last incomplete batch, so every step has the same shape and the step compiles once.
    After each epoch the trained state is written back into ``model`` (so ``callback`` and the
    caller see it), ``eval_ds`` is evaluated if given, and a record is appended to the history
    (and, with ``metrics_path``, written as one JSON line to that file, truncated at the start).

    Args:
      model: a Flax NNX model; trained in train mode (via :func:`train_view`), its mode flags are
        left as they were.
      tx: an optax transformation; ``opt_state`` defaults to ``tx.init(params)``.
      train_ds: ``jaxcompress.data.ArrayDataset`` (``.x``, ``.y``) or an ``(x, y)`` pair.
      epochs: number of epochs (positive).
      batch_size: training batch size, at most the training set size.
      eval_ds: optional dataset evaluated at the end of each epoch.
      seed: shuffling seed.
      progress: show a tqdm progress bar.
      metrics_path: optional JSON-lines file for the per-epoch records.
      pass_grad_fn: see :func:`make_train_step` (CrAM/SAM-style transforms).
      loss_fn: training loss ``(logits, labels) -> scalar``.
      opt_state: resume from this optimizer state.
      eval_batch_size: batch size for ``eval_ds``.
      callback: ``callback(epoch, record, model)`` after each epoch. It may read the model freely.

    Returns:
      A :class:`History` with the per-epoch records and the final optimizer state.
    """
    _check_tx(tx)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("eval_batch_size", eval_batch_size)
    x, y = _as_arrays(train_ds, "train_ds")
    if batch_size > x.shape[0]:
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({x.shape[0]} examples)"
        )
    if eval_ds is not None:
        _as_arrays(eval_ds, "eval_ds")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")

    from tqdm import tqdm

    graphdef, params, rest = split_model(train_view(model))
    # The step donates its inputs: work on copies so the model's own arrays stay valid.
    params, rest = _copy_tree(params), _copy_tree(rest)
    # tx.init may put the caller's arrays (e.g. masks) into the state: copy it too.
    opt_state = _copy_tree(tx.init(params) if opt_state is None else opt_state)
    step = make_train_step(graphdef, tx, loss_fn=loss_fn, pass_grad_fn=pass_grad_fn)

    steps_per_epoch = x.shape[0] // batch_size
    handle = None
    if metrics_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
        handle = open(metrics_path, "w")  # noqa: SIM115 - closed in the finally below
    records: list[dict[str, float]] = []
    total_steps = 0
    try:
        for epoch in range(epochs):
            start = time.perf_counter()
            order = np.random.default_rng((seed, epoch)).permutation(x.shape[0])
            metrics = []
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=not progress,
                leave=False,
            )
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                params, rest, opt_state, m = step(params, rest, opt_state, x[idx], y[idx])
                metrics.append(m)
                bar.update(1)
            total_steps += steps_per_epoch
            stacked = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *metrics)
            record = {
                "epoch": epoch + 1,
                "train_loss": float(stacked["loss"]),
                "train_accuracy": float(stacked["accuracy"]),
            }
            nnx.update(model, _copy_tree(params), _copy_tree(rest))
            if eval_ds is not None:
                ev = evaluate(model, eval_ds, batch_size=eval_batch_size)
                record["eval_loss"], record["eval_accuracy"] = ev["loss"], ev["accuracy"]
            record["seconds"] = time.perf_counter() - start
            bar.close()
            if progress:
                tqdm.write(
                    " ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items()
                    )
                )
            records.append(record)
            if handle is not None:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            if callback is not None:
                callback(epoch + 1, record, model)
    finally:
        if handle is not None:
            handle.close()
    return History(epochs=records, opt_state=opt_state, steps=total_steps)
