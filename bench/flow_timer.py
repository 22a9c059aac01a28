"""Runs the default Prefect flow once in this folder and prints its timings as JSON. Arguments: the workers (2),
then the stages to run with what they read (default: all).

Started by the end-to-end suite in a fresh clone, with a fresh PREFECT_HOME and no
PREFECT_API_URL, so Prefect starts its own temporary server as a new user's first run does.
`flow_s` is the flow run's own start-to-end time from Prefect's records (server start
not counted); the suite times the whole process around it (server start counted).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time


async def _flow_seconds(flow_run_id) -> float:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
    return (run.end_time - run.start_time).total_seconds()


def main() -> None:
    t0 = time.perf_counter()
    from flows.pipeline import takd_pipeline
    from tasks.config import load_config

    imported = time.perf_counter() - t0
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2  # two stages at once: what the runners must agree on
    stages = sys.argv[2:] or None  # only these and what they read
    state = takd_pipeline(load_config("params.yaml", {}), workers=workers, stages=stages, return_state=True)
    called = time.perf_counter() - t0
    print(json.dumps({"state": state.type.value, "import_s": imported, "in_process_s": called, "workers": workers,
                      "flow_s": asyncio.run(_flow_seconds(state.state_details.flow_run_id))}))


if __name__ == "__main__":
    main()
