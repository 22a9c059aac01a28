"""docs/benchmarks.md from the JSON results: one section per suite, its table, its summary,
the command and the machine that made it."""
from __future__ import annotations

from bench import SUITES
from tasks.report import markdown_table

COLUMNS = {
    "overhead": ["model", "train_images", "epochs", "batch", "trainer_img_s", "bare_img_s", "ratio", "ratio_range"],
    "original": ["way", "workers", "epoch_s", "img_s"],
    "cache": ["teacher", "student", "train_images", "cached_epoch_s", "online_epoch_s", "measured_ratio",
              "expected_by_flops", "share_of_flops_expectation", "expected_by_time", "share_of_time_expectation"],
    "scaling": ["sweep", "model", "train_images", "epoch_s", "us_per_image", "img_s", "train_mflops_per_image",
                "achieved_gflop_s"],
    "e2e": ["stage", "dvc_repro_s", "prefect_flow_s"],
    "gpu": ["model", "compile", "train_images", "trainer_img_s", "bare_img_s", "ratio", "ratio_range"],
    "teacher": ["epoch", "seconds", "val_acc", "test_acc"],
    "storage": ["case", "way", "cache", "img_s", "ratio_to_memory", "ratio_range"],
    "formats": ["case", "format", "version", "write_s", "mb_on_disk", "by_index_rows_s", "own_order_rows_s"],
    "distributed": ["case", "processes", "arch", "batch", "train_images", "img_s_median"],
    "distill-cost": ["arm", "student", "teacher", "train_images", "bank_rows", "step_gflop", "epoch_s", "against",
                     "ratio", "ratio_range", "flops_ratio"],
}


def _fmt(v):
    """Three significant figures; thousands get separators."""
    if isinstance(v, bool) or not isinstance(v, float):
        return v
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _summary(summary: dict) -> str:
    return "".join(f"- {k.replace('_', ' ')}: {_fmt(v)}\n" for k, v in summary.items())


def _section(name: str, result: dict) -> str:
    title, doc = SUITES[name].title, SUITES[name].module.__doc__.split("\n\n")[0].strip()
    m = result["machine"]
    where = f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads" + (f", {m['gpu']}" if m.get("gpu") else "")
    parts = [f"## {title}\n", f"{doc}\n",
             f"Command: `{result['command']}` (timed runs per measurement: {result['repeats']}, median reported; {result['finished']}, "
             f"{result['wall_s']:.0f} s; code {result.get('commit', 'not recorded')})  \nMachine: {where}; torch {m['torch']}, device {m['device']}\n"]
    if result["rows"]:
        rows = [{k: _fmt(v) for k, v in row.items()} for row in result["rows"]]
        parts.append(markdown_table(rows, COLUMNS[name]))
    parts.append(_summary(result["summary"]))
    return "\n".join(parts)


def markdown(results: dict) -> str:
    head = ("# Benchmarks\n\nWritten by `python -m bench` (see `bench/`); the raw numbers are in "
            "`docs/benchmarks.json`. Each section names the command and machine that produced it.\n\n")
    return head + "\n".join(_section(name, results[name]) for name in SUITES if name in results)
