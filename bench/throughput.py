"""Batch throughput: N small models through `submit_models` (the queue's submit_batch) on each executor,
against an NNGPT-style loop that starts a fresh Python process per model, all in one run.

For each way of running, the table gives jobs per minute (the whole batch, from the submit call to the
last job's end), the steady rate (from the (2 x slots)-th archived job to the last: without what a batch
pays once, the process zygote's imports and on Ray each node's actor and zygote, which a running server
has paid before its next batch) and the fixed cost per job, in its two parts:
  - claim -> first step: from the moment a worker claims the job (its row's `started`) to the moment
    the host sees the runner's first optimizer step (static checks, code quality, the sandbox's start,
    torch's import, the data, the model's check; on Ray also the actor and the transfer);
  - last step -> archived: from the host seeing the last learning-curve point to the job's end in
    the zoo (its row's `finished`: the runner's exit, the weights, scoring, the archive transaction).
The first step and the last point are stamped where the host reads the runner's events (a thin
wrapper around the backend's handles); the loop is timed the same way, from its process's spawn to its
exit. Targets (issue 12): fixed cost <= 1 s per job locally with pre-started sandboxes (`--sandbox
docker`), <= 2 s on Ray; Ray's throughput >= 0.9 x local's for the same slots.

Below the table, where the time goes (medians, per job): the claim -> first step stages, the last
point -> archived ones (the sandbox's end seen by the host, then scoring and the archive), how long an
event takes from the runner's write (its `t`) to the host's parser, and on Ray the executor's own steps
from its stamps (`RayHandle.timings`: the host's start call, the actor's entry, the dataset, the
staging, the sandbox's start on the node; at the end the node's exit, the host seeing it, the out/ files
back) and the CPU that Ray's own processes (GCS, raylets, agents, actors, not the sandboxes) used.

Ray runs as two nodes (one CPU each, so two slots, as local with 2 slots) started by this script on
127.0.0.1 with token authentication (`ray_local_cluster.LocalRayCluster`, the tests' cluster too),
inside a network namespace of its own (only `lo`, as the tests do: Ray would otherwise use the default
route's address): the script re-executes itself under `unshare --net`. Its nodes are stopped by
process id at the end. Note the load (`cat /proc/loadavg`) with every figure: the machine is shared.

    python bench/throughput.py [--models 50] [--epochs 0.5] [--sandbox process|docker]
                               [--configs nngpt,local1,local2,ray2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lemur_agent_server.config import Settings  # noqa: E402
from lemur_agent_server.evaluator.executor import make_backend  # noqa: E402
from lemur_agent_server.evaluator.pipeline import default_transforms  # noqa: E402
from lemur_agent_server.evaluator.queue import JobQueue  # noqa: E402
from lemur_agent_server.evaluator.ray_local_cluster import LocalRayCluster, only_loopback  # noqa: E402
from lemur_agent_server.evaluator.requests import EvalRequest  # noqa: E402
from sandbox import datasets, protocol  # noqa: E402
from sandbox.backend import Backend, Exit, Handle, JobPaths, Limits, RunnerPaths  # noqa: E402
from zoo.store import ZooStore  # noqa: E402

DATASET = "digits"
PRM = {"batch": 16, "lr": 0.05, "momentum": 0.9}
FINISHED = {"succeeded", "failed", "timed_out", "cancelled"}
CONFIGS = ("nngpt", "local1", "local2", "ray2")
# the runner's first events, in order: where the time from the claim to the first step goes
STAGES = (protocol.EVENT_READY, protocol.EVENT_CHECK, protocol.EVENT_TRIAL_START, protocol.EVENT_FIRST_STEP)
INSIDE = "LEMUR_BENCH_IN_NETNS"

NET = '''
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {{"lr", "momentum"}}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], {width}, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d({pool}))
        self.head = nn.Linear({width} * {pool} * {pool}, out_shape[0])

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))

    def train_setup(self, prm):
        self.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, train_data):
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            self.criterion(self(inputs), labels).backward()
            self.optimizer.step()
'''


def model_code(i: int) -> str:
    """Model i: a tiny conv net whose width and pooling differ per model (50 distinct codes), so the
    batch's duplicate detection trains each one."""
    return NET.format(width=4 + i % 25, pool=2 + (i // 25) % 3)


def make_requests(n: int, epochs: float) -> list[EvalRequest]:
    return [EvalRequest(code=model_code(i), dataset=DATASET, name_prefix=f"tp{i}", n_trials=1, epochs=epochs,
                        eval_every=epochs, prm=PRM, time_budget_s=300) for i in range(n)]


# --- timing the host's view of the runner's events -------------------------------------------------

class TimedHandle(Handle):
    """A sandbox handle that stamps (time.time) the first step and the last point as the host reads them."""

    def __init__(self, inner: Handle, marks: dict[str, Any]):
        self._inner = inner
        self.paths = inner.paths
        self._marks = marks

    @property  # type: ignore[override]
    def written_after(self) -> float:
        return self._inner.written_after

    async def events(self, poll_s: float = 0.05) -> AsyncIterator[dict[str, Any]]:
        async for event in self._inner.events(poll_s):
            kind = event.get("event")
            if isinstance(event.get("t"), float):  # the runner's own clock (this machine's): the event's delay
                self._marks.setdefault("lag", []).append(time.time() - event["t"])  # type: ignore[attr-defined]
            if kind in STAGES:
                self._marks.setdefault(kind, time.time())
            elif kind == protocol.EVENT_POINT:
                self._marks["last_point"] = time.time()
            yield event

    async def wait(self) -> Exit:
        exit_ = await self._inner.wait()
        self._marks.setdefault("waited", time.time())
        return exit_

    async def cancel(self) -> None:
        await self._inner.cancel()

    def finished(self) -> bool:
        return self._inner.finished()


class TimedBackend(Backend):
    """The executor's backend, its handles timed; `marks[job id]` holds the stamps."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = inner.name
        self.marks: dict[str, dict[str, Any]] = {}

    def runner_paths(self, paths: JobPaths) -> RunnerPaths:
        return self.inner.runner_paths(paths)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def start(self, paths: JobPaths, limits: Limits) -> Handle:
        marks = self.marks.setdefault(paths.job_dir.name, {})
        marks.setdefault("start", time.time())
        return TimedHandle(await self.inner.start(paths, limits), marks)

    async def cleanup_orphans(self) -> int:
        return await self.inner.cleanup_orphans()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # prestart (Docker), placed (Ray)
        return getattr(self.inner, name)


# --- the results -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    key: str  # one of CONFIGS
    label: str
    slots: int
    wall_s: float
    ok: int
    jobs: int
    to_first: list[float]  # claim -> first step, per job
    to_end: list[float]  # last step -> archived, per job
    parts: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)  # section -> step -> s
    daemon_cpu_s: float | None = None  # Ray: CPU seconds its own processes (not the sandboxes) used
    finished: list[float] = dataclasses.field(default_factory=list)  # when each job was archived (epoch s)

    @property
    def per_min(self) -> float:
        return 60 * self.jobs / self.wall_s

    @property
    def steady_per_min(self) -> float:
        """Jobs per minute once the executor runs (from the (2 x slots)-th archived job to the last): without
        what a batch pays once (a zygote's imports, Ray's actors starting), which a running server has paid."""
        done = sorted(self.finished)
        k = 2 * self.slots
        if len(done) <= k + 1 or done[-1] <= done[k]:
            return float("nan")
        return 60 * (len(done) - 1 - k) / (done[-1] - done[k])

    @property
    def fixed(self) -> float:
        sums = [a + b for a, b in zip(self.to_first, self.to_end, strict=True)]
        return statistics.median(sums) if sums else float("nan")


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f}" if values else "   n/a"


def table(results: list[Result]) -> str:
    head = (f"{'way of running':<28}{'slots':>5}{'ok':>7}{'wall s':>8}{'jobs/min':>9}{'steady':>8}  "
            f"{'claim->1st step':>15}{'last->archived':>15}{'fixed/job':>10}   (medians, s)")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.label:<28}{r.slots:>5}{f'{r.ok}/{r.jobs}':>7}{r.wall_s:8.1f}{r.per_min:9.1f}"
                     f"{r.steady_per_min:8.1f}  "
                     f"{_med(r.to_first):>15}{_med(r.to_end):>15}{r.fixed:10.2f}")
    by = {r.key: r for r in results}
    ratios = []
    base = by.get("nngpt")
    for r in results:
        if base is not None and r is not base:
            ratios.append(f"{r.label} / nngpt loop: throughput x{r.per_min / base.per_min:.2f}")
    if "ray2" in by and "local2" in by:
        ray, local = by["ray2"], by["local2"]
        ratios.append(f"ray / local (2 slots): throughput x{ray.per_min / local.per_min:.2f} "
                      f"(steady: x{ray.steady_per_min / local.steady_per_min:.2f}; target >= 0.9)")
    lines.append("")
    for r in results:
        for section, steps in r.parts.items():
            lines.append(f"{r.label + ', ' + str(r.slots) + ' slot(s)':<34} {section}: " + ", ".join(
                f"{name} {statistics.median(v):.2f}" for name, v in steps.items() if v))
        if r.daemon_cpu_s is not None:
            lines.append(f"{r.label + ', ' + str(r.slots) + ' slot(s)':<34} Ray's own processes: "
                         f"{r.daemon_cpu_s:.1f} CPU s in {r.wall_s:.1f} s wall ({r.daemon_cpu_s / r.wall_s:.2f} cores)")
    return "\n".join(lines + [""] + ratios)


# --- the executors through the queue ---------------------------------------------------------------

def bench_settings(root: Path, sandbox: str, slots: int, executor: str = "local", address: str = "auto") -> Settings:
    settings = Settings.from_env(root / "zoo" / "zoo.sqlite", data_root=REPO / "data", sandbox=sandbox,
                                 executor=executor, ray_address=address)
    settings.slots = slots
    settings.threads = 1
    settings.memory_gb = 2.0
    settings.seed_zoo = False
    settings.baselines = False
    return settings


async def through_queue(key: str, label: str, settings: Settings, requests: list[EvalRequest],
                        cpu_probe: Callable[[], float] | None = None) -> Result:
    backend = TimedBackend(await anyio.to_thread.run_sync(make_backend, settings))
    cpu_at_start = cpu_probe() if cpu_probe is not None else 0.0
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, backend=backend) as queue:
            t0 = time.time()
            _, entries = await queue.submit_batch(requests)
            ids = [e["job_id"] for e in entries]
            rows = await _until_finished(queue, ids)
            daemon_cpu = cpu_probe() if cpu_probe is not None else None  # before the actors are retired
    wall = max(r["finished"] for r in rows.values()) - t0
    ok = [j for j in ids if rows[j]["status"] == "succeeded" and backend.marks.get(j, {}).keys() >= {
        "first_step", "last_point"}]
    for j in ids:
        if j not in ok:
            print(f"  {label}: {j} {rows[j]['status']}: {json.dumps(rows[j]['error'])[:300]}", flush=True)
    marks = [{"claim": rows[j]["started"], "archived": rows[j]["finished"], **backend.marks[j]} for j in ok]
    parts = {"claim->1st step": _steps(marks, ("claim", "start", *STAGES)),
             "last point->archived": _steps(marks, ("last_point", "waited", "archived")),
             "event delay (written->host)": {"all events": [lag for m in marks for lag in m.get("lag", [])]}}
    placed = getattr(backend.inner, "placed", None)
    if placed is not None:
        parts.update(_ray_parts(label, placed, ids, ok, backend.marks))
    return Result(key, label, settings.slot_count, wall, len(ok), len(ids),
                  [backend.marks[j]["first_step"] - rows[j]["started"] for j in ok],
                  [rows[j]["finished"] - backend.marks[j]["last_point"] for j in ok], parts,
                  None if daemon_cpu is None else daemon_cpu - cpu_at_start, [rows[j]["finished"] for j in ok])


async def _until_finished(queue: JobQueue, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    while len(rows) < len(ids):
        for job_id in ids:
            row = await queue.jobs.get(job_id)
            if job_id not in rows and row is not None and row["status"] in FINISHED:
                rows[job_id] = row
        await anyio.sleep(0.2)
    return rows


def _ray_parts(label: str, placed: dict[str, dict[str, Any]], ids: list[str], ok: list[str],
               marks: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Ray's own steps per job (the executor's stamps with the host's marks); prints how many actors and
    nodes ran the batch (a kept actor runs several jobs), the dataset's fetches and the niceness."""
    here = [placed[j] for j in ids if j in placed]
    print(f"  {label}: {len({p['pid'] for p in here})} actors on {len({p['node'] for p in here})} nodes ran "
          f"{len(ids)} jobs; the dataset fetched {sum(bool(p.get('data_fetched')) for p in here)} times; "
          f"niceness {sorted({json.dumps(p.get('niceness')) for p in here})}", flush=True)
    timings = [{**placed[j]["t"], **marks[j]} for j in ok if "t" in placed.get(j, {})]
    return {"ray start": _steps(timings, RAY_START), "ray end": _steps(timings, RAY_END)}


# where a job's time goes on Ray, from the executor's stamps (RayHandle.timings) and the host's marks
RAY_START = ("host_start", "host_called", "node_entered", "node_data", "node_staged", "node_sandbox_started",
             protocol.EVENT_READY)
RAY_END = ("last_point", "node_exited", "host_end_seen", "host_result", "waited")


def _steps(marks: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[float]]:
    """Per job, the seconds between consecutive stamps `names` (e.g. claim -> sandbox start (the host's
    checks, code quality, job dir) -> ready (the sandbox up, the runner's imports) -> check (data, model
    built and run once) -> trial start -> first step)."""
    return {f"{a}->{b}": [m[b] - m[a] for m in marks if a in m and b in m]
            for a, b in zip(names, names[1:], strict=False)}


# --- the NNGPT-style loop: a fresh Python process per model ----------------------------------------

def nngpt_loop(requests: list[EvalRequest], work: Path) -> Result:
    """Each model trained by the same runner, the same way, in a fresh unsandboxed Python process, one
    after the other (what NNGPT's evaluator does); scored from its predictions as the server does."""
    import numpy as np

    prepared = datasets.prepare(DATASET, REPO / "data", work / "cache")
    first, end, ok, finished = [], [], 0, []
    t0 = time.time()
    for i, req in enumerate(requests):
        job = work / f"m{i}"
        (job / "out").mkdir(parents=True)
        (job / "model.py").write_text(req.code)
        fields = {**prepared.spec_fields(), "model_path": str(job / "model.py"), "out_dir": str(job / "out")}
        spec = protocol.JobSpec(mode="train", **fields, fixed_prm=dict(req.prm), transforms=default_transforms(
            prepared.info), n_trials=1, epochs=req.epochs, eval_every=req.eval_every, seed=req.seed,
            time_budget_s=req.time_budget_s, threads=1)
        (job / "spec.json").write_text(spec.to_json())
        marks = _run_runner(job)
        preds = sorted((job / "out" / "preds").glob("*.npy"))
        if preds and {"first_step", "last_point"} <= marks.keys():
            np.mean(np.load(preds[-1]) == prepared.test_labels)  # scored, as the server scores a point
            ok += 1
            first.append(marks["first_step"] - marks["spawn"])
            end.append(marks["exit"] - marks["last_point"] + marks["scored"])
            finished.append(time.time())
    return Result("nngpt", "nngpt loop (process/model)", 1, time.time() - t0, ok, len(requests), first, end,
                  finished=finished)


def _run_runner(job: Path) -> dict[str, float]:
    """Run the runner on job/spec.json; stamp its spawn, first step, last point and exit (time.time)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HOME": str(job / "out"), "CUDA_VISIBLE_DEVICES": ""}
    marks = {"spawn": time.time()}
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.runner", str(job / "spec.json")], cwd=job / "out",
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events, offset = job / "out" / protocol.EVENTS_FILE, 0
    while True:
        done = proc.poll() is not None
        if events.exists():
            with open(events, "rb") as f:
                f.seek(offset)
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.splitlines():
                kind = json.loads(line).get("event")
                if kind == protocol.EVENT_FIRST_STEP:
                    marks.setdefault("first_step", time.time())
                elif kind == protocol.EVENT_POINT:
                    marks["last_point"] = time.time()
        if done:
            marks["exit"] = time.time()
            break
        time.sleep(0.05)  # the host's own poll interval
    marks["scored"] = 0.0  # scoring one .npy is microseconds; archiving is the server's extra
    return marks


# --- a two-node Ray cluster on loopback -------------------------------------------------------------

class RayCluster(LocalRayCluster):
    """Head and one joined node, one CPU each (two slots, as local with 2 slots), on 127.0.0.1."""

    def __init__(self, temp: Path):
        one_cpu = ["--num-cpus", "1", "--num-gpus", "0"]
        super().__init__(temp, one_cpu, [one_cpu])
        self.cpu_by_name: dict[str, float] = {}
        self.zygote_cpu_s = 0.0

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the nodes' live processes used themselves: the GCS, raylets, Ray's
        agents and workers (actors); not their children's (the sandboxes, once they ended and were reaped),
        and not the sandbox zygotes' (each node's actor has one; they are the sandboxes' imports, which the
        local executor pays in its own zygote), which are counted apart (`zygote_cpu_s`)."""
        tick = os.sysconf("SC_CLK_TCK")
        by_name: dict[str, int] = {}
        zygote_ticks = 0
        for pid in self.processes():
            try:
                head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            fields = tail.split()
            if b"sandbox/zygote.py" in cmdline:
                zygote_ticks += int(fields[11]) + int(fields[12])
                continue
            name = head.split("(", 1)[1]
            by_name[name] = by_name.get(name, 0) + int(fields[11]) + int(fields[12])  # utime, stime
        self.zygote_cpu_s = zygote_ticks / tick
        self.cpu_by_name = {name: ticks / tick for name, ticks in sorted(by_name.items(), key=lambda kv: -kv[1])}
        return sum(by_name.values()) / tick


# --- main ------------------------------------------------------------------------------------------

def _reexec_in_netns() -> None:
    """Run this script again inside a network namespace whose only interface is `lo` (brought up)."""
    script = 'ip link set lo up && exec "$0" "$@"'
    argv = ["unshare", "--net", "sh", "-c", script, sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    os.execvpe("unshare", argv, {**os.environ, INSIDE: "1"})


def run(args: argparse.Namespace) -> list[Result]:
    requests = make_requests(args.models, args.epochs)
    configs = args.configs.split(",")
    results: list[Result] = []
    subprocess.run([sys.executable, "-c", "import numpy, torch, torchvision, optuna"], check=True)  # warm disk
    with tempfile.TemporaryDirectory(prefix="lemur-throughput-") as tmp:
        root = Path(tmp)
        steps: dict[str, Callable[[], Result]] = {
            "nngpt": lambda: nngpt_loop(requests, root / "nngpt"),
            "local1": lambda: anyio.run(through_queue, "local1", f"local {args.sandbox}", bench_settings(
                root / "local1", args.sandbox, 1), requests),
            "local2": lambda: anyio.run(through_queue, "local2", f"local {args.sandbox}", bench_settings(
                root / "local2", args.sandbox, 2), requests),
        }
        for name in configs:
            if name in steps:
                print(f"running {name} ...", flush=True)
                results.append(steps[name]())
        if "ray2" in configs:
            print("running ray2 ...", flush=True)
            (root / "ray").mkdir()
            with RayCluster(root / "ray") as cluster:
                settings = bench_settings(root / "ray2", args.sandbox, 2, "ray", cluster.address)
                results.append(anyio.run(through_queue, "ray2", f"ray 2 nodes ({args.sandbox})", settings, requests,
                                         cluster.cpu_s))
                print("  Ray's processes, CPU s since the cluster started: " + ", ".join(
                    f"{name} {cpu:.1f}" for name, cpu in list(cluster.cpu_by_name.items())[:8])
                    + f"; the nodes' sandbox zygotes: {cluster.zygote_cpu_s:.1f}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--epochs", type=float, default=0.5)
    parser.add_argument("--sandbox", choices=("process", "docker"), default="process",
                        help="the sandbox of every executor (docker: pre-started containers locally)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    args = parser.parse_args()
    if "ray2" in args.configs and not only_loopback():
        if os.environ.get(INSIDE):
            raise SystemExit("still a route out inside the namespace: refusing to start Ray")
        _reexec_in_netns()
    # Ray reads its auth mode and token when it is imported: set them before, for the nodes and this driver
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24)})
    results = run(args)
    print(f"\n{args.models} models ({DATASET}, tiny nets, {args.epochs} epoch each), 1 CPU thread per job, "
          f"{os.cpu_count()} CPUs\n")
    print(table(results))


if __name__ == "__main__":
    main()
