"""The l1/l2 latency surrogate, the l1 (network-slimming) baseline and lambda schedules.

Nasery, Shah, Suggala, Jain, "End-to-End Neural Network Compression via l1/l2 Regularized
Latency Surrogates", CVPRW 2024, arXiv:2306.05785.

For a gate group :math:`\\alpha \\in \\mathbb{R}^n_{\\ge 0}` the surrogate width is

.. math::  r(\\alpha) = \\Big(\\frac{\\|\\alpha\\|_1}{\\|\\alpha\\|_2}\\Big)^p,\\qquad p = 2
           \\text{ by default},

scale-invariant (:math:`r(c\\alpha) = r(\\alpha)`, :math:`c > 0`), and for ``p = 2``
:math:`r(\\alpha) \\le \\|\\alpha\\|_0` with equality when the non-zeros are equal. The FLOPs
surrogate evaluates the model's MAC polynomial (:class:`jaxcompress.structure.MacCount`) at the
surrogate widths, :math:`R(\\alpha) = \\text{MACs}(r(\\alpha)) / \\text{MACs}_{\\text{dense}}`;
the latency form evaluates a measured :class:`~jaxcompress.latency.LatencyModel` there.

Numerics: :math:`\\|\\alpha\\|_2` is computed as :math:`\\sqrt{\\|\\alpha\\|_2^2 + \\epsilon^2}`
(``eps = 1e-6``), so :math:`r` and its gradient are finite at and near :math:`\\alpha = 0`.
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

from jaxcompress.latency._cost import LatencyModel
from jaxcompress.latency._quantize import SUFFIX as BIT_SUFFIX
from jaxcompress.optim._placement import replicate_on_params_mesh
from jaxcompress.structure import Gate, MacCount

DEFAULT_P = 2.0
DEFAULT_EPS = 1e-6
DEFAULT_TAU = 1e-2


def check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a positive float, got {p!r}")
    if not math.isfinite(float(p)) or p <= 0:
        raise ValueError(f"p must be a finite float > 0, got {p!r}")
    return float(p)


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return float(eps)


def check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= float(tau) < 1:
        raise ValueError(f"tau must be a float in [0, 1), got {tau!r}")
    return float(tau)


def check_multiple(m: Any, what: str = "multiple") -> int:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"{what} must be an int >= 1, got {m!r}")
    return int(m)


def group_multiples(multiple: Any, names: Any) -> dict[str, int]:
    """``{group: m}`` from one int for every group or a mapping ``{group: int}`` (others 1)."""
    names = list(names)
    if isinstance(multiple, Mapping):
        unknown = sorted(set(multiple) - set(names))
        if unknown:
            raise ValueError(f"multiple names unknown groups {unknown}; groups are {names}")
        return {n: check_multiple(multiple.get(n, 1), f"multiple[{n!r}]") for n in names}
    return dict.fromkeys(names, check_multiple(multiple))


def round_up_count(count: Any, multiple: int, size: int) -> Any:
    """``min(size, ceil(count / multiple) * multiple)`` (ints and traced arrays)."""
    if multiple == 1:
        return count
    rounded = -(-count // multiple) * multiple
    return jnp.minimum(rounded, size) if isinstance(rounded, jax.Array) else min(rounded, size)


def check_gates(gates: Any, sizes: Mapping[str, int] | None = None) -> None:
    """``gates`` must be a non-empty mapping of 1-D arrays (of the groups' sizes)."""
    if not isinstance(gates, Mapping) or not gates:
        raise TypeError(
            "gates must be a non-empty mapping group name -> 1-D array (e.g. "
            f"{{n: g[...] for n, g in gated.gates.items()}}), got {type(gates).__name__}"
        )
    for name, a in gates.items():
        shape = jnp.shape(a)
        if sizes is not None:
            if name not in sizes:
                raise ValueError(
                    f"gates names {name!r}, which is not a prunable group of the cost; its "
                    f"groups are {list(sizes)}"
                )
            if shape != (sizes[name],):
                raise ValueError(
                    f"gates[{name!r}] has shape {shape}, the cost expects ({sizes[name]},)"
                )
        elif len(shape) != 1:
            raise ValueError(f"gates[{name!r}] must be a 1-D array, got shape {shape}")


def ratio(a: jax.Array, p: float = DEFAULT_P, *, eps: float = DEFAULT_EPS) -> jax.Array:
    """:math:`r(a) = (\\|a\\|_1 / \\sqrt{\\|a\\|_2^2 + \\epsilon^2})^p` over all entries of ``a``.

    ``p = 2`` (default) makes ``r`` a count: ``r(a) = ||a||_0`` when the non-zeros are equal.
    Finite value and gradient everywhere, including ``a = 0`` (where ``r = 0``), for any
    ``p > 0``.
    """
    p, eps = check_p(p), check_eps(eps)
    a = jnp.asarray(a)
    l1 = jnp.sum(jnp.abs(a))
    l2 = jnp.sqrt(jnp.sum(jnp.square(a)) + eps * eps)
    q = l1 / l2
    if p == 1.0:
        return q
    positive = q > 0
    safe = jnp.where(positive, q, 1.0)  # keeps d(q^p)/dq finite at q = 0 for p < 1
    return jnp.where(positive, safe**p, 0.0)


def surrogate_counts(
    gates: Mapping[str, jax.Array], p: float = DEFAULT_P, *, eps: float = DEFAULT_EPS
) -> dict[str, jax.Array]:
    """``{group: r(alpha_group)}``: the relaxed kept-unit count of every gated group."""
    check_gates(gates)
    return {name: ratio(a, p, eps=eps) for name, a in gates.items()}


def _cost_sizes(cost: Any) -> dict[str, int]:
    if isinstance(cost, (MacCount, LatencyModel)):
        return dict(cost.sizes)
    raise TypeError(
        f"cost must be a jaxcompress.structure.MacCount or a LatencyModel, got "
        f"{type(cost).__name__}"
    )


def regularizer(
    gates: Mapping[str, jax.Array],
    cost: MacCount | LatencyModel,
    *,
    p: float = DEFAULT_P,
    eps: float = DEFAULT_EPS,
) -> jax.Array:
    """:math:`R(\\alpha) = C(r(\\alpha)) / C_{\\text{dense}}`: the cost at the surrogate widths
    over the dense cost (1 at equal, all-on gates).

    ``cost`` is a :class:`jaxcompress.structure.MacCount` (FLOPs form; also the bit-weighted
    count :attr:`Quantized.macs <jaxcompress.latency.Quantized.macs>`) or a measured
    :class:`~jaxcompress.latency.LatencyModel` (latency form, interpolated at the surrogate
    widths). Groups of ``cost`` without gates count at full size. Differentiable in ``gates``.

    Raises:
      TypeError: ``cost`` is neither; ``gates`` not a mapping. ValueError: a gate names no
        group of ``cost`` or has the wrong shape.
    """
    sizes = _cost_sizes(cost)
    check_gates(gates, sizes)
    return cost(surrogate_counts(gates, p, eps=eps)) / cost.dense


def l1_penalty(gates: Mapping[str, jax.Array]) -> jax.Array:
    """Network-slimming baseline (Liu et al., ICCV 2017, arXiv:1708.06519):
    :math:`\\sum_g \\sum_j |\\alpha_{g,j}|`. Not scale-invariant: it shrinks every gate."""
    check_gates(gates)
    return jnp.sum(jnp.stack([jnp.sum(jnp.abs(jnp.asarray(a))) for a in gates.values()]))


def active_counts(
    gates: Mapping[str, jax.Array],
    *,
    tau: float = DEFAULT_TAU,
    multiple: int | Mapping[str, int] = 1,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, jax.Array]:
    """Units extraction keeps: ``alpha_j >= tau * max(alpha)`` and ``alpha_j > 0``, at least 1,
    rounded up to ``multiple`` (capped at the group size); for a bit group
    (``"<kernel path>:bits"``) the 1-based index of the last such level (its kept bit-width).
    Jit-friendly."""
    multiples = group_multiples(multiple, gates)
    out = {}
    for name, a in gates.items():
        a = jnp.asarray(a)
        keep = (a >= tau * jnp.max(a)) & (a > 0)
        size = a.shape[0] if sizes is None else sizes[name]
        if name.endswith(BIT_SUFFIX):
            count = jnp.max(jnp.where(keep, jnp.arange(1, a.shape[0] + 1), 0))
        else:
            count = jnp.sum(keep)
        out[name] = round_up_count(jnp.maximum(count, 1), multiples[name], size)
    return out


def gate_diagnostics(
    gates: Mapping[str, Any], *, tau: float = DEFAULT_TAU
) -> dict[str, dict[str, float]]:
    r"""Per-group statistics that say how hard the l1/l2 surrogate can still push each group.

    For the gates :math:`\alpha_K` that extraction would keep (``alpha_j >= tau * max``,
    ``alpha_j > 0``, ``k = |K|``) the **uniformity**

    .. math::  u = \frac{(\sum_{j \in K} \alpha_j)^2}{k \sum_{j \in K} \alpha_j^2}
               = \frac{r_{p=2}(\alpha_K)}{k} \in (0, 1]

    is 1 exactly when the kept gates are equal, where the gradient of the ratio,
    :math:`\partial r / \partial \alpha_j = (2 s_1 / s_2^2)(1 - s_1 \alpha_j / s_2^2)`, vanishes
    for every ``j``: the surrogate prunes a group by making its gates unequal, so a group the
    task loss holds near ``u = 1`` is pruned last. Plain l1 has no such fixed point.

    Host-side (NumPy; not for use under ``jit``).

    Returns:
      ``{group: {"size", "kept", "max", "rms_kept", "uniformity"}}`` as Python numbers
      (``kept`` and ``uniformity`` are 0 for an all-zero group).

    Raises:
      TypeError: ``gates`` is not a mapping. ValueError: a group is not a non-empty 1-D array,
      has a negative or non-finite gate, or ``tau`` is outside ``[0, 1)``.
    """
    tau = check_tau(tau)
    check_gates(gates)
    out: dict[str, dict[str, float]] = {}
    for name, values in gates.items():
        a = np.asarray(values, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"gates[{name!r}] must be a non-empty 1-D array, got {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(
                f"gates[{name!r}] has negative or non-finite gates (min {a.min()!r}); "
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


# --------------------------------------------------------------------------------------------
# Lambda schedules
# --------------------------------------------------------------------------------------------


class ControllerState(NamedTuple):
    """``lam``: current lambda; ``integral``: summed relative error (PI mode)."""

    lam: jax.Array
    integral: jax.Array


_MODES = ("multiplicative", "pi")


@dataclasses.dataclass(frozen=True)
class LambdaController:
    """Steers lambda so the cost ratio reaches ``target`` (a fraction of dense).

    With the relative error :math:`e_t = (R_t - \\rho)/\\rho`, ``R_t`` the current cost over
    dense and :math:`\\rho` the target ratio:

    * ``"multiplicative"`` (default): :math:`\\lambda_{t+1} = \\lambda_t e^{k e_t}`;
    * ``"pi"``: :math:`\\lambda_{t+1} = \\lambda_0 + k e_t + k_i \\sum_{s \\le t} e_s`.

    Both clip to ``[lam_min, lam_max]``. Build with :func:`lambda_controller`; ``init()`` and
    ``update(state, value)`` are pure and jit-friendly.
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
    dense: float | MacCount | LatencyModel,
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
      target: target MACs per example (or seconds for a latency model),
        ``0 < target <= dense``.
      dense: the dense cost, or the ``MacCount`` / ``LatencyModel`` to read it from.
      lam0: initial lambda (> 0 for ``"multiplicative"``).
      gain: ``k`` (exponent rate, or proportional gain in ``"pi"`` mode), > 0.
      mode: ``"multiplicative"`` or ``"pi"``.
      ki: integral gain (``"pi"`` mode).
      lam_min, lam_max: clip range.

    Raises:
      ValueError: target above the dense cost or <= 0, bad gains or modes.
    """
    if isinstance(dense, (MacCount, LatencyModel)):
        dense = float(dense.dense)
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
      value: the feedback cost ratio at the last step's params.
    """

    count: jax.Array
    controller: ControllerState
    value: jax.Array


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def gate_leaves(params: Any) -> tuple[list, Any, dict[str, int]]:
    """``(flat leaves, treedef, {group name: leaf index})`` of the :class:`Gate` leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)
    index: dict[str, int] = {}
    for i, (path, leaf) in enumerate(flat):
        if isinstance(leaf, Gate):
            name = key_name(path[-1])
            if name in index:
                raise ValueError(f"params hold two Gate leaves for group {name!r}")
            index[name] = i
    return flat, treedef, index


def _is_real_scalar_array(value: Any) -> bool:
    if not isinstance(value, (np.ndarray, jax.Array)) or np.ndim(value) != 0:
        return False
    return jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)


def surrogate_penalty(
    cost: MacCount | LatencyModel,
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

    Place it **first** in the chain and :func:`~jaxcompress.latency.project_nonnegative` last::

        tx = optax.chain(surrogate_penalty(macs, ctrl), optax.adam(1e-3), project_nonnegative())

    The gates are the :class:`jaxcompress.structure.Gate` leaves of ``params`` (an
    ``nnx.State`` of a :class:`jaxcompress.structure.Gated` model, at any nesting), each named
    by the last key of its path, i.e. its group name. Groups of ``cost`` without a gate count
    at full size.

    Args:
      cost: a :class:`jaxcompress.structure.MacCount` of the ungated model (FLOPs form;
        per-example or not, only the ratio to dense is used) or a
        :class:`~jaxcompress.latency.LatencyModel` (latency form).
      strength: lambda: a float >= 0, an optax schedule of the step count (e.g. a ramp,
        ``optax.linear_schedule(0.0, peak, ramp_steps, delay)``), a :class:`LambdaController`
        (updated every step from the feedback ratio), or a 0-d real array (so
        ``optax.inject_hyperparams`` can inject it).
      kind: ``"ratio"`` (the l1/l2 surrogate ``R``, default) or ``"l1"`` (network slimming:
        :math:`\\sum |\\alpha|`, not normalised; ``R`` is still reported as the feedback).
      p, eps: see :func:`ratio`.
      feedback: the cost ratio a controller steers and ``state.value`` records:
        ``"surrogate"`` (``R`` at the surrogate widths) or ``"active"`` (the cost at the counts
        extraction keeps with threshold ``tau``, rounded up to ``multiple``; for the bit groups
        of :func:`~jaxcompress.latency.quantize`, the bit-widths extraction keeps).
      tau: extraction threshold for ``feedback="active"``.
      multiple: int or ``{group: int}``: for ``feedback="active"``, round the kept counts up
        as :func:`~jaxcompress.latency.round_to_multiple` will at extraction.
      scale: ``"none"`` (the gradient of the penalty) or ``"rms"``: each group's penalty
        gradient times the rms of its gates (held constant), so the push on a group does not
        shrink as its gates grow (the ratio's gradient scales as :math:`1/\\|\\alpha_l\\|`).
        Not a gradient of any objective.

    State: ``SurrogateState(count, controller=ControllerState(lam, integral), value)``.

    Raises:
      TypeError, ValueError: bad arguments (here); in ``update``: no ``params``, no Gate leaf,
      a Gate whose name is not a group of ``cost``, a gate of the wrong shape.
    """
    sizes = _cost_sizes(cost)
    if kind not in ("ratio", "l1"):
        raise ValueError(f"kind must be 'ratio' or 'l1', got {kind!r}")
    p, eps = check_p(p), check_eps(eps)
    if feedback not in ("surrogate", "active"):
        raise ValueError(f"feedback must be 'surrogate' or 'active', got {feedback!r}")
    if scale not in ("none", "rms"):
        raise ValueError(f"scale must be 'none' or 'rms', got {scale!r}")
    tau = check_tau(tau)
    multiples = group_multiples(multiple, sizes)
    if isinstance(strength, LambdaController):
        controller, schedule = strength, None
    elif callable(strength):
        controller, schedule = None, strength
    elif isinstance(strength, numbers.Real) and not isinstance(strength, bool) and strength >= 0:
        controller, schedule = None, None
    elif _is_real_scalar_array(strength):
        controller, schedule = None, None
    else:
        raise ValueError(
            f"strength must be a float >= 0, a 0-d real array, a schedule or a LambdaController, "
            f"got {strength!r}"
        )

    def evaluate(counts):
        return cost(counts) / cost.dense

    def objective(gates):
        value = evaluate(surrogate_counts(gates, p, eps=eps))
        penalty = l1_penalty(gates) if kind == "l1" else value
        return penalty, value

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
        flat, treedef, index = gate_leaves(params)
        if not index:
            raise ValueError(
                "params hold no jaxcompress.structure.Gate leaf; pass the params of a "
                "structure.Gated model (e.g. jc.latency.gated(model, x))"
            )
        gates = {n: flat[i][1][...] for n, i in index.items()}
        check_gates(gates, sizes)
        (_, value), grad = jax.value_and_grad(objective, has_aux=True)(gates)
        if feedback == "active":
            # Only the gated groups have active counts; the others count at full size.
            counts = active_counts(
                jax.lax.stop_gradient(gates),
                tau=tau,
                multiple={n: multiples[n] for n in gates},
                sizes=sizes,
            )
            value = evaluate(counts)
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
            u_value = u[...] if _is_var(u) else u
            g = g.astype(u_value.dtype)
            flat_u[i] = u.replace(u_value + g) if _is_var(u) else u_value + g
        new_updates = jax.tree_util.tree_unflatten(treedef, flat_u)
        new_state = SurrogateState(
            jnp.asarray(optax.safe_increment(state.count)), ctrl, jnp.asarray(value, jnp.float32)
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def project_nonnegative(prune_below: float = 0.0) -> optax.GradientTransformation:
    """Keep every :class:`jaxcompress.structure.Gate` of the params non-negative after the
    update (projected gradient), inside an optax chain. Put it **last**.

    For each Gate leaf the update ``u`` becomes :math:`u' = \\max(u, -\\theta)`, so
    :math:`\\theta + u' = \\max(\\theta + u, 0)` exactly in floating point. Other leaves pass
    through unchanged. The bit groups of :func:`~jaxcompress.latency.quantize` (Gate leaves
    named ``"<kernel path>:bits"``) are also kept non-increasing in the level: their new value
    is the running minimum :math:`\\min_{j \\le k} \\max(\\theta_j + u_j, 0)`, so a level is on
    only while every coarser one is (the nesting of Bayesian Bits, van Baalen et al. 2020), the
    surrogate removes the finest levels first and the active gates are the bit-width
    extraction keeps.

    With ``prune_below = tau > 0`` the step also zeroes every gate of a group that would end
    below ``tau`` times the group's largest gate (``u' = -theta``): the units extraction at the
    same ``tau`` would remove are removed during training, so the network adapts to their loss.
    A hard-threshold step, not a projection onto a convex set.

    Args:
      prune_below: relative threshold in ``[0, 1)`` (0: only the projection), or a 0-d float
        array (for ``optax.inject_hyperparams``; checked by shape and dtype only).

    Raises:
      ValueError: ``prune_below`` outside ``[0, 1)``; in ``update`` if ``params`` is missing.
    """
    if isinstance(prune_below, numbers.Real) and not isinstance(prune_below, bool):
        if not 0.0 <= prune_below < 1.0:
            raise ValueError(f"prune_below must be a float in [0, 1), got {prune_below!r}")
        prune_below = float(prune_below)
        threshold = prune_below > 0.0
    elif (
        hasattr(prune_below, "shape")
        and hasattr(prune_below, "dtype")
        and jnp.ndim(prune_below) == 0
        and jnp.issubdtype(prune_below.dtype, jnp.floating)
    ):
        threshold = True
    else:
        raise ValueError(
            f"prune_below must be a float in [0, 1) or a 0-d float array, got {prune_below!r}"
        )

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "project_nonnegative needs params: call update(updates, state, params)"
            )

        def step(u, p):
            out = jnp.maximum(u, -p)
            if threshold:
                after = p + out
                cut = after < prune_below * jnp.max(after)
                out = jnp.where(cut, -p, out)
            return out.astype(u.dtype)

        def nested(u, p):  # bit levels: non-negative and non-increasing in the level
            after = jax.lax.cummin(jnp.maximum(p + u, 0.0), axis=0)
            return step(after - p, p)

        def proj(path, u, p):
            if not isinstance(p, Gate):
                return u
            fn = nested if path and key_name(path[-1]).endswith(BIT_SUFFIX) else step
            if _is_var(u):
                return u.replace(fn(u[...], p[...]))
            return fn(u, p[...])

        new = jax.tree_util.tree_map_with_path(proj, updates, params, is_leaf=_is_var)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)
