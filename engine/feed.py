"""A split fed to the device: resident there as one uint8 tensor, or streamed from the prepared store's shards.

Either way a training asks for the same thing (the rows of a batch of indices, in order) and gets the same bytes,
so where the data lives never changes a result. A streamed split reads each epoch's batches ahead of the loop in
DataLoader worker processes (pinned memory on CUDA); the indices, and so every random draw, stay in the trainer.
"""
from __future__ import annotations

import gc
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.data import ImageSet
from engine.store import ShardedRows, in_memory


class _Rows(Dataset):
    """Item `idx` (a tensor of indices) is those rows' images."""

    def __init__(self, images: ShardedRows):
        self.images = images

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


class _Order(Sampler):
    """The batches of indices of the pass about to run; set before each pass, so workers persist across epochs."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Streamed:
    """Images on disk that index like a device tensor: `x[rows]` reads those rows and moves them to the device."""

    def __init__(self, images: ShardedRows, device: torch.device, workers: int):
        self.images, self.device, self.workers = images, device, workers
        self.shape = images.shape
        self._order = _Order()
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> torch.Tensor:
        return self.images[index].to(self.device)

    def close(self) -> None:
        """Ends the loader's worker processes now, not whenever the garbage collector reaches them: a pause at an
        arbitrary later point (up to the workers' status interval) otherwise lands in whatever runs then."""
        if self._loader is not None:
            self._loader = None
            gc.collect()

    def cpu(self) -> torch.Tensor:
        """The whole split in memory: for the evaluations that need it at once (ONNX, INT8)."""
        return in_memory(self.images)

    def batches(self, order: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images of each batch of indices in `order`, read ahead by the loader's workers."""
        if not self.workers:
            yield from (self[idx] for idx in order)
            return
        if self._loader is None:
            pin = self.device.type == "cuda"
            self._loader = DataLoader(_Rows(self.images), sampler=self._order, batch_size=None,
                                      num_workers=self.workers, pin_memory=pin, persistent_workers=True,
                                      prefetch_factor=4)
        self._order.batches = order
        for x in self._loader:
            yield x.to(self.device, non_blocking=True)


class DeviceSet:
    """A split for the device, normalised on the fly with the train split's statistics. `stream`: leave its images
    on disk and read them batch by batch (`workers` processes read ahead)."""

    def __init__(self, part: ImageSet, mean: list[float], std: list[float], device: torch.device,
                 stream: bool = False, workers: int = 0):
        images = part.x
        if isinstance(images, ShardedRows) and not stream:
            images = in_memory(images)
        self.x = Streamed(images, device, workers) if isinstance(images, ShardedRows) else images.to(device)
        self.y = part.y.to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.y.device

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, Streamed)

    def batches(self, order: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices on the device, their uint8 images) for each batch of indices in `order`, in order."""
        if self.streamed:  # the loader reads by CPU indices; the trainer looks targets up on the device
            order = [i.cpu() for i in order]
            return zip((i.to(self.device) for i in order), self.x.batches(order))
        order = [i.to(self.device) for i in order]
        return zip(order, (self.x[i] for i in order))

    def close(self) -> None:
        if self.streamed:
            self.x.close()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
