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
from zoo.query import Filters, Page, page_sql
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
    (Filters(), Page(sort="duration", descending=True, limit=9)),
    (Filters(), Page(sort="created", limit=9)),
    (Filters(dataset="mnist"), Page(sort="accuracy_to_time", limit=9)),
]
# the layout before zoosize2's migration (schema 9 on main; the lead may renumber): found by its content
BEFORE_NARROW = next((i for i, m in enumerate(schema.MIGRATIONS)
                      if "CREATE INDEX point_duration ON point_row(duration_ns DESC)" in m), len(schema.MIGRATIONS))


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


def write_layout_copy(source: Path, path: Path, version: int) -> None:
    """The zoo at `source` as a file of schema `version` (of the compact layout: point_row, best_point_row),
    every table of that layout filled from the current one."""
    conn = sqlite3.connect(path)
    for migration in schema.MIGRATIONS[:version]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(version),))
    conn.execute("ATTACH DATABASE ? AS src", (str(source),))
    tables = [r[0] for r in conn.execute("SELECT name FROM main.sqlite_master WHERE type='table'"
                                         " AND name NOT LIKE 'sqlite_%' AND name != 'meta'")]
    for table in tables:
        names = [row[1] for row in conn.execute(f"PRAGMA main.table_info({table})")]
        have = {row[1] for row in conn.execute(f"PRAGMA src.table_info({table})")}
        # a point's `created`, stored before version 9, is its run's
        values = [n if n in have else "(SELECT created FROM src.run ru WHERE ru.id = t.run_id)" for n in names]
        conn.execute(f"INSERT INTO main.{table}({', '.join(names)}) SELECT {', '.join(values)} FROM src.{table} t")
    conn.commit()
    conn.close()


@pytest.mark.anyio
async def test_a_zoo_before_the_narrow_indexes_keeps_every_record_and_answer(filled: ZooStore,
                                                                            tmp_path: Path) -> None:
    expected = await answers(filled)
    old = tmp_path / "v8.sqlite"
    write_layout_copy(filled.path, old, BEFORE_NARROW)
    assert "point_duration" not in {name for name, _ in index_sql(old)}
    async with await ZooStore.open(old) as migrated:
        got = await answers(migrated)
        version = (await migrated.fetchone("SELECT value FROM meta WHERE key='schema_version'"))["value"]
    assert len(expected["points"]) == 6 * (4 + 6) + 2
    assert got == expected
    assert int(version) == schema.SCHEMA_VERSION
    assert index_sql(old) == index_sql(filled.path)


def _inner_plan(path: Path, filters: Filters, page: Page) -> list[str]:
    """EXPLAIN QUERY PLAN of the page's cut (the materialized subquery `pg`, before the page's own joins)."""
    sql, args = page_sql(filters, page)
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
    finally:
        conn.close()
    cut = next(node for node, _, _, detail in rows if detail == "MATERIALIZE pg")
    return [detail for _, parent, _, detail in rows if parent == cut]


@pytest.mark.anyio
async def test_the_slowest_first_page_walks_an_index_instead_of_sorting_every_point(filled: ZooStore) -> None:
    """Unfiltered, slowest first: read 20 entries of point_duration in order, not every point into a sort
    (2 s on the 2.1.2 wheel's 578k points without that index)."""
    plan = _inner_plan(filled.path, Filters(), Page(sort="duration", descending=True))
    assert any(d.startswith("SCAN") and d.endswith("USING INDEX point_duration") for d in plan), plan
    assert not any("TEMP B-TREE" in d for d in plan), plan
    best_first = _inner_plan(filled.path, Filters(), Page(sort="accuracy"))
    assert any(d.startswith("SCAN") and d.endswith("USING INDEX point_accuracy") for d in best_first), best_first
    assert not any("TEMP B-TREE" in d for d in best_first), best_first  # ties too come in page order
    newest = _inner_plan(filled.path, Filters(), Page(sort="created"))
    assert any(d.startswith("SCAN") and d.endswith("USING COVERING INDEX run_created") for d in newest), newest
    assert not any("TEMP B-TREE" in d for d in newest), newest


def _unused_share(path: Path, table: str) -> float:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # leaf pages but the emptiest (an ordered load's last one: with 16 KiB pages a small table's
        # partial last page and its interior page would dominate the share)
        used, unused, last = conn.execute(
            "SELECT SUM(pgsize), SUM(unused), MAX(unused) FROM dbstat WHERE name=? AND pagetype='leaf'",
            (table,)).fetchone()
    finally:
        conn.close()
    return (unused - last) / used


def _counts(path: Path) -> tuple[int, ...]:
    conn = sqlite3.connect(path)
    try:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("model", "run", "point_row", "best_point_row", "point_train"))
    finally:
        conn.close()


def test_a_first_import_fills_its_pages_and_a_second_adds_nothing(tmp_path: Path) -> None:
    """A first import moves its points in one ordered copy: full pages (rows inserted one by one left
    these trees 12 % empty). Importing the same database again adds nothing, into the filled zoo."""
    path = tmp_path / "zoo.sqlite"
    source = _small_db(tmp_path, 30_000)
    first = import_lemur_sync(path, source)
    assert first.points_added >= 30_000 and first.train_points > 0
    counts = _counts(path)
    for table in ("point_row", "point_train", "best_point_row"):
        assert _unused_share(path, table) < 0.05, table
    again = import_lemur_sync(path, source)
    assert (again.runs_added, again.points_added, again.models_added) == (0, 0, 0)
    assert _counts(path) == counts


@pytest.mark.anyio
async def test_a_name_filter_on_points_goes_through_the_runs_without_a_point_model_index(filled: ZooStore) -> None:
    """Points have no model index (7 MB on a 578k-point zoo): a page of named models finds their runs
    (run_model) and their points by the primary key, and answers what the model path answered."""
    assert "point_model" not in {name for name, _ in index_sql(filled.path)}
    f = Filters(nn=("rag-m5",))
    page = await filled.query(f, Page(limit=100))
    expected = await filled.fetchall(
        "SELECT r.uid, p.epoch FROM point p JOIN model m ON m.id = p.model_id JOIN run r ON r.id = p.run_id"
        " WHERE m.name = 'rag-m5' ORDER BY r.uid, p.epoch")
    assert expected and page["total"] == len(expected)
    assert {row["name"] for row in page["rows"]} == {"rag-m5"}
    got = sorted((row["run_uid"], row["epoch"]) for row in page["rows"])
    assert got == [(row["uid"], row["epoch"]) for row in expected]
    sql, args = page_sql(f, Page())
    conn = sqlite3.connect(filled.path)
    try:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
    finally:
        conn.close()
    assert any("run_model" in d for d in plan), plan
    assert any(d.startswith("SEARCH p USING") and "run_id=?" in d for d in plan), plan
    assert not any(d.split()[:2] == ["SCAN", "p"] for d in plan), plan  # no walk of every point


def test_a_new_zoo_has_16_kib_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """Bigger pages fill better (measured 2-3 MB less on an imported zoo); a file that exists keeps its size."""
    from zoo import connection
    new = tmp_path / "new.sqlite"
    connection.initialize(new)
    old = tmp_path / "old.sqlite"
    sqlite3.connect(old).execute("CREATE TABLE t(x)").connection.close()
    connection.initialize(old)
    sizes = []
    for path in (new, old):
        conn = sqlite3.connect(path)
        sizes.append(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.close()
    assert sizes == [connection.NEW_ZOO_PAGE_SIZE, 4096]


@pytest.mark.anyio
async def test_a_point_and_a_best_point_are_as_new_as_their_run_without_storing_it(filled: ZooStore) -> None:
    """A point's `created` is its run's (6 MB of repeated timestamps on a 578k-point zoo): the row tables
    have no such column, the views read it from the run, newest-first pages too."""
    conn = sqlite3.connect(filled.path)
    try:
        for table in ("point_row", "best_point_row"):
            assert "created" not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}, table
        mismatched = conn.execute(
            "SELECT (SELECT COUNT(*) FROM point p JOIN run r ON r.id = p.run_id WHERE p.created IS NOT r.created),"
            " (SELECT COUNT(*) FROM best_point b JOIN run r ON r.id = b.run_id WHERE b.created IS NOT r.created),"
            " (SELECT COUNT(*) FROM point), (SELECT COUNT(*) FROM best_point)").fetchone()
    finally:
        conn.close()
    assert mismatched[:2] == (0, 0) and min(mismatched[2:]) > 0
    newest = await filled.query(Filters(), Page(sort="created", limit=5))
    oldest = await filled.query(Filters(), Page(sort="created", descending=False, limit=5))
    runs = await filled.fetchall("SELECT uid, created FROM run ORDER BY created")
    created = {row["uid"]: row["created"] for row in runs}
    down = [created[r["run_uid"]] for r in newest["rows"]]
    up = [created[r["run_uid"]] for r in oldest["rows"]]
    assert down == sorted(down, reverse=True) and down[0] == max(created.values())
    assert up == sorted(up) and up[0] == min(created.values())


@pytest.mark.anyio
async def test_a_second_run_of_a_uid_is_kept_out_through_the_uid_tail_index(filled: ZooStore) -> None:
    """run.uid has no UNIQUE index any more (8 MB of 88-byte uids on a 578k-record zoo): the store finds a
    uid through run_uid_tail inside its write transaction and does not write a second run of it, even
    one that differs only before its last 16 characters."""
    model_id, _ = await filled.add_model(Model(name="uidm", code="class Net:\n    pass\n", origin="submitted"))
    tail = "0123456789abcdef"
    first = Run(uid=f"job-a/{tail}", task="img-classification", dataset="mnist", metric="acc", status="succeeded",
                source="evaluator", points=[Point(epoch=1.0, accuracy=0.5, duration_ns=10**9)])
    twin = Run(uid=f"job-b/{tail}", task="img-classification", dataset="mnist", metric="acc", status="succeeded",
               source="evaluator", points=[Point(epoch=1.0, accuracy=0.6, duration_ns=10**9)])
    again = Run(uid=first.uid, task="img-classification", dataset="mnist", metric="acc", status="succeeded",
                source="evaluator", points=[Point(epoch=1.0, accuracy=0.9, duration_ns=10**9)])
    written = await filled.add_runs(model_id, [first, twin, again])
    assert [added for _, added in written] == [True, True, False]
    assert written[2][0] == written[0][0]
    rows = await filled.fetchall("SELECT uid, accuracy FROM run WHERE model_id=? ORDER BY uid", (model_id,))
    assert [(r["uid"], r["accuracy"]) for r in rows] == [(first.uid, 0.5), (twin.uid, 0.6)]
    conn = sqlite3.connect(filled.path)
    try:
        indexes = {row[1]: row[2] for row in conn.execute("PRAGMA index_list(run)")}
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN SELECT id FROM run WHERE {schema.RUN_BY_UID}",
                                               (first.uid,))]
    finally:
        conn.close()
    assert not any(unique for unique in indexes.values()), indexes
    assert any("USING INDEX run_uid_tail" in d for d in plan), plan


def test_an_imported_train_loss_is_stored_once_and_read_back_from_the_point(tmp_path: Path) -> None:
    """LEMUR's train_stat.train_loss is the point's loss: point_train does not repeat it (2 MB on a 578k
    zoo), and a run's training diagnostics still show it, epoch by epoch."""
    from zoo.lemur_extras import curve_diagnostics
    path = tmp_path / "zoo.sqlite"
    import_lemur_sync(path, _small_db(tmp_path, 400))
    conn = sqlite3.connect(path)
    try:
        repeated, kept = conn.execute(
            "SELECT COUNT(t.train_loss), COUNT(p.loss) FROM point_train t JOIN point_row p"
            " ON p.run_id = t.run_id AND p.epoch = t.epoch").fetchone()
        run_id = conn.execute(
            "SELECT run_id FROM point_train GROUP BY run_id HAVING COUNT(*) > 1 LIMIT 1").fetchone()[0]
        diagnostics = curve_diagnostics(conn, run_id)
    finally:
        conn.close()
    assert repeated == 0 and kept > 0
    assert [(p["epoch"], p["train_loss"]) for p in diagnostics["points"]] == [
        (p["epoch"], 2.0 / p["epoch"]) for p in diagnostics["points"]]  # the synthetic database's train_loss
    assert len(diagnostics["points"]) > 1


@pytest.mark.anyio
async def test_an_empty_task_dataset_or_metric_is_a_filter_not_an_unfiltered_page(filled: ZooStore) -> None:
    """`dataset=""` filters (on nothing: no point has an empty dataset) and must not send the page to
    point_row, which has no task/dataset/metric columns (an internal error the fuzz test found)."""
    for empty in ({"task": ""}, {"dataset": ""}, {"metric": ""}):
        for page in (Page(sort="name", descending=True, offset=37), Page(sort="accuracy_to_time"), Page()):
            result = await filled.query(Filters(**empty), page)
            assert result["total"] == 0 and result["rows"] == [], (empty, page, result)
