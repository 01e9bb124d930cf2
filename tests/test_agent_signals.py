"""What an agent sees when it checks and trains a model (issue 14): the check's speed estimate and
per-layer costs, exception problems with their line and a hint, unknown prm keys refused, the job's
timing (evaluation next to training, the host's load), the budget's forecast message, flags raised on
small models built to trigger them, pruned reasons, cancelled trials and progress while evaluating."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3

import anyio
import pytest
from mcp import Client

from lemur_agent_server.evaluator import flags, hostload
from lemur_agent_server.server import build_server
from tests import models
from zoo.query import Filters

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(make_settings, warm_process_sandbox):
    async with Client(build_server(make_settings())) as c:
        yield c


async def call(client, tool, **args):
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content


async def finished(client, job_id: str) -> dict:
    for _ in range(12):
        job = await call(client, "get_job", job_id=job_id, wait_s=50)
        if job["done"]:
            return job
    raise AssertionError(f"{job_id} did not finish: {job}")


async def test_check_model_estimates_epoch_and_evaluation_seconds_and_lists_the_heaviest_layers(client):
    out = await call(client, "check_model", code=models.GOOD, dataset="digits", prm={"batch": 32})
    assert out["ok"], out["problems"]
    speed = out["speed"]
    assert speed["batch"] == 32 and speed["transform"] and speed["timed_steps"] >= 1
    assert speed["train_samples"] > 1000 and speed["eval_samples"] > 100  # digits: 1797 images in all
    assert 0 < speed["epoch_s"] < 60 and 0 < speed["eval_pass_s"] < 60
    layers = out["layers"]
    assert [row["name"] for row in layers][:2] == ["features.0", "head"]  # the conv costs most FLOPs
    conv = layers[0]
    assert conv["type"] == "Conv2d" and conv["params"] == 1 * 8 * 9 + 8 and conv["flops"] > 0
    assert conv["out_shape"][1:] == [8, 32, 32]  # digits resized to 32x32 by the default transform
    assert [r["flops"] for r in layers] == sorted((r["flops"] for r in layers), reverse=True)
    assert set(out["isolation"]) == {"id", "backend", "full"}


KEY_ERROR = models.GOOD.replace('momentum=prm["momentum"])', 'momentum=prm["momentum"] * (1 - prm["dropout"]))')


async def test_an_exception_names_its_line_and_an_undeclared_prm_key_gets_the_hint(client):
    out = await call(client, "check_model", code=KEY_ERROR, dataset="digits")
    assert not out["ok"]
    problem = out["problems"][0]
    line = next(i for i, text in enumerate(KEY_ERROR.splitlines(), 1) if 'prm["dropout"]' in text)
    assert problem["kind"] == "exception" and "KeyError: 'dropout'" in problem["message"]
    assert problem["line"] == line and problem["function"] == "train_setup"
    assert 'prm["dropout"]' in problem["source"]
    assert "declare it in supported_hyperparameters()" in problem["hint"]


COMPUTED_NAMES = models.GOOD.replace('return {"lr", "momentum"}', 'return set("lr momentum".split())')


@pytest.mark.parametrize("code", [models.GOOD, COMPUTED_NAMES], ids=["literal-names", "computed-names"])
async def test_an_unknown_prm_key_is_refused_with_the_known_ones(client, code):
    """Literal names are read statically (with the line of supported_hyperparameters); computed ones are
    known only in the sandbox's check, which refuses the same way."""
    out = await call(client, "check_model", code=code, dataset="digits", prm={"foo": 0.5, "lr": 0.1})
    assert not out["ok"]
    problem = out["problems"][0]
    assert problem["kind"] == "contract"
    assert "prm ['foo'] is not a hyperparameter of this model" in problem["message"]
    assert "['lr', 'momentum', 'batch', 'epoch', 'transform']" in problem["message"]
    line = next(i for i, text in enumerate(code.splitlines(), 1) if "def supported_hyperparameters" in text)
    assert problem.get("line") == (line if code is models.GOOD else None)


# Trains for real (learn returns training accuracy and loss), but after its second learn() call its
# evaluation-mode forward answers class 0 for everything: test accuracy falls while training loss falls,
# the pattern a BatchNorm model with broken running statistics shows.
DEGRADES = models.GOOD.replace("        return self.head(torch.flatten(self.features(x), 1))", """\
        out = self.head(torch.flatten(self.features(x), 1))
        if not self.training and getattr(self, "calls", 0) >= 2:
            return out * 0
        return out""").replace("""        total = 0.0
        for inputs, labels in train_data:""", """        self.calls = getattr(self, "calls", 0) + 1
        total, right, seen = 0.0, 0, 0
        for inputs, labels in train_data:""").replace("""            total += float(loss)
        return total""", """            total += float(loss) * len(labels)
            seen += len(labels)
        return right / max(seen, 1), total / max(seen, 1)""").replace(
    "            loss = self.criterion(self(inputs), labels)\n", """\
            out = self(inputs)
            loss = self.criterion(out, labels)
            right += int((out.argmax(1) == labels).sum())
""")
# answers class 0 for everything, slowly in evaluation: chance level, most of the time in evaluation
SLOW_EVAL_CONSTANT = models.GOOD.replace("        return self.head(torch.flatten(self.features(x), 1))", """\
        if not self.training:
            import time
            time.sleep(1.0)
        return self.head(torch.flatten(self.features(x), 1)) * 0""")


def assert_curve_and_timing(result: dict) -> None:
    """The selected trial's curve carries learn()'s training loss and accuracy; timing splits the seconds."""
    curve = result["curve"]
    assert [p["epoch"] for p in curve] == [0.5, 1.0]
    assert curve[1]["accuracy"] < curve[0]["accuracy"] - 0.05 and curve[1]["train_loss"] < curve[0]["train_loss"]
    assert all(p["train_accuracy"] is not None and 0.2 < p["train_accuracy"] <= 1.0 for p in curve)
    timing = result["timing"]
    assert timing["train_s"] > 0 and timing["eval_s"] > 0 and timing["warmup_s"] > 0
    assert set(timing["host"]) >= {"load_before", "load_after", "cpus", "noisy"}
    assert result["trials"][0]["epochs"] == 1.0 and result["trials"][0]["eval_s"] > 0


async def assert_isolation_once(client, job: dict) -> None:
    """The sandbox description once: a short id in the result, the full text on request."""
    result = job["result"]
    short = result["isolation"]
    assert set(short) == {"id", "backend", "full"} and short["id"].startswith("process:")
    assert len(json.dumps(short)) < 200
    full = (await call(client, "get_job", job_id=job["job_id"], include_isolation=True))["result"]["isolation"]
    assert full["backend"] == "process" and len(json.dumps(full)) > 400
    catalog = await call(client, "list_catalog")
    assert catalog["sandbox"]["id"].startswith("process:") and catalog["sandbox"]["backend"] == "process"


async def test_flags_falling_accuracy_lr_at_the_edge_training_accuracy_and_timing(client):
    job = await call(client, "submit_model", code=DEGRADES, dataset="digits", n_trials=1, epochs=1,
                     eval_every=0.5, time_budget_s=90, prm={"momentum": 0.9, "batch": 16},
                     search_space={"lr": {"low": 0.02, "high": 0.04, "log": True}})
    job = await finished(client, job["job_id"])
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    names = [f["flag"] for f in result["flags"]]
    assert "accuracy_falls_while_loss_falls" in names and "lr_at_edge" in names
    falls = next(f for f in result["flags"] if f["flag"] == "accuracy_falls_while_loss_falls")
    assert "BatchNorm" in falls["next_step"] and "training loss fell" in falls["why"]
    edge = next(f for f in result["flags"] if f["flag"] == "lr_at_edge")
    assert "[0.02, 0.04]" in edge["why"] and "search_space" in edge["next_step"]
    assert_curve_and_timing(result)
    assert "step" not in (job["progress"] or {})  # a finished job is in no step any more
    await assert_isolation_once(client, job)
    # the zoo keeps learn()'s training accuracy and loss on the archived curve: get_model shows them
    detail = await call(client, "get_model", name=job["model_name"], include_code=False)
    archived = {p["epoch"]: p for p in detail["curve"]}
    for point in result["curve"]:
        assert archived[point["epoch"]]["train_accuracy"] == pytest.approx(point["train_accuracy"])
        assert archived[point["epoch"]]["train_loss"] == pytest.approx(point["train_loss"])
    # and the per-layer costs its check measured in the sandbox, heaviest first
    assert detail["layers"] and detail["layers"] == result["layers"] and detail["layers"][0]["name"] == "features.0"


async def test_chance_level_and_evaluation_heavy_are_flagged_and_progress_shows_the_evaluated_epoch(client):
    job = await call(client, "submit_model", code=SLOW_EVAL_CONSTANT, dataset="digits", n_trials=1, epochs=1,
                     eval_every=0.5, time_budget_s=90, max_train_samples=160,
                     prm={"lr": 0.01, "momentum": 0.9, "batch": 32})
    seen = set()
    for _ in range(400):
        view = await call(client, "get_job", job_id=job["job_id"])
        progress = view["progress"] or {}
        if str(progress.get("step", "")).startswith("evaluating epoch"):
            seen.add((progress["step"], progress["epoch"]))
        if view["done"]:
            break
        await anyio.sleep(0.1)
    assert ("evaluating epoch 0.5", 0.5) in seen, view
    view = await finished(client, job["job_id"])
    assert view["status"] == "succeeded", view["error"]
    flags = {f["flag"]: f for f in view["result"]["flags"]}
    assert "chance_level" in flags and "optimizer.step()" in flags["chance_level"]["next_step"]
    assert "after 1 epochs is chance level" in flags["chance_level"]["why"]
    assert "evaluation_heavy" in flags and "eval_every" in flags["evaluation_heavy"]["next_step"]
    timing = view["result"]["timing"]
    assert timing["eval_s"] > timing["train_s"]


async def test_a_budget_stop_inside_a_segment_gives_the_forecast_not_a_tiny_epoch_count(client):
    job = await call(client, "submit_model", code=models.SLOW, dataset="digits", n_trials=1, epochs=8,
                     eval_every=8, time_budget_s=35, prm={"lr": 0.01, "momentum": 0.9, "batch": 16})
    job = await finished(client, job["job_id"])
    assert job["status"] == "timed_out" and job["result"]["trials"], (job["error"], job["progress"])
    trial = job["result"]["trials"][0]
    message = trial["error"]["message"]
    assert re.fullmatch(r"the next [0-9.]+ epoch would take ~[0-9.]+s \+ [0-9.]+s evaluation; [0-9.]+s were left "
                        r"\(stopped after [0-9.]+ epochs\)", message), message
    assert "time budget reached after" not in message
    assert trial["pruned"] == f"time budget: {message}"


# the third Net built in the sandbox (the check builds the first) answers class 0: its trial is pruned
THIRD_TRIAL_BAD = "_BUILT = [0]\n" + models.GOOD.replace("        super().__init__()\n", """\
        super().__init__()
        _BUILT[0] += 1
        self.bad = _BUILT[0] == 4
""").replace("        return self.head(torch.flatten(self.features(x), 1))",
             "        return self.head(torch.flatten(self.features(x), 1)) * (0 if self.bad else 1)")


async def test_a_pruned_trial_says_why(client):
    job = await call(client, "submit_model", code=THIRD_TRIAL_BAD, dataset="digits", n_trials=3, epochs=1,
                     eval_every=0.5, time_budget_s=120, prm={"lr": 0.05, "momentum": 0.9, "batch": 32})
    job = await finished(client, job["job_id"])
    assert job["status"] == "succeeded", job["error"]
    trials = job["result"]["trials"]
    assert [t["status"] for t in trials] == ["succeeded", "succeeded", "pruned"]
    assert trials[2]["pruned"].startswith("median pruner at epoch 0.5: validation accuracy ")
    assert "below the median" in trials[2]["pruned"]
    assert "pruned" not in trials[0]


async def test_a_cancelled_trial_is_cancelled_and_the_failures_plot_names_it(client):
    job = await call(client, "submit_model", code=models.SLOW, dataset="digits", n_trials=1, epochs=3,
                     time_budget_s=120, prm={"lr": 0.01, "momentum": 0.9, "batch": 16})
    for _ in range(300):
        view = await call(client, "get_job", job_id=job["job_id"])
        if (view["progress"] or {}).get("trial") == 0:
            break
        await anyio.sleep(0.1)
    await call(client, "cancel_job", job_id=job["job_id"])
    view = await finished(client, job["job_id"])
    assert view["status"] == "cancelled"
    trial = view["result"]["trials"][0]
    assert trial["status"] == "cancelled" and trial["error"]["kind"] == "cancelled"
    plot = await client.call_tool("plot", {"kind": "failures", "dataset": "digits"})
    text = " ".join(c.text for c in plot.content if getattr(c, "type", "") == "text")
    assert "cancelled" in text and "unknown" not in text


async def test_the_accuracy_vs_time_legend_says_the_epochs_reached(make_settings, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from stats import figures
    from tests.test_agent_view import build_ranked_zoo

    settings = make_settings(run_workers=False)
    await build_ranked_zoo(settings.zoo_path)
    conn = sqlite3.connect(settings.zoo_path)
    try:
        data = figures.fetch_accuracy_vs_time(conn, Filters(dataset="fashion-mnist"), figures.Options())
    finally:
        conn.close()
    fig = Figure()
    figures.draw_accuracy_vs_time(fig, data)
    legend = fig.axes[0].get_legend()
    assert legend.get_title().get_text() == "Epochs reached"
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:2] == ["0.5", "2"]  # Pruned and Partial stopped at half an epoch; the others ran 2


def test_host_load_and_steal_make_timings_noisy(tmp_path) -> None:
    """The busy-host rule on two real /proc/stat-format snapshots (user nice system idle iowait irq softirq
    steal): 100 of 1,000 jiffies stolen, and a load of 3 on 2 CPUs."""
    stat = tmp_path / "stat"
    stat.write_text("cpu 100 0 50 800 0 0 0 50 0 0\ncpu0 1 2 3\n")
    before = hostload.sample(stat)
    stat.write_text("cpu 500 0 150 1200 0 0 0 150 0 0\n")
    after = hostload.sample(stat)
    busy = hostload.between(dataclasses.replace(before, load1=3.0), dataclasses.replace(after, load1=3.0), cpus=2)
    assert busy["noisy"] and busy["steal_share"] == pytest.approx(0.1)
    assert busy["why"] == "load average 3.0 on 2 CPUs; 10% of the CPU time stolen by the hypervisor"
    idle = hostload.between(dataclasses.replace(before, load1=0.5), dataclasses.replace(before, load1=0.5), cpus=2)
    assert not idle["noisy"] and idle["why"] is None and idle["steal_share"] == 0.0
    flag = flags.noisy_timing(busy)
    assert flag is not None and "load average 3.0" in flag["why"] and flags.noisy_timing(idle) is None
