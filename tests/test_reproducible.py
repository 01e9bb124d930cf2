"""Repeatable, comparable numbers (issue 13), end to end through the in-process MCP client, real sandbox
(the process backend: the runner code under test runs as it is in this checkout), real digits, real zoo.

- every run of a job records what repeating it takes (seed, code and data hashes, split, versions,
  device, CPU, threads, harness, protocol, precision, determinism), and get_model shows it;
- deterministic=true: the same code and seed give the same accuracy and the same learning curve;
- repeats=N: get_model shows mean and std of accuracy and duration over the job's repeat group;
- protocol="lemur" trains on the whole train split, the default on the train split less validation;
- precision="bf16" autocasts learn() (and the evaluation passes) on CPU.
"""

from __future__ import annotations

import json
import sqlite3
import statistics

import pytest
from mcp import Client

from lemur_agent_server.evaluator import protocols
from lemur_agent_server.server import build_server
from sandbox import datasets
from tests import models
from tests.test_evaluate import call, run_job

pytestmark = pytest.mark.anyio

# learn() returns the number of images it was given (as its "loss"): the runner's own count, observed
# on the host through the learning curve
COUNTS_IMAGES = models.tiny(learn_extra="seen = []\n        train_data = (seen.append(len(b[1])) or b for b in "
                                        "train_data)", learn_return="float(sum(seen))")
# learn() returns 1.0 when it runs under bf16 autocast
SEES_AUTOCAST = models.tiny(learn_return="float(torch.is_autocast_enabled('cpu') and "
                                         "torch.get_autocast_dtype('cpu') == torch.bfloat16)")
FIXED = {"batch": 16, "lr": 0.1, "momentum": 0.9}
RUN_FACTS = ("seed", "code_hash", "dataset_hash", "split_seed", "val_fraction", "train_samples", "backend",
             "versions", "device", "device_name", "cpu_model", "threads", "harness", "protocol", "precision",
             "deterministic", "server_version")


@pytest.fixture(params=["process"])
async def client(request, make_settings):
    settings = make_settings(seed_zoo=False, sandbox=request.param)
    async with Client(build_server(settings)) as c:
        c.settings = settings
        yield c


def job_runs(client, job_id: str) -> list[dict]:
    conn = sqlite3.connect(client.settings.zoo_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM run WHERE job_id=? ORDER BY repeat, trial", (job_id,))]
    finally:
        conn.close()


def curve(client, run_id: int) -> list[tuple[float, float, float | None]]:
    conn = sqlite3.connect(client.settings.zoo_path)
    try:
        return conn.execute("SELECT epoch, accuracy, loss FROM point WHERE run_id=? ORDER BY epoch",
                            (run_id,)).fetchall()
    finally:
        conn.close()


def n_train(client) -> int:
    s = client.settings
    return datasets.prepare("digits", s.data_root, s.cache_dir).n_train


def assert_run_records_its_environment(run: dict) -> None:
    env = json.loads(run["environment"])
    versions = json.loads(run["versions"])
    assert {"python", "torch", "torchvision", "numpy", "optuna"} <= versions.keys(), run
    assert all(versions[k] for k in ("python", "torch", "numpy", "optuna")), versions
    assert env["device"] == "cpu" and env["device_name"] and env["cpu_model"] and env["threads"] >= 1
    assert len(env["harness"]) == 16 and env["split_seed"] == protocols.SPLIT_SEED
    assert env["code_hash"] and run["dataset_hash"] and run["seed"] is not None
    assert (run["protocol"], run["precision"], run["deterministic"]) == ("default", "fp32", 1)  # repeats > 1


def assert_group_summary(shown: dict, group: list[dict]) -> None:
    """mean and sample std of the group's accuracies and training seconds."""
    seconds = [r["duration_ns"] / 1e9 for r in group]
    accuracies = [r["accuracy"] for r in group]
    assert shown["n"] == len(group)
    assert shown["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert shown["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
    assert shown["duration_s_mean"] == pytest.approx(statistics.fmean(seconds))
    assert shown["duration_s_std"] == pytest.approx(statistics.stdev(seconds))


def assert_reproduce_facts(facts: dict, client) -> None:
    """get_model's `reproduce` block: every fact present, the backend and (in Docker) the image's id."""
    assert [k for k in RUN_FACTS if facts.get(k) is None] == [], facts
    assert facts["backend"] == client.settings.sandbox
    in_docker = client.settings.sandbox == "docker"  # then the image it ran in, by its id
    assert (facts["image_id"] or "").startswith("sha256:") == in_docker == bool(facts["image"])
    assert facts["train_samples"] == n_train(client) - round(n_train(client) * protocols.VAL_FRACTION)


@pytest.mark.parametrize("client", ["process", "docker"], indirect=True)
async def test_every_run_records_how_to_repeat_it_and_repeats_show_mean_and_std(client):
    job = await run_job(client, code=models.GOOD, n_trials=2, repeats=3, prm={"batch": 32}, time_budget_s=300)
    assert job["status"] == "succeeded", job
    runs = job_runs(client, job["job_id"])
    assert len(runs) == 4  # two search trials, two repeats of the selected one
    for run in runs:
        assert_run_records_its_environment(run)
    assert [r["seed"] for r in runs] == [0, 0, 1000, 2000]  # the job's seed; each repeat's own
    trial_seeds = [json.loads(r["environment"])["trial_seed"] for r in runs]
    assert trial_seeds == [0, 1, 1000, 2000]  # no repeat retrains a search trial with that trial's own seed

    detail = await call(client, "get_model", name=job["model_name"], include_code=False)
    best = detail["best_run"]
    assert_reproduce_facts(best["reproduce"], client)
    group = [r for r in runs if r["selected"] or r["repeat"]]
    assert len(group) == 3
    group = [r for r in group if r["status"] == "succeeded"]  # a repeat the budget cut short is not counted
    assert len(group) >= 2, runs
    assert best["repeat_group"]["job_id"] == job["job_id"]
    assert_group_summary(best["repeat_group"], group)
    in_group = {r["uid"] for r in group}
    assert [r["repeat_group"]["n"] for r in detail["recent_runs"] if r["uid"] in in_group] == [len(group)] * len(group)


async def test_same_code_and_seed_give_the_same_accuracy_and_curve(client):
    args = dict(code=models.GOOD, n_trials=2, epochs=1.0, eval_every=0.25, seed=7, deterministic=True)
    first = await run_job(client, **args)
    second = await run_job(client, **args)
    assert first["status"] == second["status"] == "succeeded", (first, second)
    assert first["job_id"] != second["job_id"]  # two trainings, not one answered twice
    assert first["result"]["accuracy"] == second["result"]["accuracy"]
    assert first["result"]["prm"] == second["result"]["prm"]
    runs_a, runs_b = job_runs(client, first["job_id"]), job_runs(client, second["job_id"])
    assert len(runs_a) == len(runs_b) == 2
    for a, b in zip(runs_a, runs_b, strict=True):
        assert a["deterministic"] == b["deterministic"] == 1
        points = curve(client, a["id"])
        assert len(points) == 4
        assert points == curve(client, b["id"])  # epochs, accuracies and losses, bit for bit


async def test_lemur_protocol_trains_on_the_whole_train_split(client):
    whole = n_train(client)
    lemur = await run_job(client, code=COUNTS_IMAGES, protocol="lemur", eval_every=1.0, prm={"batch": 32})
    ours = await run_job(client, code=COUNTS_IMAGES, n_trials=1, eval_every=1.0, prm={"batch": 32}, seed=1)
    assert lemur["status"] == ours["status"] == "succeeded", (lemur, ours)
    (lemur_run,), (our_run,) = job_runs(client, lemur["job_id"]), job_runs(client, ours["job_id"])
    assert lemur_run["protocol"] == "lemur" and our_run["protocol"] == "default"
    assert lemur_run["train_samples"] == whole
    held_out = round(whole * protocols.VAL_FRACTION)
    assert our_run["train_samples"] == whole - held_out
    # what the model itself was given in its one epoch (less a last batch of one image, which is dropped)
    (lemur_point,), (our_point,) = curve(client, lemur_run["id"]), curve(client, our_run["id"])
    assert whole - 1 <= lemur_point[2] <= whole
    assert whole - held_out - 1 <= our_point[2] <= whole - held_out
    assert json.loads(lemur_run["environment"])["val_fraction"] == 0.0
    detail = await call(client, "get_model", name=lemur["model_name"], include_code=False)
    assert {r["protocol"] for r in detail["recent_runs"]} == {"lemur", "default"}


async def test_lemur_protocol_refuses_a_search(client):
    result = await client.call_tool("submit_model", {"code": models.GOOD, "dataset": "digits", "n_trials": 3,
                                                     "protocol": "lemur"})
    assert result.is_error
    assert "n_trials=1" in result.content[0].text


async def test_bf16_autocasts_learn_on_cpu(client):
    bf16 = await run_job(client, code=SEES_AUTOCAST, precision="bf16", eval_every=1.0, prm=FIXED)
    fp32 = await run_job(client, code=SEES_AUTOCAST, eval_every=1.0, prm=FIXED, seed=1)
    assert bf16["status"] == fp32["status"] == "succeeded", (bf16, fp32)
    (bf16_run,), (fp32_run,) = job_runs(client, bf16["job_id"]), job_runs(client, fp32["job_id"])
    assert (bf16_run["precision"], fp32_run["precision"]) == ("bf16", "fp32")
    assert curve(client, bf16_run["id"])[0][2] == 1.0  # learn() ran under bf16 autocast
    assert curve(client, fp32_run["id"])[0][2] == 0.0
    # the model learns under autocast (its weight cache would serve the weights from before the first step)
    assert bf16["result"]["accuracy"] > 0.3 and fp32["result"]["accuracy"] > 0.3


def test_check_nn_uses_lemur_protocol_by_default(tmp_path, data_root, monkeypatch):  # check_nn runs its own loop
    from lemur_agent_server import api

    zoo = tmp_path / "zoo.sqlite"
    for key, value in (("LEMUR_DATA", data_root), ("LEMUR_ZOO", zoo), ("LEMUR_SANDBOX", "process")):
        monkeypatch.setenv(key, str(value))
    prm = {**FIXED, "transform": "norm_32", "epoch": 1}
    api.check_nn(COUNTS_IMAGES, "img-classification", "digits", "acc", prm)  # LEMUR's call: one trial
    conn = sqlite3.connect(zoo)
    try:
        (protocol, train_samples, run_id), = conn.execute("SELECT protocol, train_samples, id FROM run").fetchall()
        seen = conn.execute("SELECT SUM(loss) FROM point WHERE run_id=?", (run_id,)).fetchone()[0]
    finally:
        conn.close()
    whole = datasets.prepare("digits", data_root, zoo.parent / "dataset-cache").n_train
    assert protocol == "lemur" and train_samples == whole
    assert whole - 1 <= seen <= whole  # the images learn() was given over the epoch's two halves
