"""The SPDY experiment: per-layer compression profiles at fixed modelled speedups.

Claim tested (Frantar & Alistarh, "SPDY", ICML 2022, Sec. 5; algorithms.md 3.4-3.5): at the
same modelled speedup, the profile found by SPDY's search (DP over searched per-layer error
coefficients, scored by the calibration loss of the stitched, reconstructed model) is at
least as accurate as the DP on the error prior alone (coefficients 1), uniform levels and
global magnitude, when every profile gets the same reconstruction (layer-wise AdaPrune
database, then global AdaPrune).

Pipeline of :func:`run`:

1. train :class:`jaxcompress.models.SmallCNN` (or restore ``config.checkpoint``); save an Orbax
   checkpoint to ``<out>/checkpoint``;
2. draw ``calib_samples`` training images (no augmentation) and capture every layer's dense
   input with the functional forward of :mod:`experiments.spdy.model`;
3. two option families over the same sparsity levels (0 plus ``num_levels`` geometric in
   density from ``min_sparsity`` to ``max_sparsity``):

   * ``unstructured_flops``: magnitude masks on all conv/dense kernels, timing table from
     FLOPs (``TimingTable.from_flops``: time = MACs x density). A dense CPU convolution does
     not run faster with zeros in its kernel (``results["unstructured_cpu_check"]`` measures
     it), so this table models a sparse runtime, not this machine;
   * ``structured_measured``: output-channel masks (filter L2 norm) on the conv kernels, the
     table measured on this machine with :func:`jaxcompress.spdy.measure` (each conv+BN+ReLU
     with fewer output channels, full input width);

4. per family, a layer-wise AdaPrune database (:func:`jaxcompress.spdy.build_database`); for
   each target speedup the profiles ``spdy`` (search), ``dp`` (prior, coefficients 1),
   ``uniform`` and ``global_magnitude``; each stitched, scored, globally AdaPruned, evaluated;
5. end-to-end CPU time of each compressed model against the table's prediction: structured
   models are physically sliced (fewer channels), unstructured ones run the dense ops;
6. write ``results.json``, ``profiles.png`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.oneshot.train import load_datasets, make_optimizer
from experiments.spdy import model as fmodel
from experiments.spdy.configs.base import Config
from jaxcompress import spdy
from jaxcompress import train as jtrain
from jaxcompress.checkpoint import Checkpointer
from jaxcompress.masks import keep_count
from jaxcompress.models import SmallCNN
from jaxcompress.spdy._reconstruct import (
    build_database,
    channel_mask,
    global_adaprune,
    unstructured_mask,
)
from jaxcompress.spdy._search import search

__all__ = ["FAMILIES", "METHODS", "format_table", "levels", "run", "write_plot"]

FAMILIES = ("unstructured_flops", "structured_measured")
METHODS = ("spdy", "dp", "uniform", "global_magnitude")


def levels(config: Config) -> tuple[float, ...]:
    """``0`` then ``num_levels`` sparsities geometric in density (the reference's ``gen``)."""
    d0, d1 = 1.0 - config.min_sparsity, 1.0 - config.max_sparsity
    n = config.num_levels
    dens = [d0 * (d1 / d0) ** (k / max(n - 1, 1)) for k in range(n)]
    return (0.0, *(round(1.0 - d, 4) for d in dens))


# ------------------------------------------------------------------------------ model


def _train_or_restore(config: Config, train_ds, out) -> tuple[SmallCNN, list]:
    channels = train_ds.x.shape[-1]
    model = SmallCNN(channels, train_ds.num_classes, config.widths, rngs=nnx.Rngs(config.seed))
    if config.checkpoint is not None:
        with Checkpointer(config.checkpoint) as ckpt:
            target = {"model_state": jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model)))}
            state = ckpt.restore(target=target)["model_state"]
        nnx.update(model, state)
        model.eval()
        return model, []
    total = config.epochs * (len(train_ds) // config.batch_size)
    history = jtrain.fit(
        model,
        make_optimizer(config, total),
        train_ds,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=config.progress,
        metrics_path=None if out is None else os.path.join(out, "metrics.jsonl"),
        eval_batch_size=config.eval_batch_size,
    )
    model.eval()
    if out is not None:
        with Checkpointer(os.path.join(os.path.abspath(out), "checkpoint")) as ckpt:
            ckpt.save(0, model_state=nnx.to_pure_dict(nnx.state(model)))
    return model, history.epochs


# ---------------------------------------------------------------------- evaluation


def _make_eval(arch: fmodel.Arch, gated: bool):
    @jax.jit
    def sums(params, stats, x, y):
        logits, _ = fmodel.forward(arch, params, stats, x, gated=gated)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        return jnp.sum(ce), jnp.sum(jnp.argmax(logits, -1) == y)

    def evaluate(params, stats, x, y, batch):
        loss = correct = 0.0
        for i in range(0, len(x), batch):
            a, b = sums(params, stats, jnp.asarray(x[i : i + batch]), jnp.asarray(y[i : i + batch]))
            loss, correct = loss + float(a), correct + float(b)
        return loss / len(x), correct / len(x)

    return evaluate


# ------------------------------------------------------------------------- tables


def _flops(arch: fmodel.Arch, params: dict, taps: dict) -> dict[str, float]:
    """Dense multiply-accumulates per image of every conv/dense layer."""
    out = {}
    for i, s in enumerate(arch.strides):
        name = f"blocks/{i}/conv/kernel"
        k = params["blocks"][i]["conv"]["kernel"]
        h, w = taps[name].shape[1:3]
        out[name] = float(math.ceil(h / s) * math.ceil(w / s) * np.prod(k.shape))
    out["head/kernel"] = float(np.prod(params["head"]["kernel"].shape))
    return out


def _block(kernel, x, scale, bias, mean, var, *, stride):
    z = fmodel.conv(kernel, x, stride=stride)
    z = (z - mean) * jax.lax.rsqrt(var + fmodel.BN_EPSILON)
    return jax.nn.relu(z * scale + bias)


def _measured_table(arch, params, stats, taps, lv, config) -> spdy.TimingTable:
    """Each conv+BN+ReLU timed with ``keep_count(C, s)`` output channels (full input)."""

    def builder_for(i):
        k = np.asarray(params["blocks"][i]["conv"]["kernel"])
        bn, st = params["blocks"][i]["bn"], stats["blocks"][i]["bn"]
        x = jnp.asarray(taps[f"blocks/{i}/conv/kernel"][: config.timing_batch])
        stride = arch.strides[i]

        def builder(s):
            c = keep_count(k.shape[-1], float(s))
            fn = lambda *a: _block(*a, stride=stride)  # noqa: E731
            return fn, (
                jnp.asarray(k[..., :c]),
                x,
                jnp.asarray(bn["scale"][:c]),
                jnp.asarray(bn["bias"][:c]),
                jnp.asarray(st["mean"][:c]),
                jnp.asarray(st["var"][:c]),
            )

        return builder

    x0 = jnp.asarray(taps["blocks/0/conv/kernel"][: config.timing_batch])
    whole = (lambda p, s, x: fmodel.forward(arch, p, s, x)[0], (params, stats, x0))
    return spdy.measure(
        {name: builder_for(i) for i, name in enumerate(arch.names(head=False))},
        lv,
        model=whole,
        repeats=config.timing_repeats,
    )


def _unstructured_cpu_check(arch, params, taps, config) -> dict:
    """Time the largest conv with its dense kernel and with 90% of it zeroed (same dense op)."""
    i = len(arch.strides) - 1
    name = f"blocks/{i}/conv/kernel"
    k = np.asarray(params["blocks"][i]["conv"]["kernel"])
    masked = np.where(unstructured_mask(k, 0.9), k, 0).astype(k.dtype)
    x = jnp.asarray(taps[name])
    fn = lambda kk, xx: fmodel.conv(kk, xx, stride=arch.strides[i])  # noqa: E731
    t_dense, _ = spdy.time_callable(fn, (jnp.asarray(k), x), repeats=config.timing_repeats)
    t_masked, _ = spdy.time_callable(fn, (jnp.asarray(masked), x), repeats=config.timing_repeats)
    return {
        "layer": name,
        "sparsity": 0.9,
        "dense_seconds": t_dense,
        "masked_seconds": t_masked,
        "masked_over_dense": t_masked / t_dense,
    }


# ----------------------------------------------------------------------- profiles


def _fits(table: spdy.TimingTable, choice, budget: float) -> bool:
    return sum(float(t[j]) for t, j in zip(table.times(), choice, strict=True)) <= budget


def _uniform_choice(table, budget: float, n_options: int):
    for j in range(n_options):
        if _fits(table, [j] * len(table), budget):
            return np.full(len(table), j, np.int64)
    return None


def _global_choice(scores: list[np.ndarray], lv, table, budget: float):
    """Smallest global sparsity ``g`` (grid of 400) whose induced per-layer sparsities, rounded
    up to the next level, fit the budget. ``scores``: per-layer importance of every unit."""
    flat = np.sort(np.concatenate(scores))
    lv = np.asarray(lv)
    for g in np.linspace(0.0, lv[-1], 400):
        thr = flat[min(int(g * flat.size), flat.size - 1)] if g > 0 else -np.inf
        choice = []
        for s in scores:
            frac = float(np.mean(s < thr))
            choice.append(int(min(np.searchsorted(lv, frac - 1e-9), len(lv) - 1)))
        if _fits(table, choice, budget):
            return np.asarray(choice, np.int64)
    return None


# --------------------------------------------------------------------------------- run


def _family_setup(family, arch, params, stats, taps, lv, config):
    """Layers, timing table, mask function, gating and global-magnitude unit scores.

    Global magnitude ranks ``|w|`` over all layers (unstructured) or, for channels, the RMS of
    each filter (its L2 norm over ``sqrt(fan_in)``, so layers of different fan-in compare).
    """
    if family == "unstructured_flops":
        names = arch.names()
        table = spdy.TimingTable.from_flops(_flops(arch, params, taps), lv)
        mask_fn, gated = unstructured_mask, False
        kernels = [np.asarray(_leaf(params, n)) for n in names]
        scores = [np.abs(k).ravel() for k in kernels]
    else:
        names = arch.names(head=False)
        table = _measured_table(arch, params, stats, taps, lv, config)
        mask_fn, gated = channel_mask, True
        kernels = [np.asarray(_leaf(params, n)) for n in names]
        scores = [
            np.sqrt((k.reshape(-1, k.shape[-1]).astype(np.float64) ** 2).mean(axis=0))
            for k in kernels
        ]
    return names, table, mask_fn, gated, scores


def _leaf(params: dict, name: str):
    node = params
    for part in name.split("/"):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def _run_family(family, arch, params, stats, calib, test, lv, config) -> dict:
    xc, yc = calib
    log = print if config.progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    _, taps = jax.jit(lambda p, s, x: fmodel.forward(arch, p, s, x))(params, stats, xc)
    names, table, mask_fn, gated, scores = _family_setup(
        family, arch, params, stats, taps, lv, config
    )
    t_table = time.perf_counter()
    fns = {n: fn for n, fn in fmodel.layer_fns(arch).items() if n in names}
    db = build_database(
        params,
        fns,
        {n: taps[n] for n in names},
        lv,
        mask_fn=mask_fn,
        lr=config.adaprune_lr,
        epochs=config.adaprune_epochs,
        batch_size=config.adaprune_batch,
        seed=config.seed,
        progress=config.progress,
    )
    t_db = time.perf_counter()
    evaluate = _make_eval(arch, gated)

    def taps_fn(p, x):  # one per family run: global AdaPrune compiles once per family
        return fmodel.forward(arch, p, stats, x, gated=gated)[1]

    eb = config.eval_batch_size

    def calib_loss(choice) -> float:
        p, _ = db.stitch(params, choice)
        return evaluate(p, stats, xc, yc, eb)[0]

    x_time = jnp.asarray(taps["blocks/0/conv/kernel"][: config.timing_batch])
    forward_fn = lambda p, s, x: fmodel.forward(arch, p, s, x)[0]  # noqa: E731
    fixed = table.base - float(np.sum(table.dense_times()))
    out: dict[str, Any] = {
        "layers": list(names),
        "table": json.loads(table.to_json()),
        "database": {
            n: {"errors": db.errors[n].tolist(), "raw_errors": db.raw_errors[n].tolist()}
            for n in names
        },
        "targets": {},
    }
    for target in config.speedups:
        key = f"{target:g}"
        best = spdy.max_speedup(table)
        if target > best * (1 - 1e-9):
            out["targets"][key] = {"unreachable": True, "max_speedup": best}
            log(f"[{family}] target {target}x unreachable (max {best:.3f}x)")
            continue
        budget = spdy.budget(table, target)
        prior = spdy.prior_errors(table)
        res = search(
            prior,
            table,
            budget,
            calib_loss,
            seed=config.seed,
            randinits=config.randinits,
            maxnoimp=config.maxnoimp,
            layerperc=config.layerperc,
            buckets=config.buckets,
            progress=config.progress,
        )
        profiles = {
            "spdy": res.choice,
            "dp": np.asarray(
                spdy.solve(prior, table.times(), budget, buckets=config.buckets).choice
            ),
            "uniform": _uniform_choice(table, budget, len(lv)),
            "global_magnitude": _global_choice(scores, lv, table, budget),
        }
        entry: dict[str, Any] = {
            "budget": budget,
            "search": {
                "score": res.score,
                "evaluations": res.evaluations,
                "candidates": res.candidates,
                "seconds": res.seconds,
                "history": res.history.tolist(),
                "coefficients": res.coefficients.tolist(),
            },
        }
        for method, choice in profiles.items():
            if choice is None:
                entry[method] = {"infeasible": True}
                continue
            p, m = db.stitch(params, choice)
            loss_lw, acc_lw = evaluate(p, stats, test[0], test[1], eb)
            p_gap, _ = global_adaprune(
                p,
                m,
                params,
                taps_fn,
                fns,
                xc,
                lr=config.gap_lr,
                epochs=config.gap_epochs,
                batch_size=config.gap_batch,
                seed=config.seed,
            )
            loss_gap, acc_gap = evaluate(p_gap, stats, test[0], test[1], eb)
            chosen = float(sum(t[j] for t, j in zip(table.times(), choice, strict=True)))
            predicted = fixed + chosen
            # dense and compressed timed back to back: the machine's load drifts over a run
            t_dense, _ = spdy.time_callable(
                forward_fn, (params, stats, x_time), repeats=config.timing_repeats
            )
            if gated:
                sp, ss = fmodel.slice_channels(arch, p_gap, stats)
                t_meas, _ = spdy.time_callable(
                    forward_fn, (sp, ss, x_time), repeats=config.timing_repeats
                )
            else:
                t_meas, _ = spdy.time_callable(
                    forward_fn, (p_gap, stats, x_time), repeats=config.timing_repeats
                )
            entry[method] = {
                "choice": [int(c) for c in choice],
                "profile": table.profile(choice),
                "modelled_speedup": spdy.modelled_speedup(table, choice),
                "calib_loss": calib_loss(choice),
                "accuracy_layerwise": acc_lw,
                "loss_layerwise": loss_lw,
                "accuracy_gap": acc_gap,
                "loss_gap": loss_gap,
                "predicted_seconds": predicted if gated else None,
                "measured_seconds": t_meas,
                "measured_over_predicted_seconds": t_meas / predicted if gated else None,
                "dense_measured_seconds": t_dense,
                "measured_speedup": t_dense / t_meas,
                "measured_over_modelled_speedup": t_dense
                / t_meas
                / spdy.modelled_speedup(table, choice),
            }
            log(
                f"[{family}] {target}x {method}: acc {acc_lw:.4f} -> gAP {acc_gap:.4f}, "
                f"modelled {entry[method]['modelled_speedup']:.3f}x, measured "
                f"{entry[method]['measured_speedup']:.3f}x"
            )
        out["targets"][key] = entry
    out["seconds"] = {
        "table": t_table - t0,
        "database": t_db - t_table,
        "profiles": time.perf_counter() - t_db,
    }
    return out


def run(config: Config, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``profiles.png``, ``metrics.jsonl`` and a
    checkpoint to ``out`` (``None`` writes nothing).

    Returns:
      The results dict: ``dense_accuracy``, ``dense_loss``, ``levels``,
      ``unstructured_cpu_check``, ``families[family] = {layers, table, database,
      dense_measured_seconds, targets[str(speedup)] = {budget, search, <method>: {choice,
      profile, modelled_speedup, calib_loss, accuracy_layerwise, accuracy_gap,
      predicted_seconds, measured_seconds, measured_speedup, ...}}}``, ``history``,
      ``config``, ``timing``, ``environment``.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be an experiments.spdy Config, got {type(config).__name__}")
    config.validate()
    if out is not None:
        os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    train_ds, test_ds = load_datasets(config)
    if config.calib_samples > len(train_ds):
        raise ValueError(
            f"calib_samples={config.calib_samples} exceeds the training set ({len(train_ds)})"
        )
    model, history = _train_or_restore(config, train_ds, out)
    t_train = time.perf_counter()

    arch = fmodel.Arch.of(model)
    params, stats = fmodel.split(model)
    rng = np.random.default_rng(config.seed)
    idx = rng.choice(len(train_ds), config.calib_samples, replace=False)
    calib = (np.asarray(train_ds.x[idx], np.float32), np.asarray(train_ds.y[idx], np.int32))
    test = (np.asarray(test_ds.x, np.float32), np.asarray(test_ds.y, np.int32))
    dense_loss, dense_acc = _make_eval(arch, False)(
        params, stats, test[0], test[1], config.eval_batch_size
    )
    lv = levels(config)
    _, taps = fmodel.forward(arch, params, stats, jnp.asarray(calib[0][: config.timing_batch]))
    results: dict[str, Any] = {
        "dense_accuracy": dense_acc,
        "dense_loss": dense_loss,
        "levels": list(lv),
        "unstructured_cpu_check": _unstructured_cpu_check(arch, params, taps, config),
        "families": {},
    }
    for family in FAMILIES:
        results["families"][family] = _run_family(
            family, arch, params, stats, calib, test, lv, config
        )
    t_end = time.perf_counter()
    results["history"] = history
    results["config"] = dataclasses.asdict(config)
    results["dataset_sizes"] = {"train": len(train_ds), "test": len(test_ds)}
    results["timing"] = {
        "train_seconds": t_train - t0,
        "spdy_seconds": t_end - t_train,
        "total_seconds": t_end - t0,
    }
    results["environment"] = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if out is not None:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        write_plot(results, os.path.join(out, "profiles.png"))
    return results


def format_table(results: dict[str, Any]) -> str:
    """Accuracy table: one row per (family, target, method)."""
    lines = [
        f"dense test accuracy {results['dense_accuracy']:.4f}",
        f"{'family':<20} {'target':>6} {'method':<17} {'model x':>7} {'acc LW':>7} "
        f"{'acc gAP':>7} {'calib':>7} {'meas x':>7} {'t meas/pred':>11}",
    ]
    for family, fam in results["families"].items():
        for target, entry in fam["targets"].items():
            if entry.get("unreachable"):
                lines.append(
                    f"{family:<20} {target:>6} unreachable (max {entry['max_speedup']:.2f}x)"
                )
                continue
            for method in METHODS:
                e = entry[method]
                if e.get("infeasible"):
                    lines.append(f"{family:<20} {target:>6} {method:<17} infeasible")
                    continue
                lines.append(
                    f"{family:<20} {target:>6} {method:<17} {e['modelled_speedup']:>7.3f} "
                    f"{e['accuracy_layerwise']:>7.4f} {e['accuracy_gap']:>7.4f} "
                    f"{e['calib_loss']:>7.4f} {e['measured_speedup']:>7.3f} "
                    + (
                        "          -"
                        if e["measured_over_predicted_seconds"] is None
                        else f"{e['measured_over_predicted_seconds']:>11.3f}"
                    )
                )
    chk = results["unstructured_cpu_check"]
    lines.append(
        f"unstructured 90% mask on {chk['layer']}: masked/dense CPU time "
        f"{chk['masked_over_dense']:.3f} (no speedup from zeros in a dense conv)"
    )
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: str) -> None:
    """Per-layer sparsity of every method's profile: one panel per (family, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = results["families"]
    ncols = max(len(f["targets"]) for f in fams.values())
    fig, axes = plt.subplots(
        len(fams), ncols, figsize=(4.2 * ncols, 3.2 * len(fams)), squeeze=False
    )
    for r, (family, fam) in enumerate(fams.items()):
        layers = fam["layers"]
        short = [
            n.replace("/kernel", "").replace("blocks/", "b").replace("/conv", "") for n in layers
        ]
        for c, (target, entry) in enumerate(fam["targets"].items()):
            ax = axes[r][c]
            ax.set_title(f"{family} {target}x", fontsize=9)
            if entry.get("unreachable"):
                ax.text(0.5, 0.5, "unreachable", ha="center", transform=ax.transAxes)
                continue
            width = 0.8 / len(METHODS)
            for k, method in enumerate(METHODS):
                e = entry[method]
                if e.get("infeasible"):
                    continue
                vals = [float(e["profile"][n]) for n in layers]
                xs = np.arange(len(layers)) + (k - (len(METHODS) - 1) / 2) * width
                ax.bar(xs, vals, width, label=f"{method} ({e['accuracy_gap']:.3f})")
            ax.set_xticks(np.arange(len(layers)), short, fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("sparsity" if family.startswith("unstr") else "channels dropped")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
