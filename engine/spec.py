"""One description of a training: `TrainSpec`.

Whoever asks for a model, a stage of the pipeline (tasks/stages.py) or a row of an experiment's plan
(experiments/plans.py), describes it as a TrainSpec: its architecture, seed and recipe, its loss and that loss's
settings, the trainings it learns from (its guides) and how it reads them, the training it starts from, whether it
trains quantized, or the teacher file it imports. Guides and starts are TrainSpecs too, so a spec names its whole
lineage, and `identity()` is everything that decides its weights: what the key of its run (tasks/train.py) and the
folder of an experiment's training (its `id`) hash.

A spec also says what it is called (`name`, `method`, `title`) and where its outputs go (`out`, `targets`): those
are left out of its identity, since two folders can hold the same training.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, model_validator

from engine.config import KDConfig, Strict, TrainConfig
from engine.fingerprint import config_fingerprint

Role = Literal["teacher", "assistant", "student"]
NOT_IDENTITY = {"name", "out", "targets", "method", "title"}


class Frozen(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheSpec(Frozen):
    """What makes a soft-target cache: the settings its contents depend on."""

    views: int = Field(2, ge=1, le=64, description="K fixed views per image; view 0 is the clean image")
    topk: Optional[int] = Field(None, ge=1, description="keep only the top-k logits per view (many classes)")
    seed: int = Field(0, ge=0, description="view k of image i is a function of (seed, i, k)")


class GuideUse(CacheSpec):
    """How a distillation reads its guides: from a cache made with the CacheSpec fields, or by running them."""

    online: bool = Field(False, description="run the teacher on every batch instead of reading the cache")
    fresh_views: bool = Field(False, description="with online: a new random view of every image at every step, the "
                                                 "teacher run on it (function matching, Beyer et al. 2022), instead "
                                                 "of one of the K fixed views")
    features: Literal["auto", "cached", "online"] = Field(
        "auto", description="teacher features for feature/relation losses: cached in memory once per training, "
                            "or the teacher run at every step; auto caches when they fit feature_budget_mb")
    feature_budget_mb: float = Field(2048, ge=0, description="auto: the largest feature cache to hold in memory")

    @model_validator(mode="after")
    def _fresh_needs_online(self):
        if self.fresh_views and not self.online:
            raise ValueError("cache.fresh_views: true needs cache.online: true (no cache holds a view drawn at each "
                             "step); set both, or neither")
        return self

    def cache(self) -> CacheSpec:
        return CacheSpec(**{k: getattr(self, k) for k in CacheSpec.model_fields})


class ParallelRecipe(Strict):
    """What a training over several processes (engine/distributed.py) does differently from one process."""

    batch: Literal["global", "per_process"] = Field(
        "global", description="global: train.batch_size is the whole step's batch, each process takes its share "
                              "(the same steps as one process); per_process: each process takes train.batch_size, "
                              "the step's batch grows with the processes and lr is scaled by as many (Goyal et al. "
                              "2017's linear rule, as torchdistill does)")
    sync_batchnorm: bool = Field(True, description="BatchNorm statistics over the whole step's batch (SyncBatchNorm) "
                                                   "rather than each process's share")


class Parallel(ParallelRecipe):
    """A training's processes and how it splits over them: part of its identity when it has more than one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    processes: int = Field(ge=2, description="ranks in the group: nproc_per_node x nnodes")


class Imported(Frozen):
    """A teacher brought by the user: a model file, or a file of its answers."""

    checkpoint: Optional[str] = None
    format: Literal["auto", "state_dict", "export", "torchscript"] = "auto"
    predictions: Optional[str] = None
    predictions_kind: Literal["auto", "logits", "probabilities"] = "auto"
    predictions_temperature: float = 1.0

    @property
    def file(self) -> str:
        return self.checkpoint or self.predictions  # type: ignore[return-value]


class TrainSpec(Frozen):
    role: Role = Field(description="teacher | assistant | student: MLflow's tag, and the config section it came from")
    arch: str
    input: Optional[str] = Field(None, description="the view of the stored input it reads (models/views.py): a "
                                                   "modality, lowres-F, edges; None: all of it")
    seed: int = Field(0, ge=0)
    train: TrainConfig
    loss: str = Field("ce", description="by name (engine.losses.LOSSES); 'ce' learns from labels only")
    kd: Optional[KDConfig] = Field(None, description="the loss's settings; None when it learns from labels only")
    guides: tuple["TrainSpec", ...] = Field((), description="the trainings whose outputs it learns from")
    use: Optional[GuideUse] = Field(None, description="how it reads its guides (set exactly when it has guides)")
    survival: float = Field(1.0, gt=0, le=1, description="several guides (DGKD): the chance each is kept at a step")
    init: Optional["TrainSpec"] = Field(None, description="the training it starts from (fine-tuning, QAD)")
    quantized: bool = Field(False, description="trained with fake quantization (QAD), for the INT8 export")
    imported: Optional[Imported] = Field(None, description="import this teacher instead of training one")
    parallel: Optional[Parallel] = Field(None, description="trained by several processes (DDP); None: one")
    as_is: bool = Field(False, description="the start or the imported model unchanged (0 epochs)")
    stop_after: Optional[int] = Field(None, ge=1, description="stop after this many epochs of train.epochs' schedule: "
                                                              "the run's weights at that epoch (an early-stopped "
                                                              "teacher, Cho & Hariharan 2019); None: the whole run")
    test: bool = Field(False, description="also measure test accuracy, each epoch and at the end (experiments)")
    name: str = Field("", description="its name in logs, MLflow and its work folder: student-takd-s1, or its id")
    out: str = Field("", description="its output folder, relative to the project")
    targets: str = Field("", description="the folder of its soft targets, when another training learns from it")
    method: str = Field("", description="what MLflow groups runs by: NOKD, BLKD, TAKD, DKD, ...")
    title: str = Field("", description="the run's name, e.g. 'distill student plain-2 s1 from assistant plain-4'")

    @model_validator(mode="after")
    def _stop_within_the_run(self):
        if self.stop_after is not None and self.stop_after > self.train.epochs:
            raise ValueError(f"stop_after {self.stop_after} is past the run's {self.train.epochs} epochs "
                             "(train.epochs)")
        return self

    def identity(self) -> dict:
        """Everything that decides the weights; guides and start by their own identity."""
        own = self.model_dump(mode="json", exclude=NOT_IDENTITY | {"guides", "init"})
        if self.parallel is None:  # one process: the identity every training had before processes were a setting
            del own["parallel"]
        for key in ("stop_after", "input"):  # likewise before early stops and views were settings
            if own[key] is None:
                del own[key]
        if own.get("use") and not own["use"]["fresh_views"]:  # likewise before fresh views were a setting
            del own["use"]["fresh_views"]
        return {**own, "guides": [g.identity() for g in self.guides],
                "init": self.init.identity() if self.init else None}

    @property
    def id(self) -> str:
        """Readable and content-addressed: 'student-plain-2-s1-3f9c0a1b2d'."""
        return f"{self.role}-{self.arch}-s{self.seed}-{config_fingerprint(self.identity())[:10]}"

    def cached_guides(self) -> tuple["TrainSpec", ...]:
        """The guides it reads from soft-target caches: none when it runs them online."""
        return self.guides if self.use is not None and not self.use.online else ()

    def lineage(self) -> list["TrainSpec"]:
        """Every training this one needs, each once, upstream first, itself last."""
        out: dict[str, TrainSpec] = {}

        def visit(s: TrainSpec) -> None:
            for up in (*s.guides, *([s.init] if s.init else [])):
                visit(up)
            out.setdefault(s.id, s)

        visit(self)
        return list(out.values())


TrainSpec.model_rebuild()
