"""Import LEMUR nn-dataset statistics and model code into the zoo.

Input is a LEMUR checkout (a directory holding `ab/nn/`) or an nn-dataset wheel (`.whl`, a zip with
`ab/nn/...` at its root; members are read one by one, nothing is extracted). Read:

- `ab/nn/nn/<nn>.py`: model code, one zoo `Model` per file (origin `lemur`).
- `ab/nn/stat/train/<task>_<dataset>_<metric>_<nn>/<epoch>.json` (and the older `ab/nn/stat/<config>/`
  layout): each file is a JSON list of trial records after `<epoch>` epochs, in the flat 2.1.2 shape or
  the newer shape with a nested (or flattened) `train_stat`.

Why runs and not records: LEMUR writes one record per trial per epoch file, so one training run is
spread over the epoch files of its config. The zoo keeps it as ONE run whose curve points are those
epochs. The grouping rule, per config (see `group_trials`):

1. A record whose `uid` occurs in two or more epoch files of the config belongs to the run of that uid
   (2.1.2: a trial's uid is stable across its epochs).
2. Any other record (its uid occurs in one epoch file only, or it has none) belongs to the run of its
   hyperparameters: every scalar key except the per-epoch ones (`uid, duration, accuracy, epoch,
   train_stat, duration_seconds, metric_*`, the flattened `train_stat` fields, and the config's own
   `task/dataset/metric/model`). This undoes the 2.2.11 regression in which the uid changes every epoch,
   and leaves a one-epoch trial on its own.
3. Two records of one group at the same epoch (a repeated trial with identical hyperparameters) are
   told apart by their order in the epoch file: the k-th record of a group in every file goes to the
   group's k-th run.

A run is named `lemur:<config>:<key>`, where the key is the trial uid when all its records carry the
same uid, else `prm-<hash of the hyperparameters>`; a name repeated within a config gets `#2`, `#3`.
The names depend on the files only, so importing the same tree twice (or the checkout and then its
wheel) adds nothing: the store is idempotent on run uid and model name. Runs already in the zoo are not
updated when the stat files later grow; a re-import only adds runs it has not seen.

Why streaming, in one bulk transaction: the 2.1.2 wheel has 10,483 model files and 578,595 records in
105,447 files. Only the list of file names is held; a second thread parses the next models' configs
while the previous one is written, and the whole import is one transaction of `executemany` batches
with the point indexes rebuilt at the end (zoo.bulk_load): readers see all of it or none of it.

A LEMUR 2.2 database (`db/ab.nn.db`) goes to lemur_db_import instead, with the same run uids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import time
import zipfile
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio

from lemur_agent_server.code_hashing import CodeHasher
from lemur_agent_server.lemur_db_source import find_database
from zoo.bulk_load import BulkWriter
from zoo.records import Model, Point, Run, accuracy_to_time, is_number
from zoo.store import ZooStore

Progress = Callable[[int, int], None]

MAX_PROBLEMS = 100
SOURCE = "lemur-import"
STATUS = "imported"
ORIGIN = "lemur"

# 1 / number of classes (LEMUR's MINIMUM_ACCURACY for classification loaders); other datasets: 0.0.
CHANCE: dict[str, float] = {
    "cifar-10": 0.1,
    "cifar-100": 0.01,
    "mnist": 0.1,
    "svhn": 0.1,
    "imagenette": 0.1,
    "places365": 1 / 365,
    "celeba-gender": 0.5,
    "imagenet": 0.001,
    "imagenet100": 0.01,
}

# Dataset names that contain `_` and would otherwise be split in two by the config splitter.
UNDERSCORE_DATASETS: tuple[str, ...] = ("imdb_wiki",)

# Keys of a record that change every epoch or repeat the config; never hyperparameters.
TRAIN_STAT_FIELDS = frozenset({
    "train_loss", "test_loss", "train_accuracy", "gradient_norm", "samples_per_second", "best_accuracy",
    "best_epoch", "cpu_count", "cpu_type", "cpu_usage_percent", "total_ram_kb", "occupied_ram_kb",
    "ram_usage_percent", "gpu_type", "gpu_memory_kb", "gpu_total_memory_kb", "occupied_gpu_memory_kb",
    "gpu_memory_usage_percent",
})
# What reading one file may raise: I/O, bad UTF-8 or JSON, a corrupt zip member, absurd nesting.
READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, zlib.error, RecursionError)
NOT_HYPERPARAMETERS = frozenset({
    "uid", "duration", "accuracy", "epoch", "train_stat", "duration_seconds", "layer_stat",
    "task", "dataset", "metric", "model", "nn",
}) | TRAIN_STAT_FIELDS


# --- report ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Problem:
    """A file or directory that was (partly) skipped, and why. Paths are relative to the tree root."""

    path: str
    reason: str


@dataclasses.dataclass
class ImportReport:
    """What an import did. `problems` keeps the first MAX_PROBLEMS; `problems_total` counts all."""

    models_added: int = 0
    models_existing: int = 0
    runs_added: int = 0
    runs_existing: int = 0
    points_added: int = 0
    configs: int = 0             # stat directories with a readable config name
    files: int = 0               # stat JSON files read
    code_files: int = 0          # model .py files read
    records: int = 0             # trial records seen in the stat files
    skipped_records: int = 0     # records not imported (no accuracy, not an object, no model code)
    configs_without_code: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    problems_total: int = 0
    seconds: float = 0.0
    source: str = "lemur-files"  # lemur-files (a checkout or wheel) | lemur-db (a 2.2 ab.nn.db)
    train_points: int = 0        # curve points that got training diagnostics (2.2 database: train_stat)
    extras: dict[str, int] = dataclasses.field(default_factory=dict)  # side-table rows added, by table
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase, for bench/import.py

    def phase_clock(self) -> Callable[[str], None]:
        """`clock(name)` adds the seconds since the previous call (or this one) to `phases[name]`."""
        last = [time.perf_counter()]

        def clock(name: str) -> None:
            now = time.perf_counter()
            self.phases[name] = round(self.phases.get(name, 0.0) + now - last[0], 2)
            last[0] = now
        return clock

    def add_problem(self, path: str, reason: str) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(path, reason))

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"records_per_second": round(self.records_per_second, 1)}


# --- config names --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConfigName:
    task: str
    dataset: str
    metric: str
    nn: str


def parse_config(config: str) -> ConfigName | None:
    """Split `<task>_<dataset>_<metric>_<nn>` from the left; the rest, `_` included, is the nn name.

    Why from the left: generated model names contain `_` (`ast-layer_type-AlexNet-<md5>`) while task
    and metric never do (a metric may be a comma list, `bleu,meteor,cider`). The datasets in
    UNDERSCORE_DATASETS are matched whole. Returns None for a name that is not a config.
    """
    task, sep, rest = config.partition("_")
    if not sep:
        return None
    dataset = next((d for d in UNDERSCORE_DATASETS if rest.startswith(d + "_")), None)
    if dataset is not None:
        rest = rest[len(dataset) + 1:]
    else:
        dataset, sep, rest = rest.partition("_")
        if not sep:
            return None
    metric, sep, nn = rest.partition("_")
    if not (task and dataset and metric and nn and sep):
        return None
    return ConfigName(task, dataset, metric, nn)


def parse_epoch(stem: str) -> float | None:
    """The epoch of `<epoch>.json`; None if the name is not a finite, non-negative number."""
    try:
        epoch = float(stem)
    except ValueError:
        return None
    return epoch if math.isfinite(epoch) and epoch >= 0 else None


def model_prefix(nn: str) -> str | None:
    return nn.split("-", 1)[0] if "-" in nn else None


# --- the tree: a directory or a zip -----------------------------------------------------------------------
class _Tree:
    """Read-only access to the files under the root that holds `ab/`, by posix path.

    Why an interface: a checkout and a wheel differ only in how names are listed and bytes read, so
    everything after listing is shared and the wheel path is tested by the same assertions.
    """

    def names(self) -> Iterator[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release by default."""


class _DirTree(_Tree):
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> Iterator[str]:
        """Only the depths the importer reads: `ab/nn/nn/*`, `ab/nn/stat/*/*`, `ab/nn/stat/train/*/*`.

        Why scandir and not rglob: the 2.1.2 stat tree has 105k files in 19.7k directories, and stat
        also holds unrelated trees (`run`, `nn`) that need not be walked deeper.
        """
        nn_dir = self.root / "ab" / "nn"
        yield from (f"ab/nn/nn/{name}" for name in _files(nn_dir / "nn"))
        for sub in _dirs(nn_dir / "stat"):
            yield from (f"ab/nn/stat/{sub}/{name}" for name in _files(nn_dir / "stat" / sub))
            if sub == "train":
                for config in _dirs(nn_dir / "stat" / "train"):
                    for name in _files(nn_dir / "stat" / "train" / config):
                        yield f"ab/nn/stat/train/{config}/{name}"

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


class _ZipTree(_Tree):
    """A wheel or source zip; members are read one at a time (the 2.1.2 wheel: 103 MB, ~116k members)."""

    def __init__(self, path: Path):
        self.zip = zipfile.ZipFile(path)
        base = _zip_base(self.zip.namelist())
        if base is None:
            self.zip.close()
            raise ValueError(f"{path} is a zip without an ab/nn/ tree; pass an nn-dataset wheel or checkout.")
        self.base: str = base

    def names(self) -> Iterator[str]:
        cut = len(self.base)
        for name in self.zip.namelist():
            if name.startswith(self.base) and not name.endswith("/"):
                yield name[cut:]

    def read(self, name: str) -> bytes:
        return self.zip.read(self.base + name)

    def close(self) -> None:
        self.zip.close()


def _files(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _dirs(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _zip_base(names: Iterable[str]) -> str | None:
    """The folder holding `ab/nn/` inside the zip: '' for a wheel, `<repo>-<ref>/` for a source zip."""
    for name in names:
        index = name.find("ab/nn/")
        if index == 0 or (index > 0 and name[index - 1] == "/"):
            return name[:index]
    return None


def open_tree(path: Path) -> _Tree:
    """A checkout root, its `ab/nn` folder, or a wheel/zip; anything else is a usage error."""
    path = Path(path).expanduser()
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is a file but neither a zip nor an SQLite database; pass an nn-dataset "
                             "wheel, a checkout with ab/nn/, or LEMUR 2.2's db/ab.nn.db.")
        return _ZipTree(path)
    if (path / "ab" / "nn").is_dir():
        return _DirTree(path)
    if path.name == "nn" and path.parent.name == "ab" and path.is_dir():
        return _DirTree(path.parent.parent)
    raise ValueError(f"{path} holds no ab/nn/ folder; pass a LEMUR checkout, an nn-dataset wheel, or a "
                     "LEMUR 2.2 database (db/ab.nn.db, or a folder holding it).")


# --- listing -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Config:
    name: str
    parsed: ConfigName
    files: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (epoch, tree path)


@dataclasses.dataclass
class _Listing:
    code: dict[str, str] = dataclasses.field(default_factory=dict)      # nn -> tree path of its .py
    configs: dict[str, _Config] = dataclasses.field(default_factory=dict)
    problems: list[Problem] = dataclasses.field(default_factory=list)


def list_tree(names: Iterable[str]) -> _Listing:
    """Sort the tree's file names into model code and stat files of configs; name problems reported.

    Why the old layout is matched loosely: `ab/nn/stat/` also holds `run/`, `nn/` and other non-config
    folders; a folder there counts as a config only if its name parses as one. A config present in
    both layouts is read from `stat/train/` only, so its trials are not imported twice.
    """
    listing = _Listing()
    old: dict[str, _Config] = {}
    bad_dirs: set[str] = set()
    for name in names:
        parts = name.split("/")
        if parts[:3] != ["ab", "nn", "nn"] and parts[:3] != ["ab", "nn", "stat"]:
            continue
        if parts[2] == "nn":
            if len(parts) == 4 and parts[3].endswith(".py") and not parts[3].startswith("__"):
                listing.code[parts[3][:-3]] = name
            continue
        if len(parts) == 6 and parts[3] == "train":
            _add_stat_file(listing, listing.configs, parts[4], name, bad_dirs)
        elif len(parts) == 5 and parts[3] != "train":
            _add_stat_file(listing, old, parts[3], name, None)
    for config, entry in old.items():
        if config in listing.configs:
            listing.problems.append(Problem(f"ab/nn/stat/{config}",
                                            "also in ab/nn/stat/train/; this older copy skipped"))
        else:
            listing.configs[config] = entry
    return listing


def _add_stat_file(listing: _Listing, configs: dict[str, _Config], config: str, name: str,
                   bad_dirs: set[str] | None) -> None:
    """File a stat file under its config; `bad_dirs` is None where non-config folders are expected."""
    if not name.endswith(".json"):
        return
    entry = configs.get(config)
    if entry is None:
        parsed = parse_config(config)
        if parsed is None:
            directory = name.rsplit("/", 1)[0]
            if bad_dirs is not None and directory not in bad_dirs:
                bad_dirs.add(directory)
                listing.problems.append(Problem(directory, "not a <task>_<dataset>_<metric>_<nn> config "
                                                           "name; folder skipped"))
            return
        entry = configs[config] = _Config(config, parsed)
    epoch = parse_epoch(name.rsplit("/", 1)[1][:-5])
    if epoch is None:
        listing.problems.append(Problem(name, "not an <epoch>.json file name; file skipped"))
        return
    entry.files.append((epoch, name))


@dataclasses.dataclass
class _Work:
    """One model: its code file (None when missing) and its configs. One transaction in the store."""

    nn: str
    code_path: str | None
    configs: list[_Config]

    @property
    def file_count(self) -> int:
        return sum(len(c.files) for c in self.configs) + (self.code_path is not None)


def plan_work(listing: _Listing, code_only_models: bool) -> list[_Work]:
    """Work items sorted by model name: every nn with stats, plus code-only models if asked."""
    by_nn: dict[str, list[_Config]] = defaultdict(list)
    for config in listing.configs.values():
        config.files.sort()
        by_nn[config.parsed.nn].append(config)
    names = set(by_nn) | (set(listing.code) if code_only_models else set())
    return [_Work(nn, listing.code.get(nn), sorted(by_nn.get(nn, []), key=lambda c: c.name))
            for nn in sorted(names)]


# --- records and grouping -------------------------------------------------------------------------------
@dataclasses.dataclass
class TrialRecord:
    """One parsed stat record: the trial after `epoch` epochs."""

    epoch: float
    uid: str | None
    hyper: dict[str, Any]
    point: Point
    device: str | None = None
    order: int = 0  # position in its epoch file

    @property
    def hyper_key(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.hyper.items()))


# What JSON and SQLite hand back as scalars; compared by exact type (a set lookup, no isinstance chain:
# this runs for every key of every one of the 578k records).
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def hyperparameters(record: dict[str, Any]) -> dict[str, Any]:
    """The scalar hyperparameters of a record (LEMUR drops dict and list values the same way)."""
    return {k: v for k, v in record.items()
            if type(v) in _SCALAR_TYPES and k not in NOT_HYPERPARAMETERS and not k.startswith("metric_")}


def prm_hash(hyper: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(hyper, sort_keys=True, default=str).encode()).hexdigest()[:32]


def parse_record(record: Any, epoch: float, chance: float, order: int = 0) -> TrialRecord | None:
    """A record with a numeric accuracy, or None (the caller counts and reports it)."""
    if not isinstance(record, dict) or not is_number(record.get("accuracy")):
        return None
    accuracy = float(record["accuracy"])
    duration = record.get("duration")
    duration_ns = int(duration) if is_number(duration) and duration >= 0 else None
    train_stat = record.get("train_stat") if isinstance(record.get("train_stat"), dict) else record
    loss = train_stat.get("train_loss")
    device = train_stat.get("gpu_type")
    uid = record.get("uid")
    return TrialRecord(
        epoch=epoch,
        uid=str(uid) if uid not in (None, "") else None,
        hyper=hyperparameters(record),
        point=Point(epoch=epoch, accuracy=accuracy, duration_ns=duration_ns,
                    loss=float(loss) if is_number(loss) else None,
                    accuracy_to_time=accuracy_to_time(accuracy, chance, duration_ns)),
        device=device if isinstance(device, str) and device else None,
        order=order,
    )


def group_trials(records: Sequence[TrialRecord]) -> list[tuple[str, list[TrialRecord]]]:
    """Group one config's records into runs: `[(key, records by epoch)]`; the rule is in the module doc."""
    uid_epochs: dict[str, set[float]] = defaultdict(set)
    for r in records:
        if r.uid is not None:
            uid_epochs[r.uid].add(r.epoch)
    groups: dict[tuple[str, Any], list[TrialRecord]] = {}
    for r in sorted(records, key=lambda r: (r.epoch, r.order)):
        if r.uid is not None and len(uid_epochs[r.uid]) > 1:
            key: tuple[str, Any] = ("uid", r.uid)
        else:
            key = ("prm", r.hyper_key)
        groups.setdefault(key, []).append(r)
    runs: list[tuple[str, list[TrialRecord]]] = []
    used: set[str] = set()
    for group in groups.values():
        for lane in _lanes(group):
            runs.append((_unique(_run_key(lane), used), lane))
    return runs


def _lanes(group: list[TrialRecord]) -> list[list[TrialRecord]]:
    """Split a group so that each lane has at most one record per epoch (k-th record -> k-th lane)."""
    lanes: list[list[TrialRecord]] = []
    seen: dict[float, int] = defaultdict(int)
    for r in group:
        lane = seen[r.epoch]
        seen[r.epoch] += 1
        if lane == len(lanes):
            lanes.append([])
        lanes[lane].append(r)
    return lanes


def _run_key(lane: list[TrialRecord]) -> str:
    uids = {r.uid for r in lane}
    if len(uids) == 1 and None not in uids:
        return str(lane[0].uid)
    return "prm-" + prm_hash(lane[0].hyper)


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}#{n}"
    used.add(candidate)
    return candidate


def build_run(config: _Config, key: str, lane: list[TrialRecord]) -> Run:
    first = lane[0]
    transform = first.hyper.get("transform")
    return Run(
        uid=f"lemur:{config.name}:{key}",
        task=config.parsed.task, dataset=config.parsed.dataset, metric=config.parsed.metric,
        status=STATUS, source=SOURCE, prm=dict(first.hyper),
        transform=transform if isinstance(transform, str) else None,
        device=next((r.device for r in lane if r.device), None),
        points=[r.point for r in lane],
    )


# --- one model's batch (runs in a worker thread) -----------------------------------------------------------
@dataclasses.dataclass
class _Batch:
    model: Model | None
    runs: list[Run]
    configs: int = 0
    files: int = 0
    code_files: int = 0
    records: int = 0
    skipped: int = 0
    configs_without_code: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)


def _read_config(tree: _Tree, config: _Config, batch: _Batch) -> list[TrialRecord]:
    """All valid records of a config; bad files and records go to the batch's problems and counts."""
    chance = CHANCE.get(config.parsed.dataset, 0.0)
    records: list[TrialRecord] = []
    for epoch, name in config.files:
        batch.files += 1
        try:
            data = json.loads(tree.read(name))
        except READ_ERRORS as exc:
            batch.problems.append(Problem(name, f"unreadable JSON ({type(exc).__name__}: {exc}); file skipped"))
            continue
        items = data if isinstance(data, list) else [data]
        parsed = [parse_record(item, epoch, chance, order) for order, item in enumerate(items)]
        bad = sum(p is None for p in parsed)
        batch.records += len(items)
        if bad:
            batch.skipped += bad
            batch.problems.append(Problem(name, f"{bad} of {len(items)} records have no numeric accuracy "
                                                "or are not objects; skipped"))
        records.extend(p for p in parsed if p is not None)
    return records


def _read_code(tree: _Tree, work: _Work, batch: _Batch) -> str | None:
    if work.code_path is None:
        return None
    batch.code_files += 1
    try:
        return tree.read(work.code_path).decode("utf-8")
    except READ_ERRORS as exc:
        batch.problems.append(Problem(work.code_path, f"unreadable model code ({exc}); model skipped"))
        return None


def build_batch(tree: _Tree, work: _Work) -> _Batch:
    """Read one model's code and configs and turn them into a Model with its runs."""
    batch = _Batch(model=None, runs=[])
    code = _read_code(tree, work, batch)
    if code is not None:
        batch.model = Model(name=work.nn, code=code, origin=ORIGIN, prefix=model_prefix(work.nn))
    for config in work.configs:
        batch.configs += 1
        records = _read_config(tree, config, batch)
        if batch.model is None:
            batch.configs_without_code += 1
            batch.skipped += len(records)
            batch.problems.append(Problem(
                config.files[0][1].rsplit("/", 1)[0] if config.files else config.name,
                f"no readable model code ab/nn/nn/{work.nn}.py; {len(records)} records skipped"))
            continue
        batch.runs.extend(build_run(config, key, lane) for key, lane in group_trials(records))
    return batch


# --- writing ---------------------------------------------------------------------------------------------
def _batches(tree: _Tree, plan: list[_Work], lookahead: int = 4) -> Iterator[_Batch]:
    """`build_batch` of each work item, parsed up to `lookahead` items ahead in a second thread, so the
    files are read while the previous model is written (sqlite3 releases the GIL while it writes)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[Future[_Batch]] = deque()
        items = iter(plan)
        for work in itertools.islice(items, lookahead):
            pending.append(pool.submit(build_batch, tree, work))
        while pending:
            batch = pending.popleft().result()
            work_next = next(items, None)
            if work_next is not None:
                pending.append(pool.submit(build_batch, tree, work_next))
            yield batch


def _count(batch: _Batch, report: ImportReport) -> None:
    for name in ("configs", "files", "code_files", "records", "configs_without_code"):
        setattr(report, name, getattr(report, name) + getattr(batch, name))
    report.skipped_records += batch.skipped
    for problem in batch.problems:
        report.add_problem(problem.path, problem.reason)


def _write(writer: BulkWriter, batch: _Batch, report: ImportReport, new_models: list[tuple[int, str, str]],
           hasher: CodeHasher) -> None:
    """One model and its runs into the bulk transaction; counts what was new. A new model's row waits in
    `new_models` for its code hash (computed meanwhile by `hasher`, in other processes)."""
    _count(batch, report)
    model = batch.model
    if model is None:
        return
    existing = writer.models.get(model.name)
    if existing is None:
        model_id = writer.reserve_model(model.name)
        new_models.append((model_id, model.name, model.code))
        hasher.add(model.code)
        report.models_added += 1
    else:
        model_id = existing[0]
        report.models_existing += 1
        if writer.has_other_code(model.name, model.code):
            origin = writer.conn.execute("SELECT origin FROM model WHERE id=?", (model_id,)).fetchone()[0]
            report.add_problem(f"ab/nn/nn/{model.name}.py",
                               f"the zoo already has a {origin} model of this name with other "
                               "code; its code was kept and the imported runs were attached to it")
    for run in batch.runs:
        if writer.add_imported_run(run, model_id):
            report.runs_added += 1
            report.points_added += len(run.points)
        else:
            report.runs_existing += 1


def _finish_models(writer: BulkWriter, new_models: list[tuple[int, str, str]], hasher: CodeHasher) -> None:
    writer.add_models([(model_id, name, code, code_hash, lemur_id, model_prefix(name), ORIGIN)
                       for (model_id, name, code), (code_hash, lemur_id)
                       in zip(new_models, hasher.results(), strict=True)])


def import_tree(zoo_path: str | Path | None, path: str | Path, progress: Progress | None = None, *,
                code_only_models: bool = True) -> ImportReport:
    """The file importer, synchronous: a checkout or wheel into the zoo in one bulk transaction
    (zoo.bulk_load); see `import_lemur` for the arguments."""
    started = time.perf_counter()
    report = ImportReport()
    tree = open_tree(Path(path))
    writer: BulkWriter | None = None
    hasher = CodeHasher()
    try:
        listing = list_tree(tree.names())
        for problem in listing.problems:
            report.add_problem(problem.path, problem.reason)
        plan = plan_work(listing, code_only_models)
        total = sum(w.file_count for w in plan)
        done = 0
        if progress:
            progress(0, total)
        writer = BulkWriter.open(zoo_path)
        writer.begin(run_uid_prefix="lemur:")
        clock = report.phase_clock()
        new_models: list[tuple[int, str, str]] = []
        for batch in _batches(tree, plan):
            _write(writer, batch, report, new_models, hasher)
            done += batch.files + batch.code_files
            if progress:
                progress(done, total)
        clock("records")
        _finish_models(writer, new_models, hasher)
        clock("model hashes")
        writer.commit(clock)
    except BaseException:
        if writer is not None:
            writer.rollback()
        raise
    finally:
        if writer is not None:
            writer.close()
        hasher.close()
        tree.close()
    report.seconds = time.perf_counter() - started
    return report


async def import_lemur(store: ZooStore, path: str | Path, progress: Progress | None = None, *,
                       code_only_models: bool = True) -> ImportReport:
    """Import a LEMUR checkout, nn-dataset wheel or 2.2 database at `path` into `store`; see the module doc.

    A LEMUR 2.2 `ab.nn.db` (or a folder holding `db/ab.nn.db` and no statistics files) goes to
    `lemur_db_import`. Either way the import runs in a worker thread on its own connection to the
    store's file, as one bulk transaction (zoo.bulk_load).
    `progress(done, total)` is called as it goes (files for a tree, records for a database).
    With `code_only_models`, model files without any statistics are imported too, so that code
    lookups and duplicate checks see the whole LEMUR zoo. Bad files and rows are reported, never fatal;
    only a path that is neither a checkout, a zip nor a LEMUR database raises ValueError.
    """
    database = await anyio.to_thread.run_sync(find_database, Path(path))
    if database is not None:
        from lemur_agent_server.lemur_db_import import import_database
        return await anyio.to_thread.run_sync(import_database, store.path, database, progress)
    return await anyio.to_thread.run_sync(
        functools.partial(import_tree, store.path, path, progress, code_only_models=code_only_models))


def import_lemur_sync(zoo_path: str | Path | None, path: str | Path,
                      progress: Progress | None = None) -> ImportReport:
    """Blocking entry point for the CLI and scripts (no event loop, no async store): a 2.2 database or
    a checkout/wheel, into the zoo at `zoo_path`."""
    database = find_database(Path(path))
    if database is not None:
        from lemur_agent_server.lemur_db_import import import_database
        return import_database(zoo_path, database, progress)
    return import_tree(zoo_path, path, progress)
