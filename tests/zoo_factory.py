"""Builds small zoos with known contents for query and tool tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from zoo.records import Model, Point, Run, accuracy_to_time
from zoo.store import ZooStore

CODE = ("import torch\n\ndef supported_hyperparameters():\n    return {{'lr'}}\n\n\n"
        "class Net(torch.nn.Module):\n    WIDTH = {i}\n")


async def build_zoo(path: Path, n_models: int = 6, trials: int = 2) -> ZooStore:
    """Models m0..m{n-1}; on cifar-10 and mnist; each trial has points at epochs 1, 2 (+0.5 on mnist).

    accuracy = 0.3 + 0.05*model + 0.01*trial + 0.1*(epoch-1), so the best model is the last one and
    every value can be recomputed by a test.
    """
    store = await ZooStore.open(path)
    for i in range(n_models):
        runs = []
        for dataset in ("cifar-10", "mnist"):
            for t in range(trials):
                epochs = (0.5, 1.0, 2.0) if dataset == "mnist" else (1.0, 2.0)
                points = []
                for e in epochs:
                    acc = round(0.3 + 0.05 * i + 0.01 * t + 0.1 * (e - 1), 6)
                    dur = int((i + 1) * e * 1e9)
                    points.append(Point(epoch=e, accuracy=acc, duration_ns=dur,
                                        accuracy_to_time=accuracy_to_time(acc, 0.1, dur)))
                runs.append(Run(uid=f"m{i}-{dataset}-{t}", task="img-classification", dataset=dataset,
                                metric="acc", status="succeeded", source="evaluator",
                                prm={"lr": 0.01 * (t + 1), "batch": 32, "transform": "norm_32"},
                                transform="norm_32", points=points))
        prefix = "rag-" if i % 2 else "alt-"
        await store.add_model_with_runs(Model(name=f"{prefix}m{i}", code=CODE.format(i=i), origin="submitted",
                                              params=1000 * (i + 1)), runs)
    return store


def count(zoo: Path, sql: str, args: tuple = ()) -> int:
    """The one number a `SELECT COUNT(*) ...` over the zoo file returns (its own short connection)."""
    conn = sqlite3.connect(zoo)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()
