"""Build databases shaped like LEMUR 2.2's `db/ab.nn.db`, with our own code and our own data.

Used by the tests (a small hand-made fixture) and by bench/import.py (a synthetic database of >= 500k
records). The schema follows the facts recorded from LEMUR 2.2.11's `Init.py`/`Write.py` (see
lemur_agent_server/lemur_db_source.py): tables, column names and types, the `prm` key/value rows that
every record re-inserts (so most are duplicates), `stat.id` as an md5 over the row's values, the
`nn.id` md5 of whitespace-free code, `train_stat` 1:1 with `stat` where present. No LEMUR code or data.
"""

from __future__ import annotations

import hashlib
import random
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DDL = (
    "CREATE TABLE nn (name TEXT PRIMARY KEY, code TEXT NOT NULL, id TEXT NOT NULL)",
    "CREATE TABLE transform (name TEXT PRIMARY KEY, code TEXT NOT NULL, id TEXT NOT NULL)",
    "CREATE TABLE metric (name TEXT PRIMARY KEY, code TEXT NOT NULL, id TEXT NOT NULL)",
    "CREATE TABLE prm (uid TEXT NOT NULL, name TEXT NOT NULL, value OBJECT NOT NULL)",
    "CREATE INDEX idx_prm_uid ON prm(uid, name, value)",
    "CREATE TABLE stat (id TEXT PRIMARY KEY, accuracy REAL, epoch INTEGER, duration INTEGER, task TEXT,"
    " dataset TEXT, nn TEXT, transform TEXT, metric TEXT, prm TEXT,"
    " FOREIGN KEY (nn) REFERENCES nn (name) ON DELETE CASCADE,"
    " FOREIGN KEY (transform) REFERENCES transform (name) ON DELETE CASCADE,"
    " FOREIGN KEY (metric) REFERENCES metric (name) ON DELETE CASCADE,"
    " FOREIGN KEY (prm) REFERENCES prm (uid) ON DELETE CASCADE)",
    "CREATE INDEX idx_accuracy_desc ON stat (accuracy DESC)",
    *(f"CREATE INDEX idx_{c} ON stat ({c})" for c in ("task", "dataset", "nn", "transform", "metric", "prm")),
    "CREATE TABLE train_stat (stat_id TEXT PRIMARY KEY, train_loss REAL, test_loss REAL, train_accuracy REAL,"
    " gradient_norm REAL, samples_per_second REAL, epoch_max INTEGER, cpu_count INTEGER, cpu_type TEXT,"
    " cpu_usage_percent REAL, total_ram_kb REAL, occupied_ram_kb REAL, ram_usage_percent REAL, gpu_type TEXT,"
    " gpu_memory_kb REAL, gpu_total_memory_kb REAL, occupied_gpu_memory_kb REAL, gpu_memory_usage_percent REAL,"
    " FOREIGN KEY (stat_id) REFERENCES stat(id) ON DELETE CASCADE)",
    "CREATE TABLE run (id TEXT PRIMARY KEY, model_name TEXT NOT NULL, device_type TEXT, os_version TEXT,"
    " valid BOOLEAN, emulator BOOLEAN, error_message TEXT, duration INTEGER, iterations INTEGER, unit TEXT,"
    " cpu_duration INTEGER, cpu_min_duration INTEGER, cpu_max_duration INTEGER, cpu_std_dev REAL, cpu_error TEXT,"
    " gpu_duration INTEGER, gpu_min_duration INTEGER, gpu_max_duration INTEGER, gpu_std_dev REAL, gpu_error TEXT,"
    " npu_duration INTEGER, npu_min_duration INTEGER, npu_max_duration INTEGER, npu_std_dev REAL, npu_error TEXT,"
    " total_ram_kb INTEGER, free_ram_kb INTEGER, available_ram_kb INTEGER, cached_kb INTEGER,"
    " in_dim_0 INTEGER, in_dim_1 INTEGER, in_dim_2 INTEGER, in_dim_3 INTEGER, device_analytics_json TEXT,"
    " precision_type TEXT)",
    "CREATE TABLE tflite (id TEXT PRIMARY KEY, model_name TEXT NOT NULL, accuracy REAL, transform TEXT,"
    " precision_type TEXT)",
    "CREATE TABLE prun (id TEXT PRIMARY KEY, model_name TEXT NOT NULL, pruning_method TEXT NOT NULL,"
    " task_dataset TEXT NOT NULL, status TEXT, accuracy REAL, duration INTEGER, pruning_ratio REAL,"
    " params_before INTEGER, params_after INTEGER, params_removed INTEGER, model_size_before_kb REAL,"
    " model_size_after_kb REAL)",
    "CREATE TABLE nn_stat (id TEXT PRIMARY KEY, nn_name TEXT NOT NULL, prm_id TEXT NOT NULL, total_layers INTEGER,"
    " leaf_layers INTEGER, max_depth INTEGER, total_params INTEGER, trainable_params INTEGER,"
    " frozen_params INTEGER, flops INTEGER, model_size_mb REAL, buffer_size_mb REAL, total_memory_mb REAL,"
    " dropout_count INTEGER, has_attention INTEGER, has_residual_connections INTEGER, code_length INTEGER,"
    " meta_json TEXT, error TEXT)",
)
TRAIN_FIELDS = ("train_loss", "test_loss", "train_accuracy", "gradient_norm", "samples_per_second", "epoch_max",
                "cpu_count", "cpu_type", "cpu_usage_percent", "total_ram_kb", "occupied_ram_kb",
                "ram_usage_percent", "gpu_type", "gpu_memory_kb", "gpu_total_memory_kb",
                "occupied_gpu_memory_kb", "gpu_memory_usage_percent")


def md5(value: Any) -> str:
    return hashlib.md5(re.sub(r"\s", "", str(value)).encode()).hexdigest()


class LemurDbWriter:
    """Write rows the way LEMUR's writer lays them out (our code): `with LemurDbWriter(path) as w: ...`."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path)
        for statement in DDL:
            self.conn.execute(statement)

    def __enter__(self) -> LemurDbWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.commit()
        self.conn.close()

    def model(self, name: str, code: str) -> None:
        self.conn.execute("INSERT INTO nn(name, code, id) VALUES(?,?,?)", (name, code, md5(code)))

    def record(self, task: str, dataset: str, metric: str, nn: str, epoch: Any, prm: dict[str, Any],
               accuracy: Any, duration: Any, train: dict[str, Any] | None = None) -> str:
        """One trial after `epoch` epochs: its prm rows (all re-inserted: duplicates), its stat row and
        its train_stat row when `train` is given. `prm` holds `uid` and `transform`. Returns stat.id."""
        prm = dict(prm)
        uid = prm.pop("uid")
        self.conn.executemany("INSERT INTO prm(uid, name, value) VALUES(?,?,?)",
                              [(uid, k, v) for k, v in prm.items()])
        values = [prm.get("transform"), uid, task, dataset, metric, nn, epoch, duration, accuracy]
        stat_id = md5(values)
        self.conn.execute("INSERT OR IGNORE INTO stat(id, transform, prm, task, dataset, metric, nn, epoch,"
                          " duration, accuracy) VALUES(?,?,?,?,?,?,?,?,?,?)", (stat_id, *values))
        if train is not None:
            self.conn.execute(f"INSERT INTO train_stat(stat_id, {', '.join(TRAIN_FIELDS)}) "
                              f"VALUES(?{',?' * len(TRAIN_FIELDS)})",
                              (stat_id, *(train.get(f) for f in TRAIN_FIELDS)))
        return stat_id

    def side(self, table: str, row: dict[str, Any]) -> None:
        self.conn.execute(f"INSERT INTO {table}({', '.join(row)}) VALUES({','.join('?' * len(row))})",
                          tuple(row.values()))


# --- the synthetic database of bench/import.py -----------------------------------------------------------
TASKS: Sequence[tuple[str, str, str]] = (
    ("img-classification", "cifar-10", "acc"), ("img-classification", "cifar-100", "acc"),
    ("img-classification", "mnist", "acc"), ("img-segmentation", "coco", "iou"),
    ("img-captioning", "coco", "bleu,meteor,cider"), ("txt-generation", "wikitext", "ppl"),
)
TRANSFORMS = ("norm_256_flip", "norm_32", "echo_128", "norm_299_flip", "echo_flip")
ACTIVATIONS = ("ReLU", "GELU", "SiLU", "Tanh", "LeakyReLU", "Hardswish")


def synthetic_code(i: int, rng: random.Random) -> str:
    """A plausible model file of about 4.5 KB that zlib shrinks about 4x: the size and compressibility of
    the 2.1.2 wheel's 10,482 model files (47.4 MB, 13.7 MB deflated), so the zoo's size is realistic."""
    widths = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    lines, steps = [], []
    for k in range(1, 24):
        name = f"{rng.choice(('conv', 'stage', 'mix', 'down', 'cell'))}{k}_{rng.randint(0, 999)}"
        c_in, c_out = rng.choice(widths), rng.choice(widths)
        lines.append(f"        self.{name} = nn.Sequential(nn.Conv2d({c_in}, {c_out}, kernel_size="
                     f"{rng.choice((1, 3, 5, 7))}, stride={rng.choice((1, 2))}, padding={rng.randint(0, 3)}), "
                     f"nn.BatchNorm2d({c_out}), nn.{rng.choice(ACTIVATIONS)}())  # {rng.getrandbits(64):x}")
        steps.append(f"        x = self.{name}(x){' + x' if rng.random() < 0.3 else ''}")
    return ("import torch\nimport torch.nn as nn\n\n\ndef supported_hyperparameters():\n"
            f"    return {{'lr', 'momentum', 'dropout'}}\n\n\nclass Net(nn.Module):  # variant {i}\n"
            "    def __init__(self, in_shape, out_shape, prm, device):\n        super().__init__()\n"
            + "\n".join(lines) + f"\n        self.fc = nn.Linear({rng.randint(16, 4096)}, out_shape[0])\n\n"
            "    def forward(self, x):\n" + "\n".join(steps) + "\n        return self.fc(torch.flatten(x, 1))\n")


def build_synthetic(path: Path, records: int, models: int = 10_482, epochs: int = 13, seed: int = 0,
                    train_share: float = 0.5) -> dict[str, int]:
    """About `records` stat rows over `models` models: trials of 1..`epochs` epochs, a share of them
    with train_stat, duplicated prm rows, and nn_stat/run/prun rows for a tenth of the models.

    Why 1..13 epochs and five or six keys per trial: LEMUR's real records are ~7 per trial (the 2.1.2
    wheel's 578,595 records import as 79,701 runs; the 2.2 database's 0.38M distinct prm rows are ~5 per
    trial), and a zoo's size grows with its runs, so fewer epochs per trial would overstate it."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    written = trials = 0
    with LemurDbWriter(path) as w:
        names = [f"syn-{i:05d}-{md5(i)[:8]}" for i in range(models)]
        for i, name in enumerate(names):
            w.model(name, synthetic_code(i, rng))
        while written < records:
            name = names[trials % models]
            task, dataset, metric = TASKS[trials % len(TASKS)]
            trials += 1
            prm = {"uid": md5(("trial", trials)), "lr": round(rng.uniform(1e-4, 0.1), 6),
                   "batch": 2 ** rng.randint(4, 8),
                   "momentum": round(rng.random(), 4), "dropout": round(rng.random() / 2, 4),
                   "transform": rng.choice(TRANSFORMS)}
            if trials % 3 == 0:  # some trials carry `epoch`, LEMUR's per-record key
                prm["epoch"] = epochs
            with_train = rng.random() < train_share
            for epoch in range(1, rng.randint(1, epochs) + 1):
                train = _train_stat(rng, epoch) if with_train else None
                w.record(task, dataset, metric, name, epoch, prm, round(rng.random(), 4),
                         epoch * rng.randint(10**9, 10**11), train)
                written += 1
        for i, name in enumerate(names[::10]):
            _side_rows(w, name, i, rng)
    return {"records": written, "trials": trials, "models": models}


def _train_stat(rng: random.Random, epoch: int) -> dict[str, Any]:
    """The usage values have the precision LEMUR 2.2.11's trainer gives them (REAL columns): RAM in whole
    kB (psutil's Linux byte counts are /proc/meminfo kB times 1024), GPU memory in 0.5 kB steps (CUDA
    allocations are multiples of 512 bytes), CPU percent with one decimal (psutil rounds it)."""
    return {"train_loss": 2.0 / epoch, "test_loss": 2.1 / epoch, "train_accuracy": rng.random(),
            "gradient_norm": rng.random() * 5, "samples_per_second": rng.uniform(100, 5000), "epoch_max": 5,
            "cpu_count": 16, "cpu_type": "x86_64", "cpu_usage_percent": round(rng.uniform(0, 100), 1),
            "total_ram_kb": 65_000_000.0, "occupied_ram_kb": float(rng.randint(10**6, 6 * 10**7)),
            "gpu_type": "Synthetic GPU 24GB", "gpu_total_memory_kb": 24_000_000.0,
            "occupied_gpu_memory_kb": rng.randint(2 * 10**5, 4 * 10**7) * 0.5}


def _side_rows(w: LemurDbWriter, name: str, i: int, rng: random.Random) -> None:
    w.side("nn_stat", {"id": md5(("nn_stat", name)), "nn_name": name, "prm_id": md5(i),
                       "total_params": rng.randint(10**4, 10**8), "flops": rng.randint(10**6, 10**10),
                       "model_size_mb": rng.uniform(0.1, 400), "meta_json": '{"input": [1, 3, 32, 32]}'})
    w.side("run", {"id": md5(("run", name)), "model_name": name, "device_type": "Pixel 7", "valid": 1,
                   "duration": rng.randint(10**5, 10**8), "cpu_duration": rng.randint(10**5, 10**8),
                   "precision_type": "fp32"})
    w.side("prun", {"id": md5(("prun", name)), "model_name": name, "pruning_method": "l1_unstructured",
                    "task_dataset": "img-classification_cifar-10", "status": "ok", "accuracy": rng.random(),
                    "pruning_ratio": 0.5})
