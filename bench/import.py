"""Import speed and zoo size for a LEMUR-2.2-shaped database of >= 500k records (synthetic, ours).

Builds the database once (bench/lemur_db_synth.py: 10,482 models, trials of 1-13 epochs, duplicated
prm rows, half the trials with train_stat, nn_stat/run/prun rows), imports it into a fresh zoo with
`import-lemur`'s code path, imports it again (must add nothing), and prints records/s, seconds and the
zoo's size. Targets (issue 10): 578,595 records <= 30 s on a 2-core machine, zoo <= 150 MB.

    python bench/import.py [--records 578595] [--db /tmp/lemur22-synth.db] [--zoo /tmp/zoo-import.sqlite]
    python bench/import.py --source nn_dataset-2.1.2-py3-none-any.whl   # the 2.1 file importer instead
    python bench/import.py --plain-code   # model code stored as text (before schema 7)
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lemur_db_synth import build_synthetic  # noqa: E402
from lemur_agent_server.lemur_import import import_lemur_sync  # noqa: E402
from zoo import records  # noqa: E402


def zoo_mb(path: Path) -> float:
    """The zoo file after a checkpoint (WAL folded in), in MB."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def table_mb(path: Path) -> list[tuple[str, float]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 12").fetchall()
    except sqlite3.OperationalError:  # SQLite built without dbstat
        rows = []
    conn.close()
    return [(name, size / 1e6) for name, size in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=578_595)
    parser.add_argument("--models", type=int, default=10_482)
    parser.add_argument("--epochs", type=int, default=13, help="a trial has 1..EPOCHS records (LEMUR: ~7 a trial)")
    parser.add_argument("--db", type=Path, default=Path("/tmp/lemur22-synth.db"))
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/zoo-import-bench.sqlite"))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the synthetic database")
    parser.add_argument("--source", type=Path, help="import this instead (a LEMUR wheel, checkout or database)")
    parser.add_argument("--plain-code", action="store_true", help="store model code as text, as zoos "
                        "before schema 7 did (default: deflated, zoo.records.COMPRESS_CODE)")
    args = parser.parse_args()
    source = args.source or args.db
    records.COMPRESS_CODE = not args.plain_code
    if args.source is None and (args.rebuild or not args.db.exists()):
        t = time.perf_counter()
        info = build_synthetic(args.db, args.records, models=args.models, epochs=args.epochs)
        print(f"built {args.db}: {info} in {time.perf_counter() - t:.1f} s, {args.db.stat().st_size / 1e6:.0f} MB")
    args.zoo.parent.mkdir(parents=True, exist_ok=True)
    for old in args.zoo.parent.glob(args.zoo.name + "*"):
        old.unlink()
    load_before = os.getloadavg()[0]
    before = os.times()
    report = import_lemur_sync(args.zoo, source)
    after = os.times()
    cpu_main = (after.user - before.user) + (after.system - before.system)
    cpu_children = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    print(f"import: {report.records:,} records, {report.runs_added:,} runs, {report.points_added:,} points, "
          f"{report.models_added:,} models, {report.train_points:,} points with train_stat, extras {report.extras}")
    print(f"import: {report.seconds:.1f} s, {report.records_per_second:,.0f} records/s, "
          f"zoo {zoo_mb(args.zoo):.0f} MB (problems: {report.problems_total})")
    print(f"phases (s): {report.phases}")
    print(f"cpu: {cpu_main:.1f} s in this process, {cpu_children:.1f} s in the hashing processes; "
          f"load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f} (a shared machine: wall time "
          "grows with the other processes' load; on an idle 2-core machine the wall time is about the larger "
          "of this process's cpu time and half the total)")
    again = import_lemur_sync(args.zoo, source)
    print(f"second import: {again.seconds:.1f} s, runs added {again.runs_added}, models added {again.models_added}")
    for name, mb in table_mb(args.zoo):
        print(f"  {name:<28} {mb:7.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
