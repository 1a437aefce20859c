r"""The CrAM experiment: is a CrAM+-trained model prunable in one shot, where an SGD one is not?

Claim tested (Peste, Vladu, Kurtic, Lampert, Alistarh, "CrAM: A Compression-Aware Minimizer",
ICLR 2023, arXiv:2207.14200; algorithms.md section 1): training with CrAM+,

.. math::

    \theta \leftarrow \theta - \eta\,\bigl[\nabla L(\theta)
        + M \odot \nabla L(C_k(\theta + \rho\,\nabla L(\theta)))\bigr],
    \qquad M = \mathrm{mask}\,C_k(\theta + \rho\,\nabla L(\theta)),

with :math:`C_k` a compression operator drawn at random every step, gives a *dense* model as
accurate as SGD whose one-shot compressions (followed by BatchNorm re-estimation, "BNT") lose
little accuracy over the trained range of compressions. Two CrAM+ variants are trained:

* **CrAM+Multi** (``cram``): :math:`C_k` is global magnitude pruning at a sparsity drawn from
  ``cram_sparsities`` (the reference's ImageNet setting uses :math:`\{0.5, 0.7, 0.9\}`);
* **CrAM+N:M** (``cram_nm``): :math:`C_k` is N:M pruning with a pattern drawn from
  ``nm_patterns`` (2:4 or 4:8 with probability 1/2 each, as the reference ``NMTopkCrAM``).

Pipeline of :func:`run`, for every seed:

1. train one model per method, each from the same initialisation and data order, with SGD
   (heavy-ball momentum, coupled weight decay, cosine learning rate:
   :func:`experiments._common.make_sgd`) as the optimizer or as CrAM's inner
   optimizer (:func:`jaxcompress.optim.cram`, ``pass_grad_fn=True``);
2. for every trained model: evaluate it dense; then, restoring the dense weights each time,
   prune it one-shot (global magnitude at each of ``sparsities``, and each N:M pattern), evaluate
   ("raw"), recalibrate BatchNorm on ``calib_batches`` batches from a random training subset
   (the reference BNT: 100 batches of 128, EMA momentum 0.1) and evaluate again;
3. average over seeds; write ``results.json``, per-method ``metrics_<method>_seed<k>.jsonl``
   training curves and ``accuracy_vs_sparsity.png``.

N:M (training and pruning) applies to every conv/dense kernel whose contracting (input)
dimension is divisible by every ``m`` of ``nm_patterns`` (lcm), so a first conv with one input
channel stays dense: the same set of kernels for 2:4 and 4:8 and for every model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from experiments._common import (
    Run,
    aggregate,
    build_model,
    environment,
    experiment_run,
    fit_stage,
    is_primary,
    local_model,
    make_sgd,
    prepare_run,
    prune_and_measure,
    run_header,
    seed_list,
    stage_bar,
)
from experiments._common import nm_selector as nm_selector_for_group
from experiments.cram.configs.base import METHODS, Config
from jaxcompress import optim, prune
from jaxcompress import train as jtrain

__all__ = [
    "build_model",
    "format_table",
    "make_transform",
    "nm_selector",
    "oneshot_sweep",
    "run",
    "write_plot",
]

#: Labels of the methods in tables and plots.
METHOD_LABELS = {"sgd": "SGD", "cram": "CrAM+Multi", "cram_nm": "CrAM+N:M"}


def sparsity_key(s: float) -> str:
    """The results key of a global sparsity level, e.g. ``"0.9"``."""
    return f"{float(s):g}"


def nm_key(n: int, m: int) -> str:
    """The results key of an N:M pattern, e.g. ``"2:4"``."""
    return f"{n}:{m}"


def nm_selector(config: Config):
    """Conv/dense kernels whose contracting dimension is divisible by every ``m`` (their lcm)."""
    return nm_selector_for_group(math.lcm(*(m for _, m in config.nm_patterns)))


def make_transform(
    config: Config, method: str, total_steps: int, seed: int
) -> optax.GradientTransformation:
    """The optimizer of ``method``: SGD, or CrAM+ (Multi or N:M) wrapping the same SGD.

    SGD is torch's (coupled weight decay, heavy-ball momentum) with a cosine learning rate over
    ``total_steps``; CrAM+ keeps the reference defaults (``plus=True``, ``sparse_grad=True``, no
    gradient normalisation) with radius ``config.rho``; its operator draws are seeded by ``seed``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sgd = make_sgd(config, total_steps)
    if method == "sgd":
        return sgd
    if method == "cram":
        return optim.cram(
            sgd,
            rho=config.rho,
            sparsities=tuple(float(s) for s in config.cram_sparsities),
            compressor="global",
            seed=seed,
        )
    return optim.cram(
        sgd,
        rho=config.rho,
        compressor="nm",
        nm_patterns=config.nm_patterns,
        where=nm_selector(config),
        seed=seed,
    )


def oneshot_sweep(
    model: nnx.Module,
    config: Config,
    calib: list[np.ndarray],
    test_ds: Any,
    desc: str = "prune + recalibrate",
) -> dict[str, Any]:
    """Dense accuracy, then one-shot global and N:M pruning of ``model``, each with BNT (one
    progress bar, ``desc``, when ``config.progress``).

    The model is left with its dense weights and statistics. Returns ``{"dense", "dense_loss",
    "oneshot": {key: entry}, "nm": {key: entry}}`` with each entry as returned by
    :func:`experiments._common.prune_and_measure` (``raw``, ``bn_recalibrated``,
    ``actual_sparsity``, ...).
    """
    model.eval()
    dense = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    dense_state = jax.tree.map(lambda a: a.copy(), nnx.state(model))
    where_nm = nm_selector(config)
    criteria = [
        ("oneshot", sparsity_key(s), {"sparsity": float(s), "scope": "global"})
        for s in config.sparsities
    ] + [("nm", nm_key(n, m), {"n": n, "m": m, "where": where_nm}) for n, m in config.nm_patterns]
    measured: dict[str, dict[str, Any]] = {"oneshot": {}, "nm": {}}
    with stage_bar(len(criteria), desc, config.progress) as bar:
        for kind, key, criterion in criteria:
            measured[kind][key] = prune_and_measure(
                model, dense_state, calib, test_ds, config, **criterion
            )
            bar.update(1)
    oneshot, nm = measured["oneshot"], measured["nm"]
    nnx.update(model, dense_state)
    return {"dense": dense["accuracy"], "dense_loss": dense["loss"], "oneshot": oneshot, "nm": nm}


def _train(
    config: Config, method: str, seed: int, train_ds: Any, run: Run, stage: str
) -> tuple[nnx.Module, jtrain.History]:
    model = build_model(config, train_ds.x.shape[-1], train_ds.num_classes, seed)
    total_steps = config.epochs * (len(train_ds) // config.batch_size)
    history = fit_stage(
        model,
        make_transform(config, method, total_steps, seed),
        train_ds,
        config,
        desc=f"train {METHOD_LABELS[method]} (seed {seed})",
        seed=seed,
        metrics_path=None
        if run.out is None
        else os.path.join(run.out, f"metrics_{method}_seed{seed}.jsonl"),
        pass_grad_fn=method != "sgd",
        **run.fit_kwargs(stage),
    )
    return local_model(model), history


def _method_stage(config: Config, method: str, seed: int, train_ds, test_ds, calib, run: Run):
    """Train ``method`` (resuming its checkpoint) and sweep its one-shot prunings: the stage
    ``<method>_seed<k>``, whose record a rerun reads back instead of redoing it."""
    stage = f"{method}_seed{seed}"
    done = run.stage(stage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    model, history = _train(config, method, seed, train_ds, run, stage)
    t1 = time.perf_counter()
    desc = f"prune {METHOD_LABELS[method]} (seed {seed})"
    sweep = oneshot_sweep(model, config, calib, test_ds, desc)
    record = {
        "train_seconds": t1 - t0,
        "prune_seconds": time.perf_counter() - t1,
        "history": history.epochs,
        "sweep": sweep,
    }
    return run.finish_stage(stage, record)


def _run_seed(config: Config, seed: int, train_ds, test_ds, run: Run) -> dict[str, Any]:
    calib = prune.calibration_batches(
        train_ds,
        num_batches=config.calib_batches,
        batch_size=min(config.calib_batch_size, len(train_ds)),
        seed=seed,
    )
    record: dict[str, Any] = {
        "seed": seed,
        "dense": {},
        "dense_loss": {},
        "oneshot": {},
        "nm": {},
        "raw": {"oneshot": {}, "nm": {}},
        "actual_sparsity": {"oneshot": {}, "nm": {}},
        "history": {},
        "train_seconds": {},
        "prune_seconds": {},
    }
    for method in config.methods:
        stage = _method_stage(config, method, seed, train_ds, test_ds, calib, run)
        sweep = stage["sweep"]
        record["prune_seconds"][method] = stage["prune_seconds"]
        record["train_seconds"][method] = stage["train_seconds"]
        record["history"][method] = stage["history"]
        record["dense"][method] = sweep["dense"]
        record["dense_loss"][method] = sweep["dense_loss"]
        for kind in ("oneshot", "nm"):
            entries = sweep[kind]
            record[kind][method] = {k: v["bn_recalibrated"] for k, v in entries.items()}
            record["raw"][kind][method] = {k: v["raw"] for k, v in entries.items()}
            record["actual_sparsity"][kind][method] = {
                k: v["actual_sparsity"] for k, v in entries.items()
            }
    return record


@experiment_run(Config)
def run(config: Config, resumed: Run) -> dict[str, Any]:
    """Run ``config`` (validated first); write ``results.json``,
    training curves and the plot to ``out`` (checked first; ``None`` writes nothing).

    An ``out`` holding an earlier run of ``config`` resumes it (:func:`experiments._common.
    open_run`): each method's training resumes from its latest checkpoint, a method already
    trained and swept is read back, and a finished run returns its ``results.json`` unless
    ``restart``; an ``out`` holding another config is refused. ``mesh`` (``"data=8"``,
    ``"data=4,fsdp=2"``) shards the training.

    Returns:
      The results dict (also ``results.json``). Accuracies are BN-recalibrated test accuracies,
      means over the seeds:

      * ``dense[method]``; ``oneshot[method][str(s)]``; ``nm[method]["n:m"]``;
      * ``raw``: the same ``oneshot``/``nm`` accuracies before BN recalibration;
      * ``std``: sample standard deviations of ``dense``/``oneshot``/``nm``/``raw`` over
        seeds (only when ``num_seeds > 1``);
      * ``actual_sparsity``: measured sparsity of the pruned kernels;
      * ``per_seed``: every seed's record, with its training ``history`` per method;
      * ``config``, ``header`` (what was run, one line), ``timing`` (seconds),
        ``dataset_sizes``, ``environment``.
    """
    t0 = time.perf_counter()
    out, train_ds, test_ds, sizes = prepare_run(config, resumed.out)
    t_data = time.perf_counter()

    seeds = seed_list(config)
    per_seed = [_run_seed(config, seed, train_ds, test_ds, resumed) for seed in seeds]
    t_end = time.perf_counter()

    accuracy_keys = ("dense", "oneshot", "nm", "raw")
    keys = (*accuracy_keys, "dense_loss", "actual_sparsity", "train_seconds", "prune_seconds")
    mean, std = aggregate([{k: r[k] for k in keys} for r in per_seed])
    results: dict[str, Any] = {k: mean[k] for k in accuracy_keys}
    if std is not None:
        results["std"] = {k: std[k] for k in accuracy_keys}
    results["dense_loss"] = mean["dense_loss"]
    results["actual_sparsity"] = mean["actual_sparsity"]
    results["per_seed"] = per_seed
    results["config"] = {**dataclasses.asdict(config), "seeds": seeds}
    results["header"] = run_header(config, sizes, seeds, model=config.model, rho=config.rho)
    results["dataset_sizes"] = sizes
    train_seconds = {m: s * len(seeds) for m, s in mean["train_seconds"].items()}
    results["timing"] = {
        "data_seconds": t_data - t0,
        "train_seconds": train_seconds,
        "seconds_per_epoch": {
            m: s / (config.epochs * len(seeds)) for m, s in train_seconds.items()
        },
        "prune_and_recalibrate_seconds": {
            m: s * len(seeds) for m, s in mean["prune_seconds"].items()
        },
        "total_seconds": t_end - t0,
    }
    results["environment"] = environment(mesh=resumed.mesh)
    if out is not None and is_primary():
        write_plot(results, os.path.join(out, "accuracy_vs_sparsity.png"))
    resumed.write_results(results)  # last: the run is finished
    return results


def _epochs(config: dict[str, Any]) -> str:
    return f"{config['epochs']} epoch{'' if config['epochs'] == 1 else 's'}"


def _cell(results: dict[str, Any], path: tuple[str, ...]) -> str:
    value: Any = results
    for key in path:
        value = value[key]
    text = f"{100 * value:6.2f}"
    if "std" in results:
        std: Any = results["std"]
        for key in path:
            std = std[key]
        text += f"±{100 * std:4.2f}"
    return text


def format_table(results: dict[str, Any]) -> str:
    """Plain-text tables (test accuracy in %): after one-shot pruning + BNT, and before BNT."""
    methods = list(results["dense"])
    levels = list(next(iter(results["oneshot"].values())))
    patterns = list(next(iter(results["nm"].values())))
    width = 13 if "std" in results else 7
    header = f"{'method':<11} {'dense':>{width}}" + "".join(
        f" {k:>{width}}" for k in [*(f"{float(s):.0%}" for s in levels), *patterns]
    )
    cfg = results["config"]
    what = results.get("header") or (
        f"{cfg['model']} on {cfg['dataset']}, {_epochs(cfg)}, rho={cfg['rho']}, "
        f"seeds={cfg['seeds']}"
    )
    lines = [what, "test accuracy (%) after one-shot pruning"]
    for title, source in (("with BN recalibration", None), ("raw (no BN recalibration)", "raw")):
        lines += ["", f"-- {title}", header]
        for method in methods:
            row = f"{METHOD_LABELS[method]:<11} {_cell(results, ('dense', method)):>{width}}"
            for kind, keys in (("oneshot", levels), ("nm", patterns)):
                for key in keys:
                    path = (kind, method, key) if source is None else (source, kind, method, key)
                    row += f" {_cell(results, path):>{width}}"
            lines.append(row)
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: str) -> None:
    """Accuracy (after one-shot pruning + BNT) vs sparsity: one line per method, dashed dense
    references, N:M patterns as markers at their sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    std = results.get("std")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    nm_markers = ["^", "v", "D", "P", "X"]
    for i, method in enumerate(results["dense"]):
        color = colors[i % len(colors)]
        label = METHOD_LABELS[method]
        levels = sorted(results["oneshot"][method].items(), key=lambda kv: float(kv[0]))
        xs = [float(k) for k, _ in levels]
        ys = [v for _, v in levels]
        errs = None if std is None else [std["oneshot"][method][k] for k, _ in levels]
        ax.errorbar(xs, ys, yerr=errs, fmt="o-", color=color, capsize=3, label=f"{label}, global")
        ax.axhline(results["dense"][method], color=color, ls="--", lw=1, label=f"{label}, dense")
        for j, (key, acc) in enumerate(results["nm"][method].items()):
            x = results["actual_sparsity"]["nm"][method][key]
            err = None if std is None else std["nm"][method][key]
            ax.errorbar(
                [x + 0.006 * (i - 1)],
                [acc],
                yerr=err,
                fmt=nm_markers[j % len(nm_markers)],
                color=color,
                ms=8,
                mfc="none",
                label=f"{label}, {key}",
            )
    cfg = results["config"]
    ax.set_xlabel("sparsity of the pruned kernels")
    ax.set_ylabel("test accuracy after one-shot pruning + BNT")
    ax.set_title(f"{cfg['model']} on {cfg['dataset']}: SGD vs CrAM+ ({_epochs(cfg)})")
    lows = [v for m in results["oneshot"].values() for v in m.values()]
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
