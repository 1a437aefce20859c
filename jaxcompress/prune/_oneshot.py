"""One-shot pruning of a params tree: global/per-layer magnitude or N:M."""

from __future__ import annotations

from typing import Any

from jaxcompress import masks as _masks
from jaxcompress.spdy._obs import check_criterion

__all__ = ["oneshot"]

_SCOPES = ("global", "layer")


def oneshot(
    params: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    scope: str = "global",
    where: Any = None,
) -> tuple[Any, Any]:
    r"""Prune ``params`` once and return ``(pruned_params, masks)``.

    Exactly one criterion is used:

    * **Magnitude** (``sparsity`` given): keep the largest :math:`|w|`. With ``scope="global"``
      one threshold :math:`\tau` is shared by every selected leaf, chosen so that a fraction
      ``sparsity`` of all selected weights is removed, :math:`m_i = [\,|w_i| > \tau\,]`
      (the CrAM reference's ``one_shot_prune``, Peste et al., "CrAM: A Compression-Aware
      Minimizer", ICLR 2023); with ``scope="layer"`` every selected leaf gets its own
      threshold and the same sparsity (uniform pruning).
    * **N:M** (``n`` and ``m`` given): in every group of ``m`` consecutive weights along the
      input (contracting) axis (``-2``) keep the ``n`` largest in magnitude (2:4 is what sparse
      tensor cores execute; Mishra et al. 2021, arXiv:2104.08378). Every selected leaf needs
      ``shape[-2]`` divisible by ``m``: exclude others with ``where`` (e.g. a first conv with
      one input channel).

    Leaves that ``where(path, leaf)`` rejects (default :func:`jaxcompress.masks.prunable`:
    conv/dense kernels) are left unchanged and get ``None`` in ``masks``. Works on any pytree of
    arrays: ``nnx.State``, nested dicts, ...; apply the result to a Flax NNX model with
    ``nnx.update(model, pruned_params)``.

    Args:
      params: the params tree.
      sparsity: fraction of selected weights to remove, in ``[0, 1)``.
      n: weights kept per group (``0 < n < m``), together with ``m``.
      m: group size along the input axis.
      scope: ``"global"`` or ``"layer"`` (magnitude pruning only).
      where: leaf selector ``(path, leaf) -> bool``; ``None`` means
        :func:`jaxcompress.masks.prunable`.

    Returns:
      ``(pruned_params, masks)``, masks a mask tree mirroring ``params`` (bool, True = kept).
    """
    sparsity, nm = check_criterion(sparsity, n, m, "oneshot")
    if where is None:
        where = _masks.prunable
    elif not callable(where):
        raise TypeError(f"where must be a callable (path, leaf) -> bool or None, got {where!r}")
    if nm is None:
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        masks = _masks.magnitude(params, sparsity, scope=scope, where=where)
    else:
        if scope != "global":
            raise ValueError(
                f"scope applies to magnitude pruning only; N:M is per group, got scope={scope!r}"
            )
        masks = _masks.nm(params, n=nm[0], m=nm[1], where=where)
    return _masks.apply(params, masks), masks
