"""`analyze`: params, FLOPs, fingerprint and code quality for models that lack them, in the real process
sandbox, many models per sandbox, resumable, each failure recorded once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lemur_agent_server import analyze
from lemur_agent_server.analyze import AnalyzeFilters, analyze_zoo_async
from sandbox.process_backend import ProcessBackend
from zoo.records import Model, Run
from zoo.store import ZooStore

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "lemur_agent_server" / "reference_models"

HEADER = "import torch\n\n\ndef supported_hyperparameters():\n    return {'lr'}\n\n\n"
METHODS = ("    def train_setup(self, prm):\n        pass\n\n    def learn(self, train_data):\n        pass\n\n"
           "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
RAISES = HEADER + ("class Net(torch.nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                   "        super().__init__()\n        raise ValueError('width must be even')\n\n" + METHODS)
SYNTAX = HEADER + "class Net(torch.nn.Module:\n    pass\n"
HANGS = HEADER + ("class Net(torch.nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                  "        super().__init__()\n        while True:\n            pass\n\n" + METHODS)
# swallows the runner's alarm: only the host's watchdog can end it
DEAF = HEADER + ("class Net(torch.nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                 "        super().__init__()\n        import time\n        while True:\n            try:\n"
                 "                time.sleep(0.2)\n            except BaseException:\n                pass\n\n"
                 + METHODS)
# works only on large inputs (like LEMUR's AlexNet-style nets): found through the fallback sizes
LARGE_ONLY = HEADER + ("class Net(torch.nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                       "        super().__init__()\n        if in_shape[2] < 200:\n"
                       "            raise RuntimeError('Output size is too small')\n"
                       "        self.fc = torch.nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])\n\n"
                       + METHODS)
EXITS = HEADER + ("class Net(torch.nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                  "        import os\n        os._exit(0)\n\n" + METHODS)


def linear(width: int) -> str:
    """A valid Net whose parameter count is known: Linear(C*32*32 -> classes) after a width-wide layer."""
    return HEADER + ("class Net(torch.nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                     "        super().__init__()\n"
                     f"        self.hidden = torch.nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], {width})\n"
                     f"        self.out = torch.nn.Linear({width}, out_shape[0])\n\n"
                     "    def train_setup(self, prm):\n        pass\n\n    def learn(self, train_data):\n"
                     "        pass\n\n    def forward(self, x):\n        return self.out(self.hidden(x.flatten(1)))\n")


def expected_params(channels: int, width: int, classes: int) -> int:
    features = channels * 32 * 32
    return features * width + width + width * classes + classes


def run_on(dataset: str, uid: str, task: str = "img-classification") -> Run:
    return Run(uid=uid, task=task, dataset=dataset, metric="acc", status="imported", source="lemur-import",
               prm={"lr": 0.01})


async def add(store: ZooStore, name: str, code: str, runs: list[Run] | None = None) -> None:
    await store.add_model_with_runs(Model(name=name, code=code, origin="lemur"), runs or [])


def rows(zoo: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(zoo)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def analysis(zoo: Path) -> dict[str, dict]:
    return {r["name"]: dict(r) for r in rows(zoo, "SELECT m.name, m.params, m.flops, m.fingerprint, m.code_quality,"
                                                  " a.status, a.error, a.detail, a.analysed_at FROM model m"
                                                  " LEFT JOIN model_analysis a ON a.model_id = m.id")}


@pytest.fixture
def backend(make_settings) -> ProcessBackend:
    from lemur_agent_server.evaluator.backends import hidden_paths

    return ProcessBackend(hidden_paths=hidden_paths(make_settings()), python=sys.executable)


@pytest.mark.anyio
async def test_analyze_fills_stats_and_records_failures_once(make_settings, backend, warm_process_sandbox,
                                                             monkeypatch):
    monkeypatch.setattr(analyze, "STALL_GRACE_S", 3.0)
    settings = make_settings()
    async with await ZooStore.open(settings.zoo_path) as store:
        for path in sorted(REFERENCE.glob("[A-Z]*.py")):
            await add(store, f"ref-{path.stem}", path.read_text(), [run_on("cifar-10", f"{path.stem}-1")])
        await add(store, "mnist-linear", linear(8), [run_on("mnist", "ml-1"), run_on("mnist", "ml-2"),
                                                    run_on("cifar-10", "ml-3")])
        await add(store, "unknown-ds", linear(4), [run_on("imagenette-x", "u-1")])
        await add(store, "no-runs", linear(6))
        await add(store, "text-model", linear(2), [run_on("wikitext", "t-1", task="txt-generation")])
        await add(store, "raises", RAISES, [run_on("cifar-10", "r-1")])
        await add(store, "syntax", SYNTAX)
        await add(store, "hangs", HANGS)
        await add(store, "large-only", LARGE_ONLY)
        await add(store, "deaf", DEAF)  # not first in its batch: the watchdog gives a first model more time
        await add(store, "exits", EXITS)
        await add(store, "after-exits", linear(3))
        await store.record_analysis([])  # no rows: a no-op
        await store.update_model_stats("ref-LeNet5", params=123)  # measured by the evaluator: kept

    filters = AnalyzeFilters(batch_size=5, model_timeout_s=5.0, parallel=2)
    seen: list[tuple[int, int]] = []
    report = await analyze_zoo_async(settings, filters, lambda d, t: seen.append((d, t)), backend=backend)
    got = analysis(settings.zoo_path)

    assert (report.pending, report.ok, report.failed, report.skipped) == (15, 9, 5, 1)
    assert seen[-1] == (15, 15)
    # three batches of five (two sandboxes at once); the deaf model and the exiting one each end their
    # sandbox, and the rest of that batch goes on in a fresh one
    assert report.sandboxes == 5
    for name in ("ref-LeNet5", "ref-ResNet8", "ref-SmallVGG", "ref-MobileNetLite", "mnist-linear", "unknown-ds",
                 "no-runs", "large-only", "after-exits"):
        row = got[name]
        assert row["status"] == "ok", (name, row["error"])
        assert row["params"] > 0 and row["flops"] > 0 and len(row["fingerprint"]) == 64
        assert row["code_quality"] is not None and 0 <= row["code_quality"] <= 1, (name, row["detail"])
    assert got["ref-LeNet5"]["params"] == 123
    assert got["mnist-linear"]["params"] == expected_params(1, 8, 10)  # mnist: its most frequent dataset
    assert json.loads(got["mnist-linear"]["detail"])["in_shape"] == [1, 1, 32, 32]
    assert got["unknown-ds"]["params"] == expected_params(3, 4, 10)  # unknown dataset: 3x32x32, 10 classes
    assert got["no-runs"]["params"] == expected_params(3, 6, 10)
    assert got["mnist-linear"]["fingerprint"] != got["no-runs"]["fingerprint"]
    assert got["large-only"]["params"] == 3 * 224 * 224 * 10 + 10
    assert json.loads(got["large-only"]["detail"])["transform"] == "norm_224"

    def error(name: str) -> dict:
        assert got[name]["status"] == "failed" and got[name]["params"] is None
        return json.loads(got[name]["error"])

    assert error("raises")["kind"] == "exception"
    assert "width must be even" in error("raises")["message"]
    assert error("syntax")["kind"] == "syntax"
    assert error("hangs")["kind"] == "timeout"
    assert error("deaf")["kind"] == "timeout" and "killed" in error("deaf")["message"]
    assert error("exits")["kind"] == "sandbox" and "exit code 0" in error("exits")["message"]
    assert got["syntax"]["code_quality"] == 0.0  # static analysis still scores it
    assert got["text-model"]["status"] == "skipped" and got["text-model"]["params"] is None
    assert "task txt-generation" in json.loads(got["text-model"]["error"])["message"]

    again = await analyze_zoo_async(settings, filters, backend=backend)
    assert (again.pending, again.sandboxes) == (0, 0)
    assert analysis(settings.zoo_path) == got

    retry = await analyze_zoo_async(settings, AnalyzeFilters(nn=("raises",), retry_failed=True), backend=backend)
    assert (retry.pending, retry.failed) == (1, 1)


def test_input_follows_the_runs_dataset_and_transform():
    entry, dataset, reason = analyze.input_for([("img-classification", "cifar-100", "norm_256", 3),
                                                ("img-classification", "cifar-100", "norm_32", 1),
                                                ("img-classification", "mnist", "norm_32", 2),
                                                ("txt-generation", "wikitext", None, 9)])
    assert (dataset, reason) == ("cifar-100", None)
    assert (entry["image_shape"], entry["num_classes"], entry["transform"]) == ([3, 32, 32], 100, "norm_256")
    assert entry["fallback_transforms"] == ["norm_224", "norm_299"]
    entry, dataset, _ = analyze.input_for([("img-classification", "celeba-x", "bf-v1-odd", 1)])
    assert (dataset, entry["image_shape"], entry["num_classes"], entry["transform"]) == (
        "celeba-x", [3, 32, 32], 10, "norm_32")  # unknown dataset and transform: the CIFAR-like default
    entry, _, reason = analyze.input_for([("obj-detection", "coco", None, 1)])
    assert entry is None and reason.startswith("not analysable: task obj-detection")


@pytest.mark.anyio
async def test_a_runner_without_the_mode_stops_the_run_and_blames_no_model(make_settings, backend,
                                                                         warm_process_sandbox, monkeypatch):
    # what a Docker image built before analyze existed answers: a runner-level error, before any model
    monkeypatch.setattr(analyze.protocol, "MODE_ANALYZE", "analyse-old")
    settings = make_settings()
    async with await ZooStore.open(settings.zoo_path) as store:
        await add(store, "fine", linear(2))
    with pytest.raises(analyze.AnalyzeError, match="sandbox build"):
        await analyze_zoo_async(settings, AnalyzeFilters(), backend=backend)
    assert rows(settings.zoo_path, "SELECT COUNT(*) AS n FROM model_analysis")[0]["n"] == 0


@pytest.mark.anyio
async def test_filters_choose_the_models(make_settings):
    settings = make_settings()
    async with await ZooStore.open(settings.zoo_path) as store:
        await add(store, "a-1", linear(1), [run_on("mnist", "a1")])
        await add(store, "a-2", linear(2), [run_on("cifar-10", "a2")])
        await add(store, "b-1", linear(3), [run_on("cifar-10", "b1")])
        await store.update_model_stats("b-1", params=1, flops=1, fingerprint="f", code_quality=1.0)

        async def names(**kw) -> list[str]:
            return [t.name for t in await analyze.pending_targets(store, AnalyzeFilters(**kw))]

        assert await names() == ["a-1", "a-2"]  # b-1 has every stat
        assert await names(dataset="cifar-10") == ["a-2"]
        assert await names(nn_prefix=("a-",), limit=1) == ["a-1"]
        assert await names(nn=("a-2", "b-1")) == ["a-2"]
        assert await names(origin=("submitted",)) == []


def test_cli_killed_midway_resumes(make_settings, warm_process_sandbox):
    settings = make_settings()
    zoo = settings.zoo_path

    async def build() -> None:
        async with await ZooStore.open(zoo) as store:
            for i in range(12):
                await add(store, f"lin-{i:02d}", linear(i + 1), [run_on("cifar-10", f"l{i}")])

    import anyio

    anyio.run(build)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lemur_agent_server", "analyze", "--zoo", str(zoo), "--sandbox", "process",
           "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = rows(zoo, "SELECT COUNT(*) AS n FROM model_analysis")[0]["n"]
            if done >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {r["model_id"]: r["analysed_at"] for r in rows(zoo, "SELECT * FROM model_analysis")}
    assert 2 <= len(first) < 12

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["pending"] == 12 - len(first)
    assert report["ok"] == report["pending"]
    assert "analyze" in out.stderr  # the progress bar
    after = {r["model_id"]: r["analysed_at"] for r in rows(zoo, "SELECT * FROM model_analysis")}
    assert len(after) == 12
    assert all(after[k] == v for k, v in first.items())  # the first run's results were not redone
    stats = rows(zoo, "SELECT name, params FROM model ORDER BY name")
    assert [r["params"] for r in stats] == [expected_params(3, i + 1, 10) for i in range(12)]
