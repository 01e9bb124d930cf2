"""Who owns a sandbox: a server process named so that a reused PID cannot pass for it.

Why not the PID alone: PIDs are recycled. A server that crashed leaves sandboxes (containers, job
cgroups) labelled with its PID; once that PID belongs to some other process, a check by PID alone
would keep the orphans forever, and any kill by PID risks an unrelated process. A process is named
by its PID *and* its start time (field 22 of /proc/<pid>/stat, clock ticks since boot), which no
later process with the same PID shares; the boot id makes the name unique across reboots too (a
container survives a reboot, a process does not).
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def boot_id() -> str:
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def start_ticks(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ("" when there is no such process).

    Field 22 of /proc/<pid>/stat; the fields are counted after the command name, which is in
    parentheses and may itself hold spaces and parentheses (hence the split at the last ')')."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return ""
    fields = raw.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""  # fields[0] is field 3 (state)


def is_running(pid: int, ticks: str) -> bool:
    """True when process `pid` exists and started at `ticks` (so it is the process that was named)."""
    return pid > 0 and bool(ticks) and start_ticks(pid) == ticks


def owner_id(pid: int | None = None) -> str:
    """`<boot id>:<pid>:<start ticks>` of this process (or of `pid`)."""
    pid = os.getpid() if pid is None else pid
    return f"{boot_id()}:{pid}:{start_ticks(pid)}"


def owner_alive(owner: str) -> bool:
    """True when the process named by `owner_id()` still runs (same boot, PID and start time)."""
    try:
        boot, pid, ticks = owner.rsplit(":", 2)
    except ValueError:
        return False
    return boot == boot_id() and pid.isdigit() and is_running(int(pid), ticks)
