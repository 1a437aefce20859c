"""The SPDY experiment: per-layer compression profiles at fixed modelled speedups.

Claim tested (Frantar & Alistarh, "SPDY", ICML 2022, Sec. 5; algorithms.md 3.4-3.5): at the
same modelled speedup, the profile found by SPDY's search (DP over searched per-layer error
coefficients, scored by the calibration loss of the stitched, reconstructed model) is more
accurate than the DP on the error prior alone (coefficients 1), uniform levels and global
magnitude, when every profile gets the same reconstruction (layer-wise AdaPrune database,
then global AdaPrune).

Pipeline of :func:`run`:

1. train :class:`jaxcompress.models.SmallCNN` (default: 7 conv blocks of 16 to 128 channels at
   14x14 to 4x4, see :class:`~experiments.spdy.configs.base.Config`), or restore
   ``config.checkpoint``; save an Orbax checkpoint to ``<out>/checkpoint``;
2. draw ``calib_samples`` training images (no augmentation) and capture every layer's dense
   input with the functional forward of :mod:`experiments.spdy.model`;
3. three option families over the same sparsity levels (0 plus ``num_levels`` geometric in
   density from ``min_sparsity`` to ``max_sparsity``):

   * ``unstructured_flops``: magnitude masks on all 8 conv/dense kernels, timing table from
     FLOPs (``TimingTable.from_flops``: time = MACs x density), the ideal sparse runtime. A
     dense CPU convolution does not run faster with zeros in its kernel
     (``results["unstructured_cpu_check"]`` measures it), so this table models a sparse
     runtime, not this machine;
   * ``unstructured_rn50_curve``: the same masks and database, time = MACs x ``r(s)`` with
     ``r`` the relative layer time of a real sparse CPU runtime, DeepSparse, as measured in
     the reference's ResNet-50 table (:func:`sparse_runtime_curve`): sparse kernels gain far
     less than ``1 / density`` (1.34x *slower* at 40%, 2x faster at 81%, 3.3x at 95%), which is
     the setting of the paper's claims;
   * ``structured_measured``: channel *units* (:func:`experiments.spdy.model.units`: the
     channels between a producer block and the conv or head that reads them, so that units
     are independent and the table is additive). A unit's option drops that fraction of its
     channels, chosen by their contribution ``||W_c|| rms(x_c)`` to the consumer's output;
     the consumer's kernel is the database entry (its input channels masked, the rest refit
     by AdaPrune). Two tables are measured on this machine with
     :func:`jaxcompress.spdy.measure`, both interleaved, on this process's CPU clock with
     single-threaded executables (robust to the other jobs of a shared machine), with the
     whole dense model as ``base``: ``isolated`` times each unit (producer
     conv+BN+ReLU(+pool) and consumer conv / GAP+head) on its own at every width; ``context``
     times every narrower width as the paired change of the whole model's time. The profiles
     use ``config.structured_timing`` (default ``isolated``: on this CPU its predictions were
     within 12% and conservative, the in-context ones 10-17% optimistic, since single-unit
     savings in context do not add up); the other table's predictions are reported beside;

4. per family, a layer-wise AdaPrune database (:func:`jaxcompress.spdy.build_database`; shared
   by the two unstructured families); for
   each target speedup the profiles ``spdy`` (search), ``dp`` (prior, coefficients 1),
   ``uniform`` and ``global_magnitude``; each stitched, scored, globally AdaPruned, evaluated;
5. end-to-end CPU time of each compressed model against the table's prediction
   ``base - prunable + sum of chosen entries``: structured models are physically sliced
   (fewer channels) and timed interleaved with the dense model; unstructured ones run the
   dense ops;
6. write ``results.json`` (with a ``summary``: accuracy margins of SPDY over the baselines,
   search monotonicity, measured/predicted time ratios), ``profiles.png`` and
   ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments._common import (
    Run,
    environment,
    experiment_run,
    is_primary,
    local_model,
    prepare_run,
    run_header,
    train_sgd,
)
from experiments.spdy import model as fmodel
from experiments.spdy.configs.base import FAMILIES, Config
from jaxcompress import spdy
from jaxcompress.checkpoint import Checkpointer
from jaxcompress.masks import keep_count
from jaxcompress.models import SmallCNN
from jaxcompress.spdy import time_callables
from jaxcompress.spdy._reconstruct import (
    Database,
    build_database,
    global_adaprune,
    unstructured_mask,
)
from jaxcompress.spdy._search import search

__all__ = [
    "FAMILIES",
    "METHODS",
    "format_table",
    "input_channel_mask",
    "kept_channels",
    "levels",
    "run",
    "summarize",
    "timing_clock",
    "timing_images",
    "write_checks_plot",
    "write_plot",
]

METHODS = ("spdy", "dp", "uniform", "global_magnitude")
BASELINES = ("uniform", "global_magnitude")
TABLE_KINDS = ("isolated", "context")


def levels(config: Config) -> tuple[float, ...]:
    """``0`` then ``num_levels`` sparsities geometric in density (the reference's ``gen``)."""
    d0, d1 = 1.0 - config.min_sparsity, 1.0 - config.max_sparsity
    n = config.num_levels
    dens = [d0 * (d1 / d0) ** (k / max(n - 1, 1)) for k in range(n)]
    return (0.0, *(round(1.0 - d, 4) for d in dens))


# ------------------------------------------------------------------------------ model


def _build_model(config: Config, channels: int, num_classes: int) -> SmallCNN:
    return SmallCNN(
        channels,
        num_classes,
        config.widths,
        strides=config.strides,
        pool_after=config.pool_after,
        rngs=nnx.Rngs(config.seed),
    )


def _train_or_restore(
    config: Config, train_ds, out, run: Run | None = None
) -> tuple[SmallCNN, list]:
    model = _build_model(config, train_ds.x.shape[-1], train_ds.num_classes)
    if config.checkpoint is not None:
        with Checkpointer(os.path.abspath(config.checkpoint)) as ckpt:
            target = {"model_state": jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model)))}
            state = ckpt.restore(target=target)["model_state"]
        nnx.update(model, state)
        model.eval()
        return model, []
    # resumes from <out>/checkpoints/train; a finished training is restored, not rerun
    history = train_sgd(model, train_ds, config, out, "train dense (SGD)", run=run)
    if out is not None:
        # the dense model for config.checkpoint of later runs (replacing one of a --restart),
        # saved as trained (on a mesh: global arrays, saved by every process)
        with Checkpointer(os.path.join(os.path.abspath(out), "checkpoint")) as ckpt:
            if 0 in ckpt.all_steps():
                ckpt.delete(0)
            ckpt.save(0, model_state=nnx.to_pure_dict(nnx.state(model)))
    local_model(model).eval()
    return model, history.epochs


# ---------------------------------------------------------------------- evaluation


def _make_eval(arch: fmodel.Arch):
    @jax.jit
    def sums(params, stats, x, y):
        logits, _ = fmodel.forward(arch, params, stats, x)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        return jnp.sum(ce), jnp.sum(jnp.argmax(logits, -1) == y)

    def evaluate(params, stats, x, y, batch):
        loss = correct = 0.0
        for i in range(0, len(x), batch):
            a, b = sums(params, stats, jnp.asarray(x[i : i + batch]), jnp.asarray(y[i : i + batch]))
            loss, correct = loss + float(a), correct + float(b)
        return loss / len(x), correct / len(x)

    return evaluate


# -------------------------------------------------------------------------- masks


def kept_channels(channels: int, sparsity: float, multiple: int = 1) -> int:
    """Channels a unit of ``channels`` keeps at ``sparsity``: ``keep_count`` rounded up to a
    multiple of ``multiple`` (at most ``channels``), for devices whose kernels want aligned
    channel counts. On an H100 (float32, batch 16 384) this CNN's measured table predicted
    end-to-end times equally well with ``multiple`` 1 and 8, and 1 reached further (1.85x
    against 1.46x): experiments/spdy/RESULTS.md."""
    k = keep_count(channels, sparsity)
    return min(channels, -(-k // multiple) * multiple)


def input_channel_mask(
    w: Any, option: Any, prev_mask: Any = None, *, scale: Any = None, multiple: int = 1
) -> np.ndarray:
    """Structured mask keeping ``ceil(C (1 - s))`` *input* channels (axis ``-2``) of ``w``,
    rounded up to a multiple of ``multiple`` (:func:`kept_channels`).

    Channel ``c`` is ranked by ``||w[..., c, :]||_2 * scale[c]``; with ``scale[c]`` the RMS of
    the layer's input channel ``c`` on calibration data, this bounds the channel's contribution
    to the layer's output (the criterion of channel-pruning-by-reconstruction methods). Only
    channels alive in ``prev_mask`` compete (cumulative); ties go to the lower index. A Flax
    Dense ``(in, out)`` or Conv ``(kh, kw, in, out)`` kernel with this mask computes exactly
    the layer with those inputs removed, so the channels' producer can be dropped.
    """
    s = float(option)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"input_channel_mask: option must be a sparsity in [0, 1); got {option!r}")
    w = np.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"input_channel_mask: kernel must have ndim >= 2; got shape {w.shape}")
    c = w.shape[-2]
    other = tuple(i for i in range(w.ndim) if i != w.ndim - 2)
    score = np.sqrt((w.astype(np.float64) ** 2).sum(axis=other))
    if scale is not None:
        scale = np.asarray(scale, np.float64)
        if scale.shape != (c,):
            raise ValueError(f"input_channel_mask: scale must have shape ({c},); got {scale.shape}")
        score = score * scale
    alive = np.ones(c, bool) if prev_mask is None else np.asarray(prev_mask, bool).any(axis=other)
    keep = min(kept_channels(c, s, multiple), int(alive.sum()))
    order = np.argsort(-np.where(alive, score, -np.inf), kind="stable")
    chans = np.zeros(c, bool)
    chans[order[:keep]] = True
    shape = [1] * w.ndim
    shape[-2] = c
    return np.broadcast_to((chans & alive).reshape(shape), w.shape).copy()


def _channel_rms(x: Any) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.sqrt(np.mean(x.reshape(-1, x.shape[-1]) ** 2, axis=0))


def _merge(dbs: list[Database]) -> Database:
    return Database(
        tuple(n for d in dbs for n in d.names),
        tuple(lab for d in dbs for lab in d.labels),
        {k: v for d in dbs for k, v in d.kernels.items()},
        {k: v for d in dbs for k, v in d.masks.items()},
        {k: v for d in dbs for k, v in d.errors.items()},
        {k: v for d in dbs for k, v in d.raw_errors.items()},
    )


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


RN50_TABLE = os.path.join("spdy_timings", "rn50_unstr.txt")


def sparse_runtime_curve(lv, data_dir: str | None = None) -> np.ndarray:
    """Relative layer time ``r(s) = t(s) / t(0)`` of a real unstructured-sparse CPU runtime at
    each sparsity of ``lv``: the reference's ResNet-50 DeepSparse table
    (``<data>/spdy_timings/rn50_unstr.txt``, IST-DASLab/spdy), summed over its layers (so
    ``r`` is time-weighted), interpolated linearly in log-density. ``r`` is far from the FLOPs
    ideal ``1 - s``: 1.34 at ``s = 0.4`` (slower than dense), 0.50 at 0.8, 0.30 at 0.95.
    """
    roots = [data_dir] if data_dir is not None else []
    if os.environ.get("JAXCOMPRESS_DATA_DIR"):
        roots.append(os.environ["JAXCOMPRESS_DATA_DIR"])
    paths = [os.path.join(r, RN50_TABLE) for r in roots]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(
            f"the unstructured_rn50_curve family needs {RN50_TABLE} under data_dir or "
            f"$JAXCOMPRESS_DATA_DIR; looked at {paths or ['(no data root configured)']}"
        )
    ref = spdy.TimingTable.load(path)
    total = np.sum([layer.times for layer in ref.layers], axis=0)
    ref_s = np.array([float(x) for x in ref.layers[0].labels])
    rel = total / total[0]
    log_d = np.log(1.0 - ref_s)
    s = np.asarray(lv, np.float64)
    if np.any(s > ref_s.max()):
        raise ValueError(f"levels above the reference's {ref_s.max()} are not covered: {lv}")
    return np.interp(np.log(1.0 - s), log_d[::-1], rel[::-1])


def _forward_logits(arch: fmodel.Arch):
    return lambda p, s, x: fmodel.forward(arch, p, s, x)[0]


def timing_clock(config: Config) -> str:
    """The clock of every timing in the run: ``config.timing_clock``, where ``"auto"`` is this
    process's CPU time on the CPU backend and wall time on an accelerator (a host CPU clock
    does not see the device's work)."""
    if config.timing_clock != "auto":
        return config.timing_clock
    return "cpu" if jax.default_backend() == "cpu" else "wall"


def timing_images(x: Any, batch: int) -> np.ndarray:
    """The first ``batch`` rows of ``x``, cycled when ``batch > len(x)``."""
    x = np.asarray(x)
    return x[np.arange(batch) % len(x)]


def _timing_kwargs(config: Config) -> dict[str, Any]:
    """``clock`` and ``compiler_options`` of every timing in the run."""
    single = config.timing_single_thread and jax.default_backend() == "cpu"
    return {
        "clock": timing_clock(config),
        "compiler_options": {"xla_cpu_multi_thread_eigen": False} if single else None,
    }


def _measured_table(arch, params, stats, x, lv, config, *, in_context: bool) -> spdy.TimingTable:
    """Channel units timed with :func:`jaxcompress.spdy.measure`, all interleaved, on the
    configured clock: each unit's dense time on its own (producer block + consumer conv / GAP +
    head, minus the per-call overhead) and, for every narrower width, the unit on its own at
    ``keep_count(C, s)`` channels, or ``in_context`` the paired change of the whole model's time
    with only that unit cut to that width."""
    x = jnp.asarray(x)
    _, taps = jax.jit(lambda p, s, x: fmodel.forward(arch, p, s, x))(params, stats, x)
    forward_fn = _forward_logits(arch)
    width = {
        u.name: params["blocks"][u.producer]["conv"]["kernel"].shape[-1] for u in fmodel.units(arch)
    }
    multiple = config.channel_multiple

    def builder_for(u: fmodel.Unit):
        fn = fmodel.unit_fn(arch, u)
        xin = taps[f"blocks/{u.producer}/conv/kernel"]
        return lambda s: (
            fn,
            fmodel.unit_args(params, stats, u, xin, kept_channels(width[u.name], s, multiple)),
        )

    narrowed: dict[tuple[str, int], tuple] = {}

    def context(name, s):  # options with the same channel count share one timed model
        k = kept_channels(width[name], s, multiple)
        if (name, k) not in narrowed:
            small = fmodel.narrow(arch, params, stats, {name: k})
            narrowed[(name, k)] = (forward_fn, (*small, x))
        return narrowed[(name, k)]

    return spdy.measure(
        {u.name: builder_for(u) for u in fmodel.units(arch)},
        lv,
        model=(forward_fn, (params, stats, x)),
        context=context if in_context else None,
        repeats=config.timing_repeats,
        interleave=True,
        subtract_call_overhead=True,
        **_timing_kwargs(config),
    )


def _unstructured_cpu_check(arch, params, taps, config) -> dict:
    """Time the largest conv with its dense kernel and with 90% of it zeroed (same dense op)."""
    i = arch.depth - 1
    name = f"blocks/{i}/conv/kernel"
    k = np.asarray(params["blocks"][i]["conv"]["kernel"])
    masked = np.where(unstructured_mask(k, 0.9), k, 0).astype(k.dtype)
    x = jnp.asarray(taps[name])
    fn = functools.partial(fmodel.conv, stride=arch.strides[i])
    dense, sparse = time_callables(
        [(fn, (jnp.asarray(k), x)), (fn, (jnp.asarray(masked), x))],
        repeats=config.timing_repeats,
        **_timing_kwargs(config),
    )
    t_dense, t_masked = dense.median, sparse.median
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


@dataclasses.dataclass(frozen=True)
class _Family:
    names: tuple[str, ...]
    table: spdy.TimingTable
    db: Database
    fns: dict[str, Any]
    scores: list[np.ndarray]
    structured: bool
    alternative: spdy.TimingTable | None = None


def _leaf(params: dict, name: str):
    node = params
    for part in name.split("/"):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def _family_setup(family, arch, params, stats, taps, lv, config, cache) -> _Family:
    """Layers, timing table, reconstruction database and global-magnitude unit scores.

    Global magnitude ranks ``|w|`` over all layers (unstructured) or, for channel units, each
    channel's contribution ``||W_c|| rms(x_c)`` over its unit's RMS contribution (so units of
    different fan-in and activation scale compare). The two unstructured families share one
    database (``cache``): only their timing tables differ.
    """
    all_fns = fmodel.layer_fns(arch)
    common = dict(
        lr=config.adaprune_lr,
        epochs=config.adaprune_epochs,
        batch_size=config.adaprune_batch,
        progress=config.progress,
    )
    if family.startswith("unstructured"):
        names = arch.names()
        flops = _flops(arch, params, taps)
        if family == "unstructured_flops":
            table = spdy.TimingTable.from_flops(flops, lv)
        else:
            rel = sparse_runtime_curve(lv, config.data_dir)
            table = spdy.TimingTable.from_flops(
                flops, list(range(len(lv))), time_fn=lambda n, f, j: f * rel[j],
                label_fn=lambda j: f"{lv[j]:.4f}",
            )  # fmt: skip
        fns = {n: all_fns[n] for n in names}
        if "unstructured_db" not in cache:
            cache["unstructured_db"] = build_database(
                params, fns, {n: taps[n] for n in names}, lv, seed=config.seed, **common
            )
        scores = [np.abs(np.asarray(_leaf(params, n))).ravel() for n in names]
        return _Family(names, table, cache["unstructured_db"], fns, scores, False)
    us = fmodel.units(arch)
    names = tuple(u.name for u in us)
    x_time = timing_images(taps["blocks/0/conv/kernel"], config.timing_batch)
    tables = {
        kind: _measured_table(arch, params, stats, x_time, lv, config, in_context=kind == "context")
        for kind in TABLE_KINDS
    }
    table = tables[config.structured_timing]
    alternative = next(t for k, t in tables.items() if k != config.structured_timing)
    fns = {n: all_fns[n] for n in names}
    dbs, scores = [], []
    for i, n in enumerate(names):
        rms = _channel_rms(taps[n])
        dbs.append(
            build_database(
                params,
                {n: fns[n]},
                {n: taps[n]},
                lv,
                mask_fn=functools.partial(
                    input_channel_mask, scale=rms, multiple=config.channel_multiple
                ),
                seed=config.seed * 7919 + i,
                **common,
            )
        )
        k = np.asarray(_leaf(params, n), np.float64)
        other = tuple(a for a in range(k.ndim) if a != k.ndim - 2)
        contrib = np.sqrt((k**2).sum(axis=other)) * rms
        scores.append(contrib / max(float(np.sqrt(np.mean(contrib**2))), 1e-30))
    return _Family(names, table, _merge(dbs), fns, scores, True, alternative)


def _run_family(family, arch, params, stats, calib, test, lv, config, cache) -> dict:
    xc, yc = calib
    log = print if config.progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    _, taps = jax.jit(lambda p, s, x: fmodel.forward(arch, p, s, x))(params, stats, xc)
    fam = _family_setup(family, arch, params, stats, taps, lv, config, cache)
    names, table, db, fns = fam.names, fam.table, fam.db, fam.fns
    t_db = time.perf_counter()
    evaluate = _make_eval(arch)

    def taps_fn(p, x):  # one per family run: global AdaPrune compiles once per family
        return fmodel.forward(arch, p, stats, x)[1]

    eb = config.eval_batch_size

    def calib_loss(choice) -> float:
        """The reference's score: calibration loss of the stitched model (eval mode)."""
        p, _ = db.stitch(params, choice)
        return evaluate(p, stats, xc, yc, eb)[0]

    def reconstruct(p, m, epochs: int):
        """Global AdaPrune of a stitched model towards the dense one on the calibration set."""
        return global_adaprune(
            p, m, params, taps_fn, fns, xc, lr=config.gap_lr, epochs=epochs,
            batch_size=config.gap_batch, seed=config.seed,
        )[0]  # fmt: skip

    def search_score(choice) -> float:
        """``calib_loss``, or with ``search_gap_epochs`` the loss after a short global
        AdaPrune of the stitched model."""
        if not config.search_gap_epochs:
            return calib_loss(choice)
        p = reconstruct(*db.stitch(params, choice), config.search_gap_epochs)
        return evaluate(p, stats, xc, yc, eb)[0]

    x_time = jnp.asarray(timing_images(xc, config.timing_batch))
    forward_fn = _forward_logits(arch)
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
    if fam.structured:
        out["units"] = [
            {"name": u.name, "producer": f"blocks/{u.producer}", "consumer": u.consumer}
            for u in fmodel.units(arch)
        ]
        out["fixed_seconds"] = fixed
        out["max_speedup"] = spdy.max_speedup(table)
        out["table_kind"] = config.structured_timing
        out["table_alternative"] = json.loads(fam.alternative.to_json())
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
            search_score,
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
            "global_magnitude": _global_choice(fam.scores, lv, table, budget),
        }
        hist = res.history
        entry: dict[str, Any] = {
            "budget": budget,
            "search": {
                "score": res.score,
                "score_after_gap_epochs": config.search_gap_epochs,
                "evaluations": res.evaluations,
                "candidates": res.candidates,
                "seconds": res.seconds,
                "history": hist.tolist(),
                "monotone": bool(np.all(np.diff(hist) <= 0)),
                "coefficients": res.coefficients.tolist(),
            },
        }
        for method, choice in profiles.items():
            if choice is None:
                entry[method] = {"infeasible": True}
                continue
            p, m = db.stitch(params, choice)
            loss_lw, acc_lw = evaluate(p, stats, test[0], test[1], eb)
            p_gap = reconstruct(p, m, config.gap_epochs)
            loss_gap, acc_gap = evaluate(p_gap, stats, test[0], test[1], eb)
            chosen = float(sum(t[j] for t, j in zip(table.times(), choice, strict=True)))
            predicted = fixed + chosen
            # dense and compressed timed interleaved: the machine's load drifts over a run
            if fam.structured:
                small = fmodel.slice_units(arch, p_gap, stats)
                comp_args = (*small, x_time)
            else:
                comp_args = (p_gap, stats, x_time)
            dense_t, comp_t = time_callables(
                [(forward_fn, (params, stats, x_time)), (forward_fn, comp_args)],
                repeats=config.timing_repeats,
                **_timing_kwargs(config),
            )
            t_dense, t_meas = dense_t.median, comp_t.median
            modelled = spdy.modelled_speedup(table, choice)
            e: dict[str, Any] = {
                "choice": [int(c) for c in choice],
                "profile": table.profile(choice),
                "modelled_speedup": modelled,
                "calib_loss": calib_loss(choice),
                "accuracy_layerwise": acc_lw,
                "loss_layerwise": loss_lw,
                "accuracy_gap": acc_gap,
                "loss_gap": loss_gap,
                "predicted_seconds": predicted if fam.structured else None,
                "measured_seconds": t_meas,
                "measured_noise": comp_t.noise,
                "measured_over_predicted_seconds": t_meas / predicted if fam.structured else None,
                "dense_measured_seconds": t_dense,
                "dense_noise": dense_t.noise,
                "dense_over_base": t_dense / table.base if fam.structured else None,
                "measured_speedup": t_dense / t_meas,
                "measured_over_modelled_speedup": t_dense / t_meas / modelled,
                "wall_seconds": {"dense": dense_t.wall, "compressed": comp_t.wall},
                "cpu_seconds": {"dense": dense_t.cpu, "compressed": comp_t.cpu},
                "measured_wall_speedup": dense_t.wall / comp_t.wall,
            }
            if fam.structured:
                alt = fam.alternative
                alt_pred = (
                    alt.base
                    - alt.prunable
                    + float(sum(t[j] for t, j in zip(alt.times(), choice, strict=True)))
                )
                e["predicted_alternative_seconds"] = alt_pred
                e["measured_over_predicted_alternative"] = t_meas / alt_pred
                e["channels"] = [
                    int(small[0]["blocks"][u.producer]["conv"]["kernel"].shape[-1])
                    for u in fmodel.units(arch)
                ]
            entry[method] = e
            log(
                f"[{family}] {target}x {method}: acc {acc_lw:.4f} -> gAP {acc_gap:.4f}, "
                f"modelled {modelled:.3f}x, measured {e['measured_speedup']:.3f}x"
                + (f", t meas/pred {t_meas / predicted:.3f}" if fam.structured else "")
            )
        out["targets"][key] = entry
    out["seconds"] = {
        "table_and_database": t_db - t0,
        "profiles": time.perf_counter() - t_db,
    }
    return out


@experiment_run(Config)
def run(config: Config, resumed: Run) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``profiles.png``, ``metrics.jsonl`` and a
    checkpoint to ``out`` (``None`` writes nothing).

    An ``out`` holding an earlier run of ``config`` resumes it
    (:func:`experiments._common.open_run`): the training resumes from its latest checkpoint,
    each finished option family is read back, a finished run returns its ``results.json``
    unless ``restart``; an ``out`` holding another config is refused. ``mesh`` (``"data=8"``)
    shards the training (the SPDY stages run on one device).

    Returns:
      The results dict: ``dense_accuracy``, ``dense_loss``, ``levels``,
      ``unstructured_cpu_check``, ``families[family] = {layers, table, database,
      targets[str(speedup)] = {budget, search, <method>: {choice, profile, modelled_speedup,
      calib_loss, accuracy_layerwise, accuracy_gap, predicted_seconds, measured_seconds,
      measured_speedup, ...}}}`` (the structured family adds ``units``, ``fixed_seconds``,
      ``max_speedup``), ``summary`` (:func:`summarize`), ``history``, ``config``, ``timing``,
      ``environment``.
    """
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    out, train_ds, test_ds, sizes = prepare_run(config, resumed.out)
    if config.calib_samples > len(train_ds):
        raise ValueError(
            f"calib_samples={config.calib_samples} exceeds the training set ({len(train_ds)})"
        )
    model, history = _train_or_restore(config, train_ds, out, resumed)
    t_train = time.perf_counter()

    arch = fmodel.Arch.of(model)
    params, stats = fmodel.split(model)
    rng = np.random.default_rng(config.seed)
    idx = rng.choice(len(train_ds), config.calib_samples, replace=False)
    calib = (np.asarray(train_ds.x[idx], np.float32), np.asarray(train_ds.y[idx], np.int32))
    test = (np.asarray(test_ds.x, np.float32), np.asarray(test_ds.y, np.int32))
    dense_loss, dense_acc = _make_eval(arch)(
        params, stats, test[0], test[1], config.eval_batch_size
    )
    lv = levels(config)
    x_time = jnp.asarray(timing_images(calib[0], config.timing_batch))
    _, taps = fmodel.forward(arch, params, stats, x_time)
    results: dict[str, Any] = {
        "dense_accuracy": dense_acc,
        "dense_loss": dense_loss,
        "levels": list(lv),
        "unstructured_cpu_check": _unstructured_cpu_check(arch, params, taps, config),
        "families": {},
    }
    cache: dict[str, Any] = {}
    for family in config.families:
        results["families"][family] = resumed.stage(family) or resumed.finish_stage(
            family, _run_family(family, arch, params, stats, calib, test, lv, config, cache)
        )
    t_end = time.perf_counter()
    results["summary"] = summarize(results)
    results["history"] = history
    results["config"] = {**dataclasses.asdict(config), **config.fixed()}
    results["header"] = run_header(
        config, sizes, [config.seed], levels=config.num_levels, speedups=config.speedups
    )
    results["dataset_sizes"] = sizes
    results["timing"] = {
        "train_seconds": t_train - t0,
        "spdy_seconds": t_end - t_train,
        "total_seconds": t_end - t0,
    }
    results["environment"] = environment(
        timing_clock=timing_clock(config), loadavg_start=list(load0), mesh=resumed.mesh
    )
    if out is not None and is_primary():
        write_plot(results, os.path.join(out, "profiles.png"))
        write_checks_plot(results, os.path.join(out, "checks.png"))
    resumed.write_results(results)  # last: the run is finished
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The claims' figures per family and target: SPDY's test-accuracy margin (after global
    AdaPrune) over each baseline and over the DP alone, whether the search's best calibration
    loss never increased, and (structured family) the measured/predicted time ratios.

    Two agreements are reported. ``measured_over_predicted``: the compressed model's measured
    time over the table's prediction, both absolute, so a machine that runs faster or slower at
    check time than when the table was measured shifts every ratio alike (on the 2-core VM the
    dense model once ran at 0.83-0.99 of the table's ``base``). ``speedup_agreement``: measured
    speedup (dense over compressed, timed interleaved at check time) over the modelled one
    (``base`` over predicted); such drift cancels in it."""
    out: dict[str, Any] = {}
    for family, fam in results["families"].items():
        rows: dict[str, Any] = {}
        ratios, alt_ratios, speedup_ratios = [], [], []
        for target, entry in fam["targets"].items():
            if entry.get("unreachable"):
                rows[target] = {"unreachable": True}
                continue
            spdy_acc = entry["spdy"]["accuracy_gap"]
            row: dict[str, Any] = {"search_monotone": entry["search"]["monotone"]}
            for other in (*BASELINES, "dp"):
                e = entry[other]
                row[f"margin_over_{other}"] = (
                    None if e.get("infeasible") else spdy_acc - e["accuracy_gap"]
                )
            rows[target] = row
            for method in METHODS:
                r = entry[method].get("measured_over_predicted_seconds")
                if r is not None:
                    ratios.append(r)
                    alt_ratios.append(entry[method]["measured_over_predicted_alternative"])
                    speedup_ratios.append(entry[method]["measured_over_modelled_speedup"])
        out[family] = {"targets": rows}
        if ratios:
            out[family]["measured_over_predicted"] = {
                "min": float(np.min(ratios)),
                "median": float(np.median(ratios)),
                "max": float(np.max(ratios)),
                "within_15_percent": bool(np.all(np.abs(np.asarray(ratios) - 1) <= 0.15)),
                "table": fam.get("table_kind"),
                "alternative_table": {
                    "kind": next(k for k in TABLE_KINDS if k != fam.get("table_kind")),
                    "min": float(np.min(alt_ratios)),
                    "median": float(np.median(alt_ratios)),
                    "max": float(np.max(alt_ratios)),
                },
            }
            out[family]["speedup_agreement"] = {
                "min": float(np.min(speedup_ratios)),
                "median": float(np.median(speedup_ratios)),
                "max": float(np.max(speedup_ratios)),
                "within_15_percent": bool(np.all(np.abs(np.asarray(speedup_ratios) - 1) <= 0.15)),
            }
    return out


def format_table(results: dict[str, Any]) -> str:
    """Accuracy table: one row per (family, target, method)."""
    lines = [
        *([results["header"]] if "header" in results else []),
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
    for family, fam in results.get("summary", {}).items():
        for target, row in fam["targets"].items():
            if row.get("unreachable"):
                continue
            margins = ", ".join(
                f"{k.removeprefix('margin_over_')} {v * 100:+.2f}"
                for k, v in row.items()
                if k.startswith("margin_over_") and v is not None
            )
            lines.append(
                f"{family} {target}x: SPDY margin (points, after gAP): {margins}; "
                f"search loss monotone: {row['search_monotone']}"
            )
        if "measured_over_predicted" in fam:
            r = fam["measured_over_predicted"]
            lines.append(
                f"{family}: measured/predicted time ({r['table']} table) {r['min']:.3f}.."
                f"{r['max']:.3f} (median {r['median']:.3f}); all within 15%: "
                f"{r['within_15_percent']}; predicted by the {r['alternative_table']['kind']} "
                f"table instead: {r['alternative_table']['min']:.3f}.."
                f"{r['alternative_table']['max']:.3f}"
            )
            a = fam["speedup_agreement"]
            lines.append(
                f"{family}: measured/modelled speedup (machine drift cancels) {a['min']:.3f}.."
                f"{a['max']:.3f} (median {a['median']:.3f}); all within 15%: "
                f"{a['within_15_percent']}"
            )
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.replace("/kernel", "").replace("blocks/", "b").replace("/conv", "")


def write_plot(results: dict[str, Any], path: str) -> None:
    """Per-layer sparsity of every method's profile: one panel per (family, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = results["families"]
    ncols = max(len(f["targets"]) for f in fams.values())
    fig, axes = plt.subplots(
        len(fams), ncols, figsize=(4.6 * ncols, 3.3 * len(fams)), squeeze=False
    )
    for r, (family, fam) in enumerate(fams.items()):
        layers = fam["layers"]
        if "units" in fam:
            short = [f"{_short(u['producer'])}>{_short(u['consumer'])}" for u in fam["units"]]
        else:
            short = [_short(n) for n in layers]
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
            ax.set_xticks(np.arange(len(layers)), short, fontsize=7, rotation=30)
            ax.set_ylim(0, 1)
            ax.set_ylabel("sparsity" if family.startswith("unstr") else "channels dropped")
            ax.legend(fontsize=6)
        for c in range(len(fam["targets"]), ncols):
            axes[r][c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_checks_plot(results: dict[str, Any], path: str) -> None:
    """The two checks: the search's best calibration loss per scored candidate (one line per
    family and target; it never increases), and measured vs predicted end-to-end time of every
    structured profile (the band is +-15%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for family, fam in results["families"].items():
        for target, entry in fam["targets"].items():
            if entry.get("unreachable"):
                continue
            hist = np.asarray(entry["search"]["history"])
            ax0.plot(hist / hist[0], label=f"{family} {target}x", lw=1)
    ax0.set_xlabel("candidate")
    ax0.set_ylabel("best calibration loss / first")
    ax0.set_title("SPDY search (never increases)", fontsize=9)
    if ax0.lines:
        ax0.legend(fontsize=6)
    pts, alt, kinds = [], [], set()
    for fam in results["families"].values():
        for target, entry in fam["targets"].items():
            for method in METHODS:
                e = entry.get(method, {})
                if e.get("predicted_seconds") is not None:
                    pts.append((e["predicted_seconds"], e["measured_seconds"], method, target))
                    alt.append((e["predicted_alternative_seconds"], e["measured_seconds"]))
                    kinds.add(fam.get("table_kind"))
    if pts:
        pred, meas = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        every = np.concatenate([pred, meas, [p[0] for p in alt]])
        lo, hi = 0.9 * every.min(), 1.1 * every.max()
        xs = np.linspace(lo, hi, 2)
        ax1.plot(xs * 1e3, xs * 1e3, "k-", lw=0.8)
        ax1.fill_between(xs * 1e3, 0.85 * xs * 1e3, 1.15 * xs * 1e3, color="0.9")
        for k, method in enumerate(METHODS):
            sel = [i for i, p in enumerate(pts) if p[2] == method]
            ax1.scatter(pred[sel] * 1e3, meas[sel] * 1e3, s=18, marker="os^D"[k], label=method)
        other = [k for k in TABLE_KINDS if k not in kinds]
        ax1.scatter([p[0] * 1e3 for p in alt], [p[1] * 1e3 for p in alt], s=14, marker="x",
                    color="0.5", label=f"predicted by the {'/'.join(other)} table")  # fmt: skip
        ax1.set_xlabel("predicted by the table (ms)")
        ax1.set_ylabel("measured end to end (ms)")
        ax1.legend(fontsize=7)
    ax1.set_title("structured profiles: measured vs predicted time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
