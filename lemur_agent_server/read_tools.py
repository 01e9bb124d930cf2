"""The read side of the server: list_catalog, query_models, get_model, the code resource and the
design_model prompt.

Why these answers are compact: hosts reject tool results over ~25k tokens, and an agent re-reads what
it gets on every turn. Rows carry numbers and names; code comes only when asked, with a budget.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from lemur_agent_server import contract
from lemur_agent_server.clip import clip
from lemur_agent_server.evaluator import protocols
from lemur_agent_server.evaluator.calibration import REFERENCE_DESCRIPTION
from lemur_agent_server.isolation_view import short, with_id
from lemur_agent_server.schemas import (
    Catalog,
    CatalogEntry,
    Cursor,
    DatasetEntry,
    FilterText,
    LemurMeasurements,
    ModelDetail,
    ModelScoreRow,
    NameOrNames,
    Offset,
    QueryResult,
    as_names,
    canonical_filter_dataset,
)
from lemur_agent_server.seed import baselines_status
from lemur_agent_server.state import AppState
from lemur_agent_server.tool_wiring import tool
from sandbox import datasets, protocol
from zoo.lemur_extras import lemur_extras_at
from zoo.query import SCORE_DEFINITION, Filters, Page, QueryError, ScoreBy, models_view_sql

CODE_BUDGET_CHARS = 60_000  # ~15k tokens of code per query_models answer
MODEL_CODE_CAP_CHARS = 80_000
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)

Task = Annotated[FilterText, Field(description="Task, e.g. 'img-classification'. See list_catalog.")]
Dataset = Annotated[FilterText, Field(description="Dataset, e.g. 'cifar-10', 'mnist', 'digits'.")]
Metric = Annotated[FilterText, Field(description="Metric, e.g. 'acc' (accuracy in [0, 1]).")]


async def unknown_model_error(state: AppState, name: str) -> ToolError:
    near = await state.zoo().similar_model_names(name, limit=5)
    hint = f" Similar names: {', '.join(near)}." if near else ""
    return ToolError(f"Unknown model '{name}'.{hint} Call query_models(view='models') to list every model's name.")


def dataset_entries(settings_data_root: Any) -> list[DatasetEntry]:
    entries = []
    for info in datasets.known_datasets():
        entries.append(DatasetEntry(
            name=info.name, task="img-classification", metric="acc", num_classes=info.num_classes,
            image_shape=list(info.image_shape), chance=info.chance, default_transform=info.default_transform,
            available=datasets.available(info.name, settings_data_root), how_to_get=info.source,
        ))
    return entries


# --- the tools' logic, callable without MCP --------------------------------------------------------
async def list_catalog(state: AppState) -> Catalog:
    """What the zoo holds and what the evaluator accepts."""
    store = state.zoo()
    counts = await store.catalog_counts()
    transforms = await store.transform_counts()
    sandbox_info = state.queue.describe_sandbox() if state.queue else {"backend": "none (no worker)"}
    return Catalog(
        zoo=[CatalogEntry(**c) for c in counts],
        totals=await store.totals(),
        evaluator_datasets=dataset_entries(state.settings.data_root),
        transforms=protocol.transform_catalog(),
        transform_help=contract.TRANSFORM_HELP,
        zoo_transforms={t["transform"]: t["runs"] for t in transforms[:50]},
        metrics=["acc"],
        net_contract=contract.NET_CONTRACT,
        hyperparameters=contract.HYPERPARAMETERS,
        sandbox=with_id(sandbox_info) if state.queue else sandbox_info,
        baselines=await baselines_status(store, state.settings, workers=state.queue is not None),
        accuracy_protocols=dict(protocols.DESCRIPTIONS),
    )


async def query_model_view(state: AppState, filters: Filters, by: ScoreBy = "accuracy", include_partial: bool = False,
                           limit: int = 20, offset: int = 0) -> QueryResult:
    """One row per model (SCORE_DEFINITION), models without runs included with a null score."""
    sql, args = models_view_sql(filters, by, include_partial, limit, offset)
    raw = await state.zoo().fetchall(sql, args)
    total = raw[0]["total"] if raw else 0
    models = [ModelScoreRow(**{k: v for k, v in r.items() if k not in ("total", "duration_ns", "duration_norm_ns")},
                            duration_s=r["duration_ns"] / 1e9 if r["duration_ns"] is not None else None,
                            duration_norm_s=r["duration_norm_ns"] / 1e9 if r.get("duration_norm_ns") is not None
                            else None)
              for r in raw]
    end = offset + len(models)
    hint = ("No models match the name filters; call list_catalog." if total == 0 else
            f"More models: call again with offset={end}." if end < total else
            "All models returned. get_model(name) shows one; rank null = no complete run in scope yet.")
    if by == "accuracy_to_time_norm":
        hint = ("Scored by accuracy_to_time_norm: accuracy_to_time with the training time on "
                f"{REFERENCE_DESCRIPTION}; uncalibrated runs are not scored. " + hint)
    return QueryResult(rows=[], models=models, total=total, returned=len(models), offset=offset, next_cursor=None,
                       truncated=end < total, hint=hint)


async def canonical_dataset_filter(state: AppState, dataset: str | None) -> str | None:
    """The dataset filter as the zoo or the evaluator spells it (`Fashion-MNIST` -> `fashion-mnist`)."""
    if dataset is None:
        return None
    known = {c["dataset"] for c in await state.zoo().catalog_counts()} | {i.name for i in datasets.known_datasets()}
    return canonical_filter_dataset(dataset, sorted(known))


async def _why_no_rows(store: Any) -> str:
    """The hint of an empty page. A fresh zoo holds its seed models before any of them has a run (their
    baseline evaluations train in the background), and an agent must not read that as an empty zoo."""
    base = "No rows match. Loosen the filters, or call list_catalog to see what the zoo holds."
    models = (await store.fetchone("SELECT COUNT(*) AS n FROM model"))["n"]
    unfinished = tuple(s.value for s in protocol.JobStatus if not s.is_finished())
    marks = ",".join("?" * len(unfinished))
    pending = (await store.fetchone(f"SELECT COUNT(*) AS n FROM job WHERE status IN ({marks})", unfinished))["n"]
    if not pending:
        return base
    return (f"No rows match yet: {pending} evaluation(s) are queued or running (list_jobs shows them; the zoo holds "
            f"{models} model(s)), and their points appear here as they finish. Or loosen the filters.")


async def query_models(state: AppState, filters: Filters, page: Page, include_code: bool = False) -> QueryResult:
    """One page of learning-curve points for the filters, with code on demand within a budget."""
    store = state.zoo()
    try:
        result = await store.query(filters, page)
    except QueryError as exc:
        raise ToolError(str(exc)) from exc
    rows = result["rows"]
    code_cut = False
    if include_code and rows:
        code_cut = await _attach_code(store, rows)
    more = result["next_cursor"] is not None
    if result["total"] == 0:
        hint = await _why_no_rows(store)
    elif more:
        hint = "More rows exist: call again with cursor=next_cursor. get_model(name) shows one model."
    else:
        hint = "All matching rows returned. get_model(name) shows code, curve and runs of one model."
    if page.sort == "duration_norm":
        hint = f"Sorted by duration_norm, the training time on {REFERENCE_DESCRIPTION}. " + hint
    return QueryResult(
        rows=[{k: v for k, v in r.items() if k not in ("run_uid", "status", "model_id", "transform")}
              for r in rows],
        total=result["total"], returned=len(rows), offset=0 if page.cursor else page.offset,
        next_cursor=result["next_cursor"], truncated=more or code_cut, hint=hint,
    )


BEST_RUN_FIELDS = ("uid", "task", "dataset", "metric", "transform", "prm", "seed", "epochs", "status", "accuracy",
                   "duration_ns", "accuracy_to_time", "device", "versions", "dataset_hash", "job_id", "trial",
                   "isolation", "created", "repeat", "train_samples", "test_samples", "protocol", "precision",
                   "deterministic", "environment", "repeat_group", "duration_norm_ns")


async def get_model(state: AppState, name: str, include_code: bool = True) -> ModelDetail:
    """Everything known about one model; `name` matches case-insensitively when only one model fits."""
    store = state.zoo()
    resolved = await store.resolve_model_name(name)
    detail = await store.model_detail(resolved) if resolved is not None else None
    if detail is None:
        raise await unknown_model_error(state, name)
    model = detail["model"]
    same = []
    if model.get("fingerprint"):
        same = [m["name"] for m in await store.models_by_fingerprint(model["fingerprint"])
                if m["name"] != model["name"]][:20]
    code = model["code"] if include_code else None
    cut = False
    if code is not None and len(code) > MODEL_CODE_CAP_CHARS:
        code, cut = code[:MODEL_CODE_CAP_CHARS], True
    best = detail["best_run"]
    extras = await anyio.to_thread.run_sync(lemur_extras_at, store.path, model["id"], best["id"] if best else None)
    diagnostics = extras.pop("train_diagnostics", {})
    curve = _with_diagnostics(detail["curve"], diagnostics.get("points", []))
    if best:
        best = {k: _maybe_json(v) for k, v in best.items() if k in BEST_RUN_FIELDS}
        best["reproduce"] = reproduction(best)  # from the full isolation (backend, image), shortened after
        best["isolation"] = short(best.get("isolation"))
    return ModelDetail(
        name=model["name"], origin=model["origin"], created=model["created"], code_hash=model["code_hash"],
        lemur_id=model["lemur_id"], fingerprint=model["fingerprint"], params=model["params"],
        flops=model["flops"], code_quality=model["code_quality"],
        code_quality_detail=_maybe_json(model["code_quality_detail"]),
        supported_hyperparameters=_maybe_json(model["supported_hyperparameters"]),
        summary=detail["summary"], best_run=best, curve=curve, weights=detail["weights"],
        recent_runs=[{k: short(_maybe_json(v)) if k == "isolation" else _maybe_json(v) for k, v in r.items()}
                     for r in detail["recent_runs"]],
        same_architecture=same, layers=await _latest_layers(store, model["name"]),
        lemur=LemurMeasurements(**extras) if extras else None,
        train_hardware=diagnostics.get("hardware"), code=code, code_truncated=cut,
    )


def reproduction(run: dict[str, Any]) -> dict[str, Any]:
    """What repeating `run` takes, in one place: the submission's settings and seed, the code and data
    hashes, the split, and what it ran on (the Docker image's id, or the process backend's interpreter and
    libraries). Missing facts are null (an imported LEMUR record knows none of the sandbox's)."""
    env = run.get("environment") or {}
    isolation = run.get("isolation") or {}
    return {
        "seed": run.get("seed"), "protocol": run.get("protocol"), "precision": run.get("precision"),
        "deterministic": None if run.get("deterministic") is None else bool(run["deterministic"]),
        "prm": run.get("prm"), "code_hash": env.get("code_hash"), "dataset_hash": run.get("dataset_hash"),
        "split_seed": env.get("split_seed"), "val_fraction": env.get("val_fraction"),
        "train_samples": run.get("train_samples"), "backend": isolation.get("backend"),
        "image": isolation.get("image"), "image_id": isolation.get("image_id"),
        "versions": run.get("versions"), "device": run.get("device"), "device_name": env.get("device_name"),
        "compute_capability": env.get("compute_capability"), "cpu_model": env.get("cpu_model"),
        "threads": env.get("threads"), "harness": env.get("harness"), "server_version": env.get("server_version"),
    }


async def _latest_layers(store: Any, name: str) -> list[dict[str, Any]] | None:
    """The per-layer costs of the newest finished job (or check) of this model that measured them: the check
    runs the model in the sandbox, so the host never builds untrusted code to answer this."""
    row = await store.fetchone(
        "SELECT json_extract(result, '$.layers') AS layers FROM job WHERE model_name=? AND finished IS NOT NULL "
        "AND json_type(result, '$.layers') = 'array' ORDER BY finished DESC LIMIT 1", (name,))
    return json.loads(row["layers"]) if row and row["layers"] else None


DIAGNOSTIC_FIELDS = ("train_loss", "test_loss", "train_accuracy", "gradient_norm", "samples_per_second")


def _with_diagnostics(curve: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve with LEMUR's per-epoch training diagnostics on the points of the same epoch."""
    by_epoch = {p["epoch"]: p for p in points}
    return [point | {k: by_epoch[point["epoch"]].get(k) for k in DIAGNOSTIC_FIELDS}
            if point["epoch"] in by_epoch else point for point in curve]


async def model_code(state: AppState, name: str) -> str:
    """The code of one model (exact name, as in its resource URI)."""
    row = await state.zoo().model_by_name(name)
    if row is None:
        raise ResourceNotFoundError(f"Unknown model {clip(name)!r}. query_models(view='models') lists every "
                                    "model's name.")
    return row["code"]


def default_dataset(state: AppState) -> str:
    """The dataset design_model uses when none is named: the first present on this server (digits always is)."""
    present = [i.name for i in datasets.known_datasets() if datasets.available(i.name, state.settings.data_root)]
    return "digits" if "digits" in present or not present else present[0]


async def design_model(state: AppState, task: str, dataset: str | None) -> str:
    """The design prompt: the Net contract plus the code of the best models for the task."""
    store = state.zoo()
    chosen = ""
    if not dataset:
        dataset = default_dataset(state)
        chosen = (f" (no dataset was named: '{dataset}' is present on this server; list_catalog's "
                  "evaluator_datasets shows the others and whether each is available)")
    result = await store.query(Filters(task=task, dataset=dataset, unique_nn=True), Page(limit=3))
    names = [r["name"] for r in result["rows"]]
    source = f"the best models for {task}/{dataset} in the zoo"
    if not names:
        names = await store.model_names(limit=3)
        source = "reference models (the zoo has no runs for this task/dataset yet)"
    examples = []
    for name in names:
        row = await store.model_by_name(name)
        if row:
            examples.append(f"### {name}\n```python\n{row['code'][:12000]}\n```")
    return (
        f"Design a new neural network for task '{task}' on dataset '{dataset}'{chosen}.\n\n"
        f"## The Net contract\n{contract.NET_CONTRACT}\n"
        f"## Hyperparameters\n" + "\n".join(f"- {k}: {v}" for k, v in contract.HYPERPARAMETERS.items())
        + f"\n\n## Transforms\n{contract.TRANSFORM_HELP}\n\n## Examples: {source}\n" + "\n\n".join(examples)
        + "\n\n## Workflow\n1. check_model(code, task, dataset) until it reports no problems.\n"
        "2. submit_model(...) returns a job_id at once.\n3. get_job(job_id, wait_s=50) until it ends.\n"
        "4. get_job's `standing` (or leaderboard(task, dataset)) says where your model ranks."
    )


QUERY_MODELS_DESCRIPTION = (
    "Find and rank models. view='models' (the ranking): one row per model and task/dataset/metric with its "
    "score and rank, and every model without runs too (null score, runs 0: e.g. the seed models before their "
    "baselines finish). " + SCORE_DEFINITION + " leaderboard and a finished job's `standing` use the same "
    "score. view='points' (default): one row per learning-curve point of a training run (LEMUR's 'record'), "
    "to see how accuracy grows with epochs; unique_nn=true keeps each model's single best point at any epoch "
    "or trial, only_best_accuracy=true the best per epoch: these are point views, not the score. Filters "
    "combine with AND; nn and nn_prefix take one string or a list; dataset names match ignoring case. Each "
    "point row: name, task, dataset, metric, epoch, accuracy (test, 0..1), duration (training ns), "
    "duration_norm (training ns on the reference device, null until the run's device is calibrated; "
    "sort='duration_norm' ranks runs of different machines on it), accuracy_to_time, params, prm. `total` "
    "counts all matching rows; page with `next_cursor` (points) or "
    "offset (models). Next: get_model(name) for code, curve and runs of one model.")


LIST_CATALOG_DESCRIPTION = (
    "Show what the zoo holds and what the evaluator accepts. Call this FIRST. Returns: the task/dataset/metric "
    "combinations in the zoo with counts of models and runs; the datasets submit_model can train on (with "
    "classes, image shape, chance level and whether the data is present on this server); allowed transform "
    "names; the Net contract your code must follow; the hyperparameter conventions; the sandbox isolation in "
    "use; and on a fresh server `baselines`: the seed models' short evaluations queued at first start (job ids, "
    "status, when ready). What `accuracy` means (`accuracy_protocols`; every run records its protocol, and "
    "query_models filters by it): protocol 'default': " + protocols.DESCRIPTIONS[protocols.DEFAULT]
    + " Protocol 'lemur': " + protocols.DESCRIPTIONS[protocols.LEMUR]
    + " Next: query_models to rank existing models, get_model to read one, submit_model to train yours.")


# --- MCP wiring: names, arguments and descriptions; each tool calls its function above ------------------
def register_read_tools(mcp: MCPServer, state: AppState) -> None:
    @tool(mcp, "list_catalog", READ_ONLY, description=LIST_CATALOG_DESCRIPTION)
    async def list_catalog_tool() -> Catalog:
        return await list_catalog(state)

    @tool(mcp, "query_models", READ_ONLY, description=QUERY_MODELS_DESCRIPTION)
    async def query_models_tool(
        task: Task = None,
        dataset: Dataset = None,
        metric: Metric = None,
        nn: Annotated[NameOrNames, Field(description="Only these model names (one string or 1-100 names)")] = None,
        nn_prefix: Annotated[NameOrNames, Field(
            description="Only names starting with one of these prefixes (one string or a list), e.g. "
                        "['rag-', 'ResNet']", max_length=20)] = None,
        epoch: Annotated[float | None, Field(
            description="Only points after exactly this many epochs (0.5 steps allowed)", ge=0, le=10_000)] = None,
        min_accuracy: Annotated[float | None, Field(description="Minimum test accuracy, 0..1", ge=0, le=1)] = None,
        only_best_accuracy: Annotated[bool, Field(
            description="Keep the best row per task/dataset/metric/model/epoch")] = False,
        unique_nn: Annotated[bool, Field(description="Keep only the best row per model")] = False,
        device_type: Annotated[FilterText, Field(
            description="Only models LEMUR benchmarked on this device (its imported mobile benchmarks), "
                        "e.g. 'Pixel 7'")] = None,
        sort: Annotated[Literal["accuracy", "duration", "duration_norm", "accuracy_to_time", "params", "created",
                                "name"], Field(
            description="Sort key; accuracy, accuracy_to_time and created sort descending by default; duration_norm: "
                        "training time on the reference device (" + REFERENCE_DESCRIPTION + "); rows of runs "
                        "without a calibration sort last")] = "accuracy",
        descending: Annotated[bool | None, Field(description="Override the sort direction")] = None,
        limit: Annotated[int, Field(description="Rows per page, 1..100", ge=1, le=100)] = 20,
        offset: Annotated[Offset, Field(description="Rows to skip (ignored with cursor)")] = 0,
        cursor: Annotated[Cursor, Field(description="next_cursor from the previous page")] = None,
        include_code: Annotated[bool, Field(
            description="Attach each row's model code (budget ~60k characters per answer)")] = False,
        view: Annotated[Literal["points", "models"], Field(
            description="points: learning-curve points (rows); models: one row per model and task/dataset/metric "
                        "with its score and rank (in `models`), models without runs included")] = "points",
        by: Annotated[Literal["accuracy", "accuracy_to_time", "accuracy_to_time_norm"], Field(
            description="view=models: the score ranked by; accuracy_to_time_norm uses the training time on the "
                        "reference device (duration_norm), so runs of different machines compare")] = "accuracy",
        include_partial: Annotated[bool, Field(
            description="view=models: also count pruned/failed runs and runs short of their epochs")] = False,
        protocol: Annotated[Literal["default", "lemur"] | None, Field(
            description="Only runs of this evaluation protocol: 'default' (selected on a validation split) or "
                        "'lemur' (LEMUR's check_nn: whole train split; imported LEMUR records); see list_catalog"
        )] = None,
    ) -> QueryResult:
        dataset = await canonical_dataset_filter(state, dataset)
        filters = Filters(task=task, dataset=dataset, metric=metric, nn=as_names(nn),
                          nn_prefix=as_names(nn_prefix), epoch=epoch, min_accuracy=min_accuracy,
                          device_type=device_type, protocol=protocol,
                          only_best_accuracy=only_best_accuracy, unique_nn=unique_nn)
        if view == "models":
            return await query_model_view(state, filters, by, include_partial, limit, offset)
        page = Page(sort=sort, descending=descending, limit=limit, offset=offset, cursor=cursor)
        return await query_models(state, filters, page, include_code)

    @tool(mcp, "get_model", READ_ONLY)
    async def get_model_tool(
        name: Annotated[str, Field(description="Exact model name from query_models", min_length=1, max_length=300)],
        include_code: Annotated[bool, Field(description="Return the model's code (default true)")] = True,
    ) -> ModelDetail:
        """Everything known about one model: its code, architecture stats (params, FLOPs, fingerprint),
        code-quality score, its runs summarized per task/dataset/metric, the learning curve of its best
        run (a point every half epoch where recorded; for LEMUR records also train/test loss, train
        accuracy and samples/s, with the training hardware), the weights file of that run, other models
        with the same architecture, and for imported LEMUR models LEMUR's own measurements (`lemur`:
        layer statistics, on-device benchmarks, TFLite, pruning; a few rows each with totals).
        Use it to study a strong model before writing a variant.
        Next: submit_model with your modified code.
        """
        return await get_model(state, name, include_code)

    @mcp.resource("lemur://models/{name}/code", name="model_code", mime_type="text/x-python",
                  description="The Python code of one model in the zoo")
    async def model_code_resource(name: str) -> str:
        return await model_code(state, name)

    @mcp.prompt(name="design_model")
    async def design_model_prompt(
        task: Annotated[str, Field(description="Task, e.g. img-classification")] = "img-classification",
        dataset: Annotated[str | None, Field(
            description="Dataset, e.g. mnist; default: one present on this server (digits)")] = None,
    ) -> str:
        """Start designing a new network: the Net contract plus the code of the best models for the task."""
        return await design_model(state, task, dataset)


async def _attach_code(store: Any, rows: list[dict[str, Any]]) -> bool:
    """Attach code to rows within CODE_BUDGET_CHARS; each distinct model's code is read once."""
    budget = CODE_BUDGET_CHARS
    cut = False
    cache: dict[str, str] = {}
    for row in rows:
        name = row["name"]
        if name not in cache:
            model = await store.model_by_name(name)
            cache[name] = model["code"] if model else ""
        code = cache[name]
        if len(code) <= budget:
            row["code"] = code
            budget -= len(code)
        else:
            row["code"] = None
            cut = True
    return cut


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
