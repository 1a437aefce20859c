"""End-to-end compression with the l1/l2 latency surrogate (Nasery, Shah, Suggala, Jain,
CVPRW 2024, arXiv:2306.05785).

* :mod:`~jaxcompress.latency.gates`: non-negative :class:`Gate` parameters and gated Flax NNX
  models (channels, neurons, heads, ranks, quantization levels); :func:`project_nonnegative`
  keeps identity-parametrised gates >= 0 inside an optax chain (the default mechanism;
  ``parametrization="softplus"`` is the alternative).
* :mod:`~jaxcompress.latency.cost`: the static :class:`LayerGraph`, exact MAC counting from a
  model's jaxpr (:func:`count_macs`), analytic graphs (:func:`cost_graph`) and a measured,
  interpolated :class:`LatencyModel` stored as a SPDY ``TimingTable``.
* :mod:`~jaxcompress.latency.surrogate`: :math:`r(\\alpha) = (\\|\\alpha\\|_1/\\|\\alpha\\|_2)^p`
  (``p = 2``), the FLOPs and latency regularisers, the l1 baseline, lambda schedules and a
  controller, and :func:`surrogate_penalty` (the regulariser as an optax transform).
* :mod:`~jaxcompress.latency.extract`: threshold (``tau = 1e-2``), remove, fold, return a
  plain smaller model (optionally with counts rounded to a multiple, within a MAC budget:
  :func:`fit_counts_to_budget`); :func:`measure_latency`, :func:`finetune`, uniform-width baselines.

Reconstructed choices (spec 4.2 items (a)-(d); the paper body was not available), each an
option with this default:

* (a) exponent ``p = 2`` in :func:`ratio` (``p=`` everywhere; ``p = 1`` is the plain ratio);
* (b) positivity: identity gates + :func:`project_nonnegative` (``parametrization="softplus"``
  on any gated module is the alternative);
* (c) lambda: :func:`surrogate_penalty` takes a constant, a schedule (:func:`linear_ramp`) or a
  :func:`lambda_controller` (multiplicative by default; ``feedback="surrogate"`` steers the
  surrogate cost, ``"active"`` the thresholded real cost);
* (d) extraction threshold ``tau = 1e-2`` relative to the group's largest gate.

Counting convention: multiply-adds of convolutions and matrix products per example (see
:mod:`~jaxcompress.latency.cost`).

Typical use::

    model = GatedCNN(rngs=nnx.Rngs(0))
    graph = cost_graph(model, (28, 28, 1))
    ctrl = lambda_controller(0.5 * graph.dense(), graph)
    tx = optax.chain(surrogate_penalty(graph, ctrl), optax.adam(1e-3), project_nonnegative())
    jaxcompress.train.fit(model, tx, train, epochs=..., batch_size=...)
    small = extract(model, input_shape=(28, 28, 1))   # small.model, small.macs
"""

from jaxcompress.latency.cost import (
    PAD_MIN_GAIN,
    CostTerm,
    LatencyModel,
    LayerGraph,
    OpSpec,
    attention_macs,
    conv_macs,
    cost_graph,
    count_macs,
    dense_macs,
    measure_latency_model,
)
from jaxcompress.latency.extract import (
    DEFAULT_TAU,
    Extracted,
    FactorizedLinear,
    FactorizedMLP,
    LevelDense,
    SlimTransformerClassifier,
    calibration_loss,
    extract,
    finetune,
    fit_counts_to_budget,
    kept_units,
    measure_latency,
    scale_width,
    uniform_width_models,
)
from jaxcompress.latency.gates import (
    PARAMETRIZATIONS,
    BitGatedDense,
    ChannelGate,
    Gate,
    GatedCNN,
    GatedMLP,
    GatedTransformerClassifier,
    LowRankLinear,
    gate_effective,
    gate_rms,
    gate_values,
    project_nonnegative,
    residual_levels,
)
from jaxcompress.latency.surrogate import (
    DEFAULT_EPS,
    DEFAULT_P,
    ControllerState,
    LambdaController,
    SurrogateState,
    active_counts,
    flops_regularizer,
    gate_diagnostics,
    l1_penalty,
    lambda_controller,
    latency_regularizer,
    linear_ramp,
    ratio,
    surrogate_counts,
    surrogate_macs,
    surrogate_penalty,
)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_P",
    "DEFAULT_TAU",
    "PAD_MIN_GAIN",
    "PARAMETRIZATIONS",
    "BitGatedDense",
    "ChannelGate",
    "ControllerState",
    "CostTerm",
    "Extracted",
    "FactorizedLinear",
    "FactorizedMLP",
    "Gate",
    "GatedCNN",
    "GatedMLP",
    "GatedTransformerClassifier",
    "LambdaController",
    "LatencyModel",
    "LayerGraph",
    "LevelDense",
    "LowRankLinear",
    "OpSpec",
    "SlimTransformerClassifier",
    "SurrogateState",
    "active_counts",
    "attention_macs",
    "calibration_loss",
    "conv_macs",
    "cost_graph",
    "count_macs",
    "dense_macs",
    "extract",
    "finetune",
    "fit_counts_to_budget",
    "flops_regularizer",
    "gate_diagnostics",
    "gate_effective",
    "gate_rms",
    "gate_values",
    "kept_units",
    "l1_penalty",
    "lambda_controller",
    "latency_regularizer",
    "linear_ramp",
    "measure_latency",
    "measure_latency_model",
    "project_nonnegative",
    "ratio",
    "residual_levels",
    "scale_width",
    "surrogate_counts",
    "surrogate_macs",
    "surrogate_penalty",
    "uniform_width_models",
]
