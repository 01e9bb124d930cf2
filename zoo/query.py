"""One query language for the zoo, shared by the MCP tool, the CLI and the Python API.

A row is one learning-curve point of one run ("a record" in LEMUR). Filters narrow the points;
`only_best_accuracy` keeps the best point per (task, dataset, metric, model, epoch) and `unique_nn`
the best point per model. Both pick exactly one row per group even on ties, through SQLite's
documented rule that bare columns of a `MAX()` aggregate come from the row holding the maximum.

Pagination is keyset-based: the cursor encodes the last row's sort key, so pages stay consistent while
new runs are written. All values are bound parameters; name prefixes are matched with escaped LIKE.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

SortKey = Literal["accuracy", "duration", "duration_norm", "accuracy_to_time", "params", "created", "name"]

_SORT_COLUMN: dict[str, str] = {
    "accuracy": "accuracy",
    "duration": "duration_ns",
    "accuracy_to_time": "accuracy_to_time",
    "created": "created",
}
_DEFAULT_DESC = {"accuracy": True, "accuracy_to_time": True, "created": True, "duration": False,
                 "duration_norm": False, "params": False, "name": False}
# A point's training time on the reference device (lemur_agent_server.evaluator.calibration): its duration
# times its run's calibration factor (run.duration_norm_ns / run.duration_ns); NULL for an uncalibrated run.
# `{p}` is the point's alias, `{r}` its run's.
DURATION_NORM_SQL = "({p}.duration_ns * {r}.duration_norm_ns * 1.0 / {r}.duration_ns)"
_NULL_LOW, _NULL_HIGH = -1e308, 1e308
SQL_INT_MAX = 2**63 - 1  # SQLite's INTEGER range; a larger Python int raises OverflowError when bound
MAX_OFFSET = 10**9  # rows to skip; far beyond any zoo, far inside SQLite's range
MAX_CURSOR_CHARS = 2_000


class QueryError(ValueError):
    """A query that cannot be run as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Filters:
    task: str | None = None
    dataset: str | None = None
    metric: str | None = None
    nn: tuple[str, ...] = ()
    nn_prefix: tuple[str, ...] = ()
    epoch: float | None = None
    min_accuracy: float | None = None
    only_best_accuracy: bool = False
    unique_nn: bool = False
    # only models LEMUR benchmarked on this device (its mobile `run` table, imported as lemur_mobile_run)
    device_type: str | None = None
    # only runs of this evaluation protocol (default | lemur; imported LEMUR records are lemur)
    protocol: str | None = None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Page:
    sort: SortKey = "accuracy"
    descending: bool | None = None  # None: the sort key's natural direction
    limit: int | None = 20
    offset: int = 0
    cursor: str | None = None

    @property
    def desc(self) -> bool:
        return _DEFAULT_DESC[self.sort] if self.descending is None else self.descending

    def check(self) -> None:
        """Refuse numbers SQLite cannot bind (every door passes here: tool, CLI, Python API)."""
        if self.limit is not None and not _is_int(self.limit, 0, SQL_INT_MAX):
            raise QueryError(f"limit must be an integer in 0..{SQL_INT_MAX} (or none); pass e.g. limit=20.")
        if not _is_int(self.offset, 0, MAX_OFFSET):
            raise QueryError(f"offset must be an integer in 0..{MAX_OFFSET:,}; call again with a smaller offset, "
                             "or page with next_cursor.")


def as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


# A run's protocol: the column, else by source (bulk importers leave it NULL: LEMUR's records are "lemur")
RUN_PROTOCOL_SQL = "COALESCE({r}.protocol, CASE WHEN {r}.source = 'evaluator' THEN 'default' ELSE 'lemur' END)"


def _escape_like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _models_clause(models_sql: str, via_run: bool) -> str:
    """`p`'s rows of the models `models_sql` selects. via_run (for `point`/`point_row`, which have no model
    index since zoo.schema version 9): through the model's runs (run_model) to the point primary key."""
    if via_run:
        return f"p.run_id IN (SELECT r.id FROM run r WHERE r.model_id IN ({models_sql}))"
    return f"p.model_id IN ({models_sql})"


def _where(f: Filters, via_run: bool = False) -> tuple[str, list[Any]]:
    """The filters over `p` (a point, best_point or run row). via_run: `p` is a point (see _models_clause)."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (("task", f.task), ("dataset", f.dataset), ("metric", f.metric)):
        if value is not None:
            clauses.append(f"p.{column} = ?")
            args.append(value)
    if f.epoch is not None:
        clauses.append("p.epoch = ?")
        args.append(float(f.epoch))
    if f.min_accuracy is not None:
        clauses.append("p.accuracy >= ?")
        args.append(float(f.min_accuracy))
    names, name_args = name_filter(f, "name")
    if names:
        clauses.append(_models_clause(f"SELECT id FROM model WHERE {names}", via_run))
        args.extend(name_args)
    if f.device_type is not None:  # by name: LEMUR's side tables name their model
        clauses.append(_models_clause("SELECT m.id FROM model m JOIN lemur_mobile_run mr ON mr.model_name = m.name"
                                      " WHERE mr.device_type = ?", via_run))
        args.append(f.device_type)
    if f.protocol is not None:
        clauses.append(f"p.run_id IN (SELECT r.id FROM run r WHERE {RUN_PROTOCOL_SQL.format(r='r')} = ?)")
        args.append(f.protocol)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def name_filter(f: Filters, column: str) -> tuple[str, list[Any]]:
    """The model-name part of the filters on `column`: a name in `nn` OR one starting with a prefix in
    `nn_prefix` (either matches); ("", []) when neither is set."""
    clauses: list[str] = []
    args: list[Any] = []
    if f.nn:
        clauses.append(f"{column} IN ({','.join('?' * len(f.nn))})")
        args.extend(f.nn)
    for prefix in f.nn_prefix:
        clauses.append(f"{column} LIKE ? ESCAPE '\\'")
        args.append(_escape_like(prefix))
    return (f"({' OR '.join(clauses)})" if clauses else ""), args


# Every column of a result row that comes from its point (grouped_sql's default).
_COVERED = ("p.run_id, p.epoch, p.model_id, p.task, p.dataset, p.metric, p.accuracy, p.duration_ns, "
            "p.accuracy_to_time, p.created")
# What a page groups and sorts on by default, all in the index `point_filter` (scope, epoch, model, accuracy
# and the primary key run_id, epoch; zoo.schema version 9): the page reads the rest for its own rows only.
_KEYS = "p.run_id, p.epoch, p.model_id, p.accuracy"
_SCOPE_COLUMNS = ", p.task, p.dataset, p.metric"
# A point's `created` is its run's (both writers store the run's): newest first, a page walks the index
# run_created (created DESC, id) and each run's points in epoch order, its own order, without a sort
_RUN_CREATED = "rc.created AS created"


def grouped_sql(f: Filters, with_params: bool = False, columns: str = _COVERED) -> tuple[str, list[Any]]:
    """The filtered (and, if asked, best-per-group) points, one row per result, with `columns` of `point`
    (aliased p; it must hold `p.accuracy`). With the default set a reader gets every point column of a row;
    page_sql asks for the index-covered keys only: no table lookups until the page is cut."""
    reads_points = f.protocol is not None or not (f.unique_nn or f.only_best_accuracy)
    where, args = _where(f, via_run=reads_points)
    if f.protocol is not None or f.unique_nn or f.only_best_accuracy:
        columns = columns.replace(_RUN_CREATED, "p.created").replace("rc.id AS run_id", "p.run_id")
    best_max = columns.replace("p.accuracy", "MAX(p.accuracy) AS accuracy", 1)
    if f.protocol is not None and (f.unique_nn or f.only_best_accuracy):  # best_point mixes protocols
        per = "p.model_id" if f.unique_nn else "p.task, p.dataset, p.metric, p.model_id, p.epoch"
        return f"SELECT {best_max} FROM point p{where}{' AND' if where else ' WHERE'} p.accuracy IS NOT NULL " \
               f"GROUP BY {per}", args
    if f.unique_nn:  # best per model over its best-per-epoch rows
        return f"SELECT {best_max} FROM best_point p{where} GROUP BY p.model_id", args
    if f.only_best_accuracy:  # maintained on write: one row per task/dataset/metric/model/epoch
        return f"SELECT {columns} FROM best_point p{where}", args
    # no task/dataset/metric asked for or returned: the table, not the view (no scope lookup a point), so a
    # page sorted on a key without an index (accuracy_to_time, ascending duration) scans it rather than an index
    # (point_row has no `created`: the view reads the run's)
    asked = f.task is not None or f.dataset is not None or f.metric is not None  # "" is asked for too
    table = "point" if asked or "p.task" in columns or "p.created" in columns \
        else "point_row"
    source = f"run rc CROSS JOIN {table} p ON p.run_id = rc.id" if _RUN_CREATED in columns else f"{table} p"
    return f"SELECT {columns} FROM {source}{where}", args


def _sort_expr(page: Page) -> str:
    if page.sort == "name":
        return "m.name"
    if page.sort == "duration_norm":
        column = DURATION_NORM_SQL.format(p="q", r="r0")
        return column if page.desc else f"COALESCE({column}, {_NULL_HIGH!r})"
    column = "m.params" if page.sort == "params" else f"q.{_SORT_COLUMN[page.sort]}"
    if page.desc:
        return column  # SQLite sorts NULL lowest, so DESC puts them last and an index can serve it
    return f"COALESCE({column}, {_NULL_HIGH!r})"


def encode_cursor(filters: Filters, page: Page, row: dict[str, Any]) -> str:
    payload = {"f": filters.digest(), "s": page.sort, "d": page.desc, "v": row["_sort"],
               "r": row["run_id"], "e": row["epoch"]}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and abs(value) <= SQL_INT_MAX and value == value)  # ints SQLite can bind, floats not NaN


def _valid_payload(payload: Any) -> bool:
    """The cursor's values reach SQL as bound parameters: each must have the type encode_cursor wrote."""
    return (isinstance(payload, dict) and {"f", "s", "d", "v", "r", "e"} <= payload.keys()
            and isinstance(payload["f"], str) and isinstance(payload["s"], str) and isinstance(payload["d"], bool)
            and (payload["v"] is None or _is_number(payload["v"]) or isinstance(payload["v"], str))
            and _is_int(payload["r"], -SQL_INT_MAX, SQL_INT_MAX) and _is_number(payload["e"]))


def _decode_cursor(filters: Filters, page: Page) -> dict[str, Any]:
    cursor = page.cursor or ""
    try:
        payload = json.loads(base64.urlsafe_b64decode(cursor.encode())) if len(cursor) <= MAX_CURSOR_CHARS else None
    except Exception:  # noqa: BLE001 - any malformed token gets the same advice
        payload = None
    if not _valid_payload(payload):
        raise QueryError("Malformed cursor. Pass back the next_cursor of the previous page unchanged, or restart "
                         "the listing without a cursor (or use offset).")
    if payload["f"] != filters.digest() or payload["s"] != page.sort or payload["d"] != page.desc:
        raise QueryError("This cursor belongs to a query with other filters or sort. Repeat the "
                         "original filters and sort, or start again without a cursor.")
    return payload


def _page_columns(page: Page) -> str:
    """The point columns a page's grouping, sort and order need before it is cut (see _KEYS)."""
    if page.sort == "name":  # its order starts with the task, dataset and metric
        return _KEYS + _SCOPE_COLUMNS
    if page.sort in ("duration", "duration_norm"):
        return _KEYS + ", p.duration_ns"
    if page.sort == "created":  # the run's (points store none); its id: the order's next key, as run_created has it
        return f"{_KEYS.replace('p.run_id', 'rc.id AS run_id')}, {_RUN_CREATED}"
    if page.sort == "accuracy_to_time":
        return f"{_KEYS}, p.{_SORT_COLUMN[page.sort]}"
    return _KEYS


def page_sql(f: Filters, page: Page) -> tuple[str, list[Any]]:
    """One page: group and sort on index-covered columns, cut the page, then join point, model and run
    for the page's rows only."""
    page.check()
    inner, args = grouped_sql(f, columns=_page_columns(page))
    sort = _sort_expr(page)
    direction = "DESC" if page.desc else "ASC"
    join_model = " JOIN model m ON m.id = q.model_id" if page.sort in ("params", "name") else ""
    if page.sort == "duration_norm":
        join_model = " JOIN run r0 ON r0.id = q.run_id"
    where = ""
    if page.cursor:
        if page.sort == "name":
            raise QueryError("sort='name' pages with offset, not cursor: call again without the cursor and pass "
                             "offset instead.")
        c = _decode_cursor(f, page)
        op = "<" if page.desc else ">"
        low = _NULL_LOW if page.desc else _NULL_HIGH
        key = f"COALESCE({sort}, {low!r})" if page.desc and page.sort != "name" else sort
        where = f" WHERE ({key} {op} ? OR ({key} = ? AND (q.run_id, q.epoch) > (?, ?)))"
        value = c["v"] if c["v"] is not None or page.sort == "name" else low
        args += [value, value, c["r"], c["e"]]
    if page.sort == "name":
        keys = ["task", "dataset", "metric", "_sort", "epoch", "run_id"]
    else:
        keys = [f"_sort {direction}", "run_id", "epoch"]
    order = ", ".join(keys)
    sql = f"SELECT q.*, {sort} AS _sort FROM ({inner}) q{join_model}{where} ORDER BY {order}"
    if page.limit is not None:
        sql += " LIMIT ?"
        args.append(int(page.limit))
    elif page.offset and not page.cursor:
        sql += " LIMIT -1"
    if page.offset and not page.cursor:
        sql += " OFFSET ?"
        args.append(int(page.offset))
    sql = (f"SELECT pg.run_id, pg.epoch, pg.model_id, pg.accuracy, pg._sort, pt.task, pt.dataset, pt.metric, "
           f"pt.duration_ns, pt.accuracy_to_time, r.created, "
           f"m.name AS name, m.params AS params, pt.val_accuracy AS val_accuracy, pt.loss AS loss, "
           f"pt.elapsed_s AS elapsed_s, r.uid AS run_uid, r.prm AS prm, r.transform AS transform, "
           f"r.status AS status, CAST({DURATION_NORM_SQL.format(p='pt', r='r')} AS INTEGER) AS duration_norm_ns, "
           f"r.job_id AS job_id, {RUN_PROTOCOL_SQL.format(r='r')} AS protocol "
           f"FROM ({sql}) pg JOIN model m ON m.id = pg.model_id "
           f"JOIN point pt ON pt.run_id = pg.run_id AND pt.epoch = pg.epoch JOIN run r ON r.id = pg.run_id "
           f"ORDER BY {', '.join('pg.' + k for k in keys)}")
    return sql, args


def count_sql(f: Filters) -> tuple[str, list[Any]]:
    if dataclasses.replace(f, only_best_accuracy=False) == Filters():  # every (best) point: count the table
        return f"SELECT COUNT(*) FROM {'best_point_row' if f.only_best_accuracy else 'point_row'}", []
    inner, args = grouped_sql(f, columns=_KEYS)
    return f"SELECT COUNT(*) FROM ({inner})", args


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Turn a raw page row into the public row shape shared by the tool and the API."""
    prm = json.loads(row["prm"]) if row.get("prm") else {}
    return {
        "name": row["name"],
        "task": row["task"],
        "dataset": row["dataset"],
        "metric": row["metric"],
        "epoch": row["epoch"],
        "accuracy": row["accuracy"],
        "duration": row["duration_ns"],
        "duration_norm": row.get("duration_norm_ns"),  # on the reference device; None: run not calibrated
        "accuracy_to_time": row["accuracy_to_time"],
        "params": row["params"],
        "prm": prm,
        "transform": row.get("transform") or prm.get("transform"),
        "run_uid": row["run_uid"],
        "status": row["status"],
        "model_id": row["model_id"],
        "protocol": row.get("protocol"),
        "job_id": row.get("job_id"),
    }


# --- the score of a model: one definition for query_models(view='models'), leaderboard, plots, jobs --------
ScoreBy = Literal["accuracy", "accuracy_to_time", "accuracy_to_time_norm"]
SCORE_BY = ("accuracy", "accuracy_to_time", "accuracy_to_time_norm")
# accuracy_to_time_norm: accuracy_to_time with the training time on the reference device (duration_norm)
SCORE_DEFINITION = (
    "A model's score on a task/dataset/metric is the best value (accuracy, or accuracy_to_time) among its "
    "complete runs, each run counted at its last learning-curve point (for a job: the test accuracy of a trial "
    "at the end of its training, the number a job's result reports); ties go to the shorter training time. "
    "A run is complete when it succeeded (or was imported from LEMUR) and reached the epochs it asked for: "
    "pruned, failed, timed-out and cancelled runs, and runs stopped early by the time budget, are left out "
    "unless include_partial=true.")
# A run that counts: ended well, and its last point is at the epochs it asked for (prm.epoch, when recorded).
COMPLETE_RUN_SQL = ("p.status IN ('succeeded', 'imported') AND (json_extract(p.prm, '$.epoch') IS NULL "
                    "OR p.epochs >= json_extract(p.prm, '$.epoch') - 1e-9)")


def model_scores_sql(f: Filters, by: ScoreBy = "accuracy", include_partial: bool = False) -> tuple[str, list[Any]]:
    """A derived table `(...)`: one row per (task, dataset, metric, model_id) in the filters' scope with the
    model's score (SCORE_DEFINITION) as `best`, the run that holds it (run_id, accuracy, accuracy_to_time,
    epoch, duration_ns) and `runs`, the number of runs counted. With `f.epoch` each run counts at its point
    at that epoch instead of its last one (then completeness is having reached it)."""
    if by not in SCORE_BY:
        raise QueryError(f"by must be one of {', '.join(SCORE_BY)}, not {by!r}.")
    where, args = _where(dataclasses.replace(f, epoch=None, min_accuracy=None, protocol=None))
    clauses = [where[len(" WHERE "):]] if where else []
    if f.protocol is not None:
        clauses.append(f"{RUN_PROTOCOL_SQL.format(r='p')} = ?")
        args.append(f.protocol)
    if f.epoch is None:
        source = "run p"
        cols = ("p.id AS run_id, p.epochs AS epoch, p.accuracy, p.duration_ns, p.accuracy_to_time, "
                "p.duration_norm_ns")
        if not include_partial:
            clauses.append(COMPLETE_RUN_SQL)
        acc = "p.accuracy"
    else:
        source = "run p CROSS JOIN point pt ON pt.run_id = p.id"
        cols = ("p.id AS run_id, pt.epoch AS epoch, pt.accuracy, pt.duration_ns, pt.accuracy_to_time, "
                f"CAST({DURATION_NORM_SQL.format(p='pt', r='p')} AS INTEGER) AS duration_norm_ns")
        clauses.append("pt.epoch = ?")
        args.append(float(f.epoch))
        acc = "pt.accuracy"
    value = acc if by == "accuracy" else acc.replace("accuracy", "accuracy_to_time")
    if by == "accuracy_to_time_norm":  # a2t scales with 1 / time: divide by the run's calibration factor
        value = f"({value} * p.duration_ns * 1.0 / p.duration_norm_ns)"
    clauses.append(f"{value} IS NOT NULL")
    if f.min_accuracy is not None:
        clauses.append(f"{acc} >= ?")
        args.append(float(f.min_accuracy))
    part = "PARTITION BY p.task, p.dataset, p.metric, p.model_id"
    duration = acc.replace("accuracy", "duration_ns")
    sql = (f"(SELECT task, dataset, metric, model_id, best, run_id, accuracy, accuracy_to_time, epoch, duration_ns, "
           f"duration_norm_ns, runs FROM (SELECT p.task, p.dataset, p.metric, p.model_id, {value} AS best, {cols}, "
           f"COUNT(*) OVER ({part}) AS runs, ROW_NUMBER() OVER ({part} ORDER BY {value} DESC, "
           f"COALESCE({duration}, {SQL_INT_MAX}), p.id) AS k FROM {source} WHERE {' AND '.join(clauses)}) "
           "WHERE k = 1)")
    return sql, args


# The order of models by score, within a task/dataset/metric: best first, then the faster, then the older id.
SCORE_ORDER_SQL = f"s.best DESC, COALESCE(s.duration_ns, {SQL_INT_MAX}), s.model_id"


def models_view_sql(f: Filters, by: ScoreBy = "accuracy", include_partial: bool = False, limit: int = 20,
                    offset: int = 0) -> tuple[str, list[Any]]:
    """One row per model and task/dataset/metric it has scored runs on, ranked by its score within each
    triple (`rank`, 1 = best), and one row with a null score for each model that has none in scope (a seed
    model before its first run, say): every model in the name filters is findable. Task/dataset/metric
    filters narrow the scores, never hide a model. Adds `total` (rows over all pages)."""
    scores, args = model_scores_sql(f, by, include_partial)
    names, name_args = name_filter(f, "m.name")
    where = f" WHERE {names}" if names else ""
    sql = (f"SELECT m.name, m.params, m.flops, s.task, s.dataset, s.metric, s.best AS score, s.accuracy, "
           f"s.accuracy_to_time, s.epoch, s.duration_ns, s.duration_norm_ns, COALESCE(s.runs, 0) AS runs, "
           f"CASE WHEN s.model_id IS NULL THEN NULL ELSE ROW_NUMBER() OVER (PARTITION BY s.task, s.dataset, "
           f"s.metric, s.model_id IS NULL ORDER BY {SCORE_ORDER_SQL}) END AS rank, COUNT(*) OVER () AS total "
           f"FROM model m LEFT JOIN {scores} s ON s.model_id = m.id{where} "
           f"ORDER BY s.model_id IS NULL, s.task, s.dataset, s.metric, {SCORE_ORDER_SQL}, m.name LIMIT ? OFFSET ?")
    return sql, args + name_args + [int(limit), int(offset)]
