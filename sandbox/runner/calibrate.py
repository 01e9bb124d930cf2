"""Calibrate mode: time a fixed set of reference workloads on this sandbox's device, so that training
times measured on different machines can be put on one scale (`lemur_agent_server.evaluator.calibration`).

The workloads are fixed here and nowhere else: one small CNN family (two 3x3 convolutions of
`16 x width` and `32 x width` channels, max-pooling, one linear layer; ~25k parameters at width 1),
SGD with momentum, forward + backward + step on one fixed batch of CIFAR-shaped images (3 x 32 x 32,
seeded noise, seeded labels), at the `POINTS` below: four (width, batch) pairs whose work per step
(forward FLOPs of one sample x batch, as the check counts a model's FLOPs) spans 26 MFLOP to 1.4 GFLOP.

Why several work sizes: how much a device speeds a step up depends on how much work the step has. A
second CPU thread speeds a 26 MFLOP step up about 1.4x and a 400 MFLOP step 1.8x (this project's
2-core Xeon); a GPU's lead grows far more with the step's size. One workload measures the speed-up
of one size only, and a model of another size then gets the wrong factor (measured: 23 % off for a
model the single workload did not match). The host interpolates between the points at the run's
own work per step.

How the measurement resists noise:
- one untimed warm-up round (lazy allocations, the convolutions' algorithm choice), then timed ROUNDS,
  and in each round one block of every point in turn (interleaved): a slow spell of the host (another
  process took a core) lands on all points alike instead of on one of them;
- each block is about `BLOCK_REFERENCE_MS` on the reference device (its step count is set per point),
  so short steps are not drowned in the clock's and the loop's own cost;
- at least `MIN_ROUNDS`, then more until every point's interquartile range is within `TARGET_IQR` of
  its median, or `MAX_ROUNDS`; the host takes medians and records the spread.
On CUDA every block is bracketed by `torch.cuda.synchronize()` (kernels run asynchronously: without
it the clock would stop before the GPU finished). No submitted code runs in this mode, and no dataset
is read: the batches are generated here.

Changing any constant below changes what a calibration means: bump `WORKLOAD_VERSION` with it, so
the host measures every device again instead of mixing two workloads on one scale.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import TYPE_CHECKING, Any

from sandbox import protocol

if TYPE_CHECKING:  # torch only where the workload runs: the host imports this module for its constants
    import torch

    from sandbox.runner.emit import Emitter

WORKLOAD_VERSION = 2
IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
CHANNELS = (16, 32)  # the two convolutions' channels at width 1
SEED = 1234
BLOCK_REFERENCE_MS = 200  # a timed block's length on the reference device (steps per point are set for it)
MIN_ROUNDS = 5
MAX_ROUNDS = 15
TARGET_IQR = 0.05  # stop adding rounds when every point's (q3 - q1) / median is within this


@dataclasses.dataclass(frozen=True)
class Point:
    """One reference workload: the CNN at `width`, trained on one batch of `batch` images."""

    width: int
    batch: int
    steps: int  # per timed block
    work: int  # forward FLOPs of one sample x batch (tests/test_calibration.py checks it against the counter)

    @property
    def name(self) -> str:
        return f"w{self.width}-b{self.batch}"


POINTS = (
    Point(width=1, batch=8, steps=60, work=26_279_936),
    Point(width=1, batch=32, steps=20, work=105_119_744),  # the workload of version 1 (the anchor)
    Point(width=2, batch=32, steps=10, work=361_234_432),
    Point(width=2, batch=128, steps=2, work=1_444_937_728),
)
ANCHOR = 1  # POINTS[ANCHOR] is version 1's workload: its factor is the device's single `factor`


def reference_net(width: int = 1, in_channels: int = IMAGE_SHAPE[0], side: int = IMAGE_SHAPE[1],
                  classes: int = CLASSES) -> torch.nn.Module:
    """The workloads' network family (its shape is part of WORKLOAD_VERSION)."""
    import torch

    c1, c2 = (c * width for c in CHANNELS)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, c1, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c2 * (side // 4) ** 2, classes))


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stepper(point: Point, device: torch.device) -> Any:
    """A function that runs one training step of `point`'s workload."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    net = reference_net(point.width).to(device)
    x = torch.randn((point.batch, *IMAGE_SHAPE), generator=generator).to(device)
    y = torch.randint(0, CLASSES, (point.batch,), generator=generator).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        optimizer.step()

    return step


def _block(step: Any, steps: int, device: torch.device) -> int:
    _sync(device)
    t0 = time.perf_counter_ns()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter_ns() - t0


def relative_iqr(times: list[int]) -> float:
    """(q3 - q1) / median: how much the middle half of the blocks disagree."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / median


def time_workloads(device: torch.device, points: tuple[Point, ...] = POINTS, min_rounds: int = MIN_ROUNDS,
                   max_rounds: int = MAX_ROUNDS, more_rounds_until_s: float | None = None) -> list[list[int]]:
    """Nanoseconds of each timed block, per point (interleaved rounds; see the module's docstring).
    `more_rounds_until_s`: no round beyond `min_rounds` starts after this many seconds. Why: on a loaded
    host the spread never gets within TARGET_IQR, so every round up to `max_rounds` ran, three times the
    work, and the sandbox could reach its wall clock with no result at all (the host records the spread)."""
    steppers = [_stepper(p, device) for p in points]
    for point, step in zip(points, steppers):  # warm-up round, untimed
        _block(step, max(2, point.steps // 4), device)
    times: list[list[int]] = [[] for _ in points]
    t0 = time.monotonic()
    for done in range(1, max_rounds + 1):
        for point, step, blocks in zip(points, steppers, times):
            blocks.append(_block(step, point.steps, device))
        late = more_rounds_until_s is not None and time.monotonic() - t0 > more_rounds_until_s
        if done >= min_rounds and (late or all(relative_iqr(b) <= TARGET_IQR for b in times)):
            break
    return times


def run_calibrate(spec: protocol.JobSpec, emitter: Emitter, device: torch.device) -> dict[str, Any]:
    """Time the workloads once and report them in one `calibrated` event: `points` (one entry per point:
    its name, width, batch, steps, work and block times) and, as version 1 sent it, the anchor's
    `steps`, `batch` and `times_ns`."""
    import torch

    times = time_workloads(device, more_rounds_until_s=float(spec.time_budget_s) / 3)
    anchor = POINTS[ANCHOR]
    emitter.emit(protocol.EVENT_CALIBRATED, workload_version=WORKLOAD_VERSION, steps=anchor.steps,
                 repeats=len(times[ANCHOR]), batch=anchor.batch, times_ns=times[ANCHOR],
                 points=[{**dataclasses.asdict(p), "name": p.name, "times_ns": t} for p, t in zip(POINTS, times)],
                 threads=torch.get_num_threads())
    return {"best_trial": None, "calibrated": sum(len(t) for t in times)}
