"""The one configuration schema: params.yaml, the Prefect flow's form and the CLI flags.

Defaults here ARE the default experiment; params.yaml is written from them
(`python -m tasks params`) and a test keeps the two equal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.config import DataConfig, KDConfig, SafePath, Strict, TrainConfig
from engine.spec import GuideUse, Parallel, ParallelRecipe
from engine.errors import KDError
from models import check_name, views
from models.views import VIEW_HELP


# One recipe at CPU scale (docs/experiments.md: "A teacher worth distilling"): SGD + Nesterov at lr 0.1 with a
# half-epoch warm-up and a cosine to 0; the teacher adds label smoothing. The epochs fit 2 CPU cores.
def _recipe(epochs: int, label_smoothing: float = 0.0):
    return lambda: TrainConfig(epochs=epochs, lr=0.1, warmup_epochs=0.5, label_smoothing=label_smoothing)


ARCH = "model by name: plain-N, plain-2-wK, resnet-N, air-N or tv:<torchvision name>"


class ModelConfig(Strict):
    """Every field has a default, so a partial section (the Prefect form's, say) is complete."""

    arch: str = Field(description=ARCH)
    input: Optional[str] = Field(None, description=VIEW_HELP)
    train: TrainConfig = Field(default_factory=TrainConfig)
    kd: Optional[KDConfig] = Field(None, description="distillation settings of the hop into this model (any loss at "
                                                     "each hop); unset keys inherit from the top-level kd")

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        check_name(v)
        return v

    @field_validator("input")
    @classmethod
    def _view(cls, v: str | None) -> str | None:
        if v is not None:
            views.parse(v)  # the modality is checked against the data when the model is built
        return v


class TeacherConfig(ModelConfig):
    arch: str = Field("air-32", description=ARCH)
    seed: int = Field(0, ge=0, description="fixes initialisation, batch order and augmentation")
    train: TrainConfig = Field(default_factory=_recipe(10, label_smoothing=0.1))
    checkpoint: Optional[SafePath] = Field(None, description="import this teacher instead of training one: a state_dict "
                                                             "for `arch` (weights-only), a torch.export program "
                                                             "(.pt2, any architecture) or a TorchScript file "
                                                             "(deprecated upstream)")
    format: Literal["auto", "state_dict", "export", "torchscript"] = Field(
        "auto", description="the checkpoint's kind; auto recognises torch.export and TorchScript archives")
    finetune_epochs: int = Field(0, ge=0, le=10_000, description="fine-tune the imported teacher on this data first, "
                                                                 "with teacher.train's settings (0: as is)")
    predictions: Optional[SafePath] = Field(None, description="no teacher model: distil from this file of its outputs "
                                                              "on the training images (.npy, .npz or .csv, by index "
                                                              "or path; docs/own-data.md)")
    predictions_kind: Literal["auto", "logits", "probabilities"] = Field(
        "auto", description="what the file holds; auto: an .npz's array name, else probabilities when every row "
                            "is non-negative and sums to 1")
    predictions_temperature: float = Field(1.0, gt=0, le=100, description="the temperature the probabilities "
                                                                          "were made at (1: a plain softmax)")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.predictions and self.checkpoint:
            raise ValueError("set teacher.checkpoint (a model) or teacher.predictions (its outputs), not both")
        return self


class AssistantConfig(ModelConfig):
    arch: str = Field("plain-4", description=ARCH)
    seed: int = Field(0, ge=0, description="fixes initialisation, batch order and augmentation")
    train: TrainConfig = Field(default_factory=_recipe(5))


class StudentConfig(ModelConfig):
    arch: str = Field("plain-2", description=ARCH)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="every student (NOKD, BLKD, TAKD, fine-tuned) trains once per seed, from "
                                         "one teacher and one TA; the report pairs the methods by seed")
    train: TrainConfig = Field(default_factory=_recipe(5))

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("seeds must be distinct and >= 0")
        return v


class CacheConfig(GuideUse):
    """How distillations read their guides (engine.spec.GuideUse: what makes a cache, and whether it is read or the
    guide run online), and how fast caches are written."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
    batch_size: int = Field(512, ge=1, description="images per forward pass while a cache is written")


class FinetuneConfig(Strict):
    epochs: int = Field(1, ge=0, le=10_000, description="0 skips fine-tuning")
    lr_scale: float = Field(0.1, gt=0, le=1, description="fine-tuning lr = student lr * lr_scale")


class EvalConfig(Strict):
    speed_repeats: int = Field(20, ge=0, description="timed repeats for CPU latency and throughput; 0 skips")


class ExportConfig(Strict):
    model: Optional[str] = Field(None, description="the pipeline model to ship (student-takd-s0, ...); unset: the "
                                                   "student best on validation, over every method and seed")
    check_images: int = Field(256, ge=1, description="test images each exported file is run on and compared with PyTorch")
    max_abs_diff: float = Field(1e-3, gt=0, description="refuse an export whose logits differ from PyTorch's by more")


class QuantizeConfig(Strict):
    """INT8: post-training quantization of the exported student, and quantization-aware distillation (QAD)."""

    calibration_images: int = Field(512, ge=1, description="training images (a seeded sample) that calibrate the "
                                                           "INT8 ranges")
    calibration_seed: int = Field(0, ge=0, description="picks the calibration sample")
    evaluate: bool = Field(True, description="the evaluate stage also quantizes the QAD students and the students "
                                             "they start from (an ONNX export each), for the report's INT8 rows")
    qad_epochs: int = Field(1, ge=0, le=10_000, description="QAD: epochs of distillation from the TA with fake "
                                                           "quantization, after fine-tuning; 0 skips QAD")
    qad_lr_scale: float = Field(0.1, gt=0, le=1, description="QAD lr = student lr * qad_lr_scale")
    max_drop: float = Field(0.01, ge=0, le=1, description="an INT8 file whose test accuracy is more than this "
                                                          "below its fp32 model's is flagged (0.01: one point)")


class DistributedConfig(ParallelRecipe):
    """One training over several processes: torchrun starts them (engine/distributed.py, docs/distributed.md).
    The training and cache stages launch themselves under torchrun when more than one is asked for."""

    nproc_per_node: int = Field(1, ge=1, le=256, description="processes on each machine: one per GPU (on CPUs, "
                                                             "each takes its share of the cores)")
    nnodes: int = Field(1, ge=1, le=4096, description="machines: run the same stage command on each")
    rdzv_endpoint: str = Field("", description="host:port where the machines meet (torchrun's c10d rendezvous); "
                                               "needed when nnodes > 1")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: NCCL on CUDA, gloo on CPUs")
    join_timeout_s: float = Field(600, ge=1, description="how long the processes wait for each other to start")
    timeout_s: float = Field(1800, ge=1, description="how long a collective waits for a rank that stopped answering")

    @property
    def processes(self) -> int:
        return self.nproc_per_node * self.nnodes

    def parallel(self) -> Parallel | None:
        """What the training's weights depend on; None for one process."""
        if self.processes == 1:
            return None
        return Parallel(processes=self.processes, **{k: getattr(self, k) for k in ParallelRecipe.model_fields})

    @model_validator(mode="after")
    def _endpoint(self) -> "DistributedConfig":
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise ValueError(f"nnodes is {self.nnodes}: set rdzv_endpoint to host:port of the machine the others "
                             f"reach (it is {self.rdzv_endpoint!r})")
        return self


class TrackingConfig(Strict):
    experiment: str = Field("takd", description="MLflow experiment")
    registered_model: str = Field("takd-student", description="the best student is registered under this name")
    alias: str = Field("champion")
    log_models: bool = Field(True, description="log every trained model with mlflow.pytorch.log_model")


def _archs(v: list[str]) -> list[str]:
    for name in v:
        check_name(name)
    return v


class ExperimentsConfig(Strict):
    """What the experiments (experiments/) vary. Teacher, TA and student settings (student seeds included)
    come from above."""

    confidence: float = Field(0.95, gt=0.5, lt=1, description="of the paired-difference intervals")
    ta_sizes: list[str] = Field(default_factory=lambda: ["plain-8", "plain-6", "plain-4"], min_length=1,
                                description="TA-size sweep: TAs between the teacher and the student")
    teacher_sizes: list[str] = Field(default_factory=lambda: ["plain-4", "plain-6", "plain-8", "air-32", "air-48",
                                                              "plain-10"],
                                     min_length=1, description="teacher-size sweep, student fixed")
    student_sizes: list[str] = Field(default_factory=lambda: ["plain-2-w2", "plain-2-w4", "plain-2-w8", "plain-2",
                                                              "plain-4", "plain-6"],
                                     min_length=1, description="student-size sweep, teacher fixed")
    path_sizes: list[str] = Field(default_factory=lambda: ["plain-8", "plain-6", "plain-4"],
                                  description="paths: every subset of these, largest first, between teacher and student")
    cache_views: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=lambda: [1, 2, 8], min_length=1,
                                   description="cache-views: the K cached views per image each student arm reads; "
                                               "beside them, the teacher online with a fresh view at every step")
    early_stops: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.2, 0.5], description="paths: a TA in time, not in size: KD from the teacher's run "
                                                         "stopped after each of these fractions of its epochs (Cho & "
                                                         "Hariharan 2019), and from all of them then the teacher in "
                                                         "turn (progressive distillation, Panigrahi et al. 2025); [] "
                                                         "for neither")
    dgkd: bool = Field(True, description="paths: also densely guided KD over the full path")
    guide_survival: float = Field(0.75, gt=0, le=1, description="DGKD: chance each guide is kept at a step")
    equal_epochs: int = Field(10, ge=2, description="equal compute: E epochs from labels vs E/2 teacher + E/2 distillation")
    generations: int = Field(3, ge=1, le=20, description="born-again: distilled generations after the first")
    ensemble_teachers: list[str] = Field(default_factory=lambda: ["plain-10", "resnet-8"], min_length=2,
                                         description="methods: the multi-teacher ensemble (teacher settings each)")
    dml_peers: list[str] = Field(default_factory=lambda: ["plain-2"], min_length=1,
                                 description="methods: DML's peers, trained with the student from scratch")
    low_lr: float = Field(0.01, gt=0, le=10, description="methods: the learning rate of the DKD and DML rows that "
                                                         "repeat a collapsed setting at a lower one")
    cross_modal: list[str] = Field(default_factory=lambda: ["lowres-4", "edges"],
                                   description="methods: cross-modal rows: a student that reads each of these views "
                                               "(models/views.py) from labels and from the teacher, which reads the "
                                               "whole input; [] for none")
    methods: Optional[list[str]] = Field(None, min_length=1, description="methods: only these variants (kd, kd-ls, "
                                                                         "dist, ...) and what they learn from; unset: all")

    @field_validator("cross_modal")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        for text in v:
            views.parse(text)
        if len(set(v)) != len(v):
            raise ValueError(f"each view once: {v}")
        return v

    @field_validator("cache_views")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"each K once: {v} repeats {sorted({k for k in v if v.count(k) > 1})}")
        return v

    @field_validator("ta_sizes", "teacher_sizes", "student_sizes", "path_sizes", "ensemble_teachers", "dml_peers")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return _archs(v)

    @field_validator("early_stops")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if v != sorted(set(v)):
            raise ValueError(f"early_stops must be distinct fractions in increasing order (got {v})")
        return v


class PipelineConfig(Strict):
    """The whole configuration. However it arrives (params.yaml, a profile, CLI flags, the Prefect
    form or API, a Python dict), a partial one is completed by one rule: the schema's defaults,
    then the named profile, then the keys given."""

    profile: Optional[SafePath] = Field(None, description="start from this profile: a name in profiles/ (paper) or a "
                                                          "YAML file; the keys given here override it")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    assistant: AssistantConfig = Field(default_factory=AssistantConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    experiments: ExperimentsConfig = Field(default_factory=ExperimentsConfig)

    @model_validator(mode="before")
    @classmethod
    def _complete(cls, raw: Any) -> Any:
        # Here, not in load_config, so that the Prefect form, its API and Python callers get the same rule.
        if not isinstance(raw, dict):
            return raw
        base = schema_defaults()
        if raw.get("profile"):
            base = deep_merge(base, read_profile(raw["profile"]))
        return inherit_hop_kd(deep_merge(base, raw))


class ConfigError(KDError):
    pass


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dotted_to_nested(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return nested


def validate(raw: dict, source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
            lines.append(f"{source}: {key}: {err['msg']}{got}")
        raise ConfigError("; ".join(lines)) from None


def read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    return raw


def load_config(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """params.yaml (when present) + dotted overrides such as {"student.arch": "plain-4"}."""
    raw: dict = {}
    if path and (Path(path).exists() or Path(path).name != "params.yaml"):
        raw = read_yaml(path)
    return validate(deep_merge(raw, dotted_to_nested(overrides or {})), str(path or "config"))


HOPS = ("teacher", "assistant", "student")
PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def profile_path(name: str) -> Path:
    """A profile by name (profiles/<name>.yaml) or by path."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name)
    path = PROFILES / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ConfigError(f"profile: unknown profile {name!r}; available: {known} (or a path to a YAML file)")
    return path


def read_profile(name: str) -> dict:
    path = profile_path(name)
    raw = read_yaml(path)
    if "profile" in raw:
        raise ConfigError(f"{path}: a profile cannot name another profile (profile: {raw['profile']!r})")
    return raw


def schema_defaults() -> dict:
    """Every field's default, as plain values (without validating a PipelineConfig, which would recurse)."""
    out = {}
    for name, field in PipelineConfig.model_fields.items():
        value = field.get_default(call_default_factory=True)
        out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def inherit_hop_kd(raw: dict) -> dict:
    """A hop's partial `kd` (say student.kd.loss: dkd) takes the rest from the top-level kd."""
    out = dict(raw)
    for hop in HOPS:
        section = out.get(hop)
        if isinstance(section, dict) and isinstance(section.get("kd"), dict) and isinstance(out.get("kd"), dict):
            out[hop] = {**section, "kd": deep_merge(out["kd"], section["kd"])}
    return out


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
