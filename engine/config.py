"""Typed settings of the engine. The pipeline's schema (tasks/config.py) is built from these,
so params.yaml, the Prefect form and the CLI flags all validate through one definition."""
from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def no_parent_refs(value: str | None) -> str | None:
    """Paths in configs may be absolute, but never climb out through '..'."""
    if value is not None and ".." in PurePath(value.split(":", 1)[-1] if value.startswith(("imagefolder:", "csv:")) else value).parts:
        raise ValueError(f"path {value!r} must not contain '..'")
    return value


SafePath = Annotated[str, AfterValidator(no_parent_refs)]


class Strict(BaseModel):
    """Unknown keys are errors, and every error names its key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    crop_padding: int = Field(0, ge=0, le=16, description="random crop after zero-padding this many pixels")
    flip: bool = Field(False, description="random horizontal flip")


class DataConfig(Strict):
    name: str = Field("fashion-mnist", description="fashion-mnist | cifar10 | cifar100 | imagefolder:<folder> | "
                                                   "csv:<file with path,label[,split] columns>")
    root: SafePath = Field("data/raw", description="where downloaded or unpacked files live")
    source_dir: SafePath = Field("/usr/share/datasets/fashion-mnist", description="Debian's Fashion-MNIST files: "
                                                                               "copied into data.root when present")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of train carved out for validation")
    split_seed: int = Field(0, ge=0)
    train_subset: Optional[int] = Field(None, ge=20, description="use only this many training images (quick runs)")
    test_subset: Optional[int] = Field(None, ge=10, description="use only this many test images (quick runs)")
    image_size: int = Field(32, ge=8, le=512, description="imagefolder and csv: images are resized to this")
    channels: Literal[1, 3] = Field(3, description="imagefolder and csv: 1 = grey, 3 = RGB")
    mean: Optional[list[float]] = Field(None, description="per-channel normalisation mean in [0, 1]; unset: the "
                                                          "train split's own")
    std: Optional[list[float]] = Field(None, description="per-channel normalisation std; unset: the train split's own")
    augment: Optional[AugmentConfig] = Field(None, description="default per data set when unset")
    storage: Literal["auto", "memory", "disk"] = Field(
        "auto", description="where a training holds the prepared splits: memory, or streamed from the prepared "
                            "store's shards on disk; auto: memory while a split fits memory_budget_mb")
    memory_budget_mb: Optional[int] = Field(None, ge=0, description="auto storage: memory the splits may take; unset: "
                                                                    "half of what is available (on CUDA, also half "
                                                                    "the device's free memory)")
    loader_workers: Optional[int] = Field(None, ge=0, le=64, description="processes reading a streamed split ahead "
                                                                         "of training; unset: the cores a training "
                                                                         "leaves free, at most 8 (engine/placement.py)")

    # How a training reads the prepared data, not what is prepared: never part of a stage's key.
    READ_TIME: ClassVar[tuple[str, ...]] = ("storage", "memory_budget_mb", "loader_workers")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        no_parent_refs(v)
        if v in ("fashion-mnist", "cifar10", "cifar100") or (v.startswith("imagefolder:") and len(v) > 12) or (
                v.startswith("csv:") and len(v) > 4):
            return v
        raise ValueError(f"unknown data set {v!r}; use fashion-mnist, cifar10, cifar100, imagefolder:<folder> or "
                         "csv:<file>")

    @model_validator(mode="after")
    def _norm(self) -> "DataConfig":
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both mean and std, or neither")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}; give one per channel")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive (got {self.std})")
        return self


class FitNetsConfig(Strict):
    beta: float = Field(100.0, ge=0, description="weight of the hint loss (MSE of regressed student vs teacher features)")
    stagewise: bool = Field(False, description="True: the first hint_epochs train only up to the hint layer (paper); "
                                                "False: hint and task loss together")
    hint_epochs: int = Field(2, ge=0, description="stage-wise: epochs of hint-only training before KD")
    relu: bool = Field(True, description="a ReLU after the regressor's conv + BN, as RepDistiller's and mdistiller's "
                                         "ConvReg (the teacher's stages are post-ReLU)")


class ATConfig(Strict):
    beta: float = Field(1000.0, ge=0, description="weight of the attention-map loss, summed over matched stages")
    p: float = Field(2.0, gt=0, description="attention map = mean over channels of |a|^p")


class RKDConfig(Strict):
    distance: float = Field(25.0, ge=0, description="weight of the distance-wise term")
    angle: float = Field(50.0, ge=0, description="weight of the angle-wise term")


class SPConfig(Strict):
    gamma: float = Field(3000.0, ge=0, description="weight of the similarity-preserving loss")


class IRGConfig(Strict):
    vertex: float = Field(0.1, ge=0, description="weight of the vertex term, MSE of the logits (KD-Zoo: 0.1)")
    edge: float = Field(5.0, ge=0, description="weight of the edge term, the instance-distance graphs (KD-Zoo: 5)")
    transform: float = Field(5.0, ge=0, description="weight of the transformation term between the last two "
                                                    "stages (KD-Zoo: 5)")


class AdversarialConfig(Strict):
    weight: float = Field(1.0, ge=0, description="weight of the discriminator's loss (MEAL V2: 1)")
    shrink: int = Field(2, ge=2, description="the discriminator's layers narrow by this factor: C, C/k, C/k^2, 2 "
                                             "(MEAL V2: 8 for 1,000 classes)")
    final_relu: bool = Field(False, description="a ReLU on the two scores too, as MEAL V2's (with 10 classes it "
                                                "leaves some initialisations with both scores dead at 0)")
    game: Literal["fool", "joint"] = Field(
        "fool", description="fool: the student gets the discriminator's gradient reversed, trained to fool it; "
                            "joint: as MEAL V2's code, student and discriminator minimise the same loss")


class DKDConfig(Strict):
    alpha: float = Field(1.0, ge=0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of non-target-class KD (NCKD)")
    temperature: float = Field(4.0, gt=0, le=100)
    warmup_epochs: float = Field(1.0, gt=0, description="the KD terms ramp in linearly, step by step, over this many epochs (paper: 20)")


class DISTConfig(Strict):
    beta: float = Field(2.0, ge=0, description="weight of the inter-class relation (each image's class scores)")
    gamma: float = Field(2.0, ge=0, description="weight of the intra-class relation (each class over the batch)")
    temperature: float = Field(4.0, gt=0, le=100)


class CTKDConfig(Strict):
    t_start: float = Field(1.0, gt=0, description="the lowest temperature the learnable one can take")
    t_range: float = Field(20.0, gt=0, description="T = t_start + t_range * sigmoid(t), t learned")
    lambda_max: float = Field(1.0, ge=0, description="the gradient reversal's weight at the end of the curriculum")
    lambda_min: float = Field(0.0, ge=0, description="its weight at the start")
    curriculum_epochs: float = Field(2.0, gt=0, description="lambda rises (cosine) from lambda_min to lambda_max "
                                                             "over this many epochs (paper: 10 of 240)")


class MLKDConfig(Strict):
    form: Literal["authors", "masked-images"] = Field(
        "authors", description="authors: the objective of Jin et al.'s code (weak-view terms scaled by the kept "
                               "fraction; the strong-view term reads the weak view at the temperatures outside "
                               "strong_temperatures); masked-images: this project's earlier variant (docs/methods.md)")
    temperatures: list[float] = Field(default_factory=lambda: [2.0, 3.0, 4.0, 5.0, 6.0], min_length=1,
                                      description="every alignment is summed over these temperatures")
    strong_temperatures: list[float] = Field(default_factory=lambda: [3.0, 4.0, 5.0],
                                             description="authors: the temperatures at which the strong-view instance "
                                                         "term reads the strong view (their code: T, 3, 5); a subset "
                                                         "of temperatures")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE(weak) + CE(strong) (authors: 0.1)")
    weight: float = Field(0.9, ge=0, description="weight of every alignment term (authors: 0.9)")
    percentile: float = Field(50.0, ge=0, le=100, description="weak-view terms keep the images (and classes) whose "
                                                               "teacher confidence is at most this percentile")
    strong_shift: int = Field(4, ge=0, le=16, description="strong view: random shift of up to this many pixels")
    strong_erase: float = Field(0.25, ge=0, lt=1, description="strong view: erase a random square of up to this "
                                                               "fraction of the image's area")

    @model_validator(mode="after")
    def _strong_among_temperatures(self) -> "MLKDConfig":
        if self.form == "authors" and not set(self.strong_temperatures) <= set(self.temperatures):
            raise ValueError(f"kd.mlkd.strong_temperatures {self.strong_temperatures} must be among "
                             f"kd.mlkd.temperatures {self.temperatures}: the strong view is distilled only at those")
        return self


class CRDConfig(Strict):
    beta: float = Field(0.8, ge=0, description="weight of the contrastive loss")
    feat_dim: int = Field(128, ge=2, description="embedding size of both heads")
    negatives: int = Field(4096, ge=1, description="negatives drawn from the memory bank per anchor (paper: 16384)")
    nce_t: float = Field(0.07, gt=0, description="temperature of the NCE scores")
    momentum: float = Field(0.5, ge=0, lt=1, description="memory bank update: m * old + (1 - m) * new")


class ReviewKDConfig(Strict):
    weight: float = Field(5.0, ge=0, description="weight of the hierarchical context loss (authors' CIFAR-100: 5; "
                                                 "mdistiller: 1)")
    mid_channels: int = Field(32, ge=1, description="channels of the attention-based fusion modules")
    pool_sizes: list[int] = Field(default_factory=lambda: [4, 2, 1], min_length=1,
                                  description="hierarchical context loss: the pooled sizes, each level weighted half the last")
    warmup_epochs: float = Field(1.0, gt=0, description="the review loss ramps in linearly over this many epochs")


class DMLConfig(Strict):
    peers: list[str] = Field(default_factory=lambda: ["plain-2"], min_length=1,
                             description="architectures trained together with the student, none pretrained")
    weight: float = Field(1.0, ge=0, description="weight of each network's mean KL to its peers")
    temperature: float = Field(1.0, gt=0, le=100)

    @field_validator("peers")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from models import check_name

        for name in v:
            check_name(name)
        return v


class SelfDistillConfig(Strict):
    alpha: float = Field(0.3, ge=0, le=1, description="each auxiliary exit: (1-alpha)*CE + alpha*T^2*KL(last layer)")
    temperature: float = Field(3.0, gt=0, le=100)


class EnsembleConfig(Strict):
    combine: Literal["kl", "probs", "sequence"] = Field(
        "kl", description="several guides: mean of the KLs, KL to the mixture of their softened probabilities, or "
                          "each in turn for an equal share of the epochs, in the order given (progressive "
                          "distillation, Panigrahi et al. 2025)")
    weights: Optional[list[float]] = Field(None, description="one per teacher; unset: equal, or by validation "
                                                             "accuracy with weighted=true")
    weighted: bool = Field(False, description="weight teachers by their validation accuracy when weights is unset")

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and (not v or min(v) < 0 or sum(v) <= 0):
            raise ValueError("weights must be non-negative and not all zero")
        return v


class KDConfig(Strict):
    loss: str = Field("kd", description="distillation loss by name (see engine.losses.LOSSES)")
    lam: float = Field(0.1, ge=0, le=1, description="weight of the soft term: (1-lam)*CE + lam*T^2*KL")
    lam_start: Optional[float] = Field(None, ge=0, le=1, description="lam at epoch 0 when the schedule ramps")
    lam_schedule: Literal["constant", "linear", "cosine"] = "constant"
    temperature: float = Field(2.0, gt=0, le=100)
    standardize: bool = Field(False, description="logit standardization (Sun et al. 2024): z-score teacher and "
                                                 "student logits before the softmax (kd, dkd, ctkd, mlkd)")
    student_layers: Optional[list[str]] = Field(None, description="feature losses: student stages to match; "
                                                                  "unset: matched to the teacher's by spatial size")
    teacher_layers: Optional[list[str]] = Field(None, description="feature losses: the teacher stages, one per student layer")
    fitnets: FitNetsConfig = Field(default_factory=FitNetsConfig)
    at: ATConfig = Field(default_factory=ATConfig)
    rkd: RKDConfig = Field(default_factory=RKDConfig)
    sp: SPConfig = Field(default_factory=SPConfig)
    irg: IRGConfig = Field(default_factory=IRGConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    dkd: DKDConfig = Field(default_factory=DKDConfig)
    dist: DISTConfig = Field(default_factory=DISTConfig)
    ctkd: CTKDConfig = Field(default_factory=CTKDConfig)
    mlkd: MLKDConfig = Field(default_factory=MLKDConfig)
    crd: CRDConfig = Field(default_factory=CRDConfig)
    reviewkd: ReviewKDConfig = Field(default_factory=ReviewKDConfig)
    dml: DMLConfig = Field(default_factory=DMLConfig)
    self_distill: SelfDistillConfig = Field(default_factory=SelfDistillConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from engine.losses import LOSSES  # the registry imports this module

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; available: {', '.join(sorted(LOSSES))}")
        return v

    def standardize_problem(self) -> str | None:
        """Why `standardize` would do nothing here (None: it applies)."""
        from engine.losses import LOSSES

        kind = LOSSES[self.loss]
        if not kind.standardizes:
            takers = ", ".join(n for n, c in sorted(LOSSES.items()) if c.standardizes)
            return f"loss {self.loss!r} has no logit-standardized form; set kd.standardize to false, or use one that has ({takers})"
        if kind.kd_objective and max(self.lam, self.lam_start or 0.0) == 0:
            return (f"loss {self.loss!r} at kd.lam 0 has no soft term to standardize (its KD term is off); set "
                    "kd.standardize to false, or kd.lam above 0")
        return None

    @model_validator(mode="after")
    def _standardize_honoured(self) -> "KDConfig":
        problem = self.standardize_problem() if self.standardize else None
        if problem:
            raise ValueError(f"kd.standardize: {problem}")
        return self


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=lambda: [80, 120], description="step schedule: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up from 0 over this many epochs")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="of the hard-label cross-entropy (0.1 helps a teacher)")
    eval_batch_size: int = Field(512, ge=1)
    compile: bool = Field(False, description="torch.compile the model for training (pays off on GPUs)")
