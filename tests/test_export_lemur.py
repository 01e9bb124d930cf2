"""export-lemur: the zoo's runs as LEMUR 2.2 statistics files, read back by our importer unchanged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anyio

from lemur_agent_server import lemur_export
from lemur_agent_server.lemur_import import import_lemur_sync
from tests.zoo_factory import CODE, build_zoo
from zoo import connection
from zoo.records import Model, Point, Run
from zoo.store import ZooStore


def make_zoo(path: Path) -> None:
    async def build():
        store = await build_zoo(path, n_models=3, trials=2)
        # not exportable: LEMUR splits folder names on '_'
        await store.add_model_with_runs(Model(name="bad_name", code=CODE.format(i=99), origin="submitted"), [
            Run(uid="bad-1", task="img-classification", dataset="mnist", metric="acc", status="succeeded",
                source="evaluator", prm={"lr": 0.1}, points=[Point(epoch=1.0, accuracy=0.5, duration_ns=10)])])
        # failed runs stay out by default
        await store.add_runs(1, [Run(uid="failed-1", task="img-classification", dataset="mnist", metric="acc",
                                     status="failed", source="evaluator", prm={"lr": 0.3}, transform="norm_32",
                                     points=[Point(epoch=1.0, accuracy=0.2, duration_ns=10)])])
        await store.close()

    anyio.run(build)


def records(path: Path, source: str | None = None) -> set[tuple]:
    """Every whole-epoch point as (model, code, task, dataset, metric, prm, epoch, accuracy, duration)."""
    conn = connection.connect_sync(path, readonly=True)
    try:
        rows = conn.execute(
            "SELECT m.name, m.code, r.task, r.dataset, r.metric, r.prm, p.epoch, p.accuracy, p.duration_ns "
            "FROM point p JOIN run r ON r.id = p.run_id JOIN model m ON m.id = r.model_id "
            "WHERE r.status IN ('succeeded', 'imported') AND p.epoch = CAST(p.epoch AS INTEGER) "
            "AND m.name != 'bad_name'").fetchall()
    finally:
        conn.close()
    return {(*r[:5], json.dumps(json.loads(r[5]), sort_keys=True), *r[6:]) for r in rows}


def runs_per_model(path: Path) -> dict[str, int]:
    conn = connection.connect_sync(path, readonly=True)
    try:
        return dict(conn.execute("SELECT m.name, COUNT(*) FROM run r JOIN model m ON m.id = r.model_id "
                                 "WHERE r.status IN ('succeeded', 'imported') AND m.name != 'bad_name' "
                                 "GROUP BY m.name").fetchall())
    finally:
        conn.close()


def test_export_then_import_gives_the_same_records(tmp_path: Path):
    zoo, fresh, out = tmp_path / "zoo.sqlite", tmp_path / "fresh.sqlite", tmp_path / "out"
    make_zoo(zoo)
    report = lemur_export.export_lemur(zoo, out)
    assert report.models == 3 and report.runs == 12 and report.records == 24  # 3 models x 2 sets x 2 trials
    assert report.skipped == {"model name 'bad_name' contains '_' or '/' (LEMUR splits its folder names on '_')": 1}
    assert (out / "ab/nn/nn/alt-m0.py").read_text() == CODE.format(i=0)
    stat = out / "ab/nn/stat/train/img-classification_mnist_acc_rag-m1"
    assert sorted(p.name for p in stat.iterdir()) == ["1.json", "2.json"]  # half epochs are not LEMUR records
    first = json.loads((stat / "2.json").read_text())
    assert [r["accuracy"] for r in first] == sorted((r["accuracy"] for r in first), reverse=True)
    assert {k for k in first[0] if k != "train_stat"} == {
        "lr", "batch", "transform", "uid", "accuracy", "duration", "duration_seconds", "metric_acc", "task",
        "dataset", "metric", "model"}

    imported = import_lemur_sync(fresh, out)
    assert imported.problems_total == 0 and imported.runs_added == 12
    assert records(fresh) == records(zoo)
    assert runs_per_model(fresh) == runs_per_model(zoo) == {"alt-m0": 4, "rag-m1": 4, "alt-m2": 4}  # same runs
    assert len(records(zoo)) == 24

    again = lemur_export.export_lemur(zoo, out)  # same OUT: records replaced, not added
    assert again.records == 24
    assert json.loads((stat / "2.json").read_text()) == first
    assert import_lemur_sync(fresh, out).runs_added == 0


def test_cli_filters(tmp_path: Path, capsys):
    zoo, out = tmp_path / "zoo.sqlite", tmp_path / "out"
    make_zoo(zoo)
    parser = argparse.ArgumentParser()
    lemur_export.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-lemur", str(out), "--zoo", str(zoo), "--dataset", "mnist",
                              "--nn-prefix", "rag-", "--status", "succeeded", "--status", "failed"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["runs"] == 2 and printed["models"] == 1  # rag-m1's two mnist trials (the failed run is alt-m0's)
    assert sorted(p.name for p in (out / "ab/nn/stat/train").iterdir()) == ["img-classification_mnist_acc_rag-m1"]

    failed = parser.parse_args(["export-lemur", str(tmp_path / "failed"), "--zoo", str(zoo), "--nn", "alt-m0",
                                "--dataset", "mnist", "--status", "failed"])
    assert failed.func(failed) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 1

    missing = parser.parse_args(["export-lemur", str(out), "--zoo", str(tmp_path / "none.sqlite")])
    assert missing.func(missing) == 2
    assert "No zoo at" in capsys.readouterr().err


def test_imported_runs_only_on_request(tmp_path: Path):
    zoo, out = tmp_path / "zoo.sqlite", tmp_path / "out"

    async def build():
        store = await ZooStore.open(zoo)
        await store.add_model_with_runs(Model(name="AlexNet", code=CODE.format(i=1), origin="lemur"), [
            Run(uid="lemur:x:1", task="img-classification", dataset="cifar-10", metric="acc", status="imported",
                source="lemur-import", prm={"lr": 0.1, "transform": "norm_32"},
                points=[Point(epoch=1.0, accuracy=0.5, duration_ns=10)])])
        await store.close()

    anyio.run(build)
    assert lemur_export.export_lemur(zoo, out).runs == 0
    assert lemur_export.export_lemur(zoo, out, include_imported=True).runs == 1


def test_every_record_names_its_transform(tmp_path: Path):
    """LEMUR's importer reads record['transform'] and skips the whole file when a record lacks it."""
    zoo, out = tmp_path / "zoo.sqlite", tmp_path / "out"

    async def build():
        store = await ZooStore.open(zoo)
        point = [Point(epoch=1.0, accuracy=0.5, duration_ns=10)]
        await store.add_model_with_runs(Model(name="m-1", code=CODE.format(i=1), origin="submitted"), [
            Run(uid="a", task="img-classification", dataset="mnist", metric="acc", status="succeeded",
                source="evaluator", prm={"lr": 0.1}, transform="norm_64", points=point),
            Run(uid="b", task="img-classification", dataset="cifar-10", metric="acc", status="succeeded",
                source="evaluator", prm={"lr": 0.1}, points=point)])
        await store.close()

    anyio.run(build)
    report = lemur_export.export_lemur(zoo, out)
    assert report.runs == 1 and report.skipped == {"no whole-epoch curve point, or no transform": 1}
    rec = json.loads((out / "ab/nn/stat/train/img-classification_mnist_acc_m-1/1.json").read_text())[0]
    assert rec["transform"] == "norm_64" and rec["lr"] == 0.1
