r"""Families of compression operators for compression-aware optimizers (CrAM, AC/DC).

A :class:`Compressor` is a finite family of compression operators
:math:`\{C_1, \dots, C_K\}` over a params pytree, each given by the mask it produces: the
operator is :math:`C_k(\theta) = M_k(\theta) \odot \theta` with a mask tree
:math:`M_k(\theta)` (boolean arrays, ``True`` = kept, ``None`` for leaves that are not
compressed). Three kinds are provided, all thin wrappers over :mod:`jaxcompress.masks`:

* ``"global"``: magnitude pruning to sparsity :math:`s_k` with one threshold over all selected
  leaves (:func:`jaxcompress.masks.magnitude` with ``scope="global"``);
* ``"layer"``: magnitude pruning to sparsity :math:`s_k` in every selected leaf separately
  (``scope="layer"``);
* ``"nm"``: :math:`N{:}M` semi-structured sparsity, :math:`N` kept in every group of :math:`M`
  consecutive entries along the contracting (input) axis, ``-2`` of a Flax kernel
  (:func:`jaxcompress.masks.nm`), for each :math:`(N_k, M_k)` pattern.

The operator to apply is picked by an integer index that may be traced, so one compiled
program serves every member of the family: :meth:`Compressor.draw` draws it uniformly at
random from a key (CrAM-Multi), and :meth:`Compressor.masks` computes the mask for it. The
magnitude kinds pass the (traced) sparsity straight to :func:`jaxcompress.masks.magnitude`, so
one selection program serves all :math:`K` levels; the :math:`N{:}M` kind selects between its
patterns with :func:`jax.lax.switch`, which runs only the chosen branch.

References:
  Peste, Vladu, Kurtic, Lampert, Alistarh, "CrAM: A Compression-Aware Minimizer", ICLR 2023,
  arXiv:2207.14200. Peste, Iofinova, Vladu, Alistarh, "AC/DC: Alternating
  Compressed/DeCompressed Training of Deep Neural Networks", NeurIPS 2021, arXiv:2106.12379.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress import masks as jcmasks
from jaxcompress._checks import check_nm
from jaxcompress._tree import is_none
from jaxcompress.masks import Selector

__all__ = [
    "COMPRESSOR_KINDS",
    "Compressor",
    "check_nm_patterns",
    "check_sparsities",
    "make_compressor",
]

#: The kinds accepted by :func:`make_compressor`.
COMPRESSOR_KINDS = ("global", "layer", "nm")


@dataclasses.dataclass(frozen=True)
class Compressor:
    """A finite family of mask-producing compression operators (see the module docstring).

    Build one with :func:`make_compressor`, which validates the arguments.

    Attributes:
      kind: ``"global"``, ``"layer"`` or ``"nm"``.
      options: the members of the family: sparsities in ``[0, 1)`` for the magnitude kinds,
        ``(n, m)`` pairs for ``"nm"``.
      where: the selector ``(path, leaf) -> bool`` of the leaves that are compressed.
      reference_ties: magnitude kinds only; use the reference code's strict-threshold rule
        (``|w| > thr`` with ``thr`` the ``ceil(N (1 - s))``-th largest magnitude, which keeps one
        entry fewer when there are no ties) instead of keeping exactly ``ceil(N (1 - s))``.
    """

    kind: str
    options: tuple
    where: Selector
    reference_ties: bool = False

    @property
    def num_options(self) -> int:
        """:math:`K`, the number of operators in the family."""
        return len(self.options)

    @property
    def nominal_sparsities(self) -> tuple[float, ...]:
        """The sparsity of each member: :math:`s_k`, or :math:`1 - N_k / M_k` for ``"nm"``."""
        if self.kind == "nm":
            return tuple(1.0 - n / m for n, m in self.options)
        return tuple(float(s) for s in self.options)

    def sparsity(self, index: jax.Array | int) -> jax.Array:
        """Nominal sparsity of member ``index`` as a float32 scalar (``index`` may be traced)."""
        table = jnp.asarray(self.nominal_sparsities, dtype=jnp.float32)
        return table[jnp.asarray(index, dtype=jnp.int32)]

    def draw(self, key: jax.Array) -> jax.Array:
        """A member index drawn uniformly from ``{0, ..., K - 1}`` (int32 scalar; jit-friendly).

        With a single member the index is the constant 0 and ``key`` is not used.
        """
        if self.num_options == 1:
            return jnp.zeros((), dtype=jnp.int32)
        return jax.random.randint(key, (), 0, self.num_options, dtype=jnp.int32)

    def masks(self, params: Any, index: jax.Array | int) -> Any:
        """The mask tree :math:`M_k(\\theta)` of member ``index`` (an int or a traced int32)."""
        if self.kind == "nm":
            branches = [
                lambda p, n=n, m=m: jcmasks.nm(p, n, m, where=self.where) for n, m in self.options
            ]
            if len(branches) == 1:
                return branches[0](params)
            return jax.lax.switch(jnp.asarray(index, dtype=jnp.int32), branches, params)
        if self.num_options == 1:
            sparsity = self.options[0]
        else:
            sparsity = self.sparsity(index)
        return jcmasks.magnitude(
            params,
            sparsity,
            scope=self.kind,
            where=self.where,
            reference_ties=self.reference_ties,
        )

    def full_masks(self, params: Any) -> Any:
        """An all-``True`` mask tree of the structure :meth:`masks` returns for ``params``.

        Built from :func:`jax.eval_shape` of the operator, so a shape the operator rejects (for
        example an input dimension that is not a multiple of ``m``) raises here. The arrays are
        placed on the params' shardings when the params are concrete, sharded arrays.
        """
        shapes = jax.eval_shape(lambda p: self.masks(p, 0), params)
        return jax.tree.map(_full_like, shapes, params, is_leaf=is_none)


def _full_like(mask: Any, param: Any) -> Any:
    if mask is None:
        return None
    # ones_like follows the param: its sharding, and whether it is committed to devices (a
    # committed/uncommitted mismatch with later states would make jit compile twice).
    return jnp.ones_like(param, dtype=jnp.bool_)


def check_sparsities(value: Any, argname: str = "sparsities") -> tuple[float, ...]:
    """Validate a non-empty sequence of sparsities in ``[0, 1)``; return it as floats.

    Raises:
      TypeError: ``value`` is not a sequence of real numbers.
      ValueError: ``value`` is empty, or an entry is outside ``[0, 1)`` or not finite.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{argname} must be a non-empty sequence of floats in [0, 1) (e.g. (0.5, 0.7, 0.9), "
            f"or (0.9,) for one fixed sparsity), got {value!r} ({type(value).__name__})"
        )
    if len(value) == 0:
        raise ValueError(
            f"{argname} must hold at least one sparsity in [0, 1), got an empty {value!r}"
        )
    out = []
    for i, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(
                f"{argname}[{i}] must be a float in [0, 1), got {s!r} ({type(s).__name__})"
            )
        if not 0.0 <= float(s) < 1.0:
            raise ValueError(f"{argname}[{i}] must be in [0, 1), got {s!r}")
        out.append(float(s))
    return tuple(out)


def check_nm_patterns(value: Any, argname: str = "nm_patterns") -> tuple[tuple[int, int], ...]:
    """Validate a non-empty sequence of ``(n, m)`` pairs with ``1 <= n < m``.

    Each pair is checked by the rule of :func:`jaxcompress.masks.nm`.

    Raises:
      TypeError: ``value`` is not a sequence of pairs of ints.
      ValueError: ``value`` is empty, or a pair does not satisfy ``1 <= n < m``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{argname} must be a non-empty sequence of (n, m) int pairs such as ((2, 4), (4, 8)), "
            f"got {value!r} ({type(value).__name__})"
        )
    if len(value) == 0:
        raise ValueError(f"{argname} must hold at least one (n, m) pair, got an empty {value!r}")
    out = []
    for i, pair in enumerate(value):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{argname}[{i}] must be an (n, m) pair of ints, got {pair!r}")
        out.append(check_nm(pair[0], pair[1], argname=f"{argname}[{i}]"))
    return tuple(out)


def make_compressor(
    kind: str,
    *,
    sparsities: Sequence[float] | None = None,
    nm_patterns: Sequence[tuple[int, int]] | None = None,
    where: Selector | None = None,
    reference_ties: bool = False,
) -> Compressor:
    """Validate the arguments and build a :class:`Compressor`.

    Args:
      kind: ``"global"`` or ``"layer"`` (magnitude; needs ``sparsities``) or ``"nm"`` (needs
        ``nm_patterns``; ``sparsities`` must be ``None``).
      sparsities: the sparsity of each member, in ``[0, 1)``.
      nm_patterns: the ``(n, m)`` pattern of each member, ``1 <= n < m``.
      where: selector of the compressed leaves; ``None`` means :func:`jaxcompress.masks.prunable`.
      reference_ties: see :class:`Compressor`.

    Raises:
      ValueError / TypeError: naming the argument and the value, on invalid input.
    """
    if not isinstance(kind, str) or kind not in COMPRESSOR_KINDS:
        raise ValueError(f"compressor must be one of {COMPRESSOR_KINDS}, got {kind!r}")
    if where is None:
        where = jcmasks.prunable
    if not callable(where):
        raise TypeError(
            f"where must be a selector (path, leaf) -> bool or None, got {where!r} "
            f"({type(where).__name__})"
        )
    if not isinstance(reference_ties, bool):
        raise TypeError(f"reference_ties must be a bool, got {reference_ties!r}")
    if kind == "nm":
        if sparsities is not None:
            raise ValueError(
                f"sparsities does not apply to compressor='nm' (got sparsities={sparsities!r}); "
                "choose the N:M patterns with nm_patterns instead"
            )
        if reference_ties:
            raise ValueError("reference_ties applies to the magnitude compressors only, not 'nm'")
        return Compressor(kind, check_nm_patterns(nm_patterns), where)
    if sparsities is None:
        raise ValueError(
            f"compressor={kind!r} needs sparsities, a non-empty sequence of floats in [0, 1) "
            "(e.g. (0.5, 0.7, 0.9)); got None"
        )
    return Compressor(kind, check_sparsities(sparsities), where, reference_ties)
