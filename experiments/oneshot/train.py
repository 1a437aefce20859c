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
import json
import os
import platform
import time
from typing import Any

import jax
import optax
from flax import nnx

from experiments.oneshot.configs.base import Config
from jaxcompress import data as jdata
from jaxcompress import masks as jmasks
from jaxcompress import prune
from jaxcompress import train as jtrain
from jaxcompress.models import SmallCNN

__all__ = ["load_datasets", "make_optimizer", "run", "write_plot"]


def load_datasets(config: Config) -> tuple[Any, Any]:
    """Train and test :class:`jaxcompress.data.ArrayDataset` s, subsampled as configured."""
    train_ds = jdata.load(config.dataset, "train", data_dir=config.data_dir)
    test_ds = jdata.load(config.dataset, "test", data_dir=config.data_dir)
    if config.train_subset is not None and config.train_subset < len(train_ds):
        train_ds = jdata.subset(train_ds, config.train_subset, seed=config.seed)
    if config.test_subset is not None and config.test_subset < len(test_ds):
        test_ds = jdata.subset(test_ds, config.test_subset, seed=config.seed)
    return train_ds, test_ds


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    r"""SGD as torch does it: :math:`d = g + \lambda\theta`, :math:`b \leftarrow \mu b + d`,
    :math:`\theta \leftarrow \theta - \eta_t b`, with :math:`\eta_t` a cosine decay from
    ``learning_rate`` to 0 over ``total_steps`` (Loshchilov & Hutter, 2017)."""
    schedule = optax.cosine_decay_schedule(config.learning_rate, decay_steps=total_steps)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )


def _sparsity_of(params: Any, where) -> float:
    return float(jmasks.summary(params, where=where).sparsity)


def nm_selector(m: int):
    """Prunable kernels whose contracting (input) dimension splits into groups of ``m``."""

    def where(path, leaf) -> bool:
        return jmasks.prunable(path, leaf) and leaf.shape[-2] % m == 0

    return where


def prune_and_measure(model, dense_state, calib, test_ds, config, **criterion) -> dict:
    """Restore the dense weights, prune, evaluate, recalibrate BN, evaluate."""
    nnx.update(model, dense_state)
    params = nnx.state(model, nnx.Param)
    pruned, _ = prune.oneshot(params, **criterion)
    nnx.update(model, pruned)
    where = criterion.get("where") or jmasks.prunable
    raw = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    start = time.perf_counter()
    prune.recalibrate_batchnorm(
        model,
        calib,
        num_batches=config.calib_batches,
        momentum=config.calib_momentum,
        mode=config.calib_mode,
    )
    calib_seconds = time.perf_counter() - start
    recal = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    return {
        "raw": raw["accuracy"],
        "bn_recalibrated": recal["accuracy"],
        "raw_loss": raw["loss"],
        "bn_recalibrated_loss": recal["loss"],
        "actual_sparsity": _sparsity_of(pruned, where),
        "recalibration_seconds": calib_seconds,
    }


def run(config: Config, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``metrics.jsonl`` and the plot to ``out``.

    Args:
      config: a :class:`Config` (validated first).
      out: output directory (created); ``None`` writes nothing.

    Returns:
      The results dict (also ``results.json``): ``dense_accuracy``, ``dense_loss``,
      ``oneshot[str(s)] = {"raw", "bn_recalibrated", "actual_sparsity", ...}``,
      ``nm_{n}_{m}`` likewise (when ``config.nm``), ``history``, ``config``, ``timing``,
      ``environment``.
    """
    if not isinstance(config, Config):
        raise TypeError(
            f"config must be an experiments.oneshot Config, got {type(config).__name__}"
        )
    config.validate()
    t0 = time.perf_counter()
    train_ds, test_ds = load_datasets(config)
    if config.batch_size > len(train_ds):
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the training set ({len(train_ds)})"
        )
    t_data = time.perf_counter()

    channels = train_ds.x.shape[-1]
    model = SmallCNN(channels, train_ds.num_classes, config.widths, rngs=nnx.Rngs(config.seed))
    total_steps = config.epochs * (len(train_ds) // config.batch_size)
    metrics_path = None if out is None else os.path.join(out, "metrics.jsonl")
    history = jtrain.fit(
        model,
        make_optimizer(config, total_steps),
        train_ds,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=config.progress,
        metrics_path=metrics_path,
        eval_batch_size=config.eval_batch_size,
    )
    model.eval()
    dense = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    t_train = time.perf_counter()

    dense_state = jax.tree.map(lambda a: a.copy(), nnx.state(model))
    calib = prune.calibration_batches(
        train_ds,
        num_batches=config.calib_batches,
        batch_size=min(config.calib_batch_size, len(train_ds)),
        seed=config.seed,
    )
    oneshot = {}
    for s in config.sparsities:
        oneshot[f"{s:g}"] = prune_and_measure(
            model, dense_state, calib, test_ds, config, sparsity=float(s), scope="global"
        )
    results: dict[str, Any] = {
        "dense_accuracy": dense["accuracy"],
        "dense_loss": dense["loss"],
        "oneshot": oneshot,
    }
    if config.nm is not None:
        n, m = config.nm
        results[f"nm_{n}_{m}"] = prune_and_measure(
            model, dense_state, calib, test_ds, config, n=n, m=m, where=nm_selector(m)
        )
    nnx.update(model, dense_state)
    t_prune = time.perf_counter()

    results["history"] = history.epochs
    results["config"] = dataclasses.asdict(config)
    results["dataset_sizes"] = {"train": len(train_ds), "test": len(test_ds)}
    results["timing"] = {
        "data_seconds": t_data - t0,
        "train_seconds": t_train - t_data,
        "prune_and_recalibrate_seconds": t_prune - t_train,
        "total_seconds": t_prune - t0,
    }
    results["environment"] = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        write_plot(results, os.path.join(out, "accuracy_vs_sparsity.png"))
    return results


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the results."""
    lines = [
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
