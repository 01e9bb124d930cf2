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


def prestart_depth(settings: Settings) -> int:
    """How many warm sandboxes to keep: `prestart_per_slot` per slot, two by default (0: none). Why two: a
    warm sandbox imports torch while the slots train, on the same CPUs; with one per slot, the refill made
    at a job's start is often still importing when that slot's next job comes (the 2-slot bench on 2 CPUs:
    3.9 s from start to ready)."""
    return max(0, settings.prestart_per_slot) * settings.slot_count


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

            # warm containers, two per slot: the next jobs' sandboxes have torch imported already
            return DockerBackend(image=settings.image, prestart=prestart_depth(settings) > 0,
                                 prestart_slots=max(1, prestart_depth(settings)),
                                 jobs_root=settings.jobs_dir)
        if kind == "docker":
            raise RuntimeError(
                f"--sandbox docker: no Docker engine answers, or the image {settings.image} is missing. "
                "Start dockerd and run `lemur-agent-server sandbox build`, or use --sandbox process.")
        log.info("Docker not usable here; using the process sandbox")
    from sandbox.process_backend import ProcessBackend

    # warm sandboxes (with namespaces), two per slot: the next jobs' runners have torch imported already
    return ProcessBackend(hidden_paths=hidden_paths(settings), python=sys.executable,
                          prestart=prestart_depth(settings) > 0, prestart_slots=max(1, prestart_depth(settings)),
                          jobs_root=settings.jobs_dir)
