"""What an agent sees of ranks (issue 14): one score of a model for query_models(view='models'),
leaderboard, the Pareto plot and a finished job's standing; models without runs findable; arguments that
take one name or several; dataset names ignoring case; prm.lr in LEMUR's range; design_model's dataset."""

from __future__ import annotations

import sqlite3

import pytest
from mcp import Client
from pydantic import ValidationError

from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.reference_models import REFERENCE_MODELS
from lemur_agent_server.server import build_server
from sandbox.protocol import JobStatus
from stats import aggregates as agg
from stats.scope import Triple
from zoo.query import Filters
from zoo.records import Model, Point, Run
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio
DS = "fashion-mnist"
CODE = "class Net:\n    pass  # {}\n"


def run(uid: str, status: str, epochs_asked: float, points: list[tuple[float, float, float]]) -> Run:
    """A run with (epoch, accuracy, seconds) points; accuracy_to_time as LEMUR defines it (chance 0.1)."""
    return Run(uid=uid, task="img-classification", dataset=DS, metric="acc", status=status, source="evaluator",
               prm={"lr": 0.01, "epoch": epochs_asked},
               points=[Point(epoch=e, accuracy=a, duration_ns=int(s * 1e9),
                             accuracy_to_time=max(0.0, a - 0.1) / (s * 1e9 / 1e11)) for e, a, s in points])


async def build_ranked_zoo(path) -> None:
    """FastBN's best point (0.90 at half an epoch) beats Steady, but its finished run ends at 0.80 below
    Steady's 0.85; Pruned and Partial are very fast, but did not finish what they asked for."""
    store = await ZooStore.open(path)
    try:
        await store.add_model_with_runs(Model("FastBN", CODE.format(1), "submitted", params=1000), [
            run("fast:t0", "succeeded", 2, [(0.5, 0.90, 2), (1, 0.70, 4), (2, 0.80, 8)])])
        await store.add_model_with_runs(Model("Steady", CODE.format(2), "submitted", params=5000), [
            run("steady:t0", "succeeded", 2, [(0.5, 0.60, 10), (1, 0.75, 20), (2, 0.85, 40)]),
            run("steady:t1", "failed", 2, [(0.5, 0.95, 1)])])
        await store.add_model_with_runs(Model("Pruned", CODE.format(3), "submitted"), [
            run("pruned:t0", "pruned", 2, [(0.5, 0.95, 0.5)])])
        await store.add_model_with_runs(Model("Partial", CODE.format(4), "submitted"), [
            run("partial:t0", "succeeded", 2, [(0.5, 0.88, 0.5)])])
        await store.jobs.create_finished(
            "job-fast", "submit", {"code": CODE.format(1), "dataset": DS, "task": "img-classification",
                                   "metric": "acc", "name_prefix": "mine"}, JobStatus.SUCCEEDED,
            {"accuracy": 0.80, "model_name": "FastBN"}, None, model_name="FastBN")
    finally:
        await store.close()


@pytest.fixture
async def setup(make_settings):
    settings = make_settings(run_workers=False)
    await build_ranked_zoo(settings.zoo_path)
    async with Client(build_server(settings)) as c:
        yield c, settings


async def call(client, tool, **args):
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content


async def test_one_order_from_query_models_leaderboard_plot_and_job_standing(setup):
    client, settings = setup
    models = await call(client, "query_models", view="models", dataset=DS)
    ranked = [m["name"] for m in models["models"] if m["rank"] is not None]
    board = await call(client, "leaderboard", dataset=DS, task="img-classification", metric="acc")
    assert ranked == [r["name"] for r in board["rows"]] == ["Steady", "FastBN"]
    assert [m["score"] for m in models["models"][:2]] == pytest.approx([0.85, 0.80])
    conn = sqlite3.connect(settings.zoo_path)
    try:
        triple = Triple("img-classification", DS, "acc")
        pareto = agg.model_best(conn, Filters(), triple)
        curves = agg.learning_curves(conn, Filters(), triple)
    finally:
        conn.close()
    assert dict(zip(pareto["name"], pareto["accuracy"], strict=True)) == pytest.approx(
        {"FastBN": 0.80, "Steady": 0.85})
    assert list(dict.fromkeys(curves["name"])) == ranked  # the curves plot draws the top models in that order
    job = await call(client, "get_job", job_id="job-fast")
    assert job["standing"]["rank_accuracy"] == 2 and job["standing"]["n"] == 2
    assert job["standing"]["best_name"] == "Steady"
    assert job["standing"]["gap"] == pytest.approx(-0.05)
    assert job["standing"]["rank_a2t"] == 1  # 0.7 over 8 s beats 0.75 over 40 s
    # the point view stays what it says: the best point of any run, even a failed one's half epoch
    points = await call(client, "query_models", dataset=DS, unique_nn=True)
    assert (points["rows"][0]["name"], points["rows"][0]["accuracy"]) == ("Steady", pytest.approx(0.95))


async def test_pruned_and_partial_runs_do_not_top_accuracy_to_time(setup):
    client, _ = setup
    board = await call(client, "leaderboard", by="accuracy_to_time", dataset=DS)
    assert [r["name"] for r in board["rows"]] == ["FastBN", "Steady"]
    assert "complete runs only" in board["scope"]
    everything = await call(client, "leaderboard", by="accuracy_to_time", dataset=DS, include_partial=True)
    assert {r["name"] for r in everything["rows"][:2]} == {"Pruned", "Partial"}
    steady = next(r for r in everything["rows"] if r["name"] == "Steady")
    assert steady["runs"] == 2  # the failed run is counted only on request


async def test_models_without_runs_are_listed_with_a_null_score(setup):
    client, _ = setup
    out = await call(client, "query_models", view="models", dataset=DS, limit=100)
    by_name = {m["name"]: m for m in out["models"]}
    assert set(REFERENCE_MODELS) <= set(by_name)
    assert by_name["LeNet5"]["runs"] == 0 and by_name["LeNet5"]["rank"] is None
    assert by_name["LeNet5"]["score"] is None
    assert by_name["Pruned"]["rank"] is None  # its only run is not complete
    assert out["total"] == len(by_name)


async def test_single_names_and_dataset_case_are_understood(setup):
    client, _ = setup
    one = await call(client, "query_models", nn="FastBN", dataset="Fashion-MNIST")
    assert {r["name"] for r in one["rows"]} == {"FastBN"} and one["total"] == 3
    prefixed = await call(client, "query_models", view="models", nn_prefix="Fast")
    assert [m["name"] for m in prefixed["models"]] == ["FastBN"]
    board = await call(client, "leaderboard", models="Steady", dataset="FASHION-MNIST")
    assert [r["name"] for r in board["rows"]] == ["Steady"]


async def test_name_prefix_ignored_on_existing_code_is_said(setup):
    client, _ = setup
    job = await call(client, "get_job", job_id="job-fast")
    assert job["model_name"] == "FastBN"
    assert any("name_prefix 'mine' was not used" in n and "'FastBN'" in n for n in job["notes"])


async def test_design_model_without_arguments_uses_a_present_dataset(setup):
    client, _ = setup
    prompt = await client.get_prompt("design_model", {})
    text = prompt.messages[0].content.text
    assert "on dataset 'digits' (no dataset was named: 'digits' is present on this server" in text
    assert "cifar-10" not in text.split("\n")[0]


def test_request_dataset_ignores_case_and_lr_stays_in_lemurs_range() -> None:
    assert EvalRequest(code="x", dataset="Fashion-MNIST").dataset == "fashion-mnist"
    assert EvalRequest(code="x", dataset="MNIST").dataset == "mnist"
    assert EvalRequest(code="x", dataset="digits", prm={"lr": 1.0}).prm["lr"] == 1.0
    with pytest.raises(ValidationError, match=r"prm.lr=3 must lie in \(0, 1\], LEMUR's learning-rate range"):
        EvalRequest(code="x", dataset="digits", prm={"lr": 3})
