"""From a job to the zoo: each trial as it ends, then the job's end in one transaction.

Why its own module: what is stored (and under which status) is a decision apart from how the
sandbox was driven; a dry check or an `evaluate` job builds the same records and stores nothing.

Why trial by trial: a killed server then loses at most the trial in flight, and `get_model` shows a
job's finished trials while it still runs. Each write is one transaction (the run, its curve points,
its weights row) that first checks the job's claim, so a stalled server whose job was claimed
elsewhere writes nothing. The job's end (the runs not written yet, the model's statistics, the
selected trial's weights row, the job's final state) is ONE further transaction, with
`JobStore.finish_in`: a kill can never leave a job's result and its archive disagreeing.

A re-queued job (its server died) runs again as a new attempt and writes fresh runs,
`{job}:a{attempt}:t{n}`: the earlier attempt's finished trials are real results and stay, with their
curves; replacing them would lose them whenever the new attempt dies too. A run uid is written once
(`ZooStore.add_run_in` keeps an existing one), so the end of a job never duplicates a trial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from lemur_agent_server import __version__
from lemur_agent_server.evaluator import calibration, jobfiles, onnx_files, protocols
from lemur_agent_server.evaluator.outcome import Archived, JobResult
from lemur_agent_server.evaluator.phase import Trial, select
from sandbox import datasets, protocol
from sandbox.backend import JobPaths
from sandbox.protocol import FailureKind, JobStatus, RunStatus
from zoo import codehash
from zoo.jobs import JobStore
from zoo.records import Model, Run, is_number
from zoo.store import ZooStore

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.pipeline import Job

# the sandbox's environment keys a run keeps (sandbox.runner.environment.describe), the library ones also
# as the run's `versions`
VERSION_KEYS = ("python", "implementation", "torch", "torchvision", "numpy", "optuna", "safetensors")
ENV_KEYS = (*VERSION_KEYS, "platform", "device", "device_name", "compute_capability", "cuda", "cudnn",
            "cpu_model", "cpu_count", "threads", "harness")
ENV_VALUE_CHARS = 200
REPEAT_UID_STRIDE = 1000  # run uids keep the old `t{1000 * repeat + trial}` form, so stored uids stay stable
STORED_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.PRUNED, RunStatus.TIMED_OUT,
                             RunStatus.CANCELLED})


class ClaimLost(Exception):
    """The job is no longer this worker's (re-queued and claimed elsewhere): roll its archive back."""


def repeat_seed(seed: int, repeat: int) -> int:
    """The runner's seed for repeat `repeat` (0: the search). Trial n of a sandbox trains with its seed + n,
    so a repeat's seed lies beyond every search trial's (n_trials <= 200 < the stride): `seed + 1` would
    retrain search trial 1 with its own seed, the same run twice."""
    return seed + REPEAT_UID_STRIDE * repeat


def run_uid(job_id: str, repeat: int, trial: int, attempt: int = 1) -> str:
    """`{job}:t{n}` for a job's first attempt (stored uids stay stable), `{job}:a{attempt}:t{n}` after."""
    return f"{_uid_prefix(job_id, attempt)}:t{REPEAT_UID_STRIDE * repeat + trial}"


def _uid_prefix(job_id: str, attempt: int) -> str:
    return job_id if attempt <= 1 else f"{job_id}:a{attempt}"


def _bounded(value: Any) -> Any:
    """A JSON-safe copy of an untrusted scalar: short strings, finite numbers, booleans; anything else None."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if is_number(value) else None
    return str(value)[:ENV_VALUE_CHARS] if isinstance(value, str) else None


def run_environment(job: Job, prepared: datasets.PreparedDataset | None, ready: dict[str, Any] | None
                    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What a run needs to be repeated, as (environment, versions): the sandbox's own report (its `ready`
    event: an untrusted hint, kept bounded, known keys only) and the host's facts (the code hash, the
    split, the harness version). `versions` (interpreter and libraries) is None when no sandbox reported."""
    req = job.request
    reported = ready.get("environment") if isinstance(ready, dict) else None
    reported = reported if isinstance(reported, dict) else {}
    env = {key: _bounded(reported.get(key)) for key in ENV_KEYS if key in reported}
    fields = protocols.spec_fields(req.protocol, prepared.info if prepared else datasets.get_info(req.dataset))
    env.update(code_hash=codehash.code_hash(req.code), server_version=__version__,
               protocol_version=protocol.PROTOCOL_VERSION, split_seed=fields["split_seed"],
               val_fraction=fields["val_fraction"], max_train_samples=req.max_train_samples,
               gpu=job.gpu, host_threads=job.threads)
    versions = {key: env[key] for key in VERSION_KEYS if key in env} or None
    return env, versions


def trial_run(job: Job, prepared: datasets.PreparedDataset, t: Trial, isolation: dict[str, Any] | None,
              selected: bool = False, ready: dict[str, Any] | None = None) -> Run:
    """The run record of one trial (search or repeat)."""
    req = job.request
    prm = {**t.prm, "epoch": req.epochs}
    env, versions = run_environment(job, prepared, ready)
    env["trial_seed"] = repeat_seed(req.seed, t.repeat) + t.trial  # what python, numpy and torch were seeded with
    return Run(
        uid=run_uid(job.job_id, t.repeat, t.trial, job.attempt), task=req.task, dataset=req.dataset,
        metric=req.metric, status=t.status if t.status in STORED_STATUSES else RunStatus.FAILED,
        source="evaluator", prm=prm, transform=prm.get("transform"), seed=repeat_seed(req.seed, t.repeat),
        device="cuda" if job.gpu is not None else "cpu", dataset_hash=prepared.content_hash,
        job_id=job.job_id, trial=t.trial, repeat=t.repeat, selected=selected, isolation=isolation,
        error=t.error, points=t.points,
        train_samples=protocols.train_samples(req.protocol, prepared.n_train, req.max_train_samples),
        test_samples=prepared.n_test, versions=versions, environment=env, **_settings(job))


def _settings(job: Job) -> dict[str, Any]:
    """The run's protocol, precision and determinism, as the request asked (the spec the runner got)."""
    req = job.request
    return {"protocol": req.protocol, "precision": req.precision, "deterministic": bool(req.deterministic)}


def trial_runs(job: Job, prepared: datasets.PreparedDataset, trials: list[Trial], isolation: dict[str, Any],
               ready: dict[str, Any] | None = None) -> tuple[list[Run], Trial | None]:
    """One run per trial (search and repeats), and the selected trial."""
    selected = select(trials)
    runs = [trial_run(job, prepared, t, isolation, t is selected, ready)
            for t in sorted(trials, key=lambda t: (t.repeat, t.trial))]
    return runs, selected


def failed_run(job: Job, prepared: datasets.PreparedDataset | None, err: dict[str, Any],
               isolation: dict[str, Any] | None, ready: dict[str, Any] | None = None) -> Run:
    """The one run recorded for a job that never got past its checks."""
    req = job.request
    env, versions = run_environment(job, prepared, ready)
    return Run(uid=f"{_uid_prefix(job.job_id, job.attempt)}:check", task=req.task, dataset=req.dataset,
               metric=req.metric,
               status=RunStatus.TIMED_OUT if err["kind"] == FailureKind.TIMEOUT else RunStatus.FAILED,
               source="evaluator", prm=dict(req.prm), transform=req.prm.get("transform"), seed=req.seed,
               job_id=job.job_id, dataset_hash=prepared.content_hash if prepared else None, isolation=isolation,
               error={k: v for k, v in err.items() if k in ("stage", "kind", "message")}, versions=versions,
               environment=env, **_settings(job))


async def earlier_twins(store: ZooStore, code_hash: str, job_id: str) -> list[str]:
    """The models with this code that this job did not make: an earlier attempt of the same job (its
    server died after archiving a trial) made a model that is no resubmission."""
    rows = await store.fetchall(
        "SELECT name FROM model m WHERE code_hash=? AND (NOT EXISTS (SELECT 1 FROM run r WHERE r.model_id = m.id)"
        " OR EXISTS (SELECT 1 FROM run r WHERE r.model_id = m.id AND (r.job_id IS NULL OR r.job_id != ?)))"
        " ORDER BY id", (code_hash, job_id))
    return [r["name"] for r in rows]


async def duplicates(store: ZooStore, model: Model, same_code: list[str]) -> dict[str, list[str]]:
    """Models with the same code (`same_code`: read when the job started, before it archived anything)
    and other models with the same architecture fingerprint."""
    same_arch = []
    if model.fingerprint:
        same_arch = [m["name"] for m in await store.models_by_fingerprint(model.fingerprint)
                     if m["name"] != model.name]
    return {"same_code": same_code[:20], "same_architecture": same_arch[:20]}


async def copy_weights(job: Job, paths: JobPaths, trial: Trial) -> None:
    """Copy the trial's weights into the store, once, while they are still in out/ (a repeat resets it);
    its ONNX export too, once the runner made one."""
    await copy_onnx(job, paths, trial)
    if trial.weights is None or trial.archived is not None or trial.weights_error is not None:
        return
    try:
        trial.archived = await anyio.to_thread.run_sync(jobfiles.archive_weights, paths.out_dir, trial.weights,
                                                        job.store.weights_dir)
    except jobfiles.OutputError as exc:
        trial.weights_error = str(exc)


async def copy_onnx(job: Job, paths: JobPaths, trial: Trial) -> None:
    """Copy the trial's ONNX export into the store (beside the safetensors), once; a bad file becomes
    the trial's `onnx_error`, never the job's failure."""
    if trial.onnx is None or trial.onnx_archived is not None or trial.onnx_error is not None:
        return
    try:
        trial.onnx_archived = await anyio.to_thread.run_sync(onnx_files.archive_onnx, paths.out_dir, trial.onnx,
                                                             job.store.weights_dir)
    except jobfiles.OutputError as exc:
        trial.onnx_error = f"the sandbox's ONNX file was rejected: {exc}"


NO_ONNX_EVENT = ("the sandbox reported no ONNX export of the selected trial (a sandbox image from before "
                 "export_onnx? rebuild it: lemur-agent-server sandbox build)")


def onnx_result(job: Job, selected: Trial | None) -> dict[str, Any]:
    """The result's ONNX part when the request asked for it: `onnx` {sha256, size, path (in the zoo's
    weights dir), format, exporter, seconds, fallback_from} of the selected trial's export, or `onnx_error`
    saying why there is none."""
    if not job.request.export_onnx or selected is None:
        return {}
    if selected.onnx_archived is not None:
        sha, size, rel = selected.onnx_archived
        return {"onnx": {"sha256": sha, "size": size, "path": rel, "format": onnx_files.FORMAT,
                         **selected.onnx_detail}}
    return {"onnx_error": selected.onnx_error or NO_ONNX_EVENT}


def result_dict(job: Job, result: JobResult, selected: Trial | None) -> dict[str, Any]:
    """The job's result as stored and shown: `result.as_dict()` plus its ONNX part."""
    return {**result.as_dict(), **onnx_result(job, selected)}


async def archive_trial(job: Job, model: Model, paths: JobPaths, prepared: datasets.PreparedDataset,
                        trial: Trial, ready: dict[str, Any] | None = None) -> bool:
    """Write one ended trial of a submission now, in one transaction: its run, its curve and, when it
    kept weights (the runner keeps the best trial's so far), its weights row. The run carries the
    isolation the backend provides; the job's end records what the sandbox reported on exit. A repeat
    keeps no weights: the search's selected trial does. False when nothing was written (not a
    submission, or the claim is lost)."""
    if job.kind != "submit":
        return False
    if trial.repeat == 0:
        await copy_weights(job, paths, trial)
    run = trial_run(job, prepared, trial, job.backend.describe(), ready=ready)
    with anyio.CancelScope(shield=True):
        try:
            async with job.store.transaction() as db:
                await _hold(db, job)
                model_id, _ = await ZooStore.add_model_in(db, model)
                await ZooStore.fill_model_stats_in(db, model)
                run_id, _ = await ZooStore.add_run_in(db, model_id, run)
                await _normalize_in(db, job, run.uid)
                if trial.archived is not None:
                    await ZooStore.set_weights_in(db, run_id, *trial.archived)
        except ClaimLost:
            return False
    return True


async def _normalize_in(db: Any, job: Job, run_uid: str) -> None:
    """The run's duration on the reference device, from the calibration of the device the job ran on (its
    speed at the run's work per step: evaluator.calibration)."""
    if job.calibration is not None:
        await calibration.normalize_run_in(db, run_uid, job.calibration.id)


async def _hold(db: Any, job: Job) -> None:
    if job.claim is not None and not await JobStore.holds_in(db, job.claim):
        raise ClaimLost(job.job_id)


async def store(job: Job, model: Model, runs: list[Run], selected: Trial | None, result: JobResult,
                status: str, err: dict[str, Any] | None) -> bool:
    """A submission's end, in ONE transaction (shielded from cancel): the model, the runs not written yet
    (a run written when its trial ended gets its selected flag and the sandbox's exit isolation), the
    model's statistics, the selected trial's weights row and, with a claim, the job's final state.

    Returns False when the claim is no longer held: then all of it rolls back, and `result.archived`
    stays None (a stalled server whose job was claimed elsewhere archives nothing)."""
    with anyio.CancelScope(shield=True):
        try:
            async with job.store.transaction() as db:
                result.archived = await _store_in(db, model, runs, selected, result.duplicates)
                for run in runs:
                    await _normalize_in(db, job, run.uid)
                if job.claim is not None and not await JobStore.finish_in(
                        db, job.claim, JobStatus(status), result_dict(job, result, selected), err):
                    raise ClaimLost(job.job_id)
        except ClaimLost:
            result.archived = None
            return False
    return True


async def _store_in(db: Any, model: Model, runs: list[Run], selected: Trial | None,
                    duplicates_found: dict[str, list[str]] | None) -> Archived:
    model_id, _ = await ZooStore.add_model_in(db, model)
    await ZooStore.fill_model_stats_in(db, model)
    weights = None
    for run in runs:
        run_id, created = await ZooStore.add_run_in(db, model_id, run)
        if not created:
            await ZooStore.settle_run_in(db, run)
        if run.selected and selected is not None and selected.archived is not None:
            sha, size, rel = selected.archived
            await ZooStore.set_weights_in(db, run_id, sha, size, rel)
            weights = {"sha256": sha, "size": size}
        if run.selected and selected is not None and selected.onnx_archived is not None:
            await ZooStore.set_weights_in(db, run_id, *selected.onnx_archived, fmt=onnx_files.FORMAT)
    return Archived(runs_archived=len(runs), resubmission=bool((duplicates_found or {}).get("same_code")),
                    weights=weights)
