"""Experiments: statistics and DGKD by hand, plans that share trainings, a whole experiment on
tiny data, and concurrent runs (threads, a real Dask LocalCluster) giving the sequential models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import KDConfig
from engine.errors import KDError
from engine.losses import Batch, build_loss, kl_soft
from engine.soft_targets import DenseGuides
from engine.stats import holm, paired_difference, seed_table, summary
from experiments.plans import PLANS, build_plan
from tasks.config import load_config


def test_summary_and_paired_interval_by_hand():
    assert summary([0.9]) == {"mean": 0.9, "std": 0.0, "n": 1}
    a = {0: 0.90, 1: 0.92, 2: 0.91}
    b = {0: 0.89, 1: 0.90, 2: 0.905, 7: 0.5}  # seed 7 has no partner: left out
    d = paired_difference(a, b)
    # diffs 0.01, 0.02, 0.005: mean 0.011667, sd 0.0076376, t(0.975, 2) = 4.302653
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.0116667, abs=1e-6)
    assert d["std"] == pytest.approx(0.0076376, abs=1e-6)
    half = 4.302653 * 0.0076376 / math.sqrt(3)
    assert d["low"] == pytest.approx(0.0116667 - half, abs=1e-5)
    assert d["high"] == pytest.approx(0.0116667 + half, abs=1e-5)
    assert d["beyond_noise"] is False
    clear = paired_difference({0: 0.95, 1: 0.96, 2: 0.955}, {0: 0.90, 1: 0.91, 2: 0.904})
    assert clear["beyond_noise"] is True and clear["low"] > 0
    one = paired_difference({0: 0.9}, {0: 0.8})
    assert one["low"] is None and one["beyond_noise"] is False


def test_paired_p_value_is_scipys_paired_t_test_and_agrees_with_the_interval():
    from scipy import stats

    a, b = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.93}, {0: 0.89, 1: 0.90, 2: 0.905, 3: 0.915}
    d = paired_difference(a, b)
    assert d["p"] == pytest.approx(stats.ttest_rel(list(a.values()), list(b.values())).pvalue, rel=1e-9)
    assert (d["p"] < 0.05) == d["beyond_noise"]  # the interval excludes 0 exactly when the test rejects
    same = paired_difference({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same["p"] == 1.0 and same["beyond_noise"] is False


def test_holm_by_hand_and_beyond_noise_read_from_the_corrected_column():
    # p sorted 0.01, 0.02, 0.04 over m = 3: 3 x 0.01 = 0.03, max(0.03, 2 x 0.02) = 0.04, max(0.04, 1 x 0.04) = 0.04
    contrasts = [{"p": 0.04, "beyond_noise": True}, {"p": 0.01, "beyond_noise": True},
                 {"p": None, "beyond_noise": False}, {"p": 0.02, "beyond_noise": True}]
    out = holm(contrasts, 0.95)
    assert [c["p_holm"] for c in out] == [pytest.approx(0.04), pytest.approx(0.03), None, pytest.approx(0.04)]
    assert [c["beyond_noise"] for c in out] == [True, True, False, True]
    assert {c["family"] for c in out} == {3}  # a contrast with no p-value (one seed) is not in the family
    strict = holm([{"p": 0.03, "beyond_noise": True}, {"p": 0.04, "beyond_noise": True}], 0.95)
    # 2 x 0.03 = 0.06: neither survives, though each interval alone excludes 0
    assert [(c["beyond_noise"], c["beyond_noise_uncorrected"]) for c in strict] == [(False, True), (False, True)]


def test_seed_table_corrects_over_its_own_contrasts():
    accs = {"a": {0: 0.95, 1: 0.96, 2: 0.955}, "b": {0: 0.90, 1: 0.91, 2: 0.904}, "c": {0: 0.9, 1: 0.92, 2: 0.91}}
    t = seed_table(accs, {}, [("a", "b"), ("c", "b")])
    alone = [paired_difference(accs[x], accs["b"]) for x in ("a", "c")]
    assert t["correction"] == "holm" and [c["family"] for c in t["contrasts"]] == [2, 2]
    assert [c["p_holm"] for c in t["contrasts"]] == [pytest.approx(min(1.0, 2 * min(d["p"] for d in alone))),
                                                     pytest.approx(max(d["p"] for d in alone))]


def test_kd_with_several_guides_is_their_mean_by_hand():
    s = torch.zeros(1, 2)
    t1 = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    # KL([.75,.25] || [.5,.5]) = .75 ln 1.5 + .25 ln .5 = 0.130812
    assert kl_soft(s, t1, 1.0).item() == pytest.approx(0.130812, abs=1e-6)
    loss = build_loss("kd", KDConfig(temperature=1.0))
    y = torch.tensor([0])
    one = loss(Batch(s, y, t1), 1.0)["kd"]
    both = loss(Batch(s, y, torch.stack([t1, torch.zeros(1, 2)])), 1.0)["kd"]  # the second guide: KL 0
    assert one.item() == pytest.approx(0.130812, abs=1e-6)
    assert both.item() == pytest.approx(0.130812 / 2, abs=1e-6)


def test_dense_guides_drop_guides_but_keep_one():
    guides = [lambda idx, view, x, v=v: torch.full((len(idx), 3), float(v)) for v in range(4)]
    idx = view = torch.arange(5)
    all_kept = DenseGuides(guides, 1.0, torch.Generator().manual_seed(0), [1, 2, 3, 4])(idx, view)
    assert all_kept.logits.shape == (4, 5, 3) and all_kept.logits[:, 0, 0].tolist() == [0, 1, 2, 3]
    assert all_kept.weights.tolist() == [1, 2, 3, 4]  # each kept guide keeps its own weight
    rare = DenseGuides(guides, 1e-6, torch.Generator().manual_seed(0))
    assert {rare(idx, view).logits.shape[0] for _ in range(20)} == {1}
    draws = [[DenseGuides(guides, 0.5, torch.Generator().manual_seed(3))(idx, view).logits[:, 0, 0].tolist()
              for _ in range(1)] for _ in range(2)]
    assert draws[0] == draws[1]  # the generator decides: a resumed run drops the same guides


@pytest.fixture
def cfg(fashion_dir, tmp_path):
    from tests.conftest import tiny_overrides

    return load_config(None, tiny_overrides(fashion_dir, tmp_path) | {
        "teacher.arch": "plain-6", "assistant.arch": "plain-4", "student.seeds": [0, 1],
        "experiments.ta_sizes": ["plain-4"], "experiments.path_sizes": ["plain-4", "plain-2"],
        "experiments.teacher_sizes": ["plain-4", "plain-6"], "experiments.student_sizes": ["plain-2", "plain-4"],
        "experiments.equal_epochs": 2, "experiments.generations": 1, "data.train_subset": 200,
        "teacher.train.epochs": 2, "experiments.early_stops": [0.5]})


def test_plans_share_trainings_across_experiments(cfg):
    plans = {name: build_plan(name, cfg) for name in PLANS}
    ids = {name: set(p.trainings()) for name, p in plans.items()}
    comparison = plans["comparison"]
    teacher = comparison.select("teacher")[0].spec.id
    assert all(teacher in ids[n] for n in ("comparison", "ta-sweep", "student-sweep", "paths"))
    # Teacher and TA train once, whatever the number of seeds: 2 seeds x 3 methods + 2.
    assert len(ids["comparison"]) == 8
    nokd = {r.spec.id for r in comparison.select("nokd")}
    assert nokd <= ids["ta-sweep"] and nokd <= ids["teacher-sweep"] and nokd <= ids["paths"]
    # 2 intermediate sizes: 2^2 - 1 chains beside BLKD, plus DGKD, NOKD, BLKD.
    paths = plans["paths"]
    assert [v for v in dict.fromkeys(r.variant for r in paths.rows)] == \
        ["nokd", "blkd", "via-plain-4", "via-plain-2", "via-plain-4_plain-2", "dgkd", "stopped-e1", "progressive"]
    dgkd = paths.select("dgkd", 0)[0].spec
    assert [g.arch for g in dgkd.guides] == ["plain-6", "plain-4", "plain-2"]
    assert [len(g.guides) for g in dgkd.guides] == [0, 1, 2] and dgkd.survival == 0.75
    # Equal compute: each seed its own half-length teacher; E epochs from labels is the NOKD student when E
    # equals the student's epochs, and the same job is shared.
    eq = plans["equal-compute"]
    assert eq.select("distill", 1)[0].spec.guides[0].train.epochs == 1 and eq.select("distill", 1)[0].spec.guides[0].seed == 1
    assert eq.select("born-again-1", 0)[0].spec.guides[0] == eq.select("labels", 0)[0].spec
    with pytest.raises(Exception, match="unknown experiment"):
        build_plan("nope", cfg)


def test_cache_views_plan_reads_each_k_from_a_cache_of_its_own(cfg, tmp_path, monkeypatch):
    """K cached views per arm, each from its own folder beside the default cache; the default K is the BLKD student
    every plan shares; the online arm reads no cache and sees a fresh view at every step."""
    from experiments.run import CACHE, needs, steps
    from tasks.catalog import Catalog

    plan = build_plan("cache-views", cfg)
    assert plan.select("k2", 0)[0].spec.id == build_plan("comparison", cfg).select("blkd", 0)[0].spec.id
    caches = {st.job.split(".")[-1]: st for st in steps(plan) if st.kind == CACHE}
    assert {k: (st.made.views, st.spec.targets.rsplit("/", 1)[1]) for k, st in caches.items()} == {
        "soft_targets-k1": (1, "soft_targets-k1"), plan.select("teacher")[0].spec.id: (2, "soft_targets"),
        "soft_targets-k8": (8, "soft_targets-k8")}
    assert plan.contrasts == [("k1", "k2"), ("k8", "k2"), ("online", "k2"), ("online", "k8")]
    teacher_id = plan.select("teacher")[0].spec.id
    by_job = {st.job: st for st in steps(plan, seed=0)}
    assert needs(by_job[plan.select("online", 0)[0].spec.id]) == [f"train:{teacher_id}"]  # no cache: the teacher
    assert needs(by_job[plan.select("k1", 0)[0].spec.id]) == [f"cache:{teacher_id}.soft_targets-k1"]
    online_cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"online": True})})
    assert [r.spec.use.online for r in build_plan("cache-views", online_cfg).select("k*", 0)] == [False] * 3
    with pytest.raises(Exception, match="each K once"):
        load_config(None, {"experiments.cache_views": [2, 2]})
    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    cat = Catalog(tmp_path)
    results = {**_run_rows(plan, cfg, cat, "k1", 0), **_run_rows(plan, cfg, cat, "online", 0)}
    teacher = tmp_path / plan.select("teacher")[0].spec.out
    manifest = json.loads((teacher.parent / "soft_targets-k1" / "manifest.json").read_text())
    assert manifest["shape"][0] == 1 and not (teacher.parent / "soft_targets").exists()
    online = json.loads((tmp_path / plan.select("online", 0)[0].spec.out / "model.json").read_text())
    assert online["teacher_views"] == "fresh" and online["teacher_mode"] == "online"
    assert all(r["train_seconds"] > 0 for sid, r in results.items() if sid.startswith("student"))


def _fingerprints(root):
    return {p.parent.parent.name: json.loads(p.read_text())["result"]["model_fingerprint"]
            for p in (root / "data" / "zoo").glob("*/model/stage.json")}


def _run_rows(plan, cfg, cat, variant="*", seed=None):
    """What one DVC matrix stage does: the rows' trainings, each launched in a process of its own."""
    from experiments.run import run_rows
    from tasks.launch import config_file
    from tasks.run_context import RunContext

    ctx = RunContext.resolve(cat.root)
    return run_rows(plan, cfg, cat, ctx, config_file(cfg, cat, "test"), variant, seed)


def test_tas_in_time_are_the_teachers_own_run_stopped_early(cfg, tmp_path, monkeypatch, caplog):
    """An early-stopped teacher is the teacher's run cut after its first epochs (same schedule, same first
    epochs to the last digit); progressive distillation reads it, then the teacher, in turn."""
    from tasks.catalog import Catalog

    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    cat = Catalog(tmp_path)
    plan = build_plan("paths", cfg)
    teacher = plan.select("blkd", 0)[0].spec.guides[0]
    progressive = plan.select("progressive", 0)[0].spec
    stopped, last = progressive.guides
    assert last == teacher and progressive.kd.ensemble.combine == "sequence"
    assert stopped.stop_after == 1 and stopped.model_copy(update={"stop_after": None}).id == teacher.id
    assert plan.select("stopped-e1", 0)[0].spec.guides == (stopped,)
    _run_rows(plan, cfg, cat, "progressive", 0)
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "images_per_second")} for e in h]
    history = {s.stop_after: json.loads((tmp_path / s.out / "history.json").read_text()) for s in (stopped, teacher)}
    assert len(history[1]) == 1 and strip(history[1]) == strip(history[None][:1]) and len(history[None]) == 2
    # Fractions that round to the first epoch, twice, or to the whole run: one TA in time, and the user told.
    odd = cfg.model_copy(update={"experiments": cfg.experiments.model_copy(update={"early_stops": [0.2, 0.4, 0.9]})})
    with caplog.at_level("WARNING"):
        odd_plan = build_plan("paths", odd)
    assert [v for v in dict.fromkeys(r.variant for r in odd_plan.rows)][-2:] == ["stopped-e1", "progressive"]
    assert [g.stop_after for g in odd_plan.select("progressive", 0)[0].spec.guides] == [1, None]
    assert "give epochs [0, 1, 2]; only those from 1 to 1, each once, are TAs in time: [1]" in caplog.text


def test_experiment_end_to_end_on_tiny_data(cfg, tmp_path, monkeypatch):
    from experiments.report import reanalyse, report_experiment
    from tasks.catalog import Catalog
    from tasks.run_context import RunContext

    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    cat = Catalog(tmp_path)
    plan = build_plan("ta-sweep", cfg)
    part = _run_rows(plan, cfg, cat, "via-*", 1)  # that row and its guides
    assert {r.split("-s")[0] for r in part} == {"teacher-plain-6", "assistant-plain-4", "student-plain-2"}
    results = _run_rows(plan, cfg, cat)
    assert all(results[j]["reused"] for j in part)
    ctx = RunContext.resolve(tmp_path)
    out = report_experiment(plan, cfg, cat, ctx, results)
    folder = cat.experiment("ta-sweep") / "report"
    table = json.loads((folder / "table.json").read_text())
    blkd = next(r for r in table["rows"] if r["variant"] == "blkd")
    by_seed = {r.seed: results[r.spec.id]["test_acc"] for r in plan.select("blkd")}
    assert {int(k): v for k, v in blkd["per_seed"].items()} == by_seed  # JSON keys are strings
    assert blkd["mean"] == pytest.approx(sum(by_seed.values()) / 2)
    seconds = [results[r.spec.id]["train_seconds"] for r in plan.select("blkd")]
    assert blkd["train_seconds"] == pytest.approx(sum(seconds) / 2) and min(seconds) > 0
    assert table["rule_of_thumb"]["rule_pick"] == "plain-4"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["blkd_mean"] == pytest.approx(blkd["mean"]) and "via-plain-4_minus_blkd_low" in metrics
    assert "Rule of thumb" in (folder / "table.md").read_text()
    assert (folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert out["reused"] is False and report_experiment(plan, cfg, cat, ctx, results)["reused"] is True
    # A report written before the correction existed: reanalysed from its own per-seed numbers, it is what the
    # trainings give.
    stale = {**table, "contrasts": [{k: v for k, v in c.items() if k not in ("p", "p_holm", "family")}
                                    for c in table["contrasts"]]}
    (folder / "table.json").write_text(json.dumps(stale))
    reanalyse(folder)
    assert json.loads((folder / "table.json").read_text())["contrasts"] == table["contrasts"]


def test_concurrent_runners_give_the_sequential_models(cfg, tmp_path, prefect_server, monkeypatch):
    """The same plan three ways: one training after another, on 2 threads of a flow, and (its BLKD row, which needs
    the teacher and its cache) on a real Dask LocalCluster of 2 worker processes; each training in a process of its
    own. Every model's weights are identical."""
    from flows.experiment import FLOWS, task_runner
    from tasks.catalog import Catalog

    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"seeds": [0]})})
    roots = {name: tmp_path / name for name in ("sequential", "threads", "dask")}
    monkeypatch.setenv("KD_PROJECT_ROOT", str(roots["sequential"]))
    _run_rows(build_plan("comparison", cfg), cfg, Catalog(roots["sequential"]))
    expected = _fingerprints(roots["sequential"])
    assert len(expected) == 5  # teacher, TA, and three students
    for name, runner, variant, made in (("threads", task_runner(), "*", 5), ("dask", task_runner(dask_workers=2), "b*", 2)):
        monkeypatch.setenv("KD_PROJECT_ROOT", str(roots[name]))
        result = FLOWS["comparison"].with_options(task_runner=runner)(cfg, variant, workers=2)
        assert len(result["trained"]) == made and bool(result["report"]) == (variant == "*")
        found = _fingerprints(roots[name])
        assert len(found) == made and found.items() <= expected.items(), name


def test_experiment_flow_logs_table_and_plot_to_mlflow(cfg, tmp_path, prefect_server, monkeypatch):
    from mlflow import MlflowClient

    from flows.experiment import FLOWS

    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("KD_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"log_models": False}),
                                 "student": cfg.student.model_copy(update={"seeds": [0]})})
    FLOWS["comparison"](cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"{cfg.tracking.experiment}-experiments")  # apart from the pipeline's runs
    assert client.get_experiment_by_name(cfg.tracking.experiment) is None
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "experiment")
    assert parent.info.run_name == "experiment comparison (fashion-mnist)" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.csv", "accuracy.png", "metrics.json"} <= artifacts
    assert parent.data.metrics["experiment_takd_mean"] == pytest.approx(
        json.loads((tmp_path / "data/experiments/comparison/report/table.json").read_text())["rows"][2]["mean"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5 and all("test_acc" in r.data.metrics for r in children)
    assert len(runs) == 6  # the parent and its five trainings: the report logged into the parent, opened nothing


def test_experiments_dvc_yaml_is_generated_and_every_stage_trains_rows_of_its_plan():
    """The committed experiments/dvc.yaml is what the plans and params.yaml generate; as DVC resolves it, each
    job stage selects rows of its plan, writes the record its command writes, and every row has a stage."""
    import shlex
    from pathlib import Path

    from dvc.repo import Repo

    from experiments import dvc_yaml
    from experiments.cli import build_parser, record_path
    from tasks.catalog import Catalog

    root = Path(__file__).resolve().parents[1]
    assert (root / dvc_yaml.PATH).read_text() == dvc_yaml.generate(root), "run `takd dvc-yaml` and commit it"
    cfg = load_config(root / "params.yaml")
    stages = [s for s in Repo(str(root)).index.stages if "experiments job" in (s.cmd or "")]
    covered = set()
    for stage in stages:
        args = build_parser().parse_args(shlex.split(stage.cmd)[3:])
        rows = build_plan(args.name, cfg).select(args.variant, args.seed)
        assert rows, stage.cmd
        covered |= {(args.name, r.variant, r.seed) for r in rows}
        out = Path(record_path(Catalog(root), args.name, args.variant, args.seed))
        assert [o.fs_path for o in stage.outs] == [str(out)], stage.cmd
    assert covered == {(n, r.variant, r.seed) for n in PLANS for r in build_plan(n, cfg).rows}


def test_cli_names_what_is_wrong(tmp_path, monkeypatch, capsys):
    from experiments.cli import main

    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    params = tmp_path / "p.yaml"
    params.write_text("student: {seeds: [0, 1]}\n")
    assert main(["job", "comparison", "--params", str(params), "--variant", "bkld"]) == 2
    err = capsys.readouterr().err
    assert "no rows match --variant 'bkld'" in err and "nokd, blkd, takd" in err and "[0, 1]" in err
    from takd.cli import main as takd_main

    assert takd_main(["experiments", "run", "ta-sweep", "--params", str(params), "--experiments.ta_sizes", "[plain-3]"]) == 2
    assert "experiments.ta_sizes" in capsys.readouterr().err
    listing = main(["list", "--params", str(params)])
    assert listing == 0 and '"comparison"' in capsys.readouterr().out
