"""The LM decode benchmark (experiments/benchmarks/lm_decode.py) runs on CPU and records every
variant with its fields and token agreement. No timing is asserted."""

from __future__ import annotations

import json

import pytest
from _util import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("lm_decode") as module:
        yield module


def test_quick_cpu_run_records_every_variant(bench, tmp_path):
    argv = ["--quick", "--width", "32", "--steps", "3", "--reps", "1", "--batches", "1", "3"]
    argv += ["--layers", "1", "--prompt-len", "2"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["failures"] == [] and "sm90" in saved["note"]
    cpu_variants = [v for v in bench.VARIANTS if v != "packed_mosaic"]
    rows = saved["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (b, v) for b in (1, 3) for v in cpu_variants
    ]
    for row in rows:
        assert row["ms_per_token"] > 0 and row["tokens_per_s"] > 0
        assert row["speedup_vs_dense_cached"] > 0
        # float32 on CPU: every variant generates exactly the dense model's tokens
        assert row["first_divergence"] is None
    assert saved["packed_for_batch_layers"] == {"1": 0, "3": 0}  # CPU: dense everywhere
    model = saved["model"]
    assert model["kernels"] == 6
    assert model["packed_kernel_bytes"] < 0.6 * model["dense_kernel_bytes"]


def test_first_divergence(bench):
    import numpy as np

    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert bench._first_divergence(ref.copy(), ref, prompt_len=2) is None
    other = ref.copy()
    other[1, 3] = 0
    assert bench._first_divergence(other, ref, prompt_len=2) == 1
