"""Stage report: NOKD / BLKD / TAKD over the student seeds, as mean ± std with the paired
differences and their confidence intervals; a table, JSON metrics for `dvc metrics`, plots for
`dvc plots`, all logged on the MLflow parent run."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from engine.atomic import atomic_path, save_json
from engine.spec import TrainSpec
from engine.stats import seed_table
from engine.workspace import HISTORY_FILE
from tasks import tracking
from tasks.catalog import CURVES, METRICS_FILE, PLOT_FILE, Catalog
from tasks.config import PipelineConfig
from tasks.figures import BAR, REF, bars, pyplot, save
from tasks.run_context import RunContext
from tasks.stage import StageRun
from tasks.stages import specs, students

COLUMNS = ["model", "method", "seed", "arch", "test_acc", "test_top5", "best_val_acc", "teacher_agreement", "params",
           "size_bytes", "flops", "latency_ms_b1", "throughput_b256", "int8_test_acc", "int8_agreement"]
# What `after` publishes from the report folder.
PUBLISHED = {METRICS_FILE: "metrics.json", PLOT_FILE: "comparison_plot.json", CURVES: "curves"}
REPORT_FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png", "curves.png")
# INT8 (engine/quantize.py, ONNX Runtime): the model QAD starts from, in fp32 and quantized after training (PTQ),
# against the QAD student quantized; 'qad_fp32' (QAD's weights unquantized) says how much is only more training.
INT8_LABELS = {"fp32": "fp32", "ptq": "PTQ INT8", "qad": "QAD INT8", "qad_fp32": "QAD weights, fp32"}
INT8_CONTRASTS = [("ptq", "fp32"), ("qad", "ptq"), ("qad", "fp32"), ("qad", "qad_fp32")]
INT8_COST = ("size_bytes", "latency_ms_b1", "throughput_b256")


def _evaluations(cat: Catalog, models: dict[str, TrainSpec]) -> dict[str, dict]:
    return {name: json.loads(cat.evaluation(name).read_text()) for name in models}


def variants(cfg: PipelineConfig) -> dict[str, str]:
    """Each model's key in the report: a student's row says it (nokd, blkd, ...); the teacher and TA are their names."""
    found = {s.name: m.variant for s, m in students(cfg)}
    return {name: found.get(name, name) for name in specs(cfg)}


def comparison(cfg: PipelineConfig, evals: dict[str, dict]) -> dict:
    """The seed table (engine.stats.seed_table) of the students, compared as their rows in the stage table say,
    with the teacher and TA beside."""
    accs: dict[str, dict[int, float]] = {}
    labels, contrasts = {}, []
    for s, m in students(cfg):
        if m.quantized and cfg.quantize.qad_epochs == 0:  # QAD off: the student is a copy of its start, left out
            continue
        accs.setdefault(m.variant, {})[s.seed] = evals[s.name]["test_acc"]
        labels[m.variant] = m.label or m.method
        contrasts += [(m.variant, v) for v in m.versus if (m.variant, v) not in contrasts]
    table = seed_table(accs, labels, contrasts, cfg.experiments.confidence)
    refs = [{"variant": name, "label": f"{s.role} {evals[name]['arch']}", "test_acc": evals[name]["test_acc"]}
            for name, s in specs(cfg).items() if s.role != "student" and evals[name]["test_acc"] is not None]
    chain = f"{cfg.teacher.arch} -> {cfg.assistant.arch} -> {cfg.student.arch}"
    return {**table, "references": refs, "seeds": cfg.student.seeds, "data": cfg.data.name,
            "title": f"{cfg.data.name}: {chain}, students over seeds {cfg.student.seeds}"}


def int8_comparison(cfg: PipelineConfig, evals: dict[str, dict]) -> dict | None:
    """fp32, PTQ INT8 and QAD INT8 over the seeds, paired; None when no model was quantized. The cost columns
    (ONNX Runtime, this CPU) are the first seed's."""
    qad = [s for s in specs(cfg).values() if s.quantized and s.init]
    if not (qad and cfg.quantize.evaluate):
        return None
    accs: dict[str, dict[int, float]] = {"fp32": {}, "ptq": {}, "qad": {}, "qad_fp32": {}}
    cost: dict[str, dict] = {}
    for s in qad:
        start, own = evals[s.init.name], evals[s.name]
        for variant, figures, key in (("fp32", start, "test_acc"), ("ptq", start, "int8_test_acc"),
                                      ("qad", own, "int8_test_acc"), ("qad_fp32", own, "test_acc")):
            accs[variant][s.seed] = figures[key]
        for variant, figures, kind in (("fp32", start, "onnx"), ("ptq", start, "int8"), ("qad", own, "int8")):
            cost.setdefault(variant, {k: figures.get(f"{kind}_{k}") for k in INT8_COST}
                            | {"agreement": figures.get(f"{kind}_agreement")})
    contrasts = INT8_CONTRASTS
    if cfg.quantize.qad_epochs == 0:  # the 'QAD' student is its start as is: only PTQ is measured
        accs, contrasts = {k: accs[k] for k in ("fp32", "ptq")}, INT8_CONTRASTS[:1]
    table = seed_table(accs, INT8_LABELS, contrasts, cfg.experiments.confidence)
    for row in table["rows"]:
        row |= cost.get(row["variant"], {})
    return table


def metrics(table: dict, evals: dict[str, dict], keys: dict[str, str]) -> dict:
    """For `dvc metrics show` (one column each) and the MLflow parent run. Size and speed are the first seed's."""
    cost = ("params", "flops", "latency_ms_b1")
    first: dict[str, dict] = {}
    for name, variant in keys.items():
        first.setdefault(variant, evals[name])
    out = {}
    for r in table["references"]:
        out[r["variant"]] = {"test_acc": r["test_acc"], **{k: first[r["variant"]].get(k) for k in cost}}
    for r in table["rows"]:
        out[r["variant"]] = {"test_acc_mean": r["mean"], "test_acc_std": r["std"], "n": r["n"],
                             **{k: first[r["variant"]].get(k) for k in cost}}
    for c in table["contrasts"]:
        out[f"{c['a']}_minus_{c['b']}"] = {k: c[k] for k in CONTRAST_METRICS}
    int8 = table.get("int8")
    for r in int8["rows"] if int8 else []:
        out[f"int8_{r['variant']}"] = {"test_acc_mean": r["mean"], "test_acc_std": r["std"], "n": r["n"],
                                       **{k: r.get(k) for k in INT8_COST}}
    for c in int8["contrasts"] if int8 else []:
        out[f"int8_{c['a']}_minus_{c['b']}"] = {k: c[k] for k in CONTRAST_METRICS}
    return out


CONTRAST_METRICS = ("mean", "low", "high", "p", "p_holm", "beyond_noise")


def fmt_pp(v) -> str:
    """A difference of accuracies in percentage points, signed."""
    return "" if v is None else f"{100 * v:+.2f}"


def fmt_p(v) -> str:
    return "" if v is None else f"{v:.2g}" if v < 0.01 else f"{v:.3f}"


def verdict(c: dict) -> str:
    """A contrast's corrected verdict, and the per-contrast one where it differs."""
    if c["beyond_noise"] == c["beyond_noise_uncorrected"]:
        return "**yes**" if c["beyond_noise"] else "no"
    return "no (yes uncorrected)"


def _summary(rows: list[dict]) -> list[dict]:
    return [{"method": r["label"], "test acc (%)": f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
             "per seed": " ".join(f"{100 * v:.2f}" for v in r["per_seed"].values())} for r in rows]


def _diffs(table: dict) -> str:
    conf = round(100 * table["confidence"])
    diffs = [{"difference": c["label"], "mean (pp)": fmt_pp(c["mean"]),
              f"{conf}% CI": f"[{fmt_pp(c['low'])}, {fmt_pp(c['high'])}]", "seeds": c["n"], "p": fmt_p(c["p"]), "p, Holm": fmt_p(c["p_holm"]), "beyond noise (Holm)": verdict(c)}
             for c in table["contrasts"]]
    return (f"\nPaired differences by seed, percentage points: {conf}% t-interval and paired t-test p per contrast; p "
            f"adjusted by Holm–Bonferroni over the table's {table['contrasts'][0]['family']} contrasts, \"beyond noise\" "
            f"read from it:\n\n"
            + markdown_table(diffs, list(diffs[0])))


def _int8_markdown(int8: dict) -> str:
    rows = [{**s, "agreement with fp32 (%)": "" if r.get("agreement") is None else f"{100 * r['agreement']:.2f}",
             "size (KB)": "" if r.get("size_bytes") is None else f"{r['size_bytes'] / 1024:,.1f}",
             "latency b1 (ms)": r.get("latency_ms_b1"), "throughput b256 (img/s)": r.get("throughput_b256")}
            for s, r in zip(_summary(int8["rows"]), int8["rows"])]
    return ("\n## INT8: fp32, post-training quantization (PTQ) and quantization-aware distillation (QAD)\n\n"
            "ONNX files run by ONNX Runtime on this CPU; accuracy over the seeds, agreement, size and speed of the "
            "first seed's files:\n\n" + markdown_table(rows, list(rows[0])) + _diffs(int8))


def how_timed(timing: dict | None) -> str:
    """How the latency and throughput columns were measured (the evaluate stage records it)."""
    if not timing:
        return ""
    return (f"\nLatency (batch 1) and throughput (batch 256): medians of {timing['repeats']} timed repeats on "
            f"{timing['device']} ({timing['cpu']}), {timing['torch_threads']} torch threads, in {timing['process']}.\n")


def markdown(table: dict, rows: list[dict], timing: dict | None = None) -> str:
    summary = _summary(table["rows"])
    summary += [{"method": r["label"], "test acc (%)": f"{100 * r['test_acc']:.2f}", "per seed": "(trained once)"}
                for r in table["references"]]
    return "".join([f"## {table['title']}\n\n", "Test accuracy, mean ± std over the student seeds:\n\n",
                    markdown_table(summary, list(summary[0])), _diffs(table),
                    _int8_markdown(table["int8"]) if table.get("int8") else "",
                    "\nEvery model:\n\n", markdown_table(rows, COLUMNS), how_timed(timing)])


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


def _comparison_png(table: dict, out: Path) -> Path:
    """Left: accuracy per method (mean ± std, each seed a dot). Right: each paired difference with its interval."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    bars(left, table)
    left.set_title(table["title"], fontsize=8)
    cs = [c for c in table["contrasts"] if c["low"] is not None]
    per_seed = {r["variant"]: r["per_seed"] for r in table["rows"]}
    for i, c in enumerate(cs):
        right.errorbar([100 * c["mean"]], [i], xerr=[[100 * (c["mean"] - c["low"])], [100 * (c["high"] - c["mean"])]],
                       fmt="o", capsize=4, color=BAR)
        diffs = [100 * (per_seed[c["a"]][s] - per_seed[c["b"]][s]) for s in c["seeds"]]
        right.plot(diffs, [i + 0.15] * len(diffs), "k.", ms=4)
    right.axvline(0, color=REF, lw=1)
    right.set_yticks(range(len(cs)), [c["label"] for c in cs], fontsize=7)
    right.set_xlabel(f"difference, percentage points ({round(100 * table['confidence'])}% CI)")
    fig.tight_layout()
    return save(fig, out / "comparison.png")


def _curves_png(histories: dict[str, list[dict]], out: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    for name, hist in histories.items():
        if hist:
            ax.plot([h["epoch"] for h in hist], [100 * h["val_acc"] for h in hist], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save(fig, out / "curves.png")


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def work(run: StageRun) -> dict:
    """Everything into the staging folder; `after` publishes it (data/metrics, the MLflow parent)."""
    cfg, cat, out = run.cfg, run.cat, run.out
    models = specs(cfg)
    evals = _evaluations(cat, models)
    rows = [{"model": name, **{c: evals[name].get(c) for c in COLUMNS[1:]}} for name in models]
    table = {**comparison(cfg, evals), "int8": int8_comparison(cfg, evals)}
    histories = {name: json.loads((cat.model(name) / HISTORY_FILE).read_text()) for name in models}
    save_json(table, out / "comparison.json")
    save_json(metrics(table, evals, variants(cfg)), out / PUBLISHED[METRICS_FILE])
    save_json([{"method": r["label"], "test_acc": r["mean"]} for r in table["rows"]], out / PUBLISHED[PLOT_FILE])
    for name, hist in histories.items():  # one file per model, so `dvc plots` draws one line each
        save_json([{"epoch": h["epoch"], "val_acc": h["val_acc"], "train_acc": h["train_acc"]} for h in hist],
                  out / PUBLISHED[CURVES] / f"{name}.json")
    _write_text(out / "comparison.md", markdown(table, rows, next(iter(evals.values())).get("timing")))
    _write_text(out / "comparison.csv", _csv(rows))
    _comparison_png(table, out)
    _curves_png(histories, out)
    return {"means": {r["variant"]: r["mean"] for r in table["rows"]},
            "contrasts": {f"{c['a']} - {c['b']}": [c["mean"], c["low"], c["high"]] for c in table["contrasts"]}}


def after(cfg: PipelineConfig, cat: Catalog, ctx: RunContext, result: dict) -> dict:
    """Publish the report, whether it ran now or was reused: its metrics and plot data where `dvc metrics` and
    `dvc plots` read them (the curves folder replaced whole, so a dropped seed's curve goes), and its table and
    plots on this invocation's MLflow parent run."""
    for target, name in PUBLISHED.items():
        source, dest = cat.reports / name, cat.root / target
        if source.is_dir():
            staging = dest.with_name(dest.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        else:
            with atomic_path(dest) as tmp:
                shutil.copyfile(source, tmp)
    numbers = json.loads((cat.reports / PUBLISHED[METRICS_FILE]).read_text())
    tracking.log_report(ctx, cfg, numbers, [cat.reports / f for f in REPORT_FILES], tracking.pipeline_name(cfg))
    return {}
