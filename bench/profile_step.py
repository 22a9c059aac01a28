"""Where one model's training step spends its time: `python -m bench.profile_step plain-2`.
Prints torch.profiler's table of operators by self CPU time (30 steps of batch 128, 1x28x28)."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from models import build_model


def main(arch: str = "plain-2", batch: int = 128, steps: int = 30) -> str:
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, 28).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
