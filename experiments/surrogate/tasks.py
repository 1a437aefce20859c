"""The four studies, one entry per task: ``run_seed(study) -> record`` and ``load(config)``.

* ``cnn``: :class:`jaxcompress.models.SmallCNN` (4 conv-BN-ReLU blocks, strides 2, 2, 2, 1, no
  pooling), a gate per channel: l1/l2 surrogate and (``config.l1``) l1 gates at the FLOPs
  targets against uniform width multipliers.
* ``resnet20``: :func:`jaxcompress.models.resnet20`, the same study; its groups are the three
  residual streams (every block of a stage adds into one, so their channels are removed
  together) and the inner channels of each block.
* ``sst2``: :class:`jaxcompress.models.TransformerClassifier` on GLUE SST-2, the same study
  with gates on the attention heads and FFN units; the residual width is read by LayerNorm and
  not prunable.
* ``mlp``: a dense :class:`jaxcompress.models.MLP` is trained; its hidden layers are factorised
  by their full-rank SVD (:func:`jaxcompress.latency.factorize`, the same function), the rank
  groups gated and trained with the surrogate, against uniform truncated SVD (the top
  singular triplets of every layer, the same fraction of each rank) at the largest ranks that
  do not exceed the surrogate's FLOPs, fine-tuned for the same epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import optax
from flax import nnx

import jaxcompress.latency as L
from experiments.surrogate._study import Study, compress, finish, uniform
from experiments.surrogate.configs.base import Config
from jaxcompress import data as jdata
from jaxcompress import structure as S
from jaxcompress.models import MLP, SmallCNN, TransformerClassifier, resnet20

__all__ = ["LOADERS", "RUNS", "head_groups", "image_model", "svd_ranks"]

CNN_WIDTHS = (32, 64, 64, 128)
CNN_STRIDES = (2, 2, 2, 1)
RESNET_WIDTH = 16
SST2 = dict(d_model=64, num_heads=4, num_layers=2, mlp_dim=128, max_len=32, min_freq=2)
SST2_WARMUP = 100
MLP_HIDDEN = (300, 100)


def _scaled(width: int, multiplier: float) -> int:
    return max(1, round(width * multiplier))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _subsets(config: Config, train, test) -> tuple[Any, Any]:
    if config.train_subset is not None and config.train_subset < len(train):
        train = jdata.subset(train, config.train_subset, seed=config.seed)
    if config.test_subset is not None and config.test_subset < len(test):
        test = jdata.subset(test, config.test_subset, seed=config.seed)
    return train, test


def _images(config: Config, task: str) -> tuple[Any, Any]:
    name = config.task(task).dataset
    train = jdata.load(name, "train", data_dir=config.data_dir)
    test = jdata.load(name, "test", data_dir=config.data_dir)
    return _subsets(config, train, test)


def _sst2(config: Config) -> tuple[Any, Any]:
    train = jdata.sst2("train", config.data_dir, max_len=SST2["max_len"], min_freq=SST2["min_freq"])
    dev = jdata.sst2("validation", config.data_dir, vocab=train.vocab, max_len=SST2["max_len"])
    return _subsets(config, train, dev)


LOADERS: dict[str, Callable[[Config], tuple[Any, Any]]] = {
    "cnn": lambda c: _images(c, "cnn"),
    "resnet20": lambda c: _images(c, "resnet20"),
    "sst2": _sst2,
    "mlp": lambda c: _images(c, "mlp"),
}


# --------------------------------------------------------------------------------------------
# CNN, ResNet-20 and the transformer: surrogate and l1 against uniform widths
# --------------------------------------------------------------------------------------------


def head_groups(groups: dict[str, S.Group]) -> list[str]:
    """The prunable groups that the model's ``head`` layer reads (no normalisation after)."""
    return [
        n for n, g in groups.items() if g.prunable and any(m.path[0] == "head" for m in g.members)
    ]


def _gated_study(study: Study, build: Callable[[], nnx.Module]) -> dict[str, Any]:
    settings = study.settings
    methods = [("surrogate", "ratio")] + ([("l1", "l1")] if study.config.l1 else [])
    points = uniform(study, build)
    reference = points[-1]
    cost = S.macs(build(), *study.example)
    if cost.dense != reference["flops"]:
        raise AssertionError(f"full model: {cost.dense} MACs, its baseline {reference['flops']}")
    heads = head_groups(S.groups(build(), *study.example))
    results: dict[str, list[dict[str, Any]]] = {}
    if len(points) > 1:
        results["uniform"] = points
    for method, kind in methods:
        results[method] = [
            compress(
                study,
                f"{method}_{target:g}",
                build(),
                target=target,
                reference_flops=reference["flops"],
                kind=kind,
                cost=cost,
                normalize=heads,
                penalty_epochs=settings.epochs - settings.finetune_epochs,
                finetune_epochs=settings.finetune_epochs,
            )
            for target in settings.targets
        ]
    return finish(study, results, reference)


def _image_shape(study: Study) -> tuple[int, int]:
    return int(study.train.x.shape[-1]), int(study.train.num_classes)


def image_model(task: str, width: float, channels: int, classes: int, seed: int) -> nnx.Module:
    """The full model of an image task (``cnn`` or ``resnet20``) at width multiplier ``width``,
    freshly initialised from ``seed``."""
    if task == "cnn":
        widths = tuple(_scaled(w, width) for w in CNN_WIDTHS)
        return SmallCNN(channels, classes, widths, strides=CNN_STRIDES,
                        pool_after=(False,) * len(widths), rngs=nnx.Rngs(seed))  # fmt: skip
    if task == "resnet20":
        return resnet20(in_channels=channels, num_classes=classes,
                        width=_scaled(RESNET_WIDTH, width), rngs=nnx.Rngs(seed))  # fmt: skip
    raise ValueError(f"task must be 'cnn' or 'resnet20', got {task!r}")


def cnn(study: Study) -> dict[str, Any]:
    channels, classes = _image_shape(study)
    return _gated_study(
        study, lambda: image_model("cnn", study.config.width, channels, classes, study.seed)
    )


def resnet(study: Study) -> dict[str, Any]:
    channels, classes = _image_shape(study)
    return _gated_study(
        study, lambda: image_model("resnet20", study.config.width, channels, classes, study.seed)
    )


def sst2(study: Study) -> dict[str, Any]:
    study.warmup_steps = SST2_WARMUP
    heads = SST2["num_heads"]
    d_model = heads * _scaled(SST2["d_model"] // heads, study.config.width)

    def build() -> nnx.Module:
        return TransformerClassifier(
            len(study.train.vocab),
            study.train.num_classes,
            d_model=d_model,
            num_heads=heads,
            num_layers=SST2["num_layers"],
            mlp_dim=_scaled(SST2["mlp_dim"], study.config.width),
            max_len=SST2["max_len"],
            dropout=0.0,
            rngs=nnx.Rngs(study.seed),
        )

    return _gated_study(study, build)


# --------------------------------------------------------------------------------------------
# MLP: low-rank gates against truncated SVD
# --------------------------------------------------------------------------------------------


def _rank_groups(factorized: nnx.Module) -> list[str]:
    """The rank groups of a factorised model: ``"<path>/u"`` of every ``Factorized``."""
    return [
        "/".join(str(k) for k in path) + "/u"
        for path, node in nnx.iter_graph(factorized)
        if isinstance(node, L.Factorized)
    ]


def svd_ranks(cost: S.MacCount, ranks: dict[str, int], budget: float) -> dict[str, int]:
    """Uniform truncation: the largest fraction ``c`` whose ranks ``max(1, round(c * full))``
    of every rank group (``ranks``: full ranks) cost at most ``budget`` MACs; 1 everywhere if
    none does."""
    widest = max(ranks.values())
    for k in range(widest, 0, -1):
        kept = {n: max(1, round(k / widest * r)) for n, r in ranks.items()}
        if cost(kept) <= budget:
            return kept
    return dict.fromkeys(ranks, 1)


def mlp(study: Study) -> dict[str, Any]:
    settings = study.settings
    x = study.example
    hidden = tuple(_scaled(h, study.config.width) for h in MLP_HIDDEN)
    dense = MLP(math.prod(x[0].shape[1:]), hidden, study.train.num_classes,
                rngs=nnx.Rngs(study.seed))  # fmt: skip
    study.fit("dense", dense, optax.adam(study.schedule()), settings.epochs)
    reference = study.point("dense", dense, method="dense", hidden=list(hidden))

    def hidden_layers(path: tuple, layer: nnx.Linear) -> bool:
        return tuple(path) != ("layers", len(hidden))  # not the classifier head

    template = L.factorize(dense, *x, select=hidden_layers)
    ranks_of = _rank_groups(template)
    cost = S.macs(template, *x)
    full = {n: cost.sizes[n] for n in ranks_of}
    results: dict[str, list[dict[str, Any]]] = {"surrogate": [], "svd": []}
    for target in settings.targets:
        point = compress(
            study,
            f"surrogate_{target:g}",
            L.factorize(dense, *x, select=hidden_layers),
            target=target,
            reference_flops=reference["flops"],
            kind="ratio",
            cost=cost,
            select=lambda name, group: name in ranks_of,
            normalize=ranks_of,
            penalty_epochs=settings.epochs - settings.finetune_epochs,
            finetune_epochs=settings.finetune_epochs,
        )
        results["surrogate"].append(point)
        kept = svd_ranks(cost, full, point["flops"])
        keep = {n: np.arange(full[n]) < kept[n] for n in ranks_of}
        truncated = S.prune(L.factorize(dense, *x, select=hidden_layers), keep, *x)
        key = f"svd_{target:g}"
        before = study.accuracy(truncated)
        study.fit(key, truncated, optax.adam(study.schedule()), settings.epochs)
        results["svd"].append(
            study.point(
                key,
                truncated,
                method="svd",
                target=float(target),
                kept=kept,
                accuracy_before_finetune=before,
            )  # fmt: skip
        )
    return finish(study, results, reference)


RUNS: dict[str, Callable[[Study], dict[str, Any]]] = {
    "cnn": cnn,
    "resnet20": resnet,
    "sst2": sst2,
    "mlp": mlp,
}
