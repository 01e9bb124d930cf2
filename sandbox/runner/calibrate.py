"""Calibrate mode: time a fixed reference workload on this sandbox's device, so that training times
measured on different machines can be put on one scale (`lemur_agent_server.evaluator.calibration`).

The workload is fixed here and nowhere else: a small CNN (two 3x3 convolutions, 16 and 32 channels,
max-pooling, one linear layer; ~25k parameters), SGD with momentum, forward + backward + step on one
fixed batch of 32 CIFAR-shaped images (3 x 32 x 32, seeded noise, seeded labels). After `WARMUP_STEPS`
untimed steps (lazy allocations, the first convolution's algorithm choice) it runs `REPEATS` timed
blocks of `STEPS` steps; each block's time is one sample, so the host gets a median and a spread.
On CUDA every block is bracketed by `torch.cuda.synchronize()` (kernels run asynchronously: without
it the clock would stop before the GPU finished). No submitted code runs in this mode, and no dataset
is read: the batch is generated here.

Changing any constant below changes what a calibration means: bump `WORKLOAD_VERSION` with it, so
the host measures every device again instead of mixing two workloads on one scale.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sandbox import protocol

if TYPE_CHECKING:  # torch only where the workload runs: the host imports this module for its constants
    import torch

    from sandbox.runner.emit import Emitter

WORKLOAD_VERSION = 1
BATCH = 32
IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
WARMUP_STEPS = 10
STEPS = 40  # per timed block
REPEATS = 6  # timed blocks: 240 timed steps, about 2.7 s on one thread of a 2-core Xeon
SEED = 1234


def reference_net() -> torch.nn.Module:
    """The fixed network of the workload (its shape is part of WORKLOAD_VERSION)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(IMAGE_SHAPE[0], 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (IMAGE_SHAPE[1] // 4) * (IMAGE_SHAPE[2] // 4), CLASSES))


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_workload(device: torch.device, repeats: int = REPEATS, steps: int = STEPS) -> list[int]:
    """Nanoseconds of each timed block of `steps` training steps of the reference workload."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    net = reference_net().to(device)
    x = torch.randn((BATCH, *IMAGE_SHAPE), generator=generator).to(device)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    times: list[int] = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            step()
        _sync(device)
        times.append(time.perf_counter_ns() - t0)
    return times


def run_calibrate(spec: protocol.JobSpec, emitter: Emitter, device: torch.device) -> dict[str, Any]:
    """Time the workload once and report it in one `calibrated` event."""
    import torch

    times = time_workload(device)
    emitter.emit(protocol.EVENT_CALIBRATED, workload_version=WORKLOAD_VERSION, steps=STEPS, repeats=REPEATS,
                 batch=BATCH, times_ns=times, threads=torch.get_num_threads())
    return {"best_trial": None, "calibrated": len(times)}
