"""`lemur-agent-server export-lemur OUT`: the zoo's runs as LEMUR 2.2 statistics files and model code.

Why: results trained here should be able to go back into the LEMUR dataset (a pull request to
nn-dataset, or LEMUR's own database build). Layout written under OUT, the one a LEMUR checkout has and
both LEMUR's importer (`ab/nn/util/db/Write.py`, reading `ab/nn/stat/train/*/<epoch>.json`) and ours
(`import-lemur OUT`) read:

    OUT/ab/nn/nn/<name>.py                                         model code
    OUT/ab/nn/stat/train/<task>_<dataset>_<metric>_<name>/<epoch>.json   trial records (lemur_stats)

What is exported: runs of our evaluator (imported LEMUR runs only with `include_imported`), with the
given filters, status succeeded by default; one record per whole-epoch curve point (LEMUR records are
"after N epochs"; our half-epoch points have no place there). Each run's record uid is the md5 of its
run uid, the same in every epoch file, so an import groups the epochs back into one run, and a second
export into the same OUT replaces the records instead of adding copies.

Not exported, with the reason counted in the report: a model name or dataset/metric that contains `_`
(LEMUR splits the folder name on `_`), a run without a whole-epoch point or without a transform
(LEMUR's importer reads `record["transform"]` and skips the whole file when one lacks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from lemur_agent_server import lemur_stats
from lemur_agent_server.lemur_import import SOURCE as IMPORT_SOURCE
from sandbox.protocol import RunStatus
from zoo import codehash, connection
from zoo.query import Filters, _where
from zoo.records import code_text

SPLITTER = "_"  # LEMUR's config_splitter


@dataclasses.dataclass
class ExportReport:
    out: str
    models: int = 0
    runs: int = 0
    records: int = 0
    files: int = 0
    skipped_runs: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped_runs += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _runs_sql(filters: Filters, statuses: tuple[str, ...], include_imported: bool) -> tuple[str, list[Any]]:
    where, args = _where(dataclasses.replace(filters, epoch=None))
    status = f"p.status IN ({','.join('?' * len(statuses))})"
    args.extend(statuses)
    # imported runs have their own status ("imported"): with include_imported they all count
    clause = f"({status} OR p.source = '{IMPORT_SOURCE}')" if include_imported else \
        f"{status} AND p.source != '{IMPORT_SOURCE}'"
    where = (where + " AND " if where else " WHERE ") + clause
    return ("SELECT p.id, p.uid, p.task, p.dataset, p.metric, p.prm, p.device, m.name, m.code, p.transform "
            f"FROM run p JOIN model m ON m.id = p.model_id{where} ORDER BY m.name, p.id"), args


def _unsafe_part(name: str, task: str, dataset: str, metric: str) -> str | None:
    for label, value in (("model name", name), ("task", task), ("dataset", dataset), ("metric", metric)):
        if SPLITTER in value or "/" in value or not value:
            return f"{label} {value!r} contains '_' or '/' (LEMUR splits its folder names on '_')"
    return None


def _records(conn: sqlite3.Connection, row: tuple[Any, ...]) -> dict[float, dict[str, Any]]:
    run_id, uid, task, dataset, metric, prm_text, device, name, _, transform = row
    prm = json.loads(prm_text) if prm_text else {}
    if transform and not prm.get("transform"):
        prm["transform"] = transform
    if not prm.get("transform"):
        return {}  # LEMUR's importer needs each record's transform: the whole file would be skipped
    lemur_uid = codehash.lemur_id(uid)
    out = {}
    for epoch, accuracy, loss, duration_ns in conn.execute(
            "SELECT epoch, accuracy, loss, duration_ns FROM point WHERE run_id=? AND accuracy IS NOT NULL "
            "ORDER BY epoch", (run_id,)):
        if lemur_stats.is_whole_epoch(epoch):
            out[epoch] = lemur_stats.record(prm=prm, uid=lemur_uid, task=task, dataset=dataset, metric=metric,
                                            model=name, accuracy=accuracy, duration_ns=duration_ns, loss=loss,
                                            device=device)
    return out


def export_lemur(zoo: str | Path | None, out: str | Path, filters: Filters | None = None, *,
                 statuses: tuple[str, ...] = (RunStatus.SUCCEEDED,), include_imported: bool = False) -> ExportReport:
    """Write the selected runs under `out` (see the module doc); returns what was written and skipped."""
    root = Path(out) / "ab" / "nn"
    report = ExportReport(out=str(out))
    path = connection.resolve_zoo_path(zoo)
    if not path.exists():
        raise FileNotFoundError(f"No zoo at {path}. Pass --zoo PATH or set LEMUR_ZOO to an existing zoo file.")
    conn = connection.connect_sync(path, readonly=True)
    conn.row_factory = None
    by_config: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    code: dict[str, str] = {}
    try:
        conn.execute("BEGIN")
        sql, args = _runs_sql(filters or Filters(), tuple(statuses), include_imported)
        for row in conn.execute(sql, args).fetchall():
            problem = _unsafe_part(row[7], row[2], row[3], row[4])
            records = {} if problem else _records(conn, row)
            if problem or not records:
                report.skip(problem or "no whole-epoch curve point, or no transform")
                continue
            config = SPLITTER.join((row[2], row[3], row[4], row[7]))
            for epoch, rec in records.items():
                by_config[config][epoch].append(rec)
            code[row[7]] = code_text(row[8])  # stored text or deflated bytes
            report.runs += 1
            report.records += len(records)
        conn.execute("COMMIT")
    finally:
        conn.close()
    _write(root, code, by_config, report)
    return report


def _write(root: Path, code: dict[str, str], by_config: dict[str, dict[float, list[dict[str, Any]]]],
           report: ExportReport) -> None:
    (root / "nn").mkdir(parents=True, exist_ok=True)
    for name, text in code.items():
        (root / "nn" / f"{name}.py").write_text(text, encoding="utf-8")
    report.models = len(code)
    for config, by_epoch in by_config.items():
        report.files += len(lemur_stats.add_records(root / "stat" / "train" / config, by_epoch))


# --- command line (wired into lemur_agent_server.cli) ------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `export-lemur` to the main CLI's subparsers."""
    p = subparsers.add_parser("export-lemur", help="write the zoo's runs as LEMUR 2.2 statistics files",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, metavar="OUT", help="folder; files go to OUT/ab/nn/{nn,stat/train}")
    p.add_argument("--zoo", default=argparse.SUPPRESS, help="zoo file (default: $LEMUR_ZOO or the user data dir)")
    p.add_argument("--task")
    p.add_argument("--dataset")
    p.add_argument("--metric")
    p.add_argument("--nn", action="append", default=[], metavar="NAME", help="model name; repeat for several")
    p.add_argument("--nn-prefix", action="append", default=[], metavar="PREFIX", help="model name prefix")
    p.add_argument("--min-accuracy", type=float, metavar="A", help="only runs whose final accuracy is >= A")
    p.add_argument("--status", action="append", choices=[s.value for s in RunStatus], metavar="STATUS",
                   help="run statuses to export; repeat for several (default: succeeded)")
    p.add_argument("--include-imported", action="store_true", help="also export runs imported from LEMUR")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    filters = Filters(task=args.task, dataset=args.dataset, metric=args.metric, nn=tuple(args.nn),
                      nn_prefix=tuple(args.nn_prefix), min_accuracy=args.min_accuracy)
    try:
        report = export_lemur(getattr(args, "zoo", None), args.out, filters,
                              statuses=tuple(args.status or (RunStatus.SUCCEEDED,)),
                              include_imported=args.include_imported)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(report), indent=1))
    return 0
