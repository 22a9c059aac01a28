"""A model card in Markdown for an exported student: where it came from, how good it is
against its teacher, how much smaller and faster, and what data it learnt from."""
from __future__ import annotations

from engine.config import KDConfig
from engine.losses import loss_settings


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _hop(kd: KDConfig | None, method: str) -> str:
    if kd is None:
        return "labels only"
    settings = ", ".join(f"{k}={v}" for k, v in loss_settings(kd, kd.loss).items())
    return f"{method}, loss `{kd.loss}` ({settings})"


def headline(student: dict, teacher: dict) -> str:
    """'96% smaller, 5.1x faster, 98.9% of the teacher's accuracy' (DistilBERT's way of saying it)."""
    if teacher.get("test_acc") is None:
        return (f"{_pct(student['test_acc'])} test accuracy, distilled from a teacher known only by its predictions "
                "on the training images (no teacher size, speed or test accuracy to compare)")
    smaller = 1 - student["params"] / teacher["params"]
    parts = [f"{100 * smaller:.1f}% smaller" if smaller > 0.99 else f"{100 * smaller:.0f}% smaller"]
    if student.get("latency_ms_b1") and teacher.get("latency_ms_b1"):
        parts.append(f"{teacher['latency_ms_b1'] / student['latency_ms_b1']:.1f}x faster")
    parts.append(f"{100 * student['test_acc'] / teacher['test_acc']:.1f}% of the teacher's accuracy")
    return ", ".join(parts)


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def int8_section(student: dict, export: dict) -> str:
    """Each exported file beside the fp32 model: accuracy and its change, agreement, size and speed."""
    rows = "\n".join(
        f"| {kind} | `{f['file']}` | {_pct(f['test_acc'])} | {100 * f['acc_change']:+.2f} | {_pct(f['agreement'])} | "
        f"{f['size_bytes'] / 1024:,.1f} KB | {_num(f.get('latency_ms_b1'), '.3f')} | "
        f"{_num(f.get('throughput_b256'), ',.0f')} | {'yes' if f['within_tolerance'] else '**NO**'} |"
        for kind, f in export["formats"].items())
    flagged = "".join(f"\n- **{kind} loses {-100 * export['formats'][kind]['acc_change']:.2f} points, more than the "
                      f"tolerance of {100 * export['max_drop']:.2f}: do not ship it; ship the fp32 file, or train "
                      "with QAD (quantize.qad_epochs).**" for kind in export["flagged"])
    how = ("trained with quantization-aware distillation (QAD), so its INT8 files quantize weights it learnt under "
           "fake quantization" if student.get("method") == "QAD" else "quantized after training (PTQ)")
    return f"""## INT8
The INT8 files are this model {how}: weights int8 per output channel, activations uint8 per tensor, ranges
calibrated on {export['calibration_images']} training images. Test split, every file against the fp32 model;
speed on the CPU that ran the export (ONNX Runtime for `.onnx`, PyTorch for `.pt2`).

| file | name | test accuracy | change (points) | agreement with fp32 | size | latency b1 (ms) | throughput b256 (img/s) | within {100 * export['max_drop']:.2f} points |
|---|---|---|---|---|---|---|---|---|
{rows}
{flagged}
"""


def against_teacher(student: dict, teacher: dict) -> str:
    if teacher.get("test_acc") is None:
        return (f"- The teacher is known only by its predictions on the training images ("
                f"`{teacher.get('predictions', {}).get('file', '?')}`): it has no test accuracy, size or speed here.")
    return f"""- Accuracy as a share of the teacher's: **{100 * student['test_acc'] / teacher['test_acc']:.1f}%**
  ({_pct(student['test_acc'])} vs {_pct(teacher['test_acc'])}).
- Agreement with the teacher's predictions on the test split: {_pct(student.get('teacher_agreement', float('nan')))}.
- {teacher['params'] / student['params']:.1f}x fewer parameters and {teacher['flops'] / student['flops']:.1f}x fewer FLOPs than the teacher."""


def model_card(name: str, chain: list[dict], data: dict, export: dict) -> str:
    """`chain`: the student first, then each model it learnt from up to the teacher; each a dict of
    its meta, evaluation and hop settings ('kd', a KDConfig or None)."""
    student, teacher = chain[0], chain[-1]
    path = " → ".join(f"{m['role']} {m['arch']}" for m in reversed(chain))
    hops = "\n".join(f"  - {m['role']} {m['arch']}: {_hop(m.get('kd'), m['method'])}" for m in reversed(chain))
    rows = "\n".join(
        f"| {m['role']} `{m['arch']}` | {_pct(m['test_acc'])} | {m['params']:,} | {m['size_bytes'] / 2**20:.2f} MB | "
        f"{m['flops'] / 1e6:.1f} | {m.get('latency_ms_b1', float('nan')):.2f} | {m.get('throughput_b256', float('nan')):,.0f} |"
        for m in chain if "params" in m)
    classes = ", ".join(f"{i}: {c}" for i, c in enumerate(data["classes"]))
    c, h, w = data["input_shape"]
    return f"""# Model card: {student['arch']} ({name})

**{headline(student, teacher)}** (test split; speed on the CPU that ran the evaluation, batch 1).

## Where it came from
- Path: {path}
- Method of each hop:
{hops}
- Selected {export['selected']}; the test split was used only to report.

## How good it is
| model | test accuracy | parameters | size | MFLOPs / image | latency b1 (ms) | throughput b256 (img/s) |
|---|---|---|---|---|---|---|
{rows}

{against_teacher(student, teacher)}

{int8_section(student, export)}
## Data it was distilled on
- Data set: `{data['name']}` (fingerprint `{data['fingerprint']}`): {data['sizes']['train']:,} training,
  {data['sizes']['val']:,} validation and {data['sizes']['test']:,} test images.
- Classes ({len(data['classes'])}): {classes}
- Input: {c}x{h}x{w}, pixel values in [0, 1]; the files normalise inside with mean {data['mean']} and std {data['std']}.

## Files
| file | what | max abs difference from PyTorch ({export['check_images']} test images) |
|---|---|---|
| `model.pt2` | torch.export program: `torch.export.load("model.pt2").module()(images)` | {export['pt2_max_abs_diff']:.2e} |
| `model.onnx` | ONNX (input `image` [N, {c}, {h}, {w}], output `logits`), for onnxruntime | {export['onnx_max_abs_diff']:.2e} |
| `model.int8.onnx` | the ONNX file, INT8 (ONNX Runtime's static QDQ quantization) | see INT8 |
| `labels.json` | class index → name | |
| `preprocessing.json` | input shape, value range, normalisation | |

## Limits
- Measured on the test split of the data above only; other data may differ.
- The class order is fixed: outputs index into `labels.json`.
"""
