"""Gates on any model's dependency groups, and low-rank factorisation of its Dense layers."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.structure import Gated, Group
from jaxcompress.structure._groups import analyse
from jaxcompress.structure._prune import probe


def gated(
    model: nnx.Module,
    *inputs: Any,
    select: Callable[[str, Group], bool] | None = None,
    init: float = 1.0,
) -> Gated:
    """``model`` with a non-negative gate on every unit of the chosen dependency groups.

    A :class:`jaxcompress.structure.Gated` (the model's own code runs, with each gate scaling
    the weights that read its unit); at ``init = 1`` it computes ``model``'s function. Its
    gates, ``gated.gates[name]``, are :class:`jaxcompress.structure.Gate` params of shape
    ``(group size,)``.

    Args:
      model: any ``flax.nnx.Module``.
      *inputs: example inputs of ``model(*inputs)``.
      select: ``select(name, group) -> bool`` choosing among the prunable groups that some
        weight reads (default: all of them). A group that is not prunable is never offered;
        name it through :class:`~jaxcompress.structure.Gated` to get the reason.
      init: initial gate value (>= 0).

    Raises:
      TypeError: ``model`` is not an NNX module, ``select`` not callable.
      ValueError: the forward pass cannot be traced; no group is selected.
    """
    if select is not None and not callable(select):
        raise TypeError(f"select must be callable (name, group) -> bool or None, got {select!r}")
    analysis = probe(model, analyse(model, inputs), inputs)
    found = analysis.groups
    candidates = [n for n, g in found.items() if g.prunable and analysis.consumed.get(n)]
    names = [n for n in candidates if select is None or select(n, found[n])]
    if not names:
        blocked = {n: g.reasons for n, g in found.items() if not g.prunable}
        raise ValueError(
            f"no group of {type(model).__name__} to gate: prunable groups read by a weight "
            f"{candidates} (after select: none); not prunable: {blocked}"
        )
    return Gated(model, names, *inputs, init=init, _analysis=analysis)


class Factorized(nnx.Module):
    """``y = (x U) V + b``: a Dense layer as two, ``u`` (``in -> rank``, no bias) and ``v``
    (``rank -> out``, with the bias). The rank axis is an ordinary dependency group (named
    after ``u``), so :func:`gated` puts a gate on each rank-1 component and
    :func:`~jaxcompress.latency.extract` removes components like channels.

    Attributes: ``u``, ``v`` (``nnx.Linear``); ``rank``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.u = nnx.Linear(in_features, rank, use_bias=False, **kw)
        self.v = nnx.Linear(rank, out_features, use_bias=use_bias, **kw)

    @property
    def rank(self) -> int:
        return int(self.u.out_features)

    def __call__(self, x):
        return self.v(self.u(x))


def _rank(rank: Any, layer: nnx.Linear) -> int:
    full = min(int(layer.in_features), int(layer.out_features))
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise ValueError(f"rank must be None, an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        return min(int(rank), full)
    if not 0 < float(rank) <= 1:
        raise ValueError(f"a fractional rank must be in (0, 1], got {rank!r}")
    return max(1, round(float(rank) * full))


def _from_svd(layer: nnx.Linear, r: int) -> Factorized:
    """``W = (U_r S_r^{1/2}) (S_r^{1/2} V_r^T)``: the rank-``r`` truncated SVD, split evenly."""
    w = np.asarray(layer.kernel[...], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:r])
    use_bias = layer.bias is not None
    new = nnx.eval_shape(  # the structure only: every value is set below
        lambda: Factorized(
            int(layer.in_features),
            int(layer.out_features),
            r,
            use_bias=use_bias,
            dtype=layer.dtype,
            param_dtype=layer.param_dtype,
            precision=layer.precision,
            rngs=nnx.Rngs(0),
        )
    )
    dtype = layer.kernel[...].dtype
    new.u.kernel.set_value(jnp.asarray(u[:, :r] * root, dtype))
    new.v.kernel.set_value(jnp.asarray(root[:, None] * vt[:r], dtype))
    if new.v.bias is not None and layer.bias is not None:
        new.v.bias.set_value(layer.bias[...])
    return new


def factorize(
    model: nnx.Module,
    *inputs: Any,
    select: Callable[[tuple, nnx.Linear], bool] | None = None,
    rank: int | float | None = None,
) -> nnx.Module:
    """A copy of ``model`` with chosen ``nnx.Linear`` layers replaced by :class:`Factorized`.

    Each factorised layer starts at the truncated SVD of its kernel,
    :math:`W \\approx (U_r S_r^{1/2})(S_r^{1/2} V_r^\\top)`, with the bias on ``v``; at full
    rank (``min(in, out)``, the default) the copy computes the same function to float
    round-off. The rank axis is a dependency group, so ``gated(factorize(model, x), x)``
    puts low-rank gates on it.

    Args:
      model: any ``flax.nnx.Module``; it is not modified.
      *inputs: example inputs; the copy is checked to run on them with outputs of the same
        shapes.
      select: ``select(path, layer) -> bool`` over the model's ``nnx.Linear`` layers (path a
        tuple of keys). Default: every Linear with ``min(in, out) >= 2``.
      rank: ``None`` (full), an int (capped at ``min(in, out)``) or a fraction in ``(0, 1]``
        of ``min(in, out)``.

    Raises:
      TypeError: ``model`` not an NNX module, ``select`` not callable.
      ValueError: a bad ``rank``; no layer selected; the copy does not run on ``inputs``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if select is not None and not callable(select):
        raise TypeError(f"select must be callable (path, layer) -> bool or None, got {select!r}")
    if not inputs:
        raise ValueError("inputs must hold at least one example input of the model, got none")
    copy = nnx.clone(model)
    chosen = []
    for path, node in nnx.iter_graph(copy):
        if not isinstance(node, nnx.Linear) or not path:
            continue
        if select is None:
            ok = min(int(node.in_features), int(node.out_features)) >= 2
        else:
            ok = bool(select(tuple(path), node))
        if ok:
            chosen.append((tuple(path), node))
    if not chosen:
        raise ValueError(f"factorize: no nnx.Linear of {type(model).__name__} was selected")
    plans = [(path, layer, _rank(rank, layer)) for path, layer in chosen]
    for path, layer, r in plans:
        parent: Any = copy
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        new = _from_svd(layer, r)
        if isinstance(path[-1], int) or isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    try:
        analyse(copy, inputs)
    except ValueError as e:
        raise ValueError(f"the factorised {type(model).__name__} does not run: {e}") from e
    return copy
