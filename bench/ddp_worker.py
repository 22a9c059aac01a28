"""One training epoch alone or as one of torchrun's ranks, for the distributed suite (bench/distributed.py).

`python -m bench.ddp_worker <settings.json>`, or the same under torchrun: a warm-up epoch, then the timed epochs of
plain PyTorch DDP over gloo (NCCL on CUDA), images per second from the trainer's own epoch clock; rank 0 writes them.
"""
import json
import sys
from pathlib import Path

import torch

from engine import distributed
from engine.config import DataConfig, TrainConfig
from engine.data import load_splits
from engine.device import seed_everything
from engine.feed import DeviceSet
from engine.losses import build_loss
from engine.spec import Parallel
from engine.trainer import fit
from models import build_model


def main(a: dict) -> None:
    group, device = (distributed.init(a["device"], "auto", 600) if distributed.launched()
                     else (distributed.Ranks(), torch.device(a["device"])))
    torch.set_num_threads(a["threads"])
    s = load_splits(DataConfig(**a["data"]))
    mean, std = s.mean_std()
    train = DeviceSet(s.train.subset(torch.arange(a["images"])), mean, std, device)
    val = DeviceSet(s.val.subset(torch.arange(min(256, len(s.val)))), mean, std, device)
    c, h, _ = s.input_shape
    gen = seed_everything(0)
    model = build_model(a["arch"], c, s.num_classes, h).to(device, memory_format=torch.channels_last)
    parallel = Parallel(processes=group.world) if group.world > 1 else None
    result = fit(model, train, val, TrainConfig(epochs=1 + a["epochs"], batch_size=a["batch"], lr=0.05),
                 build_loss("ce", None), gen, s.augment, parallel=parallel, progress=False)
    if group.main:
        Path(a["out"]).write_text(json.dumps([h["images_per_second"] for h in result.history[1:]]))
    distributed.close()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
