r"""The AC/DC experiment: sparse-dense co-training against GMP and one-shot + fine-tuning.

Claims tested (Peste, Iofinova, Vladu, Alistarh, "AC/DC: Alternating Compressed/DeCompressed
Training of Deep Neural Networks", NeurIPS 2021, arXiv:2106.12379; algorithms.md section 2):

1. at the same epoch budget, AC/DC's sparse model is at least as accurate as gradual magnitude
   pruning (GMP; Zhu & Gupta, 2018, arXiv:1710.01878), more so at high sparsity;
2. the dense model at the end of the last decompressed phase (the "dense half" of the
   sparse-dense pair) is about as accurate as a dense model trained for the whole budget;
3. with part of the training labels randomised, the accuracy on the relabelled examples (with
   respect to their random labels, i.e. memorisation) drops in every compressed phase and
   recovers in the decompressed ones.

Every method trains :class:`jaxcompress.models.SmallCNN` (BatchNorm; or ResNet-8) for the same
:math:`E` epochs with the same inner optimizer, torch-style SGD with coupled weight decay and
heavy-ball momentum, :math:`d = g + \lambda\theta`, :math:`b \leftarrow \mu b + d`,
:math:`\theta \leftarrow \theta - \eta_e b`, and the reference ``CosineLR`` stepped once per
epoch :math:`e`: :math:`\eta_e = \eta_0 (e + 1) / w` for :math:`e < w`, then
:math:`\eta_e = \tfrac12 \eta_0 (1 + \cos(\pi (e - w) / (E - w)))`. Sparsity is global
magnitude over every conv/dense kernel (:func:`jaxcompress.masks.prunable`; biases and
BatchNorm stay dense, as the reference's ``weight_only``). Methods, per target sparsity ``s``:

* ``dense``: the inner SGD alone;
* ``acdc``: :func:`jaxcompress.optim.acdc`, dense warm-up :math:`W`, compressed/decompressed
  phases of :math:`C`/:math:`D` epochs, final compressed phase of :math:`L` epochs
  (:meth:`~experiments.acdc.configs.base.Config.phase_epochs`);
* ``gmp``: :func:`jaxcompress.optim.gmp`, the cubic ramp from 0 at epoch :math:`W` to ``s`` at
  epoch :math:`E - L` with a mask update every epoch, then :math:`L` epochs on the fixed
  support;
* ``oneshot_finetune``: the ``dense`` run's model at epoch :math:`E - L`, pruned once
  (:func:`jaxcompress.prune.oneshot`, global), then trained for the last :math:`L` epochs on
  its fixed support (:func:`jaxcompress.optim.fixed_mask`) with a fresh momentum and the remaining
  part of the same cosine schedule. The split: :math:`E - L` dense epochs shared with
  ``dense``, :math:`L` sparse epochs, :math:`E` in total like every other method.

Phase boundaries and evaluation. :func:`jaxcompress.optim.acdc` computes the mask of a
compressed phase starting at step :math:`t_c` at the end of update :math:`t_c - 1`, which
already zeroes the pruned weights (its module docstring). If the phases started exactly at
epoch boundaries, the model seen at the end of the epoch before a compressed phase would
already be pruned, and neither the dense half nor the end of any decompressed phase could be
evaluated. Every phase boundary is therefore placed **one step after** the epoch boundary
(step :math:`k\,S + 1` for epoch :math:`k`, :math:`S` steps per epoch): the model at the end of
epoch :math:`k` is the fully trained model of the phase that ends there (dense at the end of a
decompressed phase, sparse at the end of a compressed one), and the first update of epoch
:math:`k` computes and applies the new mask. Each phase thus differs from the reference
(whose pruner runs before the epoch's first batch) by one minibatch; GMP's pruning steps get
the same offset. The dense half is then the model at the end of epoch :math:`E - L`, read by
the ``fit`` callback at that epoch boundary.

:func:`run` writes ``results.json`` (see its docstring), ``metrics_<run>_seed<k>.jsonl``
training logs, ``accuracy_curves.png`` (test accuracy per epoch, one panel per method and
sparsity, compressed phases shaded) and ``memorisation.png``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
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
    prepare_run,
    run_header,
    seed_list,
)
from experiments.acdc.configs.base import Config
from jaxcompress import data as jdata
from jaxcompress import masks as jmasks
from jaxcompress import optim, prune
from jaxcompress import train as jtrain

__all__ = [
    "Timeline",
    "build_model",
    "cosine_lr",
    "format_table",
    "make_sgd",
    "make_timeline",
    "run",
    "sparsity_key",
    "write_accuracy_plot",
    "write_memorisation_plot",
]


def sparsity_key(s: float) -> str:
    """The results key of a sparsity, e.g. ``"0.9"``."""
    return f"{float(s):g}"


# --------------------------------------------------------------------------------------------
# Model, optimizer, schedules
# --------------------------------------------------------------------------------------------


def cosine_lr(config: Config, steps_per_epoch: int, offset_steps: int = 0) -> optax.Schedule:
    r"""The reference ``CosineLR`` (stepped per epoch) as an optax schedule over steps.

    Epoch :math:`e = \lfloor (t + \text{offset}) / S \rfloor` of step :math:`t`;
    :math:`\eta_e = \eta_0 (e + 1)/w` during the warm-up :math:`e < w`, else
    :math:`\tfrac12 \eta_0 (1 + \cos(\pi (e - w)/(E - w)))`. ``offset_steps`` continues the
    schedule of a run that already took that many steps (one-shot fine-tuning).
    """
    if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    if not isinstance(offset_steps, int) or offset_steps < 0:
        raise ValueError(f"offset_steps must be a non-negative int, got {offset_steps!r}")
    base = float(config.learning_rate)
    warm = int(config.lr_warmup_epochs)
    span = float(config.epochs - warm)

    def schedule(step):
        epoch = (jnp.asarray(step, jnp.int32) + offset_steps) // steps_per_epoch
        e = epoch.astype(jnp.float32)
        warmup = base * (e + 1.0) / max(warm, 1)
        cosine = 0.5 * base * (1.0 + jnp.cos(jnp.pi * (e - warm) / span))
        return jnp.where(epoch < warm, warmup, cosine)

    return schedule


def make_sgd(
    config: Config, steps_per_epoch: int, offset_steps: int = 0
) -> optax.GradientTransformation:
    """Torch SGD: coupled weight decay, heavy-ball momentum, :func:`cosine_lr`."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(cosine_lr(config, steps_per_epoch, offset_steps), momentum=config.momentum),
    )


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The epoch timeline shared by AC/DC and GMP, and its step schedules.

    Attributes:
      steps_per_epoch: optimizer steps per epoch :math:`S`.
      acdc: the :class:`jaxcompress.optim.AcdcSchedule`, every boundary one step after the
        epoch boundary (module docstring).
      phases: ``(start_epoch, end_epoch, kind)`` with ``kind`` in ``dense``, ``compressed``,
        ``decompressed``.
      final_start: the epoch :math:`E - L` where the final compressed phase starts.
      gmp_begin_step, gmp_end_step, gmp_every: GMP's ramp: first and last pruning steps, one
        mask update per epoch.
      gmp_begin_epoch: :math:`W`, the epoch GMP starts pruning.
    """

    steps_per_epoch: int
    acdc: optim.AcdcSchedule
    phases: tuple[tuple[int, int, str], ...]
    final_start: int
    gmp_begin_step: int
    gmp_end_step: int
    gmp_every: int
    gmp_begin_epoch: int


def make_timeline(config: Config, steps_per_epoch: int) -> Timeline:
    """The AC/DC and GMP step schedules of ``config`` at ``steps_per_epoch`` (at least 2)."""
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 2:
        raise ValueError(
            "steps_per_epoch must be an int >= 2 (phase boundaries sit one step after epoch "
            f"boundaries); got {steps_per_epoch!r}: use a smaller batch_size or more data"
        )
    w, c, d, final = config.phase_epochs()
    spe = steps_per_epoch
    final_start = config.epochs - final
    schedule = optim.AcdcSchedule(
        warmup_steps=w * spe + 1,
        compressed_steps=c * spe,
        decompressed_steps=d * spe,
        final_compressed_start=final_start * spe + 1,
        total_steps=config.epochs * spe,
    )
    phases = tuple((start // spe, end // spe, kind) for start, end, kind in schedule.phases())
    if w == 0:  # the single dense step 0 is not an epoch
        phases = phases[1:]
    return Timeline(
        steps_per_epoch=spe,
        acdc=schedule,
        phases=phases,
        final_start=final_start,
        gmp_begin_step=w * spe + 1,
        gmp_end_step=final_start * spe + 1,
        gmp_every=spe,
        gmp_begin_epoch=w,
    )


# --------------------------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """What :func:`_train` returns: per-epoch curves (index = epochs completed, 0 = init)."""

    test_accuracy: list[float]
    sparsity: list[float]
    probe_accuracy: list[float]
    snapshot: Any
    seconds: float
    history: list[dict[str, Any]]
    mask_change: float | None


def _sparsity(model: nnx.Module) -> float:
    return float(jmasks.summary(nnx.state(model, nnx.Param)).sparsity)


def _pure_state(model: nnx.Module) -> Any:
    return jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.to_pure_dict(nnx.state(model)))


class _Snapshot:
    """The model state at one epoch of a run: in memory, and with a run directory also in
    ``<stage>-snapshot/epoch<k>.npz`` (written atomically by process 0, read by every
    process without collectives), so that a resumed run past that epoch still has it."""

    def __init__(self, directory: str | None):
        self._directory, self.state = directory, None

    def _path(self, epoch: int) -> str:
        return os.path.join(cast(str, self._directory), f"epoch{epoch}.npz")

    def save(self, epoch: int, model: nnx.Module) -> None:
        self.state = _pure_state(local_model(model))
        if self._directory is None or not is_primary() or os.path.exists(self._path(epoch)):
            return  # (a rerun of that epoch computes the same state)
        os.makedirs(self._directory, exist_ok=True)
        leaves = {str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(self.state))}
        with tempfile.NamedTemporaryFile(dir=self._directory, suffix=".npz", delete=False) as f:
            np.savez(f, **leaves)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self._path(epoch))

    def load(self, epoch: int, model: nnx.Module) -> Any:
        if self.state is None and self._directory is not None:
            template = nnx.to_pure_dict(nnx.state(model))
            shapes = [(a.shape, a.dtype) for a in jax.tree.leaves(template)]
            path = self._path(epoch)
            try:  # zip members carry a CRC-32: a corrupted file fails here
                with np.load(path, allow_pickle=False) as saved:
                    leaves = [saved[str(i)] for i in range(len(shapes))]
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
                raise ValueError(f"AC/DC snapshot {path!r} cannot be read: {err}") from err
            for i, (leaf, (shape, dtype)) in enumerate(zip(leaves, shapes, strict=True)):
                if leaf.shape != shape or leaf.dtype != dtype:
                    raise ValueError(
                        f"AC/DC snapshot {path!r}: leaf {i} has {leaf.shape} {leaf.dtype}, the "
                        f"model {shape} {dtype}; rerun with --restart"
                    )
            treedef = jax.tree.structure(template)
            self.state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])
        return self.state


def _train(
    config: Config,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    train_ds: Any,
    test_ds: Any,
    *,
    seed: int,
    epochs: int,
    run: Run,
    stage: str,
    probe_ds: Any = None,
    snapshot_epoch: int | None = None,
    desc: str = "train",
) -> _Run:
    """``fit`` with a callback that logs sparsity (and ``probe_ds`` accuracy) every epoch into
    the checkpointed record, and one progress bar (``desc``) over the epochs. The stage
    ``stage`` resumes from its checkpoint; a finished one is read back from its marker."""

    def accuracy(m: nnx.Module, ds: Any) -> float:
        return jtrain.evaluate(m, ds, batch_size=config.eval_batch_size)["accuracy"]

    snapshot = _Snapshot(None if run.out is None else f"{run.checkpoint_dir(stage)}-snapshot")
    done = run.stage(stage)
    if done is not None:
        state = None if snapshot_epoch is None else snapshot.load(snapshot_epoch, model)
        return _Run(**done, snapshot=state)

    initial = {"sparsity": _sparsity(model), "eval_accuracy": accuracy(model, test_ds)}
    if probe_ds is not None:
        initial["probe_accuracy"] = accuracy(model, probe_ds)

    def callback(epoch: int, record: dict[str, float], trained: nnx.Module) -> None:
        local_model(trained)  # evaluated the same way on every process
        if epoch == snapshot_epoch:
            snapshot.save(epoch, trained)
        record["sparsity"] = _sparsity(trained)
        if probe_ds is not None:
            record["probe_accuracy"] = accuracy(trained, probe_ds)

    start = time.perf_counter()
    history = fit_stage(
        model,
        tx,
        train_ds,
        config,
        desc=desc,
        epochs=epochs,
        eval_ds=test_ds,
        seed=seed,
        metrics_path=None if run.out is None else os.path.join(run.out, f"metrics_{stage}.jsonl"),
        callback=callback,
        **run.fit_kwargs(stage),
    )
    records = [initial, *history.epochs]
    state = history.opt_state
    mask_change = None
    if hasattr(state, "mask_hamming"):
        mask_change = int(state.mask_hamming) / jmasks.summary(state.masks).total_count
    done = run.finish_stage(
        stage,
        {
            "test_accuracy": [r["eval_accuracy"] for r in records],
            "sparsity": [r["sparsity"] for r in records],
            "probe_accuracy": [r["probe_accuracy"] for r in records if "probe_accuracy" in r],
            "seconds": time.perf_counter() - start,
            "history": history.epochs,
            "mask_change": mask_change,
        },
    )
    state = None if snapshot_epoch is None else snapshot.load(snapshot_epoch, model)
    return _Run(**done, snapshot=state)


def _acdc_entry(run_: _Run, timeline: Timeline) -> dict[str, Any]:
    f = timeline.final_start
    return {
        "sparse": run_.test_accuracy[-1],
        "dense_half": run_.test_accuracy[f],
        "final_sparsity": run_.sparsity[-1],
        "dense_half_sparsity": run_.sparsity[f],
        "final_mask_change": run_.mask_change,
    }


def _phase_changes(curve: list[float], phases: tuple[tuple[int, int, str], ...]) -> dict:
    """Change of ``curve`` over each compressed / decompressed phase (end minus start)."""
    out: dict[str, list[float]] = {"compressed": [], "decompressed": []}
    for start, end, kind in phases:
        if kind in out:
            out[kind].append(curve[end] - curve[start])
    return out


def _phase_extremes(curve: list[float], phases: tuple[tuple[int, int, str], ...]) -> dict:
    r"""Largest excursion of ``curve`` inside each phase, relative to its value at the start.

    ``compressed``: :math:`\min_{s < e \le t} c_e - c_s` (the deepest drop, usually right
    after the new mask); ``decompressed``: :math:`\max_{s < e \le t} c_e - c_s` (the highest
    recovery). A sparse model may re-fit within a long compressed phase what the mask removed, so
    the end-minus-start change (:func:`_phase_changes`) alone can hide the drop.
    """
    out: dict[str, list[float]] = {"compressed": [], "decompressed": []}
    for start, end, kind in phases:
        if kind in out:
            inside = curve[start + 1 : end + 1]
            extreme = min(inside) if kind == "compressed" else max(inside)
            out[kind].append(extreme - curve[start])
    return out


def _run_seed(config: Config, seed: int, train_ds: Any, test_ds: Any, run: Run) -> dict[str, Any]:
    channels, classes = train_ds.x.shape[-1], train_ds.num_classes
    spe = jdata.num_batches(train_ds, config.batch_size)
    timeline = make_timeline(config, spe)
    sgd = make_sgd(config, spe)

    seconds: dict[str, float] = {}
    seconds_per_epoch: dict[str, float] = {}

    def train(name, tx, model=None, epochs=config.epochs, data=train_ds, **kwargs) -> _Run:
        model = build_model(config, channels, classes, seed) if model is None else model
        result = _train(
            config,
            model,
            tx,
            data,
            test_ds,
            seed=seed,
            epochs=epochs,
            run=run,
            stage=f"{name}_seed{seed}",
            desc=f"seed {seed}: {name}",
            **kwargs,
        )
        seconds[name] = result.seconds
        seconds_per_epoch[name] = result.seconds / epochs
        return result

    if config.memorisation == "only":
        return {
            "seed": seed,
            "memorisation": _memorisation(config, seed, train_ds, test_ds, train),
            "seconds": seconds,
            "seconds_per_epoch": seconds_per_epoch,
        }

    record: dict[str, Any] = {"seed": seed, "acdc": {}, "gmp": {}, "oneshot_finetune": {}}
    curves: dict[str, list[float]] = {}
    sparsity_curves: dict[str, list[float]] = {}

    dense = train("dense", sgd, snapshot_epoch=timeline.final_start)
    record["dense"] = dense.test_accuracy[-1]
    record["dense_at_final_start"] = dense.test_accuracy[timeline.final_start]
    curves["dense"], sparsity_curves["dense"] = dense.test_accuracy, dense.sparsity

    for s in config.sparsities:
        key = sparsity_key(s)
        tx = optim.acdc(sgd, sparsity=float(s), schedule=timeline.acdc, scope="global")
        res = train(f"acdc_{key}", tx, snapshot_epoch=timeline.final_start)
        record["acdc"][key] = _acdc_entry(res, timeline)
        curves[f"acdc_{key}"], sparsity_curves[f"acdc_{key}"] = res.test_accuracy, res.sparsity

        # The reference's ``ftdense`` member: the dense half trained on densely for the last L
        # epochs (remaining cosine schedule, fresh momentum), an E-epoch dense model.
        model = build_model(config, channels, classes, seed)
        nnx.update(model, res.snapshot)
        finetune_sgd = make_sgd(config, spe, offset_steps=timeline.final_start * spe)
        ft = train(
            f"acdc_{key}_dense_finetune",
            finetune_sgd,
            model=model,
            epochs=config.epochs - timeline.final_start,
        )
        record["acdc"][key]["dense_finetuned"] = ft.test_accuracy[-1]
        name = f"acdc_{key}_dense_finetune"
        curves[name] = res.test_accuracy[: timeline.final_start] + ft.test_accuracy
        sparsity_curves[name] = res.sparsity[: timeline.final_start] + ft.sparsity

        tx = optim.gmp(
            sgd,
            sparsity=float(s),
            begin_step=timeline.gmp_begin_step,
            end_step=timeline.gmp_end_step,
            every=timeline.gmp_every,
            scope="global",
        )
        res = train(f"gmp_{key}", tx)
        record["gmp"][key] = {"sparse": res.test_accuracy[-1], "final_sparsity": res.sparsity[-1]}
        curves[f"gmp_{key}"], sparsity_curves[f"gmp_{key}"] = res.test_accuracy, res.sparsity

        model = build_model(config, channels, classes, seed)
        nnx.update(model, dense.snapshot)
        pruned, masks = prune.oneshot(nnx.state(model, nnx.Param), sparsity=float(s))
        nnx.update(model, pruned)
        finetune_sgd = make_sgd(config, spe, offset_steps=timeline.final_start * spe)
        res = train(
            f"oneshot_finetune_{key}",
            optim.fixed_mask(finetune_sgd, masks),
            model=model,
            epochs=config.epochs - timeline.final_start,
        )
        record["oneshot_finetune"][key] = {
            "sparse": res.test_accuracy[-1],
            "after_prune": res.test_accuracy[0],
            "final_sparsity": res.sparsity[-1],
        }
        # The curve over the whole budget: the dense run up to the pruning epoch, then this run.
        name = f"oneshot_finetune_{key}"
        curves[name] = dense.test_accuracy[: timeline.final_start] + res.test_accuracy
        sparsity_curves[name] = dense.sparsity[: timeline.final_start] + res.sparsity

    if config.memorisation == "yes":
        record["memorisation"] = _memorisation(config, seed, train_ds, test_ds, train)
    record["curves"] = {"test_accuracy": curves, "sparsity": sparsity_curves}
    record["seconds"] = seconds
    record["seconds_per_epoch"] = seconds_per_epoch
    record["phases"] = [list(p) for p in timeline.phases]
    record["steps_per_epoch"] = spe
    return record


def _memorisation(
    config: Config, seed: int, train_ds: Any, test_ds: Any, train: Callable[..., _Run]
) -> dict[str, Any]:
    """Dense vs AC/DC on a training set with ``memorisation_fraction`` random labels, both
    trained for ``memorisation_epochs`` (:meth:`Config.memorisation_config`)."""
    config = config.memorisation_config()
    base = train_ds
    if config.memorisation_subset is not None and config.memorisation_subset < len(train_ds):
        base = jdata.subset(train_ds, config.memorisation_subset, seed=seed)
    noisy, changed = jdata.random_labels(base, config.memorisation_fraction, seed=seed)
    probe = noisy.replace(x=noisy.x[changed], y=noisy.y[changed])
    spe = jdata.num_batches(noisy, config.batch_size)
    timeline = make_timeline(config, spe)
    sgd = make_sgd(config, spe)
    s = float(config.memorisation_sparsity)
    epochs = config.epochs
    dense = train("memorisation_dense", sgd, data=noisy, probe_ds=probe, epochs=epochs)
    tx = optim.acdc(sgd, sparsity=s, schedule=timeline.acdc, scope="global")
    acdc = train(
        f"memorisation_acdc_{sparsity_key(s)}", tx, data=noisy, probe_ds=probe, epochs=epochs
    )
    return {
        "sparsity": s,
        "fraction": float(config.memorisation_fraction),
        "num_relabelled": int(changed.size),
        "train_size": len(noisy),
        "steps_per_epoch": spe,
        "phases": [list(p) for p in timeline.phases],
        "dense": dense.probe_accuracy,
        "acdc": acdc.probe_accuracy,
        "acdc_sparsity": acdc.sparsity,
        "dense_test_accuracy": dense.test_accuracy,
        "acdc_test_accuracy": acdc.test_accuracy,
        "acdc_phase_changes": _phase_changes(acdc.probe_accuracy, timeline.phases),
        "acdc_phase_extremes": _phase_extremes(acdc.probe_accuracy, timeline.phases),
        "dense_phase_changes": _phase_changes(dense.probe_accuracy, timeline.phases),
    }


# --------------------------------------------------------------------------------------------
# Seeds, aggregation, entry point
# --------------------------------------------------------------------------------------------

_NOT_AVERAGED = ("seed", "phases", "steps_per_epoch", "num_relabelled", "train_size")


@experiment_run(Config)
def run(config: Config, resumed: Run) -> dict[str, Any]:
    """Run ``config`` (validated first); write ``results.json``,
    training logs and the plots to ``out`` (checked first; ``None`` writes nothing).

    An ``out`` holding an earlier run of ``config`` resumes it
    (:func:`experiments._common.open_run`): every training run is a stage that resumes from
    its latest checkpoint (its per-epoch curves are checkpointed with it) or, when finished, is
    read back; a finished run returns its ``results.json`` unless ``restart``; an ``out`` holding
    another config is refused. ``mesh`` (``"data=8"``, ``"data=4,fsdp=2"``) shards the training.

    Returns:
      The results dict (also ``results.json``). Accuracies are test accuracies at the final
      epoch, means over seeds; sparsities are measured over the conv/dense kernels with
      :func:`jaxcompress.masks.summary` (exact zeros of the trained params):

      * ``dense``; ``dense_at_final_start`` (the dense run at epoch :math:`E - L`, the epoch of
        the dense half, at the same point of the learning-rate schedule);
      * ``acdc[str(s)]``: ``sparse``, ``dense_half`` (end of the last decompressed phase),
        ``dense_finetuned`` (the reference's ``ftdense`` member: the dense half trained on
        densely for the last :math:`L` epochs with the rest of the cosine schedule and fresh
        momentum, an :math:`E`-epoch dense model; :math:`L` extra epochs of compute),
        ``final_sparsity``, ``dense_half_sparsity``, ``final_mask_change`` (fraction of mask
        entries that changed at the last mask update, ``AcdcState.mask_hamming``);
      * ``gmp[str(s)]``: ``sparse``, ``final_sparsity``;
      * ``oneshot_finetune[str(s)]``: ``sparse``, ``after_prune`` (before fine-tuning),
        ``final_sparsity``;
      * ``memorisation``: per-epoch accuracy on the relabelled examples w.r.t. their random
        labels, ``dense`` and ``acdc`` (index = epochs completed), their test accuracies, the
        change of each over every compressed / decompressed phase (end minus start,
        ``*_phase_changes``) and AC/DC's deepest drop / highest rise inside each
        (``acdc_phase_extremes``), ``phases``;
      * ``curves``: ``epochs`` (0..E), ``test_accuracy[run]`` and ``sparsity[run]`` per epoch
        for every run (``dense``, ``acdc_<s>``, ``acdc_<s>_dense_finetune``, ``gmp_<s>``,
        ``oneshot_finetune_<s>``),
        ``phases`` (the AC/DC timeline in epochs), ``gmp_ramp`` and ``final_start``;
      * ``std``: sample standard deviations over seeds of all of the above (``num_seeds > 1``);
      * ``per_seed``, ``config``, ``header`` (what was run, one line), ``timing`` (seconds),
        ``dataset_sizes``, ``environment``.
    """
    t0 = time.perf_counter()
    out, train_ds, test_ds, sizes = prepare_run(config, resumed.out)
    spe = jdata.num_batches(train_ds, config.batch_size)
    timeline = make_timeline(config, spe)  # validates steps_per_epoch before any training
    if config.memorisation != "no":
        mem_size = len(train_ds)
        if config.memorisation_subset is not None:
            mem_size = min(mem_size, config.memorisation_subset)
        make_timeline(config.memorisation_config(), jdata.num_batches(mem_size, config.batch_size))
    t_data = time.perf_counter()

    seeds = seed_list(config)
    records = [_run_seed(config, seed, train_ds, test_ds, resumed) for seed in seeds]
    t_train = time.perf_counter()

    only = config.memorisation == "only"
    keys = (
        "dense",
        "dense_at_final_start",
        "acdc",
        "gmp",
        "oneshot_finetune",
        "memorisation",
        "curves",
        "seconds",
        "seconds_per_epoch",
    )
    averaged, std = aggregate([{k: r[k] for k in keys if k in r} for r in records], _NOT_AVERAGED)
    results: dict[str, Any] = {k: averaged[k] for k in keys[:5] if k in averaged}
    results["memorisation"] = averaged.get("memorisation", {})
    if not only:
        results["curves"] = {
            "epochs": list(range(config.epochs + 1)),
            **averaged["curves"],
            "phases": [list(p) for p in timeline.phases],
            "gmp_ramp": [timeline.gmp_begin_epoch, timeline.final_start],
            "final_start": timeline.final_start,
        }
    if std is not None:
        results["std"] = std
    results["per_seed"] = records
    results["config"] = {**dataclasses.asdict(config), "phase_epochs": config.phase_epochs()}
    phases = "W:C:D:L " + ":".join(str(e) for e in config.phase_epochs())
    results["header"] = run_header(config, sizes, seeds, model=config.model, phases=phases)
    if not only:
        results["schedule"] = {
            "steps_per_epoch": spe,
            "acdc_steps": dataclasses.asdict(timeline.acdc),
            "gmp_steps": {
                "begin_step": timeline.gmp_begin_step,
                "end_step": timeline.gmp_end_step,
                "every": timeline.gmp_every,
            },
        }
    results["dataset_sizes"] = sizes
    results["timing"] = {
        "data_seconds": t_data - t0,
        "train_seconds": t_train - t_data,
        "per_run_seconds": averaged["seconds"],
        "seconds_per_epoch": averaged["seconds_per_epoch"],
        "total_seconds": t_train - t0,
    }
    results["environment"] = environment(mesh=resumed.mesh)
    if out is not None and is_primary():
        if not only:
            write_accuracy_plot(results, os.path.join(out, "accuracy_curves.png"))
        if config.memorisation != "no":
            write_memorisation_plot(results, os.path.join(out, "memorisation.png"))
    results["timing"]["total_seconds"] = time.perf_counter() - t0
    resumed.write_results(results)  # last: the run is finished
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _pm(results: dict[str, Any], path: tuple[str, ...]) -> str:
    value: Any = results
    for k in path:
        value = value[k]
    text = f"{value:.4f}"
    std: Any = results.get("std")
    if std is not None:
        for k in path:
            std = std[k]
        text += f" ± {std:.4f}"
    return text


def _main_table(results: dict[str, Any]) -> list[str]:
    lines = [
        f"dense: {_pm(results, ('dense',))} (at the dense-half epoch: "
        f"{_pm(results, ('dense_at_final_start',))})"
    ]
    header = (
        f"{'method':<18} {'target':>6} {'sparsity':>8}  {'sparse acc':<17} {'dense half':<17} "
        f"{'dense half + ft':<17}"
    )
    lines.append(header)
    for method in ("acdc", "gmp", "oneshot_finetune"):
        for key, entry in results[method].items():
            half = _pm(results, (method, key, "dense_half")) if "dense_half" in entry else "-"
            ft = (
                _pm(results, (method, key, "dense_finetuned"))
                if "dense_finetuned" in entry
                else "-"
            )
            lines.append(
                f"{method:<18} {key:>6} {entry['final_sparsity']:>8.4f}  "
                f"{_pm(results, (method, key, 'sparse')):<17} {half:<17} {ft:<17}"
            )
    return lines


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: final test accuracy, sparsity, AC/DC dense half; memorisation."""
    lines = [results["header"]] if "header" in results else []
    if "dense" in results:
        lines += _main_table(results)
    mem = results.get("memorisation")
    if mem:
        changes = mem["acdc_phase_changes"]
        fmt = ", ".join
        lines.append(
            f"memorisation ({mem['num_relabelled']} random labels, AC/DC {mem['sparsity']:g}): "
            f"final dense {mem['dense'][-1]:.4f}, AC/DC {mem['acdc'][-1]:.4f}"
        )
        extremes = mem.get("acdc_phase_extremes") or {}
        rows = [
            ("change over compressed phases", changes["compressed"]),
            ("change over decompressed phases", changes["decompressed"]),
            ("deepest drop inside compressed phases", extremes.get("compressed")),
            ("highest rise inside decompressed phases", extremes.get("decompressed")),
        ]
        for label, values in rows:
            if values is not None:
                lines.append(f"  AC/DC {label}: " + fmt(f"{c:+.4f}" for c in values))
    return "\n".join(lines)


def _shade(ax, phases, color="tab:red", alpha=0.12, label="compressed") -> None:
    for start, end, kind in phases:
        if kind == "compressed":
            ax.axvspan(start, end, color=color, alpha=alpha, lw=0, label=label)
            label = None


def write_accuracy_plot(results: dict[str, Any], path: str) -> None:
    """Test accuracy over epochs, one panel per (method, sparsity), sparse phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["curves"]
    epochs = curves["epochs"]
    acc = curves["test_accuracy"]
    spars = curves["sparsity"]
    keys = list(results["acdc"])
    methods = (
        ("acdc", "AC/DC", curves["phases"]),
        ("gmp", "GMP", [[curves["gmp_ramp"][0], epochs[-1], "compressed"]]),
        ("oneshot_finetune", "one-shot + FT", [[curves["final_start"], epochs[-1], "compressed"]]),
    )
    fig, axes = plt.subplots(
        len(methods), len(keys), figsize=(4.2 * len(keys), 2.8 * len(methods)), squeeze=False
    )
    dense = acc["dense"]
    lo = min(min(v) for k, v in acc.items())
    for row, (method, title, phases) in enumerate(methods):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            name = f"{method}_{key}"
            _shade(ax, phases, label="sparse phase")
            if method == "gmp":
                ax.axvline(curves["final_start"], color="tab:red", lw=0.8, ls=":")
            ax.plot(epochs, dense, color="0.5", lw=1, label="dense")
            ax.plot(epochs, acc[name], color="tab:blue", lw=1.5, marker=".", label=title)
            if method == "acdc":
                f = curves["final_start"]
                ax.plot(
                    epochs[f:],
                    acc[f"{name}_dense_finetune"][f:],
                    color="tab:green",
                    lw=1.2,
                    ls="--",
                    label="dense half + dense FT",
                )
            ax.set_ylim(max(0.0, lo - 0.02), 1.0)
            ax.set_title(f"{title}, sparsity {key}", fontsize=10)
            ax.grid(alpha=0.3)
            twin = ax.twinx()
            twin.plot(epochs, spars[name], color="tab:red", lw=1, ls="--", label="sparsity")
            twin.set_ylim(0.0, 1.0)
            twin.tick_params(labelsize=7)
            if row == len(methods) - 1:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("test accuracy")
            if row == 0 and col == 0:
                lines, labels = ax.get_legend_handles_labels()
                twin_lines, twin_labels = twin.get_legend_handles_labels()
                ax.legend(lines + twin_lines, labels + twin_labels, fontsize=7, loc="lower left")
    cfg = results["config"]
    fig.suptitle(f"{cfg['model']} on {cfg['dataset']}: test accuracy per epoch", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_memorisation_plot(results: dict[str, Any], path: str) -> None:
    """Accuracy on the relabelled examples (random labels) and test accuracy, AC/DC vs dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = results["memorisation"]
    epochs = list(range(len(mem["dense"])))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = (
        (axes[0], "dense", "acdc", "accuracy on relabelled examples (random labels)"),
        (axes[1], "dense_test_accuracy", "acdc_test_accuracy", "test accuracy"),
    )
    for ax, dense_key, acdc_key, ylabel in panels:
        _shade(ax, mem["phases"])
        ax.plot(epochs, mem[dense_key], color="0.4", marker=".", label="dense")
        ax.plot(epochs, mem[acdc_key], color="tab:blue", marker=".", label="AC/DC")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"Memorisation: {mem['num_relabelled']} of {mem['train_size']} {cfg['dataset']} labels "
        f"randomised, AC/DC at {mem['sparsity']:g}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
