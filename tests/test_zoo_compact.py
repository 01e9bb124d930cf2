"""The compact zoo layout (zoo.schema version 5: `scope`, `point_row`, `best_point_row` behind the `point`
and `best_point` views): a zoo written before it migrates with every record and every answer kept, the
writers that insert into `point` still work, and imported points no longer carry their strings."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.lemur_db_synth import build_synthetic
from lemur_agent_server.lemur_import import import_lemur_sync
from tests.zoo_factory import build_zoo
from zoo import schema
from zoo.query import Filters, Page
from zoo.records import Model, Point, Run
from zoo.store import ZooStore

V4 = 4  # the layout before the compact one: MIGRATIONS[:V4]
COPIED_TABLES = ("model", "run", "weights", "point_train", "hardware", "run_hardware", "job")
QUERIES: list[tuple[Filters, Page]] = [
    (Filters(), Page(limit=50)),
    (Filters(), Page(sort="accuracy_to_time", limit=7)),
    (Filters(task="img-classification", dataset="mnist", metric="acc"), Page(sort="duration", limit=100)),
    (Filters(dataset="cifar-10", epoch=2.0, only_best_accuracy=True), Page(limit=100)),
    (Filters(only_best_accuracy=True), Page(limit=100)),
    (Filters(task="img-classification", dataset="cifar-10", metric="acc", unique_nn=True), Page(sort="created")),
    (Filters(nn_prefix=("rag-",), min_accuracy=0.4), Page(sort="name", limit=100)),
    (Filters(task="img-captioning"), Page(limit=100)),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def filled(tmp_path: Path) -> AsyncIterator[ZooStore]:
    """A zoo of the current layout: the factory's models plus a run of another task (two scopes more)."""
    store = await build_zoo(tmp_path / "new.sqlite")
    await store.add_model_with_runs(Model(name="cap", code="class Net:\n    pass\n", origin="lemur"), [
        Run(uid="cap-1", task="img-captioning", dataset="coco", metric="bleu", status="imported",
            source="lemur-import", points=[Point(epoch=1.0, accuracy=0.2, duration_ns=10**9, loss=2.5),
                                           Point(epoch=2.0, accuracy=0.25, duration_ns=2 * 10**9)])])
    try:
        yield store
    finally:
        await store.close()


async def answers(store: ZooStore) -> dict[str, Any]:
    """Everything a reader can ask: query pages with totals, a model's detail, the catalog, every row."""
    out: dict[str, Any] = {f"query {i}": await store.query(f, p) for i, (f, p) in enumerate(QUERIES)}
    out["detail"] = await store.model_detail("rag-m5")
    out["catalog"] = await store.catalog_counts()
    out["points"] = await store.fetchall("SELECT * FROM point ORDER BY run_id, epoch")
    out["best"] = await store.fetchall("SELECT * FROM best_point ORDER BY task, dataset, metric, epoch, model_id")
    return out


def write_v4_copy(source: Path, path: Path) -> None:
    """The zoo at `source` as a version-4 file: the old tables, filled from the current ones."""
    conn = sqlite3.connect(path)
    for migration in schema.MIGRATIONS[:V4]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(V4),))
    conn.execute("ATTACH DATABASE ? AS src", (str(source),))
    for table in (*COPIED_TABLES, "point", "best_point"):  # the views' columns are the old tables' columns
        # the v4 table's own columns: later migrations add columns to some tables (run)
        columns = ", ".join(row[1] for row in conn.execute(f"PRAGMA main.table_info({table})"))
        conn.execute(f"INSERT INTO main.{table}({columns}) SELECT {columns} FROM src.{table}")
    conn.commit()
    conn.close()


def index_sql(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('index', 'view', 'trigger')"
                            " AND sql IS NOT NULL ORDER BY name").fetchall()
    finally:
        conn.close()


@pytest.mark.anyio
async def test_a_v4_zoo_keeps_every_record_and_answer_after_migration(filled: ZooStore, tmp_path: Path) -> None:
    expected = await answers(filled)
    old = tmp_path / "old.sqlite"
    write_v4_copy(filled.path, old)
    assert "point_row" not in {name for name, _ in index_sql(old)}
    async with await ZooStore.open(old) as migrated:
        got = await answers(migrated)
        version = (await migrated.fetchone("SELECT value FROM meta WHERE key='schema_version'"))["value"]
        scopes = await migrated.fetchall("SELECT task, dataset, metric FROM scope ORDER BY 1, 2, 3")
    assert len(expected["points"]) == 6 * (4 + 6) + 2 and len(expected["best"]) > 0
    assert got == expected
    assert int(version) == schema.SCHEMA_VERSION
    assert scopes == [{"task": "img-captioning", "dataset": "coco", "metric": "bleu"},
                      {"task": "img-classification", "dataset": "cifar-10", "metric": "acc"},
                      {"task": "img-classification", "dataset": "mnist", "metric": "acc"}]
    assert index_sql(old) == index_sql(filled.path)  # the same indexes, views and trigger as a fresh zoo


@pytest.mark.anyio
async def test_runs_written_after_the_migration_land_in_point_and_best_point(filled: ZooStore,
                                                                             tmp_path: Path) -> None:
    """The store inserts into the `point` view: its trigger adds a new task/dataset/metric to `scope` once."""
    old = tmp_path / "old.sqlite"
    write_v4_copy(filled.path, old)
    async with await ZooStore.open(old) as store:
        model_id, _ = await store.add_model(Model(name="seg", code="class Net:\n    pass\n", origin="submitted"))
        runs = [Run(uid=f"seg-{k}", task="img-segmentation", dataset="coco", metric="iou", status="succeeded",
                    source="evaluator", points=[Point(epoch=1.0, accuracy=0.3 + k / 10, duration_ns=10**9)])
                for k in range(2)]
        await store.add_runs(model_id, runs)
        page = await store.query(Filters(task="img-segmentation"), Page())
        best = await store.query(Filters(task="img-segmentation", only_best_accuracy=True), Page())
        n_scopes = (await store.fetchone("SELECT COUNT(*) AS n FROM scope WHERE task='img-segmentation'"))["n"]
    assert [(r["run_uid"], r["accuracy"]) for r in page["rows"]] == [("seg-1", 0.4), ("seg-0", 0.3)]
    assert page["total"] == 2
    assert [(r["run_uid"], r["accuracy"]) for r in best["rows"]] == [("seg-1", 0.4)]
    assert n_scopes == 1


def test_a_point_outside_any_run_is_refused_as_before(tmp_path: Path) -> None:
    """The view's trigger keeps the old table's constraints: a missing task or a duplicate point fails."""
    path = tmp_path / "zoo.sqlite"
    import_lemur_sync(path, _small_db(tmp_path, 300))
    conn = sqlite3.connect(path)
    try:
        run_id, epoch, model_id = conn.execute("SELECT run_id, epoch, model_id FROM point LIMIT 1").fetchone()
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO point(run_id, epoch, model_id, task, dataset, metric, created)"
                         " VALUES(?,?,?,'img-classification','cifar-10','acc',0)", (run_id, epoch, model_id))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO point(run_id, epoch, model_id, task, dataset, metric, created)"
                         " VALUES(?,?,?,NULL,'cifar-10','acc',0)", (run_id, 99.0, model_id))
    finally:
        conn.close()


def _small_db(tmp_path: Path, records: int) -> Path:
    db = tmp_path / "lemur.db"
    build_synthetic(db, records, models=50)
    return db


# --- deflated model code (zoo.records.COMPRESS_CODE) ------------------------------------------------------
@pytest.mark.anyio
async def test_deflated_code_reads_back_as_text_everywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Imported and stored models keep their code deflated; every reader of the store, the stats export,
    data()'s code length and a re-import (same code: nothing reported) see the original text."""
    from lemur_agent_server.api_tables import nn_stats_by_model
    from stats.finetune import _entries
    from zoo import records

    db = _small_db(tmp_path, 400)
    codes = dict(sqlite3.connect(db).execute("SELECT name, code FROM nn").fetchall())
    zoo = tmp_path / "zoo.sqlite"
    import_lemur_sync(zoo, db)  # text, as before
    monkeypatch.setattr(records, "COMPRESS_CODE", True)
    async with await ZooStore.open(zoo) as store:
        await store.add_model(Model(name="mine", code="class Net:\n    width = 3\n", origin="submitted"))
    other = tmp_path / "deflated.sqlite"
    first = import_lemur_sync(other, db)
    again = import_lemur_sync(other, db)
    mine = {"mine": "class Net:\n    width = 3\n"}
    for path, expected in ((zoo, codes | mine), (other, codes)):
        async with await ZooStore.open(path) as store:
            for name in ("mine", sorted(codes)[0]) if path == zoo else (sorted(codes)[0],):
                assert (await store.model_by_name(name))["code"] == expected[name]
                assert (await store.model_detail(name))["model"]["code"] == expected[name]
            rows = await store.fetchall("SELECT name, code FROM model")
        assert {r["name"]: r["code"] for r in rows} == expected
        conn = sqlite3.connect(path)
        ids = dict(conn.execute("SELECT id, name FROM model").fetchall())
        lengths = {ids[mid]: s["nn_code_length"] for mid, s in nn_stats_by_model(conn, list(ids)).items()}
        entries = {e.nn: e.code for e in _entries(conn, Filters())}
        kinds = dict(conn.execute("SELECT typeof(code), COUNT(*) FROM model GROUP BY 1").fetchall())
        conn.close()
        assert lengths == {name: len(expected[name]) for name in ids.values()}
        assert entries and all(code == expected[name] for name, code in entries.items())
    assert kinds == {"blob": 50}  # the second zoo: every model deflated
    assert first.models_added == 50 and again.models_added == 0 and again.problems_total == 0


def test_deflated_code_is_smaller_than_the_text() -> None:
    from zoo import records

    code = (Path(__file__).parent / "models.py").read_text()
    assert records.code_text(code) == code
    packed = records.zlib.compress(code.encode(), records.CODE_ZLIB_LEVEL)
    assert records.code_text(packed) == code and len(packed) < len(code.encode()) / 2


def test_an_imported_point_with_its_indexes_stays_small(tmp_path: Path) -> None:
    """Issue 10's budget is 150 MB for 578k records: a curve point with its share of the point and
    best_point tables and indexes costs ~220 bytes here (the layout before version 5: ~300, with the
    task/dataset/metric strings repeated in every row and index entry, and four sort indexes)."""
    path = tmp_path / "zoo.sqlite"
    report = import_lemur_sync(path, _small_db(tmp_path, 8000))
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        objects = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')"
            " AND tbl_name IN ('point', 'best_point', 'point_row', 'best_point_row')")]
        marks = ",".join("?" * len(objects))
        size = conn.execute(f"SELECT SUM(pgsize) FROM dbstat WHERE name IN ({marks})", objects).fetchone()[0]
    finally:
        conn.close()
    assert report.points_added >= 8000
    assert size / report.points_added <= 240, f"{size / report.points_added:.0f} bytes per point"
