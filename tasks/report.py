"""Stage report: the NOKD / BLKD / TAKD comparison as a table, JSON metrics and plots,
logged on the MLflow parent run; the best student is registered with an alias."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from engine.atomic import atomic_path, save_json
from tasks import tracking
from tasks.catalog import MODELS, STUDENTS, Catalog
from tasks.config import PipelineConfig
from tasks.context import HISTORY_FILE
from tasks.stage import read_stage, run_once, stage_key

COLUMNS = ["model", "method", "arch", "test_acc", "test_top5", "best_val_acc", "teacher_agreement", "params",
           "size_bytes", "flops", "latency_ms_b1", "throughput_b256"]


def metric_key(name: str) -> str:
    return name.removeprefix("student-").replace("-", "_")


def _rows(cat: Catalog) -> list[dict]:
    rows = []
    for name in MODELS:
        result = json.loads(cat.evaluation(name).read_text())
        rows.append({"model": name, **{c: result.get(c) for c in COLUMNS[1:]}})
    return rows


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1.5 else f"{v:,.1f}"
    return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _histories(cat: Catalog) -> dict[str, list[dict]]:
    return {name: json.loads((cat.model(name) / HISTORY_FILE).read_text()) for name in MODELS}


def _plots(rows: list[dict], histories: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows]
    ax.bar(names, [100 * r["test_acc"] for r in rows], color=["#555", "#888"] + ["#3a7"] * (len(rows) - 2))
    lo = min(100 * r["test_acc"] for r in rows)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("NOKD / BLKD / TAKD on the test split")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    figs["comparison.png"] = fig
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, hist in histories.items():
        if hist:
            ax.plot([h["epoch"] for h in hist], [100 * h["val_acc"] for h in hist], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["curves.png"] = fig
    for fname, fig in figs.items():
        with atomic_path(out / fname) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)


def _write_curves(cat: Catalog, histories: dict[str, list[dict]]) -> None:
    """One file per model, so `dvc plots` draws one line each."""
    for name, hist in histories.items():
        rows = [{"epoch": h["epoch"], "val_acc": h["val_acc"], "train_acc": h["train_acc"]} for h in hist]
        save_json(rows, cat.metrics / "curves" / f"{name}.json")


def best_student(cat: Catalog) -> str:
    """The student to ship: best on validation, never chosen by the test split."""
    return max(STUDENTS, key=lambda m: json.loads(cat.evaluation(m).read_text()).get("best_val_acc") or 0)


def _register_best(cfg: PipelineConfig, cat: Catalog) -> dict | None:
    best = {"model": best_student(cat)}
    run_id = read_stage(cat.model(best["model"]))["result"].get("mlflow_run_id")
    if not (tracking.enabled() and run_id and cfg.tracking.log_models):
        return None
    return tracking.register(cat, run_id, cfg.tracking.registered_model, cfg.tracking.alias) | {"model": best["model"]}


def report(cfg: PipelineConfig, cat: Catalog, force: bool = False) -> dict:
    inputs = {"evaluate": stage_key(cat.eval_dir, "the evaluation"), "tracking": cfg.tracking.model_dump()}

    def work(key: str, out: Path) -> dict:
        rows = _rows(cat)
        metrics = {metric_key(r["model"]): {k: r[k] for k in ("test_acc", "params", "flops", "latency_ms_b1")
                                            if r[k] is not None} for r in rows}
        save_json(metrics, cat.metrics / "comparison.json")
        save_json([{"model": r["model"], "test_acc": r["test_acc"]} for r in rows], cat.metrics / "comparison_plot.json")
        histories = _histories(cat)
        _write_curves(cat, histories)
        with atomic_path(out / "comparison.md") as tmp:
            tmp.write_text(markdown_table(rows, COLUMNS))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(out / "comparison.csv") as tmp:
            tmp.write_text(buf.getvalue())
        _plots(rows, histories, out)
        # Selection of the model to ship uses validation accuracy, never the test split.
        registered = _register_best(cfg, cat)
        tracking.log_report(cfg, cat, metrics, [out / f for f in
                                                ("comparison.md", "comparison.csv", "comparison.png", "curves.png")])
        return {"test_acc": {m: v["test_acc"] for m, v in metrics.items()}, "registered": registered}

    result = run_once(cat, "report", "report", cat.reports, inputs, work, force)
    tracking.end_file_parent(cat)
    return result
