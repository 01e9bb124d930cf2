"""Chaos at scale (not in CI): M fuzzed tool calls against a fresh server, with the figures.

    python -m bench.chaos --calls 10000 [--seed 0] [--workers] [--kills 20]

Prints the count of answers per outcome (ok, tool_error: an error with a hint; the broken ones:
internal, no_hint, oversize, protocol_error), the outcomes per tool, the five biggest answers, and
examples of every broken answer. Exit code 1 when anything broke. Without --workers the server runs
with no evaluator (submissions are refused or queued, nothing trains); with it, fuzzed submissions
get budgets of seconds.

`--kills N` first SIGKILLs a real worker process N times mid-trial (each after its attempt archived a
finished trial; tests/killing.py, the loop tests/test_kill.py runs 3 times), lets a fresh worker end
every job, and prints: jobs, kills, records lost (finished trials missing afterwards), half-written
records, jobs not ended, orphan sandbox processes, leftover job folders. `--calls 0` skips the fuzzing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client

from lemur_agent_server.config import Settings
from lemur_agent_server.server import build_server
from tests import killing
from tests.conftest import DATA_ROOT
from tests.fuzzing import BROKEN, Report, fuzz
from tests.zoo_factory import build_zoo
from zoo.store import ZooStore


async def run(calls: int, seed: int, workers: bool, root: Path) -> tuple[Report, float, bool]:
    settings = Settings.from_env(root / "zoo.sqlite", sandbox="process")
    settings.run_workers = workers
    store = await build_zoo(settings.zoo_path, n_models=6)
    await store.close()
    started = time.monotonic()
    async with Client(build_server(settings)) as client:
        report = Report()
        done = 0
        while done < calls:  # in rounds, so progress shows and one seed never runs forever
            batch = min(1000, calls - done)
            part = await fuzz(client, batch, seed + done)
            report.outcomes.update(part.outcomes)
            report.by_tool.update(part.by_tool)
            report.worst = sorted(report.worst + part.worst, reverse=True)[:5]
            report.longest_error = max(report.longest_error, part.longest_error)
            report.broken.extend(part.broken[: max(0, 50 - len(report.broken))])
            done += batch
            print(f"  {done} calls, {time.monotonic() - started:.0f} s", file=sys.stderr)
        alive = await client.call_tool("list_catalog", {})
    return report, time.monotonic() - started, not alive.is_error


def run_kills(kills: int, root: Path) -> int:
    """The kill part: print its figures; 1 when a kill cost anything."""
    settings = Settings.from_env(root / "zoo.sqlite", sandbox="process", data_root=DATA_ROOT)

    async def schema() -> None:
        store = await ZooStore.open(settings.zoo_path)
        await store.close()

    anyio.run(schema)
    figures, seen = killing.kill_loop(settings, kills)
    f = killing.audit(settings, figures, seen)
    trials = len([uid for uid in seen if ":t" in uid])
    print(f"{f.jobs} jobs, {f.kills} kills (SIGKILL mid-trial) in {f.seconds:.1f} s; "
          f"{trials} finished trials archived before the last kill")
    print(f"  job states afterwards:   {f.statuses}")
    for label, found in (("records lost", f.records_lost), ("half-written", f.half_written),
                         ("jobs not ended", f.unfinished_jobs), ("orphan processes", f.orphan_processes),
                         ("leftover folders", f.leftover_folders)):
        print(f"  {label + ':':24} {len(found)}" + (f"  {found[:10]}" if found else ""))
    broken = (f.records_lost, f.half_written, f.unfinished_jobs, f.orphan_processes, f.leftover_folders)
    return 1 if any(broken) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", action="store_true", help="run the evaluator (fuzzed submissions train)")
    parser.add_argument("--kills", type=int, default=0, help="SIGKILL a training worker this many times first")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the SDK logs every rejected call at INFO; the figures are the output
    failed = 0
    if args.kills > 0:
        with tempfile.TemporaryDirectory(prefix="lemur-chaos-kill-") as tmp:
            failed = run_kills(args.kills, Path(tmp))
    if args.calls <= 0:
        return failed
    with tempfile.TemporaryDirectory(prefix="lemur-chaos-") as tmp:
        report, seconds, alive = anyio.run(run, args.calls, args.seed, args.workers, Path(tmp))
    total = sum(report.outcomes.values())
    print(f"{total} calls in {seconds:.1f} s ({total / seconds:.0f}/s); server still answering: {alive}")
    for outcome, count in report.outcomes.most_common():
        print(f"  {outcome:15} {count:6}")
    print("per tool:")
    for (tool, outcome), count in sorted(report.by_tool.items()):
        print(f"  {tool[:40]:40} {outcome:15} {count:6}")
    print(f"longest error answer: {report.longest_error} characters")
    print("biggest answers (characters, tool, arguments):")
    for chars, tool, preview in report.worst:
        print(f"  {chars:7} {tool[:40]} {preview[:150]}")
    for rule, tool, preview, text in report.broken:
        print(f"BROKEN {rule} {tool[:40]} {preview[:200]}\n    -> {text[:300]}")
    return 1 if failed or any(report.outcomes[k] for k in BROKEN) or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
