"""`lemur-agent-server stats export|plot`: the exports and plots of `stats` on the command line.

Wiring (the main CLI owns the top-level parser):

    sub = parser.add_subparsers(dest="command")
    add_stats_subparsers(sub)          # adds `stats` with `export` and `plot`
    args = parser.parse_args()
    raise SystemExit(args.func(args))  # 0 on success, 2 when the zoo cannot answer as asked

Standalone: `python -m stats.cli stats plot curves --task img-classification out.png`.
The zoo defaults to `zoo.connection.resolve_zoo_path(None)` ($LEMUR_ZOO, else the user data dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from stats.export import FINETUNE_FORMATS, TABLES, export
from stats.plots import DEFAULT_HEIGHT, DEFAULT_WIDTH, MAX_HEIGHT, MAX_WIDTH, MIN_HEIGHT, MIN_WIDTH, PLOT_KINDS, render
from stats.report import REPORT_TOP
from stats.scope import StatsError
from zoo.connection import resolve_zoo_path
from zoo.query import Filters


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (the same as the query tool's)")
    g.add_argument("--task", help="task, e.g. img-classification")
    g.add_argument("--dataset", help="dataset, e.g. cifar-10")
    g.add_argument("--metric", help="metric, e.g. acc")
    g.add_argument("--nn", action="append", default=[], metavar="NAME",
                   help="model name; repeat for several (for `plot curves`: the models to draw)")
    g.add_argument("--nn-prefix", action="append", default=[], metavar="PREFIX",
                   help="model name prefix, e.g. rag-; repeat for several")
    g.add_argument("--epoch", type=float, help="use each run's point at this epoch instead of its last point")
    g.add_argument("--min-accuracy", type=float, metavar="A", help="only points/runs with accuracy >= A")
    g.add_argument("--zoo", type=Path, help="zoo file (default: $LEMUR_ZOO or the user data dir)")


def filters_from_args(args: argparse.Namespace) -> Filters:
    return Filters(task=args.task, dataset=args.dataset, metric=args.metric, nn=tuple(args.nn),
                   nn_prefix=tuple(args.nn_prefix), epoch=args.epoch, min_accuracy=args.min_accuracy)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def run_plot(args: argparse.Namespace) -> int:
    f = filters_from_args(args)
    try:
        res = render(args.kind, resolve_zoo_path(args.zoo), f, width=args.width, height=args.height,
                     models=tuple(args.nn) if args.kind == "curves" else (), limit=args.limit)
    except StatsError as exc:
        return _fail(exc)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(res.png)
    os.replace(tmp, out)
    print(res.summary)
    print(f"Wrote {out} ({res.width}x{res.height} px PNG)")
    return 0


def _finetune_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.format not in FINETUNE_FORMATS:
        return None
    dev, test = args.dev_fraction, args.test_fraction
    if not (0 <= dev < 1 and 0 <= test < 1 and dev + test < 1):
        raise StatsError(f"--dev-fraction {dev} and --test-fraction {test} must be in [0, 1) and sum to less "
                         "than 1 (train gets the rest).")
    return {"seed": args.seed, "fractions": (1 - dev - test, dev), "min_gap": args.min_gap}


def run_export(args: argparse.Namespace) -> int:
    try:
        res = export(resolve_zoo_path(args.zoo), args.out, args.format, filters_from_args(args), args.table,
                     top=args.top, workers=args.workers, finetune=_finetune_options(args))
    except StatsError as exc:
        return _fail(exc)
    print(res.describe())
    return 0


def add_stats_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `stats` (with `export` and `plot`) to a top-level subparsers action; returns the `stats` parser."""
    stats = subparsers.add_parser("stats", help="export the zoo or plot its statistics",
                                  description="Statistics over the zoo: exports (csv, parquet, Excel report) "
                                              "and plots (PNG), computed in SQL.")
    sub = stats.add_subparsers(dest="stats_command", required=True, metavar="{export,plot}")

    kinds = "\n".join(f"  {k:17s} {s.description}" for k, s in PLOT_KINDS.items())
    p = sub.add_parser("plot", help="draw one plot kind to a PNG", formatter_class=argparse.RawTextHelpFormatter,
                       description=f"Draw one plot of the zoo to a PNG and print what it shows.\n\nKinds:\n{kinds}")
    p.add_argument("kind", choices=list(PLOT_KINDS), metavar="KIND", help="one of: " + ", ".join(PLOT_KINDS))
    _add_filters(p)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help=f"pixels ({MIN_WIDTH}-{MAX_WIDTH}, default %(default)s)")
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT,
                   help=f"pixels ({MIN_HEIGHT}-{MAX_HEIGHT}, default %(default)s)")
    p.add_argument("--limit", type=int, default=5, help="curves: models drawn without --nn (default %(default)s)")
    p.add_argument("out", type=Path, metavar="OUT.png")
    p.set_defaults(func=run_plot)

    tables = "\n".join(f"  {k:12s} {v}" for k, v in TABLES.items())
    e = sub.add_parser("export", help="write a table (csv/parquet) or the Excel report (xlsx)",
                       formatter_class=argparse.RawTextHelpFormatter,
                       description="Export the zoo. csv/parquet write one --table, streamed; xlsx writes a report "
                                   "with one sheet per task/dataset/metric and the plots embedded.\n\n"
                                   f"Tables:\n{tables}")
    e.add_argument("--format", choices=["csv", "parquet", "xlsx", *FINETUNE_FORMATS],
                   help="default: OUT's suffix; sft-jsonl/dpo-jsonl write OUT/{train,dev,test}.jsonl")
    e.add_argument("--table", choices=list(TABLES), default="points", help="csv/parquet only (default %(default)s)")
    e.add_argument("--top", type=int, default=REPORT_TOP, help="xlsx: models per leaderboard (default %(default)s)")
    e.add_argument("--workers", type=int, help="xlsx: processes drawing plots (default: automatic; 0: none)")
    g = e.add_argument_group("sft-jsonl / dpo-jsonl (split by model, duplicates removed by fingerprint)")
    g.add_argument("--seed", type=int, default=0, help="split seed (default %(default)s)")
    g.add_argument("--dev-fraction", type=float, default=0.1, help="share of models in dev (default %(default)s)")
    g.add_argument("--test-fraction", type=float, default=0.1, help="share of models in test (default %(default)s)")
    g.add_argument("--min-gap", type=float, default=0.05,
                   help="dpo: least accuracy difference between chosen and rejected (default %(default)s)")
    _add_filters(e)
    e.add_argument("out", type=Path, metavar="OUT")
    e.set_defaults(func=run_export)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lemur-agent-server")
    add_stats_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
