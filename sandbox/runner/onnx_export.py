"""Train mode's last step with `JobSpec.export_onnx`: the selected trial's Net, with the weights the
search kept, exported to ONNX in out/ (`protocol.onnx_name`), reported as one `onnx` event.

Why inside the sandbox: exporting traces forward(), i.e. runs the submitted code.
Why after the search and not per trial: the search keeps one weights file, the best trial's so far
(`search._keep_best_weights`, the host's selection rule); rebuilding that one Net and loading its
weights costs one export, not one per trial.
Why never fatal: the job's result is the training; a model the exporter cannot handle (complex inputs,
data-dependent control flow, an op without an ONNX equivalent) still succeeds, and the event says why
there is no file. The export is bounded by the job's remaining budget (SIGALRM), and skipped when the
file could push out/ towards its cap, so it can neither turn a finished job into a timeout nor get the
sandbox killed for its output.

Exporters, in order: torch's default (torch.export-based "dynamo", needs `onnx` and `onnxscript`),
then the TorchScript one (`dynamo=False`, needs `onnx`) for models torch.export cannot capture. Both
with a dynamic batch dimension; inputs are named `input`, outputs `logits`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sandbox import protocol
from sandbox.runner import netops
from sandbox.runner.emit import Emitter
from sandbox.runner.errors import describe
from sandbox.runner.params import parse_transform
from sandbox.runner.trainer import Job
from sandbox.runner.transforms import apply_transform

MIN_EXPORT_S = 3.0  # an export is not started with less of the job's budget left
ALARM_MARGIN_S = 0.5  # the alarm fires this much before the runner's own end
# out/ must stay under this after the export (the sandbox's out/ cap, `Limits.out_cap_bytes`, is 512 MiB
# by default; an ONNX file is about as large as the weights)
MAX_OUT_BYTES = 400 << 20
DUMMY_BATCH = 2  # torch.export specialises a batch of 1; two samples keep the batch dimension dynamic
ERROR_CHARS = 600


class ExportTimeout(BaseException):
    """Raised by SIGALRM inside the exporter; a BaseException so model code's `except Exception` keeps it."""


class PrmRecorder(Emitter):
    """The job's emitter, remembering each trial's prm from its `trial_start` (the Net is rebuilt with it)."""

    def __init__(self, inner: Emitter) -> None:  # noqa: D107 - shares the inner emitter's file and clock
        self.inner = inner
        self.started = inner.started
        self.prm_of: dict[int, dict[str, Any]] = {}

    def emit(self, event: str, **fields: Any) -> None:
        if event == protocol.EVENT_TRIAL_START:
            self.prm_of[int(fields["trial"])] = dict(fields.get("prm") or {})
        self.inner.emit(event, **fields)

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise ExportTimeout(f"the ONNX export took longer than the {seconds:.1f} s left of the job's budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _out_bytes(out_dir: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(out_dir):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _why_not(job: Job, trial: int | None, prm: dict[str, Any] | None) -> str | None:
    """Why no export can start, or None."""
    if trial is None:
        return "no trial reached a learning-curve point, so there are no weights to export"
    weights = job.out_dir / protocol.weights_name(trial)
    if prm is None or not weights.is_file():
        return f"the selected trial {trial} kept no weights (they could not be saved)"
    if _out_bytes(job.out_dir) + weights.stat().st_size > MAX_OUT_BYTES:
        return (f"the weights ({weights.stat().st_size >> 20} MiB) are too large to export next to them in "
                f"the sandbox's output directory (at most {MAX_OUT_BYTES >> 20} MiB in all)")
    left = job.budget.remaining()
    if left < MIN_EXPORT_S:
        return (f"only {max(left, 0):.1f} s of the job's time budget were left after training (an export needs "
                f"at least {MIN_EXPORT_S:g} s); raise time_budget_s")
    return None


def _rebuild(job: Job, trial: int, prm: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The trial's Net on the CPU with its kept weights, in eval mode, and an input batch like its test
    batches (the first validation images through the trial's transform, without augmentation)."""
    from safetensors.torch import load_file

    spec = job.spec
    tf = parse_transform(prm["transform"], spec.image_shape[-1])
    cpu = torch.device("cpu")
    in_shape = (1, int(spec.image_shape[0]), tf.size, tf.size)
    model = netops.build_net(job.module, in_shape, (int(spec.num_classes),), prm, cpu, protocol.STAGE_EVALUATE)
    model.load_state_dict(load_file(str(job.out_dir / protocol.weights_name(trial))))
    model.eval()
    images = job.data.val_x[:DUMMY_BATCH].to(cpu)
    dummy = apply_transform(images, tf, job.data.mean.to(cpu), job.data.std.to(cpu), train=False)
    return model, dummy


def _export_dynamo(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (dummy,), str(path), dynamo=True, external_data=False, verbose=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))


def _export_torchscript(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its DeprecationWarning and tracer warnings go to the job's log
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _root_cause(exc: BaseException) -> str:
    """The innermost cause, described: the dynamo exporter wraps the real reason (an op without an ONNX
    function, a data-dependent branch) in two layers of generic advice, with terminal colour codes."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return re.sub(r"\x1b\[[0-9;]*m", "", describe(exc))


EXPORTERS = (("dynamo", _export_dynamo), ("torchscript", _export_torchscript))


def _export(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> tuple[str | None, list[str]]:
    """The first exporter that writes a file onnx.checker accepts, and the errors of those before it."""
    import onnx

    errors: list[str] = []
    for name, export in EXPORTERS:
        path.unlink(missing_ok=True)
        try:
            with torch.no_grad():
                export(model, dummy, path)
            onnx.checker.check_model(str(path))
            return name, errors
        except ExportTimeout:
            raise
        except BaseException as exc:  # noqa: BLE001 - model code and the exporters may raise anything
            errors.append(f"{name} exporter: {_root_cause(exc)}"[:ERROR_CHARS])
    path.unlink(missing_ok=True)
    return None, errors


def export_selected(job: Job, trial: int | None, prm_of: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Export `trial` (the search's best) and emit the `onnx` event; returns its fields. Never raises for
    the model's sake: every failure becomes the event's `error`."""
    prm = prm_of.get(trial) if trial is not None else None
    fields: dict[str, Any] = {"trial": trial}
    error = _why_not(job, trial, prm)
    if error is None and trial is not None and prm is not None:
        fields.update(_try_export(job, trial, prm))
    else:
        fields["error"] = error
    job.emitter.emit(protocol.EVENT_ONNX, **fields)
    return fields


def _try_export(job: Job, trial: int, prm: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    path = job.out_dir / protocol.onnx_name(trial)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _alarm(job.budget.remaining() - ALARM_MARGIN_S):
            model, dummy = _rebuild(job, trial, prm)
            exporter, errors = _export(model, dummy, path)
    except ExportTimeout as exc:
        path.unlink(missing_ok=True)
        return {"error": f"{exc}; raise time_budget_s to leave time for it"}
    except ImportError as exc:
        return {"error": f"this sandbox cannot export ONNX ({describe(exc)}); the sandbox image needs the onnx "
                         "and onnxscript packages (rebuild it: lemur-agent-server sandbox build)"}
    except BaseException as exc:  # noqa: BLE001 - the rebuild runs model code; the alarm is one of these too
        path.unlink(missing_ok=True)
        return {"error": f"the model could not be rebuilt for the export: {describe(exc)}"[:ERROR_CHARS]}
    seconds = round(time.monotonic() - t0, 3)
    if exporter is None:
        return {"error": "no ONNX exporter could export this model: " + "; ".join(errors), "seconds": seconds}
    return {"file": protocol.onnx_name(trial), "exporter": exporter, "bytes": path.stat().st_size,
            "seconds": seconds, "fallback_from": errors or None}
