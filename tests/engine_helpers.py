"""Small engine set-ups shared by the engine tests."""
from __future__ import annotations

import torch

from engine.config import TrainConfig
from engine.data import load_splits
from engine.feed import DeviceSet
from engine.device import seed_everything
from engine.losses import build_loss
from engine.trainer import fit
from models import build_model


def device_sets(data_cfg):
    s = load_splits(data_cfg)
    mean, std = s.mean_std()
    cpu = torch.device("cpu")
    return s, DeviceSet(s.train, mean, std, cpu), DeviceSet(s.val, mean, std, cpu), DeviceSet(s.test, mean, std, cpu)


def train(data_cfg, arch="plain-2", epochs=2, seed=0, workdir=None, callback=None, stop_after=None, **train_kw):
    s, tr, va, _ = device_sets(data_cfg)
    gen = seed_everything(seed)
    model = build_model(arch, 1, 10, 28).to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=epochs, batch_size=64, **train_kw)
    result = fit(model, tr, va, cfg, build_loss("ce", None), gen, s.augment, workdir=workdir, run_key="k",
                 callback=callback, stop_after=stop_after)
    return model, result


def fit_on(splits, train, val, arch="plain-2", epochs=2, seed=0, workdir=None):
    """A model trained on given device sets (memory or streamed), for comparing where the data lived."""
    gen = seed_everything(seed)
    model = build_model(arch, 1, 10, 28).to(memory_format=torch.channels_last)
    fit(model, train, val, TrainConfig(epochs=epochs, batch_size=64), build_loss("ce", None), gen, splits.augment,
        workdir=workdir, run_key="k")
    return model
