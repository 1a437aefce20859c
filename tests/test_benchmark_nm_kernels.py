"""The 2:4 benchmark (experiments/benchmarks/nm_kernels.py) runs end to end on CPU and writes
what the GPU run writes: the dense baseline before any sparse timing, CSV/JSON rows with
their fields, and a policy table the dispatcher loads. No timing is asserted."""

from __future__ import annotations

import csv
import json
import os

import pytest
from _util import benchmark_script

from jaxcompress.kernels import load_policy, select_implementation

QUICK = ["--quick", "--no-plot", "--interpret-check", "off", "--reps", "1", "--copy-mib", "4"]
QUICK += ["--e2e-width", "128", "--e2e-hidden", "256", "--e2e-depth", "1"]
ROW_FIELDS = {
    "dtype", "k", "n", "batch", "implementation", "dense_us", "dense_GBps", "dense_t_s",
    "sparse_us", "sparse_GBps", "sparse_t_s", "speedup", "speedup_conservative",
    "dense_bytes", "sparse_bytes", "byte_ratio", "rel_err", "status", "config", "error",
}  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("nm_kernels") as module:
        yield module


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("nm_kernels")
    result = bench.main([*QUICK, "--out", str(out)])
    return out, result


def test_quick_cpu_run_writes_json_csv_and_policy(bench, quick_run):
    out, result = quick_run
    with open(out / "results.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["complete"] and saved["platform"] == "cpu" and not saved["sm90"]
    assert "sm90" in saved["note"] and saved["implementation"] == "xla"
    assert saved["versions"]["jax"] and saved["machine"]["device"]
    assert saved["failures"] == [] and bench.exit_status(saved) == 0
    assert saved["copy"]["GBps"] > 0
    (shape,) = bench.CPU_SHAPES[:1]
    rows = saved["sparse"]
    assert [(r["k"], r["n"], r["batch"]) for r in rows] == [(*shape, 1), (*shape, 16)]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["status"] == "ok" and row["rel_err"] <= bench.RTOL
        assert row["speedup"] > 0 and row["sparse_GBps"] > 0 and row["dense_GBps"] > 0
        assert row["byte_ratio"] > 1  # packed + x + y is fewer bytes than dense + x + y
    (mp,) = saved["mask_pack"]
    assert mp["mask_copy_fraction"] > 0 and mp["pack_copy_fraction"] > 0
    e2e = saved["e2e"]
    assert {(r["model"], r["batch"]) for r in e2e} == {
        (model, batch) for model in ("dense_masked", "sparse_xla") for batch in (1, 16)
    }
    assert all(r["agrees"] for r in e2e if r["model"] != "dense_masked")
    assert saved["targets"]["e2e_agrees"] and not saved["targets"]["speedup_met"]

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and ROW_FIELDS <= set(table[0])
    assert [int(r["batch"]) for r in table] == [1, 16]

    policy = load_policy(str(out / "nm_policy.json"))
    assert policy["devices"]["cpu"]["mode"] == "dense"
    assert select_implementation(1, shape, "bfloat16", policy=policy) == "dense"


def test_dense_baseline_precedes_every_sparse_timing(quick_run):
    _, result = quick_run
    names = [s["section"] for s in result["sections"]]
    assert names == ["copy", "dense_baseline", "mask_pack", "sparse", "e2e"]
    dense_end = result["sections"][1]["end_s"]
    sparse_start = result["sections"][3]["start_s"]
    assert dense_end <= sparse_start
    baseline = result["dense_baseline"]
    assert len(baseline) == len(result["sparse"])
    assert max(r["t_s"] for r in baseline) < min(r["sparse_t_s"] for r in result["sparse"])
    key = lambda r: (r["k"], r["n"], r["batch"])
    for row in result["sparse"]:  # the speedup is taken against the baseline's dense time
        (base,) = [b for b in baseline if key(b) == key(row)]
        assert row["dense_us"] == base["dense_us"] and row["dense_t_s"] == base["t_s"]


def test_replot_draws_the_figure_from_the_json(bench, quick_run):
    pytest.importorskip("matplotlib")
    out, _ = quick_run
    path = bench.replot(str(out))
    assert os.path.getsize(path) > 0


def _row(k, cols, batch, speedup, status="ok"):
    return {"dtype": "bfloat16", "k": k, "n": cols, "batch": batch, "status": status,
            "speedup_conservative": speedup}  # fmt: skip


def test_policy_max_batch_stops_at_the_first_slow_or_wrong_batch(bench):
    rows = [
        _row(4096, 14336, 1, 1.5), _row(4096, 14336, 16, 0.96), _row(4096, 14336, 64, 0.5),
        _row(14336, 4096, 1, 1.4), _row(14336, 4096, 16, 0.9), _row(14336, 4096, 64, 1.2),
        _row(8192, 8192, 1, 1.3, status="wrong"), _row(8192, 8192, 16, 1.3),
        _row(8192, 28672, 1, None, status="failed"),
    ]  # fmt: skip
    entries = bench._policy_entries(rows, 2, 4)
    got = {(e["k"], e["n"]): e["max_batch"] for e in entries}
    # 0.96 >= 1/1.05: within 5%; 0.9 is not, so 64 (faster again) is not reached
    assert got == {(4096, 14336): 16, (14336, 4096): 1, (8192, 8192): 0, (8192, 28672): 0}
    # equal K*N: the dispatcher takes the first of equally near entries, the smaller one
    tied = [e for e in entries if e["k"] * e["n"] == 4096 * 14336]
    assert [e["max_batch"] for e in tied] == [1, 16]
    assert all(e["nm"] == "2:4" and e["dtype"] == "bfloat16" for e in entries)
