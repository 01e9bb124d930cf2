"""stats export --format sft-jsonl|dpo-jsonl: fine-tuning data from the zoo, split by model."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from stats import cli as stats_cli
from stats.export import export
from stats.finetune import SPLITS
from zoo.query import Filters
from zoo.records import Model, Point, Run
from zoo.store import ZooStore

N = 30


def code(i: int) -> str:
    return f"import torch\n\n\nclass Net(torch.nn.Module):\n    WIDTH = {i}\n"


def run(uid: str, dataset: str, accuracy: float) -> Run:
    return Run(uid=uid, task="img-classification", dataset=dataset, metric="acc", status="succeeded",
               source="evaluator", prm={"lr": 0.01, "batch": 32, "transform": "norm_32"}, transform="norm_32",
               points=[Point(epoch=1.0, accuracy=accuracy - 0.1, duration_ns=10),
                       Point(epoch=2.0, accuracy=accuracy, duration_ns=20)])


def make_zoo(path: Path) -> None:
    """m0..m29 on cifar-10 (accuracy 0.30 + 0.02 i; two trials, the better counts), even ones on mnist too;
    dup-x/dup-y share a fingerprint, same-a/same-b the same code (no fingerprint)."""
    async def build():
        store = await ZooStore.open(path)
        for i in range(N):
            runs = [run(f"m{i}-c-0", "cifar-10", 0.30 + 0.02 * i), run(f"m{i}-c-1", "cifar-10", 0.25 + 0.02 * i)]
            if i % 2 == 0:
                runs.append(run(f"m{i}-m", "mnist", 0.9))
            await store.add_model_with_runs(Model(name=f"m{i}", code=code(i), origin="submitted",
                                                  fingerprint=f"fp-{i}", params=100 * i), runs)
        for name, acc, fp, i in (("dup-x", 0.7, "fp-shared", 100), ("dup-y", 0.6, "fp-shared", 101),
                                 ("same-a", 0.5, None, 102), ("same-b", 0.55, None, 102)):
            source = code(i) + ("\n# a comment\n" if name == "same-a" else "")
            await store.add_model_with_runs(Model(name=name, code=source, origin="submitted", fingerprint=fp),
                                            [run(f"{name}-c", "cifar-10", acc)])
        await store.close()

    anyio.run(build)


def read(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in SPLITS}


def models_of(records: list[dict]) -> set[str]:
    return {r["meta"]["nn"] for r in records}


def test_sft_records_split_by_model(tmp_path: Path):
    zoo = tmp_path / "zoo.sqlite"
    make_zoo(zoo)
    res = export(zoo, tmp_path / "sft", "sft-jsonl")
    splits = read(tmp_path / "sft")
    everything = [r for s in SPLITS for r in splits[s]]
    assert len(everything) == N + N // 2 + 2  # one record per model and dataset, duplicates gone
    assert res.models == N + 2 and res.duplicates_removed == 2 and sum(res.rows.values()) == len(everything)
    for s in SPLITS:
        assert splits[s], f"{s} is empty"
        assert all(r["meta"]["split"] == s for r in splits[s])
    assert not models_of(splits["train"]) & models_of(splits["dev"])
    assert not models_of(splits["train"]) & models_of(splits["test"])
    assert not models_of(splits["dev"]) & models_of(splits["test"])

    rec = next(r for r in everything if r["meta"]["nn"] == "m5")
    assert set(rec) == {"id", "messages", "meta"}
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][2]["content"] == code(5)
    user = rec["messages"][1]["content"]
    assert "img-classification" in user and "cifar-10" in user and "0.4000" in user  # the best trial's target
    assert rec["meta"]["accuracy"] == 0.4 and rec["meta"]["epoch"] == 2.0 and rec["meta"]["params"] == 500
    assert len({r["id"] for r in everything}) == len(everything)

    names = {r["meta"]["nn"] for r in everything}
    assert "dup-x" in names and "dup-y" not in names  # same architecture: the better one stays
    assert "same-b" in names and "same-a" not in names  # same code up to a comment

    export(zoo, tmp_path / "again", "sft-jsonl")
    assert read(tmp_path / "again") == splits  # deterministic
    export(zoo, tmp_path / "seed1", "sft-jsonl", finetune={"seed": 1})
    assert {s: models_of(r) for s, r in read(tmp_path / "seed1").items()} != {s: models_of(r) for s, r in
                                                                                splits.items()}


def test_filters(tmp_path: Path):
    zoo = tmp_path / "zoo.sqlite"
    make_zoo(zoo)
    export(zoo, tmp_path / "mnist", "sft-jsonl", Filters(dataset="mnist"))
    records = [r for rs in read(tmp_path / "mnist").values() for r in rs]
    assert len(records) == N // 2 and {r["meta"]["dataset"] for r in records} == {"mnist"}
    export(zoo, tmp_path / "good", "sft-jsonl", Filters(task="img-classification", dataset="cifar-10",
                                                       min_accuracy=0.8))
    records = [r for rs in read(tmp_path / "good").values() for r in rs]
    assert sorted(r["meta"]["nn"] for r in records) == ["m25", "m26", "m27", "m28", "m29"]
    assert all(r["meta"]["accuracy"] >= 0.8 for r in records)

    assert stats_cli.main(["stats", "export", "--format", "sft-jsonl", "--zoo", str(zoo), "--dataset", "nothing",
                           str(tmp_path / "none")]) == 2


def test_dpo_pairs(tmp_path: Path, capsys):
    zoo = tmp_path / "zoo.sqlite"
    make_zoo(zoo)
    assert stats_cli.main(["stats", "export", "--format", "dpo-jsonl", "--zoo", str(zoo), "--min-gap", "0.1",
                           "--dev-fraction", "0.2", "--test-fraction", "0.2", str(tmp_path / "dpo")]) == 0
    assert "dpo-jsonl" in capsys.readouterr().out
    splits = read(tmp_path / "dpo")
    pairs = [r for rs in splits.values() for r in rs]
    assert pairs
    for s, records in splits.items():
        for r in records:
            assert set(r) == {"id", "prompt", "chosen", "rejected", "meta"}
            assert [m["role"] for m in r["prompt"]] == ["system", "user"]
            meta = r["meta"]
            assert meta["chosen_accuracy"] - meta["rejected_accuracy"] >= 0.1
            assert meta["chosen"]["split"] == meta["rejected"]["split"] == meta["split"] == s
            assert meta["chosen"]["dataset"] == meta["rejected"]["dataset"] == meta["dataset"]
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
            assert "Target" not in r["prompt"][1]["content"]  # the prompt must not give the answer away
    assert all(r["meta"]["dataset"] == "cifar-10" for r in pairs)  # mnist models all score 0.9: no gap

    bad = stats_cli.main(["stats", "export", "--format", "dpo-jsonl", "--zoo", str(zoo), "--dev-fraction", "0.7",
                          "--test-fraction", "0.5", str(tmp_path / "bad")])
    assert bad == 2 and "must be in [0, 1)" in capsys.readouterr().err
