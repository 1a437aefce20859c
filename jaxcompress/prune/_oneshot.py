"""One-shot pruning of a params tree: global/per-layer magnitude or N:M."""

from __future__ import annotations

import numbers
from typing import Any

from jaxcompress import masks as _masks

__all__ = ["oneshot"]

_SCOPES = ("global", "layer")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
    use_magnitude = sparsity is not None
    use_nm = n is not None or m is not None
    if use_magnitude == use_nm:
        raise ValueError(
            "oneshot: give exactly one criterion, either sparsity=... or n=... and m=...; got "
            f"sparsity={sparsity!r}, n={n!r}, m={m!r}"
        )
    if where is None:
        where = _masks.prunable
    elif not callable(where):
        raise TypeError(f"where must be a callable (path, leaf) -> bool or None, got {where!r}")
    if use_magnitude:
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
            raise TypeError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        masks = _masks.magnitude(params, float(sparsity), scope=scope, where=where)
    else:
        if n is None or m is None:
            raise ValueError(f"N:M pruning needs both n and m, got n={n!r}, m={m!r}")
        if not _is_int(n) or not _is_int(m):
            raise TypeError(f"n and m must be ints, got n={n!r}, m={m!r}")
        if not 0 < n < m:
            raise ValueError(f"N:M pruning needs 0 < n < m, got n={n!r}, m={m!r}")
        if scope != "global":
            raise ValueError(
                f"scope applies to magnitude pruning only; N:M is per group, got scope={scope!r}"
            )
        masks = _masks.nm(params, n=int(n), m=int(m), where=where)
    return _masks.apply(params, masks), masks
