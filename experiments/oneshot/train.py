"""The one-shot pruning experiment: train a BN CNN, prune in one shot, recalibrate BatchNorm.

Claim tested (CrAM, Peste et al., ICLR 2023, Sec. 4 and algorithms.md 1.3): after one-shot
magnitude pruning of a model trained densely, re-estimating the BatchNorm running statistics on a
few training batches ("BN tuning") recovers much of the accuracy lost to the pruning.

Pipeline of :func:`run`:

1. train :class:`jaxcompress.models.SmallCNN` with SGD (heavy-ball momentum, coupled weight decay)
   and a cosine learning-rate schedule; evaluate the dense model;
2. for every sparsity ``s`` in ``config.sparsities``: global magnitude pruning of every conv/dense
   kernel (:func:`jaxcompress.prune.oneshot`), evaluate ("raw"), recalibrate BatchNorm on
   ``calib_batches`` random training batches (:func:`jaxcompress.prune.recalibrate_batchnorm`),
   evaluate ("bn_recalibrated"); the dense weights are restored before each level;
3. the same for N:M (2:4) pruning, on every kernel whose input dimension is divisible by ``m``
   (a first conv with one input channel stays dense);
4. write ``results.json``, ``metrics.jsonl`` (training curve) and ``accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
from flax import nnx

from experiments._common import (
    Run,
    environment,
    experiment_run,
    is_primary,
    load_datasets,
    local_model,
    make_sgd,
    nm_selector,
    prepare_run,
    prune_and_measure,
    run_header,
    stage_bar,
    train_sgd,
)
from experiments.oneshot.configs.base import Config
from jaxcompress import prune
from jaxcompress import train as jtrain
from jaxcompress.models import SmallCNN

__all__ = ["format_table", "load_datasets", "make_optimizer", "run", "write_plot"]

# The notebooks import ``load_datasets`` (imported above) and ``make_optimizer`` from here; they
# stay until the notebooks import them from ``experiments._common``.
make_optimizer = make_sgd


@experiment_run(Config)
def run(config: Config, resumed: Run) -> dict[str, Any]:
    """Run ``config`` (validated first); write ``results.json``,
    ``metrics.jsonl`` and the plot to ``out`` (checked first; ``None`` writes nothing).

    An ``out`` holding an earlier run of ``config`` resumes it
    (:func:`experiments._common.open_run`): the training resumes from its latest checkpoint, a
    finished training and sweep are read back, a finished run returns its ``results.json``
    unless ``restart``; an ``out`` holding another config is refused. ``mesh`` (``"data=8"``,
    ``"data=4,fsdp=2"``) shards the training.

    Returns:
      The results dict (also ``results.json``, written atomically): ``dense_accuracy``,
      ``dense_loss``, ``oneshot[str(s)] = {"raw", "bn_recalibrated", "actual_sparsity", ...}``,
      ``nm_{n}_{m}`` likewise (when ``config.nm``), ``history``, ``config``, ``header`` (what was
      run, one line), ``dataset_sizes``, ``timing``, ``environment``.
    """
    t0 = time.perf_counter()
    out, train_ds, test_ds, sizes = prepare_run(config, resumed.out)
    t_data = time.perf_counter()
    stage = resumed.stage("train_and_prune") or resumed.finish_stage(
        "train_and_prune", _train_and_prune(config, train_ds, test_ds, out, resumed)
    )
    measured = stage["measured"]
    results: dict[str, Any] = {
        "dense_accuracy": stage["dense"]["accuracy"],
        "dense_loss": stage["dense"]["loss"],
        "oneshot": {k: v for k, v in measured.items() if not k.startswith("nm_")},
        **{k: v for k, v in measured.items() if k.startswith("nm_")},
        "history": stage["history"],
        "config": dataclasses.asdict(config),
        "header": run_header(config, sizes, [config.seed]),
        "dataset_sizes": sizes,
        "timing": {
            "data_seconds": t_data - t0,
            "train_seconds": stage["train_seconds"],
            "prune_and_recalibrate_seconds": stage["prune_seconds"],
            "total_seconds": time.perf_counter() - t0,
        },
        "environment": environment(mesh=resumed.mesh),
    }
    if out is not None and is_primary():
        write_plot(results, os.path.join(out, "accuracy_vs_sparsity.png"))
    resumed.write_results(results)  # last: the run is finished
    return results


def _train_and_prune(config: Config, train_ds, test_ds, out, run: Run) -> dict[str, Any]:
    """Train (resuming the stage's checkpoint), evaluate dense, prune and recalibrate at every
    criterion; the stage record."""
    t0 = time.perf_counter()
    channels = train_ds.x.shape[-1]
    model = SmallCNN(channels, train_ds.num_classes, config.widths, rngs=nnx.Rngs(config.seed))
    history = train_sgd(model, train_ds, config, out, run=run, stage="train_and_prune")
    local_model(model).eval()
    dense = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    t_train = time.perf_counter()
    dense_state = jax.tree.map(lambda a: a.copy(), nnx.state(model))
    calib = prune.calibration_batches(
        train_ds,
        num_batches=config.calib_batches,
        batch_size=min(config.calib_batch_size, len(train_ds)),
        seed=config.seed,
    )
    criteria = {f"{s:g}": {"sparsity": float(s), "scope": "global"} for s in config.sparsities}
    if config.nm is not None:
        n, m = config.nm
        criteria[f"nm_{n}_{m}"] = {"n": n, "m": m, "where": nm_selector(m)}
    measured = {}
    with stage_bar(len(criteria), "prune + recalibrate", config.progress) as bar:
        for key, criterion in criteria.items():
            measured[key] = prune_and_measure(
                model, dense_state, calib, test_ds, config, **criterion
            )
            bar.update(1)
    nnx.update(model, dense_state)
    return {
        "history": history.epochs,
        "dense": dense,
        "measured": measured,
        "train_seconds": t_train - t0,
        "prune_seconds": time.perf_counter() - t_train,
    }


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the results."""
    lines = [
        *([results["header"]] if "header" in results else []),
        f"dense test accuracy: {results['dense_accuracy']:.4f}",
        f"{'pruning':>16}  {'sparsity':>8}  {'raw':>7}  {'BN recal':>8}  {'gain':>7}",
    ]
    rows = [(f"global {k}", v) for k, v in results["oneshot"].items()]
    rows += [
        (k.replace("nm_", "N:M ").replace("_", ":"), v)
        for k, v in results.items()
        if k.startswith("nm_")
    ]
    for name, v in rows:
        gain = v["bn_recalibrated"] - v["raw"]
        lines.append(
            f"{name:>16}  {v['actual_sparsity']:>8.4f}  {v['raw']:>7.4f}  "
            f"{v['bn_recalibrated']:>8.4f}  {gain:>+7.4f}"
        )
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: str) -> None:
    """Accuracy vs sparsity (raw and BN-recalibrated; dense line; N:M markers) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(results["oneshot"].items(), key=lambda kv: float(kv[0]))
    xs = [float(k) for k, _ in levels]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [v["raw"] for _, v in levels], "o-", label="one-shot, raw BN stats")
    ax.plot(xs, [v["bn_recalibrated"] for _, v in levels], "s-", label="one-shot + BN recal.")
    ax.axhline(results["dense_accuracy"], color="k", ls="--", lw=1, label="dense")
    for key, v in results.items():
        if key.startswith("nm_"):
            label = key[3:].replace("_", ":")
            ax.plot([v["actual_sparsity"]], [v["raw"]], "x", ms=9, label=f"{label}, raw")
            ax.plot(
                [v["actual_sparsity"]],
                [v["bn_recalibrated"]],
                "P",
                ms=9,
                label=f"{label} + BN recal.",
            )
    cfg = results["config"]
    ax.set_xlabel("sparsity of conv/dense kernels")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"SmallCNN on {cfg['dataset']}: one-shot pruning")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
