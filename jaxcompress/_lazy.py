"""Names of a package that are imported from one of its modules on first use (PEP 562)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence


def attributes(
    package: str, module: str, names: Sequence[str], public: Sequence[str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each of ``names`` is imported from ``module``
    when first read (then cached in the package), so importing the package does not import
    ``module``'s dependencies (e.g. Flax); ``dir(package)`` lists ``public``."""
    lazy = frozenset(names)

    def __getattr__(name: str) -> object:
        if name in lazy:
            value = getattr(importlib.import_module(module), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__
