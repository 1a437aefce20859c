"""Global magnitude masks on params sharded over the 8 emulated devices (see conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress.masks as jm

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")


def _params_and_specs():
    rng = np.random.default_rng(0)
    shapes_specs = {
        "conv1": ((3, 3, 8, 64), P(None, None, None, "d")),
        "conv2": ((3, 3, 64, 64), P(None, None, "d", None)),
        "fc": ((512, 96), P("d", None)),
        "head": ((96, 10), P()),  # replicated leaf mixed in
    }
    params, specs = {}, {}
    for name, (shape, spec) in shapes_specs.items():
        w = np.round(rng.normal(size=shape), 2)  # rounding creates ties across shards
        params[name] = {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.zeros(shape[-1])}
        specs[name] = {"kernel": spec, "bias": P()}
    return params, specs


def _naive_global(params, sparsity):
    """Baseline: concatenate every |w| and sort (gathers the whole model on each device)."""
    leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if jm.prunable(p, x)]
    flat = jnp.concatenate([jnp.abs(x).reshape(-1) for x in leaves])
    n = flat.size
    k = jnp.int32(n) - jnp.floor(n * sparsity).astype(jnp.int32)
    thr = jnp.sort(flat)[n - jnp.maximum(k, 1)]
    return jax.tree.map(lambda x: (jnp.abs(x) >= thr) if x.ndim >= 2 else None, params)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_global_masks_match_and_keep_shardings(axis_type):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    params, specs = _params_and_specs()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    sharded = jax.device_put(params, shardings)
    f = jax.jit(lambda p, s: jm.magnitude(p, s, scope="global"))
    n = sum(x["kernel"].size for x in params.values())
    for s in (0.5, 0.9):
        got = f(sharded, jnp.float32(s))
        want = jm.magnitude(params, s, scope="global")
        assert sum(int(m.sum()) for m in jax.tree.leaves(got)) == jm.keep_count(n, s)
        for name in params:
            np.testing.assert_array_equal(
                np.asarray(got[name]["kernel"]), np.asarray(want[name]["kernel"])
            )
            assert got[name]["kernel"].sharding.is_equivalent_to(
                sharded[name]["kernel"].sharding, 4
            ), name
            assert got[name]["bias"] is None
    layer = jax.jit(lambda p: jm.magnitude(p, 0.7, scope="layer"))(sharded)
    for name in params:
        assert layer[name]["kernel"].sharding.is_equivalent_to(sharded[name]["kernel"].sharding, 4)
        assert int(layer[name]["kernel"].sum()) == jm.keep_count(params[name]["kernel"].size, 0.7)


def test_shard_local_threshold_uses_far_less_temp_memory_than_concat_sort():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    params, specs = _params_and_specs()
    params = {k: v for k, v in params.items() if k != "head"}  # all kernels sharded
    specs = {k: v for k, v in specs.items() if k != "head"}
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    s = jnp.float32(0.8)
    local = jax.jit(lambda p, s: jm.magnitude(p, s)).lower(sharded, s).compile()
    naive = jax.jit(_naive_global).lower(sharded, s).compile()
    mem_local, mem_naive = local.memory_analysis(), naive.memory_analysis()
    n_bytes = 4 * sum(x["kernel"].size for x in params.values())
    # Shard-local: a few int32 copies of the local shard (n/8 each); no gather.
    assert mem_local.temp_size_in_bytes <= 3 * n_bytes // 8
    assert mem_naive.temp_size_in_bytes >= n_bytes  # the whole model on each device
    assert mem_local.temp_size_in_bytes * 4 <= mem_naive.temp_size_in_bytes
    assert "all-gather" not in local.as_text()
