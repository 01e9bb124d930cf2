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
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pandas as pd

from lemur_agent_server import api_tables, lemur_stats
from lemur_agent_server.api_errors import (  # noqa: F401  (re-exported: callers catch api.<Name>)
    AccuracyError,
    AccuracyException,
    CancelledError,
    CheckNNError,
    CodeSyntaxError,
    ContractError,
    InvalidRequestError,
    LearnTimeError,
    LearnTimeException,
    NanLossError,
    OutOfMemoryError,
    OutputShapeError,
    SandboxError,
    TrainingError,
    UnsupportedOptionError,
    error_for,
)
from lemur_agent_server.api_tables import nn_stat_data, prun_data, run_data  # noqa: F401  (LEMUR's API names)
from sandbox import datasets
from sandbox.protocol import JobStatus
from zoo import codehash, connection
from zoo.query import Filters, as_tuple, grouped_sql
from zoo.records import code_text

# LEMUR's `good()`: a trained model counts only if its accuracy is above this multiple of chance
GOOD_FACTOR = 1.2

COLUMNS = ["task", "dataset", "metric", "nn", "nn_code", "nn_id", "epoch", "accuracy", "duration", "prm",
           "transform", "accuracy_to_time", "params", "run_uid", "status"]


def _zoo_path(zoo: str | os.PathLike[str] | None) -> Path:
    path = connection.resolve_zoo_path(zoo)
    if not path.exists():
        connection.initialize(path)
    return path


def data(only_best_accuracy: bool = False, task: str | None = None, dataset: str | None = None,
         metric: str | None = None, nn: str | Sequence[str] | None = None, epoch: float | None = None,
         max_rows: int | None = None, sql: Any = None, nn_prefixes: str | Sequence[str] | None = None,
         unique_nn: bool = False, include_nn_stats: bool = False, *,
         zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Records of the zoo as a DataFrame with LEMUR's column names (one row per curve point).

    LEMUR 2.2.11's parameters in its order. Same filters and semantics as the `query_models` tool;
    rows are ordered like LEMUR's (task, dataset, metric, nn, epoch). `duration` is training-only
    nanoseconds. Each model's code is one shared string; each row's `prm` is its own dict.
    `include_nn_stats=True` adds LEMUR's `nn_*` architecture columns (api_tables.NN_STAT_COLUMNS):
    parameter count, FLOPs and code length from the model, the rest from LEMUR's `nn_stat` rows that
    `import-lemur` kept (one row per model, an error-free one first) where present, else None; plus
    ours, `nn_fingerprint` and `nn_code_quality`. `sql` (LEMUR's JoinConf pair mode) is not supported.
    """
    if sql is not None:
        raise ValueError("data(sql=JoinConf(...)) (LEMUR's paired-record mode) is not supported here; call "
                         "data() without sql and pair the rows yourself (e.g. a merge on task/dataset/metric).")
    filters = Filters(task=task, dataset=dataset, metric=metric, nn=as_tuple(nn), nn_prefix=as_tuple(nn_prefixes),
                      epoch=epoch, only_best_accuracy=only_best_accuracy, unique_nn=unique_nn)
    inner, args = grouped_sql(filters)
    query = (f"SELECT q.task, q.dataset, q.metric, m.name, q.model_id, q.epoch, q.accuracy, q.duration_ns, "
             f"q.accuracy_to_time, m.params, r.uid, r.prm, r.transform, r.status, q.run_id FROM ({inner}) q "
             f"JOIN model m ON m.id = q.model_id JOIN run r ON r.id = q.run_id "
             f"ORDER BY q.task, q.dataset, q.metric, m.name, q.epoch, q.run_id")
    if max_rows is not None:
        query += " LIMIT ?"
        args.append(int(max_rows))
    conn = connection.connect_sync(_zoo_path(zoo), readonly=True)
    conn.row_factory = None
    try:
        conn.execute("BEGIN")  # one snapshot for the rows and the code
        rows = conn.execute(query, args).fetchall()
        ids = sorted({r[4] for r in rows})
        code = _model_code(conn, ids)
        stats = api_tables.nn_stats_by_model(conn, ids) if include_nn_stats else None
        conn.execute("COMMIT")
    finally:
        conn.close()
    frame = _frame(rows, code)
    if stats is not None:
        for column in api_tables.NN_STAT_COLUMNS + api_tables.NN_EXTRA_COLUMNS:
            frame[column] = [stats.get(m, {}).get(column) for m in (r[4] for r in rows)]
    return frame


def _cache_clear() -> None:
    """LEMUR's `data` is lru_cached and NNGPT calls `data.cache_clear()` after writes; ours reads fresh."""


data.cache_clear = _cache_clear  # type: ignore[attr-defined]


def _model_code(conn: Any, ids: list[int]) -> dict[int, tuple[str, str]]:
    code: dict[int, tuple[str, str]] = {}
    for start in range(0, len(ids), 900):
        chunk = ids[start:start + 900]
        for mid, text, lemur_id in conn.execute(
                f"SELECT id, code, lemur_id FROM model WHERE id IN ({','.join('?' * len(chunk))})", chunk):
            code[mid] = (code_text(text), lemur_id)  # stored text or deflated bytes
    return code


def _frame(rows: list[tuple[Any, ...]], code: dict[int, tuple[str, str]]) -> pd.DataFrame:
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


def lemur_name(nn_code: str, prefix: str | None = None) -> str:
    """LEMUR's model name: `md5(code with all whitespace removed)`, as `prefix-<md5>` when a prefix is given."""
    return codehash.model_name(prefix, nn_code)


def _refuse_unsupported(transform_dir: str | os.PathLike[str] | None) -> None:
    """Options LEMUR has that we cannot honour: say so before any work, never ignore them silently."""
    if transform_dir is not None:
        raise UnsupportedOptionError(
            f"transform_dir={str(transform_dir)!r}: custom transform code is not run here (untrusted code runs "
            f"only inside the sandbox, and transforms are ours). Pass transform_dir=None and set prm['transform'] "
            f"to one of: {', '.join(datasets.ALL_TRANSFORMS)}.", {"error": {"kind": "unsupported_option"}})


ONNX_FILE = "best_model.onnx"  # LEMUR's name for the exported model (its out/ckpt/<name>/best_model.onnx)


def _save_onnx(zoo_path: Path, res: dict[str, Any], save_path: str | os.PathLike[str] | None,
               file_name: str = ONNX_FILE) -> None:
    """The job's archived ONNX export copied to `save_path/<file_name>` (check_nn: LEMUR's
    best_model.onnx; a batch: `<model name>.onnx`, one per model); a model that could not be
    exported is no failure of the training: a warning says why there is no file."""
    from zoo.store import weights_dir_of

    onnx = res.get("onnx")
    if not isinstance(onnx, dict):
        warnings.warn(f"check_nn: no ONNX export: {res.get('onnx_error') or 'the job reported none'}",
                      stacklevel=3)
        return
    if save_path is not None:
        target = Path(save_path) / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights_dir_of(zoo_path) / onnx["path"], target)


def _request(nn_code: str, task: str, dataset: str, metric: str, prm: dict[str, Any], prefix: str | None,
             epoch_limit_minutes: float, max_train_samples: int | None, export_onnx: bool = False,
             protocol: str = "lemur", eval_every: float | None = None) -> Any:
    from lemur_agent_server.evaluator.requests import EvalRequest

    fixed = copy.deepcopy(dict(prm))
    epochs = float(fixed.pop("epoch", 1) or 1)
    for key in ("uid", "duration", "accuracy", "epoch_max", "duration_seconds", "train_stat"):
        fixed.pop(key, None)
    try:
        return EvalRequest(code=nn_code, task=task, dataset=dataset, metric=metric, prm=fixed, n_trials=1,
                           epochs=epochs, eval_every=min(eval_every or 0.5, epochs),
                           time_budget_s=max(30.0, epoch_limit_minutes * 60 * epochs), name_prefix=prefix,
                           max_train_samples=max_train_samples, export_onnx=bool(export_onnx), protocol=protocol)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidRequestError(f"check_nn: bad arguments: {exc}", {"error": {"kind": "invalid_request",
                                                                                "message": str(exc)}}) from None


def _run_job(request: Any, save_to_db: bool, zoo: str | os.PathLike[str] | None,
             sandbox: str | None) -> tuple[Path, str, Any]:
    from lemur_agent_server.config import Settings
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import RequestRefused, admit
    from zoo.store import ZooStore

    settings = Settings.from_env(zoo, sandbox=sandbox)
    try:  # the server's own limits first, as at every door (the queue checks them again)
        admit(request, settings)
    except RequestRefused as exc:
        raise InvalidRequestError(f"check_nn: {exc}", {"error": {"kind": "invalid_request",
                                                                 "message": str(exc)}}) from None

    async def run() -> tuple[str, Any]:
        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store, workers=False) as queue:
                return await queue.run_now(request, archive=save_to_db)
        finally:
            await store.close()

    job_id, outcome = anyio.run(run)
    return Path(settings.zoo_path), job_id, outcome


def _curve(zoo_path: Path, job_id: str, res: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(run uid, curve points) of the job's selected run: from the zoo when archived, else from the result.

    Without archiving only the last point is known (the job's result), unless the pipeline adds the
    selected trial's curve to it as `result["curve"]`.
    """
    conn = connection.connect_sync(zoo_path, readonly=True)
    try:
        run = conn.execute("SELECT id, uid, device, transform FROM run WHERE job_id=? AND selected=1",
                           (job_id,)).fetchone()
        if run is not None:
            points = conn.execute("SELECT epoch, accuracy, loss, duration_ns FROM point WHERE run_id=? "
                                  "ORDER BY epoch", (run[0],)).fetchall()
            return run[1], [{"epoch": p[0], "accuracy": p[1], "loss": p[2], "duration_ns": p[3], "device": run[2],
                             "transform": run[3]} for p in points]
    finally:
        conn.close()
    if isinstance(res.get("curve"), list):
        return f"{job_id}:selected", [p for p in res["curve"] if isinstance(p, dict)]
    last = {"epoch": res.get("epochs"), "accuracy": res.get("accuracy"), "duration_ns": res.get("duration_ns")}
    return f"{job_id}:selected", [last]


def _write_save_path(save_path: str | os.PathLike[str], name: str, task: str, dataset: str, metric: str,
                     prm: dict[str, Any], uid: str, curve: list[dict[str, Any]]) -> None:
    """One LEMUR `<epoch>.json` per whole epoch of the curve (half-epoch points are ours, not LEMUR's)."""
    lemur_uid = codehash.lemur_id(uid)  # LEMUR's uids are md5 hex strings; stable for one run
    transform = next((p["transform"] for p in curve if p.get("transform")), None)
    if transform and not prm.get("transform"):
        prm = {**prm, "transform": transform}  # the one the run used (LEMUR's importer needs it)
    by_epoch = {}
    for point in curve:
        epoch, accuracy = point.get("epoch"), point.get("accuracy")
        if not isinstance(epoch, (int, float)) or not isinstance(accuracy, (int, float)):
            continue
        if not lemur_stats.is_whole_epoch(float(epoch)):
            continue
        by_epoch[float(epoch)] = [lemur_stats.record(
            prm=prm, uid=lemur_uid, task=task, dataset=dataset, metric=metric, model=name, accuracy=accuracy,
            duration_ns=point.get("duration_ns"), loss=point.get("loss"), device=point.get("device"))]
    lemur_stats.add_records(save_path, by_epoch)


def check_nn(nn_code: str, task: str, dataset: str, metric: str, prm: dict[str, Any], save_to_db: bool = True,
             prefix: str | None = None, save_path: str | os.PathLike[str] | None = None, export_onnx: bool = False,
             epoch_limit_minutes: float = 30, transform_dir: str | os.PathLike[str] | None = None, *,
             zoo: str | os.PathLike[str] | None = None, sandbox: str | None = None,
             max_train_samples: int | None = None, protocol: str = "lemur",
             eval_every: float | None = None) -> tuple[str, float, float, float]:
    """Train `nn_code` once with `prm` (LEMUR's dict incl. batch, transform, epoch) in a sandbox.

    `protocol="lemur"` (the default here): LEMUR's own protocol, the whole train split, no validation,
    test accuracy after the last epoch; `protocol="default"` holds out our validation split instead.
    `eval_every`: epochs between curve points (default 0.5; 1.0 evaluates once per epoch as LEMUR does,
    one evaluation pass less per epoch).

    LEMUR 2.2.11's parameters in LEMUR's order (NNGPT passes the first eight positionally), then ours,
    keyword-only. Returns (name, accuracy, accuracy_to_time, code_quality) like LEMUR; the name is
    LEMUR's `lemur_name(nn_code, prefix)`, and the archived model's `data()` `nn_id` is its md5.
    The time limit is `epoch_limit_minutes` per epoch, enforced as a hard wall-clock budget for the run.

    `save_path`: LEMUR's statistics files, one `<epoch>.json` per epoch, added to what is there.
    Unlike LEMUR they are written whether or not `save_to_db` is set. `prm` is never mutated.
    `export_onnx`: the selected trial's model with its weights is exported to ONNX inside the sandbox,
    archived beside its safetensors (get_model's `weights.files`, format 'onnx') and, with `save_path`,
    copied to `save_path/best_model.onnx` once the job succeeded (whatever its accuracy). A model the
    exporter cannot handle still trains: the result's `onnx_error` says why, and a warning repeats it.

    Raises a `CheckNNError` subclass per failure kind (see lemur_agent_server.api_errors), each with
    `.result`; `AccuracyError` (alias `AccuracyException`) when accuracy is not above 1.2 x chance.
    """
    _refuse_unsupported(transform_dir)
    request = _request(nn_code, task, dataset, metric, prm, prefix, epoch_limit_minutes, max_train_samples,
                       export_onnx, protocol, eval_every)
    zoo_path, job_id, outcome = _run_job(request, save_to_db, zoo, sandbox)
    result = {"job_id": job_id, "status": outcome.status, "result": outcome.result, "error": outcome.error}
    if export_onnx and outcome.status == JobStatus.SUCCEEDED:
        _save_onnx(zoo_path, outcome.result or {}, save_path)
    return _lemur_tuple(result, nn_code, task, dataset, metric, prm, prefix, zoo_path, save_path)


def _lemur_tuple(result: dict[str, Any], nn_code: str, task: str, dataset: str, metric: str, prm: dict[str, Any],
                 prefix: str | None, zoo_path: Path, save_path: str | os.PathLike[str] | None
                 ) -> tuple[str, float, float, float]:
    """LEMUR's (name, accuracy, accuracy_to_time, code_quality) of a finished job, or its exception raised."""
    job_id, res = result["job_id"], result.get("result") or {}
    if result["status"] != "succeeded" or res.get("accuracy") is None:
        raise error_for(result["status"], result)
    name = lemur_name(nn_code, prefix)
    accuracy = float(res["accuracy"])
    if save_path is not None:
        uid, curve = _curve(zoo_path, str(res.get("reused_from") or job_id), res)  # a reuse: the original's runs
        _write_save_path(save_path, name, task, dataset, metric, dict(prm), uid, curve)
    chance = datasets.get_info(dataset).chance
    if not accuracy > GOOD_FACTOR * chance:
        raise AccuracyError(f"check_nn: accuracy {accuracy:.4f} is not above {GOOD_FACTOR} x chance "
                            f"({GOOD_FACTOR * chance:.4f}) for {dataset} (LEMUR's acceptance rule)", result)
    return name, accuracy, float(res.get("accuracy_to_time") or 0.0), float(res.get("code_quality") or 0.0)


# --- batches: many models per call (NNGPT's cycles of 10..150 models) ---------------------------------------
BatchItem = str | dict[str, Any]  # the code, or {"nn_code" (or "code"), "prm"?, "prefix"?, "export_onnx"?}


def _item_fields(item: BatchItem, prm: dict[str, Any] | None, prefix: str | None, export_onnx: bool
                 ) -> tuple[str, dict[str, Any], str | None, bool]:
    """(code, prm, prefix, export_onnx) of one item: its own prm keys and values override the shared ones."""
    if isinstance(item, str):
        return item, dict(prm or {}), prefix, export_onnx
    code = item.get("nn_code", item.get("code"))
    if not isinstance(code, str):
        raise InvalidRequestError("check_nn_batch: an item needs its code as 'nn_code' (or 'code')",
                                  {"error": {"kind": "invalid_request", "message": "item without code"}})
    own_export = item.get("export_onnx", export_onnx)
    if not isinstance(own_export, bool):
        raise InvalidRequestError("check_nn_batch: an item's 'export_onnx' must be true or false",
                                  {"error": {"kind": "invalid_request", "message": "export_onnx not a bool"}})
    return code, {**(prm or {}), **(item.get("prm") or {})}, item.get("prefix", prefix), own_export


def _batch_requests(items: Sequence[BatchItem], task: str, dataset: str, metric: str, prm: dict[str, Any] | None,
                    prefix: str | None, epoch_limit_minutes: float, max_train_samples: int | None, settings: Any,
                    export_onnx: bool = False) -> list[tuple[str, dict[str, Any], str | None, Any]]:
    """Per item (code, prm, prefix, EvalRequest or the InvalidRequestError it raised), in order; each request
    within the server's limits (an item's budget follows its own epochs)."""
    from lemur_agent_server.evaluator.requests import RequestRefused, admit

    out: list[tuple[str, dict[str, Any], str | None, Any]] = []
    for item in items:
        code, fixed, own_prefix = "", {}, prefix
        try:
            code, fixed, own_prefix, own_export = _item_fields(item, prm, prefix, export_onnx)
            request: Any = _request(code, task, dataset, metric, fixed, own_prefix, epoch_limit_minutes,
                                    max_train_samples, own_export)
            admit(request, settings)
        except InvalidRequestError as exc:
            request = exc
        except RequestRefused as exc:
            request = InvalidRequestError(f"check_nn: {exc}", {"error": {"kind": "invalid_request",
                                                                         "message": str(exc)}})
        out.append((code, fixed, own_prefix, request))
    return out


def _queue_settings(zoo: str | os.PathLike[str] | None, sandbox: str | None) -> Any:
    from lemur_agent_server.config import Settings

    return Settings.from_env(zoo, sandbox=sandbox)


async def _submit_in(queue: Any, requests: list[Any], force: bool, archive: bool) -> tuple[str, list[str | None]]:
    """Queue the valid requests as one batch; the job id of each request (None for refused ones)."""
    valid = [r for r in requests if not isinstance(r, CheckNNError)]
    batch_id, entries = await queue.submit_batch(valid, force=force, archive=archive) if valid else ("", [])
    ids = iter(e["job_id"] for e in entries)
    return batch_id, [None if isinstance(r, CheckNNError) else next(ids) for r in requests]


async def _wait_rows(store: Any, job_ids: Sequence[str], timeout: float | None) -> dict[str, dict[str, Any]]:
    """The rows of these jobs once all ended (or at `timeout`, as they are then)."""
    deadline = None if timeout is None else anyio.current_time() + timeout
    while True:
        rows = {j: await store.jobs.get(j) for j in dict.fromkeys(job_ids)}
        if all(r is not None and JobStatus(r["status"]).is_finished() for r in rows.values()):
            return rows
        if deadline is not None and anyio.current_time() >= deadline:
            return rows
        await anyio.sleep(0.5)


def check_nn_batch(items: Sequence[BatchItem], task: str, dataset: str, metric: str,
                   prm: dict[str, Any] | None = None, save_to_db: bool = True, prefix: str | None = None,
                   save_path: str | os.PathLike[str] | None = None, epoch_limit_minutes: float = 30, *,
                   zoo: str | os.PathLike[str] | None = None, sandbox: str | None = None,
                   max_train_samples: int | None = None, force: bool = False, export_onnx: bool = False
                   ) -> list[Any]:
    """`check_nn` for many models at once: one batch, trained on this process's worker slots.

    `items`: code strings, or dicts {"nn_code", "prm"?, "prefix"?} whose prm keys override the shared
    `prm`. Returns one entry per item, in order: LEMUR's (name, accuracy, accuracy_to_time,
    code_quality) tuple, or the `CheckNNError` (subclass) check_nn would have raised for it. An item
    whose experiment already succeeded in the zoo is answered from it (`force=True` trains again);
    identical items train once.

    `export_onnx` (or an item's own "export_onnx"): as check_nn's, per model; with `save_path` each
    exported model is copied to `save_path/<its name>.onnx` (the shared folder holds many models, so
    not check_nn's single best_model.onnx).
    """
    settings = _queue_settings(zoo, sandbox)
    prepared = _batch_requests(items, task, dataset, metric, prm, prefix, epoch_limit_minutes, max_train_samples,
                               settings, export_onnx)

    async def run() -> tuple[list[str | None], dict[str, dict[str, Any]]]:
        from lemur_agent_server.evaluator.queue import JobQueue
        from zoo.store import ZooStore

        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store) as queue:
                _, ids = await _submit_in(queue, [p[3] for p in prepared], force, save_to_db)
                return ids, await _wait_rows(store, [j for j in ids if j], None)
        finally:
            await store.close()

    ids, rows = anyio.run(run)
    out: list[Any] = []
    for (code, fixed, own_prefix, request), job_id in zip(prepared, ids):
        if job_id is None:
            out.append(request)
            continue
        row = rows[job_id]
        result = {"job_id": job_id, "status": row["status"], "result": row.get("result"), "error": row.get("error")}
        if request.export_onnx and row["status"] == JobStatus.SUCCEEDED:
            _save_onnx(Path(settings.zoo_path), row.get("result") or {}, save_path,
                       f"{lemur_name(code, own_prefix)}.onnx")
        try:
            out.append(_lemur_tuple(result, code, task, dataset, metric, fixed, own_prefix,
                                    Path(settings.zoo_path), save_path))
        except CheckNNError as exc:
            out.append(exc)
    return out


def submit_batch(items: Sequence[BatchItem], task: str, dataset: str, metric: str = "acc",
                 prm: dict[str, Any] | None = None, prefix: str | None = None, epoch_limit_minutes: float = 30, *,
                 zoo: str | os.PathLike[str] | None = None, sandbox: str | None = None,
                 max_train_samples: int | None = None, force: bool = False, save_to_db: bool = True,
                 export_onnx: bool = False) -> dict[str, Any]:
    """Queue a batch in the zoo and return at once: {"batch_id", "job_ids" (per item, None when refused),
    "errors" (per item, the InvalidRequestError or None)}. A server or `lemur-agent-server worker` on
    the same zoo runs the jobs, or `wait(batch_id)` runs them in this process while it waits.
    `export_onnx` (or an item's own): each model's ONNX export is archived in the zoo (get_model)."""
    settings = _queue_settings(zoo, sandbox)
    prepared = _batch_requests(items, task, dataset, metric, prm, prefix, epoch_limit_minutes, max_train_samples,
                               settings, export_onnx)

    async def run() -> tuple[str, list[str | None]]:
        from lemur_agent_server.evaluator.queue import JobQueue
        from zoo.store import ZooStore

        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store, workers=False) as queue:
                return await _submit_in(queue, [p[3] for p in prepared], force, save_to_db)
        finally:
            await store.close()

    batch_id, ids = anyio.run(run)
    return {"batch_id": batch_id or None, "job_ids": ids,
            "errors": [p[3] if isinstance(p[3], CheckNNError) else None for p in prepared]}


def wait(batch_id: str, timeout: float | None = None, *, work: bool = True,
         zoo: str | os.PathLike[str] | None = None, sandbox: str | None = None) -> list[dict[str, Any]]:
    """The batch's jobs (job_id, status, model_name, result, error) once all ended, or at `timeout` seconds
    as they are then. With `work=True` this process runs the queue's jobs while it waits (no server
    needed); `work=False` only watches while a server or worker elsewhere runs them."""
    settings = _queue_settings(zoo, sandbox)

    async def run() -> list[dict[str, Any]]:
        from lemur_agent_server.evaluator.queue import JobQueue
        from zoo.store import ZooStore

        store = await ZooStore.open(settings.zoo_path)
        try:
            ids = [r["id"] for r in await store.fetchall("SELECT id FROM job WHERE batch_id=? ORDER BY rowid",
                                                        (batch_id,))]
            if not ids:
                raise InvalidRequestError(f"wait: no batch {batch_id!r} in {settings.zoo_path}; pass the batch_id "
                                          "submit_batch returned (and the same zoo).", {"error": {
                                              "kind": "invalid_request", "message": "unknown batch"}})
            if not work:
                rows = await _wait_rows(store, ids, timeout)
            else:
                async with JobQueue.running(settings, store) as _queue:
                    rows = await _wait_rows(store, ids, timeout)
            return [{"job_id": j, "status": r["status"], "model_name": r.get("model_name"),
                     "result": r.get("result"), "error": r.get("error")} for j, r in rows.items()]
        finally:
            await store.close()

    return anyio.run(run)
