"""A teacher known only by its answers: a file of its logits or probabilities, one row per training image.

Formats (by suffix):
- `.npy`: a [N, C] array; row i is image i of the training listing (see engine.data.ImageSet.ids).
- `.npz`: an array `logits` or `probabilities` [N, C], and optionally `index` [N] (ints) or `path` [N]
  (strings: the image's path as the data set lists it); without either, row i is image i. Read without
  pickle: an object array is refused.
- `.csv`: a header `index` or `path`, then one column per class, in class order; for small sets.

Probabilities become logits as T0 * log p, T0 being the temperature they were made at (1 for a plain
softmax). That is exact: softmax(z / T) is shift-invariant per row, and log p = z / T0 - logsumexp(z / T0),
so softmax(T0 * log p / T) = softmax(z / T) at every distillation temperature T. What a file of
probabilities cannot give back is what rounding erased: a probability stored as 0 is read as PROB_FLOOR.
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from engine.data import ImageSet
from engine.errors import DataError

PROB_FLOOR = 1e-12
SUM_TOLERANCE = 1e-3  # rows of probabilities must sum to 1 within this (float16 files round to about 1e-3)
SHOWN = 5  # keys named in an error


def fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _npz(path: Path) -> tuple[np.ndarray, str | None, np.ndarray | None, str | None]:
    with np.load(path, allow_pickle=False) as f:
        names = set(f.files)
        kinds = [k for k in ("logits", "probabilities") if k in names]
        if len(kinds) != 1:
            raise DataError(f"{path}: needs exactly one array named 'logits' or 'probabilities' (found "
                            f"{sorted(names) or 'none'})")
        keys = [k for k in ("index", "path") if k in names]
        if len(keys) > 1:
            raise DataError(f"{path}: has both 'index' and 'path'; key the rows by one")
        return f[kinds[0]], kinds[0], (f[keys[0]] if keys else None), (keys[0] if keys else None)


def _csv(path: Path) -> tuple[np.ndarray, None, np.ndarray, str]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][0] not in ("index", "path") or len(rows[0]) < 3:
        raise DataError(f"{path}: needs a header 'index' or 'path', then one column per class")
    key = rows[0][0]
    try:
        values = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: a value is not a number ({e})") from None
    if any(len(r) != len(rows[0]) for r in rows[1:]):
        line = next(i for i, r in enumerate(rows[1:], start=2) if len(r) != len(rows[0]))
        raise DataError(f"{path}: line {line} has another number of columns than the header ({len(rows[0])})")
    return values.reshape(len(rows) - 1, len(rows[0]) - 1), None, np.array([r[0] for r in rows[1:]]), key


def _read(path: Path) -> tuple[np.ndarray, str | None, np.ndarray | None, str | None]:
    """(values [M, C], the kind its array name says, the keys, 'index' or 'path')."""
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None, None, None
        if path.suffix == ".npz":
            return _npz(path)
        if path.suffix == ".csv":
            return _csv(path)
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable predictions file ({e})") from None
    raise DataError(f"{path}: predictions must be .npy, .npz or .csv (got {path.suffix or 'no suffix'})")


def _rows_for(path: Path, keys: np.ndarray | None, key: str | None, count: int, part: ImageSet) -> np.ndarray:
    """The file's row for each image of `part`, in its order."""
    if key == "path":
        if part.paths is None:
            raise DataError(f"{path}: keyed by path, but this data set's images have no paths (a named data set); "
                            "key them by index")
        wanted, found = part.paths, [Path(str(k)).as_posix() for k in keys]
    else:
        wanted = [int(i) for i in part.ids.tolist()]
        try:
            found = list(range(count)) if keys is None else [int(k) for k in keys]
        except ValueError:
            raise DataError(f"{path}: 'index' holds a value that is not an integer") from None
    position = {k: r for r, k in enumerate(found)}
    if len(position) != len(found):
        dup = next(k for k, n in Counter(found).items() if n > 1)
        raise DataError(f"{path}: image {dup!r} has more than one row")
    missing = [k for k in wanted if k not in position]
    if missing:
        raise DataError(f"{path}: no prediction for {len(missing)} of the {len(wanted)} training images "
                        f"(by {key or 'index'}), e.g. {', '.join(map(repr, missing[:SHOWN]))}")
    return np.array([position[k] for k in wanted], dtype=np.int64)


def _as_logits(path: Path, values: np.ndarray, kind: str, temperature: float) -> np.ndarray:
    if kind == "logits":
        return values
    sums = values.sum(1)
    bad = np.flatnonzero((values < 0).any(1) | (np.abs(sums - 1) > SUM_TOLERANCE))
    if len(bad):
        raise DataError(f"{path}: read as probabilities, but row {bad[0]} has negative values or sums to "
                        f"{sums[bad[0]]:.4g} (not 1 within {SUM_TOLERANCE}); {len(bad)} row(s) like it. If these "
                        "are logits, set teacher.predictions_kind: logits")
    return temperature * np.log(np.maximum(values, PROB_FLOOR))


def looks_like_probabilities(values: np.ndarray) -> bool:
    return bool(values.min() >= 0 and values.max() <= 1 and np.allclose(values.sum(1), 1, atol=SUM_TOLERANCE))


def read(path: str | Path, parts: dict[str, ImageSet], num_classes: int, kind: str = "auto",
         temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], dict]:
    """Logits [N, C] (float32) for each named part ('train', and 'val' when the file covers it), in the part's
    order; and what was read. Every fault is one DataError naming the file."""
    path = Path(path)
    values, named, keys, key = _read(path)
    if values.ndim != 2:
        raise DataError(f"{path}: predictions must be 2-D [images, classes], got shape {tuple(values.shape)}")
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{path}: predictions must be numbers, got {values.dtype}")
    if values.shape[1] != num_classes:
        raise DataError(f"{path}: {values.shape[1]} values per image, but the data set has {num_classes} classes")
    if keys is not None and len(keys) != len(values):
        raise DataError(f"{path}: {len(keys)} keys for {len(values)} rows")
    values = values.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values).all(1))
    if len(bad):
        where = int(bad[0]) if keys is None else keys[bad[0]].item()
        raise DataError(f"{path}: {len(bad)} row(s) hold NaN or infinite values, the first for image {where!r}")
    if kind == "auto":
        kind = named or ("probabilities" if looks_like_probabilities(values) else "logits")
    logits = _as_logits(path, values, kind, temperature)
    out = {}
    for name, part in parts.items():
        try:
            rows = _rows_for(path, keys, key, len(values), part)
        except DataError:
            if name == "train":
                raise
            continue  # validation images are optional: they only measure the teacher
        out[name] = torch.from_numpy(logits[rows]).float()
    info = {"file": str(path), "kind": kind, "key": key or "index", "rows": len(values), "temperature": temperature,
            "fingerprint": fingerprint(path)}
    return out, info
