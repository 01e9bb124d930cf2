"""A trial that runs out of memory: retried once with half the batch when the batch was not fixed.

Why: the batch is the one hyperparameter that moves a trial's memory by a known factor, and NNGPT's
evaluator halves it after an out-of-memory error; the runner may change it only when the search chose
it (searched or defaulted). A batch the caller fixed (`prm.batch`) is the caller's decision: that
trial fails as out_of_memory with a message naming the batch, the model's size and the way on.
The retry keeps the trial's number (the Optuna trial and the host's count of trials stay those asked
for) and starts only when the failed attempt reported no learning-curve point, so one trial's curve
never mixes two batch sizes. It is announced by a `trial_retry` event and recorded on the trial's
`trial_end` as `oom_retry: {from_batch, to_batch}`.
"""

from __future__ import annotations

from typing import Any

from sandbox import protocol
from sandbox.protocol import TrialStatus
from sandbox.runner.trainer import Job, TrialOutcome, TrialRun, release_memory

NEXT_STEP_FIXED = ("give a smaller prm.batch, or leave batch out of prm so the search chooses it (a trial that "
                   "runs out of memory is then retried once with half the batch)")
NEXT_STEP_SEARCHED = ("use a smaller model, or allow smaller batches "
                      '(search_space={"batch": {"min_power": 2, "max_power": 4}})')


def is_out_of_memory(outcome: TrialOutcome) -> bool:
    return outcome.status == TrialStatus.FAILED and (outcome.error or {}).get("kind") == protocol.KIND_OOM


def _size(params: int | None) -> str:
    return f"a model of {params:,} parameters" if params is not None else "this model (not built: its size is unknown)"


def fixed_batch_message(batch: int, params: int | None, cause: str) -> str:
    return (f"batch {batch} (fixed by prm.batch) does not fit in memory for {_size(params)}: {cause}. "
            f"Next step: {NEXT_STEP_FIXED}.")


def retried_message(from_batch: int, to_batch: int, params: int | None, cause: str) -> str:
    return (f"batch {to_batch} ran out of memory too, after batch {from_batch} did, for {_size(params)}: {cause}. "
            f"Next step: {NEXT_STEP_SEARCHED}.")


def run_trial(job: Job, number: int, prm: dict[str, Any], optuna_trial: Any, batch_fixed: bool
              ) -> tuple[TrialOutcome, dict[str, int] | None]:
    """Run one trial, and once more with half the batch after an out-of-memory failure (see the module).

    Returns the outcome reported for the trial and the retry made (`{from_batch, to_batch}`) or None."""
    outcome = TrialRun(job, number, prm, optuna_trial).run()
    if not is_out_of_memory(outcome):
        return outcome, None
    assert outcome.error is not None
    batch = int(prm["batch"])
    if batch_fixed:
        outcome.error["message"] = fixed_batch_message(batch, outcome.params, outcome.error["message"])
        return outcome, None
    if outcome.points or batch < 2:
        return outcome, None
    retry = {"from_batch": batch, "to_batch": batch // 2}
    smaller = {**prm, "batch": retry["to_batch"]}
    release_memory(job.device)  # the failed attempt's model, optimizer and (CUDA) cached blocks
    job.emitter.emit(protocol.EVENT_TRIAL_RETRY, trial=number, reason=protocol.KIND_OOM, prm=smaller,
                     message=f"batch {batch} ran out of memory; trial {number} starts again with batch "
                             f"{retry['to_batch']}: {outcome.error['message']}", **retry)
    second = TrialRun(job, number, smaller, optuna_trial).run()
    if is_out_of_memory(second) and second.error is not None:
        second.error["message"] = retried_message(batch, retry["to_batch"], second.params, second.error["message"])
    return second, retry
