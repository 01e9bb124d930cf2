"""export_onnx: the selected trial's model exported to ONNX in the sandbox, archived beside its safetensors,
copied into check_nn's save_path, and loadable by onnx / onnxruntime with the torch model's predictions.

The sandbox backend is LEMUR_TEST_SANDBOX's (process by default; `docker` runs the same cases in the image).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import types
import warnings
from pathlib import Path

import anyio
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from lemur_agent_server import api
from lemur_agent_server.evaluator import jobfiles, onnx_files
from sandbox import protocol
from tests import models
from zoo import schema
from zoo.store import ZooStore, weights_dir_of

PRM = {"lr": 0.05, "momentum": 0.9, "batch": 32, "transform": "norm_32", "epoch": 1}
TASK, DATASET, METRIC = "img-classification", "digits", "acc"
SANDBOX = os.environ.get("LEMUR_TEST_SANDBOX", "process")
# torch.histc has no ONNX function in either exporter (dynamo: NotImplementedError, TorchScript:
# UnsupportedOperatorError); multiplied by 0 it leaves the logits, and so the training, as they are
UNEXPORTABLE = models.tiny(forward_extra="x = x + 0 * torch.histc(x, bins=4).sum()")
# a Python branch on a tensor's value: torch.export cannot capture it, the TorchScript tracer records the branch taken
DATA_DEPENDENT = models.tiny(forward_extra="x = x * 2 if float(x.mean()) > 100 else x")


def _check_nn(code: str, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, save_to_db: bool = True):
    monkeypatch.setenv("LEMUR_DATA", str(data_root))
    zoo, save_path = tmp_path / "zoo.sqlite", tmp_path / "stat" / "img-classification_digits_acc_new"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name, accuracy, _a2t, _quality = api.check_nn(code, TASK, DATASET, METRIC, dict(PRM), save_to_db, None,
                                                      str(save_path), True, zoo=zoo, sandbox=SANDBOX,
                                                      max_train_samples=400)
    assert accuracy > 0.12
    conn = sqlite3.connect(zoo)
    try:
        (result,) = conn.execute("SELECT result FROM job").fetchone()
    finally:
        conn.close()
    ours = [str(w.message) for w in caught if str(w.message).startswith("check_nn")]  # not asyncio's ResourceWarnings
    return zoo, save_path, name, json.loads(result), ours


def _model_detail(zoo: Path, name: str) -> dict:
    async def read() -> dict:
        store = await ZooStore.open(zoo)
        try:
            detail = await store.model_detail(name)
            assert detail is not None
            return detail
        finally:
            await store.close()

    return anyio.run(read)


def _torch_net(weights: Path) -> torch.nn.Module:
    """The test's own model file (trusted code), built as the runner builds it, with the archived weights."""
    module = types.ModuleType("tiny_net")
    exec(compile(models.GOOD, "tiny_net.py", "exec"), module.__dict__)  # noqa: S102 - our own test model
    net = module.Net((1, 1, 32, 32), (10,), dict(PRM), torch.device("cpu"))
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def test_check_nn_exports_onnx_that_onnxruntime_runs_like_the_torch_model(tmp_path: Path, data_root: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    zoo, save_path, name, result, warned = _check_nn(models.GOOD, tmp_path, data_root, monkeypatch)
    assert warned == [] and "onnx_error" not in result
    assert result["isolation"]["backend"] == SANDBOX  # exported inside the sandbox under test
    exported = save_path / api.ONNX_FILE
    onnx.checker.check_model(onnx.load(str(exported)), full_check=True)
    digest = hashlib.sha256(exported.read_bytes()).hexdigest()
    assert result["onnx"]["sha256"] == digest and result["onnx"]["format"] == "onnx"
    assert result["onnx"]["exporter"] == "dynamo" and result["onnx"]["fallback_from"] is None  # torch's default
    assert 0 < result["onnx"]["seconds"] < 60

    weights = _model_detail(zoo, name)["weights"]  # get_model's weights: the safetensors, and every file of its run
    assert weights["format"] == "safetensors"
    files = {f["format"]: f for f in weights["files"]}
    assert sorted(files) == ["onnx", "safetensors"]
    assert files["onnx"]["sha256"] == digest and files["onnx"]["size"] == exported.stat().st_size
    archived = weights_dir_of(zoo) / files["onnx"]["path"]
    assert archived.read_bytes() == exported.read_bytes()  # content-addressed, like the safetensors
    assert files["onnx"]["path"] == f"{digest[:2]}/{digest}.onnx"

    net = _torch_net(weights_dir_of(zoo) / files["safetensors"]["path"])
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    inputs = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(3))  # another batch than exported
    (logits,) = session.run(None, {feed.name: inputs.numpy()})
    with torch.no_grad():
        expected = net(inputs).numpy()
    assert logits.shape == (5, 10)
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.allclose(logits, expected, atol=1e-4)


def test_a_model_the_exporters_cannot_handle_still_succeeds_with_onnx_error(tmp_path: Path, data_root: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    zoo, save_path, name, result, warned = _check_nn(UNEXPORTABLE, tmp_path, data_root, monkeypatch)
    assert "onnx" not in result and "histc" in result["onnx_error"]
    assert "dynamo exporter" in result["onnx_error"] and "torchscript exporter" in result["onnx_error"]
    assert len(warned) == 1 and "no ONNX export" in warned[0] and "histc" in warned[0]
    assert not (save_path / api.ONNX_FILE).exists() and (save_path / "1.json").exists()
    weights = _model_detail(zoo, name)["weights"]
    assert [f["format"] for f in weights["files"]] == ["safetensors"]


def test_a_model_torch_export_cannot_capture_falls_back_to_the_torchscript_exporter(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch):
    _zoo, save_path, _name, result, warned = _check_nn(DATA_DEPENDENT, tmp_path, data_root, monkeypatch)
    assert warned == [] and result["onnx"]["exporter"] == "torchscript"
    (why,) = result["onnx"]["fallback_from"]
    assert why.startswith("dynamo exporter: ") and "data-dependent" in why
    session = onnxruntime.InferenceSession(str(save_path / api.ONNX_FILE), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.zeros((4, 1, 32, 32), np.float32)})
    assert logits.shape == (4, 10)  # the batch dimension stays dynamic with this exporter too


def test_without_save_to_db_the_onnx_file_still_reaches_save_path(tmp_path: Path, data_root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    zoo, save_path, _name, result, _warned = _check_nn(models.GOOD, tmp_path, data_root, monkeypatch,
                                                       save_to_db=False)
    exported = save_path / api.ONNX_FILE
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == result["onnx"]["sha256"]
    conn = sqlite3.connect(zoo)
    try:
        assert conn.execute("SELECT COUNT(*) FROM weights").fetchone() == (0,)  # nothing archived in the zoo
    finally:
        conn.close()


def test_the_host_archives_only_plain_onnx_files_from_out(tmp_path: Path):
    out, store = tmp_path / "out", tmp_path / "store"
    (out / "onnx").mkdir(parents=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    good = out / protocol.onnx_name(0)
    torch.onnx.export(model, (torch.randn(2, 1, 2, 2),), str(good), dynamo=False)
    sha, size, rel = onnx_files.archive_onnx(out, protocol.onnx_name(0), store)
    assert (store / rel).read_bytes() == good.read_bytes() and size == good.stat().st_size
    assert rel == f"{sha[:2]}/{sha}.onnx"

    (out / "onnx" / "t1.onnx").write_bytes(b'{"not": "a model"}')
    (out / "onnx" / "t2.onnx").symlink_to(good)
    (out / "weights").mkdir()
    (out / "weights" / "t3.safetensors").write_bytes(good.read_bytes())
    for rel_bad, why in (("onnx/t1.onnx", "not an ONNX model"), ("onnx/t2.onnx", "cannot be opened"),
                         ("weights/t3.safetensors", "not an .onnx file"), ("../x.onnx", "leaves")):
        with pytest.raises(jobfiles.OutputError, match=why):
            onnx_files.archive_onnx(out, rel_bad, store)


def test_the_weights_migration_keeps_every_row_and_allows_one_per_format(tmp_path: Path):
    ours = next(i for i, m in enumerate(schema.MIGRATIONS) if any("weights_by_format" in s for s in m))
    conn = sqlite3.connect(tmp_path / "zoo.sqlite", isolation_level=None)
    for statements in schema.MIGRATIONS[:ours]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(ours),))
    conn.execute("INSERT INTO model(id, name, code, code_hash, lemur_id, origin, created) "
                 "VALUES(1, 'm', 'code', 'h', 'l', 'submitted', 0)")
    conn.execute("INSERT INTO run(id, uid, model_id, task, dataset, metric, status, source, created) "
                 "VALUES(7, 'j:t0', 1, 't', 'd', 'acc', 'succeeded', 'evaluator', 0)")
    conn.execute("INSERT INTO weights(run_id, sha256, size, path) VALUES(7, 'abc', 10, 'ab/abc.safetensors')")
    schema.migrate(conn)
    assert conn.execute("SELECT run_id, sha256, size, path, format FROM weights").fetchall() == [
        (7, "abc", 10, "ab/abc.safetensors", "safetensors")]
    conn.execute("INSERT INTO weights(run_id, sha256, size, path, format) VALUES(7, 'def', 5, 'de/def.onnx', 'onnx')")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO weights(run_id, sha256, size, path) VALUES(7, 'x', 1, 'x')")
    conn.close()


def _tool_caller(client):
    """`call(tool, **args)`: the tool's structured answer, asserting it is not an error."""
    async def call(tool: str, **args):
        answer = await client.call_tool(tool, args)
        assert not answer.is_error, answer.content[0].text
        return answer.structured_content
    return call


def _archived_onnx_logits(settings, onnx_file: dict, batch: int) -> np.ndarray:
    """onnxruntime's output for a zero batch of 32x32 images through an archived ONNX file (get_model's entry)."""
    session = onnxruntime.InferenceSession(str(weights_dir_of(settings.zoo_path) / onnx_file["path"]),
                                           providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.zeros((batch, 1, 32, 32), np.float32)})
    return logits


@pytest.mark.anyio
async def test_submit_model_export_onnx_survives_repeats_and_shows_in_get_model(make_settings):
    from mcp import Client

    from lemur_agent_server.server import build_server

    settings = make_settings(seed_zoo=False, sandbox=SANDBOX)
    async with Client(build_server(settings)) as client:
        call = _tool_caller(client)
        job = await call("submit_model", code=models.GOOD, dataset=DATASET, n_trials=2, repeats=2, epochs=1.0,
                         prm={"batch": 32}, max_train_samples=400, time_budget_s=120, export_onnx=True)
        while not job["done"]:
            job = await call("get_job", job_id=job["job_id"], wait_s=20)
        assert job["status"] == "succeeded", job
        result = job["result"]
        # the search's selected trial is exported (its weights' twin); the repeat, a fresh phase that
        # empties out/, neither exports nor loses it
        assert "onnx_error" not in result, result
        detail = await call("get_model", name=job["model_name"])
    files = {f["format"]: f for f in detail["weights"]["files"]}
    assert files["onnx"]["sha256"] == result["onnx"]["sha256"]
    assert detail["weights"]["run_uid"].endswith(f":t{result['selected_trial']}")
    assert _archived_onnx_logits(settings, files["onnx"], batch=3).shape == (3, 10)


@pytest.mark.anyio
async def test_submit_models_exports_onnx_for_every_model_of_the_batch(make_settings):
    """export_onnx is one of submit_models' shared options, as it is submit_model's and the CLI's."""
    from mcp import Client

    from lemur_agent_server.server import build_server

    settings = make_settings(seed_zoo=False, sandbox=SANDBOX)
    async with Client(build_server(settings)) as client:
        call = _tool_caller(client)
        batch = await call("submit_models", items=[{"code": models.GOOD}], dataset=DATASET, n_trials=1, epochs=0.5,
                           prm={"batch": 32}, max_train_samples=200, time_budget_s=120, export_onnx=True)
        assert batch["batch_id"] and batch["entries"][0]["job_id"], batch
        cursor, ended = None, []
        for _ in range(12):
            answer = await call("wait_jobs", batch_id=batch["batch_id"], cursor=cursor, wait_s=20)
            cursor, ended = answer["cursor"], ended + answer["jobs"]
            if answer["done"]:
                break
        assert [job["status"] for job in ended] == ["succeeded"], ended
        result = ended[0]["result"]
        assert "onnx_error" not in result and result["onnx"]["sha256"], result
        detail = await call("get_model", name=ended[0]["model_name"])
    files = {f["format"]: f for f in detail["weights"]["files"]}
    assert files["onnx"]["sha256"] == result["onnx"]["sha256"]
    assert _archived_onnx_logits(settings, files["onnx"], batch=2).shape == (2, 10)


def test_check_nn_batch_exports_one_named_onnx_file_per_model(tmp_path: Path, data_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """A batch shares one save_path, so each model's export lands as `<its LEMUR name>.onnx` (check_nn's
    single best_model.onnx would be overwritten); an item's own export_onnx=False is honoured, and a
    model the exporters cannot handle still returns its tuple, with a warning and no file."""
    monkeypatch.setenv("LEMUR_DATA", str(data_root))
    zoo, save_path = tmp_path / "zoo.sqlite", tmp_path / "stat" / "img-classification_digits_acc_batch"
    items = [models.GOOD, {"nn_code": models.GOOD_ADAM, "prefix": "adam"},
             {"nn_code": models.tiny(forward_extra="x = x * 1.0"), "export_onnx": False},
             UNEXPORTABLE]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = api.check_nn_batch(items, TASK, DATASET, METRIC, dict(PRM), True, None, str(save_path), zoo=zoo,
                                     sandbox=SANDBOX, max_train_samples=400, export_onnx=True)
    assert all(isinstance(r, tuple) for r in results), results
    names = [r[0] for r in results]
    assert names[1].startswith("adam-") and len(set(names)) == 4
    exported = sorted(f.name for f in save_path.glob("*.onnx"))
    assert exported == sorted(f"{n}.onnx" for n in names[:2]), exported
    for name in names[:2]:
        onnx.checker.check_model(onnx.load(str(save_path / f"{name}.onnx")))
        session = onnxruntime.InferenceSession(str(save_path / f"{name}.onnx"))
        feed = {session.get_inputs()[0].name: np.zeros((2, 1, 32, 32), dtype=np.float32)}
        assert session.run(None, feed)[0].shape == (2, 10)
    assert [str(w.message) for w in caught if "no ONNX export" in str(w.message)], "the unexportable model warns"


def test_the_runner_says_why_it_does_not_start_an_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import time

    from sandbox.runner import onnx_export
    from sandbox.runner.budget import Budget

    (tmp_path / "weights").mkdir()
    (tmp_path / protocol.weights_name(1)).write_bytes(b"x" * 1000)
    job = types.SimpleNamespace(out_dir=tmp_path, budget=Budget(time.monotonic(), 60.0))
    prm = {"transform": "norm_32"}
    assert "no trial reached" in onnx_export._why_not(job, None, None)
    assert "trial 0 kept no weights" in onnx_export._why_not(job, 0, prm)
    assert onnx_export._why_not(job, 1, prm) is None
    monkeypatch.setattr(onnx_export, "MAX_OUT_BYTES", 1500)  # out/ would hold the weights twice
    assert "too large to export" in onnx_export._why_not(job, 1, prm)
    monkeypatch.undo()
    late = types.SimpleNamespace(out_dir=tmp_path, budget=Budget(time.monotonic() - 58.0, 60.0))
    assert "raise time_budget_s" in onnx_export._why_not(late, 1, prm)
