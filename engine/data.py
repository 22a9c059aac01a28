"""Data sets by name, held in memory as uint8 tensors, with a seeded validation split.

fashion-mnist  Debian's IDX files (dataset-fashion-mnist) or torchvision's download
cifar10/100    torchvision's download and file layout, read with a restricted unpickler
imagefolder:P  one folder per class (P/train and P/test when present)
csv:F          a CSV with columns path,label (and optionally split = train | test); paths relative to F. Paired
               inputs: a path.<modality> column per modality instead of path (path.rgb, path.depth), each image
               resized alike and stored side by side along the channels (models/views.py reads one back)
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.views import DERIVED, MODALITY_RE, is_derived

from engine.config import AugmentConfig, DataConfig
from engine.errors import DataError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NAMED_SETS = ("fashion-mnist", "cifar10", "cifar100")  # fetched into data.root; anything else is the user's own
DEFAULT_AUGMENT = {"fashion-mnist": AugmentConfig(crop_padding=2, flip=True),
                   "cifar10": AugmentConfig(crop_padding=4, flip=True),
                   "cifar100": AugmentConfig(crop_padding=4, flip=True)}


@dataclass
class ImageSet:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]
    # Which image each row is, for files keyed by image (a teacher's predictions): its position in the listing
    # the loader read (the train files' order; image folders sorted by class, then path; CSV rows), and for image
    # folders and CSVs its path (relative to the folder, or as the CSV writes it).
    ids: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        ids = None if self.ids is None else self.ids[index]
        paths = None if self.paths is None else [self.paths[i] for i in index.tolist()]
        return ImageSet(self.x[index], self.y[index], ids, paths)

    def listed(self) -> "ImageSet":
        """Each row numbered by its position, as the loader listed it."""
        return ImageSet(self.x, self.y, torch.arange(len(self.y)), self.paths)


@dataclass
class Splits:
    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    augment: AugmentConfig
    norm: tuple[list[float], list[float]] | None = None  # configured mean and std; None: the train split's
    recorded: str | None = None  # the fingerprint a stored copy's manifest holds
    modalities: list[str] | None = None  # a paired CSV's inputs, side by side along the channels (models/views.py)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """The configured normalisation, or per-channel statistics of the train split only (never val or test)."""
        if self.norm is not None:
            return list(self.norm[0]), list(self.norm[1])
        return channel_stats(self.train.x)

    def fingerprint(self) -> str:
        if self.recorded:
            return self.recorded
        h = hashlib.sha256(self.header())
        for part in (self.train, self.val, self.test):
            h.update(part.x.numpy().tobytes())
            h.update(part.y.numpy().tobytes())
        return h.hexdigest()[:16]

    def header(self) -> bytes:
        """What the fingerprint hashes before the pixels: the name, the classes and any modalities."""
        return "\n".join([self.name, *self.classes, *(["modalities:", *self.modalities] if self.modalities else [])]).encode()

    def write(self, folder: Path) -> dict:
        """Store the splits in `folder` as engine/store.py lays them out (decoding image files a shard at a time);
        returns the manifest."""
        from engine.store import write_store

        return write_store(self, folder)

    @classmethod
    def read(cls, folder: Path) -> "Splits":
        """The splits a `write` stored, images left on disk; normalisation and fingerprint as recorded."""
        from engine.store import augment_of, open_split, read_manifest

        m = read_manifest(folder)
        parts = {s: open_split(folder, m, s) for s in ("train", "val", "test")}
        return cls(m["name"], list(m["classes"]), augment=augment_of(m), norm=(m["mean"], m["std"]),
                   recorded=m["fingerprint"], modalities=m.get("modalities"), **parts)


def channel_stats(x, rows: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images [N, C, H, W] in [0, 1] (a tensor, or anything sliced
    into one, such as a stored split), in float64 and two passes over chunks: never a float copy of the split."""
    c, per_channel = x.shape[1], x.shape[0] * x.shape[2] * x.shape[3]
    chunks = range(0, len(x), rows)
    mean = sum(x[i:i + rows].double().sum(dim=(0, 2, 3)) for i in chunks) / 255 / per_channel
    squares = sum(((x[i:i + rows].double() / 255 - mean.view(1, c, 1, 1)) ** 2).sum(dim=(0, 2, 3)) for i in chunks)
    std = (squares / max(1, per_channel - 1)).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


# ---------------------------------------------------------------- IDX (Fashion-MNIST)

def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of uint8 with `ndim` dimensions; every fault is named with the file."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: {len(raw)} bytes is shorter than the {header}-byte header")
    if raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: wrong magic number 0x{raw[:4].hex()}; expected 0x000008{ndim:02x} (uint8, {ndim}-d)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: truncated or padded: {len(raw)} bytes, its header {dims} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fashion_dir(cfg: DataConfig) -> Path:
    """Where Fashion-MNIST is read from: the project's own copy in data.root, which `fetch` makes from
    Debian's files in data.source_dir or downloads. One path on every machine, so dvc.yaml can list it."""
    return Path(cfg.root) / "FashionMNIST" / "raw"


def _find_idx(stem: str, folder: Path) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder / stem}: file not found (.gz or unpacked); run `python -m tasks fetch-data`")


def _mirror(source: Path, dest: Path, names: list[str]) -> None:
    """Copy the files whose size or mtime differ, each written whole before it replaces the old one."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = source / name, dest / name
        if dst.exists() and (dst.stat().st_size, dst.stat().st_mtime_ns) == (src.stat().st_size, src.stat().st_mtime_ns):
            continue
        tmp = dst.with_name(f".{name}.tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def fetch(cfg: DataConfig) -> None:
    """Make a named data set's files exist in data.root: Fashion-MNIST copied from data.source_dir (Debian's
    package) when it is there, else downloaded with torchvision, as CIFAR is. A user's own data is left alone."""
    if cfg.name == "fashion-mnist":
        names = [stem + ".gz" for split in FASHION_FILES.values() for stem in split]
        present = [n for n in names if (Path(cfg.source_dir) / n).exists()]
        if present:  # one missing is then named by the loader, rather than fetched from elsewhere
            _mirror(Path(cfg.source_dir), fashion_dir(cfg), present)
            for gone in set(names) - set(present):
                (fashion_dir(cfg) / gone).unlink(missing_ok=True)
        elif not all((fashion_dir(cfg) / n).exists() for n in names):
            import torchvision

            torchvision.datasets.FashionMNIST(cfg.root, train=True, download=True)
    elif cfg.name in ("cifar10", "cifar100") and not cifar_dir(cfg).exists():
        _cifar(cfg)(cfg.root, train=True, download=True)


def load_fashion_mnist(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    fetch(cfg)
    folder = fashion_dir(cfg)
    sets = []
    for split in ("train", "test"):
        images, labels = (_find_idx(stem, folder) for stem in FASHION_FILES[split])
        x, y = read_idx(images, 3), read_idx(labels, 1)
        if len(x) != len(y):
            raise DataError(f"{labels}: {len(y)} labels for {len(x)} images in {images}")
        sets.append(ImageSet(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))))
    return sets[0], sets[1]


# ---------------------------------------------------------------- CIFAR

class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; only numpy arrays and plain containers may load."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not plain CIFAR data")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        d = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as e:
        raise DataError(f"{path}: not a valid CIFAR pickle ({e})") from None
    if not isinstance(d, dict) or "data" not in d or label_key not in d:
        raise DataError(f"{path}: CIFAR batch must be a dict with 'data' and {label_key!r}")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072] matching {len(labels)} labels, got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(cfg: DataConfig):
    import torchvision

    return torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100


def cifar_dir(cfg: DataConfig) -> Path:
    return Path(cfg.root) / _cifar(cfg).base_folder


def load_cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str]]:
    fetch(cfg)
    tv, folder = _cifar(cfg), cifar_dir(cfg)
    label_key = "labels" if cfg.name == "cifar10" else "fine_labels"
    sets = []
    for files in (tv.train_list, tv.test_list):
        parts = [_read_cifar_batch(folder / name, label_key) for name, _md5 in files]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        sets.append(ImageSet(torch.from_numpy(x), torch.from_numpy(y)))
    meta_path = folder / tv.meta["filename"]
    try:
        meta = _CifarUnpickler(io.BytesIO(meta_path.read_bytes()), encoding="latin1").load()
        classes = [str(c) for c in meta[tv.meta["key"]]]
    except FileNotFoundError:
        raise DataError(f"{meta_path}: file not found") from None
    except Exception as e:
        raise DataError(f"{meta_path}: not a valid CIFAR meta pickle ({e})") from None
    return sets[0], sets[1], classes


# ---------------------------------------------------------------- image folders

class Undecoded:
    """A split's image files, listed but not decoded: `x[index]` selects rows as a tensor does, and
    `decode(start, stop)` converts and resizes a run of them. The store decodes a split chunk by chunk as it writes
    it, so preparing a folder of images never holds more than a chunk of pixels. A row is one file per modality
    (one, except for a paired CSV), stored side by side along the channels."""

    def __init__(self, files: list[tuple[Path, ...]], size: int, channels: int, where: str, modalities: int = 1):
        self.files, self.size, self.channels, self.where, self.modalities = files, size, channels, where, modalities

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), self.channels * self.modalities, self.size, self.size)

    def __getitem__(self, index: torch.Tensor) -> "Undecoded":
        return Undecoded([self.files[i] for i in index.tolist()], self.size, self.channels, self.where,
                         self.modalities)

    def decode(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """uint8 [n, C, H, W] for rows start..stop, and each file that could not be read (path and why); the
        channels of unreadable files are left zero."""
        from PIL import Image

        rows, c = self.files[start:stop], self.channels
        out, bad = np.zeros((len(rows), self.size, self.size, c * self.modalities), np.uint8), []
        for i, row in enumerate(rows):
            for j, p in enumerate(row):
                try:
                    with Image.open(p) as im:
                        im = im.convert("L" if c == 1 else "RGB").resize((self.size, self.size))
                        out[i, ..., j * c:(j + 1) * c] = np.asarray(im, dtype=np.uint8).reshape(self.size, self.size, c)
                except Exception as e:
                    bad.append(f"{p} ({type(e).__name__})")
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), bad


def unreadable(where: str, bad: list[str]) -> DataError:
    """One error naming every unreadable image (the first ten, by path)."""
    bad = sorted(bad)
    return DataError(f"{where}: {len(bad)} unreadable image(s): " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))


def _decoded(parts: list[ImageSet]) -> list[ImageSet]:
    """The splits with their images in memory; every unreadable image of every split is reported with its path."""
    found = [p.x.decode() if isinstance(p.x, Undecoded) else (p.x, []) for p in parts]
    bad = [(p.x.where, b) for p, (_, fails) in zip(parts, found) for b in fails]
    if bad:
        raise unreadable(bad[0][0], [b for _, b in bad])
    return [ImageSet(x, p.y, p.ids, p.paths) for p, (x, _) in zip(parts, found)]


def _read_images(items: list[tuple[tuple[Path, ...], int]], cfg: DataConfig, where: str, base: Path) -> ImageSet:
    """The listed images (a file per modality each), to be decoded, converted and resized to data.image_size and
    data.channels. A row's path, for files keyed by image, is its first modality's."""
    x = Undecoded([p for p, _ in items], cfg.image_size, cfg.channels, where, len(items[0][0]) if items else 1)
    paths = [Path(os.path.relpath(p[0], base)).as_posix() for p, _ in items]
    return ImageSet(x, torch.tensor([label for _, label in items], dtype=torch.long), paths=paths)


def _read_folder(root: Path, classes: list[str], cfg: DataConfig, base: Path) -> ImageSet:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    items = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DataError(f"{root / cls}: class folder has no images ({', '.join(IMG_EXTENSIONS)})")
        items += [((p,), label) for p in files]
    return _read_images(items, cfg, str(root), base)


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(cfg: DataConfig) -> tuple[ImageSet, ImageSet | None, list[str]]:
    root = Path(cfg.name.split(":", 1)[1])
    split = (root / "train").is_dir() and (root / "test").is_dir()
    classes = _class_folders(root / "train" if split else root)
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s); need at least 2")
    if split:
        if _class_folders(root / "test") != classes:
            raise DataError(f"{root / 'test'}: class folders differ from {root / 'train'}")
        return (_read_folder(root / "train", classes, cfg, root), _read_folder(root / "test", classes, cfg, root),
                classes)
    return _read_folder(root, classes, cfg, root), None, classes


# ---------------------------------------------------------------- CSV of path,label

def _class_order(labels: list[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), names alphabetically, as torchvision's ImageFolder."""
    if all(v.lstrip("-").isdigit() for v in labels):
        return sorted(set(labels), key=int)
    return sorted(set(labels))


def load_csv(cfg: DataConfig) -> tuple[ImageSet, ImageSet | None, list[str]]:
    path = _csv_path(cfg)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    columns = list(rows[0]) if rows else []
    files = path_columns(columns, path)
    for i, r in enumerate(rows, start=2):
        if not all((r[c] or "").strip() for c in files) or not (r["label"] or "").strip():
            raise DataError(f"{path}: line {i}: empty {' or '.join(files)} or label")
        if "split" in r and (r["split"] or "train").strip() not in ("train", "test"):
            raise DataError(f"{path}: line {i}: split must be train or test (got {r['split']!r})")
    classes = _class_order([r["label"].strip() for r in rows])
    index = {c: i for i, c in enumerate(classes)}

    def items(split: str | None) -> list[tuple[Path, int]]:
        chosen = [r for r in rows if split is None or (r.get("split") or "train").strip() == split]
        return [(tuple(path.parent / r[c].strip() for c in files), index[r["label"].strip()]) for r in chosen]

    if "split" in columns and any((r.get("split") or "").strip() == "test" for r in rows):
        return (_read_images(items("train"), cfg, f"{path} (train rows)", path.parent),
                _read_images(items("test"), cfg, f"{path} (test rows)", path.parent), classes)
    return _read_images(items(None), cfg, str(path), path.parent), None, classes


def path_columns(columns: list[str], path: Path) -> list[str]:
    """The CSV's image columns: path, or a path.<modality> column per modality of paired inputs."""
    paired = [] if "path" in columns else [c for c in columns if c.startswith("path.")]
    if "label" not in columns or not ("path" in columns or paired):
        raise DataError(f"{path}: needs a header with columns path,label, or path.<modality> columns (one per input "
                        f"of a pair) and label (found {columns or 'none'})")
    bad = [c for c in paired if not MODALITY_RE.fullmatch(c[5:]) or is_derived(c[5:])]
    if bad:
        raise DataError(f"{path}: column {bad[0]!r}: a modality is named by letters, digits, _ or - and not after "
                        f"a derived view ({', '.join(DERIVED)})")
    return paired or ["path"]


def csv_modalities(cfg: DataConfig) -> list[str] | None:
    """A paired CSV's modalities in column order; None for one path column."""
    path = _csv_path(cfg)
    with path.open(newline="") as f:
        files = path_columns(csv.DictReader(f).fieldnames or [], path)
    return None if files == ["path"] else [c[5:] for c in files]


def _csv_path(cfg: DataConfig) -> Path:
    return Path(cfg.name.split(":", 1)[1])


def csv_sources(path: Path) -> list[Path]:
    """The CSV and the deepest folder holding every image it lists, so that a changed image is a changed input."""
    try:
        with path.open(newline="") as f:
            rows = [(v or "").strip() for r in csv.DictReader(f) for k, v in r.items()
                    if k is not None and (k == "path" or k.startswith("path.")) and isinstance(v, str)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return [path]  # the loader names what is wrong
    images = [os.path.abspath(path.parent / r) for r in rows if r]
    return [path, Path(os.path.commonpath([os.path.dirname(p) for p in images]))] if images else [path]


def fetched(cfg: DataConfig) -> list[Path]:
    """The folders `fetch` makes: a named data set's; none for a user's own data."""
    return sources(cfg) if cfg.name in NAMED_SETS else []


def sources(cfg: DataConfig) -> list[Path]:
    """Every file or folder `load_splits` reads: a stage's key hashes their content, and dvc.yaml
    lists them as the prepare-data stage's deps."""
    if cfg.name == "fashion-mnist":
        return [fashion_dir(cfg)]
    if cfg.name in ("cifar10", "cifar100"):
        return [cifar_dir(cfg)]
    if cfg.name.startswith("csv:"):
        return csv_sources(_csv_path(cfg))
    return [Path(cfg.name.split(":", 1)[1])]


# ---------------------------------------------------------------- splits

def _check(part: ImageSet, num_classes: int, what: str) -> None:
    if len(part) == 0:
        raise DataError(f"{what}: the data set is empty")
    bad = (part.y < 0) | (part.y >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DataError(f"{what}: label {int(part.y[i])} at index {i} is out of range 0..{num_classes - 1}")


def _shuffled(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def load_splits(cfg: DataConfig, decode: bool = True) -> Splits:
    """Load a data set by name and carve the seeded validation split from its train split. `decode=False` leaves
    the images of a folder or CSV undecoded (Undecoded), for the store to decode chunk by chunk."""
    modalities = None
    if cfg.name == "fashion-mnist":
        (train, test), classes = load_fashion_mnist(cfg), FASHION_CLASSES
    elif cfg.name in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(cfg)
    else:
        train, test, classes = (load_csv if cfg.name.startswith("csv:") else load_image_folder)(cfg)
        modalities = csv_modalities(cfg) if cfg.name.startswith("csv:") else None
    train = train.listed()
    if test is None:  # one folder only: carve a seeded test split too
        order = _shuffled(len(train), cfg.split_seed + 1)
        n_test = max(1, round(len(train) * 0.2))
        train, test = train.subset(order[n_test:]), train.subset(order[:n_test])
    if len(classes) < 2:
        raise DataError(f"{cfg.name}: {len(classes)} class(es); need at least 2")
    _check(train, len(classes), f"{cfg.name} train split")
    _check(test, len(classes), f"{cfg.name} test split")
    order = _shuffled(len(train), cfg.split_seed)
    if cfg.train_subset:
        order = order[: cfg.train_subset]
    n_val = max(1, round(len(order) * cfg.val_fraction))
    if cfg.test_subset:
        test = test.subset(_shuffled(len(test), cfg.split_seed + 2)[: cfg.test_subset])
    augment = cfg.augment or DEFAULT_AUGMENT.get(cfg.name, AugmentConfig(crop_padding=4, flip=True))
    channels = train.x.shape[1]
    if cfg.mean is not None and len(cfg.mean) != channels:
        raise DataError(f"data.mean has {len(cfg.mean)} values; {cfg.name} has {channels} channel(s)")
    norm = None if cfg.mean is None else (list(cfg.mean), list(cfg.std))
    parts = [train.subset(order[n_val:]), train.subset(order[:n_val]), test]
    if decode:
        parts = _decoded(parts)
    return Splits(cfg.name.split(":")[0], list(classes), *parts, augment, norm, modalities=modalities)
