"""Per-unit gates on dependency groups of any NNX model, applied to the consumers' weights."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.structure._groups import Analysis, analyse
from jaxcompress.structure._prune import probe
from jaxcompress.structure._trace import Path


class Gate(nnx.Param):
    """A per-unit gate of one group (an ``nnx.Param`` subclass: select with
    ``nnx.state(gated, Gate)``)."""


def check_names(names: Any, analysis: Analysis) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"names must be a sequence of group names, got {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError("names must hold at least one group name, got none")
    for name in names:
        if name not in analysis.groups:
            raise ValueError(
                f"names holds an unknown group {name!r}; the model's groups are "
                f"{list(analysis.groups)}"
            )
        group = analysis.groups[name]
        if not group.prunable:
            raise ValueError(
                f"cannot gate group {name!r}: it is not prunable ({'; '.join(group.reasons)})"
            )
        if not analysis.consumed[name]:
            raise ValueError(f"cannot gate group {name!r}: no weight reads its units")
    if len(set(names)) != len(names):
        raise ValueError(f"names holds a group twice: {names}")
    return names


def _variable(model: nnx.Module, path: Path) -> nnx.Variable:
    node: Any = model
    for key in path:
        node = (
            node[key] if isinstance(key, int) or isinstance(node, nnx.Dict) else getattr(node, key)
        )
    return node


@contextlib.contextmanager
def _swapped(pairs: Sequence[tuple[nnx.Variable, jax.Array]]) -> Iterator[None]:
    """Hold each ``(variable, value)`` pair's value in its variable for the ``with`` body,
    then put the original values back, also when the body raises."""
    originals = [var[...] for var, _ in pairs]
    for var, value in pairs:
        var[...] = value
    try:
        yield
    finally:
        for (var, _), value in zip(pairs, originals, strict=True):
            var[...] = value


def _factor(units: np.ndarray, gate: jax.Array, axis: int, ndim: int) -> jax.Array:
    """``gate[units]`` (1 where ``units < 0``), shaped to broadcast along ``axis``."""
    idx = jnp.asarray(np.clip(units, 0, None))
    f = jnp.where(jnp.asarray(units >= 0), gate[idx], jnp.ones((), gate.dtype))
    shape = [1] * ndim
    shape[axis] = units.shape[0]
    return f.reshape(shape)


class Gated(nnx.Module):
    """``model`` with a gate per unit of the chosen groups, computed by the model's own code.

    Each gate multiplies the weight slices that *read* its unit: the input rows of every Dense,
    conv or attention projection that contracts it (a depthwise conv passes its channel through
    and is not gated; the layers after it are). So a unit's gate scales what it contributes to
    every later layer, once, and no module is rewritten: ``gated(*x)`` temporarily scales those
    variables, runs ``model(*x)`` and restores them, inside whatever trace is active (``nnx.jit``,
    ``nnx.grad``). With all gates 1 it computes ``model``'s function; a gate at 0 removes its
    unit exactly as :func:`~jaxcompress.structure.zero` does; :func:`fold` multiplies the gates
    into the weights for good. Running statistics and other state updated by the forward pass
    (BatchNorm in train mode) are kept. The gates are not constrained here: keep them
    non-negative in the optimizer (e.g. a projection after each step).

    Args:
      model: any ``flax.nnx.Module``.
      names: the groups to gate (prunable ones, see :func:`~jaxcompress.structure.groups`).
      *inputs: example inputs of ``model(*inputs)`` used to trace it.
      init: initial gate value (default 1).

    Attributes: ``model``; ``gates``, an ``nnx.Dict`` of group name -> :class:`Gate` of shape
    ``(size,)``.
    """

    def __init__(
        self,
        model: nnx.Module,
        names: Iterable[str],
        *inputs,
        init: float = 1.0,
        _analysis: Analysis | None = None,
    ):
        # ``_analysis``: an already probed analysis of ``model`` (saves a second trace).
        analysis = (
            _analysis if _analysis is not None else probe(model, analyse(model, inputs), inputs)
        )
        names = check_names(names, analysis)
        if isinstance(init, bool) or not isinstance(init, numbers.Real) or init < 0:
            raise ValueError(f"init must be a non-negative float, got {init!r}")
        self.model = model
        self.gates = nnx.Dict(
            {n: Gate(jnp.full((analysis.groups[n].size,), float(init))) for n in names}
        )
        self._slices = tuple(
            (n, m.path, m.axis, tuple(int(u) for u in m.units))
            for n in names
            for m in analysis.consumed[n]
        )

    def _scaled(self) -> list[tuple[nnx.Variable, jax.Array]]:
        """``(variable, value with the gates multiplied in)`` for every gated variable."""
        by_var: dict[int, tuple[nnx.Variable, jax.Array]] = {}
        for name, path, axis, units in self._slices:
            var = _variable(self.model, path)
            value = by_var.get(id(var), (var, var[...]))[1]
            gate = self.gates[name][...]
            value = value * _factor(np.asarray(units), gate, axis, value.ndim).astype(value.dtype)
            by_var[id(var)] = (var, value)
        return list(by_var.values())

    def __call__(self, *inputs, **kwargs):
        with _swapped(self._scaled()):
            return self.model(*inputs, **kwargs)


def fold(gated: Gated) -> nnx.Module:
    """A copy of ``gated.model`` with the gates multiplied into the weights that read them.

    ``fold(gated)(*x) == gated(*x)``; units whose gate is 0 then read as zero and
    ``structure.prune(fold(gated), {name: gate > 0 ...}, *x)`` removes them exactly.

    Raises:
      TypeError: ``gated`` is not a :class:`Gated`.
      ValueError: a gate is negative or not finite (named).
    """
    if not isinstance(gated, Gated):
        raise TypeError(f"gated must be a structure.Gated, got {type(gated).__name__}")
    for name, gate in gated.gates.items():
        value = np.asarray(gate[...])
        if not np.all(np.isfinite(value)) or (value < 0).any():
            raise ValueError(
                f"gates[{name!r}] must be finite and non-negative to fold, got min "
                f"{value.min()} (negative or non-finite gates have no pruned equivalent)"
            )
    copy = nnx.clone(gated)
    for var, value in copy._scaled():
        var[...] = value
    return copy.model
