"""From a finished job to the zoo: run records, the selected trial's weights, one transaction.

Why its own module: what is stored (and under which status) is a decision apart from how the
sandbox was driven; a dry check or an `evaluate` job builds the same records and stores nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from lemur_agent_server.evaluator import jobfiles
from lemur_agent_server.evaluator.outcome import Archived
from lemur_agent_server.evaluator.phase import Trial, select
from sandbox import datasets
from sandbox.backend import JobPaths
from sandbox.protocol import FailureKind, RunStatus
from zoo import codehash
from zoo.records import Model, Run
from zoo.store import ZooStore

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.pipeline import Job

REPEAT_UID_STRIDE = 1000  # run uids keep the old `t{1000 * repeat + trial}` form, so stored uids stay stable
STORED_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.PRUNED, RunStatus.TIMED_OUT})


def run_uid(job_id: str, repeat: int, trial: int) -> str:
    return f"{job_id}:t{REPEAT_UID_STRIDE * repeat + trial}"


def trial_runs(job: Job, prepared: datasets.PreparedDataset, trials: list[Trial], isolation: dict[str, Any]
               ) -> tuple[list[Run], Trial | None]:
    """One run per trial (search and repeats), and the selected trial."""
    req = job.request
    selected = select(trials)
    runs = []
    for t in sorted(trials, key=lambda t: (t.repeat, t.trial)):
        prm = {**t.prm, "epoch": req.epochs}
        runs.append(Run(
            uid=run_uid(job.job_id, t.repeat, t.trial), task=req.task, dataset=req.dataset, metric=req.metric,
            status=t.status if t.status in STORED_STATUSES else RunStatus.FAILED,
            source="evaluator", prm=prm, transform=prm.get("transform"), seed=req.seed + t.repeat,
            device="cuda" if job.gpu is not None else "cpu", dataset_hash=prepared.content_hash,
            job_id=job.job_id, trial=t.trial, repeat=t.repeat, selected=t is selected, isolation=isolation,
            error=t.error, points=t.points, train_samples=req.max_train_samples and min(
                req.max_train_samples, prepared.n_train), test_samples=prepared.n_test))
    return runs, selected


def failed_run(job: Job, prepared: datasets.PreparedDataset | None, err: dict[str, Any],
               isolation: dict[str, Any] | None) -> Run:
    """The one run recorded for a job that never got past its checks."""
    req = job.request
    return Run(uid=f"{job.job_id}:check", task=req.task, dataset=req.dataset, metric=req.metric,
               status=RunStatus.TIMED_OUT if err["kind"] == FailureKind.TIMEOUT else RunStatus.FAILED,
               source="evaluator", prm=dict(req.prm), transform=req.prm.get("transform"), seed=req.seed,
               job_id=job.job_id, dataset_hash=prepared.content_hash if prepared else None, isolation=isolation,
               error={k: v for k, v in err.items() if k in ("stage", "kind", "message")})


async def duplicates(store: ZooStore, model: Model) -> dict[str, list[str]]:
    same_code = [m["name"] for m in await store.models_by_hash(codehash.code_hash(model.code))]
    same_arch = []
    if model.fingerprint:
        same_arch = [m["name"] for m in await store.models_by_fingerprint(model.fingerprint)
                     if m["name"] != model.name]
    return {"same_code": same_code[:20], "same_architecture": same_arch[:20]}


async def copy_weights(job: Job, paths: JobPaths, trial: Trial) -> None:
    """Copy the trial's weights into the store, once, while they are still in out/ (a repeat resets it)."""
    if trial.weights is None or trial.archived is not None or trial.weights_error is not None:
        return
    try:
        trial.archived = await anyio.to_thread.run_sync(jobfiles.archive_weights, paths.out_dir, trial.weights,
                                                        job.store.weights_dir)
    except jobfiles.OutputError as exc:
        trial.weights_error = str(exc)


async def store(job: Job, model: Model, runs: list[Run], selected: Trial | None,
                duplicates_found: dict[str, list[str]] | None) -> Archived:
    """The model, its runs and the selected trial's weights, in one transaction (shielded from cancel)."""
    weights = None
    with anyio.CancelScope(shield=True):
        _, written = await job.store.add_model_with_runs(model, runs)
        existing = await job.store.model_by_name(model.name)
        if existing and existing.get("params") is None and model.params is not None:
            await job.store.update_model_stats(model.name, params=model.params, flops=model.flops,
                                               fingerprint=model.fingerprint)
        if selected is not None and selected.archived is not None:
            sha, size, rel = selected.archived
            index = [i for i, r in enumerate(runs) if r.selected]
            if index:
                await job.store.set_weights(written[index[0]][0], sha, size, rel)
                weights = {"sha256": sha, "size": size}
    return Archived(runs_archived=len(runs), resubmission=bool((duplicates_found or {}).get("same_code")),
                    weights=weights)
