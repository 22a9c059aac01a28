"""Prepared splits on disk: uint8 image shards (NumPy .npy, read by row), labels, ids and a manifest.

One layout, whatever the data's size; whether a split is then read into memory or streamed from the shards is
decided when it is opened (`data.storage`, engine/workspace.py), so the choice never changes the bytes a training
sees. The manifest (store.json) is written last and holds each shard's size and SHA-256, the normalisation and the
content fingerprint, so a reader never sees half a store and a truncated, missing or changed shard is named.

    <folder>/store.json
    <folder>/<split>/images-00000.npy ...   uint8 [rows, C, H, W]
    <folder>/<split>/labels.npy             int64 [N]
    <folder>/<split>/ids.npy                int64 [N], when the rows carry ids
    <folder>/<split>/paths.json             when the rows carry paths
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine.atomic import atomic_path, save_json
from engine.config import AugmentConfig
from engine.errors import DataError

STORE_FILE = "store.json"
FORMAT = 1
SHARD_BYTES = 64 << 20  # large enough for sequential reads, small enough to verify and copy one at a time
SPLITS = ("train", "val", "test")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class RowFile:
    """One .npy file of `rows` rows, written in order a block at a time under a temp name and renamed into place when
    all of them are in (engine/atomic.py): how an array larger than memory is written. `entry` (file, rows, bytes,
    SHA-256) is made from the bytes as they were written, for the manifest written after it."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows, self.written, self.headed = Path(path), rows, 0, False
        self.entry: dict = {}
        self._hash, self._stack = hashlib.sha256(), ExitStack()

    def __enter__(self) -> "RowFile":
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        return self

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block)
        if not self.headed:
            self.headed, header = True, io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(block.dtype),
                                                          "fortran_order": False,
                                                          "shape": (self.rows, *block.shape[1:])})
            self._put(header.getvalue())
        self._put(block.tobytes())
        self.written += len(block)

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)

    def __exit__(self, kind, error, trace) -> None:
        if kind is None and (self.written != self.rows or not self.headed):
            kind, error = ValueError, ValueError(f"{self.path}: {self.written} rows written, {self.rows} declared")
        self._stack.__exit__(kind, error, trace)  # on an error, the temp file is removed
        if error is not None:
            raise error
        self.entry = {"file": self.path.name, "rows": self.rows, "bytes": self.path.stat().st_size,
                      "sha256": self._hash.hexdigest()}


def _save_npy(array: np.ndarray, path: Path) -> dict:
    with RowFile(path, len(array)) as f:
        f.write(array)
    return f.entry


def _chunk(x, start: int, stop: int) -> tuple[torch.Tensor, list[str]]:
    """Rows start..stop of images in memory, or decoded from their files (engine.data.Undecoded)."""
    return x.decode(start, stop) if hasattr(x, "decode") else (x[start:stop], [])


def _write_split(part, folder: Path, shard_bytes: int, digest, bad: list[tuple[str, str]]) -> dict:
    """A split's shards, each decoded (when it is files), hashed into `digest` and written in turn: a split is never
    whole in memory here. Unreadable images are added to `bad`, and the split is still walked to the end, so that
    every one is named."""
    folder.mkdir(parents=True, exist_ok=True)
    n, row_shape = len(part.x), tuple(part.x.shape[1:])
    rows = max(1, shard_bytes // max(1, int(np.prod(row_shape))))
    shards = []
    for start in range(0, n, rows):
        x, fails = _chunk(part.x, start, start + rows)
        bad += [(getattr(part.x, "where", str(folder)), f) for f in fails]
        if not bad:
            digest.update(x.numpy().tobytes())
            shards.append(_save_npy(np.ascontiguousarray(x.numpy()), folder / f"images-{len(shards):05d}.npy"))
    digest.update(part.y.numpy().tobytes())
    files = {"labels": _save_npy(part.y.numpy().astype(np.int64), folder / "labels.npy")}
    if part.ids is not None:
        files["ids"] = _save_npy(part.ids.numpy().astype(np.int64), folder / "ids.npy")
    if part.paths is not None:
        save_json(part.paths, folder / "paths.json")
        files["paths"] = {"file": "paths.json", "bytes": (folder / "paths.json").stat().st_size,
                          "sha256": _sha256(folder / "paths.json")}
    return {"rows": n, "shape": list(row_shape), "shards": shards, "files": files}


def write_store(splits, folder: Path, shard_bytes: int | None = None) -> dict:
    """Write `splits` (engine.data.Splits: images in memory, or files decoded here a shard at a time) into `folder`;
    the manifest last. Its fingerprint equals `splits.fingerprint()` of the same splits in memory. Returns it."""
    from engine.data import channel_stats, unreadable

    digest, bad = hashlib.sha256(splits.header()), []
    entries = {s: _write_split(getattr(splits, s), folder / s, shard_bytes or SHARD_BYTES, digest, bad)
               for s in SPLITS}
    if bad:
        raise unreadable(bad[0][0], [b for _, b in bad])
    if splits.norm is not None:
        mean, std = list(splits.norm[0]), list(splits.norm[1])
    else:  # the train split's statistics, read back from its shards
        mean, std = channel_stats(_images(folder / "train", entries["train"]))
    manifest = {"format": FORMAT, "name": splits.name, "classes": splits.classes,
                "augment": splits.augment.model_dump(), "configured_norm": splits.norm is not None,
                "mean": mean, "std": std, "fingerprint": digest.hexdigest()[:16], "splits": entries,
                **({"modalities": splits.modalities} if splits.modalities else {})}
    save_json(manifest, folder / STORE_FILE)
    return manifest


class ShardedRows:
    """An array's rows read from its .npy shards: `x[index]` gives a CPU tensor of those rows, never the whole array
    (a prepared split's uint8 images, a soft-target cache's fp16 logits). Rows are read with pread, so they pass
    through the page cache and not into this process's resident memory, as a memory map's pages would; a run of
    consecutive rows is one read. Pickles as its file list, so a DataLoader worker opens its own files. `fix` says
    how to remake a faulty file."""

    def __init__(self, files: list[Path], rows: list[int], shape: tuple[int, ...], dtype=np.uint8,
                 fix: str = "rerun the prepare-data stage"):
        self.files, self.rows, self.row_shape, self.dtype, self.fix = files, rows, tuple(shape), np.dtype(dtype), fix
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.starts = np.cumsum([0, *rows])
        self._open_files: list[tuple[int, int]] | None = None  # (fd, offset of row 0) per shard

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open_files": None}

    def __del__(self):
        for fd, _ in self._open_files or []:
            os.close(fd)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.starts[-1]), *self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self) -> list[tuple[int, int]]:
        if self._open_files is None:
            opened = []
            for path, n in zip(self.files, self.rows):
                offset = _npy_offset(path, (n, *self.row_shape), self.dtype, self.fix)
                opened.append((os.open(path, os.O_RDONLY), offset))
            self._open_files = opened
        return self._open_files

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"rows {index.min()}..{index.max()} outside 0..{len(self) - 1} of {self.files[0].parent}")
        out = np.empty((len(index), *self.row_shape), self.dtype)
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        shard = np.searchsorted(self.starts, index, side="right") - 1
        breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(shard) != 0)) + 1
        lows, highs = np.r_[0, breaks], np.r_[breaks, len(index)]
        at = index[lows] - self.starts[shard[lows]]
        opened, rb = self._open(), self.row_bytes
        for lo, hi, s, row in zip(lows.tolist(), highs.tolist(), shard[lows].tolist(), at.tolist()):
            fd, offset = opened[s]  # read straight into the output: no copy, no temporary per row
            if os.preadv(fd, [buffer[lo * rb:hi * rb]], offset + row * rb) != (hi - lo) * rb:
                raise DataError(f"{self.files[s]}: truncated: fewer than {(hi - lo) * rb} bytes at row {row}; "
                                f"{self.fix}")
        return torch.from_numpy(out)


def _npy_offset(path: Path, shape: tuple, dtype, fix: str = "rerun the prepare-data stage") -> int:
    """Where a .npy file's data begins, once its header says the shape and type the manifest recorded and its size
    holds them."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            found, fortran, kind = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found; {fix}") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a NumPy array file ({e}); {fix}") from None
    if tuple(found) != tuple(shape) or kind != np.dtype(dtype) or fortran:
        raise DataError(f"{path}: holds {kind} {tuple(found)}; the manifest says {np.dtype(dtype)} {tuple(shape)}")
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if path.stat().st_size < need:
        raise DataError(f"{path}: truncated: {path.stat().st_size} bytes, its header needs {need}; {fix}")
    return offset


def _load_npy(path: Path, shape: tuple, dtype) -> np.ndarray:
    offset = _npy_offset(path, shape, dtype)
    with open(path, "rb") as f:
        f.seek(offset)
        return np.fromfile(f, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def read_manifest(folder: Path) -> dict:
    path = folder / STORE_FILE
    if not path.exists():
        raise DataError(f"{path}: prepared data set not found; run the prepare-data stage first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: store format {manifest.get('format')!r}; this code reads format {FORMAT}: "
                        "rerun the prepare-data stage")
    return manifest


def verify(folder: Path, manifest: dict, split: str) -> None:
    """Every file of a split has the size and SHA-256 the manifest recorded: a truncated, missing or changed file is
    named, before a training reads a row of it. One sequential read of the split, no more memory than a block."""
    entry = manifest["splits"][split]
    for item in [*entry["shards"], *entry["files"].values()]:
        path = folder / split / item["file"]
        if not path.exists():
            raise DataError(f"{path}: missing from the prepared store; rerun the prepare-data stage")
        if path.stat().st_size != item["bytes"]:
            raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says {item['bytes']} (truncated or "
                            "changed); rerun the prepare-data stage")
        if _sha256(path) != item["sha256"]:
            raise DataError(f"{path}: content differs from the manifest's SHA-256 (changed after prepare-data); "
                            "rerun the prepare-data stage")


def _images(where: Path, entry: dict) -> ShardedRows:
    """A split's images as its manifest entry lists them."""
    return ShardedRows([where / s["file"] for s in entry["shards"]], [s["rows"] for s in entry["shards"]],
                         entry["shape"])


def open_split(folder: Path, manifest: dict, split: str):
    """A split as an engine.data.ImageSet whose images stay on disk (ShardedRows); labels and ids in memory."""
    from engine.data import ImageSet

    entry, where = manifest["splits"][split], folder / split
    n = entry["rows"]
    images = _images(where, entry)
    y = torch.from_numpy(_load_npy(where / "labels.npy", (n,), np.int64))
    ids = (torch.from_numpy(_load_npy(where / "ids.npy", (n,), np.int64))
           if "ids" in entry["files"] else None)
    paths = json.loads((where / "paths.json").read_text()) if "paths" in entry["files"] else None
    return ImageSet(images, y, ids, paths)


def in_memory(rows: ShardedRows) -> torch.Tensor:
    """The whole array as one tensor, read shard by shard into it (no second copy)."""
    out = np.empty(rows.shape, rows.dtype)
    flat = out.reshape(len(rows), -1)
    for n, (path, (_, offset)) in enumerate(zip(rows.files, rows._open())):
        with open(path, "rb") as f:
            f.seek(offset)
            part = flat[rows.starts[n]:rows.starts[n + 1]]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise DataError(f"{path}: truncated while being read; {rows.fix}")
    return torch.from_numpy(out)


def split_bytes(manifest: dict, split: str) -> int:
    return sum(s["bytes"] for s in manifest["splits"][split]["shards"])


def augment_of(manifest: dict) -> AugmentConfig:
    return AugmentConfig(**manifest["augment"])
