"""Benchmarks: `python -m bench` (not part of the test suite). Suites by name; each module
has `run(ctx) -> {"rows": [...], "summary": {...}}`."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType


@dataclass(frozen=True)
class Suite:
    title: str
    module_name: str

    @property
    def module(self) -> ModuleType:
        return import_module(self.module_name)


SUITES = {
    "overhead": Suite("1. Trainer overhead against a bare loop", "bench.overhead"),
    "original": Suite("2. One BLKD epoch: our way against the original TAKD code's way", "bench.original_way"),
    "cache": Suite("3. Soft-target cache against an online teacher", "bench.cache"),
    "e2e": Suite("4. End to end: dvc repro and the Prefect flow", "bench.end_to_end"),
    "scaling": Suite("5. Scaling with data and model size", "bench.scaling"),
    "gpu": Suite("6. GPU path", "bench.gpu"),
    "teacher": Suite("7. Time to accuracy of the default teacher", "bench.teacher"),
    "storage": Suite("8. Data streamed from disk against data in memory", "bench.storage"),
    "formats": Suite("9. The store's format against maintained streaming formats", "bench.formats"),
    "distributed": Suite("10. One training over one process and over two (DDP)", "bench.distributed"),
    "distill-cost": Suite("11. What distilling adds to an epoch: KD over labels only, CRD and ReviewKD over KD",
                          "bench.distill_cost"),
}
