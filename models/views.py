"""What a model reads: its input view, for cross-modal distillation (a teacher and a student that read different
inputs of the same example).

A prepared data set holds one tensor per image. A CSV with a path column per modality (`path.rgb`, `path.depth`)
stores its modalities side by side along the channels, so that every augmentation moves them together and every
cache row pairs them. A view names what a model takes from that tensor:

    rgb             one modality of a paired CSV: its channels only
    lowres-4        the image average-pooled 4 x 4, then scaled back to its size (nearest): a quarter of the resolution
    edges           the Sobel gradient magnitude of each channel
    depth/edges     a modality, then a derived view (in that order)

The view is the model's first operation (`Viewed`), parameter-free: every place that runs a model (training, soft
targets, evaluation, export) feeds it the stored tensor and it takes its own input. A view is one function plus one
registration in DERIVED.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn



class Channels(nn.Module):
    """Channels start..stop of the stored tensor: one modality."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:self.stop]


class LowRes(nn.Module):
    """Average-pooled by `factor` and scaled back (nearest), so the model keeps its input size but sees 1/factor of
    the resolution."""

    def __init__(self, factor: int, size: int):
        super().__init__()
        self.factor, self.size = factor, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(F.avg_pool2d(x, self.factor), size=self.size, mode="nearest")


class Edges(nn.Module):
    """The Sobel gradient magnitude of each channel (zero padding at the border)."""

    def __init__(self, channels: int):
        super().__init__()
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernel = torch.stack([gx, gx.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # [2C, 1, 3, 3]
        self.register_buffer("kernel", kernel, persistent=False)  # fixed: not part of the weights
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=self.channels)
        gx, gy = g[:, 0::2], g[:, 1::2]
        return torch.sqrt(gx * gx + gy * gy + 1e-12)


# name -> (pattern of its argument, builder(argument, channels, size)); the view keeps the channel count
DERIVED: dict[str, tuple[str, Callable[[int | None, int, int], nn.Module]]] = {
    "lowres": (r"-(\d+)", lambda f, c, size: LowRes(f, size)),
    "edges": (r"", lambda _, c, size: Edges(c)),
}
MODALITY_RE = re.compile(r"[A-Za-z0-9_-]+")
_DERIVED_RE = re.compile("|".join(f"(?P<{name}>{name}{arg})" for name, (arg, _) in DERIVED.items()))
VIEW_HELP = ("what the model reads: unset, the whole prepared input; a modality of a paired CSV (its path.<name> "
             f"column); a derived view ({', '.join(n + ('-F' if a else '') for n, (a, _) in DERIVED.items())}); or "
             "modality/derived (depth/edges)")


def is_derived(part: str) -> bool:
    """Whether `part` names a derived view (and so cannot name a modality)."""
    return _DERIVED_RE.fullmatch(part) is not None


def parse(text: str) -> tuple[str | None, list[tuple[str, int | None]]]:
    """'depth/lowres-4' -> ('depth', [('lowres', 4)]); a part that names no derived view is the modality, first."""
    parts = text.split("/")
    derived = []
    for i, part in enumerate(parts):
        m = _DERIVED_RE.fullmatch(part)
        if m is None:
            if i > 0 or not MODALITY_RE.fullmatch(part):
                raise ValueError(f"input {text!r}: {part!r} is neither a derived view "
                                 f"({', '.join(DERIVED)}) nor, first, a modality name")
            continue
        name = m.lastgroup
        arg = next((int(g) for g in m.groups() if g and g.isdigit()), None)
        if name == "lowres" and arg < 2:
            raise ValueError(f"input {text!r}: lowres needs a factor of 2 or more")
        derived.append((name, arg))
    modality = None if is_derived(parts[0]) else parts[0]
    return modality, derived


def view(text: str, modalities: list[str] | None, channels: int, size: int, where: str) -> tuple[nn.Module, int]:
    """The view's module and the channels it gives, for stored inputs of `channels` x `size` x `size` holding
    `modalities` side by side (None: one unnamed input). `where` names the data in errors."""
    modality, derived = parse(text)
    steps: list[nn.Module] = []
    if modality is not None:
        if not modalities or modality not in modalities:
            have = f"its modalities are {', '.join(modalities)}" if modalities else (
                "it has one input (a CSV with path.<name> columns has several)")
            raise ValueError(f"input {text!r}: {where} has no modality {modality!r}; {have}")
        per = channels // len(modalities)
        i = modalities.index(modality)
        steps.append(Channels(i * per, (i + 1) * per))
        channels = per
    for name, arg in derived:
        if name == "lowres" and size % arg:
            raise ValueError(f"input {text!r}: {size}-pixel images do not divide into {arg} x {arg} cells; use a "
                             f"factor that divides {size}")
        steps.append(DERIVED[name][1](arg, channels, size))
    return nn.Sequential(*steps), channels


class Viewed(nn.Module):
    """A model that reads its view of the stored input: `net(view(x))`. Its stages are the network's."""

    def __init__(self, view: nn.Module, net: nn.Module, input: str):
        super().__init__()
        self.view, self.net, self.input = view, net, input
        named = getattr(net, "feature_names", None)
        if named:  # else the stages are found in its own graph, as for any model that names none
            self.feature_names = [f"net.{n}" for n in named]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.view(x))
