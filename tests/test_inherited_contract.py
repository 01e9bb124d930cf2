"""A Net whose contract methods come from a base class (LEMUR ships such models, e.g. `class
Net(ModuleWrapper)` with forward() defined on the wrapper) must pass the static checks and train; the
static check still names a method that a plain `nn.Module` Net lacks."""

from __future__ import annotations

import pytest
from mcp import Client

from lemur_agent_server.evaluator.static_checks import static_problems
from lemur_agent_server.server import build_server
from tests import models

pytestmark = pytest.mark.anyio

# forward() and learn() live on the base class, as in LEMUR's Bayesian models.
INHERITED = '''
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class ModuleWrapper(nn.Module):
    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))

    def learn(self, train_data):
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            self.criterion(self(inputs), labels).backward()
            self.optimizer.step()


class Net(ModuleWrapper):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, out_shape[0])

    def train_setup(self, prm):
        self.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])
'''


def test_methods_inherited_from_a_base_class_are_left_to_the_runtime_check() -> None:
    assert static_problems(INHERITED) == []


def test_a_plain_module_net_without_forward_is_still_told_what_to_add() -> None:
    code = models.GOOD.replace("def forward(self, x):", "def forward_features(self, x):")
    messages = [p.message for p in static_problems(code)]
    assert any("defines no forward()" in m for m in messages), messages


def test_a_method_bound_by_assignment_counts_as_defined() -> None:
    code = models.GOOD.replace("def forward(self, x):", "def _forward(self, x):").replace(
        "    def train_setup(self, prm):", "    forward = _forward\n\n    def train_setup(self, prm):")
    assert static_problems(code) == []


async def test_a_net_whose_forward_and_learn_come_from_its_base_trains(make_settings) -> None:
    settings = make_settings(seed_zoo=False, sandbox="process")
    async with Client(build_server(settings)) as client:
        submitted = await client.call_tool("submit_model", {
            "code": INHERITED, "dataset": "digits", "n_trials": 1, "epochs": 0.5, "time_budget_s": 90,
            "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}})
        assert not submitted.is_error, submitted.content[0].text
        job = submitted.structured_content
        for _ in range(12):
            if job["done"]:
                break
            job = (await client.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 20})).structured_content
    assert job["status"] == "succeeded", job
    assert job["result"]["accuracy"] > 0.2
