"""Sandboxes forked by the zygote (`sandbox.zygote`): the real runner, real namespaces, cgroups and rlimits.

What must hold: a forked sandbox is, from inside, the sandbox the exec chain builds (same view, limits,
capabilities, seccomp, environment); two jobs forked from one zygote share nothing but the imported pages;
a zygote that dies takes its sandboxes with it and the next job gets a new one; a server killed with
SIGKILL leaves neither its zygote nor a sandbox; GPU jobs and a runner package the zygote cannot use run
through the exec chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox import _cgroups, datasets
from sandbox.backend import Exit, Handle, JobPaths, Limits
from sandbox.process_backend import ProcessBackend
from tests.sandbox_jobs import make_job
from tests.test_process_prestart import LIMITS, PROBE, alive, our_cgroups, probe

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parent.parent

# Runs as the submission on import: what a forked sandbox must not carry over from an earlier job.
STATE_PROBE = r'''
import json, os, random, sys
import numpy, torch
report = {
    "marker": getattr(torch, "lemur_zygote_marker", None), "tmp": sorted(os.listdir("/tmp")),
    "random": random.random(), "numpy": float(numpy.random.random_sample()),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "ppid": os.getppid(),
    "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")), "argv": sys.argv,
}
torch.lemur_zygote_marker = os.getpid()  # what the next job must not see
open("/tmp/left-by-an-earlier-job", "w").close()
print("STATE " + json.dumps(report), flush=True)
raise SystemExit(0)
'''

SLEEPER = "import time\ntime.sleep(120)\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.PreparedDataset:
    return datasets.prepare("digits", REPO / "data", tmp_path_factory.getbasetemp() / "cache")


async def finish(handle: Handle) -> Exit:
    async for _ in handle.events():
        pass
    return await handle.wait()


def line_of(exit: Exit, prefix: str) -> dict[str, Any]:
    line = next((ln for ln in exit.log_tail.splitlines() if ln.startswith(prefix + " ")), None)
    assert line is not None, exit.log_tail
    return json.loads(line[len(prefix) + 1:])


async def test_a_forked_sandbox_looks_like_an_exec_chain_one_from_inside(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    reports, launches = {}, {}
    for how in ("exec", "zygote"):
        backend = ProcessBackend(hidden_paths=[jobs], zygote=how == "zygote")
        try:
            exit = await finish(await backend.start(make_job(jobs, how, digits, backend, PROBE), LIMITS))
            launches[how] = exit.isolation["launch"]
            reports[how] = probe(exit)
        finally:
            await backend.aclose()
    assert launches == {"exec": "exec", "zygote": "zygote"}
    forked, execd = reports["zygote"], reports["exec"]
    assert forked["CapEff"] == forked["CapBnd"] == forked["CapPrm"] == "0000000000000000"
    assert forked["NoNewPrivs"] == "1" and forked["Seccomp"] == "2" and forked["setuid_bit"] == "EPERM"
    assert forked["write_in"] == "EROFS" and forked["write_root"] == "EROFS" and forked["connect"] != "ok"
    assert forked["pid"] == 2 and forked["ppid_is_init"] is True
    assert {n for n in forked["cgroup_names"] if n} == {"lemur-sbx-zygote"}
    for report in (forked, execd):
        report.pop("cgroup_names")
        # torch._dynamo's import sets it: before the model in the zygote, right after it in an exec'd runner
        if "TORCHINDUCTOR_CACHE_DIR" in report["env"]:
            report["env"].remove("TORCHINDUCTOR_CACHE_DIR")
    assert forked == execd


async def test_jobs_forked_from_one_zygote_share_nothing_but_the_imports(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    backend = ProcessBackend(hidden_paths=[jobs])
    try:
        first = line_of(await finish(await backend.start(make_job(jobs, "a", digits, backend, STATE_PROBE), LIMITS)),
                        "STATE")
        assert backend.zygote is not None
        zygote_pid = backend.zygote.info["pid"]
        second = line_of(await finish(await backend.start(make_job(jobs, "b", digits, backend, STATE_PROBE), LIMITS)),
                         "STATE")
        assert backend.zygote.info["pid"] == zygote_pid  # both forked from the same zygote
        assert backend.zygote.info["threads"] == 1  # a fork copies one thread: the zygote has no other
    finally:
        await backend.aclose()
    assert not alive(zygote_pid)  # closed with the backend
    assert first["marker"] is None and second["marker"] is None  # a module changed by job a is not b's
    # /tmp is fresh for each job: job a's file is not in b's (a checkout under /tmp shows its mount point)
    assert "left-by-an-earlier-job" not in second["tmp"] and first["tmp"] == second["tmp"]
    assert first["random"] != second["random"] and first["numpy"] != second["numpy"]  # reseeded per job
    assert first["pids"] == second["pids"] == [1, 2] and first["ppid"] == 1  # its own PID namespace
    assert first["fds"] == second["fds"]  # nothing of the zygote's (its socket, its wakeup pipe)
    assert first["fds"][:3] == [0, 1, 2] and len(first["fds"]) <= 6, first["fds"]
    assert first["argv"] == ["/mnt/lemur-sbx/pkg/sandbox/runner/__main__.py", "/mnt/lemur-sbx/job/in/spec.json"]
    assert not our_cgroups()


async def test_a_killed_zygote_ends_its_sandboxes_and_the_next_job_gets_a_new_one(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    backend = ProcessBackend(hidden_paths=[jobs])
    try:
        handle = await backend.start(make_job(jobs, "sleeper", digits, backend, SLEEPER), LIMITS)
        assert backend.zygote is not None
        zygote_pid = backend.zygote.info["pid"]
        await anyio.sleep(1.0)
        os.kill(zygote_pid, signal.SIGKILL)
        with anyio.fail_after(30):
            exit = await finish(handle)
        assert exit.signal == signal.SIGKILL and not exit.timed_out, exit
        assert not our_cgroups()  # the sandbox, its init and the sleeping runner are gone
        again = await finish(await backend.start(make_job(jobs, "after", digits, backend, PROBE), LIMITS))
        assert again.isolation["launch"] == "zygote" and backend.zygote.info["pid"] != zygote_pid
        assert probe(again)["CapEff"] == "0000000000000000"
    finally:
        await backend.aclose()


async def test_a_killed_server_leaves_neither_its_zygote_nor_a_sandbox(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    make_job(jobs, "sleeper", digits, ProcessBackend(hidden_paths=[jobs], zygote=False), SLEEPER)
    script = textwrap.dedent(f"""
        import anyio
        from pathlib import Path
        from sandbox.backend import JobPaths, Limits
        from sandbox.process_backend import ProcessBackend
        async def main():
            backend = ProcessBackend(hidden_paths=[Path({str(jobs)!r})])
            paths = JobPaths(job_dir=Path({str(jobs / "sleeper")!r}), data_dir=Path({str(digits.public_dir)!r}))
            handle = await backend.start(paths, Limits(wall_s=90, memory_bytes={LIMITS.memory_bytes}))
            print(backend.zygote.info["pid"], handle._proc.pid, flush=True)
            await anyio.sleep(3600)
        anyio.run(main)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = server.stdout.readline() if server.stdout else ""
        zygote_pid, sandbox_pid = map(int, line.split())
        assert alive(zygote_pid) and alive(sandbox_pid)
    finally:
        server.kill()
        server.wait()
    for _ in range(100):
        if not alive(zygote_pid) and not alive(sandbox_pid):
            break
        time.sleep(0.1)
    assert not alive(zygote_pid) and not alive(sandbox_pid)
    assert _cgroups.sweep_orphans() == 1  # the sleeper's cgroup, which only a next server can remove


async def test_gpu_jobs_start_through_the_exec_chain(tmp_path: Path, digits) -> None:
    """A CUDA context does not survive a fork, and a GPU node was never tested with one: GPU jobs exec."""
    jobs = tmp_path / "jobs"
    backend = ProcessBackend(hidden_paths=[jobs])
    try:
        limits = Limits(**{**LIMITS.__dict__, "gpu": "0"})
        exit = await finish(await backend.start(make_job(jobs, "gpu", digits, backend, PROBE), limits))
        assert exit.isolation["launch"] == "exec"
        assert probe(exit)["CapEff"] == "0000000000000000"
        assert backend.zygote is not None and not backend.zygote.settled()  # not even started for it
    finally:
        await backend.aclose()


SCRIPT_RUNNER = '''
import json, os, sys
spec = json.load(open(sys.argv[1]))  # work at import: a script, not a module the zygote could import
with open(os.path.join(spec["out_dir"], "events.jsonl"), "a") as f:
    f.write(json.dumps({"event": "done"}) + "\\n")
'''


async def test_a_runner_the_zygote_cannot_import_runs_through_the_exec_chain(tmp_path: Path) -> None:
    root = tmp_path / "pkgroot"
    (root / "sandbox" / "runner").mkdir(parents=True)
    (root / "sandbox" / "__init__.py").write_text("")
    (root / "sandbox" / "runner" / "__init__.py").write_text("")
    (root / "sandbox" / "runner" / "__main__.py").write_text(SCRIPT_RUNNER)
    jobs = tmp_path / "jobs"
    job = jobs / "script"
    (job / "in").mkdir(parents=True)
    (job / "out").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    backend = ProcessBackend(hidden_paths=[jobs], package_root=root)
    paths = JobPaths(job_dir=job, data_dir=data)
    (job / "in" / "spec.json").write_text(json.dumps({"out_dir": backend.runner_paths(paths).out_dir}))
    try:
        exit = await finish(await backend.start(paths, LIMITS))
        assert exit.exit_code == 0 and exit.isolation["launch"] == "exec", exit.log_tail
        assert backend.zygote is not None and "cannot import the runner" in (backend.zygote.failure or "")
    finally:
        await backend.aclose()
