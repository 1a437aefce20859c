r"""The l1/l2 latency surrogate against l1 gates, uniform widths and truncated SVD.

Claims tested (Nasery, Shah, Suggala, Jain, "End-to-End Neural Network Compression via
:math:`\ell_1/\ell_2` Regularized Latency Surrogates", CVPRW 2024, arXiv:2306.05785;
algorithms.md section 4): training with the scale-invariant FLOPs surrogate

.. math::  \min_{\theta,\ \alpha \ge 0}\ L(\theta, \alpha) + \lambda R(\alpha),\qquad
           R(\alpha) = \frac{1}{F_{\text{dense}}} \sum_l F_l\, r(\alpha_{l-1})\, r(\alpha_l),\qquad
           r(\alpha) = \Big(\frac{\|\alpha\|_1}{\|\alpha\|_2}\Big)^2,

over non-negative per-unit gates, then extracting the surviving units, gives models that are
cheaper at equal accuracy than uniformly narrowed ones, and better than the plain
:math:`\ell_1` penalty on the same gates (network slimming; Liu et al., ICCV 2017,
arXiv:1708.06519), which is not scale-invariant and shrinks every gate.

Protocol (one seed; every number is a test accuracy of a model trained here):

* **FLOPs targets, not lambdas.** Each compressed run aims at a FLOPs target
  :math:`F^* = \rho F_{\text{ref}}` (``*_targets``, fractions of the full-width reference).
  :func:`jaxcompress.latency.lambda_controller` updates lambda every step,
  :math:`\lambda \leftarrow \lambda\, e^{k (F - F^*)/F^*}`, where :math:`F` is the exact cost
  of the widths extraction would keep now (``feedback="active"``: gates
  :math:`\alpha_j \ge \tau \max \alpha`); steering the surrogate value instead undershoots the
  real cost, since :math:`r(\alpha) \le \|\alpha\|_0`. The optax chain is
  ``surrogate_penalty -> adam -> project_nonnegative`` (projected gradient keeps
  :math:`\alpha \ge 0` with exact zeros; with ``prune_during_training`` it also zeroes
  gates below :math:`\tau \max \alpha`, so extraction removes only zeros). The l1 baseline
  is the same chain with ``kind="l1"`` (penalty :math:`\sum_j \alpha_j`), steered to the
  same targets.
* **Same epoch budget.** With budget :math:`E` epochs and :math:`E_f` fine-tuning epochs, a
  gated run trains :math:`E - E_f` epochs with the penalty, is extracted
  (:func:`jaxcompress.latency.extract`: threshold ``tau``, remove, fold the gates into BN or
  the next weights), then the smaller model trains :math:`E_f` epochs with a fresh Adam on
  the rest of the same learning-rate schedule. Uniform models train all :math:`E` epochs.
  Adam with a cosine decay to 0 over the budget for every model.
* **Exact cost and measured latency.** ``flops`` are multiply-adds per example counted from
  the extracted model's jaxpr (:func:`jaxcompress.latency.count_macs`); ``latency_ms`` is the
  median jitted forward time of a batch of ``latency_batch_size`` on this CPU
  (:func:`jaxcompress.latency.measure_latency`), measured after all models of a task are
  trained, in ``latency_rounds`` interleaved rounds (median of the round medians), so that
  load changes on a shared machine hit every model alike.

Tasks:

* ``cnn``: :class:`~jaxcompress.latency.GatedCNN` (4 conv blocks, BN, a gate per channel)
  on Fashion-MNIST; l1/l2 surrogate, l1 gates and uniform width multipliers
  (:func:`~jaxcompress.latency.uniform_width_models`: ``SmallCNN`` with every width scaled);
  the full-width reference is the multiplier-1.0 model. With ``cnn_latency_targets``, also
  the latency form (``surrogate_latency``): :math:`F_l\, r(\alpha_{l-1}) r(\alpha_l)`
  replaced by a measured, interpolated :math:`T_l(r(\alpha_{l-1}), r(\alpha_l))`
  (:func:`cnn_latency_model`), steered to a fraction of the modelled full-width latency.
* ``sst2``: :class:`~jaxcompress.latency.GatedTransformerClassifier` (gates on attention
  heads and FFN neurons) on GLUE SST-2; the reference is the plain full-width transformer
  trained for the same budget; reported: the largest FLOPs reduction at <= 1 point accuracy
  drop.
* ``mlp``: a dense MLP is trained, then (a) its full-rank SVD
  :math:`W = (U S^{1/2}) (S^{1/2} V^\top)` becomes a :class:`~jaxcompress.latency.GatedMLP`
  with :class:`~jaxcompress.latency.LowRankLinear` layers (one gate per rank-1 component;
  same function at the start), trained with the surrogate on the rank gates only
  (:func:`rank_only_graph`; the neuron gates train unpenalised), extracted to a
  :class:`~jaxcompress.latency.FactorizedMLP` and fine-tuned; (b) uniform truncated SVD
  (every layer keeps the same fraction of its rank) at the largest ranks whose FLOPs do not
  exceed (a)'s, fine-tuned for the same number of epochs as (a) after the dense run.

:func:`run` writes ``results.json``, ``metrics_*.jsonl`` training logs and one Pareto PNG per
task (``pareto_<task>.png``: accuracy vs FLOPs and latency vs FLOPs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxcompress.latency as L
from experiments.surrogate.configs.base import Config
from jaxcompress import data as jdata
from jaxcompress import train as jtrain
from jaxcompress.models import MLP

__all__ = [
    "CNN_ACCURACY_TOLERANCE",
    "SST2_ACCURACY_TOLERANCE",
    "accuracy_at",
    "best_within",
    "set_gates",
    "format_table",
    "lowrank_from_dense",
    "lr_schedule",
    "pareto_front",
    "rank_only_graph",
    "run",
    "svd_ranks_for_budget",
    "truncated_svd_model",
    "uniform_flops_at",
    "write_pareto_plots",
]

CNN_ACCURACY_TOLERANCE = 0.003  # "within 0.3 points of the full-width model"
SST2_ACCURACY_TOLERANCE = 0.01  # "<= 1 point accuracy drop"
CNN_FLOPS_ADVANTAGE = 1.2
SST2_REDUCTION = 0.4
LATENCY_TOLERANCE = 0.25
CALIBRATION_EXAMPLES = 2048  # training images scoring the steps of cnn_budget_criterion="loss"

UNITS = (
    "flops: multiply-adds per example of the convolutions and matrix products, counted from "
    "the model's jaxpr (jaxcompress.latency.count_macs); latency_ms: median wall time of one "
    "jitted eval-mode forward pass over a batch of latency_batch_size on this CPU"
)


# --------------------------------------------------------------------------------------------
# Data and optimisation
# --------------------------------------------------------------------------------------------


def _image_data(
    name: str, data_dir: str | None, train_subset: int | None, test_subset: int | None, seed: int
) -> tuple[Any, Any]:
    train = jdata.load(name, "train", data_dir=data_dir)
    test = jdata.load(name, "test", data_dir=data_dir)
    if train_subset is not None and train_subset < len(train):
        train = jdata.subset(train, train_subset, seed=seed)
    if test_subset is not None and test_subset < len(test):
        test = jdata.subset(test, test_subset, seed=seed)
    return train, test


def _sst2_data(config: Config) -> tuple[Any, Any]:
    train = jdata.sst2(
        "train", config.data_dir, max_len=config.sst2_max_len, min_freq=config.sst2_min_freq
    )
    dev = jdata.sst2("validation", config.data_dir, vocab=train.vocab, max_len=config.sst2_max_len)
    if config.sst2_train_subset is not None and config.sst2_train_subset < len(train):
        train = jdata.subset(train, config.sst2_train_subset, seed=config.seed)
    return train, dev


def _load_data(config: Config) -> dict[str, tuple[Any, Any]]:
    data = {}
    if "cnn" in config.tasks:
        data["cnn"] = _image_data(
            config.cnn_dataset,
            config.data_dir,
            config.cnn_train_subset,
            config.cnn_test_subset,
            config.seed,
        )
    if "sst2" in config.tasks:
        data["sst2"] = _sst2_data(config)
    if "mlp" in config.tasks:
        data["mlp"] = _image_data(
            config.mlp_dataset,
            config.data_dir,
            config.mlp_train_subset,
            config.mlp_test_subset,
            config.seed,
        )
    return data


def lr_schedule(
    peak: float, total_steps: int, *, warmup_steps: int = 0, offset: int = 0
) -> optax.Schedule:
    r"""Cosine decay from ``peak`` to 0 over ``total_steps`` (Loshchilov & Hutter, 2017), after
    an optional linear warm-up (capped at half the steps), evaluated at ``step + offset`` so a
    fine-tuning run continues the schedule of the run it came from:
    :math:`\eta_t = \tfrac12 \eta_0 (1 + \cos(\pi t / T))`."""
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    warmup = min(int(warmup_steps), total_steps // 2)
    if warmup > 0:
        base = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, 0.0)
    else:
        base = optax.cosine_decay_schedule(peak, total_steps)
    if offset == 0:
        return base
    return lambda step: base(step + offset)


# --------------------------------------------------------------------------------------------
# One task's shared context: data, budget, training and measuring
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Task:
    """What every run of a task shares."""

    name: str
    config: Config
    seed: int
    train: Any
    test: Any
    input_shape: tuple[int, ...]
    batch_size: int
    out: str | None
    bar: Any
    models: dict[str, nnx.Module] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return jdata.num_batches(self.train, self.batch_size)

    def metrics(self, run_name: str) -> str | None:
        if self.out is None:
            return None
        return os.path.join(self.out, f"metrics_{self.name}_{run_name}_seed{self.seed}.jsonl")

    def fit(self, run_name: str, model, tx, epochs: int, **kwargs) -> jtrain.History:
        self.bar.set_description(f"{self.name} seed {self.seed}: {run_name}")
        start = time.perf_counter()
        history = jtrain.fit(
            model,
            tx,
            self.train,
            epochs=epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            progress=self.config.progress,
            metrics_path=self.metrics(run_name),
            **kwargs,
        )
        self.seconds[run_name] = self.seconds.get(run_name, 0.0) + time.perf_counter() - start
        return history

    def accuracy(self, model) -> float:
        return jtrain.evaluate(model, self.test, batch_size=self.config.eval_batch_size)["accuracy"]

    def point(self, key: str, model, **fields) -> dict[str, Any]:
        """A result point; the model is kept for the latency measurement at the end."""
        self.models[key] = model
        self.bar.update(1)
        return {
            "key": key,
            "flops": L.count_macs(model, self.input_shape),
            "accuracy": self.accuracy(model),
            **fields,
        }


def _measure_latencies(task: _Task, points: dict[str, dict[str, Any]]) -> None:
    """Adds ``latency_ms`` to every point: median over interleaved rounds of
    :func:`jaxcompress.latency.measure_latency` medians."""
    config = task.config
    task.bar.set_description(f"{task.name} seed {task.seed}: latency")
    samples: dict[str, list[float]] = {key: [] for key in points}
    for _ in range(config.latency_rounds):
        for key in points:
            seconds = L.measure_latency(
                task.models[key],
                task.input_shape,
                batch_size=config.latency_batch_size,
                repeats=config.latency_repeats,
                warmup=2,
            )
            samples[key].append(seconds)
    for key, point in points.items():
        point["latency_ms"] = 1e3 * float(np.median(samples[key]))


def set_gates(model: nnx.Module, value: float) -> nnx.Module:
    """Set every identity-parametrised :class:`~jaxcompress.latency.Gate` of ``model`` to
    ``value`` (in place) and return the model."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"value must be a finite float >= 0, got {value!r}")
    for _, var in nnx.iter_graph(model):
        if isinstance(var, L.Gate):
            if var.get_metadata().get("parametrization", "identity") != "identity":
                raise ValueError("set_gates supports identity-parametrised gates only")
            var[...] = jnp.full(var[...].shape, value, var[...].dtype)
    return model


def normalizes_last_gates(config: Config, kind: str) -> bool:
    """Whether a CNN penalised with ``kind`` (``"ratio"``: the l1/l2 surrogate, either form;
    ``"l1"``) uses ``GatedCNN(normalize_last=True)`` under ``config.cnn_normalize_last_gates``."""
    if kind not in ("ratio", "l1"):
        raise ValueError(f"kind must be 'ratio' or 'l1', got {kind!r}")
    mode = config.cnn_normalize_last_gates
    return mode == "all" or (mode == "surrogate" and kind == "ratio")


def _compress(
    task: _Task,
    key: str,
    model: nnx.Module,
    *,
    target: float,
    reference_flops: int,
    kind: str,
    penalty_epochs: int,
    finetune_epochs: int,
    schedule: Callable[[int], optax.Schedule],
    graph: L.LayerGraph | None = None,
    multiple: int = 1,
    rounding: str = "steer",
    latency_model: L.LatencyModel | None = None,
    padding_model: L.LatencyModel | None = None,
) -> dict[str, Any]:
    """Penalised training towards ``target * reference_flops``, extraction, fine-tuning.

    ``schedule(offset)`` gives the learning rate of the task's budget from step ``offset``;
    ``graph`` the cost graph to penalise and steer (default: the model's full graph);
    ``multiple`` the multiple every kept count is rounded to in extraction; ``rounding``
    (``Config.cnn_rounding``) whether the controller steers the rounded cost (``"steer"``)
    or the exact surviving counts, with extraction rounding up (``"extract"``) or within the
    target (``"budget"``). With ``latency_model`` (the latency form, ``kind="ratio"``) the
    penalty and the controller use it instead, ``target`` is a fraction of its modelled
    full-width latency, and rounding is ``"steer"``. With ``padding_model`` (the measured
    grid) extraction widens each layer to the fastest width at least as wide.
    """
    config = task.config
    graph = L.cost_graph(model, task.input_shape) if graph is None else graph
    if latency_model is not None:
        if kind != "ratio":
            raise ValueError(f"the latency form needs kind='ratio', got {kind!r}")
        rounding = "steer"
    cost = graph if latency_model is None else latency_model
    steered_multiple = multiple if rounding == "steer" else 1
    max_macs = target * reference_flops if rounding == "budget" and multiple > 1 else None
    lam0 = getattr(config, f"{task.name}_lam0") if kind == "ratio" else config.l1_lam0
    gain = getattr(config, f"{task.name}_gain")
    controller = L.lambda_controller(
        target * cost.dense(), cost, lam0=lam0, gain=gain, lam_max=config.lam_max
    )
    tx = optax.chain(
        L.surrogate_penalty(
            cost,
            controller,
            kind=kind,
            p=config.p,
            feedback="active",
            tau=config.tau,
            multiple=steered_multiple,
            scale=config.scale if kind == "ratio" else "none",
        ),
        optax.adam(schedule(0)),
        L.project_nonnegative(prune_below=config.tau if config.prune_during_training else 0.0),
    )
    active: list[float] = []

    def callback(epoch: int, record: dict[str, float], trained: nnx.Module) -> None:
        counts = L.active_counts(
            L.gate_values(trained), graph, tau=config.tau, multiple=steered_multiple
        )
        active.append(float(graph.macs(counts)) / reference_flops)

    history = task.fit(f"{key}_penalty", model, tx, penalty_epochs, callback=callback)
    gated_accuracy = task.accuracy(model)
    gate_stats = L.gate_diagnostics(L.gate_values(model), tau=config.tau)
    budget_loss = None
    if max_macs is not None and config.cnn_budget_criterion == "loss":
        pick = np.random.default_rng(task.seed).permutation(task.train.x.shape[0])
        pick = np.sort(pick[:CALIBRATION_EXAMPLES])
        budget_loss = L.calibration_loss(model, task.train.x[pick], task.train.y[pick])
    extracted = L.extract(
        model,
        tau=config.tau,
        multiple=multiple,
        max_macs=max_macs,
        budget_loss=budget_loss,
        input_shape=task.input_shape,
        latency_model=padding_model,
    )
    small = extracted.model
    before = task.accuracy(small)
    if finetune_epochs:
        offset = penalty_epochs * task.steps_per_epoch
        task.fit(f"{key}_finetune", small, optax.adam(schedule(offset)), finetune_epochs)
    point = task.point(
        key,
        small,
        target=float(target),
        gated_accuracy=gated_accuracy,
        accuracy_before_finetune=before,
        lambda_final=float(history.opt_state[0].controller.lam),
        active_flops_ratio_per_epoch=active,
        widths={name: int(w) for name, w in extracted.widths.items()},
        gate_stats=gate_stats,
    )
    if latency_model is not None:
        point["modelled_latency_ratio"] = float(
            latency_model.latency(point["widths"]) / latency_model.dense()
        )
    if padding_model is not None:  # the measured grid with and without padding

        def grid_ratio(widths: dict[str, int]) -> float:
            return float(padding_model.latency(widths) / padding_model.dense())

        gates = L.gate_values(model)
        before_padding = {n: len(L.kept_units(a, config.tau, multiple)) for n, a in gates.items()}
        point["widths_before_padding"] = before_padding
        point["measured_grid_latency_ratio"] = grid_ratio(point["widths"])
        point["measured_grid_latency_ratio_before_padding"] = grid_ratio(before_padding)
    if point["flops"] != extracted.macs:
        raise AssertionError(f"count_macs {point['flops']} != extract's {extracted.macs}")
    return point


def _finish(
    task: _Task, methods: dict[str, list[dict[str, Any]]], reference: dict[str, Any]
) -> dict[str, Any]:
    """Latency for every point, ratios to the reference, timing; the task's record."""
    keyed = {reference["key"]: reference}
    keyed.update({p["key"]: p for points in methods.values() for p in points})
    _measure_latencies(task, keyed)
    base = keyed[reference["key"]]
    flops, latency = base["flops"], base["latency_ms"]
    for p in keyed.values():
        p["flops_ratio"] = p["flops"] / flops
        p["latency_ratio"] = p["latency_ms"] / latency
    reference = dict(base)
    record: dict[str, Any] = {"reference": reference, **methods}
    record["seconds"] = dict(task.seconds)
    return record


# --------------------------------------------------------------------------------------------
# Task 1: gated BN CNN vs l1 gates vs uniform widths
# --------------------------------------------------------------------------------------------


_LATENCY_MODELS: dict[tuple, L.LatencyModel] = {}


def cnn_latency_model(
    config: Config, graph: L.LayerGraph, out: str | None, *, as_measured: bool = False
) -> L.LatencyModel:
    """The latency model of the CNN's terms on this device (``Config.cnn_latency_grid``,
    ``cnn_latency_batch``), measured once per process for a given architecture and saved, as
    measured, to ``out/cnn_latency_table.json``. On the CPU backend every term is timed on
    this process's CPU clock as a single-threaded executable; elsewhere on the wall clock.
    Returned as its monotone envelope with ``Config.cnn_latency_monotone``, unless
    ``as_measured``."""
    key = (
        tuple((t.name, t.groups, t.factors, t.op) for t in graph.terms),
        config.cnn_latency_grid,
        config.cnn_latency_batch,
    )
    if key not in _LATENCY_MODELS:
        cpu = jax.default_backend() == "cpu"
        _LATENCY_MODELS[key] = L.measure_latency_model(
            graph,
            multipliers=config.cnn_latency_grid,
            batch=config.cnn_latency_batch,
            repeats=config.latency_repeats,
            clock="cpu" if cpu else "wall",
            compiler_options={"xla_cpu_multi_thread_eigen": False} if cpu else None,
        )
    model = _LATENCY_MODELS[key]
    if out is not None:
        model.to_table().to_json(os.path.join(out, "cnn_latency_table.json"))
    return model.monotone() if config.cnn_latency_monotone and not as_measured else model


def _cnn_seed(config: Config, seed: int, data, out, bar) -> dict[str, Any]:
    train, test = data
    task = _Task("cnn", config, seed, train, test, tuple(train.x.shape[1:]), config.cnn_batch_size,
                 out, bar)  # fmt: skip
    channels, classes = task.input_shape[-1], train.num_classes
    total = config.cnn_epochs * task.steps_per_epoch

    def schedule(offset: int = 0) -> optax.Schedule:
        return lr_schedule(config.cnn_learning_rate, total, offset=offset)

    def gated(normalize_last: bool = False) -> L.GatedCNN:
        model = L.GatedCNN(
            channels,
            classes,
            config.cnn_widths,
            strides=config.cnn_strides,
            pool_after=config.cnn_pool_after,
            normalize_last=normalize_last,
            rngs=nnx.Rngs(seed),
        )
        return set_gates(model, config.gate_init)

    template = gated()
    family = L.uniform_width_models(template, config.cnn_multipliers, rngs=nnx.Rngs(seed))
    uniform = []
    for m in sorted(config.cnn_multipliers):
        key = f"uniform_{m:g}"
        task.fit(key, family[m], optax.adam(schedule()), config.cnn_epochs)
        uniform.append(
            task.point(key, family[m], multiplier=float(m), widths=list(family[m].widths))
        )
    reference = next(p for p in uniform if p["multiplier"] == 1.0)
    graph = L.cost_graph(template, task.input_shape)
    if reference["flops"] != int(graph.dense()):
        raise AssertionError("the multiplier-1.0 model must have the gated model's dense cost")
    methods: dict[str, list[dict[str, Any]]] = {"uniform": uniform}

    def compress(key: str, target: float, kind: str, **options) -> dict[str, Any]:
        return _compress(
            task,
            key,
            gated(normalizes_last_gates(config, kind)),
            target=target,
            reference_flops=reference["flops"],
            kind=kind,
            penalty_epochs=config.cnn_epochs - config.cnn_finetune_epochs,
            finetune_epochs=config.cnn_finetune_epochs,
            schedule=schedule,
            multiple=config.cnn_channel_multiple,
            **options,
        )

    for method, kind in (("surrogate", "ratio"), ("l1", "l1")):
        methods[method] = [
            compress(f"{method}_{target:g}", target, kind, rounding=config.cnn_rounding)
            for target in config.cnn_targets
        ]
    if config.cnn_latency_targets:
        latency_model = cnn_latency_model(config, graph, out)
        padding_model = None
        if config.cnn_latency_padding:
            padding_model = cnn_latency_model(config, graph, None, as_measured=True)
        methods["surrogate_latency"] = [
            compress(
                f"latency_{target:g}",
                target,
                "ratio",
                graph=graph,
                latency_model=latency_model,
                padding_model=padding_model,
            )
            for target in config.cnn_latency_targets
        ]
    return _finish(task, methods, reference)


# --------------------------------------------------------------------------------------------
# Task 2: gated transformer on SST-2
# --------------------------------------------------------------------------------------------


def _sst2_seed(config: Config, seed: int, data, out, bar) -> dict[str, Any]:
    train, dev = data
    task = _Task("sst2", config, seed, train, dev, (config.sst2_max_len,), config.sst2_batch_size,
                 out, bar)  # fmt: skip
    total = config.sst2_epochs * task.steps_per_epoch

    def schedule(offset: int = 0) -> optax.Schedule:
        return lr_schedule(
            config.sst2_learning_rate,
            total,
            warmup_steps=config.sst2_warmup_steps,
            offset=offset,
        )

    def gated() -> L.GatedTransformerClassifier:
        model = L.GatedTransformerClassifier(
            len(train.vocab),
            train.num_classes,
            d_model=config.sst2_d_model,
            num_heads=config.sst2_num_heads,
            num_layers=config.sst2_num_layers,
            mlp_dim=config.sst2_mlp_dim,
            max_len=config.sst2_max_len,
            dropout=config.sst2_dropout,
            rngs=nnx.Rngs(seed),
        )
        return set_gates(model, config.gate_init)

    multipliers = sorted({1.0, *config.sst2_multipliers})
    family = L.uniform_width_models(gated(), multipliers, rngs=nnx.Rngs(seed))
    uniform = []
    for m in multipliers:
        key = f"uniform_{m:g}"
        task.fit(key, family[m], optax.adam(schedule()), config.sst2_epochs)
        uniform.append(
            task.point(
                key,
                family[m],
                multiplier=float(m),
                heads=list(family[m].heads),
                mlp_dims=list(family[m].mlp_dims),
            )
        )
    reference = uniform[-1]
    methods: dict[str, list[dict[str, Any]]] = {"surrogate": []}
    if len(uniform) > 1:
        methods["uniform"] = uniform
    for target in config.sst2_targets:
        key = f"surrogate_{target:g}"
        point = _compress(
            task,
            key,
            gated(),
            target=target,
            reference_flops=reference["flops"],
            kind="ratio",
            penalty_epochs=config.sst2_epochs - config.sst2_finetune_epochs,
            finetune_epochs=config.sst2_finetune_epochs,
            schedule=schedule,
        )
        methods["surrogate"].append(point)
    return _finish(task, methods, reference)


# --------------------------------------------------------------------------------------------
# Task 3: low-rank gates vs uniform truncated SVD
# --------------------------------------------------------------------------------------------


def _svd_factors(kernel: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(U S^{1/2}, S^{1/2} V^T)`` of a ``(in, out)`` kernel (float64 SVD), rank ``min``."""
    u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
    root = np.sqrt(s)
    return (u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32)


def _dense_layers(dense: MLP) -> tuple[list[Any], Any]:
    if not isinstance(dense, MLP) or not dense.hidden:
        raise TypeError(f"dense must be a jaxcompress.models.MLP with hidden layers, got {dense!r}")
    return list(dense.layers[:-1]), dense.layers[-1]


def _copy_head(dst: nnx.Linear, src: nnx.Linear) -> None:
    dst.kernel[...] = src.kernel[...]
    dst.bias[...] = src.bias[...]


def lowrank_from_dense(dense: MLP, gate_init: float = 1.0) -> L.GatedMLP:
    r"""The full-rank factorisation of a trained MLP as a gated low-rank MLP.

    Hidden layer :math:`l` with kernel :math:`W_l = U S V^\top` (rank
    :math:`k_l = \min(d_{in}, d_{out})`) becomes a :class:`~jaxcompress.latency.LowRankLinear`
    with ``u`` :math:`= U S^{1/2} / g`, ``v`` :math:`= S^{1/2} V^\top / g`, and every rank and
    neuron gate equal to :math:`g` = ``gate_init``; the layer after a neuron gate (the next
    ``u`` or the head kernel) is divided by :math:`g` too. The result computes the dense
    model's function (up to float rounding), at cost :math:`(d_{in} + d_{out}) k_l` per layer.
    """
    if not gate_init > 0:
        raise ValueError(f"gate_init must be > 0, got {gate_init!r}")
    layers, head = _dense_layers(dense)
    sizes = (dense.in_features, *dense.hidden)
    ranks = tuple(min(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    gated = L.GatedMLP(
        dense.in_features, dense.hidden, dense.num_classes, ranks=ranks, rngs=nnx.Rngs(0)
    )
    set_gates(gated, gate_init)
    for i, (src, dst) in enumerate(zip(layers, gated.layers, strict=True)):
        u, v = _svd_factors(src.kernel[...])
        after_neuron_gate = 1.0 if i == 0 else gate_init  # the previous layer's neuron gate
        dst.u[...] = u / after_neuron_gate
        dst.v[...] = v / gate_init
        dst.bias[...] = src.bias[...]
    gated.head.kernel[...] = head.kernel[...] / gate_init
    gated.head.bias[...] = head.bias[...]
    return gated


def rank_only_graph(graph: L.LayerGraph) -> L.LayerGraph:
    """The cost graph of a low-rank :class:`~jaxcompress.latency.GatedMLP` with its neuron
    groups (``gates/{l}/alpha``) replaced by their constant sizes: only the rank gates are
    penalised and steered, as in truncated SVD, which keeps every neuron."""
    sizes = graph.group_sizes
    fixed = {name for name in sizes if name.startswith("gates/")}
    terms = tuple(
        L.CostTerm(
            t.name,
            t.coef,
            tuple(tuple(sizes[a] if a in fixed else a for a in f) for f in t.factors),
            t.op,
        )
        for t in graph.terms
    )
    return L.LayerGraph(terms, tuple((n, s) for n, s in graph.groups if n not in fixed))


def _factorized_macs(in_features: int, hidden: Sequence[int], ranks: Sequence[int], classes: int):
    sizes = (in_features, *hidden)
    body = sum((a + b) * r for a, b, r in zip(sizes[:-1], sizes[1:], ranks, strict=True))
    return body + hidden[-1] * classes


def svd_ranks_for_budget(
    in_features: int, hidden: Sequence[int], num_classes: int, budget: float
) -> tuple[int, ...]:
    """Uniform truncation: the largest rank fraction :math:`c` whose ranks
    :math:`r_l = \\max(1, \\mathrm{round}(c \\min(d_{in}, d_{out})))` cost at most ``budget``
    multiply-adds per example (all neurons kept); rank 1 everywhere if nothing fits."""
    sizes = (in_features, *hidden)
    full = [min(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    widest = max(full)
    for k in range(widest, 0, -1):
        ranks = tuple(max(1, round(k / widest * r)) for r in full)
        if _factorized_macs(in_features, hidden, ranks, num_classes) <= budget:
            return ranks
    return (1,) * len(full)


def truncated_svd_model(dense: MLP, ranks: Sequence[int]) -> L.FactorizedMLP:
    """:class:`~jaxcompress.latency.FactorizedMLP` keeping the top ``ranks[l]`` singular
    triplets of each hidden layer (Eckart-Young: the best rank-``r`` approximation in
    Frobenius norm), with the dense biases and head."""
    layers, head = _dense_layers(dense)
    model = L.FactorizedMLP(
        dense.in_features, dense.hidden, tuple(ranks), dense.num_classes, rngs=nnx.Rngs(0)
    )
    for src, dst, r in zip(layers, model.layers, ranks, strict=True):
        u, v = _svd_factors(src.kernel[...])
        dst.u[...] = u[:, :r]
        dst.v[...] = v[:r]
        dst.bias[...] = src.bias[...]
    _copy_head(model.head, head)
    return model


def _mlp_seed(config: Config, seed: int, data, out, bar) -> dict[str, Any]:
    train, test = data
    task = _Task("mlp", config, seed, train, test, tuple(train.x.shape[1:]), config.mlp_batch_size,
                 out, bar)  # fmt: skip
    in_features, classes = math.prod(task.input_shape), train.num_classes
    dense = MLP(in_features, config.mlp_hidden, classes, rngs=nnx.Rngs(seed))
    dense_total = config.mlp_epochs * task.steps_per_epoch
    task.fit("dense", dense, optax.adam(lr_schedule(config.mlp_learning_rate, dense_total)),
             config.mlp_epochs)  # fmt: skip
    reference = task.point("dense", dense, hidden=list(config.mlp_hidden))
    after_epochs = config.mlp_penalty_epochs + config.mlp_finetune_epochs
    after_total = after_epochs * task.steps_per_epoch

    def schedule(offset: int = 0) -> optax.Schedule:
        return lr_schedule(config.mlp_learning_rate, after_total, offset=offset)

    methods: dict[str, list[dict[str, Any]]] = {"surrogate": [], "svd": []}
    for target in config.mlp_targets:
        key = f"surrogate_{target:g}"
        gated = lowrank_from_dense(dense, config.gate_init)
        point = _compress(
            task,
            key,
            gated,
            target=target,
            reference_flops=reference["flops"],
            kind="ratio",
            penalty_epochs=config.mlp_penalty_epochs,
            finetune_epochs=config.mlp_finetune_epochs,
            schedule=schedule,
            graph=rank_only_graph(L.cost_graph(gated, task.input_shape)),
        )
        small = task.models[key]
        point["hidden"], point["ranks"] = list(small.hidden), list(small.ranks)
        methods["surrogate"].append(point)

        ranks = svd_ranks_for_budget(in_features, config.mlp_hidden, classes, point["flops"])
        svd_key = f"svd_{target:g}"
        factorized = truncated_svd_model(dense, ranks)
        before = task.accuracy(factorized)
        task.fit(svd_key, factorized, optax.adam(schedule()), after_epochs)
        methods["svd"].append(
            task.point(
                svd_key,
                factorized,
                target=float(target),
                accuracy_before_finetune=before,
                hidden=list(config.mlp_hidden),
                ranks=list(ranks),
            )
        )
    return _finish(task, methods, reference)


# --------------------------------------------------------------------------------------------
# Aggregation over seeds and the targets' summaries
# --------------------------------------------------------------------------------------------

_CONSTANT = ("key", "target", "multiplier")


def _reduce(records: list[Any], fn: Callable[[np.ndarray], Any]) -> Any:
    """``fn`` over seeds of aligned numbers of same-shaped records (dicts and lists recursed;
    strings and the point labels taken from the first seed)."""
    first = records[0]
    if isinstance(first, dict):
        return {
            k: first[k] if k in _CONSTANT else _reduce([r[k] for r in records], fn) for k in first
        }
    if isinstance(first, list):
        if len({len(r) for r in records}) != 1:
            return first
        return [_reduce([r[i] for r in records], fn) for i in range(len(first))]
    if isinstance(first, str):
        return first
    return float(fn(np.asarray(records, dtype=np.float64)))


def _aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    mean = _reduce(records, lambda v: v.mean())
    methods = [k for k in records[0] if k not in ("reference", "seconds")]
    for point in [mean["reference"], *(p for k in methods for p in mean[k])]:
        point["flops"] = int(round(point["flops"]))
    if len(records) > 1:
        std = _reduce(records, lambda v: v.std(ddof=1))
        for k in ("reference", *methods):
            pairs = [(mean[k], std[k])] if k == "reference" else zip(mean[k], std[k], strict=True)
            for point, dev in pairs:
                for field in ("flops", "accuracy", "latency_ms"):
                    point[f"{field}_std"] = dev[field]
    return mean


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both axes (fewer or equal FLOPs and higher or equal
    accuracy, one strictly), sorted by FLOPs."""
    front = []
    for p in points:
        dominated = any(
            q["flops"] <= p["flops"]
            and q["accuracy"] >= p["accuracy"]
            and (q["flops"] < p["flops"] or q["accuracy"] > p["accuracy"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["flops"])


def best_within(points: Sequence[dict[str, Any]], min_accuracy: float) -> dict[str, Any] | None:
    """The cheapest point with ``accuracy >= min_accuracy`` (``None`` if there is none)."""
    ok = [p for p in points if p["accuracy"] >= min_accuracy]
    return min(ok, key=lambda p: (p["flops"], -p["accuracy"])) if ok else None


def uniform_flops_at(accuracy: float, points: Sequence[dict[str, Any]]) -> float | None:
    """FLOPs a family needs for ``accuracy``: on its Pareto front, sorted by FLOPs, the first
    segment whose end reaches ``accuracy``, interpolated linearly in (accuracy, log FLOPs);
    the cheapest point if it already reaches it; ``None`` if no point does."""
    front = pareto_front(points)
    if not front or front[-1]["accuracy"] < accuracy:
        return None
    if front[0]["accuracy"] >= accuracy:
        return float(front[0]["flops"])
    for lo, hi in zip(front[:-1], front[1:], strict=True):
        if hi["accuracy"] >= accuracy:
            w = (accuracy - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
            return float(math.exp((1 - w) * math.log(lo["flops"]) + w * math.log(hi["flops"])))
    raise AssertionError("unreachable")  # pragma: no cover


def accuracy_at(flops: float, points: Sequence[dict[str, Any]]) -> float | None:
    """Accuracy a family reaches within a FLOPs budget: on its Pareto front, linear in
    (log FLOPs, accuracy) between neighbouring points, the best accuracy above the front's
    largest FLOPs, and ``None`` below its smallest (no model of the family that cheap)."""
    front = pareto_front(points)
    if not front or flops < front[0]["flops"]:
        return None
    if flops >= front[-1]["flops"]:
        return float(front[-1]["accuracy"])
    for lo, hi in zip(front[:-1], front[1:], strict=True):
        if flops <= hi["flops"]:
            w = (math.log(flops) - math.log(lo["flops"])) / (
                math.log(hi["flops"]) - math.log(lo["flops"])
            )
            return float((1 - w) * lo["accuracy"] + w * hi["accuracy"])
    raise AssertionError("unreachable")  # pragma: no cover


def _brief(p: dict[str, Any] | None) -> dict[str, Any] | None:
    if p is None:
        return None
    keys = ("key", "flops", "accuracy", "latency_ms", "flops_ratio", "target", "multiplier")
    return {k: p[k] for k in keys if k in p}


def _latency_check(reference: dict[str, Any], points: list[dict[str, Any]]) -> list[dict]:
    rows = []
    for p in points:
        flops_reduction = 1.0 - p["flops"] / reference["flops"]
        latency_reduction = 1.0 - p["latency_ms"] / reference["latency_ms"]
        rows.append(
            {
                "key": p["key"],
                "flops_reduction": flops_reduction,
                "latency_reduction": latency_reduction,
                "flops_speedup": reference["flops"] / p["flops"],
                "latency_speedup": reference["latency_ms"] / p["latency_ms"],
                "within_tolerance": abs(latency_reduction - flops_reduction)
                <= LATENCY_TOLERANCE * flops_reduction,
            }
        )
    return rows


def _cnn_summary(res: dict[str, Any]) -> dict[str, Any]:
    ref = res["reference"]
    threshold = ref["accuracy"] - CNN_ACCURACY_TOLERANCE
    best = best_within(res["surrogate"], threshold)
    uniform_at = None if best is None else uniform_flops_at(best["accuracy"], res["uniform"])
    uniform_discrete = best_within(res["uniform"], threshold)
    advantage = None
    if best is not None:
        # A uniform model as accurate as the best surrogate point may not exist; then the
        # full-width reference is the cheapest uniform model at least that close to it.
        baseline = uniform_at if uniform_at is not None else float(ref["flops"])
        advantage = baseline / best["flops"]
    dominance = []
    l1_front = pareto_front(res["l1"])
    for s, l1 in zip(res["surrogate"], res["l1"], strict=True):
        l1_at = accuracy_at(s["flops"], res["l1"])
        # cheaper than every l1 model: it must also match the cheapest one's accuracy
        reference = l1_front[0]["accuracy"] if l1_at is None else l1_at
        dominance.append(
            {
                "target": s["target"],
                "surrogate": _brief(s),
                "l1": _brief(l1),
                "l1_accuracy_at_surrogate_flops": l1_at,
                "dominates": s["accuracy"] >= reference,
            }
        )
    wins = sum(d["dominates"] for d in dominance)
    latency = _latency_check(ref, res["surrogate"] + res["l1"])
    summary = {
        "reference_accuracy": ref["accuracy"],
        "accuracy_threshold": threshold,
        "surrogate_best": _brief(best),
        "uniform_flops_at_that_accuracy": uniform_at,
        "uniform_cheapest_within_threshold": _brief(uniform_discrete),
        "flops_advantage": advantage,
        "flops_advantage_discrete": None
        if best is None or uniform_discrete is None
        else uniform_discrete["flops"] / best["flops"],
        "flops_advantage_target": CNN_FLOPS_ADVANTAGE,
        "met_flops_advantage": advantage is not None and advantage >= CNN_FLOPS_ADVANTAGE,
        "dominance": dominance,
        "dominated_budgets": wins,
        "met_dominance": wins >= math.ceil(2 * len(dominance) / 3),
        "latency": latency,
        "met_latency": all(row["within_tolerance"] for row in latency),
        "latency_efficiency_mean": float(
            np.mean([r["latency_speedup"] / r["flops_speedup"] for r in latency])
        ),
    }
    if "surrogate_latency" in res:
        summary["latency_form"] = [
            {
                **_brief(p),
                "modelled_latency_ratio": p["modelled_latency_ratio"],
                "latency_ratio": p["latency_ratio"],
                "uniform_accuracy_at_its_flops": accuracy_at(p["flops"], res["uniform"]),
                "surrogate_accuracy_at_its_flops": accuracy_at(p["flops"], res["surrogate"]),
            }
            for p in res["surrogate_latency"]
        ]
    return summary


def _sst2_summary(res: dict[str, Any]) -> dict[str, Any]:
    ref = res["reference"]
    threshold = ref["accuracy"] - SST2_ACCURACY_TOLERANCE
    best = best_within(res["surrogate"], threshold)
    reduction = 0.0 if best is None else 1.0 - best["flops"] / ref["flops"]
    return {
        "reference_accuracy": ref["accuracy"],
        "accuracy_threshold": threshold,
        "surrogate_best": _brief(best),
        "flops_reduction": reduction,
        "flops_reduction_target": SST2_REDUCTION,
        "met_flops_reduction": reduction >= SST2_REDUCTION,
        "latency": _latency_check(ref, res["surrogate"]),
    }


def _mlp_summary(res: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for s, v in zip(res["surrogate"], res["svd"], strict=True):
        rows.append(
            {
                "target": s["target"],
                "surrogate": _brief(s),
                "svd": _brief(v),
                "accuracy_gain": s["accuracy"] - v["accuracy"],
            }
        )
    return {
        "reference_accuracy": res["reference"]["accuracy"],
        "equal_flops": rows,
        "surrogate_wins": sum(r["accuracy_gain"] >= 0 for r in rows),
    }


_SUMMARIES = {"cnn": _cnn_summary, "sst2": _sst2_summary, "mlp": _mlp_summary}
_SEED_RUNS = {"cnn": _cnn_seed, "sst2": _sst2_seed, "mlp": _mlp_seed}


def _runs_per_seed(config: Config, task: str) -> int:
    if task == "cnn":
        return (
            len(config.cnn_multipliers)
            + 2 * len(config.cnn_targets)
            + len(config.cnn_latency_targets)
        )
    if task == "sst2":
        return len({1.0, *config.sst2_multipliers}) + len(config.sst2_targets)
    return 1 + 2 * len(config.mlp_targets)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run(config: Config, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, training logs and the plots to ``out``.

    Args:
      config: a :class:`Config` (validated first).
      out: output directory (created); ``None`` writes nothing.

    Returns:
      The results dict (also ``results.json``). Per task (``cnn``, ``sst2``, ``mlp``):

      * ``reference``: the full-width model's point;
      * one list of points per method (``cnn``: ``uniform``, ``surrogate``, ``l1``, and with
        ``cnn_latency_targets`` ``surrogate_latency`` (plus ``modelled_latency_ratio``); ``sst2``:
        ``surrogate`` and, with ``sst2_multipliers``, ``uniform``; ``mlp``: ``surrogate``,
        ``svd``). A point has ``flops`` (int, exact multiply-adds per example), ``accuracy``
        (test / validation accuracy in [0, 1]), ``latency_ms``, ``flops_ratio`` and
        ``latency_ratio`` (to the reference), ``key``, and per method ``target``,
        ``multiplier``, ``widths`` (units kept per gate group), ``gated_accuracy`` (gated
        model at the end of the penalty phase), ``accuracy_before_finetune`` (just after
        extraction), ``lambda_final``, ``active_flops_ratio_per_epoch``, ``gate_stats``
        (:func:`jaxcompress.latency.gate_diagnostics` of the gated model before extraction:
        per group ``kept``, ``max``, ``rms_kept``, ``uniformity``), ranks, ...; means
        over seeds, with ``*_std`` for ``flops``, ``accuracy`` and ``latency_ms`` when
        ``num_seeds > 1``;
      * ``summary``: the measured targets (module docstring and ``RESULTS.md``);
      * ``per_seed``: the unaveraged records; ``seconds``: training time per run.

      Plus ``units``, ``config``, ``dataset_sizes``, ``timing`` and ``environment``.
    """
    if not isinstance(config, Config):
        raise TypeError(
            f"config must be an experiments.surrogate Config, got {type(config).__name__}"
        )
    config.validate()
    from tqdm import tqdm

    t0 = time.perf_counter()
    data = _load_data(config)
    for task, (train, _) in data.items():
        batch = getattr(config, f"{task}_batch_size")
        if batch > len(train):
            raise ValueError(
                f"{task}_batch_size={batch} exceeds the {task} training set ({len(train)} examples)"
            )
    t_data = time.perf_counter()
    if out is not None:
        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
    total_runs = config.num_seeds * sum(_runs_per_seed(config, t) for t in config.tasks)
    bar = tqdm(total=total_runs, disable=not config.progress, desc="surrogate", leave=True)
    seeds = [config.seed + k for k in range(config.num_seeds)]
    records: dict[str, list[dict[str, Any]]] = {t: [] for t in config.tasks}
    task_seconds: dict[str, float] = dict.fromkeys(config.tasks, 0.0)
    try:
        for seed in seeds:
            for task in config.tasks:
                start = time.perf_counter()
                records[task].append(_SEED_RUNS[task](config, seed, data[task], out, bar))
                task_seconds[task] += time.perf_counter() - start
    finally:
        bar.close()

    results: dict[str, Any] = {"units": UNITS}
    for task in config.tasks:
        per_seed = records[task]
        averaged = _aggregate([{k: v for k, v in r.items() if k != "seconds"} for r in per_seed])
        averaged["summary"] = _SUMMARIES[task](averaged)
        averaged["per_seed"] = per_seed
        averaged["seconds"] = _reduce([r["seconds"] for r in per_seed], lambda v: v.mean())
        results[task] = averaged
    results["config"] = dataclasses.asdict(config)
    results["dataset_sizes"] = {
        task: {"train": len(train), "test": len(test)} for task, (train, test) in data.items()
    }
    results["timing"] = {
        "data_seconds": t_data - t0,
        "task_seconds": task_seconds,
        "total_seconds": time.perf_counter() - t0,
    }
    results["environment"] = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    if out is not None:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        write_pareto_plots(results, out)
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

_METHOD_STYLE = {
    "surrogate": ("l1/l2 surrogate", "tab:blue", "o"),
    "l1": ("l1 gates", "tab:orange", "s"),
    "surrogate_latency": ("l1/l2 surrogate, latency form", "tab:purple", "v"),
    "uniform": ("uniform width", "0.4", "^"),
    "svd": ("truncated SVD", "tab:green", "D"),
}
_TASK_TITLE = {
    "cnn": "Gated BN CNN",
    "sst2": "Gated transformer",
    "mlp": "Low-rank MLP",
}


def _methods(res: dict[str, Any]) -> list[str]:
    return [k for k in _METHOD_STYLE if k in res]


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table per task (FLOPs, accuracy, latency) and the targets."""
    lines = []
    for task in ("cnn", "sst2", "mlp"):
        if task not in results:
            continue
        res = results[task]
        ref = res["reference"]
        lines.append(
            f"[{task}] reference: {ref['flops']:,} MACs, accuracy {ref['accuracy']:.4f}, "
            f"latency {ref['latency_ms']:.3f} ms"
        )
        lines.append(
            f"  {'method':<17} {'point':<8} {'MACs':>10} {'ratio':>6} {'accuracy':>8} "
            f"{'latency ms':>10} {'lat ratio':>9}"
        )
        for method in _methods(res):
            for p in res[method]:
                label = p["key"].split("_", 1)[1]
                lines.append(
                    f"  {method:<17} {label:<8} {p['flops']:>10,} {p['flops_ratio']:>6.3f} "
                    f"{p['accuracy']:>8.4f} {p['latency_ms']:>10.3f} {p['latency_ratio']:>9.3f}"
                )
        s = res["summary"]
        if task == "cnn":
            adv = s["flops_advantage"]
            lines.append(
                "  target >= 1.2x fewer FLOPs than uniform at <= 0.3 pt drop: "
                + ("no surrogate point within 0.3 pt" if adv is None else f"{adv:.2f}x")
                + f" ({'met' if s['met_flops_advantage'] else 'not met'})"
            )
            lines.append(
                f"  l1/l2 dominates l1 at {s['dominated_budgets']} of {len(s['dominance'])} "
                f"budgets ({'met' if s['met_dominance'] else 'not met'}); latency within 25% "
                f"of FLOPs reduction: {sum(r['within_tolerance'] for r in s['latency'])} of "
                f"{len(s['latency'])} ({'met' if s['met_latency'] else 'not met'})"
            )
            for row in s.get("latency_form", []):
                lines.append(
                    f"  latency form, target {row['target']:g}: modelled latency ratio "
                    f"{row['modelled_latency_ratio']:.3f}, measured {row['latency_ratio']:.3f}"
                )
        elif task == "sst2":
            lines.append(
                f"  FLOPs reduction at <= 1 pt drop: {s['flops_reduction']:.1%} "
                f"({'met' if s['met_flops_reduction'] else 'not met'}, target 40%)"
            )
        else:
            gains = ", ".join(f"{r['accuracy_gain'] * 100:+.2f}" for r in s["equal_flops"])
            lines.append(f"  surrogate minus SVD at equal FLOPs (points): {gains}")
    return "\n".join(lines)


def write_pareto_plots(results: dict[str, Any], out: str) -> list[str]:
    """``pareto_<task>.png`` per task: accuracy vs MACs (log scale, dashed: the reference's
    accuracy and the 0.3 / 1 point band) and measured latency vs MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    paths = []
    for task in ("cnn", "sst2", "mlp"):
        if task not in results:
            continue
        res = results[task]
        ref = res["reference"]
        fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method in _methods(res):
            label, color, marker = _METHOD_STYLE[method]
            pts = sorted(res[method], key=lambda p: p["flops"])
            flops = [p["flops"] for p in pts]
            ax.plot(flops, [100 * p["accuracy"] for p in pts], marker=marker, color=color,
                    label=label)  # fmt: skip
            lat.plot(flops, [p["latency_ms"] for p in pts], marker=marker, color=color,
                     ls="none", label=label)  # fmt: skip
        ax.plot([ref["flops"]], [100 * ref["accuracy"]], marker="*", ms=14, color="k",
                ls="none", label="full width")  # fmt: skip
        lat.plot([ref["flops"]], [ref["latency_ms"]], marker="*", ms=14, color="k", ls="none")
        tol = {"cnn": CNN_ACCURACY_TOLERANCE, "sst2": SST2_ACCURACY_TOLERANCE}.get(task)
        if tol is not None:
            ax.axhline(100 * (ref["accuracy"] - tol), color="k", lw=0.8, ls="--",
                       label=f"reference - {100 * tol:g} pt")  # fmt: skip
        all_flops = [p["flops"] for m in _methods(res) for p in res[m]] + [ref["flops"]]
        grid = np.geomspace(min(all_flops), max(all_flops), 50)
        lat.plot(grid, ref["latency_ms"] * grid / ref["flops"], color="k", lw=0.8, ls=":",
                 label="latency proportional to FLOPs")  # fmt: skip
        for axis in (ax, lat):
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
            axis.xaxis.set_minor_formatter(ticker.NullFormatter())
            axis.set_xlabel("multiply-adds per example (exact, extracted model)")
            axis.grid(alpha=0.3, which="both")
        lat.set_yscale("log")
        lat.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        lat.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        lat.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel("validation accuracy (%)" if task == "sst2" else "test accuracy (%)")
        lat.set_ylabel(f"CPU latency, batch {results['config']['latency_batch_size']} (ms)")
        ax.legend(fontsize=8, loc="lower right")
        lat.legend(fontsize=8, loc="upper left")
        dataset = {
            "cnn": results["config"]["cnn_dataset"],
            "sst2": "SST-2",
            "mlp": results["config"]["mlp_dataset"],
        }[task]
        fig.suptitle(f"{_TASK_TITLE[task]} on {dataset}: accuracy and latency vs FLOPs")
        fig.tight_layout()
        path = os.path.join(out, f"pareto_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
