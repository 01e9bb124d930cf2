"""LEMUR import on the fixture in tests/fixtures/lemur (a fake checkout) and on a wheel zipped from it.

The fixture, and what it must give:
- stat/train/img-classification_cifar-10_acc_TinyNet: flat 2.1.2 records, stable uids, 3 epochs;
  trial A has epochs 1-3, B has 1-2 (its epoch-3 record has no accuracy), C only epoch 1.
- stat/train/img-classification_cifar-10_acc_ast-layer_type-TinyNet-5f2b9c1e: a name with `_`;
  1.json has 2 trials, 2.json is truncated (invalid JSON).
- stat/train/img-captioning_coco_bleu,meteor,cider_CapNet: the newer format with `train_stat`
  (nested, and flattened in one record) and 2.2.11 uids that change every epoch: 2 trials x 2 epochs.
- stat/train/img-classification_svhn_acc_GhostNet: no ab/nn/nn/GhostNet.py; 2 records skipped.
- stat/train/notaconfig: not a config name.
- stat/img-classification_mnist_acc_TinyNet: the older layout, 2 trials x 2 epochs.
- stat/nn/TinyNet.json: not a stat record folder; ignored silently.
- nn/: TinyNet, ast-layer_type-TinyNet-5f2b9c1e, CapNet, rag-OnlyCode (no stats), __init__.py.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import zipfile
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from lemur_agent_server.lemur_db_source import LemurDatabase
from lemur_agent_server.lemur_import import (
    MAX_PROBLEMS,
    ConfigName,
    ImportReport,
    TrialRecord,
    group_trials,
    import_lemur,
    import_lemur_sync,
    parse_config,
    parse_record,
)
from zoo import connection, schema
from zoo.lemur_extras import MAX_ROWS, curve_diagnostics, lemur_extras_at, model_extras
from zoo.query import Filters, Page
from zoo.records import Model, Point
from zoo.store import ZooStore

FIXTURE = Path(__file__).parent / "fixtures" / "lemur"
AST = "ast-layer_type-TinyNet-5f2b9c1e"
CIFAR_TINY = "img-classification_cifar-10_acc_TinyNet"
CAPTION = "img-captioning_coco_bleu,meteor,cider_CapNet"
UID_A = "a0000000000000000000000000000001"

EXPECTED = {
    "models_added": 4, "models_existing": 0, "runs_added": 9, "runs_existing": 0, "points_added": 16,
    "configs": 5, "files": 10, "code_files": 4, "records": 19, "skipped_records": 3,
    "configs_without_code": 1, "problems_total": 4,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ZooStore]:
    zoo = await ZooStore.open(tmp_path / "zoo.sqlite")
    try:
        yield zoo
    finally:
        await zoo.close()


def make_wheel(dest: Path, base: str = "", compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Zip the fixture checkout wheel-style: `ab/nn/...` at the root (or under `base`) plus dist-info."""
    with zipfile.ZipFile(dest, "w", compression) as zf:
        for path in sorted(FIXTURE.rglob("*")):
            if path.is_file():
                zf.write(path, base + path.relative_to(FIXTURE).as_posix())
        zf.writestr(base + "nn_dataset-2.1.2.dist-info/METADATA", "Name: nn-dataset\nVersion: 2.1.2\n")
    return dest


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path / "nn_dataset-2.1.2-py3-none-any.whl")


def counts(report: ImportReport) -> dict[str, int]:
    return {key: getattr(report, key) for key in EXPECTED}


async def run_row(store: ZooStore, uid: str) -> dict:
    row = await store.fetchone("SELECT * FROM run WHERE uid=?", (uid,))
    assert row is not None, uid
    return row


async def curve(store: ZooStore, uid: str) -> list[dict]:
    return await store.fetchall(
        "SELECT p.epoch, p.accuracy, p.loss, p.duration_ns, p.accuracy_to_time FROM point p "
        "JOIN run r ON r.id = p.run_id WHERE r.uid=? ORDER BY p.epoch", (uid,))


async def table_counts(store: ZooStore) -> tuple[int, int, int]:
    row = await store.fetchone("SELECT (SELECT COUNT(*) FROM model) AS m, (SELECT COUNT(*) FROM run) AS r,"
                               " (SELECT COUNT(*) FROM point) AS p")
    assert row is not None
    return row["m"], row["r"], row["p"]


# --- config names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "expected"), [
    (CIFAR_TINY, ConfigName("img-classification", "cifar-10", "acc", "TinyNet")),
    (f"img-classification_cifar-10_acc_{AST}", ConfigName("img-classification", "cifar-10", "acc", AST)),
    (CAPTION, ConfigName("img-captioning", "coco", "bleu,meteor,cider", "CapNet")),
    ("age-regression_imdb_wiki_mae_Age_Net", ConfigName("age-regression", "imdb_wiki", "mae", "Age_Net")),
    ("notaconfig", None),
    ("img-classification_cifar-10_acc", None),
    ("img-classification_cifar-10_acc_", None),
])
def test_parse_config_splits_from_the_left(config: str, expected: ConfigName | None) -> None:
    assert parse_config(config) == expected


# --- grouping --------------------------------------------------------------------------------------------
def rec(epoch: float, uid: str | None, lr: float, accuracy: float, order: int = 0) -> TrialRecord:
    return TrialRecord(epoch=epoch, uid=uid, hyper={"lr": lr, "batch": 8}, order=order,
                       point=Point(epoch=epoch, accuracy=accuracy))


def test_group_trials_mixes_stable_uids_regression_and_single_epochs() -> None:
    records = [
        rec(1, "stable", 0.1, 0.5), rec(2, "stable", 0.1, 0.6),          # 2.1.2: uid kept across epochs
        rec(1, "r-e1", 0.2, 0.4, 1), rec(2, "r-e2", 0.2, 0.45, 1),        # 2.2.11: uid changes per epoch
        rec(1, "single", 0.3, 0.3, 2),                                     # a one-epoch trial
    ]
    runs = {key: [(r.epoch, r.point.accuracy) for r in lane] for key, lane in group_trials(records)}
    assert runs["stable"] == [(1, 0.5), (2, 0.6)]
    assert runs["single"] == [(1, 0.3)]
    regression = [key for key in runs if key.startswith("prm-")]
    assert len(regression) == 1 and runs[regression[0]] == [(1, 0.4), (2, 0.45)]
    assert len(runs) == 3


def test_group_trials_splits_repeated_trials_into_lanes() -> None:
    """Two trials with one uid (identical hyperparameters) in each epoch: k-th record -> k-th run."""
    records = [rec(1, "same", 0.1, 0.5, 0), rec(1, "same", 0.1, 0.4, 1),
               rec(2, "same", 0.1, 0.6, 0), rec(2, "same", 0.1, 0.55, 1)]
    runs = dict(group_trials(records))
    assert sorted(runs) == ["same", "same#2"]
    assert [r.point.accuracy for r in runs["same"]] == [0.5, 0.6]
    assert [r.point.accuracy for r in runs["same#2"]] == [0.4, 0.55]


def test_parse_record_reads_both_formats_and_rejects_missing_accuracy() -> None:
    flat = parse_record({"accuracy": 0.6, "duration": 2 * 10**10, "lr": 0.1, "uid": "u", "transform": "t"},
                        epoch=1.0, chance=0.1)
    assert flat is not None and flat.hyper == {"lr": 0.1, "transform": "t"}
    assert flat.point.accuracy_to_time == pytest.approx(0.5 / 0.2)
    nested = parse_record({"accuracy": 0.3, "metric_bleu": 0.3, "duration_seconds": 1.0, "task": "x",
                           "train_stat": {"train_loss": 1.5, "gpu_type": "GPU"}, "layer_stat": {}},
                          epoch=2.0, chance=0.0)
    assert nested is not None and nested.hyper == {} and nested.point.loss == 1.5 and nested.device == "GPU"
    assert parse_record({"uid": "u", "lr": 0.1}, 1.0, 0.0) is None
    assert parse_record({"accuracy": "high"}, 1.0, 0.0) is None
    assert parse_record(["not", "a", "record"], 1.0, 0.0) is None


# --- the checkout --------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_checkout_round_trip_counts(store: ZooStore) -> None:
    seen: list[tuple[int, int]] = []
    report = await import_lemur(store, FIXTURE, progress=lambda done, total: seen.append((done, total)))
    assert counts(report) == EXPECTED
    assert await table_counts(store) == (4, 9, 16)
    assert seen[0] == (0, 14) and seen[-1] == (14, 14)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert report.seconds > 0


@pytest.mark.anyio
async def test_models_have_code_prefix_and_origin(store: ZooStore) -> None:
    await import_lemur(store, FIXTURE)
    ast = await store.model_by_name(AST)
    assert ast is not None and ast["origin"] == "lemur" and ast["prefix"] == "ast"
    assert ast["code"] == (FIXTURE / "ab/nn/nn" / f"{AST}.py").read_text()
    tiny = await store.model_by_name("TinyNet")
    assert tiny is not None and tiny["prefix"] is None
    assert await store.model_by_name("rag-OnlyCode") is not None      # code without stats
    assert await store.model_by_name("GhostNet") is None               # stats without code
    assert await store.model_by_name("__init__") is None


@pytest.mark.anyio
async def test_a_trial_is_one_run_with_its_epochs_in_order(store: ZooStore) -> None:
    await import_lemur(store, FIXTURE)
    uid = f"lemur:{CIFAR_TINY}:{UID_A}"
    points = await curve(store, uid)
    assert [(p["epoch"], p["accuracy"]) for p in points] == [(1.0, 0.52), (2.0, 0.61), (3.0, 0.66)]
    assert [p["duration_ns"] for p in points] == [30 * 10**9, 60 * 10**9, 90 * 10**9]
    assert points[0]["accuracy_to_time"] == pytest.approx((0.52 - 0.1) / 0.3)   # cifar-10 chance 0.1
    run = await run_row(store, uid)
    assert (run["status"], run["source"], run["task"], run["dataset"], run["metric"]) == (
        "imported", "lemur-import", "img-classification", "cifar-10", "acc")
    assert json.loads(run["prm"]) == {"batch": 32, "dropout": 0.1, "lr": 0.01, "momentum": 0.9,
                                      "transform": "norm_32"}
    assert run["transform"] == "norm_32"
    assert (run["epochs"], run["accuracy"], run["duration_ns"]) == (3.0, 0.66, 90 * 10**9)
    # B lost its epoch-3 record (no accuracy): two points; C has one
    b = await curve(store, f"lemur:{CIFAR_TINY}:b0000000000000000000000000000002")
    assert [p["accuracy"] for p in b] == [0.48, 0.55]
    assert len(await curve(store, f"lemur:{CIFAR_TINY}:c0000000000000000000000000000003")) == 1


@pytest.mark.anyio
async def test_train_stat_format_with_changing_uids_is_grouped_by_hyperparameters(store: ZooStore) -> None:
    await import_lemur(store, FIXTURE)
    runs = await store.fetchall("SELECT * FROM run WHERE uid LIKE ? ORDER BY accuracy DESC",
                                (f"lemur:{CAPTION}:%",))
    assert len(runs) == 2
    assert all(r["uid"].startswith(f"lemur:{CAPTION}:prm-") for r in runs)
    best = runs[0]
    assert (best["task"], best["dataset"], best["metric"]) == ("img-captioning", "coco", "bleu,meteor,cider")
    assert json.loads(best["prm"]) == {"batch": 8, "dropout": 0.2, "epoch_max": 2, "lr": 0.001,
                                       "transform": "norm_224"}
    assert best["device"] == "NVIDIA GeForce RTX 4090"
    points = await curve(store, best["uid"])
    # epoch 1 loss from the nested train_stat, epoch 2 from the flattened fields; coco has no chance level
    assert [(p["epoch"], p["accuracy"], p["loss"]) for p in points] == [(1.0, 0.21, 2.5), (2.0, 0.27, 2.1)]
    assert points[1]["accuracy_to_time"] == pytest.approx(0.27 / 2.05)
    second = await curve(store, runs[1]["uid"])
    assert [(p["epoch"], p["accuracy"], p["loss"]) for p in second] == [(1.0, 0.18, 2.9), (2.0, 0.22, 2.6)]


@pytest.mark.anyio
async def test_older_stat_layout_is_read(store: ZooStore) -> None:
    await import_lemur(store, FIXTURE)
    points = await curve(store, "lemur:img-classification_mnist_acc_TinyNet:10000000000000000000000000000001")
    assert [(p["epoch"], p["accuracy"]) for p in points] == [(1.0, 0.91), (2.0, 0.95)]


@pytest.mark.anyio
async def test_bad_files_are_reported_not_fatal(store: ZooStore) -> None:
    report = await import_lemur(store, FIXTURE)
    stat = "ab/nn/stat/train"
    reasons = {p.path: p.reason for p in report.problems}
    assert set(reasons) == {
        f"{stat}/notaconfig",
        f"{stat}/img-classification_svhn_acc_GhostNet",
        f"{stat}/{CIFAR_TINY}/3.json",
        f"{stat}/img-classification_cifar-10_acc_{AST}/2.json",
    }
    assert "not a <task>_<dataset>_<metric>_<nn> config name" in reasons[f"{stat}/notaconfig"]
    assert "GhostNet.py; 2 records skipped" in reasons[f"{stat}/img-classification_svhn_acc_GhostNet"]
    assert "1 of 2 records have no numeric accuracy" in reasons[f"{stat}/{CIFAR_TINY}/3.json"]
    assert "unreadable JSON" in reasons[f"{stat}/img-classification_cifar-10_acc_{AST}/2.json"]
    # the good epoch file of the half-broken config still landed
    assert len(await store.fetchall("SELECT id FROM run WHERE uid LIKE ?", (f"%_{AST}:%",))) == 2


@pytest.mark.anyio
async def test_second_import_adds_nothing(store: ZooStore) -> None:
    await import_lemur(store, FIXTURE)
    again = await import_lemur(store, FIXTURE)
    assert (again.models_added, again.runs_added, again.points_added) == (0, 0, 0)
    assert (again.models_existing, again.runs_existing) == (4, 9)
    assert await table_counts(store) == (4, 9, 16)


@pytest.mark.anyio
async def test_findable_through_the_query_language(store: ZooStore) -> None:
    await import_lemur(store, FIXTURE)
    result = await store.query(
        Filters(task="img-classification", dataset="cifar-10", metric="acc", epoch=1, only_best_accuracy=True),
        Page(limit=10))
    rows = result["rows"]
    assert result["total"] == 2
    assert [(r["name"], r["accuracy"]) for r in rows] == [("TinyNet", 0.52), (AST, 0.45)]
    assert rows[0]["prm"]["lr"] == 0.01 and rows[0]["transform"] == "norm_32"
    assert rows[0]["run_uid"] == f"lemur:{CIFAR_TINY}:{UID_A}"
    prefixed = await store.query(Filters(nn_prefix=("ast-",)), Page(limit=10))
    assert {r["name"] for r in prefixed["rows"]} == {AST}


@pytest.mark.anyio
async def test_existing_model_with_other_code_is_reported(store: ZooStore) -> None:
    await store.add_model(Model(name="TinyNet", code="class Net: pass\n", origin="seed"))
    report = await import_lemur(store, FIXTURE)
    assert (report.models_added, report.models_existing, report.runs_added) == (3, 1, 9)
    assert any(p.path == "ab/nn/nn/TinyNet.py" and "other code" in p.reason for p in report.problems)
    tiny = await store.model_by_name("TinyNet")
    assert tiny is not None and tiny["origin"] == "seed"


@pytest.mark.anyio
async def test_code_only_models_can_be_left_out(store: ZooStore) -> None:
    report = await import_lemur(store, FIXTURE, code_only_models=False)
    assert (report.models_added, report.code_files, report.runs_added) == (3, 3, 9)
    assert await store.model_by_name("rag-OnlyCode") is None


# --- the wheel -----------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_wheel_round_trip_counts(store: ZooStore, wheel: Path) -> None:
    report = await import_lemur(store, wheel)
    assert counts(report) == EXPECTED
    points = await curve(store, f"lemur:{CIFAR_TINY}:{UID_A}")
    assert [p["accuracy"] for p in points] == [0.52, 0.61, 0.66]


@pytest.mark.anyio
async def test_wheel_after_checkout_adds_nothing(store: ZooStore, wheel: Path) -> None:
    await import_lemur(store, FIXTURE)
    report = await import_lemur(store, wheel)
    assert (report.models_added, report.runs_added, report.points_added) == (0, 0, 0)
    assert report.runs_existing == 9


@pytest.mark.anyio
async def test_source_zip_with_a_top_folder(store: ZooStore, tmp_path: Path) -> None:
    report = await import_lemur(store, make_wheel(tmp_path / "nn-dataset-main.zip", base="nn-dataset-main/"))
    assert counts(report) == EXPECTED


@pytest.mark.anyio
async def test_corrupt_wheel_member_is_reported(store: ZooStore, tmp_path: Path) -> None:
    """A member whose bytes no longer match its CRC (stored uncompressed so the edit stays readable)."""
    path = make_wheel(tmp_path / "corrupt.whl", compression=zipfile.ZIP_STORED)
    data = path.read_bytes()
    assert data.count(b'"accuracy": 0.91') == 1
    path.write_bytes(data.replace(b'"accuracy": 0.91', b'"accuracy": 0.97'))
    report = await import_lemur(store, path)
    mnist = "ab/nn/stat/img-classification_mnist_acc_TinyNet/1.json"
    assert any(p.path == mnist and "BadZipFile" in p.reason for p in report.problems)
    assert (report.runs_added, report.points_added, report.problems_total) == (9, 14, 5)


@pytest.mark.anyio
async def test_config_in_both_layouts_is_read_once(store: ZooStore, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(FIXTURE, checkout)
    stat = checkout / "ab/nn/stat"
    shutil.copytree(stat / "train" / CIFAR_TINY, stat / CIFAR_TINY)
    report = await import_lemur(store, checkout)
    assert (report.runs_added, report.points_added, report.files) == (9, 16, 10)
    assert any(p.path == f"ab/nn/stat/{CIFAR_TINY}" and "older copy skipped" in p.reason
               for p in report.problems)


@pytest.mark.anyio
@pytest.mark.parametrize("bad", ["missing", "plain-file", "empty-zip", "empty-dir"])
async def test_a_path_that_is_no_lemur_tree_raises(store: ZooStore, tmp_path: Path, bad: str) -> None:
    target = tmp_path / bad
    if bad == "plain-file":
        target.write_text("not a zip")
    elif bad == "empty-zip":
        with zipfile.ZipFile(target, "w") as zf:
            zf.writestr("README.md", "nothing here")
    elif bad == "empty-dir":
        target.mkdir()
    with pytest.raises(ValueError, match="ab/nn"):
        await import_lemur(store, target)


# --- the sync wrapper and the report ---------------------------------------------------------------------
def test_sync_wrapper(tmp_path: Path) -> None:
    report = import_lemur_sync(tmp_path / "zoo.sqlite", FIXTURE)
    assert counts(report) == EXPECTED
    assert import_lemur_sync(tmp_path / "zoo.sqlite", FIXTURE).runs_added == 0


def test_problem_list_is_capped_but_counted() -> None:
    report = ImportReport()
    for i in range(MAX_PROBLEMS + 5):
        report.add_problem(f"f{i}.json", "bad")
    assert len(report.problems) == MAX_PROBLEMS and report.problems_total == MAX_PROBLEMS + 5
    assert report.as_dict()["problems_total"] == MAX_PROBLEMS + 5


# --- LEMUR 2.2's database (db/ab.nn.db) -------------------------------------------------------------------
# A small database written by our own builder (bench/lemur_db_synth.py) in LEMUR 2.2's schema:
# - TinyNet on cifar-10: trial A, 3 epochs with train_stat; trial B, 2 epochs without; an epoch-4 row of
#   B with no accuracy (a bad row). Every record re-inserts its prm rows (duplicates), with an `epoch` key.
# - CapNet on coco: 2.2.11 uids that change every epoch, one hyperparameter set: one run of 2 epochs.
# - GhostNet: records, but no row in nn. OnlyCode: a row in nn, no records.
# - nn_stat / run / tflite / prun rows for TinyNet (12 mobile benchmarks, to see the cap).
DB_A, DB_B = "da000000000000000000000000000001", "db000000000000000000000000000002"
CAP_CFG = "img-captioning_coco_bleu_CapNet"
GPU = "Synthetic GPU 24GB"


def _train(epoch: int) -> dict[str, Any]:
    return {"train_loss": 1.0 / epoch, "test_loss": 1.2 / epoch, "train_accuracy": 0.3 + epoch / 10,
            "gradient_norm": 2.0 + epoch, "samples_per_second": 1000.0 * epoch, "epoch_max": 3, "cpu_count": 8,
            "cpu_type": "x86_64", "total_ram_kb": 1000.0, "gpu_type": GPU, "gpu_total_memory_kb": 24e6,
            "occupied_gpu_memory_kb": 1e6 * epoch}


def build_lemur_db(path: Path, side_tables: bool = True) -> dict[str, str]:
    """The fixture database; returns the stat ids the tests look for."""
    from bench.lemur_db_synth import LemurDbWriter

    ids: dict[str, str] = {}
    with LemurDbWriter(path) as w:
        for name in ("TinyNet", "CapNet", "OnlyCode"):
            w.model(name, f"class Net:  # {name}\n    pass\n")
        a = {"uid": DB_A, "lr": 0.01, "batch": 32, "momentum": 0.9, "transform": "norm_32", "epoch": 3}
        b = {"uid": DB_B, "lr": 0.02, "batch": 64, "momentum": 0.8, "transform": "norm_32"}
        for epoch, acc in ((1, 0.5), (2, 0.6), (3, 0.7)):
            w.record("img-classification", "cifar-10", "acc", "TinyNet", epoch, a, acc, epoch * 10**10,
                     _train(epoch))
        for epoch, acc in ((1, 0.4), (2, 0.45)):
            w.record("img-classification", "cifar-10", "acc", "TinyNet", epoch, b, acc, epoch * 10**10)
        ids["bad"] = w.record("img-classification", "cifar-10", "acc", "TinyNet", 4, b, None, 4 * 10**10)
        for epoch, acc in ((1, 0.2), (2, 0.25)):
            cap = {"uid": f"c{epoch}" * 16, "lr": 0.001, "batch": 8, "transform": "norm_224"}
            w.record("img-captioning", "coco", "bleu", "CapNet", epoch, cap, acc, epoch * 10**9)
        w.record("img-classification", "svhn", "acc", "GhostNet", 1, {"uid": "g" * 32, "transform": "x"}, 0.3, 1)
        if side_tables:
            w.side("nn_stat", {"id": "ns1", "nn_name": "TinyNet", "prm_id": DB_A, "total_params": 1234,
                               "flops": 56789, "model_size_mb": 0.5, "meta_json": '{"input": [1, 3, 32, 32]}'})
            for i in range(12):
                w.side("run", {"id": f"mr{i:02d}", "model_name": "TinyNet", "device_type": "Pixel 7", "valid": 1,
                               "duration": 1000 + i, "precision_type": "fp32"})
            w.side("tflite", {"id": "tf1", "model_name": "TinyNet", "accuracy": 0.49, "precision_type": "int8"})
            w.side("prun", {"id": "pr1", "model_name": "TinyNet", "pruning_method": "l1", "accuracy": 0.41,
                            "task_dataset": "img-classification_cifar-10", "pruning_ratio": 0.5})
    return ids


@pytest.fixture
def lemur_db(tmp_path: Path) -> Path:
    path = tmp_path / "lemur" / "db" / "ab.nn.db"
    path.parent.mkdir(parents=True)
    build_lemur_db(path)
    return path


def zoo_conn(store: ZooStore) -> sqlite3.Connection:
    return sqlite3.connect(store.path)


@pytest.mark.anyio
async def test_database_trials_become_runs_with_their_curves(store: ZooStore, lemur_db: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = await import_lemur(store, lemur_db, progress=lambda done, total: seen.append((done, total)))
    assert report.source == "lemur-db"
    assert (report.models_added, report.runs_added, report.points_added, report.records) == (3, 3, 7, 9)
    assert (report.skipped_records, report.configs_without_code, report.train_points) == (2, 1, 3)
    assert seen[0] == (0, 9 + 15) and seen[-1] == (24, 24)
    a = await run_row(store, f"lemur:{CIFAR_TINY}:{DB_A}")
    # prm rows deduplicated into one JSON; `epoch` dropped, `transform` kept (and as the run's transform)
    assert json.loads(a["prm"]) == {"batch": 32, "lr": 0.01, "momentum": 0.9, "transform": "norm_32"}
    assert (a["transform"], a["device"], a["epochs"], a["accuracy"]) == ("norm_32", GPU, 3.0, 0.7)
    points = await curve(store, a["uid"])
    assert [(p["epoch"], p["accuracy"], p["loss"]) for p in points] == [(1.0, 0.5, 1.0), (2.0, 0.6, 0.5),
                                                                       (3.0, 0.7, pytest.approx(1 / 3))]
    assert points[0]["accuracy_to_time"] == pytest.approx((0.5 - 0.1) / 0.1)
    b = await curve(store, f"lemur:{CIFAR_TINY}:{DB_B}")
    assert [(p["epoch"], p["accuracy"], p["loss"]) for p in b] == [(1.0, 0.4, None), (2.0, 0.45, None)]


@pytest.mark.anyio
async def test_database_per_epoch_uids_are_one_run(store: ZooStore, lemur_db: Path) -> None:
    await import_lemur(store, lemur_db)
    runs = await store.fetchall("SELECT uid, prm FROM run WHERE uid LIKE ?", (f"lemur:{CAP_CFG}:%",))
    assert len(runs) == 1 and runs[0]["uid"].startswith(f"lemur:{CAP_CFG}:prm-")
    assert [p["accuracy"] for p in await curve(store, runs[0]["uid"])] == [0.2, 0.25]


@pytest.mark.anyio
async def test_database_train_diagnostics_on_the_curve(store: ZooStore, lemur_db: Path) -> None:
    await import_lemur(store, lemur_db)
    a = await run_row(store, f"lemur:{CIFAR_TINY}:{DB_A}")
    b = await run_row(store, f"lemur:{CIFAR_TINY}:{DB_B}")
    with closing(zoo_conn(store)) as conn:
        diag = curve_diagnostics(conn, a["id"])
        empty = curve_diagnostics(conn, b["id"])
    assert diag["hardware"] == {"cpu_count": 8, "cpu_type": "x86_64", "epoch_max": 3, "gpu_total_memory_kb": 24e6,
                                "gpu_type": GPU, "total_ram_kb": 1000.0}
    assert [p["epoch"] for p in diag["points"]] == [1.0, 2.0, 3.0]
    second = diag["points"][1]
    assert (second["train_loss"], second["test_loss"], second["train_accuracy"], second["gradient_norm"],
            second["samples_per_second"]) == (0.5, 0.6, pytest.approx(0.5), 4.0, 2000.0)
    assert second["usage"] == {"occupied_gpu_memory_kb": 2e6}
    assert empty == {"hardware": None, "points": []}


@pytest.mark.anyio
async def test_database_extras_are_kept_and_bounded(store: ZooStore, lemur_db: Path) -> None:
    report = await import_lemur(store, lemur_db)
    assert report.extras == {"nn_stat": 1, "run": 12, "tflite": 1, "prun": 1}
    tiny = await store.model_by_name("TinyNet")
    only = await store.model_by_name("OnlyCode")
    assert tiny is not None and only is not None
    assert (tiny["params"], tiny["flops"]) == (1234, 56789)          # from nn_stat
    with closing(zoo_conn(store)) as conn:
        extras = model_extras(conn, tiny["id"])
        assert model_extras(conn, only["id"]) == {}
        assert model_extras(conn, 10**9) == {}
    assert set(extras) == {"architecture", "mobile_benchmarks", "tflite", "pruning"}
    arch = extras["architecture"]["rows"][0]
    assert (arch["lemur_id"], arch["total_params"], arch["flops"], arch["meta"]) == (
        "ns1", 1234, 56789, {"input": [1, 3, 32, 32]})
    mobile = extras["mobile_benchmarks"]
    assert mobile["total"] == 12 and len(mobile["rows"]) == MAX_ROWS
    assert mobile["rows"][0] == {"lemur_id": "mr00", "device_type": "Pixel 7", "valid": 1, "duration": 1000,
                                 "precision_type": "fp32"}
    assert extras["pruning"]["rows"][0]["pruning_method"] == "l1"
    assert extras["tflite"]["rows"][0]["precision_type"] == "int8"
    # a model present in nn without records is a model without runs
    assert await store.fetchall("SELECT id FROM run WHERE model_id=?", (only["id"],)) == []
    # the same on a connection of its own, with the best run's training diagnostics, for async callers
    a = await run_row(store, f"lemur:{CIFAR_TINY}:{DB_A}")
    both = await anyio.to_thread.run_sync(lemur_extras_at, store.path, tiny["id"], a["id"])
    assert both["architecture"] == extras["architecture"]
    assert [p["epoch"] for p in both["train_diagnostics"]["points"]] == [1.0, 2.0, 3.0]
    assert "train_diagnostics" not in await anyio.to_thread.run_sync(lemur_extras_at, store.path, only["id"], None)


@pytest.mark.anyio
async def test_database_second_import_adds_nothing(store: ZooStore, lemur_db: Path) -> None:
    await import_lemur(store, lemur_db)
    before = await table_counts(store)
    again = await import_lemur(store, lemur_db)
    assert (again.models_added, again.runs_added, again.points_added, again.train_points) == (0, 0, 0, 0)
    assert (again.models_existing, again.runs_existing, sum(again.extras.values())) == (3, 3, 0)
    assert await table_counts(store) == before == (3, 3, 7)


@pytest.mark.anyio
async def test_database_is_never_written(store: ZooStore, lemur_db: Path) -> None:
    data, mtime = lemur_db.read_bytes(), lemur_db.stat().st_mtime_ns
    listing = sorted(p.name for p in lemur_db.parent.iterdir())
    await import_lemur(store, lemur_db)
    assert lemur_db.read_bytes() == data and lemur_db.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in lemur_db.parent.iterdir()) == listing   # no journal or WAL left behind


def test_database_opened_read_only(lemur_db: Path) -> None:
    db = LemurDatabase(lemur_db)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            db.conn.execute("DELETE FROM prm")
    finally:
        db.close()


@pytest.mark.anyio
async def test_database_bad_rows_are_reported_not_fatal(store: ZooStore, tmp_path: Path) -> None:
    path = tmp_path / "ab.nn.db"
    ids = build_lemur_db(path)
    report = await import_lemur(store, path)
    reasons = {p.path: p.reason for p in report.problems}
    assert set(reasons) == {f"stat:{ids['bad']}", "stat:img-classification_svhn_acc_GhostNet"}
    assert "accuracy None is not a finite number" in reasons[f"stat:{ids['bad']}"]
    assert "no model code for 'GhostNet'" in reasons["stat:img-classification_svhn_acc_GhostNet"]
    assert report.runs_added == 3


def test_database_folder_and_sync_wrapper(tmp_path: Path, lemur_db: Path) -> None:
    report = import_lemur_sync(tmp_path / "zoo2.sqlite", lemur_db.parent.parent)   # the folder holding db/
    assert (report.source, report.runs_added) == ("lemur-db", 3)


@pytest.mark.anyio
async def test_database_without_side_tables_or_train_stat(store: ZooStore, tmp_path: Path) -> None:
    """A database built from 2.1 files (side tables empty) or an older build (tables absent)."""
    path = tmp_path / "ab.nn.db"
    build_lemur_db(path, side_tables=False)
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript("DROP TABLE train_stat; DROP TABLE tflite; DROP TABLE nn_stat;")
    report = await import_lemur(store, path)
    assert (report.runs_added, report.points_added, report.train_points) == (3, 7, 0)
    assert report.extras == {"nn_stat": 0, "run": 0, "tflite": 0, "prun": 0}
    a = await run_row(store, f"lemur:{CIFAR_TINY}:{DB_A}")
    assert a["device"] is None and [p["loss"] for p in await curve(store, a["uid"])] == [None] * 3


@pytest.mark.anyio
async def test_database_rows_are_found_by_the_query_language(store: ZooStore, lemur_db: Path) -> None:
    await import_lemur(store, lemur_db)
    result = await store.query(Filters(task="img-classification", dataset="cifar-10", metric="acc", epoch=2,
                                       only_best_accuracy=True), Page(limit=10))
    assert [(r["name"], r["accuracy"], r["run_uid"]) for r in result["rows"]] == [
        ("TinyNet", 0.6, f"lemur:{CIFAR_TINY}:{DB_A}")]


@pytest.mark.anyio
async def test_an_sqlite_file_that_is_not_lemur_raises(store: ZooStore, tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE x (y)")
    with pytest.raises(ValueError, match="without LEMUR's tables"):
        await import_lemur(store, path)


def test_large_database_rebuilds_indexes_and_best_points(tmp_path: Path) -> None:
    """Past the bulk threshold the importer drops the point indexes and rebuilds them at the end: the
    zoo must come out with the same indexes as a fresh one and best_point equal to its recomputation."""
    from bench.lemur_db_synth import build_synthetic

    db = tmp_path / "synthetic.db"
    info = build_synthetic(db, records=22_000, models=40, train_share=0.3)
    fresh = tmp_path / "fresh.sqlite"
    connection.initialize(fresh)
    zoo = tmp_path / "zoo.sqlite"
    report = import_lemur_sync(zoo, db)
    assert (report.records, report.points_added, report.problems_total) == (info["records"], info["records"], 0)
    query = "SELECT name, sql FROM sqlite_master WHERE type='index' ORDER BY name"
    with closing(sqlite3.connect(fresh)) as a, closing(sqlite3.connect(zoo)) as b:
        assert b.execute(query).fetchall() == a.execute(query).fetchall()
        best = "SELECT task, dataset, metric, epoch, model_id, accuracy FROM best_point ORDER BY 1, 2, 3, 4, 5"
        imported = b.execute(best).fetchall()
        b.execute("BEGIN")
        schema.rebuild_best_points(b)
        assert imported == b.execute(best).fetchall() and len(imported) >= 500
        b.execute("ROLLBACK")


def lemur_db_from_fixture(path: Path) -> int:
    """The database LEMUR 2.2 would build from the fixture's files (its records with a numeric accuracy,
    of configs with model code), written by our builder the way LEMUR's writer lays rows out."""
    from bench.lemur_db_synth import LemurDbWriter

    written = 0
    stat = FIXTURE / "ab/nn/stat"
    config_dirs = [d for d in (stat / "train").iterdir()] + [d for d in stat.iterdir() if d.name != "train"]
    with LemurDbWriter(path) as w:
        for code in (FIXTURE / "ab/nn/nn").glob("*.py"):
            if not code.name.startswith("__"):
                w.model(code.stem, code.read_text())
        for config_dir in config_dirs:
            parsed = parse_config(config_dir.name)
            if parsed is None or not (FIXTURE / "ab/nn/nn" / f"{parsed.nn}.py").exists():
                continue
            for epoch_file in config_dir.glob("*.json"):
                try:
                    records = json.loads(epoch_file.read_text())
                except ValueError:
                    continue
                for record in records:
                    if not isinstance(record, dict) or not isinstance(record.get("accuracy"), float):
                        continue
                    prm = {k: v for k, v in record.items()  # what SQLite can bind (LEMUR's rows hold scalars)
                           if k not in ("accuracy", "duration", "train_stat") and isinstance(v, (str, int, float))}
                    train = record.get("train_stat") if isinstance(record.get("train_stat"), dict) else None
                    w.record(parsed.task, parsed.dataset, parsed.metric, parsed.nn, int(epoch_file.stem), prm,
                             record["accuracy"], record.get("duration"), train)
                    written += 1
    return written


@pytest.mark.anyio
async def test_database_built_from_the_files_gives_the_same_runs(store: ZooStore, tmp_path: Path) -> None:
    """A user who imported the 2.1 files and now imports LEMUR 2.2's database of the same records gets
    nothing twice: both importers name the runs alike, per-epoch uids included."""
    path = tmp_path / "ab.nn.db"
    assert lemur_db_from_fixture(path) == 16
    files = await import_lemur(store, FIXTURE)
    database = await import_lemur(store, path)
    assert (files.runs_added, files.points_added) == (9, 16)
    assert (database.runs_added, database.points_added, database.runs_existing) == (0, 0, 9)
    assert (database.models_added, database.models_existing) == (0, 4)
    assert await table_counts(store) == (4, 9, 16)
