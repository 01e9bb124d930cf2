"""The host's record of a trial the runner retried with half the batch after it ran out of memory.

Why its own module: the runner's `trial_retry` event is a hint like every event (see `phase`), so it
is applied only when it is the retry the runner may make (`sandbox.runner.oomretry`): the trial is
running, has no learning-curve point yet, and the batch goes from the one the trial started with to
half of it, nothing else changing. The trial then carries the batch it actually trains with (its run's
prm) and a note in its `error` with `oom_retry: {from_batch, to_batch}`: the run and `get_job`'s trials
show both, with no new column. If the retry fails too, the runner's error replaces the note (its message
names both batches). The trial's clock restarts, so the failed attempt never counts as training time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sandbox.protocol import FailureKind, Stage
from zoo.records import is_number

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.phase import Trial

NOTE = ("batch {from_batch} ran out of memory before the first learning-curve point; the trial was retried "
        "once with batch {to_batch} (the batch was not fixed by prm.batch), and this run is that retry")


def _batch(value: Any) -> int | None:
    return int(value) if is_number(value) and float(value).is_integer() and value >= 1 else None


def apply_retry(trial: Trial, event: dict[str, Any]) -> bool:
    """Apply one `trial_retry` event to `trial`; False (nothing changed) when it is not a valid retry."""
    from_batch, to_batch = _batch(event.get("from_batch")), _batch(event.get("to_batch"))
    if not trial.running or trial.points or trial.error is not None or from_batch is None or to_batch is None:
        return False
    if _batch(trial.prm.get("batch")) != from_batch or to_batch != from_batch // 2:
        return False
    trial.prm = {**trial.prm, "batch": to_batch}
    trial.started_at = time.monotonic()
    retry = {"from_batch": from_batch, "to_batch": to_batch}
    trial.error = {"stage": Stage.TRAIN, "kind": FailureKind.OOM, "message": NOTE.format(**retry),
                   "recovered": True, "oom_retry": retry}
    return True
