"""Repeat groups: the runs of one job that trained the same selected hyperparameters with other seeds.

Why a group: one run of a submission is one seed's luck; `repeats=N` reruns the trial Optuna selected
N - 1 times (seeds `seed + 1` ...), and the honest number is then their mean and spread. A group is the
job's selected search trial plus its repeats, counted at each run's last point, succeeded runs only;
`std` is the sample standard deviation (n - 1), 0.0 for a single run.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections.abc import Iterable
from typing import Any

import aiosqlite

# the runs of a group: the selected search trial and the repeats of the same job (imports have no job)
GROUP_RUNS_SQL = ("SELECT job_id, accuracy, duration_ns FROM run WHERE job_id IN ({marks}) AND status = 'succeeded'"
                  " AND accuracy IS NOT NULL AND (selected = 1 OR repeat > 0) ORDER BY job_id, repeat")


def summarize(accuracies: list[float], durations_ns: list[int]) -> dict[str, Any]:
    """mean ± std of accuracy and training seconds over a group's runs."""
    seconds = [d / 1e9 for d in durations_ns]

    def std(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)

    return {"n": len(accuracies), "accuracy_mean": statistics.fmean(accuracies) if accuracies else None,
            "accuracy_std": std(accuracies), "duration_s_mean": statistics.fmean(seconds) if seconds else None,
            "duration_s_std": std(seconds)}


def _group_sql(job_ids: Iterable[str | None]) -> tuple[str, list[str]]:
    wanted = sorted({j for j in job_ids if j})
    return GROUP_RUNS_SQL.format(marks=",".join("?" * len(wanted))), wanted


def _collect(rows: Iterable[Any]) -> dict[str, dict[str, Any]]:
    by_job: dict[str, tuple[list[float], list[int]]] = {}
    for job_id, accuracy, duration_ns in rows:
        acc, dur = by_job.setdefault(job_id, ([], []))
        acc.append(float(accuracy))
        if duration_ns is not None:
            dur.append(int(duration_ns))
    return {job: {"job_id": job, **summarize(acc, dur)} for job, (acc, dur) in by_job.items() if len(acc) > 1}


async def groups_in(db: aiosqlite.Connection, job_ids: Iterable[str | None]) -> dict[str, dict[str, Any]]:
    """job_id -> its group's summary, for the jobs among `job_ids` that have two runs or more in it."""
    sql, args = _group_sql(job_ids)
    return _collect(tuple(r) for r in await db.execute_fetchall(sql, args)) if args else {}


def groups(conn: sqlite3.Connection, job_ids: Iterable[str | None]) -> dict[str, dict[str, Any]]:
    """`groups_in` on a plain sqlite3 connection (the stats package reads the zoo that way)."""
    sql, args = _group_sql(job_ids)
    return _collect(conn.execute(sql, args).fetchall()) if args else {}
