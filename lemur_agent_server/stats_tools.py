"""MCP tools `plot` and `leaderboard`, and the PNG resources `lemur://plots/{kind}`.

Why a separate module: the statistics live in the `stats` package (shared with the CLI and the Excel
report); this file only turns tool arguments into `zoo.query.Filters`, runs the blocking SQL and
matplotlib work in worker threads (at most two at once, so plots cannot starve the event loop's other
work), and turns `StatsError` into `ToolError` whose message tells the agent what to call next.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from lemur_agent_server.evaluator.calibration import REFERENCE_DESCRIPTION
from lemur_agent_server.schemas import (
    MAX_NAME_CHARS,
    FilterText,
    NameOrNames,
    Offset,
    as_names,
    canonical_filter_dataset,
)
from lemur_agent_server.tool_wiring import tool
from sandbox import datasets
from stats import aggregates as agg
from stats.plots import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    MAX_HEIGHT,
    MAX_WIDTH,
    MIN_HEIGHT,
    MIN_WIDTH,
    PLOT_KINDS,
    PlotKind,
    PlotResult,
    open_zoo,
    render,
)
from stats.scope import StatsError, check_models, describe, no_data
from zoo.query import SCORE_DEFINITION, Filters

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)
_LIMITER = anyio.CapacityLimiter(2)  # concurrent stats jobs (SQL + matplotlib) per server
T = TypeVar("T")

Task = Annotated[FilterText, Field(description="Task, e.g. 'img-classification'. See list_catalog.")]
Dataset = Annotated[FilterText, Field(description="Dataset, e.g. 'cifar-10'. See list_catalog.")]
Metric = Annotated[FilterText, Field(description="Metric, e.g. 'acc' (accuracy as a fraction, 0..1).")]
NnPrefix = Annotated[NameOrNames, Field(
    description="Only models whose name starts with one of these prefixes (one string or a list), "
                "e.g. ['rag-', 'alt-nn1-']", max_length=20)]
Epoch = Annotated[float | None, Field(
    description="Use each run's point at this epoch (0.5 steps allowed, e.g. 1 or 2.5) instead of its last "
                "point; 0..10000", ge=0, le=10_000)]
MinAccuracy = Annotated[float | None, Field(description="Only points/runs with accuracy >= this, 0..1", ge=0, le=1)]

LEADERBOARD_DESCRIPTION = (
    "Rank models by their score: one row per model and task/dataset/metric, best first. Use it to find the "
    "strongest (by=accuracy) or the most time-efficient (by=accuracy_to_time) models for a task/dataset/metric "
    "before designing your own, or to see where a submitted model landed. " + SCORE_DEFINITION + " Pass epoch "
    "to compare all runs at the same epoch instead (e.g. epoch=1). Rows carry accuracy, accuracy-to-time, epoch, "
    "training seconds, params, FLOPs, run count and the scoring run's uid; `total` and `next_offset` page "
    "through the rest. Accuracies are only comparable within one task/dataset/metric: pass all three for a clean "
    "ranking. query_models(view='models') and a finished job's `standing` rank by the same score. "
    "Next: get_model(name) for the code and curve of a row, plot(kind='curves', models=[...]) to compare.")
_KIND_LINES = "\n".join(f"- {k}: {s.description}" for k, s in PLOT_KINDS.items())


class LeaderboardRow(BaseModel):
    rank: int = Field(description="1 = best")
    name: str = Field(description="Model name; pass it to get_model for code and curve")
    task: str
    dataset: str
    metric: str
    accuracy: float | None = Field(description="Test accuracy (fraction, 0..1) of the model's best run")
    accuracy_to_time: float | None = Field(
        description="LEMUR's accuracy-to-time of that run: max(0, accuracy - chance) / (training ns / 1e11)")
    epoch: float | None = Field(description="Epoch of that run's point (its last, or the epoch filter)")
    duration_s: float | None = Field(description="Training-only time of that run up to that point, seconds")
    duration_norm_s: float | None = Field(default=None, description=(
        "That training time on the reference device (device calibration); null until the run's device is "
        "calibrated"))
    params: int | None = Field(description="Trainable parameters of the model")
    flops: int | None = Field(description="FLOPs per forward pass of the model")
    runs: int = Field(description="Scored runs of this model on this task/dataset/metric")
    run_uid: str = Field(description="uid of the best run")
    repeat_group: dict[str, Any] | None = Field(default=None, description=(
        "When that run has repeats: mean and std of accuracy and duration over its repeat group"))


class Leaderboard(BaseModel):
    by: Literal["accuracy", "accuracy_to_time", "accuracy_to_time_norm"]
    scope: str = Field(description="The filters applied, and what one row is computed from")
    total: int = Field(description="Ranked model/task/dataset/metric pairs matching the filters")
    rows: list[LeaderboardRow]
    next_offset: int | None = Field(description="Pass as offset for the next page; null at the end")


def _filters(task: str | None, dataset: str | None, metric: str | None, models: str | list[str] | None,
             nn_prefix: str | list[str] | None, epoch: float | None, min_accuracy: float | None) -> Filters:
    known = [i.name for i in datasets.known_datasets()]
    return Filters(task=task, dataset=canonical_filter_dataset(dataset, known), metric=metric, nn=as_names(models),
                   nn_prefix=as_names(nn_prefix), epoch=epoch, min_accuracy=min_accuracy)


async def _in_thread(fn: Callable[[], T]) -> T:
    try:
        return await anyio.to_thread.run_sync(fn, limiter=_LIMITER)
    except StatsError as exc:
        raise ToolError(str(exc)) from exc


def _leaderboard(path: Path, f: Filters, by: str, limit: int, offset: int, include_partial: bool = False
                 ) -> Leaderboard:
    conn = open_zoo(path)
    try:
        check_models(conn, f.nn)
        df, total = agg.leaderboard(conn, f, by, limit=limit, offset=offset,  # type: ignore[arg-type]
                                    include_partial=include_partial)
    finally:
        conn.close()
    if total == 0:
        raise no_data(f)
    what = "each run's last point" if f.epoch is None else f"each run's point at epoch {f.epoch:g}"
    what += " (partial and pruned runs included)" if include_partial else " (complete runs only)"
    records: list[dict[str, Any]] = json.loads(df.drop(columns="model_id").to_json(orient="records"))
    end = offset + len(records)
    return Leaderboard(by=by, scope=f"{describe(f)}; best of {what} per model and task/dataset/metric",  # type: ignore[arg-type]
                       total=total, rows=[LeaderboardRow(**r) for r in records],
                       next_offset=end if end < total else None)


def _content(res: PlotResult) -> list[ImageContent | TextContent]:
    return [ImageContent(type="image", data=base64.b64encode(res.png).decode(), mime_type="image/png"),
            TextContent(type="text", text=f"{res.summary}\n[{res.kind} plot, {res.width}x{res.height} px PNG]")]


# --- the tools' logic, callable without MCP --------------------------------------------------------
async def plot(zoo_path: Path, kind: str, f: Filters, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
               models: tuple[str, ...] = (), limit: int = 5) -> list[ImageContent | TextContent]:
    """One plot of the zoo as image + text content; `models` are the curves to draw (kind=curves)."""
    res = await _in_thread(functools.partial(render, kind, zoo_path, f, width=width, height=height,
                                             models=models, limit=limit))
    return _content(res)


async def leaderboard(zoo_path: Path, f: Filters, by: str = "accuracy", limit: int = 20,
                      offset: int = 0, include_partial: bool = False) -> Leaderboard:
    """One page of the ranking of models by their score (zoo.query.SCORE_DEFINITION)."""
    return await _in_thread(functools.partial(_leaderboard, zoo_path, f, by, limit, offset, include_partial))


def plot_kinds() -> str:
    return json.dumps({"template": "lemur://plots/{kind}{?task,dataset,metric,epoch}",
                       "kinds": {k: s.description for k, s in PLOT_KINDS.items()}}, indent=1)


async def plot_png(zoo_path: Path, kind: str, task: str | None = None, dataset: str | None = None,
                   metric: str | None = None, epoch: str | None = None) -> bytes:
    """A plot as PNG bytes for the resource URI's (string) parameters."""
    if kind not in PLOT_KINDS:
        raise ResourceNotFoundError(f"Unknown plot kind {kind!r}. Use one of: {', '.join(PLOT_KINDS)}.")
    try:
        ep = float(epoch) if epoch not in (None, "") else None
    except ValueError as exc:
        raise ResourceNotFoundError(f"epoch must be a number, not {epoch!r}.") from exc
    f = Filters(task=task or None, dataset=dataset or None, metric=metric or None, epoch=ep)
    try:
        res = await anyio.to_thread.run_sync(functools.partial(render, kind, zoo_path, f), limiter=_LIMITER)
    except StatsError as exc:
        raise ResourceNotFoundError(str(exc)) from exc
    return res.png


# --- MCP wiring: names, arguments and descriptions; each tool calls its function above ------------------
def register_stats_tools(mcp: MCPServer, get_zoo_path: Callable[[], Path]) -> None:
    """Add the `plot` and `leaderboard` tools and the `lemur://plots/...` resources to `mcp`."""

    @tool(mcp, "plot", READ_ONLY, description=(
        "Draw one plot of the zoo's training results and return it as a PNG image plus a short text "
        "summary of what it shows (key numbers, so you can reason even without seeing the image). Use it "
        "to compare learning curves, see the accuracy/time or accuracy/size trade-off (Pareto fronts), "
        "how datasets differ, how long training takes, why submissions failed, or what correlates with "
        "accuracy. Kinds:\n" + _KIND_LINES + "\n"
        "Kinds marked [one triple] show one task/dataset/metric: the one you pass (task, dataset, metric), "
        "else the one with the most runs (the summary says which). Aggregates are computed over the whole zoo in "
        "SQL; scatters draw at most 5,000 points and say how many they skipped. Takes about 0.2-3 s. "
        "Next: leaderboard or query_models for the exact rows behind a plot, get_model for a model's code."))
    async def plot_tool(
        kind: Annotated[PlotKind, Field(description="Which plot; see the list in the description")],
        task: Task = None,
        dataset: Dataset = None,
        metric: Metric = None,
        models: Annotated[Annotated[str, Field(max_length=MAX_NAME_CHARS)]
                          | list[Annotated[str, Field(max_length=MAX_NAME_CHARS)]] | None, Field(
            description="Exact model names (one string or a list). For kind=curves: the models to draw (at most "
                        "7); for other kinds: only these models", max_length=7)] = None,
        nn_prefix: NnPrefix = None,
        epoch: Epoch = None,
        min_accuracy: MinAccuracy = None,
        width: Annotated[int, Field(description=f"Image width in pixels, {MIN_WIDTH}..{MAX_WIDTH}",
                                    ge=MIN_WIDTH, le=MAX_WIDTH)] = DEFAULT_WIDTH,
        height: Annotated[int, Field(description=f"Image height in pixels, {MIN_HEIGHT}..{MAX_HEIGHT}",
                                     ge=MIN_HEIGHT, le=MAX_HEIGHT)] = DEFAULT_HEIGHT,
        limit: Annotated[int, Field(description="kind=curves without models: how many top models to draw, 1..7",
                                    ge=1, le=7)] = 5,
    ) -> list[ImageContent | TextContent]:
        curves = kind == "curves"
        f = _filters(task, dataset, metric, None if curves else models, nn_prefix, epoch, min_accuracy)
        return await plot(get_zoo_path(), kind, f, width, height, as_names(models) if curves else (), limit)

    @tool(mcp, "leaderboard", READ_ONLY, description=LEADERBOARD_DESCRIPTION)
    async def leaderboard_tool(
        by: Annotated[Literal["accuracy", "accuracy_to_time", "accuracy_to_time_norm"], Field(
            description="Rank by test accuracy, or by LEMUR's accuracy-to-time (accuracy gained per training "
                        "time; favours fast models), or accuracy_to_time_norm: the same with the training time "
                        f"on {REFERENCE_DESCRIPTION} (runs of different machines compare; uncalibrated runs "
                        "are not ranked)")] = "accuracy",
        task: Task = None,
        dataset: Dataset = None,
        metric: Metric = None,
        models: Annotated[NameOrNames, Field(description="Only these exact model names (one string or a list)")
                          ] = None,
        nn_prefix: NnPrefix = None,
        epoch: Epoch = None,
        min_accuracy: MinAccuracy = None,
        limit: Annotated[int, Field(description="Rows to return, 1..100", ge=1, le=100)] = 20,
        offset: Annotated[Offset, Field(description="Rows to skip, for the next page (see next_offset)")] = 0,
        include_partial: Annotated[bool, Field(
            description="Also count pruned, failed, timed-out runs and runs that stopped before their epochs "
                        "(a fast half epoch can then top by=accuracy_to_time)")] = False,
        protocol: Annotated[Literal["default", "lemur"] | None, Field(
            description="Only runs of this evaluation protocol (list_catalog's accuracy_protocols says what each "
                        "accuracy means; imported LEMUR records are 'lemur')")] = None,
    ) -> Leaderboard:
        f = dataclasses.replace(_filters(task, dataset, metric, models, nn_prefix, epoch, min_accuracy),
                                protocol=protocol)
        return await leaderboard(get_zoo_path(), f, by, limit, offset, include_partial)

    @mcp.resource("lemur://plots", name="plot_kinds", mime_type="application/json",
                  description="The plot kinds, what each shows, and the URI template to read one as a PNG.")
    def plot_kinds_resource() -> str:
        return plot_kinds()

    @mcp.resource("lemur://plots/{kind}{?task,dataset,metric,epoch}", name="plot", mime_type="image/png",
                  description="A plot of the zoo as a PNG (1000x600 px), with default filters unless task, dataset, "
                              "metric or epoch are given. Kinds: " + ", ".join(PLOT_KINDS))
    async def plot_resource(kind: str, task: str | None = None, dataset: str | None = None,
                            metric: str | None = None, epoch: str | None = None) -> bytes:
        return await plot_png(get_zoo_path(), kind, task, dataset, metric, epoch)
