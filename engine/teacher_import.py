"""A user's own teacher: a state_dict for any registered model (torchvision's `tv:<name>`
included), or a TorchScript file. Loading never runs pickled Python code: state_dicts load
weights-only (engine.atomic.load_torch) and TorchScript archives through torch.jit.load.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from engine.errors import CheckpointError

TORCHSCRIPT = "torchscript"


def checkpoint_format(path: str | Path) -> str:
    """'torchscript' for a TorchScript archive, 'state_dict' for anything else torch.load reads."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist()):
                return TORCHSCRIPT
    return "state_dict"


def load_torchscript(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable TorchScript file ({first})") from None
    model.arch = TORCHSCRIPT
    return model


@torch.no_grad()
def check_fits(model: nn.Module, input_shape: tuple[int, int, int], classes: list[str], source: str) -> None:
    """One forward pass on a blank batch: a teacher that cannot take the data set's images, or
    predicts another number of classes, is refused with both sides named."""
    was = model.training
    model.eval()
    c, h, w = input_shape
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        out = model(torch.zeros(2, c, h, w, device=device))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source}: the teacher does not accept the data set's {c}x{h}x{w} images ({first}); "
                              "set data.image_size and data.channels to what it was trained on") from None
    finally:
        model.train(was)
    if out.dim() != 2 or out.shape[1] != len(classes):
        got = tuple(out.shape[1:])
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise CheckpointError(f"{source}: the teacher outputs {got} per image, but the data set has {len(classes)} "
                              f"classes ({shown}); a teacher must be trained on the same classes, in the same order")
