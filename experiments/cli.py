"""The command line of the experiments, generated from their config dataclasses.

Every field of an experiment's config (declared with :func:`experiments._common.field`) is a
flag: ``epochs`` is ``--epochs 3``, ``train_subset`` is ``--train-subset 6000`` (``none`` for
``None``), a tuple is comma-separated (``--widths 16,32,64``, ``--nm-patterns 2:4,4:8``), a
bool is ``--progress`` / ``--no-progress``. Flags override the chosen config (the full one, or
``--quick``'s); the result is validated by the config itself, so a bad value is reported in one
line naming the field before any work. Every experiment also takes ``--out``, ``--quick``,
``--mesh``, ``--restart`` and ``--num-processes``: a run resumes into an existing ``--out``
(one of another config is refused naming the fields), ``--mesh`` shards the training, and
``--num-processes N`` launches N local ``jax.distributed`` processes
(:mod:`experiments._launch`).

The argparse types and helpers at the end (:func:`positive_int`, :func:`run_config`, ...) are
used by ``experiments.surrogate``'s hand-written command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from experiments import _launch as launch
from experiments._common import MESH_AXES, check_out, check_resume, parse_mesh

__all__ = [
    "add_config_flags",
    "add_run_flags",
    "build_parser",
    "check_dirs",
    "command",
    "comma_separated",
    "main",
    "non_negative_int",
    "positive_int",
    "positive_ints",
    "run_config",
]

MESH_HELP = (
    "device mesh of the training, e.g. data=8 or data=4,fsdp=2 (axes: {axes}; fsdp shards the "
    "params too); checked against the devices that exist. Default: one device (every device "
    "of a multi-process run, data=N)"
)
RESTART_HELP = (
    "start over: delete the run.json, stage markers, checkpoints and results.json of an "
    "earlier run in --out. Without it a run resumes (finished stages are read back, training "
    "continues from its latest checkpoint, a finished run is not rerun) and an --out holding "
    "another config is refused"
)
PROCESSES_HELP = (
    "spawn this many local processes joined by jax.distributed on 127.0.0.1 (CPU: gloo "
    "collectives); each process holds its own devices, process 0 writes the results and logs. "
    "On a pod, start one process per host yourself (docs/scaling.md)"
)


# --------------------------------------------------------------------------------------------
# Flags generated from a config dataclass
# --------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(tp: Any, name: str, choices: tuple | None) -> Callable[[str], Any]:
    """Parse one value of type ``tp`` (int, float, str, bool or a fixed tuple of ints)."""
    if tp is bool:
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

        def parse_bool(text: str) -> bool:
            if text.strip().lower() not in truth:
                raise ValueError(text)
            return truth[text.strip().lower()]

        return parse_bool
    if tp in (int, float):
        return lambda text: tp(text.strip())
    if tp is str:

        def parse_str(text: str) -> str:
            text = text.strip()
            if choices is not None and text not in choices:
                raise ValueError(text)
            return text

        return parse_str
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and Ellipsis not in args and all(a is int for a in args):
        # a fixed tuple of ints such as an N:M pattern: "2:4"
        def parse_pair(text: str) -> tuple[int, ...]:
            parts = text.strip().split(":")
            if len(parts) != len(args):
                raise ValueError(text)
            return tuple(int(p) for p in parts)

        return parse_pair
    raise TypeError(f"no flag type for field {name!r} of type {tp!r}")


def _describe(tp: Any, choices: tuple | None) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "one of " + ", ".join(choices) if choices else "a string"
    return (
        ":".join("N" * len(typing.get_args(tp)))
        + " integers such as "
        + ":".join(str(2 ** (k + 1)) for k in range(len(typing.get_args(tp))))
    )


def _flag_type(tp: Any, name: str, choices: tuple | None) -> tuple[Callable[[str], Any], str]:
    """``(parse, metavar)`` of a field of type ``tp``: scalars, ``X | None`` and tuples."""
    args = typing.get_args(tp)
    optional = (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        (tp,) = [a for a in args if a is not type(None)]
    origin, inner = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(inner) == 2 and inner[1] is Ellipsis:
        item = _scalar(inner[0], name, choices)
        expected = f"comma-separated items, each {_describe(inner[0], choices)}"
        metavar = "A,B,..."
    else:
        item = _scalar(tp, name, choices)
        expected = _describe(tp, choices)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
    if optional:
        expected += ", or none"

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            if item is not None and origin is tuple and len(inner) == 2 and inner[1] is Ellipsis:
                values = tuple(item(part) for part in text.split(","))
                return values
            return item(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse, metavar


def _fixed_tuple(tp: Any) -> bool:
    """``tuple[int, int]`` and the like (not ``tuple[int, ...]``), inside ``| None`` too."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return typing.get_origin(tp) is tuple and Ellipsis not in typing.get_args(tp)


def _show(value: Any, tp: Any) -> str:
    """``value`` as its flag spells it: ``none``, ``16,32``, ``2:4``, ``2:4,4:8``."""
    if value is None:
        return "none"
    if isinstance(value, tuple) and _fixed_tuple(tp):
        return ":".join(map(str, value))
    if isinstance(value, tuple):
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> list[str]:
    """One flag per field of the dataclass ``config_cls``; returns the field names.

    A flag that is not given sets no attribute, so ``--train-subset none`` (``None``) can
    override a config's value.

    The help is the field's ``metadata["help"]`` and its default; ``metadata["choices"]``
    restricts a ``str`` field or every item of a ``tuple[str, ...]``; ``metadata["aliases"]``
    adds flag spellings (e.g. ``--seeds`` for ``num_seeds``).
    """
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(
        f"config ({config_cls.__module__}.{config_cls.__name__}; defaults of the full run)"
    )
    names = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{config_cls.__name__}.{f.name} has no help: declare it with field()")
        flags = [_flag(f.name), *meta.get("aliases", ())]
        tp = hints[f.name]
        text = f"{meta['help']} (default {_show(f.default, tp)})".replace("%", "%%")
        if tp is bool:
            group.add_argument(
                *flags,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            choices = meta.get("choices")
            parse, metavar = _flag_type(tp, f.name, None if choices is None else tuple(choices))
            group.add_argument(
                *flags,
                dest=f.name,
                type=parse,
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=text,
            )
        names.append(f.name)
    return names


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(
    *, prog: str, description: str, config_cls: type, out: str, quick: str
) -> argparse.ArgumentParser:
    """The parser of an experiment: ``--quick``, ``--out``, ``--mesh``, ``--restart``,
    ``--num-processes`` and one flag per config field (:func:`add_config_flags`). Errors are
    reported in one line."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--out", default=out, help="output directory, created and checked for writing first"
    )
    parser.add_argument("--mesh", default=None, help=MESH_HELP.format(axes=", ".join(MESH_AXES)))
    parser.add_argument("--restart", action="store_true", help=RESTART_HELP)
    parser.add_argument(
        "--num-processes", type=positive_int, default=1, metavar="N", help=PROCESSES_HELP
    )
    parser.set_defaults(_config_fields=add_config_flags(parser, config_cls))
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    """Exit with status 2 and one line on stderr (no usage block, no traceback)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(
    argv: list[str] | None,
    *,
    parser: argparse.ArgumentParser,
    configs: tuple[Any, Any],
    train: str,
    one_device: bool = False,
) -> int:
    """Parse ``argv``, build the config, check it, ``--mesh`` and ``--out``, then run.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).
      parser: from :func:`build_parser`.
      configs: the modules ``(default, quick)``, each with ``get_config()``.
      train: the module with ``run(config, out, *, mesh, restart) -> results`` and
        ``format_table(results)``, imported only once every check has passed (it imports jax).
      one_device: the experiment trains on one device (its own loop): ``--mesh`` with more
        than one device and ``--num-processes`` are refused.

    Every check runs before jax is imported or any data is loaded (the device count of
    ``--mesh`` in a multi-process run: after ``jax.distributed`` started); a failed one exits
    with status 2 and one line on stderr. ``--out`` holding a run of another config is refused
    here (:func:`experiments._common.check_resume`); ``--num-processes N`` hands over to
    :func:`experiments._launch.spawn`.
    """
    args = parser.parse_args(argv)
    default, quick = configs
    config = (quick if args.quick else default).get_config()
    # a flag that was not given leaves no attribute (argparse.SUPPRESS): the config decides
    changes = {name: getattr(args, name) for name in args._config_fields if hasattr(args, name)}
    try:
        config = config.replace(**changes).validate()
    except (TypeError, ValueError) as err:
        _fail(parser, str(err))
    if getattr(config, "data_dir", None) is not None and not os.path.isdir(config.data_dir):
        _fail(parser, f"data_dir: {config.data_dir!r} is not a directory")
    distributed = args.num_processes > 1 or bool(os.environ.get(launch.NUM_PROCESSES))
    if one_device and (
        distributed
        or (args.mesh is not None and math.prod(_mesh_or_fail(parser, args.mesh).values()) > 1)
    ):
        _fail(parser, f"{parser.prog} trains on one device: leave --mesh and --num-processes out")
    if args.mesh is not None:
        try:  # the devices are counted here only in one process (jax.distributed starts first)
            parse_mesh(args.mesh, num_devices=math.inf if distributed else None)
        except ValueError as err:
            _fail(parser, str(err))
    try:
        out = check_out(args.out)
        finished = False if args.restart else check_resume(config, out)
    except ValueError as err:
        _fail(parser, str(err))
    if args.num_processes > 1:
        if os.environ.get(launch.PROCESS_ID):
            _fail(parser, "--num-processes: this process was already started by a launcher")
        return launch.spawn(args.num_processes, _child_argv(argv), module=parser.prog.split()[-1])
    if distributed:
        try:
            launch.join()
            if args.mesh is not None:
                parse_mesh(args.mesh)
        except (TimeoutError, RuntimeError, ValueError) as err:
            _fail(parser, str(err))
    if finished and os.environ.get(launch.PROCESS_ID, "0") == "0":
        print(
            f"{out} holds the finished run of this config: not rerun (--restart starts over)",
            file=sys.stderr,
        )
    module = importlib.import_module(train)
    return _run_and_report(
        config,
        out,
        functools.partial(module.run, mesh=args.mesh, restart=args.restart),
        module.format_table,
    )


def _mesh_or_fail(parser: argparse.ArgumentParser, text: str) -> dict[str, int]:
    try:
        return parse_mesh(text, num_devices=math.inf)
    except ValueError as err:
        _fail(parser, str(err))


def _child_argv(argv: list[str] | None) -> list[str]:
    """``argv`` without ``--num-processes N`` (the children's command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def command(
    name: str, *, description: str, quick: str | None = None, one_device: bool = False
) -> tuple[Callable[[], argparse.ArgumentParser], Callable[[list[str] | None], int]]:
    """``(build_parser, main)`` of ``python -m experiments.<name>``, by the layout every
    experiment shares: its parser (:func:`build_parser` with ``experiments.<name>.configs.base``'s
    ``Config``, output ``runs/<name>``) and its entry point (:func:`main` with the
    ``configs.default`` and ``configs.quick`` modules and ``experiments.<name>.train``).

    Args:
      name: the experiment's package under ``experiments``.
      description: the ``--help`` description.
      quick: what ``--quick`` runs, after the path of ``configs/quick.py`` (none: a few minutes
        on 2 CPU cores, the same story as the full run).
      one_device: as :func:`main`'s.
    """
    package = f"experiments.{name}.configs"
    config_cls = importlib.import_module(f"{package}.base").Config
    configs = tuple(importlib.import_module(f"{package}.{kind}") for kind in ("default", "quick"))
    quick_help = f"the quick config (experiments/{name}/configs/quick.py): " + (
        quick or "a few minutes on 2 CPU cores, the same story as the full run"
    )

    def build() -> argparse.ArgumentParser:
        return build_parser(
            prog=f"python -m experiments.{name}",
            description=description,
            config_cls=config_cls,
            out=f"runs/{name}",
            quick=quick_help,
        )

    def run_main(argv: list[str] | None = None) -> int:
        return main(
            argv,
            parser=build(),
            configs=configs,
            train=f"experiments.{name}.train",
            one_device=one_device,
        )

    return build, run_main


def _run_and_report(config, out, run, format_table) -> int:
    start = time.perf_counter()
    results = run(config, out)
    if os.environ.get(launch.PROCESS_ID, "0") == "0":  # process 0 reports
        print(format_table(results))
        print(f"wall time: {time.perf_counter() - start:.1f} s; results in {out}")
        sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------------
# argparse types and glue for hand-written command lines (experiments.surrogate)
# --------------------------------------------------------------------------------------------


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
    """``--out`` (default ``out``), ``--data-dir`` and ``--no-progress``; :func:`check_dirs`
    checks the first two."""
    parser.add_argument("--out", default=out, help="output directory")
    parser.add_argument(
        "--data-dir", default=None, help="data root (default $JAXCOMPRESS_DATA_DIR)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress output")


def check_dirs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects a ``--data-dir`` that is not a directory and an ``--out`` that is a file
    (:func:`run_config` checks that ``--out`` can be written, after the config)."""
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
    """Applies ``changes`` to ``config``, validates it (a failure is reported through
    ``parser.error``, exit status 2, before anything runs), checks that ``out`` can be written
    (created if missing; one line, status 2), runs it and prints the table."""
    config = config.replace(**changes)
    try:
        config.validate()
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    try:
        out = check_out(out)
    except ValueError as err:
        _fail(parser, str(err))
    return _run_and_report(config, out, run, format_table)
