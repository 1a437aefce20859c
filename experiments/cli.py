"""Command-line glue shared by the experiments' ``main.py`` files.

Each experiment's ``main.py`` owns its flags; this module holds the argument types and the
common tail of ``main``: apply the flag overrides to the config, validate it (a bad value is
reported by argparse, naming it, before any work), run, print the table and the wall time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "add_run_flags",
    "check_dirs",
    "comma_separated",
    "positive_ints",
    "non_negative_int",
    "positive_int",
    "run_config",
]


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def comma_separated(
    cast: Callable[[str], Any],
    *,
    valid: Callable[[Any], bool],
    expected: str,
    distinct: bool = False,
) -> Callable[[str], tuple]:
    """argparse type factory: a non-empty comma-separated list, each item ``cast`` from its
    stripped text and accepted by ``valid`` (and all different with ``distinct``).

    A bad list is reported as ``expected {expected}, got '<text>'``.
    """

    def parse(text: str) -> tuple:
        try:
            values = tuple(cast(part.strip()) for part in text.split(","))
        except ValueError:
            values = ()
        if (
            not values
            or not all(valid(v) for v in values)
            or (distinct and len(set(values)) != len(values))
        ):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return values

    return parse


positive_ints = comma_separated(
    int, valid=lambda w: w > 0, expected="comma-separated positive integers such as 16,32,64"
)
"""argparse type: a non-empty comma-separated list of positive integers (e.g. ``--widths``)."""


def add_run_flags(parser: argparse.ArgumentParser, out: str) -> None:
    """The flags every experiment has: ``--out`` (default ``out``), ``--data-dir`` and
    ``--no-progress``; :func:`check_dirs` checks the first two."""
    parser.add_argument("--out", default=out, help="output directory")
    parser.add_argument(
        "--data-dir", default=None, help="data root (default $JAXCOMPRESS_DATA_DIR)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress output")


def check_dirs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects a ``--data-dir`` that is not a directory and an ``--out`` that is a file."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not os.path.isdir(data_dir):
        parser.error(f"--data-dir: {data_dir!r} is not a directory")
    out = getattr(args, "out", None)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out: {out!r} exists and is not a directory")


def run_config(
    parser: argparse.ArgumentParser,
    config: Any,
    changes: Mapping[str, Any],
    *,
    run: Callable[[Any, str], dict],
    format_table: Callable[[dict], str],
    out: str,
) -> int:
    """Applies ``changes`` to ``config``, validates it, runs it and prints the result table.

    Args:
      parser: the experiment's parser; a config that fails validation is reported through
        ``parser.error`` (exit status 2) before anything runs.
      config: a frozen config dataclass with ``replace(**changes)`` and ``validate()``.
      changes: field overrides taken from the flags.
      run: ``run(config, out) -> results``.
      format_table: ``format_table(results) -> str``.
      out: the output directory.

    Returns:
      0, the process exit status.
    """
    config = config.replace(**changes)
    try:
        config.validate()
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    start = time.perf_counter()
    results = run(config, out)
    print(format_table(results))
    print(f"wall time: {time.perf_counter() - start:.1f} s; results in {out}")
    return 0
