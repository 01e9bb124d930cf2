"""Linux namespaces for the process backend: the probe, and the bootstrap that builds the view.

The chain is `unshare` (new user/net/mount/pid namespaces) -> this file run as a script
(`python -I -S _namespaces.py <plan fd>`, standard library only), which stays as PID 1 -> PID 2:
`prlimit` -> `setpriv` -> the runner. The bootstrap is Python rather than a shell script of `mount` commands because it
does ~50 mount operations: one `mount(8)` exec costs 7-20 ms on a small VM (0.3-0.9 s in all),
the syscalls cost microseconds (the whole bootstrap ~40 ms, mostly interpreter start). It also
parses /proc/self/mountinfo exactly and preserves each mount's flags on remount, which a user
namespace requires (locked flags). It runs as (namespace-)root *before* any untrusted code
exists, and fails closed: any error ends the job with `SETUP_FAILED_CODE` before the runner
starts, and the host notices the missing ready line.

What it builds, in this order (the order matters):

1. (user namespace only) `user.max_user_namespaces = 0`: the submission cannot create nested user
   namespaces, the usual way to regain capabilities and to reach more kernel surface.
2. a tmpfs at the private root R (an empty host directory, e.g. /mnt/lemur-sbx) holding
   R/job/in (read-only bind of <job>/in), R/job/out (read-write bind of <job>/out), R/data
   (read-only), R/pkg/sandbox (the runner package, read-only), staging binds of the paths that
   must stay visible under a hidden path (the interpreter), and a minimal /dev (null, zero, full,
   random, urandom, plus the NVIDIA nodes for GPU jobs). All sources are bound *before* anything
   is covered, so a job dir under a hidden root or under /tmp still works.
3. every mount of the namespace is remounted read-only, except R/job/out. Always a *bind*
   remount: it changes this namespace's mount flags, never the host's filesystems. This includes
   /proc (so /proc/sys and /proc/sysrq-trigger are not writable: the sandbox is uid 0 without
   capabilities, and uid 0 owns those files) and /sys (cgroupfs: it cannot leave its cgroup).
4. the minimal /dev replaces the host /dev (raw disks such as /dev/vda are owned by uid 0 and
   would be readable and writable without any capability).
5. hidden paths are covered: directories by an empty read-only tmpfs, files by an empty file of
   mode 000 (opening fails with EACCES: uid 0 without capabilities has no DAC override). Paths
   that must stay visible inside a hidden directory (the Python installation under /root) are
   bound back read-only.
6. fresh size-capped tmpfs at /tmp and /dev/shm (with out/, the only writable places).
7. the staging copies under R/x are covered (they hold the exposed trees without their covers).
8. the bootstrap stays as PID 1 (see `_init`) and forks PID 2, which exec's `prlimit` (file size,
   core, open files; address space when there is no cgroup) -> `setpriv` (drops every
   capability: bounding, inheritable, ambient; securebits noroot so an exec as uid 0 does not
   regain them; no_new_privs) -> the runner.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # (not typing's: importing typing costs the bootstrap ~10 ms)
if TYPE_CHECKING:
    from collections.abc import Callable

# Only json, os and sys at import time: this file is also the bootstrap script, started once per
# job, and `dataclasses`/`re`/`subprocess` would add ~40 ms to every sandbox start.

SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
READY_PREFIX = "@lemur-sbx-ready "
SETUP_FAILED_CODE = 125  # exit status of a bootstrap that could not build the sandbox
DEV_NODES = ("null", "zero", "full", "random", "urandom")
GPU_NODE_NAMES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE = 32, 1024, 2048, 4096, 8192
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
# statvfs f_flag bit -> mount(2) flag, kept on a remount (a user namespace refuses to drop them)
_KEEP_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
               os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}


def tool(name: str) -> str:
    """Absolute path of a system tool, looked up on the system PATH only (not the server's)."""
    import shutil

    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        raise FileNotFoundError(f"{name} not found on {SYSTEM_PATH}")
    return found


def unshare_argv(userns: bool) -> list[str]:
    """`unshare` with new net/mount/pid (and user) namespaces. --kill-child: when unshare dies
    (killed by the host), its child, the namespace's init, gets SIGKILL, and the kernel then kills
    every process of the PID namespace. --propagation private: no mount leaks back to the host."""
    argv = [tool("unshare")]
    if userns:
        argv += ["--user", "--map-root-user"]
    return argv + ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                   "--propagation", "private", "--"]


def setpriv_argv(drop_caps: bool) -> list[str]:
    """Drop every capability and forbid regaining privileges across exec."""
    argv = [tool("setpriv"), "--no-new-privs"]
    if drop_caps:
        argv += ["--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all",
                 ("--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked,"
                  "+keep_caps_locked")]
    return argv + ["--"]


def bootstrap_argv(python: str, plan_fd: int) -> list[str]:
    """The command unshare runs: this file as a script, isolated from site-packages and env.
    The plan arrives on `plan_fd` (a pipe), not in argv: argv stays readable in /proc/1/cmdline
    for the whole job, and the plan names host paths the sandbox has no business knowing."""
    return [python, "-I", "-S", os.path.abspath(__file__), str(plan_fd)]


_probed: dict[str, tuple[str, str]] = {}


def probe(root: str) -> tuple[str, str]:
    """Which namespace mode works here: ("userns" | "rootns" | "none", why). Cached per process.

    "userns" (a user namespace mapping our uid to 0) is preferred even for root because it lets the
    bootstrap forbid nested user namespaces; "rootns" is the same without it (root only).
    """
    if root not in _probed:
        _probed[root] = _probe(root)
    return _probed[root]


def _probe(root: str) -> tuple[str, str]:
    import subprocess

    try:
        tool("unshare"), tool("setpriv"), tool("prlimit")
    except FileNotFoundError as e:
        return "none", str(e)
    errors = []
    modes = [("userns", True)] + ([("rootns", False)] if os.geteuid() == 0 else [])
    for mode, userns in modes:
        script = ('mount -n -t tmpfs -o size=4k lemur-sbx-probe "$1" && exec "$2" --no-new-privs '
                  '--bounding-set=-all --inh-caps=-all -- /bin/true')
        argv = [*unshare_argv(userns), "/bin/sh", "-c", script, "probe", root, tool("setpriv")]
        try:
            r = subprocess.run(argv, check=False, capture_output=True, timeout=20, env={"PATH": SYSTEM_PATH},
                               stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{mode}: {e}")
            continue
        if r.returncode == 0:
            return mode, "ok"
        errors.append(f"{mode}: rc {r.returncode} {r.stderr.decode(errors='replace').strip()[:200]}")
    return "none", "; ".join(errors)


class Plan:
    """Everything the bootstrap needs: resolved host paths, sizes, and what to exec at the end.

    root: the private root inside the namespace (an existing, empty directory of the host);
    userns: whether we run in a user namespace; job_in, job_out, data_dir, sandbox_pkg
    (<package_root>/sandbox): host paths to bind; hidden: existing hidden paths (dirs and files),
    resolved, shallowest first; exposed: paths to keep visible (read-only) under a hidden dir;
    tmp_bytes: size of /tmp and /dev/shm; gpu_nodes: /dev paths to bind (empty: CPU only);
    final_argv: prlimit ... setpriv ... python -m sandbox.runner <spec>; ready_line: printed
    once the sandbox is built; status_fd: where the init reports the runner's exit status; inproc:
    None in the exec chain, else what PID 2 does instead of exec'ing final_argv when it was forked
    from the zygote (`sandbox.zygote.become_runner`: rlimits, capability drop, env, argv, package dir).
    (A plain class: `dataclasses` costs 36 ms to import, see above.)
    """

    FIELDS = ("root", "userns", "job_in", "job_out", "data_dir", "sandbox_pkg", "hidden", "exposed",
              "tmp_bytes", "gpu_nodes", "final_argv", "ready_line", "status_fd", "inproc")

    def __init__(self, **fields: object) -> None:
        if set(fields) != set(self.FIELDS):
            raise TypeError(f"Plan needs exactly {self.FIELDS}, got {sorted(fields)}")
        self.__dict__.update(fields)
        self.root: str
        self.userns: bool
        self.job_in: str
        self.job_out: str
        self.data_dir: str
        self.sandbox_pkg: str
        self.hidden: list[str]
        self.exposed: list[str]
        self.tmp_bytes: int
        self.gpu_nodes: list[str]
        self.final_argv: list[str]
        self.ready_line: str
        self.status_fd: int
        self.inproc: dict[str, object] | None

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in self.FIELDS})

    @property
    def out_inside(self) -> str:
        return f"{self.root}/job/out"


# --- the bootstrap (runs inside the namespaces, before the runner) -----------------------------------
_libc: list[object] = []


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    if not _libc:
        _libc.append(ctypes.CDLL(None, use_errno=True))
    enc = [None if s is None else s.encode() for s in (src, dst, fstype, data)]
    if _libc[0].mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:  # type: ignore[attr-defined]
        err = ctypes.get_errno()
        raise OSError(err, f"mount({src!r}, {dst!r}, {fstype!r}, {flags:#x}): {os.strerror(err)}")


def _remount(path: str, ro: bool, extra: int = 0) -> None:
    """Bind remount: changes only this mount's flags (never the filesystem's), keeping the flags
    it has (nosuid, nodev, noexec, atime) and adding `extra` and read-only."""
    have = os.statvfs(path).f_flag
    flags = MS_REMOUNT | MS_BIND | extra | (MS_RDONLY if ro else 0)
    for st_bit, ms_bit in _KEEP_FLAGS.items():
        if have & st_bit:
            flags |= ms_bit
    if not have & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= MS_STRICTATIME  # else the kernel would default to relatime: EPERM when locked
    _mount(None, path, None, flags)


def _make_target(dst: str, like: str) -> None:
    if os.path.isdir(like):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            open(dst, "w").close()


def _bind(src: str, dst: str, ro: bool, extra: int = MS_NOSUID | MS_NODEV) -> None:
    _make_target(dst, src)
    _mount(src, dst, None, MS_BIND)
    _remount(dst, ro, extra)


def _tmpfs(dst: str, opts: str, flags: int) -> None:
    _mount("lemur-sbx", dst, "tmpfs", flags, opts)


def _mount_points() -> list[str]:
    """Mount points of this namespace from /proc/self/mountinfo (octal escapes decoded)."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split(" ")[4] for line in f if line.strip()]
    return [_unescape(mp) for mp in fields]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    parts = field.split("\\")
    out = parts[0]
    for part in parts[1:]:
        code = part[:3]
        out += (chr(int(code, 8)) + part[3:]) if len(code) == 3 and code.isdigit() else "\\" + part
    return out


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _build_dev(dev: str, gpu_nodes: list[str]) -> None:
    _tmpfs(dev, "size=64k,mode=755", MS_NOSUID | MS_NOEXEC)
    for d in ("shm", "pts"):
        os.mkdir(f"{dev}/{d}")
    for name in DEV_NODES:
        _bind(f"/dev/{name}", f"{dev}/{name}", ro=False, extra=MS_NOSUID | MS_NOEXEC)
    for node in gpu_nodes:
        _bind(node, f"{dev}/{node.removeprefix('/dev/')}", ro=False, extra=MS_NOSUID | MS_NOEXEC)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", f"{dev}/fd")


def _cover(plan: Plan) -> None:
    """Cover hidden dirs with an empty read-only tmpfs and hidden files with `_blocked_file`; bind the
    exposed paths back from their staging copies; cover hidden paths inside exposed ones last."""
    done: list[str] = []
    for h in plan.hidden:  # shallowest first
        if any(_is_under(h, d) for d in done) and not any(_is_under(h, e) for e in plan.exposed):
            continue  # already invisible under a covered parent
        if os.path.isdir(h) and not os.path.islink(h):
            _tmpfs(h, "size=64k,nr_inodes=1024,mode=755", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            for i, path in enumerate(plan.exposed):
                if _is_under(path, h) and path != h:
                    _bind(f"{plan.root}/x/{i}", path, ro=True)
            _remount(h, ro=True)
        else:
            _cover_one(plan, h)
        done.append(h)


def _cover_one(plan: Plan, h: str) -> None:
    """Cover one hidden path: a directory by an empty read-only tmpfs, a file by `_blocked_file`.
    A path that is not there fails the mount, and with it the setup (fail closed)."""
    if os.path.isdir(h) and not os.path.islink(h):
        _tmpfs(h, "size=64k,nr_inodes=1024,mode=755", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        _mount(_blocked_file(plan.root), h, None, MS_BIND)
    _remount(h, ro=True)


def _blocked_file(root: str) -> str:
    """An empty file with mode 000: without CAP_DAC_OVERRIDE even its owner (uid 0) cannot open
    it, so a covered file fails to open (EACCES) instead of reading as empty, like /dev/null would."""
    return f"{root}/x/blocked"


def _build(plan: Plan) -> None:
    r = plan.root
    if plan.userns:  # per user namespace: limits namespaces created *inside* the sandbox
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    # 2. the private root, with everything it needs bound before anything is covered
    _tmpfs(r, "size=1m,mode=755", MS_NOSUID | MS_NODEV)
    _bind(plan.job_in, f"{r}/job/in", ro=True)
    _bind(plan.job_out, f"{r}/job/out", ro=False)
    _bind(plan.data_dir, f"{r}/data", ro=True)
    _bind(plan.sandbox_pkg, f"{r}/pkg/sandbox", ro=True)
    for i, path in enumerate(plan.exposed):
        _bind(path, f"{r}/x/{i}", ro=True)
    os.makedirs(f"{r}/x", exist_ok=True)
    os.close(os.open(_blocked_file(r), os.O_CREAT | os.O_WRONLY, 0o000))
    os.mkdir(f"{r}/dev")
    _build_dev(f"{r}/dev", plan.gpu_nodes)
    # 3. read-only everywhere but out/ (stacked mounts share a path: the visible one is reached,
    #    the ones below it cannot be reached from inside at all)
    for mp in dict.fromkeys(_mount_points()):
        if mp != plan.out_inside and os.path.exists(mp):
            _remount(mp, ro=True)
    # 4. the minimal /dev
    _mount(f"{r}/dev", "/dev", None, MS_MOVE)
    # 5. covers
    _cover(plan)
    # 6. writable scratch space, size-capped (tmpfs pages also count against the memory cgroup)
    size = max(16 << 20, plan.tmp_bytes)
    _tmpfs("/tmp", f"size={size},mode=1777", MS_NOSUID | MS_NODEV)
    _tmpfs("/dev/shm", f"size={size},mode=1777", MS_NOSUID | MS_NODEV)
    # an interpreter (venv) living under /tmp, e.g. a checkout there, is bound back read-only, with
    # the hidden paths inside it covered again (a bind does not carry the covers made before it)
    for i, path in enumerate(plan.exposed):
        if any(_is_under(path, scratch) for scratch in SCRATCH_DIRS):
            _bind(f"{r}/x/{i}", path, ro=True)
            for h in plan.hidden:
                if _is_under(h, path) and h != path:
                    _cover_one(plan, h)
    # 7. the staging copies hold the exposed trees without their covers: make them unreachable
    _tmpfs(f"{r}/x", "size=4k,nr_inodes=16,mode=000", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _remount(f"{r}/x", ro=True)


SCRATCH_DIRS = ("/tmp", "/dev/shm")  # replaced by fresh tmpfs inside the sandbox


def _read_plan(fd: int) -> Plan:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return Plan(**json.loads(b"".join(chunks)))


def _bootstrap_main(plan_fd: str, handover: Callable[[dict[str, object]], None] | None = None) -> None:
    """Build the sandbox, print the ready line, then act as the namespace's init. Never returns.
    `handover`: what PID 2 calls instead of its exec when the plan has `inproc` (the zygote's)."""
    try:
        plan = _read_plan(int(plan_fd))
        os.umask(0o022)
        _build(plan)
        os.chdir(plan.out_inside)
    except BaseException as e:  # noqa: BLE001 - any failure must end the job before the runner
        sys.stderr.write(f"lemur-sbx: sandbox setup failed: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED_CODE)
    sys.stderr.write(plan.ready_line + "\n")
    sys.stderr.flush()
    _init(plan, handover)


def _init(plan: Plan, handover: Callable[[dict[str, object]], None] | None = None) -> None:
    """Stay as PID 1: run the chain to the runner as PID 2, reap orphans, report its status.

    Why an init: util-linux 2.38 `unshare --fork` cannot re-raise SIGKILL (it exits 1 with
    "sigprocmask unblock failed"), so an OOM kill would read as exit code 1. The status goes to
    the host through `status_fd`, which the runner never holds (closed before the exec), and PID 1
    cannot be signalled or traced by the capability-less processes of its namespace. When it exits,
    the kernel kills every process left in the namespace.
    """
    pid = os.fork()
    if pid == 0:
        try:
            os.close(plan.status_fd)
            _forbid_setid_bits()
            if plan.inproc is not None:  # forked from the zygote: the runner is already imported
                if handover is None:
                    raise RuntimeError("an in-process plan outside the zygote")
                handover(plan.inproc)  # never returns
            os.execv(plan.final_argv[0], plan.final_argv)
        except BaseException as e:  # noqa: BLE001
            sys.stderr.write(f"lemur-sbx: cannot exec {plan.final_argv[0]}: {e}\n")
        finally:
            os._exit(SETUP_FAILED_CODE)
    while True:
        try:
            child, status = os.wait()
        except ChildProcessError:  # cannot happen while `pid` lives; be safe
            os._exit(SETUP_FAILED_CODE)
        except InterruptedError:
            continue
        if child == pid:
            break
    if os.WIFSIGNALED(status):
        report = f"signal {os.WTERMSIG(status)}\n"
    else:
        report = f"exit {os.waitstatus_to_exitcode(status)}\n"
    os.write(plan.status_fd, report.encode())
    os._exit(0)


# --- a seccomp filter: no setuid/setgid bits on any file the sandbox creates or changes ------------------
# Why: the sandbox's uid 0 is the host's uid 0 when the server runs as root, and out/ is a host directory,
# so a file it made setuid there would be a setuid-root program on the host. Mode arguments are plain
# integers, so a classic BPF filter can test them; nothing else is filtered (the runner needs no more).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# syscall number -> index of its mode argument, per architecture (openat2 takes a struct: refused whole)
_MODE_ARG = {
    "x86_64": {2: 2, 85: 1, 90: 1, 91: 1, 133: 1, 257: 3, 259: 2, 268: 2, 452: 2},  # open creat chmod fchmod
    # mknod openat mknodat fchmodat fchmodat2
    "aarch64": {52: 1, 53: 2, 56: 3, 33: 2, 452: 2},  # fchmod fchmodat openat mknodat fchmodat2
}
_OPENAT2, _X32_BIT = 437, 0x40000000
_S_ISID = 0o6000


def _seccomp_program(arch: str) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: EPERM for a set-id mode bit, ENOSYS for openat2, else allow."""
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, errno_ret = 0x7FFF0000, 0x00050000
    eperm, enosys = errno_ret | 1, errno_ret | 38
    table = sorted(_MODE_ARG[arch].items())
    prog: list[tuple[int, int, int, int]] = [(ld_abs, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[arch]), (ret, 0, 0, eperm),
                                             (ld_abs, 0, 0, 0)]
    if arch == "x86_64":  # the x32 ABI numbers its syscalls from 0x40000000: refuse them all
        prog += [(jge, 0, 1, _X32_BIT), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, _OPENAT2), (ret, 0, 0, enosys)]
    # per syscall: jeq nr -> load its mode argument and jump to the shared test at the end
    n = len(table)
    for i, (nr, arg) in enumerate(table):
        to_test = 3 * (n - i - 1) + 1  # instructions left in the later blocks, plus the `ret allow`
        prog += [(jeq, 0, 2, nr), (ld_abs, 0, 0, 16 + 8 * arg), (0x05, 0, 0, to_test)]
    prog += [(ret, 0, 0, allow), (jset, 0, 1, _S_ISID), (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    return prog


def _forbid_setid_bits() -> None:
    """Install the filter on this process (inherited by every exec and fork after it). Fails closed
    on a known architecture; on another one there is no table, and the job runs without it."""
    import ctypes
    import platform

    arch = platform.machine()
    if arch not in _MODE_ARG:
        return
    prog = _seccomp_program(arch)

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or libc.prctl(
            pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")


if __name__ == "__main__":
    _bootstrap_main(sys.argv[1])
