"""Shared test utilities: tree comparison, trace and compile counting, sharded param builders,
small real data, subprocess helpers for resume and multi-process tests, and the tiny configs
and resume harness of the experiment tests.

Import as ``from _util import ...`` (pytest puts ``tests/`` on ``sys.path``; there is no
package ``__init__``). Nothing here uses private JAX APIs: traces are counted with a Python
counter inside the function given to ``jax.jit``, compilations with a ``jax.monitoring``
listener.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.masks import path_str

__all__ = [
    "ROOT",
    "TINY",
    "assert_killed_run_resumes",
    "CompileCounter",
    "CountingJit",
    "assert_trees_allclose",
    "assert_trees_equal",
    "bits",
    "cli_flags",
    "count_compiles",
    "digits",
    "fit_calls",
    "fit_cram",
    "free_port",
    "jit_counting",
    "kill_when",
    "leaf_paths",
    "mesh_1d",
    "preempted_at",
    "records",
    "resume_harness",
    "same_structure",
    "shard_rows",
    "subprocess_env",
    "tiny_config",
    "without_timing",
]

#: The repository root (``experiments`` is importable from there).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- trees


def leaf_paths(tree: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    """``path_str`` of every leaf, in flatten order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def same_structure(a: Any, b: Any, *, dtypes: bool = True) -> None:
    """Assert ``a`` and ``b`` have the same leaf paths, shapes and (optionally) dtypes.

    The message names the first differing leaf.
    """
    la = jax.tree_util.tree_flatten_with_path(a)[0]
    lb = jax.tree_util.tree_flatten_with_path(b)[0]
    pa, pb = [path_str(p) for p, _ in la], [path_str(p) for p, _ in lb]
    assert pa == pb, f"leaf paths differ: {pa} != {pb}"
    for name, (_, x), (_, y) in zip(pa, la, lb, strict=True):
        assert np.shape(x) == np.shape(y), f"{name}: shape {np.shape(x)} != {np.shape(y)}"
        if dtypes:
            dx, dy = jnp.result_type(x), jnp.result_type(y)
            assert dx == dy, f"{name}: dtype {dx} != {dy}"


def assert_trees_equal(a: Any, b: Any) -> None:
    """Bit-exact equality of two trees of arrays (NaNs equal), naming the first difference."""
    same_structure(a, b)
    for (p, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path_str(p))


def assert_trees_allclose(a: Any, b: Any, *, low_precision_tol: float = 1e-2, **kw: Any) -> None:
    """``np.testing.assert_allclose`` leaf by leaf (compared in float32), naming the leaf.

    Leaves where either side is a 16-bit float (bf16/f16 round at ~1e-3 and 1e-2) are
    compared with ``rtol = atol = low_precision_tol`` instead of ``kw``.
    """
    same_structure(a, b, dtypes=False)
    for (p, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        low = any(
            jnp.issubdtype(d, jnp.floating) and jnp.dtype(d).itemsize <= 2
            for d in (jnp.result_type(x), jnp.result_type(y))
        )
        tol = {"rtol": low_precision_tol, "atol": low_precision_tol} if low else kw
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=path_str(p), **tol
        )


# ----------------------------------------------------------------------------- compilation


@dataclasses.dataclass
class CountingJit:
    """``jax.jit(fn)`` that counts how often ``fn`` is traced (a Python counter in ``fn``)."""

    fn: Callable[..., Any]
    jit_kwargs: dict = dataclasses.field(default_factory=dict)
    traces: int = 0

    def __post_init__(self):
        @functools.wraps(self.fn)
        def traced(*args, **kwargs):
            self.traces += 1
            return self.fn(*args, **kwargs)

        self._jitted = jax.jit(traced, **self.jit_kwargs)

    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)


def jit_counting(fn: Callable[..., Any] | None = None, **jit_kwargs: Any) -> Any:
    """``jax.jit`` that counts traces: ``step = jit_counting(f); step(x); step.traces == 1``.

    Usable as a decorator, with or without ``jax.jit`` keyword arguments.
    """
    if fn is None:
        return lambda f: CountingJit(f, jit_kwargs)
    return CountingJit(fn, jit_kwargs)


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_ACTIVE: list[CompileCounter] = []


@dataclasses.dataclass
class CompileCounter:
    """XLA backend compilations seen while the :func:`count_compiles` block is open."""

    compiles: int = 0


def _on_event(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _COMPILE_EVENT:
        for counter in _ACTIVE:
            counter.compiles += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[Any]:
    """The module of ``experiments/benchmarks/<name>.py``, imported with that folder on
    ``sys.path`` (the scripts import their helpers, e.g. ``_results``, by name), which is
    removed again afterwards."""
    import importlib

    folder = os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks")
    )
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCounter]:
    """Count XLA compilations (``jax.monitoring``), including recompiles that reuse a trace
    (e.g. a changed input sharding or committedness), which a trace counter does not see."""
    counter = CompileCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


# ----------------------------------------------------------------------------- sharding


def mesh_1d(name: str = "d") -> Mesh:
    """A 1-D mesh over every device (8 emulated CPU devices under ``tests/conftest.py``)."""
    return Mesh(np.array(jax.devices()), (name,))


def shard_rows(tree: Any, mesh: Mesh | None = None) -> Any:
    """Put every leaf on ``mesh``: axis 0 split over the mesh's first axis when it divides
    evenly, replicated otherwise. Returns the tree of sharded arrays."""
    mesh = mesh_1d() if mesh is None else mesh
    axis = mesh.axis_names[0]
    size = mesh.shape[axis]

    def put(x):
        x = jnp.asarray(x)
        spec = P(axis) if x.ndim >= 1 and x.shape[0] % size == 0 and x.shape[0] else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------- data and runs


def digits(n_train: int, n_eval: int = 0, *, image: bool = False) -> tuple[Any, Any]:
    """scikit-learn's 8x8 digits in [0, 1]: ``((x, y), (x_eval, y_eval))``, the first
    ``n_train`` images and the next ``n_eval``; flat ``(N, 64)`` or ``(N, 8, 8, 1)`` with
    ``image``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    x = x[..., None] if image else x.reshape(-1, 64)
    y = d.target.astype(np.int32)
    end = n_train + n_eval
    return (x[:n_train], y[:n_train]), (x[n_train:end], y[n_train:end])


def bits(tree: Any) -> list[bytes]:
    """The raw bytes of every leaf (PRNG keys by their key data): equal lists = bit-equal."""

    def raw(a: Any) -> bytes:
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.asarray(a).tobytes()

    return [raw(a) for a in jax.tree.leaves(tree)]


def records(history: Any) -> list[dict[str, Any]]:
    """A ``fit`` history's per-epoch records without their wall-clock ``seconds``."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history.epochs]


_TIMING = ("seconds", "timing", "environment", "loadavg")


def without_timing(obj: Any) -> Any:
    """``obj`` (a results dict) without the wall-clock entries (keys containing ``seconds``,
    ``timing``, ``environment``): what two runs of one config must share bit for bit."""
    if isinstance(obj, dict):
        return {
            k: without_timing(v) for k, v in obj.items() if not any(t in str(k) for t in _TIMING)
        }
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def fit_cram(model: Any, train_ds: Any, *, lr: float, epochs: int, batch_size: int, **kw: Any):
    """``jaxcompress.train.fit`` of ``model`` with CrAM+ (SGD with momentum 0.9 at ``lr``,
    ``rho=0.05``, sparsities 0.5/0.7: masks and a PRNG key in the state), quietly; ``kw`` go
    to ``fit`` (eval data, mesh, checkpointing, ...). Returns the ``History``."""
    import optax

    from jaxcompress import optim, train

    tx = optim.cram(optax.sgd(lr, momentum=0.9), rho=0.05, sparsities=(0.5, 0.7))
    return train.fit(
        model,
        tx,
        train_ds,
        epochs=epochs,
        batch_size=batch_size,
        pass_grad_fn=True,
        progress=False,
        **kw,
    )


# ----------------------------------------------------------------------------- subprocesses


def cli_flags(fields: dict[str, Any]) -> list[str]:
    """An experiment's command-line flags for config ``fields`` (``experiments.cli``'s
    spelling: ``--train-subset 320``, ``--widths 4,8``, ``--nm-patterns 2:4``,
    ``--no-progress``)."""

    def show(value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(
                ":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value
            )
        return "none" if value is None else str(value)

    argv: list[str] = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, show(value)]
    return argv


def free_port() -> int:
    """A TCP port nobody listens on (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with the repository on ``PYTHONPATH`` (and ``extra`` set)."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def kill_when(
    cmd: Sequence[str], pattern: str, *, env: dict[str, str] | None = None, timeout: float = 600
) -> int:
    """Run ``cmd`` and ``kill -9`` it as soon as a file matching the glob ``pattern`` exists
    (e.g. a committed checkpoint step); returns its exit status (``-SIGKILL`` when killed, or
    its own status if it ended first). The process is always reaped."""
    proc = subprocess.Popen(
        list(cmd), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if glob.glob(pattern):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            if proc.poll() is None:
                proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.stderr.write(err.decode(errors="replace")[-3000:])
    return proc.returncode


# ----------------------------------------------------------------------------- experiments


@contextlib.contextmanager
def preempted_at(stage: str) -> Iterator[None]:
    """Within the block an experiment stops (``KeyboardInterrupt``) when stage ``stage`` has
    run but before it is marked finished (``experiments._common.Run.finish_stage``): a
    preemption at the worst moment, after the work and before its record."""
    from experiments import _common

    finish = _common.Run.finish_stage

    def preempted(self, name, record):
        if name == stage:
            raise KeyboardInterrupt
        return finish(self, name, record)

    _common.Run.finish_stage = preempted
    try:
        yield
    finally:
        _common.Run.finish_stage = finish


def fit_calls(monkeypatch: Any) -> list[dict[str, Any]]:
    """Record every ``jaxcompress.train.fit`` call: its ``mesh``, ``param_sharding`` and the
    most devices any array of the trained model lives on."""
    from flax import nnx

    from jaxcompress import train

    calls: list[dict[str, Any]] = []
    fit = train.fit

    def spy(model, *args, **kwargs):
        history = fit(model, *args, **kwargs)
        devices = max(len(a.sharding.device_set) for a in jax.tree.leaves(nnx.state(model)))
        calls.append(
            {"mesh": kwargs.get("mesh"), "rule": kwargs.get("param_sharding"), "devices": devices}
        )
        return history

    monkeypatch.setattr(train, "fit", spy)
    return calls


#: What every tiny experiment run shares: scikit-learn's digits, learning rate 0.05, batches of
#: 32, no progress bar (fields of the image experiments' configs, spelled as ``replace`` and
#: :func:`cli_flags` take them).
TINY: dict[str, Any] = {
    "dataset": "digits",
    "learning_rate": 0.05,
    "batch_size": 32,
    "progress": False,
}


def tiny_config(quick: Any, **fields: Any) -> Any:
    """The config of an experiment's ``configs.quick`` module with :data:`TINY` and then
    ``fields`` replaced."""
    return quick.get_config().replace(**{**TINY, **fields})


def resume_harness(quick: Any, run: Callable[..., Any], fields: dict[str, Any]):
    """``(config, flags, uninterrupted)`` for an experiment's resume tests:
    ``config(**changes)`` is :func:`tiny_config` of ``fields`` and then ``changes``,
    ``flags(**changes)`` its command line (``--quick`` and :func:`cli_flags`);
    ``uninterrupted`` is a module-scoped fixture, ``(results, out)`` of ``run(config(), out)``
    to the end in a fresh folder (assign it to the module-level name ``uninterrupted``)."""

    def config(**changes: Any) -> Any:
        return tiny_config(quick, **{**fields, **changes})

    def flags(**changes: Any) -> list[str]:
        return ["--quick", *cli_flags({**TINY, **fields, **changes})]

    @pytest.fixture(scope="module")
    def uninterrupted(tmp_path_factory):
        out = tmp_path_factory.mktemp(run.__module__.split(".")[-2] + "_uninterrupted")
        return run(config(), out), out

    return config, flags, uninterrupted


def assert_killed_run_resumes(
    experiment: str,
    argv: Sequence[str],
    out: Any,
    checkpoint: str,
    reference: dict[str, Any],
    *,
    timeout: float = 900,
) -> list[str]:
    """Run ``python -m experiments.<experiment> *argv --out out``, ``kill -9`` it once its
    ``checkpoint`` (``"<stage>/<step>"`` under ``out/checkpoints``) is committed, check that it
    left no ``results.json``, rerun it to the end and check that its ``results.json`` equals
    ``reference`` (the results of an uninterrupted run) but for timings. Returns the command."""
    cmd = [sys.executable, "-m", f"experiments.{experiment}", *argv, "--out", str(out)]
    step = os.path.join(out, "checkpoints", checkpoint, "commit_success.txt")
    assert kill_when(cmd, step, env=subprocess_env()) == -signal.SIGKILL
    results = os.path.join(out, "results.json")
    assert not os.path.exists(results)
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    with open(results) as handle:
        resumed = json.load(handle)
    assert without_timing(resumed) == without_timing(json.loads(json.dumps(reference)))
    return cmd
