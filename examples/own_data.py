"""The worked example of docs/own-data.md: your own images and teacher in, a deployable student out.

    python examples/own_data.py make-folder   --out data/own/images          # 1. an image folder of PNGs
    python examples/own_data.py train-teacher --folder data/own/images \\
                                              --out data/own/teacher.pt2      # 2. a teacher trained elsewhere
    python examples/own_data.py teacher-predictions --folder data/own/images --teacher data/own/teacher.pt2 \
                                              --out data/own/teacher_predictions.npz  # 2b. only its answers
    (3. the pipeline distils it with TAKD; 4. `takd predict` uses the exported student: see the docs)

Step 1 writes Fashion-MNIST (Debian's files, offline) as PNGs, one folder per class, with
train/ and test/. Step 2 trains a teacher with nothing of this project but a model
definition: torchvision's ImageFolder, a DataLoader and a plain loop; it saves a torch.export program (`.pt2`),
which the pipeline imports without your model's code.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch import nn

MEAN, STD = 0.5, 0.5  # the teacher's own normalisation: tell the pipeline (data.mean, data.std)


def make_folder(out: Path, per_class: int, test_per_class: int, source_dir: str) -> dict:
    from PIL import Image

    from engine.config import DataConfig
    from engine.data import FASHION_CLASSES, load_fashion_mnist

    train, test = load_fashion_mnist(DataConfig(source_dir=source_dir, root=str(out.parent / "raw")))
    counts = {}
    for split, part, n in (("train", train, per_class), ("test", test, test_per_class)):
        for c, name in enumerate(FASHION_CLASSES):
            folder = out / split / re.sub(r"[^\w-]+", "_", name)  # 'T-shirt/top' is not a folder name
            folder.mkdir(parents=True, exist_ok=True)
            idx = (part.y == c).nonzero().flatten()[:n]
            for i in idx.tolist():
                Image.fromarray(part.x[i, 0].numpy()).save(folder / f"{i}.png")
            counts[f"{split}/{folder.name}"] = len(idx)
    return {"folder": str(out), "images": sum(counts.values())}


def small_cnn(classes: int) -> nn.Module:
    """The user's own architecture: nothing the pipeline has registered."""
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, classes))


def train_teacher(folder: Path, out: Path, epochs: int, seed: int) -> dict:
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize([MEAN], [STD])])
    train = datasets.ImageFolder(str(folder / "train"), tf)
    test = datasets.ImageFolder(str(folder / "test"), tf)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    model = small_cnn(len(train.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in torch.utils.data.DataLoader(test, 512))
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch")  # any number of images per call, as the pipeline will pass them
    program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))
    return {"teacher": str(out), "classes": train.classes, "test_acc": correct / len(test),
            "seconds": round(time.time() - t0, 1)}


def teacher_predictions(folder: Path, teacher: Path, out: Path) -> dict:
    """What a teacher behind a service gives back: class probabilities for each training image, stored with
    the image's path (relative to the folder, as the pipeline lists it). Nothing else of the teacher is kept."""
    import numpy as np
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize([MEAN], [STD])])
    train = datasets.ImageFolder(str(folder / "train"), tf)
    model = torch.export.load(str(teacher)).module()  # your own file: torch.export.load runs what it holds
    with torch.no_grad():
        probs = torch.cat([model(x).softmax(1) for x, _ in torch.utils.data.DataLoader(train, 512)])
    paths = np.array([Path(p).relative_to(folder).as_posix() for p, _ in train.samples])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, probabilities=probs.numpy(), path=paths)
    return {"predictions": str(out), "images": len(paths), "classes": len(train.classes)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-folder")
    p.add_argument("--out", type=Path, default=Path("data/own/images"))
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--source-dir", default="/usr/share/datasets/fashion-mnist")
    p = sub.add_parser("train-teacher")
    p.add_argument("--folder", type=Path, default=Path("data/own/images"))
    p.add_argument("--out", type=Path, default=Path("data/own/teacher.pt2"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("teacher-predictions")
    p.add_argument("--folder", type=Path, default=Path("data/own/images"))
    p.add_argument("--teacher", type=Path, default=Path("data/own/teacher.pt2"))
    p.add_argument("--out", type=Path, default=Path("data/own/teacher_predictions.npz"))
    args = parser.parse_args(argv)
    if args.command == "make-folder":
        result = make_folder(args.out, args.per_class, args.test_per_class, args.source_dir)
    elif args.command == "teacher-predictions":
        result = teacher_predictions(args.folder, args.teacher, args.out)
    else:
        result = train_teacher(args.folder, args.out, args.epochs, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
