"""The soft-target cache: a teacher's raw logits for K fixed views of every training image.

Files: `values.npy` (fp16 logits, row k*N + i for view k of image i), with only the top-k kept also `indices.npy`
(int16 classes) and `rest.npy` (fp32 leftover mass), then `manifest.json`, written last with each file's size and
SHA-256. Rows are written as the teacher makes them and read back by row, so neither building nor reading a cache
needs memory for the whole array; a cache that fits the memory budget is read into memory once instead
(`data.storage`, engine/placement.py). A cache is only used when its manifest matches the request field by field;
otherwise it is refused with the differences named.
"""
from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from engine import augment
from engine.atomic import save_json
from engine.config import AugmentConfig
from engine.distributed import Ranks, ranks
from engine.errors import CacheMismatchError, KDError
from engine.feed import DeviceSet
from engine.store import RowFile, ShardedRows, _sha256, in_memory
from models.features import with_features

MANIFEST_FILE = "manifest.json"
PARTS = ("values", "indices", "rest")  # the files of a cache, in this order; a full-logits cache has only values
REBUILD = "rebuild the cache with its cache stage (`takd cache-teacher --force`, `takd cache-assistant --force`)"


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


class ByView:
    """A cache file's rows [K*N, ...] looked up as [view, image] and returned on `device`: read into memory there
    once (`resident`), or read row by row from disk at each lookup."""

    def __init__(self, rows: ShardedRows, images: int, device: torch.device, resident: bool):
        self.images, self.device = images, device
        self.rows = in_memory(rows).to(device) if resident else rows
        self.resident = resident

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows.shape[0] // self.images, self.images, *self.rows.shape[1:])

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        view, idx = key
        flat = view.to(idx.device) * self.images + idx
        if self.resident:
            return self.rows[flat.to(self.device)]
        return self.rows[flat.cpu()].to(self.device, non_blocking=True)


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
    """Logits from another source plus the teacher's features for (view k, image i), held in memory or read by row
    from disk (compute_features): computed once per training, instead of a teacher forward pass at every step."""

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


def _over_views(fn, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int, batch_size: int, progress=None,
                group: Ranks = Ranks()):
    """fn(x) for each batch of each fixed view, in order: yields (k, output). Over a `group` of processes each
    runs its share of every batch, and every rank gets the whole batch's output."""
    views = augment.fixed_views(len(train), spec, seed, k_views).to(train.device)
    whole = list(torch.arange(len(train)).split(batch_size))
    for k in range(k_views):
        for (idx, x), size in zip(train.batches([b[group.share(len(b))] for b in whole]), map(len, whole)):
            yield k, group.gather_rows(fn(train.normalize(augment.apply(x, views[k, idx], spec))), size)
            if progress:
                progress(size)


@torch.no_grad()
def compute_features(model: nn.Module, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int,
                     names: tuple[str, ...], reduce=None, batch_size: int = 1024,
                     folder: Path | None = None) -> dict[str, "torch.Tensor | ByView"]:
    """The teacher's named features (reduced) for K fixed views of every image, fp16: {name: [K, N, ...]} on the
    data's device, or, with `folder`, written there a batch at a time and read back by row (ByView)."""
    body = with_features(model.eval(), list(names)).eval()
    reduce = reduce or (lambda f: f)
    chunks = ((k, {n: f.half().cpu().numpy() for n, f in reduce(feats).items()})
              for k, (_, feats) in _over_views(body, train, spec, k_views, seed, batch_size))
    if folder is None:
        return {n: f.to(train.device) for n, f in _gathered(chunks, k_views).items()}
    files = _written(folder, chunks, k_views * len(train))
    return {n: ByView(_rows(folder, e, "rerun the training"), len(train), train.device, resident=False)
            for n, e in files.items()}


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits per row, their classes, and the logsumexp of the rest (-inf when none)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1)
    rest = logits.scatter(1, top.indices, float("-inf")).logsumexp(1)
    return top.values, top.indices, rest


def _stored(logits: torch.Tensor, topk: int | None) -> dict[str, np.ndarray]:
    """What a cache keeps of fp32 logits [B, C]: fp16 values, and with top-k the int16 classes and the rest."""
    if not topk:
        return {"values": logits.half().cpu().numpy()}
    values, indices, rest = _top(logits, topk)
    return {"values": values.half().cpu().numpy(), "indices": indices.to(torch.int16).cpu().numpy(),
            "rest": rest.cpu().numpy()}


def _logit_chunks(logits_of, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int, topk: int | None,
                  batch_size: int, progress=None, group: Ranks = Ranks()) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    with torch.no_grad():
        for k, logits in _over_views(logits_of, train, spec, k_views, seed, batch_size, progress, group):
            stored = _stored(logits, topk)
            if not np.isfinite(stored["values"]).all():
                raise KDError(f"the guide's logits are not finite in fp16 in view {k} (largest |logit| "
                              f"{logits.abs().max().item():.3g}; fp16 holds 65504): the guide has diverged, or its "
                              "logits need scaling before they can be cached")
            yield k, stored


def _gathered(chunks, k_views: int) -> dict[str, torch.Tensor]:
    """Chunks of rows, view after view, as one [K, N, ...] tensor per name."""
    parts: dict[str, list[np.ndarray]] = {}
    for _, chunk in chunks:
        for name, rows in chunk.items():
            parts.setdefault(name, []).append(rows)
    return {n: torch.from_numpy(np.concatenate(p)).view(k_views, -1, *p[0].shape[1:]) for n, p in parts.items()}


def _written(folder: Path, chunks, rows: int) -> dict[str, dict]:
    """Chunks of rows written in order, one .npy per name, each renamed into place when whole: {name: entry}."""
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        files: dict[str, RowFile] = {}
        for _, chunk in chunks:
            for name, block in chunk.items():
                if name not in files:
                    files[name] = stack.enter_context(RowFile(folder / f"{name}.npy", rows))
                files[name].write(block)
    return {n: f.entry for n, f in files.items()}


def compute(model: nn.Module, train: DeviceSet, spec: AugmentConfig, k_views: int, seed: int,
            topk: int | None, batch_size: int = 1024, progress=None) -> SoftTargets:
    """The soft targets in memory, on the data's device: for a cache small enough to build where it is used."""
    classes = []

    def logits_of(x):
        logits = model.eval()(x).float()
        classes.append(logits.shape[1])
        return logits

    parts = _gathered(_logit_chunks(logits_of, train, spec, k_views, seed, topk, batch_size, progress), k_views)
    parts = {n: p.to(train.device) for n, p in parts.items()}
    return SoftTargets(parts["values"], parts.get("indices"), classes[0], parts.get("rest"))


def write(out: Path, model: nn.Module, train: DeviceSet, spec: AugmentConfig, key: CacheKey, batch_size: int = 1024,
          progress=None) -> dict:
    """The cache of `key` (its views, seed and top-k) of `model` over `train`, written into `out` a batch at a
    time, manifest last. Returns the manifest. Over several processes each runs the teacher on its share of every
    batch and rank 0 writes (the others return None)."""
    logits_of = lambda x: model.eval()(x).float()  # noqa: E731
    group = ranks()
    chunks = _logit_chunks(logits_of, train, spec, key.views, key.view_seed, key.topk, batch_size, progress, group)
    if not group.main:
        for _ in chunks:
            pass
        return None
    return write_chunks(out, chunks, key)


def write_logits(out: Path, logits: torch.Tensor, key: CacheKey) -> dict:
    """A cache of one view (the clean image) from logits already computed [N, C]: a teacher's predictions file."""
    return write_chunks(out, [(0, _stored(logits.float(), key.topk))], key)


def write_chunks(out: Path, chunks, key: CacheKey) -> dict:
    """A cache from (view, {file: rows}) chunks in row order, view after view, then its manifest. Returns that."""
    files = _written(out, chunks, key.views * key.num_images)
    shape = [key.views, key.num_images, *_rows(out, files["values"]).row_shape]
    manifest = {"key": asdict(key), "files": files, "bytes": sum(f["bytes"] for f in files.values()),
                "dtype": "float16", "shape": shape}
    save_json(manifest, out / MANIFEST_FILE)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise CacheMismatchError(f"{path}: no manifest; the soft-target cache is missing or incomplete")
    manifest = json.loads(path.read_text())
    if "files" not in manifest:
        raise CacheMismatchError(f"{path}: a soft-target cache in an older format (one logits.pt); {REBUILD}")
    return manifest


def _rows(folder: Path, entry: dict, fix: str = REBUILD) -> ShardedRows:
    """One cache file's rows, as its manifest entry says, read by row."""
    path = folder / entry["file"]
    with open(path, "rb") as f:
        try:
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        except ValueError as e:
            raise CacheMismatchError(f"{path}: not a NumPy array file ({e}); {fix}") from None
    return ShardedRows([path], [entry["rows"]], shape[1:], dtype, fix)


def _check_files(directory: Path, manifest: dict) -> None:
    """Each file of the cache has the size and SHA-256 its manifest recorded, read a block at a time."""
    for entry in manifest["files"].values():
        path = directory / entry["file"]
        if not path.exists():
            raise CacheMismatchError(f"{path}: missing from the soft-target cache; {REBUILD}")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise CacheMismatchError(f"{path}: contents do not match its manifest (size or sha256 differs); {REBUILD}")


def load(directory: str | Path, expected: CacheKey, device: torch.device | str = "cpu",
         resident: bool = True) -> SoftTargets:
    """The cache in `directory`, checked against `expected` and its manifest; read into memory on `device`
    (`resident`), or left on disk and read by row at each lookup."""
    directory, device = Path(directory), torch.device(device)
    manifest = read_manifest(directory)
    found, wanted = manifest["key"], asdict(expected)
    diffs = [f"{k}: cache has {found.get(k)!r}, request needs {v!r}" for k, v in wanted.items() if found.get(k) != v]
    if diffs:
        raise CacheMismatchError(f"{directory}: soft-target cache does not match the request; " + "; ".join(diffs))
    _check_files(directory, manifest)
    parts = {n: ByView(_rows(directory, e), expected.num_images, device, resident)
             for n, e in manifest["files"].items()}
    try:
        return SoftTargets(parts["values"], parts.get("indices"), expected.num_classes, parts.get("rest"))
    except CacheMismatchError as e:
        raise CacheMismatchError(f"{directory}: {e}") from None
