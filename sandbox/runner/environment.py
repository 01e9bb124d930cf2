"""What the sandbox ran on, reported once per sandbox in the `ready` event: enough to repeat a run.

Why inside the sandbox: the libraries, the interpreter, the CPU and the GPU a run used are the
sandbox's (a Docker image has its own torch), not the server's. The host treats every value as a
hint (the model runs in this interpreter) and stores a bounded copy on each run
(`lemur_agent_server.evaluator.archive.run_environment`).

`harness` is a digest of the runner's own source files (this package and the host/runner contract):
two runs with the same digest ran the same training loop, loader and evaluation passes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "torchvision", "numpy", "optuna", "safetensors")
_HARNESS_FILES = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "protocol.py")


def library_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def harness_digest() -> str:
    """sha256 (16 hex digits) over the runner's Python sources, in a fixed order."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for entry in _HARNESS_FILES:
        files += sorted(entry.glob("*.py")) if entry.is_dir() else [entry]
    for path in files:
        try:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        except OSError:
            digest.update(path.name.encode() + b"\0missing\0")
    return digest.hexdigest()[:16]


def device_facts(device: torch.device) -> dict[str, Any]:
    """Name and compute capability of the device (the CPU model on CPU)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device_name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return {"device_name": cpu_model(), "compute_capability": None}


def describe(device: torch.device) -> dict[str, Any]:
    """The sandbox's environment: interpreter, library versions, device, CPU and threads, harness digest."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        **{name: library_version(name) for name in LIBRARIES},
        "device": str(device),
        **device_facts(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "harness": harness_digest(),
    }


def make_deterministic() -> None:
    """Deterministic kernels where torch has them (a warning, not an error, where it has none), cuDNN's
    autotuner off (it picks kernels by timing, so runs differ). Seeding is done per trial regardless
    (`trainer.seed_everything`), and the loader shuffles from the trial's seeded generator."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
