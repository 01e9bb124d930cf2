"""Entry point inside the sandbox: `python -m sandbox.runner /path/spec.json` (cwd = the out dir).

Warm mode, `python -m sandbox.runner --wait /path/spec.json` (a pre-started container): import the heavy
stack (and initialise CUDA when a GPU is visible) first, print `WAIT_MARKER`, write nothing, poll for
spec.json (the host moves it in last) and then run that one job, its time budget counting from the
moment the spec was seen. Exits 0 without output if no spec arrives within $LEMUR_RUNNER_WAIT_MAX_S
seconds (default 3600). This is the pre-start contract `sandbox.docker_backend` documents.

Sequence: `ready` -> load and check the model (`check`) -> in train mode, the Optuna trials
(`trial_start`, `first_step`, `point`..., `trial_end`) -> with `export_onnx`, `onnx` -> `done`. Any
failure that stops the job becomes one `error` event {stage, kind, message, traceback}.

Exit status: 0 after `done`, 2 after an `error` event, 3 if even the error could not be reported
normally. The host must not trust any of it (the model runs in this interpreter); it is a hint only.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # the time budget counts from here (before the heavy imports)

import contextlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from sandbox import protocol
from sandbox.runner.emit import Emitter
from sandbox.runner.errors import RunnerFailure, describe, traceback_tail


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


WAIT_MARKER = "lemur-runner: waiting"
WAIT_POLL_S = 0.005
WAIT_MAX_ENV = "LEMUR_RUNNER_WAIT_MAX_S"


def _warm_up() -> None:
    """What a warm sandbox pays before its job: the imports, and CUDA's initialisation if a GPU is lent."""
    import numpy  # noqa: F401
    import optuna  # noqa: F401
    import safetensors  # noqa: F401
    import torch

    with contextlib.suppress(ImportError):
        import torchvision  # noqa: F401
    with contextlib.suppress(Exception):  # what _run imports before the first step (~1 s of CPU)
        import torch._dynamo  # noqa: F401
    if os.environ.get("NVIDIA_VISIBLE_DEVICES", "void") not in ("", "void", "none") and torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")


def _wait_for(spec_path: Path) -> bool:
    """Poll until `spec_path` exists; False when the wait's limit passed first."""
    deadline = time.monotonic() + float(os.environ.get(WAIT_MAX_ENV, "3600"))
    while not spec_path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(WAIT_POLL_S)
    return True


def _validate(spec: protocol.JobSpec) -> None:
    """Reject malformed specs before any model code runs (the host should have caught these)."""
    problems: list[str] = []
    if spec.protocol != protocol.PROTOCOL_VERSION:
        problems.append(f"protocol {spec.protocol} but this runner speaks {protocol.PROTOCOL_VERSION}")
    if spec.mode not in (protocol.MODE_CHECK, protocol.MODE_TRAIN, protocol.MODE_ANALYZE, protocol.MODE_CALIBRATE):
        problems.append(f"mode must be 'check', 'train', 'analyze' or 'calibrate', got {spec.mode!r}")
    for name in list(spec.transforms) + (
        [spec.fixed_prm["transform"]] if "transform" in spec.fixed_prm else []
    ):
        try:
            protocol.parse_transform(name)
        except ValueError as exc:
            problems.append(str(exc))
    problems += protocol.validate_search_space(spec.search_space)
    if len(spec.image_shape) != 3 or spec.num_classes < 1 or spec.epochs <= 0:
        problems.append("image_shape must be [C, H, W], num_classes >= 1 and epochs > 0")
    if problems:
        raise RunnerFailure(
            protocol.KIND_CONTRACT, "invalid job spec: " + "; ".join(problems), protocol.STAGE_CHECK
        )


def _run(spec: protocol.JobSpec, emitter: Emitter, stage: list[str]) -> dict[str, Any]:
    import numpy
    import optuna
    import torch

    from sandbox.runner import environment

    torch.set_num_threads(max(1, int(spec.threads)))
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunnerFailure(protocol.KIND_SANDBOX, "spec asks for cuda but no GPU is visible", stage[0])
    device = torch.device(spec.device)
    emitter.emit(
        protocol.EVENT_READY,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "numpy": numpy.__version__,
            "optuna": optuna.__version__,
            "protocol": protocol.PROTOCOL_VERSION,
        },
        import_s=round(time.monotonic() - _STARTED, 4),
        threads=torch.get_num_threads(),
        environment=environment.describe(device),
    )
    _validate(spec)
    if spec.deterministic:
        environment.make_deterministic()
    if spec.mode == protocol.MODE_ANALYZE:  # many models, one event each (sandbox/runner/analyze.py)
        from sandbox.runner.analyze import run_analyze

        return run_analyze(spec, emitter, device)
    if spec.mode == protocol.MODE_CALIBRATE:  # the fixed reference workload, no model (sandbox/runner/calibrate.py)
        from sandbox.runner.calibrate import run_calibrate

        return run_calibrate(spec, emitter, device)

    from sandbox.runner.budget import Budget
    from sandbox.runner.check import run_check
    from sandbox.runner.contract import load_and_check

    module, declared = load_and_check(spec.model_path)
    with contextlib.suppress(Exception):  # warm-up: every optimizer's __init__ imports torch._dynamo
        import torch._dynamo  # (~1 s of CPU); done here, not inside the model's first train_setup()
    run_check(spec, module, declared, device, emitter)
    if spec.mode == "check":
        return {"best_trial": None}

    from sandbox.runner.loader import load_data
    from sandbox.runner.search import run_search
    from sandbox.runner.trainer import Job

    stage[0] = protocol.STAGE_TRAIN
    try:
        data = load_data(
            spec.data_dir,
            spec.mean,
            spec.std,
            spec.val_fraction,
            spec.split_seed,
            spec.max_train_samples,
            spec.max_test_samples,
            device,
        )
    except (OSError, ValueError) as exc:
        raise RunnerFailure(
            protocol.KIND_SANDBOX,
            f"cannot load the dataset from {spec.data_dir}: {describe(exc)}",
            stage[0],
            traceback_tail(exc),
        ) from exc
    if len(data.train_x) < 2 or (len(data.val_x) < 1 and spec.val_fraction > 0):
        raise RunnerFailure(protocol.KIND_SANDBOX, f"too little data: {data.sizes()}", stage[0])
    out_dir = Path(spec.out_dir)
    (out_dir / "preds").mkdir(parents=True, exist_ok=True)
    recorder = None
    if spec.export_onnx:  # the export rebuilds the selected trial's Net: it needs that trial's prm
        from sandbox.runner.onnx_export import PrmRecorder

        emitter = recorder = PrmRecorder(emitter)
    job = Job(
        spec=spec,
        module=module,
        data=data,
        device=device,
        emitter=emitter,
        budget=Budget(_STARTED, float(spec.time_budget_s)),
        out_dir=out_dir,
    )
    done = run_search(job, declared)
    if recorder is not None:
        from sandbox.runner.onnx_export import export_selected

        export_selected(job, done.get("best_trial"), recorder.prm_of)
    return done


def main(argv: list[str]) -> int:
    global _STARTED
    if len(argv) == 3 and argv[1] == "--wait":
        _warm_up()
        print(WAIT_MARKER, "for", argv[2], flush=True)
        if not _wait_for(Path(argv[2])):
            return 0
        _STARTED = time.monotonic()  # the job's budget counts from the moment its spec was seen
        argv = [argv[0], argv[2]]
        sys.argv[:] = argv  # the job sees the argv of a cold start
    if len(argv) != 2:
        print("usage: python -m sandbox.runner [--wait] /path/spec.json", file=sys.stderr)
        return 64
    try:
        spec = protocol.JobSpec.from_file(argv[1])
    except (OSError, ValueError, TypeError) as exc:  # report where the host looks: cwd is the out dir
        Emitter(Path.cwd(), _STARTED).emit(
            protocol.EVENT_ERROR,
            stage=protocol.STAGE_CHECK,
            kind=protocol.KIND_SANDBOX,
            message=f"unreadable spec: {describe(exc)}",
            traceback=traceback_tail(exc),
        )
        return 2
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emitter = Emitter(out_dir, _STARTED)
    try:
        return _report(spec, emitter)
    finally:
        emitter.close()


def _report(spec: protocol.JobSpec, emitter: Emitter) -> int:
    """Run the job and turn its outcome into the last event (`done` or `error`) and an exit status."""
    stage = [protocol.STAGE_CHECK]  # mutable: _run advances it
    try:
        done = _run(spec, emitter, stage)
    except RunnerFailure as fail:
        emitter.emit(
            protocol.EVENT_ERROR,
            stage=fail.stage or stage[0],
            kind=fail.kind,
            message=fail.message,
            traceback=fail.tb,
        )
        return 2
    except BaseException as exc:  # noqa: BLE001 - a runner bug or model code escaping our wrappers
        try:
            emitter.emit(
                protocol.EVENT_ERROR,
                stage=stage[0],
                kind=protocol.KIND_EXCEPTION,
                message=describe(exc),
                traceback=traceback_tail(exc),
            )
        except BaseException:  # noqa: BLE001 - nothing left to report with
            return 3
        return 2
    emitter.emit(protocol.EVENT_DONE, **done)
    return 0


if __name__ == "__main__":
    status = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is on disk (events fsynced, arrays closed). A normal interpreter exit with torch and
    # torch._dynamo loaded spends 1-2 s tearing down modules; the host waits for that, so skip it.
    os._exit(status)
