"""The l1/l2 latency surrogate against l1 gates, uniform widths and truncated SVD: the run.

Claims tested (Nasery, Shah, Suggala, Jain, "End-to-End Neural Network Compression via
l1/l2 Regularized Latency Surrogates", CVPRW 2024, arXiv:2306.05785): training non-negative
per-unit gates with the scale-invariant FLOPs surrogate, steered to a FLOPs target, then
extracting the surviving units, gives models that are cheaper at equal accuracy than uniformly
narrowed ones, and better than the plain l1 penalty on the same gates (network slimming; Liu
et al., ICCV 2017, arXiv:1708.06519). The method (:mod:`experiments.surrogate._study`) and the
tasks (:mod:`experiments.surrogate.tasks`) know nothing of each other's models: every model is
gated, costed, extracted and narrowed generically from its traced dependency groups
(:mod:`jaxcompress.structure`).

Protocol: every model of a task gets the same epoch budget and Adam with a cosine decay over
it; every point is the test accuracy of a model trained here, its exact multiply-adds per
example and its CPU latency, measured once all models of a task are trained, in interleaved
rounds. Each task and seed is a resumable stage of the run (``--out``): a rerun reads the
finished ones back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments._common import Run, environment, experiment_run, parse_mesh, stage_bar
from experiments.surrogate import report
from experiments.surrogate._study import Study
from experiments.surrogate.configs.base import Config
from experiments.surrogate.report import format_table
from experiments.surrogate.tasks import LOADERS, RUNS

__all__ = ["UNITS", "format_table", "run"]

UNITS = (
    "flops: multiply-adds per example of the convolutions and matrix products, counted from "
    "the model's jaxpr (jaxcompress.structure.macs); latency_ms: median wall time of one jitted "
    "inference forward pass over 64 test examples on this device; landing_error: "
    "flops / (target * reference flops) - 1"
)
_CONSTANT = ("key", "method", "target", "multiplier")


def _runs_per_seed(config: Config, task: str) -> int:
    s = config.task(task)
    if task == "mlp":
        return 1 + 2 * len(s.targets)
    methods = 2 if config.l1 else 1
    return len(s.multipliers) + methods * len(s.targets)


def _reduce(records: list[Any], fn: Callable[[np.ndarray], Any]) -> Any:
    """``fn`` over seeds of same-shaped records (dicts and equally long lists recursed;
    strings, ``None`` and the point labels taken from the first seed)."""
    first = records[0]
    if isinstance(first, dict):
        return {
            k: first[k] if k in _CONSTANT else _reduce([r[k] for r in records], fn) for k in first
        }
    if isinstance(first, list):
        if len({len(r) for r in records}) != 1:
            return first
        return [_reduce([r[i] for r in records], fn) for i in range(len(first))]
    if isinstance(first, str) or first is None:
        return first
    return float(fn(np.asarray(records, dtype=np.float64)))


def _aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds (``*_std``: the sample std of flops, accuracy and latency)."""
    mean = _reduce(records, lambda v: v.mean())
    methods = [k for k, v in records[0].items() if isinstance(v, list)]
    for point in [mean["reference"], *(p for k in methods for p in mean[k])]:
        point["flops"] = int(round(point["flops"]))
    if len(records) > 1:
        std = _reduce(records, lambda v: v.std(ddof=1))
        pairs = [(mean["reference"], std["reference"])]
        pairs += [pair for k in methods for pair in zip(mean[k], std[k], strict=True)]
        for point, dev in pairs:
            for name in ("flops", "accuracy", "latency_ms"):
                point[f"{name}_std"] = dev[name]
    return mean


def _one_device(mesh: str | None) -> None:
    """The studies train on one device: ``mesh`` ``None`` or of one device."""
    if mesh is not None and any(size > 1 for size in parse_mesh(mesh).values()):
        raise ValueError(f"mesh: the surrogate studies train on one device, got {mesh!r}")


@experiment_run(Config, check_mesh=_one_device)
def run(config: Config, state: Run) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, training logs and the plots to ``out``.

    ``out`` is a resumable run (:func:`experiments._common.open_run`): each task and seed is a
    stage, a finished run is returned as it is, an ``out`` holding another config is refused
    (``restart`` starts over). ``mesh``: ``None`` or a one-device mesh (the studies train on
    one device).

    Returns:
      ``results``, also ``results.json``: per task ``dataset``, ``reference`` (the full model's
      point), one list of points per method (``uniform``, ``surrogate``, ``l1``, ``svd``),
      ``summary`` (:func:`experiments.surrogate.report.summarize`), ``per_seed`` and
      ``seconds``. A point has ``key``, ``method``, ``flops`` (exact MACs per example),
      ``accuracy``, ``latency_ms``, ``flops_ratio`` and ``latency_ratio`` (to the reference);
      compressed points also ``target``, ``landing_error``, ``kept`` and ``sizes`` (units per
      group), ``gated_accuracy``, ``accuracy_before_finetune``, ``lambda_final``,
      ``active_flops_ratio_per_epoch``, ``gate_stats``; means over seeds with ``*_std``.
      Plus ``units``, ``config``, ``dataset_sizes``, ``timing`` and ``environment``.
    """
    t0 = time.perf_counter()
    data = {task: LOADERS[task](config) for task in config.tasks}
    for task, (train, _) in data.items():
        if config.batch_size > len(train):
            raise ValueError(
                f"batch_size={config.batch_size} exceeds the {task} training set "
                f"({len(train)} examples)"
            )
    t_data = time.perf_counter()
    seeds = [config.seed + k for k in range(config.num_seeds)]
    records: dict[str, list[dict[str, Any]]] = {t: [] for t in config.tasks}
    total = config.num_seeds * sum(_runs_per_seed(config, t) for t in config.tasks)
    with stage_bar(total, "surrogate", config.progress) as bar:
        for seed in seeds:
            for task in config.tasks:
                name = f"{task}_seed{seed}"
                record = state.stage(name)
                if record is None:
                    train, test = data[task]
                    study = Study(task, config, config.task(task), seed, train, test,
                                  state.out, bar)  # fmt: skip
                    record = state.finish_stage(name, RUNS[task](study))
                else:
                    bar.update(_runs_per_seed(config, task))
                records[task].append(record)

    results: dict[str, Any] = {"units": UNITS}
    for task in config.tasks:
        per_seed = records[task]
        averaged = _aggregate([{k: v for k, v in r.items() if k != "seconds"} for r in per_seed])
        averaged["dataset"] = config.task(task).dataset
        averaged["summary"] = report.summarize(task, averaged, per_seed)
        averaged["per_seed"] = per_seed
        averaged["seconds"] = _reduce([r["seconds"] for r in per_seed], np.mean)
        results[task] = averaged
    results["config"] = dataclasses.asdict(config)
    results["dataset_sizes"] = {t: {"train": len(a), "test": len(b)} for t, (a, b) in data.items()}
    results["timing"] = {"data_seconds": t_data - t0, "total_seconds": time.perf_counter() - t0}
    results["environment"] = environment()
    state.write_results(results)
    if state.out is not None:
        report.write_pareto_plots(results, state.out)
    return results
