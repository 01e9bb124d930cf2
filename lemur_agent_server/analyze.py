"""`lemur-agent-server analyze`: parameter count, FLOPs, fingerprint and code quality for every model that
lacks them (the ~10k models of a LEMUR import arrive without), measured in the sandbox.

Why this shape:
- The code is untrusted, so it is built only inside the sandbox (`sandbox.runner.analyze`); code
  quality is static analysis (ruff, radon) and runs here, in a worker thread while the sandbox works.
- One sandbox start costs seconds and one model costs milliseconds, so a sandbox measures a batch of
  models (`batch_size`) and reports one `analyzed` event per model.
- Resumable: results are committed every few models; a model with a `model_analysis` row (or with all
  four stats) is never picked again, so a killed run continues with what is still missing.
- A model that does not build is recorded once with its reason (`model_analysis.status = failed`); one
  that hangs is interrupted by the runner's per-model alarm, and one that ignores the alarm (or kills
  the interpreter) is caught from outside: a watchdog kills a sandbox that reports nothing for
  `model_timeout_s + STALL_GRACE_S`, the model in flight (the first unreported one: the runner goes in
  order) is recorded with that reason, and the rest of the batch goes into a fresh sandbox.
- The runner's numbers are hints like every sandbox output (a model can forge events for the models
  after it in its batch); they are type- and range-checked here, never executed or trusted further.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator.backends import choose_backend
from lemur_agent_server.evaluator.quality import code_quality
from sandbox import datasets, protocol
from sandbox.backend import Backend, Exit, Handle, JobPaths, Limits
from sandbox.runner.params import parse_transform
from zoo.store import ZooStore

IMAGE_TASK = datasets.TASK
DEFAULT_SHAPE = {"image_shape": [3, 32, 32], "num_classes": 10, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                 "transform": "norm_32"}  # a LEMUR image dataset we do not know: CIFAR-like input
# tried in turn when a model fails at its own size with an exception (e.g. too small for its pooling)
FALLBACK_TRANSFORMS = ("norm_224", "norm_299")
BATCH_SIZE = 200
MODEL_TIMEOUT_S = 60.0
STARTUP_S = 180.0  # the runner's start (interpreter, torch import) on a cold, loaded machine
STALL_GRACE_S = 15.0  # beyond the runner's own per-model alarm, before the watchdog kills the sandbox
WARM_UP_S = 30.0  # the runner's warm-up between `ready` and the first model (seconds on a loaded machine)
FLUSH_EVERY = 20  # results per transaction (and at least every FLUSH_S and after each sandbox): what a kill loses
FLUSH_S = 2.0
MAX_INT = 2**62

ProgressFn = Callable[[int, int], None]


class AnalysisStatus(StrEnum):
    """`model_analysis.status`."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # not analysable here (a task without an image-classification input)


class AnalyzeError(RuntimeError):
    """The analysis itself cannot go on (the sandbox does not start): no model is to blame."""


@dataclasses.dataclass(frozen=True)
class AnalyzeFilters:
    """Which models to analyse (all that lack stats when empty)."""

    task: str | None = None
    dataset: str | None = None
    nn: tuple[str, ...] = ()
    nn_prefix: tuple[str, ...] = ()
    origin: tuple[str, ...] = ()
    limit: int | None = None
    retry_failed: bool = False  # analyse models recorded as failed again
    batch_size: int = BATCH_SIZE
    model_timeout_s: float = MODEL_TIMEOUT_S
    parallel: int = max(1, min(4, (os.cpu_count() or 1) // 2))  # sandboxes at once (one CPU thread each)


@dataclasses.dataclass
class Report:
    pending: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    quality_failed: int = 0
    sandboxes: int = 0
    seconds: float = 0.0
    failure_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    isolation: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["models_per_s"] = round(self.done / self.seconds, 2) if self.seconds > 0 else None
        return data


@dataclasses.dataclass
class Target:
    """One model to analyse and the input it gets (from its runs' dataset)."""

    model_id: int
    name: str
    entry: dict[str, Any] | None  # the runner's model entry (without file/id); None when not analysable
    dataset: str | None
    reason: str | None = None  # why not analysable


# --- choosing the models ---------------------------------------------------------------------------------
def _where(filters: AnalyzeFilters) -> tuple[str, list[Any]]:
    done = "a.status = 'ok'" if filters.retry_failed else "1"
    clauses = ["(m.params IS NULL OR m.flops IS NULL OR m.fingerprint IS NULL OR m.code_quality IS NULL)",
               f"NOT EXISTS (SELECT 1 FROM model_analysis a WHERE a.model_id = m.id AND {done})"]
    args: list[Any] = []
    if filters.origin:
        clauses.append(f"m.origin IN ({','.join('?' * len(filters.origin))})")
        args += filters.origin
    names = [f"m.name IN ({','.join('?' * len(filters.nn))})"] if filters.nn else []
    args += filters.nn
    for prefix in filters.nn_prefix:
        names.append("substr(m.name, 1, ?) = ?")
        args += [len(prefix), prefix]
    if names:
        clauses.append("(" + " OR ".join(names) + ")")
    runs = [(col, val) for col, val in (("task", filters.task), ("dataset", filters.dataset)) if val]
    if runs:
        clauses.append("EXISTS (SELECT 1 FROM run r WHERE r.model_id = m.id AND "
                       + " AND ".join(f"r.{col} = ?" for col, _ in runs) + ")")
        args += [val for _, val in runs]
    return " AND ".join(clauses), args


def _transform(uses: Counter[str], default: str) -> str:
    """The transform the model ran with most (when our runner knows its size), else `default`."""
    for name, _ in uses.most_common():
        try:
            parse_transform(name)
        except ValueError:
            continue
        return name
    return default


def input_for(run_counts: Sequence[tuple[str, str, str | None, int]]
              ) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(runner entry, dataset, reason) from a model's (task, dataset, transform, runs) counts: the image
    dataset it ran on most, at the transform it ran with most; a dataset we do not know, or no runs at
    all, gets CIFAR-like 3x32x32 with 10 classes. Larger sizes are the fallbacks (`FALLBACK_TRANSFORMS`)."""
    images = Counter({ds: 0 for task, ds, _, _ in run_counts if task == IMAGE_TASK})
    if not images:
        tasks = sorted({task for task, _, _, _ in run_counts})
        if tasks:
            return None, None, f"not analysable: task {', '.join(tasks)} (only {IMAGE_TASK} models are built)"
        return _with_fallbacks(dict(DEFAULT_SHAPE)), None, None
    for task, ds, _, n in run_counts:
        if task == IMAGE_TASK:
            images[ds] += n
    dataset = images.most_common(1)[0][0]
    uses = Counter({tf: n for task, ds, tf, n in run_counts if task == IMAGE_TASK and ds == dataset and tf})
    try:
        info = datasets.get_info(dataset)
    except datasets.UnknownDataset:
        entry = {**DEFAULT_SHAPE, "transform": _transform(uses, str(DEFAULT_SHAPE["transform"]))}
        return _with_fallbacks(entry), dataset, None
    entry = {"image_shape": list(info.image_shape), "num_classes": info.num_classes, "mean": list(info.mean),
             "std": list(info.std), "transform": _transform(uses, info.default_transform)}
    return _with_fallbacks(entry), dataset, None


def _with_fallbacks(entry: dict[str, Any]) -> dict[str, Any]:
    entry["fallback_transforms"] = [t for t in FALLBACK_TRANSFORMS if t != entry["transform"]]
    return entry


async def pending_targets(store: ZooStore, filters: AnalyzeFilters) -> list[Target]:
    """The models to analyse, in id order, each with its input."""
    where, args = _where(filters)
    limit = f" LIMIT {int(filters.limit)}" if filters.limit else ""
    models = await store.fetchall(f"SELECT m.id, m.name FROM model m WHERE {where} ORDER BY m.id{limit}", args)
    counts: dict[int, list[tuple[str, str, int]]] = {}
    if models:
        rows = await store.fetchall("SELECT model_id, task, dataset, transform, COUNT(*) AS n FROM run "
                                    "GROUP BY model_id, task, dataset, transform")
        wanted = {m["id"] for m in models}
        for r in rows:
            if r["model_id"] in wanted:
                counts.setdefault(r["model_id"], []).append((r["task"], r["dataset"], r["transform"], r["n"]))
    targets = []
    for m in models:
        entry, dataset, reason = input_for(counts.get(m["id"], []))
        targets.append(Target(m["id"], m["name"], entry, dataset, reason))
    return targets


# --- one sandbox ------------------------------------------------------------------------------------------
def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_INT else None


def _shape(value: Any) -> list[int] | None:
    if isinstance(value, list) and len(value) <= 8 and all(_int(v) is not None for v in value):
        return value
    return None


def sandbox_stats(event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(stats, error) read defensively from one `analyzed` event (written by untrusted code)."""
    seconds = event.get("seconds")
    seconds = round(float(seconds), 4) if isinstance(seconds, int | float) and 0 <= seconds < 1e6 else None
    if event.get("ok") is not True:
        err = event.get("error") if isinstance(event.get("error"), dict) else {}
        kind = err.get("kind") if err.get("kind") in protocol.FAILURE_KINDS else protocol.KIND_EXCEPTION
        return {"seconds": seconds}, {"kind": str(kind),
                                      "message": str(err.get("message") or "the model could not be built")[:2000]}
    fp = event.get("fingerprint")
    stats = {"params": _int(event.get("params")), "flops": _int(event.get("flops")),
             "fingerprint": fp if isinstance(fp, str) and 0 < len(fp) <= 128 else None,
             "in_shape": _shape(event.get("in_shape")), "out_shape": _shape(event.get("out_shape")),
             "transform": str(event.get("transform"))[:40] if event.get("transform") else None,
             "seconds": seconds}
    if stats["params"] is None:
        return {}, {"kind": protocol.KIND_SANDBOX, "message": "the sandbox reported no valid parameter count"}
    return stats, None


def lost_model_error(exit: Exit, stalled: bool, timeout_s: float) -> dict[str, Any]:
    """Why the model in flight got no result: the sandbox ended (or was killed) while it ran."""
    if stalled or exit.timed_out:
        return {"kind": protocol.KIND_TIMEOUT,
                "message": f"no result within {timeout_s + STALL_GRACE_S:g} s (the sandbox was killed; the model "
                           "ignored the runner's alarm: a long C-level loop or a swallowed exception)"}
    if exit.oom_killed:
        return {"kind": protocol.KIND_OOM, "message": "the sandbox's memory limit killed it while building this model"}
    how = f"signal {exit.signal}" if exit.signal else f"exit code {exit.exit_code}"
    return {"kind": protocol.KIND_SANDBOX,
            "message": f"the sandbox ended with {how} while building this model (does it call sys.exit or "
                       f"os._exit?): {exit.log_tail[-300:]}"}


class Batch:
    """One sandbox over some models: writes the job dir, runs it under a watchdog, collects events."""

    def __init__(self, backend: Backend, jobs_root: Path, number: int, targets: list[Target],
                 codes: dict[int, str], filters: AnalyzeFilters, memory_bytes: int) -> None:
        self.backend = backend
        self.targets = targets
        self.filters = filters
        self.memory_bytes = memory_bytes
        job_dir = jobs_root / f"analyze-{os.getpid()}-{number}"
        self.paths = JobPaths(job_dir=job_dir, data_dir=job_dir / "nodata")
        self._write(codes)
        self.results: dict[int, dict[str, Any]] = {}
        self.ready = False
        self.runner_error: str | None = None
        self.stalled = False
        self.last_seen = time.monotonic()

    def _write(self, codes: dict[int, str]) -> None:
        shutil.rmtree(self.paths.job_dir, ignore_errors=True)
        for d in (self.paths.in_dir, self.paths.out_dir, self.paths.data_dir):
            d.mkdir(parents=True, mode=0o755)
        for t in self.targets:
            path = self.paths.in_dir / f"m{t.model_id}.py"
            path.write_text(codes[t.model_id])
            path.chmod(0o644)
        rp = self.backend.runner_paths(self.paths)
        models = [{"id": t.model_id, "file": f"m{t.model_id}.py", **(t.entry or {})} for t in self.targets]
        spec = protocol.JobSpec(
            mode=protocol.MODE_ANALYZE, task=IMAGE_TASK, dataset="various", metric=datasets.METRIC,
            num_classes=10, image_shape=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3, model_path=rp.model,
            data_dir=rp.data_dir, out_dir=rp.out_dir, models=models, model_timeout_s=self.filters.model_timeout_s,
            time_budget_s=self.wall_s(), threads=1, save_weights=False)
        spec_path = self.paths.in_dir / protocol.SPEC_FILE
        spec_path.write_text(spec.to_json())
        spec_path.chmod(0o644)

    def wall_s(self) -> float:
        return STARTUP_S + len(self.targets) * (self.filters.model_timeout_s + 1.0)

    def stall_limit(self) -> float:
        if not self.ready:
            return STARTUP_S
        warm_up = 0.0 if self.results else WARM_UP_S  # the runner warms torch up before the first model
        return self.filters.model_timeout_s + STALL_GRACE_S + warm_up

    async def run(self, on_result: Callable[[int, dict[str, Any]], Any]) -> Exit:
        limits = Limits(wall_s=self.wall_s(), memory_bytes=self.memory_bytes, cpus=1.0)
        handle = await self.backend.start(self.paths, limits)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watchdog, handle)
                async for event in handle.events():
                    await self._apply(event, on_result)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await handle.cancel()
                exit = await handle.wait()
                shutil.rmtree(self.paths.job_dir, ignore_errors=True)
        return exit

    async def _watchdog(self, handle: Handle) -> None:
        while not handle.finished():
            await anyio.sleep(0.5)
            if time.monotonic() - self.last_seen > self.stall_limit():
                self.stalled = True
                await handle.cancel()
                return

    async def _apply(self, event: dict[str, Any], on_result: Callable[[int, dict[str, Any]], Any]) -> None:
        self.last_seen = time.monotonic()
        kind = event.get("event")
        if kind == protocol.EVENT_READY:
            self.ready = True
        elif kind == protocol.EVENT_ERROR and self.runner_error is None:
            self.runner_error = f"{event.get('kind')}: {str(event.get('message'))[:500]}"
        elif kind == protocol.EVENT_ANALYZED and self.ready:
            model_id = event.get("id")
            expected = {t.model_id for t in self.targets}
            if isinstance(model_id, int) and model_id in expected and model_id not in self.results:
                self.results[model_id] = event
                await on_result(model_id, event)

    def unreported(self) -> list[Target]:
        return [t for t in self.targets if t.model_id not in self.results]


# --- the whole run ----------------------------------------------------------------------------------------
def _quality(code: str) -> tuple[dict[str, Any], str | None]:
    """code_quality, or why it failed (odd code can break a tool: recorded, never fatal)."""
    try:
        score, detail = code_quality(code)
    except Exception as exc:  # noqa: BLE001 - any failure of the static tools is this model's note
        return {}, f"{type(exc).__name__}: {str(exc)[:500]}"
    return {"code_quality": score, "code_quality_detail": detail}, None


class Analysis:
    """Analyses targets batch by batch, writing results as they come."""

    def __init__(self, store: ZooStore, backend: Backend, settings: Settings, filters: AnalyzeFilters,
                 progress: ProgressFn | None) -> None:
        self.store = store
        self.backend = backend
        self.settings = settings
        self.filters = filters
        self.progress = progress
        self.report = Report()
        self.buffer: list[dict[str, Any]] = []
        self.quality: dict[int, tuple[dict[str, Any], str | None]] = {}
        self.sandbox: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self.targets: dict[int, Target] = {}
        self.queue: list[Target] = []
        self.batches = 0
        self.flushed_at = time.monotonic()

    async def run(self, targets: list[Target]) -> Report:
        t0 = time.monotonic()
        self.report.pending = len(targets)
        self.targets = {t.model_id: t for t in targets}
        self._tick()
        buildable = [t for t in targets if t.entry is not None]
        for t in targets:
            if t.entry is None:
                self.sandbox[t.model_id] = ({}, {"kind": "task", "message": t.reason})
        self.queue = list(buildable)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(max(1, min(self.filters.parallel, len(buildable)))):
                    tg.start_soon(self._worker)
        except BaseExceptionGroup as group:  # one worker's AnalyzeError ends all: say it plainly
            refused = group.subgroup(AnalyzeError)
            while isinstance(refused, BaseExceptionGroup):
                refused = refused.exceptions[0]
            if refused is None:
                raise
            raise refused from None
        await self._quality_for([t for t in targets if t.entry is None])
        await self._flush(force=True)
        self.report.seconds = round(time.monotonic() - t0, 3)
        return self.report

    async def _worker(self) -> None:
        """Take batches off the shared queue until it is empty; a batch's leftovers go back in front."""
        while self.queue:
            size = self.filters.batch_size
            batch, self.queue = self.queue[:size], self.queue[size:]
            self.queue[:0] = await self._batch(batch)

    async def _quality_for(self, targets: list[Target]) -> None:
        """Quality scores of these models, computed in a worker thread (ruff is a subprocess)."""
        todo = [t.model_id for t in targets if t.model_id not in self.quality]
        if not todo:
            return
        rows = await self.store.fetchall(f"SELECT id, code FROM model WHERE id IN ({','.join('?' * len(todo))})",
                                         todo)
        for row in rows:
            self.quality[row["id"]] = await anyio.to_thread.run_sync(_quality, row["code"])
            await self._flush()

    async def _batch(self, targets: list[Target]) -> list[Target]:
        """Run one sandbox over `targets`; returns the ones to retry in a fresh sandbox."""
        ids = [t.model_id for t in targets]
        rows = await self.store.fetchall(f"SELECT id, code FROM model WHERE id IN ({','.join('?' * len(ids))})", ids)
        codes = {r["id"]: r["code"] for r in rows}
        self.batches += 1
        batch = Batch(self.backend, self.settings.jobs_dir, self.batches, targets, codes, self.filters,
                      int(self.settings.memory_gb * (1 << 30)))

        async def on_result(model_id: int, event: dict[str, Any]) -> None:
            self.sandbox[model_id] = sandbox_stats(event)
            await self._flush()

        async with anyio.create_task_group() as tg:
            tg.start_soon(self._quality_for, targets)
            exit = await batch.run(on_result)
        self.report.sandboxes += 1
        self.report.isolation = exit.isolation or self.report.isolation
        lost = batch.unreported()
        if not lost:
            await self._flush(force=True)
            return []
        if not batch.ready:
            raise AnalyzeError("the sandbox did not start (no model ran): "
                               f"{lost_model_error(exit, batch.stalled, STARTUP_S)['message']}")
        if batch.runner_error and not batch.results:  # the runner refused the batch: no model is to blame
            raise AnalyzeError(f"the sandbox's runner refused the analysis ({batch.runner_error}). A Docker "
                               "image built before `analyze` existed lacks this mode: run `lemur-agent-server "
                               "sandbox build`, or pass --sandbox process.")
        self.sandbox[lost[0].model_id] = ({}, lost_model_error(exit, batch.stalled, self.filters.model_timeout_s))
        await self._flush(force=True)
        return lost[1:]

    async def _flush(self, force: bool = False) -> None:
        """Write the models whose sandbox result and quality are both known (every FLUSH_EVERY, or now)."""
        ready = [i for i in self.sandbox if i in self.quality]
        for model_id in ready:
            self.buffer.append(self._row(model_id, *self.sandbox.pop(model_id), *self.quality.pop(model_id)))
        due = len(self.buffer) >= FLUSH_EVERY or time.monotonic() - self.flushed_at > FLUSH_S
        if self.buffer and (force or due):
            rows, self.buffer = self.buffer, []
            self.flushed_at = time.monotonic()
            await self.store.record_analysis(rows)
            self._tick()

    def _row(self, model_id: int, stats: dict[str, Any], error: dict[str, Any] | None,
             quality: dict[str, Any], quality_error: str | None) -> dict[str, Any]:
        target = self.targets[model_id]
        status = AnalysisStatus.OK if error is None else (
            AnalysisStatus.SKIPPED if target.entry is None else AnalysisStatus.FAILED)
        if status is AnalysisStatus.OK:
            self.report.ok += 1
        elif status is AnalysisStatus.SKIPPED:
            self.report.skipped += 1
        else:
            self.report.failed += 1
            kind = str(error["kind"]) if error else "?"
            self.report.failure_kinds[kind] = self.report.failure_kinds.get(kind, 0) + 1
        self.report.quality_failed += quality_error is not None
        detail = {"dataset": target.dataset, "transform": stats.pop("transform", None),
                  "sandbox_s": stats.pop("seconds", None),
                  "in_shape": stats.pop("in_shape", None),
                  "out_shape": stats.pop("out_shape", None), "quality_error": quality_error}
        return {"model_id": model_id, "status": str(status), "error": error, "detail": detail,
                "stats": {**stats, **quality}, "analysed_at": time.time()}

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(self.report.done, self.report.pending)


async def analyze_zoo_async(settings: Settings, filters: AnalyzeFilters | None = None,
                            progress: ProgressFn | None = None, backend: Backend | None = None) -> Report:
    """Analyse every model of the zoo that lacks its stats (see the module docstring)."""
    filters = filters or AnalyzeFilters()
    if filters.batch_size < 1 or filters.model_timeout_s <= 0 or filters.parallel < 1:
        raise ValueError("--batch-size and --parallel must be >= 1 and --model-timeout > 0")
    own = backend is None
    backend = backend or choose_backend(settings)
    try:
        async with await ZooStore.open(settings.zoo_path) as store:
            targets = await pending_targets(store, filters)
            return await Analysis(store, backend, settings, filters, progress).run(targets)
    finally:
        if own:
            await backend.aclose()


def analyze_zoo(settings: Settings, filters: AnalyzeFilters | None = None,
                progress: ProgressFn | None = None) -> Report:
    """Synchronous entry (the CLI, `import-lemur --analyze`)."""
    return anyio.run(analyze_zoo_async, settings, filters, progress)


# --- CLI --------------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `analyze` to the main CLI's subparsers."""
    p = subparsers.add_parser("analyze", help="measure params, FLOPs, fingerprint and code quality of models "
                                              "that lack them (in the sandbox)")
    p.add_argument("--zoo", default=argparse.SUPPRESS, help="zoo file (default: $LEMUR_ZOO or the user data dir)")
    p.add_argument("--sandbox", choices=("auto", "docker", "process"), default=argparse.SUPPRESS)
    p.add_argument("--task", help="only models with runs of this task")
    p.add_argument("--dataset", help="only models with runs on this dataset")
    p.add_argument("--nn", action="append", default=[], metavar="NAME", help="model name; repeat for several")
    p.add_argument("--nn-prefix", action="append", default=[], metavar="PREFIX")
    p.add_argument("--origin", action="append", default=[], choices=("lemur", "seed", "submitted"))
    p.add_argument("--limit", type=int, help="at most this many models")
    p.add_argument("--retry-failed", action="store_true", help="analyse models recorded as failed again")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="models per sandbox process")
    p.add_argument("--model-timeout", type=float, default=MODEL_TIMEOUT_S, help="seconds one model may take")
    p.add_argument("--parallel", type=int, default=AnalyzeFilters.parallel,
                   help="sandboxes at once, one CPU thread each (default: half the cores, at most 4)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    settings = Settings.from_env(getattr(args, "zoo", None), sandbox=getattr(args, "sandbox", None))
    filters = AnalyzeFilters(task=args.task, dataset=args.dataset, nn=tuple(args.nn),
                             nn_prefix=tuple(args.nn_prefix), origin=tuple(args.origin), limit=args.limit,
                             retry_failed=args.retry_failed, batch_size=args.batch_size,
                             model_timeout_s=args.model_timeout, parallel=args.parallel)
    with tqdm(unit="model", file=sys.stderr, desc="analyze") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        report = analyze_zoo(settings, filters, progress)
    print(json.dumps(report.as_dict(), indent=1))
    return 0
