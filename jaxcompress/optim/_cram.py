r"""CrAM: the Compression-Aware Minimizer (Peste et al., ICLR 2023) as an optax transformation."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.masks import map_masked
from jaxcompress.optim._compressors import Compressor, make_compressor
from jaxcompress.optim._placement import replicate_on_params_mesh
from jaxcompress.optim._util import check_update_args, next_count

__all__ = ["CramState", "cram"]

#: Added to the gradient norm when ``normalize_grad=True`` (as in the SAM reference code).
_NORM_EPS = 1e-12


class CramState(NamedTuple):
    """State of :func:`cram`.

    Attributes:
      count: number of ``update`` calls so far (int32); the step at which a scheduled ``rho``
        is evaluated.
      key: raw PRNG key data (``uint32[2]``, from :func:`jax.random.key_data`) used to draw the
        compression operator of the next step. Stored raw so that Orbax and
        ``optax.MultiSteps`` (which ``jnp.where``-selects every state leaf) handle it.
      choice: index (int32) of the operator drawn at the last step: an index into
        ``sparsities`` (magnitude compressors) or ``nm_patterns`` (``compressor="nm"``).
      sparsity: nominal sparsity (float32) of that operator (``1 - n/m`` for N:M).
      masks: the mask tree :math:`M = C(\theta + \rho g)` of the last step (``True`` = kept,
        ``None`` for leaves outside ``where``); all ``True`` before the first step.
      inner_state: state of the inner optimizer.
    """

    count: jax.Array
    key: jax.Array
    choice: jax.Array
    sparsity: jax.Array
    masks: Any
    inner_state: optax.OptState


def _check_rho(rho: Any) -> Any:
    """Validate ``rho``: a schedule, a traced value, or a finite real scalar >= 0."""
    if callable(rho) or isinstance(rho, jax.core.Tracer):
        # A schedule, or a hyperparameter injected by optax.inject_hyperparams under jit.
        return rho
    if isinstance(rho, bool) or not isinstance(rho, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(
            f"rho must be a float >= 0 or an optax schedule (step -> float), got {rho!r} "
            f"({type(rho).__name__})"
        )
    value = np.asarray(rho)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"rho must be a real scalar or a schedule, got {rho!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"rho must be a finite float >= 0, got {rho!r}")
    return rho


def _check_seed(seed: Any) -> Any:
    if isinstance(seed, jax.core.Tracer):
        return seed  # injected by optax.inject_hyperparams; only used in init
    if isinstance(seed, (np.ndarray, jax.Array)) and seed.ndim == 0:
        if np.issubdtype(seed.dtype, np.integer):
            return seed
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return seed
    raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _zero_off_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, x, jnp.zeros((), dtype=x.dtype))


def cram(
    inner: optax.GradientTransformation,
    *,
    rho: optax.ScalarOrSchedule,
    sparsities: Sequence[float] | None = None,
    compressor: str = "global",
    plus: bool = True,
    sparse_grad: bool = True,
    normalize_grad: bool = False,
    where: Callable[[tuple, Any], bool] | None = None,
    nm_patterns: Sequence[tuple[int, int]] = ((2, 4), (4, 8)),
    seed: int = 0,
    reference_ties: bool = False,
    batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The Compression-Aware Minimizer (CrAM / CrAM+), wrapping any inner optimizer.

    CrAM trains a dense model whose loss stays low after one-shot compression by a compression
    operator :math:`C` (a projection such as Top-K by magnitude). It solves the robust problem
    :math:`\min_\theta \max_{\|\delta\| \le \rho} L(C(\theta + \delta))` SAM-style, with a
    one-step linearised inner maximisation :math:`\delta = \rho\, g` and Danskin's theorem.
    With :math:`g = \nabla L(\theta)` the gradient passed to ``update`` (the loss gradient at
    the current params, *without* weight decay, which belongs to ``inner``), one step is

    .. math::

        \theta' &= \theta + \rho\, g
            \qquad (\text{or } \theta + \rho\, g / \|g\|_2 \text{ with } normalize\_grad), \\
        M &= \mathrm{mask}\bigl(C_k(\theta')\bigr), \qquad k \sim \mathcal{U}\{1..K\}, \\
        g_c &= \nabla L(M \odot \theta') \qquad
            (\text{then } g_c \leftarrow M \odot g_c \text{ with } sparse\_grad), \\
        \tilde g &= g_c + g \;\; (\text{CrAM+}, plus) \qquad\text{or}\qquad \tilde g = g_c
            \;\; (\text{CrAM}), \\
        (u, s') &= \mathrm{inner.update}(\tilde g, s, \theta),

    and the returned updates :math:`u` are applied at :math:`\theta` (not at :math:`\theta'`),
    e.g. :math:`\theta \leftarrow \theta - \eta \tilde g` for plain SGD. Variants:

    * **CrAM**: ``plus=False``, :math:`\theta \leftarrow \theta - \eta \nabla L(C(\theta+\rho g))`.
    * **CrAM+** (default, every configuration of the reference): ``plus=True`` also keeps the
      dense loss low by adding the dense gradient :math:`g`.
    * **Multi**: several ``sparsities``; every step draws :math:`s_k` uniformly (inside jit, from
      a PRNG key carried in the state, seeded by ``seed``). One entry (e.g. ``(0.95,)``,
      "CrAM+ k95") compresses at that fixed sparsity.
    * **N:M** (``compressor="nm"``): every step draws a pattern uniformly from ``nm_patterns``,
      by default 2:4 or 4:8 with probability 1/2 each, as the reference ``NMTopkCrAM``.
    * ``sparse_grad=True`` (every shipped configuration) multiplies the compressed-point
      gradient by :math:`M`: the exact Jacobian of Top-K with the mask held fixed. With
      ``False`` the straight-through gradient is used.

    The perturbation :math:`\rho g` applies to *every* parameter (biases and BatchNorm scales
    included), as in the reference; the mask only to the leaves selected by ``where``.
    Compressors (all computed on the perturbed weights :math:`\theta'`, through
    :mod:`jaxcompress.masks`):

    * ``"global"``: one magnitude threshold over all selected leaves. By default exactly
      :math:`\lceil N(1-s) \rceil` weights are kept; ``reference_ties=True`` uses the reference's
      strict rule :math:`|w| > t` with :math:`t` the :math:`\lceil N(1-s)\rceil`-th largest
      magnitude (one weight fewer when there are no ties).
    * ``"layer"``: the same per selected leaf (the reference's "uniform" mode, which skips the
      first conv and the classifier by *position*; here exclude them by name with ``where``, e.g.
      ``jaxcompress.masks.select(exclude=...)``).
    * ``"nm"``: :math:`N{:}M` groups along axis ``-2``, the input (contracting) axis of Flax
      ``Dense`` ``(in, out)`` and ``Conv`` ``(kh, kw, in, out)`` kernels, which is the grouping
      of the reference (consecutive input channels at a fixed output and spatial position).

    Cost: a second forward/backward pass (``grad_fn``) and one mask computation per step.

    Defaults follow the reference code (``TopkCrAM``): no gradient normalisation, CrAM+,
    sparse intermediate gradient, global magnitude masks. Reference hyperparameters: ResNet-20 on
    CIFAR-10 with ``rho=0.2, sparsities=(0.3, ..., 0.9)``; ResNet-50 on ImageNet with
    ``rho=0.05, sparsities=(0.5, 0.7, 0.9)``; inner optimizer SGD with momentum 0.9 and coupled
    weight decay, ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))``,
    which reproduces ``torch.optim.SGD(lr, momentum, weight_decay)``; Adam for BERT.

    Usage with Flax NNX: :func:`jaxcompress.train.make_train_step` with ``pass_grad_fn=True``
    passes ``grad_fn`` (the loss gradient on the same batch, in train mode, whose BatchNorm
    running statistics are discarded, which is the reference's ``disable_running_stats``)::

        model = jaxcompress.models.SmallCNN(rngs=nnx.Rngs(0))
        graphdef, params, rest = jaxcompress.train.split_model(jaxcompress.train.train_view(model))
        tx = cram(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
                  rho=0.05, sparsities=(0.5, 0.7, 0.9))
        opt_state = tx.init(params)
        step = jaxcompress.train.make_train_step(graphdef, tx, pass_grad_fn=True)
        params, rest, opt_state, metrics = step(params, rest, opt_state, x, y)

    or, for any loss ``loss(params, batch)``::

        grads = jax.grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       grad_fn=lambda p: jax.grad(loss)(p, batch))
        params = optax.apply_updates(params, updates)

    Composition:

    * ``optax.inject_hyperparams(cram)(inner, rho=0.05, sparsities=...)`` makes ``rho``
      (and ``seed``) injected hyperparameters; ``rho`` may also be any ``optax`` schedule,
      evaluated at ``state.count``. A custom ``where`` must then be declared static:
      ``optax.inject_hyperparams(cram, static_args="where")`` (inject_hyperparams treats every
      callable as a schedule); the default ``where=None`` needs nothing.
    * ``optax.MultiSteps(cram(inner), k)`` forwards extra arguments, so call
      ``update(grads, state, params, grad_fn=grad_fn)`` on it as on ``cram``. MultiSteps runs
      the wrapped update at *every* micro-step (keeping the result only at the last one), with
      :math:`g` the running mean of the micro-batch gradients, so each micro-step pays the second
      pass, and at the emitting micro-step :math:`g_c` is whatever ``grad_fn`` computes (the
      gradient on the batch it closes over, typically the last micro-batch).
      ``cram(optax.MultiSteps(inner, k).gradient_transformation())`` instead takes a full CrAM
      step per micro-batch (its own perturbation and mask) and accumulates the resulting
      :math:`\tilde g`.
    * Data parallelism: under ``jit`` with sharded params and batch, nothing is needed (the
      gradients are global). Where each device differentiates its own batch shard and holds a
      *local* gradient (``pmap``, or ``jax.shard_map(..., check_vma=False)``), set
      ``batch_axis_name`` to ``lax.pmean`` :math:`g` and :math:`g_c` over that axis, as DDP does
      in the reference, so every device computes the same perturbation and mask. Under
      ``jax.shard_map`` with the default ``check_vma=True``, autodiff already *sums* the
      gradients of replicated params over the mapped axis (``pmean`` of those is the identity),
      so scale the per-device loss by ``1 / axis_size`` instead.

    Args:
      inner: the base optimizer, any ``optax.GradientTransformation``; extra arguments given to
        ``update`` (other than ``grad_fn``) are forwarded to it.
      rho: perturbation radius :math:`\rho \ge 0`, a float or an ``optax`` schedule.
      sparsities: the sparsity levels :math:`s_k \in [0, 1)` drawn from (magnitude compressors;
        must be ``None`` for ``"nm"``).
      compressor: ``"global"`` (default), ``"layer"`` or ``"nm"``.
      plus: CrAM+ (add the dense gradient), default ``True``.
      sparse_grad: mask the compressed-point gradient, default ``True``.
      normalize_grad: perturb along :math:`g/\|g\|_2` (SAM-style) instead of :math:`g`; default
        ``False``, as the reference.
      where: selector ``(path, leaf) -> bool`` of the compressed leaves; ``None`` (default) is
        :func:`jaxcompress.masks.prunable` (conv and dense kernels, first and last included).
      nm_patterns: ``(n, m)`` pairs for ``compressor="nm"``, default ``((2, 4), (4, 8))``.
      seed: seed of the PRNG key that draws the operator of each step.
      reference_ties: magnitude compressors: the reference's strict-threshold rule (see above).
      batch_axis_name: a mapped axis name over which :math:`g` and :math:`g_c` are averaged
        with ``lax.pmean``, or ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *,
      grad_fn, **extra_args)`` requires ``params`` and ``grad_fn``, a function
      ``params -> grads`` evaluating the loss gradient at a given point on the current batch.

    Raises:
      ValueError / TypeError: on invalid arguments, from the factory, before any work.

    References:
      Peste, Vladu, Kurtic, Lampert, Alistarh, "CrAM: A Compression-Aware Minimizer", ICLR
      2023, arXiv:2207.14200.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            "inner must be an optax.GradientTransformation (e.g. optax.sgd(0.1, momentum=0.9)), "
            f"got {inner!r} ({type(inner).__name__})"
        )
    rho = _check_rho(rho)
    _check_bool("plus", plus)
    _check_bool("sparse_grad", sparse_grad)
    _check_bool("normalize_grad", normalize_grad)
    seed = _check_seed(seed)
    if batch_axis_name is not None and not isinstance(batch_axis_name, str):
        raise TypeError(f"batch_axis_name must be a str or None, got {batch_axis_name!r}")
    comp: Compressor = make_compressor(
        compressor,
        sparsities=sparsities,
        nm_patterns=nm_patterns if compressor == "nm" else None,
        where=where,
        reference_ties=reference_ties,
    )
    if compressor != "nm":
        # Validated even where unused, so a typo does not go unnoticed.
        make_compressor("nm", nm_patterns=nm_patterns)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> CramState:
        state = CramState(
            count=jnp.zeros((), dtype=jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            choice=jnp.zeros((), dtype=jnp.int32),
            sparsity=jnp.zeros((), dtype=jnp.float32),
            masks=comp.full_masks(params),
            inner_state=inner.init(params),
        )
        return replicate_on_params_mesh(state, params)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params], optax.Updates] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, CramState]:
        if grad_fn is None:
            raise TypeError(
                "cram(): update() requires the keyword argument grad_fn, a function params -> "
                "grads that evaluates the loss gradient on the current batch, e.g. "
                "tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch)); "
                "with jaxcompress.train use make_train_step(..., pass_grad_fn=True)"
            )
        if not callable(grad_fn):
            raise TypeError(f"cram(): grad_fn must be callable params -> grads, got {grad_fn!r}")
        state, params = check_update_args(
            "cram()", state, CramState, params, "the perturbation is applied to them"
        )
        grads = updates
        if batch_axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name=batch_axis_name)

        radius = rho(state.count) if callable(rho) else rho
        if normalize_grad:
            scale = radius / (optax.tree.norm(grads) + _NORM_EPS)
        else:
            scale = radius
        perturbed = jax.tree.map(lambda p, g: (p + scale * g).astype(p.dtype), params, grads)

        key, draw_key = jax.random.split(jax.random.wrap_key_data(state.key))
        choice = comp.draw(draw_key)
        masks = comp.masks(perturbed, choice)
        compressed_grads = grad_fn(map_masked(_zero_off_mask, perturbed, masks))
        if jax.tree.structure(compressed_grads) != jax.tree.structure(grads):
            raise ValueError(
                "cram(): grad_fn(params) must return gradients with the structure of the "
                f"gradients passed to update(); got {jax.tree.structure(compressed_grads)}, "
                f"expected {jax.tree.structure(grads)}"
            )
        if batch_axis_name is not None:
            compressed_grads = jax.lax.pmean(compressed_grads, axis_name=batch_axis_name)
        if sparse_grad:
            compressed_grads = map_masked(_zero_off_mask, compressed_grads, masks)
        if plus:
            combined = jax.tree.map(lambda gc, g: (gc + g).astype(g.dtype), compressed_grads, grads)
        else:
            combined = jax.tree.map(lambda gc, g: gc.astype(g.dtype), compressed_grads, grads)

        inner_updates, inner_state = inner.update(combined, state.inner_state, params, **extra_args)
        return inner_updates, CramState(
            count=next_count(state.count),
            key=jax.random.key_data(key),
            choice=choice,
            sparsity=comp.sparsity(choice),
            masks=masks,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
