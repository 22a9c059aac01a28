"""Post-training INT8: the exported student quantized statically with ONNX Runtime, calibrated on a seeded sample
of training images, and measured beside its fp32 originals (the ONNX file and the torch.export program): accuracy,
agreement with fp32, file size, CPU latency and throughput.

A torch-side INT8 file (torch.ao's FX quantization, traced to TorchScript) was written here too until both of its
APIs were deprecated in torch 2.14. It is dropped, not moved to torchao, for what was measured on it
(docs/quantization.md, "Why one INT8 file"): it was never the fastest file to ship, the fp32 ONNX file running
the student 1.8x faster; and torchao's successor path (PT2E) makes fast INT8 kernels only through torch.compile's
Inductor, a compiler the deployed file would carry."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from engine.atomic import atomic_path
from engine.feed import DeviceSet
from engine.evaluate import median_seconds

CALIBRATION_BATCH = 64


def calibration_images(train: DeviceSet, n: int, seed: int) -> torch.Tensor:
    """`n` training images drawn without replacement by `seed`, as floats in [0, 1] on the CPU (the exported
    files normalise inside)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[: min(n, len(train))]
    return train.x[idx.to(train.device)].cpu().float() / 255


def _batches(images: torch.Tensor, size: int = CALIBRATION_BATCH):
    return [images[i:i + size].numpy() for i in range(0, len(images), size)]


def ort_int8(fp32_onnx: Path, out: Path, calibration: torch.Tensor) -> None:
    """Static QDQ quantization: weights int8 per output channel (symmetric), activations uint8 per tensor,
    ranges from MinMax calibration. ONNX Runtime's pre-processing (shape inference, BatchNorm folded into
    the conv) runs first, as its docs advise."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(_batches(calibration))

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory(prefix="int8-") as tmp, atomic_path(out) as target:
        pre = Path(tmp) / "pre.onnx"
        # ONNX's own shape inference: the symbolic one crashes on air-N's Reshape; a CNN needs no more.
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


class Runner:
    """A file that takes images and returns logits, run on the CPU: ONNX Runtime, or a torch.export program this
    project wrote (engine.export.load_pt2)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # the same threads PyTorch's timings use
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._run = lambda x: torch.from_numpy(self._session.run(["logits"], {"image": x.numpy()})[0])
        else:
            from engine.export import load_pt2

            self._run = load_pt2(path)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        return torch.cat([self._run(images[i:i + batch].contiguous()) for i in range(0, len(images), batch)])

    @torch.inference_mode()
    def speed(self, input_shape: tuple[int, ...], repeats: int) -> dict[str, float]:
        """Median latency at batch 1 and median throughput at batch 256, as engine.evaluate measures PyTorch."""
        one, many = torch.rand(1, *input_shape), torch.rand(256, *input_shape)
        latency = median_seconds(lambda: self._run(one), repeats)
        batch = median_seconds(lambda: self._run(many), max(3, repeats // 4))
        return {"latency_ms_b1": latency * 1000, "throughput_b256": 256 / batch}


def measure(path: Path, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None,
            speed_repeats: int) -> dict:
    """Test accuracy, agreement with `reference` predictions (the fp32 model's), size and speed of one file."""
    runner = Runner(path)
    pred = runner.logits(images).argmax(1)
    out = {"file": path.name, "test_acc": (pred == labels).float().mean().item(), "size_bytes": path.stat().st_size}
    if reference is not None:
        out["agreement"] = (pred == reference).float().mean().item()
    if speed_repeats:
        out |= runner.speed(tuple(images.shape[1:]), speed_repeats)
    return out


def int8_file(fp32_onnx: Path, calibration: torch.Tensor) -> Path:
    """The INT8 sibling of an exported fp32 ONNX file: `model.onnx` -> `model.int8.onnx`."""
    out = fp32_onnx.with_suffix(".int8.onnx")
    ort_int8(fp32_onnx, out, calibration)
    return out
