"""Typed settings of the engine. The pipeline's schema (tasks/config.py) is built from these,
so params.yaml, the Prefect form and the CLI flags all validate through one definition."""
from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def no_parent_refs(value: str | None) -> str | None:
    """Paths in configs may be absolute, but never climb out through '..'."""
    if value is not None and ".." in PurePath(value.split(":", 1)[-1] if value.startswith("imagefolder:") else value).parts:
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
    name: str = Field("fashion-mnist", description="fashion-mnist | cifar10 | cifar100 | imagefolder:<path>")
    root: SafePath = Field("data/raw", description="where downloaded or unpacked files live")
    source_dir: SafePath = Field("/usr/share/datasets/fashion-mnist", description="Debian's Fashion-MNIST files, used when present")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of train carved out for validation")
    split_seed: int = Field(0, ge=0)
    train_subset: Optional[int] = Field(None, ge=20, description="use only this many training images (quick runs)")
    test_subset: Optional[int] = Field(None, ge=10, description="use only this many test images (quick runs)")
    image_size: int = Field(32, ge=8, le=512, description="imagefolder only: images are resized to this")
    channels: Literal[1, 3] = Field(3, description="imagefolder only: 1 = grey, 3 = RGB")
    augment: Optional[AugmentConfig] = Field(None, description="default per data set when unset")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        no_parent_refs(v)
        if v in ("fashion-mnist", "cifar10", "cifar100") or (v.startswith("imagefolder:") and len(v) > 12):
            return v
        raise ValueError(f"unknown data set {v!r}; use fashion-mnist, cifar10, cifar100 or imagefolder:<path>")


class KDConfig(Strict):
    loss: str = Field("kd", description="distillation loss by name (see engine.losses.LOSSES)")
    lam: float = Field(0.1, ge=0, le=1, description="weight of the soft term: (1-lam)*CE + lam*T^2*KL")
    lam_start: Optional[float] = Field(None, ge=0, le=1, description="lam at epoch 0 when the schedule ramps")
    lam_schedule: Literal["constant", "linear", "cosine"] = "constant"
    temperature: float = Field(2.0, gt=0, le=100)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from engine.losses import LOSSES  # the registry imports this module

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; available: {', '.join(sorted(LOSSES))}")
        return v


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
    eval_batch_size: int = Field(1024, ge=1)
    compile: bool = Field(False, description="torch.compile the model for training (pays off on GPUs)")
