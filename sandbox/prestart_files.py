"""What both pre-start pools share: the key a warm sandbox fixed at creation, and the hand-over of a
job's files into a warm sandbox's own job dir.

Why a hand-over by renames: a sandbox's mounts (Docker bind mounts, or the process backend's binds
inside its mount namespace) are fixed when it starts, so a warm sandbox is started on a job dir of its
own (`<jobs_root>/.lemur-prestart-.../{in,out}`). A bind mount follows a directory through a rename,
so the job's files move into those dirs and the dirs are renamed into the job's dir in place of the
evaluator's; `spec.json` moves in last, the signal that starts the job. The caller's `JobPaths` stay valid.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from sandbox.backend import JobPaths, Limits
from sandbox.protocol import SPEC_FILE

SLOT_PREFIX = ".lemur-prestart-"


def pool_key(data_dir: Path | str, limits: Limits) -> tuple[Any, ...]:
    """What a warm sandbox fixed at creation; a job can adopt it only when its own key is equal (the
    wall clock is not in it: a warm sandbox's clock starts at adoption)."""
    return (os.path.realpath(data_dir), limits.memory_bytes, float(limits.cpus), limits.pids, limits.gpu,
            limits.out_cap_bytes, limits.log_cap_bytes)


def worth_warming(paths: JobPaths) -> bool:
    """Whether the next job may want a sandbox like this one's: not when its data dir lies inside its own
    job dir (a calibration's empty `nodata` dir), which is gone with the job."""
    return not os.path.realpath(paths.data_dir).startswith(os.path.realpath(paths.job_dir) + os.sep)


def same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def make_slot(jobs_root: Path, name: str) -> Path:
    """A fresh warm job dir `<jobs_root>/<SLOT_PREFIX><name>/{in,out}` with the modes of a job's dir."""
    slot = jobs_root / f"{SLOT_PREFIX}{name}"
    jobs_root.mkdir(parents=True, exist_ok=True)
    (slot / "in").mkdir(parents=True)
    (slot / "out").mkdir()
    os.chmod(slot, 0o755)
    os.chmod(slot / "in", 0o755)
    return slot


def move_job_into(slot: Path, paths: JobPaths) -> None:
    """Move the job's files into the warm dirs, swap those dirs into the job dir, spec.json last."""
    slot_in, slot_out = slot / "in", slot / "out"
    tag = secrets.token_hex(4)
    old_in, old_out = paths.job_dir / f".old-in-{tag}", paths.job_dir / f".old-out-{tag}"
    try:
        for entry in os.listdir(paths.in_dir):
            if entry != SPEC_FILE:
                os.rename(paths.in_dir / entry, slot_in / entry)
        for entry in os.listdir(paths.out_dir):
            os.rename(paths.out_dir / entry, slot_out / entry)
        os.rename(paths.in_dir, old_in)
        os.rename(slot_in, paths.in_dir)
        os.rename(paths.out_dir, old_out)
        os.rename(slot_out, paths.out_dir)
        os.rename(old_in / SPEC_FILE, paths.in_dir / SPEC_FILE)  # the go signal, last
    finally:
        for d in (old_in, old_out):
            with contextlib.suppress(OSError):
                d.rmdir()
