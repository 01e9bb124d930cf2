"""Train mode: an in-memory Optuna study over LEMUR's search space, one `TrialRun` per trial.

Why ask/tell instead of `study.optimize`: each trial can end three ways (completed, pruned, failed) and
a timeout must stop the whole study at once; driving the loop ourselves keeps that explicit and keeps
Optuna's own exception handling from swallowing a broken model's traceback.
"""

from __future__ import annotations

from typing import Any

import optuna

from sandbox import protocol
from sandbox.protocol import TrialStatus
from sandbox.runner import memguard, oomretry
from sandbox.runner.loader import batches_per_epoch
from sandbox.runner.params import parse_transform, suggest_prm
from sandbox.runner.trainer import Job, TrialOutcome, release_memory

MEDIAN_PRUNER_STARTUP = 2


def _first_segment_fits(job: Job, prm: dict[str, Any]) -> bool:
    """Whether the first partial epoch of a trial with `prm` is likely to fit in the time left."""
    size = parse_transform(prm["transform"], job.spec.image_shape[-1]).size
    n_train = len(job.data.train_x)
    batch = min(int(prm["batch"]), n_train)
    per_epoch = batches_per_epoch(n_train, batch)
    share = min(float(job.spec.eval_every) or float(job.spec.epochs), float(job.spec.epochs))
    samples = max(1, round(share * per_epoch)) * batch
    estimate = job.budget.train_estimate(samples, size * size)
    if estimate is None:
        return job.budget.remaining() > 0
    eval_s = job.budget.eval_estimate(len(job.data.val_x) + len(job.data.test_x), size * size)
    return job.budget.fits(estimate + eval_s)


def _rank(o: TrialOutcome) -> tuple[bool, float | None, int]:
    """What `protocol.selection_rank` orders by, the same rule the host selects with."""
    return (o.status == TrialStatus.COMPLETED, o.val_accuracy, o.trial)


def _weights_rank(o: TrialOutcome) -> tuple[bool, float, int]:
    """The host's choice of trial: finished before cut short, best validation accuracy, earliest."""
    return protocol.selection_rank(*_rank(o))


def best_outcome(outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    """The trial the host will select (same rule), among those that reached a curve point: the host
    selects among those too, and ranks one without a validation accuracy (protocol "lemur" holds none
    out) below one with it."""
    return protocol.select_trial((o for o in outcomes if o.points > 0 or o.val_accuracy is not None), _rank)


def _keep_best_weights(job: Job, kept: TrialOutcome | None, new: TrialOutcome) -> TrialOutcome | None:
    """Keep one weights file in out/, the best trial's so far: out/ has a size cap, and a search over a
    large model would otherwise write one checkpoint per trial. Returns the trial now kept."""
    if new.weights is None:
        return kept
    loser, kept = (kept, new) if kept is None or _weights_rank(new) > _weights_rank(kept) else (new, kept)
    if loser is not None and loser.weights is not None:
        (job.out_dir / loser.weights).unlink(missing_ok=True)
        loser.weights = None
    return kept


def run_search(job: Job, declared: set[str]) -> dict[str, Any]:
    """Run up to `spec.n_trials` trials; emits trial_start/point/trial_end and returns the `done` fields.

    A trial that runs out of memory with a batch the caller did not fix runs again with half the batch
    (`oomretry`); on CPU the data segment is capped at the sandbox's memory limit first (`memguard`), so
    running out is an error the trial sees rather than the kernel killing the sandbox."""
    spec = job.spec
    memguard.cap_data_segment(job.device.type)
    batch_fixed = "batch" in spec.fixed_prm
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_PRUNER_STARTUP),
    )
    outcomes: list[TrialOutcome] = []
    kept: TrialOutcome | None = None  # the trial whose weights file is still in out/
    stopped_by_budget = False
    for _ in range(int(spec.n_trials)):
        trial = study.ask()
        prm = suggest_prm(
            trial,
            declared,
            spec.fixed_prm,
            spec.search_space,
            spec.transforms,
            spec.epochs,
            len(job.data.train_x),
        )
        if not _first_segment_fits(job, prm):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # never started; keeps the sampler sane
            stopped_by_budget = True
            break
        if outcomes:
            release_memory(job.device)
        job.emitter.emit(protocol.EVENT_TRIAL_START, trial=trial.number, prm=prm, **job.data.sizes())
        outcome, retry = oomretry.run_trial(job, trial.number, prm, trial, batch_fixed)
        outcomes.append(outcome)
        if outcome.status == TrialStatus.COMPLETED and outcome.val_accuracy is not None:
            study.tell(trial, outcome.val_accuracy)
        elif outcome.status == TrialStatus.PRUNED:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        kept = _keep_best_weights(job, kept, outcome)
        job.emitter.emit(protocol.EVENT_TRIAL_END, **outcome.event_fields(), **({"oom_retry": retry} if retry else {}))
        if outcome.stop_job:
            stopped_by_budget = True
            break
    best = best_outcome(outcomes)
    return {
        "best_trial": best.trial if best else None,
        "best_val_accuracy": best.val_accuracy if best else None,
        "trials": len(outcomes),
        "stopped_by_budget": stopped_by_budget,
    }
