"""The stage table: every stage of the pipeline, declared once.

A stage says its name, the upstream stages whose outputs it reads, the files outside the project it reads, the
config fields it depends on, its code, what it writes, and whether it runs on an accelerator. A training stage
says what model it makes (`Model`): its role, what it learns from and starts from, and, for a student, its place
in the report (its label, and the students it is compared with). Everything else is derived from this table:

- the CLI subcommands (`python -m tasks <stage>`, tasks/cli.py), which are also dvc.yaml's commands;
- dvc.yaml (`python -m tasks dvc-yaml`, tasks/dvc_yaml.py; a test keeps the committed file equal);
- the Prefect flow's tasks, their names and their edges (flows/pipeline.py), each running the stage's command;
- each training's TrainSpec (`specs`), and with it the training's key (tasks/train.py);
- the report's rows and paired contrasts (tasks/report.py).

Student stages run once per seed in `student.seeds` (`per_seed`); an instance is named like DVC names its foreach
stages, `train-student-nokd@1`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.config import DataConfig
from engine.data import fetch, fetched, sources
from engine.distributed import ranks
from engine.errors import KDError
from engine.spec import CacheSpec, GuideUse, ParallelRecipe, Role, TrainSpec
from tasks import train as training
from tasks.catalog import CURVES, METRICS_FILE, PLOT_FILE, Catalog
from tasks.config import PipelineConfig
from tasks.run_context import RunContext
from tasks.stage import StageRun, Work, read_stage, run_once, stage_lock

# The cache settings a distillation reads, and those a cache is made with (engine/spec.py says which is which).
CACHE_USE = tuple(f"cache.{f}" for f in GuideUse.model_fields)
CACHE_MAKE = tuple(f"cache.{f}" for f in CacheSpec.model_fields)
STUDENT = ("student.arch", "student.input", "student.train")
HOP = ("kd", *CACHE_USE)
DISTILLED = (*STUDENT, "student.kd", *HOP)
CALIBRATION = ("quantize.calibration_images", "quantize.calibration_seed")
PREPARED = tuple(f"data.{f}" for f in DataConfig.model_fields if f not in DataConfig.READ_TIME)
# What a training's weights depend on when it runs over several processes (engine/spec.py's Parallel).
PARALLEL = ("distributed.nproc_per_node", "distributed.nnodes", *(f"distributed.{f}" for f in ParallelRecipe.model_fields))


def _lazy(module: str, name: str) -> Callable:
    """A stage's work, imported when it runs: a stage's process imports only its own stage's code."""
    return lambda *args: getattr(importlib.import_module(module), name)(*args)


@dataclass(frozen=True)
class Model:
    """The model a training stage makes, what it learns from (stage names), and its place in the report."""

    name: str  # folder under data/models (per-seed stages add -s<seed>)
    role: Role
    method: str  # what MLflow groups runs by
    source: str | None = None  # the stage whose model's soft targets it learns from
    init: str | None = None  # the stage whose model it starts from
    quantized: bool = False  # trained with fake quantization (QAD), for the INT8 export
    kd: dict = field(default_factory=dict)  # this hop's loss settings over its role's (student.kd, else kd)
    variant: str = ""  # a student's key in the report and `dvc metrics`: nokd, blkd, ...
    label: str = ""  # what the report calls it (default: the method)
    versus: tuple[str, ...] = ()  # the variants it is compared with, paired by seed: this minus each


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
    out: Callable[[Catalog, str], Path]  # its output folder, given the model name for trainings and caches
    work: Callable[[StageRun], dict] | None = None  # writes the outputs into run.out; returns the summary
    model: Model | None = None  # a training: what it makes (tasks/train.py runs it)
    caches: str | None = None  # a cache: the training stage whose model's soft targets it writes
    needs: tuple[str, ...] = ()  # upstream stages whose outputs it reads
    params: tuple[str, ...] = ()  # config fields (dotted) it depends on
    code: tuple[str, ...] = ()  # its own modules, beside tasks.stage.SHARED_CODE
    reads: Callable[[PipelineConfig], list[Path]] = lambda cfg: []  # files outside the project's outputs
    accelerator: bool = False
    per_seed: bool = False
    title: Callable[[PipelineConfig], str] = lambda cfg: ""
    fetch: Fetch | None = None
    after: Callable[[PipelineConfig, Catalog, RunContext, dict], dict] | None = None  # also when outputs are reused
    metrics: tuple[str, ...] = ()  # small files outside `out` it writes, for dvc metrics / dvc plots
    plots: tuple[str, ...] = ()


def _teacher_file(cfg: PipelineConfig) -> list[Path]:
    """The imported teacher's file: a model, or its predictions."""
    return [Path(f) for f in (cfg.teacher.checkpoint, cfg.teacher.predictions) if f]


def _trainings(*rows: tuple[str, Model, tuple[str, ...], dict]) -> tuple[Stage, ...]:
    """Each (stage name, Model, config fields, options) as its stage, plus a cache stage after every model that a
    later one learns from. What a training needs follows from what it learns from and starts from."""
    out: list[Stage] = []
    cached = {m.source for _, m, _, _ in rows if m.source}
    by_stage = {name: m for name, m, _, _ in rows}
    for name, m, params, kw in rows:
        needs = ["prepare-data", *([m.source, f"cache-{by_stage[m.source].name}"] if m.source else []),
                 *([m.init] if m.init else [])]
        out.append(Stage(name, out=lambda cat, model: cat.model(model), model=m, needs=tuple(needs),
                         params=(*params, *PARALLEL),
                         code=training.CODE, accelerator=True, **kw))
        if name in cached:
            out.append(Stage(f"cache-{m.name}", out=lambda cat, _, n=m.name: cat.soft_targets(n), caches=name,
                             needs=("prepare-data", name), params=CACHE_MAKE, code=training.CACHE_CODE,
                             accelerator=True, title=lambda cfg, m=m: f"cache soft targets of {m.name} "
                                                                      f"{getattr(cfg, m.role).arch} (K={cfg.cache.views})"))
    return tuple(out)


TRAINING = _trainings(
    # Methods are what MLflow groups runs by: the teacher gets its own, so NOKD holds students only.
    ("train-teacher", Model("teacher", "teacher", "teacher"), ("teacher",), {"reads": _teacher_file}),
    ("distill-assistant", Model("assistant", "assistant", "KD", source="train-teacher"), ("assistant", *HOP), {}),
    ("train-student-nokd", Model("student-nokd", "student", "NOKD", variant="nokd"), STUDENT, {"per_seed": True}),
    ("distill-student-blkd", Model("student-blkd", "student", "BLKD", source="train-teacher", variant="blkd",
                                   versus=("nokd",)), DISTILLED, {"per_seed": True}),
    ("distill-student-takd", Model("student-takd", "student", "TAKD", source="distill-assistant", variant="takd",
                                   versus=("blkd", "nokd")), DISTILLED, {"per_seed": True}),
    ("fine-tune-student", Model("student-takd-ft", "student", "FT", init="distill-student-takd", variant="takd_ft",
                                label="TAKD + fine-tuning", versus=("takd",)),
     ("student.input", "student.train", "finetune"), {"per_seed": True}),
    ("distill-student-qad", Model("student-takd-qad", "student", "QAD", source="distill-assistant",
                                  init="fine-tune-student", quantized=True, variant="takd_qad",
                                  label="TAKD + QAD (its fp32 weights)"),
     (*DISTILLED, "quantize.qad_epochs", "quantize.qad_lr_scale"), {"per_seed": True}),
)
ALL_MODELS = tuple(s.name for s in TRAINING if s.model)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare-data", out=lambda cat, _: cat.prepared, work=_lazy("tasks.prepare_data", "work"), params=PREPARED,
          code=("tasks/prepare_data.py",), reads=lambda cfg: sources(cfg.data),
          fetch=Fetch(lambda cfg: fetch(cfg.data), lambda cfg: fetched(cfg.data),
                      params=("data.name", "data.root", "data.source_dir"), code=("engine/data.py",)),
          title=lambda cfg: f"prepare data {cfg.data.name}"),
    *TRAINING,
    Stage("evaluate", out=lambda cat, _: cat.eval_dir, work=_lazy("tasks.evaluate", "work"),
          needs=("prepare-data", *ALL_MODELS), params=("evaluate", "quantize.evaluate", *CALIBRATION),
          code=("tasks/evaluate.py",),
          accelerator=True, title=lambda cfg: "evaluate every model on the test split (and INT8 the QAD chain's)"),
    Stage("report", out=lambda cat, _: cat.reports, work=_lazy("tasks.report", "work"),
          needs=("evaluate", *ALL_MODELS), params=("tracking", "experiments.confidence", "quantize.qad_epochs",
                                                   "quantize.evaluate"),
          code=("tasks/report.py", "tasks/figures.py"),
          after=_lazy("tasks.report", "after"), metrics=(METRICS_FILE,), plots=(CURVES, PLOT_FILE),
          title=lambda cfg: f"report NOKD / BLKD / TAKD over {len(cfg.student.seeds)} seeds"),
    Stage("export", out=lambda cat, _: cat.export, work=_lazy("tasks.export", "work"),
          needs=("prepare-data", "evaluate", *ALL_MODELS),
          params=("export", *CALIBRATION, "quantize.max_drop", "evaluate.speed_repeats"),
          code=("tasks/export.py", "tasks/model_card.py"),
          after=_lazy("tasks.export", "register"),
          title=lambda cfg: "export the best student (torch.export, ONNX, fp32 and INT8, model card), register it"),
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

    def model_name(self) -> str:
        """The model it trains or caches: student-takd-s1."""
        stage = STAGES[self.stage.caches] if self.stage.caches else self.stage
        return f"{stage.model.name}-s{self.seed}" if stage.per_seed else stage.model.name if stage.model else ""

    def spec(self, cfg: PipelineConfig) -> TrainSpec | None:
        """What it trains, or (a cache) the training whose soft targets it writes."""
        return specs(cfg).get(self.model_name()) if self.model_name() else None

    def out(self, cat: Catalog) -> Path:
        return self.stage.out(cat, self.model_name())

    def title(self, cfg: PipelineConfig) -> str:
        return self.spec(cfg).title if self.stage.model else self.stage.title(cfg)

    def command(self, params: str | None = None, force: bool = False) -> list[str]:
        """Its command after `python -m`: what dvc.yaml runs, and what a flow launches (with its config file)."""
        seed = ["--seed", str(self.seed)] if self.stage.per_seed else []
        return ["tasks", self.stage.name, *seed, *(["--params", params] if params else []), *(["--force"] if force else [])]


def instances(cfg: PipelineConfig, stage: str | None = None, seed: int | None = None) -> list[Instance]:
    """Every stage instance, in an order where each comes after its upstream."""
    out = []
    for s in STAGES.values():
        if stage in (None, s.name):
            seeds = [t for t in cfg.student.seeds if seed in (None, t)] if s.per_seed else [None]
            out += [Instance(s, t) for t in seeds]
    return out


def needed(cfg: PipelineConfig, names: list[str] | None = None) -> list[Instance]:
    """The instances of the named stages and every instance they read from, in pipeline order (None: all)."""
    if names is None:
        return instances(cfg)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise KDError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    wanted: set[str] = set()

    def visit(inst: Instance) -> None:
        if inst.id not in wanted:
            wanted.add(inst.id)
            for up in upstream(inst, cfg):
                visit(up)

    for name in names:
        for inst in instances(cfg, name):
            visit(inst)
    return [i for i in instances(cfg) if i.id in wanted]


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


# ---------------------------------------------------------------- the pipeline's trainings as TrainSpecs

def _recipe(cfg: PipelineConfig, m: Model):
    """The role's settings, but for an imported teacher's fine-tuning, QAD and fine-tuning's own epochs and rates."""
    base = getattr(cfg, m.role).train
    if m.role == "teacher" and cfg.teacher.checkpoint:
        return training.recipe(cfg, m.role, epochs=max(cfg.teacher.finetune_epochs, 1))
    if m.quantized:
        return training.recipe(cfg, m.role, epochs=max(cfg.quantize.qad_epochs, 1),
                               lr=base.lr * cfg.quantize.qad_lr_scale)
    if m.init:
        return training.recipe(cfg, m.role, epochs=max(cfg.finetune.epochs, 1), lr=base.lr * cfg.finetune.lr_scale)
    return base


def _as_is(cfg: PipelineConfig, m: Model) -> bool:
    """Fine-tuning or QAD set to 0 epochs, or an imported teacher not fine-tuned: the model is its input as is."""
    if m.init:
        return (cfg.quantize.qad_epochs if m.quantized else cfg.finetune.epochs) == 0
    return m.role == "teacher" and bool(cfg.teacher.checkpoint) and cfg.teacher.finetune_epochs == 0


def _title(cfg: PipelineConfig, s: TrainSpec, m: Model) -> str:
    """A run name that says what it is, e.g. 'distill student plain-2 s1 from assistant plain-4 (TAKD)'."""
    who = f"{s.role} {s.arch}" + (f" s{s.seed}" if s.role == "student" else "")
    if s.guides:
        how = m.method if s.loss == "kd" else f"{m.method}, {s.loss}"
        return f"distill {who} from {s.guides[0].role} {s.guides[0].arch} ({how})"
    if s.init:
        return f"fine-tune {who} ({m.method})"
    if s.imported and s.imported.predictions:
        return f"import teacher predictions {Path(s.imported.predictions).name}"
    if s.imported:
        tuned = f", fine-tuned {cfg.teacher.finetune_epochs} epochs" if cfg.teacher.finetune_epochs else ""
        return f"import teacher {s.arch}{tuned}"
    return f"train {who} from labels ({m.method})"


def _spec(cfg: PipelineConfig, inst: Instance, made: dict[str, TrainSpec]) -> TrainSpec:
    m, cat = inst.stage.model, Catalog(Path("."))
    section = getattr(cfg, m.role)

    def made_by(stage: str | None) -> TrainSpec | None:
        return made[Instance(STAGES[stage], inst.seed if STAGES[stage].per_seed else None).model_name()] if stage else None

    source, init, name = made_by(m.source), made_by(m.init), inst.model_name()
    kd = training.hop_kd(cfg, m.role).model_copy(update=m.kd) if source else None
    s = training.spec(cfg, m.role, section.arch, inst.seed if inst.seed is not None else section.seed,
                      input=section.input,
                      train=_recipe(cfg, m), kd=kd, guides=(source,) if source else (), init=init,
                      quantized=m.quantized, imported=training.imported(cfg) if m.role == "teacher" else None,
                      as_is=_as_is(cfg, m), name=name, out=str(cat.model(name)), targets=str(cat.soft_targets(name)),
                      method=m.method, parallel=cfg.distributed.parallel())
    return s.model_copy(update={"title": _title(cfg, s, m)})


def specs(cfg: PipelineConfig) -> dict[str, TrainSpec]:
    """The trainings of one pipeline run, by model folder name, in pipeline order."""
    made: dict[str, TrainSpec] = {}
    for inst in instances(cfg):
        if inst.stage.model:
            made[inst.model_name()] = _spec(cfg, inst, made)
    return made


def students(cfg: PipelineConfig) -> list[tuple[TrainSpec, Model]]:
    """Every student training with the row that declares it, for the report."""
    return [(inst.spec(cfg), inst.stage.model) for inst in instances(cfg)
            if inst.stage.model and inst.stage.model.role == "student"]


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


def _check_upstream(inst: Instance, cfg: PipelineConfig, cat: Catalog) -> list[Path]:
    ups = upstream(inst, cfg)
    for u in ups:
        if read_stage(u.out(cat)) is None:
            raise KDError(f"{u.out(cat)}: {inst.id} reads the output of {u.id}, which has not been produced yet "
                          "(no stage.json); run that stage first")
    return [u.out(cat) for u in ups]


def work(inst: Instance, cfg: PipelineConfig, cat: Catalog, ctx: RunContext) -> Work:
    """The instance as a piece of work with its key: a training's or a cache's from tasks/train.py, any other
    stage's from its config fields, the files it reads and its upstream outputs."""
    ups = _check_upstream(inst, cfg, cat)
    stage = inst.stage
    if stage.model:
        return training.training(inst.spec(cfg), cfg, cat, ctx, inst.id)
    if stage.caches:
        return training.caching(inst.spec(cfg), training.use(cfg).cache(), cfg, cat, inst.id)
    what = {"params": {p: dotted(cfg, p) for p in stage.params}, "seed": inst.seed}
    return Work(inst.id, inst.out(cat), training.key_inputs(what, reads(stage, cfg, cat), ups, cat, inst.id),
                stage.code, lambda key, out: stage.work(StageRun(cfg, cat, ctx, inst.seed, out, key)))


def run_instance(inst: Instance, cfg: PipelineConfig, cat: Catalog, ctx: RunContext | None = None,
                 force: bool = False) -> dict:
    """Run one stage instance, or reuse its outputs when its key matches: the one entry point of the stage
    command, which `dvc repro`, the CLI and the Prefect flow all run."""
    ctx = ctx or RunContext.resolve(cat.root)
    stage = inst.stage
    if ctx.dvc_stage == inst.id:
        from tasks.dvc_yaml import check_in_step

        check_in_step(cfg, cat, stage)
    if stage.fetch:  # before the key, which hashes what it fetched
        run_fetch(stage, cfg, cat)
    result = run_once(cat, work(inst, cfg, cat, ctx), force)
    if stage.after and ranks().main:
        with stage_lock(cat, f"{inst.id}-after"):  # two runs register one champion, not two
            result |= stage.after(cfg, cat, ctx, result)
    return result


def done(inst: Instance, cfg: PipelineConfig, cat: Catalog, ctx: RunContext) -> dict | None:
    """Its recorded summary when the instance would be reused and has nothing to do after (no `after`); None when
    its command must run. A flow asks this before it launches one."""
    if inst.stage.after or inst.stage.fetch:
        return None
    try:
        return work(inst, cfg, cat, ctx).done()
    except KDError:  # an upstream output is missing: the command will say so
        return None


def run_fetch(stage: Stage, cfg: PipelineConfig, cat: Catalog) -> list[Path]:
    """One fetch at a time: two stages, or the flow and `dvc repro`, never copy into one folder together."""
    with stage_lock(cat, f"{stage.name}-fetch"):
        stage.fetch.run(cfg)
    return stage.fetch.makes(cfg)


def fetch_all(cfg: PipelineConfig, cat: Catalog) -> list[Path]:
    """`python -m tasks fetch-data`: every stage's fetch."""
    return [p for s in STAGES.values() if s.fetch for p in run_fetch(s, cfg, cat)]


def chosen(name: str, cfg: PipelineConfig, seed: int | None = None) -> list[Instance]:
    """A stage's instances by name: every seed of a per-seed stage unless one is given."""
    if name not in STAGES:
        raise KDError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if seed is not None and not STAGES[name].per_seed:
        raise KDError(f"{name} runs once, not per seed; drop --seed")
    found = instances(cfg, name, seed)
    if not found:
        raise KDError(f"{name}: seed {seed} is not in student.seeds {cfg.student.seeds}")
    return found


def distributes(name: str) -> bool:
    """Whether the stage runs over several processes when distributed asks for them: the trainings and caches."""
    stage = STAGES.get(name)
    return bool(stage and (stage.model or stage.caches))


def needs_group(name: str, cfg: PipelineConfig, cat: Catalog, ctx: RunContext, seed: int | None = None,
                force: bool = False) -> bool:
    """Whether the stage must start its processes: a training or cache over several with something to compute (not
    up to date, and not a model kept as it comes). Otherwise it runs, or is reused, in this one process."""
    if cfg.distributed.processes == 1 or not distributes(name):
        return False
    for inst in chosen(name, cfg, seed):
        s = inst.spec(cfg)
        if inst.stage.model and (s.as_is or (s.imported and s.imported.predictions)):
            continue
        if force or done(inst, cfg, cat, ctx) is None:
            return True
    return False


def run_stage(name: str, cfg: PipelineConfig, cat: Catalog, seed: int | None = None, force: bool = False,
              ctx: RunContext | None = None) -> dict:
    """A stage by name, in this process: every seed of a per-seed stage unless one is given."""
    if ranks().world > 1 and not distributes(name):
        raise KDError(f"stage {name} runs in one process; only the training and cache stages run under torchrun")
    found = chosen(name, cfg, seed)
    results = {i.id: run_instance(i, cfg, cat, ctx, force) for i in found}
    return results[found[0].id] if len(found) == 1 else results


def _in_report(stage: Stage) -> str:
    """A student's key, label and what it is compared with: `takd` TAKD, − blkd, − nokd."""
    m = stage.model
    if not (m and m.variant):
        return "—"
    return f"`{m.variant}` {m.label or m.method}" + "".join(f", − {v}" for v in m.versus)


def markdown(cfg: PipelineConfig) -> str:
    """The stage table as the docs show it (`python -m tasks stages`)."""
    cat, rows = Catalog(Path(".")), []
    for stage in STAGES.values():
        inst = Instance(stage, "<seed>" if stage.per_seed else None)
        found = ", ".join(f"`{p}`" for p in stage.reads(cfg)) or "—"
        rows.append(f"| `{stage.name}`{' (per seed)' if stage.per_seed else ''} | {', '.join(stage.needs) or '—'} | "
                    f"{found} | {', '.join(f'`{p}`' for p in stage.params)} | {', '.join(stage.code)} | "
                    f"`{inst.out(cat)}` | {'yes' if stage.accelerator else 'no'} | {_in_report(stage)} |")
    head = ["| stage | needs | reads (here) | config fields | code | writes | accelerator | in the report |",
            "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n"
