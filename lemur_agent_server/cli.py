"""`lemur-agent-server` command line: serve (default), worker, query, check, submit, import-lemur,
evaluate-seeds, stats, sandbox build.

Every subcommand takes `--zoo PATH` (or LEMUR_ZOO). On `serve` over stdio nothing but the protocol
may reach stdout, so all logging goes to stderr. A failure prints one line on stderr that says what to
do (exit 2 for bad input, 1 otherwise); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Any

import anyio

from lemur_agent_server import __version__
from lemur_agent_server.analyze import add_parser as add_analyze
from lemur_agent_server.config import Settings
from lemur_agent_server.lemur_export import add_parser as add_export_lemur
from sandbox import gpus as gpu_discovery
from sandbox.protocol import JobStatus
from stats.cli import add_stats_subparsers

log = logging.getLogger("lemur_agent_server")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The reference models are SGD nets: search where SGD trains them in a few epochs, not LEMUR's full range.
SEED_SEARCH_SPACE = {"lr": {"low": 1e-3, "high": 0.2, "log": True}, "momentum": {"low": 0.8, "high": 0.99},
                     "batch": {"choices": [32, 64]}}


class CliError(Exception):
    """A failure the user can fix by changing the command line: printed as one line, exit status 2."""


BAD_INPUT_EXIT = 2
FAILURE_EXIT = 1
# failures caused by what the user passed (a path, a value): exit 2. pydantic's ValidationError is a ValueError.
_BAD_INPUT = (CliError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _leaf(exc: BaseException) -> BaseException:
    """The exception itself, or the single one inside task-group wrappers (anyio raises groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _validation_line(exc: Any) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ').rstrip('.')}"
             for e in exc.errors()[:5]]
    return "invalid input: " + "; ".join(parts) + ". Fix the option and run again."


def explain(exc: BaseException) -> tuple[int, str]:
    """(exit status, one line for stderr) of a failed command."""
    from pydantic import ValidationError

    exc = _leaf(exc)
    if isinstance(exc, ValidationError):
        return BAD_INPUT_EXIT, _validation_line(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        line = f"{exc.filename}: {exc.strerror or exc}"
        hint = "check the path and run again" if isinstance(exc, _BAD_INPUT) else "--debug shows the traceback"
        return (BAD_INPUT_EXIT if isinstance(exc, _BAD_INPUT) else FAILURE_EXIT), f"{line}; {hint}."
    text = str(exc).strip()
    first = text.splitlines()[0] if text else "(no message)"
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return BAD_INPUT_EXIT, f"{first}: pass --zoo the path of a zoo SQLite file (or a new path to create one)."
    if isinstance(exc, _BAD_INPUT):
        more = " (--debug shows the full message)" if "\n" in text else ""
        return BAD_INPUT_EXIT, first + more
    return FAILURE_EXIT, f"{type(exc).__name__}: {first} (run again with --debug for the full output and traceback)"


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of --prm: a JSON object, with an error that shows the expected form."""
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text[:80]!r}; write an object like '{{\"lr\": 0.01}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a JSON object; write it like '{{\"lr\": 0.01}}'")
    return value


def _common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """Options every subcommand takes. On subparsers they default to SUPPRESS, so a value given before
    the subcommand (`--zoo X query`) is not overwritten by the subparser's default."""
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--zoo", help="zoo SQLite file (default: $LEMUR_ZOO or the user data dir)", **kw)
    parser.add_argument("--data-root", type=Path, help="datasets in torchvision layout (default: $LEMUR_DATA)",
                        **kw)
    parser.add_argument("--sandbox", choices=("auto", "docker", "process"), help="isolation backend", **kw)
    parser.add_argument("--executor", choices=("local", "ray"),
                        help="where sandboxes run: this host's slots (default) or a Ray cluster", **kw)
    parser.add_argument("--ray-address", help="Ray cluster for --executor ray: auto or HOST:PORT "
                                              "(default: $LEMUR_RAY_ADDRESS, else auto)", **kw)
    parser.add_argument("-v", "--verbose", action="store_true", **kw)
    parser.add_argument("--debug", action="store_true", help="show the traceback when a command fails", **kw)


def _check_zoo_arg(args: argparse.Namespace) -> None:
    zoo = getattr(args, "zoo", None)
    if zoo and Path(zoo).is_dir():
        raise CliError(f"--zoo {zoo} is a directory; pass the path of a zoo .sqlite file (new or existing).")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return Settings.from_env(args.zoo, data_root=getattr(args, "data_root", None),
                             sandbox=getattr(args, "sandbox", None), executor=getattr(args, "executor", None),
                             ray_address=getattr(args, "ray_address", None), **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lemur-agent-server", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=__version__)
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="serve MCP over stdio (default) or streamable HTTP")
    _common(serve)
    _serve_args(serve)
    _serve_args(parser, top=True)

    worker = sub.add_parser("worker", help="run evaluation jobs from the zoo's queue without serving MCP")
    _common(worker)
    worker.add_argument("--slots", type=int, default=argparse.SUPPRESS)

    query = sub.add_parser("query", help="query the zoo (same filters as the query_models tool)")
    _common(query)
    for name in ("task", "dataset", "metric"):
        query.add_argument(f"--{name}")
    query.add_argument("--nn", action="append")
    query.add_argument("--nn-prefix", action="append")
    query.add_argument("--epoch", type=float)
    query.add_argument("--min-accuracy", type=float)
    query.add_argument("--only-best-accuracy", action="store_true")
    query.add_argument("--unique-nn", action="store_true")
    query.add_argument("--sort", default="accuracy",
                       choices=("accuracy", "duration", "accuracy_to_time", "params", "created", "name"))
    query.add_argument("--limit", type=int, default=20)
    query.add_argument("--json", action="store_true")

    for name in ("check", "submit"):
        p = sub.add_parser(name, help=f"{name} a model file")
        _common(p)
        if name == "submit":  # several files: one batch (submit_models), one progress bar with --wait
            p.add_argument("file", type=Path, nargs="+")
        else:
            p.add_argument("file", type=Path)
        p.add_argument("--task", default="img-classification")
        p.add_argument("--dataset", required=True)
        p.add_argument("--prm", type=_json_object, default={},
                       help='fixed hyperparameters as JSON, e.g. {"lr":0.01}')
        if name == "submit":
            p.add_argument("--budget-s", type=float, default=300.0)
            p.add_argument("--trials", type=int, default=None, help="default 3 (1 with --protocol lemur)")
            p.add_argument("--epochs", type=float, default=None, help="default 1, or the epoch in --prm")
            p.add_argument("--eval-every", type=float, default=0.5)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--prefix")
            p.add_argument("--max-train-samples", type=int)
            p.add_argument("--export-onnx", action="store_true", default=None,
                           help="also export the selected trial's model to ONNX (archived beside its weights)")
            p.add_argument("--protocol", choices=["default", "lemur"], default="default",
                           help="default: selected on a validation split; lemur: LEMUR's check_nn (whole train split)")
            p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
            p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                           help="deterministic kernels (default: on with repeats > 1)")
            p.add_argument("--wait", action="store_true", help="run the job here and show a progress bar")

    imp = sub.add_parser("import-lemur", help="import a LEMUR nn-dataset checkout, wheel or 2.2 database (ab.nn.db)")
    _common(imp)
    imp.add_argument("path", type=Path)
    imp.add_argument("--analyze", action="store_true",
                     help="then measure the imported models' parameters, FLOPs, fingerprint and code quality "
                          "(lemur-agent-server analyze, in the sandbox)")

    seeds = sub.add_parser("evaluate-seeds", help="train the reference models so the zoo gets real runs")
    _common(seeds)
    seeds.add_argument("--dataset", default="digits")
    seeds.add_argument("--budget-s", type=float, default=120.0)
    seeds.add_argument("--epochs", type=float, default=2.0)
    seeds.add_argument("--trials", type=int, default=3)

    sandbox = sub.add_parser("sandbox", help="sandbox image management")
    _common(sandbox)
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True)
    build = sandbox_sub.add_parser("build", help="build the Docker sandbox image")
    build.add_argument("--base", help="base image (default: the Dockerfile's CUDA PyTorch image, which needs a "
                                      "registry); 'local' builds a base from Debian packages and local wheels")
    build.add_argument("--tag")

    add_export_lemur(sub)
    add_analyze(sub)
    add_stats_subparsers(sub)
    return parser


def _serve_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    def d(value: Any) -> dict[str, Any]:
        return {"default": value if top else argparse.SUPPRESS}

    p.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio", **d(False))
    p.add_argument("--host", help="HTTP bind address (loopback unless --token)", **d("127.0.0.1"))
    p.add_argument("--port", type=int, **d(8765))
    p.add_argument("--token", help="bearer token required on HTTP (default: $LEMUR_TOKEN)", **d(None))
    p.add_argument("--slots", type=int, help="parallel training jobs (default: one per GPU, else 1)", **d(None))
    p.add_argument("--gpus", help="GPU ids for the sandboxes, e.g. 0,1, or 'all' (every GPU nvidia-smi lists; "
                                  "one training job per GPU)", **d(None))
    p.add_argument("--no-worker", action="store_true", help="do not run evaluation jobs in this process",
                   **d(False))
    p.add_argument("--no-seed", action="store_true", help="do not add the reference models on first start",
                   **d(False))
    p.add_argument("--no-baselines", action="store_true", help="do not queue the reference models' short baseline "
                   "evaluations on first start (default: $LEMUR_NO_BASELINES)", **d(False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = args.command or "serve"
    handler = {"serve": cmd_serve, "worker": cmd_worker, "query": cmd_query, "check": cmd_check,
               "submit": cmd_submit, "import-lemur": cmd_import, "evaluate-seeds": cmd_evaluate_seeds,
               "sandbox": cmd_sandbox}.get(command) or args.func  # stats subcommands set func
    try:
        _check_zoo_arg(args)
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 128 + signal.SIGTERM if _terminated else 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (and a traceback on --debug)
        status, line = explain(exc)
        if getattr(args, "debug", False):
            traceback.print_exception(exc, file=sys.stderr)
        print(f"lemur-agent-server {command}: {line}", file=sys.stderr)
        return status


_terminated = False  # set by the SIGTERM handler: the exit status says which signal stopped us


def stop_on_sigterm() -> None:
    """Make SIGTERM stop a server or worker the way Ctrl-C does.

    Why: Kubernetes, SLURM and systemd stop a process with SIGTERM, whose default action ends it at
    once. Its running jobs then waited for their claims to go stale before another server took them,
    and its warm sandboxes' dirs and cgroups waited for the next server's sweep. Sent on as SIGINT, the
    signal takes asyncio's Ctrl-C path (the main task is cancelled): the queue hands its jobs back to
    the zoo, the backend closes its sandboxes, and the process exits with 143. A second signal stops at
    once, as a second Ctrl-C does.

    A process started in the background by a script (`cmd &` without job control, `nohup`) inherits
    SIGINT *ignored*; Python then installs no Ctrl-C handler, asyncio none either, and the forwarded
    SIGINT did nothing: SIGTERM left such a worker running (seen in a CI run started that way). So
    SIGINT gets Python's own handler back first, before asyncio looks at it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def forward(_signum: int, _frame: Any) -> None:
        global _terminated
        _terminated = True
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, forward)


def cmd_serve(args: argparse.Namespace) -> int:
    from lemur_agent_server.server import build_server

    gpus = gpu_discovery.parse(args.gpus)
    settings = _settings(args, slots=args.slots, gpus=gpus, token=args.token)
    if args.no_worker:
        settings.run_workers = False
    if args.no_seed:
        settings.seed_zoo = False
    if args.no_baselines:
        settings.baselines = False
    mcp = build_server(settings)
    stop_on_sigterm()
    if not args.http:
        mcp.run()
        return 0
    from lemur_agent_server.http import serve_http

    if args.host not in LOOPBACK and not settings.token:
        print(f"Refusing to serve on {args.host} without a token: pass --token or set LEMUR_TOKEN.",
              file=sys.stderr)
        return 2
    anyio.run(serve_http, mcp, args.host, args.port, settings.token)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from lemur_agent_server.evaluator.queue import JobQueue
    from zoo.store import ZooStore

    settings = _settings(args, slots=getattr(args, "slots", None))

    async def run() -> None:
        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store):
                log.info("worker running on %s; Ctrl-C to stop", settings.zoo_path)
                await anyio.sleep_forever()
        finally:
            await store.close()

    stop_on_sigterm()
    anyio.run(run)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from lemur_agent_server import api

    frame = api.data(only_best_accuracy=args.only_best_accuracy, task=args.task, dataset=args.dataset,
                     metric=args.metric, nn=args.nn, epoch=args.epoch, nn_prefixes=args.nn_prefix,
                     unique_nn=args.unique_nn, zoo=args.zoo)
    if args.min_accuracy is not None:
        frame = frame[frame["accuracy"] >= args.min_accuracy]
    key = {"duration": "duration", "name": "nn"}.get(args.sort, args.sort)
    frame = frame.sort_values(key, ascending=args.sort in ("duration", "params", "name")).head(args.limit)
    cols = ["nn", "task", "dataset", "metric", "epoch", "accuracy", "duration", "accuracy_to_time", "params"]
    if args.json:
        print(frame[cols + ["prm"]].to_json(orient="records"))
    else:
        print(frame[cols].to_string(index=False))
    return 0


def _read_code(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}; pass the path of a model .py file") from exc


def cmd_check(args: argparse.Namespace) -> int:
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import EvalRequest
    from zoo.store import ZooStore

    settings = _settings(args)
    request = EvalRequest(code=_read_code(args.file), task=args.task, dataset=args.dataset, prm=args.prm)

    async def run() -> Any:
        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store, workers=False) as queue:
                return await queue.check(request)
        finally:
            await store.close()

    outcome = anyio.run(run)
    print(json.dumps({"status": outcome.status, "result": outcome.result, "error": outcome.error}, indent=1,
                     default=str))
    return 0 if outcome.status == JobStatus.SUCCEEDED else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import EvalRequest
    from zoo.store import ZooStore

    settings = _settings(args)
    shared = {"task": args.task, "dataset": args.dataset, "prm": args.prm, "n_trials": args.trials,
              "epochs": args.epochs, "time_budget_s": args.budget_s, "eval_every": args.eval_every, "seed": args.seed,
              "name_prefix": args.prefix, "max_train_samples": args.max_train_samples, "export_onnx": args.export_onnx,
              "protocol": args.protocol, "precision": args.precision, "deterministic": args.deterministic}
    shared = {k: v for k, v in shared.items() if v is not None}  # unset: the request's default (epochs: prm's)
    requests = [EvalRequest(code=_read_code(path), **shared) for path in args.file]
    if len(requests) > 1:
        return _submit_batch(settings, args, requests)
    request = requests[0]

    async def run() -> dict[str, Any] | None:
        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store, workers=args.wait) as queue:
                job_id = await queue.submit(request)
                if not args.wait:
                    return await store.jobs.get(job_id)
                bar = tqdm(total=request.time_budget_s, unit="s", file=sys.stderr, desc=job_id)

                async def show(row: dict[str, Any]) -> None:
                    progress = row.get("progress") or {}
                    bar.n = min(request.time_budget_s, float(progress.get("elapsed_s") or 0))
                    bar.set_postfix_str(f"{row['status']} trial={progress.get('trial')} "
                                        f"epoch={progress.get('epoch')} val={progress.get('best_val_accuracy')}")
                    bar.refresh()

                row = await queue.wait(job_id, request.time_budget_s + 120, show)
                bar.close()
                return row
        finally:
            await store.close()

    row = anyio.run(run)
    print(json.dumps(row, indent=1, default=str))
    return 0 if row and row["status"] in (JobStatus.SUCCEEDED, JobStatus.QUEUED) else 1


def _submit_batch(settings: Settings, args: argparse.Namespace, requests: list[Any]) -> int:
    """Several files as one batch; with --wait, run it here under one progress bar (jobs done / total)."""
    from tqdm import tqdm

    from lemur_agent_server.evaluator.queue import JobQueue
    from zoo.jobs import Selection
    from zoo.store import ZooStore

    async def run() -> tuple[str, list[dict[str, Any]], dict[str, dict[str, Any]]]:
        store = await ZooStore.open(settings.zoo_path)
        try:
            async with JobQueue.running(settings, store, workers=args.wait) as queue:
                batch_id, entries = await queue.submit_batch(requests)
                ids = list(dict.fromkeys(e["job_id"] for e in entries))
                if args.wait:
                    bar = tqdm(total=len(ids), unit="job", file=sys.stderr, desc=batch_id)
                    counts: dict[str, int] = {}
                    while sum(counts.get(s, 0) for s in JobStatus if s.is_finished()) < len(ids):
                        await queue.changed(1.0)
                        counts = await store.jobs.count_by_status(Selection(batch_id=batch_id))
                        bar.n = sum(counts.get(s, 0) for s in JobStatus if s.is_finished())
                        bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
                        bar.refresh()
                    bar.close()
                return batch_id, entries, {j: await store.jobs.get(j) or {} for j in ids}
        finally:
            await store.close()

    batch_id, entries, rows = anyio.run(run)
    jobs = [{"file": str(path), "job_id": e["job_id"], "same_as": e["same_as"], "reused_from": e["reused_from"],
             "status": rows[e["job_id"]].get("status"), "model_name": rows[e["job_id"]].get("model_name"),
             "accuracy": (rows[e["job_id"]].get("result") or {}).get("accuracy"),
             "error": rows[e["job_id"]].get("error")} for path, e in zip(args.file, entries)]
    print(json.dumps({"batch_id": batch_id, "jobs": jobs}, indent=1, default=str))
    wanted = (JobStatus.SUCCEEDED,) if args.wait else (JobStatus.SUCCEEDED, JobStatus.QUEUED)
    return 0 if all(j["status"] in wanted for j in jobs) else 1


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lemur_agent_server.lemur_db_source import find_database
    from lemur_agent_server.lemur_import import import_lemur_sync

    settings = _settings(args)
    bars: list[tqdm] = []  # made at the first file: a path that fails at once leaves just its error line
    # what the importer counts: a 2.2 database's rows (records, then side-table rows), else a tree's files
    unit = "row" if find_database(args.path) is not None else "file"

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(unit=unit, file=sys.stderr, desc="import"))
        bars[0].total = total
        bars[0].n = done
        bars[0].refresh()

    try:
        report = import_lemur_sync(settings.zoo_path, args.path, progress)
    finally:
        for bar in bars:
            bar.close()
    print(json.dumps(report.as_dict() if hasattr(report, "as_dict") else report.__dict__, indent=1, default=str))
    if args.analyze:
        _analyze_imported(settings)
    return 0


def _analyze_imported(settings: Settings) -> None:
    """`import-lemur --analyze`: the imported models' static facts, measured in the sandbox, resumable."""
    from tqdm import tqdm

    from lemur_agent_server.analyze import AnalyzeFilters, analyze_zoo
    from lemur_agent_server.lemur_import import ORIGIN

    with tqdm(unit="model", file=sys.stderr, desc="analyze") as bar:
        def progress(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        result = analyze_zoo(settings, AnalyzeFilters(origin=(ORIGIN,)), progress)
    print(json.dumps(result.as_dict(), indent=1, default=str))


def cmd_evaluate_seeds(args: argparse.Namespace) -> int:
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import EvalRequest
    from lemur_agent_server.reference_models import REFERENCE_MODELS, read_code
    from lemur_agent_server.seed import seed_reference_models
    from zoo.store import ZooStore

    settings = _settings(args)

    async def run() -> list[dict[str, Any]]:
        store = await ZooStore.open(settings.zoo_path)
        results = []
        try:
            await seed_reference_models(store)
            async with JobQueue.running(settings, store, workers=False) as queue:
                for name in REFERENCE_MODELS:
                    request = EvalRequest(code=read_code(name), dataset=args.dataset, n_trials=args.trials,
                                          epochs=args.epochs, time_budget_s=args.budget_s,
                                          search_space=SEED_SEARCH_SPACE)
                    job_id, outcome = await queue.run_now(request)
                    res = outcome.result or {}
                    results.append({"model": name, "job_id": job_id, "status": outcome.status,
                                    "accuracy": res.get("accuracy"), "error": outcome.error})
                    print(json.dumps(results[-1], default=str), file=sys.stderr)
        finally:
            await store.close()
        return results

    results = anyio.run(run)
    print(json.dumps(results, indent=1, default=str))
    return 0 if all(r["status"] in (JobStatus.SUCCEEDED, JobStatus.TIMED_OUT) for r in results) else 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from lemur_agent_server.config import DEFAULT_IMAGE
    from sandbox.image import build_image

    root = Path(__file__).resolve().parent.parent
    build_image(args.tag or DEFAULT_IMAGE, args.base, root, log=lambda m: print(m, file=sys.stderr))
    return 0
