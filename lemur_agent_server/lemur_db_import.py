"""Import a LEMUR 2.2 database (`db/ab.nn.db`) into the zoo, in one pass and one transaction.

What lands where (the schema facts are in lemur_db_source):
- every `nn` row is a zoo model (origin `lemur`), with or without records;
- `stat` rows are grouped into runs exactly as the 2.1 file importer groups its records
  (`lemur_import.group_trials`: a uid seen at several epochs is one trial; a uid seen once is grouped
  by its hyperparameters, undoing 2.2.11's per-epoch uids), and the run uids are the file importer's
  (`lemur:<task>_<dataset>_<metric>_<nn>:<uid>`), so a database built from the 2.1 files and the files
  themselves import to the same runs, and a second import adds nothing;
- a trial's `prm` rows become the run's JSON once (`transform` kept, `epoch` and other per-record keys
  dropped, as `lemur_import.hyperparameters` does); stat's own transform column fills a missing one;
- `train_stat` goes to the curve point (train loss as the point's loss, test loss, train accuracy,
  gradient norm, samples/s, the per-epoch cpu/ram/gpu usage) and the hardware once per run (`hardware`,
  each distinct machine once, `run_hardware`; its GPU is the run's device);
- `nn_stat`, `run`, `tflite`, `prun` are copied into `lemur_*` tables (lemur_db_extras), and nn_stat's
  parameter count and FLOPs fill the models' empty `params`/`flops`.

Why one transaction with indexes rebuilt at the end (zoo.bulk_load): that is what makes 578k records
fit in the time budget; readers see the zoo before or after the import, never half of it.
Bad rows (no numeric accuracy or epoch, a model without code) are counted and reported, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from itertools import groupby
from pathlib import Path
from typing import Any

from lemur_agent_server import lemur_db_extras
from lemur_agent_server.code_hashing import CodeHasher
from lemur_agent_server.lemur_db_source import HARDWARE_COLUMNS, TRAIN_COLUMNS, USAGE_COLUMNS, LemurDatabase
from lemur_agent_server.lemur_import import (
    CHANCE,
    ORIGIN,
    SOURCE,
    STATUS,
    ConfigName,
    ImportReport,
    TrialRecord,
    group_trials,
    hyperparameters,
    model_prefix,
)
from zoo.bulk_load import BulkWriter
from zoo.records import Point, accuracy_to_time

Progress = Callable[[int, int], None]
RUN_UID_PREFIX = "lemur:"
PROGRESS_EVERY = 5_000
HASH_CHUNK = 256        # records between progress calls


@dataclasses.dataclass
class DbRecord(TrialRecord):
    """A stat row as a TrialRecord, plus its train_stat values (None when it has none)."""

    train: tuple[Any, ...] | None = None
    prm_json: str = "{}"


# --- models --------------------------------------------------------------------------------------------
def import_models(db: LemurDatabase, writer: BulkWriter, report: ImportReport,
                  hasher: CodeHasher) -> Callable[[], None]:
    """Every nn row not yet in the zoo becomes a model; an existing name with other code is reported.

    Ids are reserved at once so the records can refer to them; the code hashes are computed meanwhile
    (lemur_agent_server.code_hashing) and the returned `finish()` inserts the rows.
    """
    new: list[tuple[int, str, str]] = []
    for name, code in db.models():
        report.code_files += 1
        if not isinstance(code, str) or not isinstance(name, str) or not name:
            report.add_problem(f"nn:{name}", "model code is not text; model skipped")
            continue
        existing = writer.models.get(name)
        if existing is None:
            new.append((writer.reserve_model(name), name, code))
            continue
        report.models_existing += 1
        if writer.has_other_code(name, code):
            report.add_problem(f"nn:{name}", "the zoo already has a model of this name with other code; its "
                                             "code was kept and the imported runs were attached to it")
    report.models_added += len(new)
    for _, _, code in new:
        hasher.add(code)

    def finish() -> None:
        writer.add_models([(model_id, name, code, code_hash, lemur_id, model_prefix(name), ORIGIN)
                           for (model_id, name, code), (code_hash, lemur_id)
                           in zip(new, hasher.results(), strict=True)])
    return finish


# --- records ---------------------------------------------------------------------------------------------
class HyperCache:
    """A trial's hyperparameters (and their JSON) computed once per (uid, stat transform)."""

    def __init__(self, by_uid: dict[str, dict[str, Any]]):
        self.by_uid = by_uid
        self.cache: dict[tuple[Any, Any], tuple[dict[str, Any], str]] = {}

    def get(self, uid: Any, transform: Any) -> tuple[dict[str, Any], str]:
        key = (uid, transform)
        hit = self.cache.get(key)
        if hit is None:
            hyper = hyperparameters(self.by_uid.get(uid, {}))
            if "transform" not in hyper and isinstance(transform, str) and transform:
                hyper["transform"] = transform
            hit = self.cache[key] = (hyper, json.dumps(hyper, sort_keys=True, separators=(",", ":"), default=str))
        return hit


def finite(value: Any) -> bool:
    """`zoo.records.is_number` for what SQLite returns (exactly int, float, str, bytes or None), at a
    third of its cost: it runs twice per record (`inf - inf` and `nan - nan` are NaN, never 0)."""
    kind = type(value)
    return kind is int or (kind is float and value - value == 0.0)


def bad_reason(row: tuple[Any, ...]) -> str | None:
    accuracy, epoch = row[8], row[7]
    if not finite(accuracy):
        return f"accuracy {accuracy!r} is not a finite number"
    if not finite(epoch) or epoch < 0:
        return f"epoch {epoch!r} is not a non-negative number"
    return None


def to_record(row: tuple[Any, ...], order: int, chance: float, hypers: HyperCache,
              trains: dict[str, tuple[Any, ...]]) -> DbRecord:
    """A valid stat row (see `bad_reason`) as a record, with its train_stat values from `trains`."""
    stat_id, _, _, _, _, transform, uid, epoch, accuracy, duration = row
    duration_ns = int(duration) if finite(duration) and duration >= 0 else None
    train = trains.get(stat_id)
    loss = float(train[0]) if train is not None and finite(train[0]) else None
    hyper, prm_json = hypers.get(uid, transform)
    epoch, accuracy = float(epoch), float(accuracy)
    return DbRecord(epoch=epoch, uid=str(uid) if uid not in (None, "") else None, hyper=hyper,
                    point=Point(epoch=epoch, accuracy=accuracy, duration_ns=duration_ns, loss=loss,
                                accuracy_to_time=accuracy_to_time(accuracy, chance, duration_ns)),
                    order=order, train=train, prm_json=prm_json)


@dataclasses.dataclass
class TrainLayout:
    """Where the train_stat values sit in a record's `train` tuple."""

    columns: list[str]

    def __post_init__(self) -> None:
        index = {c: i for i, c in enumerate(self.columns)}
        self.core = [index.get(c) for c in TRAIN_COLUMNS]
        self.hardware = [(c, index[c]) for c in HARDWARE_COLUMNS if c in index]
        self.usage = [index.get(c) for c in USAGE_COLUMNS]
        self.gpu = index.get("gpu_type")

    def row(self, run_id: int, record: DbRecord) -> tuple[Any, ...] | None:
        train = record.train
        if train is None:
            return None
        core = [train[i] if i is not None else None for i in self.core]
        if core[0] is not None and core[0] == record.point.loss:  # train_loss: the point's loss, stored
            core[0] = None  # there once (zoo.lemur_extras.curve_diagnostics reads it back)
        return (run_id, record.epoch, *core, *(train[i] if i is not None else None for i in self.usage))

    def hardware_json(self, lane: list[DbRecord]) -> str | None:
        for record in lane:
            if record.train is not None:
                values = {c: record.train[i] for c, i in self.hardware if record.train[i] is not None}
                if values:
                    return json.dumps(values, sort_keys=True, separators=(",", ":"))
        return None

    def device(self, lane: list[DbRecord]) -> str | None:
        if self.gpu is None:
            return None
        return next((r.train[self.gpu] for r in lane if r.train is not None
                     and isinstance(r.train[self.gpu], str) and r.train[self.gpu]), None)


def write_config(writer: BulkWriter, layout: TrainLayout, parsed: ConfigName, model_id: int,
                 records: list[DbRecord], report: ImportReport) -> None:
    """One config's records as runs with their points, diagnostics and hardware."""
    config = f"{parsed.task}_{parsed.dataset}_{parsed.metric}_{parsed.nn}"
    for key, lane in group_trials(records):
        run_id = writer.new_run_id(f"{RUN_UID_PREFIX}{config}:{key}")
        if run_id is None:
            report.runs_existing += 1
            continue
        lane_records: list[DbRecord] = lane  # type: ignore[assignment]  # group_trials keeps the subclass
        last = lane_records[-1].point
        writer.add_run((run_id, f"{RUN_UID_PREFIX}{config}:{key}", model_id, parsed.task, parsed.dataset,
                        parsed.metric, _transform(lane_records[0].hyper), lane_records[0].prm_json,
                        last.epoch, STATUS, last.accuracy, last.duration_ns, last.accuracy_to_time,
                        layout.device(lane_records), SOURCE, writer.created))
        for record in lane_records:
            p = record.point
            writer.add_point(run_id, p.epoch, model_id, parsed.task, parsed.dataset, parsed.metric,
                             p.accuracy, p.loss, p.duration_ns, p.accuracy_to_time)  # type: ignore[arg-type]
            train_row = layout.row(run_id, record)
            if train_row is not None:
                writer.add_train(train_row)
                report.train_points += 1
        hardware = layout.hardware_json(lane_records)
        if hardware is not None:
            writer.add_hardware(run_id, hardware)
        report.runs_added += 1
        report.points_added += len(lane_records)


def _transform(hyper: dict[str, Any]) -> str | None:
    value = hyper.get("transform")
    return value if isinstance(value, str) else None


def _config_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row[4], row[1], row[2], row[3]   # nn, task, dataset, metric


@dataclasses.dataclass
class _Pass:
    """State of the streaming pass over stat, for the progress bar."""

    total: int
    progress: Progress | None
    done: int = 0
    reported: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress and self.done - self.reported >= PROGRESS_EVERY:
            self.reported = self.done
            self.progress(self.done, self.total)


def import_records(db: LemurDatabase, writer: BulkWriter, report: ImportReport, state: _Pass) -> None:
    """Stream stat (ordered by config), one config at a time into runs."""
    layout = TrainLayout(db.train_columns())
    hypers = HyperCache(db.hyperparameters())
    trains = db.train_rows(layout.columns)
    for (nn, task, dataset, metric), rows in groupby(db.records(), key=_config_key):
        _import_config(writer, layout, hypers, trains, ConfigName(str(task), str(dataset), str(metric), str(nn)),
                       rows, report, state)


def _import_config(writer: BulkWriter, layout: TrainLayout, hypers: HyperCache, trains: dict[str, tuple[Any, ...]],
                   parsed: ConfigName, rows: Iterable[tuple[Any, ...]], report: ImportReport, state: _Pass) -> None:
    chance = CHANCE.get(parsed.dataset, 0.0)
    records: list[DbRecord] = []
    seen = 0
    for order, row in enumerate(rows):
        seen += 1
        reason = bad_reason(row)
        if reason is None:
            records.append(to_record(row, order, chance, hypers, trains))
        else:
            report.skipped_records += 1
            report.add_problem(f"stat:{row[0]}", f"{reason}; record skipped")
    report.records += seen
    report.configs += 1
    model = writer.models.get(parsed.nn)
    if model is None:
        report.configs_without_code += 1
        report.skipped_records += len(records)
        report.add_problem(f"stat:{parsed.task}_{parsed.dataset}_{parsed.metric}_{parsed.nn}",
                           f"no model code for {parsed.nn!r} in table nn; {len(records)} records skipped")
    elif records:
        write_config(writer, layout, parsed, model[0], records, report)
    state.advance(seen)


# --- entry point -------------------------------------------------------------------------------------------
def import_database(zoo_path: str | Path | None, db_path: str | Path,
                    progress: Progress | None = None) -> ImportReport:
    """Import the LEMUR database at `db_path` into the zoo at `zoo_path`; see the module doc.

    `progress(done, total)` counts records (stat rows) then side-table rows. Raises ValueError for an
    SQLite file that is not a LEMUR database; bad rows inside one are reported in the result.
    """
    started = time.perf_counter()
    report = ImportReport(source="lemur-db")
    db = LemurDatabase(Path(db_path))
    writer = BulkWriter.open(zoo_path)
    hasher = CodeHasher()
    try:
        total = db.count("stat")
        side = sum(db.count(t) for t in lemur_db_extras.SIDE_TABLES)
        state = _Pass(total=total + side, progress=progress)
        if progress:
            progress(0, state.total)
        writer.begin(run_uid_prefix=RUN_UID_PREFIX)
        clock = report.phase_clock()
        finish_models = import_models(db, writer, report, hasher)
        import_records(db, writer, report, state)
        clock("records")
        finish_models()
        clock("model hashes")
        report.extras = lemur_db_extras.import_side_tables(db, writer.conn, report.add_problem)
        state.advance(side)
        clock("side tables")
        writer.commit(clock)
        if progress:
            progress(state.total, state.total)
    except BaseException:
        writer.rollback()
        raise
    finally:
        hasher.close()
        writer.close()
        db.close()
    report.seconds = time.perf_counter() - started
    return report
