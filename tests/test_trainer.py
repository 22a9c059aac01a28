import math

import pytest
import torch

from engine.atomic import load_torch
from engine.errors import CheckpointError, DivergedError
from tests.engine_helpers import train


class _Killed(Exception):
    pass


def _die_after_two(m):
    if m["epoch"] == 2:
        raise _Killed


def test_same_seed_same_metrics_to_the_last_digit(data_cfg):
    _, a = train(data_cfg, seed=3)
    _, b = train(data_cfg, seed=3)
    _, c = train(data_cfg, seed=4)
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "images_per_second")} for e in h]
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) != strip(c.history)


def test_learns_and_reports_every_metric(data_cfg):
    seen = []
    _, r = train(data_cfg, arch="plain-4", epochs=2, callback=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2]
    assert {"loss_total", "loss_ce", "train_acc", "val_acc", "lr", "lam", "epoch_seconds",
            "images_per_second"} <= set(seen[0])
    assert r.best_val_acc > 0.3  # chance is 0.1 on the patch-coded classes


def test_best_validation_weights_are_kept(data_cfg, tmp_path):
    model, r = train(data_cfg, epochs=3, workdir=tmp_path)
    best = load_torch(tmp_path / "best.pt")
    assert best["epoch"] == r.best_epoch and best["val_acc"] == r.best_val_acc
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in best["model"].items())


def test_resume_after_interruption_gives_the_same_result(data_cfg, tmp_path):
    full_model, full = train(data_cfg, epochs=3, workdir=tmp_path / "full")
    with pytest.raises(_Killed):
        train(data_cfg, epochs=3, workdir=tmp_path / "cut", callback=_die_after_two)
    assert load_torch(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed_model, resumed = train(data_cfg, epochs=3, workdir=tmp_path / "cut")
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "images_per_second")} for e in h]
    assert strip(resumed.history) == strip(full.history)
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in full_model.state_dict().items())


def test_an_early_stopped_run_is_the_whole_runs_first_epochs(data_cfg, tmp_path):
    """stop_after keeps the whole run's schedule: the weights and history of its first epochs, not a shorter run's."""
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "images_per_second")} for e in h]
    with pytest.raises(_Killed):
        train(data_cfg, epochs=4, workdir=tmp_path / "whole", callback=_die_after_two)
    _, stopped = train(data_cfg, epochs=4, workdir=tmp_path / "stopped", stop_after=2)
    _, short = train(data_cfg, epochs=2)
    whole = load_torch(tmp_path / "whole" / "last.pt")
    assert strip(stopped.history) == strip(whole["history"]) and len(stopped.history) == 2
    assert [e["lr"] for e in stopped.history] != [e["lr"] for e in short.history]  # a 2-epoch cosine ends lower
    last = load_torch(tmp_path / "stopped" / "last.pt")["model"]
    assert all(torch.equal(v, last[k]) for k, v in whole["model"].items())


def test_a_failed_background_checkpoint_write_stops_training(data_cfg, tmp_path, monkeypatch):
    import engine.trainer

    epochs_seen = []

    def full_disk(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(engine.trainer, "save_torch", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(data_cfg, epochs=3, workdir=tmp_path, callback=lambda m: epochs_seen.append(m["epoch"]))
    assert epochs_seen[-1] <= 2  # the error surfaces at the next save, not after the whole run


def test_divergence_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(data_cfg, tmp_path):
    holder = {}

    def poison_after_epoch_one(m):
        if m["epoch"] == 1:  # an exploding update, after the epoch-1 checkpoint was written
            with torch.no_grad():
                next(holder["model"].parameters()).fill_(float("inf"))

    import tests.engine_helpers as h

    real_build = h.build_model

    def build_and_remember(*a):
        holder["model"] = real_build(*a)
        return holder["model"]

    h.build_model = build_and_remember
    try:
        with pytest.raises(DivergedError, match=r"loss is nan at epoch 2, step 1; the last good checkpoint is kept at .*last.pt"):
            train(data_cfg, epochs=3, workdir=tmp_path, callback=poison_after_epoch_one)
    finally:
        h.build_model = real_build
    last = load_torch(tmp_path / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_step_schedule_and_adamw_run(data_cfg):
    seen = []
    train(data_cfg, epochs=3, lr_schedule="step", milestones=[1, 2], lr=0.1, callback=seen.append)
    assert [round(m["lr"], 6) for m in seen] == [0.01, 0.001, 0.001]
    _, r = train(data_cfg, epochs=1, optimizer="adamw", lr=1e-2)
    assert r.best_val_acc > 0.3  # it learns: chance is 0.1 on the patch-coded classes


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused or unreadable as a weights-only checkpoint"):
        load_torch(path)



def test_the_loss_runs_in_fp32_outside_mixed_precision(data_cfg, monkeypatch):
    """On a GPU the forward pass runs under bf16 autocast; the loss must not (relation losses
    subtract near-equal Gram entries). CPU bf16 autocast stands in for the GPU's here."""
    import torch.nn.functional as F
    from torch import nn

    import engine.trainer
    from engine.config import TrainConfig
    from engine.device import seed_everything
    from engine.losses import DistillLoss
    from engine.trainer import fit
    from models import build_model, with_features
    from tests.engine_helpers import device_sets

    forward_dtypes, loss_sees = [], []

    class Tap(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.body = with_features(model, model.feature_names[-1:])

        def forward(self, x):
            logits, feats = self.body(x)
            forward_dtypes.append(next(iter(feats.values())).dtype)
            return logits, feats

    class Probe(DistillLoss):
        needs_teacher = False

        def wrap(self, model):
            return Tap(model)

        def forward(self, batch, lam):
            feat = next(iter(batch.student_features.values()))
            loss_sees.append((torch.is_autocast_enabled("cpu"), batch.student_logits.dtype, feat.dtype))
            return {"total": F.cross_entropy(batch.student_logits, batch.labels)}

    monkeypatch.setattr(engine.trainer, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    s, tr, va, _ = device_sets(data_cfg)
    fit(build_model("plain-2", 1, 10, 28), tr, va, TrainConfig(epochs=1, batch_size=128), Probe(), seed_everything(0),
        s.augment, progress=False)
    assert set(forward_dtypes) == {torch.bfloat16}  # the forward pass did run in mixed precision
    assert set(loss_sees) == {(False, torch.float32, torch.float32)}


def test_warmup_ramps_linearly_then_the_cosine_runs_over_the_rest():
    from torch import nn

    from engine.config import TrainConfig
    from engine.trainer import make_optimizer

    cfg = TrainConfig(epochs=3, lr=0.1, warmup_epochs=0.5, lr_schedule="cosine")
    opt, sched = make_optimizer(nn.Linear(2, 2), cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # 5 warm-up steps
    assert lrs[5] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 24 / 25)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
