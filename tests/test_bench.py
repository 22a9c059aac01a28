"""The benchmark suites run end to end on tiny data (every size is capped by the 360 fake
training images, so the numbers are meaningless here;
`python -m bench` on real data measures). The GPU suite is forced onto the CPU so its code
path runs in CI."""
from __future__ import annotations

import json

import pytest
import torch

from bench import SUITES
from bench.__main__ import main
from bench.bare_loop import bare_fit
from models import build_model
from models.profile import flops_per_image, train_flops_per_image
from tests.conftest import tiny_overrides
from tests.fakes import class_images


def _run(tmp_path, fashion_dir, suites: list[str], extra: dict | None = None, scale: float = 1) -> dict:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--suite", *suites, "--repeats", "1", "--scale", str(scale), "--device", "cpu",
            "--source-dir", str(fashion_dir), "--out", str(out), "--md", str(md), "--force-gpu-suite"]
    results = main(argv, extra={"compile_modes": (False,), **(extra or {})})
    assert json.loads(out.read_text()) == json.loads(json.dumps(results, default=str))
    text = md.read_text()
    for name in suites:
        assert SUITES[name].title in text
    return results


def test_micro_suites_write_json_and_markdown(tmp_path, fashion_dir):
    _run(tmp_path, fashion_dir, ["overhead", "original", "cache", "gpu", "distill-cost"], scale=0.002,  # 16-100 images
         extra={"gpu_models": ("plain-10",)})
    results = _run(tmp_path, fashion_dir, ["scaling"])  # merged into the same report
    for name in ("overhead", "gpu"):
        for row in results[name]["rows"]:
            # One repeat: throughput is the images over that run's time, and the ratio that pair's bare / trainer
            # time; the recorded times are rounded to 1 ms.
            (t,), (b,) = row["trainer_runs_s"], row["bare_runs_s"]
            images = row["train_images"] * row["epochs"]
            assert images / (t + 5e-4) <= row["trainer_img_s"] <= images / max(t - 5e-4, 1e-9)
            assert images / (b + 5e-4) <= row["bare_img_s"] <= images / max(b - 5e-4, 1e-9)
            assert (b - 5e-4) / (t + 5e-4) <= row["ratio"] <= (b + 5e-4) / max(t - 5e-4, 1e-9)
    assert {r["workers"] for r in results["original"]["rows"]} == {0, 2}
    for row in results["cache"]["rows"]:  # the expectations are what the two models' FLOPs and times say
        teacher, student = (build_model(row[k], 1, 10, 28) for k in ("teacher", "student"))
        by_flops = 1 + flops_per_image(teacher, (1, 28, 28)) / train_flops_per_image(student, (1, 28, 28))
        assert row["expected_by_flops"] == pytest.approx(by_flops)
        assert row["expected_by_time"] == pytest.approx(1 + row["teacher_forward_s"] / row["cached_epoch_s"])
        assert row["measured_ratio"] == pytest.approx(row["online_epoch_s"] / row["cached_epoch_s"])
    assert [r["model"] for r in results["gpu"]["rows"]] == ["plain-10"]
    cost = {r["arm"]: r for r in results["distill-cost"]["rows"]}
    assert list(cost) == ["ce", "kd", "kd-online", "crd", "crd-gather", "reviewkd"]
    assert cost["kd-online"]["step_gflop"] > cost["kd"]["step_gflop"]  # the teacher's forward pass counts
    for arm, row in cost.items():  # one repeat: each ratio is that round's pair of epochs
        if arm != "ce":
            (a,), (b,) = row["runs_s"], cost[row["against"]]["runs_s"]
            assert (a - 5e-4) / (b + 5e-4) <= row["ratio"] <= (a + 5e-4) / max(b - 5e-4, 1e-9)
    assert cost["crd"]["bank_rows"] > cost["crd"]["train_images"]  # the bank spans the whole split
    assert results["distill-cost"]["summary"]["crd_over_kd"] == cost["crd"]["ratio"]
    data_rows = [r for r in results["scaling"]["rows"] if r["sweep"] == "data"]
    assert [r["train_images"] for r in data_rows] == sorted(r["train_images"] for r in data_rows)
    from scipy.stats import linregress  # the summary's fit, recomputed independently from its rows

    fit, summary = linregress([r["train_images"] for r in data_rows], [r["epoch_s"] for r in data_rows]), \
        results["scaling"]["summary"]
    assert summary["linear_fit_us_per_image"] == pytest.approx(fit.slope * 1e6)
    assert summary["linear_fit_r2"] == pytest.approx(fit.rvalue ** 2)
    assert results["overhead"]["machine"]["device"] == "cpu"


def test_storage_suite_streams_from_disk_and_measures_peak_memory_in_a_child(tmp_path, fashion_dir):
    result = _run(tmp_path, fashion_dir, ["storage"], scale=0.01)["storage"]
    ways = {(r["case"], r["way"]) for r in result["rows"]}
    kd = "KD, memory (cache in memory)"
    assert ways >= {(c, w) for c in ("Fashion-MNIST 28 px", "generated 64 px")
                    for w in ("memory", "disk, 0 workers", "disk, 2 workers", kd)}
    assert {c for c, w in ways if w.startswith("KD, disk") and w.endswith("(cache by row)")} == {c for c, _ in ways}
    for row in result["rows"]:
        base = kd if row["way"].startswith("KD") else "memory"
        memory = next(r["img_s"] for r in result["rows"] if r["case"] == row["case"] and r["way"] == base)
        if row["cache"] == "warm":  # one repeat: the ratio is that round's, against the same kind of epoch
            assert row["ratio_to_memory"] == pytest.approx(row["img_s"] / memory)
    cap = result["peak_memory"]
    assert cap["placement"] == {"train": "disk", "val": "memory", "test": "memory"}
    assert cap["cache_mb"] > cap["cap_mb"] and not cap["cache_resident"]  # twice the cap: read by row
    from engine.config import DataConfig
    from engine.placement import loader_workers

    workers = loader_workers(DataConfig(), torch.device("cpu"))  # the default the capped child runs with
    assert len(cap["worker_vm_hwm_mb"]) == workers and cap["peak_pss_mb"] > 0 and not cap["enforced"]


def test_formats_suite_reads_our_rows_back_and_names_what_is_not_installed(tmp_path, fashion_dir):
    from bench.formats import FORMATS, versions

    result = _run(tmp_path, fashion_dir, ["formats"], scale=0.01)["formats"]
    installed = [f.name for f in FORMATS if versions(f)]
    assert sorted({r["format"] for r in result["rows"]}) == sorted(installed)
    assert all(r["by_index_rows_s"] > 0 and r["own_order_rows_s"] > 0 for r in result["rows"])
    missing = [" + ".join(f.packages) for f in FORMATS if not versions(f)]
    assert result["summary"]["not installed here"] == (", ".join(missing) or "none")


def test_teacher_time_to_accuracy_records_each_epoch(tmp_path, fashion_dir):
    params = tmp_path / "params.yaml"
    params.write_text("teacher: {arch: plain-2, train: {epochs: 2, warmup_epochs: 0.5}}\n")
    result = _run(tmp_path, fashion_dir, ["teacher"], extra={"params": str(params)})["teacher"]
    rows, summary = result["rows"], result["summary"]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["seconds"] <= rows[1]["seconds"]
    first = next((r["seconds"] for r in rows if r["test_acc"] >= 0.92), None)
    assert summary["seconds_to_92"] == first and summary["arch"] == "plain-2"
    assert summary["test_acc_at_best_val"] == rows[summary["best_epoch"] - 1]["test_acc"]


def test_reruns_merge_suites_into_one_report(tmp_path, fashion_dir):
    _run(tmp_path, fashion_dir, ["cache"])
    results = _run(tmp_path, fashion_dir, ["gpu"], extra={"compile_modes": ()})
    assert set(results) == {"cache", "gpu"}
    text = (tmp_path / "bench.md").read_text()
    assert SUITES["cache"].title in text and SUITES["gpu"].title in text


# The default profile, reduced: the same models, 1 epoch on a subset of Fashion-MNIST (Debian's files when
# present, else the fake ones) and one student seed; the flow trains two models at once, the NOKD student beside the
# teacher, then BLKD beside the TA.
REDUCED = {"data.train_subset": 600, "data.test_subset": 200, "teacher.train.epochs": 1, "assistant.train.epochs": 1,
           "student.train.epochs": 1, "student.seeds": [0], "evaluate.speed_repeats": 2, "quantize.evaluate": False,
           "export.check_images": 32, "quantize.calibration_images": 64}


def test_dvc_repro_and_the_flow_make_bit_identical_models_on_a_reduced_real_profile(tmp_path, fashion_dir,
                                                                                     prefect_server):
    """`dvc repro` and the Prefect flow (two stages at once) of the trainings up to the TAKD students, each in a
    fresh copy of this working tree: every model's weights are the same, every tensor, by hash."""
    from pathlib import Path

    from engine.config import DataConfig
    from tasks.config import load_config, to_yaml

    real = Path(DataConfig().source_dir)
    source = real if (real / "train-images-idx3-ubyte.gz").exists() else fashion_dir
    cfg = load_config(None, REDUCED | {"data.source_dir": str(source), "data.root": "data/raw"})
    params = to_yaml(cfg)
    from prefect.settings import PREFECT_API_URL

    env = {"KD_TRACKING": "0", "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's server: no second start
    extra = {"params_yaml": params, "env": env,
             "targets": ["train-student-nokd", "distill-student-blkd", "distill-student-takd"]}
    summary = _run(tmp_path, fashion_dir, ["e2e"], extra=extra)["e2e"]["summary"]
    assert summary["prefect_flow_state"] == "COMPLETED" and summary["flow_workers"] == 2
    assert summary["models"] == 5 and summary["same_weights_both_ways"] and summary["weights_differ"] == []
    assert summary["profile"].startswith(f"teacher {cfg.teacher.arch} {cfg.teacher.train.epochs} epoch")


def test_e2e_names_the_profile_its_accuracies_belong_to(tmp_path):
    from bench.end_to_end import _profile
    from tasks.config import load_config, to_yaml

    (tmp_path / "params.yaml").write_text(to_yaml(load_config(None, {"teacher.arch": "plain-6",
                                                                     "student.train.epochs": 1})))
    assert _profile(tmp_path).startswith("teacher plain-6 ") and _profile(tmp_path).endswith("student plain-2 1 epoch")


def test_distributed_suite_times_one_process_and_two_ranks_side_by_side(tmp_path, fashion_dir):
    result = _run(tmp_path, fashion_dir, ["distributed"], scale=0.01)["distributed"]
    one, two = result["rows"]
    assert (one["processes"], two["processes"]) == (0, 2) and one["train_images"] == two["train_images"] == 200
    assert result["summary"]["two_over_one_median"] == pytest.approx(two["img_s_median"] / one["img_s_median"])


def test_gpu_suite_says_why_it_skipped_without_cuda(tmp_path, fashion_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "b.json"
    results = main(["--suite", "gpu", "--device", "cpu", "--source-dir", str(fashion_dir), "--out", str(out),
                    "--md", str(tmp_path / "b.md")])
    assert results["gpu"]["rows"] == [] and "no CUDA device" in results["gpu"]["summary"]["skipped"]


def test_bare_loop_learns_a_separable_task():
    torch.manual_seed(0)
    images, labels = class_images(320, 10, (1, 28, 28), seed=3)
    x, y = torch.from_numpy(images).float() / 255, torch.from_numpy(labels).long()
    model = build_model("plain-2", 1, 10, 28)
    assert bare_fit(model, x[:256], y[:256], x[256:], y[256:], epochs=5, batch_size=32, lr=0.05) > 0.8


def test_train_flops_count_forward_and_backward_without_touching_the_model():
    model = build_model("plain-4", 1, 10, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward, train = flops_per_image(model, (1, 28, 28)), train_flops_per_image(model, (1, 28, 28))
    assert 2.5 * forward < train < 3.5 * forward  # backward costs about twice the forward
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_step_profile_names_the_operators():
    from bench.profile_step import main as profile_step

    table = profile_step("plain-2", batch=8, steps=2)
    assert "convolution" in table and "batch_norm" in table
