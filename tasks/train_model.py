"""Stages that train a model: teacher (or import it), assistant, the three students, fine-tuning.

One function (`fit_training`) serves them all, and the experiments' jobs too (tasks/train_job.py);
the stage table (tasks/stages.py) says what each pipeline model learns from.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine import augment, predictions, soft_targets
from engine.atomic import load_torch
from engine.config import KDConfig, TrainConfig
from engine.device import seed_everything
from engine.errors import KDError
from engine.fingerprint import model_fingerprint
from engine.qad import QADModel
from engine.losses import LOSSES, DistillLoss, LossContext, build_loss, loss_settings
from engine.losses.feature import FeatureLoss
from engine.losses.logit import HintonKD
from engine.teacher_import import TORCHSCRIPT, check_fits, checkpoint_format, load_torchscript
from engine.trainer import Teacher, accuracy, fit, predict
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.context import Workspace, read_meta
from tasks.stage import StageRun

log = logging.getLogger("kd")


@dataclass(frozen=True)
class PipelineModel:
    """A model one pipeline run trains (the stage table, tasks/stages.py, says which stage trains it)."""

    name: str  # its folder under data/models, e.g. student-takd-s1
    role: str  # teacher | assistant | student: picks the config section
    method: str  # NOKD, KD, BLKD, TAKD, FT
    seed: int  # the role's seed, or this student's
    source: "PipelineModel | None" = None  # the model whose soft targets it learns from
    init: "PipelineModel | None" = None  # the model it starts from (fine-tuning)
    quantized: bool = False  # trained with fake quantization (QAD)


def hop_kd(cfg: PipelineConfig, m: PipelineModel) -> KDConfig:
    """The distillation settings of the hop into `m`: its own, or the top-level kd."""
    return getattr(cfg, m.role).kd or cfg.kd


def train_config(cfg: PipelineConfig, m: PipelineModel) -> TrainConfig:
    base = getattr(cfg, m.role).train
    if m.role == "teacher" and cfg.teacher.checkpoint:
        return base.model_copy(update={"epochs": max(cfg.teacher.finetune_epochs, 1)})
    if m.quantized:
        return base.model_copy(update={"epochs": max(cfg.quantize.qad_epochs, 1),
                                       "lr": base.lr * cfg.quantize.qad_lr_scale})
    if m.init:
        return base.model_copy(update={"epochs": max(cfg.finetune.epochs, 1), "lr": base.lr * cfg.finetune.lr_scale})
    return base


def _arch(cfg: PipelineConfig, m: PipelineModel) -> str:
    return getattr(cfg, m.role).arch


def describe(cfg: PipelineConfig, m: PipelineModel) -> str:
    """A run name that says what it is, e.g. 'distill student plain-2 s1 from assistant plain-4 (TAKD)'."""
    who = f"{m.role} {_arch(cfg, m)}" + (f" s{m.seed}" if m.role == "student" else "")
    if m.source:
        loss = hop_kd(cfg, m).loss
        how = m.method if loss == "kd" else f"{m.method}, {loss}"
        return f"distill {who} from {m.source.role} {_arch(cfg, m.source)} ({how})"
    if m.init:
        return f"fine-tune {who} ({m.method})"
    if m.role == "teacher" and cfg.teacher.predictions:
        return f"import teacher predictions {Path(cfg.teacher.predictions).name}"
    if m.role == "teacher" and cfg.teacher.checkpoint:
        tuned = f", fine-tuned {cfg.teacher.finetune_epochs} epochs" if cfg.teacher.finetune_epochs else ""
        return f"import teacher {_arch(cfg, m)}{tuned}"
    return f"train {who} from labels ({m.method})"


@dataclass(frozen=True)
class Training:
    """One model to train, whoever asks: a pipeline stage (tasks/stages.py) or an experiment's job."""

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
    skip_training: bool = False  # fine-tuning (or QAD) with 0 epochs: the init model as is
    quantized: bool = False  # QAD: BatchNorm folded, fake quantization in training (engine/qad.py)
    parent_model: str = ""
    test: bool = False  # also measure test accuracy (experiments; the pipeline has an evaluate stage)
    loss: str = "ce"  # by name (engine.losses.LOSSES)
    kd: KDConfig | None = None  # this hop's distillation settings; None: the config's top-level kd


def loss_name(kd: KDConfig, has_guides: bool) -> str:
    """The loss a model trains with: its hop's loss when it has guides, or when that loss needs no
    teacher (DML, self-distillation); labels only otherwise."""
    return kd.loss if has_guides or not LOSSES[kd.loss].needs_teacher else "ce"


def _feature_mode(cfg: PipelineConfig, ws: Workspace, loss: DistillLoss) -> tuple[str, float]:
    """'cached' or 'online' for the teacher's features, and what a cache takes (MB)."""
    per_image = loss.reduce_teacher({n: torch.zeros(1, *loss.teacher_shapes[n]) for n in loss.teacher_features})
    mb = sum(f.numel() for f in per_image.values()) * 2 * cfg.cache.views * len(ws.train) / 2**20
    mode = cfg.cache.features
    if mode == "auto":
        mode = "cached" if mb <= cfg.cache.feature_budget_mb else "online"
    return mode, mb


def _ensemble_weights(kd: KDConfig, t: Training) -> list[float] | None:
    if len(t.guides) < 2:
        return None
    if kd.ensemble.weights is not None:
        if len(kd.ensemble.weights) != len(t.guides):
            raise KDError(f"kd.ensemble.weights has {len(kd.ensemble.weights)} entries for {len(t.guides)} teachers")
        return kd.ensemble.weights
    if kd.ensemble.weighted:
        accs = {str(m): read_meta(m).get("best_val_acc") for m, _ in t.guides}
        unknown = [m for m, acc in accs.items() if acc is None]
        if unknown:  # an imported teacher that was not fine-tuned was never validated here
            raise KDError(f"kd.ensemble.weighted weights teachers by validation accuracy, but {', '.join(unknown)} "
                          "has none; set kd.ensemble.weights, or teacher.finetune_epochs for an imported teacher")
        return [float(acc) for acc in accs.values()]
    return None


def _check_topk(t: Training, kd: KDConfig, loss: DistillLoss, k: int) -> None:
    """A top-k cache keeps k logits and the rest's total mass: refuse a loss that reads more."""
    if not loss.serves_topk:
        how = " with kd.standardize" if kd.standardize else ""
        raise KDError(f"{t.name}: loss {t.loss!r}{how} reads every class's teacher logit, which a top-k soft-target "
                      f"cache (cache.topk = {k}) does not keep; set cache.topk to null, or cache.online to true")
    if getattr(loss, "temperature", 1.0) > 2:
        log.warning("%s: cache.topk = %d at temperature %g: the dropped classes share their mass evenly, an "
                    "approximation that grows with T (docs/methods.md)", t.name, k, loss.temperature)


def _teacher(cfg: PipelineConfig, ws: Workspace, t: Training, models: list[nn.Module], loss: DistillLoss,
             generator) -> tuple[Teacher, dict]:
    """Where the soft targets (and the teacher's features, when the loss reads them) come from."""
    spec, n, kd = ws.splits.augment, len(ws.train), t.kd or cfg.kd
    sources = []
    for model, (model_dir, targets_dir) in zip(models, t.guides):
        if cfg.cache.online:
            sources.append(soft_targets.OnlineTeacher(model))
            continue
        fingerprint = model_fingerprint(model) if model is not None else read_meta(model_dir)["model_fingerprint"]
        key = soft_targets.CacheKey(fingerprint, ws.fingerprint, spec.model_dump(), cfg.cache.views,
                                    cfg.cache.seed, cfg.cache.topk, ws.splits.num_classes, n)
        sources.append(soft_targets.load(targets_dir, key, ws.device))
    extra = {"teacher_mode": "online" if cfg.cache.online else "cached", "guides": len(sources)}
    if cfg.cache.topk and not cfg.cache.online:
        _check_topk(t, kd, loss, cfg.cache.topk)
    if loss.teacher_features:
        if len(sources) != 1:
            raise KDError(f"loss {t.loss!r} reads one teacher's features; {t.name} has {len(sources)} guides")
        mode, mb = _feature_mode(cfg, ws, loss)
        log.info("%s: teacher features %s (%s; a cache takes %.0f MB, budget %.0f MB)", t.name, mode,
                 ", ".join(loss.teacher_features), mb, cfg.cache.feature_budget_mb)
        if mode == "online":
            sources[0] = soft_targets.OnlineTeacher(models[0], loss.teacher_features, loss.reduce_teacher)
        else:
            feats = soft_targets.compute_features(models[0], ws.train, spec, cfg.cache.views, cfg.cache.seed,
                                                  loss.teacher_features, loss.reduce_teacher, cfg.cache.batch_size)
            sources[0] = soft_targets.CachedFeatures(sources[0], feats)
        extra |= {"teacher_features": mode, "teacher_features_mb": round(mb, 1)}
    if loss.teacher_online:  # on views no cache holds (MLKD's strong views), whatever cache.online says
        extra["teacher_runs_online"] = True
    weights = _ensemble_weights(kd, t)
    targets = (sources[0] if len(sources) == 1 else
               soft_targets.DenseGuides(sources, t.survival, generator, weights))
    if weights:
        extra["ensemble_weights"] = ",".join(f"{w:.4g}" for w in weights)
    views = augment.fixed_views(n, spec, cfg.cache.seed, cfg.cache.views).to(ws.device)
    return Teacher(targets, views), extra


def _import_teacher(cfg: PipelineConfig, ws: Workspace, arch: str, path: str) -> nn.Module:
    """The user's teacher, checked against the data set's images and classes."""
    kind = checkpoint_format(path) if cfg.teacher.format == "auto" else cfg.teacher.format
    if kind == TORCHSCRIPT:
        model = load_torchscript(path, ws.device)
    else:
        state = load_torch(path, ws.device)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # our own checkpoints wrap the state_dict
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KDError(f"{path}: not a state_dict (a mapping of names to tensors); save model.state_dict(), "
                          "or a TorchScript file with torch.jit.save")
        model = ws.load_state(ws.build(arch), state, path)
    check_fits(model, ws.splits.input_shape, ws.splits.classes, path)
    return model


def _prepare(cfg: PipelineConfig, ws: Workspace, t: Training, generator) -> tuple[nn.Module, DistillLoss | None,
                                                                                Teacher | None, dict]:
    """The model to train, its loss and its teacher (None when there is nothing to train)."""
    if t.checkpoint:
        model = _import_teacher(cfg, ws, t.arch, t.checkpoint)
    else:
        model = ws.load_model_dir(t.init) if t.init else ws.build(t.arch, seed=t.seed)
    if t.skip_training:
        return model, None, None, {}
    if t.quantized:
        model = QADModel(model, ws.train.normalize(ws.train.x[:2]))
    kd = t.kd or cfg.kd
    guides = [ws.load_guide(m) for m, _ in t.guides]
    if any(getattr(g, "arch", "") == TORCHSCRIPT for g in guides) and issubclass(LOSSES[t.loss], FeatureLoss):
        raise KDError(f"{t.name}: loss {t.loss!r} reads the teacher's features, which a TorchScript teacher does not "
                      "expose; use a logit loss (kd, dkd) for this hop, or import the teacher as a state_dict")
    kind = LOSSES[t.loss]
    if None in guides and (issubclass(kind, FeatureLoss) or kind.teacher_online or cfg.cache.online):
        how = "cache.online runs the teacher" if cfg.cache.online else f"loss {t.loss!r} runs the teacher or reads its features"
        raise KDError(f"{t.name}: its teacher is known only by its predictions (teacher.predictions), but {how}; "
                      "use a loss that reads outputs only (kd, dkd, dist, ctkd) with cache.online false")
    ctx = LossContext(student=model, teacher=guides[0] if guides else None,
                      sample=ws.train.normalize(ws.train.x[:8]), build=ws.build, seed=t.seed,
                      num_train=len(ws.train), train_labels=ws.train.y)
    try:
        loss = build_loss(t.loss, kd, ctx)
    except (ValueError, LookupError) as e:  # a bad layer name, no matching stages: one line naming the setting
        raise KDError(f"{t.name}: {e}") from None
    if t.quantized and (loss.teacher_features or loss.wrap(model) is not model):
        raise KDError(f"{t.name}: QAD trains the student as INT8 will run it, and distils with a loss that reads "
                      f"logits only; {t.loss!r} reads features or changes the model (student.kd.loss)")
    if len(guides) > 1 and not isinstance(loss, HintonKD):
        raise KDError(f"{t.name}: loss {t.loss!r} learns from one teacher, but {len(guides)} guides were given; "
                      "several guides (DGKD, an ensemble) combine through kd or ctkd")
    if guides and not loss.needs_teacher:
        raise KDError(f"{t.name}: loss {t.loss!r} trains without a teacher, but {len(guides)} guide(s) were given")
    if not guides:
        return model, loss, None, {"loss": t.loss} if t.loss != "ce" else {}
    teacher, extra = _teacher(cfg, ws, t, guides, loss, generator)
    return model, loss, teacher, {"loss": t.loss, **extra}


def _fit(cfg: PipelineConfig, ws: Workspace, t: Training, key: str, generator, model: nn.Module,
         loss: DistillLoss | None, teacher: Teacher | None, callback) -> tuple[list[dict], dict]:
    """The per-epoch history and the best validation epoch (nothing, for an import)."""
    if loss is None:
        return [], {"best_epoch": 0, "best_val_acc": None}
    kd = t.kd or cfg.kd
    result = fit(model, ws.train, ws.val, t.train, loss, generator, ws.splits.augment,
                 kd=kd if teacher else None, teacher=teacher, workdir=ws.cat.work(t.name), run_key=key,
                 callback=callback, desc=t.name, test=ws.test if t.test else None)
    best = {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc}
    if t.test:  # the protocol of the TAKD and mdistiller code, reported beside ours, never used to select
        best["test_acc_best_epoch"] = max(h["epoch_test_acc"] for h in result.history)
    return result.history, best


def fit_training(cfg: PipelineConfig, cat: Catalog, t: Training, key: str, out_dir: Path) -> dict:
    """Train (or import) the model, save it in `out_dir` and log it to MLflow; returns the summary."""
    ws = Workspace(cat, cfg.device)
    generator = seed_everything(t.seed)
    params = {"arch": t.arch, "role": t.role, "method": t.method, "parent_model": t.parent_model, "seed": t.seed,
              "epochs": t.train.epochs, "lr": t.train.lr, "batch_size": t.train.batch_size, "data": cfg.data.name}
    model, loss, teacher, extra = _prepare(cfg, ws, t, generator)
    if loss is not None and t.loss != "ce":
        params |= loss_settings(t.kd or cfg.kd, t.loss)
    if t.guides:
        params |= {"views": cfg.cache.views, "topk": cfg.cache.topk or 0, "guide_survival": t.survival}
    params |= extra
    with tracking.model_run(cfg, cat, t.name, t.run_name, t.role, t.method, params) as run:
        history, best = _fit(cfg, ws, t, key, generator, model, loss, teacher, run.log_epoch)
        if isinstance(model, QADModel):
            model = model.to_float()
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


def _as_it_comes(cfg: PipelineConfig, m: PipelineModel) -> bool:
    """Fine-tuning or QAD set to 0 epochs, or an imported teacher not fine-tuned: the model is its input as is."""
    if m.init:
        return (cfg.quantize.qad_epochs if m.quantized else cfg.finetune.epochs) == 0
    return m.role == "teacher" and bool(cfg.teacher.checkpoint) and cfg.teacher.finetune_epochs == 0


def training(cfg: PipelineConfig, cat: Catalog, m: PipelineModel) -> Training:
    """A pipeline model as a Training."""
    return Training(name=m.name, role=m.role, method=m.method, arch=_arch(cfg, m), seed=m.seed,
                    train=train_config(cfg, m), run_name=describe(cfg, m),
                    guides=((cat.model(m.source.name), cat.soft_targets(m.source.name)),) if m.source else (),
                    init=cat.model(m.init.name) if m.init else None,
                    checkpoint=cfg.teacher.checkpoint if m.role == "teacher" else None,
                    skip_training=_as_it_comes(cfg, m),
                    parent_model=(m.source or m.init).name if (m.source or m.init) else "",
                    loss=loss_name(hop_kd(cfg, m), True) if m.source else "ce", kd=hop_kd(cfg, m),
                    quantized=m.quantized)


def import_predictions(cfg: PipelineConfig, cat: Catalog, t: Training, out_dir: Path) -> dict:
    """A teacher known only by its outputs: the file checked against the data set, its logits kept in the
    train split's order, and its accuracy on the validation images when the file covers them."""
    ws = Workspace(cat, "cpu")
    logits, info = predictions.read(cfg.teacher.predictions, {"train": ws.splits.train, "val": ws.splits.val},
                                    ws.splits.num_classes, cfg.teacher.predictions_kind,
                                    cfg.teacher.predictions_temperature)
    val = logits.get("val")
    best = {"best_epoch": 0, "best_val_acc": None if val is None else accuracy(val, ws.splits.val.y)}
    params = {"role": t.role, "method": t.method, "data": cfg.data.name, **{f"predictions_{k}": v for k, v in info.items()}}
    with tracking.model_run(cfg, cat, t.name, t.run_name, t.role, t.method, params) as run:
        meta = ws.save_predictions(out_dir, logits["train"], {"name": t.name, "role": t.role, "method": t.method,
                                                              "parent_model": None, "predictions": info, **best})
        run.log_model(None, ws, meta)
    return {**best, "arch": meta["arch"], "predictions": info, "model_fingerprint": meta["model_fingerprint"],
            "mlflow_run_id": run.run_id}


def train(run: StageRun, m: PipelineModel) -> dict:
    """The work of the stage that trains pipeline model `m`."""
    t = training(run.cfg, run.cat, m)
    if m.role == "teacher" and run.cfg.teacher.predictions:
        return import_predictions(run.cfg, run.cat, t, run.out)
    return fit_training(run.cfg, run.cat, t, run.key, run.out)
