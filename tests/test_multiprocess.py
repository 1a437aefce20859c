"""Multi-host training through jax.distributed: two processes x 4 CPU devices on 127.0.0.1 equal
one process with 8 devices; per-process data slices; a bounded wait for the coordinator."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from _util import ROOT, digits, fit_cram, free_port, records, subprocess_env

from jaxcompress import data, sharding

MESH, RULE, BATCH, EPOCHS, N = "data=4,fsdp=2", "fsdp", 64, 2, 256

_WORKER = r"""
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jaxcompress import sharding
pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
assert sharding.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=120)
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
import numpy as np
from jax.experimental import multihost_utils
from flax import nnx
sys.path.insert(0, os.path.join(%(root)r, "tests"))
import test_multiprocess as T

model, hist = T.run(os.path.join(out, "ckpt"), metrics_path=os.path.join(out, "metrics.jsonl"))
params = multihost_utils.process_allgather(nnx.state(model, nnx.Param), tiled=True)
masks = multihost_utils.process_allgather(hist.opt_state.masks, tiled=True)
# Restore: a rerun resumes from the final checkpoint (saved by both processes) on the mesh.
model2, hist2 = T.run(os.path.join(out, "ckpt"))
again = multihost_utils.process_allgather(nnx.state(model2, nnx.Param), tiled=True)
rows = sharding.process_rows(T.MESH, T.BATCH)
flat = lambda tree: [np.asarray(a) for a in jax.tree.leaves(tree)]
result = {
    "records": T.records(hist),
    "resumed_from": hist2.resumed_from,
    "rows": list(rows),
    "restored_equal": all(
        a.tobytes() == b.tobytes() for a, b in zip(flat(params), flat(again), strict=True)
    ),
}
with open(os.path.join(out, f"result{pid}.json"), "w") as handle:
    json.dump(result, handle)
if pid == 0:
    np.savez(os.path.join(out, "params.npz"), *flat(params), *flat(masks))
"""


def _digits():
    return digits(N, 100)


def run(checkpoint_dir=None, **kw):
    """CrAM on an MLP, FSDP on a 4x2 mesh: the same call in one process or in two."""
    from flax import nnx

    from jaxcompress.models import MLP

    train_ds, eval_ds = _digits()
    model = MLP(64, (64,), 10, rngs=nnx.Rngs(0))
    hist = fit_cram(
        model,
        train_ds,
        lr=0.1,
        epochs=EPOCHS,
        batch_size=BATCH,
        eval_ds=eval_ds,
        eval_batch_size=48,
        mesh=MESH,
        param_sharding=RULE,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=None if checkpoint_dir is None else 3,
        **kw,
    )
    return model, hist


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    import jax
    from flax import nnx

    port = free_port()
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = _WORKER % {"root": ROOT}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 600
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace")[-3000:])
    finally:
        for p in procs:  # both reaped whatever happened
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(outputs)

    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    assert results[0]["rows"] == [0, BATCH // 2] and results[1]["rows"] == [BATCH // 2, BATCH]
    assert results[0]["records"] == results[1]["records"]
    assert all(r["restored_equal"] and r["resumed_from"] == EPOCHS * (N // BATCH) for r in results)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # written by process 0 only

    model, hist = run()  # one process, 8 devices
    for a, b in zip(records(hist), results[0]["records"], strict=True):
        for key in ("train_loss", "eval_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
    saved = np.load(tmp_path / "params.npz", allow_pickle=False)
    two = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    mine = [
        np.asarray(a)
        for a in jax.tree.leaves(nnx.state(model, nnx.Param))
        + jax.tree.leaves(hist.opt_state.masks)
    ]
    assert len(two) == len(mine)
    for a, b in zip(mine, two, strict=True):
        if a.dtype == bool:
            assert np.mean(a != b) <= 0.002  # masks: flips only at near-ties
        else:
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_process_rows_and_batches_rows_give_the_global_batch():
    mesh = sharding.make_mesh("data=8")
    assert sharding.process_rows(mesh, 64) == (0, 64)  # one process holds every row
    assert sharding.process_rows("data=4,fsdp=2", 64, data_axes="data") == (0, 64)
    with pytest.raises(ValueError, match="not divisible by the 8"):
        sharding.process_rows(mesh, 60)
    x = np.arange(100, dtype=np.float32)[:, None]
    ds = (x, np.arange(100, dtype=np.int32))
    whole = [xb for xb, _ in data.batches(ds, 20, seed=4, epoch=2)]
    halves = [
        [xb for xb, _ in data.batches(ds, 20, seed=4, epoch=2, rows=rows)]
        for rows in ((0, 10), (10, 20))
    ]
    for w, a, b in zip(whole, *halves, strict=True):
        np.testing.assert_array_equal(np.concatenate([a, b]), w)
    with pytest.raises(ValueError, match="rows"):
        next(data.batches(ds, 20, rows=(10, 30)))
    with pytest.raises(ValueError, match=r"batch_size=200 is larger than the dataset \(100"):
        data.batches(ds, 200)
    assert len(list(data.batches(ds, 200, drop_remainder=False))) == 1


def test_unreachable_coordinator_fails_within_the_timeout():
    port = free_port()  # nobody listens there
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"127.0.0.1:{port} could not be reached within 1"):
        sharding.initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=1.0)
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match="process_id=2"):
        sharding.initialize("127.0.0.1:1", 2, 2)
    with pytest.raises(ValueError, match="coordinator_address"):
        sharding.initialize(None, 2, 1)
    assert sharding.initialize() is False  # nothing set: one process, nothing done
