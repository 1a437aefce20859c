"""The LM experiment: a char-level GPT on Tiny Shakespeare, trained with AdamW, CrAM and AC/DC,
then pruned in one shot with magnitude, Wanda and SparseGPT.

Claims tested (issue 21):

* the dense GPT at nanoGPT's CPU setting reaches a validation loss <= 1.90 nats per character
  (nanoGPT: about 1.88);
* at 50% and at 2:4, Wanda (Sun et al., ICLR 2024, arXiv:2306.11695) and SparseGPT (Frantar &
  Alistarh, ICML 2023, arXiv:2301.00774) lose at most half of what magnitude pruning loses, and
  SparseGPT is at least as good as Wanda at 2:4;
* a CrAM-trained GPT (Peste et al., ICLR 2023, arXiv:2207.14200) loses at most half of what the
  AdamW-trained one loses under one-shot 50% magnitude pruning.

Pipeline of :func:`run`, for every trainer in ``config.trainers``:

1. train :class:`jaxcompress.models.GPT` (tied embeddings, dropout 0) from the same
   initialisation on random windows of the training split (:func:`jaxcompress.data.windows`,
   seeded by ``(seed, 0, step)``) with AdamW (``adamw``), CrAM+ with inner AdamW and per-layer
   magnitude compressors (``cram``), or AC/DC with inner AdamW at ``acdc_sparsity`` per layer
   (``acdc``; its model ends in a compressed phase, so it is already sparse). The training
   state is saved every ``checkpoint_every`` steps under ``<out>/checkpoints/<trainer>-<hash>``
   with :class:`jaxcompress.checkpoint.Checkpointer`; a rerun into the same ``--out`` resumes
   there and never retrains a finished model;
2. evaluate the model on ``eval_windows`` fixed random validation windows;
3. prune it in one shot at every unstructured sparsity (per layer) and N:M pattern with every
   pruner; only the blocks' Linear kernels are pruned (embeddings, tied head and norms stay
   dense); Wanda and SparseGPT calibrate on ``calib_windows`` training windows; evaluate and
   sample text from every pruned model;
4. with ``spdy_speedups``: SPDY profiles of the AdamW model over an OBS (SparseGPT) database
   against uniform sparsity at the same modelled speedup (:func:`spdy_stage`);
5. with ``structured_keeps``: the AdamW model with whole attention heads and MLP units removed
   (group L2 norm, :func:`jaxcompress.prune.structured`), before and after ``iters // 10``
   AdamW steps of fine-tuning, with its block parameters and greedy decoding time
   (:func:`structured_stage`);
6. write ``results.json`` (atomically, after every stage) and ``loss_increase.png``.

Finished stages are cached under ``<out>/stages`` (keyed by a hash of the settings they depend
on), so a rerun only computes what is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments._common import (
    check_config,
    check_out,
    environment,
    parse_mesh,
    stage_bar,
    write_json_atomic,
)
from experiments.lm.configs.base import Config
from jaxcompress import data as jdata
from jaxcompress import masks as jmasks
from jaxcompress import optim as joptim
from jaxcompress import prune, spdy
from jaxcompress import train as jtrain
from jaxcompress.checkpoint import Checkpointer
from jaxcompress.models import GPT, generate

__all__ = [
    "block_kernels",
    "criteria",
    "format_table",
    "run",
    "spdy_stage",
    "structured_stage",
    "write_plot",
]

LOG_EVERY = 50
EVAL_BATCH = 100
SAMPLE_TEMPERATURE = 0.8  # nanoGPT's sample.py
TRAINER_NAMES = {"adamw": "AdamW", "cram": "CrAM+", "acdc": "AC/DC"}
# SPDY: per-layer sparsity options (plus the uniform level of every target), and a search
# smaller than the reference's (randinits 100, maxnoimp 100) to fit a 2-core CPU.
SPDY_LEVELS = tuple(round(0.1 * i, 1) for i in range(10))
SPDY_RANDINITS = 20
SPDY_MAXNOIMP = 20
SPDY_SCORE_WINDOWS = 32


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def block_kernels(path, leaf) -> bool:
    """The Linear kernels inside the GPT blocks (q, k, v, out, fc1, fc2); never the embeddings,
    the head or the norms."""
    return jmasks.prunable(path, leaf) and jmasks.path_str(path).startswith("blocks/")


def criteria(config: Config) -> dict[str, dict[str, Any]]:
    """The one-shot criteria by label: ``"50%"`` -> ``{"sparsity": 0.5}``, ``"2:4"`` ->
    ``{"n": 2, "m": 4}``."""
    out: dict[str, dict[str, Any]] = {
        f"{100 * s:g}%": {"sparsity": float(s)} for s in config.sparsities
    }
    out.update({f"{n}:{m}": {"n": n, "m": m} for n, m in config.nm_patterns})
    return out


def _fingerprint(config: Config, names: tuple[str, ...]) -> str:
    values = {name: getattr(config, name) for name in names}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


_MODEL_FIELDS = (
    "seed",
    "iters",
    "batch_size",
    "context",
    "num_layers",
    "num_heads",
    "d_model",
    "learning_rate",
    "min_lr",
    "warmup_iters",
    "weight_decay",
)
_TRAINER_FIELDS = {"adamw": (), "cram": ("cram_rho", "cram_sparsities"), "acdc": ("acdc_sparsity",)}
_SPDY_FIELDS = ("spdy_speedups", "calib_windows", "eval_windows")
_STRUCTURED_FIELDS = ("structured_keeps", "eval_windows")
_PRUNE_FIELDS = (
    "sparsities",
    "nm_patterns",
    "pruners",
    "calib_windows",
    "eval_windows",
    "sample_chars",
)


def make_model(config: Config, vocab_size: int) -> GPT:
    return GPT(
        vocab_size,
        context=config.context,
        d_model=config.d_model,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        rngs=nnx.Rngs(config.seed),
    )


def make_adamw(config: Config) -> optax.GradientTransformation:
    """nanoGPT's optimizer: gradient clipping at global norm 1, AdamW (beta2 0.99) with
    decoupled weight decay on every matrix and embedding (not on biases and norms), learning
    rate warmed up linearly and decayed by a cosine to ``min_lr`` at the last step."""
    lr, warmup, total = config.learning_rate, config.warmup_iters, config.iters
    cosine = optax.cosine_decay_schedule(lr, total - warmup, alpha=config.min_lr / lr)
    if warmup:
        ramp = optax.linear_schedule(lr / (warmup + 1), lr, warmup)
        schedule = optax.join_schedules([ramp, cosine], [warmup])
    else:
        schedule = cosine
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            schedule,
            b1=0.9,
            b2=0.99,
            weight_decay=config.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )


def make_optimizer(trainer: str, config: Config) -> optax.GradientTransformation:
    """AdamW, CrAM+ around it (per-layer magnitude compressors) or AC/DC around it."""
    inner = make_adamw(config)
    if trainer == "adamw":
        return inner
    if trainer == "cram":
        return joptim.cram(
            inner,
            rho=config.cram_rho,
            sparsities=config.cram_sparsities,
            compressor="layer",
            where=block_kernels,
            seed=config.seed,
        )
    unit = max(1, config.iters // 10)
    schedule = joptim.acdc_schedule(
        warmup_steps=unit,
        compressed_steps=unit,
        decompressed_steps=unit,
        final_compressed_steps=2 * unit,
        total_steps=config.iters,
    )
    return joptim.acdc(
        inner, sparsity=config.acdc_sparsity, schedule=schedule, scope="layer", where=block_kernels
    )


@functools.partial(jax.jit, static_argnums=0)
def _ce_sums(graphdef, state, x, y, w):
    logits = nnx.merge(graphdef, state)(x).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=-1)
    return jnp.sum(ce * w)


def evaluate(model: GPT, x: np.ndarray, y: np.ndarray) -> float:
    """Mean next-character cross-entropy (nats) of ``model`` over the windows ``(x, y)``, in
    eval mode; batches of :data:`EVAL_BATCH` windows, the last one padded and masked (one
    compile)."""
    graphdef, state = nnx.split(jtrain.eval_view(model))
    n = x.shape[0]
    bs = min(EVAL_BATCH, n)
    total = jnp.zeros(())
    for start in range(0, n, bs):
        xb, yb = x[start : start + bs], y[start : start + bs]
        w = np.zeros((bs,), np.float32)
        w[: xb.shape[0]] = 1.0
        if xb.shape[0] < bs:
            pad = ((0, bs - xb.shape[0]), (0, 0))
            xb, yb = np.pad(xb, pad), np.pad(yb, pad)
        total = total + _ce_sums(graphdef, state, xb, yb, w)
    return float(total) / n


def sample(model: GPT, corpus: jdata.CharCorpus, config: Config) -> str:
    """``config.sample_chars`` characters sampled after a newline (temperature 0.8)."""
    if config.sample_chars == 0:
        return ""
    prompt = jnp.asarray(corpus.encode("\n"))[None]
    ids = generate(
        model, prompt, config.sample_chars, jax.random.key(config.seed), SAMPLE_TEMPERATURE
    )
    return corpus.decode(np.asarray(ids[0, 1:]))


def _pruner(name: str) -> Callable[..., tuple[Any, Any]]:
    fn = getattr(prune, name, None)
    if fn is None:
        raise ValueError(
            f"pruners: jaxcompress.prune.{name} is not available in this installation; leave it "
            f"out (e.g. --pruners magnitude)"
        )
    return fn


def prune_model(
    pruner: str, model: GPT, calib: jax.Array, criterion: dict[str, Any]
) -> tuple[Any, float, float]:
    """Prune a copy of ``model``'s params; returns ``(pruned_params, actual_sparsity, seconds)``
    (sparsity over the block kernels)."""
    start = time.perf_counter()
    if pruner == "magnitude":
        scope = {"scope": "layer"} if "sparsity" in criterion else {}
        params, _ = prune.oneshot(
            nnx.state(model, nnx.Param), where=block_kernels, **scope, **criterion
        )
    else:
        params, _ = _pruner(pruner)(nnx.clone(model), calib, where=block_kernels, **criterion)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return params, float(jmasks.summary(params, where=block_kernels).sparsity), seconds


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def train_model(
    trainer: str, config: Config, train: jdata.CharCorpus, out: str | None
) -> tuple[GPT, dict[str, Any]]:
    """Train (or resume, or restore) one model; returns it with its training record."""
    model = make_model(config, train.vocab_size)
    graphdef, params, rest = jtrain.split_model(jtrain.train_view(model))
    tx = make_optimizer(trainer, config)
    opt_state = tx.init(params)
    step_fn = jtrain.make_train_step(graphdef, tx, pass_grad_fn=trainer == "cram")
    record: dict[str, Any] = {"history": [], "train_seconds": 0.0, "resumed_from": 0}
    fingerprint = _fingerprint(config, _MODEL_FIELDS + _TRAINER_FIELDS[trainer])
    ckpt = (
        None
        if out is None
        else Checkpointer(
            os.path.join(out, "checkpoints", f"{trainer}-{fingerprint}"), max_to_keep=1
        )
    )
    try:
        start = 0
        if ckpt is not None and ckpt.latest_step() is not None:
            restored = ckpt.restore(target={"params": params, "opt_state": opt_state})
            params, opt_state = restored["params"], restored["opt_state"]
            start = int(restored["step"])
            record.update(restored["extra"])
            record["resumed_from"] = start
        losses: list[jax.Array] = []
        with stage_bar(config.iters, f"train {trainer}", config.progress) as bar:
            bar.update(start)
            t0 = time.perf_counter()
            for t in range(start, config.iters):
                x, y = jdata.windows(train, config.batch_size, config.context, (config.seed, 0, t))
                params, rest, opt_state, metrics = step_fn(params, rest, opt_state, x, y)
                losses.append(metrics["loss"])
                done = t + 1
                if done % LOG_EVERY == 0 or done == config.iters:
                    loss = float(jnp.mean(jnp.stack(losses)))
                    record["history"].append({"step": done, "train_loss": loss})
                    bar.set_postfix(loss=f"{loss:.3f}")
                    losses = []
                if ckpt is not None and (
                    done % config.checkpoint_every == 0 or done == config.iters
                ):
                    record["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    extra = {k: record[k] for k in ("history", "train_seconds")}
                    ckpt.save(done, params=params, opt_state=opt_state, extra=extra)
                bar.update(1)
            if ckpt is None:
                record["train_seconds"] += time.perf_counter() - t0
    finally:
        if ckpt is not None:
            ckpt.close()
    nnx.update(model, params)
    model.eval()
    record["block_sparsity"] = float(
        jmasks.summary(nnx.state(model, nnx.Param), where=block_kernels).sparsity
    )
    return model, record


def prune_stage(
    trainer: str,
    model: GPT,
    config: Config,
    train: jdata.CharCorpus,
    val_xy: tuple[np.ndarray, np.ndarray],
    calib: jax.Array,
) -> dict[str, Any]:
    """Evaluate ``model`` and every one-shot pruned copy of it."""
    dense_params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    base = evaluate(model, *val_xy)
    result: dict[str, Any] = {
        "val_loss": base,
        "perplexity": float(np.exp(base)),
        "sample": sample(model, train, config),
        "pruned": {},
    }
    crit = criteria(config)
    with stage_bar(len(crit) * len(config.pruners), f"prune {trainer}", config.progress) as bar:
        for pruner in config.pruners:
            result["pruned"][pruner] = {}
            for label, criterion in crit.items():
                params, sparsity, seconds = prune_model(pruner, model, calib, criterion)
                nnx.update(model, params)
                loss = evaluate(model, *val_xy)
                result["pruned"][pruner][label] = {
                    "val_loss": loss,
                    "perplexity": float(np.exp(loss)),
                    "increase": loss - base,
                    "sparsity": sparsity,
                    "prune_seconds": seconds,
                    "sample": sample(model, train, config),
                }
                nnx.update(model, dense_params)
                bar.update(1)
    return result


def spdy_stage(
    model: GPT,
    config: Config,
    calib_xy: tuple[jax.Array, jax.Array],
    val_xy: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """SPDY (Frantar & Alistarh, ICML 2022) over an OBS database against uniform sparsity at
    the same modelled speedup, for every target in ``config.spdy_speedups``.

    * Time model: dense multiply-accumulates per token of every block kernel (``d_in d_out``),
      sparse time proportional to density; the fixed part is the tied head (``d V``) and the
      two attention products (``context d`` per block at the mean causal length).
    * Database: :func:`jaxcompress.spdy.obs_database` from the dense model's layer Hessians on
      the calibration windows; options :data:`SPDY_LEVELS` plus each target's uniform level
      ``s_u`` (the sparsity that gives every layer the target speedup).
    * Search: :func:`jaxcompress.spdy.search` scored by the calibration loss of the stitched
      model on :data:`SPDY_SCORE_WINDOWS` windows (the DP on the database errors is among the
      initial candidates); the uniform profile takes ``s_u`` in every layer from the same
      database. Both are evaluated on the validation windows.
    """
    calib_x, calib_y = calib_xy
    hessians = prune.hessians(model, calib_x, where=block_kernels)
    params = nnx.state(model, nnx.Param)
    leaves = {jmasks.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    flops = {name: float(np.prod(leaves[name].shape)) for name in hessians}
    overhead = float(
        config.d_model * model.vocab_size + config.num_layers * config.context * config.d_model
    )
    prunable = sum(flops.values())
    base = prunable + overhead
    uniform = {}
    for target in config.spdy_speedups:
        density = (base / target - overhead) / prunable
        if density <= 0.0:
            raise ValueError(
                f"spdy_speedups: {target} is beyond the modelled maximum {base / overhead:.2f}"
            )
        uniform[target] = float(np.ceil((1.0 - density) * 1e4) / 1e4)
    levels = sorted(set(SPDY_LEVELS) | set(uniform.values()))
    table = spdy.TimingTable.from_flops(flops, levels, overhead=overhead)
    start = time.perf_counter()
    database = spdy.obs_database(params, hessians, levels)
    database_seconds = time.perf_counter() - start
    stitch = spdy.stitcher(database, params)
    graphdef, _, rest = nnx.split(jtrain.eval_view(model), nnx.Param, ...)
    sx, sy = calib_x[:SPDY_SCORE_WINDOWS], jnp.asarray(calib_y[:SPDY_SCORE_WINDOWS])

    @jax.jit
    def calib_loss(stitch, params, choice):
        p, _ = stitch(params, choice)
        logits = nnx.merge(graphdef, p, rest)(sx).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, sy).mean()

    def measure(choice) -> dict[str, Any]:
        p, _ = database.stitch(params, choice)
        nnx.update(model, p)
        loss = evaluate(model, *val_xy)
        nnx.update(model, params)
        return {
            "val_loss": loss,
            "perplexity": float(np.exp(loss)),
            "calib_loss": float(calib_loss(stitch, params, jnp.asarray(choice))),
            "modelled_speedup": spdy.modelled_speedup(table, choice),
            "profile": {n: levels[int(c)] for n, c in zip(database.names, choice, strict=True)},
        }

    out: dict[str, Any] = {"levels": levels, "database_seconds": database_seconds}
    for target in config.spdy_speedups:
        uniform_choice = np.full(len(database.names), levels.index(uniform[target]))
        found = spdy.search(
            database.error_list(),
            table,
            spdy.budget(table, target),
            lambda c: float(calib_loss(stitch, params, jnp.asarray(c))),
            seed=config.seed,
            randinits=SPDY_RANDINITS,
            maxnoimp=SPDY_MAXNOIMP,
            initial=[np.ones(len(database.names))],
            progress=False,
        )
        out[f"{target:g}x"] = {
            "uniform_sparsity": uniform[target],
            "uniform": measure(uniform_choice),
            "spdy": {
                **measure(found.choice),
                "evaluations": int(found.evaluations),
                "search_seconds": float(found.seconds),
            },
        }
    return out


def _block_params(model: GPT) -> int:
    params = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(int(np.prod(x.shape)) for p, x in flat if jmasks.path_str(p).startswith("blocks/"))


def _decode_ms_per_token(model: GPT, context: int) -> float:
    """Milliseconds per token of greedy cached decoding of one sequence filling the context
    (median of 3 timed ``generate`` calls after a compile)."""
    prompt = jnp.zeros((1, 1), jnp.int32)
    steps = context - 1

    def call():
        return jax.block_until_ready(generate(model, prompt, steps, jax.random.key(0), 0.0))

    call()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / steps


def finetune_steps(config: Config) -> int:
    """AdamW steps of the structured stage's fine-tuning: a tenth of the training run."""
    return config.iters // 10


def _finetune(model: GPT, config: Config, train: jdata.CharCorpus) -> float:
    """:func:`finetune_steps` AdamW steps on ``model`` in place (nanoGPT's optimizer, its
    warm-up and cosine shrunk to the fine-tuning steps); returns the seconds taken."""
    steps = finetune_steps(config)
    ft_config = config.replace(iters=steps, warmup_iters=steps // 10)
    graphdef, params, rest = jtrain.split_model(jtrain.train_view(model))
    # the train step donates its inputs; structure.prune shares the arrays it did not slice
    # (embeddings, norms) with the model it pruned, so train on copies
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    tx = make_adamw(ft_config)
    opt_state = tx.init(params)
    step_fn = jtrain.make_train_step(graphdef, tx)
    start = time.perf_counter()
    for t in range(steps):
        x, y = jdata.windows(train, config.batch_size, config.context, (config.seed, 3, t))
        params, rest, opt_state, _ = step_fn(params, rest, opt_state, x, y)
    params = jax.block_until_ready(params)
    nnx.update(model, params)
    model.eval()
    return time.perf_counter() - start


def structured_stage(
    model: GPT, config: Config, train: jdata.CharCorpus, val_xy: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Structured one-shot pruning of ``model`` at every kept fraction of
    ``config.structured_keeps``.

    :func:`jaxcompress.prune.structured` traces the GPT's dependency groups: per block the
    attention heads (query, key, value and output projections of a head together) and the MLP
    units (``fc1`` columns with ``fc2`` rows). It keeps the fraction of each with the largest
    group L2 norm and rebuilds a physically smaller model. Per fraction: the validation loss
    before and after :func:`finetune_steps` AdamW steps, the block parameters kept, and the
    time per token of greedy cached decoding against the dense model's (this machine, one
    sequence). The unpruned model gets the same fine-tuning (``dense.finetuned_val_loss``), so
    the recovered loss is not mistaken for the effect of more training.
    """
    x = jnp.zeros((1, config.context), jnp.int32)
    dense_params = _block_params(model)
    base = evaluate(model, *val_xy)
    out: dict[str, Any] = {
        "dense": {
            "val_loss": base,
            "block_params": dense_params,
            "decode_ms_per_token": _decode_ms_per_token(model, config.context),
        }
    }
    if finetune_steps(config):  # the same fine-tuning of the unpruned model, for reference
        tuned = nnx.clone(model)
        _finetune(tuned, config, train)
        out["dense"]["finetuned_val_loss"] = evaluate(tuned, *val_xy)
    for keep in config.structured_keeps:
        pruned, masks = prune.structured(model, keep, x)
        oneshot = evaluate(pruned, *val_xy)
        seconds = _finetune(pruned, config, train) if finetune_steps(config) else 0.0
        loss = evaluate(pruned, *val_xy)
        kept_params = _block_params(pruned)
        out[f"{keep:g}"] = {
            "kept_units": {name: int(mask.sum()) for name, mask in masks.items()},
            "block_params": kept_params,
            "block_params_fraction": kept_params / dense_params,
            "oneshot_val_loss": oneshot,
            "oneshot_increase": oneshot - base,
            "val_loss": loss,
            "increase": loss - base,
            "finetune_seconds": seconds,
            "decode_ms_per_token": _decode_ms_per_token(pruned, config.context),
        }
    return out


def _targets(models: dict[str, Any], spdy_results: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets, each ``{"value": ..., "target": ..., "met": bool}`` (absent when a
    model or pruner needed for it was not run)."""
    out: dict[str, Any] = {}

    def inc(trainer, pruner, label):
        try:
            return models[trainer]["pruned"][pruner][label]["increase"]
        except KeyError:
            return None

    def versus(key, value, name, other, factor, target, *, strict=False) -> None:
        # ``value`` against ``factor * other`` (``other`` recorded as ``name``), when both exist
        if value is not None and other is not None:
            bound = factor * other
            met = value < bound if strict else value <= bound
            out[key] = {"value": value, name: other, "target": target, "met": met}

    if "adamw" in models:
        loss = models["adamw"]["val_loss"]
        out["dense_val_loss"] = {"value": loss, "target": "<= 1.90", "met": loss <= 1.90}
    half_magnitude = "<= half of magnitude's increase"
    for label in ("50%", "2:4"):
        mag = inc("adamw", "magnitude", label)
        for pruner in ("wanda", "sparsegpt"):
            value = inc("adamw", pruner, label)
            versus(f"{pruner}_vs_magnitude_{label}", value, "magnitude", mag, 0.5, half_magnitude)
    sg, wa = inc("adamw", "sparsegpt", "2:4"), inc("adamw", "wanda", "2:4")
    versus("sparsegpt_vs_wanda_2:4", sg, "wanda", wa, 1.0, "<= Wanda's increase")
    cram, adamw = inc("cram", "magnitude", "50%"), inc("adamw", "magnitude", "50%")
    half_adamw = "<= half of AdamW's increase"
    versus("cram_vs_adamw_magnitude_50%", cram, "adamw", adamw, 0.5, half_adamw)
    for key, entry in (spdy_results or {}).items():
        if isinstance(entry, dict) and "spdy" in entry:
            value, uni = entry["spdy"]["val_loss"], entry["uniform"]["val_loss"]
            below = "below uniform sparsity at the same modelled speedup"
            versus(f"spdy_vs_uniform_{key}", value, "uniform", uni, 1.0, below, strict=True)
    return out


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def run(
    config: Config,
    out: str | os.PathLike | None = None,
    *,
    mesh: str | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Run the experiment; write ``results.json`` and ``loss_increase.png`` to ``out``.

    Args:
      config: a :class:`Config` (validated first).
      out: output directory (created and checked for writing before any data is loaded);
        ``None`` writes nothing and keeps no checkpoints.
      mesh: only ``None`` or a one-device mesh (``"data=1"``): the LM trains with its own loop
        on one device.
      restart: delete the checkpoints and cached stages of earlier runs in ``out`` first
        (without it a rerun resumes them; they are keyed by the settings they depend on).

    Returns:
      The results dict (also ``results.json``): ``models[trainer]`` with ``val_loss``,
      ``perplexity`` (per character), ``sample``, ``block_sparsity``, ``history``,
      ``train_seconds``, ``resumed_from`` and ``pruned[pruner][criterion]`` (``val_loss``,
      ``perplexity``, ``increase``, ``sparsity``, ``prune_seconds``, ``sample``);
      ``spdy["<target>x"]`` with the ``uniform`` and ``spdy`` profiles (``val_loss``,
      ``calib_loss``, ``modelled_speedup``, ``profile``); ``targets``; ``config``; ``header``;
      ``timing``; ``environment``; ``complete``.
    """
    check_config(config, Config)
    for pruner in config.pruners:
        if pruner != "magnitude":
            _pruner(pruner)
    if mesh is not None and math.prod(parse_mesh(mesh, num_devices=math.inf).values()) > 1:
        raise ValueError(
            f"mesh={mesh!r}: experiments.lm trains with its own loop on one device; leave "
            "--mesh out or use data=1"
        )
    out = None if out is None else check_out(out)
    if out is not None and restart:
        for name in ("checkpoints", "stages"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    t0 = time.perf_counter()
    train = jdata.tinyshakespeare("train", data_dir=config.data_dir)
    val = jdata.tinyshakespeare("val", data_dir=config.data_dir)
    val_xy = jdata.windows(val, config.eval_windows, config.context, (config.seed, 1))
    calib_xy = jdata.windows(train, config.calib_windows, config.context, (config.seed, 2))
    calib = jnp.asarray(calib_xy[0])
    n_params = sum(
        int(np.prod(p.shape))
        for p in jax.tree.leaves(nnx.state(make_model(config, train.vocab_size), nnx.Param))
    )
    results: dict[str, Any] = {
        "header": (
            f"tinyshakespeare: GPT {config.num_layers}x{config.d_model} ({n_params:,} params), "
            f"context {config.context}, {config.iters} steps of {config.batch_size} windows; "
            f"val loss over {config.eval_windows} windows; seed {config.seed}"
        ),
        "models": {},
        "config": dataclasses.asdict(config),
        "num_params": n_params,
        "timing": {},
        "environment": environment(),
        "complete": False,
    }
    stage_fp = _fingerprint(config, _MODEL_FIELDS + _PRUNE_FIELDS)
    for trainer in config.trainers:
        stage_file = (
            None
            if out is None
            else os.path.join(
                out,
                "stages",
                f"{trainer}-{stage_fp}-{_fingerprint(config, _TRAINER_FIELDS[trainer])}.json",
            )
        )
        if stage_file is not None and os.path.isfile(stage_file):
            with open(stage_file) as f:
                results["models"][trainer] = json.load(f)
            continue
        ts = time.perf_counter()
        model, record = train_model(trainer, config, train, out)
        tp = time.perf_counter()
        entry = prune_stage(trainer, model, config, train, val_xy, calib)
        entry.update(record)
        entry["prune_seconds"] = time.perf_counter() - tp
        entry["stage_seconds"] = time.perf_counter() - ts
        results["models"][trainer] = entry
        if stage_file is not None:
            write_json_atomic(stage_file, entry)
            write_json_atomic(os.path.join(out, "results.json"), results)
    if config.spdy_speedups is not None:
        results["spdy"] = _spdy_results(config, train, calib_xy, val_xy, out)
    if config.structured_keeps is not None:
        results["structured"] = _structured_results(config, train, val_xy, out)
    results["targets"] = _targets(results["models"], results.get("spdy"))
    results["timing"]["total_seconds"] = time.perf_counter() - t0
    results["complete"] = True
    if out is not None:
        write_json_atomic(os.path.join(out, "results.json"), results)
        write_plot(results, os.path.join(out, "loss_increase.png"))
    return results


def _spdy_results(config, train, calib_xy, val_xy, out) -> dict[str, Any]:
    """The SPDY stage on the AdamW model (trained or restored), cached in ``<out>/stages``."""
    stage_file = (
        None
        if out is None
        else os.path.join(
            out, "stages", f"spdy-{_fingerprint(config, _MODEL_FIELDS + _SPDY_FIELDS)}.json"
        )
    )
    if stage_file is not None and os.path.isfile(stage_file):
        with open(stage_file) as f:
            return json.load(f)
    model, _ = train_model("adamw", config, train, out)
    with stage_bar(1, "spdy adamw", config.progress) as bar:
        result = spdy_stage(model, config, (jnp.asarray(calib_xy[0]), calib_xy[1]), val_xy)
        bar.update(1)
    if stage_file is not None:
        write_json_atomic(stage_file, result)
    return result


def _structured_results(config, train, val_xy, out) -> dict[str, Any]:
    """The structured stage on the AdamW model, cached in ``<out>/stages``."""
    fingerprint = _fingerprint(config, _MODEL_FIELDS + _STRUCTURED_FIELDS)
    stage_file = (
        None if out is None else os.path.join(out, "stages", f"structured-{fingerprint}.json")
    )
    if stage_file is not None and os.path.isfile(stage_file):
        with open(stage_file) as f:
            return json.load(f)
    model, _ = train_model("adamw", config, train, out)
    with stage_bar(len(config.structured_keeps), "structured adamw", config.progress) as bar:
        result = structured_stage(model, config, train, val_xy)
        bar.update(len(config.structured_keeps))
    if stage_file is not None:
        write_json_atomic(stage_file, result)
    return result


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: per model the validation loss, then the loss (and its increase) of
    every pruner at every criterion, then the targets."""
    lines = [results["header"]]
    for trainer, entry in results["models"].items():
        lines.append(
            f"\n{TRAINER_NAMES.get(trainer, trainer)}: val loss {entry['val_loss']:.4f} nats/char "
            f"(perplexity {entry['perplexity']:.3f}), block sparsity "
            f"{entry['block_sparsity']:.2f}, trained in {entry['train_seconds']:.0f} s"
        )
        pruned = entry["pruned"]
        labels = list(next(iter(pruned.values())).keys()) if pruned else []
        lines.append(f"  {'pruner':<10}" + "".join(f"{label:>18}" for label in labels))
        for pruner, rows in pruned.items():
            cells = "".join(
                f"{rows[label]['val_loss']:>9.4f} ({rows[label]['increase']:+.3f})"
                for label in labels
            )
            lines.append(f"  {pruner:<10}{cells}")
    for key, entry in (results.get("spdy") or {}).items():
        if isinstance(entry, dict) and "spdy" in entry:
            uni, found = entry["uniform"], entry["spdy"]
            lines.append(
                f"\nSPDY {key} (AdamW model): uniform {entry['uniform_sparsity']:.3f} val loss "
                f"{uni['val_loss']:.4f}; SPDY profile val loss {found['val_loss']:.4f} "
                f"(modelled speedups {uni['modelled_speedup']:.3f} / "
                f"{found['modelled_speedup']:.3f}, {found['evaluations']} profiles scored)"
            )
    structured = results.get("structured") or {}
    if structured:
        dense = structured["dense"]
        lines.append(
            f"\nstructured (AdamW model: heads and MLP units by group L2 norm, then "
            f"fine-tuned); dense {dense['block_params']:,} block params, "
            f"{dense['decode_ms_per_token']:.2f} ms/token"
            + (
                f", fine-tuned unpruned {dense['finetuned_val_loss']:.4f}"
                if "finetuned_val_loss" in dense
                else ""
            )
        )
        for key, row in structured.items():
            if key != "dense":
                lines.append(
                    f"  keep {key:>5}: {row['block_params_fraction']:.2f} of the params, "
                    f"one-shot {row['oneshot_val_loss']:.4f} ({row['oneshot_increase']:+.3f}), "
                    f"fine-tuned {row['val_loss']:.4f} ({row['increase']:+.3f}), "
                    f"{row['decode_ms_per_token']:.2f} ms/token"
                )
    targets = results.get("targets", {})
    if targets:
        lines.append("\ntargets:")
        for name, t in targets.items():
            lines.append(
                f"  {name}: {t['value']:.4f} ({t['target']}"
                + "".join(
                    f", {k} {v:.4f}" for k, v in t.items() if k in ("magnitude", "wanda", "adamw")
                )
                + f") {'met' if t['met'] else 'NOT met'}"
            )
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: str) -> None:
    """Validation-loss increase against the criterion, one panel per trained model and one line
    per pruner; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(
        1, len(models), figsize=(4.2 * len(models), 3.6), sharey=True, squeeze=False
    )
    for ax, (trainer, entry) in zip(axes[0], models.items(), strict=True):
        for pruner, rows in entry["pruned"].items():
            labels = list(rows)
            ax.plot(
                labels, [max(rows[k]["increase"], 1e-4) for k in labels], marker="o", label=pruner
            )
        ax.set_yscale("log")
        ax.set_title(f"{TRAINER_NAMES.get(trainer, trainer)} (dense {entry['val_loss']:.3f})")
        ax.set_xlabel("one-shot sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val loss increase (nats/char)")
    axes[0][0].legend()
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".loss_increase.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
