"""Reuse by architecture fingerprint: another code of a network the zoo has measured, trained the same way
on the same experiment, is answered from the earlier job (`reuse.rule == "fingerprint"`), not trained;
another optimizer is another experiment; force trains; two such items of one batch train once. Real zoo,
real MCP client, the process sandbox, tiny nets on digits."""

from __future__ import annotations

import time
from typing import Any

import pytest
from mcp import Client

from lemur_agent_server.evaluator import batching
from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.server import build_server
from tests import models
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

QUICK = {"n_trials": 1, "epochs": 0.5, "time_budget_s": 60, "max_train_samples": 64}
PRM = {"batch": 16, "lr": 0.05, "momentum": 0.9}
OTHER = {**PRM, "lr": 0.04}
NEW = {**PRM, "lr": 0.03}


async def call(client: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(name, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def submit(client: Client, items: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    return (await call(client, "submit_models", {"items": items, "dataset": "digits", **QUICK, **extra}))["entries"]


async def finished(client: Client, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 300
    while set(jobs) != set(job_ids):
        assert time.monotonic() < deadline, jobs
        answer = await call(client, "wait_jobs", {"job_ids": job_ids, "wait_s": 20})
        jobs = {j["job_id"]: j for j in answer["jobs"] if j["done"]} | jobs
    return jobs


async def test_another_code_of_a_measured_architecture_reuses_by_fingerprint(make_settings):
    settings = make_settings(seed_zoo=False)
    async with Client(build_server(settings)) as client:
        # GOOD at PRM, its renamed twin and an Adam twin at OTHER: nothing measured yet, all three train
        first = await submit(client, [{"code": models.GOOD, "prm": PRM}, {"code": models.GOOD_RENAMED, "prm": OTHER},
                                      {"code": models.GOOD_ADAM, "prm": OTHER}])
        assert [e["status"] for e in first] == ["queued"] * 3
        ids = [e["job_id"] for e in first]
        jobs = await finished(client, ids)
        assert [jobs[i]["status"] for i in ids] == ["succeeded"] * 3, jobs
        good = jobs[ids[0]]
        prints = {(await call(client, "get_model", {"name": jobs[i]["model_name"], "include_code": False}))[
            "fingerprint"] for i in ids}
        assert len(prints) == 1 and None not in prints and len({jobs[i]["model_name"] for i in ids}) == 3
        fingerprint = prints.pop()

        # now at PRM: the renamed twin is answered from GOOD's job by fingerprint, and the Adam twin (same
        # fingerprint, other training) trains; GOOD re-laid-out is answered by code
        second = await submit(client, [{"code": models.GOOD_RENAMED, "prm": PRM},
                                       {"code": models.GOOD_ADAM, "prm": PRM}])
        assert [(e["status"], e["reused_from"]) for e in second] == [("succeeded", good["job_id"]), ("queued", None)]
        third = await submit(client, [{"code": models.GOOD_REFORMATTED, "prm": PRM}])
        assert (third[0]["status"], third[0]["reused_from"]) == ("succeeded", good["job_id"])
        reused = await finished(client, [second[0]["job_id"], third[0]["job_id"]])
        by_fingerprint, by_code = reused[second[0]["job_id"]], reused[third[0]["job_id"]]
        assert by_fingerprint["result"]["reuse"] == {"job_id": good["job_id"], "rule": "fingerprint",
                                                     "model_name": good["model_name"], "fingerprint": fingerprint}
        assert by_fingerprint["reused_from"] == good["job_id"]
        assert by_fingerprint["result"]["accuracy"] == good["result"]["accuracy"]
        assert by_code["result"]["reuse"] == {"job_id": good["job_id"], "rule": "code",
                                              "model_name": good["model_name"]}
        forced = await submit(client, [{"code": models.GOOD_RENAMED, "prm": PRM}], force=True)
        assert (forced[0]["status"], forced[0]["reused_from"]) == ("queued", None)
        for job_id in (second[1]["job_id"], forced[0]["job_id"]):
            await call(client, "cancel_job", {"job_id": job_id})

    # the batch planner (no worker here: what it queues stays queued) says which rule matched, and two
    # codes of one measured architecture in one batch make one job
    async with await ZooStore.open(settings.zoo_path) as store:
        requests = [EvalRequest(code=code, dataset="digits", prm=prm, **QUICK) for code, prm in (
            (models.GOOD_REFORMATTED, PRM), (models.GOOD_RENAMED, PRM), (models.GOOD_REFORMATTED, OTHER),
            (models.GOOD, NEW), (models.GOOD_RENAMED, NEW), (models.GOOD_ADAM, NEW))]
        _, entries = await batching.submit_batch(store, settings, requests)
    assert [e["duplicate_rule"] for e in entries] == ["code", "fingerprint", "fingerprint", None, "fingerprint", None]
    assert [e["same_as"] for e in entries] == [None, 0, None, None, 3, None]
    assert entries[0]["reused_from"] == good["job_id"] and entries[2]["reused_from"] == ids[1]  # the renamed twin's
    assert entries[4]["job_id"] == entries[3]["job_id"] != entries[5]["job_id"]
    assert [e["status"] for e in entries[3:]] == ["queued"] * 3

def test_the_training_code_compares_training_not_names():
    from lemur_agent_server.evaluator.training_code import training_signature

    assert training_signature(models.GOOD) == training_signature(models.GOOD_RENAMED)
    assert training_signature(models.GOOD) != training_signature(models.GOOD_ADAM)
    more = models.GOOD.replace('{{"lr", "momentum"}}'.replace("{{", "{").replace("}}", "}"), '{"lr", "momentum", "x"}')
    assert more != models.GOOD and training_signature(more) != training_signature(models.GOOD)
    assert training_signature("def broken(:") is None


def test_options_that_change_the_result_key_an_experiment_apart():
    """A lemur-protocol, bf16, deterministic or ONNX request is never answered by a default job of the same
    code (it would get another protocol's number, or no ONNX file); the defaults keep their old key."""
    from lemur_agent_server.evaluator.dedup import experiment_key
    from lemur_agent_server.evaluator.requests import EvalRequest

    base = EvalRequest(code=models.GOOD, dataset="digits")
    variants = [EvalRequest(code=models.GOOD, dataset="digits", **option) for option in (
        {"protocol": "lemur", "n_trials": 1}, {"precision": "bf16"}, {"deterministic": True}, {"export_onnx": True})]
    keys = {experiment_key(r) for r in variants}
    assert len(keys) == 4 and experiment_key(base) not in keys
    assert experiment_key(EvalRequest(code=models.GOOD, dataset="digits", precision="fp32")) == experiment_key(base)
