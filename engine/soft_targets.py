"""The soft-target cache: a teacher's raw logits for K fixed views of every training image.

Files: `logits.pt` (fp16 values, and int16 class indices when only the top-k are kept),
then `manifest.json`, written last. A cache is only used when its manifest matches the
request field by field; otherwise it is refused with the differences named.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from engine import augment
from engine.atomic import load_torch, save_json, save_torch
from engine.config import AugmentConfig
from engine.feed import DeviceSet
from engine.errors import CacheMismatchError
from models.features import with_features

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


@dataclass
class Targets:
    """What a source of soft targets returns for a batch, when it is more than logits."""

    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None  # one per guide in logits [G, B, C]

    @staticmethod
    def of(value: "torch.Tensor | Targets | None") -> "Targets":
        return value if isinstance(value, Targets) else Targets(value)


class SoftTargets:
    """Teacher logits for (view k, image i), looked up per batch on the device.

    A top-k cache keeps each row's k largest logits and `rest`, the logsumexp of the others.
    The dropped classes share that mass evenly: each gets the logit rest - log(C - k), so at
    T = 1 the teacher's probability of the dropped set is exact, and the student is still
    pulled toward it rather than to 0. Within the set, and at other temperatures, it is an
    approximation (tests/test_soft_targets.py measures it against the full logits)."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor | None, num_classes: int,
                 rest: torch.Tensor | None = None):
        if indices is not None and rest is None:
            raise CacheMismatchError("a top-k soft-target cache needs each row's leftover mass (`rest`); this one "
                                     "was written before it was kept: rebuild it with its cache stage (`takd "
                                     "cache-teacher --force`, `takd cache-assistant --force`)")
        self.values, self.indices, self.num_classes, self.rest = values, indices, num_classes, rest

    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        vals = self.values[view, idx].float()
        if self.indices is None:
            return vals
        dropped = self.num_classes - vals.shape[1]
        fill = self.rest[view, idx].float() - math.log(max(dropped, 1))
        dense = fill[:, None].expand(len(idx), self.num_classes).clone()
        return dense.scatter_(1, self.indices[view, idx].long(), vals)

    def to(self, device: torch.device) -> "SoftTargets":
        def move(t):
            return None if t is None else t.to(device)

        return SoftTargets(self.values.to(device), move(self.indices), self.num_classes, move(self.rest))


class OnlineTeacher:
    """Runs the teacher on the student's exact views; same interface as SoftTargets. With
    `features`, it also returns those stages, reduced to what the loss reads."""

    def __init__(self, model: nn.Module, features: tuple[str, ...] = (), reduce=None):
        self.model = model.eval()
        self.features, self.reduce = tuple(features), reduce or (lambda f: f)
        self.body = with_features(self.model, list(features)).eval() if features else None

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None):
        if self.body is None:
            return self.model(x).float()
        logits, feats = self.body(x)
        return Targets(logits.float(), self.reduce(feats))


class CachedFeatures:
    """Logits from another source plus the teacher's features for (view k, image i), held in
    memory: computed once per training, instead of a teacher forward pass at every step."""

    def __init__(self, logits, features: dict[str, torch.Tensor]):
        self.logits, self.features = logits, features

    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None) -> Targets:
        t = Targets.of(self.logits(idx, view, x))
        return Targets(t.logits, {n: f[view, idx].float() for n, f in self.features.items()}, t.weights)

    @property
    def bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features.values())


class DenseGuides:
    """Several sources of soft targets at once: DGKD (the teacher and every earlier assistant)
    or a multi-teacher ensemble. Returns Targets with logits stacked as [G, B, C] and each
    kept guide's weight.

    Each step keeps each guide with probability `survival` (at least one), drawn from the
    trainer's generator so a resumed run repeats it; with survival 1 every guide is kept.
    """

    def __init__(self, guides: list, survival: float, generator: torch.Generator,
                 weights: list[float] | None = None):
        if not guides:
            raise ValueError("DenseGuides needs at least one guide")
        if weights is not None and len(weights) != len(guides):
            raise ValueError(f"{len(weights)} weights for {len(guides)} guides; give one per guide")
        self.guides, self.survival, self.generator = guides, survival, generator
        self.weights = torch.tensor(weights or [1.0] * len(guides), dtype=torch.float32)

    def __call__(self, idx: torch.Tensor, view: torch.Tensor, x: torch.Tensor | None = None) -> Targets:
        keep = torch.ones(len(self.guides), dtype=torch.bool)
        if self.survival < 1:
            keep = torch.rand(len(self.guides), generator=self.generator) < self.survival
            if not keep.any():
                keep[torch.randint(len(self.guides), (1,), generator=self.generator)] = True
        logits = torch.stack([Targets.of(g(idx, view, x)).logits for g, k in zip(self.guides, keep.tolist()) if k])
        return Targets(logits, weights=self.weights[keep].to(logits.device))


def _over_views(fn, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int, batch_size: int, progress=None):
    """fn(x) for each batch of each fixed view, in order: yields (k, output)."""
    views = augment.fixed_views(len(train), spec, seed, k_views).to(train.device)
    for k in range(k_views):
        for idx, x in train.batches(torch.arange(len(train)), batch_size):
            yield k, fn(train.normalize(augment.apply(x, views[k, idx], spec)))
            if progress:
                progress(len(idx))


@torch.no_grad()
def compute_features(model: nn.Module, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int,
                     names: tuple[str, ...], reduce=None, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """The teacher's named features (reduced) for K fixed views of every image: {name: [K, N, ...]}
    in fp16, on the data's device."""
    body = with_features(model.eval(), list(names)).eval()
    reduce = reduce or (lambda f: f)
    rows: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(k_views)] for n in names}
    for k, (_, feats) in _over_views(body, train, spec, k_views, seed, batch_size):
        for n, f in reduce(feats).items():
            rows[n][k].append(f.half())
    return {n: torch.stack([torch.cat(r) for r in per_view]) for n, per_view in rows.items()}


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits per row, their classes, and the logsumexp of the rest (-inf when none)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1)
    rest = logits.scatter(1, top.indices, float("-inf")).logsumexp(1)
    return top.values, top.indices, rest


@torch.no_grad()
def compute(model: nn.Module, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int,
            topk: int | None, batch_size: int = 1024, progress=None) -> SoftTargets:
    model.eval()
    parts: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(k_views)] for n in ("values", "indices", "rest")}
    c = None
    for k, logits in _over_views(lambda x: model(x).float(), train, spec, k_views, seed, batch_size, progress):
        c = logits.shape[1]
        for name, part in zip(("values", "indices", "rest"), _stored(logits, topk)):
            parts[name][k].append(part)
    stacked = {n: torch.stack([torch.cat(r) for r in per_view]) if per_view[0] else None for n, per_view in parts.items()}
    return SoftTargets(stacked["values"], stacked["indices"], c, stacked["rest"])


def _stored(logits: torch.Tensor, topk: int | None) -> tuple:
    """What a cache keeps of fp32 logits [N, C]: fp16 values, and with top-k the int16 classes and the rest."""
    if not topk:
        return (logits.half().cpu(),)
    values, indices, rest = _top(logits, topk)
    return values.half().cpu(), indices.to(torch.int16).cpu(), rest.cpu()


def from_logits(logits: torch.Tensor, topk: int | None) -> SoftTargets:
    """A cache of one view (the clean image) from logits already computed [N, C]: a teacher's predictions file."""
    values, indices, rest = ([p[None] for p in _stored(logits.float(), topk)] + [None, None])[:3]
    return SoftTargets(values, indices, logits.shape[1], rest)


def save(directory: str | Path, targets: SoftTargets, key: CacheKey) -> None:
    directory = Path(directory)
    payload = {"values": targets.values}
    if targets.indices is not None:
        payload |= {"indices": targets.indices, "rest": targets.rest}
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
    try:
        targets = SoftTargets(payload["values"], payload.get("indices"), expected.num_classes, payload.get("rest"))
    except CacheMismatchError as e:
        raise CacheMismatchError(f"{directory / LOGITS_FILE}: {e}") from None
    return targets.to(torch.device(device))
