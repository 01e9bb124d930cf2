"""Hostile submissions through `submit_model`, on every sandbox backend, each with its exact outcome.

Every case runs one job on a fresh server (its own zoo, no seeds) while the test keeps querying the
server, then checks, from outside the sandbox:

1. the job's status, failure kind and stage (exact; per backend where the backends legitimately differ);
2. the server answered `list_catalog` and `query_models` within `MAX_LATENCY_S` during the whole job,
   and answers them (and `get_model` for the archived failure) afterwards;
3. the zoo passes `PRAGMA integrity_check`, and holds no accuracy above `ACCURACY_CAP` (the submissions
   never train, so anything above chance would be forged or stolen) and no training time below
   `MIN_TRAIN_NS` (a forged time would inflate accuracy_to_time);
4. no canary value appears in anything the server stored or returned;
5. nothing outside the job directory changed (hashes), and no file named after the test's marker exists
   anywhere the submission tried to write;
6. no listener heard anything;
7. no process of the submission is alive, and the backend left no cgroup or container behind.

Then the case's own checks read the submission's report (what it saw from inside) and what the host saw.
HOSTILE_DEBUG=1 (with -s) prints each job's outcome, the worst server latency and the job's duration.

Where a case fails today it is because the server or a sandbox does the wrong thing; the assertion
states the right behaviour (see the comments at each check).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from mcp import Client

from lemur_agent_server.server import build_server
from sandbox import _cgroups
from sandbox.backend import Limits
from tests.conftest import REPO
from tests.hostile import submissions as sub
from tests.hostile.conftest import World, our_processes, zoo_facts

pytestmark = pytest.mark.anyio

MAX_LATENCY_S = 3.0  # any one list_catalog + query_models round trip while a hostile job runs
PING_PAUSE_S = 0.3
ACCURACY_CAP = 0.3  # digits has 10 balanced classes: an untrained net scores about 0.1
MIN_TRAIN_NS = 1_000_000  # one learn() over real batches takes far longer than 1 ms
TIMEOUT_BUDGET_S = 10.0  # jobs that must be killed by the wall clock
# a case that is not meant to meet the clock ends long before it (9-18 s here); a slower CI host must not
# turn a memory bomb's MemoryError into a timeout (a CI run: three memory cases and one more timed out at 25 s)
DEFAULT_BUDGET_S = 60.0
HAS_GPU = os.path.exists("/dev/nvidiactl")
LIMITS = Limits(wall_s=1.0)  # the backends' defaults: pids, out_cap_bytes, log cap
# every variable a sandbox may see (both backends): set by the backend or the image, none from the server
SANDBOX_ENV = {"CUDA_VISIBLE_DEVICES", "HOME", "HOSTNAME", "LANG", "LEMUR_SANDBOX", "MKL_NUM_THREADS", "MPLCONFIGDIR",
               "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE", "PYTHONPATH", "PYTHONUNBUFFERED",
               "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME"}
GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass
class Seen:
    """What one hostile job produced, seen from the host."""

    backend: str
    world: World
    job: dict[str, Any]
    latencies: list[float]
    max_procs: int
    cmdlines: set[str]
    elapsed_s: float
    privileged_files: set[str]

    @property
    def error(self) -> dict[str, Any]:
        return self.job.get("error") or {}

    @property
    def report(self) -> dict[str, Any]:
        """The submission's own account, parsed from the exception text it raised."""
        for text in (self.error.get("traceback") or "", self.error.get("message") or ""):
            i = text.rfind("REPORT ")
            if i >= 0:
                try:
                    return json.loads(text[i + len("REPORT "):].splitlines()[0])
                except ValueError:
                    continue
        raise AssertionError(f"no report in the job's error: {self.error}")


Outcome = tuple[str, str, str]  # status, error kind, stage


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    slots: dict[str, str]
    outcome: Outcome | dict[str, Outcome]  # one for every backend, or per backend
    verify: Callable[[Seen], None] | None = None
    budget_s: float = DEFAULT_BUDGET_S
    gpu: bool = False  # run on the GPU where the host has one

    def expected(self, backend: str) -> Outcome:
        return self.outcome[backend] if isinstance(self.outcome, dict) else self.outcome


TIMEOUT_CHECK = ("timed_out", "timeout", "checking")
TIMEOUT_TRAIN = ("timed_out", "timeout", "training")
REPORTED = ("failed", "exception", "checking")  # the submission raised its report during the check


# --- per-case checks --------------------------------------------------------------------------------
def per_backend(seen: Seen, process: Any, docker: Any) -> Any:
    return {"process": process, "docker": docker}[seen.backend]


def fork_bomb_was_capped(seen: Seen) -> None:
    # the bomb really ran (many processes), and never got past the pids limit of the job
    assert 8 < seen.max_procs <= LIMITS.pids, (seen.max_procs, show(seen.job))


def memory_limit_refused(seen: Seen) -> None:
    # the runner caps its private memory at the cgroup's (container's) limit: the allocation fails inside the
    # sandbox with an error the agent can read (batch, parameters, next step), before the kernel kills anything
    assert "learn() ran out of memory: MemoryError" in seen.error["message"], seen.error
    assert "batch 32 (fixed by prm.batch)" in seen.error["message"], seen.error


def memory_limit_killed(seen: Seen) -> None:
    # the kernel's OOM killer inside the job's cgroup (process) or container: nothing else died
    assert seen.error["message"].startswith("Killed by the sandbox's memory limit"), seen.error


def device_allocation_failed(seen: Seen) -> None:
    # 1 TiB at once: the allocator refuses (CPU: can't allocate memory; GPU: torch.OutOfMemoryError)
    assert "learn() ran out of memory" in seen.error["message"], seen.error
    assert [t["error"]["kind"] for t in seen.job["result"]["trials"]] == ["out_of_memory"], seen.job["result"]


def tmp_filled_to_its_cap(seen: Seen) -> None:
    for place in ("/tmp", "/dev/shm"):
        total, last = seen.report[place]
        assert last == errno.ENOSPC, seen.report
        assert 32 * MIB <= total <= GIB, seen.report  # tmpfs size: a quarter of the memory, at most 1 GiB


def out_dir_is_capped(seen: Seen) -> None:
    # RLIMIT_FSIZE stops the first file at the cap (each file); the host's watchdog then stops the job
    # as soon as out/ as a whole is over it, so the host's disk never holds more than one burst beyond
    assert "to out/, over its cap of 512 MiB" in seen.error["message"], seen.error
    assert seen.job["result"].get("accuracy") is None, seen.job["result"]


def threads_were_capped(seen: Seen) -> None:
    tail = seen.error.get("log_tail") or ""
    assert "libgomp: Thread creation failed" in tail, seen.error
    started = json.loads(tail[tail.rindex("THREADS ") + len("THREADS "):].splitlines()[0])
    assert started["threads"] < LIMITS.pids and "can't start new thread" in started["error"], started


def log_tail_is_capped(seen: Seen) -> None:
    tail = seen.error.get("log_tail") or ""
    assert 0 < len(tail) <= 4000, len(tail)
    assert seen.elapsed_s < 60, seen.elapsed_s


def stdout_flood(seen: Seen) -> None:
    log_tail_is_capped(seen)
    assert seen.error["message"] == "The sandbox ended with exit code 7 without reporting an error."
    assert seen.world.mark + " flood" in seen.error["log_tail"]


def stderr_flood(seen: Seen) -> None:
    log_tail_is_capped(seen)
    assert seen.error["message"] == "The sandbox ended with exit code 9 without reporting an error."
    assert seen.world.mark in seen.error["log_tail"]


def huge_predictions_rejected(seen: Seen) -> None:
    assert "Bad predictions" in seen.error["message"] and "cap" in seen.error["message"], seen.error


def tcp_blocked(seen: Seen) -> None:
    # the container has its own loopback, where nobody listens (and no IPv6 address for localhost)
    assert seen.report == per_backend(
        seen, {"tcp": errno.ENETUNREACH, "tcp_localhost": errno.ENETUNREACH},
        {"tcp": errno.ECONNREFUSED, "tcp_localhost": errno.EADDRNOTAVAIL}), seen.report


def udp_blocked(seen: Seen) -> None:
    # in a container the datagram goes to the container's own loopback, where nobody listens
    assert seen.report == {"udp": per_backend(seen, errno.ENETUNREACH, "sent")}, seen.report


def dns_blocked(seen: Seen) -> None:
    assert seen.report == {"dns": "gaierror", "ifaces": ["lo"], "routes": []}, seen.report


def unix_blocked(seen: Seen) -> None:
    r = seen.report
    # a socket in a host directory the process sandbox can see must not take a connection (how it fails
    # depends on the fix: not visible, not permitted); the container does not have the path at all
    assert r.pop("unix_host_dir") in per_backend(seen, (errno.ENOENT, errno.EACCES, errno.EPERM), (errno.ENOENT,)), r
    assert r == {
        "unix_host_tmp": errno.ENOENT,  # the sandbox's /tmp is its own
        "unix_abstract": errno.ECONNREFUSED,  # the abstract namespace belongs to the network namespace
        "/var/run/docker.sock": False,
        "/run/docker.sock": False,
    }, r


def zoo_unreadable(seen: Seen) -> None:
    missing = "FileNotFoundError"
    # the process sandbox covers /var/tmp, where this test keeps its state, whole: nothing there exists
    assert seen.report == {"zoo": missing, "canary": missing, "via_proc": missing, "zoo_dir": missing}, seen.report


def env_scrubbed(seen: Seen) -> None:
    r = seen.report
    assert r["lemur"] == {} and r["scan"] == [] and r["proc_self"] == [], r
    assert r["proc_1"] == per_backend(seen, "PermissionError", []), r  # the init of the namespaces
    assert r[f"proc_{seen.world.ctx.server_pid}"] == "FileNotFoundError", r  # not in the PID namespace
    assert set(r["names"]) <= SANDBOX_ENV, set(r["names"]) - SANDBOX_ENV


def labels_unreachable(seen: Seen) -> None:
    r = seen.report
    missing = "FileNotFoundError"
    assert r["private"] == missing and r["canary"] == missing, r
    assert r["cache"] == missing, r
    # the raw data root is covered (empty), or not there at all (a checkout under /tmp, or in a container)
    assert r["data_root"] in per_backend(seen, ([], missing), (missing,)), r
    assert r["public"] == ["test_x.npy", "train_x.npy", "train_y.npy"], r
    assert r["hits"] == [], r
    # the process sandbox can import scikit-learn but its digits file is covered; the image has none
    assert r["sklearn"] == per_backend(seen, "PermissionError", "ModuleNotFoundError"), r
    assert r["sklearn_csv"] == per_backend(seen, "PermissionError", missing), r


def other_job_unreadable(seen: Seen) -> None:
    missing = "FileNotFoundError"
    r = seen.report
    assert (r["model"], r["events"], r["jobs"]) == (missing, missing, missing), r


def writes_blocked(seen: Seen) -> None:
    r = seen.report
    assert r.pop("tmp") == "written" and r.pop("out") == "written", r  # the scratch places work
    if seen.backend == "process" and str(REPO).startswith("/tmp/"):
        # a checkout under /tmp: the sandbox's own /tmp holds the directories its interpreter is bound
        # back on, so a new file beside the venv lands in that private tmpfs (the host check after the
        # job finds no marked file); the venv itself stays read-only
        under_tmp = {k: r.pop(k) for k in ("repo", "runner", "site_pth", "torch")}
        assert set(under_tmp.values()) <= {errno.EROFS, errno.ENOENT, "written"}, under_tmp
        assert under_tmp["site_pth"] == errno.EROFS and under_tmp["torch"] == errno.EROFS, under_tmp
    assert not any(v in ("written", "opened") for v in r.values()), r
    if seen.backend == "process":  # everything outside scratch is a read-only mount, or covered
        # the test's state (zoo, jobs, host_dir) lives under /var/tmp, which is covered whole
        gone = {k: r.pop(k) for k in ("host_dir", "state_dir", "jobs_dir", "zoo")}
        assert gone == dict.fromkeys(gone, errno.ENOENT), gone
        assert r == {k: errno.EROFS for k in r}, r
    else:  # host paths do not exist in the container; its root and in/ are read-only, owned by root
        ro, acc, gone = errno.EROFS, errno.EACCES, errno.ENOENT
        assert r == {"data_dir": ro, "etc": ro, "in_dir": ro, "root": ro, "var_tmp": ro, "model_py": acc,
                     "spec_json": acc, "torch": acc, "train_x": acc, "host_dir": gone, "jobs_dir": gone,
                     "repo": gone, "runner": gone, "site_pth": gone, "state_dir": gone, "zoo": gone}, r
    assert not os.path.exists(f"/tmp/{seen.world.mark}")  # the sandbox's /tmp is not the host's


def no_root_setuid_file(seen: Seen) -> None:
    r = seen.report
    # the attack ran: either the host saw the file with its bits, or setting them was refused (seccomp)
    assert seen.privileged_files or (r["suid"], r["sgid"]) == (errno.EPERM, errno.EPERM), (seen.privileged_files, r)
    # a setuid/setgid file owned by root on the host, placed there by the submission, is a local root
    # for whoever can reach the job directory while the job runs
    assert not [f for f in seen.privileged_files if " uid=0 " in f or f.endswith(" gid=0")], (
        seen.privileged_files, r)


def events_flood_parsed_in_time(seen: Seen) -> None:
    assert seen.report == {"flooded": 64 * (MIB - MIB % 29)}, seen.report


def symlink_not_followed(seen: Seen) -> None:
    assert "Bad predictions" in seen.error["message"], seen.error
    assert seen.job["result"].get("accuracy") is None, seen.job["result"]


def daemons_were_seen_and_died(seen: Seen) -> None:
    mark = seen.world.mark
    assert any(mark + "-daemon" in c for c in seen.cmdlines), seen.cmdlines
    assert any(mark + "-popen" in c for c in seen.cmdlines), seen.cmdlines


def exit_zero_is_no_success(seen: Seen) -> None:
    assert "exit code 0" in seen.error["message"] or "result" in seen.error["message"], seen.error


def parent_survived(seen: Seen) -> None:
    # the server's pid does not exist in the sandbox's PID namespace; the parent is the namespace's init
    # (PID 1), which ignores SIGKILL and SIGSTOP sent from inside its namespace
    assert seen.report == {"ppid": 1, "server_visible": errno.ESRCH, "parent_stop": "sent", "parent_kill": "sent",
                           "init_kill": "sent", "parent_alive": True}, seen.report


def privileges_denied(seen: Seen) -> None:
    r = seen.report
    assert r.pop("raw_disk") == "FileNotFoundError", r
    assert r.pop("state_dir") == "FileNotFoundError", r  # still covered (under /var/tmp for the process sandbox)
    eperm = errno.EPERM
    assert r == per_backend(
        seen,
        # no capabilities; nested user namespaces are off (user.max_user_namespaces = 0); uid 12345 is
        # not mapped in the sandbox's user namespace
        {"unshare_user": errno.ENOSPC, "unshare_mount": eperm, "unshare_net": eperm, "mount_tmpfs": eperm,
         "umount_cover": eperm, "ptrace_server": errno.ESRCH, "ptrace_parent": eperm, "setuid": errno.EINVAL,
         "chroot": eperm, "sethostname": eperm, "mknod_disk": eperm},
        # the default seccomp profile and no capabilities; ptrace is allowed by Docker's profile, and the
        # parent is tini, the container's own init with the same uid (the server is not in the namespace)
        {"unshare_user": eperm, "unshare_mount": eperm, "unshare_net": eperm, "mount_tmpfs": eperm,
         "umount_cover": eperm, "ptrace_server": errno.ESRCH, "ptrace_parent": 0, "setuid": eperm,
         "chroot": eperm, "sethostname": eperm, "mknod_disk": eperm}), r


def honest_scores(seen: Seen) -> None:
    result = seen.job["result"]
    assert result["accuracy"] is not None and result["accuracy"] < ACCURACY_CAP, result
    assert all(t["accuracy"] is None or t["accuracy"] < ACCURACY_CAP for t in result["trials"]), result
    assert result["duration_ns"] >= MIN_TRAIN_NS, result


def tampering_changed_nothing(seen: Seen) -> None:
    honest_scores(seen)
    assert seen.error["message"].endswith("RuntimeError: tampering done"), seen.error


def forged_events_changed_nothing(seen: Seen) -> None:
    honest_scores(seen)
    assert seen.error["message"].endswith("RuntimeError: forging done"), seen.error


def malformed_events_ignored(seen: Seen) -> None:
    assert seen.error["message"].endswith("RuntimeError: malformed events written"), seen.error
    # the two points with impossible numbers were kept (their accuracy is the host's), without the numbers
    curve = zoo_facts(seen.world.settings.zoo_path)["curve"]
    assert [(epoch, val, loss) for epoch, val, loss in curve if epoch > 0.5] == [(0.75, None, None),
                                                                                  (1.0, None, None)], curve


def pickle_never_loaded(seen: Seen) -> None:
    assert not os.path.exists(f"/var/tmp/{seen.world.mark}-pwned")
    assert "weights" not in seen.job["result"], seen.job["result"]
    assert seen.error["message"].endswith("RuntimeError: pickle planted"), seen.error


def missing_module(seen: Seen) -> None:
    assert "ModuleNotFoundError" in seen.error["message"], seen.error


def nan_reported(seen: Seen) -> None:
    assert "nan" in seen.error["message"].lower(), seen.error


def shape_reported(seen: Seen) -> None:
    assert "(2, 3)" in seen.error["message"], seen.error


CASES = [
    # resource exhaustion
    Case("fork_bomb", {"learn": sub.FORK_BOMB}, TIMEOUT_CHECK, fork_bomb_was_capped, TIMEOUT_BUDGET_S),
    Case("memory_bomb", {"learn": sub.MEMORY_BOMB}, ("failed", "out_of_memory", "training"), memory_limit_refused),
    Case("memory_bomb_uncapped", {"learn": sub.MEMORY_BOMB_UNCAPPED}, ("failed", "out_of_memory", "training"),
         memory_limit_killed),
    Case("device_memory_bomb", {"learn": sub.DEVICE_MEMORY_BOMB}, ("failed", "out_of_memory", "training"),
         device_allocation_failed, gpu=True),
    Case("disk_filler_tmp", {"learn": sub.FILL_TMP}, REPORTED, tmp_filled_to_its_cap),
    Case("disk_filler_out", {"learn": sub.FILL_OUT}, ("failed", "sandbox", "checking"), out_dir_is_capped),
    Case("thread_storm", {"learn": sub.THREAD_STORM}, ("failed", "sandbox", "checking"), threads_were_capped),
    Case("stdout_flood", {"learn": sub.STDOUT_FLOOD}, ("failed", "sandbox", "checking"), stdout_flood),
    Case("stderr_flood", {"learn": sub.STDERR_FLOOD}, ("failed", "sandbox", "checking"), stderr_flood),
    Case("events_flood", {"learn": sub.EVENTS_FLOOD}, REPORTED, events_flood_parsed_in_time),
    Case("huge_output", {"learn": sub.HUGE_OUTPUT}, ("failed", "shape", "evaluating"), huge_predictions_rejected),
    # the wall clock
    Case("infinite_loop_import", {"top": sub.LOOP}, TIMEOUT_CHECK, budget_s=TIMEOUT_BUDGET_S),
    Case("infinite_loop_init", {"init": sub.LOOP}, TIMEOUT_CHECK, budget_s=TIMEOUT_BUDGET_S),
    Case("infinite_loop_forward", {"forward": sub.LOOP_IN_EVAL}, TIMEOUT_TRAIN, budget_s=TIMEOUT_BUDGET_S),
    Case("infinite_loop_learn", {"learn": sub.LOOP_IN_TRAINING}, TIMEOUT_TRAIN, budget_s=TIMEOUT_BUDGET_S),
    Case("sleep_forever_learn", {"learn": sub.SLEEP_IN_TRAINING}, TIMEOUT_TRAIN, budget_s=TIMEOUT_BUDGET_S),
    # network
    Case("tcp_exfiltration", {"init": sub.TCP}, REPORTED, tcp_blocked),
    Case("udp_exfiltration", {"init": sub.UDP}, REPORTED, udp_blocked),
    Case("dns_lookup", {"init": sub.DNS}, REPORTED, dns_blocked),
    Case("unix_sockets", {"init": sub.UNIX}, REPORTED, unix_blocked),
    # reading what must stay hidden
    Case("read_zoo_file", {"init": sub.READ_ZOO}, REPORTED, zoo_unreadable),
    Case("read_env_secret", {"init": sub.READ_ENV}, REPORTED, env_scrubbed),
    Case("read_test_labels", {"init": sub.READ_LABELS}, REPORTED, labels_unreachable),
    Case("read_other_job", {"init": sub.READ_OTHER_JOB}, REPORTED, other_job_unreadable),
    # writing outside scratch, planting links and pickles
    Case("write_outside_scratch", {"learn": sub.WRITE_OUTSIDE}, REPORTED, writes_blocked),
    Case("setuid_file_in_out_dir", {"learn": sub.SETUID_FILE}, REPORTED, no_root_setuid_file),
    Case("symlink_in_out_dir", {"learn": sub.SYMLINK_PREDS}, ("failed", "shape", "evaluating"),
         symlink_not_followed),
    Case("pickle_as_weights", {"learn": sub.PICKLE_WEIGHTS}, ("failed", "exception", "training"),
         pickle_never_loaded),
    # processes and signals
    Case("daemon_double_fork", {"learn": sub.DAEMON}, REPORTED, daemons_were_seen_and_died),
    Case("os_exit_zero_in_learn", {"learn": sub.EXIT_ZERO}, ("failed", "sandbox", "training"),
         exit_zero_is_no_success),
    Case("kill_parent_signal", {"learn": sub.KILL_PARENT}, REPORTED, parent_survived),
    Case("privileged_syscalls", {"learn": sub.PRIVILEGED}, REPORTED, privileges_denied),
    # forging what the server scores
    Case("tamper_runner_modules", {"learn": sub.TAMPER}, ("failed", "exception", "training"),
         tampering_changed_nothing),
    Case("forged_events", {"learn": sub.FORGED_EVENTS}, ("failed", "exception", "training"),
         forged_events_changed_nothing),
    Case("malformed_events", {"learn": sub.MALFORMED_EVENTS}, ("failed", "exception", "training"),
         malformed_events_ignored),
    # plain failures
    Case("nan_loss", {"learn": sub.NAN_LOSS}, ("failed", "nan_loss", "training"), nan_reported),
    Case("wrong_output_shape", {"forward": sub.WRONG_SHAPE}, ("failed", "shape", "checking"), shape_reported),
    Case("import_missing_module", {"top": sub.MISSING_MODULE}, ("failed", "exception", "checking"), missing_module),
]


def show(job: dict[str, Any]) -> str:
    """A job in an assertion message: status, error (traceback tail), result scores."""
    error = dict(job.get("error") or {})
    for key in ("traceback", "log_tail"):
        if error.get(key):
            error[key] = "..." + error[key][-600:]
    result = {k: (job.get("result") or {}).get(k) for k in ("accuracy", "duration_ns", "trials")}
    return json.dumps({"status": job["status"], "error": error, "result": result}, indent=1, default=str)


# --- running one job ----------------------------------------------------------------------------------
async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def run_hostile(client: Client, world: World, code: str, budget_s: float) -> Seen:
    """Submit, then until the job ends: long-poll it, keep querying the server, sample /proc."""
    t0 = time.monotonic()
    job = await call(client, "submit_model", code=code, dataset="digits", n_trials=1, epochs=1.0, eval_every=0.5,
                     time_budget_s=budget_s, max_train_samples=256, name_prefix="hostile",
                     prm={"lr": 0.01, "momentum": 0.9, "batch": 32, "transform": "norm_32"})
    latencies: list[float] = []
    samples = {"max": 0}
    cmdlines: set[str] = set()
    privileged: set[str] = set()
    deadline = t0 + budget_s + 90

    async with anyio.create_task_group() as tg:
        async def ping() -> None:
            while True:  # a round's time beyond its pause: the calls, and any stall of the server's loop
                start = time.monotonic()
                await call(client, "list_catalog")
                await call(client, "query_models", dataset="digits", limit=5)
                await anyio.sleep(PING_PAUSE_S)
                latencies.append(time.monotonic() - start - PING_PAUSE_S)

        async def sample() -> None:
            while True:
                procs = await anyio.to_thread.run_sync(our_processes, world.mark)
                samples["max"] = max(samples["max"], len(procs))
                cmdlines.update(procs)
                privileged.update(await anyio.to_thread.run_sync(world.privileged_files))
                await anyio.sleep(0.2)

        tg.start_soon(ping)
        tg.start_soon(sample)
        while not job["done"]:
            assert time.monotonic() < deadline, job
            job = await call(client, "get_job", job_id=job["job_id"], wait_s=2)
        tg.cancel_scope.cancel()
    return Seen(backend="", world=world, job=job, latencies=latencies, max_procs=samples["max"],
                cmdlines=cmdlines, elapsed_s=time.monotonic() - t0, privileged_files=privileged)


def leftover_sandboxes(server: Any, backend: str) -> list[str]:
    """Job cgroups of this server (process), or containers of this server that ran a job (docker).

    A pre-started process sandbox still waiting in the pool is not a leftover: the pool keeps it for
    the next job (and kills it when the server closes).

    The docker backend keeps one pre-started container per slot, created afresh after each start:
    one that never adopted a job still has its own slot directories, an adopted one's were renamed
    into the job directory (gone once the job ended), so a container whose bind mounts lost their
    source is the one that ran a job."""
    if backend == "process":
        mine = f"-o{os.getpid()}-"
        ver = _cgroups.version()
        bases = _cgroups.base_dirs(ver).values() if ver else []
        pool = getattr(server.state.queue.backend, "pool", None)
        waiting = {str(d) for w in (pool.warm() if pool else []) if w.spawned.cgroup
                   for d in w.spawned.cgroup.dirs.values()}
        return [str(d) for b in bases if b.is_dir() for d in b.iterdir()
                if d.name.startswith(_cgroups.PREFIX) and mine in d.name and str(d) not in waiting]
    docker = shutil.which("docker") or "docker"
    instance = server.state.queue.backend.instance_id
    ids = subprocess.run([docker, "ps", "-aq", "--filter", f"label=lemur-agent-server.instance={instance}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    if not ids:
        return []
    left = []
    for c in json.loads(subprocess.run([docker, "inspect", *ids], capture_output=True, text=True, timeout=30,
                                       check=True).stdout):
        warm = c["Config"]["Labels"].get("lemur-agent-server.prestart") == "1" and c["State"]["Running"]
        if not warm or not all(os.path.exists(m["Source"]) for m in c["Mounts"] if m["Type"] == "bind"):
            left.append(f"{c['Name']} {c['State']['Status']} {[m['Source'] for m in c['Mounts']]}")
    return left


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_submission(case: Case, backend_name: str, world: World) -> None:
    code = sub.build(world.ctx, **case.slots)
    if case.gpu and HAS_GPU:  # a GPU memory bomb where a GPU exists
        world.settings.gpus = ("0",)
    world.before = world.watched()
    server = build_server(world.settings)
    async with Client(server) as client:
        # the attacks assume a real sandbox: never run them against a plain process
        sandbox = (await call(client, "list_catalog"))["sandbox"]
        assert sandbox["backend"] == backend_name, sandbox
        if backend_name == "process":
            assert sandbox["pid_namespace"] is True and str(sandbox["pids_limit"]).startswith("cgroup"), sandbox
        seen = await run_hostile(client, world, code, case.budget_s)
        seen.backend = backend_name
        job = seen.job
        if os.environ.get("HOSTILE_DEBUG"):
            print("\nDEBUG", case.name, show(job), f"max latency {max(seen.latencies):.2f}s over "
                  f"{len(seen.latencies)} rounds, {seen.elapsed_s:.1f}s", file=sys.stderr)

        # 1. the exact outcome
        status, kind, stage = case.expected(backend_name)
        error = job.get("error") or {}
        assert (job["status"], error.get("kind"), error.get("stage")) == (status, kind, stage), show(job)
        assert job["result"]["isolation"]["backend"] == backend_name, job["result"]
        if status == "timed_out":  # killed by the clock only after the attack ran, not while starting
            assert error.get("started") is not False and seen.max_procs >= 1, (seen.max_procs, show(job))

        # 7. nothing of the submission survives the job, no sandbox is left behind
        assert our_processes(world.mark) == [], our_processes(world.mark)
        assert leftover_sandboxes(server, backend_name) == []

        # 2. the server answered during the job and still answers
        assert seen.latencies and max(seen.latencies) < MAX_LATENCY_S, seen.latencies
        await call(client, "list_catalog")
        rows = await call(client, "query_models", dataset="digits", limit=5)
        # (job["model_name"] is written after the final status: a poll in between sees None)
        detail = await call(client, "get_model", name=job["result"]["model_name"], include_code=False)
        assert detail["recent_runs"], detail

        # 3. the zoo is intact and holds nothing the code could have faked
        facts = zoo_facts(world.settings.zoo_path)
        assert facts["integrity"] == [("ok",)] and facts["foreign_keys"] == [], facts
        assert all(0 <= a < ACCURACY_CAP for a in facts["accuracies"]), facts
        assert all(d >= MIN_TRAIN_NS for d in facts["durations"]), facts
        assert facts["runs"], facts  # the failure itself is archived
        assert all(v is None or 0 <= v <= 1 for _, v, _ in facts["curve"]), facts["curve"]
        assert all(loss is None or math.isfinite(loss) for _, _, loss in facts["curve"]), facts["curve"]
        assert set(facts["trials"]) <= {None, 0}, facts  # one trial was asked for: no run of a trial that never ran

        # 4. no secret reached anything the server stored or returned
        assert world.leaks(json.dumps(job), json.dumps(rows), json.dumps(detail)) == []

    # 5. nothing outside the job directory changed; the job directory itself is gone
    assert world.watched() == world.before
    assert world.marked_files() == []
    assert [p.name for p in world.settings.jobs_dir.iterdir() if not p.name.startswith(".lemur-prestart-")] == [
        "job-otheruser"]
    # 6. no connection left the sandbox
    assert world.listeners.heard() == {}

    if case.verify is not None:
        case.verify(seen)
