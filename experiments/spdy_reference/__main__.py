"""Reproduce the reference SPDY DP on the published ResNet timing tables.

Setting (``SPDY.dpsolve`` in IST-DASLab/spdy; Frantar & Alistarh, ICML 2022): coefficients
all 1, i.e. the DP on the prior errors ``(rank / 41)^2``; the CLI's layer set (the timing
file's layers minus ``conv1`` and ``fc``); the reference budget
``T = base / target - (base - prunable)``; ``B = 10 000`` buckets; float64.

Checks every golden fixture of ``algorithms.md`` section 3.2 (DP cost, buckets used, dense
layers, mean sparsity, and the ResNet-18 2.0x profile) and exits non-zero on a mismatch. It
also prints, for the same profile, the modelled speedup once the skipped layers are charged at
their dense time, and what the corrected budget (``reference_budget=False``) gives instead.

Usage::

    python -m experiments.spdy_reference [--data DIR] [--out results/spdy_reference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from jaxcompress import spdy

SKIP = ("conv1", "fc")

# (table, target, DP cost, buckets used, dense layers, mean sparsity); None = not published
FIXTURES = [
    ("rn18_unstr", 1.5, 0.239143, 9999, 11, 0.252),
    ("rn18_unstr", 2.0, 0.784652, 9999, 8, 0.427),
    ("rn18_unstr", 2.5, 1.676383, 9999, 3, 0.671),
    ("rn18_unstr", 3.0, 2.462225, 9999, 1, 0.784),
    ("rn50_unstr", 1.5, 0.750149, 9999, 12, 0.445),
    ("rn50_unstr", 2.0, 2.588340, 10000, 6, 0.633),
    ("rn50_unstr", 2.5, 5.336704, 10000, 0, 0.787),
    ("rn50_unstr", 3.0, 8.885187, 10000, 0, 0.835),
    ("rn34_unstr", 2.0, 2.4503, None, None, None),
    ("rn101_unstr", 2.0, 5.3058, None, None, None),
    ("2rn50_unstr", 2.0, 2.8346, None, None, None),
]
RN18_2X_PROFILE = [0, 0, 0, 0, 0.7069, 0, 0.4584, 0, 0, 0.7612, 0.7612, 0.5111, 0.7612,
                   0.8054, 0.7844, 0.8414, 0, 0.8568, 0.8708]  # fmt: skip


def _data_dir(arg: str | None) -> str:
    root = arg or os.environ.get("JAXCOMPRESS_DATA_DIR")
    if root is None:
        here = os.path.dirname(os.path.abspath(__file__))
        root = os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "data"))
    path = os.path.join(root, "spdy_timings")
    if not os.path.isdir(path):
        raise SystemExit(f"timing tables not found under {path!r}; pass --data")
    return path


def _decimals(x: float) -> int:
    return len(repr(x).split(".")[1])


def run(data: str) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for name, target, cost, used, dense, mean in FIXTURES:
        table = spdy.TimingTable.load(os.path.join(data, f"{name}.txt"))
        kept = table.drop(SKIP)
        errors = spdy.prior_errors(kept)
        t_ref = spdy.budget(table, target, skip=SKIP, reference_budget=True)
        sol = spdy.solve(errors, kept.times(), t_ref)
        levels = [float(x) for x in kept.profile(sol.choice).values()]
        t_cor = spdy.budget(table, target, skip=SKIP)
        cor = spdy.solve(errors, kept.times(), t_cor)
        row = {
            "table": name,
            "target": target,
            "layers": len(kept),
            "dp_cost": float(sol.cost),
            "buckets_used": int(sol.buckets_used),
            "dense_layers": int(sum(x == 0 for x in levels)),
            "mean_sparsity": float(np.mean(levels)),
            "speedup_reference_accounting": spdy.modelled_speedup(
                table, sol.choice, skip=SKIP, reference_budget=True
            ),
            "speedup_with_skipped_dense": spdy.modelled_speedup(table, sol.choice, skip=SKIP),
            "corrected_dp_cost": float(cor.cost),
            "corrected_speedup": spdy.modelled_speedup(table, cor.choice, skip=SKIP),
            "profile": levels,
        }
        rows.append(row)
        checks = [("dp_cost", round(row["dp_cost"], _decimals(cost)), cost)]
        if used is not None:
            checks += [
                ("buckets_used", row["buckets_used"], used),
                ("dense_layers", row["dense_layers"], dense),
                ("mean_sparsity", round(row["mean_sparsity"], 3), mean),
            ]
        if (name, target) == ("rn18_unstr", 2.0):
            checks.append(("profile", levels, RN18_2X_PROFILE))
        for field, got, want in checks:
            if got != want:
                failures.append(f"{name} {target}x {field}: got {got}, expected {want}")
    return rows, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data root holding spdy_timings/ (default: env/shared)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows, failures = run(_data_dir(args.data))
    head = (
        f"{'table':<12} {'target':>6} {'L':>4} {'DP cost':>10} {'buckets':>8} {'dense':>6} "
        f"{'mean sp.':>8} {'ref acct':>8} {'+skipped':>8} {'corr. cost':>10} {'corr. x':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['table']:<12} {r['target']:>6.1f} {r['layers']:>4} {r['dp_cost']:>10.6f} "
            f"{r['buckets_used']:>8} {r['dense_layers']:>6} {r['mean_sparsity']:>8.3f} "
            f"{r['speedup_reference_accounting']:>8.3f} {r['speedup_with_skipped_dense']:>8.3f} "
            f"{r['corrected_dp_cost']:>10.6f} {r['corrected_speedup']:>8.3f}"
        )
    print(
        "\nref acct: modelled speedup as the reference counts it (skipped layers ignored); "
        "+skipped: the same profile with conv1/fc charged at dense time; corr.: the DP with "
        "the corrected budget (reference_budget=False)."
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "failures": failures}, f, indent=1)
    if failures:
        print("\nMISMATCHES:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall {len(FIXTURES)} reference fixtures reproduced (and the RN18 2.0x profile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
