"""Check mode (and the preamble of train mode): build the Net once, run it a little, describe it.

Why run learn() here too: most broken submissions fail in learn() (wrong loss call, missing optimizer,
labels on the wrong device). Two tiny batches surface that in well under a second, with stage=checking,
before any Optuna trial or time budget is spent.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from sandbox import protocol
from sandbox.runner import fingerprint, layers, netops
from sandbox.runner.emit import Emitter
from sandbox.runner.errors import RunnerFailure
from sandbox.runner.loader import apply_transform, split_indices
from sandbox.runner.params import RESERVED, check_prm, parse_transform

FORWARD_BATCH = 2
LEARN_BATCHES = 2
LEARN_BATCH = 4
SPEED_IMAGES = 1024  # at most this many images (warm-up step included) are trained on to time the model
SPEED_PIXELS = 64 * 4 * 224 * 224  # ... and at most this many pixels (memory, for large resizes)


def sample_images(
    data_dir: str, image_shape: list[int], num_classes: int, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`n` real training images and labels when the data is mounted, else random ones of the right shape."""
    folder = Path(data_dir)
    rng = np.random.default_rng(seed)
    try:
        images = np.load(folder / "train_x.npy", mmap_mode="r")
        labels = np.load(folder / "train_y.npy", mmap_mode="r")
        idx = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
        return np.ascontiguousarray(images[idx]), np.asarray(labels[idx], dtype=np.int64)
    except (OSError, ValueError):
        c, h, w = image_shape
        return (
            rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8),
            rng.integers(0, num_classes, size=n, dtype=np.int64),
        )


def _in_shape(spec: protocol.JobSpec, transform: str) -> tuple[int, int, int, int]:
    size = parse_transform(transform, spec.image_shape[-1]).size
    return 1, int(spec.image_shape[0]), size, size


def run_check(
    spec: protocol.JobSpec, module: ModuleType, declared: set[str], device: torch.device, emitter: Emitter
) -> dict[str, Any]:
    """Build, forward, count, fingerprint and learn briefly; emits and returns the `check` event fields."""
    stage = protocol.STAGE_CHECK
    refuse_unknown_prm(spec.fixed_prm, declared)
    prm = check_prm(declared, spec.fixed_prm, spec.transforms, spec.epochs)
    tf = parse_transform(prm["transform"], spec.image_shape[-1])
    in_shape, out_shape = _in_shape(spec, prm["transform"]), (int(spec.num_classes),)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    n_images = FORWARD_BATCH + LEARN_BATCHES * LEARN_BATCH
    images_np, labels_np = sample_images(
        spec.data_dir, spec.image_shape, spec.num_classes, n_images, spec.seed
    )
    images = torch.from_numpy(images_np).to(device)
    labels = torch.from_numpy(labels_np).to(device)

    torch.manual_seed(spec.seed)
    model = netops.build_net(module, in_shape, out_shape, prm, device, stage)
    params, trainable = netops.count_params(model)
    x = apply_transform(images[:FORWARD_BATCH], tf, mean, std, train=False)
    model.eval()
    try:
        netops.sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(x)
        netops.sync(device)
        forward_s = time.perf_counter() - t0
        netops.check_logits(out, FORWARD_BATCH, spec.num_classes, stage)
        flops = fingerprint.count_flops(model, x[:1])
        torch.manual_seed(spec.seed)
        fp = fingerprint.fingerprint(model, x[:1])
        cost = layers.layer_costs(model, x[:1])
    except RunnerFailure:
        raise
    except BaseException as exc:
        raise _check_error(netops.model_error(exc, stage, "forward()")) from exc

    learn_loss, updated = _tiny_learn(
        model, prm, images[FORWARD_BATCH:], labels[FORWARD_BATCH:], tf, mean, std
    )
    fields: dict[str, Any] = {
        "params": params,
        "trainable_params": trainable,
        "flops": flops,
        "fingerprint": fp,
        "in_shape": list(in_shape),
        "out_shape": list(out_shape),
        "forward_s": round(forward_s, 6),
        "prm": prm,
        "declared": sorted(declared),
        "learn_loss": learn_loss,
        "learn_updates_params": updated,
        "layers": cost["layers"],
        "layers_other": cost["other"],
    }
    if spec.mode == protocol.MODE_CHECK:  # train mode measures the real speed in its trials
        fields["speed"] = _speed(spec, model, prm, tf, mean, std, device)
    emitter.emit(protocol.EVENT_CHECK, **fields)
    del model
    return fields


def _check_error(exc: Exception) -> RunnerFailure:
    if isinstance(exc, netops.TrialFailure):  # OOM with the default hyperparameters ends the check
        return RunnerFailure(exc.kind, exc.message, protocol.STAGE_CHECK)
    assert isinstance(exc, RunnerFailure)
    return exc


def _tiny_learn(
    model: torch.nn.Module,
    prm: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    tf: Any,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[float | None, bool]:
    """train_setup + learn on two batches of four; returns (loss, whether any parameter changed)."""
    batches = [
        (apply_transform(images[i : i + LEARN_BATCH], tf, mean, std, train=True), labels[i : i + LEARN_BATCH])
        for i in range(0, LEARN_BATCHES * LEARN_BATCH, LEARN_BATCH)
    ]
    before = netops.param_checksum(model)
    try:
        model.train()
        model.train_setup(dict(prm))
        result = model.learn(batches)
    except BaseException as exc:
        raise _check_error(netops.model_error(exc, protocol.STAGE_CHECK, "train_setup()/learn()")) from exc
    loss, _ = netops.parse_learn_result(result)
    return loss, netops.param_checksum(model) != before


def refuse_unknown_prm(fixed_prm: dict[str, Any], declared: set[str]) -> None:
    """A fixed hyperparameter the model does not declare would be passed and never read: refuse it."""
    unknown = sorted(set(fixed_prm) - set(declared) - set(RESERVED))
    if unknown:
        raise RunnerFailure(
            protocol.KIND_CONTRACT, protocol.unknown_prm_message(unknown, sorted(declared)), protocol.STAGE_CHECK
        )


def _split_sizes(spec: protocol.JobSpec) -> tuple[int, int] | None:
    """(training samples, evaluated samples: validation + test) of a train job on this data, or None."""
    folder = Path(spec.data_dir)
    try:
        n_pool = len(np.load(folder / "train_x.npy", mmap_mode="r"))
        n_test = len(np.load(folder / "test_x.npy", mmap_mode="r"))
    except (OSError, ValueError):
        return None
    tr, va = split_indices(n_pool, spec.val_fraction, spec.split_seed, spec.max_train_samples)
    if spec.max_test_samples is not None:
        n_test = min(n_test, spec.max_test_samples)
    return len(tr), len(va) + n_test


def _speed(
    spec: protocol.JobSpec, model: torch.nn.Module, prm: dict[str, Any], tf: Any, mean: torch.Tensor,
    std: torch.Tensor, device: torch.device,
) -> dict[str, Any] | None:
    """Seconds per epoch and per evaluation pass on this server, timed on a few real training steps at the
    check's batch and transform (warm-up step excluded). None when the data is not mounted here."""
    sizes = _split_sizes(spec)
    if sizes is None:
        return None
    batch = max(1, int(prm["batch"]))
    per_image = int(spec.image_shape[0]) * tf.size * tf.size
    steps = max(2, min(1 + layers.TIMED_STEPS, SPEED_IMAGES // batch, SPEED_PIXELS // (batch * per_image)))
    batch = min(batch, SPEED_IMAGES // steps, max(1, SPEED_PIXELS // (steps * per_image)))
    images_np, labels_np = sample_images(spec.data_dir, spec.image_shape, spec.num_classes, steps * batch,
                                         spec.seed + 1)
    images, labels = torch.from_numpy(images_np).to(device), torch.from_numpy(labels_np).to(device)
    batches = [(apply_transform(images[i : i + batch], tf, mean, std, train=True), labels[i : i + batch])
               for i in range(0, len(images), batch)]
    try:
        train_rate = layers.time_steps(model, batches, device)
        eval_rate = layers.time_forward(model, apply_transform(images, tf, mean, std, train=False), device)
    except BaseException as exc:
        raise _check_error(netops.model_error(exc, protocol.STAGE_CHECK, "learn() while timing")) from exc
    n_train, n_eval = sizes
    return {
        "batch": batch,
        "transform": prm["transform"],
        "train_samples": n_train,
        "eval_samples": n_eval,
        "timed_steps": len(batches) - 1,
        "epoch_s": None if train_rate is None else round(train_rate * n_train, 3),
        "eval_pass_s": None if eval_rate is None else round(eval_rate * n_eval, 3),
    }
