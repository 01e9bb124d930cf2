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


def test_import_with_analyze_measures_the_imported_models(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`import-lemur --analyze` leaves no imported model without its parameter count (or a recorded reason)."""
    import sqlite3

    monkeypatch.setenv("LEMUR_SANDBOX", "process")
    zoo = tmp_path / "zoo.sqlite"
    assert cli.main(["import-lemur", "--zoo", str(zoo), "--analyze", str(REPO / "tests" / "fixtures" / "lemur")]) == 0
    out = capsys.readouterr()
    assert "analyze" in out.err
    conn = sqlite3.connect(zoo)
    try:
        missing = conn.execute(
            "SELECT m.name FROM model m LEFT JOIN model_analysis a ON a.model_id = m.id "
            "WHERE m.origin = 'lemur' AND m.params IS NULL AND a.model_id IS NULL").fetchall()
        measured = conn.execute("SELECT COUNT(*) FROM model WHERE origin = 'lemur' AND params > 0").fetchone()[0]
    finally:
        conn.close()
    assert missing == [] and measured > 0
