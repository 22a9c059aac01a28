"""Keep DVC in step with a flow run: after the flow has produced the params.yaml experiment,
record its outputs in dvc.lock (`dvc commit`), so `dvc status` has nothing to do."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.catalog import Catalog
from tasks.config import PipelineConfig, load_config
from tasks.stages import STAGES

log = logging.getLogger("kd")


def _dvc() -> str | None:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else shutil.which("dvc")


def sync_dvc_lock(config: PipelineConfig, cat: Catalog) -> bool:
    if not ((cat.root / "dvc.yaml").exists() and (cat.root / ".dvc").is_dir()):
        return False
    if config != load_config(cat.root / "params.yaml"):
        return False  # dvc.lock describes params.yaml; another config's outputs must not be recorded as it
    dvc = _dvc()
    if dvc is None:
        log.warning("dvc not found; dvc.lock not updated")
        return False
    out = subprocess.run([dvc, "commit", "--force", "--quiet", *STAGES], cwd=cat.root, capture_output=True, text=True)
    if out.returncode != 0:
        log.warning("dvc commit failed: %s", out.stderr.strip()[-500:])
        return False
    return True
