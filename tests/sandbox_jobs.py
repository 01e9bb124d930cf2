"""Job directories for the backend tests, written as the evaluator writes them, and the tiny net they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox import datasets, protocol
from sandbox.backend import Backend, JobPaths

TINY_NET = '''
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.body = nn.Sequential(nn.Conv2d(in_shape[1], 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(16, out_shape[0]))

    def forward(self, x):
        return self.body(x)

    def train_setup(self, prm):
        self.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, train_data):
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            self.criterion(self(inputs), labels).backward()
            self.optimizer.step()
'''


def make_job(root: Path, name: str, prepared: datasets.PreparedDataset, backend: Backend, code: str,
             mode: str = "check", **spec: Any) -> JobPaths:
    """A job dir like the evaluator writes it: in/model.py, in/spec.json, empty out/."""
    job_dir = root / name
    (job_dir / "in").mkdir(parents=True)
    (job_dir / "out").mkdir()
    (job_dir / "in" / protocol.MODEL_FILE).write_text(code)
    paths = JobPaths(job_dir=job_dir, data_dir=prepared.public_dir)
    rp = backend.runner_paths(paths)
    fields = {**prepared.spec_fields(), "transforms": [prepared.info.default_transform], "threads": 1, **spec}
    fields.update(model_path=rp.model, data_dir=rp.data_dir, out_dir=rp.out_dir)
    (job_dir / "in" / protocol.SPEC_FILE).write_text(protocol.JobSpec(mode=mode, **fields).to_json())
    return paths
