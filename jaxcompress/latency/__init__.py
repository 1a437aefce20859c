"""End-to-end structured compression with the l1/l2 latency surrogate, on any Flax NNX model.

Nasery, Shah, Suggala, Jain, "End-to-End Neural Network Compression via l1/l2 Regularized
Latency Surrogates", CVPRW 2024, arXiv:2306.05785.

Every removable unit ``j`` of a group (a channel with every layer that reads or writes it, an
FFN neuron, an attention head, a rank-1 component of a factorised Dense layer) gets a gate
:math:`\\alpha_j \\ge 0`. Training minimises :math:`L(\\theta, \\alpha) + \\lambda R(\\alpha)`
where :math:`R` is the model's cost (MACs, or a measured latency model) evaluated at the
surrogate widths :math:`r(\\alpha_g) = (\\|\\alpha_g\\|_1 / \\|\\alpha_g\\|_2)^p` of the groups,
over the dense cost. Extraction then removes the units with small gates.

Everything works on the model's own code: the groups, their MAC polynomial and the per-op
shapes come from :mod:`jaxcompress.structure` (the traced jaxpr), the gates scale the weights
that read each unit (:class:`jaxcompress.structure.Gated`), and extraction folds the gates and
calls :func:`jaxcompress.structure.prune`. No model class is special.

Bit-level gates (the residual-level gating of van Baalen et al., "Bayesian Bits: Unifying
Quantization and Pruning", NeurIPS 2020, arXiv:2005.07093): :func:`quantize` gives every
kernel ``w`` that a ``dot_general`` or convolution reads ``K`` gates, one per residual level.
With :math:`s_k = \\max|w| / 2^{k-1}` and the ternary planes
:math:`c_k = \\operatorname{round}(w/s_k) - 2\\operatorname{round}(w/s_{k-1}) \\in \\{-1,0,1\\}`
(:math:`c_1 = \\operatorname{round}(w/s_1)`) the forward pass uses

.. math::  W(\\alpha) = \\sum_{k=1}^{K} \\alpha_k s_k c_k(\\bar w) + \\alpha_1 (w - \\bar w),
           \\qquad \\bar w = \\operatorname{stop\\_gradient}(w),

so the first ``m`` gates at 1 (the rest 0) give the ``m``-level round-to-nearest quantizer
:math:`s_m \\operatorname{round}(w/s_m)` and ``w`` gets a straight-through gradient.
:func:`project_nonnegative` keeps each kernel's gates non-increasing in ``k`` (a level is on
only while the coarser ones are), so the active gates are the bit-width. The cost
(:attr:`Quantized.macs`) multiplies every op's MACs by the bit-width of the kernel it reads:
:math:`\\text{BitMACs} = \\sum_{\\text{ops}} \\text{MACs}_o(\\text{widths}) \\cdot b_o`, with
:math:`b_o = r(\\alpha_{\\text{kernel}(o)})` in the surrogate, and ``K`` for an op reading no
quantized kernel. ``quantize(gated(model, x), x)`` trains channel and bit gates together.

* Gating: :func:`gated`, :func:`factorize` / :class:`Factorized` (truncated SVD; the rank axis
  becomes a group), :func:`project_nonnegative`.
* Cost: :class:`jaxcompress.structure.MacCount` (``jc.structure.macs``), or a measured
  :class:`LatencyModel` (:func:`measure_latency_model`); :func:`measure_latency`.
* Bit-level gates: :func:`quantize` / :class:`Quantized` (a gate per residual quantization
  level of every chosen kernel; its bit-weighted cost is :attr:`Quantized.macs`).
* Surrogate: :func:`ratio`, :func:`surrogate_counts`, :func:`regularizer` (FLOPs or latency
  form), :func:`l1_penalty`, :func:`surrogate_penalty` (an optax transform),
  :func:`lambda_controller` / :class:`LambdaController`, :func:`gate_diagnostics`.
* Extraction: :func:`extract` / :class:`Extracted` with policies :func:`round_to_multiple`,
  :func:`within_budget`, :func:`pad_to_fast`; baseline :func:`uniform_width`.

Reconstructed choices (the paper body was not available), each an option with this default:

* (a) exponent ``p = 2`` in :func:`ratio` (``DEFAULT_P``; then ``r`` is a count: equal to
  :math:`\\|\\alpha\\|_0` when the non-zero gates are equal);
* (b) positivity: identity gates + :func:`project_nonnegative` (projected gradient; exact
  zeros), optionally zeroing gates below ``prune_below`` times their group's largest;
* (c) lambda: a constant, a schedule (e.g. a ramp,
  ``optax.linear_schedule(0.0, peak, ramp_steps, delay)``) or a :func:`lambda_controller`
  (multiplicative by default; ``feedback="surrogate"`` steers the surrogate cost,
  ``"active"`` the cost at the counts extraction would keep); ``scale="rms"`` multiplies each
  group's push by the rms of its gates (the ratio is scale-invariant, so its gradient shrinks
  as gates grow);
* (d) extraction threshold ``tau = 1e-2`` (``DEFAULT_TAU``) relative to the group's largest
  gate.
* (e) bit gates: ``K = 8`` levels, nested by the projection (Bayesian Bits nests its gates
  multiplicatively); a kernel keeps the levels up to its last gate ``>= tau`` times its
  largest.

Counting convention: multiply-adds of ``dot_general`` and convolutions **per example** (the
first example of the inputs along their leading axis).

Typical use (runs as written)::

    import jax, optax
    from flax import nnx
    import jaxcompress as jc
    from jaxcompress import latency as L

    model = jc.models.SmallCNN(widths=(8, 16), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    g = L.gated(model, x)                          # a gate per channel of every prunable group
    macs = jc.structure.macs(model, x[:1])         # MACs per example, polynomial in kept counts
    ctrl = L.lambda_controller(0.5 * macs.dense, macs)
    tx = optax.chain(L.surrogate_penalty(macs, ctrl), optax.adam(1e-3), L.project_nonnegative())
    # ... train g (e.g. jc.train.fit(g, tx, train_ds, epochs=..., batch_size=...)) ...
    small = L.extract(g, x, policy=[L.round_to_multiple(4)])
    small.model, small.macs                        # a plain SmallCNN, its MACs per example
"""

from jaxcompress.latency._cost import LatencyModel, measure_latency, measure_latency_model
from jaxcompress.latency._extract import (
    Extracted,
    extract,
    pad_to_fast,
    round_to_multiple,
    uniform_width,
    within_budget,
)
from jaxcompress.latency._gating import Factorized, factorize, gated
from jaxcompress.latency._quantize import Quantized, quantize
from jaxcompress.latency._surrogate import (
    DEFAULT_P,
    DEFAULT_TAU,
    LambdaController,
    gate_diagnostics,
    l1_penalty,
    lambda_controller,
    project_nonnegative,
    ratio,
    regularizer,
    surrogate_counts,
    surrogate_penalty,
)

__all__ = [
    "DEFAULT_P",
    "DEFAULT_TAU",
    "Extracted",
    "Factorized",
    "LambdaController",
    "LatencyModel",
    "Quantized",
    "extract",
    "factorize",
    "gate_diagnostics",
    "gated",
    "l1_penalty",
    "lambda_controller",
    "measure_latency",
    "measure_latency_model",
    "pad_to_fast",
    "project_nonnegative",
    "quantize",
    "ratio",
    "regularizer",
    "round_to_multiple",
    "surrogate_counts",
    "surrogate_penalty",
    "uniform_width",
    "within_budget",
]
