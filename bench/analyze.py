"""`analyze` throughput: models measured per second with a real sandbox, extrapolated to a LEMUR import.

With `--lemur-wheel` (a LEMUR nn-dataset 2.1.x wheel, read at run time, nothing of it is stored here) a
random sample of its `ab/nn/nn/*.py` models goes into a fresh zoo, each with one run on the dataset its
statistics name (so the input shape is the one `analyze` would choose after an import); without it, the
reference models are repeated under distinct names (a lower bound on the cost per model).

    python bench/analyze.py [--lemur-wheel nn_dataset-2.1.2-py3-none-any.whl] [--sample 300]
                            [--batch-size 200] [--sandbox process] [--total 10482]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lemur_agent_server.analyze import AnalyzeFilters, analyze_zoo_async  # noqa: E402
from lemur_agent_server.config import Settings  # noqa: E402
from lemur_agent_server.reference_models import read_code  # noqa: E402
from zoo.records import Model, Run  # noqa: E402
from zoo.store import ZooStore  # noqa: E402

_NN = re.compile(r"^ab/nn/nn/([^/]+)\.py$")
_STAT = re.compile(r"^ab/nn/stat/train/([^_/]+)_([^_/]+)_([^_/]+)_([^/]+)/")


def wheel_models(wheel: Path, sample: int, seed: int) -> list[tuple[str, str, list[tuple[str, str, str | None]]]]:
    """(name, code, [(task, dataset, transform)]) for `sample` random models of the wheel; the transform is
    the most common one of the model's first statistics file per task/dataset (what an import stores)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        files = {m.group(1): n for n in names if (m := _NN.match(n)) and m.group(1) != "__init__"}
        stats: dict[str, dict[tuple[str, str], str]] = {}
        for n in names:
            if m := _STAT.match(n):
                stats.setdefault(m.group(4), {}).setdefault((m.group(1), m.group(2)), n)
        chosen = random.Random(seed).sample(sorted(files), min(sample, len(files)))
        out = []
        for name in chosen:
            uses = []
            for (task, ds), first_file in sorted(stats.get(name, {}).items()):
                try:
                    trials = json.loads(z.read(first_file))
                    common = Counter(t.get("transform") for t in trials if isinstance(t, dict)).most_common(1)
                except (ValueError, AttributeError, TypeError):
                    common = []
                uses.append((task, ds, common[0][0] if common else None))
            out.append((name, z.read(files[name]).decode("utf-8", "replace"), uses))
        return out


def reference_models(sample: int) -> list[tuple[str, str, list[tuple[str, str, str | None]]]]:
    names = ["LeNet5", "ResNet8", "SmallVGG", "MobileNetLite"]
    return [(f"{names[i % 4]}-{i}", read_code(names[i % 4]), [("img-classification", "cifar-10", "norm_32")])
            for i in range(sample)]


async def build_zoo(path: Path, models: list[tuple[str, str, list[tuple[str, str, str | None]]]]) -> None:
    async with await ZooStore.open(path) as store:
        for name, code, uses in models:
            runs = [Run(uid=f"{name}:{task}:{ds}", task=task, dataset=ds, metric="acc", status="imported",
                        source="lemur-import", transform=tf, prm={"transform": tf} if tf else {})
                    for task, ds, tf in uses]
            await store.add_model_with_runs(Model(name=name, code=code, origin="lemur"), runs)


def failure_reasons(zoo: Path, top: int = 10) -> list[tuple[str, int]]:
    """The most frequent failure messages (first 100 characters), to tell model bugs from ours."""
    conn = sqlite3.connect(zoo)
    try:
        errors = [json.loads(e)["message"] for (e,) in conn.execute(
            "SELECT error FROM model_analysis WHERE status != 'ok'")]
    finally:
        conn.close()
    return Counter(m.splitlines()[0][:100] for m in errors).most_common(top)


def sandbox_seconds(zoo: Path) -> dict[str, float]:
    """Seconds the runner spent per model (build, forward, FLOPs, fingerprint): median, p90, max, sum."""
    conn = sqlite3.connect(zoo)
    try:
        values = sorted(v for (v,) in conn.execute(
            "SELECT json_extract(detail, '$.sandbox_s') FROM model_analysis") if v is not None)
    finally:
        conn.close()
    if not values:
        return {}
    return {"median": values[len(values) // 2], "p90": values[int(len(values) * 0.9)], "max": values[-1],
            "sum": round(sum(values), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lemur-wheel", type=Path)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--model-timeout", type=float, default=60.0)
    parser.add_argument("--sandbox", default="process")
    parser.add_argument("--parallel", type=int, default=1, help="sandboxes at once")
    parser.add_argument("--total", type=int, default=10_482, help="models to extrapolate to")
    args = parser.parse_args()
    models = (wheel_models(args.lemur_wheel, args.sample, args.seed) if args.lemur_wheel
              else reference_models(args.sample))
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(Path(tmp) / "zoo.sqlite", sandbox=args.sandbox)
        anyio.run(build_zoo, settings.zoo_path, models)
        t0 = time.monotonic()
        filters = AnalyzeFilters(batch_size=args.batch_size, model_timeout_s=args.model_timeout,
                                 parallel=args.parallel)
        report = anyio.run(analyze_zoo_async, settings, filters, None)
        wall = time.monotonic() - t0
        reasons = failure_reasons(settings.zoo_path)
        per_model = sandbox_seconds(settings.zoo_path)
    rate = report.done / wall
    print(json.dumps({"source": str(args.lemur_wheel or "reference models"), "models": report.done,
                      "ok": report.ok, "failed": report.failed, "skipped": report.skipped,
                      "failure_kinds": report.failure_kinds, "sandboxes": report.sandboxes, "parallel": args.parallel,
                      "wall_s": round(wall, 1), "models_per_s": round(rate, 2),
                      f"extrapolated_s_for_{args.total}": round(args.total / rate),
                      "isolation": report.isolation.get("backend"), "sandbox_s_per_model": per_model,
                      "top_failure_reasons": reasons}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
