"""`import-lemur`'s progress bar counts what the importer counts: rows of a LEMUR 2.2 database, files of a
checkout or wheel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lemur_agent_server import cli
from tests import lemur_fixture
from tests.conftest import REPO


def run_import(path: Path, zoo: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    assert cli.main(["import-lemur", "--zoo", str(zoo), str(path)]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_database_import_counts_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "lemur" / "db" / "ab.nn.db"
    db.parent.mkdir(parents=True)
    lemur_fixture.build_db(db)
    for path in (db, tmp_path / "lemur"):  # the file, or the folder holding db/ab.nn.db
        report, err = run_import(path, tmp_path / f"zoo-{path.name}.sqlite", capsys)
        assert report["source"] == "lemur-db"
        assert "row/s" in err and "file/s" not in err, err


def test_checkout_import_counts_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, err = run_import(REPO / "tests" / "fixtures" / "lemur", tmp_path / "zoo.sqlite", capsys)
    assert report["runs_added"] > 0
    assert "file/s" in err and "row/s" not in err, err
