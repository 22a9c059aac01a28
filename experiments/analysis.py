"""From a plan and its trainings' results to the experiment's table: mean ± std per variant,
paired differences with confidence intervals, and what each experiment asks on top."""
from __future__ import annotations

from engine.spec import TrainSpec
from engine.stats import seed_table
from experiments.plans import Plan, Row
from tasks.config import PipelineConfig

CONTRAST_KEYS = ("mean", "low", "high", "p", "p_holm", "beyond_noise", "beyond_noise_uncorrected")
Results = dict[str, dict]  # a TrainSpec's id -> its training's summary (test_acc, params, flops, ...)


def chain_gflops(cfg: PipelineConfig, spec: TrainSpec, results: Results) -> float:
    """Training compute per training image of this model and every model it learned from:
    3 x forward FLOPs per epoch (forward + backward), plus K cached views per guide."""
    seen: set[str] = set()

    def walk(s: TrainSpec, cached: bool) -> float:
        if s.id in seen:
            return 0.0
        seen.add(s.id)
        flops = results[s.id]["flops"]
        own = 3 * flops * s.train.epochs + (cfg.cache.views * flops if cached else 0)
        return own + sum(walk(g, True) for g in s.guides)

    return walk(spec, False) / 1e9


def _variants(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in rows))


def _accs(plan: Plan, cfg: PipelineConfig, results: Results, key: str) -> dict[str, dict[int, float]]:
    return {v: {r.seed: results[r.spec.id][key] for r in plan.rows if r.variant == v}
            for v in _variants(plan.rows)}


def analyse(plan: Plan, cfg: PipelineConfig, results: Results) -> dict:
    """Both model-selection protocols: the epoch best on validation (ours), and the best test epoch (what the
    TAKD and mdistiller code report), each as mean ± std with paired contrasts."""
    labels = {v: plan.label(v) for v in _variants(plan.rows)}
    table = seed_table(_accs(plan, cfg, results, "test_acc"), labels, plan.contrasts, cfg.experiments.confidence)
    best = seed_table(_accs(plan, cfg, results, "test_acc_best_epoch"), labels, plan.contrasts,
                      cfg.experiments.confidence)
    rows = []
    for row, by_test in zip(table["rows"], best["rows"]):
        first = next(r for r in plan.rows if r.variant == row["variant"])
        res = results[first.spec.id]
        seconds = [results[r.spec.id].get("train_seconds") for r in plan.rows if r.variant == row["variant"]]
        rows.append({**row, "x": first.x, "params": res["params"], "flops": res["flops"],
                     "train_seconds": sum(seconds) / len(seconds) if None not in seconds else None,
                     "chain_gflops_per_image": chain_gflops(cfg, first.spec, results),
                     "best_epoch": {k: by_test[k] for k in ("mean", "std", "per_seed")}})
    refs = [{"variant": r.variant, "label": r.label, "x": r.x, "test_acc": results[r.spec.id]["test_acc"],
             "test_acc_best_epoch": results[r.spec.id]["test_acc_best_epoch"],
             "params": results[r.spec.id]["params"]} for r in plan.references]
    contrasts = both_protocols(table, best)
    out = {"experiment": plan.name, "title": plan.title, "seeds": cfg.student.seeds,
           "confidence": cfg.experiments.confidence, "correction": table["correction"], "rows": rows, "references": refs, "contrasts": contrasts}
    if plan.name == "ta-sweep":
        out["rule_of_thumb"] = rule_of_thumb(rows, refs)
    return out


def both_protocols(table: dict, best: dict) -> list[dict]:
    """Each contrast of the validation-selected seed table, with the best-test-epoch one's numbers beside."""
    return [{**c, "best_epoch": {k: b[k] for k in CONTRAST_KEYS}} for c, b in zip(table["contrasts"], best["contrasts"])]


def reanalysed(table: dict) -> dict:
    """A written table's contrasts recomputed from its own per-seed accuracies (both protocols): for a report made
    before a change to the statistics, whose trainings are not at hand."""
    labels = {r["variant"]: r["label"] for r in table["rows"]}
    pairs, conf = [(c["a"], c["b"]) for c in table["contrasts"]], table["confidence"]

    def accs(per_seed) -> dict[str, dict[int, float]]:
        return {r["variant"]: {int(s): v for s, v in per_seed(r).items()} for r in table["rows"]}

    val = seed_table(accs(lambda r: r["per_seed"]), labels, pairs, conf)
    best = seed_table(accs(lambda r: r["best_epoch"]["per_seed"]), labels, pairs, conf)
    return {**table, "correction": val["correction"], "contrasts": both_protocols(val, best)}


def rule_of_thumb(rows: list[dict], refs: list[dict]) -> dict:
    """The paper's rule: the TA whose own accuracy is nearest the mean of the teacher's and the
    student's (NOKD) accuracy, beside the TA whose students measured best."""
    teacher = next(r["test_acc"] for r in refs if r["variant"] == "teacher")
    student = next(r["mean"] for r in rows if r["variant"] == "nokd")
    target = (teacher + student) / 2
    tas = {r["x"]: r["test_acc"] for r in refs if r["variant"].startswith("assistant-")}
    rule = min(tas, key=lambda a: abs(tas[a] - target))
    means = {r["x"]: r["mean"] for r in rows if r["variant"].startswith("via-")}
    best = max(means, key=means.get)
    return {"target_acc": target, "rule_pick": rule, "best_measured": best, "agree": rule == best,
            "best_minus_rule": means[best] - means[rule], "ta_acc": tas}
