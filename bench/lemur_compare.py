"""LEMUR side by side: LEMUR nn-dataset 2.2.11's own `check_nn` against ours (protocol="lemur" and our default)
on the same model files, the same hyperparameters and the same torch (issue 13's closing table).

    python bench/lemur_compare.py --model path/to/BagNet.py --model path/to/ResNet.py \
        [--dataset mnist] [--prm '{"lr": 0.01, "momentum": 0.9, "batch": 64, "transform": "norm_32", "epoch": 1}'] \
        [--lemur-packages /tmp/lemur-pkgs] [--skip-lemur] [--max-train-samples N] [--out table.md]

Without --model it runs our reference LeNet5 and ResNet8. LEMUR's code is never part of this repository:
the first run installs `nn-dataset==2.2.11 --no-deps` from the registry into a scratch folder OUTSIDE the repo
(--lemur-packages), run with this interpreter on PYTHONPATH (the same torch);
LEMUR then runs in a child process whose working directory is a scratch LEMUR root (an empty `ab/nn/stat/`,
an empty `db/ab.nn.db` and a README, so it downloads no database, and `data/` links to our data
root, so it reads the same MNIST files). LEMUR reports accuracy after the last epoch and the training time
of its epochs (`duration`, ns) in the statistics files `save_path` receives; ours come from our zoo's run.

Per model and side: accuracy, training seconds (LEMUR: its own `duration`; ours: time inside learn()),
training images/s (train_samples / training seconds), and the whole call's wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LEMUR_VERSION = "2.2.11"
LEMUR_RUNTIME = ("psutil", "zstandard", "huggingface_hub")  # imported by LEMUR on import, absent from our environment
DEFAULT_PRM = {"lr": 0.01, "momentum": 0.9, "batch": 64, "transform": "norm_32", "epoch": 1}
TORCHVISION_DIRS = {"mnist": "MNIST", "cifar-10": "cifar-10-batches-py"}
# the child that imports LEMUR (from --lemur-packages): prints one JSON line (our code only; LEMUR is imported there)
LEMUR_CHILD = r"""
import json, sys, time
from pathlib import Path
code, dataset, prm, out = Path(sys.argv[1]).read_text(), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
t0 = time.perf_counter()
from ab.nn.api import check_nn
imported = time.perf_counter() - t0
name, accuracy, a2t, quality = check_nn(code, "img-classification", dataset, "acc", dict(prm), save_to_db=False,
                                        save_path=str(out))[:4]
stats = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"), key=lambda p: int(p.stem))]
last = stats[-1][0] if isinstance(stats[-1], list) else stats[-1]
print(json.dumps({"accuracy": accuracy, "duration_ns": last.get("duration"), "wall_s": time.perf_counter() - t0,
                  "import_s": imported}))
"""


def lemur_packages(target: Path) -> Path:
    """A scratch folder OUTSIDE the repo holding nn-dataset 2.2.11 (--no-deps) and the one runtime package
    it imports that this environment lacks; the child runs this interpreter with it on PYTHONPATH, so
    LEMUR uses exactly our torch, torchvision and numpy."""
    if not (target / "ab" / "nn" / "api.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                        f"nn-dataset=={LEMUR_VERSION}", *LEMUR_RUNTIME], check=True)
    return target


def lemur_root(data_root: Path, dataset: str) -> Path:
    """A scratch LEMUR project root: empty statistics (no database download) and our dataset files."""
    root = Path(tempfile.mkdtemp(prefix="lemur-root-"))
    (root / "ab" / "nn" / "stat").mkdir(parents=True)
    (root / "README.md").write_text("scratch LEMUR root for bench/lemur_compare.py\n")
    (root / "db").mkdir()
    sqlite3.connect(root / "db" / "ab.nn.db").close()  # an empty database: LEMUR downloads one without it
    (root / "data").mkdir()
    folder = TORCHVISION_DIRS.get(dataset)
    if folder and (data_root / folder).exists():
        (root / "data" / folder).symlink_to(data_root / folder)
    return root


def run_lemur(packages: Path, model: Path, dataset: str, prm: dict[str, Any], data_root: Path,
              n_train: int) -> dict[str, Any]:
    root = lemur_root(data_root, dataset)
    out = root / "stat-out"
    env = {**os.environ, "PYTHONPATH": str(packages)}
    proc = subprocess.run([sys.executable, "-c", LEMUR_CHILD, str(model.resolve()), dataset, json.dumps(prm),
                           str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return _row(found["accuracy"], found["duration_ns"], n_train, found["wall_s"])


def run_ours(model: Path, dataset: str, prm: dict[str, Any], protocol: str, zoo: Path,
             max_train_samples: int | None) -> dict[str, Any]:
    from lemur_agent_server import api

    t0 = time.perf_counter()
    _, accuracy, _, _ = api.check_nn(model.read_text(), "img-classification", dataset, "acc", dict(prm), zoo=zoo,
                                     max_train_samples=max_train_samples, protocol=protocol)
    wall = time.perf_counter() - t0
    conn = sqlite3.connect(zoo)
    try:
        duration, samples = conn.execute("SELECT duration_ns, train_samples FROM run WHERE protocol=? "
                                         "ORDER BY id DESC LIMIT 1", (protocol,)).fetchone()
    finally:
        conn.close()
    return _row(accuracy, duration, samples * float(prm.get("epoch", 1)), wall)


def _row(accuracy: float, duration_ns: int | None, images: float, wall_s: float) -> dict[str, Any]:
    seconds = duration_ns / 1e9 if duration_ns else None
    return {"accuracy": accuracy, "train_s": seconds, "images_per_s": images / seconds if seconds else None,
            "wall_s": wall_s}


def table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    lines = ["| model | side | accuracy | training s | images/s | whole call s |", "|---|---|---|---|---|---|"]
    for model, side, r in rows:
        if "error" in r:
            lines.append(f"| {model} | {side} | error: {r['error'].splitlines()[-1][:80]} | | | |")
            continue
        fmt = {k: (f"{v:.4f}" if k == "accuracy" else f"{v:.1f}") if v is not None else "-" for k, v in r.items()}
        lines.append(f"| {model} | {side} | {fmt['accuracy']} | {fmt['train_s']} | {fmt['images_per_s']} | "
                     f"{fmt['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path, default=[])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--prm", type=json.loads, default=DEFAULT_PRM)
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("LEMUR_DATA", REPO / "data")))
    parser.add_argument("--lemur-packages", type=Path, default=Path(tempfile.gettempdir()) / "lemur-2.2.11-packages")
    parser.add_argument("--skip-lemur", action="store_true", help="ours only (no registry needed)")
    parser.add_argument("--max-train-samples", type=int, help="ours only: a quick smoke run")
    parser.add_argument("--skip-ours", action="store_true", help="LEMUR's side only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("LEMUR_DATA", str(args.data_root))
    os.environ.setdefault("LEMUR_SANDBOX", "process")
    if not args.model:
        from lemur_agent_server import reference_models

        args.model = [REPO / "lemur_agent_server" / "reference_models" / reference_models.REFERENCE_MODELS[name]
                      for name in ("LeNet5", "ResNet8")]
    from sandbox import datasets

    scratch = Path(tempfile.mkdtemp(prefix="lemur-compare-"))
    n_train = datasets.prepare(args.dataset, args.data_root, scratch / "dataset-cache").n_train
    packages = None if args.skip_lemur else lemur_packages(args.lemur_packages)
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for model in args.model:
        if packages is not None:
            rows.append((model.stem, f"LEMUR {LEMUR_VERSION}", run_lemur(packages, model, args.dataset, args.prm,
                                                                        args.data_root, n_train)))
        for protocol in () if args.skip_ours else ("lemur", "default"):
            rows.append((model.stem, f"ours protocol={protocol}", run_ours(
                model, args.dataset, args.prm, protocol, scratch / "zoo.sqlite", args.max_train_samples)))
        print(table(rows), file=sys.stderr)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
