"""Stages that train a model: teacher (or import it), assistant, the three students, fine-tuning.

One function serves them all; catalog.MODELS says what each one learns from.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from engine import augment, soft_targets
from engine.atomic import load_torch
from engine.config import TrainConfig
from engine.device import seed_everything
from engine.fingerprint import model_fingerprint
from engine.losses import build_loss
from engine.trainer import Teacher, fit
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


def _teacher_source(cfg: PipelineConfig, cat: Catalog, ws: Workspace, source: str) -> tuple[Teacher, dict]:
    teacher_model = ws.load_model(source)
    spec, n = ws.splits.augment, len(ws.train)
    key = soft_targets.CacheKey(model_fingerprint(teacher_model), ws.fingerprint, spec.model_dump(), cfg.cache.views,
                                cfg.cache.seed, cfg.cache.topk, ws.splits.num_classes, n)
    if cfg.cache.online:
        targets = soft_targets.OnlineTeacher(teacher_model)
    else:
        targets = soft_targets.load(cat.soft_targets(source), key, ws.device)
    views = augment.fixed_views(n, spec, cfg.cache.seed, cfg.cache.views).to(ws.device)
    return Teacher(targets, views), {"teacher_mode": "online" if cfg.cache.online else "cached"}


def _import_teacher(cfg: PipelineConfig, ws: Workspace):
    path = cfg.teacher.checkpoint
    state = load_torch(path, ws.device)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # our own checkpoints wrap the state_dict
    return ws.load_state(ws.build(cfg.teacher.arch), state, path)


def _fit_or_import(cfg: PipelineConfig, ws: Workspace, name: str, key: str, generator, teacher: Teacher | None,
                   callback) -> tuple[nn.Module, list[dict], dict]:
    """The model a stage outputs, its per-epoch history, and its best validation epoch."""
    role, _, source, init = MODELS[name]
    untrained = {"best_epoch": 0, "best_val_acc": None}
    if role == "teacher" and cfg.teacher.checkpoint:
        return _import_teacher(cfg, ws), [], untrained
    model = ws.load_model(init) if init else ws.build(model_config(cfg, name).arch)
    if init and cfg.finetune.epochs == 0:
        return model, [], untrained
    loss = build_loss(cfg.kd.loss if source else "ce", cfg.kd)
    result = fit(model, ws.train, ws.val, train_config(cfg, name), loss, generator, ws.splits.augment,
                 kd=cfg.kd if source else None, teacher=teacher, workdir=ws.cat.work(name), run_key=key,
                 callback=callback, desc=name)
    return model, result.history, {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc}


def train_model(cfg: PipelineConfig, cat: Catalog, name: str, force: bool = False) -> dict:
    role, method, source, init = MODELS[name]
    mcfg, tcfg = model_config(cfg, name), train_config(cfg, name)

    def work_fn(key: str, out_dir: Path) -> dict:
        ws = Workspace(cat, cfg.device)
        generator = seed_everything(mcfg.seed)
        params = {"arch": mcfg.arch, "role": role, "method": method, "parent_model": source or init or "",
                  "seed": mcfg.seed, "epochs": tcfg.epochs, "lr": tcfg.lr, "batch_size": tcfg.batch_size,
                  "data": cfg.data.name}
        teacher, extra = (None, {})
        if source:
            teacher, extra = _teacher_source(cfg, cat, ws, source)
            params |= {"lam": cfg.kd.lam, "temperature": cfg.kd.temperature, "lam_schedule": cfg.kd.lam_schedule,
                       "views": cfg.cache.views, "topk": cfg.cache.topk or 0, **extra}
        with tracking.model_run(cfg, cat, name, describe(cfg, name), role, method, params) as run:
            model, history, best = _fit_or_import(cfg, ws, name, key, generator, teacher, run.log_epoch)
            meta = ws.save_model(out_dir, model, {"name": name, "role": role, "method": method,
                                                  "parent_model": source or init, **best, **extra}, history)
            run.log_model(model, ws, meta)
        shutil.rmtree(cat.work(name), ignore_errors=True)  # epoch checkpoints are no longer needed
        return {**best, "arch": mcfg.arch, "model_fingerprint": meta["model_fingerprint"], "mlflow_run_id": run.run_id}

    return run_once(cat, f"train-{name}", "train", cat.model(name), stage_inputs(cfg, cat, name), work_fn, force)
