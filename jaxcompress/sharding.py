"""Meshes, parameter sharding rules and multi-host start-up for the training loop.

:func:`jaxcompress.train.fit` and the step builders run data-parallel or FSDP through GSPMD:
every array gets a ``NamedSharding`` on one mesh, the jitted step has explicit in/out
shardings (one compile per input shape), and XLA inserts the collectives. Most users only pass
``mesh="data=8"`` (and ``param_sharding="fsdp"``) to ``fit``; this module is for the rest.

* **Mesh** (:func:`make_mesh`): from ``"data=4,fsdp=2"`` (axis names ``data`` and ``fsdp``)
  with ``AxisType.Auto`` axes. Any ``jax.sharding.Mesh`` with Auto axes is accepted; Explicit
  axes (the default of ``jax.make_mesh`` in recent JAX) are refused with the fix, because
  Flax layers do not yet pass the ``out_sharding`` that Explicit axes require.
* **Batch**: split along its first dimension over the *data axes* (default: every mesh axis,
  so each device computes a distinct slice; FSDP is data-parallel too).
* **Params** (:func:`param_specs`): ``"replicated"`` (data parallel), ``"fsdp"`` (ZeRO-3 style:
  each leaf with at least ``min_size`` (1024) elements is split along its largest dimension
  divisible by the FSDP axis size; the FSDP axis is ``fsdp`` when the mesh has one, else the
  data axes), or an explicit tree of ``PartitionSpec`` (``None`` = replicated) checked against
  the mesh, e.g. ``nnx.get_partition_spec(params)``.
* **Optimizer state and** ``rest``: a leaf whose key path ends with a param's key path and has
  that param's shape (``mu``, ``nu``, masks, ...) follows the param; every other leaf (counts,
  PRNG keys, scalars) is replicated, or, under ``"fsdp"``, sharded by the same size rule. So
  masks and the state of every wrapped transform follow their params.
* **Multi-host** (:func:`initialize`, :func:`process_rows`, :func:`is_primary`): one process
  per host runs the same program (JAX's multi-controller runtime). Every process computes the
  same global batch indices and reads only the rows its devices hold; ``fit`` assembles the
  global ``jax.Array`` with ``jax.make_array_from_process_local_data``.

See ``docs/scaling.md`` for the launch commands and what "equal to one device" means.
"""

from __future__ import annotations

from jaxcompress._sharding import initialize, is_primary, make_mesh, param_specs, process_rows

__all__ = ["initialize", "is_primary", "make_mesh", "param_specs", "process_rows"]
