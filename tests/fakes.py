"""Tiny data sets written in the real on-disk formats (IDX gzip, CIFAR pickles, image folders).

Images are learnable: each class lights up its own patch, so a model trained for one
epoch beats chance and distillation has something to pass on.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def class_images(n: int, classes: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    h, w = shape[-2], shape[-1]
    for i, label in enumerate(y):
        r, c = divmod(int(label), 4)
        x[i, ..., r * h // 4:(r + 1) * h // 4, c * w // 4:(c + 1) * w // 4] = 200
    return x, y.astype(np.uint8)


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fashion(root: Path, n_train: int = 400, n_test: int = 120) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = class_images(n, 10, (28, 28), seed)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
    return root


def write_cifar(root: Path, classes: int = 10, per_batch: int = 20) -> Path:
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = "labels" if classes == 10 else "fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for i, name in enumerate(names):
        x, y = class_images(per_batch, min(classes, 16), (3, 32, 32), i)
        batch = {"data": x.reshape(per_batch, -1), key: [int(v) for v in y], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta_name, meta_key = ("batches.meta", "label_names") if classes == 10 else ("meta", "fine_label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]}))
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 20) -> Path:
    from PIL import Image

    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        x, _ = class_images(per_class, 1, (size, size, 3), c)
        for i in range(per_class):
            img = x[i].copy()
            img[..., c % 3] = 220  # one colour channel per class
            Image.fromarray(img).save(d / f"{i}.png")
    return root
