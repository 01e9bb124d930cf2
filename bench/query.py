"""Query speed on a synthetic zoo of >= 1M runs (and optionally an imported LEMUR zoo).

Times, each as the median of repeated runs in this process:
  best-only query for one task/dataset/epoch (the target: <= 50 ms; LEMUR's own: 30 s on 578k rows),
  the unfiltered first page, get_model, data() for one task/dataset, a cursor page deep into results,
and prints EXPLAIN QUERY PLAN of the best-only query. Ratios are against LEMUR's published timings
measured on the same kind of 2-core machine (shared/research/lemur.md §4.6), and against a naive
GROUP BY without our covering index, measured here in the same run.

    python bench/query.py --runs 1000000 [--zoo /tmp/synthetic.sqlite] [--lemur-zoo imported.sqlite]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_zoo import build_synthetic_zoo, synthetic_zoo_info  # noqa: E402
from lemur_agent_server import api  # noqa: E402
from zoo import connection, schema  # noqa: E402
from zoo.query import Filters, Page, grouped_sql  # noqa: E402
from zoo.store import ZooStore  # noqa: E402

LEMUR_SECONDS = {"best_only_one_task_dataset_epoch": 30.2, "data_one_task_dataset": 6.5}


def median_ms(fn: Callable[[], Any], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def amedian_ms(fn: Callable[[], Any], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def bench(path: Path, label: str) -> None:
    store = await ZooStore.open(path)
    try:
        busiest = await store.fetchone(
            "SELECT task, dataset, metric FROM run GROUP BY task, dataset, metric ORDER BY COUNT(*) DESC LIMIT 1")
        assert busiest, "empty zoo"
        task, dataset, metric = busiest["task"], busiest["dataset"], busiest["metric"]
        epoch_row = await store.fetchone("SELECT epoch FROM point WHERE task=? AND dataset=? GROUP BY epoch "
                                         "ORDER BY COUNT(*) DESC LIMIT 1", (task, dataset))
        epoch = epoch_row["epoch"]
        best = Filters(task=task, dataset=dataset, metric=metric, epoch=epoch, only_best_accuracy=True)
        totals = await store.totals()
        points = (await store.fetchone("SELECT COUNT(*) AS n FROM point"))["n"]
        print(f"\n== {label}: {totals['models']:,} models, {totals['runs']:,} runs, {points:,} points; "
              f"busiest: {task}/{dataset}/{metric} epoch {epoch:g}")

        results: dict[str, float] = {}
        first = await store.query(best, Page(limit=20))
        results["best_only_one_task_dataset_epoch"] = await amedian_ms(lambda: store.query(best, Page(limit=20)))
        results["unfiltered_first_page"] = await amedian_ms(lambda: store.query(Filters(), Page(limit=20)))
        for sort, desc in (("duration", True), ("duration", False), ("accuracy_to_time", None), ("created", None)):
            results[f"unfiltered_page_by_{sort}{'_desc' if desc else ''}"] = await amedian_ms(
                lambda s=sort, d=desc: store.query(Filters(), Page(sort=s, descending=d, limit=20)), repeat=3)
        results["one_task_dataset_page"] = await amedian_ms(
            lambda: store.query(Filters(task=task, dataset=dataset, metric=metric), Page(limit=20)), repeat=3)
        deep = await store.query(best, Page(limit=20, offset=max(0, first["total"] - 40)))
        results["best_only_page_near_the_end"] = await amedian_ms(
            lambda: store.query(best, Page(limit=20, offset=max(0, first["total"] - 40))))
        name = first["rows"][0]["name"]
        results["get_model"] = await amedian_ms(lambda: store.model_detail(name))
        results["unique_nn_one_task_dataset"] = await amedian_ms(lambda: store.query(
            Filters(task=task, dataset=dataset, metric=metric, unique_nn=True), Page(limit=20)))
        results["data_one_task_dataset"] = median_ms(
            lambda: api.data(task=task, dataset=dataset, metric=metric, zoo=path), repeat=3)
        rows = len(api.data(task=task, dataset=dataset, metric=metric, zoo=path))
        results["data_best_only_one_epoch"] = median_ms(
            lambda: api.data(task=task, dataset=dataset, metric=metric, epoch=epoch, only_best_accuracy=True,
                             zoo=path), repeat=5)

        conn = connection.connect_sync(path, readonly=True)
        sql, args = grouped_sql(best)
        plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        # the same answer computed from every point through the covering index (no summary table)
        naive_sql = ("SELECT p.run_id, p.model_id, MAX(p.accuracy) FROM point_row p INDEXED BY point_filter "
                     "WHERE p.scope_id = (SELECT id FROM scope WHERE task=? AND dataset=? AND metric=?) "
                     "AND p.epoch=? GROUP BY p.model_id")
        naive = median_ms(lambda: conn.execute(naive_sql, (task, dataset, metric, epoch)).fetchall(), repeat=3)
        conn.close()

        print(f"best-only rows: {first['total']:,}; deep page rows: {len(deep['rows'])}; data() rows: {rows:,}")
        print("plan (best-only):", " | ".join(plan))
        print(f"{'query':38s} {'ms':>10s}  ratio")
        for key, ms in results.items():
            note = ""
            if key in LEMUR_SECONDS:
                note = f"LEMUR {LEMUR_SECONDS[key]:.1f} s -> {LEMUR_SECONDS[key] * 1000 / ms:,.0f}x faster"
            if key == "best_only_one_task_dataset_epoch":
                note += f"; grouping all points instead of best_point {naive:.0f} ms -> {naive / ms:.1f}x"
                note += "; target <= 50 ms: " + ("met" if ms <= 50 else "MISSED")
            print(f"{key:38s} {ms:10.1f}  {note}")
    finally:
        await store.close()


def ensure_best_points(path: Path) -> None:
    """Bulk loaders that write the tables directly leave best_point empty; fill it once."""
    connection.initialize(path)
    conn = connection.connect_sync(path)
    try:
        if conn.execute("SELECT COUNT(*) FROM best_point").fetchone()[0] == 0:
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            n = schema.rebuild_best_points(conn)
            conn.execute("COMMIT")
            print(f"best_point rebuilt: {n:,} rows in {time.perf_counter() - t:.1f} s")
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--zoo", type=Path, help="synthetic zoo file (built if missing or of another size)")
    parser.add_argument("--lemur-zoo", type=Path, help="a zoo filled by import-lemur, timed the same way")
    args = parser.parse_args()
    path = args.zoo or Path(tempfile.gettempdir()) / f"lemur-synthetic-{args.runs}.sqlite"
    info = synthetic_zoo_info(path) if path.exists() else None
    if not info or info.get("n_runs") != args.runs:
        t = time.perf_counter()
        path.unlink(missing_ok=True)
        summary = build_synthetic_zoo(path, args.runs, seed=0)
        print(f"built {path} in {time.perf_counter() - t:.1f} s: {summary}")
    ensure_best_points(path)
    anyio.run(bench, path, f"synthetic zoo ({path})")
    if args.lemur_zoo:
        ensure_best_points(args.lemur_zoo)
        anyio.run(bench, args.lemur_zoo, f"imported LEMUR zoo ({args.lemur_zoo})")


if __name__ == "__main__":
    main()
