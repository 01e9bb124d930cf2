"""The host/runner contract lives in `sandbox.protocol`, and every door admits a request the same way.

In process, no sandbox: these pin the rules both sides share (statuses, transform grammar, search-space
format, trial selection, the code cap, the time budget) and what `EvalRequest` and `admit` decide.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator import phase
from lemur_agent_server.evaluator.requests import EvalRequest, RequestRefused, admit
from sandbox import datasets, protocol
from sandbox.protocol import RunStatus, TimeBudget, TrialStatus
from zoo.records import Point

CODE = "class Net: pass\n"


def request(**fields) -> EvalRequest:
    return EvalRequest(code=CODE, dataset="digits", **fields)


# --- statuses -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reported, stored", [
    ("completed", RunStatus.SUCCEEDED), ("succeeded", RunStatus.SUCCEEDED), ("pruned", RunStatus.PRUNED),
    ("failed", RunStatus.FAILED), ("running", RunStatus.FAILED), ("forged", RunStatus.FAILED),
])
def test_a_reported_trial_status_maps_to_one_stored_run_status(reported: str, stored: RunStatus) -> None:
    assert TrialStatus.reported(reported) is stored
    assert isinstance(TrialStatus.reported(reported), str)  # stored as the same literal as before


# --- transform grammar --------------------------------------------------------------------------------
def test_transform_grammar_has_one_owner() -> None:
    from sandbox.runner import params

    assert params.parse_transform is protocol.parse_transform
    assert datasets.ALL_TRANSFORMS == protocol.transform_names()
    assert len(set(datasets.ALL_TRANSFORMS)) == (len(protocol.TRANSFORM_KINDS) * (len(protocol.TRANSFORM_SIZES) + 1) * 2
                                                 + len(protocol.TRANSFORM_NAMED))
    assert set(datasets.TRANSFORMS) < set(datasets.ALL_TRANSFORMS)
    assert set(protocol.transform_catalog()) == set(datasets.ALL_TRANSFORMS)
    t = protocol.parse_transform("echo_224_flip")
    assert (t.size, t.normalize, t.flip) == (224, False, True)
    assert datasets.transform_size("norm_64_flip") == 64


@pytest.mark.parametrize("name", ["norm_33", "flip", "norm_flip_32", "norm_32_flip_flip", "flip_32", "norm_32_",
                                  "Norm_32", "norm_32_flip\n", 32, None, "complex_32_flip_flip", "soft_pad_flip",
                                  "soft_pad_32", "Soft_pad", "complex_flip_32"])
def test_transform_grammar_rejects_what_it_does_not_define(name: object) -> None:
    with pytest.raises(ValueError, match="unknown transform"):
        protocol.parse_transform(name)


# --- search space: one format, one validator, checked at the door -----------------------------------------
def test_a_request_may_fix_a_sizeless_transform() -> None:
    assert request(prm={"transform": "norm_flip"}).prm["transform"] == "norm_flip"
    assert request(search_space={"transform": {"choices": ["echo", "norm_64"]}}).search_space


def test_an_unknown_transform_names_the_closest_ones() -> None:
    with pytest.raises(ValueError, match=r"closest: norm_32_flip"):
        protocol.parse_transform("norm_32_flp")


def test_search_space_validator_is_shared_by_host_and_runner() -> None:
    from sandbox.runner import params

    assert params.validate_search_space is protocol.validate_search_space
    assert "with a < b" in protocol.SEARCH_SPACE_FORMAT and "min_power" in protocol.SEARCH_SPACE_FORMAT


def test_request_accepts_the_documented_batch_powers() -> None:
    req = request(search_space={"batch": {"min_power": 4, "max_power": 6}, "lr": {"low": 1e-3, "high": 0.1,
                                                                                   "log": True}})
    assert req.search_space["batch"] == {"min_power": 4, "max_power": 6}


@pytest.mark.parametrize("space, says", [
    ({"transform": {"choices": ["norm_32", "norm_33"]}}, "unknown transform 'norm_33'"),
    ({"lr": {"low": 0.1, "high": 0.1}}, "low < high"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
    ({"batch": {"choices": [0, 32]}}, "batch: choices must be integers"),
    ({"batch": {"min_power": 5, "max_power": 3}}, "min_power <= max_power"),
    ({"dropout": {"choices": ["a"]}}, "finite numbers"),
    ({"epoch": {"choices": [1, 2]}}, "set `epochs` instead"),
    ({"width": {"lo": 1}}, "give 'low' and 'high'"),
])
def test_request_refuses_a_bad_search_space_before_any_job(space: dict, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        request(search_space=space)
    assert protocol.validate_search_space(space)  # the runner refuses the same


# --- the rule that selects a trial -----------------------------------------------------------------------
def _host_trial(number: int, status: RunStatus, val: float | None) -> phase.Trial:
    t = phase.Trial(trial=number, status=status)
    t.points.append(Point(epoch=1.0, accuracy=0.5, val_accuracy=val, loss=None, duration_ns=1,
                          accuracy_to_time=None, elapsed_s=1.0))
    return t


@pytest.mark.parametrize("trials, expected", [
    ([("completed", 0.5), ("pruned", 0.9), ("completed", 0.7)], 2),  # finished beats cut short
    ([("completed", 0.7), ("completed", 0.7)], 0),  # a tie: the earliest
    ([("pruned", 0.4), ("pruned", 0.6)], 1),  # nothing finished: the best cut trial still has a score
])
def test_host_and_runner_select_the_same_trial(trials: list[tuple[str, float]], expected: int) -> None:
    from sandbox.runner.search import best_outcome
    from sandbox.runner.trainer import TrialOutcome

    runner = [TrialOutcome(trial=i, status=TrialStatus(s), val_accuracy=v, train_ns=1)
              for i, (s, v) in enumerate(trials)]
    host = [_host_trial(i, TrialStatus(s).run_status(), v) for i, (s, v) in enumerate(trials)]
    picked = best_outcome(runner)
    assert picked is not None and picked.trial == expected
    chosen = phase.select(host)
    assert chosen is not None and chosen.trial == expected


def test_a_repeat_is_never_selected() -> None:
    search, rerun = _host_trial(0, RunStatus.PRUNED, 0.2), _host_trial(0, RunStatus.SUCCEEDED, 0.9)
    rerun.repeat = 1
    assert phase.select([search, rerun]) is search


# --- the code cap and the time budget ----------------------------------------------------------------
def test_code_cap_is_one_constant() -> None:
    from lemur_agent_server.evaluator import static_checks

    assert EvalRequest.model_fields["code"].metadata[-1].max_length == protocol.MAX_CODE_CHARS
    with pytest.raises(ValidationError, match="at most"):
        EvalRequest(code="#" * (protocol.MAX_CODE_CHARS + 1), dataset="digits")
    assert static_checks.MAX_CODE_CHARS == protocol.MAX_CODE_CHARS


def test_time_budget_margins() -> None:
    from sandbox.runner.budget import Budget

    budget = TimeBudget(100.0)
    assert budget.runner_end() == pytest.approx(100 * 0.95 - 0.3)
    assert Budget(started=10.0, budget_s=100.0).end == pytest.approx(10.0 + budget.runner_end())
    assert TimeBudget(300.0).for_check().budget_s == 120.0 and TimeBudget(30.0).for_check().budget_s == 30.0
    assert budget.kill_after(40.0) == 40.0 + TimeBudget.KILL_GRACE_S
    assert budget.kill_after(-10.0) == TimeBudget.MIN_S and budget.sandbox_s(0.2) == TimeBudget.MIN_S
    assert request(time_budget_s=60).budget == TimeBudget(60.0)


# --- LEMUR's prm.epoch ---------------------------------------------------------------------------------
def test_prm_epoch_stands_for_epochs_when_epochs_is_not_given() -> None:
    req = request(prm={"lr": 0.01, "epoch": 3, "batch": 32})
    assert req.epochs == 3.0 and "epoch" not in req.prm and req.prm == {"lr": 0.01, "batch": 32}
    again = EvalRequest(**req.model_dump())  # a recovered job reads back the same request
    assert again.epochs == 3.0 and again.prm == req.prm


def test_prm_epoch_that_agrees_with_epochs_is_accepted() -> None:
    req = request(epochs=2, prm={"epoch": 2})
    assert req.epochs == 2.0 and req.prm == {}


def test_prm_epoch_that_conflicts_says_which_to_keep() -> None:
    with pytest.raises(ValidationError, match=r"prm.epoch=5 disagrees with epochs=2; keep one"):
        request(epochs=2, prm={"epoch": 5})
    with pytest.raises(ValidationError, match=r"prm.epoch"):
        request(prm={"epoch": 0})


def test_prm_epoch_sets_the_eval_every_cap() -> None:
    assert request(prm={"epoch": 0.5}, eval_every=1.0).eval_every == 0.5


# --- the server's own limits, the same for every door -----------------------------------------------------
def _settings(tmp_path: Path, data_root: Path, **extra) -> Settings:
    return Settings(zoo_path=tmp_path / "zoo.sqlite", data_root=data_root, **extra)


def test_admit_passes_a_request_within_the_limits(tmp_path: Path) -> None:
    req = request(time_budget_s=60)
    assert admit(req, _settings(tmp_path, tmp_path, max_time_budget_s=60)) is req


def test_admit_refuses_a_budget_over_the_server_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"time_budget_s=600 exceeds this server's limit of 300 s; lower it"):
        admit(request(time_budget_s=600), _settings(tmp_path, tmp_path, max_time_budget_s=300))


def test_admit_refuses_a_dataset_whose_files_are_missing(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    req = EvalRequest(code=CODE, dataset="cifar-10")
    with pytest.raises(RequestRefused, match=r"Dataset 'cifar-10' is not installed on this server.*list_catalog") \
            as err:
        admit(req, _settings(tmp_path, empty))
    assert str(tmp_path) not in str(err.value)  # the agent learns what to do, not where the server keeps files
    assert "cifar-10-batches-py" in str(err.value)


def test_prm_transform_takes_every_name_the_grammar_knows() -> None:
    """A fixed prm.transform may be any supported name (complex_32 for complex-valued nets), not only the
    plain names of the default search; an unknown one names the closest supported ones."""
    assert EvalRequest(code=CODE, dataset="digits", prm={"transform": "complex_32"}).prm["transform"] == "complex_32"
    assert EvalRequest(code=CODE, dataset="digits", prm={"transform": "soft_pad"}).prm["transform"] == "soft_pad"
    with pytest.raises(ValueError, match=r"prm.transform: .*norm_32"):
        EvalRequest(code=CODE, dataset="digits", prm={"transform": "norm_3"})


@pytest.mark.anyio
async def test_a_dataset_gone_after_admission_fails_without_showing_server_paths(tmp_path: Path) -> None:
    """admit() refuses a missing dataset before a job exists; should its files vanish before the job runs,
    the job fails saying what is missing, without the server's own paths."""
    from lemur_agent_server.evaluator import pipeline
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.reference_models import read_code
    from zoo.jobs import JobKind
    from zoo.store import ZooStore

    empty = tmp_path / "no-data"
    empty.mkdir()
    settings = _settings(tmp_path, empty)
    store = await ZooStore.open(settings.zoo_path)
    try:
        queue = JobQueue(settings, store, backend=None)  # type: ignore[arg-type]  # no sandbox is reached

        async def no_progress(stage: str, info: dict) -> None:
            return None

        code = read_code("LeNet5")  # passes the static checks, so the job gets as far as the dataset
        job = queue._job("job-gone", JobKind.EVALUATE, EvalRequest(code=code, dataset="cifar-10"), no_progress)
        outcome = await pipeline.evaluate(job)
    finally:
        await store.close()
    assert outcome.status == "failed" and outcome.error is not None
    message = outcome.error["message"]
    assert "cifar-10" in message and str(empty) not in message and "$LEMUR_DATA" in message
