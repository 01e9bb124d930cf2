"""Fine-tuning data for code LLMs from the zoo: SFT chat records and DPO preference pairs, as JSONL.

Why these shapes: NNGPT (the generate-evaluate loop our users run) fine-tunes on chat JSONL
`{"id", "messages": [system, user, assistant], "meta"}` in train/dev/test files; the DPO pairs use the
conversational preference shape of TRL (`prompt` messages, `chosen` and `rejected` assistant turns).

What goes in, and why:
- One entry per model and task/dataset/metric: its best scored run (the run's last point, or its
  point at `epoch` when that filter is given), so a model with many trials is one example, not many.
- Duplicates removed by architecture fingerprint (models whose graphs are identical), else by the
  normalized code hash: a model trained under ten names must not be ten examples, and must not end
  up in train and test at once. Of a duplicate set the best-scoring model stays.
- Split by model, never by record: a model's hash (with the seed) puts it in train, dev or test, so
  the same model (or architecture) is never in two splits, and the split does not change when other
  models are added. DPO pairs are made inside one split, from two models of that split.
- A pair is a better and a worse model for the same task/dataset/metric whose accuracies differ by
  at least `min_gap` (the top half of the ranking against the bottom half), so "better" means more
  than noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stats.scope import no_data, runs_sql
from zoo.query import Filters
from zoo.records import code_text

SPLITS = ("train", "dev", "test")
SYSTEM_PROMPT = (
    "You write PyTorch models for the LEMUR neural network dataset. Answer with one Python file that defines "
    "`supported_hyperparameters()` and `class Net(torch.nn.Module)` with `__init__(self, in_shape, out_shape, "
    "prm, device)`, `train_setup(self, prm)`, `learn(self, train_data)` and `forward(self, x)`.")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A model's best scored run on one task/dataset/metric."""

    nn: str
    code: str
    key: str          # duplicate key: fingerprint, else normalized code hash
    task: str
    dataset: str
    metric: str
    accuracy: float
    epoch: float
    prm: dict[str, Any]
    params: int | None
    flops: int | None
    lemur_id: str


@dataclasses.dataclass
class FinetuneResult:
    path: Path
    format: str
    rows: dict[str, int]
    models: int
    duplicates_removed: int
    seconds: float = 0.0

    def describe(self) -> str:
        counts = ", ".join(f"{s} {self.rows.get(s, 0):,}" for s in SPLITS)
        return (f"Wrote {self.path} ({self.format}: {counts} records from {self.models:,} models; "
                f"{self.duplicates_removed:,} duplicate models removed) in {self.seconds:.1f} s")


def _entries(conn: sqlite3.Connection, f: Filters) -> list[Entry]:
    runs, args = runs_sql(f)
    sql = (f"SELECT m.name, m.code, COALESCE(m.fingerprint, 'code:' || m.code_hash), r.task, r.dataset, r.metric, "
           f"r.accuracy, r.epoch, r.prm, m.params, m.flops, m.lemur_id FROM {runs} r JOIN model m ON m.id = r.model_id "
           f"ORDER BY m.name, r.task, r.dataset, r.metric, r.accuracy DESC, r.run_id")
    best: dict[tuple[str, str, str, str], Entry] = {}
    for row in conn.execute(sql, args):
        k = (row[0], row[3], row[4], row[5])
        if k not in best:  # rows come best first per model and triple
            best[k] = Entry(row[0], code_text(row[1]), row[2], row[3], row[4], row[5], float(row[6]), float(row[7]),
                            json.loads(row[8]) if row[8] else {}, row[9], row[10], row[11])
    return list(best.values())


def deduplicate(entries: Iterable[Entry]) -> tuple[list[Entry], int]:
    """Keep the entries of one model per duplicate key: the one with the best accuracy (then name)."""
    entries = list(entries)
    top: dict[str, tuple[float, str]] = {}
    for e in entries:
        rank = (-e.accuracy, e.nn)
        if e.key not in top or rank < top[e.key]:
            top[e.key] = rank
    kept = [e for e in entries if top[e.key][1] == e.nn]
    return kept, len({e.nn for e in entries}) - len({e.nn for e in kept})


def split_of(nn: str, seed: int, fractions: tuple[float, float]) -> str:
    """train/dev/test for a model, from a hash of (seed, name): stable, and independent of other models."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\x1f{nn}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < fractions[0] else "dev" if u < fractions[0] + fractions[1] else "test"


def _prompt(e: Entry, target: bool) -> list[dict[str, str]]:
    lines = [f"Task: {e.task}", f"Dataset: {e.dataset}", f"Metric: {e.metric}"]
    if target:
        lines.append(f"Target {e.metric}: {e.accuracy:.4f} after {e.epoch:g} epochs")
        lines.append(f"Hyperparameters: {json.dumps(e.prm, sort_keys=True)}")
    lines.append("Write the model file.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def _meta(e: Entry, split: str) -> dict[str, Any]:
    return {"nn": e.nn, "nn_id": e.lemur_id, "task": e.task, "dataset": e.dataset, "metric": e.metric,
            "accuracy": e.accuracy, "epoch": e.epoch, "prm": e.prm, "params": e.params, "flops": e.flops,
            "split": split}


def sft_records(entries: list[Entry], split: dict[str, str]) -> Iterable[tuple[str, dict[str, Any]]]:
    for e in entries:
        yield split[e.nn], {"id": f"{e.nn}|{e.task}|{e.dataset}|{e.metric}",
                            "messages": [*_prompt(e, True), {"role": "assistant", "content": e.code}],
                            "meta": _meta(e, split[e.nn])}


def dpo_records(entries: list[Entry], split: dict[str, str], min_gap: float
                ) -> Iterable[tuple[str, dict[str, Any]]]:
    groups: dict[tuple[str, str, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        groups[(split[e.nn], e.task, e.dataset, e.metric)].append(e)
    for (part, *_), group in sorted(groups.items()):
        ranked = sorted(group, key=lambda e: (-e.accuracy, e.nn))
        half = (len(ranked) + 1) // 2
        for better, worse in zip(ranked[:half], ranked[half:]):
            if better.accuracy - worse.accuracy < min_gap:
                continue
            yield part, {"id": f"{better.nn}>{worse.nn}|{better.task}|{better.dataset}|{better.metric}",
                         "prompt": _prompt(better, False),
                         "chosen": [{"role": "assistant", "content": better.code}],
                         "rejected": [{"role": "assistant", "content": worse.code}],
                         "meta": {"task": better.task, "dataset": better.dataset, "metric": better.metric,
                                  "split": part, "chosen": _meta(better, part), "rejected": _meta(worse, part),
                                  "chosen_accuracy": better.accuracy, "rejected_accuracy": worse.accuracy}}


def _write_splits(out: Path, records: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """`out/{train,dev,test}.jsonl`, each written to a temporary name and renamed when complete."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f".{s}.jsonl.part" for s in SPLITS}
    handles = {s: open(p, "w", encoding="utf-8") for s, p in tmp.items()}  # noqa: SIM115 (closed below)
    rows = dict.fromkeys(SPLITS, 0)
    try:
        for part, rec in records:
            handles[part].write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            rows[part] += 1
    finally:
        for h in handles.values():
            h.close()
    for s, p in tmp.items():
        os.replace(p, out / f"{s}.jsonl")
    return rows


def write_finetune(conn: sqlite3.Connection, out: Path | str, fmt: str, f: Filters, *, seed: int = 0,
                   fractions: tuple[float, float] = (0.8, 0.1), min_gap: float = 0.05) -> FinetuneResult:
    """Write `fmt` ("sft-jsonl" or "dpo-jsonl") for the runs `f` selects into the folder `out`.

    `fractions`: the train and dev shares (test gets the rest). Raises StatsError (NoData) when the
    filters select no scored run.
    """
    t0 = time.perf_counter()
    entries, removed = deduplicate(_entries(conn, f))
    if not entries:
        raise no_data(f)
    split = {e.nn: split_of(e.nn, seed, fractions) for e in entries}
    records = sft_records(entries, split) if fmt == "sft-jsonl" else dpo_records(entries, split, min_gap)
    rows = _write_splits(Path(out), records)
    return FinetuneResult(Path(out), fmt, rows, len(split), removed, time.perf_counter() - t0)
