"""The run context: resolved once where a process starts, handed to the processes it launches, and nothing else
of the launcher's run state with it."""
import os
import subprocess
import sys
from pathlib import Path

from tasks.launch import launch
from tasks.run_context import RunContext

ROOT = Path(__file__).resolve().parents[1]


def test_a_launched_process_gets_the_launchers_context_and_none_of_its_run_state(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_MLFLOW_PARENT_RUN", "a-stale-parent")  # the launcher's own environment: not handed down
    monkeypatch.setenv("DVC_STAGE", "train-teacher")
    ctx = RunContext(tmp_path, threads=1, tracking=False, parent="the-flows-parent", flow_run="flow-7")
    seen = launch(["tests.context_probe"], ctx)
    assert seen["pid"] != os.getpid() and seen["root"] == str(tmp_path)
    assert (seen["threads"], seen["torch_threads"]) == (1, 1)  # set once, at the new process's entry
    assert (seen["parent"], seen["flow_run"], seen["tracking"], seen["dvc_stage"]) == ("the-flows-parent", "flow-7",
                                                                                      False, None)
    two = launch(["tests.context_probe"], RunContext(tmp_path, threads=2))
    assert (two["torch_threads"], two["parent"]) == (2, None)


FAKE_DVC = """
import subprocess, sys
for stage in ("a", "b"):  # two stages of one `dvc repro`, each its own process under a shell, as DVC runs them
    subprocess.run(["sh", "-c", f"DVC_STAGE={stage} {sys.executable} -c 'from tasks.run_context import "
                                "dvc_invocation; print(dvc_invocation())'"], check=True)
"""


def test_the_stages_of_one_dvc_repro_share_its_invocation_and_no_other_run_does(tmp_path):
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n{FAKE_DVC}")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([str(fake), "repro"], env=env, capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    (a1, b1), (a2, b2) = runs
    assert a1 == b1 and a2 == b2 and a1 != a2 and a1.count(":") == 2  # host:pid:start time of each `dvc`
    alone = subprocess.run([sys.executable, "-c", "from tasks.run_context import dvc_invocation; "
                            "print(dvc_invocation())"], env={**env, "DVC_STAGE": "a"}, capture_output=True, text=True)
    assert alone.stdout.strip() == "None"
