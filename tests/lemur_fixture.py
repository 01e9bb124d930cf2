"""A small LEMUR-2.2-shaped database with filled side tables, written by our own builder
(bench/lemur_db_synth.py), and a zoo that imported it: for the readers of the imported tables
(api_tables, get_model, query_models).

What it holds:
- TinyNet: trial A on cifar-10, epochs 1-2 with train_stat (the hardware below), accuracy 0.5 / 0.7;
  two nn_stat rows (one failed measurement, one good), two mobile benchmarks (Pixel 7, Galaxy S23),
  one TFLite export, one pruning experiment.
- WideNet: trial W on cifar-10, epoch 1 without train_stat; one Pixel 7 benchmark, one pruning row,
  no nn_stat and no TFLite.
- OnlyCode: code only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lemur_agent_server.lemur_import import import_lemur_sync

GPU = "Fixture GPU 8GB"
NN_STAT_GOOD = {"id": "ns-good", "nn_name": "TinyNet", "prm_id": "pa", "total_layers": 9, "leaf_layers": 6,
                "max_depth": 3, "total_params": 1234, "trainable_params": 1200, "frozen_params": 34,
                "flops": 56789, "model_size_mb": 0.5, "buffer_size_mb": 0.01, "total_memory_mb": 0.51,
                "dropout_count": 1, "has_attention": 0, "has_residual_connections": 1, "code_length": 321,
                "meta_json": '{"input": [1, 3, 32, 32]}'}
NN_STAT_FAILED = {"id": "ns-bad", "nn_name": "TinyNet", "prm_id": "pb", "error": "CUDA out of memory"}
RUN_PIXEL = {"id": "mr-pixel", "model_name": "TinyNet", "device_type": "Pixel 7", "os_version": "14", "valid": 1,
             "emulator": 0, "duration": 1500, "iterations": 100, "unit": "us", "cpu_duration": 1500,
             "gpu_duration": 900, "total_ram_kb": 8_000_000, "in_dim_0": 1, "in_dim_1": 3, "in_dim_2": 32,
             "in_dim_3": 32, "device_analytics_json": '{"soc": "Tensor G2"}', "precision_type": "fp32"}
RUN_GALAXY = {"id": "mr-galaxy", "model_name": "TinyNet", "device_type": "Galaxy S23", "valid": 0,
              "error_message": "delegate failed", "precision_type": "int8"}
RUN_WIDE = {"id": "mr-wide", "model_name": "WideNet", "device_type": "Pixel 7", "valid": 1, "duration": 4000,
            "precision_type": "fp16"}
TFLITE = {"id": "tf-tiny", "model_name": "TinyNet", "accuracy": 0.49, "transform": "norm_32",
          "precision_type": "int8"}
PRUN_TINY = {"id": "pr-tiny", "model_name": "TinyNet", "pruning_method": "l1_unstructured",
             "task_dataset": "img-classification_cifar-10", "status": "ok", "accuracy": 0.41, "duration": 77,
             "pruning_ratio": 0.5, "params_before": 1234, "params_after": 617, "params_removed": 617,
             "model_size_before_kb": 5.0, "model_size_after_kb": 2.5}
PRUN_WIDE = {"id": "pr-wide", "model_name": "WideNet", "pruning_method": "random",
             "task_dataset": "img-classification_cifar-10", "accuracy": 0.2, "pruning_ratio": 0.9}


def train_stat(epoch: int) -> dict[str, Any]:
    return {"train_loss": 1.0 / epoch, "test_loss": 1.5 / epoch, "train_accuracy": 0.4 + epoch / 10,
            "gradient_norm": 2.0 * epoch, "samples_per_second": 500.0 * epoch, "epoch_max": 2, "cpu_count": 4,
            "cpu_type": "x86_64", "total_ram_kb": 16e6, "gpu_type": GPU, "gpu_total_memory_kb": 8e6}


def build_db(path: Path) -> Path:
    """Write the fixture database at `path` (its folder must exist)."""
    from bench.lemur_db_synth import LemurDbWriter

    with LemurDbWriter(path) as w:
        for name in ("TinyNet", "WideNet", "OnlyCode"):
            w.model(name, f"class Net:  # {name}\n    pass\n")
        a = {"uid": "a" * 32, "lr": 0.01, "batch": 32, "transform": "norm_32"}
        for epoch, acc in ((1, 0.5), (2, 0.7)):
            w.record("img-classification", "cifar-10", "acc", "TinyNet", epoch, a, acc, epoch * 10**10,
                     train_stat(epoch))
        wide = {"uid": "w" * 32, "lr": 0.1, "batch": 64, "transform": "norm_32"}
        w.record("img-classification", "cifar-10", "acc", "WideNet", 1, wide, 0.3, 10**10)
        for table, row in (("nn_stat", NN_STAT_FAILED), ("nn_stat", NN_STAT_GOOD), ("run", RUN_PIXEL),
                           ("run", RUN_GALAXY), ("run", RUN_WIDE), ("tflite", TFLITE), ("prun", PRUN_TINY),
                           ("prun", PRUN_WIDE)):
            w.side(table, row)
    return path


def import_fixture(zoo: Path, folder: Path) -> Path:
    """Build the fixture database under `folder` and import it into the zoo at `zoo`; returns the zoo."""
    db = folder / "db" / "ab.nn.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    report = import_lemur_sync(zoo, build_db(db))
    assert report.extras == {"nn_stat": 2, "run": 3, "tflite": 1, "prun": 2}, report.extras
    return zoo
