"""Dependency groups of any Flax NNX model, traced from its jaxpr; structured pruning on them.

Structured pruning removes whole units (channels, neurons, attention heads) and must remove each
unit from every array that indexes it: the kernel that writes it, its bias, the normalisation
statistics on it, the next layers' input axes, and, across a residual connection, every layer
that adds into the same stream. :func:`groups` finds these couplings in any NNX model, in the
manner of DepGraph (Fang et al., 2023, "DepGraph: Towards Any Structural Pruning",
arXiv:2301.12900), but on the jaxpr of the forward pass: the model's state leaves and inputs are
traced by ``jax.make_jaxpr``, and each equation relates the axes of its operands and results
(elementwise ops, broadcasts, reshapes, transposes, ``dot_general``, convolutions with
``feature_group_count``, concatenations, slices, sub-jaxprs of ``jit``/``custom_jvp``/
``custom_vjp``). Each axis is a product of *atoms*; a reshape into ``(heads, head_dim)`` splits
the atom of every axis coupled to it, so a head becomes a unit of the query/key/value kernels and
of the output projection.

A group is prunable when removing a unit is exactly zeroing it: every path of the unit ends in a
weight contraction. A group is **not** prunable, with the reason, when the model output or input
carries it, an op reduces it (``reduce_sum`` of a LayerNorm over channels, a ``softmax`` over
it), two activations are contracted over it (``q . k`` over the head dimension: its removal would
also change the ``1/sqrt(d)`` scale), a reshape mixes it with another axis, or a primitive the
tracer does not know uses it. So ``prune(model, keep)`` and ``zero(model, keep)`` compute the
same function for every ``keep`` the functions accept.

:class:`Gated` puts a gate on every unit of chosen groups without rewriting the model (the
gates scale the weights that read the units), :func:`fold` multiplies them into the weights, and
:func:`macs` gives the multiply-adds as a polynomial in the kept unit counts.

Example::

    gs = jc.structure.groups(model, x)
    keep = {name: scores[name] > t for name, g in gs.items() if g.prunable}
    small = jc.structure.prune(model, keep, x)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from jaxcompress.structure import _prune
from jaxcompress.structure._gates import Gate, Gated, fold
from jaxcompress.structure._groups import Group, Slice, analyse
from jaxcompress.structure._macs import MacCount, mac_count

__all__ = [
    "Gate",
    "Gated",
    "Group",
    "MacCount",
    "Slice",
    "fold",
    "groups",
    "macs",
    "prune",
    "zero",
]


def groups(model: nnx.Module, *inputs) -> dict[str, Group]:
    """The dependency groups of ``model(*inputs)``, in the order their producers run.

    The forward pass is traced in inference mode (BatchNorm running statistics, dropout off)
    without being executed; ``inputs`` may be arrays or ``jax.ShapeDtypeStruct``.

    Args:
      model: any ``flax.nnx.Module``.
      *inputs: example inputs of ``model(*inputs)`` (the batch size does not matter).

    Every group the tracer finds prunable is then probed: the model with one of its units
    removed is traced again (abstractly), and a group whose model no longer runs (code that
    checks or hard-codes a size) is reported not prunable with the error.

    Returns:
      ``{name: Group}``; :attr:`Group.prunable` tells which can be pruned, and
      :attr:`Group.reasons` why the others cannot.

    Raises:
      TypeError: ``model`` is not an NNX module.
      ValueError: no inputs, or the forward pass cannot be traced with them.
    """
    analysis = analyse(model, inputs)
    return _prune.probe(model, analysis, inputs).groups


def prune(model: nnx.Module, keep: Mapping[str, np.ndarray], *inputs) -> nnx.Module:
    """A new model of the same classes with the units that ``keep`` drops removed.

    Every member :class:`Slice` of a group in ``keep`` loses the indices of the dropped units
    (parameters and running statistics alike); the size attributes of Flax's layers
    (``in_features``, ``out_features``, ``num_features``, ``feature_group_count``,
    ``num_heads``, ``head_dim``, ``qkv_features``, ``num_groups``, ...) are updated, and the
    pruned model is checked to run on ``inputs`` with outputs of the original shapes. The
    argument model is not modified. Attributes of user modules that only record construction
    arguments (e.g. a ``widths`` tuple) are left as they were.

    Args:
      model: any ``flax.nnx.Module``.
      keep: group name -> boolean mask of the group's units (True keeps). Groups not named are
        kept whole; an all-True mask is allowed for any group.
      *inputs: example inputs, as for :func:`groups`.

    Raises:
      TypeError: ``model`` is not an NNX module, ``keep`` not a mapping or a mask not boolean.
      ValueError: no inputs, an untraceable forward pass, an unknown group name, a mask of the
        wrong length, a mask that drops every unit, a mask dropping units of a group that is not
        prunable (all before anything is built), or a pruned model that no longer runs.
    """
    analysis = analyse(model, inputs)
    masks = _prune.check_keep(keep, analysis)
    return _prune.prune(model, analysis, masks, inputs)


def zero(model: nnx.Module, keep: Mapping[str, np.ndarray], *inputs) -> nnx.Module:
    """A new model of the same shapes with the dropped units' parameters set to zero.

    Zeroes every ``nnx.Param`` slice of the dropped units (the producing kernel and bias, the
    norm's scale and bias, so the unit outputs 0, and the consumers' input rows); running
    statistics are left as they are (a zero variance would leave ``1/sqrt(eps)``). A model that
    divides by a parameter of a dropped unit gets non-finite values there. For every
    ``keep`` that :func:`prune` accepts, ``zero(model, keep, *x)`` computes the same function as
    ``prune(model, keep, *x)``; arguments and errors as for :func:`prune`.
    """
    analysis = analyse(model, inputs)
    masks = _prune.check_keep(keep, analysis)
    return _prune.zero(model, analysis, masks)


def macs(model: nnx.Module, *inputs) -> MacCount:
    """Multiply-adds of ``model(*inputs)`` as a polynomial in the groups' kept unit counts.

    ``macs(model, *x)(kept)`` equals the multiply-adds of ``prune(model, keep, *x)`` on ``x``
    for every ``keep`` with ``kept[name] == keep[name].sum()`` (``dot_general`` and
    convolutions, batch included: pass one-example inputs for a per-example count, as
    ``jaxcompress.latency`` does). :attr:`MacCount.ops` lists the contractions, each with its
    operand shapes as polynomials in the kept counts. See :class:`MacCount`.

    Raises:
      TypeError, ValueError: as :func:`groups`; ``ValueError`` also when the forward pass holds
        control flow (``cond``, ``while``, ``scan``), whose cost this does not count.
    """
    return mac_count(analyse(model, inputs))
