"""One small training, alone or as a rank under torchrun, for tests/test_distributed.py.

`python -m tests.ddp_probe <settings.json>` (one process) or `torchrun --nproc-per-node 2 -m tests.ddp_probe ...`:
writes a random teacher's soft-target cache (each rank runs its share), then trains a student from the labels or
from that cache read by row, and rank 0 saves the student's weights. `die`: [epoch, step, rank] kills that rank with
SIGKILL in the middle of that epoch.
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from engine import augment, distributed, soft_targets
from engine.config import DataConfig, KDConfig, TrainConfig
from engine.data import load_splits
from engine.device import seed_everything
from engine.feed import DeviceSet
from engine.fingerprint import model_fingerprint
from engine.losses import LossContext, build_loss
from engine.spec import Parallel
from engine.trainer import Teacher, fit
from models import build_model


class Dies(DeviceSet):
    """Kills this process at a given epoch and step."""

    at: tuple[int, int] | None = None
    passes = 0

    def batches(self, order):
        Dies.passes += 1
        for step, batch in enumerate(super().batches(order)):
            if Dies.at == (Dies.passes, step):
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def main(a: dict) -> None:
    group = distributed.init("cpu", "gloo", 120)[0] if distributed.launched() else distributed.Ranks()
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    if group.main:  # copies the raw files once, before the others read them
        load_splits(DataConfig(**a["data"]))
    group.barrier()
    s = load_splits(DataConfig(**a["data"]))
    mean, std = s.mean_std()
    cpu = torch.device("cpu")
    train, val = Dies(s.train, mean, std, cpu), DeviceSet(s.val, mean, std, cpu)
    teacher_model = build_model("plain-4", 1, 10, 28, seed=1).to(memory_format=torch.channels_last)
    key = soft_targets.CacheKey(model_fingerprint(teacher_model), s.fingerprint(), s.augment.model_dump(), 2, 0,
                                None, 10, len(train))
    cache = Path(a["cache"])
    soft_targets.write(cache, teacher_model, train, s.augment, key, batch_size=48)
    group.barrier()  # rank 0 has written the manifest
    Dies.passes = 0  # the training's epochs, from here
    if a.get("die") and a["die"][2] == group.rank:
        Dies.at = tuple(a["die"][:2])
    seed_everything(0)
    model = build_model("plain-2", 1, 10, 28).to(memory_format=torch.channels_last)
    if a["bn"] == "none":
        for name, child in list(model.named_modules()):
            for n, c in list(child.named_children()):
                if isinstance(c, nn.BatchNorm2d):
                    setattr(child, n, nn.Identity())
    gen = seed_everything(0)
    teacher = None
    kd = None
    if a["loss"] != "ce":
        # CTKD at its full adversarial weight from the start, so that its temperature learns within two epochs
        kd = KDConfig(loss=a["loss"], lam=0.5, temperature=4.0, ctkd={"lambda_min": 1.0})
    if a["loss"] not in ("ce", "dml"):
        targets = soft_targets.load(cache, key, cpu, resident=False)
        teacher = Teacher(targets, augment.fixed_views(len(train), s.augment, 0, 2))
    build = lambda arch, seed: build_model(arch, 1, 10, 28, seed=seed).to(memory_format=torch.channels_last)  # noqa: E731
    ctx = LossContext(student=model, teacher=teacher_model, sample=train.normalize(train.x[:8]), build=build, seed=0,
                      num_train=len(train), train_labels=train.y)
    parallel = Parallel(processes=group.world, sync_batchnorm=a["bn"] == "sync") if group.world > 1 else None
    cfg = TrainConfig(epochs=a["epochs"], batch_size=a["batch"], lr=0.05)
    loss = build_loss(a["loss"], kd, ctx)
    fit(model, train, val, cfg, loss, gen, s.augment, kd=kd if teacher else None, teacher=teacher,
        workdir=Path(a["work"]), run_key="probe", parallel=parallel, progress=False)
    if group.main:  # the student, and what the loss trained (CTKD's temperature, DML's peers)
        torch.save({**model.state_dict(), **{f"loss.{k}": v for k, v in loss.state_dict().items()}}, a["out"])
        report = {"world": group.world, "epochs_run": Dies.passes,
                  "cache_read": "by row" if teacher and not teacher.targets.values.resident else "memory"}
        Path(a["report"]).write_text(json.dumps(report))
    distributed.close()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
