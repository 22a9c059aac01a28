"""One training over several processes (DistributedDataParallel), started by torchrun.

torchrun starts one process per device and gives each its place (RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous'
MASTER_ADDR/PORT); `init` joins the process group from that environment. Everything else asks `ranks()`, which is a
single process (rank 0 of 1) when no group was joined, so the trainer, the cache writer and the stage runner are the
same code alone and in a group.

How a training splits (engine/trainer.py): every rank draws the same seeded order and the same augmentation for a
whole batch, then takes its contiguous share of that batch (`Ranks.share`). DDP averages the gradients, and each
rank's loss is weighted by its share of the batch, so the step equals one process's step on the whole batch up to
float rounding. BatchNorm layers are synchronised (`sync_batchnorm`): torch's SyncBatchNorm on CUDA; torch's runs on
GPUs only, so on CPUs (gloo) the same statistics and gradients come from `GlooSyncBatchNorm` below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from engine.device import resolve_device
from engine.errors import KDError

ENV_WORLD, ENV_RANK, ENV_LOCAL = "WORLD_SIZE", "RANK", "LOCAL_RANK"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: its rank, the group's size, and its rank on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints and logs."""
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of `rank`'s contiguous share of n items: sizes differ by at most one."""
        rank = self.rank if rank is None else rank
        q, extra = divmod(n, self.world)
        start = rank * q + min(rank, extra)
        return start, start + q + (rank < extra)

    def share(self, n: int) -> slice:
        return slice(*self.bounds(n))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (every rank gets the sum)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather_rows(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Each rank's share (`bounds(n)`) of n rows, put together in order on every rank."""
        if self.world == 1:
            return rows
        sizes = [b - a for a, b in (self.bounds(n, r) for r in range(self.world))]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[:len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled: for small things, a decision or a checkpoint)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def ranks() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get(ENV_LOCAL, 0)))


def launched(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of several that torchrun started (its agent names the run; a scheduler's own
    WORLD_SIZE alone is not torchrun's group, and the stage command then starts torchrun itself)."""
    return int(environ.get(ENV_WORLD, "1")) > 1 and "TORCHELASTIC_RUN_ID" in environ


def init(device: str, backend: str = "auto", timeout_s: float = 600) -> tuple[Ranks, torch.device]:
    """Join torchrun's group: NCCL on CUDA (one device per process, by LOCAL_RANK), gloo on CPUs. Returns this
    process's place and its device. `timeout_s`: how long a collective waits for a rank that stopped answering."""
    local = int(os.environ.get(ENV_LOCAL, 0))
    where = resolve_device(device)
    if where.type == "cuda":
        if where.index is None:
            where = torch.device("cuda", local)
        torch.cuda.set_device(where)
    chosen = backend if backend != "auto" else ("nccl" if where.type == "cuda" else "gloo")
    dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s),
                            device_id=where if chosen == "nccl" else None)
    return ranks(), where


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_devices(nproc_per_node: int, device: torch.device, visible: int) -> None:
    """One process per accelerator: more processes than devices is a configuration error, said before launching."""
    if device.type == "cuda" and nproc_per_node > visible:
        raise KDError(f"distributed.nproc_per_node is {nproc_per_node}, but this machine shows {visible} CUDA "
                      f"device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); one "
                      "process per device: lower it, or make the devices visible")


# ---------------------------------------------------------------- BatchNorm over the whole batch

class _SyncNorm(torch.autograd.Function):
    """Batch normalisation with the mean and variance of every rank's images (two-pass, for accuracy), and the
    input gradient's batch terms summed over the ranks, as torch's SyncBatchNorm computes them on GPUs."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        shape, dims = (1, -1, 1, 1), (0, 2, 3)
        n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = torch.cat([x.sum(dims), n])
        dist.all_reduce(total)
        count = total[-1]
        mean = total[:-1] / count
        centred = x - mean.view(shape)
        var = centred.square().sum(dims)
        dist.all_reduce(var)
        var = var / count
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(shape)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * count / (count - 1), alpha=momentum)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = count
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        shape, dims, c = (1, -1, 1, 1), (0, 2, 3), xhat.shape[1]
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        total = local.clone()
        dist.all_reduce(total)
        mean_dy, mean_dy_xhat = (total / ctx.count).split(c)
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (weight * invstd).view(shape)
        return dx, local[c:], local[:c], None, None, None, None


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank's share of the batch, on any device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.affine and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        return _SyncNorm.apply(x, self.weight, self.bias, self.running_mean if self.track_running_stats else None,
                               self.running_var if self.track_running_stats else None, self.eps, momentum)


def _swap_batchnorm(module: nn.Module, find: tuple[type, ...], make: type) -> int:
    """Replace every `find` layer (exactly those types) by a `make` with the same state; returns how many."""
    swapped = 0
    for name, child in module.named_children():
        if type(child) in find:
            new = make(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values())).device).train(child.training)
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, new)
            swapped += 1
        else:
            swapped += _swap_batchnorm(child, find, make)
    return swapped


def sync_batchnorm(module: nn.Module, device: torch.device) -> int:
    """Every BatchNorm2d of `module` synchronised over the ranks, in place; returns how many layers."""
    return _swap_batchnorm(module, (nn.BatchNorm2d,), nn.SyncBatchNorm if device.type == "cuda" else GlooSyncBatchNorm)


def plain_batchnorm(module: nn.Module) -> int:
    """Undo `sync_batchnorm`: the model as it is saved, exported and run alone."""
    return _swap_batchnorm(module, (nn.SyncBatchNorm, GlooSyncBatchNorm), nn.BatchNorm2d)
