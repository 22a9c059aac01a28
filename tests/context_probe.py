"""Launched by tests/test_run_context.py as `python -m tests.context_probe`: writes what the new process resolves as
its RunContext, and the threads torch then uses, to the launcher's result file."""
import json
import os

import torch

from tasks.run_context import RunContext

if __name__ == "__main__":
    ctx = RunContext.resolve().apply()
    with open(os.environ["KD_RESULT_FILE"], "w") as f:
        json.dump({**ctx.public(), "root": str(ctx.root), "torch_threads": torch.get_num_threads(),
                   "dvc_stage": ctx.dvc_stage, "pid": os.getpid()}, f)
