"""Preemption-safe training: fit(checkpoint_dir=...) killed with SIGKILL and rerun equals an
uninterrupted run bit for bit; a different run is refused before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from _util import ROOT, bits, digits, fit_cram, records, subprocess_env
from flax import nnx

from jaxcompress.checkpoint import Checkpointer
from jaxcompress.models import SmallCNN

EPOCHS, BATCH, N = 3, 32, 192  # 6 steps per epoch, 18 in all
CONFIG = {"model": "SmallCNN(4, 8)", "lr": 0.05, "rho": 0.05}

_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_resume as T
kill_at = int(sys.argv[2])

def callback(epoch, record, model):
    if epoch == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # preempted right after this epoch's bookkeeping

T.run(sys.argv[1], callback=callback)
"""


def _data():
    return digits(N, 64, image=True)


def run(checkpoint_dir=None, *, callback=None, config=CONFIG, batch_size=BATCH, width=8, **kw):
    """CrAM on a BatchNorm CNN (masks, a PRNG key and running statistics in the state)."""
    kw.setdefault("checkpoint_every", None if checkpoint_dir is None else 5)
    train_ds, eval_ds = _data()
    model = SmallCNN(1, 10, (4, width), rngs=nnx.Rngs(0))
    hist = fit_cram(
        model,
        train_ds,
        lr=0.05,
        epochs=EPOCHS,
        batch_size=batch_size,
        eval_ds=eval_ds,
        eval_batch_size=50,
        checkpoint_dir=checkpoint_dir,
        config=config,
        callback=callback,
        **kw,
    )
    return model, hist


_bits, _records = bits, records


@pytest.fixture(scope="module")
def uninterrupted():
    return run()


class _Preempted(Exception):
    pass


def _stop_after(epoch):
    """A callback that preempts the run at the end of ``epoch`` (before it is checkpointed)."""

    def stop(e, record, model):
        if e == epoch:
            raise _Preempted

    return stop


def test_stopped_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(uninterrupted, tmp_path):
    model_a, hist_a = uninterrupted
    with pytest.raises(_Preempted):
        # checkpoint at step 3; the callback runs before epoch 1's end (step 6) is saved
        run(tmp_path, checkpoint_every=3, callback=_stop_after(1))
    model_b, hist_b = run(tmp_path, checkpoint_every=3)
    assert hist_b.resumed_from == 3
    assert _records(hist_b) == _records(hist_a)
    assert _bits(nnx.state(model_b)) == _bits(nnx.state(model_a))
    assert _bits(hist_b.opt_state) == _bits(hist_a.opt_state)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(uninterrupted, tmp_path):
    model_a, hist_a = uninterrupted
    directory = tmp_path / "ckpt"
    env = subprocess_env()
    script = _RUN.format(tests=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, "-c", script, str(directory), "2"], env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    with Checkpointer(directory) as ckpt:
        # Epoch 2 ends at step 12, not a multiple of 5: the latest checkpoint is mid-epoch 2.
        assert ckpt.latest_step() == 10
    seen = []
    metrics = tmp_path / "metrics.jsonl"
    model_b, hist_b = run(directory, callback=lambda e, r, m: seen.append(e), metrics_path=metrics)
    assert hist_b.resumed_from == 10 and hist_b.steps == hist_a.steps == 18
    assert seen == [2, 3]  # epoch 1 was restored, not rerun; epoch 2 resumed at its 5th step
    assert _records(hist_b) == _records(hist_a)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    assert _bits(nnx.state(model_b)) == _bits(nnx.state(model_a))
    assert _bits(hist_b.opt_state) == _bits(hist_a.opt_state)

    # A finished run is not rerun: the rerun restores the last step and trains nothing.
    seen.clear()
    model_c, hist_c = run(directory, callback=lambda e, r, m: seen.append(e))
    assert seen == [] and hist_c.resumed_from == 18
    assert _records(hist_c) == _records(hist_a)
    assert _bits(nnx.state(model_c)) == _bits(nnx.state(model_a))


def test_a_different_run_is_refused_before_training(tmp_path):
    directory = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="checkpoint_every"):
        run(directory, checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_dir is None"):
        run(None, checkpoint_every=3)
    # Write a checkpoint by a short run (one epoch), then try to resume it differently.
    model = SmallCNN(1, 10, (4, 8), rngs=nnx.Rngs(0))
    train_ds, _ = _data()
    fit_cram(model, train_ds, lr=0.05, epochs=1, batch_size=BATCH, checkpoint_dir=directory,
             config=CONFIG)  # fmt: skip
    before = sorted(os.listdir(directory))
    with pytest.raises(ValueError, match=r"lr: saved 0.05, now 0.1.*rho: saved 0.05, now 0.2"):
        run(directory, config={**CONFIG, "lr": 0.1, "rho": 0.2})
    with pytest.raises(ValueError, match=r"batch_size: saved 32, now 16"):
        run(directory, batch_size=16)
    with pytest.raises(ValueError, match=r"extra: saved '<absent>', now 1"):
        run(directory, config={**CONFIG, "extra": 1})
    # A checkpoint of another model names the first differing leaf.
    with pytest.raises(
        ValueError, match=r"does not match step 6.*saved shape \(8,\).*target shape \(9,\)"
    ):
        run(directory, width=9)
    assert sorted(os.listdir(directory)) == before  # nothing saved was lost or added


@pytest.mark.slow
def test_a_run_saved_on_8_devices_resumes_on_one(uninterrupted, tmp_path):
    model_a, hist_a = uninterrupted
    with pytest.raises(_Preempted):
        run(tmp_path, checkpoint_every=4, callback=_stop_after(1), mesh="data=8")  # at step 4
    model_b, hist_b = run(tmp_path, checkpoint_every=4)  # one device
    assert hist_b.resumed_from == 4
    for leaf in jax.tree.leaves(nnx.state(model_b)):
        assert len(leaf.sharding.device_set) == 1
    # Equal up to the rounding of 4 sharded steps (summation order of the gradients).
    for a, b in zip(_records(hist_a), _records(hist_b), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model_a, nnx.Param)),
        jax.tree.leaves(nnx.state(model_b, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-3)


def test_entries_a_callback_adds_to_a_record_are_checkpointed(tmp_path):
    def tag_then_stop(epoch, record, model):
        record["tag"] = 10 * epoch  # e.g. a caller's per-epoch curve
        _stop_after(2)(epoch, record, model)

    with pytest.raises(_Preempted):
        run(tmp_path, callback=tag_then_stop)  # checkpoints at steps 5 and 10 (mid-epoch 2)
    _, hist = run(tmp_path)  # resumed at step 10 with no callback
    assert hist.resumed_from == 10
    assert [r.get("tag") for r in hist.epochs] == [10, None, None]
