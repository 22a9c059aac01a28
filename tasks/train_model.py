"""Stages that train a model: teacher (or import it), assistant, the three students, fine-tuning.

One function (`fit_training`) serves them all, and the experiments' jobs too (tasks/train_job.py);
catalog.MODELS says what each pipeline model learns from.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import augment, soft_targets
from engine.atomic import load_torch
from engine.config import TrainConfig
from engine.device import seed_everything
from engine.fingerprint import model_fingerprint
from engine.losses import build_loss
from engine.trainer import Teacher, accuracy, fit, predict
from torch import nn
from tasks import tracking
from tasks.catalog import MODELS, Catalog
from tasks.config import ModelConfig, PipelineConfig
from tasks.context import Workspace
from tasks.stage import run_once, stage_key


def model_config(cfg: PipelineConfig, name: str) -> ModelConfig:
    return getattr(cfg, MODELS[name][0])


def train_config(cfg: PipelineConfig, name: str) -> TrainConfig:
    base = model_config(cfg, name).train
    if MODELS[name][1] == "FT":
        return base.model_copy(update={"epochs": max(cfg.finetune.epochs, 1), "lr": base.lr * cfg.finetune.lr_scale})
    return base


def describe(cfg: PipelineConfig, name: str) -> str:
    """A run name that says what it is, e.g. 'distill student plain-2 from assistant plain-4'."""
    role, method, source, init = MODELS[name]
    arch = model_config(cfg, name).arch
    if source:
        return f"distill {role} {arch} from {source} {model_config(cfg, source).arch} ({method})"
    if init:
        return f"fine-tune {role} {arch} ({method})"
    if role == "teacher" and cfg.teacher.checkpoint:
        return f"import teacher {arch}"
    return f"train {role} {arch} from labels ({method})"


def stage_inputs(cfg: PipelineConfig, cat: Catalog, name: str) -> dict:
    role, method, source, init = MODELS[name]
    inputs = {"name": name, "data": stage_key(cat.prepared, "the prepared data set"),
              "model": model_config(cfg, name).model_dump(), "train": train_config(cfg, name).model_dump()}
    if source:
        inputs |= {"kd": cfg.kd.model_dump(), "cache": cfg.cache.model_dump(exclude={"batch_size"}),
                   "teacher": stage_key(cat.soft_targets(source), f"the soft targets of {source}")}
    if init:
        inputs |= {"init": stage_key(cat.model(init), init), "finetune": cfg.finetune.model_dump()}
    if role == "teacher" and cfg.teacher.checkpoint:
        inputs["checkpoint_sha256"] = hashlib.sha256(Path(cfg.teacher.checkpoint).read_bytes()).hexdigest()
    return inputs


@dataclass(frozen=True)
class Training:
    """One model to train, whoever asks: a pipeline stage (catalog.MODELS) or an experiment's job."""

    name: str  # its work folder and MLflow 'model' tag
    role: str
    method: str
    arch: str
    seed: int
    train: TrainConfig
    run_name: str
    guides: tuple[tuple[Path, Path], ...] = ()  # (model folder, soft-target folder) of each source
    survival: float = 1.0  # DGKD: the chance each guide is kept at a step
    init: Path | None = None  # start from this model folder (fine-tuning)
    checkpoint: str | None = None  # import this teacher instead of training
    skip_training: bool = False  # fine-tuning with 0 epochs: the init model as is
    parent_model: str = ""
    test: bool = False  # also measure test accuracy (experiments; the pipeline has an evaluate stage)


def _guides(cfg: PipelineConfig, ws: Workspace, t: Training, generator) -> tuple[Teacher, dict]:
    spec, n = ws.splits.augment, len(ws.train)
    sources = []
    for model_dir, targets_dir in t.guides:
        model = ws.load_model_dir(model_dir)
        if cfg.cache.online:
            sources.append(soft_targets.OnlineTeacher(model))
            continue
        key = soft_targets.CacheKey(model_fingerprint(model), ws.fingerprint, spec.model_dump(), cfg.cache.views,
                                    cfg.cache.seed, cfg.cache.topk, ws.splits.num_classes, n)
        sources.append(soft_targets.load(targets_dir, key, ws.device))
    targets = sources[0] if len(sources) == 1 else soft_targets.DenseGuides(sources, t.survival, generator)
    views = augment.fixed_views(n, spec, cfg.cache.seed, cfg.cache.views).to(ws.device)
    extra = {"teacher_mode": "online" if cfg.cache.online else "cached", "guides": len(sources)}
    return Teacher(targets, views), extra


def _import_teacher(ws: Workspace, arch: str, path: str):
    state = load_torch(path, ws.device)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # our own checkpoints wrap the state_dict
    return ws.load_state(ws.build(arch), state, path)


def _fit_or_import(cfg: PipelineConfig, ws: Workspace, t: Training, key: str, generator, teacher: Teacher | None,
                   callback) -> tuple[nn.Module, list[dict], dict]:
    """The model a stage outputs, its per-epoch history, and its best validation epoch."""
    untrained = {"best_epoch": 0, "best_val_acc": None}
    if t.checkpoint:
        return _import_teacher(ws, t.arch, t.checkpoint), [], untrained
    model = ws.load_model_dir(t.init) if t.init else ws.build(t.arch, seed=t.seed)
    if t.skip_training:
        return model, [], untrained
    loss = build_loss(cfg.kd.loss if teacher else "ce", cfg.kd)
    result = fit(model, ws.train, ws.val, t.train, loss, generator, ws.splits.augment,
                 kd=cfg.kd if teacher else None, teacher=teacher, workdir=ws.cat.work(t.name), run_key=key,
                 callback=callback, desc=t.name)
    return model, result.history, {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc}


def fit_training(cfg: PipelineConfig, cat: Catalog, t: Training, key: str, out_dir: Path) -> dict:
    """Train (or import) the model, save it in `out_dir` and log it to MLflow; returns the summary."""
    ws = Workspace(cat, cfg.device)
    generator = seed_everything(t.seed)
    params = {"arch": t.arch, "role": t.role, "method": t.method, "parent_model": t.parent_model, "seed": t.seed,
              "epochs": t.train.epochs, "lr": t.train.lr, "batch_size": t.train.batch_size, "data": cfg.data.name}
    teacher, extra = (None, {})
    if t.guides:
        teacher, extra = _guides(cfg, ws, t, generator)
        params |= {"lam": cfg.kd.lam, "temperature": cfg.kd.temperature, "lam_schedule": cfg.kd.lam_schedule,
                   "views": cfg.cache.views, "topk": cfg.cache.topk or 0, "guide_survival": t.survival, **extra}
    with tracking.model_run(cfg, cat, t.name, t.run_name, t.role, t.method, params) as run:
        model, history, best = _fit_or_import(cfg, ws, t, key, generator, teacher, run.log_epoch)
        if t.test:
            best["test_acc"] = accuracy(predict(model, ws.test, t.train.eval_batch_size), ws.test.y)
            run.log_epoch({"epoch": 0, "test_acc": best["test_acc"]})
        meta = ws.save_model(out_dir, model, {"name": t.name, "role": t.role, "method": t.method,
                                              "parent_model": t.parent_model or None, **best, **extra,
                                              "torch_threads": torch.get_num_threads()}, history)
        run.log_model(model, ws, meta)
    shutil.rmtree(cat.work(t.name), ignore_errors=True)  # epoch checkpoints are no longer needed
    return {**best, "arch": t.arch, "params": meta["params"], "flops": meta["flops"],
            "model_fingerprint": meta["model_fingerprint"], "mlflow_run_id": run.run_id}


def training(cfg: PipelineConfig, cat: Catalog, name: str) -> Training:
    """A pipeline model (catalog.MODELS) as a Training."""
    role, method, source, init = MODELS[name]
    mcfg = model_config(cfg, name)
    return Training(name=name, role=role, method=method, arch=mcfg.arch, seed=mcfg.seed, train=train_config(cfg, name),
                    run_name=describe(cfg, name),
                    guides=((cat.model(source), cat.soft_targets(source)),) if source else (),
                    init=cat.model(init) if init else None,
                    checkpoint=cfg.teacher.checkpoint if role == "teacher" else None,
                    skip_training=bool(init) and cfg.finetune.epochs == 0, parent_model=source or init or "")


def train_model(cfg: PipelineConfig, cat: Catalog, name: str, force: bool = False) -> dict:
    t = training(cfg, cat, name)
    return run_once(cat, f"train-{name}", "train", cat.model(name), stage_inputs(cfg, cat, name),
                    lambda key, out_dir: fit_training(cfg, cat, t, key, out_dir), force)
