"""LEMUR 2.2.11's Python API, call for call: signatures, NNGPT's positional check_nn call, the name rule,
save_path statistics, exceptions per failure kind, data()'s 2.2 arguments and the side tables."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re
from pathlib import Path

import anyio
import pytest

from lemur_agent_server import api, api_tables
from lemur_agent_server.reference_models import read_code
from sandbox import datasets
from tests import models
from tests.zoo_factory import build_zoo

PRM = {"lr": 0.05, "momentum": 0.9, "batch": 32, "transform": "norm_32", "epoch": 2}

# LEMUR 2.2.11 ab/nn/api.py, read from its wheel: names and defaults in order
LEMUR_CHECK_NN = [("nn_code", inspect.Parameter.empty), ("task", inspect.Parameter.empty),
                  ("dataset", inspect.Parameter.empty), ("metric", inspect.Parameter.empty),
                  ("prm", inspect.Parameter.empty), ("save_to_db", True), ("prefix", None), ("save_path", None),
                  ("export_onnx", False), ("epoch_limit_minutes", 30), ("transform_dir", None)]
LEMUR_DATA = [("only_best_accuracy", False), ("task", None), ("dataset", None), ("metric", None), ("nn", None),
              ("epoch", None), ("max_rows", None), ("sql", None), ("nn_prefixes", None), ("unique_nn", False),
              ("include_nn_stats", False)]
CONSTANT = models.GOOD.replace("return self.head(torch.flatten(self.features(x), 1))",
                               "return 0 * self.head(torch.flatten(self.features(x), 1))")


def positional_then_keyword_only(fn, expected):
    params = list(inspect.signature(fn).parameters.values())
    head, rest = params[:len(expected)], params[len(expected):]
    assert [(p.name, p.default) for p in head] == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in head)
    assert rest and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)


def test_signatures_match_lemur_2_2_11():
    positional_then_keyword_only(api.check_nn, LEMUR_CHECK_NN)
    positional_then_keyword_only(api.data, LEMUR_DATA)
    assert [p for p in inspect.signature(api.nn_stat_data).parameters][:3] == ["nn_name", "prm_id", "max_rows"]
    assert [p for p in inspect.signature(api.run_data).parameters][:3] == ["model_name", "device_type", "max_rows"]
    assert [p for p in inspect.signature(api.prun_data).parameters][:4] == ["model_name", "pruning_method",
                                                                            "task_dataset", "max_rows"]


def test_lemur_name_rule():
    code = "class Net:\n    pass\n"
    digest = hashlib.md5(b"classNet:pass").hexdigest()
    assert api.lemur_name(code) == digest
    assert api.lemur_name(code, "C10C") == f"C10C-{digest}"
    assert api.lemur_name("class  Net:\n\tpass") == digest  # whitespace never counts, as in LEMUR


def test_unsupported_options_refused_before_any_work(tmp_path: Path):
    zoo = tmp_path / "zoo.sqlite"
    with pytest.raises(api.UnsupportedOptionError) as custom:
        api.check_nn(models.GOOD, "img-classification", "digits", "acc", dict(PRM), transform_dir="/my/transforms",
                     zoo=zoo)
    assert "norm_32" in str(custom.value) and "/my/transforms" in str(custom.value)
    assert isinstance(custom.value, api.CheckNNError)
    assert not zoo.exists()  # refused before the zoo was even opened
    with pytest.raises(api.InvalidRequestError, match="dataset"):
        api.check_nn(models.GOOD, "img-classification", "no-such-set", "acc", dict(PRM), zoo=zoo)


def test_error_classes_by_kind():
    cases = {"syntax": api.CodeSyntaxError, "contract": api.ContractError, "shape": api.OutputShapeError,
             "exception": api.TrainingError, "nan_loss": api.NanLossError, "out_of_memory": api.OutOfMemoryError,
             "timeout": api.LearnTimeError, "sandbox": api.SandboxError, "cancelled": api.CancelledError,
             "interrupted": api.CancelledError, "something new": api.CheckNNError}
    for kind, cls in cases.items():
        result = {"job_id": "j", "status": "failed", "result": {"accuracy": 0.2, "duration_ns": 5},
                  "error": {"kind": kind, "message": "m"}}
        err = api.error_for("failed", result)
        assert type(err) is cls and err.result is result and err.accuracy == 0.2 and err.duration == 5
    assert type(api.error_for("timed_out", {"error": None})) is api.LearnTimeError
    assert api.LearnTimeException is api.LearnTimeError and api.AccuracyException is api.AccuracyError


def test_nngpt_positional_call_writes_lemur_statistics(tmp_path: Path, data_root: Path, monkeypatch):
    zoo = tmp_path / "zoo.sqlite"
    monkeypatch.setenv("LEMUR_DATA", str(data_root))
    monkeypatch.setenv("LEMUR_ZOO", str(zoo))
    monkeypatch.setenv("LEMUR_SANDBOX", "process")
    code, task, dataset, metric, save_to_db, prefix = read_code("LeNet5"), "img-classification", "digits", "acc", \
        True, "C10C"
    prm = copy.deepcopy(PRM)
    save_path = str(tmp_path / "stat" / "img-classification_digits_acc_new")
    result = api.check_nn(code, task, dataset, metric, prm, save_to_db, prefix, save_path)  # NNGPT's call
    name, accuracy, a2t, quality = result
    digest = hashlib.md5(re.sub(r"\s", "", code).encode()).hexdigest()
    assert name == f"C10C-{digest}" and 0.3 < accuracy <= 1 and a2t > 0 and 0 < quality <= 1
    assert prm == PRM
    frame = api.data(task=task, dataset=dataset)
    assert digest in set(frame["nn_id"])  # NNGPT's duplicate check finds the model by its md5

    files = sorted(p.name for p in Path(save_path).iterdir())
    assert files == ["1.json", "2.json"]
    records = {int(p.stem): json.loads(p.read_text()) for p in Path(save_path).iterdir()}
    for items in records.values():
        assert len(items) == 1
        rec = items[0]
        for key, value in PRM.items():
            assert rec[key] == value
        assert rec["task"] == task and rec["dataset"] == dataset and rec["metric"] == metric and rec["model"] == name
        assert isinstance(rec["duration"], int) and rec["duration"] > 0
        assert rec["metric_acc"] == rec["accuracy"] and 0 < rec["accuracy"] <= 1
        assert rec["train_stat"]["device"] == "cpu" and rec["train_stat"]["train_loss"] > 0
    assert records[1][0]["uid"] == records[2][0]["uid"] and re.fullmatch(r"[0-9a-f]{32}", records[1][0]["uid"])
    assert records[2][0]["accuracy"] == accuracy and records[2][0]["duration"] > records[1][0]["duration"]

    # a second call adds its trial to the same files, best first, as LEMUR's save_results does
    api.check_nn(code, task, dataset, metric, dict(PRM, lr=0.02), save_to_db, prefix, save_path)
    again = json.loads((Path(save_path) / "2.json").read_text())
    assert len(again) == 2 and again[0]["accuracy"] >= again[1]["accuracy"]
    assert {r["lr"] for r in again} == {0.05, 0.02}


def test_low_accuracy_raises_accuracy_exception(tmp_path: Path, data_root: Path, monkeypatch):
    monkeypatch.setenv("LEMUR_DATA", str(data_root))
    with pytest.raises(api.AccuracyException) as low:
        api.check_nn(CONSTANT, "img-classification", "digits", "acc", dict(PRM, epoch=1), False,
                     zoo=tmp_path / "zoo.sqlite", sandbox="process")
    assert low.value.accuracy is not None
    assert low.value.accuracy <= 1.2 * datasets.get_info("digits").chance
    assert low.value.result["status"] == "succeeded"


def test_data_takes_lemur_2_2_arguments(tmp_path: Path):
    zoo = tmp_path / "zoo.sqlite"

    async def build():
        store = await build_zoo(zoo, n_models=3, trials=1)
        await store.close()

    anyio.run(build)
    api.data.cache_clear()  # NNGPT calls it after every evaluation
    frame = api.data(False, "img-classification", "cifar-10", "acc", None, 2.0, None, None, None, False, True,
                     zoo=zoo)
    assert len(frame) == 3
    assert set(api_tables.NN_STAT_COLUMNS) <= set(frame.columns) and len(api_tables.NN_STAT_COLUMNS) == 29
    assert sorted(frame["nn_total_params"]) == [1000, 2000, 3000]
    assert all(frame["nn_code_length"] == frame["nn_code"].str.len())
    assert frame["nn_max_depth"].isna().all()  # not measured and no imported nn_stat: unknown, not zero
    assert "nn_fingerprint" in frame.columns and "nn_code_quality" in frame.columns
    assert "nn_total_params" not in api.data(zoo=zoo).columns
    with pytest.raises(ValueError, match="JoinConf"):
        api.data(sql=object(), zoo=zoo)

    # no LEMUR side tables imported: empty frames with LEMUR's columns
    assert list(api.nn_stat_data(zoo=zoo).columns) == api_tables.NN_STAT_DATA_COLUMNS
    assert api.nn_stat_data(zoo=zoo).empty and api.run_data(zoo=zoo).empty and api.prun_data(zoo=zoo).empty
    assert list(api.run_data(zoo=zoo).columns) == api_tables.RUN_DATA_COLUMNS
    assert list(api.prun_data(zoo=zoo).columns) == api_tables.PRUN_DATA_COLUMNS

    # imported LEMUR side tables (nn_stat, run, tflite, prun) are read in tests/test_lemur_tables.py


def test_save_path_without_archive_writes_the_known_points(tmp_path: Path):
    """save_to_db=False archives no run: the statistics come from the job's result (its curve, if given)."""
    zoo = tmp_path / "zoo.sqlite"
    api.data(zoo=zoo)  # creates the empty zoo
    res = {"accuracy": 0.5, "epochs": 2.0, "duration_ns": 2000, "prm": {"lr": 0.1}}
    uid, curve = api._curve(zoo, "job-none", res)
    assert curve == [{"epoch": 2.0, "accuracy": 0.5, "duration_ns": 2000}]
    api._write_save_path(tmp_path / "s", "n-1", "img-classification", "digits", "acc", dict(PRM), uid, curve)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["2.json"]
    with_curve = dict(res, curve=[{"epoch": 0.5, "accuracy": 0.3}, {"epoch": 1.0, "accuracy": 0.4, "loss": 1.5},
                                  {"epoch": 2.0, "accuracy": 0.5}])
    uid, curve = api._curve(zoo, "job-none", with_curve)
    api._write_save_path(tmp_path / "c", "n-1", "img-classification", "digits", "acc", dict(PRM), uid, curve)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["1.json", "2.json"]
    one = json.loads((tmp_path / "c" / "1.json").read_text())[0]
    assert one["accuracy"] == 0.4 and one["train_stat"] == {"train_loss": 1.5} and one["transform"] == "norm_32"
