"""Stage train-job: one training of an experiment, and the soft-target cache of a guide.

A Job names a model by what makes it: role, architecture, seed, epochs and the jobs it
learns from (its guides). Its id hashes all of that plus the config it trains under, guides
included, so every experiment that needs the same teacher or TA shares one training, and
a DVC matrix stage, a Prefect task and the CLI all find it in the same folder (data/zoo).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from engine.config import KDConfig, Strict
from engine.fingerprint import config_fingerprint
from engine.losses import LOSSES
from models import check_name
from tasks.cache_soft_targets import write_cache
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.stage import run_once, stage_key
from tasks.train_model import Training, fit_training, loss_name

JOB_CODE = ("tasks/train_model.py", "tasks/train_job.py")


class Job(Strict):
    role: Literal["teacher", "assistant", "student"] = Field(description="picks the train settings: cfg.<role>.train")
    arch: str
    seed: int = Field(0, ge=0)
    epochs: Optional[int] = Field(None, ge=1, description="overrides cfg.<role>.train.epochs")
    lr: Optional[float] = Field(None, gt=0, le=10, description="overrides cfg.<role>.train.lr")
    guides: list["Job"] = Field(default_factory=list, description="learn from these (several: DGKD)")
    survival: float = Field(1.0, gt=0, le=1, description="DGKD: chance each guide is kept at a step")
    kd: Optional[KDConfig] = Field(None, description="this job's distillation settings; unset: the config's kd")

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        check_name(v)
        return v


def train_settings(cfg: PipelineConfig, job: Job):
    base = getattr(cfg, job.role).train
    update = {k: v for k, v in (("epochs", job.epochs), ("lr", job.lr)) if v is not None}
    return base.model_copy(update=update) if update else base


def job_kd(cfg: PipelineConfig, job: Job) -> KDConfig:
    return job.kd or cfg.kd


def job_loss(cfg: PipelineConfig, job: Job) -> str:
    return loss_name(job_kd(cfg, job), bool(job.guides))


def job_id(cfg: PipelineConfig, job: Job) -> str:
    """Readable and content-addressed: 'student-plain-2-s1-<hash>'."""
    spec = {"role": job.role, "arch": job.arch, "seed": job.seed, "survival": job.survival,
            "train": train_settings(cfg, job).model_dump(), "data": cfg.data.model_dump(),
            "guides": [job_id(cfg, g) for g in job.guides]}
    if job.guides or job_loss(cfg, job) != "ce":
        # How features reach the loss (cached or online) is left out, as is cache.online: same model, other cost.
        spec |= {"kd": job_kd(cfg, job).model_dump(),
                 "cache": cfg.cache.model_dump(exclude={"batch_size", "online", "features", "feature_budget_mb"})}
    return f"{job.role}-{job.arch}-s{job.seed}-{config_fingerprint(spec)[:10]}"


def method(cfg: PipelineConfig, job: Job) -> str:
    """'teacher', 'NOKD', 'KD', 'DGKD', 'ensemble KD', or the loss by name ('DKD', 'FitNets via one guide')."""
    loss = job_loss(cfg, job)
    if loss == "ce":
        return "teacher" if job.role == "teacher" else "NOKD"
    ls = " + LS" if LOSSES[loss].standardizes and job_kd(cfg, job).standardize else ""  # logit standardization
    if loss == "kd":
        return ("KD" if len(job.guides) == 1 else "DGKD" if job.survival < 1 else "ensemble KD") + ls
    return {"fitnets": "FitNets", "self": "self-distillation", "reviewkd": "ReviewKD"}.get(loss, loss.upper()) + ls


def describe(cfg: PipelineConfig, job: Job) -> str:
    """'student plain-2 s1 from assistant plain-4 (KD)'."""
    source = " + ".join(f"{g.role} {g.arch}" for g in job.guides) or "labels"
    return f"{job.role} {job.arch} s{job.seed} from {source} ({method(cfg, job)})"


def all_jobs(cfg: PipelineConfig, jobs: list[Job]) -> dict[str, Job]:
    """Every job the list needs, guides first, each once."""
    out: dict[str, Job] = {}

    def visit(job: Job) -> None:
        for g in job.guides:
            visit(g)
        out.setdefault(job_id(cfg, job), job)

    for j in jobs:
        visit(j)
    return out


def train_job(cfg: PipelineConfig, cat: Catalog, job: Job, force: bool = False) -> dict:
    """Train `job` (after its guides and their soft targets, reused when done) and return its
    summary, test accuracy included."""
    for g in job.guides:
        train_job(cfg, cat, g)
        cache_job(cfg, cat, g)
    jid = job_id(cfg, job)
    folder = cat.job(jid)
    t = Training(name=jid, role=job.role, method=method(cfg, job), arch=job.arch, seed=job.seed,
                 train=train_settings(cfg, job), run_name=describe(cfg, job), loss=job_loss(cfg, job),
                 kd=job_kd(cfg, job),
                 guides=tuple((cat.job(job_id(cfg, g)) / "model", cat.job(job_id(cfg, g)) / "soft_targets")
                              for g in job.guides),
                 survival=job.survival, parent_model=",".join(job_id(cfg, g) for g in job.guides), test=True)
    inputs = {"job": jid, "data": stage_key(cat.prepared, "the prepared data set"),
              "guides": [stage_key(cat.job(job_id(cfg, g)) / "soft_targets", f"soft targets of {job_id(cfg, g)}")
                         for g in job.guides]}
    result = run_once(cat, f"train-{jid}", folder / "model", inputs, JOB_CODE,
                      lambda key, out_dir: fit_training(cfg, cat, t, key, out_dir), force)
    return {**result, "job": jid}


def cache_job(cfg: PipelineConfig, cat: Catalog, job: Job, force: bool = False) -> dict:
    jid = job_id(cfg, job)
    model_dir = cat.job(jid) / "model"
    inputs = {"model": stage_key(model_dir, jid), "data": stage_key(cat.prepared, "the prepared data set"),
              "cache": cfg.cache.model_dump(exclude={"online", "batch_size"})}
    return run_once(cat, f"cache-{jid}", cat.job(jid) / "soft_targets", inputs, ("tasks/cache_soft_targets.py",),
                    lambda key, staging: write_cache(cfg, cat, model_dir, staging), force)
