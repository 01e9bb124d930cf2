"""Time every plot kind, the leaderboard and every export on a synthetic LEMUR-shaped zoo.

    python bench/stats.py                       # builds (once) /tmp/lemur-bench/zoo-1000000.sqlite
    python bench/stats.py --zoo PATH            # reuses PATH (built there first if missing)
    python bench/stats.py --runs 100000 --only plots

Prints one row per operation: wall and CPU seconds (CPU is this process: SQLite and matplotlib run
in it; wall also shows contention from other work on the machine), what came out, and the plot's
summary. PNGs and exports land in --out; the timings also go to --out/timings.json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_zoo import build_synthetic_zoo, synthetic_zoo_info
from stats import aggregates as agg
from stats.export import TABLES, export
from stats.plots import PLOT_KINDS, render
from zoo.connection import connect_sync
from zoo.query import Filters

CIFAR = Filters(task="img-classification", dataset="cifar-10", metric="acc")


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def ensure_zoo(path: Path, runs: int, seed: int) -> dict[str, Any]:
    info = synthetic_zoo_info(path)
    if path.exists() and path.stat().st_size > 0:
        print(f"reusing {path} ({info or 'not synthetic'})", file=sys.stderr)
        return info or {}
    print(f"building {path} with {runs:,} runs ...", file=sys.stderr)
    summary = build_synthetic_zoo(path, runs, seed, progress=True)
    print(f"built: {summary}", file=sys.stderr)
    return {**summary, "n_runs": runs, "seed": seed}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, help="zoo to use; built there if missing")
    ap.add_argument("--runs", type=int, default=1_000_000, help="runs of a newly built zoo (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lemur-bench/out"))
    ap.add_argument("--only", choices=["plots", "tables", "exports", "all"], default="all")
    args = ap.parse_args(argv)
    zoo = args.zoo or Path(f"/tmp/lemur-bench/zoo-{args.runs}.sqlite")
    zoo.parent.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = ensure_zoo(zoo, args.runs, args.seed)
    conn = connect_sync(zoo, readonly=True)
    m, r, p = conn.execute("SELECT (SELECT COUNT(*) FROM model), (SELECT COUNT(*) FROM run), "
                           "(SELECT COUNT(*) FROM point)").fetchone()
    print(f"zoo {zoo}: {m:,} models, {r:,} runs, {p:,} points; {info}")
    rows: list[dict[str, Any]] = []

    def record(name: str, fn: Callable[[], Any], describe: Callable[[Any], str]) -> None:
        try:
            out, wall, cpu = timed(fn)
            what = describe(out)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports failures and goes on
            wall = cpu = float("nan")
            what = f"FAILED: {type(exc).__name__}: {exc}"
        rows.append({"name": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "result": what})
        print(f"{name:34s} {wall:7.2f} {cpu:7.2f}  {what[:150]}", flush=True)

    print(f"{'operation':34s} {'wall s':>7s} {'cpu s':>7s}  result")
    if args.only in ("plots", "all"):
        for filters, tag in ((Filters(), ""), (CIFAR, " (cifar-10)")):
            for kind in PLOT_KINDS:
                def go(kind: str = kind, filters: Filters = filters, tag: str = tag) -> Any:
                    res = render(kind, conn, filters)
                    (args.out / f"{kind}{'-cifar10' if tag else ''}.png").write_bytes(res.png)
                    return res
                record(f"plot {kind}{tag}", go,
                       lambda res: f"{res.width}x{res.height} px, {len(res.png) // 1024} KiB. {res.summary}")
    if args.only in ("tables", "all"):
        for by in ("accuracy", "accuracy_to_time"):
            for filters, tag in ((Filters(), "all"), (CIFAR, "cifar-10"), (Filters(epoch=2.0), "epoch 2")):
                record(f"leaderboard {by} {tag}", lambda by=by, filters=filters: agg.leaderboard(conn, filters, by),
                       lambda out: f"{out[1]:,} ranked, top {out[0]['name'].iloc[0]} {out[0]['accuracy'].iloc[0]:.3f}")
        record("epoch_summary all", lambda: agg.epoch_summary(conn, Filters()), lambda df: f"{len(df)} rows")
        record("failures all", lambda: agg.failures(conn, Filters()),
               lambda d: f"{d['failed']:,} of {d['evaluator_runs']:,} evaluator runs failed")
        record("catalog all", lambda: agg.catalog(conn, Filters()), lambda df: f"{len(df)} triples")
    if args.only in ("exports", "all"):
        for table in TABLES:
            for fmt in ("parquet", "csv"):
                out = args.out / f"{table}.{fmt}"
                record(f"export {table} {fmt}", lambda out=out, table=table: export(conn, out, table=table),
                       lambda res: f"{res.rows:,} rows, {res.path.stat().st_size / 2**20:.1f} MiB")
        out = args.out / "report.xlsx"
        record("export xlsx report", lambda: export(conn, out),
               lambda res: f"{len(res.sheets)} sheets, {res.images} plots, {res.rows:,} rows, "
                           f"{res.path.stat().st_size / 2**20:.1f} MiB")
    conn.close()
    (args.out / "timings.json").write_text(json.dumps({"zoo": str(zoo), "models": m, "runs": r, "points": p,
                                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except sqlite3.Error as exc:
        sys.exit(f"error: {exc}")
