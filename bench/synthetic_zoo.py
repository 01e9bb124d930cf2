"""A synthetic zoo shaped like LEMUR, for benchmarks: `build_synthetic_zoo(path, n_runs, seed)`.

Why synthetic: the real LEMUR dump is ~580k records; benchmarks must show that queries and plots stay
fast at a million runs and beyond, on any machine, without downloads. The shape follows LEMUR 2.1.2
(see shared/research/lemur.md §6): 4 tasks over 11 datasets (12 task/dataset/metric triples) weighted
like LEMUR's record counts, one model per ~50 runs with LEMUR-like name families, runs that reach
epochs 1..5 (a quarter stop after epoch 1), half-epoch curve points on the evaluator's runs, learning
curves that saturate toward a per-dataset ceiling, training times that grow with parameters and
dataset size, params/FLOPs on most models, and 15 % evaluator runs of which about 40 % fail, time
out or are pruned (with `run.error` JSON {stage, kind, message}).

Speed: rows are generated with numpy in chunks and inserted with plain `sqlite3.executemany` in big
transactions straight into the zoo schema; the secondary indexes of `run` and `point` are dropped
during the load and rebuilt at the end (one sort each instead of millions of random B-tree inserts).
A million runs (~3.3 M points) take about a minute.

Usage (library):
    from bench.synthetic_zoo import build_synthetic_zoo, synthetic_zoo_info
    summary = build_synthetic_zoo(Path("/tmp/zoo.sqlite"), n_runs=1_000_000, seed=0)
    # -> {"models": 20000, "runs": 1000000, "points": ..., "seconds": ...}
    synthetic_zoo_info(path)  # -> the stored {"n_runs", "seed", "version"} or None

Usage (command line):
    python bench/synthetic_zoo.py /tmp/zoo.sqlite --runs 1000000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo import codehash, connection

GENERATOR_VERSION = 2
META_KEY = "synthetic_zoo"

# (task, dataset, metric, LEMUR record weight, chance level, ceiling, seconds per epoch for a 1M-param net)
TRIPLES: list[tuple[str, str, str, float, float, float, float]] = [
    ("img-classification", "cifar-10", "acc", 119, 0.10, 0.93, 20.0),
    ("img-classification", "mnist", "acc", 76, 0.10, 0.995, 12.0),
    ("img-classification", "svhn", "acc", 75, 0.10, 0.96, 25.0),
    ("img-classification", "cifar-100", "acc", 62, 0.01, 0.72, 20.0),
    ("img-classification", "imagenette", "acc", 59, 0.10, 0.88, 45.0),
    ("img-classification", "celeba-gender", "acc", 47, 0.50, 0.97, 90.0),
    ("img-classification", "places365", "acc", 11, 1 / 365, 0.45, 400.0),
    ("img-classification", "imagenet100", "acc", 8, 0.01, 0.70, 300.0),
    ("img-segmentation", "coco", "iou", 65, 0.11, 0.55, 600.0),
    ("img-segmentation", "cityscapes", "iou", 6, 0.05, 0.62, 250.0),
    ("img-captioning", "coco", "bleu", 33, 0.001, 0.30, 900.0),
    ("txt-generation", "wikitext", "ppl", 12, 0.01, 0.35, 120.0),
]
TASKS = sorted({t[0] for t in TRIPLES})
FAMILIES = ["ga-", "FractalNet-", "alt-nn1-", "ast-dimension-AlexNet-", "alt-", "rag-", "alt-nn2-", "rl-init-"]
FAMILY_WEIGHTS = np.array([3727, 1649, 1322, 1129, 1127, 792, 417, 123], dtype=float)
TRANSFORMS = ["norm_32", "norm_32_flip", "norm_64_flip", "norm_128", "norm_224_flip", "echo_32",
              "complex_32", "bf-v1-CenterCrop_Pad_RandomCrop"]
# evaluator outcomes: status, share, error
FAILURES: list[tuple[str, str, str]] = [
    ("check", "SyntaxError", "invalid syntax (net.py, line 41)"),
    ("check", "ImportError", "No module named 'timm'"),
    ("check", "ShapeMismatch", "mat1 and mat2 shapes cannot be multiplied (8x4096 and 2048x10)"),
    ("train", "OutOfMemory", "CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("train", "NaNLoss", "loss is NaN at step 1200; lower the learning rate"),
    ("train", "AccuracyTooLow", "accuracy 0.101 <= 1.2 x chance after epoch 1"),
    ("eval", "RuntimeError", "expected scalar type Float but found Half"),
]
FAILURE_WEIGHTS = np.array([6, 2, 10, 4, 3, 8, 1], dtype=float)
T0 = 1_700_000_000.0  # runs are spread over two years after this
SPAN_S = 2 * 365 * 86400.0


def _point_sql() -> str:
    return ("INSERT INTO point(run_id, epoch, model_id, task, dataset, metric, accuracy, val_accuracy, loss,"
            " duration_ns, accuracy_to_time, elapsed_s, created) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _run_sql() -> str:
    return ("INSERT INTO run(id, uid, model_id, task, dataset, metric, transform, prm, seed, epochs, status,"
            " accuracy, duration_ns, accuracy_to_time, device, versions, dataset_hash, job_id, trial, repeat,"
            " selected, isolation, error, source, created)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


def synthetic_zoo_info(path: Path) -> dict[str, Any] | None:
    """The generator parameters stored in a zoo built here, or None (no file, or not synthetic)."""
    if not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (META_KEY,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return json.loads(row[0]) if row else None


def _models(rng: np.random.Generator, n_models: int) -> dict[str, np.ndarray]:
    fam = rng.choice(len(FAMILIES), size=n_models, p=FAMILY_WEIGHTS / FAMILY_WEIGHTS.sum())
    task_w = np.array([sum(t[3] for t in TRIPLES if t[0] == task) for task in TASKS])
    task = rng.choice(len(TASKS), size=n_models, p=task_w / task_w.sum())
    params = np.clip(np.exp(rng.normal(np.log(2e6), 1.5, n_models)), 2e3, 6e8).astype(np.int64)
    flops = (params * np.exp(rng.normal(np.log(60), 0.9, n_models))).astype(np.int64)
    quality = rng.beta(6, 2, n_models)
    # models that learn well tend to be mid-sized: a mild hump in log(params)
    quality *= 1 - 0.08 * ((np.log10(params) - 6.3) / 1.5) ** 2
    return {"family": fam, "task": task, "params": params, "flops": flops,
            "quality": np.clip(quality, 0.05, 1.0),
            "params_null": rng.random(n_models) < 0.06, "flops_null": rng.random(n_models) < 0.10,
            "created": np.sort(T0 + rng.random(n_models) * SPAN_S)}


def _insert_models(conn: sqlite3.Connection, m: dict[str, np.ndarray], seed: int) -> None:
    rows = []
    for i in range(len(m["task"])):
        name = f"{FAMILIES[m['family'][i]]}{seed:x}{i:07x}"
        code = (f"import torch\nimport torch.nn as nn\n\n\nclass Net(nn.Module):  # synthetic {name}\n"
                f"    def __init__(self, in_shape, out_shape, prm, device):\n        super().__init__()\n"
                f"        self.width = {int(m['params'][i]) % 997}\n")
        params = None if m["params_null"][i] else int(m["params"][i])
        flops = None if m["flops_null"][i] or params is None else int(m["flops"][i])
        rows.append((i + 1, name, code, codehash.code_hash(code), codehash.lemur_id(code),
                     FAMILIES[m["family"][i]].rstrip("-"), "lemur" if i % 7 else "submitted",
                     f"fp{i % 5000:05d}", params, flops, None, None,
                     '["lr", "momentum", "batch", "dropout"]', float(m["created"][i])))
    conn.executemany(
        "INSERT INTO model(id, name, code, code_hash, lemur_id, prefix, origin, fingerprint, params, flops,"
        " code_quality, code_quality_detail, supported_hyperparameters, created)"
        " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)


class _Chunk:
    """Runs [start, start+n) and their curve points, generated together so they stay consistent."""

    def __init__(self, rng: np.random.Generator, m: dict[str, np.ndarray], start: int, n: int,
                 task_models: list[np.ndarray], task_model_p: list[np.ndarray], seed: int, total: int):
        w = np.array([t[3] for t in TRIPLES])
        tri = rng.choice(len(TRIPLES), size=n, p=w / w.sum())
        model = np.empty(n, dtype=np.int64)
        for ti, task in enumerate(TASKS):
            sel = np.flatnonzero(np.array([TRIPLES[k][0] == task for k in tri]))
            if sel.size:
                model[sel] = rng.choice(task_models[ti], size=sel.size, p=task_model_p[ti])
        evaluator = rng.random(n) < 0.15
        outcome = rng.choice(4, size=n, p=[0.60, 0.22, 0.10, 0.08])  # succeeded, failed, timed_out, pruned
        status = np.where(evaluator, np.array(["succeeded", "failed", "timed_out", "pruned"])[outcome],
                          "imported")
        epochs = rng.choice([1, 2, 3, 4, 5], size=n, p=[0.25, 0.1875, 0.1875, 0.1875, 0.1875])
        failed = status == "failed"
        fail_kind = rng.choice(len(FAILURES), size=n, p=FAILURE_WEIGHTS / FAILURE_WEIGHTS.sum())
        check_fail = failed & np.array([FAILURES[k][0] == "check" for k in fail_kind])
        n_scored = epochs.copy()
        n_scored[check_fail] = 0
        n_scored[failed & ~check_fail] = np.minimum(epochs[failed & ~check_fail] - 1, 2)
        n_scored[status == "pruned"] = np.minimum(epochs[status == "pruned"], 2)
        step = np.where(evaluator, 0.5, 1.0)
        n_points = np.where(evaluator, 2 * n_scored, n_scored).astype(np.int64)

        lr = np.exp(rng.uniform(np.log(1e-4), np.log(0.3), n))
        momentum = rng.uniform(0.5, 0.99, n)
        batch = 2 ** rng.integers(4, 10, n)
        dropout = rng.uniform(0, 0.5, n)
        skill = np.clip(np.exp(-((np.log10(lr) + 2.0) ** 2) / 3.0) * (0.85 + 0.15 * momentum), 0.05, 1)
        tau = rng.uniform(0.6, 2.5, n)
        chance = np.array([TRIPLES[k][4] for k in tri])
        ceiling = np.array([TRIPLES[k][5] for k in tri])
        sec_per_epoch = (np.array([TRIPLES[k][6] for k in tri]) * (m["params"][model] / 1e6) ** 0.35
                         * (256 / batch) ** 0.25 * np.exp(rng.normal(0, 0.3, n)))
        created = T0 + (start + np.arange(n) + rng.random(n)) / total * SPAN_S
        skill = skill * (0.9 + 0.1 * (created - T0) / SPAN_S)  # the community improves, ~10 % over the span

        # points
        run_idx = np.repeat(np.arange(n), n_points)
        first = np.cumsum(n_points) - n_points
        k = np.arange(run_idx.size) - np.repeat(first, n_points) + 1
        ep = k * step[run_idx]
        q = m["quality"][model][run_idx] * skill[run_idx]
        acc = chance[run_idx] + (ceiling[run_idx] - chance[run_idx]) * q * (1 - np.exp(-ep / tau[run_idx]))
        acc = np.clip(acc + rng.normal(0, 0.012, acc.size), 0.0, 1.0)
        dur_s = ep * sec_per_epoch[run_idx] * np.exp(rng.normal(0, 0.03, acc.size))
        dur_ns = (dur_s * 1e9).astype(np.int64)
        a2t = np.maximum(0.0, acc - chance[run_idx]) / (dur_ns / 1e11)
        self.points = (run_idx, ep, acc, dur_ns, a2t, dur_s)

        last = first + n_points - 1
        has = n_points > 0
        self.n, self.start, self.seed = n, start, seed
        self.tri, self.model, self.status, self.evaluator = tri, model, status, evaluator
        self.fail_kind, self.failed = fail_kind, failed
        self.lr, self.momentum, self.batch, self.dropout = lr, momentum, batch, dropout
        at = np.where(has, last, 0)

        def final(values: np.ndarray) -> np.ndarray:
            return np.where(has, values[at] if values.size else 0, np.nan)

        self.epochs_reached, self.final_acc = final(ep), final(acc)
        self.final_dur, self.final_a2t = final(dur_ns.astype(float)), final(a2t)
        self.created = created
        self.transform = rng.integers(0, len(TRANSFORMS), n)
        self.val_noise = rng.normal(0, 0.01, acc.size)

    def run_rows(self) -> list[tuple[Any, ...]]:
        rows = []
        for i in range(self.n):
            rid = self.start + i + 1
            t = TRIPLES[self.tri[i]]
            status = str(self.status[i])
            ev = bool(self.evaluator[i])
            tr = TRANSFORMS[self.transform[i]]
            prm = (f'{{"batch": {int(self.batch[i])}, "dropout": {self.dropout[i]:.4f}, "lr": {self.lr[i]:.6g},'
                   f' "momentum": {self.momentum[i]:.4f}, "transform": "{tr}"}}')
            error = None
            if status == "failed":
                stage, kind, msg = FAILURES[self.fail_kind[i]]
                error = json.dumps({"kind": kind, "message": msg, "stage": stage})
            elif status == "timed_out":
                error = '{"kind": "timeout", "message": "time box of 600 s reached", "stage": "train"}'
            scored = not np.isnan(self.final_acc[i])
            rows.append((
                rid, f"syn-{self.seed}-{rid}", int(self.model[i]) + 1, t[0], t[1], t[2], tr, prm,
                rid % 1000 if ev else None,
                float(self.epochs_reached[i]) if scored else None, status,
                float(self.final_acc[i]) if scored else None,
                int(self.final_dur[i]) if scored else None,
                float(self.final_a2t[i]) if scored else None,
                "cuda:0" if ev else None, None, None,
                f"job-{rid // 8}" if ev else None, rid % 8 if ev else None, 0 if ev else None,
                int(ev and rid % 8 == 0 and status == "succeeded"), None, error,
                "evaluator" if ev else "lemur-import", float(self.created[i])))
        return rows

    def point_rows(self) -> list[tuple[Any, ...]]:
        run_idx, ep, acc, dur_ns, a2t, dur_s = self.points
        rid = run_idx + self.start + 1
        ev = self.evaluator[run_idx]
        tri = self.tri[run_idx]
        names = np.array([t[0] for t in TRIPLES]), np.array([t[1] for t in TRIPLES]), np.array(
            [t[2] for t in TRIPLES])
        val = np.where(ev, np.clip(acc + self.val_noise, 0, 1), np.nan)
        loss = np.where(ev, -np.log(np.maximum(acc, 1e-3)), np.nan)
        val_l = [None if np.isnan(v) else v for v in val.tolist()]
        loss_l = [None if np.isnan(v) else v for v in loss.tolist()]
        return list(zip(rid.tolist(), ep.tolist(), (self.model[run_idx] + 1).tolist(),
                        names[0][tri].tolist(), names[1][tri].tolist(), names[2][tri].tolist(),
                        acc.tolist(), val_l, loss_l, dur_ns.tolist(), a2t.tolist(),
                        (dur_s * 1.15 + 4).tolist(), self.created[run_idx].tolist()))


def _secondary_indexes(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name IN ('run', 'point')"
        " AND sql IS NOT NULL")]


def build_synthetic_zoo(path: Path, n_runs: int, seed: int = 0, *, chunk: int = 100_000,
                        progress: bool = False) -> dict[str, Any]:
    """Create a new zoo file at `path` holding `n_runs` synthetic runs; deterministic for (n_runs, seed).

    Refuses to touch an existing non-empty file (raises FileExistsError): delete it first, or reuse it
    after checking `synthetic_zoo_info(path)`. Returns {"models", "runs", "points", "seconds"}.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        raise FileExistsError(f"{path} exists; remove it or reuse it (synthetic_zoo_info tells its params)")
    t0 = time.perf_counter()
    connection.initialize(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # one writer, no readers: skip the WAL copy of every page
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("PRAGMA temp_store=MEMORY")
    rng = np.random.default_rng(seed)
    n_models = max(1, n_runs // 50)
    m = _models(rng, n_models)
    task_models, task_model_p = [], []
    for ti in range(len(TASKS)):
        ids = np.flatnonzero(m["task"] == ti)
        if ids.size == 0:  # tiny zoos: every task still gets a model
            ids = np.array([ti % n_models])
        # a few popular models get many runs (Zipf-like), as in LEMUR
        p = 1.0 / (np.arange(ids.size) + 10.0) ** 0.8
        task_models.append(ids[rng.permutation(ids.size)])
        task_model_p.append(p / p.sum())
    indexes = _secondary_indexes(conn)
    conn.execute("BEGIN")
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    _insert_models(conn, m, seed)
    conn.execute("COMMIT")
    n_points = 0
    for start in range(0, n_runs, chunk):
        c = _Chunk(rng, m, start, min(chunk, n_runs - start), task_models, task_model_p, seed, n_runs)
        conn.execute("BEGIN")
        conn.executemany(_run_sql(), c.run_rows())
        pts = c.point_rows()
        conn.executemany(_point_sql(), pts)
        conn.execute("COMMIT")
        n_points += len(pts)
        if progress:
            print(f"  {start + c.n:>10,} runs  {n_points:>11,} points  {time.perf_counter() - t0:6.1f} s",
                  file=sys.stderr)
    conn.execute("BEGIN")
    for _, sql in indexes:
        conn.execute(sql)
    info = {"n_runs": n_runs, "seed": seed, "version": GENERATOR_VERSION}
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (META_KEY, json.dumps(info)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return {"models": n_models, "runs": n_runs, "points": n_points,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(build_synthetic_zoo(args.path, args.runs, args.seed, progress=True)))


if __name__ == "__main__":
    main()
