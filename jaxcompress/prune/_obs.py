r"""One-shot pruning of a Flax NNX model with calibration data: SparseGPT and Wanda.

* :func:`sparsegpt`: layer-wise OBS reconstruction with lazy block updates (Frantar &
  Alistarh, "SparseGPT", ICML 2023, arXiv:2301.00774); the per-layer solver is
  :func:`jaxcompress.spdy.sparsegpt_layer` (maths in ``jaxcompress.spdy._obs``).
* :func:`wanda`: pruning by ``|W_ij| * ||X_i||_2`` per output unit, no weight update (Sun,
  Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
  ICLR 2024, arXiv:2306.11695).

Both calibrate sequentially (``jaxcompress.prune._calibrate``): a layer's inputs come from the
model with every earlier layer already pruned; layers that receive the same input (``q``,
``k``, ``v``) are pruned from one capture. Magnitude pruning is :func:`jaxcompress.prune.oneshot`.
"""

from __future__ import annotations

import functools
from typing import Any, Unpack

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.masks import keep_count
from jaxcompress.prune._calibrate import CalibrationOptions, local, prepare
from jaxcompress.spdy._obs import (
    _int_keys,
    _nm_keep,
    check_criterion,
    check_solver_args,
    prune_smallest,
    solve_layer,
)

__all__ = ["sparsegpt", "wanda", "wanda_layer"]


def _check_layers(cal, nm: Any, need_rows: bool) -> None:
    """Per-layer checks that need the plan: N:M divisibility and enough calibration rows."""
    for layer in cal.layers:
        if nm is not None and layer.d_in % nm[1]:
            raise ValueError(
                f"{cal.fn}: layer {layer.name!r} has d_in={layer.d_in} inputs, not divisible by "
                f"m={nm[1]}; exclude it with where="
            )
        if need_rows and layer.rows < layer.d_in:
            raise ValueError(
                f"{cal.fn}: layer {layer.name!r} has d_in={layer.d_in} inputs, so its Hessian "
                f"2 X^T X / n needs at least {layer.d_in} calibration rows (tokens) to have full "
                f"rank; the calibration data gives {layer.rows}. Add calibration examples."
            )


def sparsegpt(
    model: nnx.Module,
    calib: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    **options: Unpack[CalibrationOptions],
) -> tuple[nnx.State, Any]:
    """SparseGPT: prune every Dense layer of ``model`` with OBS reconstruction, sequentially.

    For each group of layers in call order (module docstring of ``jaxcompress.prune._calibrate``):
    one forward pass over ``calib`` with the earlier layers pruned accumulates
    ``H = 2 X^T X / n`` (float32, all-reduced over a sharded batch), then each layer of the group
    is solved by the SparseGPT sweep (:func:`jaxcompress.spdy.sparsegpt_layer`; unstructured:
    exactly ``B d_out - ceil(B d_out (1 - s))`` pruned in every block of ``B = blocksize``
    input rows; N:M along the input axis). A kernel of a sharded model is gathered on one device
    for its solve and put back with its sharding; the model as a whole is never gathered.

    Args:
      model: a Flax NNX model; not modified (dropout is off and BatchNorm uses running
        statistics during calibration).
      calib: calibration inputs: an array with a leading batch axis (e.g. int32 token ids
        ``(B, T)``), split into ``batch_size`` batches, or an iterable of batches (arrays,
        ``(x, y)`` pairs, dicts with ``"x"``) of equal per-example shape and dtype.
      sparsity: unstructured sparsity in [0, 1); or ``n`` and ``m`` for N:M.
      blocksize: input rows per lazy-update block (reference 128); a multiple of ``m``.
      percdamp: dampening ``percdamp * mean(diag H)`` (> 0; reference 0.01).
      where: selector ``(path, leaf) -> bool`` over the params; default
        :func:`jaxcompress.masks.prunable` restricted to Dense kernels. Selecting a leaf that
        is not an ``nnx.Linear``/``nnx.LinearGeneral`` kernel is an error.
      forward: ``(model, batch) -> output``; default ``model(x)`` with ``x`` the batch's input.
      batch_size: examples per forward pass when ``calib`` is an array (default: all at once).
      mesh: a ``jax.sharding.Mesh``: each batch is sharded over its ``"data"`` axis (or over
        all its axes if it has none); the batch size must be divisible by that axis size.

    Returns:
      ``(params, masks)``: the ``nnx.Param`` state with pruned kernels (apply with
      ``nnx.update(model, params)``) and a mask tree mirroring it (bool, True = kept; ``None``
      for leaves that were not pruned), as :func:`jaxcompress.prune.oneshot`.

    Raises:
      ValueError / TypeError: bad arguments, calibration data of the wrong structure, shape or
        dtype, fewer calibration rows than a layer's inputs, no prunable Dense kernel, all
        before any computation; :class:`jaxcompress.spdy.NotPositiveDefiniteError` (a
        ``ValueError``) naming the layer when a dampened Hessian has no Cholesky factor. The
        model is never modified, so an error leaves it as it was.
    """
    fn = "sparsegpt"
    sparsity, nm = check_criterion(sparsity, n, m, fn)
    blocksize, percdamp = check_solver_args(blocksize, percdamp, nm, fn)
    cal = prepare(model, calib, fn, options)
    _check_layers(cal, nm, need_rows=True)
    for group in cal.groups:
        xtx, rows = cal.statistic(group, "xtx")
        h = local(xtx) * (2.0 / rows)
        for i in group:
            layer = cal.layers[i]
            w = local(cal.kernel(layer)).reshape(layer.d_in, layer.d_out)
            wn, keep = solve_layer(
                w,
                h,
                sparsity=sparsity,
                nm=nm,
                blocksize=blocksize,
                percdamp=percdamp,
                name=layer.name,
            )
            cal.set_kernel(layer, wn, keep)
    return cal.result()


@functools.partial(jax.jit, static_argnames=("nm", "pruned"))
def _wanda_mask(w, norms, *, nm, pruned):
    score = jnp.abs(w.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None]
    if nm is not None:
        n, m = nm
        groups = score.reshape(-1, m, score.shape[1])
        return jax.vmap(lambda g: _nm_keep(g, n))(groups).reshape(score.shape)
    return ~prune_smallest(_int_keys(score).T, jnp.int32(pruned)).T


def wanda_layer(
    kernel: Any,
    norms: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Wanda on one Dense kernel ``(d_in, d_out)``: ``S_ij = |W_ij| ||X_i||_2``, no update.

    Each output unit (column ``j``) keeps its ``ceil(d_in (1 - s))`` largest scores (ties to the
    lower input index), or, for N:M, the ``n`` largest of every ``m`` consecutive inputs.

    Args:
      kernel: ``(d_in, d_out)``.
      norms: ``(d_in,)``, the L2 norm of each input feature over the calibration tokens.
      sparsity / n, m: the criterion.

    Returns:
      ``(kernel * mask, mask)``.
    """
    sparsity, nm = check_criterion(sparsity, n, m, "wanda_layer")
    w = jnp.asarray(kernel)
    norms = jnp.asarray(norms)
    if w.ndim != 2 or norms.shape != (w.shape[0],):
        raise ValueError(
            f"wanda_layer: expected a (d_in, d_out) kernel and (d_in,) norms, got "
            f"{tuple(w.shape)} and {tuple(norms.shape)}"
        )
    if nm is not None and w.shape[0] % nm[1]:
        raise ValueError(f"wanda_layer: d_in={w.shape[0]} is not divisible by m={nm[1]}")
    pruned = 0 if sparsity is None else w.shape[0] - keep_count(w.shape[0], sparsity)
    mask = _wanda_mask(w, norms, nm=nm, pruned=pruned)
    return jnp.where(mask, w, jnp.zeros((), w.dtype)), mask


def wanda(
    model: nnx.Module,
    calib: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    **options: Unpack[CalibrationOptions],
) -> tuple[nnx.State, Any]:
    """Wanda: prune every Dense layer by ``|W| * ||X||`` per output unit, sequentially.

    Calibration as :func:`sparsegpt` (one forward pass per group of layers with the earlier
    layers pruned), but only the per-input sums of squares ``||X_i||^2`` are accumulated;
    each layer is then pruned by :func:`wanda_layer`. Arguments, return value and errors as
    :func:`sparsegpt` (no ``blocksize``/``percdamp``, no minimum number of calibration rows).
    """
    fn = "wanda"
    sparsity, nm = check_criterion(sparsity, n, m, fn)
    cal = prepare(model, calib, fn, options)
    _check_layers(cal, nm, need_rows=False)
    for group in cal.groups:
        sumsq, _ = cal.statistic(group, "sumsq")
        norms = jnp.sqrt(local(sumsq))
        for i in group:
            layer = cal.layers[i]
            w = local(cal.kernel(layer)).reshape(layer.d_in, layer.d_out)
            wn, keep = wanda_layer(w, norms, sparsity=sparsity, n=n, m=m)
            cal.set_kernel(layer, wn, keep)
    return cal.result()
