"""The host side of the hostile suite: a world full of things to steal, listeners to reach, files to
poison, and the evidence, all read from outside the sandbox.

One `World` per test:
* its zoo, jobs, weights and dataset cache live under /var/tmp (not /tmp: the process sandbox has a
  private /tmp anyway, so hiding something under /tmp would prove nothing), next to a plain host
  directory (`host_dir`) with a world-connectable unix socket in it (the process sandbox covers
  /var/tmp whole, so it must not even see it);
* canaries with random values: an environment variable of the server, a file in the zoo's directory,
  another job's files, a file beside the test labels in the dataset cache. A submission is told where
  they are, never their values; after the job no value may appear in anything the server stored or
  returned (job, zoo dump, weights files);
* listeners on the host's loopback (TCP, UDP) and unix sockets (in /tmp, in `host_dir`, abstract),
  which must have received nothing;
* hashes of every file outside the job directory that a write could poison, compared after the job;
* a sampler that watches /proc for the submission's processes while the job runs (the fork bomb's
  size, the daemons it starts), and the check that none is left afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import stat
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.hostile.submissions import Ctx

CANARY_ENV = "LEMUR_SECRET_CANARY"
STATE_FILES = ("zoo.sqlite", "zoo.sqlite-wal", "zoo.sqlite-shm", "zoo.sqlite-journal")
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def _digest(path: Path) -> str:
    try:
        if path.is_symlink():
            return "link:" + os.readlink(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        return f"error:{e.errno}"


def _tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file and directory under root (hash for files), except the `skip` subtrees."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for d in dirnames:
            out[str(here / d)] = "dir"
        for f in filenames:
            if here / f not in skip:
                out[str(here / f)] = _digest(here / f)
    return out


def our_processes(mark: str) -> list[str]:
    """Live (non-zombie) host processes of a submission: named `mark` (prctl) or with it in argv."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        comm = stat[stat.find(b"(") + 1: stat.rfind(b")")]
        state = stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3]
        if state != b"Z" and (comm == mark.encode() or mark.encode() in cmdline):
            found.append(f"{entry.name} {comm.decode(errors='replace')} {cmdline[:120]!r}")
    return found


class Listeners:
    """Host-side sockets a submission is invited to reach; they must never hear from it."""

    def __init__(self, host_dir: Path, host_tmp: Path, mark: str) -> None:
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(64)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix: dict[str, socket.socket] = {}
        self.unix_paths = {"unix_host_dir": str(host_dir / "s.sock"), "unix_host_tmp": str(host_tmp / "s.sock"),
                           "unix_abstract": f"@lemur-hostile-{mark}"}
        for name, path in self.unix_paths.items():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind("\0" + path[1:] if path.startswith("@") else path)
            if not path.startswith("@"):
                os.chmod(path, 0o777)
            s.listen(64)
            self.unix[name] = s
        for s in (self.tcp, self.udp, *self.unix.values()):
            s.setblocking(False)

    @property
    def ports(self) -> tuple[int, int]:
        return self.tcp.getsockname()[1], self.udp.getsockname()[1]

    def heard(self) -> dict[str, Any]:
        """What reached any listener (empty when nothing did)."""
        got: dict[str, Any] = {}
        for name, s in (("tcp", self.tcp), *self.unix.items()):
            try:
                conn, addr = s.accept()
            except BlockingIOError:
                continue
            conn.settimeout(1)
            try:
                data = conn.recv(100)
            except OSError:
                data = b""
            conn.close()
            got[name] = [str(addr), data.decode(errors="replace")]
        try:
            data, addr = self.udp.recvfrom(100)
            got["udp"] = [str(addr), data.decode(errors="replace")]
        except BlockingIOError:
            pass
        return got

    def close(self) -> None:
        for s in (self.tcp, self.udp, *self.unix.values()):
            s.close()


@dataclasses.dataclass
class World:
    """Everything one hostile job can attack, and the evidence read back from the host."""

    base: Path
    host_tmp: Path
    mark: str
    canaries: dict[str, str]
    listeners: Listeners
    ctx: Ctx
    settings: Any
    before: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def host_dir(self) -> Path:
        return self.base / "host"

    def watched(self) -> dict[str, str]:
        """Hashes of everything a write could poison: the world outside the job dirs (zoo database
        and archived weights excepted: the server writes those), the runner the next job imports,
        the interpreter's packages, and a file the sandbox can see on the host."""
        skip = tuple(self.state_dir / f for f in STATE_FILES)
        skip += (self.state_dir / "weights", self.state_dir / "prestart")
        jobs = self.settings.jobs_dir
        skip += tuple(p for p in jobs.iterdir() if p.name != "job-otheruser") if jobs.is_dir() else ()
        files = _tree(self.base, skip)
        for path in [*sorted((REPO / "sandbox" / "runner").glob("*.py")), REPO / "sandbox" / "protocol.py",
                     REPO / "sandbox" / "__init__.py", SITE_PACKAGES / "torch" / "__init__.py",
                     SITE_PACKAGES / "numpy" / "__init__.py"]:
            files[str(path)] = _digest(path)
        return files

    def privileged_files(self) -> list[str]:
        """Setuid or setgid files in the jobs' out/ directories, as the host sees them."""
        found = []
        jobs = self.settings.jobs_dir
        try:
            names = os.listdir(jobs)
        except FileNotFoundError:
            return found
        # os.walk, not Path.glob: the server removes a job's dirs when the job ends, and glob raises
        # FileNotFoundError for a directory that vanishes mid-walk (a CI failure); os.walk skips it.
        paths = (Path(d) / f for name in names for d, _, files in os.walk(jobs / name / "out") for f in files)
        for path in paths:
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(f"{path.name} mode={oct(st.st_mode & 0o7777)} uid={st.st_uid} gid={st.st_gid}")
        return found

    def marked_files(self) -> list[str]:
        """Files named after this test's marker anywhere a submission may have tried to write."""
        places = ["/", "/tmp", "/var/tmp", "/dev/shm", "/etc", "/mnt", "/srv", "/opt", str(REPO),
                  str(REPO / "sandbox"), str(SITE_PACKAGES), str(self.base), str(self.host_dir), str(self.host_tmp),
                  str(self.state_dir), str(self.settings.jobs_dir), os.getcwd()]
        return sorted({str(p) for place in places for p in Path(place).glob(f"*{self.mark}*")})

    def leaks(self, *blobs: str) -> list[str]:
        """Canaries whose value appears in the given texts, the zoo (a full dump) or archived weights."""
        texts = list(blobs) + [zoo_dump(self.settings.zoo_path)]
        weights = self.state_dir / "weights"
        if weights.is_dir():
            texts += [p.read_bytes().decode("latin-1") for p in weights.rglob("*") if p.is_file()]
        return [name for name, value in self.canaries.items() if any(value in t for t in texts)]


def zoo_dump(zoo_path: Path) -> str:
    with sqlite3.connect(f"file:{zoo_path}?mode=ro", uri=True) as db:
        return "\n".join(db.iterdump())


def zoo_facts(zoo_path: Path) -> dict[str, Any]:
    """Integrity and every accuracy and training time the zoo holds (this test's zoo has no seeds)."""
    with sqlite3.connect(f"file:{zoo_path}?mode=ro", uri=True) as db:
        return {
            "integrity": db.execute("PRAGMA integrity_check").fetchall(),
            "foreign_keys": db.execute("PRAGMA foreign_key_check").fetchall(),
            "accuracies": [r[0] for r in db.execute(
                "SELECT accuracy FROM point UNION ALL SELECT accuracy FROM run UNION ALL "
                "SELECT accuracy FROM best_point") if r[0] is not None],
            "durations": [r[0] for r in db.execute(
                "SELECT duration_ns FROM point UNION ALL SELECT duration_ns FROM run") if r[0] is not None],
            "runs": db.execute("SELECT status, json_extract(error, '$.kind') FROM run").fetchall(),
            "curve": db.execute("SELECT epoch, val_accuracy, loss FROM point ORDER BY run_id, epoch").fetchall(),
            "trials": sorted({r[0] for r in db.execute("SELECT trial FROM run")}, key=str),
        }


@pytest.fixture(params=["process", "docker"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits dataset prepared once; each world copies it into its own dataset cache."""
    from sandbox import datasets

    root = tmp_path_factory.mktemp("digits-cache")
    datasets.prepare("digits", root / "data", root / "cache")
    return root / "cache" / "digits"


@pytest.fixture
def world(request: pytest.FixtureRequest, make_settings, backend_name: str, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch, digits_cache: Path) -> Iterator[World]:
    request.getfixturevalue(f"warm_{backend_name}_sandbox")
    mark = "lhx" + secrets.token_hex(6)
    base = Path("/var/tmp") / f"lemur-hostile-{secrets.token_hex(6)}"  # not named after the marker
    (base / "host").mkdir(parents=True)
    os.chmod(base, 0o755)
    host_tmp = tmp_path / "host-tmp"
    host_tmp.mkdir()
    canaries = {name: f"CANARY-{name}-{secrets.token_hex(12)}" for name in ("env", "zoo", "other_job", "labels")}
    monkeypatch.setenv(CANARY_ENV, canaries["env"])

    warm = getattr(request.module, "PRESTART_PER_SLOT", None)  # else make_settings' choice for the backend
    settings = make_settings(sandbox=backend_name, seed_zoo=False, zoo_path=base / "state" / "zoo.sqlite")
    if warm is not None:
        settings.prestart_per_slot = warm
    state = settings.state_dir
    state.mkdir(parents=True)
    (state / "canary.txt").write_text(canaries["zoo"])
    other = settings.jobs_dir / "job-otheruser"
    (other / "in").mkdir(parents=True)
    (other / "out").mkdir()
    (other / "in" / "model.py").write_text(f"# another user's model\nSECRET = {canaries['other_job']!r}\n")
    (other / "out" / "events.jsonl").write_text(json.dumps({"event": "done", "secret": canaries["other_job"]}))
    cache = settings.cache_dir / "digits"
    shutil.copytree(digits_cache, cache)
    (cache / "private" / "canary.txt").write_text(canaries["labels"])
    (base / "host" / "visible.txt").write_text("a host file the process sandbox can read\n")

    listeners = Listeners(base / "host", host_tmp, mark)
    tcp, udp = listeners.ports
    ctx = Ctx(mark=mark, tcp_port=tcp, udp_port=udp, unix_sockets=dict(listeners.unix_paths),
              zoo_path=str(settings.zoo_path), state_dir=str(state), jobs_dir=str(settings.jobs_dir),
              other_job=str(other), cache_dir=str(settings.cache_dir), private_dir=str(cache / "private"),
              data_root=str(settings.data_root), host_dir=str(base / "host"), host_tmp=str(host_tmp),
              repo=str(REPO), site_packages=str(SITE_PACKAGES), server_pid=os.getpid())
    w = World(base=base, host_tmp=host_tmp, mark=mark, canaries=canaries, listeners=listeners, ctx=ctx,
              settings=settings)
    try:
        yield w
    finally:
        listeners.close()
        for path in w.marked_files():  # an attack that worked must not poison later tests
            p = Path(path)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        deadline = time.monotonic() + 10
        while our_processes(mark) and time.monotonic() < deadline:
            for line in our_processes(mark):
                try:
                    os.kill(int(line.split()[0]), 9)
                except OSError:
                    pass
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)
