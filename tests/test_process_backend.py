"""ProcessBackend against hostile submissions: real processes, real namespaces and cgroups.

The runner under test is a stand-in (written into a temporary package root, next to a copy of
`sandbox/protocol.py`) that executes the Python snippet given in spec.json: the backend's
`package_root` argument is the real mechanism that selects the runner, so nothing is mocked.

Hidden paths live under /var, not /tmp: the sandbox has a private /tmp anyway, so hiding
something under /tmp would prove nothing about the covers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox import _cgroups
from sandbox.backend import Exit, Handle, JobPaths, Limits
from sandbox.process_backend import ProcessBackend

REPO = Path(__file__).resolve().parent.parent

# A runner module as the zygote needs it (definitions only, `main(argv)`), run by a cold start as a script.
STAND_IN_RUNNER = '''
import json, os, sys


def main(argv):
    print("runner-start", flush=True)
    spec = json.load(open(argv[1]))

    def event(name, **fields):
        with open(os.path.join(spec["out_dir"], "events.jsonl"), "a") as f:
            f.write(json.dumps({"event": name, **fields}) + "\\n")

    event("ready")
    exec(compile(spec["snippet"], "<snippet>", "exec"), {"spec": spec, "event": event, "__name__": "snippet"})
    event("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def package_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkgroot")
    (root / "sandbox" / "runner").mkdir(parents=True)
    (root / "sandbox" / "__init__.py").write_text("")
    shutil.copy(REPO / "sandbox" / "protocol.py", root / "sandbox" / "protocol.py")
    (root / "sandbox" / "runner" / "__init__.py").write_text("")
    (root / "sandbox" / "runner" / "__main__.py").write_text(STAND_IN_RUNNER)
    return root


class World:
    """Host directories outside /tmp: hidden things, a jobs root (hidden), data, a visible dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.zoo_dir = base / "zoo"
        self.labels = base / "raw" / "test_labels.npy"
        self.sock_dir = base / "sockets"
        self.jobs = base / "jobs"
        self.data = base / "data"
        self.visible = base / "visible"
        for d in (self.zoo_dir, self.labels.parent, self.sock_dir, self.jobs, self.data, self.visible):
            d.mkdir(parents=True)
        (self.zoo_dir / "zoo.sqlite").write_text("SQLite format 3 (fake zoo)")
        self.labels.write_text("7 2 1 0 4")
        (self.jobs / "other-job").mkdir()
        (self.jobs / "other-job" / "secret.txt").write_text("another job's output")
        (self.data / "train_x.npy").write_text("train data")
        (self.visible / "visible.txt").write_text("visible")

    @property
    def hidden(self) -> list[Path]:
        return [self.zoo_dir, self.labels, self.sock_dir, self.jobs]

    def job(self) -> JobPaths:
        job_dir = self.jobs / f"job-{uuid.uuid4().hex[:8]}"
        (job_dir / "in").mkdir(parents=True)
        (job_dir / "out").mkdir()
        (job_dir / "in" / "model.py").write_text("class Net: pass\n")
        return JobPaths(job_dir=job_dir, data_dir=self.data)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path("/var") / f"lemur-sbx-test-{uuid.uuid4().hex[:8]}"  # /var/tmp is covered whole
    base.mkdir(parents=True)
    try:
        yield World(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["zygote", "exec"])
def backend(world: World, package_root: Path, request: pytest.FixtureRequest) -> Iterator[ProcessBackend]:
    """Every case twice: sandboxes forked by the zygote (the default) and started by the exec chain."""
    b = ProcessBackend(world.hidden, package_root=package_root, zygote=request.param == "zygote")
    yield b
    anyio.run(b.aclose)


@pytest.fixture(scope="module")
def plain_backend(world: World, package_root: Path) -> ProcessBackend:
    return ProcessBackend(world.hidden, package_root=package_root, isolation="none")


def _needs_namespaces(backend: ProcessBackend) -> None:
    if not backend.namespaces:
        pytest.fail(f"namespaces unavailable here: {backend.describe().get('isolation_fallback_reason')}")


def _has_cgroup(backend: ProcessBackend, key: str) -> bool:
    return str(backend.describe()[key]).startswith("cgroup")


def _procs_with(token: str) -> list[int]:
    """Host pids whose command line contains `token` (the test's own process never does)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _our_cgroups() -> list[Path]:
    ver = _cgroups.version()
    if ver is None:
        return []
    mine = f"-o{os.getpid()}-"
    return [d for base in _cgroups.base_dirs(ver).values() if base.is_dir()
            for d in base.iterdir() if d.name.startswith(_cgroups.PREFIX) and mine in d.name]


@pytest.fixture(autouse=True)
def no_cgroup_left() -> Iterator[None]:
    yield
    assert _our_cgroups() == []


async def _start(backend: ProcessBackend, world: World, snippet: str, limits: Limits,
                 paths: JobPaths | None = None, **extra: Any) -> tuple[Handle, JobPaths, str]:
    paths = paths or world.job()
    token = f"lemurtok{uuid.uuid4().hex}"
    rp = backend.runner_paths(paths)
    spec = {"snippet": textwrap.dedent(snippet), "token": token, "out_dir": rp.out_dir,
            "data_dir": rp.data_dir, "model_path": rp.model, "spec_path": rp.spec, **extra}
    (paths.in_dir / "spec.json").write_text(json.dumps(spec))
    return await backend.start(paths, limits), paths, token


async def _run(backend: ProcessBackend, world: World, snippet: str, wall_s: float = 20.0,
               paths: JobPaths | None = None, **extra: Any) -> tuple[Exit, str]:
    handle, _, token = await _start(backend, world, snippet, Limits(wall_s=wall_s), paths, **extra)
    ex = await handle.wait()
    assert _procs_with(token) == []
    return ex, token


def _last_json(ex: Exit) -> dict[str, Any]:
    return json.loads(ex.log_tail.strip().splitlines()[-1])


# --- normal operation ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_events_stream_while_running_and_normal_exit(backend: ProcessBackend, world: World) -> None:
    # The job cannot finish until the host has *seen* its first point (it waits for out/go).
    snippet = """
        import os, time
        event("point", n=1)
        go = os.path.join(spec["out_dir"], "go")
        deadline = time.time() + 10
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.01)
        event("point", n=2, saw_go=os.path.exists(go))
        print("bye")
    """
    handle, paths, _ = await _start(backend, world, snippet, Limits(wall_s=20))
    seen = []
    async for ev in handle.events(poll_s=0.01):
        seen.append(ev)
        if ev.get("n") == 1:
            (paths.out_dir / "go").write_text("")
    ex = await handle.wait()
    assert [e["event"] for e in seen] == ["ready", "point", "point", "done"]
    assert seen[2] == {"event": "point", "n": 2, "saw_go": True}
    assert (ex.exit_code, ex.signal, ex.timed_out, ex.cancelled, ex.oom_killed) == (0, None, False, False, False)
    assert ex.log_tail == "runner-start\nbye\n"
    assert not ex.log_truncated
    assert ex.isolation["backend"] == "process"
    assert ex.isolation["launch"] == ("zygote" if backend.zygote is not None else "exec")
    assert "sandbox_error" not in ex.isolation
    assert handle.finished()


@pytest.mark.anyio
async def test_exit_code_is_passed_through(backend: ProcessBackend, world: World) -> None:
    ex, _ = await _run(backend, world, "import os; os._exit(3)")
    assert (ex.exit_code, ex.signal, ex.timed_out, ex.cancelled) == (3, None, False, False)


def test_runner_paths_are_private_with_namespaces(backend: ProcessBackend, world: World) -> None:
    _needs_namespaces(backend)
    rp = backend.runner_paths(world.job())
    for p in (rp.spec, rp.model, rp.data_dir, rp.out_dir):
        assert not p.startswith(str(world.base))
    assert rp.spec.endswith("/job/in/spec.json") and rp.out_dir.endswith("/job/out")
    desc = backend.describe()
    assert desc["pid_namespace"] is True
    assert desc["network"].startswith("none")
    assert desc["capabilities"].startswith("none")


# --- the wall clock, cancellation ------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("snippet", ["while True: pass", "import time; time.sleep(1e9)"])
async def test_wall_clock_kills(backend: ProcessBackend, world: World, snippet: str) -> None:
    t0 = time.monotonic()
    ex, _ = await _run(backend, world, snippet, wall_s=1.0)
    took = time.monotonic() - t0
    assert (ex.timed_out, ex.cancelled, ex.exit_code, ex.signal) == (True, False, None, signal.SIGKILL)
    assert 1.0 <= ex.wall_s < 3.0 and took < 3.0


SLEEPER = """
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", spec["token"]])
    event("sleeping")
    time.sleep(1000)
"""


async def _until_event(handle: Handle, name: str) -> None:
    async for ev in handle.events(poll_s=0.01):
        if ev["event"] == name:
            return
    raise AssertionError(f"no {name} event")


@pytest.mark.anyio
async def test_cancel_kills_everything(backend: ProcessBackend, world: World) -> None:
    handle, _, token = await _start(backend, world, SLEEPER, Limits(wall_s=30))
    await _until_event(handle, "sleeping")
    assert len(_procs_with(token)) == 1
    t0 = time.monotonic()
    await handle.cancel()
    await handle.cancel()  # idempotent
    ex = await handle.wait()
    assert time.monotonic() - t0 < 2.0
    assert (ex.cancelled, ex.timed_out, ex.exit_code, ex.signal) == (True, False, None, signal.SIGKILL)
    assert _procs_with(token) == []


@pytest.mark.anyio
async def test_cancelled_waiter_kills_the_sandbox(backend: ProcessBackend, world: World) -> None:
    handle, _, token = await _start(backend, world, SLEEPER, Limits(wall_s=30))
    await _until_event(handle, "sleeping")
    with anyio.move_on_after(0.3) as scope:
        await handle.wait()
    assert scope.cancelled_caught
    assert handle.finished()
    assert _procs_with(token) == []
    ex = await handle.wait()
    assert ex.cancelled and not ex.timed_out


# --- resource exhaustion ------------------------------------------------------------------------
FORK_BOMB = """
import os, time
printed = False
while True:
    try:
        os.fork()
    except OSError:
        if not printed:
            print("fork-failed", flush=True)
            printed = True
        time.sleep(0.01)
"""


@pytest.mark.anyio
async def test_fork_bomb_is_capped_and_nothing_survives(backend: ProcessBackend, world: World) -> None:
    if not _has_cgroup(backend, "pids_limit"):
        pytest.fail("no pids cgroup here")
    bomb = """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", spec["bomb"], spec["token"]]).wait()
    """
    handle, _, token = await _start(backend, world, bomb, Limits(wall_s=3.0, pids=32), bomb=FORK_BOMB)
    ex = await handle.wait()
    assert (ex.timed_out, ex.signal) == (True, signal.SIGKILL)
    assert "fork-failed" in ex.log_tail
    assert _procs_with(token) == []


@pytest.mark.anyio
async def test_memory_bomb(backend: ProcessBackend, world: World) -> None:
    limit = 256 << 20
    snippet = """
        chunks = []
        for i in range(1, 100):
            chunks.append(b"\\x01" * (32 << 20))
            print("allocated", i * 32, flush=True)
    """
    handle, _, _ = await _start(backend, world, snippet, Limits(wall_s=30, memory_bytes=limit))
    ex = await handle.wait()
    allocated = [int(line.split()[1]) for line in ex.log_tail.splitlines() if line.startswith("allocated")]
    assert max(allocated) * (1 << 20) < limit
    if _has_cgroup(backend, "memory_limit"):
        assert (ex.oom_killed, ex.signal, ex.exit_code, ex.timed_out) == (True, signal.SIGKILL, None, False)
    else:
        assert "MemoryError" in ex.log_tail and ex.exit_code == 1


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["namespaces", "none"])
async def test_double_fork_daemon_does_not_outlive_the_job(
        backend: ProcessBackend, plain_backend: ProcessBackend, world: World, which: str) -> None:
    b = backend if which == "namespaces" else plain_backend
    if which == "namespaces":
        _needs_namespaces(b)
    elif not _has_cgroup(b, "pids_limit"):
        pytest.fail("without pid namespace and cgroup a setsid daemon can escape (documented)")
    snippet = """
        import os, subprocess, sys, time
        flag = os.path.join(spec["out_dir"], "daemon-up")
        DAEMON = ("import os, sys, time\\nif os.fork(): os._exit(0)\\n"
                  "open(sys.argv[1], 'w').close()\\ntime.sleep(1000)")
        subprocess.Popen([sys.executable, "-c", DAEMON, flag, spec["token"]], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait()
        while not os.path.exists(flag):
            time.sleep(0.01)
    """
    ex, _ = await _run(b, world, snippet, wall_s=20)  # _run asserts no process has the token
    assert (ex.exit_code, ex.timed_out) == (0, False)
    assert ex.wall_s < 10


@pytest.mark.anyio
async def test_stdout_flood_is_capped(backend: ProcessBackend, world: World) -> None:
    snippet = """
        import sys
        block = b"x" * (1 << 20)
        for _ in range(50):
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        print("\\nFLOOD-END", flush=True)
    """
    handle, _, _ = await _start(backend, world, snippet, Limits(wall_s=30, log_cap_bytes=16 << 10))
    ex = await handle.wait()
    assert (ex.exit_code, ex.log_truncated) == (0, True)
    assert len(ex.log_tail.encode()) <= 16 << 10
    assert ex.log_tail.endswith("x\nFLOOD-END\n")


# --- network ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_network_is_unreachable(backend: ProcessBackend, world: World) -> None:
    _needs_namespaces(backend)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path = world.sock_dir / f"s-{uuid.uuid4().hex[:6]}"
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        unix.bind(str(sock_path))
        unix.listen()
        unix.setblocking(False)
        snippet = """
            import json, socket
            res = {}
            try:
                socket.create_connection(("127.0.0.1", spec["tcp"]), timeout=3)
                res["tcp"] = "connected"
            except OSError as e:
                res["tcp"] = e.errno
            try:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"leak", ("127.0.0.1", spec["udp"]))
                res["udp"] = "sent"
            except OSError as e:
                res["udp"] = e.errno
            try:
                socket.getaddrinfo("lemur-sbx-probe.invalid", 80)
                res["dns"] = "resolved"
            except socket.gaierror:
                res["dns"] = "gaierror"
            res["ifaces"] = [name for _, name in socket.if_nameindex()]
            try:
                socket.socket(socket.AF_UNIX).connect(spec["unix"])
                res["unix"] = "connected"
            except OSError as e:
                res["unix"] = type(e).__name__
            print(json.dumps(res))
        """
        ex, _ = await _run(backend, world, snippet, tcp=tcp.getsockname()[1], udp=udp.getsockname()[1],
                           unix=str(sock_path))
        assert ex.exit_code == 0, ex.log_tail
        assert _last_json(ex) == {"tcp": errno.ENETUNREACH, "udp": errno.ENETUNREACH, "dns": "gaierror",
                                  "ifaces": ["lo"], "unix": "FileNotFoundError"}
        for s in (tcp, unix):
            with pytest.raises(BlockingIOError):
                s.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(100)
    finally:
        for s in (tcp, udp, unix):
            s.close()


# --- filesystem ---------------------------------------------------------------------------------
def _probe_read(path: str) -> str:
    return f"""
        try:
            with open({path!r}, "rb") as f:
                res[{path!r}] = f.read().decode()
        except OSError as e:
            res[{path!r}] = type(e).__name__
    """


@pytest.mark.anyio
async def test_hidden_paths_cannot_be_read(backend: ProcessBackend, world: World) -> None:
    _needs_namespaces(backend)
    paths = world.job()
    rp = backend.runner_paths(paths)
    targets = {
        str(world.zoo_dir / "zoo.sqlite"): "FileNotFoundError",
        str(world.labels): "PermissionError",
        str(world.jobs / "other-job" / "secret.txt"): "FileNotFoundError",
        str(paths.in_dir / "model.py"): "FileNotFoundError",  # its own host path: under the jobs root
        "/etc/shadow": "PermissionError",
        "/run/docker.sock": "FileNotFoundError",
        str(world.visible / "visible.txt"): "visible",  # control: not hidden, so readable
        rp.model: "class Net: pass\n",
        f"{rp.data_dir}/train_x.npy": "train data",
    }
    snippet = "import json, os\nres = {}\n" + "".join(textwrap.dedent(_probe_read(p)) for p in targets)
    snippet += f"res['zoo_listing'] = os.listdir({str(world.zoo_dir)!r})\nprint(json.dumps(res))\n"
    ex, _ = await _run(backend, world, snippet, paths=paths)
    assert ex.exit_code == 0, ex.log_tail
    assert _last_json(ex) == {**targets, "zoo_listing": []}


@pytest.mark.anyio
async def test_hidden_file_inside_the_interpreter_tree(world: World, package_root: Path) -> None:
    """Raw dataset files can live inside site-packages (sklearn's digits csv); hiding them must not
    hide the interpreter, even when the interpreter itself lies under a hidden directory (/root)."""
    site = Path(os.path.dirname(os.__file__))  # the stdlib: stands in for a bundled data file's dir
    target = site / "this.py"
    b = ProcessBackend([*world.hidden, target], package_root=package_root)
    _needs_namespaces(b)
    snippet = f"""
        import json, os
        res = {{"os": os.__file__}}
        try:
            open({str(target)!r}).read()
            res["target"] = "read"
        except OSError as e:
            res["target"] = type(e).__name__
        print(json.dumps(res))
    """
    ex, _ = await _run(b, world, snippet)
    assert ex.exit_code == 0, ex.log_tail
    assert _last_json(ex) == {"os": os.__file__, "target": "PermissionError"}


@pytest.mark.anyio
async def test_writes_outside_out_and_tmp_fail(backend: ProcessBackend, world: World) -> None:
    _needs_namespaces(backend)
    paths = world.job()
    rp = backend.runner_paths(paths)
    name = f"lemur-sbx-w-{uuid.uuid4().hex[:8]}"
    blocked = [f"/{name}", f"/etc/{name}", rp.spec, f"{rp.data_dir}/{name}", f"{world.visible}/{name}",
               f"/var/tmp/{name}", f"/dev/{name}", "/proc/sys/kernel/hostname",
               "/sys/fs/cgroup/pids/cgroup.procs", os.path.dirname(rp.out_dir) + f"/{name}"]
    allowed = [f"/tmp/{name}", f"/dev/shm/{name}", f"{rp.out_dir}/{name}"]
    snippet = f"""
        import json
        res = {{}}
        for p in {blocked + allowed!r}:
            try:
                with open(p, "w") as f:
                    f.write("1")
                res[p] = "written"
            except OSError as e:
                res[p] = e.errno
        print(json.dumps(res))
    """
    ex, _ = await _run(backend, world, snippet, paths=paths)
    assert ex.exit_code == 0, ex.log_tail
    assert _last_json(ex) == {**{p: errno.EROFS for p in blocked}, **{p: "written" for p in allowed}}
    assert not Path(f"/tmp/{name}").exists() and not Path(f"/dev/shm/{name}").exists()
    assert not Path(f"/var/tmp/{name}").exists() and not (world.visible / name).exists()
    assert (paths.out_dir / name).read_text() == "1"


# --- environment, privileges, signals -----------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("which", ["namespaces", "none"])
async def test_environment_is_scrubbed(backend: ProcessBackend, plain_backend: ProcessBackend, world: World,
                                       monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    b = backend if which == "namespaces" else plain_backend
    monkeypatch.setenv("LEMUR_SECRET_TOKEN", "s3cr3t-value")
    snippet = """
        import json, os
        print(json.dumps({"env": dict(os.environ), "proc": open("/proc/self/environ").read()}))
    """
    ex, _ = await _run(b, world, snippet)
    assert ex.exit_code == 0, ex.log_tail
    got = _last_json(ex)
    assert set(got["env"]) == {"PATH", "HOME", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
                               "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                               "CUDA_VISIBLE_DEVICES"}
    assert got["env"]["PATH"] == "/usr/bin:/bin" and got["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert got["env"]["OMP_NUM_THREADS"] == "1"
    assert "s3cr3t" not in ex.log_tail


@pytest.mark.anyio
async def test_no_privileges_inside(backend: ProcessBackend, world: World) -> None:
    _needs_namespaces(backend)
    snippet = """
        import ctypes, json, os
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
                      if ":\\t" in line)
        libc = ctypes.CDLL(None, use_errno=True)
        def call(rc):
            return 0 if rc == 0 else ctypes.get_errno()
        res = {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs")}
        res["umount_cover"] = call(libc.umount2(b"/root", 2))  # MNT_DETACH
        res["mount"] = call(libc.mount(b"x", b"/tmp", b"tmpfs", 0, None))
        res["new_userns"] = call(libc.unshare(0x10000000))  # CLONE_NEWUSER
        res["pid"] = os.getpid()
        print(json.dumps(res))
    """
    ex, _ = await _run(backend, world, snippet)
    assert ex.exit_code == 0, ex.log_tail
    got = _last_json(ex)
    zero = "0000000000000000"
    assert {k: got[k] for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == dict.fromkeys(
        ("CapEff", "CapPrm", "CapBnd", "CapAmb"), zero)
    assert got["NoNewPrivs"] == "1" and got["pid"] == 2
    assert got["umount_cover"] == errno.EPERM and got["mount"] == errno.EPERM
    # CI runs as root with user namespaces available, so the backend must pick the user namespace mode,
    # say so, and the bootstrap's max_user_namespaces=0 must refuse a nested one
    assert backend.describe()["user"] == ("uid 0 without capabilities in a user namespace "
                                          "(nested user namespaces blocked)")
    assert got["new_userns"] == errno.ENOSPC


@pytest.mark.anyio
async def test_killing_pid1_and_the_parent_does_not_escape(backend: ProcessBackend, world: World) -> None:
    _needs_namespaces(backend)
    snippet = """
        import os, subprocess, sys
        print("pid", os.getpid(), "ppid", os.getppid(), flush=True)
        os.kill(os.getppid(), 9)  # the namespace's init: signals from inside are ignored
        subprocess.run([sys.executable, "-c", "import os; os.kill(1, 9)"], check=True)
        try:
            os.kill(-1, 9)  # every process we may signal: in the namespace, none besides us and init
        except ProcessLookupError:
            print("nobody to kill", flush=True)
        print("still here", flush=True)
    """
    ex, _ = await _run(backend, world, snippet)
    assert ex.log_tail == "runner-start\npid 2 ppid 1\nnobody to kill\nstill here\n"
    assert (ex.exit_code, ex.signal) == (0, None)


@pytest.mark.anyio
async def test_rlimits_reach_the_runner(backend: ProcessBackend, world: World) -> None:
    snippet = """
        import errno, json, os, resource
        res = {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
               "core": resource.getrlimit(resource.RLIMIT_CORE)}
        try:
            with open(os.path.join(spec["out_dir"], "big.bin"), "wb") as f:
                f.write(b"x" * (3 << 20))
            res["big"] = "written"
        except OSError as e:
            res["big"] = e.errno
        print(json.dumps(res))
    """
    handle, paths, _ = await _start(backend, world, snippet, Limits(wall_s=20, out_cap_bytes=2 << 20))
    ex = await handle.wait()
    assert ex.exit_code == 0, ex.log_tail
    assert _last_json(ex) == {"nofile": [1024, 1024], "core": [0, 0], "big": errno.EFBIG}
    assert (paths.out_dir / "big.bin").stat().st_size == 2 << 20


class _BrokenSetup(ProcessBackend):
    """Hides a path that does not exist: the bootstrap's mount fails."""

    def _hidden_resolved(self) -> list[Path]:
        return [*super()._hidden_resolved(), Path("/nonexistent-lemur-sbx/x")]


@pytest.mark.anyio
async def test_failed_setup_never_runs_the_runner(world: World, package_root: Path) -> None:
    broken = _BrokenSetup(world.hidden, package_root=package_root)
    _needs_namespaces(broken)
    ex, _ = await _run(broken, world, "print('must not run')")
    assert ex.exit_code == 125 and "runner-start" not in ex.log_tail
    assert "lemur-sbx: sandbox setup failed" in ex.log_tail
    assert "sandbox_error" in ex.isolation


# --- the fallback -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_isolation_none_says_so(plain_backend: ProcessBackend, world: World) -> None:
    desc = plain_backend.describe()
    assert desc["mode"].startswith("none") and "NOT isolated" in desc["mode"]
    assert "NOT isolated" in desc["network"] and "NOT isolated" in desc["filesystem"]
    assert desc["pid_namespace"] is False
    paths = world.job()
    assert plain_backend.runner_paths(paths).out_dir == str(paths.out_dir)
    ex, _ = await _run(plain_backend, world, "import os; print('pid', os.getpid() != 1)")
    assert ex.exit_code == 0 and "pid True" in ex.log_tail
    assert ex.isolation["network"] == desc["network"] and ex.isolation["pid_namespace"] is False


def _orphan() -> tuple[_cgroups.JobCgroup, subprocess.Popen[bytes]]:
    """A job cgroup as a crashed server leaves it: owner pid dead, a process still inside."""
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    cg = _cgroups.JobCgroup.create(f"{_cgroups.PREFIX}orphan-o{dead.pid}-abcdef", 64 << 20, 8, 1.0)
    join = " && ".join(f"echo $$ > {f}" for f in cg.procs_files())
    proc = subprocess.Popen(["/bin/sh", "-c", f"{join} && exec sleep 1000"])
    deadline = time.monotonic() + 5
    while cg.pids() != {proc.pid} and time.monotonic() < deadline:
        time.sleep(0.01)
    return cg, proc


@pytest.mark.anyio
async def test_cleanup_orphans_kills_leftover_cgroups(backend: ProcessBackend) -> None:
    if _cgroups.version() is None or not _has_cgroup(backend, "pids_limit"):
        pytest.fail("no cgroups here")
    cg, proc = _orphan()
    try:
        assert cg.pids() == {proc.pid}
        assert await backend.cleanup_orphans() == 1
        with anyio.fail_after(3):
            while proc.poll() is None:
                await anyio.sleep(0.01)
        assert proc.returncode == -signal.SIGKILL
        assert all(not d.exists() for d in cg.dirs.values())
    finally:
        proc.kill()
        proc.wait()
        cg.remove()


CRASHING_SERVER = """
import json, sys
from pathlib import Path
import anyio
from sandbox.backend import JobPaths, Limits
from sandbox.process_backend import ProcessBackend

async def main():
    package_root, job_dir, data_dir = sys.argv[1:4]
    backend = ProcessBackend(json.loads(sys.argv[4]), package_root=Path(package_root))
    handle = await backend.start(JobPaths(Path(job_dir), Path(data_dir)), Limits(wall_s=60))
    async for ev in handle.events(poll_s=0.01):
        if ev["event"] == "sleeping":
            print("started", flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


@pytest.mark.anyio
async def test_server_crash_takes_the_sandbox_down(backend: ProcessBackend, world: World,
                                                   package_root: Path, tmp_path: Path) -> None:
    """A server killed with SIGKILL cannot clean up: the pdeath signal ends the sandbox, and the
    next server's cleanup_orphans() removes the job cgroup it left behind."""
    _needs_namespaces(backend)
    paths = world.job()
    token = f"lemurtok{uuid.uuid4().hex}"
    rp = backend.runner_paths(paths)
    (paths.in_dir / "spec.json").write_text(json.dumps(
        {"snippet": textwrap.dedent(SLEEPER), "token": token, "out_dir": rp.out_dir}))
    script = tmp_path / "server.py"
    script.write_text(CRASHING_SERVER)
    argv = [sys.executable, str(script), str(package_root), str(paths.job_dir), str(paths.data_dir),
            json.dumps([str(h) for h in world.hidden])]
    server = await anyio.open_process(argv, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    try:
        assert server.stdout is not None
        with anyio.fail_after(20):
            assert (await server.stdout.receive()).startswith(b"started")
        assert len(_procs_with(token)) == 1
        server.kill()
        await server.wait()
        with anyio.fail_after(3):
            while _procs_with(token):
                await anyio.sleep(0.02)
        if _has_cgroup(backend, "pids_limit"):
            assert await backend.cleanup_orphans() >= 1
            left = [d for base in _cgroups.base_dirs(_cgroups.version() or "v1").values()
                    for d in base.iterdir() if f"-o{server.pid}-" in d.name]
            assert left == []
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
