"""The stage table: every stage of the pipeline, declared once.

A stage says its name, the upstream stages whose outputs it reads, the files outside the
project it reads, the config fields it depends on, its code, what it writes, and whether it
runs on an accelerator. Everything else is derived from this table:

- the CLI subcommands (`python -m tasks <stage>`, tasks/cli.py);
- dvc.yaml (`python -m tasks dvc-yaml`, tasks/dvc_yaml.py; a test keeps the committed file equal);
- the Prefect flow's tasks, their names and their edges (flows/pipeline.py);
- each stage's key (`key_inputs` below): a hash of what DVC tracks for it.

Student stages run once per seed in `student.seeds` (`per_seed`); an instance is named like
DVC names its foreach stages, `train-student-nokd@1`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.data import fetch, fetched, sources
from engine.errors import KDError
from tasks import evaluate, export, prepare_data, report, train_model
from tasks.cache_soft_targets import cache_stage
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.content import content_hash
from tasks.stage import StageRun, read_stage, run_once, stage_lock
from tasks.train_model import PipelineModel, describe

# The cache settings a distillation reads (batch size only sets how fast a cache is written).
CACHE_USE = ("cache.views", "cache.topk", "cache.seed", "cache.online", "cache.features", "cache.feature_budget_mb")
CACHE_MAKE = ("cache.views", "cache.topk", "cache.seed")
STUDENT = ("student.arch", "student.train")
HOP = ("kd", *CACHE_USE)
CALIBRATION = ("quantize.calibration_images", "quantize.calibration_seed")


@dataclass(frozen=True)
class Trains:
    """The model a training stage makes, and what it learns from (stage names)."""

    model: str  # folder under data/models (per-seed stages add -s<seed>)
    role: str  # teacher | assistant | student
    method: str
    source: str | None = None  # the stage whose model's soft targets it learns from
    init: str | None = None  # the stage whose model it starts from
    quantized: bool = False  # trained with fake quantization (QAD), for the INT8 export


@dataclass(frozen=True)
class Fetch:
    """Makes some of a stage's `reads` exist (a named data set's copy or download) before its key hashes them.
    dvc.yaml runs it as its own stage (FETCH_STAGE), whose outs are what it makes."""

    run: Callable[[PipelineConfig], None]
    makes: Callable[[PipelineConfig], list[Path]]  # [] when there is nothing to fetch (a user's own data)
    params: tuple[str, ...]
    code: tuple[str, ...]


FETCH_STAGE = "fetch-data"  # its subcommand too: `python -m tasks fetch-data`


@dataclass(frozen=True)
class Stage:
    name: str
    work: Callable[[StageRun], dict]  # writes the outputs into run.out; returns the summary
    out: Callable[[Catalog, str], Path]  # its output folder, given the model name for trainings
    needs: tuple[str, ...] = ()  # upstream stages whose outputs it reads
    params: tuple[str, ...] = ()  # config fields (dotted) it depends on
    code: tuple[str, ...] = ()  # its own modules, beside tasks.stage.SHARED_CODE
    reads: Callable[[PipelineConfig], list[Path]] = lambda cfg: []  # files outside the project's outputs
    accelerator: bool = False
    per_seed: bool = False
    trains: Trains | None = None
    title: Callable[[PipelineConfig], str] = lambda cfg: ""
    fetch: Fetch | None = None
    after: Callable[[PipelineConfig, Catalog, dict], dict] | None = None  # runs also when the outputs are reused
    metrics: tuple[str, ...] = ()  # small files outside `out` it writes, for dvc metrics / dvc plots
    plots: tuple[str, ...] = ()


def _teacher_file(cfg: PipelineConfig) -> list[Path]:
    """The imported teacher's file: a model, or its predictions."""
    return [Path(f) for f in (cfg.teacher.checkpoint, cfg.teacher.predictions) if f]


def _trainings(*spec: tuple) -> tuple[Stage, ...]:
    """Each (name, Trains, config fields, options) as its stage, plus a cache stage after every model that a later
    one learns from. What a training needs follows from what it learns from: its source's model and cache, or
    its init's model."""
    out: list[Stage] = []
    cached = {t.source for _, t, _, _ in spec if t.source}
    for name, t, params, kw in spec:
        needs = ["prepare-data", *([t.source, _cache_name(t.source, spec)] if t.source else []),
                 *([t.init] if t.init else [])]

        def work(run: StageRun, name=name) -> dict:
            return train_model.train(run, models(run.cfg)[model_name(STAGES[name], run.seed)])

        out.append(Stage(name, work, out=lambda cat, model: cat.model(model), needs=tuple(needs), params=params,
                         code=("tasks/train_model.py",), accelerator=True, trains=t, **kw))
        if name in cached:
            out.append(_cache(name, t.model))
    return tuple(out)


def _cache_name(trainer: str, spec: tuple) -> str:
    return "cache-" + next(t.model for name, t, _, _ in spec if name == trainer)


def _cache(trainer: str, model: str) -> Stage:
    return Stage(f"cache-{model}", work=cache_stage(model), out=lambda cat, _: cat.soft_targets(model),
                 needs=("prepare-data", trainer), params=CACHE_MAKE, code=("tasks/cache_soft_targets.py",),
                 accelerator=True,
                 title=lambda cfg: f"cache soft targets of {model} {getattr(cfg, model).arch} (K={cfg.cache.views})")


TRAINING = _trainings(
    # Methods are what MLflow groups runs by: the teacher gets its own, so NOKD holds students only.
    ("train-teacher", Trains("teacher", "teacher", "teacher"), ("teacher",), {"reads": _teacher_file}),
    ("distill-assistant", Trains("assistant", "assistant", "KD", source="train-teacher"), ("assistant", *HOP), {}),
    ("train-student-nokd", Trains("student-nokd", "student", "NOKD"), STUDENT, {"per_seed": True}),
    ("distill-student-blkd", Trains("student-blkd", "student", "BLKD", source="train-teacher"),
     (*STUDENT, "student.kd", *HOP), {"per_seed": True}),
    ("distill-student-takd", Trains("student-takd", "student", "TAKD", source="distill-assistant"),
     (*STUDENT, "student.kd", *HOP), {"per_seed": True}),
    ("fine-tune-student", Trains("student-takd-ft", "student", "FT", init="distill-student-takd"),
     ("student.train", "finetune"), {"per_seed": True}),
    ("distill-student-qad", Trains("student-takd-qad", "student", "QAD", source="distill-assistant",
                                   init="fine-tune-student", quantized=True),
     (*STUDENT, "student.kd", *HOP, "quantize.qad_epochs", "quantize.qad_lr_scale"), {"per_seed": True}),
)
ALL_MODELS = tuple(s.name for s in TRAINING if s.trains)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare-data", prepare_data.work, out=lambda cat, _: cat.prepared, params=("data",),
          code=("tasks/prepare_data.py",), reads=lambda cfg: sources(cfg.data),
          fetch=Fetch(lambda cfg: fetch(cfg.data), lambda cfg: fetched(cfg.data),
                      params=("data.name", "data.root", "data.source_dir"), code=("engine/data.py",)),
          title=lambda cfg: f"prepare data {cfg.data.name}"),
    *TRAINING,
    Stage("evaluate", lambda run: evaluate.work(run, models(run.cfg)), out=lambda cat, _: cat.eval_dir,
          needs=("prepare-data", *ALL_MODELS), params=("evaluate", "quantize.evaluate", *CALIBRATION),
          code=("tasks/evaluate.py",),
          accelerator=True, title=lambda cfg: "evaluate every model on the test split (and INT8 the QAD chain's)"),
    Stage("report", lambda run: report.work(run, models(run.cfg)), out=lambda cat, _: cat.reports,
          needs=("evaluate", *ALL_MODELS), params=("tracking", "experiments.confidence", "quantize.qad_epochs", "quantize.evaluate"),
          code=("tasks/report.py", "tasks/figures.py"),
          after=report.after, metrics=report.METRICS, plots=report.PLOTS,
          title=lambda cfg: f"report NOKD / BLKD / TAKD over {len(cfg.student.seeds)} seeds"),
    Stage("export", lambda run: export.work(run, models(run.cfg)), out=lambda cat, _: cat.export,
          needs=("prepare-data", "evaluate", *ALL_MODELS),
          params=("export", *CALIBRATION, "quantize.max_drop", "evaluate.speed_repeats"),
          code=("tasks/export.py", "tasks/model_card.py", "tasks/train_model.py"),
          after=lambda cfg, cat, result: export.register(cfg, cat, result),
          title=lambda cfg: "export the best student (TorchScript, ONNX, fp32 and INT8, model card), register it"),
)}


# ---------------------------------------------------------------- instances: (stage, seed)

@dataclass(frozen=True)
class Instance:
    stage: Stage
    seed: int | None = None

    @property
    def id(self) -> str:
        """As DVC names a foreach stage: train-student-nokd@1."""
        return self.stage.name if self.seed is None else f"{self.stage.name}@{self.seed}"

    def model(self, cfg: PipelineConfig) -> PipelineModel | None:
        return models(cfg).get(model_name(self.stage, self.seed)) if self.stage.trains else None

    def out(self, cat: Catalog) -> Path:
        return self.stage.out(cat, model_name(self.stage, self.seed) if self.stage.trains else "")

    def title(self, cfg: PipelineConfig) -> str:
        m = self.model(cfg)
        return describe(cfg, m) if m else self.stage.title(cfg)


def model_name(stage: Stage, seed: int | None) -> str:
    return f"{stage.trains.model}-s{seed}" if stage.per_seed else stage.trains.model


def instances(cfg: PipelineConfig, stage: str | None = None, seed: int | None = None) -> list[Instance]:
    """Every stage instance, in an order where each comes after its upstream."""
    out = []
    for s in STAGES.values():
        if stage in (None, s.name):
            seeds = [t for t in cfg.student.seeds if seed in (None, t)] if s.per_seed else [None]
            out += [Instance(s, t) for t in seeds]
    return out


def upstream(inst: Instance, cfg: PipelineConfig) -> list[Instance]:
    """The instances whose outputs `inst` reads: a per-seed stage reads its own seed's upstream,
    any other stage every seed's."""
    out = []
    for name in inst.stage.needs:
        up = STAGES[name]
        if not up.per_seed:
            out.append(Instance(up))
        elif inst.stage.per_seed:
            out.append(Instance(up, inst.seed))
        else:
            out += [Instance(up, t) for t in cfg.student.seeds]
    return out


def models(cfg: PipelineConfig) -> dict[str, PipelineModel]:
    """The models one pipeline run trains, by folder name, in pipeline order."""
    out: dict[str, PipelineModel] = {}
    for inst in instances(cfg):
        t = inst.stage.trains
        if t is None:
            continue
        section = getattr(cfg, t.role)
        seed = inst.seed if inst.seed is not None else section.seed

        def made_by(stage_name: str | None) -> PipelineModel | None:
            return None if stage_name is None else out[model_name(STAGES[stage_name], inst.seed)]

        name = model_name(inst.stage, inst.seed)
        out[name] = PipelineModel(name, t.role, t.method, seed, made_by(t.source), made_by(t.init), t.quantized)
    return out


# ---------------------------------------------------------------- running one instance

def dotted(cfg: PipelineConfig, key: str):
    value = cfg.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


def reads(stage: Stage, cfg: PipelineConfig, cat: Catalog) -> list[Path]:
    """What the stage reads outside the project's outputs; an input that holds or lies in an output cannot be one."""
    found = stage.reads(cfg)
    outs = [i.out(cat).resolve() for i in instances(cfg)] + [cat.metrics.resolve(), cat.state.resolve()]
    for p in found:
        clash = next((o for o in outs if o.is_relative_to(p.resolve()) or p.resolve().is_relative_to(o)), None)
        if clash:
            raise KDError(f"{p}: {stage.name} would read this as an input, but it overlaps the pipeline's output "
                          f"{clash}; keep your images, CSV and teacher file in a folder of their own")
    return found


def key_inputs(inst: Instance, cfg: PipelineConfig, cat: Catalog) -> dict:
    """What the stage's key hashes: its config fields, its seed, and the content of every file it
    reads and every upstream output. dvc.yaml lists the same (tasks/dvc_yaml.py)."""
    ups = upstream(inst, cfg)
    for u in ups:
        if read_stage(u.out(cat)) is None:
            raise KDError(f"{u.out(cat)}: {inst.id} reads the output of {u.id}, which has not been produced yet "
                          "(no stage.json); run that stage first")
    return {"params": {p: dotted(cfg, p) for p in inst.stage.params}, "seed": inst.seed,
            "reads": {str(p): content_hash(p, cat.state) for p in reads(inst.stage, cfg, cat)},
            "upstream": {u.id: content_hash(u.out(cat), cat.state) for u in ups}}


def run_instance(inst: Instance, cfg: PipelineConfig, cat: Catalog, force: bool = False) -> dict:
    """Run one stage instance, or reuse its outputs when its key matches. The one entry point of
    the CLI, the Prefect flow and `dvc repro`."""
    stage = inst.stage
    if os.environ.get("DVC_STAGE") == inst.id:
        from tasks.dvc_yaml import check_in_step

        check_in_step(cfg, cat, stage)
    if stage.fetch:  # before the key, which hashes what it fetched
        run_fetch(stage, cfg, cat)
    result = run_once(cat, inst.id, inst.out(cat), key_inputs(inst, cfg, cat), stage.code,
                      lambda key, out: stage.work(StageRun(cfg, cat, inst.seed, out, key)), force)
    if stage.after:
        with stage_lock(cat, f"{inst.id}-after"):  # two runs register one champion, not two
            result |= stage.after(cfg, cat, result)
    return result


def run_fetch(stage: Stage, cfg: PipelineConfig, cat: Catalog) -> list[Path]:
    """One fetch at a time: two stages, or the flow and `dvc repro`, never copy into one folder together."""
    with stage_lock(cat, f"{stage.name}-fetch"):
        stage.fetch.run(cfg)
    return stage.fetch.makes(cfg)


def fetch_all(cfg: PipelineConfig, cat: Catalog) -> list[Path]:
    """`python -m tasks fetch-data`: every stage's fetch."""
    return [p for s in STAGES.values() if s.fetch for p in run_fetch(s, cfg, cat)]


def run_stage(name: str, cfg: PipelineConfig, cat: Catalog, seed: int | None = None, force: bool = False) -> dict:
    """A stage by name: every seed of a per-seed stage unless one is given."""
    if name not in STAGES:
        raise KDError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if seed is not None and not STAGES[name].per_seed:
        raise KDError(f"{name} runs once, not per seed; drop --seed")
    chosen = instances(cfg, name, seed)
    if not chosen:
        raise KDError(f"{name}: seed {seed} is not in student.seeds {cfg.student.seeds}")
    results = {i.id: run_instance(i, cfg, cat, force) for i in chosen}
    return results[chosen[0].id] if len(chosen) == 1 else results


def markdown(cfg: PipelineConfig) -> str:
    """The stage table as the README shows it (`python -m tasks stages`)."""
    cat, rows = Catalog(Path(".")), []
    for stage in STAGES.values():
        inst = Instance(stage, "<seed>" if stage.per_seed else None)
        reads = ", ".join(f"`{p}`" for p in stage.reads(cfg)) or "—"
        rows.append(f"| `{stage.name}`{' (per seed)' if stage.per_seed else ''} | {', '.join(stage.needs) or '—'} | "
                    f"{reads} | {', '.join(f'`{p}`' for p in stage.params)} | {', '.join(stage.code)} | "
                    f"`{inst.out(cat)}` | {'yes' if stage.accelerator else 'no'} |")
    head = ["| stage | needs | reads (here) | config fields | code | writes | accelerator |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n"
