"""The embedded default: on first start the zoo receives our reference models, and baselines for them.

Why code first and numbers only from the evaluator: numbers in the zoo come from our evaluator, never
from us. What needs no training is measured at once (code quality, on the host: static analysis only);
what needs the model built (params, FLOPs, fingerprint) comes from one sandboxed `check` per seed; and
one short real evaluation per seed is queued on a dataset this server has (digits first: seconds), so
a fresh server has baselines within a minute. The zoo's `meta` table records that baselines were
queued, so a restart does not queue them again. `lemur-agent-server evaluate-seeds` trains them longer.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from lemur_agent_server.config import Settings
from lemur_agent_server.reference_models import REFERENCE_MODELS, read_code
from sandbox import datasets
from sandbox.protocol import JobStatus
from zoo.records import Model
from zoo.store import ZooStore

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import EvalRequest

log = logging.getLogger(__name__)
SEED_KEY = "seeded_reference_models"
BASELINES_KEY = "baselines"  # meta: JSON {dataset, queued_at, budget_s, jobs: {model: job_id}}
BASELINE_DATASETS = ("digits", "mnist", "fashion-mnist")  # the cheapest present one is used
BASELINE_PRM = {"lr": 0.05, "momentum": 0.9, "batch": 32}  # fixed: one trial must not land on a bad draw


async def seed_reference_models(store: ZooStore) -> int:
    """Add every reference model not yet in the zoo. Returns how many were added. Idempotent."""
    added = 0
    for name in REFERENCE_MODELS:
        _, created = await store.add_model(Model(name=name, code=read_code(name), origin="seed", prefix=None))
        added += int(created)
    if added:
        log.info("seeded %d reference models into %s", added, store.path)
    return added


def baseline_dataset(settings: Settings) -> str | None:
    """The first of BASELINE_DATASETS present on this server (digits ships with it, so always one)."""
    return next((d for d in BASELINE_DATASETS if datasets.available(d, settings.data_root)), None)


def baseline_request(name: str, dataset: str, settings: Settings) -> EvalRequest:
    from lemur_agent_server.evaluator.requests import EvalRequest

    return EvalRequest(code=read_code(name), dataset=dataset, n_trials=1, epochs=settings.baseline_epochs,
                       eval_every=min(0.5, settings.baseline_epochs), time_budget_s=settings.baseline_budget_s,
                       prm=dict(BASELINE_PRM), max_train_samples=settings.baseline_max_train_samples)


async def read_meta(store: ZooStore, key: str) -> Any:
    row = await store.fetchone("SELECT value FROM meta WHERE key=?", (key,))
    return json.loads(row["value"]) if row else None


async def write_meta(store: ZooStore, key: str, value: Any) -> None:
    async with store.transaction() as db:
        await db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, json.dumps(value)))


async def score_seed_quality(store: ZooStore) -> int:
    """Code quality of every seed model that has none yet (host-side static analysis; the code never runs)."""
    from lemur_agent_server.evaluator.quality import code_quality

    done = 0
    for name in REFERENCE_MODELS:
        row = await store.model_by_name(name)
        if row is None or row["code_quality"] is not None:
            continue
        score, detail = await anyio.to_thread.run_sync(code_quality, row["code"])
        await store.update_model_stats(name, code_quality=score, code_quality_detail=detail)
        done += 1
    return done


async def _seeds_have_runs(store: ZooStore) -> bool:
    names = list(REFERENCE_MODELS)
    row = await store.fetchone(f"SELECT 1 FROM run r JOIN model m ON m.id = r.model_id WHERE m.name IN "
                               f"({','.join('?' * len(names))}) LIMIT 1", names)
    return row is not None


async def queue_baselines(store: ZooStore, queue: JobQueue, settings: Settings) -> dict[str, Any] | None:
    """Submit one short evaluation per seed model, once per zoo (recorded in meta). Returns the record."""
    if await read_meta(store, BASELINES_KEY) is not None or await _seeds_have_runs(store):
        return None  # queued before, or the seeds were trained already (an older zoo, evaluate-seeds)
    dataset = baseline_dataset(settings)
    if dataset is None:
        return None
    jobs: dict[str, str] = {}
    for name in REFERENCE_MODELS:
        jobs[name] = await queue.submit(baseline_request(name, dataset, settings))
    record = {"dataset": dataset, "queued_at": time.time(), "budget_s": settings.baseline_budget_s,
              "epochs": settings.baseline_epochs, "jobs": jobs}
    await write_meta(store, BASELINES_KEY, record)
    log.info("queued baseline evaluations of %d seed models on %s", len(jobs), dataset)
    return record


async def measure_seed_facts(store: ZooStore, queue: JobQueue, dataset: str) -> int:
    """Params, FLOPs and fingerprint of each seed model that lacks them, from one sandboxed check each."""
    from lemur_agent_server.evaluator.requests import EvalRequest

    done = 0
    for name in REFERENCE_MODELS:
        row = await store.model_by_name(name)
        if row is None or row["params"] is not None:
            continue
        outcome = await queue.check(EvalRequest(code=row["code"], dataset=dataset, prm=dict(BASELINE_PRM)))
        result = outcome.result or {}  # a check's measurements sit at the top of its result
        if outcome.status != JobStatus.SUCCEEDED or result.get("params") is None:
            log.warning("check of seed model %s: %s %s", name, outcome.status, outcome.error)
            continue
        await store.update_model_stats(name, params=result["params"], flops=result.get("flops"),
                                       fingerprint=result.get("fingerprint"))
        done += 1
    return done


async def start_baselines(store: ZooStore, queue: JobQueue, settings: Settings) -> None:
    """Everything a fresh zoo's seed models get, in the order it becomes useful; runs in the background
    (the server answers meanwhile). A failure is logged, never raised: baselines are a courtesy."""
    try:
        await queue_baselines(store, queue, settings)  # first: list_catalog can then name the jobs
        await score_seed_quality(store)
        dataset = baseline_dataset(settings)
        if dataset is not None:
            await measure_seed_facts(store, queue, dataset)
    except Exception:  # noqa: BLE001 - the server must keep serving; the log says what went wrong
        log.exception("baselines of the seed models")


async def baselines_status(store: ZooStore, settings: Settings, workers: bool = True) -> dict[str, Any] | None:
    """What list_catalog says about the baselines: per seed its job id and status, its static facts, and
    an upper bound of when all will be ready (each job's budget, one after another per slot). In the
    seconds before the jobs exist (a fresh server submitting them) it says so."""
    record = await read_meta(store, BASELINES_KEY)
    if record is None:
        if workers and settings.seed_zoo and settings.baselines and not await _seeds_have_runs(store):
            return {"dataset": baseline_dataset(settings), "seeds": {},
                    "ready": "being queued now: call list_catalog again in a few seconds for the job ids"}
        return None
    seeds: dict[str, Any] = {}
    open_jobs = 0
    for name, job_id in record["jobs"].items():
        job = await store.jobs.get(job_id)
        model = await store.model_by_name(name)
        status = job["status"] if job else "unknown"
        open_jobs += int(job is not None and not JobStatus(status).is_finished())
        seeds[name] = {"job_id": job_id, "status": status,
                       "params": model["params"] if model else None, "flops": model["flops"] if model else None,
                       "code_quality": model["code_quality"] if model else None}
    slots = max(1, settings.slot_count)
    ready = (f"done: see query_models(view='models', dataset={record['dataset']!r}) or leaderboard"
             if open_jobs == 0 else
             f"{open_jobs} job(s) open; each has a budget of {record['budget_s']:g} s, so all end within "
             f"~{-(-open_jobs // slots) * record['budget_s']:g} s from now (get_job(job_id) for one)")
    return {"dataset": record["dataset"], "epochs": record["epochs"], "queued_at": record["queued_at"],
            "ready": ready, "seeds": seeds}
