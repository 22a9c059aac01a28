"""Every path the pipeline reads or writes, in one place (the Kedro 'catalog')."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.run_context import project_root

# What the report publishes for `dvc metrics` and `dvc plots` (outside its own folder: DVC's metrics and plots
# cannot lie inside another output), relative to the project.
METRICS_FILE, PLOT_FILE, CURVES = "data/metrics/comparison.json", "data/metrics/comparison_plot.json", "data/metrics/curves"


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

    @property
    def models(self) -> Path:
        return self.data / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    def zoo(self, spec_id: str) -> Path:
        """One experiment's training, by its TrainSpec's id: model/ and, for guides, soft_targets/."""
        return self.data / "zoo" / spec_id

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
        """The shipped student: torch.export program, ONNX, labels, preprocessing and its model card."""
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
        """Local bookkeeping (locks, content hashes); not an artefact."""
        return self.root / ".kd"
