"""The targets' summaries, the printed table and the Pareto plots of the surrogate experiment."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "LANDING_TOLERANCE",
    "TOLERANCE",
    "accuracy_at",
    "best_within",
    "format_table",
    "pareto_front",
    "summarize",
    "uniform_flops_at",
    "write_pareto_plots",
]

#: Accuracy drop from the full-width model within which a compressed model counts as "as
#: accurate" (fractions): 0.3 points (CNN), 0.5 (ResNet-20), 1 (SST-2).
TOLERANCE = {"cnn": 0.003, "resnet20": 0.005, "sst2": 0.01}
FLOPS_ADVANTAGE = 1.2  # target: >= 1.2x fewer FLOPs than uniform width at that accuracy
SST2_REDUCTION = 0.4
LATENCY_TOLERANCE = 0.25  # latency reduction within 25% of the FLOPs reduction
LANDING_TOLERANCE = 0.05  # the controller lands within 5% of its FLOPs target

_STYLE = {
    "surrogate": ("l1/l2 surrogate", "tab:blue", "o"),
    "l1": ("l1 gates", "tab:orange", "s"),
    "uniform": ("uniform width", "0.4", "^"),
    "svd": ("truncated SVD", "tab:green", "D"),
}
_TITLE = {
    "cnn": "BN CNN",
    "resnet20": "ResNet-20",
    "sst2": "Transformer (heads, FFN)",
    "mlp": "Low-rank MLP",
}


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both axes (fewer or equal FLOPs and higher or equal
    accuracy, one strictly), sorted by FLOPs."""
    front = [
        p
        for p in points
        if not any(
            q["flops"] <= p["flops"]
            and q["accuracy"] >= p["accuracy"]
            and (q["flops"] < p["flops"] or q["accuracy"] > p["accuracy"])
            for q in points
        )
    ]
    return sorted(front, key=lambda p: p["flops"])


def best_within(points: Sequence[dict[str, Any]], min_accuracy: float) -> dict[str, Any] | None:
    """The cheapest point with ``accuracy >= min_accuracy`` (``None`` if there is none)."""
    ok = [p for p in points if p["accuracy"] >= min_accuracy]
    return min(ok, key=lambda p: (p["flops"], -p["accuracy"])) if ok else None


def uniform_flops_at(accuracy: float, points: Sequence[dict[str, Any]]) -> float | None:
    """FLOPs a family needs for ``accuracy``: on its Pareto front, the first segment whose end
    reaches it, interpolated linearly in (accuracy, log FLOPs); the cheapest point if that
    already reaches it; ``None`` if no point does."""
    front = pareto_front(points)
    if not front or front[-1]["accuracy"] < accuracy:
        return None
    if front[0]["accuracy"] >= accuracy:
        return float(front[0]["flops"])
    for lo, hi in zip(front[:-1], front[1:], strict=False):
        if hi["accuracy"] >= accuracy:
            w = (accuracy - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
            return float(math.exp((1 - w) * math.log(lo["flops"]) + w * math.log(hi["flops"])))
    raise AssertionError("unreachable")  # pragma: no cover


def accuracy_at(flops: float, points: Sequence[dict[str, Any]]) -> float | None:
    """Accuracy a family reaches within a FLOPs budget: on its Pareto front, linear in
    (log FLOPs, accuracy) between neighbours, the best accuracy above the front, ``None``
    below it."""
    front = pareto_front(points)
    if not front or flops < front[0]["flops"]:
        return None
    if flops >= front[-1]["flops"]:
        return float(front[-1]["accuracy"])
    for lo, hi in zip(front[:-1], front[1:], strict=False):
        if flops <= hi["flops"]:
            w = math.log(flops / lo["flops"]) / math.log(hi["flops"] / lo["flops"])
            return float((1 - w) * lo["accuracy"] + w * hi["accuracy"])
    raise AssertionError("unreachable")  # pragma: no cover


def _brief(p: dict[str, Any] | None) -> dict[str, Any] | None:
    if p is None:
        return None
    keys = ("key", "flops", "accuracy", "latency_ms", "flops_ratio", "target", "multiplier")
    return {k: p[k] for k in keys if k in p}


def _latency(reference: dict[str, Any], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        flops_cut = 1.0 - p["flops"] / reference["flops"]
        latency_cut = 1.0 - p["latency_ms"] / reference["latency_ms"]
        rows.append(
            {
                "key": p["key"],
                "flops_speedup": reference["flops"] / p["flops"],
                "latency_speedup": reference["latency_ms"] / p["latency_ms"],
                "within_tolerance": abs(latency_cut - flops_cut) <= LATENCY_TOLERANCE * flops_cut,
            }
        )
    return rows


def _landing(points: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [p["landing_error"] for p in points]
    worst = max(errors, key=abs) if errors else None
    return {
        "errors": {p["key"]: p["landing_error"] for p in points},
        "worst": worst,
        "met": all(abs(e) <= LANDING_TOLERANCE for e in errors),
    }


def _uniform_summary(task: str, res: dict[str, Any]) -> dict[str, Any]:
    ref = res["reference"]
    threshold = ref["accuracy"] - TOLERANCE[task]
    compressed = [p for m in ("surrogate", "l1") for p in res.get(m, [])]
    out: dict[str, Any] = {
        "reference_accuracy": ref["accuracy"],
        "accuracy_threshold": threshold,
        "latency": _latency(ref, compressed),
    }
    best = best_within(res["surrogate"], threshold)
    uniform_pts = res.get("uniform", [ref])
    uniform_best = best_within(uniform_pts, threshold)
    out["surrogate_best"] = _brief(best)
    out["uniform_best"] = _brief(uniform_best)
    if task == "sst2":
        reduction = 0.0 if best is None else 1.0 - best["flops"] / ref["flops"]
        out.update(flops_reduction=reduction, met_flops_reduction=reduction >= SST2_REDUCTION)
        return out
    out["uniform_over_surrogate_flops_at_equal_accuracy"] = {
        p["key"]: None if (u := uniform_flops_at(p["accuracy"], uniform_pts)) is None
        else u / p["flops"]
        for p in res["surrogate"]
    }  # fmt: skip
    at = None if best is None else uniform_flops_at(best["accuracy"], uniform_pts)
    advantage = None if best is None else (ref["flops"] if at is None else at) / best["flops"]
    discrete = (
        None if best is None or uniform_best is None else uniform_best["flops"] / best["flops"]
    )
    out.update(
        uniform_flops_at_surrogate_accuracy=at,
        flops_advantage=advantage,
        flops_advantage_over_best_uniform=discrete,
        met_flops_advantage=discrete is not None and discrete >= FLOPS_ADVANTAGE,
    )
    if "l1" in res:
        out["surrogate_minus_l1_at_equal_flops"] = [
            None if (a := accuracy_at(s["flops"], res["l1"])) is None else s["accuracy"] - a
            for s in res["surrogate"]
        ]
    return out


def _mlp_summary(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "reference_accuracy": res["reference"]["accuracy"],
        "surrogate_minus_svd": [
            s["accuracy"] - v["accuracy"] for s, v in zip(res["surrogate"], res["svd"], strict=True)
        ],
        "latency": _latency(res["reference"], res["surrogate"] + res["svd"]),
    }


def summarize(
    task: str, res: dict[str, Any], per_seed: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """The targets measured on one task's seed-averaged record ``res``; the controller's
    landing over every compressed run of ``per_seed`` (of ``res`` when empty)."""
    out = _mlp_summary(res) if task == "mlp" else _uniform_summary(task, res)
    records = list(per_seed) or [res]
    out["controller"] = _landing(
        [
            {**p, "key": f"seed{i}/{p['key']}" if per_seed else p["key"]}
            for i, record in enumerate(records)
            for m in ("surrogate", "l1")
            for p in record.get(m, [])
        ]
    )
    return out


def _methods(res: dict[str, Any]) -> list[str]:
    return [k for k in _STYLE if k in res]


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table per task (MACs, accuracy, latency, landing error) and its targets."""
    lines = []
    for task in _TITLE:
        if task not in results:
            continue
        res = results[task]
        ref, s = res["reference"], res["summary"]
        lines.append(
            f"[{task}] reference: {ref['flops']:,} MACs, accuracy {ref['accuracy']:.4f}, "
            f"latency {ref['latency_ms']:.3f} ms"
        )
        lines.append(
            f"  {'method':<10} {'point':<6} {'MACs':>11} {'ratio':>6} {'accuracy':>8} "
            f"{'landing':>8} {'latency ms':>10} {'lat ratio':>9}"
        )
        for method in _methods(res):
            for p in res[method]:
                label = p["key"].split("_", 1)[1]
                landing = f"{100 * p['landing_error']:+.1f}%" if "landing_error" in p else ""
                lines.append(
                    f"  {method:<10} {label:<6} {p['flops']:>11,} {p['flops_ratio']:>6.3f} "
                    f"{p['accuracy']:>8.4f} {landing:>8} {p['latency_ms']:>10.3f} "
                    f"{p['latency_ratio']:>9.3f}"
                )
        c = s["controller"]
        worst = "n/a" if c["worst"] is None else f"{100 * c['worst']:+.1f}%"
        lines.append(
            f"  controller: worst landing error {worst} "
            f"({'met' if c['met'] else 'not met'}: within 5% of every target)"
        )
        if task in ("cnn", "resnet20"):
            adv = s["flops_advantage_over_best_uniform"]
            tol = 100 * TOLERANCE[task]
            lines.append(
                f"  surrogate vs the cheapest uniform model within {tol:g} pt of full width: "
                + ("no point within" if adv is None else f"{adv:.2f}x fewer FLOPs")
                + f" ({'met' if s['met_flops_advantage'] else 'not met'}, target 1.2x)"
            )
        elif task == "sst2":
            lines.append(
                f"  FLOPs reduction at <= 1 pt drop: {s['flops_reduction']:.1%} "
                f"({'met' if s['met_flops_reduction'] else 'not met'}, target 40%)"
            )
        else:
            gains = ", ".join(f"{100 * g:+.2f}" for g in s["surrogate_minus_svd"])
            lines.append(f"  surrogate minus SVD at equal FLOPs (points): {gains}")
    return "\n".join(lines)


def write_pareto_plots(results: dict[str, Any], out: str) -> list[str]:
    """``pareto_<task>.png``: accuracy vs MACs (dashed: the reference minus the tolerance) and
    measured latency vs MACs, both on log MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in _TITLE:
        if task not in results:
            continue
        res = results[task]
        ref = res["reference"]
        fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method in _methods(res):
            label, color, marker = _STYLE[method]
            pts = sorted(res[method], key=lambda p: p["flops"])
            flops = [p["flops"] for p in pts]
            ax.plot(flops, [100 * p["accuracy"] for p in pts], marker=marker, color=color,
                    label=label)  # fmt: skip
            lat.plot(flops, [p["latency_ms"] for p in pts], marker=marker, color=color,
                     ls="none", label=label)  # fmt: skip
        for axis, y in ((ax, 100 * ref["accuracy"]), (lat, ref["latency_ms"])):
            axis.plot([ref["flops"]], [y], marker="*", ms=14, color="k", ls="none",
                      label="full model")  # fmt: skip
        if task in TOLERANCE:
            tol = TOLERANCE[task]
            ax.axhline(100 * (ref["accuracy"] - tol), color="k", lw=0.8, ls="--",
                       label=f"full - {100 * tol:g} pt")  # fmt: skip
        all_flops = [p["flops"] for m in _methods(res) for p in res[m]] + [ref["flops"]]
        grid = np.geomspace(min(all_flops), max(all_flops), 50)
        lat.plot(grid, ref["latency_ms"] * grid / ref["flops"], color="k", lw=0.8, ls=":",
                 label="proportional to MACs")  # fmt: skip
        for axis in (ax, lat):
            axis.set_xscale("log")
            axis.set_xlabel("multiply-adds per example (exact, extracted model)")
            axis.grid(alpha=0.3, which="both")
        lat.set_yscale("log")
        ax.set_ylabel("test accuracy (%)" if task != "sst2" else "validation accuracy (%)")
        lat.set_ylabel("CPU latency of a batch (ms)")
        ax.legend(fontsize=8, loc="lower right")
        lat.legend(fontsize=8, loc="upper left")
        fig.suptitle(f"{_TITLE[task]} on {res['dataset']}: accuracy and latency vs MACs")
        fig.tight_layout()
        path = os.path.join(out, f"pareto_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
