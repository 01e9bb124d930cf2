"""LEMUR 2.2's statistics files, written by us: `<dir>/<epoch>.json`, each a JSON list of trial records.

Why its own module: `check_nn(save_path=...)` and `export-lemur` write the same records, and LEMUR's
importer (and ours, lemur_agent_server.lemur_import) must read them back. Facts about the format, from
LEMUR 2.2.11 (`Train.train_n_eval`, `db/Calc.save_results`):

- one file per epoch, named by the epoch number (`1.json`, `2.json`, ...); a file holds every trial of
  that config after that many epochs, sorted by accuracy (best first); a new trial is added to the list
  already in the file, never replacing it;
- a record is the trial's hyperparameters (flat: `lr`, `batch`, `transform`, `epoch`, ...) plus `uid`,
  `accuracy`, `duration` (cumulative ns), `duration_seconds`, `metric_<name>`, `task`, `dataset`,
  `metric`, `model`, and a nested `train_stat` with per-epoch diagnostics. LEMUR's importer stores the
  known `train_stat` fields and ignores others, so what we add there (`device`) does not disturb it,
  whereas a new top-level scalar would be taken for a hyperparameter.

We know less per epoch than LEMUR measures (no train accuracy, no throughput, no RAM figures): those
fields are left out rather than written as zeros.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# keys that belong to the record, not to the hyperparameters: never copied from a run's prm
RECORD_KEYS = frozenset({"uid", "accuracy", "duration", "duration_seconds", "train_stat", "task", "dataset",
                         "metric", "model", "layer_stat"})


def epoch_file_name(epoch: float) -> str:
    """`2.json` for epoch 2.0; a half epoch keeps its fraction (`0.5.json`, which our importer reads)."""
    return f"{int(epoch)}.json" if float(epoch).is_integer() else f"{epoch:g}.json"


def is_whole_epoch(epoch: float) -> bool:
    return math.isfinite(epoch) and float(epoch).is_integer() and epoch >= 1


def record(*, prm: Mapping[str, Any], uid: str, task: str, dataset: str, metric: str, model: str,
           accuracy: float, duration_ns: int | None, loss: float | None = None,
           device: str | None = None) -> dict[str, Any]:
    """One trial after one epoch, in LEMUR's shape (see the module doc)."""
    out: dict[str, Any] = {k: v for k, v in prm.items() if k not in RECORD_KEYS and not k.startswith("metric_")}
    out.update(uid=uid, accuracy=accuracy)
    if duration_ns is not None:
        out.update(duration=int(duration_ns), duration_seconds=round(duration_ns / 1e9, 2))
    out[f"metric_{metric}"] = accuracy
    out.update(task=task, dataset=dataset, metric=metric, model=model)
    train_stat = {"train_loss": loss, "device": device}
    train_stat = {k: v for k, v in train_stat.items() if v is not None}
    if train_stat:
        out["train_stat"] = train_stat
    return out


def _read_list(path: Path) -> list[dict[str, Any]]:
    """The records already in a file; a file we cannot read as a list is an error, never overwritten."""
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict)]


def _write_atomic(path: Path, items: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(items, handle, indent=4, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_records(directory: str | os.PathLike[str], by_epoch: Mapping[float, Iterable[dict[str, Any]]]) -> list[Path]:
    """Add records to `<directory>/<epoch>.json` as LEMUR does: appended, the list sorted best first.

    A record whose uid is already in the file replaces that one, so writing the same run twice (an
    export repeated into the same folder) leaves one copy. Returns the files written.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for epoch in sorted(by_epoch):
        path = folder / epoch_file_name(epoch)
        new = list(by_epoch[epoch])
        fresh = {r.get("uid") for r in new}
        items = [r for r in _read_list(path) if r.get("uid") not in fresh] + new
        items.sort(key=lambda r: r.get("accuracy") if isinstance(r.get("accuracy"), (int, float)) else -1.0,
                   reverse=True)
        _write_atomic(path, items)
        written.append(path)
    return written
