"""An experiment's report: its table (Markdown, CSV, JSON metrics) and plots (PNG, and data for `dvc plots`),
made once per set of trainings, and logged on the invocation's MLflow parent run whether made now or reused."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from engine.atomic import atomic_path, save_json
from experiments import figures
from engine.errors import KDError
from experiments.analysis import Results, analyse, reanalysed
from experiments.plans import Plan
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.report import fmt_p, fmt_pp, markdown_table, verdict
from tasks.run_context import RunContext
from tasks.stage import Work, run_once
from tasks.train import key_inputs

REPORT_CODE = ("tasks/report.py", "tasks/figures.py", "experiments")
COLUMNS = ["variant", "label", "n", "mean", "std", "params", "chain_gflops_per_image", "train_seconds"]


def _rows_md(table: dict) -> list[dict]:
    return [{"variant": r["variant"], "label": r["label"],
             "test acc (%), val-selected": f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
             "per seed": " ".join(f"{100 * v:.2f}" for v in r["per_seed"].values()),
             "best test epoch (%)": f"{100 * r['best_epoch']['mean']:.2f} ± {100 * r['best_epoch']['std']:.2f}",
             "params": r["params"], "train GFLOP/img (chain)": f"{r['chain_gflops_per_image']:.3g}",
             "train s (mean)": "" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"}
            for r in table["rows"]]


def _contrasts_md(table: dict) -> list[dict]:
    return [{"difference": c["label"], "n": c["n"], "mean (pp)": fmt_pp(c["mean"]),
             "CI": f"[{fmt_pp(c['low'])}, {fmt_pp(c['high'])}]", "p": fmt_p(c["p"]), "p, Holm": fmt_p(c["p_holm"]),
             "beyond noise (Holm)": verdict(c),
             "best test epoch: mean (pp)": fmt_pp(c["best_epoch"]["mean"]),
             "CI ": f"[{fmt_pp(c['best_epoch']['low'])}, {fmt_pp(c['best_epoch']['high'])}]",
             "p, Holm ": fmt_p(c["best_epoch"]["p_holm"]), "beyond noise (Holm) ": verdict(c["best_epoch"])}
            for c in table["contrasts"]]


def markdown(table: dict) -> str:
    conf = round(100 * table["confidence"])
    rows = _rows_md(table)
    text = [f"## {table['title']}\n\n", f"Test accuracy, mean ± std over seeds {table['seeds']}, under two model-selection "
            "protocols: the epoch best on validation (ours), and the best test epoch (what the TAKD and mdistiller "
            "code report; optimistic, for comparison with papers only).\n\n", markdown_table(rows, list(rows[0]))]
    if table["references"]:
        refs = [{"model": r["label"], "test acc (%), val-selected": f"{100 * r['test_acc']:.2f}",
                 "best test epoch (%)": f"{100 * r['test_acc_best_epoch']:.2f}", "params": r["params"]}
                for r in table["references"]]
        text += ["\nTrained once, shared by every seed:\n\n", markdown_table(refs, list(refs[0]))]
    if table["contrasts"]:
        diffs = _contrasts_md(table)
        text += [f"\nPaired differences over seeds, percentage points: mean, {conf}% t-interval and paired t-test p per "
                 f"contrast; p adjusted by Holm–Bonferroni over the table's {table['contrasts'][0]['family']} "
                 f"contrasts (per protocol), and \"beyond noise\" read from it (adjusted p < "
                 f"{1 - table['confidence']:.2g}):\n\n",
                 markdown_table(diffs, list(diffs[0]))]
    if rule := table.get("rule_of_thumb"):
        agree = "they agree" if rule["agree"] else "they differ"
        text.append(f"\nRule of thumb (the TA whose accuracy is nearest {100 * rule['target_acc']:.2f}%, the mean of "
                    f"the teacher's and the NOKD student's): **{rule['rule_pick']}**; best measured: "
                    f"**{rule['best_measured']}** ({agree}; the best is "
                    f"{100 * rule['best_minus_rule']:.2f} points above the rule's pick, in mean over seeds).\n")
    return "".join(text)


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def metrics(table: dict) -> dict:
    """Flat numbers for `dvc metrics` and MLflow: per variant and per contrast."""
    out = {f"{r['variant']}_mean": r["mean"] for r in table["rows"]}
    out |= {f"{r['variant']}_std": r["std"] for r in table["rows"]}
    out |= {f"{r['variant']}_best_epoch_mean": r["best_epoch"]["mean"] for r in table["rows"]}
    out |= {f"{r['variant']}_acc": r["test_acc"] for r in table["references"]}
    for c in table["contrasts"]:
        out[f"{c['a']}_minus_{c['b']}"] = c["mean"]
        if c["low"] is not None:
            out |= {f"{c['a']}_minus_{c['b']}_{k}": c[k] for k in ("low", "high", "p", "p_holm")}
    return out


FILES = ("table.md", "table.csv", "plot.csv")


def write(table: dict, plan: Plan | None, out: Path) -> None:
    """Every file of the report; the plots only with the plan (they place the variants by it)."""
    texts = [markdown(table), _csv(table["rows"], COLUMNS),
             _csv([{**r, "mean": 100 * r["mean"], "std": 100 * r["std"]} for r in table["rows"]],
                  ["variant", "label", "x", "mean", "std", "params"])]
    for name, text in zip(FILES, texts):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    save_json(metrics(table), out / "metrics.json")
    save_json(table, out / "table.json")  # last: what the others were made from
    if plan is not None:
        figures.draw(table, plan, out)


def reanalyse(out: Path) -> dict:
    """Rewrite a report's tables (not its plots, which no statistic changes) with the contrasts recomputed from its
    table.json's per-seed accuracies: `takd experiments reanalyse NAME`."""
    path = out / "table.json"
    if not path.is_file():
        raise KDError(f"{path}: no report to reanalyse; `takd experiments run` makes it")
    table = json.loads(path.read_text())
    if any("best_epoch" not in r for r in table["rows"]):
        raise KDError(f"{path}: written before reports kept the best-test-epoch protocol's per-seed accuracies; "
                      "only a rerun of the experiment (`takd experiments run`) can remake it")
    table = reanalysed(table)
    write(table, None, out)
    return {c["label"]: {k: c[k] for k in ("mean", "p", "p_holm", "beyond_noise")} for c in table["contrasts"]}


def report_experiment(plan: Plan, cfg: PipelineConfig, cat: Catalog, ctx: RunContext, results: Results,
                      force: bool = False) -> dict:
    """Results must hold every training of the plan (their summaries, by TrainSpec id)."""
    name, out = f"report-{plan.name}", cat.experiment(plan.name) / "report"
    what = {"experiment": plan.name, "experiments": cfg.experiments.model_dump(), "seeds": cfg.student.seeds,
            "cache_views": cfg.cache.views}
    upstream = [cat.root / s.out for s in plan.trainings().values()]

    def make(key: str, folder: Path) -> dict:
        table = analyse(plan, cfg, results)
        write(table, plan, folder)
        return {"contrasts": {f"{c['a']} - {c['b']}": [c["mean"], c["low"], c["high"]] for c in table["contrasts"]},
                "means": {r["variant"]: r["mean"] for r in table["rows"]}}

    result = run_once(cat, Work(name, out, key_inputs(what, [], upstream, cat, name), REPORT_CODE, make), force)
    table = json.loads((out / "table.json").read_text())
    files = [out / f for f in (*FILES, "table.json", "metrics.json")] + figures.paths(plan, out)
    tracking.log_report(ctx, cfg, {"experiment": metrics(table)}, files, f"experiment {plan.name} ({cfg.data.name})")
    return result
