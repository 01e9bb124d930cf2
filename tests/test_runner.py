"""The sandbox runner end to end: `python -m sandbox.runner spec.json` as a real subprocess on the real
digits dataset prepared by sandbox.datasets. Model code never runs in the pytest process itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lemur_agent_server.reference_models import REFERENCE_MODELS, read_code
from sandbox import datasets, protocol

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.PreparedDataset:
    return datasets.prepare(
        "digits", tmp_path_factory.mktemp("raw"), tmp_path_factory.getbasetemp() / "cache"
    )


@dataclasses.dataclass
class Run:
    rc: int
    events: list[dict[str, Any]]
    out: Path
    log: str
    wall_s: float

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def one(self, name: str) -> dict[str, Any]:
        found = self.of(name)
        assert len(found) == 1, f"expected one {name!r} event, got {len(found)}: {self.events}\n{self.log}"
        return found[0]


def run_job(
    job_dir: Path,
    prepared: datasets.PreparedDataset,
    code: str,
    mode: str = "check",
    timeout: float = 60,
    **spec: Any,
) -> Run:
    """Write in/model.py + in/spec.json like the host does and run the runner with cwd = out/."""
    (job_dir / "in").mkdir(parents=True)
    (job_dir / "out").mkdir()
    (job_dir / "in" / protocol.MODEL_FILE).write_text(code)
    fields = {**prepared.spec_fields(), "transforms": [prepared.info.default_transform], **spec}
    job = protocol.JobSpec(
        mode=mode,
        model_path=str(job_dir / "in" / protocol.MODEL_FILE),
        out_dir=str(job_dir / "out"),
        **fields,
    )
    spec_path = job_dir / "in" / protocol.SPEC_FILE
    spec_path.write_text(job.to_json())
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox.runner", str(spec_path)],
        cwd=job_dir / "out",
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.monotonic() - t0
    lines = (job_dir / "out" / protocol.EVENTS_FILE).read_text().splitlines()
    return Run(
        proc.returncode,
        [json.loads(line) for line in lines],
        job_dir / "out",
        proc.stdout + proc.stderr,
        wall,
    )


def assert_error(run: Run, stage: str, kind: str, *needles: str) -> dict[str, Any]:
    assert run.rc == 2, run.log
    error = run.one(protocol.EVENT_ERROR)
    assert (error["stage"], error["kind"]) == (stage, kind), error
    text = error["message"] + error.get("traceback", "")
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text}"
    assert not run.of(protocol.EVENT_DONE)
    return error


# --- model sources for the tests (written to files, run only by the runner) -----------------------------
SETUP_AND_LEARN = """
    def train_setup(self, prm):
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm['lr'], momentum=prm['momentum'])

    def learn(self, train_data):
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            loss = self.criterion(self(inputs), labels)
            loss.backward()
            self.optimizer.step()
        return loss.item()
"""

SEQUENTIAL_NET = (
    """
import torch
from torch import nn

def supported_hyperparameters():
    return {'lr', 'momentum'}

class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[1], 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * (in_shape[2] // 2) * (in_shape[3] // 2), out_shape[0]))

    def forward(self, x):
        return self.body(x)
"""
    + SETUP_AND_LEARN
)

FUNCTIONAL_NET = (
    """
import torch
import torch.nn.functional as F
from torch import nn

def supported_hyperparameters():
    return {'lr', 'momentum'}

class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[1], 8, kernel_size=(3, 3), padding=(1, 1))
        self.head = nn.Linear(8 * (in_shape[2] // 2) * (in_shape[3] // 2), out_shape[0])

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), kernel_size=2)
        return self.head(x.view(x.size(0), -1))
"""
    + SETUP_AND_LEARN
)

WIDER_NET = SEQUENTIAL_NET.replace("8", "12")


def _variant(find: str, replace: str, base: str = SEQUENTIAL_NET) -> str:
    assert find in base
    return base.replace(find, replace)


# --- check-mode jobs, run concurrently once per module (each is its own runner process) --------------------
REFERENCE_CASES = [
    ("LeNet5", "norm_32"),
    ("SmallVGG", "echo_32"),
    ("ResNet8", "norm_32_flip"),
    ("MobileNetLite", "norm_64"),
]
LATE_FAILURE = "CALLS = [0]\n" + _variant(
    "        for inputs, labels in train_data:",
    "        CALLS[0] += 1\n"
    "        if CALLS[0] >= 2:  # the check's learn() is call 1, the first trial's is call 2\n"
    "            raise RuntimeError('late failure in learn')\n"
    "        for inputs, labels in train_data:",
)
SMALL = {"max_train_samples": 200, "max_test_samples": 50}
JOBS: dict[str, tuple[str, str, dict[str, Any]]] = {
    **{
        f"ref-{name}": (read_code(name), "check", {"fixed_prm": {"transform": tf}})
        for name, tf in REFERENCE_CASES
    },
    "fp-sequential": (SEQUENTIAL_NET, "check", {}),
    "size-512": (SEQUENTIAL_NET, "check", {"fixed_prm": {"transform": "echo_512"}}),
    "native-size": (SEQUENTIAL_NET, "train", {"fixed_prm": {"transform": "norm_flip", "batch": 32}, "n_trials": 1,
                                              "epochs": 0.5, **SMALL}),
    "fp-functional": (FUNCTIONAL_NET, "check", {}),
    "fp-wider": (WIDER_NET, "check", {}),
    "syntax": (SEQUENTIAL_NET.replace("def forward(self, x):", "def forward(self, x)"), "check", {}),
    "no-net": ("def supported_hyperparameters():\n    return {'lr'}\n", "check", {}),
    "no-shp-bad-learn": (
        _variant(
            "def supported_hyperparameters():\n    return {'lr', 'momentum'}",
            "",
            _variant("def learn(self, train_data):", "def learn(self, train_data, epochs):"),
        ),
        "check",
        {},
    ),
    "shape": (_variant("out_shape[0]))", "7))"), "check", {}),
    "import": ("import lemur_no_such_module_xyz\n" + SEQUENTIAL_NET, "check", {}),
    "learn-raises": (
        _variant(
            "        for inputs, labels in train_data:",
            "        raise ValueError('boom from learn')\n        for inputs, labels in train_data:",
        ),
        "train",
        {},
    ),
    "late-failure": (LATE_FAILURE, "train", {"n_trials": 3, **SMALL}),
    "nan": (
        _variant("        return loss.item()", "        return float('nan')"),
        "train",
        {"n_trials": 2, **SMALL},
    ),
    "pruned": (
        "BUILDS = [0]\n"
        + _variant(
            "        return self.body(x)",
            "        return self.body(x) * (0 if self.dumb else 1)",
            _variant(
                "        super().__init__()\n",
                "        super().__init__()\n        BUILDS[0] += 1\n"
                "        self.dumb = BUILDS[0] == 4  # the third trial's net\n",
            ),
        ),
        "train",
        {
            "n_trials": 3,
            "fixed_prm": {"lr": 0.05, "momentum": 0.9, "batch": 16},
            "max_train_samples": 600,
            "max_test_samples": 50,
        },
    ),
    "oom": (
        LATE_FAILURE.replace("raise RuntimeError('late failure in learn')", "raise MemoryError()"),
        "train",
        {"n_trials": 2, **SMALL},
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits: datasets.PreparedDataset) -> dict[str, Run]:
    """All short jobs at once: on a 2-core box this halves the wall time of the module."""
    base = tmp_path_factory.mktemp("jobs")
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        futures = {
            name: pool.submit(run_job, base / name, digits, code, mode, 120, **spec)
            for name, (code, mode, spec) in JOBS.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize(("name", "transform"), REFERENCE_CASES)
def test_check_reference_model(runs: dict[str, Run], name: str, transform: str) -> None:
    run = runs[f"ref-{name}"]
    assert run.rc == 0, run.log
    assert [e["event"] for e in run.events] == ["ready", "check", "done"]
    ready, check = run.one("ready"), run.one("check")
    assert ready["device"] == "cpu" and ready["versions"]["torch"] and ready["import_s"] > 0
    size = int(transform.split("_")[1])
    assert check["in_shape"] == [1, 1, size, size] and check["out_shape"] == [10]
    assert check["params"] > 0 and check["trainable_params"] == check["params"] and check["flops"] > 0
    assert len(check["fingerprint"]) == 64 and check["learn_updates_params"] is True
    assert check["prm"]["transform"] == transform and check["prm"]["batch"] == 16
    assert {"lr", "momentum"} <= set(check["declared"])


def test_reference_models_are_listed() -> None:
    assert set(REFERENCE_MODELS) == {"LeNet5", "SmallVGG", "ResNet8", "MobileNetLite"}
    with pytest.raises(KeyError, match="LeNet5"):
        read_code("AlexNet")


def test_fingerprint_identifies_the_computation_not_the_code(runs: dict[str, Run]) -> None:
    prints = {}
    for label in ("sequential", "functional", "wider"):
        run = runs[f"fp-{label}"]
        assert run.rc == 0, run.log
        prints[label] = run.one("check")["fingerprint"]
    assert prints["sequential"] == prints["functional"]
    assert prints["wider"] != prints["sequential"]


# --- failure kinds ---------------------------------------------------------------------------------------
def test_a_sizeless_transform_keeps_the_dataset_size(runs: dict[str, Run]) -> None:
    run = runs["native-size"]  # LEMUR's `norm_flip`: normalise and flip, no resize (digits are 8 x 8)
    assert run.rc == 0, run.log
    assert run.one(protocol.EVENT_CHECK)["in_shape"] == [1, 1, 8, 8]
    end = run.one(protocol.EVENT_TRIAL_END)
    assert end["status"] == "completed" and len(run.of(protocol.EVENT_POINT)) == 1, run.events


def test_a_512_transform_resizes_to_512(runs: dict[str, Run]) -> None:
    run = runs["size-512"]  # LEMUR's norm_512 / echo_512 records
    assert run.rc == 0, run.log
    assert run.one(protocol.EVENT_CHECK)["in_shape"] == [1, 1, 512, 512]


def test_syntax_error(runs: dict[str, Run]) -> None:
    assert_error(runs["syntax"], protocol.STAGE_CHECK, protocol.KIND_SYNTAX, "line")


def test_contract_missing_net(runs: dict[str, Run]) -> None:
    assert_error(runs["no-net"], protocol.STAGE_CHECK, protocol.KIND_CONTRACT, "class Net(torch.nn.Module)")


def test_contract_lists_every_problem(runs: dict[str, Run]) -> None:
    assert_error(
        runs["no-shp-bad-learn"],
        protocol.STAGE_CHECK,
        protocol.KIND_CONTRACT,
        "def supported_hyperparameters()",
        "def learn(self, train_data)",
    )


def test_shape_wrong_logits(runs: dict[str, Run]) -> None:
    assert_error(runs["shape"], protocol.STAGE_CHECK, protocol.KIND_SHAPE, "(2, 7)", "(2, 10)")


def test_exception_on_import_of_missing_module(runs: dict[str, Run]) -> None:
    assert_error(
        runs["import"],
        protocol.STAGE_CHECK,
        protocol.KIND_EXCEPTION,
        "ModuleNotFoundError",
        "lemur_no_such_module_xyz",
    )


def test_exception_in_learn_is_caught_by_check(runs: dict[str, Run]) -> None:
    assert_error(
        runs["learn-raises"], protocol.STAGE_CHECK, protocol.KIND_EXCEPTION, "boom from learn", "model.py"
    )


def test_exception_during_training_stops_the_job(runs: dict[str, Run]) -> None:
    run = runs["late-failure"]
    assert_error(run, protocol.STAGE_TRAIN, protocol.KIND_EXCEPTION, "late failure in learn")
    assert len(run.of(protocol.EVENT_TRIAL_START)) == 1 and not run.of(protocol.EVENT_TRIAL_END)


def test_nan_loss_fails_trials_but_not_the_job(runs: dict[str, Run]) -> None:
    run = runs["nan"]
    assert run.rc == 0, run.log
    ends = run.of(protocol.EVENT_TRIAL_END)
    assert [(e["status"], e["error"]["kind"]) for e in ends] == [("failed", protocol.KIND_NAN_LOSS)] * 2
    assert all(e["weights"] is None for e in ends) and not run.of(protocol.EVENT_POINT)
    assert run.one(protocol.EVENT_DONE)["best_trial"] is None


def test_out_of_memory_fails_trials_but_not_the_job(runs: dict[str, Run]) -> None:
    run = runs["oom"]
    assert run.rc == 0, run.log
    ends = run.of(protocol.EVENT_TRIAL_END)
    assert [(e["status"], e["error"]["kind"]) for e in ends] == [("failed", protocol.KIND_OOM)] * 2
    assert run.one(protocol.EVENT_DONE)["trials"] == 2


def test_optuna_median_pruner_prunes_a_bad_trial(runs: dict[str, Run]) -> None:
    run = runs["pruned"]
    assert run.rc == 0, run.log
    ends = run.of(protocol.EVENT_TRIAL_END)
    assert [e["status"] for e in ends] == ["completed", "completed", "pruned"]
    # a pruned trial ranks below the finished ones: its checkpoint is not kept (out/ holds one)
    assert "error" not in ends[2] and ends[2]["points"] == 1 and ends[2]["weights"] is None
    assert len(list((run.out / "weights").iterdir())) == 1
    assert run.one(protocol.EVENT_DONE)["best_trial"] in (0, 1)


# --- torch-free pieces, in process (no model code involved) --------------------------------------------
def test_search_space_defaults_overrides_and_fixed_values() -> None:
    import optuna

    from sandbox.runner.params import suggest_prm, validate_search_space

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(20):
        prm = suggest_prm(
            study.ask(),
            {"lr", "momentum", "dropout", "width"},
            {"momentum": 0.5},
            {"width": {"choices": [1, 2]}},
            ["norm_32", "norm_64_flip"],
            2.0,
            n_train=100,
        )
        assert 1e-5 <= prm["lr"] <= 1 and 0 <= prm["dropout"] <= 0.5 and prm["width"] in (1, 2)
        assert prm["momentum"] == 0.5 and prm["batch"] in (16, 32, 64) and prm["epoch"] == 2  # 128 > 100
        assert prm["transform"] in ("norm_32", "norm_64_flip")
    assert (
        validate_search_space({"lr": {"low": 0.1, "high": 1, "log": True}, "batch": {"min_power": 2}}) == []
    )
    problems = validate_search_space(
        {
            "lr": {"low": 0, "high": 1, "log": True},
            "transform": {"choices": ["x"]},
            "batch": {"choices": [0]},
            "p": {"lo": 1},
        }
    )
    assert len(problems) == 4


def test_point_schedule() -> None:
    from sandbox.runner.trainer import point_schedule

    assert point_schedule(1.0, 0.5, 81) == [(0.5, 40), (1.0, 81)]
    assert point_schedule(3.0, 2.0, 10) == [(2.0, 20), (3.0, 30)]
    assert point_schedule(0.3, 0.5, 10) == [(0.3, 3)]
    assert point_schedule(1.0, 0.25, 2) == [(0.5, 1), (1.0, 2)]  # no empty segments


# --- train mode ------------------------------------------------------------------------------------------
def test_train_lenet5_on_digits(tmp_path: Path, digits: datasets.PreparedDataset) -> None:
    from safetensors.numpy import load_file

    space = {
        "lr": {"low": 0.03, "high": 0.1, "log": True},
        "momentum": {"low": 0.8, "high": 0.95},
        "batch": {"choices": [8, 16]},
    }
    run = run_job(
        tmp_path,
        digits,
        read_code("LeNet5"),
        mode="train",
        n_trials=2,
        epochs=1.0,
        eval_every=0.5,
        search_space=space,
        seed=0,
        time_budget_s=60,
    )
    assert run.rc == 0, run.log
    names = [e["event"] for e in run.events]
    assert names[:2] == ["ready", "check"] and names[-1] == "done"
    assert names.count("first_step") == 1 and names.index("first_step") < names.index("point")
    starts, ends = run.of(protocol.EVENT_TRIAL_START), run.of(protocol.EVENT_TRIAL_END)
    assert [s["trial"] for s in starts] == [0, 1]
    for start in starts:
        prm = start["prm"]
        assert 0.03 <= prm["lr"] <= 0.1 and prm["batch"] in (8, 16) and prm["epoch"] == 1
        assert prm["transform"] == "norm_32"
        assert (start["n_train"], start["n_val"], start["n_test"]) == (1293, 144, 360)
    test_labels = digits.test_labels
    for end in ends:
        assert end["status"] == "completed" and end["train_ns"] > 0
        points = [p for p in run.of(protocol.EVENT_POINT) if p["trial"] == end["trial"]]
        assert [p["epoch"] for p in points] == [0.5, 1.0]
        assert points[1]["train_ns"] > points[0]["train_ns"] > 0 and points[1]["loss"] is not None
        assert end["val_accuracy"] == max(p["val_accuracy"] for p in points)
        preds = np.load(run.out / points[-1]["preds"])
        assert preds.dtype == np.int16 and preds.shape == test_labels.shape
        assert preds.min() >= 0 and preds.max() <= 9
        print(
            f"trial {end['trial']}: val {end['val_accuracy']:.3f}, test {np.mean(preds == test_labels):.3f}, "
            f"train {end['train_ns'] / 1e9:.2f}s, batch {starts[end['trial']]['prm']['batch']}"
        )
    done = run.one(protocol.EVENT_DONE)
    best = ends[done["best_trial"]]
    # one checkpoint stays in out/, the best trial's (out/ has a size cap)
    assert [p.name for p in (run.out / "weights").iterdir()] == [Path(best["weights"]).name]
    state = load_file(run.out / best["weights"])
    assert "classifier.5.weight" in state and state["classifier.5.weight"].shape == (10, 84)
    assert best["val_accuracy"] == max(e["val_accuracy"] for e in ends) > 0.5
    best_preds = np.load(run.out / protocol.preds_name(best["trial"], 1.0))
    assert np.mean(best_preds == test_labels) > 0.5  # the host's scoring path: preds vs private labels
    print(f"runner start-to-ready {run.one('ready')['elapsed_s']:.2f}s, total {run.wall_s:.2f}s")


SLOW_LEARN = _variant(
    "            self.optimizer.zero_grad()",
    "            time.sleep(0.05)\n            self.optimizer.zero_grad()",
    "import time\n" + SEQUENTIAL_NET,
)


@pytest.mark.parametrize("eval_every", [0.5, 20.0], ids=["between-segments", "inside-a-segment"])
def test_time_budget_is_honoured(tmp_path: Path, digits: datasets.PreparedDataset, eval_every: float,
                                 warm_process_sandbox: None) -> None:
    budget = 10.0  # the runner needs 3-4 s to start (torch import, data, the check) on a 2-core box, cache warm
    run = run_job(
        tmp_path,
        digits,
        SLOW_LEARN,
        mode="train",
        n_trials=3,
        epochs=20,
        eval_every=eval_every,
        time_budget_s=budget,
        fixed_prm={"batch": 16, "lr": 0.05, "momentum": 0.9},
        max_train_samples=160,  # ~9 steps (0.45 s) an epoch: 20 epochs overrun the budget, a point fits
        max_test_samples=100,
    )
    assert run.rc == 0, run.log
    startup = run.one(protocol.EVENT_CHECK)["elapsed_s"]
    # the stack is read from the page cache, so the start leaves time for training to be cut short
    assert startup <= budget - 2.5, f"runner start-up took {startup:.1f}s of the {budget:g}s budget"
    done = run.one(protocol.EVENT_DONE)
    assert done["elapsed_s"] <= budget and done["stopped_by_budget"] is True
    assert run.wall_s < budget + 2.0  # process exit included
    ends = run.of(protocol.EVENT_TRIAL_END)
    assert (
        len(ends) == 1 and ends[0]["status"] == "pruned" and ends[0]["error"]["kind"] == protocol.KIND_TIMEOUT
    )
    assert len(run.of(protocol.EVENT_TRIAL_START)) == 1  # no trial starts after the budget is spent
    points = run.of(protocol.EVENT_POINT)
    assert points, "the budget left time for at least one evaluation"
    for point in points:
        assert point["elapsed_s"] <= budget and (run.out / point["preds"]).is_file()
        assert 0 < point["epoch"] < 20
    # between segments: a point every half epoch; inside the one segment: one point, at the fraction reached
    assert (len(points) == 1) is (eval_every > 1), points
    # the cut trial has a score, so it is the selection (the host's rule) and its weights are kept
    assert done["best_trial"] == 0
    assert ends[0]["weights"] and (run.out / ends[0]["weights"]).is_file()


# learn() that spends 0.15 s after its loop (a scheduler step, a log line): time between the budget's stop
# and the evaluation that the stop must have reserved
SLOW_RETURN = _variant("        return loss.item()", "        time.sleep(0.15)\n        return loss.item()", SLOW_LEARN)


def test_a_stop_inside_a_segment_leaves_time_for_its_point(tmp_path: Path, digits: datasets.PreparedDataset,
                                                           warm_process_sandbox: None) -> None:
    """The stop leaves at most one batch (0.05 s) beyond the evaluation in hand; a learn() that takes
    0.15 s to return used to spend it, and the truncated trial then had no point at all."""
    run = run_job(tmp_path, digits, SLOW_RETURN, mode="train", n_trials=1, epochs=20, eval_every=20.0,
                  time_budget_s=10.0, fixed_prm={"batch": 16, "lr": 0.05, "momentum": 0.9},
                  max_train_samples=160, max_test_samples=100)
    assert run.rc == 0, run.log
    (end,) = run.of(protocol.EVENT_TRIAL_END)
    assert end["status"] == "pruned" and end["error"]["kind"] == protocol.KIND_TIMEOUT, end
    points = run.of(protocol.EVENT_POINT)
    assert len(points) == 1, (points, end["error"]["message"])
    assert 0 < points[0]["epoch"] < 20 and points[0]["elapsed_s"] <= 10.0


# --- warm mode: `--wait`, the pre-start contract of sandbox.docker_backend ------------------------------
def _start_waiting(job_dir: Path, prepared: datasets.PreparedDataset, code: str, **env: str
                   ) -> tuple[subprocess.Popen[str], Path, protocol.JobSpec]:
    (job_dir / "in").mkdir(parents=True)
    (job_dir / "out").mkdir()
    (job_dir / "in" / protocol.MODEL_FILE).write_text(code)
    spec = protocol.JobSpec(mode="check", model_path=str(job_dir / "in" / protocol.MODEL_FILE),
                            out_dir=str(job_dir / "out"),
                            **{**prepared.spec_fields(), "transforms": [prepared.info.default_transform]})
    spec_path = job_dir / "in" / protocol.SPEC_FILE
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.runner", "--wait", str(spec_path)], cwd=job_dir / "out",
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, spec_path, spec


def test_wait_mode_runs_the_job_once_its_spec_arrives(tmp_path: Path, digits: datasets.PreparedDataset) -> None:
    from sandbox.runner.__main__ import WAIT_MARKER

    proc, spec_path, spec = _start_waiting(tmp_path, digits, read_code("LeNet5"))
    try:
        with ThreadPoolExecutor(1) as pool:
            first_line = pool.submit(proc.stdout.readline).result(timeout=120)
        assert first_line.startswith(WAIT_MARKER), first_line
        time.sleep(2.0)  # a warm sandbox waits: nothing written, the job's clock not started
        assert list((tmp_path / "out").iterdir()) == []
        staged = spec_path.with_suffix(".tmp")
        staged.write_text(spec.to_json())
        staged.rename(spec_path)  # the host moves spec.json in last
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    events = [json.loads(line) for line in (tmp_path / "out" / protocol.EVENTS_FILE).read_text().splitlines()]
    assert [e["event"] for e in events] == [protocol.EVENT_READY, protocol.EVENT_CHECK, protocol.EVENT_DONE]
    # counted from the spec, not the process start: the 2 s of waiting (and the imports) are not in it
    assert events[0]["import_s"] < 2.0, events


def test_wait_mode_exits_quietly_when_no_spec_arrives(tmp_path: Path, digits: datasets.PreparedDataset) -> None:
    proc, _, _ = _start_waiting(tmp_path, digits, read_code("LeNet5"), LEMUR_RUNNER_WAIT_MAX_S="0.5")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("lemur-runner: waiting") and list((tmp_path / "out").iterdir()) == []
