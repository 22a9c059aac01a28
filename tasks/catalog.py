"""Every path the pipeline reads or writes, in one place (the Kedro 'catalog')."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The models one pipeline run trains: name -> (role, method, teacher it learns from, init from)
MODELS: dict[str, tuple[str, str, str | None, str | None]] = {
    "teacher": ("teacher", "NOKD", None, None),
    "assistant": ("assistant", "KD", "teacher", None),
    "student-nokd": ("student", "NOKD", None, None),
    "student-blkd": ("student", "BLKD", "teacher", None),
    "student-takd": ("student", "TAKD", "assistant", None),
    "student-takd-ft": ("student", "FT", None, "student-takd"),
}
STUDENTS = [m for m, spec in MODELS.items() if spec[0] == "student"]


def lineage(name: str) -> list[str]:
    """The pipeline models `name` descends from, itself first: student-takd-ft, student-takd,
    assistant, teacher."""
    chain = [name]
    while (parent := MODELS[chain[-1]][2] or MODELS[chain[-1]][3]) is not None:
        chain.append(parent)
    return chain

# Code each stage depends on. dvc.yaml lists the same deps (a test keeps them equal), and
# each stage's skip key hashes these files, so Prefect and DVC rerun on the same changes.
ENGINE = ["engine", "models", "tasks/config.py", "tasks/catalog.py", "tasks/stage.py", "tasks/context.py"]
CODE_DEPS: dict[str, list[str]] = {
    "prepare-data": ENGINE + ["tasks/prepare_data.py"],
    "train": ENGINE + ["tasks/train_model.py"],
    "train-job": ENGINE + ["tasks/train_model.py", "tasks/train_job.py"],
    "cache": ENGINE + ["tasks/cache_soft_targets.py"],
    "evaluate": ENGINE + ["tasks/evaluate.py"],
    "report": ENGINE + ["tasks/report.py"],
    "export": ENGINE + ["tasks/export.py", "tasks/model_card.py"],
    "experiment-report": ENGINE + ["tasks/report.py", "tasks/train_job.py", "experiments"],
}


def project_root() -> Path:
    return Path(os.environ.get("KD_PROJECT_ROOT", ".")).resolve()


@dataclass(frozen=True)
class Catalog:
    root: Path

    @classmethod
    def default(cls) -> "Catalog":
        return cls(project_root())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prepared(self) -> Path:
        return self.data / "prepared"

    def model(self, name: str) -> Path:
        return self.data / "models" / name

    def job(self, job_id: str) -> Path:
        """One experiment training (tasks/train_job.py): model/ and, for guides, soft_targets/."""
        return self.data / "zoo" / job_id

    def experiment(self, name: str) -> Path:
        """An experiment's records, tables and plots."""
        return self.data / "experiments" / name

    def soft_targets(self, name: str) -> Path:
        return self.data / "soft_targets" / name

    def work(self, name: str) -> Path:
        """Epoch checkpoints while a stage runs; outside DVC's outputs so a retry resumes."""
        return self.data / "work" / name

    def evaluation(self, name: str) -> Path:
        return self.data / "eval" / f"{name}.json"

    @property
    def eval_dir(self) -> Path:
        return self.data / "eval"

    @property
    def export(self) -> Path:
        """The shipped student: TorchScript, ONNX, labels, preprocessing and its model card."""
        return self.data / "export"

    @property
    def reports(self) -> Path:
        return self.data / "reports"

    @property
    def metrics(self) -> Path:
        """JSON metrics and plot data for `dvc metrics` / `dvc plots` (small, kept in git)."""
        return self.data / "metrics"

    @property
    def state(self) -> Path:
        """Local bookkeeping (locks, the open MLflow parent run); not an artefact."""
        return self.root / ".kd"
