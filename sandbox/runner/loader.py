"""Device-resident data: uint8 images live on the model's device; batches are sliced and transformed there.

Why not a DataLoader: on a 2-core box the PIL pipeline caps out at a few thousand images/s and on a GPU it
dominates small models (research: perf.md §2). Keeping the whole split as one uint8 tensor and doing
index -> float/255 -> crop/pad/resize -> flip -> normalise per batch (sandbox.runner.transforms) costs no
per-sample Python work at all.

The public train split is divided into train/validation here (`split_seed`, `val_fraction`): model
selection uses validation accuracy; the test images are only predicted (their labels never enter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from sandbox.runner.params import Transform, validation_size
from sandbox.runner.transforms import apply_transform  # check.py and bench/ import it from here too

EVAL_BATCH = 256


@dataclasses.dataclass
class DeviceData:
    """The job's arrays on the device: uint8 NCHW images, int64 labels; `test_y` does not exist here."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    mean: torch.Tensor  # (1, C, 1, 1) float32
    std: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def sizes(self) -> dict[str, int]:
        return {"n_train": len(self.train_x), "n_val": len(self.val_x), "n_test": len(self.test_x)}


def split_indices(
    n: int, val_fraction: float, split_seed: int, max_train: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into the public train arrays; deterministic in `split_seed`.

    `max_train` caps the pool before the split, so validation stays `val_fraction` of what is used.
    """
    pool = np.random.default_rng(split_seed).permutation(n)
    if max_train is not None:
        pool = pool[: max(int(max_train), 2)]
    n_val = validation_size(len(pool), val_fraction)
    return np.sort(pool[n_val:]), np.sort(pool[:n_val])


def _channel_tensor(values: list[float], channels: int, device: torch.device) -> torch.Tensor:
    vals = list(values) if len(values) == channels else [float(values[0])] * channels
    return torch.tensor(vals, dtype=torch.float32, device=device).view(1, channels, 1, 1)


def load_data(
    data_dir: str | Path,
    mean: list[float],
    std: list[float],
    val_fraction: float,
    split_seed: int,
    max_train: int | None,
    max_test: int | None,
    device: torch.device,
) -> DeviceData:
    """Read train_x/train_y/test_x once and move them to `device` as uint8/int64 tensors."""
    folder = Path(data_dir)
    train_x = np.load(folder / "train_x.npy", mmap_mode="r")
    train_y = np.load(folder / "train_y.npy", mmap_mode="r")
    test_x = np.load(folder / "test_x.npy", mmap_mode="r")
    if max_test is not None:
        test_x = test_x[:max_test]
    tr, va = split_indices(len(train_x), val_fraction, split_seed, max_train)

    def put(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.array(arr, copy=True)).to(device=device, dtype=dtype)  # off the mmap

    channels = int(train_x.shape[1])
    return DeviceData(
        train_x=put(train_x[tr], torch.uint8),
        train_y=put(train_y[tr], torch.int64),
        val_x=put(train_x[va], torch.uint8),
        val_y=put(train_y[va], torch.int64),
        test_x=put(test_x, torch.uint8),
        mean=_channel_tensor(mean, channels, device),
        std=_channel_tensor(std, channels, device),
    )


def batches_per_epoch(n: int, batch: int) -> int:
    """Full batches plus a last partial one; a last batch of a single sample is dropped because
    BatchNorm cannot train on it (LEMUR's DataLoader would pass it and crash such models)."""
    batch = min(batch, n)
    return n // batch + (1 if n % batch >= 2 else 0)


class TrainStream:
    """Endless sequence of shuffled training batches of one trial; reshuffles at each epoch boundary."""

    def __init__(self, data: DeviceData, batch: int, tf: Transform, generator: torch.Generator) -> None:
        self.data = data
        self.n = len(data.train_x)
        self.batch = max(1, min(int(batch), self.n))
        self.tf = tf
        self.generator = generator
        self.per_epoch = batches_per_epoch(self.n, self.batch)
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = self.per_epoch  # forces a shuffle on the first batch
        self.batches_done = 0

    def batch_size(self, index_in_epoch: int) -> int:
        return min(self.batch, self.n - index_in_epoch * self.batch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos >= self.per_epoch:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        start = self._pos * self.batch
        idx = self._perm[start : start + self.batch].to(self.data.train_x.device)
        self._pos += 1
        self.batches_done += 1
        x = apply_transform(
            self.data.train_x[idx], self.tf, self.data.mean, self.data.std, True, self.generator
        )
        return x, self.data.train_y[idx]


class Segment:
    """What `learn()` receives: a partial epoch (`n_batches` of the stream), iterable once.

    Before each batch after the first it asks `should_stop(seconds_in_segment, samples_so_far)`; when that
    says the time budget is gone it ends early (`truncated`), so learn() returns normally instead of
    being killed. `on_batch(i)` runs before batch i is produced (the runner uses i == 1 to report that
    the first optimizer step has finished).
    """

    def __init__(
        self,
        stream: TrainStream,
        n_batches: int,
        should_stop: Callable[[float, int], bool],
        on_batch: Callable[[int], None],
        clock: Callable[[], float],
    ) -> None:
        self.stream = stream
        self.n_batches = n_batches
        self.should_stop = should_stop
        self.on_batch = on_batch
        self.clock = clock
        self.yielded = 0
        self.samples = 0
        self.truncated = False

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self.clock()
        for i in range(self.n_batches):
            if i > 0 and self.should_stop(self.clock() - start, self.samples):
                self.truncated = True
                return
            self.on_batch(self.yielded)
            x, y = self.stream.next_batch()
            self.yielded += 1
            self.samples += len(y)
            yield x, y


def eval_batches(
    images: torch.Tensor, tf: Transform, mean: torch.Tensor, std: torch.Tensor, batch: int = EVAL_BATCH
) -> Iterator[torch.Tensor]:
    """Transformed evaluation batches in order (the deterministic part: centre crop, no flip)."""
    for start in range(0, len(images), batch):
        yield apply_transform(images[start : start + batch], tf, mean, std, train=False)
