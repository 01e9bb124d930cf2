"""The cgroup orphan sweep does not trust a PID alone: real processes in real job cgroups.

A job cgroup is named after the server that made it. PIDs are reused, so the sweep checks the owner's
start time (or, for names without one, that the pid still lives in the server's cgroup), and a kill
reaches only processes that are members of the job's cgroup.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from sandbox import _cgroups, _owner


@pytest.fixture(autouse=True)
def cgroups_here() -> None:
    assert _cgroups.version() is not None, "CI has cgroups (v1 memory+pids or v2)"


@pytest.fixture
def cleanup() -> Iterator[list[object]]:
    """Processes and cgroups a test made, removed afterwards whatever happened."""
    made: list[object] = []
    yield made
    for thing in reversed(made):
        if isinstance(thing, subprocess.Popen):
            thing.kill()
            thing.wait()
        elif isinstance(thing, _cgroups.JobCgroup):
            thing.remove()


def _sleeper_in(cg: _cgroups.JobCgroup | None, made: list[object]) -> subprocess.Popen[bytes]:
    """A real process that joins `cg` itself (as the sandbox's shell does), or stays where we are."""
    join = "".join(f"echo $$ > {f} && " for f in cg.procs_files()) if cg is not None else ""
    proc = subprocess.Popen(["/bin/sh", "-c", f"{join}exec sleep 1000"])
    made.append(proc)
    deadline = time.monotonic() + 5
    while cg is not None and proc.pid not in cg.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def _job_cgroup(name: str, made: list[object]) -> _cgroups.JobCgroup:
    cg = _cgroups.JobCgroup.create(name, 64 << 20, 16, 1.0)
    made.append(cg)
    return cg


def _gone(proc: subprocess.Popen[bytes], timeout_s: float = 3.0) -> bool:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_job_names_carry_the_servers_start_time() -> None:
    name = _cgroups.job_name("job-1")
    assert f"-t{_owner.start_ticks(os.getpid())}-o{os.getpid()}-" in name


def test_a_reused_pid_does_not_keep_an_old_orphan(cleanup: list[object]) -> None:
    """An old-style name (`-o<pid>-<random>`, no start time) whose pid now belongs to a process living
    in another cgroup (not the server cgroup the job sits in): an orphan, reaped; the process that
    reused the pid is not touched."""
    elsewhere = _job_cgroup(f"lemurtest-elsewhere-{secrets.token_hex(3)}", cleanup)
    reuser = _sleeper_in(elsewhere, cleanup)
    orphan = _job_cgroup(f"{_cgroups.PREFIX}old-o{reuser.pid}-{secrets.token_hex(3)}", cleanup)
    inside = _sleeper_in(orphan, cleanup)
    assert _cgroups.sweep_orphans() >= 1
    assert _gone(inside)
    assert all(not d.exists() for d in orphan.dirs.values())
    assert reuser.poll() is None


def test_the_owners_start_time_decides(cleanup: list[object]) -> None:
    """Same live pid in both names: with its real start time the job is kept, with another one (the pid
    was reused after the server died) it is reaped."""
    owner = _sleeper_in(None, cleanup)
    ticks = _owner.start_ticks(owner.pid)
    live = _job_cgroup(f"{_cgroups.PREFIX}live-t{ticks}-o{owner.pid}-{secrets.token_hex(3)}", cleanup)
    dead = _job_cgroup(f"{_cgroups.PREFIX}dead-t{int(ticks) - 1}-o{owner.pid}-{secrets.token_hex(3)}", cleanup)
    in_live, in_dead = _sleeper_in(live, cleanup), _sleeper_in(dead, cleanup)
    assert _cgroups.sweep_orphans() >= 1
    assert _gone(in_dead) and all(not d.exists() for d in dead.dirs.values())
    assert in_live.poll() is None and live.pids() == {in_live.pid}
    assert owner.poll() is None


def test_a_kill_reaches_members_only(cleanup: list[object]) -> None:
    cg = _job_cgroup(f"{_cgroups.PREFIX}members-t1-o{os.getpid()}-{secrets.token_hex(3)}", cleanup)
    member, outsider = _sleeper_in(cg, cleanup), _sleeper_in(None, cleanup)
    for pid in (member.pid, outsider.pid):
        _cgroups._kill_member(pid, cg.dirs.items())
    assert _gone(member)
    assert outsider.poll() is None
