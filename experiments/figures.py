"""The plots the paper and the seed articles show, drawn with matplotlib:
a bar chart with error bars, accuracy against size, KD gain against size."""
from __future__ import annotations

from pathlib import Path

from engine.atomic import atomic_path
from experiments.plans import Plan

BAR, REF = "#3a7", "#777"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, table: dict) -> None:
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


def _size_accuracy(ax, table: dict) -> None:
    sized = [r for r in table["rows"] if r["x"]]
    refs = {r["x"]: r for r in table["references"] if r["x"]}
    xs = [refs[r["x"]]["params"] if r["x"] in refs else r["params"] for r in sized]
    ax.errorbar(xs, [100 * r["mean"] for r in sized], yerr=[100 * r["std"] for r in sized], marker="o", capsize=4,
                color=BAR, label="student (mean ± std)")
    for r, x in zip(sized, xs):
        ax.annotate(r["x"], (x, 100 * r["mean"]), fontsize=7, textcoords="offset points", xytext=(4, 4))
    for r in table["rows"]:
        if not r["x"]:
            ax.axhline(100 * r["mean"], color=REF, ls="--", lw=1)
            ax.annotate(r["label"], (min(xs), 100 * r["mean"]), fontsize=7, va="bottom", color=REF)
    ax.set_xscale("log")
    ax.set_xlabel(f"{table.get('x_title') or 'model'} parameters")
    ax.set_ylabel("student test accuracy (%)")
    ax.legend(fontsize=7)


def _size_gain(ax, table: dict) -> None:
    params = {r["variant"]: r["params"] for r in table["rows"]}
    cs = table["contrasts"]
    xs = [params[c["a"]] for c in cs]
    ys = [100 * c["mean"] for c in cs]
    err = [[100 * (c["mean"] - c["low"]) if c["low"] is not None else 0 for c in cs],
           [100 * (c["high"] - c["mean"]) if c["high"] is not None else 0 for c in cs]]
    label = f"BLKD - NOKD ({round(100 * table['confidence'])}% CI)"
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=BAR, label=label)
    ax.axhline(0, color=REF, lw=1)
    for c, x, y in zip(cs, xs, ys):
        ax.annotate(c["a"].removesuffix("-blkd"), (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("KD gain (percentage points)")
    ax.legend(fontsize=7)


DRAW = {"bar": _bars, "size-accuracy": _size_accuracy, "size-gain": _size_gain}


def draw(table: dict, plan: Plan, out: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    DRAW[plan.plot](ax, {**table, "x_title": plan.x_title})
    ax.set_title(table["title"], fontsize=9)
    fig.tight_layout()
    path = out / "accuracy.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return [path]
