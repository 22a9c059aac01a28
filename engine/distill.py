"""A TrainSpec made real: the model, its loss and its teacher set up and checked, the training loop run, the model
saved; and a guide's soft-target cache written. Plain PyTorch: whoever runs it passes the folders and the hooks
(tasks/train.py passes MLflow's)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine import augment, predictions, soft_targets
from engine.atomic import load_torch
from engine.device import seed_everything
from engine.distributed import ranks
from engine.errors import KDError
from engine.fingerprint import model_fingerprint
from engine.losses import LOSSES, DistillLoss, LossContext, build_loss, loss_settings
from engine.losses.feature import FeatureLoss
from engine.losses.logit import HintonKD
from engine.qad import QADModel
from engine.spec import CacheSpec, TrainSpec
from engine.teacher_import import (PROGRAM_FILES, TORCHSCRIPT, TORCHSCRIPT_DEPRECATED, check_fits, checkpoint_format,
                                   load_program)
from engine.trainer import Teacher, accuracy, fit, split_accuracy
from engine.workspace import PREDICTIONS_FILE, Workspace, read_meta

log = logging.getLogger("kd")


def _ignore(*_) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """What the caller hears as a training goes; the tracking layer logs it."""

    start: Callable[[dict], None] = _ignore  # the settings, once the model, loss and teacher are set up
    epoch: Callable[[dict], None] = _ignore  # each epoch's metrics
    saved: Callable[[nn.Module | None, Workspace, dict], None] = _ignore  # the model as saved (None: no model), its meta


@dataclass(frozen=True)
class Folders:
    """Where a training reads and writes: the project (every spec's `out` and `targets` are relative to it),
    its epoch checkpoints, and the staging folder its outputs go to."""

    root: Path
    work: Path
    out: Path

    def model(self, spec: TrainSpec) -> Path:
        return self.root / spec.out

    def targets(self, spec: TrainSpec) -> Path:
        return self.root / spec.targets


# ---------------------------------------------------------------- the hop's checks and its teacher

def _feature_mode(spec: TrainSpec, ws: Workspace, loss: DistillLoss) -> tuple[str, float]:
    """'cached' or 'online' for the teacher's features, and what a cache takes (MB)."""
    per_image = loss.reduce_teacher({n: torch.zeros(1, *loss.teacher_shapes[n]) for n in loss.teacher_features})
    mb = sum(f.numel() for f in per_image.values()) * 2 * spec.use.views * len(ws.train) / 2**20
    mode = spec.use.features
    if spec.use.fresh_views:  # a view drawn at each step: nothing computed beforehand can hold its features
        if mode == "cached":
            raise KDError(f"{spec.name}: cache.features: cached with cache.fresh_views: true; features of views drawn "
                          "at each step cannot be cached; set cache.features to online or auto")
        mode = "online"
    if mode == "auto":
        mode = "cached" if mb <= spec.use.feature_budget_mb else "online"
    return mode, mb


def _ensemble_weights(spec: TrainSpec, dirs: list[Path]) -> list[float] | None:
    if len(dirs) < 2:
        return None
    ensemble = spec.kd.ensemble
    if ensemble.weights is not None:
        if len(ensemble.weights) != len(dirs):
            raise KDError(f"kd.ensemble.weights has {len(ensemble.weights)} entries for {len(dirs)} teachers")
        return ensemble.weights
    if ensemble.weighted:
        accs = {str(d): read_meta(d).get("best_val_acc") for d in dirs}
        unknown = [d for d, acc in accs.items() if acc is None]
        if unknown:  # an imported teacher that was not fine-tuned was never validated here
            raise KDError(f"kd.ensemble.weighted weights teachers by validation accuracy, but {', '.join(unknown)} "
                          "has none; set kd.ensemble.weights, or teacher.finetune_epochs for an imported teacher")
        return [float(acc) for acc in accs.values()]
    return None


def _check_topk(spec: TrainSpec, loss: DistillLoss) -> None:
    """A top-k cache keeps k logits and the rest's total mass: refuse a loss that reads more."""
    k = spec.use.topk
    if not loss.serves_topk:
        how = " with kd.standardize" if spec.kd.standardize else ""
        raise KDError(f"{spec.name}: loss {spec.loss!r}{how} reads every class's teacher logit, which a top-k "
                      f"soft-target cache (cache.topk = {k}) does not keep; set cache.topk to null, or cache.online "
                      "to true")
    temp = loss.soft_temperature()
    if temp is not None and temp > 2:
        log.warning("%s: cache.topk = %d at temperature %g: the dropped classes share their mass evenly, an "
                    "approximation that grows with T (docs/methods.md)", spec.name, k, temp)


def _sources(spec: TrainSpec, ws: Workspace, folders: Folders, models: list[nn.Module | None]) -> list:
    """Each guide's soft targets: its cache, checked against what this hop needs, or the guide run online."""
    use, sources = spec.use, []
    for guide, model in zip(spec.guides, models):
        if use.online:
            sources.append(soft_targets.OnlineTeacher(model))
            continue
        fingerprint = model_fingerprint(model) if model is not None else read_meta(folders.model(guide))["model_fingerprint"]
        key = soft_targets.CacheKey(fingerprint, ws.fingerprint, ws.splits.augment.model_dump(), use.views, use.seed,
                                    use.topk, ws.splits.num_classes, len(ws.train))
        where = folders.targets(guide)
        kept = ws.keeps_resident(soft_targets.read_manifest(where)["bytes"])
        sources.append(soft_targets.load(where, key, ws.device, resident=kept))
    return sources


def _teacher(spec: TrainSpec, ws: Workspace, folders: Folders, models: list[nn.Module | None], loss: DistillLoss,
             generator) -> tuple[Teacher, dict]:
    """Where the soft targets (and the teacher's features, when the loss reads them) come from."""
    use, n, augment_spec = spec.use, len(ws.train), ws.splits.augment
    sources = _sources(spec, ws, folders, models)
    extra = {"teacher_mode": "online" if use.online else "cached", "guides": len(sources)}
    if not use.online:
        extra["cache_read"] = "memory" if all(s.values.resident for s in sources) else "by row"
    if use.topk and not use.online:
        _check_topk(spec, loss)
    if loss.teacher_features:
        if len(sources) != 1:
            raise KDError(f"loss {spec.loss!r} reads one teacher's features; {spec.name} has {len(sources)} guides")
        mode, mb = _feature_mode(spec, ws, loss)
        log.info("%s: teacher features %s (%s; a cache takes %.0f MB, budget %.0f MB)", spec.name, mode,
                 ", ".join(loss.teacher_features), mb, use.feature_budget_mb)
        if mode == "online":
            sources[0] = soft_targets.OnlineTeacher(models[0], loss.teacher_features, loss.reduce_teacher)
        else:
            on_disk = not ws.keeps_resident(int(mb * 2**20))
            feats = soft_targets.compute_features(models[0], ws.train, augment_spec, use.views, use.seed,
                                                  loss.teacher_features, loss.reduce_teacher,
                                                  spec.train.eval_batch_size,
                                                  folders.work / f"features-{ranks().rank}" if on_disk else None)
            sources[0] = soft_targets.CachedFeatures(sources[0], feats)
            mode += " on disk" if on_disk else ""
        extra |= {"teacher_features": mode, "teacher_features_mb": round(mb, 1)}
    if loss.teacher_online:  # on views no cache holds (MLKD's strong views), whatever cache.online says
        extra["teacher_runs_online"] = True
    weights = _ensemble_weights(spec, [folders.model(g) for g in spec.guides])
    targets = (sources[0] if len(sources) == 1 else
               soft_targets.DenseGuides(sources, spec.survival, generator, weights))
    if weights:
        extra["ensemble_weights"] = ",".join(f"{w:.4g}" for w in weights)
    if use.fresh_views:
        return Teacher(targets, None), extra | {"teacher_views": "fresh"}
    views = augment.fixed_views(n, augment_spec, use.seed, use.views).to(ws.device)
    return Teacher(targets, views), extra


def _check_guides(spec: TrainSpec, guides: list[nn.Module | None]) -> None:
    kind = LOSSES[spec.loss]
    program = next((g.arch for g in guides if getattr(g, "arch", "") in PROGRAM_FILES), None)
    if program and issubclass(kind, FeatureLoss):
        raise KDError(f"{spec.name}: loss {spec.loss!r} reads the teacher's features, which an imported {program} "
                      "teacher does not expose; use a logit loss (kd, dkd) for this hop, or import the teacher as a "
                      "state_dict")
    if None in guides and (issubclass(kind, FeatureLoss) or kind.teacher_online or spec.use.online):
        how = ("cache.online runs the teacher" if spec.use.online
               else f"loss {spec.loss!r} runs the teacher or reads its features")
        raise KDError(f"{spec.name}: its teacher is known only by its predictions (teacher.predictions), but {how}; "
                      "use a loss that reads outputs only (kd, dkd, dist, ctkd) with cache.online false")


def _import_teacher(spec: TrainSpec, ws: Workspace) -> nn.Module:
    """The user's teacher, checked against the data set's images and classes."""
    path = spec.imported.checkpoint
    kind = checkpoint_format(path) if spec.imported.format == "auto" else spec.imported.format
    if kind == TORCHSCRIPT:
        log.warning(TORCHSCRIPT_DEPRECATED.format(path=path))
    if kind in PROGRAM_FILES:
        if spec.input:
            raise KDError(f"{path}: teacher.input {spec.input!r} needs a model the pipeline builds, but a {kind} "
                          "program takes the input it was made for; import a state_dict for teacher.arch, or "
                          "export the program on its own view")
        model = load_program(kind, path, ws.device)
    else:
        state = load_torch(path, ws.device)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # our own checkpoints wrap the state_dict
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KDError(f"{path}: not a state_dict (a mapping of names to tensors); save model.state_dict(), "
                          "or a torch.export program with torch.export.save")
        model = ws.build(spec.arch, input=spec.input)
        # A user's weights are the bare network's: with a view, they are the wrapped network's.
        ws.load_state(model.net if spec.input else model, state, path)
    check_fits(model, ws.splits.input_shape, ws.splits.classes, path)
    return model


def _loss(spec: TrainSpec, ws: Workspace, model: nn.Module, guides: list[nn.Module | None]) -> DistillLoss:
    ctx = LossContext(student=model, teacher=guides[0] if guides else None,
                      sample=ws.train.normalize(ws.train.x[:8]), build=lambda arch, seed: ws.build(arch, seed, spec.input), seed=spec.seed,
                      num_train=len(ws.train), train_labels=ws.train.y, epochs=spec.train.epochs)
    try:
        loss = build_loss(spec.loss, spec.kd, ctx)
    except (ValueError, LookupError) as e:  # a bad layer name, no matching stages: one line naming the setting
        raise KDError(f"{spec.name}: {e}") from None
    if spec.quantized and (loss.teacher_features or loss.wrap(model) is not model):
        raise KDError(f"{spec.name}: QAD trains the student as INT8 will run it, and distils with a loss that reads "
                      f"logits only; {spec.loss!r} reads features or changes the model (student.kd.loss)")
    if spec.parallel:
        _check_parallel(spec, loss)
    if len(guides) > 1 and not isinstance(loss, HintonKD):
        raise KDError(f"{spec.name}: loss {spec.loss!r} learns from one teacher, but {len(guides)} guides were "
                      "given; several guides (DGKD, an ensemble) combine through kd or ctkd")
    if spec.kd and spec.kd.ensemble.combine == "sequence" and len(guides) > 1 and (
            spec.survival < 1 or spec.kd.ensemble.weights or spec.kd.ensemble.weighted):
        raise KDError(f"{spec.name}: kd.ensemble.combine 'sequence' takes its guides one at a time, in order; it "
                      "keeps neither a guide survival below 1 (DGKD) nor kd.ensemble.weights or weighted")
    if guides and not loss.needs_teacher:
        raise KDError(f"{spec.name}: loss {spec.loss!r} trains without a teacher, but {len(guides)} guide(s) were given")
    return loss


def _check_parallel(spec: TrainSpec, loss: DistillLoss) -> None:
    """What a training over several processes cannot do, refused; what it does per process, said."""
    why = ("QAD trains fake-quantized observers whose ranges each process would keep for its own share"
           if spec.quantized else f"loss {spec.loss!r} keeps state one process alone keeps right"
           if not loss.distributes else "")
    if why:
        raise KDError(f"{spec.name}: {why}; train it in one process (distributed.nproc_per_node: 1, nnodes: 1)")
    if loss.batch_statistics:
        log.warning("%s: over %d processes, %s of loss %r are computed over each process's share of the batch, "
                    "not the whole batch", spec.name, spec.parallel.processes, loss.batch_statistics, spec.loss)


def _start_model(spec: TrainSpec, ws: Workspace, folders: Folders) -> nn.Module:
    if spec.imported:
        return _import_teacher(spec, ws)
    if not spec.init:
        return ws.build(spec.arch, spec.seed, spec.input)
    start = read_meta(folders.model(spec.init)).get("input")
    if start != spec.input:
        raise KDError(f"{spec.name}: starts from {spec.init.name}, which reads {start or 'the whole input'}, but "
                      f"reads {spec.input or 'the whole input'} itself; give both the same input")
    return ws.load_model_dir(folders.model(spec.init))


def prepare(spec: TrainSpec, ws: Workspace, folders: Folders, generator) -> tuple[nn.Module, DistillLoss | None,
                                                                                  Teacher | None, dict]:
    """The model to train, its loss and its teacher (no loss when the model is kept as it comes)."""
    model = _start_model(spec, ws, folders)
    if spec.as_is:
        return model, None, None, {}
    if spec.quantized:
        model = QADModel(model, ws.train.normalize(ws.train.x[:2]))
    guides = [ws.load_guide(folders.model(g)) for g in spec.guides]
    if guides:
        _check_guides(spec, guides)
    loss = _loss(spec, ws, model, guides)
    if not guides:
        return model, loss, None, {"loss": spec.loss} if spec.loss != "ce" else {}
    teacher, extra = _teacher(spec, ws, folders, guides, loss, generator)
    if spec.parallel and loss.batch_statistics:
        extra["batch_statistics"] = "per process"
    return model, loss, teacher, {"loss": spec.loss, **extra}


# ---------------------------------------------------------------- a training, start to end

def settings(spec: TrainSpec, ws: Workspace, loss: DistillLoss | None, extra: dict) -> dict:
    """What MLflow shows as the run's parameters."""
    params = {"arch": spec.arch, "role": spec.role, "method": spec.method, "seed": spec.seed,
              "parent_model": ",".join(s.name for s in (spec.guides or ([spec.init] if spec.init else []))),
              "epochs": spec.train.epochs, "lr": spec.train.lr, "batch_size": spec.train.batch_size,
              "data": ws.splits.name}
    if loss is not None and spec.loss != "ce":
        params |= loss_settings(spec.kd, spec.loss)
    if spec.guides:
        params |= {"views": spec.use.views, "topk": spec.use.topk or 0, "guide_survival": spec.survival}
    if spec.parallel:
        params |= {f"distributed.{k}": v for k, v in spec.parallel.model_dump().items()}
    return params | extra


def _fit(spec: TrainSpec, ws: Workspace, folders: Folders, key: str, generator, model: nn.Module,
         loss: DistillLoss | None, teacher: Teacher | None, hooks: Hooks) -> tuple[list[dict], dict]:
    """The per-epoch history and the best validation epoch (nothing, for a model kept as it comes)."""
    if loss is None:
        return [], {"best_epoch": 0, "best_val_acc": None}
    result = fit(model, ws.train, ws.val, spec.train, loss, generator, ws.splits.augment,
                 kd=spec.kd if teacher else None, teacher=teacher, workdir=folders.work, run_key=key,
                 callback=hooks.epoch, desc=spec.name, test=ws.test if spec.test else None, parallel=spec.parallel,
                 stop_after=spec.stop_after)
    best = {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
            "train_seconds": round(sum(h.get("epoch_seconds", 0.0) for h in result.history), 2)}
    if spec.test:  # the protocol of the TAKD and mdistiller code, reported beside ours, never used to select
        best["test_acc_best_epoch"] = max(h["epoch_test_acc"] for h in result.history)
    return result.history, best


def run(spec: TrainSpec, ws: Workspace, folders: Folders, key: str, hooks: Hooks = Hooks()) -> dict:
    """Train (or import) the model `spec` describes into `folders.out`; returns its summary."""
    if spec.imported and spec.imported.predictions:
        return _take_predictions(spec, ws, folders.out, hooks)
    generator = seed_everything(spec.seed)
    model, loss, teacher, extra = prepare(spec, ws, folders, generator)
    hooks.start(settings(spec, ws, loss, extra))
    history, best = _fit(spec, ws, folders, key, generator, model, loss, teacher, hooks)
    if isinstance(model, QADModel):
        model = model.to_float()
    if spec.test:
        best["test_acc"] = split_accuracy(model, ws.test, spec.train.eval_batch_size)
        hooks.epoch({"epoch": 0, "test_acc": best["test_acc"]})
    if not ranks().main:  # one of several processes: rank 0 saves the model
        return {}
    meta = ws.save_model(folders.out, model, {"name": spec.name, "role": spec.role, "method": spec.method,
                                              "parent_model": settings(spec, ws, None, {})["parent_model"] or None,
                                              **best, **extra, "torch_threads": torch.get_num_threads(),
                                              "processes": ranks().world,
                                              "pid": os.getpid()}, history)
    hooks.saved(model, ws, meta)
    return {**best, "arch": spec.arch, "params": meta["params"], "flops": meta["flops"],
            "model_fingerprint": meta["model_fingerprint"]}


def _take_predictions(spec: TrainSpec, ws: Workspace, out: Path, hooks: Hooks) -> dict:
    """A teacher known only by its outputs: the file checked against the data set, its logits kept in the train
    split's order, and its accuracy on the validation images when the file covers them."""
    imported = spec.imported
    if not ranks().main:
        return {}
    logits, info = predictions.read(imported.predictions, {"train": ws.splits.train, "val": ws.splits.val},
                                    ws.splits.num_classes, imported.predictions_kind, imported.predictions_temperature)
    val = logits.get("val")
    best = {"best_epoch": 0, "best_val_acc": None if val is None else accuracy(val, ws.splits.val.y)}
    hooks.start({"role": spec.role, "method": spec.method, "data": ws.splits.name,
                 **{f"predictions_{k}": v for k, v in info.items()}})
    meta = ws.save_predictions(out, logits["train"], {"name": spec.name, "role": spec.role, "method": spec.method,
                                                      "parent_model": None, "predictions": info, **best})
    hooks.saved(None, ws, meta)
    return {**best, "arch": meta["arch"], "predictions": info, "model_fingerprint": meta["model_fingerprint"]}


# ---------------------------------------------------------------- a guide's soft targets

def write_cache(ws: Workspace, model_dir: Path, cache: CacheSpec, out: Path, batch_size: int) -> dict:
    """The soft targets of the model in `model_dir` over `cache.views` fixed views, written to `out`."""
    model = ws.load_guide(model_dir)
    augment_spec = ws.splits.augment
    if model is None:  # a teacher known only by its outputs on the clean images: one view, nothing to run
        if cache.views != 1:
            raise KDError(f"{model_dir}: the teacher is known only by its predictions on the clean training images "
                          f"(teacher.predictions), which make one view; set cache.views: 1 (it is {cache.views})")
        fingerprint = read_meta(model_dir)["model_fingerprint"]
    else:
        fingerprint = model_fingerprint(model)
    key = soft_targets.CacheKey(fingerprint, ws.fingerprint, augment_spec.model_dump(), cache.views, cache.seed,
                                cache.topk, ws.splits.num_classes, len(ws.train))
    if model is None:
        manifest = soft_targets.write_logits(out, load_torch(model_dir / PREDICTIONS_FILE), key) if ranks().main else None
    else:
        manifest = soft_targets.write(out, model, ws.train, augment_spec, key, batch_size)
    if manifest is None:  # a rank other than 0 of several: it ran its share, rank 0 wrote
        return {}
    return {"views": cache.views, "topk": cache.topk, "bytes": manifest["bytes"], "shape": manifest["shape"]}
