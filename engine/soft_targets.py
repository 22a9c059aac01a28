"""The soft-target cache: a teacher's raw logits for K fixed views of every training image.

Files: `logits.pt` (fp16 values, and int16 class indices when only the top-k are kept),
then `manifest.json`, written last. A cache is only used when its manifest matches the
request field by field; otherwise it is refused with the differences named.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from engine import augment
from engine.atomic import load_torch, save_json, save_torch
from engine.config import AugmentConfig
from engine.data import DeviceSet
from engine.errors import CacheMismatchError

LOGITS_FILE, MANIFEST_FILE = "logits.pt", "manifest.json"


@dataclass(frozen=True)
class CacheKey:
    model_fingerprint: str
    data_fingerprint: str
    augment: dict
    views: int
    view_seed: int
    topk: Optional[int]
    num_classes: int
    num_images: int


class SoftTargets:
    """Teacher logits for (view k, image i), looked up per batch on the device."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor | None, num_classes: int):
        self.values, self.indices, self.num_classes = values, indices, num_classes

    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        vals = self.values[view, idx].float()
        if self.indices is None:
            return vals
        dense = torch.full((len(idx), self.num_classes), float("-inf"), device=vals.device)
        return dense.scatter_(1, self.indices[view, idx].long(), vals)

    def to(self, device: torch.device) -> "SoftTargets":
        ind = None if self.indices is None else self.indices.to(device)
        return SoftTargets(self.values.to(device), ind, self.num_classes)


class OnlineTeacher:
    """Runs the teacher on the student's exact views; same interface as SoftTargets."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x).float()


class DenseGuides:
    """Several sources of soft targets at once (DGKD: the teacher and every earlier assistant).

    Returns logits stacked as [G, B, C]. Each step keeps each guide with probability
    `survival` (at least one), drawn from the trainer's generator so a resumed run repeats it.
    """

    def __init__(self, guides: list, survival: float, generator: torch.Generator):
        if not guides:
            raise ValueError("DenseGuides needs at least one guide")
        self.guides, self.survival, self.generator = guides, survival, generator

    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        keep = torch.rand(len(self.guides), generator=self.generator) < self.survival
        if not keep.any():
            keep[torch.randint(len(self.guides), (1,), generator=self.generator)] = True
        return torch.stack([g(idx, view, x) for g, k in zip(self.guides, keep.tolist()) if k])


@torch.no_grad()
def compute(model: nn.Module, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int,
            topk: int | None, batch_size: int = 1024, progress=None) -> SoftTargets:
    model.eval()
    views = augment.fixed_views(len(train), spec, seed, k_views).to(train.x.device)
    n, c = len(train), None
    vals, inds = [], []
    for k in range(k_views):
        row_v, row_i = [], []
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=train.x.device)
            x = train.normalize(augment.apply(train.x[idx], views[k, idx], spec))
            logits = model(x).float()
            c = logits.shape[1]
            if topk:
                top = logits.topk(min(topk, c), dim=1)
                row_v.append(top.values.half().cpu())
                row_i.append(top.indices.to(torch.int16).cpu())
            else:
                row_v.append(logits.half().cpu())
            if progress:
                progress(len(idx))
        vals.append(torch.cat(row_v))
        inds.append(torch.cat(row_i) if topk else None)
    indices = torch.stack(inds) if topk else None
    return SoftTargets(torch.stack(vals), indices, c)


def save(directory: str | Path, targets: SoftTargets, key: CacheKey) -> None:
    directory = Path(directory)
    payload = {"values": targets.values}
    if targets.indices is not None:
        payload["indices"] = targets.indices
    save_torch(payload, directory / LOGITS_FILE)
    digest = hashlib.sha256((directory / LOGITS_FILE).read_bytes()).hexdigest()
    manifest = {"key": asdict(key), "logits_sha256": digest, "bytes": (directory / LOGITS_FILE).stat().st_size,
                "dtype": "float16", "shape": list(targets.values.shape)}
    save_json(manifest, directory / MANIFEST_FILE)


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise CacheMismatchError(f"{path}: no manifest; the soft-target cache is missing or incomplete")
    return json.loads(path.read_text())


def load(directory: str | Path, expected: CacheKey, device: torch.device | str = "cpu") -> SoftTargets:
    directory = Path(directory)
    manifest = read_manifest(directory)
    found, wanted = manifest["key"], asdict(expected)
    diffs = [f"{k}: cache has {found.get(k)!r}, request needs {v!r}" for k, v in wanted.items() if found.get(k) != v]
    if diffs:
        raise CacheMismatchError(f"{directory}: soft-target cache does not match the request; " + "; ".join(diffs))
    digest = hashlib.sha256((directory / LOGITS_FILE).read_bytes()).hexdigest()
    if digest != manifest["logits_sha256"]:
        raise CacheMismatchError(f"{directory / LOGITS_FILE}: contents do not match its manifest (sha256 differs)")
    payload = load_torch(directory / LOGITS_FILE)
    return SoftTargets(payload["values"], payload.get("indices"), expected.num_classes).to(torch.device(device))
