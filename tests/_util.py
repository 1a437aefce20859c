"""Shared test utilities: tree comparison, trace and compile counting, sharded param builders.

Import as ``from _util import ...`` (pytest puts ``tests/`` on ``sys.path``; there is no
package ``__init__``). Nothing here uses private JAX APIs: traces are counted with a Python
counter inside the function given to ``jax.jit``, compilations with a ``jax.monitoring``
listener.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.masks import path_str

__all__ = [
    "CompileCounter",
    "CountingJit",
    "assert_trees_allclose",
    "assert_trees_equal",
    "count_compiles",
    "jit_counting",
    "leaf_paths",
    "mesh_1d",
    "same_structure",
    "shard_rows",
]


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
