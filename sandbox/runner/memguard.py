"""Make the sandbox's memory limit an allocation error the trial loop can catch, instead of a kill.

Why: under a cgroup memory limit (the Docker backend, the process backend with cgroups) the kernel's
OOM killer ends the whole sandbox with SIGKILL when a trial asks for too much memory, so the job fails
without a chance to retry that trial with a smaller batch. Capping the runner's own data segment
(RLIMIT_DATA: private writable memory, where tensors and arrays live) at the cgroup's limit makes such
an allocation fail inside the process (torch: RuntimeError "can't allocate memory"; Python:
MemoryError), which `errors.is_out_of_memory` recognises. RLIMIT_DATA rather than RLIMIT_AS because
mapped library files (libtorch is hundreds of MB) do not count against it. CPU only: the CUDA driver
maps large private regions when it starts, and GPU memory raises its own torch.OutOfMemoryError.
Without a cgroup the process backend already sets RLIMIT_AS, which fails allocations the same way.

The cap sits `headroom(limit)` below the cgroup's limit, not at it: the cgroup also charges the
runner's file pages (libtorch's code, the dataset's page cache), so private memory that grows to the
limit itself first makes the kernel evict the very code pages the runner executes and read them back,
over and over. On a host with a slow disk that thrashing outlasted the job's budget (a CI run: the
memory bomb timed out instead of failing with MemoryError); with the headroom the allocation fails
while the code pages still fit.
"""

from __future__ import annotations

import resource
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_FROM = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1
MIN_HEADROOM = 256 << 20  # libtorch's resident code and data files alone are about that
MAX_HEADROOM = 1 << 30


def headroom(limit: int) -> int:
    """Bytes of the cgroup's limit left for file pages: a quarter of it, within [256 MiB, 1 GiB]."""
    return max(MIN_HEADROOM, min(MAX_HEADROOM, limit // 4))


def _ancestors(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:n]) for n in range(len(parts), -1, -1)]


def _limit_files(proc_cgroup: str, root: Path) -> list[Path]:
    """The memory-limit files of this process's cgroup and its ancestors, v1 and v2, as mounted here."""
    files = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]  # a namespaced mount
    for line in proc_cgroup.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            files += [root / rel / "memory.max" for rel in _ancestors(path)]
        elif "memory" in controllers.split(","):
            files += [root / "memory" / rel / "memory.limit_in_bytes" for rel in _ancestors(path)]
    return files


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < UNLIMITED_FROM else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The smallest memory limit among this process's cgroups (bytes), or None when there is none."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        text = ""
    limits = [v for v in (_read_limit(f) for f in _limit_files(text, root)) if v is not None]
    return min(limits) if limits else None


def cap_data_segment(device_type: str) -> int | None:
    """On CPU, lower RLIMIT_DATA to `headroom` below the cgroup's memory limit; the cap now in force
    (None: none set)."""
    if device_type != "cpu":
        return None
    limit = cgroup_memory_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if limit is None:
        return None if soft == resource.RLIM_INFINITY else soft
    wanted = max(limit - headroom(limit), limit // 2)
    cap = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        return soft
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return cap
