"""LEMUR-compatible Python API: `data()` and `check_nn()`, so NNGPT-style loops can switch over.

Differences from LEMUR, on purpose: importing this module has no side effects (no DB download, no
prints); `data()` reads the zoo fresh on every call (no stale cache after writes) and shares one
code string per model instead of copying it into every row; `check_nn()` trains in a sandbox and
never mutates the caller's `prm`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pandas as pd

from zoo import connection
from zoo.query import Filters, as_tuple, grouped_sql

COLUMNS = ["task", "dataset", "metric", "nn", "nn_code", "nn_id", "epoch", "accuracy", "duration", "prm",
           "transform", "accuracy_to_time", "params", "run_uid", "status"]


def _zoo_path(zoo: str | os.PathLike[str] | None) -> Path:
    path = connection.resolve_zoo_path(zoo)
    if not path.exists():
        connection.initialize(path)
    return path


def data(only_best_accuracy: bool = False, task: str | None = None, dataset: str | None = None,
         metric: str | None = None, nn: str | Sequence[str] | None = None, epoch: float | None = None,
         max_rows: int | None = None, nn_prefixes: str | Sequence[str] | None = None, unique_nn: bool = False,
         *, zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Records of the zoo as a DataFrame with LEMUR's column names (one row per curve point).

    Same filters and semantics as the `query_models` tool; rows are ordered like LEMUR's
    (task, dataset, metric, nn, epoch). `duration` is training-only nanoseconds. Each model's code is
    one shared string; each row's `prm` is its own dict.
    """
    filters = Filters(task=task, dataset=dataset, metric=metric, nn=as_tuple(nn), nn_prefix=as_tuple(nn_prefixes),
                      epoch=epoch, only_best_accuracy=only_best_accuracy, unique_nn=unique_nn)
    inner, args = grouped_sql(filters)
    sql = (f"SELECT q.task, q.dataset, q.metric, m.name, q.model_id, q.epoch, q.accuracy, q.duration_ns, "
           f"q.accuracy_to_time, m.params, r.uid, r.prm, r.transform, r.status, q.run_id FROM ({inner}) q "
           f"JOIN model m ON m.id = q.model_id JOIN run r ON r.id = q.run_id "
           f"ORDER BY q.task, q.dataset, q.metric, m.name, q.epoch, q.run_id")
    if max_rows is not None:
        sql += " LIMIT ?"
        args.append(int(max_rows))
    conn = connection.connect_sync(_zoo_path(zoo), readonly=True)
    conn.row_factory = None
    try:
        conn.execute("BEGIN")  # one snapshot for the rows and the code
        rows = conn.execute(sql, args).fetchall()
        ids = sorted({r[4] for r in rows})
        code: dict[int, tuple[str, str]] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            for mid, text, lemur_id in conn.execute(
                    f"SELECT id, code, lemur_id FROM model WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                code[mid] = (text, lemur_id)
        conn.execute("COMMIT")
    finally:
        conn.close()
    columns = list(zip(*rows)) if rows else [()] * 15
    parsed: dict[int, dict[str, Any]] = {}

    def prm_of(run_id: int, text: str | None) -> dict[str, Any]:
        if run_id not in parsed:
            parsed[run_id] = json.loads(text) if text else {}
        return dict(parsed[run_id])

    return pd.DataFrame({
        "task": columns[0], "dataset": columns[1], "metric": columns[2], "nn": columns[3],
        "nn_code": [code[m][0] for m in columns[4]], "nn_id": [code[m][1] for m in columns[4]],
        "epoch": columns[5], "accuracy": columns[6], "duration": columns[7],
        "prm": [prm_of(r, t) for r, t in zip(columns[14], columns[11])],
        "transform": columns[12], "accuracy_to_time": columns[8], "params": columns[9],
        "run_uid": columns[10], "status": columns[13]}, columns=COLUMNS)


class CheckNNError(RuntimeError):
    """check_nn failed; `.result` holds the structured job (status, stage, kind, message, log tail)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


def check_nn(nn_code: str, task: str, dataset: str, metric: str, prm: dict[str, Any], save_to_db: bool = True,
             prefix: str | None = None, epoch_limit_minutes: float = 30.0, *,
             zoo: str | os.PathLike[str] | None = None, sandbox: str | None = None,
             max_train_samples: int | None = None) -> tuple[str, float, float, float]:
    """Train `nn_code` once with `prm` (LEMUR's dict incl. batch, transform, epoch) in a sandbox.

    Returns (name, accuracy, accuracy_to_time, code_quality) like LEMUR. The time limit is
    `epoch_limit_minutes` per epoch, enforced as a hard wall-clock budget for the whole run.
    Raises CheckNNError (with `.result`) on any failure.
    """
    from lemur_agent_server.config import Settings
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import EvalRequest
    from zoo.store import ZooStore

    fixed = copy.deepcopy(dict(prm))
    epochs = float(fixed.pop("epoch", 1) or 1)
    for key in ("uid", "duration", "accuracy", "epoch_max"):
        fixed.pop(key, None)
    request = EvalRequest(code=nn_code, task=task, dataset=dataset, metric=metric, prm=fixed, n_trials=1,
                          epochs=epochs, eval_every=min(0.5, epochs),
                          time_budget_s=max(30.0, epoch_limit_minutes * 60 * epochs), name_prefix=prefix,
                          max_train_samples=max_train_samples)
    settings = Settings.from_env(zoo, sandbox=sandbox)

    async def run() -> tuple[str, Any]:
        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store, workers=False) as queue:
                return await queue.run_now(request, archive=save_to_db)
        finally:
            await store.close()

    job_id, outcome = anyio.run(run)
    result = {"job_id": job_id, "status": outcome.status, "result": outcome.result, "error": outcome.error}
    res = outcome.result or {}
    if outcome.status != "succeeded" or res.get("accuracy") is None:
        err = outcome.error or {}
        raise CheckNNError(f"check_nn {outcome.status}: {err.get('kind', '')} {err.get('message', '')}".strip(),
                           result)
    return res["model_name"], float(res["accuracy"]), float(res.get("accuracy_to_time") or 0.0), \
        float(res.get("code_quality") or 0.0)
