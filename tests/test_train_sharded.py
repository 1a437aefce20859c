"""Sharded training on 8 emulated devices: DP and FSDP equal one device, one compile per shape,
no whole-parameter all-gather under FSDP, restore onto another mesh, and clear errors."""

from __future__ import annotations

import re

import _util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _optim_loops import acdc_steps
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress import _sharding, optim, sharding, train
from jaxcompress.checkpoint import Checkpointer
from jaxcompress.models import MLP

BATCH = 64
STEPS = 6


@pytest.fixture(scope="module")
def digits():
    return _util.digits(BATCH * STEPS)[0]


def _mlp(seed=0):
    # 64x64 kernel (4096 entries: FSDP-sharded), 64x10 head (640 entries: replicated).
    return MLP(64, (64,), 10, rngs=nnx.Rngs(seed))


OPTIMIZERS = {
    "sgd": (lambda: optax.sgd(0.1, momentum=0.9), False),
    "cram": (
        lambda: optim.cram(optax.sgd(0.1, momentum=0.9), rho=0.05, sparsities=(0.5, 0.7)),
        True,
    ),
    "acdc": (
        lambda: optim.acdc(
            optax.sgd(0.1, momentum=0.9),
            sparsity=0.6,
            schedule=acdc_steps(1, 2, 1, 2, STEPS),
        ),
        False,
    ),
    "gmp": (
        lambda: optim.gmp(
            optax.sgd(0.1, momentum=0.9), sparsity=0.6, begin_step=1, end_step=5, every=2
        ),
        False,
    ),
}


def _fit(model, tx, ds, **kw):
    """One quiet epoch of ``train.fit`` in batches of ``BATCH``; ``kw`` go to ``fit``."""
    return train.fit(model, tx, ds, **{"epochs": 1, "batch_size": BATCH, "progress": False, **kw})


def _run(ds, name, *, mesh=None, rule="replicated", perturb=False):
    make_tx, pass_grad_fn = OPTIMIZERS[name]
    model = _mlp()
    if perturb:  # every param one ULP up: the noise floor of float32 training
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: jnp.nextafter(a, jnp.inf), params))
    traces = [0]

    def loss_fn(logits, labels):
        traces[0] += 1  # runs only while the step is traced
        return train.cross_entropy(logits, labels)

    hist = _fit(
        model,
        make_tx(),
        ds,
        mesh=mesh,
        param_sharding=rule,
        pass_grad_fn=pass_grad_fn,
        loss_fn=loss_fn,
    )
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    masks = getattr(hist.opt_state, "masks", None)
    masks = None if masks is None else jax.tree.map(np.asarray, masks)
    return params, masks, hist, traces[0], model


def _leaves(tree):
    return jax.tree.leaves(tree)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_fit_equals_one_device_within_the_ulp_noise_floor(digits, name):
    base, base_masks, base_hist, base_traces, _ = _run(digits, name)
    ulp, ulp_masks, _, _, _ = _run(digits, name, perturb=True)
    floor = max(
        float(np.max(np.abs(a - b))) for a, b in zip(_leaves(base), _leaves(ulp), strict=True)
    )
    assert floor > 0  # the perturbation propagated: a real baseline
    tol = 4 * floor
    for mesh, rule in (("data=8", "replicated"), ("data=4,fsdp=2", "fsdp")):
        params, masks, hist, traces, model = _run(digits, name, mesh=mesh, rule=rule)
        assert traces == base_traces  # one trace (one compile) for the whole run
        flips = 0
        if masks is not None:
            for m0, m1, mu in zip(
                _leaves(base_masks), _leaves(masks), _leaves(ulp_masks), strict=True
            ):
                flips += int(np.sum(m0 != m1))
                # A flip is allowed only where the ULP-perturbed run can flip too (near-ties);
                # the tiny model and few steps give none.
                assert np.sum(m0 != m1) <= max(2 * np.sum(m0 != mu), 0.002 * m0.size)
        keep = jax.tree.map(lambda a: np.ones(a.shape, bool), base)
        if masks is not None:
            keep = jax.tree.map(
                lambda k, m0, m1: k if m0 is None else (m0 == m1),
                keep,
                base_masks,
                masks,
                is_leaf=lambda v: v is None,
            )
        for a, b, k in zip(_leaves(base), _leaves(params), _leaves(keep), strict=True):
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=tol, err_msg=f"{mesh} {rule}")
        assert hist.final["train_loss"] == pytest.approx(base_hist.final["train_loss"], rel=1e-5)
        # Every leaf of the trained model lives on the whole mesh.
        for leaf in jax.tree.leaves(nnx.state(model)):
            assert len(leaf.sharding.device_set) == 8


def test_fsdp_rule_and_state_follow_params():
    mesh = sharding.make_mesh("data=2,fsdp=4")
    params = {
        "a": {"kernel": jnp.zeros((64, 32))},  # largest dim 64 divisible by 4
        "b": {"kernel": jnp.zeros((30, 40))},  # 30 % 4 != 0: the 40 dim
        "c": {"kernel": jnp.zeros((10, 10))},  # small: replicated
        "d": {"kernel": jnp.zeros((33, 35))},  # nothing divisible: replicated
    }
    specs = sharding.param_specs(params, mesh, "fsdp")
    assert specs["a"]["kernel"] == P("fsdp", None)
    assert specs["b"]["kernel"] == P(None, "fsdp")
    assert specs["c"]["kernel"] == P() and specs["d"]["kernel"] == P()
    # Without an fsdp axis, FSDP shards over the data axes.
    assert sharding.param_specs(params, sharding.make_mesh("data=8"), "fsdp")["a"]["kernel"] == P(
        "data", None
    )
    tx = optim.gmp(optax.adam(1e-3), sparsity=0.5, begin_step=0, end_step=4, every=2)
    state = tx.init(params)
    ospecs = _sharding.state_specs(state, params, specs, mesh, rule="fsdp")
    assert ospecs.masks["a"]["kernel"] == P("fsdp", None)
    assert ospecs.masks["b"]["kernel"] == P(None, "fsdp")
    assert ospecs.masks["d"]["kernel"] == P()
    mu = ospecs.inner_state[0].mu
    assert mu["a"]["kernel"] == P("fsdp", None) and mu["b"]["kernel"] == P(None, "fsdp")
    assert ospecs.count == P()
    assert ospecs.inner_state[0].count == P()


def test_sharded_step_compiles_once_per_shape(digits):
    x, y = digits
    mesh = sharding.make_mesh("data=4,fsdp=2")
    graphdef, params, rest = train.split_model(train.train_view(_mlp()))
    tx = OPTIMIZERS["cram"][0]()
    traces = [0]

    def loss_fn(logits, labels):
        traces[0] += 1
        return train.cross_entropy(logits, labels)

    step = train.make_train_step(
        graphdef, tx, loss_fn=loss_fn, pass_grad_fn=True, mesh=mesh, param_sharding="fsdp"
    )
    params, rest, state = step.place(params, rest, tx.init(params))
    assert state.count.sharding.is_fully_replicated and len(state.count.sharding.device_set) == 8
    params, rest, state, _ = step(params, rest, state, x[:BATCH], y[:BATCH])
    per_trace = traces[0]
    for i in range(1, 4):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        params, rest, state, metrics = step(params, rest, state, x[sl], y[sl])
    assert traces[0] == per_trace
    assert metrics["loss"].sharding.is_fully_replicated
    assert params["layers"][0]["kernel"][...].sharding.spec == P("fsdp", None)
    params, rest, state, _ = step(params, rest, state, x[:32], y[:32])  # a new shape
    assert traces[0] == 2 * per_trace


_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Per-device result shapes of every all-gather in compiled HLO text (tuples included)."""
    shapes = []
    for line in hlo.splitlines():
        match = re.search(r"=(.*?)\ball-gather(?:-start)?\(", line)
        if match:
            shapes += [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(match[1])]
    return shapes


def _whole_param_all_gathers(model, name, x, y, mesh="data=2,fsdp=4"):
    graphdef, params, rest = train.split_model(train.train_view(model))
    tx, pass_grad_fn = OPTIMIZERS[name][0](), OPTIMIZERS[name][1]
    step = train.make_train_step(
        graphdef, tx, pass_grad_fn=pass_grad_fn, mesh=mesh, param_sharding="fsdp", donate=False
    )
    placed = step.place(params, rest, tx.init(params))
    hlo = step.lower(*placed, x, y).compile().as_text()
    sharded = {
        tuple(leaf.shape)
        for leaf in jax.tree.leaves(placed[0])
        if not leaf.sharding.is_fully_replicated
    }
    assert sharded  # the test means something: some params are sharded
    gathered = _all_gather_shapes(hlo)
    return [shape for shape in gathered if shape in sharded], gathered


def test_fsdp_step_has_no_whole_parameter_all_gather(digits):
    line = "%ag = (f32[4,8]{1,0}, bf16[3]{0}) all-gather-start(%a, %b), dimensions={0}"
    assert _all_gather_shapes(line) == [(4, 8), (3,)]  # the parser reads tuples too
    x, y = digits
    # At this size XLA moves activations (it gathers batch rows over the fsdp axis) rather
    # than weights; for larger layers it gathers each weight where its matmul needs it, as
    # ZeRO-3 does (next test, docs/scaling.md).
    whole, gathered = _whole_param_all_gathers(
        MLP(64, (128, 64), 10, rngs=nnx.Rngs(0)), "cram", x[:BATCH], y[:BATCH]
    )
    assert gathered and not whole, f"all-gathers of whole parameters: {whole}"


@pytest.mark.slow  # about 30 s on 2 shared cores
def test_compression_adds_no_whole_parameter_all_gather_under_fsdp():
    # LeNet-300-100-sized layers: XLA gathers weights for the forward/backward pass. The
    # compression logic (global magnitude masks, masking, CrAM's perturbation) adds none:
    # AC/DC and GMP gather exactly what the inner optimizer does, CrAM twice (two passes).
    rng = np.random.default_rng(0)  # the HLO does not depend on the values
    x = rng.random((BATCH, 784), dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    counts = {
        name: len(
            _whole_param_all_gathers(MLP(784, (300, 100), 10, rngs=nnx.Rngs(0)), name, x, y)[0]
        )
        for name in ("sgd", "gmp", "acdc", "cram")
    }
    assert counts["sgd"] > 0, counts  # XLA does gather weights here: a real comparison
    assert counts["gmp"] == counts["acdc"] == counts["sgd"]
    assert counts["cram"] <= 2 * counts["sgd"]


@pytest.mark.slow  # about 30 s on 2 shared cores
def test_restore_onto_another_mesh_places_every_leaf(digits, tmp_path):
    x, y = digits
    tx_make, pass_grad_fn = OPTIMIZERS["cram"]
    model = _mlp()
    _fit(
        model, tx_make(), (x, y), pass_grad_fn=pass_grad_fn, mesh="data=8", checkpoint_dir=tmp_path
    )
    # A new process on another mesh builds its target with tx.init: counters land on device 0.
    mesh = sharding.make_mesh("data=2,fsdp=2")
    tx = tx_make()
    graphdef, params, rest = train.split_model(train.train_view(_mlp(1)))
    step = train.make_train_step(graphdef, tx, pass_grad_fn=True, mesh=mesh, param_sharding="fsdp")
    sh = step.shardings(params, rest, jax.eval_shape(tx.init, params))
    params = jax.device_put(params, sh.params)
    # optax's own init functions put scalar counters on one device (jnp.zeros([])); make
    # that explicit for every scalar leaf, whatever this transform's init does.
    target_state = jax.tree.map(
        lambda a: jax.device_put(a, jax.devices()[0]) if a.ndim == 0 else a, tx.init(params)
    )
    assert not isinstance(target_state.count.sharding, NamedSharding)
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(target={"params": params, "opt_state": target_state})
    for leaf in jax.tree.leaves(restored):
        if isinstance(leaf, jax.Array):
            assert leaf.sharding.mesh == mesh or leaf.sharding.device_set == set(mesh.devices.flat)
    state = restored["opt_state"]
    assert isinstance(state.count.sharding, NamedSharding) and state.count.sharding.mesh == mesh
    # The next step runs (it failed with "incompatible devices" before).
    _, _, state, m = step(
        restored["params"], jax.device_put(rest, sh.rest), state, x[:BATCH], y[:BATCH]
    )
    assert np.isfinite(float(m["loss"])) and int(state.count) == STEPS + 1


def test_bad_meshes_and_shardings_fail_before_any_work(digits):
    x, y = digits
    fit = lambda **kw: _fit(_mlp(), optax.sgd(0.1), (x, y), **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"batch_size=60.*not divisible by the 8"):
        fit(mesh="data=8", batch_size=60)
    with pytest.raises(ValueError, match="unknown axis name 'model'"):
        fit(mesh="data=4,model=2")
    with pytest.raises(ValueError, match="needs 16 devices but only 8 exist"):
        fit(mesh="data=16")
    with pytest.raises(ValueError, match="cannot parse"):
        fit(mesh="data:8")
    with pytest.raises(ValueError, match="data_axes"):
        fit(mesh="data=8", data_axes=("batch",))
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with pytest.raises(ValueError, match=r"AxisType.Auto"):
        fit(mesh=explicit)
    params = nnx.state(_mlp(), nnx.Param)
    # The head's kernel is (64, 10): 10 outputs cannot be split over 8 devices.
    specs = jax.tree.map(lambda a: P(None, "data") if a.ndim == 2 else None, params)
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['kernel'\].*dimension 1 has size 10"):
        fit(mesh="data=8", param_sharding=specs)
    with pytest.raises(ValueError, match="param_sharding='zero3'"):
        fit(mesh="data=8", param_sharding="zero3")


class _Annotated(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "fsdp"))
        self.a = nnx.Linear(64, 32, kernel_init=init, rngs=rngs)
        self.b = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


def _explicit_specs(mesh):
    model = _mlp()
    params = nnx.state(model, nnx.Param)
    specs = jax.tree.map(
        lambda a: P(None, "fsdp") if a.ndim == 2 and a.shape[1] == 64 else None, params
    )
    return model, specs, (model.layers[0].kernel, model.layers[1].kernel)


def _flax_metadata(mesh):
    with jax.set_mesh(mesh):  # Flax creates annotated variables on the mesh
        model = _Annotated(nnx.Rngs(0))
    return (
        model,
        nnx.get_partition_spec(nnx.state(model, nnx.Param)),
        (model.a.kernel, model.b.kernel),
    )


@pytest.mark.parametrize("make", [_explicit_specs, _flax_metadata], ids=["specs", "flax"])
def test_partition_spec_trees_as_the_rule(digits, make):
    """An explicit ``PartitionSpec`` tree, or Flax NNX sharding metadata turned into one."""
    mesh = sharding.make_mesh("data=2,fsdp=4")
    model, specs, (sharded, replicated) = make(mesh)
    _fit(model, optax.adam(1e-3), digits, mesh=mesh, param_sharding=specs)
    assert sharded[...].sharding.spec == P(None, "fsdp")
    assert replicated[...].sharding.is_fully_replicated
