"""The LEMUR-compatible Python API (check_nn) and the command line, as a user runs them."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lemur_agent_server import api
from lemur_agent_server.reference_models import read_code
from tests import models
from tests.conftest import REPO

PRM = {"lr": 0.05, "momentum": 0.9, "batch": 32, "transform": "norm_32", "epoch": 2}


def test_check_nn_like_lemur(tmp_path: Path, data_root: Path, monkeypatch):
    monkeypatch.setenv("LEMUR_DATA", str(data_root))
    zoo = tmp_path / "zoo.sqlite"
    prm = copy.deepcopy(PRM)
    name, accuracy, a2t, quality = api.check_nn(read_code("LeNet5"), "img-classification", "digits", "acc", prm,
                                                prefix="api", zoo=zoo, sandbox="process")
    assert prm == PRM  # never mutates the caller's prm
    assert name.startswith("api-") and 0.3 < accuracy <= 1 and a2t > 0 and 0 < quality <= 1
    frame = api.data(zoo=zoo)
    frame = frame[frame["nn_id"] == name.removeprefix("api-")]  # LEMUR's name: prefix-md5 = prefix-nn_id
    assert sorted(frame["epoch"]) == [0.5, 1.0, 1.5, 2.0]  # a curve point every half epoch
    assert frame.iloc[-1]["prm"]["lr"] == 0.05

    with pytest.raises(api.CheckNNError) as failed:
        api.check_nn(models.RAISES_IN_LEARN, "img-classification", "digits", "acc", dict(PRM), zoo=zoo,
                     sandbox="process")
    assert failed.value.result["error"]["kind"] == "exception"
    assert "boom in learn" in json.dumps(failed.value.result)

    before = len(api.data(zoo=zoo))
    api.check_nn(models.GOOD, "img-classification", "digits", "acc", dict(PRM), save_to_db=False, zoo=zoo,
                 sandbox="process")
    assert len(api.data(zoo=zoo)) == before  # save_to_db=False archives nothing


def cli(*args: str, zoo: Path, data_root: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEMUR_NO_SEED": "1"}
    proc = subprocess.run([sys.executable, "-m", "lemur_agent_server", *args, "--zoo", str(zoo),
                           "--data-root", str(data_root)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_check_submit_query_import(tmp_path: Path, data_root: Path):
    zoo = tmp_path / "zoo.sqlite"
    model = tmp_path / "net.py"
    model.write_text(models.GOOD)
    checked = json.loads(cli("check", str(model), "--dataset", "digits", "--sandbox", "process", zoo=zoo,
                             data_root=data_root).stdout)
    assert checked["status"] == "succeeded" and checked["result"]["params"] > 0

    broken = tmp_path / "broken.py"
    broken.write_text(models.SYNTAX)
    failed = cli("check", str(broken), "--dataset", "digits", zoo=zoo, data_root=data_root, check=False)
    assert failed.returncode == 1 and '"kind": "syntax"' in failed.stdout

    done = cli("submit", str(model), "--dataset", "digits", "--sandbox", "process", "--trials", "1",
               "--epochs", "1", "--budget-s", "120", "--prm", json.dumps({"batch": 32}), "--wait",
               zoo=zoo, data_root=data_root)
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded", job
    rows = json.loads(cli("query", "--dataset", "digits", "--json", zoo=zoo, data_root=data_root).stdout)
    assert {r["nn"] for r in rows} == {job["model_name"]} and len(rows) == 2

    imported = json.loads(cli("import-lemur", str(REPO / "tests" / "fixtures" / "lemur"), zoo=zoo,
                              data_root=data_root).stdout)
    assert imported["runs_added"] == 9
    again = json.loads(cli("import-lemur", str(REPO / "tests" / "fixtures" / "lemur"), zoo=zoo,
                           data_root=data_root).stdout)
    assert again["runs_added"] == 0
