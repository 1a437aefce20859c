"""Tests for jaxcompress.train: learning, compilation, two-pass BatchNorm semantics, evaluate."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from jaxcompress import train
from jaxcompress.models import SmallCNN


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's real 8x8 digits, NHWC in [0, 1]: 1400 train / 397 test."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _cnn(seed=0):
    return SmallCNN(1, 10, (8, 16), rngs=nnx.Rngs(seed))


def test_fit_learns_on_digits(digits, tmp_path):
    train_ds, test_ds = digits
    model = _cnn()
    model.eval()
    before = train.evaluate(model, test_ds)
    seen = []
    path = tmp_path / "m" / "metrics.jsonl"
    fit = functools.partial(
        train.fit, model, optax.sgd(0.05, momentum=0.9), train_ds, batch_size=64, progress=False
    )
    hist = fit(
        epochs=4,
        eval_ds=test_ds,
        metrics_path=path,
        callback=lambda epoch, record, m: seen.append((epoch, record["eval_accuracy"])),
    )
    losses = [r["train_loss"] for r in hist.epochs]
    assert losses[-1] < 0.5 * losses[0]
    assert hist.final["eval_accuracy"] > 0.7 > before["accuracy"]
    assert hist.steps == 4 * (1400 // 64)
    # The trained state was written back into the model and its mode flags kept (eval).
    assert train.evaluate(model, test_ds)["accuracy"] == pytest.approx(hist.final["eval_accuracy"])
    assert model.blocks[0].bn.use_running_average is True
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert seen == [(r["epoch"], r["eval_accuracy"]) for r in hist.epochs]
    # The optimizer state is returned and can resume training.
    hist2 = fit(epochs=1, opt_state=hist.opt_state)
    assert hist2.final["train_loss"] < losses[0]


def test_train_step_compiles_once_and_updates_stats(digits):
    (x, y), _ = digits
    model = _cnn()
    mean0 = np.asarray(model.blocks[0].bn.mean[...])
    graphdef, params, rest = train.split_model(train.train_view(model))
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    traces = [0]

    def loss_fn(logits, labels):
        traces[0] += 1  # runs only while the step is traced
        return train.cross_entropy(logits, labels)

    step = train.make_train_step(graphdef, tx, loss_fn=loss_fn)
    p, r, o, m1 = step(params, rest, opt_state, x[:32], y[:32])
    p, r, o, m2 = step(p, r, o, x[32:64], y[32:64])
    p, r, o, m3 = step(p, r, o, x[64:96], y[64:96])
    assert traces[0] == 1
    assert set(m1) == {"loss", "accuracy"} and np.isfinite(float(m3["loss"]))
    assert not np.allclose(r["blocks"][0]["bn"]["mean"][...], mean0)


def _probe_tx(perturb: float):
    """ExtraArgs transform: zero updates; records grad_fn at params and at params + perturb."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"at_params": zeros, "at_perturbed": zeros}

    def update(grads, state, params=None, *, grad_fn=None, **extra):
        del state, extra
        at_params = grad_fn(params)
        at_perturbed = grad_fn(jax.tree.map(lambda w: w * perturb, params))
        updates = jax.tree.map(jnp.zeros_like, grads)
        return updates, {"at_params": at_params, "at_perturbed": at_perturbed}

    return optax.GradientTransformationExtraArgs(init, update)


def test_pass_grad_fn_runs_train_mode_and_discards_second_pass_stats(digits):
    (x, y), _ = digits
    xb, yb = x[:64], y[:64]
    model = _cnn(1)
    graphdef, params, rest = train.split_model(train.train_view(model))

    # Reference: the first pass only, zero updates, no grad_fn.
    plain = optax.set_to_zero()
    ref_step = train.make_train_step(graphdef, plain, donate=False)
    _, ref_rest, _, _ = ref_step(params, rest, plain.init(params), xb, yb)

    probe = _probe_tx(perturb=3.0)
    step = train.make_train_step(graphdef, probe, pass_grad_fn=True, donate=False)
    new_params, new_rest, state, _ = step(params, rest, probe.init(params), xb, yb)

    # Running statistics after the step are those of the first pass only.
    for a, b in zip(jax.tree.leaves(new_rest), jax.tree.leaves(ref_rest), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A second pass at the perturbed params *would* have produced different statistics.
    perturbed = jax.tree.map(lambda w: w * 3.0, params)
    _, other_rest, _, _ = ref_step(perturbed, rest, plain.init(params), xb, yb)
    mean_ref = ref_rest["blocks"][1]["bn"]["mean"][...]
    assert not np.allclose(other_rest["blocks"][1]["bn"]["mean"][...], mean_ref)
    # grad_fn runs in train mode on the same batch: at params it equals the first-pass grads.
    model_grads = jax.grad(
        lambda p: train.cross_entropy(nnx.merge(graphdef, p, rest, copy=True)(xb), yb)
    )(params)
    for a, b in zip(jax.tree.leaves(state["at_params"]), jax.tree.leaves(model_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # ... and an eval-mode gradient (running statistics) would differ.
    eval_graphdef, _, _ = train.split_model(train.eval_view(model))
    eval_grads = jax.grad(
        lambda p: train.cross_entropy(nnx.merge(eval_graphdef, p, rest, copy=True)(xb), yb)
    )(params)
    assert not np.allclose(
        state["at_params"]["head"]["kernel"][...], eval_grads["head"]["kernel"][...]
    )
    assert not np.allclose(
        state["at_perturbed"]["head"]["kernel"][...], state["at_params"]["head"]["kernel"][...]
    )
    # Zero updates leave the params as they were.
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_matches_full_batch_computation(digits):
    _, (x, y) = digits
    model = _cnn(2)
    model.eval()
    logits = np.asarray(model(jnp.asarray(x)))
    want_acc = float(np.mean(logits.argmax(-1) == y))
    want_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    got = train.evaluate(model, (x, y), batch_size=100)  # 397 = 3 * 100 + 97: padded last batch
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    model.train()
    train.evaluate(model, (x, y))
    assert model.blocks[0].bn.use_running_average is False  # evaluate keeps the mode flags


def test_fit_with_masked_optimizer_keeps_pruned_weights_zero(digits):
    from jaxcompress import prune
    from jaxcompress.optim._masked import fixed_mask

    train_ds, _ = digits
    model = _cnn(3)
    pruned, masks = prune.oneshot(nnx.state(model, nnx.Param), sparsity=0.6)
    nnx.update(model, pruned)
    train.fit(
        model,
        fixed_mask(optax.sgd(0.05, momentum=0.9), masks),
        train_ds,
        epochs=1,
        batch_size=100,
        progress=False,
    )
    kernel = np.asarray(model.blocks[1].conv.kernel[...])
    keep = np.asarray(masks["blocks"][1]["conv"]["kernel"][...])
    assert np.all(kernel[~keep] == 0.0) and np.any(kernel[keep] != 0.0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 5000}, ValueError, "batch_size"),
        ({"batch_size": 1.5}, ValueError, "batch_size"),
        ({"tx": "sgd"}, TypeError, "tx"),
        ({"train_ds": np.zeros((3, 8, 8, 1))}, TypeError, "train_ds"),
        ({"train_ds": (np.zeros((3, 8, 8, 1)), np.zeros((4,)))}, ValueError, "train_ds"),
        ({"callback": 3}, TypeError, "callback"),
        ({"checkpoint_every": 5}, ValueError, "checkpoint_dir is None"),
        ({"config": {"f": object()}}, TypeError, "config"),
        ({"config": [1]}, TypeError, "config"),
        ({"mesh": "data=3"}, ValueError, "batch_size=32 is not divisible by the 3"),
        ({"mesh": 8}, TypeError, "mesh"),
        ({"checkpoint_dir": __file__}, ValueError, "is not a directory"),
        ({"param_sharding": "fsdp"}, ValueError, "needs a mesh"),
        ({"data_axes": ("data",)}, ValueError, "needs a mesh"),
    ],
)
def test_fit_errors(digits, kwargs, exc, match):
    train_ds, _ = digits
    args = {"tx": optax.sgd(0.1), "train_ds": train_ds, "epochs": 1, "batch_size": 32}
    args.update(kwargs)
    model = _cnn()
    with pytest.raises(exc, match=match):
        train.fit(model, args.pop("tx"), args.pop("train_ds"), progress=False, **args)


def test_evaluate_errors(digits):
    _, test_ds = digits
    with pytest.raises(ValueError, match="batch_size"):
        train.evaluate(_cnn(), test_ds, batch_size=0)
