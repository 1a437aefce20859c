"""Argument checks shared by the whole library: integers, fractions and N:M patterns.

One implementation of each check, so that every factory rejects bad static arguments alike:
a ``TypeError`` when the value has the wrong type (``bool`` is never accepted as a number),
a ``ValueError`` when it is out of range, both raised before any work, naming the argument,
the value and what was expected. Plain Python and :mod:`numbers` only: this module imports
nothing from jaxcompress (nor JAX), so every subpackage may use it without an import cycle.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = [
    "FRACTION_INTERVALS",
    "NotAnIntError",
    "check_fraction",
    "check_int",
    "check_nm",
    "int_expectation",
]

FRACTION_INTERVALS = ("(0, 1]", "[0, 1)", "(0, 1)", "[0, 1]")
"""Intervals :func:`check_fraction` accepts, written as in its messages."""


class NotAnIntError(TypeError, ValueError):
    """A value that is not an integer where :func:`check_int` expects one.

    A ``TypeError`` by the library's convention, and also a ``ValueError`` because
    ``train.fit``/``evaluate``, SPDY's reconstruction, search and timing raised ``ValueError``
    for it before they shared :func:`check_int` (as NumPy's ``AxisError`` is both an
    ``IndexError`` and a ``ValueError``), so ``except ValueError`` keeps working there.
    """


def int_expectation(minimum: int) -> str:
    """What :func:`check_int` asks for: ``"a positive int"`` for ``minimum == 1``,
    ``"a non-negative int"`` for ``0``, else ``"an int >= minimum"``."""
    return {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as a Python ``int`` if it is an integer ``>= minimum``.

    Integers are :class:`numbers.Integral` (Python and NumPy integers), not ``bool``.

    Raises:
      NotAnIntError: ``value`` is not an integer, a ``TypeError`` that is also a
        ``ValueError`` (message: ``"{name} must be a positive int, got 1.5 (float)"``, with
        :func:`int_expectation` of ``minimum``).
      ValueError: ``value < minimum`` (``"{name} must be a positive int, got 0"``).
    """
    what = int_expectation(minimum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise NotAnIntError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_fraction(
    name: str, value: Any, *, interval: str = "(0, 1]", what: str = "a float"
) -> float:
    """Return ``value`` as a Python ``float`` if it is a real number in ``interval``.

    ``interval`` is one of :data:`FRACTION_INTERVALS` (a bracket includes its end, a
    parenthesis excludes it); ``what`` names the quantity in the messages (``"a kept
    fraction"``, ``"a dropout rate"``). NaN is in no interval.

    Raises:
      TypeError: ``value`` is not a real number (``bool`` included).
      ValueError: ``value`` is outside ``interval`` (``"{name} must be a float in (0, 1], got
        0.0"``).
    """
    if interval not in FRACTION_INTERVALS:
        raise ValueError(f"interval must be one of {FRACTION_INTERVALS}; got {interval!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what} in {interval}, got {value!r}")
    v = float(value)
    low_ok = v > 0.0 if interval[0] == "(" else v >= 0.0
    high_ok = v < 1.0 if interval[-1] == ")" else v <= 1.0
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be {what} in {interval}, got {value!r}")
    return v


def check_nm(n: Any, m: Any, *, argname: str = "") -> tuple[int, int]:
    """Validate an N:M pattern, ``1 <= n < m`` (ints); return ``(n, m)`` as Python ints.

    ``argname`` prefixes the messages (e.g. ``"nm_patterns[1]"``). The kernels add their own
    bound on ``m`` (:func:`jaxcompress.kernels._common.check_nm`).

    Raises:
      TypeError: ``n`` or ``m`` is not an int (bools are rejected).
      ValueError: ``m < 2`` or ``n`` outside ``[1, m)``.
    """
    at = f"{argname}: " if argname else ""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"{at}{name} must be an int, got {name}={value!r} ({type(value).__name__})"
            )
    n, m = int(n), int(m)
    if m < 2:
        raise ValueError(f"{at}m must be a group size >= 2, got m={m}")
    if not 1 <= n < m:
        raise ValueError(f"{at}n must satisfy 1 <= n < m (kept per group of m={m}), got n={n}")
    return n, m
