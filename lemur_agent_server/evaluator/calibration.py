"""Device calibration: put training times measured on different machines on one scale.

A run's `duration_ns` says how long it trained on whatever machine ran it; a GPU job and a 1-thread
CPU job of the same model differ by orders of magnitude, so raw durations of two machines cannot be
ranked together. Each device therefore times a fixed set of reference workloads
(`sandbox.runner.calibrate`: one small CNN family, forward + backward + SGD step on one fixed batch,
at four work sizes from 26 MFLOP to 1.4 GFLOP per step), in the sandbox, on the device and thread
count the jobs get. That gives the device's **speed curve**: at each workload's work per step W,

    factor(W) = REFERENCE_STEP_NS[workload] / the device's median step time on it

and each run stores its training time on the **reference device**

    duration_norm_ns = duration_ns x factor(the run's work per step)

where the run's work per step is its model's forward FLOPs for one sample (measured by the check, the
`model.flops` column) times its batch (`prm.batch`), and factor(W) is interpolated linearly in log W
between the two nearest workloads (the nearest one's factor outside their range; the anchor
workload's factor when the run's FLOPs or batch are unknown). The reference device is nominal: one
that takes exactly `REFERENCE_STEP_NS` per step of each workload, which is one thread of the 2-core
Xeon ("Intel(R) Xeon(R) Processor", KVM) this project is developed on, rounded, and, at the anchor
(the single workload of version 1: width 1, batch 32), exactly 10 ms per step as version 1 defined
it. Twice as fast as the reference -> factor 2 -> a 10 s run counts 20 s.

Why these choices:
- A curve, not one number: how much faster a device runs a step depends on the step's size. Measured
  here, a second CPU thread speeds a 26 MFLOP step up 1.4x and a 400 MFLOP one 1.8x; a GPU's lead grows
  far more with size. With one workload a model of another size got the wrong factor (23 % apart on 1
  vs 2 threads); at its own work per step it gets the speed-up of steps like its own.
- Measured once per device and harness, cached in the zoo (`device_calibration`), reused by every
  later job and server: the key is the device kind, its name (CPU model and core count, or the GPU's
  name), the sandbox's thread count, and the harness (backend, Docker image id or interpreter, the
  runner's source hash, torch's version, the workload version). A new image or runner is a new key.
- Never inside a job and never beside one: the first job on a new device creates the device's row as
  `pending` (a lookup, before its clock starts) and runs at once; the queue measures the device when
  a worker is idle and no job is running (at server start, or after the first job), and a job that
  arrives meanwhile cancels the measurement (retried at the next idle moment). The result fills in
  the normalized time of every run that trained on the device before it was known. So the cost lands
  on no job's budget or duration, and no job waits for it.
- Robust against a noisy host: the runner interleaves the workloads (one block of each per round, so a
  slow spell hits all of them alike), adds rounds until the blocks agree (`calibrate.TARGET_IQR`), and
  the host takes medians. Each workload's relative spread `(max - min) / median` and interquartile
  range are stored with the curve (`spread` of the row: the anchor's), so a reader sees how much to
  trust the factor. The run's side is its training-only time (`duration_ns`: `learn()` alone, measured
  in the sandbox, without the warm-up step, evaluation or sandbox start), not its wall time.
- Rows of workload version 1 (no curve) stay readable and keep their single factor.
- Only our code runs in a calibration sandbox (no submission, no dataset), but its events are still
  range-checked. A runner that refuses the mode (a Docker image built before it existed) is recorded
  as `failed` for that key and not retried; its runs get no normalized time. Other failures (a
  timeout on a loaded host) are remembered for this process only, so a later server tries again.
- Local executor only: on a Ray cluster the node that runs a job is not known before it is placed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from sandbox import _owner, datasets, protocol
from sandbox.backend import Backend, JobPaths, Limits
from sandbox.runner import calibrate as workload
from zoo.store import ZooStore

log = logging.getLogger(__name__)

# the reference device's time per step of each workload (nominal: one thread of the 2-core Xeon, rounded)
REFERENCE_STEP_NS = {"w1-b8": 3_100_000, "w1-b32": 10_000_000, "w2-b32": 20_000_000, "w2-b128": 100_000_000}
ANCHOR = workload.POINTS[workload.ANCHOR]
REFERENCE_BLOCK_NS = REFERENCE_STEP_NS[ANCHOR.name] * ANCHOR.steps  # one timed block of the anchor workload
REFERENCE_DESCRIPTION = (
    "the reference device: a nominal device that runs one training step (forward + backward + SGD, one fixed "
    "batch of 3x32x32 images) of each calibration workload, a small CNN at four work sizes, in "
    + ", ".join(f"{REFERENCE_STEP_NS[p.name] / 1e6:g} ms ({p.work / 1e6:,.0f} MFLOP)" for p in workload.POINTS)
    + " (one thread of a 2-core Xeon, rounded); duration_norm = duration x the device's speed-up over it at the "
    "run's work per step (model FLOPs x batch), measured once per device in the sandbox")
CALIBRATE_WALL_S = 300.0  # sandbox start plus the workload on a cold host shared with heavy jobs (seconds at most)
MIN_BLOCK_NS = 10_000  # a block faster than 10 us is not a measurement
MAX_BLOCK_NS = 600 * 10**9


class Status:
    """`device_calibration.status`."""

    PENDING = "pending"  # the device was seen; runs point at the row and get their time when it is measured
    OK = "ok"
    FAILED = "failed"  # the runner refused the mode: not measured again for this key


@dataclasses.dataclass(frozen=True)
class DeviceKey:
    """What makes two calibrations comparable: the same device, threads and harness."""

    kind: str  # cpu | cuda
    name: str
    threads: int
    harness: str

    @property
    def digest(self) -> str:
        raw = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """One stored calibration row, as the archive uses it."""

    id: int
    key: str
    status: str
    factor: float | None
    median_ns: int | None
    spread: float | None
    device_name: str
    threads: int

    @property
    def ok(self) -> bool:
        return self.status == Status.OK and self.factor is not None

    @classmethod
    def of(cls, row: dict[str, Any]) -> Calibration:
        return cls(id=int(row["id"]), key=str(row["key"]), status=str(row["status"]), factor=row["factor"],
                   median_ns=row["median_ns"], spread=row["spread"], device_name=str(row["device_name"]),
                   threads=int(row["threads"]))


# --- the key ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model and logical core count (as the runner reports it in its `ready` event)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def gpu_name(gpu: str) -> str:
    """The GPU's name from nvidia-smi (`cuda:<id>` when the tool is missing or fails)."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader", "-i", str(gpu)],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"cuda:{gpu}"


def runner_source_hash() -> str:
    """sha256 of the runner's files (sandbox/protocol.py, sandbox/runner/*.py) as this checkout has them."""
    root = Path(protocol.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [root / "protocol.py", *sorted((root / "runner").glob("*.py"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _image_id(backend: Backend) -> str | None:
    """A Docker backend's image id (a rebuilt image is a new harness); None for other backends."""
    image = getattr(backend, "image", None)
    client = getattr(backend, "client", None) if image else None
    if client is None:
        return None
    try:
        return str(client.images.get(image).id)
    except Exception:  # noqa: BLE001 - no engine now: the tag alone names the harness
        return None


def harness_id(backend: Backend) -> str:
    """The software that runs the workload: backend, image (or interpreter), runner source, torch."""
    name = str(backend.describe().get("backend", type(backend).__name__))
    image = getattr(backend, "image", None)
    where = f"{image}@{_image_id(backend)}" if image else f"python {platform.python_version()} {sys.executable}"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    return (f"{name}|{where}|runner {runner_source_hash()}|torch {torch_version}|"
            f"workload v{workload.WORKLOAD_VERSION}")


# --- the measurement -------------------------------------------------------------------------------------
def summarize_point(point: workload.Point, times_ns: list[int]) -> dict[str, Any]:
    """One workload's entry of the curve: its median block, spread, interquartile range and factor."""
    median = int(statistics.median(times_ns))
    return {"name": point.name, "work": point.work, "steps": point.steps, "median_ns": median,
            "spread": round((max(times_ns) - min(times_ns)) / median, 4),
            "iqr": round(workload.relative_iqr(times_ns), 4),
            "factor": REFERENCE_STEP_NS[point.name] * point.steps / median}


def summarize(times_per_point: list[list[int]]) -> dict[str, Any]:
    """The row's result fields: the curve, and the anchor's median, spread, factor and block times in
    the columns version 1 filled (readers that know one factor per device keep working)."""
    curve = [summarize_point(p, t) for p, t in zip(workload.POINTS, times_per_point)]
    anchor = curve[workload.ANCHOR]
    return {"median_ns": anchor["median_ns"], "spread": anchor["spread"], "factor": anchor["factor"],
            "times_ns": list(times_per_point[workload.ANCHOR]), "curve": curve}


def _valid_blocks(value: Any) -> list[int] | None:
    if not isinstance(value, list) or not workload.MIN_ROUNDS <= len(value) <= workload.MAX_ROUNDS:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and MIN_BLOCK_NS <= t <= MAX_BLOCK_NS for t in value):
        return None
    return list(value)


def valid_points(event: dict[str, Any]) -> list[list[int]] | None:
    """The `calibrated` event's block times per workload, when they are what this runner's workloads
    send (the same points, in order, each with a plausible number of plausible times); else None."""
    points = event.get("points")
    if not isinstance(points, list) or len(points) != len(workload.POINTS):
        return None
    times = []
    for sent, point in zip(points, workload.POINTS):
        if not isinstance(sent, dict) or sent.get("name") != point.name or sent.get("steps") != point.steps:
            return None
        blocks = _valid_blocks(sent.get("times_ns"))
        if blocks is None:
            return None
        times.append(blocks)
    return times


def factor_at(curve: list[dict[str, Any]], work: float | None, anchor_factor: float) -> float:
    """The device's factor at `work` FLOPs per step: linear in log(work) between the two nearest
    workloads of the curve, the nearest one's outside them; `anchor_factor` when work is unknown."""
    if not curve or work is None or work <= 0:
        return anchor_factor
    points = sorted((float(c["work"]), float(c["factor"])) for c in curve)
    if work <= points[0][0]:
        return points[0][1]
    for (w0, f0), (w1, f1) in zip(points, points[1:]):
        if work <= w1:
            share = (math.log(work) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return f0 + share * (f1 - f0)
    return points[-1][1]


def run_work(flops: Any, prm: Any) -> int | None:
    """A run's work per step: its model's forward FLOPs for one sample times its batch (None if unknown)."""
    try:
        batch = (json.loads(prm) if isinstance(prm, str) else prm or {}).get("batch")
    except (ValueError, AttributeError):
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (flops, batch))
    if not numbers or flops <= 0 or batch <= 0:
        return None
    return int(flops * batch)


def _spec(backend: Backend, paths: JobPaths, gpu: str | None, threads: int) -> protocol.JobSpec:
    rp = backend.runner_paths(paths)
    return protocol.JobSpec(
        mode=protocol.MODE_CALIBRATE, task=datasets.TASK, dataset="calibration", metric=datasets.METRIC,
        num_classes=workload.CLASSES, image_shape=list(workload.IMAGE_SHAPE), mean=[0.5] * 3, std=[0.25] * 3,
        model_path=rp.model, data_dir=rp.data_dir, out_dir=rp.out_dir, time_budget_s=CALIBRATE_WALL_S,
        device="cuda" if gpu is not None else "cpu", threads=threads, save_weights=False)


def _folder_owner() -> str:
    """`<pid>-<start ticks>` of this server: a calibration folder is named by its owner, so a server that
    died mid-measurement leaves a folder the next server can tell is an orphan (`sweep_orphans`)."""
    return f"{os.getpid()}-{_owner.start_ticks(os.getpid())}"


def sweep_orphans(jobs_root: Path) -> list[str]:
    """Remove the calibration folders of servers that no longer run (killed mid-measurement)."""
    removed = []
    for path in jobs_root.glob("calibrate-*") if jobs_root.is_dir() else ():
        parts = path.name.rsplit("-", 2)
        alive = len(parts) == 3 and parts[1].isdigit() and _owner.is_running(int(parts[1]), parts[2])
        if not alive:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _prepare(jobs_root: Path, key: DeviceKey) -> JobPaths:
    job_dir = jobs_root / f"calibrate-{key.digest[:12]}-{_folder_owner()}"
    paths = JobPaths(job_dir=job_dir, data_dir=job_dir / "nodata")
    shutil.rmtree(job_dir, ignore_errors=True)
    for d in (paths.in_dir, paths.out_dir, paths.data_dir):
        d.mkdir(parents=True, mode=0o755)
    job_dir.chmod(0o755)
    return paths


async def measure(backend: Backend, jobs_root: Path, key: DeviceKey, gpu: str | None, memory_bytes: int
                  ) -> dict[str, Any]:
    """Run the workload in one sandbox; the row to store (status ok or failed, with why)."""
    paths = await anyio.to_thread.run_sync(_prepare, jobs_root, key)
    spec_path = paths.in_dir / protocol.SPEC_FILE
    spec_path.write_text(_spec(backend, paths, gpu, key.threads).to_json())
    spec_path.chmod(0o644)
    seen: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    handle = await backend.start(paths, Limits(wall_s=CALIBRATE_WALL_S, memory_bytes=memory_bytes,
                                               cpus=float(key.threads), gpu=gpu))
    try:
        async for event in handle.events():
            kind = event.get("event")
            if isinstance(kind, str) and kind not in seen:
                seen[kind] = event
        exit = await handle.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await handle.cancel()
            await anyio.to_thread.run_sync(shutil.rmtree, paths.job_dir, True)
    return _row(key, seen, exit.exit_code, exit.timed_out, exit.log_tail, time.monotonic() - t0)


def _row(key: DeviceKey, seen: dict[str, dict[str, Any]], exit_code: int | None, timed_out: bool, log_tail: str,
         wall_s: float) -> dict[str, Any]:
    ready = seen.get(protocol.EVENT_READY, {})
    detail: dict[str, Any] = {"runner_device": str(ready.get("device_name"))[:200],
                              "runner_threads": ready.get("threads"), "wall_s": round(wall_s, 3),
                              "steps": ANCHOR.steps, "batch": ANCHOR.batch,
                              "reference_block_ns": REFERENCE_BLOCK_NS,
                              "reference_step_ns": REFERENCE_STEP_NS}
    row: dict[str, Any] = {"key": key.digest, "device_kind": key.kind, "device_name": key.name,
                           "threads": key.threads, "harness": key.harness, "created": time.time(), "detail": detail}
    times = valid_points(seen.get(protocol.EVENT_CALIBRATED, {}))
    if times is not None:
        return {**row, "status": Status.OK, **summarize(times)}
    error = seen.get(protocol.EVENT_ERROR)
    if error is not None:
        detail["error"] = f"{error.get('kind')}: {str(error.get('message'))[:500]}"
        detail["refused"] = True  # the runner itself said no: the same harness will say it again
    else:
        detail["error"] = (f"the calibration sandbox timed out after {wall_s:.0f} s" if timed_out else
                           f"the calibration sandbox ended (exit {exit_code}) without a result: {log_tail[-300:]}")
    return {**row, "status": Status.FAILED}


# --- the normalization -----------------------------------------------------------------------------------
async def renormalize_in(db: Any, calibration_id: int, run_uid: str | None = None) -> int:
    """Each run of the calibration (or only `run_uid`) gets its duration on the reference device at its own
    work per step (`factor_at` of the device's curve). A calibration without a curve (workload version 1)
    or not ok is left as the store normalized it (the single factor, or NULL). Returns the runs updated."""
    cur = await db.execute("SELECT status, factor, curve FROM device_calibration WHERE id=?", (calibration_id,))
    calibration = await cur.fetchone()
    if calibration is None or calibration[0] != Status.OK or calibration[2] is None:
        return 0
    anchor_factor, curve = float(calibration[1]), json.loads(calibration[2])
    sql = ("SELECT r.id, r.duration_ns, m.flops, r.prm FROM run r JOIN model m ON m.id = r.model_id "
           "WHERE r.calibration_id = ?1 AND r.duration_ns IS NOT NULL")
    args: tuple[Any, ...] = (calibration_id,)
    if run_uid is not None:
        # zoo.schema.RUN_BY_UID's form on parameter 2 (the uid's tail index, not a scan of every run)
        sql, args = sql + " AND substr(r.uid, -16) = substr(?2, -16) AND +r.uid = ?2", (calibration_id, run_uid)
    cur = await db.execute(sql, args)
    updates = [(int(duration * factor_at(curve, run_work(flops, prm), anchor_factor)), run_id)
               for run_id, duration, flops, prm in await cur.fetchall()]
    await db.executemany("UPDATE run SET duration_norm_ns=? WHERE id=?", updates)
    return len(updates)


async def normalize_run_in(db: Any, run_uid: str, calibration_id: int) -> None:
    """Inside the archive's transaction: which device calibration the run's time is measured against, and its
    duration on the reference device at its work per step (NULL while the calibration is pending)."""
    await ZooStore.set_run_calibration_in(db, run_uid, calibration_id)
    await renormalize_in(db, calibration_id, run_uid)


async def store_curve(store: ZooStore, key: str, fresh: dict[str, Any]) -> None:
    """After `finish_calibration` stored this measurement: its curve, and every run of the device
    normalized by it, in one transaction. Only when this measurement is the stored one (another server
    may have finished the same device first: its result and curve stay)."""
    async with store.transaction() as db:
        cur = await db.execute("SELECT id FROM device_calibration WHERE key=? AND status=? AND times_ns=? "
                               "AND curve IS NULL", (key, Status.OK, json.dumps(fresh["times_ns"])))
        found = await cur.fetchone()
        if found is None:
            return
        await db.execute("UPDATE device_calibration SET curve=? WHERE id=?", (json.dumps(fresh["curve"]), found[0]))
        await renormalize_in(db, int(found[0]))


# --- the cache -------------------------------------------------------------------------------------------
class Calibrator:
    """Knows each device's calibration row; measures a pending one when the queue lets it (`measure`).

    A job asks `device()` for its device's row before its clock starts: a lookup (the row is created
    `pending` the first time a device is seen), never a measurement, so no job ever waits for one. The
    queue's idle worker calls `measure()`; the stored result fills in the runs that trained meanwhile."""

    def __init__(self, store: ZooStore, backend: Backend, jobs_root: Path, memory_bytes: int) -> None:
        self.store = store
        self.backend = backend
        self.jobs_root = jobs_root
        self.memory_bytes = memory_bytes
        self.measured = 0  # calibration sandboxes this calibrator ran to the end (a cached device costs none)
        self._rows: dict[str, Calibration] = {}
        self._tried: set[str] = set()  # measured (or failed) in this process: not again
        self._lock = anyio.Lock()  # one calibration sandbox at a time
        self._harness: str | None = None
        sweep_orphans(jobs_root)  # folders of servers killed while they measured

    async def key(self, gpu: str | None, threads: int) -> DeviceKey:
        if self._harness is None:
            self._harness = await anyio.to_thread.run_sync(harness_id, self.backend)
        if gpu is None:
            return DeviceKey("cpu", await anyio.to_thread.run_sync(cpu_name), int(threads), self._harness)
        return DeviceKey("cuda", await anyio.to_thread.run_sync(gpu_name, gpu), 1, self._harness)

    async def device(self, gpu: str | None, threads: int) -> Calibration | None:
        """The device's calibration row (created `pending` when the zoo has none yet); None when even that
        fails. Never raises: a job runs without normalization rather than not at all."""
        try:
            key = await self.key(gpu, threads)
            known = self._rows.get(key.digest)
            if known is not None and known.status != Status.PENDING:
                return known
            row = await self.store.calibration_by_key(key.digest) or await self.store.add_calibration(
                {"key": key.digest, "device_kind": key.kind, "device_name": key.name, "threads": key.threads,
                 "harness": key.harness, "status": Status.PENDING, "created": time.time()})
            self._rows[key.digest] = Calibration.of(row)
            return self._rows[key.digest]
        except Exception:  # noqa: BLE001 - calibration is a bonus on top of the job, never its failure
            log.exception("device calibration lookup failed; runs get no normalized duration")
            return None

    async def needs_measuring(self, gpu: str | None, threads: int) -> bool:
        """True while the device's row is pending and this process has not measured it yet."""
        calibration = await self.device(gpu, threads)
        return (calibration is not None and calibration.status == Status.PENDING
                and calibration.key not in self._tried)

    async def measure(self, gpu: str | None, threads: int) -> Calibration | None:
        """Measure the device if its row is pending (one sandbox, seconds); the stored row after. Cancel it
        to give the device back to a job: the sandbox is killed and the row stays pending."""
        if not await self.needs_measuring(gpu, threads):
            return self._rows.get((await self.key(gpu, threads)).digest)
        key = await self.key(gpu, threads)
        async with self._lock:
            fresh = await measure(self.backend, self.jobs_root, key, gpu, self.memory_bytes)
            self._tried.add(key.digest)
            self.measured += 1
            if fresh["status"] != Status.OK and not fresh["detail"].get("refused"):
                log.warning("calibration of %s (%d threads) failed: %s", key.name, key.threads,
                            fresh["detail"]["error"])
                return None  # transient: left pending, a later server measures again
            row = await self.store.finish_calibration(key.digest, fresh)
            if fresh["status"] == Status.OK:
                await store_curve(self.store, key.digest, fresh)
        if row is None:
            return None
        self._rows[key.digest] = Calibration.of(row)
        log.info("calibrated %s (%d threads): median %.1f ms per block, spread %.1f %%", key.name, key.threads,
                 (row["median_ns"] or 0) / 1e6, 100 * (row["spread"] or 0))
        return self._rows[key.digest]
