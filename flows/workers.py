"""How many steps a flow runs at once unless told: light (no Prefect), so that the CLI's `--workers` default
(takd/cli.py) is read without importing the flows."""
from __future__ import annotations

import os

ENV_WORKERS = "KD_WORKERS"
DEFAULT_WORKERS = int(os.environ.get(ENV_WORKERS, "2"))
