"""Plots shared by the pipeline's report and the experiments (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path

from engine.atomic import atomic_path

BAR, REF = "#3a7", "#777"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(ax, table: dict) -> None:
    """Mean test accuracy per variant with its std, every seed as a dot, and the references
    (teacher, TA) as dashed lines. `table` is shaped like engine.stats.seed_table's."""
    rows = table["rows"]
    xs = range(len(rows))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=4, color=BAR, alpha=0.85)
    for i, r in enumerate(rows):  # every seed as a dot: three seeds are too few to hide behind a bar
        vals = [100 * v for v in r["per_seed"].values()]
        ax.plot([i] * len(vals), vals, "k.", ms=4)
    for ref in table["references"]:
        ax.axhline(100 * ref["test_acc"], color=REF, ls="--", lw=1)
        ax.annotate(ref["label"], (len(rows) - 0.5, 100 * ref["test_acc"]), fontsize=7, ha="right", va="bottom",
                    color=REF)
    ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=25, ha="right", fontsize=7)
    lo = min(min(100 * v for v in r["per_seed"].values()) for r in rows)
    hi = max([100 * r["mean"] + 100 * r["std"] for r in rows] + [100 * f["test_acc"] for f in table["references"]])
    ax.set_ylim(lo - 0.3 * (hi - lo) - 0.1, hi + 0.1 * (hi - lo) + 0.1)
    ax.set_ylabel("test accuracy (%)")


def save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
    return path
