"""Which protocol produced a number, and the spread of repeated runs, in the queries (issue 13).

A real zoo file with known runs: LEMUR imports (protocol lemur, one written by a bulk loader that leaves
the column NULL), our default-protocol runs with a repeat group (the selected trial and two repeats), and
one model with runs under both protocols whose better run is LEMUR's.
"""

from __future__ import annotations

import sqlite3
import statistics
from pathlib import Path

import pytest
from mcp import Client

from lemur_agent_server.server import build_server
from stats import aggregates
from tests.test_evaluate import call
from zoo.query import Filters, Page
from zoo.records import Model, Point, Run
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio
CODE = "import torch\n\n\nclass Net(torch.nn.Module):\n    WIDTH = {i}\n"
GROUP = (0.80, 0.84, 0.78)  # the default model's selected trial and its two repeats
GROUP_S = (10.0, 12.0, 11.0)


def run(uid: str, accuracy: float, source: str = "evaluator", protocol: str | None = None, job_id: str | None = None,
        trial: int = 0, repeat: int = 0, selected: bool = False, seconds: float = 10.0) -> Run:
    ns = int(seconds * 1e9)
    return Run(uid=uid, task="img-classification", dataset="mnist", metric="acc", status="succeeded"
               if source == "evaluator" else "imported", source=source, protocol=protocol, job_id=job_id,
               trial=trial, repeat=repeat, selected=selected, prm={"epoch": 1},
               points=[Point(epoch=1.0, accuracy=accuracy, duration_ns=ns)])


async def build(path: Path) -> ZooStore:
    store = await ZooStore.open(path)
    await store.add_model_with_runs(Model(name="Imported", code=CODE.format(i=1), origin="lemur"),
                                    [run("lemur-1", 0.95, source="lemur-import")])
    repeats = [run(f"j1:t{1000 * r}", acc, job_id="j1", repeat=r, selected=r == 0, seconds=s)
               for r, (acc, s) in enumerate(zip(GROUP, GROUP_S, strict=True))]
    await store.add_model_with_runs(Model(name="Ours", code=CODE.format(i=2), origin="submitted"),
                                    [*repeats, run("j1:t1", 0.70, job_id="j1", trial=1)])
    await store.add_model_with_runs(Model(name="Both", code=CODE.format(i=3), origin="submitted"), [
        run("j2:t0", 0.60, job_id="j2", selected=True), run("j3:t0", 0.90, protocol="lemur", job_id="j3",
                                                                 selected=True)])
    # a bulk importer writes its rows without the column: the source says the protocol
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE run SET protocol = NULL WHERE uid = 'lemur-1'")
        conn.commit()
    finally:
        conn.close()
    return store


async def test_points_filter_by_protocol_and_carry_the_repeat_group(tmp_path):
    store = await build(tmp_path / "zoo.sqlite")
    try:
        lemur = await store.query(Filters(protocol="lemur"), Page(limit=50))
        default = await store.query(Filters(protocol="default"), Page(limit=50))
        both = await store.query(Filters(), Page(limit=50))
        best_default = await store.query(Filters(protocol="default", unique_nn=True), Page(limit=50))
        best_lemur = await store.query(Filters(protocol="lemur", only_best_accuracy=True), Page(limit=50))
    finally:
        await store.close()
    assert sorted((r["name"], r["accuracy"]) for r in lemur["rows"]) == [("Both", 0.90), ("Imported", 0.95)]
    assert {r["protocol"] for r in lemur["rows"]} == {"lemur"} and lemur["total"] == 2
    assert sorted(r["accuracy"] for r in default["rows"]) == sorted([*GROUP, 0.70, 0.60])
    assert both["total"] == 7
    # the best point per model among the protocol's runs, not the best of any protocol
    assert {r["name"]: r["accuracy"] for r in best_default["rows"]} == {"Ours": 0.84, "Both": 0.60}
    assert {r["name"]: r["accuracy"] for r in best_lemur["rows"]} == {"Imported": 0.95, "Both": 0.90}
    groups = {r["run_uid"]: r["repeat_group"] for r in default["rows"]}
    expected = {"n": 3, "accuracy_mean": statistics.fmean(GROUP), "accuracy_std": statistics.stdev(GROUP),
                "duration_s_mean": statistics.fmean(GROUP_S), "duration_s_std": statistics.stdev(GROUP_S)}
    for uid in ("j1:t0", "j1:t1000", "j1:t2000", "j1:t1"):  # the group's runs and the job's other trial
        assert groups[uid]["job_id"] == "j1"
        assert {k: groups[uid][k] for k in expected} == pytest.approx(expected)
    assert groups["j2:t0"] is None  # a job without repeats has no group


async def test_scores_and_the_leaderboard_by_protocol_with_mean_and_std(tmp_path):
    path = tmp_path / "zoo.sqlite"
    await (await build(path)).close()
    conn = sqlite3.connect(path)
    try:
        ours, _ = aggregates.leaderboard(conn, Filters(protocol="default"))
        theirs, _ = aggregates.leaderboard(conn, Filters(protocol="lemur"))
    finally:
        conn.close()
    assert dict(zip(ours["name"], ours["accuracy"], strict=True)) == {"Ours": 0.84, "Both": 0.60}
    assert dict(zip(theirs["name"], theirs["accuracy"], strict=True)) == {"Imported": 0.95, "Both": 0.90}
    group = ours.set_index("name")["repeat_group"]
    assert group["Ours"]["n"] == 3
    assert group["Ours"]["accuracy_mean"] == pytest.approx(statistics.fmean(GROUP))
    assert group["Ours"]["accuracy_std"] == pytest.approx(statistics.stdev(GROUP))
    assert group["Both"] is None


async def test_query_models_tool_filters_by_protocol(tmp_path, make_settings):
    settings = make_settings(seed_zoo=False)
    await (await build(settings.zoo_path)).close()
    async with Client(build_server(settings)) as client:
        lemur = await call(client, "query_models", protocol="lemur", unique_nn=True)
        ours = await call(client, "query_models", protocol="default", view="models")
        bad = await client.call_tool("query_models", {"protocol": "nas-bench"})
    assert {(r["name"], r["accuracy"]) for r in lemur["rows"]} == {("Imported", 0.95), ("Both", 0.90)}
    assert {(m["name"], m["accuracy"]) for m in ours["models"] if m["score"] is not None} == {
        ("Ours", 0.84), ("Both", 0.60)}
    assert bad.is_error


async def test_the_tools_show_protocol_and_repeat_spread_on_their_rows(tmp_path, make_settings):
    """What an agent sees: the leaderboard tool filters by protocol and shows the repeat group's mean and
    std; query_models' rows say their protocol; list_catalog says what each protocol's accuracy is."""
    settings = make_settings(seed_zoo=False)
    await (await build(settings.zoo_path)).close()
    async with Client(build_server(settings)) as client:
        board = await call(client, "leaderboard", protocol="default")
        points = await call(client, "query_models", nn=["Ours"], limit=10)
        catalog = await call(client, "list_catalog")
    rows = {r["name"]: r for r in board["rows"]}
    assert set(rows) == {"Ours", "Both"} and rows["Both"]["accuracy"] == 0.60
    assert rows["Ours"]["repeat_group"]["n"] == 3
    assert rows["Ours"]["repeat_group"]["accuracy_std"] == pytest.approx(statistics.stdev(GROUP))
    assert {r["protocol"] for r in points["rows"]} == {"default"}
    assert any(r["repeat_group"] and r["repeat_group"]["n"] == 3 for r in points["rows"])
    assert set(catalog["accuracy_protocols"]) == {"default", "lemur"}


def test_an_older_zoo_gets_the_protocol_of_its_runs(tmp_path):
    from zoo import connection, schema

    path = tmp_path / "old.sqlite"
    old = schema.MIGRATIONS.index(next(m for m in schema.MIGRATIONS if any("ADD COLUMN protocol" in s for s in m)))
    conn = sqlite3.connect(path)
    try:  # the zoo as the version before this migration left it, with one run of each source
        for statements in schema.MIGRATIONS[:old]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(old),))
        conn.execute("INSERT INTO model(name, code, code_hash, lemur_id, origin, created) VALUES('M', '', '', '', "
                     "'lemur', 0)")
        for uid, source in (("a", "lemur-import"), ("b", "evaluator")):
            conn.execute("INSERT INTO run(uid, model_id, task, dataset, metric, status, source, created) "
                         "VALUES(?, 1, 't', 'd', 'acc', 'imported', ?, 0)", (uid, source))
        conn.commit()
    finally:
        conn.close()
    connection.initialize(path)
    conn = sqlite3.connect(path)
    try:
        assert dict(conn.execute("SELECT uid, protocol FROM run").fetchall()) == {"a": "lemur", "b": "default"}
    finally:
        conn.close()


def test_lemur_protocol_spec_has_no_validation_split_and_lemur_normalization():
    from lemur_agent_server.evaluator import protocols
    from sandbox import datasets

    cifar100, mnist = datasets.get_info("cifar-100"), datasets.get_info("mnist")
    lemur = protocols.spec_fields("lemur", cifar100)
    assert lemur["val_fraction"] == 0.0 and lemur["eval_protocol"] == "lemur"
    assert lemur["mean"] == [0.5071, 0.4867, 0.4408] != list(cifar100.mean)
    assert protocols.spec_fields("lemur", mnist)["std"] == list(mnist.std)  # LEMUR's equal ours there
    assert protocols.spec_fields("default", cifar100) == {"eval_protocol": "default", "val_fraction": 0.1,
                                                          "split_seed": 42}
    assert protocols.train_samples("lemur", 1000, None) == 1000
    assert protocols.train_samples("default", 1000, 500) == 450
