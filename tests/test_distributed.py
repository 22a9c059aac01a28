"""One training over two processes (gloo on CPU, started by torchrun) against the same training in one.

Tolerances. Over two ranks every float32 sum (a gradient over the batch, a BatchNorm statistic) is added in another
order, so the weights differ by rounding, which SGD then carries through the steps. Without BatchNorm that stays at
~1e-7 (measured: 9e-8 after 16 steps): 1e-5 is the bound. BatchNorm amplifies rounding: the same one-process
training run with 2 threads instead of 1 already moves a tensor by up to 3e-3 of its largest value, and two ranks with
synchronised BatchNorm by 1.2e-3; 1e-2 is the bound. Per-rank BatchNorm (the statistics of half the batch) moves them
by 8e-2, and the test checks that it fails the bound, so the bound tells the two apart. SyncBatchNorm for CPUs is also
checked exactly, in float64.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine.distributed import GlooSyncBatchNorm, Ranks, check_devices, plain_batchnorm, sync_batchnorm
from engine.errors import KDError

ROOT = Path(__file__).resolve().parents[1]


def probe(tmp: Path, name: str, procs: int, bn: str, loss: str, fashion_dir: Path, die=None, env=None) -> dict:
    """tests/ddp_probe.py alone or under torchrun; its output folder, log and weights."""
    out = tmp / name
    out.mkdir(exist_ok=True)
    settings = {"data": {"source_dir": str(fashion_dir), "root": str(out / "raw")}, "bn": bn, "loss": loss,
                "epochs": 2, "batch": 48, "cache": str(out / "cache"), "work": str(out / "work"),
                "out": str(out / "model.pt"), "report": str(out / "report.json"), "die": die}
    (out / "settings.json").write_text(json.dumps(settings))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs > 1 else [sys.executable])
    run = subprocess.run([*launcher, "-m", "tests.ddp_probe", str(out / "settings.json")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    done = (out / "model.pt").exists() and run.returncode == 0
    return {"rc": run.returncode, "log": run.stdout + run.stderr, "out": out,
            "weights": torch.load(out / "model.pt", weights_only=True) if done else None,
            "report": json.loads((out / "report.json").read_text()) if done else None}


def largest_change(a: dict, b: dict) -> float:
    """The largest difference of any tensor, relative to that tensor's largest value."""
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item()
               for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_dir):
    """Each named run once per module: the tests share their one-process and two-rank runs."""
    tmp, done = tmp_path_factory.mktemp("ddp"), {}

    def get(name, procs, bn, loss, **kw):
        if name not in done:
            done[name] = probe(tmp, name, procs, bn, loss, fashion_dir, **kw)
        return done[name]

    return get


def ok(run: dict) -> dict:
    assert run["rc"] == 0, run["log"][-3000:]
    return run


def test_two_ranks_of_half_batches_make_the_weights_of_one_process_without_batchnorm(runs):
    one, two = ok(runs("one-plain", 1, "none", "ce")), ok(runs("two-plain", 2, "none", "ce"))
    assert largest_change(one["weights"], two["weights"]) < 1e-5
    # Each rank ran the teacher on its share of every batch; rank 0 wrote the same cache one process writes.
    assert (one["out"] / "cache" / "values.npy").read_bytes() == (two["out"] / "cache" / "values.npy").read_bytes()


def test_with_sync_batchnorm_two_ranks_match_one_process_and_per_rank_statistics_do_not(runs):
    one = ok(runs("one-bn", 1, "local", "ce"))
    synced, local = ok(runs("two-sync", 2, "sync", "ce")), ok(runs("two-local", 2, "local", "ce"))
    assert largest_change(one["weights"], synced["weights"]) < 1e-2
    assert largest_change(one["weights"], local["weights"]) > 1e-2
    assert all(k in one["weights"] for k in synced["weights"])  # saved as plain BatchNorm2d: the same keys


@pytest.mark.parametrize("loss", ["ctkd", "dml"])
def test_a_distillation_from_the_cache_by_row_and_one_with_peers_match_one_process(runs, loss):
    """CTKD reads the cache by row and learns its temperature (the loss is wrapped in DDP too); DML trains a peer
    inside the student's wrapper. The temperature moves by 0.08 in these two epochs; without the loss's own DDP
    wrapper rank 0's drifts 4e-3 from one process's (seen once), with it by under 1e-4."""
    one, two = ok(runs(f"one-{loss}", 1, "local", loss)), ok(runs(f"two-{loss}", 2, "sync", loss))
    assert largest_change(one["weights"], two["weights"]) < 1e-2
    if loss == "ctkd":
        assert two["report"]["cache_read"] == "by row" and two["report"]["world"] == 2
        assert largest_change({"t": one["weights"]["loss.t"]}, {"t": two["weights"]["loss.t"]}) < 1e-3


def test_a_rank_killed_mid_epoch_resumes_from_the_last_checkpoint_to_the_same_weights(runs):
    whole = ok(runs("two-ctkd", 2, "sync", "ctkd"))
    cut = runs("two-ctkd-cut", 2, "sync", "ctkd", die=[2, 3, 1])  # rank 1 gets SIGKILL at step 3 of epoch 2
    assert cut["rc"] != 0 and cut["weights"] is None
    from tasks.torchrun import _reason
    from tasks.config import DistributedConfig

    assert "rank 1 stopped (signal 9)" in _reason(cut["log"].splitlines(), DistributedConfig())
    settings = json.loads((cut["out"] / "settings.json").read_text())
    (cut["out"] / "settings.json").write_text(json.dumps({**settings, "die": None}))
    again = probe(cut["out"].parent, "two-ctkd-cut", 2, "sync", "ctkd", Path(settings["data"]["source_dir"]))
    ok(again)
    assert again["report"]["epochs_run"] == 1  # it resumed after epoch 1, not from the start
    assert all(torch.equal(whole["weights"][k], again["weights"][k]) for k in whole["weights"])


# ---------------------------------------------------------------- the stage command, the flow and dvc repro

@pytest.mark.slow
def test_the_pipeline_over_two_processes_under_the_flow_and_under_dvc_repro(tmp_path, fashion_dir, prefect_server,
                                                                            monkeypatch):
    """The flow trains the TAKD chain (teacher, its cache, the assistant, its cache, the TAKD student), each training
    and cache over 2 processes; then `dvc repro` finds those done and runs the rest of the pipeline, the NOKD and
    BLKD students over 2 processes, to a clean `dvc status`."""
    from engine.workspace import read_meta
    from flows.pipeline import takd_pipeline
    from tasks.config import load_config
    from tests.conftest import tiny_overrides
    from tests.test_flow_dvc import dvc, make_repo, stale

    repo = tmp_path / "repo"
    make_repo(repo, {**tiny_overrides(fashion_dir, repo), "student.seeds": [0], "finetune.epochs": 0,
                     "distributed.nproc_per_node": 2})
    monkeypatch.chdir(repo)
    monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
    takd_pipeline(load_config(repo / "params.yaml"), workers=2, stages=["distill-student-takd"])
    models = repo / "data" / "models"
    chain = ["teacher", "assistant", "student-takd-s0"]
    assert {m: read_meta(models / m)["processes"] for m in chain} == dict.fromkeys(chain, 2)
    written = {m: (models / m / "stage.json").stat().st_mtime_ns for m in chain}
    dvc(repo, "repro")
    assert {m: (models / m / "stage.json").stat().st_mtime_ns for m in chain} == written  # the chain: reused
    assert {m: read_meta(models / m)["processes"] for m in ("student-nokd-s0", "student-blkd-s0")} == \
        {"student-nokd-s0": 2, "student-blkd-s0": 2}
    assert stale(repo) == set() and (repo / "data" / "reports" / "comparison.md").exists()
    assert not list((repo / "data").rglob("*.partial"))


def test_machines_that_never_meet_give_one_error_and_no_output(project):
    """The stage command, as `dvc repro` runs it, with a second machine that never comes."""
    from tasks.config import to_yaml

    cfg, cat = project
    params = cat.root / "params.yaml"
    params.write_text(to_yaml(cfg))
    env = {**os.environ, "KD_PROJECT_ROOT": str(cat.root), "PYTHONPATH": str(ROOT)}
    stage = [sys.executable, "-m", "tasks", "train-teacher", "--params", str(params)]
    subprocess.run([*stage[:3], "prepare-data", *stage[4:]], cwd=cat.root, env=env, check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([*stage, "--distributed.nnodes", "2", "--distributed.rdzv_endpoint", f"127.0.0.1:{port}",
                          "--distributed.join_timeout_s", "2"], cwd=cat.root, env=env, capture_output=True, text=True)
    assert run.returncode == 2
    assert "error: train-teacher over 2 processes failed: the 2 machine(s) did not all join within 2 s " \
           "(distributed.join_timeout_s)" in run.stderr
    models = cat.root / "data" / "models"
    assert not models.exists() or not any(models.iterdir())


# ---------------------------------------------------------------- the parts

def _sync_bn_rank(rank: int, world: int, port: int) -> None:
    """Raises (and so fails the spawn) when a rank's outputs or gradients differ from one BatchNorm's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x, w = torch.randn(11, 3, 4, 4, dtype=torch.float64) * 3 + 1, torch.randn(11, 3, 4, 4, dtype=torch.float64)
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    synced = GlooSyncBatchNorm(3).double()
    synced.load_state_dict(ref.state_dict())
    whole = x.clone().requires_grad_()
    y_ref = ref(whole)
    (y_ref * w).sum().backward()
    share = Ranks(rank, world).share(len(x))  # 6 and 5 images: uneven shares
    part = x[share].clone().requires_grad_()
    y = synced(part)
    (y * w[share]).sum().backward()
    grad_w, grad_b = synced.weight.grad.clone(), synced.bias.grad.clone()
    dist.all_reduce(grad_w)
    dist.all_reduce(grad_b)
    for got, want in ((y, y_ref[share]), (part.grad, whole.grad[share]), (grad_w, ref.weight.grad),
                      (grad_b, ref.bias.grad), (synced.running_mean, ref.running_mean),
                      (synced.running_var, ref.running_var), (synced.num_batches_tracked, ref.num_batches_tracked)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dist.destroy_process_group()


def test_sync_batchnorm_on_cpus_equals_batchnorm_over_the_whole_batch_in_float64():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_bn_rank, args=(2, port), nprocs=2)


def test_batchnorm_layers_are_swapped_for_training_and_back_with_their_state():
    from models import build_model

    model = build_model("plain-2", 1, 10, 28)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = sync_batchnorm(model, torch.device("cpu"))
    assert n == sum(isinstance(m, GlooSyncBatchNorm) for m in model.modules()) > 0
    assert plain_batchnorm(model) == n and not any(isinstance(m, GlooSyncBatchNorm) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_shares_cover_a_batch_once_in_order():
    for n in (1, 7, 48, 49):
        for world in (1, 2, 3):
            rows = [list(range(n))[Ranks(r, world).share(n)] for r in range(world)]
            assert sum(rows, []) == list(range(n)) and max(map(len, rows)) - min(map(len, rows)) <= 1


def test_more_processes_than_gpus_is_refused_before_anything_starts():
    with pytest.raises(KDError, match="nproc_per_node is 4, but this machine shows 2 CUDA"):
        check_devices(4, torch.device("cuda"), 2)
    check_devices(4, torch.device("cpu"), 0)  # CPU processes share the cores: any number


def test_what_cannot_run_per_process_is_refused_and_what_runs_per_process_is_said(caplog):
    from engine.config import KDConfig, TrainConfig
    from engine.distill import _check_parallel
    from engine.losses import LOSSES
    from engine.spec import Parallel, TrainSpec

    def spec(loss, quantized=False):
        return TrainSpec(role="student", arch="plain-2", train=TrainConfig(), loss=loss, kd=KDConfig(loss=loss),
                         quantized=quantized, parallel=Parallel(processes=2), name="s")

    with pytest.raises(KDError, match="loss 'crd' keeps state one process alone keeps right; train it in one process"):
        _check_parallel(spec("crd"), LOSSES["crd"])
    with pytest.raises(KDError, match="QAD trains fake-quantized observers"):
        _check_parallel(spec("kd", quantized=True), LOSSES["kd"])
    _check_parallel(spec("rkd"), LOSSES["rkd"])
    assert "distance and angle relations among the batch's images of loss 'rkd' are computed over each " \
           "process's share" in caplog.text
    _check_parallel(spec("kd"), LOSSES["kd"])  # per image: nothing to say
    assert caplog.text.count("computed over each process's share") == 1
