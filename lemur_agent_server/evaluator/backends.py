"""Choosing the isolation backend: `--sandbox auto|docker|process`.

auto picks Docker when the engine answers and the sandbox image exists, else the process backend;
every result records which isolation really ran (`Exit.isolation`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lemur_agent_server.config import Settings
from sandbox import datasets
from sandbox.backend import Backend

log = logging.getLogger(__name__)


def hidden_paths(settings: Settings) -> list[Path]:
    """What a submission must never see: the zoo and its state dir (jobs, weights, dataset cache with
    the test labels), the raw dataset root and every raw dataset file we know of."""
    paths = [settings.state_dir, settings.data_root, settings.cache_dir, settings.jobs_dir]
    for info in datasets.known_datasets():
        try:
            paths.extend(datasets.source_paths(info.name, settings.data_root))
        except Exception:  # noqa: BLE001 - a dataset we cannot locate has nothing to hide
            continue
    unique: list[Path] = []
    for p in paths:
        p = Path(p)
        if p not in unique:
            unique.append(p)
    return unique


def docker_usable(settings: Settings) -> bool:
    try:
        from sandbox.docker_backend import DockerBackend
    except ImportError:
        return False
    try:
        return bool(DockerBackend.available(settings.image))
    except Exception:  # noqa: BLE001 - any engine error means "not usable"
        return False


def choose_backend(settings: Settings) -> Backend:
    kind = settings.sandbox
    if kind not in ("auto", "docker", "process"):
        raise ValueError(f"--sandbox must be auto, docker or process, not {kind!r}")
    if kind in ("auto", "docker"):
        if docker_usable(settings):
            from sandbox.docker_backend import DockerBackend

            # one warm container per slot: the next job's sandbox has torch imported already
            return DockerBackend(image=settings.image, prestart=True, prestart_slots=settings.slot_count,
                                 jobs_root=settings.jobs_dir)
        if kind == "docker":
            raise RuntimeError(
                f"--sandbox docker: no Docker engine answers, or the image {settings.image} is missing. "
                "Start dockerd and run `lemur-agent-server sandbox build`, or use --sandbox process.")
        log.info("Docker not usable here; using the process sandbox")
    from sandbox.process_backend import ProcessBackend

    return ProcessBackend(hidden_paths=hidden_paths(settings), python=sys.executable)
