"""Analyze mode: measure many models in one runner process, one `analyzed` event per model.

Why one process for many models: starting a sandbox (interpreter, torch import, namespaces or a
container) costs seconds; building a small Net and tracing one forward pass costs milliseconds. For the
ten thousand models of a LEMUR import the start-up must be paid once per batch, not once per model.

What is measured per model (the same as check mode, so a later check or submission agrees): the
parameter count, forward FLOPs of a batch-1 input and the architecture fingerprint, with the check
hyperparameters (`params.check_prm`), the channels and classes of the model's dataset and the size of
its transform; a model that fails at that size is tried at `fallback_transforms` (LEMUR nets trained at
224 or 299 pixels often cannot take 32). No learn() step: only the architecture is wanted here, and
learn() is where most of check mode's time goes.

Isolation between the models of one batch is weaker than between jobs: they share the interpreter, so
a model that patches torch can skew the numbers of the models after it in the same batch (never the
host). The global state that LEMUR models are known to change (default dtype, grad mode, seeds) is
reset before each model. A model that takes longer than `JobSpec.model_timeout_s` is interrupted by
SIGALRM and reported as a timeout; one that ignores the alarm (a C loop, a swallowed exception) is
killed by the host's watchdog, which then blames that model and restarts the batch after it.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sandbox import protocol
from sandbox.runner import fingerprint, netops
from sandbox.runner.contract import MODULE_NAME, load_and_check
from sandbox.runner.emit import Emitter
from sandbox.runner.errors import RunnerFailure, describe
from sandbox.runner.loader import apply_transform
from sandbox.runner.params import check_prm, parse_transform

FORWARD_BATCH = 2  # two images: a Net that only works for batch 1 (squeeze() bugs) fails here as in check mode
MESSAGE_CHARS = 1500


class ModelTimeout(BaseException):
    """Raised by SIGALRM inside model code; a BaseException so `except Exception` in a model keeps it."""


@contextlib.contextmanager
def alarm(seconds: float, fired: list[bool]) -> Iterator[None]:
    """Interrupt the block after `seconds` with ModelTimeout; `fired[0]` tells afterwards that it did
    (the exception itself may come back wrapped, e.g. as `Net(...) raised ModelTimeout`)."""

    def on_alarm(signum: int, frame: Any) -> None:
        fired[0] = True
        raise ModelTimeout(f"the model took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _reset_globals(seed: int) -> None:
    """Undo what a previous model of the batch may have changed in torch's global state."""
    sys.modules.pop(MODULE_NAME, None)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.manual_seed(seed)


def _inputs(entry: dict[str, Any], tf: Any, seed: int) -> torch.Tensor:
    """A random uint8 batch in the dataset's stored shape, through the transform (as check mode's data)."""
    channels, height, width = (int(v) for v in entry["image_shape"])
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(FORWARD_BATCH, channels, height, width), dtype=np.uint8))
    mean = torch.tensor(entry.get("mean") or [0.5] * channels, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(entry.get("std") or [0.25] * channels, dtype=torch.float32).view(1, -1, 1, 1)
    return apply_transform(images, tf, mean, std, train=False)


def measure(entry: dict[str, Any], in_dir: Path, device: torch.device, seed: int) -> dict[str, Any]:
    """Build the entry's Net and describe it; raises RunnerFailure (or anything) when it cannot."""
    name = str(entry["file"])
    if "/" in name or name.startswith("."):
        raise RunnerFailure(protocol.KIND_SANDBOX, f"model file {name!r} is not a plain name in in/")
    module, declared = load_and_check(in_dir / name)
    prm = check_prm(declared, {}, [str(entry["transform"])])
    native = int(entry["image_shape"][-1])
    tf = parse_transform(prm["transform"], native)
    size = int(tf.size or native)
    num_classes = int(entry["num_classes"])
    in_shape, out_shape = (1, int(entry["image_shape"][0]), size, size), (num_classes,)
    x = _inputs(entry, tf, seed).to(device)
    torch.manual_seed(seed)
    model = netops.build_net(module, in_shape, out_shape, prm, device, protocol.STAGE_CHECK)
    params, trainable = netops.count_params(model)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
        netops.check_logits(out, FORWARD_BATCH, num_classes, protocol.STAGE_CHECK)
        flops = fingerprint.count_flops(model, x[:1])
        torch.manual_seed(seed)
        fp = fingerprint.fingerprint(model, x[:1])
    except (RunnerFailure, ModelTimeout):
        raise
    except BaseException as exc:
        raise netops.model_error(exc, protocol.STAGE_CHECK, "forward()") from exc
    return {"params": params, "trainable_params": trainable, "flops": flops, "fingerprint": fp,
            "in_shape": list(in_shape), "out_shape": list(out_shape), "declared": sorted(declared)}


def _failure(exc: BaseException, timed_out: bool, timeout_s: float) -> dict[str, Any]:
    if timed_out:
        return {"kind": protocol.KIND_TIMEOUT,
                "message": f"building or running the model took longer than {timeout_s:g} s"}
    if isinstance(exc, RunnerFailure | netops.TrialFailure):
        return {"kind": str(exc.kind), "message": exc.message[:MESSAGE_CHARS]}
    return {"kind": protocol.KIND_EXCEPTION, "message": describe(exc)[:MESSAGE_CHARS]}


RETRYABLE = (protocol.KIND_EXCEPTION, protocol.KIND_SHAPE)  # may be the input size; syntax or contract never


def _attempt(entry: dict[str, Any], transform: str, in_dir: Path, device: torch.device,
             seed: int) -> dict[str, Any]:
    try:
        return {"ok": True, **measure({**entry, "transform": transform}, in_dir, device, seed)}
    except ModelTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever the model raised is this model's failure
        return {"ok": False, "exc": exc}


def analyze_one(entry: dict[str, Any], in_dir: Path, device: torch.device, seed: int,
                timeout_s: float) -> dict[str, Any]:
    """The `analyzed` event's fields for one model: its measures, or why it could not be measured.

    A model that fails at the entry's transform with an exception or a shape error is tried again at
    `fallback_transforms` (many LEMUR nets only work at 224 or 299 pixels); the first error is reported
    when every size fails. One alarm covers all attempts, so the host's watchdog bound holds."""
    fired = [False]
    t0 = time.perf_counter()
    sizes = [str(entry["transform"]), *[str(t) for t in entry.get("fallback_transforms") or []]]
    first: dict[str, Any] | None = None
    fields: dict[str, Any] = {}
    try:
        with alarm(timeout_s, fired):
            for transform in sizes:
                _reset_globals(seed)
                result = _attempt(entry, transform, in_dir, device, seed)
                if result["ok"]:
                    fields = {**result, "transform": transform}
                    break
                error = _failure(result["exc"], fired[0], timeout_s)
                first = first or error
                if error["kind"] not in RETRYABLE:
                    break
    except BaseException as exc:  # noqa: BLE001 - the alarm, or model code escaping in an odd place
        first = _failure(exc, fired[0], timeout_s) if fired[0] or first is None else first
    if not fields:
        fields = {"ok": False, "error": first}
    fields["seconds"] = round(time.perf_counter() - t0, 4)
    return fields


def warm_up(device: torch.device) -> None:
    """Run the measuring path once on a net of ours: torch's lazy set-up of the dispatcher modes and the
    first conv (about a second) must not count against the first model's alarm."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).to(device)
    x = torch.zeros(1, 3, 8, 8, device=device)
    net.eval()
    fingerprint.count_flops(net, x)
    fingerprint.fingerprint(net, x)


def run_analyze(spec: protocol.JobSpec, emitter: Emitter, device: torch.device) -> dict[str, Any]:
    """Every entry of `spec.models` in order, one event each; the `done` event counts them."""
    in_dir = Path(spec.model_path).parent
    ok = 0
    warm_up(device)
    gc.collect()
    gc.freeze()  # torch's own objects are never garbage: each model's collection then scans only its own
    for entry in spec.models:
        fields = analyze_one(entry, in_dir, device, spec.seed, spec.model_timeout_s)
        ok += bool(fields["ok"])
        emitter.emit(protocol.EVENT_ANALYZED, id=entry.get("id"), **fields)
    return {"best_trial": None, "analyzed": len(spec.models), "ok": ok}
