"""Pure mask maths over pytrees: selection, magnitude (layer/global), N:M, ERK, statistics.

A mask tree mirrors a params tree, with a boolean array (True = kept) for each pruned leaf
and ``None`` for each leaf that is not pruned. Everything here is a pure JAX function (no
Flax import) and works on plain dicts, ``nnx.State`` and any registered pytree.
"""

from jaxcompress.masks._apply import apply, map_masked, validate_masks
from jaxcompress.masks._erk import erk
from jaxcompress.masks._magnitude import keep_count, magnitude
from jaxcompress.masks._nm import nm
from jaxcompress.masks._selection import (
    KERNEL_NAMES,
    EmptySelectionWarning,
    Selector,
    exclude_first_last,
    path_str,
    prunable,
    select,
)
from jaxcompress.masks._summary import summary

__all__ = [
    "KERNEL_NAMES",
    "EmptySelectionWarning",
    "Selector",
    "apply",
    "erk",
    "exclude_first_last",
    "keep_count",
    "magnitude",
    "map_masked",
    "nm",
    "path_str",
    "prunable",
    "select",
    "summary",
    "validate_masks",
]
