"""Placement of optimizer-state leaves that do not mirror a param.

A state built eagerly by ``init`` holds scalars (step counters, PRNG keys, running values)
created by ``jnp.zeros(())`` and the like: uncommitted arrays on the default device. When the
params are sharded over a mesh, the first jitted ``update`` returns those leaves replicated on
the mesh, so a second call sees inputs placed differently from the first and compiles again.
:func:`replicate_on_params_mesh` places them as the jitted update will return them,
``NamedSharding(mesh, PartitionSpec())``, so every step reuses one executable.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["params_mesh", "replicate_on_params_mesh"]


def _concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def params_mesh(params: Any) -> Mesh | None:
    """The mesh of the first param leaf with a ``NamedSharding``, or ``None``.

    ``None`` when no leaf is a concrete array on a ``NamedSharding`` (single-device params,
    NumPy params, or tracers under ``jit``/``jax.eval_shape``, whose placement is the jit's).
    """
    for leaf in jax.tree.leaves(params):
        if _concrete(leaf) and isinstance(leaf.sharding, NamedSharding):
            mesh = leaf.sharding.mesh
            return mesh if isinstance(mesh, Mesh) else None
    return None


def replicate_on_params_mesh(state: Any, params: Any) -> Any:
    """``state`` with its leaves that do not mirror a param replicated on the params' mesh.

    A leaf is moved when it is a concrete array that is uncommitted or not on the mesh's
    devices, and whose shape is not the shape of any param (scalars, PRNG key data, per-group
    vectors). Leaves that mirror a param keep the placement ``init`` gave them (normally the
    param's sharding). Without a param on a ``NamedSharding`` (see :func:`params_mesh`),
    ``state`` is returned unchanged, so single-device code, ``init`` under ``jit`` and
    ``jax.eval_shape(tx.init, params)`` behave as before.
    """
    mesh = params_mesh(params)
    if mesh is None:
        return state
    param_shapes = {tuple(p.shape) for p in jax.tree.leaves(params) if hasattr(p, "shape")}
    devices = set(mesh.devices.flat)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x: Any) -> Any:
        if not _concrete(x) or (x.committed and x.sharding.device_set == devices):
            return x
        if x.ndim > 0 and tuple(x.shape) in param_shapes:
            return x
        if replicated.is_fully_addressable:
            return jax.device_put(x, replicated)
        # A mesh over several processes: every process builds the same small value (init is
        # deterministic) and supplies it for its own devices.
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            placed = jax.make_array_from_callback(data.shape, replicated, lambda i: data[i])
            return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda i: host[i])

    return jax.tree.map(place, state)
