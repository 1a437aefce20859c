"""The configuration dataclass of the SPDY experiment."""

from __future__ import annotations

import dataclasses

from experiments.oneshot.configs.base import DATASETS, check_widths, is_int, is_real

FAMILIES = ("unstructured_flops", "unstructured_rn50_curve", "structured_measured")

__all__ = ["DATASETS", "Config"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one run; :meth:`validate` checks them all before any work.

    Attributes:
      dataset, data_dir, seed: data set, data root (default ``$JAXCOMPRESS_DATA_DIR``), seed of
        initialisation, shuffling, calibration subset, reconstruction and search.
      epochs, batch_size, learning_rate, momentum, weight_decay: dense training (SGD with
        cosine decay, as ``experiments.oneshot``).
      widths, strides, pool_after: the blocks of :class:`jaxcompress.models.SmallCNN`. The
        default is a 7-conv plain BN CNN (+ head) whose layers differ in width (16 to 128
        channels), resolution (14x14 to 4x4), FLOPs per weight (196 to 16; 1 for the head)
        and size (144 to 73 728 weights): a real allocation problem for SPDY (92.6% dense
        test accuracy on Fashion-MNIST after 8 epochs). An odd number of convs makes every
        block a producer or consumer of a channel unit (``experiments.spdy.model.units``).
      train_subset, test_subset: random subsets (``None``: all).
      checkpoint: directory of an Orbax checkpoint written by an earlier run
        (``<out>/checkpoint``); when set, training is skipped and the dense model is restored.
      speedups: modelled speedup targets.
      num_levels: compressed options per layer besides dense: sparsities geometric in density
        from ``min_sparsity`` to ``max_sparsity`` (the reference: 41 levels, 0.4 to 0.99).
      min_sparsity, max_sparsity: range of the levels (the reference's 0.4 to 0.99).
      calib_samples: calibration images (reference 1024), no augmentation.
      adaprune_epochs, adaprune_lr, adaprune_batch: layer-wise AdaPrune (reference 10, 1e-3, 32).
      gap_epochs, gap_lr, gap_batch: global AdaPrune (reference 100, 1e-5, 32 on ImageNet,
        i.e. 3 200 steps; with 1 024 images and 20 passes, 640 steps, we take 1e-4, since 1e-5
        barely moves the weights in so few steps).
      randinits, maxnoimp, layerperc: SPDY search (reference 100, 100, 0.1).
      search_gap_epochs: ``0`` is the reference's score: each candidate profile of the search
        is scored by the calibration loss of the stitched model. ``k > 0`` scores it after
        ``k`` passes of global AdaPrune (same lr and batch as ``gap_*``). That is closer to
        what is finally evaluated, and costs about ``k / gap_epochs`` of a final
        reconstruction per distinct profile. The default is 2.
        - With the reference's score, the measured channel table at 2x picked a profile with
          the lowest stitched loss (1.68 against the DP's 1.96). After global AdaPrune it was
          7.5 points worse than the DP's and 3.1 below uniform.
        - With 2 passes, two runs met the 2x margins: +4.40 / +7.86 and +31.69 / +8.01.
        - The unstructured families were within 1 point either way (experiments/spdy/RESULTS.md).
      families: the option families to run (subset of ``FAMILIES``, in that order).
      buckets: DP resolution (reference 10 000).
      timing_batch, timing_repeats: batch size and (interleaved) repeats of the timing
        measurements (table and end-to-end checks). The timed batch is the calibration images,
        tiled when ``timing_batch > calib_samples`` (a GPU needs batches of thousands before
        its run time follows the work).
      structured_timing: which measured channel table the structured profiles use:
        ``"isolated"`` (each unit on its own at every width; conservative on this CPU) or
        ``"context"`` (each width as the paired change of the whole model's time); the other
        one is measured too and its predictions are reported beside.
      timing_clock: ``"cpu"`` (this process's CPU seconds: robust on a CPU shared with other
        jobs), ``"wall"``, or ``"auto"`` (the default: ``"cpu"`` on the CPU backend, ``"wall"``
        on an accelerator, whose work a host CPU clock does not see); both clocks are recorded
        for the end-to-end checks.
      channel_multiple: channel units keep a multiple of this many channels (rounded up, see
        ``experiments.spdy.train.kept_channels``). On an H100, 8 gave no better predictions
        than 1 and a lower reachable speedup.
      timing_single_thread: compile the timed executables single-threaded
        (``xla_cpu_multi_thread_eigen=False``; CPU backend only), so CPU time is the work and
        no thread waits for a descheduled peer.
      eval_batch_size: evaluation batch size.
      progress: progress output.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    seed: int = 0
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    widths: tuple[int, ...] = (16, 16, 32, 32, 64, 64, 128)
    strides: tuple[int, ...] = (2, 1, 2, 1, 2, 1, 1)
    pool_after: tuple[bool, ...] = (False,) * 7
    train_subset: int | None = None
    test_subset: int | None = None
    checkpoint: str | None = None
    speedups: tuple[float, ...] = (1.5, 2.0, 3.0)
    num_levels: int = 16
    min_sparsity: float = 0.4
    max_sparsity: float = 0.99
    calib_samples: int = 1024
    adaprune_epochs: int = 10
    adaprune_lr: float = 1e-3
    adaprune_batch: int = 32
    gap_epochs: int = 20
    gap_lr: float = 1e-4
    gap_batch: int = 32
    randinits: int = 100
    maxnoimp: int = 100
    layerperc: float = 0.1
    search_gap_epochs: int = 2
    families: tuple[str, ...] = FAMILIES
    buckets: int = 10_000
    timing_batch: int = 512
    timing_repeats: int = 25
    structured_timing: str = "isolated"
    timing_clock: str = "auto"
    channel_multiple: int = 1
    timing_single_thread: bool = True
    eval_batch_size: int = 1000
    progress: bool = True

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name in ("data_dir", "checkpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str path or None, got {value!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name in (
            "epochs",
            "batch_size",
            "num_levels",
            "calib_samples",
            "adaprune_epochs",
            "adaprune_batch",
            "gap_epochs",
            "gap_batch",
            "randinits",
            "buckets",
            "timing_batch",
            "timing_repeats",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.structured_timing not in ("isolated", "context"):
            raise ValueError(
                f"structured_timing must be 'isolated' or 'context', got {self.structured_timing!r}"
            )
        if self.timing_clock not in ("auto", "cpu", "wall"):
            raise ValueError(
                f"timing_clock must be 'auto', 'cpu' or 'wall', got {self.timing_clock!r}"
            )
        if not is_int(self.channel_multiple) or self.channel_multiple < 1:
            raise ValueError(
                f"channel_multiple must be a positive int, got {self.channel_multiple!r}"
            )
        if not isinstance(self.timing_single_thread, bool):
            raise TypeError(
                f"timing_single_thread must be a bool, got {self.timing_single_thread!r}"
            )
        for name in ("maxnoimp", "search_gap_epochs"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if (
            not isinstance(self.families, tuple)
            or not self.families
            or any(f not in FAMILIES for f in self.families)
            or len(set(self.families)) != len(self.families)
        ):
            raise ValueError(
                f"families must be a non-empty tuple of distinct names from {FAMILIES}, "
                f"got {self.families!r}"
            )
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("learning_rate", "weight_decay", "adaprune_lr", "gap_lr"):
            value = getattr(self, name)
            if not is_real(value) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        if not is_real(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not is_real(self.layerperc) or not 0.0 <= self.layerperc <= 1.0:
            raise ValueError(f"layerperc must be in [0, 1], got {self.layerperc!r}")
        if not (
            is_real(self.min_sparsity)
            and is_real(self.max_sparsity)
            and 0.0 < self.min_sparsity < self.max_sparsity < 1.0
        ):
            raise ValueError(
                "need 0 < min_sparsity < max_sparsity < 1, got "
                f"min_sparsity={self.min_sparsity!r}, max_sparsity={self.max_sparsity!r}"
            )
        check_widths(self)
        if (
            not isinstance(self.strides, tuple)
            or len(self.strides) != len(self.widths)
            or not all(is_int(v) and v > 0 for v in self.strides)
        ):
            raise ValueError(
                f"strides must be a tuple of {len(self.widths)} positive ints (one per width), "
                f"got {self.strides!r}"
            )
        if (
            not isinstance(self.pool_after, tuple)
            or len(self.pool_after) != len(self.widths)
            or not all(isinstance(v, bool) for v in self.pool_after)
        ):
            raise ValueError(
                f"pool_after must be a tuple of {len(self.widths)} bools (one per width), "
                f"got {self.pool_after!r}"
            )
        if (
            not isinstance(self.speedups, tuple)
            or not self.speedups
            or not all(is_real(s) and s > 1.0 for s in self.speedups)
            or len(set(self.speedups)) != len(self.speedups)
        ):
            raise ValueError(
                f"speedups must be a non-empty tuple of distinct floats > 1, got {self.speedups!r}"
            )
        return self
