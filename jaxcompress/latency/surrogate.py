"""The l1/l2 latency surrogate, the l1 (network-slimming) baseline and lambda schedules.

Nasery, Shah, Suggala, Jain, "End-to-End Neural Network Compression via l1/l2 Regularized
Latency Surrogates", CVPRW 2024, arXiv:2306.05785 (working specification: section 4.2 of the
project's algorithms notes; the exponent ``p``, the positivity mechanism, the lambda schedule
and the extraction threshold are reconstructions and are options here).

For a gate group :math:`\\alpha \\in \\mathbb{R}^n_{\\ge 0}` the surrogate width is

.. math::  r(\\alpha) = \\Big(\\frac{\\|\\alpha\\|_1}{\\|\\alpha\\|_2}\\Big)^p,\\qquad p = 2
           \\text{ by default},

scale-invariant (:math:`r(c\\alpha) = r(\\alpha)`, :math:`c > 0`), and for ``p = 2``
:math:`r(\\alpha) \\le \\|\\alpha\\|_0` with equality when the non-zeros are equal. The FLOPs
surrogate replaces each :math:`\\|\\alpha\\|_0` of the layer graph with :math:`r`:

.. math::  R(\\alpha) = \\frac{1}{F_{\\text{dense}}} \\sum_l F_l\\, r(\\alpha_{l-1})\\, r(\\alpha_l)

(generally: every :class:`~jaxcompress.latency.cost.CostTerm` at surrogate widths), and the
latency form evaluates a measured :class:`~jaxcompress.latency.cost.LatencyModel` at the
surrogate widths. Training minimises :math:`L(\\theta, \\alpha) + \\lambda R(\\alpha)` over
:math:`\\alpha \\ge 0`.

Numerics: :math:`\\|\\alpha\\|_2` is computed as :math:`\\sqrt{\\|\\alpha\\|_2^2 + \\epsilon^2}`
(``eps = 1e-6``), so :math:`r` and its gradient are finite at and near :math:`\\alpha = 0`
(:math:`r(0) = 0`); the scale invariance then holds for :math:`\\|\\alpha\\|_2 \\gg \\epsilon`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcompress.latency.cost import LatencyModel, LayerGraph
from jaxcompress.latency.gates import Gate, gate_effective
from jaxcompress.masks import path_str
from jaxcompress.optim._placement import replicate_on_params_mesh

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_P",
    "ControllerState",
    "LambdaController",
    "SurrogateState",
    "active_counts",
    "check_multiple",
    "flops_regularizer",
    "gate_diagnostics",
    "group_multiples",
    "l1_penalty",
    "lambda_controller",
    "latency_regularizer",
    "linear_ramp",
    "ratio",
    "round_up_count",
    "surrogate_counts",
    "surrogate_macs",
    "surrogate_penalty",
]

DEFAULT_P = 2.0
DEFAULT_EPS = 1e-6
DEFAULT_TAU = 1e-2


def _check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a positive float, got {p!r}")
    if not math.isfinite(float(p)) or p <= 0:
        raise ValueError(f"p must be a finite float > 0, got {p!r}")
    return float(p)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps > 0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return float(eps)


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= tau < 1:
        raise ValueError(f"tau must be a float in [0, 1), got {tau!r}")
    return float(tau)


def check_multiple(m: Any, what: str = "multiple") -> int:
    """``m`` as an int >= 1, else a ``ValueError`` naming ``what`` and the value."""
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"{what} must be an int >= 1, got {m!r}")
    return int(m)


def group_multiples(multiple: Any, names: Any) -> dict[str, int]:
    """``{group: m}``: the multiple each group's kept unit count is rounded up to.

    ``multiple`` is one int >= 1 for every group, or a mapping ``{group: int >= 1}`` (groups
    not named keep 1). Raises ``ValueError`` naming the bad value or the unknown groups.
    """
    names = list(names)
    if isinstance(multiple, Mapping):
        unknown = sorted(set(multiple) - set(names))
        if unknown:
            raise ValueError(f"multiple names unknown gate groups {unknown}; groups are {names}")
        return {n: check_multiple(multiple.get(n, 1), f"multiple[{n!r}]") for n in names}
    return dict.fromkeys(names, check_multiple(multiple))


def round_up_count(count: Any, multiple: int, size: int) -> Any:
    """``min(size, ceil(count / multiple) * multiple)`` (works on ints and traced arrays)."""
    if multiple == 1:
        return count
    rounded = -(-count // multiple) * multiple
    return jnp.minimum(rounded, size) if isinstance(rounded, jax.Array) else min(rounded, size)


def ratio(a: jax.Array, p: float = DEFAULT_P, *, eps: float = DEFAULT_EPS) -> jax.Array:
    """:math:`r(a) = (\\|a\\|_1 / \\sqrt{\\|a\\|_2^2 + \\epsilon^2})^p` over all entries of ``a``.

    ``p = 2`` (default) makes ``r`` a count: ``r(a) = ||a||_0`` when the non-zeros are equal.
    Finite value and gradient everywhere, including ``a = 0`` (where ``r = 0``), for any
    ``p > 0``. Applied to a weight tensor with ``p = 2`` this is DeepHoyer's Hoyer-square.
    """
    p, eps = _check_p(p), _check_eps(eps)
    a = jnp.asarray(a)
    l1 = jnp.sum(jnp.abs(a))
    l2 = jnp.sqrt(jnp.sum(jnp.square(a)) + eps * eps)
    q = l1 / l2
    if p == 1.0:
        return q
    positive = q > 0
    safe = jnp.where(positive, q, 1.0)  # keeps d(q^p)/dq finite at q = 0 for p < 1
    return jnp.where(positive, safe**p, 0.0)


def _check_gates(gates: Mapping[str, Any], graph: LayerGraph) -> None:
    if not isinstance(graph, LayerGraph):
        raise TypeError(f"graph must be a LayerGraph, got {type(graph).__name__}")
    if not isinstance(gates, Mapping):
        raise TypeError(
            f"gates must be a mapping name -> array (see gate_values), got {type(gates).__name__}"
        )
    missing = [n for n, _ in graph.groups if n not in gates]
    if missing:
        raise ValueError(
            f"gates do not match the graph: missing groups {missing}; gates have {sorted(gates)}"
        )
    for name, size in graph.groups:
        shape = jnp.shape(gates[name])
        if shape != (size,):
            raise ValueError(f"gate group {name!r} has shape {shape}, the graph expects ({size},)")


def surrogate_counts(
    gates: Mapping[str, jax.Array],
    graph: LayerGraph,
    *,
    p: float = DEFAULT_P,
    eps: float = DEFAULT_EPS,
) -> dict[str, jax.Array]:
    """``{group: r(alpha_group)}`` for every group of ``graph``."""
    _check_gates(gates, graph)
    return {name: ratio(gates[name], p, eps=eps) for name, _ in graph.groups}


def active_counts(
    gates: Mapping[str, jax.Array],
    graph: LayerGraph,
    *,
    tau: float = DEFAULT_TAU,
    multiple: int | Mapping[str, int] = 1,
) -> dict[str, jax.Array]:
    """Units that extraction keeps: ``alpha_j >= tau * max(alpha)`` and ``alpha_j > 0``, at
    least 1 per group, rounded up to ``multiple`` (capped at the group size): the rule of
    :func:`jaxcompress.latency.extract.kept_units`."""
    _check_gates(gates, graph)
    tau = _check_tau(tau)
    multiples = group_multiples(multiple, (n for n, _ in graph.groups))
    out = {}
    for name, size in graph.groups:
        a = jnp.asarray(gates[name])
        keep = (a >= tau * jnp.max(a)) & (a > 0)
        out[name] = round_up_count(jnp.maximum(jnp.sum(keep), 1), multiples[name], size)
    return out


def gate_diagnostics(
    gates: Mapping[str, Any], *, tau: float = DEFAULT_TAU
) -> dict[str, dict[str, float]]:
    r"""Per-group statistics that say how hard the l1/l2 surrogate can still push each group.

    For the gates :math:`\alpha_K` that extraction would keep (``alpha_j >= tau * max``,
    ``alpha_j > 0``; :func:`active_counts`'s rule, ``k = |K|``) the **uniformity**

    .. math::  u = \frac{(\sum_{j \in K} \alpha_j)^2}{k \sum_{j \in K} \alpha_j^2}
               = \frac{r_{p=2}(\alpha_K)}{k} \in (0, 1]

    is 1 exactly when the kept gates are equal. That is where the ratio stops pushing: with
    :math:`s_1 = \|\alpha\|_1, s_2 = \|\alpha\|_2`,

    .. math::  \frac{\partial r}{\partial \alpha_j}
               = \frac{2 s_1}{s_2^2}\Big(1 - \frac{s_1 \alpha_j}{s_2^2}\Big),

    which vanishes for every ``j`` at equal gates (the maximum of ``r`` over a fixed support).
    The surrogate prunes a group by making its gates unequal; its push on a group is
    proportional to how unequal the gates already are, so a group that the task loss holds
    near ``u = 1`` is pruned last, if at all. This happens to a gated
    layer whose common gate scale the loss uses, such as a last conv that feeds pooling and
    the classifier with no normalisation in between (``experiments/surrogate/RESULTS.md``).
    Plain l1 pushes every gate by the same amount and has no such fixed point.

    Host-side diagnostic (NumPy; not for use under ``jit``).

    Args:
      gates: ``{group: gate values}`` (e.g. :func:`~jaxcompress.latency.gate_values`).
      tau: the extraction threshold, relative to the group's largest gate, in ``[0, 1)``.

    Returns:
      ``{group: {"size", "kept", "max", "rms_kept", "uniformity"}}`` as Python numbers;
      ``kept`` and ``uniformity`` are 0 for an all-zero group (JSON-safe; a group with
      kept gates has ``0 < uniformity <= 1``).

    Raises:
      TypeError: ``gates`` is not a mapping. ValueError: a group is not a 1-D array, has a
      negative or non-finite gate, or ``tau`` is outside ``[0, 1)``.
    """
    tau = _check_tau(tau)
    if not isinstance(gates, Mapping):
        raise TypeError(
            f"gates must be a mapping name -> array (see gate_values), got {type(gates).__name__}"
        )
    out: dict[str, dict[str, float]] = {}
    for name, values in gates.items():
        a = np.asarray(values, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"gate group {name!r} must be a non-empty 1-D array, got {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(
                f"gate group {name!r} has negative or non-finite gates (min {a.min()!r}); "
                "the surrogate expects gates >= 0"
            )
        top = float(a.max())
        kept = a[(a > 0) & (a >= tau * top)]
        k = int(kept.size)
        out[name] = {
            "size": int(a.size),
            "kept": k,
            "max": top,
            "rms_kept": float(np.sqrt(np.mean(kept**2))) if k else 0.0,
            "uniformity": float(kept.sum() ** 2 / (k * np.sum(kept**2))) if k else 0.0,
        }
    return out


def surrogate_macs(
    gates: Mapping[str, jax.Array],
    graph: LayerGraph,
    *,
    p: float = DEFAULT_P,
    eps: float = DEFAULT_EPS,
) -> jax.Array:
    """Un-normalised surrogate cost :math:`\\sum_t \\text{coef}_t \\prod_i \\sum r(\\cdot)`."""
    return graph.macs(surrogate_counts(gates, graph, p=p, eps=eps))


def flops_regularizer(
    gates: Mapping[str, jax.Array],
    graph: LayerGraph,
    *,
    p: float = DEFAULT_P,
    eps: float = DEFAULT_EPS,
) -> jax.Array:
    """:math:`R(\\alpha)`: surrogate MACs over the dense MACs (1 for equal, all-on gates)."""
    return surrogate_macs(gates, graph, p=p, eps=eps) / graph.dense()


def latency_regularizer(
    gates: Mapping[str, jax.Array],
    model: LatencyModel,
    *,
    p: float = DEFAULT_P,
    eps: float = DEFAULT_EPS,
) -> jax.Array:
    """Latency form: :math:`T(r(\\alpha)) / T_{\\text{dense}}` with a measured
    :class:`~jaxcompress.latency.cost.LatencyModel` (per-term tables interpolated at the
    surrogate widths)."""
    if not isinstance(model, LatencyModel):
        raise TypeError(f"model must be a LatencyModel, got {type(model).__name__}")
    counts = surrogate_counts(gates, model.graph, p=p, eps=eps)
    return model.latency(counts) / model.dense()


def l1_penalty(gates: Mapping[str, jax.Array], graph: LayerGraph | None = None) -> jax.Array:
    """Network-slimming baseline (Liu et al., ICCV 2017, arXiv:1708.06519):
    :math:`\\sum_g \\sum_j |\\alpha_{g,j}|` over the groups of ``graph`` (default: all gates).
    Not scale-invariant: it shrinks every gate."""
    if graph is not None:
        _check_gates(gates, graph)
        names = [n for n, _ in graph.groups]
    else:
        if not isinstance(gates, Mapping) or not gates:
            raise ValueError("gates must be a non-empty mapping name -> array")
        names = list(gates)
    return sum(jnp.sum(jnp.abs(jnp.asarray(gates[n]))) for n in names)


# --------------------------------------------------------------------------------------------
# Lambda schedules
# --------------------------------------------------------------------------------------------


def linear_ramp(peak: float, ramp_steps: int, *, delay: int = 0) -> optax.Schedule:
    """``lambda(t) = peak * clip((t - delay) / ramp_steps, 0, 1)``: 0 for ``delay`` steps, a
    linear ramp over ``ramp_steps`` (spec: the first ~10-20% of training), then held."""
    if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not peak >= 0:
        raise ValueError(f"peak must be a float >= 0, got {peak!r}")
    for name, v, low in (("ramp_steps", ramp_steps, 1), ("delay", delay, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return optax.linear_schedule(0.0, float(peak), int(ramp_steps), int(delay))


class ControllerState(NamedTuple):
    """``lam``: current lambda; ``integral``: summed relative error (PI mode)."""

    lam: jax.Array
    integral: jax.Array


_MODES = ("multiplicative", "pi")


@dataclasses.dataclass(frozen=True)
class LambdaController:
    """Steers lambda so the (surrogate) cost ratio reaches ``target`` (a fraction of dense).

    With the relative error :math:`e_t = (R_t - \\rho)/\\rho`, ``R_t`` the current cost over
    dense and :math:`\\rho` the target ratio:

    * ``"multiplicative"`` (default): :math:`\\lambda_{t+1} = \\lambda_t e^{k e_t}`: grows
      geometrically while the model is too expensive, decays once it is too cheap;
    * ``"pi"``: :math:`\\lambda_{t+1} = \\lambda_0 + k e_t + k_i \\sum_{s \\le t} e_s`.

    Both clip to ``[lam_min, lam_max]``. Build with :func:`lambda_controller`.
    """

    target: float
    lam0: float
    gain: float
    mode: str = "multiplicative"
    ki: float = 0.0
    lam_min: float = 0.0
    lam_max: float = 1e3

    def __post_init__(self):
        if not 0 < self.target <= 1:
            raise ValueError(f"target (a fraction of dense) must be in (0, 1], got {self.target!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if not self.gain > 0 or not self.ki >= 0:
            raise ValueError(f"need gain > 0 and ki >= 0, got gain={self.gain!r}, ki={self.ki!r}")
        if not 0 <= self.lam_min <= self.lam0 <= self.lam_max:
            raise ValueError(
                f"need 0 <= lam_min <= lam0 <= lam_max, got {self.lam_min!r}, {self.lam0!r}, "
                f"{self.lam_max!r}"
            )

    def init(self) -> ControllerState:
        return ControllerState(jnp.asarray(self.lam0, jnp.float32), jnp.zeros((), jnp.float32))

    def update(self, state: ControllerState, value: jax.Array) -> ControllerState:
        """One controller step from the current cost ratio ``value`` (a traced scalar is fine)."""
        err = (jnp.asarray(value, jnp.float32) - self.target) / self.target
        integral = state.integral + err
        if self.mode == "multiplicative":
            lam = state.lam * jnp.exp(self.gain * err)
        else:
            lam = self.lam0 + self.gain * err + self.ki * integral
        return ControllerState(jnp.clip(lam, self.lam_min, self.lam_max), integral)


def lambda_controller(
    target: float,
    dense: float | LayerGraph | LatencyModel,
    *,
    lam0: float = 1e-2,
    gain: float = 0.05,
    mode: str = "multiplicative",
    ki: float = 0.0,
    lam_min: float = 0.0,
    lam_max: float = 1e3,
) -> LambdaController:
    """A :class:`LambdaController` for an absolute ``target`` cost.

    Args:
      target: target MACs (or seconds for a latency model), ``0 < target <= dense``.
      dense: the dense cost, or the graph / latency model to read it from.
      lam0: initial lambda (> 0 for ``"multiplicative"``).
      gain: ``k`` (exponent rate, or proportional gain in ``"pi"`` mode), > 0.
      mode: ``"multiplicative"`` or ``"pi"``.
      ki: integral gain (``"pi"`` mode).
      lam_min, lam_max: clip range.

    Raises:
      ValueError: target above the dense cost or <= 0, bad gains or modes.
    """
    if isinstance(dense, (LayerGraph, LatencyModel)):
        dense = dense.dense()
    for name, v in (("target", target), ("dense", dense)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if dense <= 0:
        raise ValueError(f"dense must be > 0, got {dense!r}")
    if target <= 0 or target > dense:
        raise ValueError(
            f"target must satisfy 0 < target <= dense cost ({dense!r}), got target={target!r}"
        )
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain!r}")
    if not ki >= 0:
        raise ValueError(f"ki must be >= 0, got {ki!r}")
    if not 0 <= lam_min <= lam_max:
        raise ValueError(f"need 0 <= lam_min <= lam_max, got {lam_min!r}, {lam_max!r}")
    if not lam_min <= lam0 <= lam_max or (mode == "multiplicative" and lam0 <= 0):
        raise ValueError(
            f"lam0 must lie in [lam_min, lam_max] (and be > 0 in multiplicative mode), got {lam0!r}"
        )
    return LambdaController(
        float(target) / float(dense),
        float(lam0),
        float(gain),
        mode,
        float(ki),
        float(lam_min),
        float(lam_max),
    )


# --------------------------------------------------------------------------------------------
# The regulariser as an optax transformation
# --------------------------------------------------------------------------------------------


class SurrogateState(NamedTuple):
    """State of :func:`surrogate_penalty`.

    Attributes:
      count: steps taken.
      controller: lambda controller state (``lam`` is the lambda used at the next step).
      value: the regulariser ``R`` (cost / dense) at the last step's params.
    """

    count: jax.Array
    controller: ControllerState
    value: jax.Array


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_value(leaf: Any) -> jax.Array:
    return leaf[...] if _is_var(leaf) else leaf


def _parametrization(leaf: Any) -> str:
    if isinstance(leaf, Gate):
        return leaf.get_metadata().get("parametrization", "identity")
    return "identity"


def _is_real_scalar_array(value: Any) -> bool:
    """A 0-d integer or floating array (NumPy, JAX or a tracer), not bool."""
    if not isinstance(value, (np.ndarray, jax.Array)) or np.ndim(value) != 0:
        return False
    return jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)


def surrogate_penalty(
    cost: LayerGraph | LatencyModel,
    strength: float | optax.Schedule | LambdaController,
    *,
    kind: str = "ratio",
    p: float = DEFAULT_P,
    eps: float = DEFAULT_EPS,
    feedback: str = "surrogate",
    tau: float = DEFAULT_TAU,
    multiple: int | Mapping[str, int] = 1,
    scale: str = "none",
) -> optax.GradientTransformation:
    """Add :math:`\\lambda \\nabla_\\alpha R(\\alpha)` to the gate gradients (an optax transform).

    Place it **first** in the chain (it adds to the raw gradients, like
    ``optax.add_decayed_weights``), and :func:`~jaxcompress.latency.gates.project_nonnegative`
    last::

        tx = optax.chain(surrogate_penalty(graph, lam), optax.adam(1e-3), project_nonnegative())

    The gates are read from ``params``: :class:`~jaxcompress.latency.gates.Gate` leaves of an
    ``nnx.State`` (named by path, parametrization applied, so the gradient is taken w.r.t. the
    stored value), or, in a plain pytree, the leaves whose path names a graph group.

    Args:
      cost: a :class:`LayerGraph` (FLOPs surrogate) or a :class:`LatencyModel` (latency form).
      strength: lambda: a float >= 0, an optax schedule of the step count (e.g.
        :func:`linear_ramp`), a :class:`LambdaController` (updated every step from ``R``), or
        a 0-d real array, so ``optax.inject_hyperparams`` can inject it (an array is checked
        by shape and dtype only, its value is not: it may be traced).
      kind: the penalty whose gradient is added: ``"ratio"`` (the l1/l2 surrogate ``R``,
        default) or ``"l1"`` (network slimming: :math:`\\sum |\\alpha|`, not normalised).
      p, eps: see :func:`ratio`.
      feedback: the cost ratio a controller steers and ``state.value`` records:
        ``"surrogate"`` (default, ``R`` at the surrogate widths) or ``"active"`` (the cost at
        the exact widths extraction would keep with threshold ``tau``; steers the real FLOPs,
        which the surrogate under-estimates when the surviving gates are unequal).
      tau: extraction threshold for ``feedback="active"``.
      multiple: for ``feedback="active"``, the kept counts are rounded up as
        ``extract(multiple=...)`` will round them (:func:`active_counts`), so a controller
        steers the cost of the model extraction will return.
      scale: ``"none"`` (default: the gradient of the penalty) or ``"rms"``: each group's
        penalty gradient times the rms of its gates (held constant). The ratio is
        scale-invariant, so its gradient shrinks as :math:`1/\\|\\alpha_l\\|`: a group whose
        gates grow (e.g. gates read by a classifier with no normalisation after them, whose
        common scale acts as a temperature) escapes the penalty. With ``"rms"`` the push
        on a group no longer depends on its gates' scale. Not a gradient of any objective.

    State: :class:`SurrogateState` (``value`` = the feedback cost ratio at the last params,
    ``controller.lam`` = the lambda for the next step).
    """
    if not isinstance(cost, (LayerGraph, LatencyModel)):
        raise TypeError(f"cost must be a LayerGraph or LatencyModel, got {type(cost).__name__}")
    if kind not in ("ratio", "l1"):
        raise ValueError(f"kind must be 'ratio' or 'l1', got {kind!r}")
    p, eps = _check_p(p), _check_eps(eps)
    if feedback not in ("surrogate", "active"):
        raise ValueError(f"feedback must be 'surrogate' or 'active', got {feedback!r}")
    if scale not in ("none", "rms"):
        raise ValueError(f"scale must be 'none' or 'rms', got {scale!r}")
    tau = _check_tau(tau)
    graph = cost if isinstance(cost, LayerGraph) else cost.graph
    group_names = {n for n, _ in graph.groups}
    multiples = group_multiples(multiple, (n for n, _ in graph.groups))
    if isinstance(strength, LambdaController):
        controller = strength
        schedule = None
    elif callable(strength):
        controller, schedule = None, strength
    elif isinstance(strength, numbers.Real) and not isinstance(strength, bool) and strength >= 0:
        controller, schedule = None, None
    elif _is_real_scalar_array(strength):
        # e.g. injected by optax.inject_hyperparams (possibly traced): checked by shape/dtype
        controller, schedule = None, None
    else:
        raise ValueError(
            f"strength must be a float >= 0, a 0-d real array, a schedule or a LambdaController, "
            f"got {strength!r}"
        )

    def cost_ratio(gates):
        if isinstance(cost, LatencyModel):
            return latency_regularizer(gates, cost, p=p, eps=eps)
        return flops_regularizer(gates, graph, p=p, eps=eps)

    def active_ratio(gates):
        counts = active_counts(gates, graph, tau=tau, multiple=multiples)
        if isinstance(cost, LatencyModel):
            return cost.latency(counts) / cost.dense()
        return graph.macs(counts) / graph.dense()

    def objective(raw, kinds):
        gates = {n: gate_effective(raw[n], kinds[n]) for n in raw}
        ratio_value = cost_ratio(gates)
        penalty = l1_penalty(gates, graph) if kind == "l1" else ratio_value
        return penalty, (ratio_value, gates)

    def init_fn(params):
        ctrl = (
            controller.init()
            if controller is not None
            else ControllerState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        )
        state = SurrogateState(jnp.zeros((), jnp.int32), ctrl, jnp.zeros((), jnp.float32))
        return replicate_on_params_mesh(state, params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("surrogate_penalty needs params: call update(updates, state, params)")
        flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)
        has_vars = any(_is_var(leaf) for _, leaf in flat)
        index: dict[str, int] = {}
        for i, (path, leaf) in enumerate(flat):
            name = path_str(path)
            if (isinstance(leaf, Gate) if has_vars else name in group_names) and (
                name in group_names
            ):
                index[name] = i
        missing = sorted(group_names - set(index))
        if missing:
            raise ValueError(
                f"params do not hold the graph's gate groups {missing}; found gates {sorted(index)}"
            )
        raws = {n: _leaf_value(flat[i][1]) for n, i in index.items()}
        kinds = {n: _parametrization(flat[i][1]) for n, i in index.items()}
        (_, (value, gates)), grad = jax.value_and_grad(objective, has_aux=True)(raws, kinds)
        if feedback == "active":
            value = active_ratio(jax.lax.stop_gradient(gates))
        if controller is not None:
            lam = state.controller.lam
            ctrl = controller.update(state.controller, value)
        else:
            lam = schedule(state.count) if schedule is not None else jnp.asarray(strength)
            ctrl = ControllerState(jnp.asarray(lam, jnp.float32), state.controller.integral)
        flat_u = treedef.flatten_up_to(updates)
        for n, i in index.items():
            u = flat_u[i]
            g = lam * grad[n]
            if scale == "rms":
                g = g * jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(gates[n]))))
            g = g.astype(_leaf_value(u).dtype)
            flat_u[i] = u.replace(u[...] + g) if _is_var(u) else u + g
        new_updates = jax.tree_util.tree_unflatten(treedef, flat_u)
        new_state = SurrogateState(
            optax.safe_increment(state.count), ctrl, jnp.asarray(value, jnp.float32)
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)
