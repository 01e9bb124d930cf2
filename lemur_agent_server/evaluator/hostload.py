"""How busy the host was around a sandbox run, so a job can say when its timings are not to be trusted.

Why: the same model's half epoch took 0.25 s, 5.6 s and 12.7 s in three trials on a loaded machine.
An agent that compares accuracy-to-time across jobs must know when a number was measured while other
work (other jobs, other tenants of a VM: CPU steal) competed for the cores. We read the 1-minute load
average and /proc/stat's CPU counters (steal, idle) before and after each run; both are cheap and need
no privileges. Where /proc/stat is missing (not Linux) only the load average is used.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
# more runnable tasks than cores (per core, averaged over the run's two samples): the run shared its CPUs
LOAD_PER_CPU_NOISY = 1.0
STEAL_SHARE_NOISY = 0.05  # the hypervisor took more than 5 % of the CPU time


@dataclasses.dataclass(frozen=True)
class Sample:
    """One look at the host: unix time, 1-minute load average, and /proc/stat's aggregate jiffies."""

    t: float
    load1: float | None
    total_jiffies: int | None
    steal_jiffies: int | None


def _cpu_jiffies(stat: Path = PROC_STAT) -> tuple[int | None, int | None]:
    """(all, steal) jiffies of the `cpu` line; (None, None) where unreadable."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None, None
    if not first or first[0] != "cpu":
        return None, None
    values = [int(v) for v in first[1:] if v.isdigit()]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    return sum(values[:8]), values[7] if len(values) > 7 else 0


def sample(stat: Path = PROC_STAT) -> Sample:
    try:
        load1: float | None = os.getloadavg()[0]
    except OSError:
        load1 = None
    total, steal = _cpu_jiffies(stat)
    return Sample(time.time(), load1, total, steal)


def between(before: Sample, after: Sample, cpus: int | None = None) -> dict[str, Any]:
    """What the host looked like during a run: load per CPU and steal share, and whether that is noisy."""
    cpus = cpus or os.cpu_count() or 1
    loads = [s.load1 for s in (before, after) if s.load1 is not None]
    load = sum(loads) / len(loads) if loads else None
    steal = None
    if None not in (before.total_jiffies, after.total_jiffies, before.steal_jiffies, after.steal_jiffies):
        spent = after.total_jiffies - before.total_jiffies  # type: ignore[operator]
        steal = (after.steal_jiffies - before.steal_jiffies) / spent if spent > 0 else 0.0  # type: ignore[operator]
    reasons = []
    if load is not None and load / cpus > LOAD_PER_CPU_NOISY:
        reasons.append(f"load average {load:.1f} on {cpus} CPUs")
    if steal is not None and steal > STEAL_SHARE_NOISY:
        reasons.append(f"{steal:.0%} of the CPU time stolen by the hypervisor")
    return {"load_before": before.load1, "load_after": after.load1, "cpus": cpus,
            "steal_share": None if steal is None else round(steal, 4), "noisy": bool(reasons),
            "why": "; ".join(reasons) or None}
