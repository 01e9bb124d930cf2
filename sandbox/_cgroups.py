"""One cgroup per sandbox job (cgroup v1 or v2): limits, oom detection, kill-everything, removal.

Why cgroups rather than rlimits: a cgroup bounds the *whole job* (every process and thread the
submission starts, tmpfs pages included), it tells us afterwards whether the kernel's OOM killer
fired, and it lists every pid of the job even after a double fork, so nothing can outlive the job.
rlimits are per process and RLIMIT_NPROC does nothing for uid 0; they are only the fallback.

Placement: the job's cgroup is created *inside the server's own cgroup* of each controller (read
from /proc/self/cgroup), so a sandbox can never exceed the limits the server itself runs under.
The directory name is ``lemur-sbx-<job>-t<server start ticks>-o<server pid>-<random>``: the owner's
pid *and* start time (PIDs are reused, start times are not, see `sandbox._owner`) let `sweep_orphans`
remove only cgroups whose server is gone, never those of a concurrent server. (The name still ends in
the older ``-o<pid>-<random>`` form, which older servers read by pid alone; such a name without a start
time counts as alive while that pid runs in the cgroup the job dir sits in.)
A kill goes only to a process that is a member of the job's cgroup at the moment of the signal
(checked through a pidfd), never to a pid that was merely listed there a moment before.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from sandbox import _owner

CGROUP_MOUNT = Path("/sys/fs/cgroup")
PREFIX = "lemur-sbx-"
_V1_REQUIRED = ("memory", "pids")
_V1_OPTIONAL = ("cpu", "freezer")
_CPU_PERIOD_US = 100_000
_OWNER_RE = re.compile(r"(?:-t(\d+))?-o(\d+)-[0-9a-f]{6}$")  # start ticks (absent in old names), pid


def version() -> str | None:
    """"v1" when the memory and pids controllers are mounted as v1 hierarchies, "v2" for a unified
    hierarchy at /sys/fs/cgroup, else None."""
    if all((CGROUP_MOUNT / c / "cgroup.procs").exists() for c in _V1_REQUIRED):
        return "v1"
    if (CGROUP_MOUNT / "cgroup.controllers").exists():
        return "v2"
    return None


def _own_paths(pid: int | str = "self") -> dict[str, str]:
    """controller name (or "" for the v2 hierarchy) -> the cgroup path of this process (or of `pid`)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def base_dirs(ver: str) -> dict[str, Path]:
    """Where job cgroups are created: the server's own cgroup, per controller."""
    own = _own_paths()
    if ver == "v2":
        return {"": CGROUP_MOUNT / own.get("", "/").lstrip("/")}
    return {
        c: CGROUP_MOUNT / c / own.get(c, "/").lstrip("/")
        for c in (*_V1_REQUIRED, *_V1_OPTIONAL)
        if (CGROUP_MOUNT / c / "cgroup.procs").exists()
    }


def job_name(job: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", job)[:48] or "job"
    pid = os.getpid()
    return f"{PREFIX}{safe}-t{_owner.start_ticks(pid)}-o{pid}-{secrets.token_hex(3)}"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


@dataclasses.dataclass
class JobCgroup:
    """The cgroup(s) of one job. `dirs` maps controller ("" for v2) to its directory."""

    version: str
    dirs: dict[str, Path]
    applied: dict[str, str]  # human-readable limits for the isolation report

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids: int, cpus: float) -> JobCgroup:
        """Create the job cgroup with its limits. Raises OSError (after undoing) if it cannot."""
        ver = version()
        if ver is None:
            raise OSError("no cgroup v1 memory+pids or v2 hierarchy mounted")
        cg = cls(ver, {}, {})
        try:
            if ver == "v1":
                cg._create_v1(name, memory_bytes, pids, cpus)
            else:
                cg._create_v2(name, memory_bytes, pids, cpus)
        except OSError:
            cg.remove()
            raise
        return cg

    def _create_v1(self, name: str, memory_bytes: int, pids: int, cpus: float) -> None:
        bases = base_dirs("v1")
        for c, base in bases.items():
            d = base / name
            try:
                d.mkdir()
            except OSError:
                if c in _V1_REQUIRED:
                    raise
                continue
            self.dirs[c] = d
        mem = self.dirs["memory"]
        _write(mem / "memory.limit_in_bytes", str(memory_bytes))
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # without it swap would extend the limit (no swap on most servers)
            _write(memsw, str(memory_bytes))
        self.applied["memory_limit"] = f"cgroup v1 {_gib(memory_bytes)}" + (
            " (memory+swap)" if memsw.exists() else "")
        _write(self.dirs["pids"] / "pids.max", str(pids))
        self.applied["pids_limit"] = f"cgroup v1 {pids}"
        if "cpu" in self.dirs:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(max(1000, int(cpus * _CPU_PERIOD_US))))
            self.applied["cpu_quota"] = f"cgroup v1 {cpus:g} CPU"
        else:
            self.applied["cpu_quota"] = "none (no writable cpu controller)"

    def _create_v2(self, name: str, memory_bytes: int, pids: int, cpus: float) -> None:
        base = base_dirs("v2")[""]
        wanted = {"memory", "pids", "cpu"} & set((base / "cgroup.controllers").read_text().split())
        if not {"memory", "pids"} <= wanted:
            raise OSError("v2: memory/pids controllers not delegated to the server's cgroup")
        # Fails with EBUSY when the server's cgroup has processes and is not the root: then fall back.
        _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))
        d = base / name
        d.mkdir()
        self.dirs[""] = d
        _write(d / "memory.max", str(memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(pids))
        self.applied["memory_limit"] = f"cgroup v2 {_gib(memory_bytes)}"
        self.applied["pids_limit"] = f"cgroup v2 {pids}"
        if "cpu" in wanted:
            _write(d / "cpu.max", f"{max(1000, int(cpus * _CPU_PERIOD_US))} {_CPU_PERIOD_US}")
            self.applied["cpu_quota"] = f"cgroup v2 {cpus:g} CPU"
        else:
            self.applied["cpu_quota"] = "none (cpu controller not delegated)"

    def procs_files(self) -> list[Path]:
        """The cgroup.procs files a process writes its pid into to join the job."""
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files():
            try:
                out.update(int(x) for x in f.read_text().split())
            except OSError:
                pass
        return out

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process of the job until none is left. True when the cgroup is empty.

        v2 has cgroup.kill (atomic). On v1 a fork bomb could fork between listing and killing, so
        the job is frozen first (freezer controller) when it is available; frozen tasks die on thaw.
        """
        kill_file = self.dirs.get("", Path("/nonexistent")) / "cgroup.kill"
        if kill_file.exists():
            _try_write(kill_file, "1")
        frozen = self._freeze()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                pids = self.pids()
                if not pids:
                    return True
                for pid in pids:
                    _kill_member(pid, self.dirs.items())
                if frozen:
                    frozen = not self._thaw()
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
        finally:
            if frozen:
                self._thaw()

    def _freeze(self) -> bool:
        d = self.dirs.get("freezer")
        if d is None or not _try_write(d / "freezer.state", "FROZEN"):
            return False
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                if (d / "freezer.state").read_text().strip() == "FROZEN":
                    return True
            except OSError:
                return False
            time.sleep(0.002)
        return True  # partly frozen is still better than not; thawed in kill_all

    def _thaw(self) -> bool:
        d = self.dirs.get("freezer")
        return d is not None and _try_write(d / "freezer.state", "THAWED")

    def oom_killed(self, died_of_sigkill: bool) -> bool:
        """Did the kernel's OOM killer act inside this job? v1: memory.oom_control's oom_kill
        counter (kernel >= 4.13), else a hit limit (failcnt) together with a SIGKILL death."""
        if self.version == "v2":
            return _counter(self.dirs[""] / "memory.events", "oom_kill") > 0
        mem = self.dirs.get("memory")
        if mem is None:
            return False
        ctl = mem / "memory.oom_control"
        if _counter(ctl, "oom_kill") > 0 or _counter(ctl, "under_oom") > 0:
            return True
        if _counter(ctl, "oom_kill", missing=-1) == 0:  # the kernel has the counter: it says no
            return False
        return died_of_sigkill and any(
            _read(mem / f).strip() not in ("", "0") for f in ("memory.failcnt", "memory.memsw.failcnt"))

    def remove(self) -> None:
        """Kill what is left and remove the directories (retries: rmdir fails while tasks exit)."""
        if self.pids():
            self.kill_all()
        for controller, d in list(self.dirs.items()):
            _rmdir_retry(controller, d)
        self.dirs.clear()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _counter(path: Path, key: str, missing: int = 0) -> int:
    """The value of `key` in a flat-keyed cgroup file ("key value" lines), `missing` if absent."""
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return missing


def _try_write(path: Path, value: str) -> bool:
    try:
        _write(path, value)
        return True
    except OSError:
        return False


def _cgroup_path(controller: str, d: Path) -> str:
    """`d` as /proc/<pid>/cgroup writes it for `controller`."""
    rel = d.relative_to(CGROUP_MOUNT / controller if controller else CGROUP_MOUNT)
    return "/" if rel == Path(".") else f"/{rel}"


def is_member(pid: int, dirs: Iterable[tuple[str, Path]]) -> bool:
    """True when process `pid` is in one of the cgroups `dirs` ((controller, directory) pairs) now."""
    try:
        paths = _own_paths(pid)
    except (OSError, ValueError):
        return False
    return any(paths.get(c) == _cgroup_path(c, d) for c, d in dirs)


def _kill_member(pid: int, dirs: Iterable[tuple[str, Path]]) -> None:
    """SIGKILL `pid` only if it is a member of the job's cgroup. Through a pidfd, the membership is
    checked on the very process that gets the signal, so a pid reused in between is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (kernel < 5.3): check, then kill by pid (a narrow race remains)
        if is_member(pid, dirs):
            _sigkill(pid)
        return
    try:
        if is_member(pid, dirs):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        os.close(fd)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmdir_retry(controller: str, d: Path, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            d.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            for pid in _pids_of(d):
                _kill_member(pid, [(controller, d)])
            time.sleep(0.01)


def _pids_of(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _owner_alive(name: str, controller: str, base: Path) -> bool:
    """Whether the server that created job cgroup `name` (found in `base`, the server cgroup of
    `controller`) still runs: its pid with the start time in the name; for an old name without one,
    its pid running in `base` (a reused pid elsewhere does not count)."""
    m = _OWNER_RE.search(name)
    if m is None:
        return False
    ticks, pid = m.group(1), int(m.group(2))
    if ticks is not None:
        return _owner.is_running(pid, ticks)
    return pid == os.getpid() or is_member(pid, [(controller, base)])


def sweep_orphans() -> int:
    """Kill and remove job cgroups whose owning server process is gone. Returns how many jobs."""
    ver = version()
    if ver is None:
        return 0
    try:
        bases = base_dirs(ver)
    except OSError:
        return 0
    jobs: dict[str, dict[str, Path]] = {}
    for controller, base in bases.items():
        try:
            entries = [e for e in base.iterdir() if e.name.startswith(PREFIX) and e.is_dir()]
        except OSError:
            continue
        for d in entries:
            if not _owner_alive(d.name, controller, base):
                jobs.setdefault(d.name, {})[controller] = d
    for dirs in jobs.values():
        JobCgroup(ver, dirs, {}).remove()  # the freezer (when present) makes the kill race-free
    return len(jobs)
