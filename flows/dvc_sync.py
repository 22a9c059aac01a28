"""Keep DVC in step with a flow run: after the flow has produced the params.yaml experiment,
record its outputs in dvc.lock (`dvc commit`), so `dvc status` has nothing to do.

This cannot record a wrong output: every stage's key hashes exactly what its dvc.yaml deps and
params cover, so an output the flow reused or made is the one `dvc repro` would make."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from tasks import dvc_yaml
from tasks.catalog import Catalog
from tasks.config import PipelineConfig, load_config

log = logging.getLogger("kd")


def _dvc() -> str | None:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else shutil.which("dvc")


def sync_dvc_lock(config: PipelineConfig, cat: Catalog) -> bool:
    path = cat.root / "dvc.yaml"
    if not (path.exists() and (cat.root / ".dvc").is_dir()):
        return False
    if config != load_config(cat.root / "params.yaml"):
        return False  # dvc.lock describes params.yaml; another config's outputs must not be recorded as it
    if path.read_text() != dvc_yaml.generate(cat.root):
        log.warning("%s does not match params.yaml; run `python -m tasks dvc-yaml`. dvc.lock not updated", path)
        return False
    dvc = _dvc()
    if dvc is None:
        log.warning("dvc not found; dvc.lock not updated")
        return False
    out = subprocess.run([dvc, "commit", "--force", "--quiet", "dvc.yaml"], cwd=cat.root, capture_output=True, text=True)
    if out.returncode != 0:
        log.warning("dvc commit failed: %s", out.stderr.strip()[-500:])
        return False
    return True
