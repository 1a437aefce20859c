"""Tests for jaxcompress.checkpoint: bit-exact round trips, resumption and structure guards."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.checkpoint import Checkpointer, structure_fingerprint
from jaxcompress.optim._masked import FixedMaskState, fixed_mask


def _params(seed=0, width=8):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(16, width)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(width,)), jnp.float32),
        },
        "out": {"kernel": jnp.asarray(rng.normal(size=(width, 4)), jnp.float32)},
    }


def _masks(params, seed=0):
    rng = np.random.default_rng(seed + 100)
    return {
        "dense": {"kernel": rng.random(params["dense"]["kernel"].shape) < 0.5, "bias": None},
        "out": {"kernel": rng.random(params["out"]["kernel"].shape) < 0.5},
    }


def _data(seed=0):
    rng = np.random.default_rng(seed + 7)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    return x, y


def _make_step(tx, x, y):
    def loss(p, key):
        keep = jax.random.bernoulli(key, 0.8, x.shape)  # dropout on the inputs
        h = jnp.where(keep, x, 0.0) / 0.8 @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

    @jax.jit
    def step(params, opt_state, key):
        key, sub = jax.random.split(key)
        grads = jax.grad(loss)(params, sub)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    return step


def _assert_trees_bit_equal(a, b):
    la, ta = jax.tree.flatten(a, is_leaf=lambda v: v is None)
    lb, tb = jax.tree.flatten(b, is_leaf=lambda v: v is None)
    assert ta == tb
    for u, v in zip(la, lb, strict=True):
        if u is None:
            assert v is None
            continue
        assert u.dtype == v.dtype
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(u)) == str(jax.random.key_impl(v))
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape
        assert u.tobytes() == v.tobytes()


def _state(seed=0, key=None):
    params = _params(seed)
    tx = fixed_mask(optax.adamw(1e-2, weight_decay=0.1), _masks(params))
    opt_state = tx.init(params)
    step = _make_step(tx, *_data())
    key = jax.random.key(seed) if key is None else key
    for _ in range(3):
        params, opt_state, key = step(params, opt_state, key)
    return params, opt_state, key


def test_round_trip_is_bit_exact_with_masks_and_typed_key(tmp_path):
    params, opt_state, key = _state()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, params=params, opt_state=opt_state, key=key, extra={"lr": 0.01, "tag": "a"})
        target = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state, "key": key})
        restored = ckpt.restore(target=target)
    assert restored["step"] == 3
    assert restored["extra"] == {"lr": 0.01, "tag": "a"}
    assert isinstance(restored["opt_state"], FixedMaskState)
    assert restored["opt_state"].masks["dense"]["bias"] is None
    assert restored["key"].dtype == key.dtype
    _assert_trees_bit_equal(restored["params"], params)
    _assert_trees_bit_equal(restored["opt_state"], opt_state)
    _assert_trees_bit_equal(restored["key"], key)


def test_round_trip_raw_uint32_key_and_rbg_key(tmp_path):
    raw = jax.random.PRNGKey(5)
    rbg = jax.random.key(5, impl="rbg")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, key={"raw": raw, "rbg": rbg}, params={"w": jnp.arange(3.0)})
        restored = ckpt.restore(target={"key": jax.eval_shape(lambda: {"raw": raw, "rbg": rbg})})
    assert restored["key"]["raw"].dtype == jnp.uint32
    _assert_trees_bit_equal(restored["key"], {"raw": raw, "rbg": rbg})
    assert restored["extra"] is None
    # Restored keys are usable and draw the same numbers.
    np.testing.assert_array_equal(
        jax.random.normal(restored["key"]["rbg"], (4,)), jax.random.normal(rbg, (4,))
    )


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    total = 20
    params0 = _params(seed=1)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, 0.9))
    tx = fixed_mask(inner, _masks(params0))
    step = _make_step(tx, *_data(seed=1))

    params, opt_state, key = params0, tx.init(params0), jax.random.key(42)
    for _ in range(total):
        params, opt_state, key = step(params, opt_state, key)
    uninterrupted = (params, opt_state, key)

    params, opt_state, key = params0, tx.init(params0), jax.random.key(42)
    with Checkpointer(tmp_path / "run") as ckpt:
        for i in range(total // 2):
            params, opt_state, key = step(params, opt_state, key)
            ckpt.save(i + 1, params=params, opt_state=opt_state, key=key)
    del params, opt_state, key

    # A fresh process would only know the shapes: build the target from scratch.
    fresh_params = _params(seed=99)
    target = jax.eval_shape(
        lambda: {
            "params": fresh_params,
            "opt_state": tx.init(fresh_params),
            "key": jax.random.key(0),
        }
    )
    with Checkpointer(tmp_path / "run", create=False) as ckpt:
        assert ckpt.latest_step() == total // 2
        assert ckpt.all_steps() == [8, 9, 10]  # max_to_keep=3
        restored = ckpt.restore(target=target)
    params, opt_state, key = restored["params"], restored["opt_state"], restored["key"]
    for _ in range(total - restored["step"]):
        params, opt_state, key = step(params, opt_state, key)
    _assert_trees_bit_equal((params, opt_state, key), uninterrupted)


def test_keep_last_n(tmp_path):
    params = _params()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        for s in (1, 5, 7, 12):
            ckpt.save(s, params=params)
        assert ckpt.all_steps() == [7, 12]
        assert ckpt.latest_step() == 12
        restored = ckpt.restore(7, target={"params": params})
    _assert_trees_bit_equal(restored["params"], params)
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for s in range(13, 18):
            ckpt.save(s, params=params)
        assert ckpt.all_steps() == [7, 12, 13, 14, 15, 16, 17]


def test_refuses_to_save_a_different_structure(tmp_path):
    params, opt_state, key = _state()
    directory = tmp_path / "exp"
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, key=key)
    before = sorted(os.listdir(directory))

    wider = _params(width=9)
    with Checkpointer(directory) as ckpt:
        with pytest.raises(ValueError, match=r"exp.*\['dense'\]\['bias'\].*\(8,\).*\(9,\)"):
            ckpt.save(2, params=wider, opt_state=opt_state, key=key)
        with pytest.raises(ValueError, match="opt_state"):
            ckpt.save(2, params=params, key=key)
        # A mask that is None in one run and an array in another is a structure difference.
        other_masks = {**_masks(params), "out": {"kernel": None}}
        other_state = fixed_mask(optax.adamw(1e-2), other_masks).init(params)
        with pytest.raises(ValueError, match=r"masks.*\['out'\]\['kernel'\]"):
            ckpt.save(2, params=params, opt_state=other_state, key=key)
        with pytest.raises(ValueError, match="float32.*float16|float16.*float32"):
            ckpt.save(
                2,
                params=jax.tree.map(lambda a: a.astype(jnp.float16), params),
                opt_state=opt_state,
                key=key,
            )
        # Nothing was written or lost; the original step still restores.
        assert sorted(os.listdir(directory)) == before
        assert ckpt.all_steps() == [1]
        target = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state, "key": key})
        _assert_trees_bit_equal(ckpt.restore(target=target)["params"], params)
        # The same structure is accepted.
        ckpt.save(2, params=params, opt_state=opt_state, key=key)
        assert ckpt.all_steps() == [1, 2]


def test_refuses_a_directory_of_foreign_checkpoints(tmp_path):
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": jnp.ones(2)})))
        manager.wait_until_finished()
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="not written by"):
            ckpt.save(1, params={"a": jnp.ones(2)})
        assert ckpt.all_steps() == [0]


def test_restore_into_mismatched_target_names_the_path(tmp_path):
    params, opt_state, key = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, params=params, opt_state=opt_state)
        wider = jax.eval_shape(lambda: _params(width=9))
        with pytest.raises(ValueError, match=r"params.*\['dense'\]\['bias'\].*\(8,\).*\(9,\)"):
            ckpt.restore(target={"params": wider})
        renamed = {"dense": params["dense"], "head": params["out"]}
        with pytest.raises(ValueError, match=r"\['head'\]|\['out'\]"):
            ckpt.restore(target={"params": jax.eval_shape(lambda: renamed)})
        as_int = jax.eval_shape(lambda: jax.tree.map(lambda a: a.astype(jnp.int32), params))
        with pytest.raises(ValueError, match="int32"):
            ckpt.restore(target={"params": as_int})
        with pytest.raises(ValueError, match="key"):
            ckpt.restore(target={"params": params, "key": key})
        with pytest.raises(ValueError, match="target"):
            ckpt.restore(target={"weights": params})
        with pytest.raises(ValueError, match="no step 3"):
            ckpt.restore(3, target={"params": params})
        # A subset of the items restores on its own.
        _assert_trees_bit_equal(ckpt.restore(target={"params": params})["params"], params)


def test_bad_calls_change_nothing(tmp_path):
    params = _params()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(5, params=params, extra={"a": 1})
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(5, params=jax.tree.map(jnp.zeros_like, params))
        with pytest.raises(ValueError, match="older"):
            ckpt.save(4, params=params)
        with pytest.raises(TypeError, match="extra"):
            ckpt.save(6, params=params, extra={"a": object()})
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, params=params)
        with pytest.raises(ValueError, match="step"):
            ckpt.save(True, params=params)
        with pytest.raises(ValueError, match="nothing to save"):
            ckpt.save(6)
        with pytest.raises(TypeError, match="params"):
            ckpt.save(6, params={"w": "not an array"})
        assert sorted(os.listdir(tmp_path)) == before
        restored = ckpt.restore(target={"params": params})
        _assert_trees_bit_equal(restored["params"], params)
        assert restored["extra"] == {"a": 1}
        ckpt.save(np.int64(6), params=params)
        assert ckpt.all_steps() == [5, 6]


def test_constructor_and_empty_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(TypeError, match="directory"):
        Checkpointer(3)
    with pytest.raises(FileNotFoundError, match="create=False"):
        Checkpointer(tmp_path / "missing", create=False)
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(target={"params": _params()})


def test_restore_honours_target_shardings(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8
    params = _params()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, params=params, key=jax.random.key(1))
        specs = {
            "dense": {"kernel": P("data", None), "bias": P("data")},
            "out": {"kernel": P("data", None)},
        }
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
            params,
            specs,
        )
        key_target = jax.ShapeDtypeStruct(
            (), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())
        )
        restored = ckpt.restore(target={"params": target, "key": key_target})
    for leaf, t in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(target), strict=True):
        assert leaf.sharding.is_equivalent_to(t.sharding, leaf.ndim)
    _assert_trees_bit_equal(restored["params"], params)
    _assert_trees_bit_equal(restored["key"], jax.random.key(1))


_SAVE_ON_4_DEVICES = """
import sys, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxcompress.checkpoint import Checkpointer
mesh = jax.make_mesh((4,), ("d",))
w = jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("d", None)))
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(0, params={"w": w, "b": jnp.ones(3)}, key=jax.random.key(5))
"""


def test_restore_abstract_target_from_another_topology(tmp_path):
    # Saved by a 4-device process (like a GPU or TPU host), restored in this 8-device one from
    # jax.eval_shape output, which carries no sharding: Orbax alone raises "Topology mismatch".
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-c", _SAVE_ON_4_DEVICES, str(tmp_path)], env=env, check=True, timeout=300
    )
    target = jax.eval_shape(lambda: {"w": jnp.zeros((8, 2)), "b": jnp.zeros(3)})
    key_target = jax.eval_shape(lambda: jax.random.key(0))
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(target={"params": target, "key": key_target})
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(16.0).reshape(8, 2))
    np.testing.assert_array_equal(restored["params"]["b"], np.ones(3))
    _assert_trees_bit_equal(restored["key"], jax.random.key(5))
    for leaf in jax.tree.leaves(restored["params"]):
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 5, rngs=rngs)
        self.norm = nnx.BatchNorm(5, rngs=rngs)
        self.rngs = rngs


def test_nnx_state_round_trip(tmp_path):
    model = _Net(nnx.Rngs(0, dropout=1))
    model.rngs.dropout()  # advance a stream so the count is not the initial one
    state = nnx.state(model)
    assert any(
        jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in jax.tree.leaves(state)
    )
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, model_state=state)
        fresh = _Net(nnx.Rngs(7, dropout=8))
        restored = ckpt.restore(target={"model_state": jax.eval_shape(lambda: nnx.state(fresh))})
    nnx.update(fresh, restored["model_state"])
    _assert_trees_bit_equal(nnx.state(fresh), state)
    x = jnp.ones((2, 6))
    np.testing.assert_array_equal(fresh.dense(x), model.dense(x))


def test_structure_fingerprint_lists_none_leaves():
    fp = structure_fingerprint({"a": jnp.zeros((2, 3), jnp.bfloat16), "b": None})
    assert fp == [
        {"path": "['a']", "shape": [2, 3], "dtype": "bfloat16"},
        {"path": "['b']", "shape": None, "dtype": None},
    ]
    abstract = jax.eval_shape(lambda: {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": None})
    assert structure_fingerprint(abstract) == fp


# --------------------------------------------------------------------------------------------
# Integrity, directory checks, atomic JSON, restore onto a mesh
# --------------------------------------------------------------------------------------------


def _integrity_params():
    rng = np.random.default_rng(3)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(10,)), jnp.bfloat16),
        "mask": jnp.asarray(rng.random((16, 16)) < 0.5),
        "count": jnp.asarray(7, jnp.int32),
    }


def test_flipped_bytes_in_the_data_files_never_restore_silently(tmp_path):
    import shutil

    params = _integrity_params()
    src = tmp_path / "src"
    with Checkpointer(src) as ckpt:
        ckpt.save(3, params=params)
    data_files = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(src / "3" / "params")
        for f in files
        if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep
    )
    assert data_files
    trials = [
        (path, int(offset))
        for path in data_files
        for offset in np.linspace(0, os.path.getsize(path) - 1, 6)
    ]
    assert len(trials) >= 16
    target = {"params": jax.eval_shape(lambda: params)}
    silent, by_checksum = 0, 0
    for i, (path, offset) in enumerate(trials):
        dst = tmp_path / f"trial{i}"
        shutil.copytree(src, dst)
        flipped = os.path.join(dst, os.path.relpath(path, src))
        data = bytearray(open(flipped, "rb").read())
        data[offset] ^= 0x40
        with open(flipped, "wb") as handle:
            handle.write(bytes(data))
        try:
            with Checkpointer(dst) as ckpt:
                restored = ckpt.restore(target=target)["params"]
        except ValueError as err:
            assert "step 3" in str(err)
            if "is corrupt: item 'params' leaf" in str(err):
                by_checksum += 1
                assert re.search(r"leaf \['(w|b|mask|count)'\]", str(err))
        else:  # the byte was not part of any value read: the values must be intact
            same = all(
                np.asarray(restored[k]).tobytes() == np.asarray(params[k]).tobytes() for k in params
            )
            silent += not same
        shutil.rmtree(dst)
    assert silent == 0
    assert by_checksum >= 1  # the checksum, not only the storage layer, caught corruptions


def test_checksum_detects_any_single_changed_word():
    from jaxcompress.checkpoint import _checksums

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    sharded = jax.device_put(a, NamedSharding(mesh, P("x", "y")))
    base = _checksums([a])[0]
    assert _checksums([sharded])[0] == base  # independent of the sharding
    flat = np.asarray(a).reshape(-1).view(np.uint32)
    for index in rng.choice(flat.size, 50, replace=False):
        for bit in (0, 7, 22, 31):
            changed = flat.copy()
            changed[index] ^= np.uint32(1 << bit)
            b = jnp.asarray(changed.view(np.float32).reshape(a.shape))
            assert _checksums([b])[0] != base
    # Swapping two different entries changes it too (the weights depend on the position).
    swapped = np.asarray(a).copy()
    swapped[0, 0], swapped[3, 5] = swapped[3, 5], swapped[0, 0]
    assert _checksums([jnp.asarray(swapped)])[0] != base


def test_bad_directories_are_rejected_at_construction(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        Checkpointer(regular)
    with pytest.raises(ValueError, match="cannot create directory|not writable"):
        Checkpointer(regular / "sub")
    with pytest.raises(ValueError, match="cannot create directory|not writable"):
        Checkpointer("/proc/jaxcompress-checkpoints")
    if os.geteuid() != 0:  # root writes into read-only directories
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ValueError, match="not writable"):
            Checkpointer(locked)


@pytest.mark.parametrize("content", [b"", b"\x00{garbage"])
@pytest.mark.parametrize("item", ["structure/metadata", "extra/metadata", "params/_METADATA"])
def test_empty_or_corrupt_metadata_names_the_file(tmp_path, item, content):
    params = _params()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, params=params, extra={"a": 1})
    path = tmp_path / "2" / item
    path.write_bytes(content)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*empty or corrupt"):
            ckpt.restore(target={"params": params})


def test_write_json_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    from jaxcompress.checkpoint import write_json_atomic

    path = tmp_path / "results.json"
    write_json_atomic(path, {"accuracy": 0.9})
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_json_atomic(path, {"bad": object()})

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"accuracy": 0.95, "big": list(range(1000))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no temporary file left
    write_json_atomic(path, {"accuracy": 0.95})
    assert json.loads(path.read_text()) == {"accuracy": 0.95}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_json_atomic(tmp_path / "missing" / "r.json", {})


def test_restore_puts_scalar_leaves_on_the_target_mesh(tmp_path):
    params = _params()
    tx = optax.adam(1e-2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params, opt_state=tx.init(params))
        mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
        placed = jax.device_put(params, NamedSharding(mesh, P()))
        target = {"params": placed, "opt_state": tx.init(placed)}  # count on one device
        assert not isinstance(target["opt_state"][0].count.sharding, NamedSharding)
        restored = ckpt.restore(target=target)
    for leaf in jax.tree.leaves(restored["opt_state"]):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
    # The restored state steps together with params on that mesh.
    updates, _ = jax.jit(tx.update)(placed, restored["opt_state"], placed)
    assert jax.tree.leaves(updates)[0].sharding.mesh == mesh
