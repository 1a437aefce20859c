"""The configuration dataclass of the latency-surrogate experiment."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from experiments.oneshot.configs.base import check_ints, check_widths, is_real

TASKS = ("cnn", "sst2", "mlp")
IMAGE_DATASETS = ("fashion_mnist", "mnist", "digits")
CNN_ROUNDINGS = ("steer", "extract", "budget")
BUDGET_CRITERIA = ("gates", "loss")
SCALES = ("none", "rms")  # surrogate_penalty(scale=...)
NORMALIZE_LAST = ("none", "surrogate", "all")  # which CNN runs normalise the last gates


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one run; :meth:`validate` checks them all before any work.

    FLOPs targets are fractions of the full-width reference model's multiply-adds. Every
    compressed model of a task gets the same total epoch budget as that task's reference
    (see :mod:`experiments.surrogate.train`).

    Shared:

    Attributes:
      tasks: which of ``cnn`` (gated BN CNN), ``sst2`` (gated transformer) and ``mlp``
        (low-rank MLP) to run.
      data_dir: data root (default ``$JAXCOMPRESS_DATA_DIR``).
      seed: first seed (initialisation, shuffling, subsets).
      num_seeds: repetitions with seeds ``seed, seed + 1, ...``; points report the mean over
        seeds and the sample standard deviation (``num_seeds > 1``).
      gate_init: initial value of every gate. Adam moves each parameter by about the learning
        rate per step, so a gate needs about ``gate_init / lr`` steps to reach zero, and the
        real FLOPs the controller steers lag lambda by that much; at 1.0 lambda overshoots
        and too many units are removed. 0.1 puts the gates on the scale of the weights. In
        the CNN the gates of all but the last block are followed by a BatchNorm, so their
        scale does not change the function; the MLP folds ``1 / gate_init`` into the next
        weights (same function as the dense model).
      p: exponent of the surrogate width :math:`r(\\alpha) = (\\|\\alpha\\|_1 /
        \\|\\alpha\\|_2)^p`.
      tau: extraction threshold, relative to the largest gate of a group.
      prune_during_training: zero, at every step of the penalty phase, the gates below
        ``tau`` times their group's largest (``project_nonnegative(prune_below=tau)``), so
        the network adapts to what extraction removes. Without it the l1/l2 ratio leaves a
        continuum of small gates and extraction removed channels as large as kept ones
        (90.6% -> 27.1% before fine-tuning at target 0.2 in the first full run).
      scale: ``surrogate_penalty(scale=...)`` of the l1/l2 runs: ``"none"`` (the gradient of
        the penalty, as in the paper) or ``"rms"`` (each group's push times the rms of its
        gates, so it does not fade as the gates grow). In the seed-0 CNN ablations (RESULTS.md)
        ``"rms"`` was 0.2-0.3 points more accurate at the two smaller targets and used more
        FLOPs at the largest; one seed, within the noise, so the default stays ``"none"``.
      l1_lam0: initial lambda of the l1 baseline (its penalty is the sum of all gates); the
        surrogate's is per task (``cnn_lam0``, ``sst2_lam0``, ``mlp_lam0``).
      lam_max: upper clip of lambda.
      latency_batch_size: batch of the timed forward passes.
      latency_repeats: timed repetitions per round (the median is taken).
      latency_rounds: interleaved rounds over all models of a task (the median of the round
        medians is reported).
      eval_batch_size: evaluation batch size.
      progress: show progress bars.

    CNN on images (``cnn_*``): :class:`jaxcompress.latency.GatedCNN` vs uniform widths.

    Attributes:
      cnn_dataset: ``fashion_mnist``, ``mnist`` or ``digits``.
      cnn_widths: full conv widths.
      cnn_strides: conv strides per block.
      cnn_pool_after: a 2x2 max pool after the block (the default uses strides instead:
        XLA's CPU max-pool gradient is several times slower than a strided conv).
      cnn_normalize_last_gates: which gated CNN runs use ``GatedCNN(normalize_last=True)``:
        ``"surrogate"`` (default: the l1/l2 runs, FLOPs and latency form), ``"all"`` (l1 too)
        or ``"none"``. The last block's gates feed the head with no BatchNorm after them, so
        raw, their common scale is a logit temperature that the loss grows in lock-step, the
        gates stay nearly equal (``gate_diagnostics`` uniformity 0.94), and the ratio, whose
        push vanishes at equal gates, kept that block whole (128/128) at every target.
        Normalised, the surrogate prunes it (56-111 channels). Over seeds 0-4 it matched raw
        gates at target 0.5 with 4% fewer FLOPs and gained 0.18 and 0.20 points at 0.35 and
        0.2; over ten seeds it ties or beats l1 at 2 of 3 budgets (RESULTS.md). l1 is best
        with raw gates (it lost 0.3 points at target 0.2 normalised), hence the per-method
        default. Before 2026-11-23 the default was ``"none"``.
      cnn_epochs: epoch budget of every model (uniform: all of it; surrogate and l1:
        ``cnn_epochs - cnn_finetune_epochs`` with the penalty, then fine-tuning).
      cnn_finetune_epochs: fine-tuning epochs of the extracted models.
      cnn_batch_size, cnn_learning_rate: Adam with a cosine decay over the budget.
      cnn_targets: FLOPs targets of the surrogate and l1 runs. 0.42 (added 2026-11-23)
        samples the gap between 0.5 and 0.35 in which "within 0.3 points of full width at
        1.2x fewer FLOPs than uniform x0.75" is decided (0.566 / 1.2 = 0.472); over ten seeds
        it was the cheapest point inside the band (RESULTS.md).
      cnn_lam0: initial lambda of the l1/l2 surrogate (its penalty is the cost ratio in
        [0, 1]). With the multiplicative controller it sets when pruning starts: at 0.1 the
        CNN reached its FLOPs target within the first epoch, overshot it (0.39 at target 0.5)
        and fixed its widths on a barely trained network; 0.01 starts about an epoch later.
        Seed 0 (RESULTS.md, ablation F): 0.01 was as or more accurate at every target
        (+0.26 / +0.18 / +0.51 points) at 0.465 / 0.316 / 0.183 of the FLOPs; 0.001 lay in
        between. The l1 baseline's ``l1_lam0`` was checked the same way (1e-4 was worse).
      cnn_gain: gain :math:`k` of the multiplicative lambda controller,
        :math:`\\lambda \\leftarrow \\lambda e^{k (F - F^*)/F^*}` per step, with :math:`F` the
        cost at the widths extraction would keep (``feedback="active"``). It must be small
        against the ``gate_init / lr`` steps by which the real cost lags lambda.
      cnn_channel_multiple: the surrogate and l1 models keep channel counts that are
        multiples of this (``extract(multiple=...)``: the largest removed gates fill up to
        the next multiple). XLA:CPU ran the extracted CNNs with odd counts such as
        13/31/13/128 up to 3x slower than their FLOPs predict; rounded to multiples of 8 all
        18 tracked their FLOPs (RESULTS.md, "Channel counts rounded to multiples of 8"). The
        default uniform multipliers give multiples of 8 too. Over three seeds, 8 met the
        latency target (6 of 6) but cost the surrogate up to 0.65 points at equal targets and
        put it below the uniform curve, so the default stays 1 (exact counts).
      cnn_rounding: how the rounding to ``cnn_channel_multiple`` meets the FLOPs target
        (no effect at multiple 1). ``"steer"``: the lambda controller steers the cost of the
        rounded counts, the model extraction returns. ``"extract"``: it steers the exact
        surviving counts, and extraction rounds up afterwards (over the target by up to 25%
        at target 0.2). ``"budget"``: it steers the exact counts, and extraction rounds
        within the target (``extract(max_macs=target * full-width MACs)``, which drops the
        smallest kept gates where rounding up would exceed it). Over three seeds at multiple
        8 (RESULTS.md), ``"budget"`` kept every model within its target and was the best
        order for l1 (91.71 / 91.35 / 91.02% at targets 0.5 / 0.35 / 0.2). With the gate-mass
        criterion it cut the surrogate's narrow block 2 to 8 channels at target 0.2 (89.69%,
        against 90.22% with ``"steer"``); with the loss criterion (default) the surrogate
        reached 91.75 / 91.26 / 90.65% at 0.494 / 0.334 / 0.194 of the FLOPs, within 0.22
        points of exact counts, and all 9 models tracked their FLOPs in latency. So
        ``"budget"`` is the default (it matters only with ``cnn_channel_multiple > 1``).
      cnn_budget_criterion: what ``"budget"`` rounding drops first: ``"loss"`` (least loss
        increase per MAC saved on 2,048 training images,
        :func:`jaxcompress.latency.calibration_loss`; default) or ``"gates"`` (least relative
        gate mass per MAC saved). For l1 both chose the same widths in all 9 runs.
      cnn_multipliers: uniform width multipliers; must contain 1.0 (the reference).
      cnn_latency_targets: targets of a third compressed method, ``surrogate_latency``: the
        latency form of the surrogate (spec 4.2), steered to these fractions of the
        *modelled* full-width latency. ``()`` (default) skips it. The latency model is a
        :class:`jaxcompress.latency.LatencyModel` of every conv / dense term, measured once
        per run on this device (:func:`jaxcompress.latency.measure_latency_model`) and saved
        as ``cnn_latency_table.json`` (a SPDY ``TimingTable``). With
        ``cnn_channel_multiple > 1`` the controller steers the modelled latency of the
        rounded counts (``"steer"`` rounding; budget rounding is in MACs).
      cnn_latency_grid: width multipliers at which every gated group of a term is timed
        (all combinations for a two-group conv); must contain 1.0.
      cnn_latency_monotone: steer with :meth:`jaxcompress.latency.LatencyModel.monotone`, the
        lower envelope of every grid over wider widths (a layer can be zero-padded to a wider,
        faster width). The measured CPU grid is not monotone, and steered by it as measured the
        latency form kept blocks 0-2 whole and stalled above its target (RESULTS.md).
      cnn_latency_padding: extract each latency-form model at the widths where the measured
        grid is fastest among widths at least as wide
        (:meth:`jaxcompress.latency.LatencyModel.fastest_widths`, via ``extract(...,
        latency_model=)``): zero-padding, the same function, at the width where the monotone
        envelope that steered it was attained. Without it a 56-channel conv, priced at the
        64-channel time, ran at the slower 56-channel one (RESULTS.md).
      cnn_latency_batch: batch of the timed terms. On the CPU backend they are timed on this
        process's CPU clock with single-threaded executables, which gave far steadier grids
        than the wall clock (RESULTS.md); on an accelerator on the wall clock.
      cnn_train_subset, cnn_test_subset: random subsets (``None``: all).

    Transformer on SST-2 (``sst2_*``): :class:`jaxcompress.latency.GatedTransformerClassifier`
    with gated heads and FFN neurons.

    Attributes:
      sst2_d_model, sst2_num_heads, sst2_num_layers, sst2_mlp_dim, sst2_dropout: the model.
      sst2_max_len: tokens per sentence (longer ones are truncated); FLOPs are counted at it.
      sst2_min_freq: minimum training count of a word to get its own id.
      sst2_epochs, sst2_finetune_epochs, sst2_batch_size, sst2_learning_rate: as for the CNN
        (Adam, linear warm-up over ``sst2_warmup_steps``, cosine decay).
      sst2_targets: FLOPs targets.
      sst2_lam0: initial lambda (see ``cnn_lam0``).
      sst2_gain: controller gain (see ``cnn_gain``).
      sst2_multipliers: optional uniform width multipliers (heads and FFN widths), ``()``
        for none.
      sst2_train_subset: random training subset (``None``: all 67,349 phrases).

    Low-rank MLP (``mlp_*``): a dense MLP, its full-rank SVD as a
    :class:`jaxcompress.latency.GatedMLP` with rank and neuron gates, against uniform
    truncated SVD at equal FLOPs.

    Attributes:
      mlp_dataset: ``mnist``, ``fashion_mnist`` or ``digits``.
      mlp_hidden: hidden widths of the dense MLP.
      mlp_epochs: epochs of the dense MLP (shared by both methods).
      mlp_penalty_epochs: epochs of the gated model with the penalty.
      mlp_finetune_epochs: fine-tuning epochs of its extracted model; truncated SVD is
        fine-tuned for ``mlp_penalty_epochs + mlp_finetune_epochs``.
      mlp_batch_size, mlp_learning_rate: Adam, cosine decay.
      mlp_targets: FLOPs targets (fractions of the dense MLP).
      mlp_lam0: initial lambda (see ``cnn_lam0``).
      mlp_gain: controller gain (see ``cnn_gain``).
      mlp_train_subset, mlp_test_subset: random subsets (``None``: all).
    """

    tasks: tuple[str, ...] = TASKS
    data_dir: str | None = None
    seed: int = 0
    num_seeds: int = 1
    gate_init: float = 0.1
    p: float = 2.0
    tau: float = 1e-2
    prune_during_training: bool = True
    scale: str = "none"
    l1_lam0: float = 1e-3
    lam_max: float = 1e3
    latency_batch_size: int = 64
    latency_repeats: int = 30
    latency_rounds: int = 3
    eval_batch_size: int = 1000
    progress: bool = True

    cnn_dataset: str = "fashion_mnist"
    cnn_widths: tuple[int, ...] = (32, 64, 64, 128)
    cnn_strides: tuple[int, ...] = (2, 2, 2, 1)
    cnn_pool_after: tuple[bool, ...] = (False, False, False, False)
    cnn_normalize_last_gates: str = "surrogate"
    cnn_epochs: int = 8
    cnn_finetune_epochs: int = 2
    cnn_batch_size: int = 128
    cnn_learning_rate: float = 3e-3
    cnn_targets: tuple[float, ...] = (0.5, 0.42, 0.35, 0.2)
    cnn_lam0: float = 0.01
    cnn_gain: float = 0.005
    cnn_channel_multiple: int = 1
    cnn_rounding: str = "budget"
    cnn_budget_criterion: str = "loss"
    cnn_multipliers: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    cnn_latency_targets: tuple[float, ...] = ()
    cnn_latency_grid: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    cnn_latency_batch: int = 512
    cnn_latency_monotone: bool = True
    cnn_latency_padding: bool = True
    cnn_train_subset: int | None = None
    cnn_test_subset: int | None = None

    sst2_d_model: int = 64
    sst2_num_heads: int = 4
    sst2_num_layers: int = 2
    sst2_mlp_dim: int = 128
    sst2_dropout: float = 0.0
    sst2_max_len: int = 32
    sst2_min_freq: int = 2
    sst2_epochs: int = 2
    sst2_finetune_epochs: int = 1
    sst2_batch_size: int = 128
    sst2_learning_rate: float = 1e-3
    sst2_warmup_steps: int = 100
    sst2_targets: tuple[float, ...] = (0.5, 0.3, 0.2)
    sst2_lam0: float = 0.1
    sst2_gain: float = 0.01
    sst2_multipliers: tuple[float, ...] = ()
    sst2_train_subset: int | None = None

    mlp_dataset: str = "mnist"
    mlp_hidden: tuple[int, ...] = (300, 100)
    mlp_epochs: int = 6
    mlp_penalty_epochs: int = 2
    mlp_finetune_epochs: int = 2
    mlp_batch_size: int = 128
    mlp_learning_rate: float = 1e-3
    mlp_targets: tuple[float, ...] = (0.4, 0.25, 0.15)
    mlp_lam0: float = 0.1
    mlp_gain: float = 0.003
    mlp_train_subset: int | None = None
    mlp_test_subset: int | None = None

    def replace(self, **changes) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        if (
            not isinstance(self.tasks, tuple)
            or not self.tasks
            or not all(t in TASKS for t in self.tasks)
            or len(set(self.tasks)) != len(self.tasks)
        ):
            raise ValueError(
                f"tasks must be a non-empty tuple of distinct names from {TASKS}, got "
                f"{self.tasks!r}"
            )
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise TypeError(f"data_dir must be a str path or None, got {self.data_dir!r}")
        for name in (
            "progress",
            "prune_during_training",
            "cnn_latency_monotone",
            "cnn_latency_padding",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_ints(self, ("seed",), minimum=0)
        check_ints(
            self,
            (
                "num_seeds",
                "latency_batch_size",
                "latency_repeats",
                "latency_rounds",
                "eval_batch_size",
                "cnn_epochs",
                "cnn_batch_size",
                "cnn_channel_multiple",
                "cnn_latency_batch",
                "sst2_d_model",
                "sst2_num_heads",
                "sst2_num_layers",
                "sst2_mlp_dim",
                "sst2_max_len",
                "sst2_min_freq",
                "sst2_epochs",
                "sst2_batch_size",
                "mlp_epochs",
                "mlp_penalty_epochs",
                "mlp_batch_size",
            ),
        )
        check_ints(
            self,
            (
                "cnn_finetune_epochs",
                "sst2_finetune_epochs",
                "mlp_finetune_epochs",
                "sst2_warmup_steps",
            ),
            minimum=0,
        )
        for task in ("cnn", "sst2"):
            epochs = getattr(self, f"{task}_epochs")
            finetune = getattr(self, f"{task}_finetune_epochs")
            if finetune >= epochs:
                raise ValueError(
                    f"{task}_finetune_epochs must be < {task}_epochs={epochs} (the penalty phase "
                    f"needs at least one epoch of the budget), got {finetune!r}"
                )
        check_ints(
            self,
            (
                "cnn_train_subset",
                "cnn_test_subset",
                "sst2_train_subset",
                "mlp_train_subset",
                "mlp_test_subset",
            ),
            optional=True,
        )
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        lam0s = ("cnn_lam0", "sst2_lam0", "mlp_lam0", "l1_lam0")
        for name in ("gate_init", "p", "lam_max", *lam0s):
            _positive_real(self, name)
        for name in lam0s:
            if getattr(self, name) > self.lam_max:
                raise ValueError(
                    f"{name} must be <= lam_max={self.lam_max!r}, got {getattr(self, name)!r}"
                )
        for name in (
            "cnn_learning_rate",
            "sst2_learning_rate",
            "mlp_learning_rate",
            "cnn_gain",
            "sst2_gain",
            "mlp_gain",
        ):
            _positive_real(self, name)
        if not is_real(self.tau) or not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be a float in [0, 1), got {self.tau!r}")
        if not is_real(self.sst2_dropout) or not 0.0 <= self.sst2_dropout < 1.0:
            raise ValueError(f"sst2_dropout must be a float in [0, 1), got {self.sst2_dropout!r}")
        for name in ("cnn_dataset", "mlp_dataset"):
            if getattr(self, name) not in IMAGE_DATASETS:
                raise ValueError(
                    f"{name} must be one of {IMAGE_DATASETS}, got {getattr(self, name)!r}"
                )
        for name in ("cnn_widths", "cnn_strides", "mlp_hidden"):
            check_widths(self, name)
        if len(self.cnn_strides) != len(self.cnn_widths):
            raise ValueError(
                f"cnn_strides must have one entry per conv block (len(cnn_widths)="
                f"{len(self.cnn_widths)}), got {self.cnn_strides!r}"
            )
        if (
            not isinstance(self.cnn_pool_after, tuple)
            or len(self.cnn_pool_after) != len(self.cnn_widths)
            or not all(isinstance(v, bool) for v in self.cnn_pool_after)
        ):
            raise ValueError(
                f"cnn_pool_after must be a tuple of {len(self.cnn_widths)} bools, got "
                f"{self.cnn_pool_after!r}"
            )
        if self.sst2_d_model % self.sst2_num_heads:
            raise ValueError(
                f"sst2_d_model must be divisible by sst2_num_heads={self.sst2_num_heads}, got "
                f"{self.sst2_d_model!r}"
            )
        if self.cnn_normalize_last_gates not in NORMALIZE_LAST:
            raise ValueError(
                f"cnn_normalize_last_gates must be one of {NORMALIZE_LAST}, got "
                f"{self.cnn_normalize_last_gates!r}"
            )
        if self.cnn_budget_criterion not in BUDGET_CRITERIA:
            raise ValueError(
                f"cnn_budget_criterion must be one of {BUDGET_CRITERIA}, got "
                f"{self.cnn_budget_criterion!r}"
            )
        if self.cnn_rounding not in CNN_ROUNDINGS:
            raise ValueError(
                f"cnn_rounding must be one of {CNN_ROUNDINGS}, got {self.cnn_rounding!r}"
            )
        for name in ("cnn_targets", "sst2_targets", "mlp_targets"):
            _fractions(self, name, allow_empty=False, upper_inclusive=False)
        _fractions(self, "cnn_latency_targets", allow_empty=True, upper_inclusive=False)
        for name, required in (
            ("cnn_multipliers", True),
            ("sst2_multipliers", False),
            ("cnn_latency_grid", True),
        ):
            value = _fractions(self, name, allow_empty=not required, upper_inclusive=True)
            if required and 1.0 not in value:
                raise ValueError(
                    f"{name} must contain 1.0 (the full-width reference), got {value!r}"
                )
        return self


def _positive_real(config: Config, name: str) -> None:
    value = getattr(config, name)
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


def _fractions(
    config: Config, name: str, *, allow_empty: bool, upper_inclusive: bool
) -> tuple[Any, ...]:
    value = getattr(config, name)
    bound = "(0, 1]" if upper_inclusive else "(0, 1)"

    def ok(v) -> bool:
        return is_real(v) and 0.0 < v and (v <= 1.0 if upper_inclusive else v < 1.0)

    if (
        not isinstance(value, tuple)
        or (not value and not allow_empty)
        or not all(ok(v) for v in value)
    ):
        empty = "" if allow_empty else "non-empty "
        raise ValueError(f"{name} must be a {empty}tuple of floats in {bound}, got {value!r}")
    if len({f"{float(v):g}" for v in value}) != len(value):
        raise ValueError(f"{name} must be distinct, got {value!r}")
    return value
