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

SortKey = Literal["accuracy", "duration", "accuracy_to_time", "params", "created", "name"]

# (SQL expression over the grouped row `q`, default direction, NULL sentinel for each direction)
_SORT_SQL: dict[str, str] = {
    "accuracy": "q.accuracy",
    "duration": "q.duration_ns",
    "accuracy_to_time": "q.accuracy_to_time",
    "params": "q.params",
    "created": "q.created",
}
_DEFAULT_DESC = {"accuracy": True, "accuracy_to_time": True, "created": True, "duration": False,
                 "params": False, "name": False}
_NULL_LOW, _NULL_HIGH = -1e308, 1e308


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


def as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _escape_like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _where(f: Filters) -> tuple[str, list[Any]]:
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
    name_clauses: list[str] = []
    if f.nn:
        name_clauses.append(f"name IN ({','.join('?' * len(f.nn))})")
        args.extend(f.nn)
    for prefix in f.nn_prefix:
        name_clauses.append("name LIKE ? ESCAPE '\\'")
        args.append(_escape_like(prefix))
    if name_clauses:
        clauses.append(f"p.model_id IN (SELECT id FROM model WHERE {' OR '.join(name_clauses)})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def grouped_sql(f: Filters, with_params: bool) -> tuple[str, list[Any]]:
    """The filtered (and, if asked, best-per-group) points as a subquery with one row per result."""
    where, args = _where(f)
    join = " JOIN model pm ON pm.id = p.model_id" if with_params else ""
    params_col = ", pm.params AS params, pm.name AS name" if with_params else ""
    cols = ("p.run_id, p.epoch, p.model_id, p.task, p.dataset, p.metric, p.accuracy, p.val_accuracy, "
            "p.loss, p.duration_ns, p.accuracy_to_time, p.elapsed_s, p.created" + params_col)
    if f.unique_nn:
        group = " GROUP BY p.model_id"
    elif f.only_best_accuracy:
        group = " GROUP BY p.task, p.dataset, p.metric, p.model_id, p.epoch"
    else:
        group = ""
    if group:
        sql = f"SELECT {cols}, MAX(p.accuracy) AS _best FROM point p{join}{where}{group}"
    else:
        sql = f"SELECT {cols} FROM point p{join}{where}"
    return sql, args


def _sort_expr(page: Page) -> str:
    if page.sort == "name":
        return "q.name"
    sentinel = _NULL_LOW if page.desc else _NULL_HIGH
    return f"COALESCE({_SORT_SQL[page.sort]}, {sentinel!r})"


def encode_cursor(filters: Filters, page: Page, row: dict[str, Any]) -> str:
    sort_value = row["_sort"]
    payload = {"f": filters.digest(), "s": page.sort, "d": page.desc, "v": sort_value,
               "r": row["run_id"], "e": row["epoch"]}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _decode_cursor(filters: Filters, page: Page) -> dict[str, Any]:
    try:
        payload = json.loads(base64.urlsafe_b64decode(page.cursor.encode()))  # type: ignore[union-attr]
        assert isinstance(payload, dict) and {"f", "s", "d", "v", "r", "e"} <= payload.keys()
    except Exception as exc:  # noqa: BLE001 - any malformed token gets the same advice
        raise QueryError("Malformed cursor. Pass back the next_cursor of the previous page unchanged, "
                         "or use offset.") from exc
    if payload["f"] != filters.digest() or payload["s"] != page.sort or payload["d"] != page.desc:
        raise QueryError("This cursor belongs to a query with other filters or sort. Repeat the "
                         "original filters and sort, or start again without a cursor.")
    return payload


def page_sql(f: Filters, page: Page) -> tuple[str, list[Any]]:
    """SELECT of one page: the grouped rows in a total order; `run` is joined for the page rows only."""
    inner, args = grouped_sql(f, with_params=True)
    sort = _sort_expr(page)
    direction = "DESC" if page.desc else "ASC"
    where = ""
    if page.cursor:
        c = _decode_cursor(f, page)
        op = "<" if page.desc else ">"
        where = f" WHERE ({sort} {op} ? OR ({sort} = ? AND (q.run_id, q.epoch) > (?, ?)))"
        args += [c["v"], c["v"], c["r"], c["e"]]
    if page.sort == "name":
        keys = ["task", "dataset", "metric", "name", "epoch", "run_id"]
    else:
        keys = [f"_sort {direction}", "run_id", "epoch"]
    order = ", ".join(keys)
    sql = f"SELECT q.*, {sort} AS _sort FROM ({inner}) q{where} ORDER BY {order}"
    if page.limit is not None:
        sql += " LIMIT ?"
        args.append(int(page.limit))
    elif page.offset and not page.cursor:
        sql += " LIMIT -1"
    if page.offset and not page.cursor:
        sql += " OFFSET ?"
        args.append(int(page.offset))
    sql = (f"SELECT pg.*, r.uid AS run_uid, r.prm AS prm, r.transform AS transform, r.status AS status "
           f"FROM ({sql}) pg JOIN run r ON r.id = pg.run_id ORDER BY {', '.join('pg.' + k for k in keys)}")
    return sql, args


def count_sql(f: Filters) -> tuple[str, list[Any]]:
    inner, args = grouped_sql(f, with_params=False)
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
        "accuracy_to_time": row["accuracy_to_time"],
        "params": row["params"],
        "prm": prm,
        "transform": row.get("transform") or prm.get("transform"),
        "run_uid": row["run_uid"],
        "status": row["status"],
        "model_id": row["model_id"],
    }
