r"""What every study shares: one task's context (data, epoch budget, training, evaluation,
result points), the penalised run, uniform-width baselines and the latency measurement.

The penalised run (:func:`compress`) is the method of Nasery, Shah, Suggala, Jain
(arXiv:2306.05785): non-negative gates on the model's prunable groups
(:func:`jaxcompress.latency.gated`), trained with

.. math::  L(\theta, \alpha) + \lambda R(\alpha),\qquad
           R(\alpha) = \mathrm{MACs}(r(\alpha)) / \mathrm{MACs}_{\text{dense}},\qquad
           r(\alpha) = (\|\alpha\|_1 / \|\alpha\|_2)^p

(``kind="l1"``: :math:`\sum_j \alpha_j`, network slimming), where the lambda controller
:math:`\lambda \leftarrow \lambda e^{k (F - F^*) / F^*}` steers :math:`F`, the exact MACs of
the units extraction would keep now, to the target :math:`F^*`. The optax chain is
``surrogate_penalty -> adam -> project_nonnegative(prune_below=tau)``; with ``config.hold``
the gates freeze at the target, before a step would overshoot it by more than 2%
(:func:`hold_above`). Then extraction (threshold ``tau``, then
:func:`jaxcompress.latency.within_budget` drops the units of least gate mass per MAC until the
model fits :math:`F^*`), and fine-tuning on the rest of the learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optax
from flax import nnx
from jax.tree_util import tree_map

import jaxcompress.latency as L
from experiments.surrogate.configs.base import LAM_MAX, Config, TaskSettings
from jaxcompress import data as jdata
from jaxcompress import structure as S
from jaxcompress import train as jtrain

__all__ = [
    "HOLD_MARGIN",
    "LATENCY_BATCH",
    "Study",
    "compress",
    "finish",
    "hold_above",
    "measure_latencies",
    "restrict",
    "rms_gates",
    "uniform",
]

#: Examples per timed forward pass, and interleaved timing rounds over a task's models.
LATENCY_BATCH, LATENCY_ROUNDS = 64, 3
EVAL_BATCH = 1000


@dataclasses.dataclass
class Study:
    """One task on one seed: data, the epoch budget, and every trained model (kept for the
    latency measurement at the end).

    Attributes:
      name, config, settings, seed: the task, the run's config, its resolved settings, the seed.
      train, test: datasets; ``example``: one-example model inputs (MACs per example);
        ``timed``: the inputs of a timed forward pass (``LATENCY_BATCH`` test examples).
      out: where the training logs go (``None``: nowhere); ``bar``: the run's progress bar.
      warmup_steps: linear learning-rate warm-up of every schedule.
    """

    name: str
    config: Config
    settings: TaskSettings
    seed: int
    train: Any
    test: Any
    out: str | None
    bar: Any
    warmup_steps: int = 0
    models: dict[str, nnx.Module] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def example(self) -> tuple:
        return (np.asarray(self.train.x[:1]),)

    @property
    def timed(self) -> tuple:
        return (np.asarray(self.test.x[:LATENCY_BATCH]),)

    @property
    def steps_per_epoch(self) -> int:
        return jdata.num_batches(self.train, self.config.batch_size)

    def schedule(self, offset: int = 0) -> optax.Schedule:
        """Cosine decay from the peak learning rate to 0 over the task's epoch budget (after
        ``warmup_steps`` of linear warm-up), from step ``offset`` on (fine-tuning continues
        the schedule of the run it came from)."""
        total = self.settings.epochs * self.steps_per_epoch
        peak = self.settings.learning_rate
        warmup = min(self.warmup_steps, total // 2)
        if warmup:
            base = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, 0.0)
        else:
            base = optax.cosine_decay_schedule(peak, total)
        return base if offset == 0 else (lambda step: base(step + offset))

    def fit(self, run: str, model: nnx.Module, tx, epochs: int, **kwargs) -> jtrain.History:
        """Train ``model`` in place (seed ``self.seed``), logging to
        ``<out>/metrics/<task>_<run>_seed<seed>.jsonl``."""
        self.bar.set_description(f"{self.name} seed {self.seed}: {run}")
        metrics = None
        if self.out is not None:
            metrics = os.path.join(self.out, "metrics", f"{self.name}_{run}_seed{self.seed}.jsonl")
            os.makedirs(os.path.dirname(metrics), exist_ok=True)
        start = time.perf_counter()
        history = jtrain.fit(
            model,
            tx,
            self.train,
            epochs=epochs,
            batch_size=self.config.batch_size,
            seed=self.seed,
            progress=False,
            metrics_path=metrics,
            eval_batch_size=EVAL_BATCH,
            **kwargs,
        )
        self.seconds[run] = self.seconds.get(run, 0.0) + time.perf_counter() - start
        return history

    def accuracy(self, model: nnx.Module) -> float:
        return float(jtrain.evaluate(model, self.test, batch_size=EVAL_BATCH)["accuracy"])

    def point(self, key: str, model: nnx.Module, **fields: Any) -> dict[str, Any]:
        """A result point: exact MACs per example (:func:`jaxcompress.structure.macs`) and test
        accuracy of ``model``, which is kept for :func:`measure_latencies`."""
        self.models[key] = model
        self.bar.update(1)
        flops = int(S.macs(model, *self.example).dense)
        return {"key": key, "flops": flops, "accuracy": self.accuracy(model), **fields}


def uniform(study: Study, build: Callable[[], nnx.Module]) -> list[dict[str, Any]]:
    """The uniform-width baselines: for each multiplier ``m``, a freshly built model with
    ``round(m * size)`` units of every prunable group (:func:`jaxcompress.latency.uniform_width`)
    trained from scratch for the whole budget; sorted by multiplier (the last is 1.0)."""
    points = []
    for m in sorted(study.settings.multipliers):
        model = build()
        if m != 1.0:
            model = L.uniform_width(model, m, *study.example)
        key = f"uniform_{m:g}"
        study.fit(key, model, optax.adam(study.schedule()), study.settings.epochs)
        points.append(study.point(key, model, method="uniform", multiplier=float(m)))
    return points


class _RmsGates(nnx.Module):
    """``gated`` with the gates of ``names`` divided by their rms in the forward pass.

    A group that no normalisation layer follows (the units the classifier head reads, the
    ranks of a factorised layer) otherwise turns the common scale of its gates into a free
    parameter: at the head a logit temperature, which training grows in lock-step, leaving the
    gates equal where the scale-invariant ratio has no push. Normalised, only their relative
    sizes matter, as for a group that a BatchNorm follows, and equal gates compute the
    ungated function whatever their value. :meth:`commit` stores the normalised values, so
    extraction folds what was trained.
    """

    def __init__(self, gated: S.Gated, names: Sequence[str]):
        self.gated = gated
        self.names = tuple(names)

    def _normalised(self) -> dict[str, Any]:
        import jax.numpy as jnp

        out = {}
        for name in self.names:
            g = self.gated.gates[name][...]
            out[name] = g / jnp.sqrt(jnp.mean(jnp.square(g)) + 1e-12)
        return out

    def __call__(self, *inputs, **kwargs):
        raw = {name: self.gated.gates[name][...] for name in self.names}
        for name, value in self._normalised().items():
            self.gated.gates[name][...] = value
        try:
            return self.gated(*inputs, **kwargs)
        finally:
            for name, value in raw.items():
                self.gated.gates[name][...] = value

    def commit(self) -> S.Gated:
        for name, value in self._normalised().items():
            self.gated.gates[name][...] = value
        return self.gated


def rms_gates(gated: S.Gated, names: Sequence[str]) -> nnx.Module:
    """``gated`` whose gates of ``names`` act divided by their rms (``gated`` itself when
    ``names`` is empty); ``.commit()`` on the result stores the normalised gates."""
    return _RmsGates(gated, names) if names else gated


def restrict(cost: S.MacCount, names) -> S.MacCount:
    """``cost`` as a polynomial in the groups ``names`` only, the others at full size (the
    same values; the penalty and its controller then see exactly the gated groups)."""
    names = set(names)
    terms: dict[tuple[str, ...], int] = {}
    for key, coef in cost.terms.items():
        for name in key:
            if name not in names:
                coef *= cost.sizes[name]
        kept = tuple(n for n in key if n in names)
        terms[kept] = terms.get(kept, 0) + coef
    return S.MacCount(terms, {n: s for n, s in cost.sizes.items() if n in names})


#: A step may take the kept units at most this fraction below the target (``hold_above``).
HOLD_MARGIN = 0.02


def hold_above(
    tx: optax.GradientTransformation, cost: S.MacCount, ratio: float, tau: float
) -> optax.GradientTransformation:
    """``tx`` with its gate updates dropped once the units extraction would keep (gate >=
    ``tau`` * group max and > 0) cost at most ``ratio`` of ``cost.dense``, and at every step
    that would take them below ``(1 - HOLD_MARGIN) * ratio``: the gates freeze at the target
    (or just above it, where one step would overshoot; extraction's ``within_budget`` trims
    that) and the weights train on.

    With Adam the penalty's push on a gate hardly depends on lambda while it dominates the
    loss gradient, and Adam's momentum carries it on, so the controller alone cannot stop the
    pruning at the target (experiments/surrogate/RESULTS.md, 2026-12-07).
    """
    import jax
    import jax.numpy as jnp

    def _is_var(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    def name(path) -> str:
        key = path[-1]
        return str(next((getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)), key))

    def kept(gates: dict[str, Any]) -> dict[str, Any]:
        return {
            n: jnp.maximum(jnp.sum((g >= tau * jnp.max(g)) & (g > 0)), 1) for n, g in gates.items()
        }

    def update(updates, state, params=None):
        new, new_state = tx.update(updates, state, params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)
        leaves = treedef.flatten_up_to(new)
        index = {name(path): i for i, (path, leaf) in enumerate(flat) if isinstance(leaf, S.Gate)}
        now = {n: flat[i][1][...] for n, i in index.items()}
        after = {
            n: now[n] + (leaves[i][...] if _is_var(leaves[i]) else leaves[i])
            for n, i in index.items()
        }
        on = (cost(kept(now)) > ratio * cost.dense) & (
            cost(kept(after)) >= (1.0 - HOLD_MARGIN) * ratio * cost.dense
        )
        for i in index.values():
            leaves[i] = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), leaves[i])
        return treedef.unflatten(leaves), new_state

    return optax.GradientTransformation(tx.init, update)


def _kept(gates: dict[str, np.ndarray], tau: float) -> dict[str, int]:
    """Units extraction would keep: gate >= tau * group max and > 0 (at least one)."""
    return {n: max(1, int(((g >= tau * g.max()) & (g > 0)).sum())) for n, g in gates.items()}


def _gate_values(gated: S.Gated) -> dict[str, np.ndarray]:
    return {n: np.asarray(g[...]) for n, g in gated.gates.items()}


def compress(
    study: Study,
    key: str,
    model: nnx.Module,
    *,
    target: float,
    reference_flops: int,
    kind: str,
    cost: S.MacCount,
    select: Callable[[str, S.Group], bool] | None = None,
    normalize: Sequence[str] = (),
    penalty_epochs: int,
    finetune_epochs: int,
) -> dict[str, Any]:
    """Penalised training of ``model`` towards ``target * reference_flops`` MACs, extraction
    within that budget, fine-tuning; the extracted model's point.

    Args:
      cost: :func:`jaxcompress.structure.macs` of ``model`` (per example).
      kind: ``"ratio"`` (the l1/l2 surrogate) or ``"l1"``.
      select: which groups get gates (default: every prunable group a weight reads).
      normalize: names of gated groups whose gates act divided by their rms (only for
        ``kind="ratio"`` with ``config.normalize``).
    """
    config, settings = study.config, study.settings
    budget = target * reference_flops
    gated = L.gated(model, *study.example, select=select, init=config.gate_init)
    cost = restrict(cost, gated.gates)
    names: Sequence[str] = ()
    if kind == "ratio" and config.normalize:
        names = [n for n in normalize if n in gated.gates]
    trained = rms_gates(gated, names)
    lam0 = settings.lam0 if kind == "ratio" else config.l1_lam0
    controller = L.lambda_controller(
        budget, cost, lam0=lam0, gain=settings.gain / study.steps_per_epoch, lam_max=LAM_MAX
    )
    penalty = L.surrogate_penalty(
        cost, controller, kind=kind, p=config.p, feedback="active", tau=config.tau
    )
    tx = optax.chain(
        penalty,
        optax.adam(study.schedule()),
        L.project_nonnegative(prune_below=config.tau),
    )
    if config.hold:
        tx = hold_above(tx, cost, budget / cost.dense, config.tau)
    active: list[float] = []

    def record(epoch: int, metrics: dict[str, float], _model: nnx.Module) -> None:
        active.append(float(cost(_kept(_gate_values(gated), config.tau))) / reference_flops)

    history = study.fit(f"{key}_penalty", trained, tx, penalty_epochs, callback=record)
    gated_accuracy = study.accuracy(trained)
    if names:
        trained.commit()
    gates = _gate_values(gated)
    diagnostics = L.gate_diagnostics(gates, tau=config.tau)
    extracted = L.extract(gated, *study.example, tau=config.tau, policy=[L.within_budget(budget)])
    small = extracted.model
    before = study.accuracy(small)
    if finetune_epochs:
        offset = penalty_epochs * study.steps_per_epoch
        study.fit(f"{key}_finetune", small, optax.adam(study.schedule(offset)), finetune_epochs)
    point = study.point(
        key,
        small,
        method="surrogate" if kind == "ratio" else "l1",
        target=float(target),
        kept={n: int(k) for n, k in extracted.kept.items()},
        sizes={n: int(g.size) for n, g in gated.gates.items()},
        normalized=list(names),
        gated_accuracy=gated_accuracy,
        accuracy_before_finetune=before,
        lambda_final=float(history.opt_state[0].controller.lam),
        active_flops_ratio_per_epoch=active,
        steered_flops_ratio=active[-1] if active else None,
        gate_stats=tree_map(np.ndarray.tolist, tree_map(np.asarray, diagnostics)),
    )
    if point["flops"] != int(extracted.macs):
        raise AssertionError(f"structure.macs {point['flops']} != extract's {extracted.macs}")
    point["landing_error"] = point["flops"] / budget - 1.0
    return point


def measure_latencies(study: Study, points: dict[str, dict[str, Any]]) -> None:
    """Adds ``latency_ms`` to every point: the median over ``LATENCY_ROUNDS``
    interleaved rounds (every model once per round, so load changes on a shared machine hit
    all alike) of :func:`jaxcompress.latency.measure_latency` medians on ``study.timed``."""
    study.bar.set_description(f"{study.name} seed {study.seed}: latency")
    samples: dict[str, list[float]] = {key: [] for key in points}
    for _ in range(LATENCY_ROUNDS):
        for key in points:
            samples[key].append(
                L.measure_latency(
                    study.models[key], *study.timed, repeats=study.config.latency_repeats, warmup=2
                )
            )
    for key, point in points.items():
        point["latency_ms"] = 1e3 * float(np.median(samples[key]))


def finish(
    study: Study, methods: dict[str, list[dict[str, Any]]], reference: dict[str, Any]
) -> dict[str, Any]:
    """Latency for every point, ratios to the reference, training time: the seed's record."""
    keyed = {reference["key"]: reference}
    keyed.update({p["key"]: p for points in methods.values() for p in points})
    measure_latencies(study, keyed)
    for p in keyed.values():
        p["flops_ratio"] = p["flops"] / reference["flops"]
        p["latency_ratio"] = p["latency_ms"] / reference["latency_ms"]
    return {"reference": dict(reference), **methods, "seconds": dict(study.seconds)}
