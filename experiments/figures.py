"""The plots the paper and the seed articles show, drawn with matplotlib:
a bar chart with error bars, accuracy against size, KD gain against size."""
from __future__ import annotations

from pathlib import Path

from experiments.plans import Plan
from tasks.figures import BAR, REF, bars, pyplot, save


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


DRAW = {"bar": bars, "size-accuracy": _size_accuracy, "size-gain": _size_gain}


def paths(plan: Plan, out: Path) -> list[Path]:
    return [out / "accuracy.png"]


def draw(table: dict, plan: Plan, out: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(7.5, 4))
    DRAW[plan.plot](ax, {**table, "x_title": plan.x_title})
    ax.set_title(table["title"], fontsize=9)
    fig.tight_layout()
    save(fig, paths(plan, out)[0])
