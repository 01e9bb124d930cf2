"""Pydantic shapes of the read-side tools' answers (structured output), and the bounded argument
types the tools share.

Arguments are declared on the tool functions themselves (flat, each with a description) so that
clients such as the MCP Inspector can pass them as simple key=value pairs. Their bounds live here so
that every tool shows the same range in its schema (an agent reads the range before it calls) and
`lemur_agent_server.arguments` names the same range when a call breaks it. Use them with a
description: `offset: Annotated[Offset, Field(description="Rows to skip")] = 0`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from zoo.query import MAX_CURSOR_CHARS, MAX_OFFSET

MAX_NAME_CHARS = 300  # a model name (get_model already allows 300)
MAX_FILTER_CHARS = 100  # task, dataset and metric filters: the longest real one has 18 characters
MAX_NAMES = 100

Offset = Annotated[int, Field(ge=0, le=MAX_OFFSET)]
Cursor = Annotated[str | None, Field(max_length=MAX_CURSOR_CHARS)]
FilterText = Annotated[str | None, Field(max_length=MAX_FILTER_CHARS)]
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
NameList = Annotated[list[Annotated[str, Field(max_length=MAX_NAME_CHARS)]] | None, Field(max_length=MAX_NAMES)]
# One name or several: agents write `nn="LeNet5"` as often as `nn=["LeNet5"]`; both mean the same list.
NameOrNames = Annotated[Annotated[str, Field(max_length=MAX_NAME_CHARS)]
                        | list[Annotated[str, Field(max_length=MAX_NAME_CHARS)]] | None, Field(max_length=MAX_NAMES)]


def as_names(value: str | list[str] | None) -> tuple[str, ...]:
    """A NameOrNames argument as a tuple of names (a single string is a list of one)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def canonical_filter_dataset(value: str | None, known: list[str] | tuple[str, ...]) -> str | None:
    """A dataset filter as the zoo spells it, ignoring case and '_' for '-' where exactly one known name fits."""
    if value is None:
        return None
    from lemur_agent_server.evaluator.requests import canonical_dataset

    return canonical_dataset(value, known)


class ModelRow(BaseModel):
    """One learning-curve point of one run: the model after `epoch` epochs (a LEMUR record)."""

    name: str = Field(description="Model name; pass it to get_model")
    task: str
    dataset: str
    metric: str
    epoch: float = Field(description="Epochs trained at this point (0.5 = half an epoch)")
    accuracy: float | None = Field(description="Test accuracy in [0, 1], computed by the server")
    duration: int | None = Field(description="Training-only time until this point, nanoseconds")
    duration_norm: int | None = Field(default=None, description="That time on the reference device, nanoseconds "
                                                                "(device calibration); null: not calibrated")
    protocol: str | None = Field(default=None, description="Evaluation protocol of the run (list_catalog's "
                                                           "accuracy_protocols says what each means)")
    repeat_group: dict[str, Any] | None = Field(default=None, description=(
        "When the run is one of a job's repeats: mean and std of accuracy and duration over the group"))
    accuracy_to_time: float | None = Field(
        description="max(0, accuracy - chance) / (duration_ns / 1e11); higher is better")
    params: int | None = Field(description="Trainable + frozen parameter count")
    prm: dict[str, Any] = Field(description="Hyperparameters of the run")
    code: str | None = Field(default=None, description="Model code, only when include_code=true")


class ModelScoreRow(BaseModel):
    """One model's score on one task/dataset/metric (query_models view='models'); null without scored runs."""

    name: str = Field(description="Model name; pass it to get_model")
    params: int | None = None
    flops: int | None = None
    task: str | None = None
    dataset: str | None = None
    metric: str | None = None
    rank: int | None = Field(default=None, description="1 = best within its task/dataset/metric; null: no score")
    score: float | None = Field(default=None, description="The value ranked by (accuracy or accuracy_to_time)")
    accuracy: float | None = Field(default=None, description="Test accuracy of the run holding the score")
    accuracy_to_time: float | None = None
    epoch: float | None = None
    duration_s: float | None = Field(default=None, description="Training-only seconds of that run")
    duration_norm_s: float | None = Field(default=None, description="That time on the reference device "
                                                                      "(device calibration); null: not calibrated")
    runs: int = Field(default=0, description="Complete runs counted (0: none yet, e.g. a seed model)")


class QueryResult(BaseModel):
    rows: list[ModelRow]
    models: list[ModelScoreRow] | None = Field(default=None, description="view='models': one row per model")
    total: int = Field(description="Rows matching the filters, over all pages")
    returned: int
    offset: int
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end")
    truncated: bool = Field(description="True when more rows exist than returned, or code was cut")
    hint: str = Field(description="What to do next")


class CatalogEntry(BaseModel):
    task: str
    dataset: str
    metric: str
    models: int
    runs: int


class DatasetEntry(BaseModel):
    name: str
    task: str
    metric: str
    num_classes: int
    image_shape: list[int] = Field(description="[channels, height, width] as stored")
    chance: float = Field(description="Accuracy of random guessing (1 / classes)")
    default_transform: str
    available: bool = Field(description="Data files present on this server (else submit fails)")
    how_to_get: str


class Catalog(BaseModel):
    zoo: list[CatalogEntry] = Field(description="What the zoo holds: runs and models per task/dataset/metric")
    accuracy_protocols: dict[str, str] | None = Field(default=None, description=(
        "What `accuracy` means under each evaluation protocol (every run records its protocol; query_models and "
        "leaderboard filter by it)"))
    totals: dict[str, int]
    evaluator_datasets: list[DatasetEntry] = Field(description="Datasets submit_model can train on")
    transforms: dict[str, str] = Field(description="Every transform name the evaluator runs, with what it does; "
                                                   "the default search uses the plain norm/echo ones")
    transform_help: str
    zoo_transforms: dict[str, int] = Field(description="Transforms seen in the zoo's runs, with run counts")
    metrics: list[str]
    net_contract: str
    hyperparameters: dict[str, str]
    sandbox: dict[str, Any] = Field(description="Isolation the evaluator uses on this server")
    baselines: dict[str, Any] | None = Field(default=None, description=(
        "The reference models' baseline evaluations this server queued on its first start: per seed model its "
        "static facts and each job's id and status (queued, running, succeeded, ...). Their results appear in "
        "query_models/leaderboard once the jobs succeed; get_job(job_id) says how far one is."))


class CurvePoint(BaseModel):
    epoch: float
    accuracy: float | None
    val_accuracy: float | None = None
    loss: float | None = Field(default=None, description="Training loss that learn() returned for the segment "
                                                         "ending at this point (not a test loss)")
    duration_ns: int | None = None
    accuracy_to_time: float | None = None
    elapsed_s: float | None = None
    # per-epoch training diagnostics: LEMUR 2.2's train_stat where an imported record had them; for our runs
    # the training loss and accuracy that learn() returned
    train_loss: float | None = Field(default=None, description="Mean training loss of the epoch")
    test_loss: float | None = Field(default=None, description="Test loss after the epoch (LEMUR)")
    train_accuracy: float | None = Field(default=None, description="Training accuracy of the epoch, as learn() "
                                                                   "or LEMUR's record reported it")
    gradient_norm: float | None = Field(default=None, description="Gradient norm (LEMUR)")
    samples_per_second: float | None = Field(default=None, description="Training throughput (LEMUR)")


class RunSummary(BaseModel):
    task: str
    dataset: str
    metric: str
    runs: int
    failed_runs: int
    best_accuracy: float | None
    mean_accuracy: float | None
    best_accuracy_to_time: float | None
    max_epochs: float | None


class LemurRows(BaseModel):
    """At most a few rows of one of LEMUR's side tables, best first, and how many the model has."""

    total: int = Field(description="Rows the model has in this table")
    rows: list[dict[str, Any]] = Field(description="The first rows (LEMUR's column names; lemur_id = LEMUR's id)")


class LemurMeasurements(BaseModel):
    """What LEMUR 2.2 measured about a model beyond its training records (imported from its database)."""

    architecture: LemurRows | None = Field(default=None, description="LEMUR's nn_stat: layers, params, FLOPs, "
                                                                     "size, attention/residual flags")
    mobile_benchmarks: LemurRows | None = Field(default=None, description="LEMUR's run: on-device latency "
                                                                          "(CPU/GPU/NPU), RAM, precision, device")
    tflite: LemurRows | None = Field(default=None, description="LEMUR's tflite: accuracy of TFLite exports")
    pruning: LemurRows | None = Field(default=None, description="LEMUR's prun: pruning method, ratio, accuracy")


class ModelDetail(BaseModel):
    name: str
    origin: str = Field(description="seed (ours), lemur (imported) or submitted")
    created: float = Field(description="Unix time")
    code_hash: str = Field(description="sha256 of the normalized code; resubmitting the same code adds runs")
    lemur_id: str = Field(description="LEMUR's nn_id: md5 of the code without whitespace")
    fingerprint: str | None = Field(description="Architecture fingerprint; identical graphs share it")
    params: int | None
    flops: int | None = Field(description="Forward FLOPs for one sample")
    code_quality: float | None = Field(description="0..1, from ruff and radon; see code_quality_detail")
    code_quality_detail: dict[str, Any] | None
    supported_hyperparameters: list[str] | None
    summary: list[RunSummary] = Field(description="Runs per task/dataset/metric")
    best_run: dict[str, Any] | None = Field(description="The run with the highest test accuracy")
    curve: list[CurvePoint] = Field(description="Learning curve of the best run")
    weights: dict[str, Any] | None = Field(description="Weights file (safetensors) of the best run that kept "
                                                 "one: sha256, size, path, run_uid, run_accuracy; `files`: every "
                                                 "file of that run, one per format (safetensors, onnx)")
    recent_runs: list[dict[str, Any]]
    same_architecture: list[str] = Field(description="Other models with the same fingerprint")
    layers: list[dict[str, Any]] | None = Field(default=None, description=(
        "The heaviest modules (top 10 by FLOPs: name, type, out_shape, params, flops for one sample), as the "
        "last check of this model in the sandbox measured them; null until a job or check_model ran it here"))
    lemur: LemurMeasurements | None = Field(
        default=None, description="LEMUR's own measurements of this model (imported LEMUR 2.2 database); "
                                  "null when there are none. The same in full: nn_stat_data(), run_data(), "
                                  "prun_data() of lemur_agent_server.api")
    train_hardware: dict[str, Any] | None = Field(
        default=None, description="Machine the best run trained on (LEMUR's train_stat: CPU, RAM, GPU); "
                                  "its per-epoch losses and throughput are on the curve points")
    code: str | None = None
    code_truncated: bool = False
