"""Statistics, plots, exports and the `stats` CLI over a small real zoo.

Every expected value is recomputed here from the raw tables with pandas, independently of the SQL in
`stats`; every PNG is opened and its plot areas checked for drawn data.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image

from stats import aggregates as agg
from stats.cli import add_stats_subparsers
from stats.export import TABLES, export
from stats.figures import Options
from stats.plots import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    MIN_HEIGHT,
    MIN_WIDTH,
    PLOT_KINDS,
    PLOT_LOCK,
    PlotResult,
    lay_out,
    render,
)
from stats.scope import NoData, StatsError, Triple, UnknownModel, resolve_triple
from zoo.query import Filters
from zoo.records import Model, Point, Run, accuracy_to_time
from zoo.store import ZooStore

REPO = Path(__file__).resolve().parent.parent
TRIPLES = [("img-classification", "cifar-10", "acc", 0.1), ("img-classification", "mnist", "acc", 0.1),
           ("img-segmentation", "coco", "iou", 0.05)]
CIFAR = Filters(task="img-classification", dataset="cifar-10", metric="acc")
FAILURES = [("failed", {"stage": "check", "kind": "SyntaxError", "message": "invalid syntax (line 3)"}),
            ("failed", {"stage": "train", "kind": "OutOfMemory", "message": "CUDA out of memory"}),
            ("timed_out", {"stage": "train", "kind": "timeout", "message": "time box of 600 s reached"}),
            ("pruned", None)]
JOBS = [("succeeded", None), ("timed_out", None), ("failed", FAILURES[0][1]), ("cancelled", None), ("queued", None)]


async def add_jobs(store: ZooStore, i: int) -> None:
    """Model i's submissions as the queue records them: one job per JOBS entry (one on mnist)."""
    for j, (status, error) in enumerate(JOBS):
        job_id = f"job-m{i}-{j}"
        request = {"task": "img-classification", "dataset": "mnist" if j == 1 else "cifar-10", "metric": "acc"}
        if status == "queued":
            await store.jobs.create(job_id, "submit", request)
        else:
            await store.jobs.create_finished(job_id, "submit", request, status, None, error, model_name=f"alt-m{i}")


async def build_stats_zoo(path: Path, n_models: int = 12, seed: int = 7) -> None:
    """Models alt-m0.., rag-m1..; each trains on 2-3 triples, 3 runs each, curves of 1-4 epochs (evaluator
    runs add half epochs); model 3 has no params; every 3rd model also has failed/timed-out/pruned
    submissions. Accuracies and times come from a seeded generator, so tests recompute, not hard-code."""
    rng = np.random.default_rng(seed)
    store = await ZooStore.open(path)
    created = 1_700_000_000.0
    try:
        for i in range(n_models):
            runs = []
            for k, (task, dataset, metric, chance) in enumerate(TRIPLES):
                if k == 2 and i % 2:
                    continue
                for t in range(3):
                    evaluator = t == 0
                    last = 1 + (i + t) % 4
                    epochs = np.arange(0.5 if evaluator else 1.0, last + 0.25, 0.5 if evaluator else 1.0)
                    q, per_epoch = rng.uniform(0.4, 1.0), (i + 1) * (k + 1) * rng.uniform(5, 15)
                    points = []
                    for e in epochs:
                        acc = float(np.clip(chance + 0.8 * q * (1 - np.exp(-e / 1.5)) + rng.normal(0, 0.01), 0, 1))
                        dur = int(e * per_epoch * 1e9)
                        points.append(Point(epoch=float(e), accuracy=acc, duration_ns=dur,
                                            accuracy_to_time=accuracy_to_time(acc, chance, dur),
                                            val_accuracy=acc - 0.01 if evaluator else None))
                    created += 3600
                    runs.append(Run(uid=f"m{i}-{dataset}-{metric}-{t}", task=task, dataset=dataset, metric=metric,
                                    status="succeeded" if evaluator else "imported",
                                    source="evaluator" if evaluator else "lemur-import",
                                    prm={"lr": float(10 ** rng.uniform(-4, -1)), "batch": int(2 ** rng.integers(4, 9)),
                                         "momentum": float(rng.uniform(0.5, 0.99)), "transform": "norm_32"},
                                    transform="norm_32", points=points, created=created))
            if i % 3 == 0:
                for j, (status, error) in enumerate(FAILURES[: 2 + i % 3 + (i == 9)]):
                    created += 60
                    pts = [] if status == "failed" else [Point(epoch=1.0, accuracy=0.2, duration_ns=10**9,
                                                              accuracy_to_time=0.1)]
                    runs.append(Run(uid=f"m{i}-fail-{j}", task="img-classification", dataset="cifar-10",
                                    metric="acc", status=status, source="evaluator", error=error, points=pts,
                                    prm={"lr": 0.5}, created=created))
                await add_jobs(store, i)  # the queue's view of those submissions
            params = None if i == 3 else 1000 * (i + 1) ** 2
            await store.add_model_with_runs(
                Model(name=f"{'rag' if i % 2 else 'alt'}-m{i}", code=f"class Net:\n    W = {i}\n", origin="submitted",
                      params=params, flops=None if params is None else params * 40 + i), runs)
    finally:
        await store.close()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "zoo.sqlite"
    anyio.run(build_stats_zoo, path)
    return path


@pytest.fixture
def conn(zoo: Path):
    c = sqlite3.connect(f"file:{zoo}?mode=ro", uri=True)
    yield c
    c.close()


def raw(conn: sqlite3.Connection, sql: str) -> pd.DataFrame:
    return pd.read_sql_query(sql, conn)


def raw_points(conn: sqlite3.Connection) -> pd.DataFrame:
    return raw(conn, "SELECT p.*, m.name AS nn, r.uid AS run_uid FROM point p JOIN run r ON r.id = p.run_id "
                     "JOIN model m ON m.id = p.model_id")


def raw_runs(conn: sqlite3.Connection) -> pd.DataFrame:
    return raw(conn, "SELECT r.*, m.name AS nn, m.params, m.flops FROM run r JOIN model m ON m.id = r.model_id")


def assert_png(png: bytes, width: int, height: int, axes_px: tuple[tuple[int, int, int, int], ...] = (),
               min_coloured: float = 0.002) -> None:
    """A real PNG of the stated size whose every plot area holds drawn data (not just background and grid),
    and with coloured data marks in at least one of them."""
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (width, height)
    arr = np.asarray(img.convert("RGB")).astype(int)
    # nothing reaches the figure's outer 2 px: a title, label or legend cut off by the edge would
    frame = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                            arr[:, -2:].reshape(-1, 3)])
    assert (frame.min(axis=-1) >= 200).all(), "something is drawn at the figure's edge (clipped)"
    assert axes_px, "no plot area reported"
    coloured = []
    for left, top, right, bottom in axes_px:
        crop = arr[top + 3: bottom - 3, left + 3: right - 3]  # inside the spines
        assert crop.size and crop.std() > 0
        inked = (crop.min(axis=-1) < 215).mean()
        assert inked > 0.005, f"plot area {left, top, right, bottom} is nearly empty ({inked:.4f} inked)"
        coloured.append(((crop.max(axis=-1) - crop.min(axis=-1)) > 60).mean())
    assert max(coloured) > min_coloured


# --- plots ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PLOT_KINDS))
def test_every_plot_kind_renders_a_real_png(zoo: Path, kind: str) -> None:
    res = render(kind, zoo, Filters())
    assert isinstance(res, PlotResult) and res.mime_type == "image/png"
    assert_png(res.png, 1000, 600, res.axes_px)
    assert len(res.summary) > 40 and res.summary.endswith((".", "another."))


@pytest.mark.parametrize("size", [(MIN_WIDTH, MIN_HEIGHT), (DEFAULT_WIDTH, DEFAULT_HEIGHT)])
@pytest.mark.parametrize("kind", list(PLOT_KINDS))
def test_text_stays_in_the_figure_and_tick_labels_never_touch(conn: sqlite3.Connection, kind: str,
                                                              size: tuple[int, int]) -> None:
    import matplotlib
    from matplotlib.text import Text

    from stats.palette import STYLE

    spec = PLOT_KINDS[kind]
    few = Filters(nn=("alt-m0", "rag-m5")) if kind == "correlation" else Filters()  # its longest scope line
    data = spec.fetch(conn, few, Options(width=size[0], height=size[1]))
    with PLOT_LOCK, matplotlib.rc_context(STYLE):
        fig, _ = lay_out(spec, data, *size)
        fig.canvas.draw()  # the final layout, as saved
        renderer = fig.canvas.get_renderer()
        hidden = set()  # tick labels of ticks outside the view limits exist but are not drawn
        for ax in fig.axes:
            for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
                hidden |= {id(t) for t in axis.get_ticklabels(which="both")
                           if not lo <= t.get_position()[axis is ax.yaxis] <= hi}
        for text in fig.findobj(lambda a: isinstance(a, Text) and a.get_visible() and a.get_text().strip()):
            box = text.get_window_extent(renderer)
            if id(text) not in hidden:
                assert 0 <= box.x0 and box.x1 <= size[0] and 0 <= box.y0 and box.y1 <= size[1], (text.get_text(), box)
        for ax in fig.axes:
            lo, hi = sorted(ax.get_xlim())
            boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels(which="both")
                            if t.get_text() and not t.get_rotation() and lo <= t.get_position()[0] <= hi),
                           key=lambda b: b.x0)
            assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), f"{kind}: x tick labels overlap"
            label, area = ax.yaxis.label.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert not ax.yaxis.label.get_text() or label.height <= area.height * 1.05, f"{kind}: y label too long"


def test_plot_size_and_filters_are_honoured(zoo: Path, conn: sqlite3.Connection) -> None:
    res = render("histogram", zoo, Filters(task="img-segmentation"), width=640, height=400)
    assert_png(res.png, 640, 400, res.axes_px)
    n = conn.execute("SELECT COUNT(*) FROM run WHERE task='img-segmentation' AND accuracy IS NOT NULL").fetchone()[0]
    assert "img-segmentation / coco / iou" in res.summary and f"{n:,} accuracies" in res.summary
    assert "most runs" in render("histogram", zoo, Filters()).summary  # the chosen triple is said
    with pytest.raises(StatsError, match="out of range"):
        render("box", zoo, width=100, height=400)


def test_curves_draw_named_models_with_half_epochs(zoo: Path, conn: sqlite3.Connection) -> None:
    res = render("curves", zoo, CIFAR, models=["alt-m0", "rag-m5"], width=900, height=500)
    assert_png(res.png, 900, 500, res.axes_px)
    pts = agg.learning_curves(conn, CIFAR, Triple(*TRIPLES[0][:3]), ("alt-m0", "rag-m5"))
    assert set(pts["name"]) == {"alt-m0", "rag-m5"}  # the named models, and only them
    finals = pts.groupby("name", sort=False)["final"].first()
    assert list(finals.index) == list(finals.sort_values(ascending=False).index)  # best final accuracy first
    runs = raw_runs(conn)
    for name, g in pts.groupby("name"):
        mine = runs[(runs.nn == name) & (runs.dataset == "cifar-10") & runs.accuracy.notna()]
        best = mine.loc[mine.accuracy.idxmax()]
        assert g["run_uid"].unique().tolist() == [best.uid]
        expect = raw_points(conn).query("run_uid == @best.uid").sort_values("epoch")
        assert g["epoch"].tolist() == expect["epoch"].tolist()
        assert g["accuracy"].tolist() == expect["accuracy"].tolist()
    assert "alt-m0" in res.summary and "rag-m5" in res.summary
    assert ("half epochs" in res.summary) == bool((pts["epoch"] % 1 != 0).any())


def test_bad_arguments_say_what_to_do(zoo: Path) -> None:
    with pytest.raises(UnknownModel, match="Unknown model 'nope'.*query_models"):
        render("curves", zoo, models=["nope"])
    with pytest.raises(UnknownModel, match="Close names: alt-m1"):
        render("box", zoo, Filters(nn=("alt-m11",)))  # alt-m11 does not exist; rag-m11 does
    with pytest.raises(NoData, match="list_catalog"):
        render("pareto", zoo, Filters(task="img-classification", dataset="svhn", metric="acc"))
    with pytest.raises(StatsError, match="Unknown plot kind 'pie'. Use one of: curves"):
        render("pie", zoo)
    with pytest.raises(StatsError, match="No zoo at"):
        render("box", zoo.parent / "missing.sqlite")


def test_scatter_is_capped_and_says_so(zoo: Path, conn: sqlite3.Connection) -> None:
    triple = Triple(*TRIPLES[0][:3])
    d = agg.accuracy_vs_time(conn, CIFAR, triple, cap=10)
    runs = raw_runs(conn).query("dataset == 'cifar-10' and accuracy.notna() and duration_ns > 0")
    assert d.total == len(runs) and len(d.sample) <= 10 and d.every == -(-len(runs) // 10)
    # the front is exact over all runs: brute force
    best = [(r.duration_ns, r.accuracy) for r in runs.itertuples()
            if not ((runs.duration_ns <= r.duration_ns) & (runs.accuracy > r.accuracy)).any()]
    assert sorted(best) == sorted(zip(d.front.duration_ns.astype(int), d.front.accuracy))
    res = render("accuracy_vs_time", zoo, CIFAR, cap=10)
    assert f"of {len(runs):,} runs drawn" in res.summary


def test_epoch_filter_plots_each_runs_point_at_that_epoch(zoo: Path, conn: sqlite3.Connection) -> None:
    f = Filters(task="img-classification", dataset="mnist", metric="acc", epoch=1.0)
    pts = raw_points(conn).query("dataset == 'mnist' and epoch == 1.0")
    res = render("accuracy_vs_time", zoo, f)
    assert_png(res.png, 1000, 600, res.axes_px)
    assert f"of {len(pts):,} runs drawn" in res.summary
    st = agg.value_stats(conn, f, "accuracy").iloc[0]
    assert st["n"] == len(pts) and st["median"] == pytest.approx(pts.accuracy.median())
    assert f"n={len(pts):,})" in render("box", zoo, f).summary


def test_renders_are_safe_from_threads(zoo: Path) -> None:
    kinds = ["box", "pareto", "mean_std", "correlation", "timeline", "failures"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: render(k, zoo, width=640, height=400), kinds))
    for res in results:
        assert_png(res.png, 640, 400, res.axes_px)


# --- aggregates against pandas over the raw tables -----------------------------------------------
def test_epoch_summary_matches_the_points(conn: sqlite3.Connection) -> None:
    got = agg.epoch_summary(conn, Filters())
    pts = raw_points(conn).dropna(subset=["accuracy"])
    g = pts.groupby(["task", "dataset", "metric", "epoch"])["accuracy"]
    want = pd.DataFrame({"n": g.size(), "best": g.max(), "mean": g.mean(), "std": g.std(), "min": g.min(),
                         "q1": g.quantile(0.25), "median": g.median(), "q3": g.quantile(0.75)}).reset_index()
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False, rtol=1e-9)
    assert (got["epoch"] % 1 != 0).any()  # half epochs are there


def test_model_epoch_stats_match_the_points(conn: sqlite3.Connection) -> None:
    got = agg.model_epoch_stats(conn, Filters(nn_prefix=("rag-",)))
    pts = raw_points(conn).dropna(subset=["accuracy"])
    pts = pts[pts.nn.str.startswith("rag-")]
    g = pts.groupby(["task", "dataset", "metric", "nn", "epoch"])["accuracy"]
    want = pd.DataFrame({"runs": g.size(), "accuracy_mean": g.mean(), "accuracy_std": g.std(),
                         "accuracy_min": g.min(), "accuracy_max": g.max()}).reset_index()
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False, rtol=1e-9)


@pytest.mark.parametrize("by", ["accuracy", "accuracy_to_time"])
def test_leaderboard_matches_the_runs(conn: sqlite3.Connection, by: str) -> None:
    got, total = agg.leaderboard(conn, Filters(), by, limit=7, offset=2)
    runs = raw_runs(conn).dropna(subset=[by])
    best = runs.sort_values(by, ascending=False).groupby(["task", "dataset", "metric", "model_id"]).head(1)
    best = best.sort_values([by, "task", "dataset", "metric", "model_id"],
                            ascending=[False, True, True, True, True])
    assert total == len(best)
    page = best.iloc[2:9]
    assert got["rank"].tolist() == list(range(3, 10))
    assert got["name"].tolist() == page["nn"].tolist()
    assert got[by].tolist() == page[by].tolist()
    assert got["run_uid"].tolist() == page["uid"].tolist()
    assert got["duration_s"].tolist() == (page["duration_ns"] / 1e9).tolist()


def test_epoch_filter_reads_points_at_that_epoch(conn: sqlite3.Connection) -> None:
    got, total = agg.leaderboard(conn, Filters(epoch=1.0, dataset="mnist"), "accuracy", limit=100)
    pts = raw_points(conn).query("epoch == 1.0 and dataset == 'mnist'")
    assert total == pts["model_id"].nunique()
    assert got["accuracy"].tolist() == pts.groupby("model_id")["accuracy"].max().sort_values(
        ascending=False).tolist()


def test_failures_are_shares_of_evaluator_runs(conn: sqlite3.Connection) -> None:
    got = agg.failures(conn, Filters())
    runs = raw_runs(conn)
    sub = runs[runs.source != "lemur-import"]
    failed = sub[sub.status.isin(["failed", "timed_out"])]
    assert got["evaluator_runs"] == len(sub) and got["failed"] == len(failed) > 0
    assert got["failed_share"] == pytest.approx(len(failed) / len(sub))
    kinds = failed.error.map(lambda e: json.loads(e)["kind"]).value_counts()
    assert dict(zip(got["reasons"]["kind"], got["reasons"]["runs"])) == kinds.to_dict()
    assert set(got["by_status"]["status"]) == set(sub.status)


def test_job_outcomes_count_finished_submissions(conn: sqlite3.Connection, zoo: Path) -> None:
    jobs = raw(conn, "SELECT id, status, model_name, json_extract(request, '$.dataset') AS dataset, "
                     "json_extract(error, '$.kind') AS kind FROM job")
    done = jobs[jobs["status"] != "queued"]
    got = agg.job_outcomes(conn, Filters())
    assert got["jobs"] == len(done) > 0 and len(jobs) > len(done)  # a queued job is not an outcome yet
    assert dict(zip(got["by_status"]["status"], got["by_status"]["jobs"])) == done["status"].value_counts().to_dict()
    failed = got["reasons"].query("status == 'failed'")
    n_failed = (done["status"] == "failed").sum()
    assert failed[["stage", "kind", "jobs"]].values.tolist() == [["check", "SyntaxError", n_failed]]
    assert agg.job_outcomes(conn, Filters(dataset="mnist"))["jobs"] == (done["dataset"] == "mnist").sum()
    assert agg.job_outcomes(conn, Filters(nn=("alt-m0",)))["jobs"] == (done["model_name"] == "alt-m0").sum()
    assert agg.job_outcomes(conn, Filters(nn_prefix=("rag-",)))["jobs"] == 0  # only alt- models have jobs
    either = Filters(nn=("alt-m0",), nn_prefix=("alt-m3",))  # as in every query: a name OR a prefix matches
    assert agg.job_outcomes(conn, either)["jobs"] == done["model_name"].isin(["alt-m0", "alt-m3"]).sum() > 0
    summary = render("failures", zoo, Filters()).summary
    assert f"Submissions (jobs): {len(done)} finished: " in summary
    assert "timed_out" in summary and "without an error (the budget ended the search" in summary
    assert "No submission jobs" in render("failures", zoo, Filters(nn_prefix=("rag-",))).summary


def test_value_stats_and_histogram_match_the_runs(conn: sqlite3.Connection) -> None:
    runs = raw_runs(conn).dropna(subset=["accuracy"])
    got = agg.value_stats(conn, Filters(), "accuracy").set_index(["task", "dataset", "metric"])
    for key, g in runs.groupby(["task", "dataset", "metric"]):
        row = got.loc[key]
        assert row["n"] == len(g)
        assert row["median"] == pytest.approx(g.accuracy.median())
        assert row["p5"] == pytest.approx(np.quantile(g.accuracy, 0.05))
    h = agg.accuracy_histogram(conn, Filters(), Triple(*TRIPLES[1][:3]), bins=12)
    mnist = runs[runs.dataset == "mnist"].accuracy
    counts, _ = np.histogram(mnist, bins=12, range=(mnist.min(), mnist.max()))
    assert h["bins"]["count"].tolist() == counts.tolist() and h["n"] == len(mnist)
    assert h["mean"] == pytest.approx(mnist.mean())


def test_pareto_mask_is_exact() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.integers(1, 30, 300).astype(float), rng.random(300).round(2)
    brute = np.array([not ((x <= x[i]) & (y > y[i])).any() and not ((x < x[i]) & (y >= y[i])).any()
                      for i in range(len(x))])
    mask = agg.pareto_mask(x, y)
    assert set(zip(x[mask], y[mask])) == set(zip(x[brute], y[brute]))


def test_correlation_samples_and_is_symmetric(conn: sqlite3.Connection) -> None:
    corr, sampled, total = agg.correlation(conn, Filters())
    assert sampled == total == len(raw_runs(conn).dropna(subset=["accuracy"]))
    assert np.allclose(corr.to_numpy(), corr.to_numpy().T, equal_nan=True)
    assert {"accuracy", "log10 params", "log10 lr"} <= set(corr.columns)
    _, sampled_few, total_few = agg.correlation(conn, Filters(), cap=20)
    assert total_few == total and sampled_few < total


# --- exports -------------------------------------------------------------------------------------
def expected_table(conn: sqlite3.Connection, table: str) -> pd.DataFrame:
    if table == "points":
        df = raw_points(conn)
        return df[["task", "dataset", "metric", "nn", "epoch", "accuracy", "val_accuracy", "loss", "duration_ns",
                   "accuracy_to_time", "elapsed_s", "run_uid", "created"]]
    if table == "runs":
        df = raw_runs(conn).rename(columns={"uid": "run_uid"})
        err = df.error.map(lambda e: json.loads(e) if isinstance(e, str) else {})
        for k in ("stage", "kind", "message"):
            df[f"error_{k}"] = err.map(lambda e, k=k: e.get(k))
        return df[["run_uid", "nn", "task", "dataset", "metric", "transform", "prm", "status", "source", "epochs",
                   "accuracy", "duration_ns", "accuracy_to_time", "error_stage", "error_kind", "error_message",
                   "params", "flops", "created"]]
    frames = {"models": lambda: agg.model_epoch_stats(conn, Filters()),
              "epochs": lambda: agg.epoch_summary(conn, Filters()),
              "leaderboard": lambda: agg.leaderboard(conn, Filters(), limit=-1)[0].drop(columns="model_id"),
              "failures": lambda: agg.failures(conn, Filters())["reasons"],
              "catalog": lambda: agg.catalog(conn, Filters())}
    return frames[table]()


def _same(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    got = got.sort_values(keys).reset_index(drop=True)
    want = want.sort_values(keys).reset_index(drop=True)
    for c in want.columns:  # an all-NULL column reads back as float NaN from typed files
        if want[c].isna().all() and pd.api.types.is_numeric_dtype(got[c]):
            want[c] = want[c].astype(float)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-12)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("table", list(TABLES))
def test_table_exports_reopen_equal_to_the_zoo(zoo: Path, conn: sqlite3.Connection, tmp_path: Path, fmt: str,
                                               table: str) -> None:
    out = tmp_path / f"{table}.{fmt}"
    res = export(zoo, out, table=table)
    assert res.format == fmt and out.exists() and not out.with_name(out.name + ".part").exists()
    got = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out, keep_default_na=True)
    want = expected_table(conn, table)
    assert res.rows == len(want) == len(got)
    if fmt == "csv":  # csv has no types: compare through the same parser
        want = pd.read_csv(io.StringIO(want.to_csv(index=False)))
        got = got.astype({c: want[c].dtype for c in got.columns if got[c].isna().all()})
    keys = [c for c in ("run_uid", "epoch", "task", "dataset", "metric", "nn", "status", "stage", "kind")
            if c in want.columns]
    _same(got, want, keys)


def test_filtered_points_export(zoo: Path, conn: sqlite3.Connection, tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    export(zoo, out, filters=Filters(dataset="mnist", epoch=1.0, nn_prefix=("rag-",)), table="points")
    got = pd.read_parquet(out)
    want = expected_table(conn, "points").query("dataset == 'mnist' and epoch == 1.0 and nn.str.startswith('rag-')")
    _same(got, want, ["run_uid", "epoch"])


def _section(ws, title: str) -> pd.DataFrame:
    """The table written under a bold title in column A (header on the next row, ends at a blank row)."""
    rows = list(ws.iter_rows(values_only=True))
    start = next(i for i, r in enumerate(rows) if r[0] is not None and str(r[0]).startswith(title))
    header = [c for c in rows[start + 1] if c is not None]
    body = []
    for r in rows[start + 2:]:
        if r[0] is None and all(v is None for v in r[: len(header)]):
            break
        body.append(r[: len(header)])
    return pd.DataFrame(body, columns=header)


def test_xlsx_report_has_a_sheet_per_triple_with_plots_and_zoo_values(zoo: Path, conn: sqlite3.Connection,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "report.xlsx"
    res = export(zoo, out)
    wb = load_workbook(out)
    assert wb.sheetnames == res.sheets == ["Overview", "cifar-10 acc", "mnist acc", "coco iou"]
    assert res.images == 4 + 3 * 3
    for ws in wb.worksheets:
        assert len(ws._images) == (4 if ws.title == "Overview" else 3)
        for img in ws._images:
            assert_png(img._data(), 800, 480, ((0, 0, 800, 480),), min_coloured=0.0005)
    epochs = agg.epoch_summary(conn, Filters())
    for (task, dataset, metric, _), name in zip(TRIPLES, res.sheets[1:]):
        ws = wb[name]
        assert ws["A1"].value == f"{task} / {dataset} / {metric}"
        got = _section(ws, "Accuracy per epoch")
        want = epochs.query("task == @task and dataset == @dataset and metric == @metric").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-12)
        lb = _section(ws, "Leaderboard by final accuracy")
        want_lb, total = agg.leaderboard(conn, Filters(task=task, dataset=dataset, metric=metric), limit=50)
        assert lb["name"].tolist() == want_lb["name"].tolist() and len(lb) == min(50, total)
        runs = raw_runs(conn).query("dataset == @dataset and metric == @metric")
        assert lb["accuracy"].iloc[0] == runs.accuracy.max()
    cat = _section(wb["Overview"], "Task / dataset / metric")
    assert cat["runs"].sum() == len(raw_runs(conn))


def test_export_errors(zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(StatsError, match="Unknown export format 'txt'"):
        export(zoo, tmp_path / "x.txt")
    with pytest.raises(StatsError, match="Unknown table"):
        export(zoo, tmp_path / "x.csv", table="nope")
    with pytest.raises(NoData, match="list_catalog"):
        export(zoo, tmp_path / "x.csv", filters=Filters(dataset="svhn"))
    assert not (tmp_path / "x.csv").exists()


# --- CLI -----------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lemur-agent-server")
    add_stats_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_plot_and_export(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots" / "curves.png"
    assert _cli(["stats", "plot", "curves", "--zoo", str(zoo), "--dataset", "mnist", "--nn", "rag-m1",
                 "--nn", "alt-m2", "--width", "700", "--height", "450", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (700, 450)
    text = capsys.readouterr().out
    assert "rag-m1" in text and "700x450 px" in text
    assert _cli(["stats", "export", "--zoo", str(zoo), "--table", "leaderboard", "--task", "img-segmentation",
                 str(tmp_path / "lb.csv")]) == 0
    lb = pd.read_csv(tmp_path / "lb.csv")
    assert set(lb["task"]) == {"img-segmentation"} and lb["rank"].tolist() == list(range(1, len(lb) + 1))
    assert _cli(["stats", "plot", "box", "--zoo", str(zoo), "--nn", "nope", str(tmp_path / "x.png")]) == 2
    assert "Unknown model 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["stats", "plot", "pie", str(tmp_path / "x.png")])


def test_cli_in_a_subprocess_uses_lemur_zoo(zoo: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LEMUR_ZOO": str(zoo), "MPLBACKEND": "", "DISPLAY": ""}
    code = "import sys; from stats.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "pareto.png"
    done = subprocess.run([sys.executable, "-c", code, "stats", "plot", "pareto", "--dataset", "cifar-10", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Pareto" not in done.stderr and "cifar-10" in done.stdout
    assert Image.open(out).size == (1000, 600)
    xlsx = tmp_path / "r.xlsx"
    done = subprocess.run([sys.executable, "-c", code, "stats", "export", "--format", "xlsx", "--dataset", "mnist",
                           str(xlsx)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert load_workbook(xlsx).sheetnames == ["Overview", "mnist acc"]


def test_xlsx_report_drawn_by_worker_processes(zoo: Path, conn: sqlite3.Connection, tmp_path: Path) -> None:
    out = tmp_path / "pool.xlsx"
    res = export(zoo, out, filters=Filters(dataset="mnist"), workers=1)
    wb = load_workbook(out)
    assert res.sheets == wb.sheetnames == ["Overview", "mnist acc"] and res.images == 4 + 3
    for ws in wb.worksheets:
        for img in ws._images:
            assert_png(img._data(), 800, 480, ((0, 0, 800, 480),), min_coloured=0.0005)


def test_materialized_runs_give_the_same_answers(conn: sqlite3.Connection) -> None:
    from stats.scope import is_materialized, materialized_runs

    plain = agg.value_stats_many(conn, Filters(), ("accuracy", "duration_ns"))
    board = agg.leaderboard(conn, CIFAR, "accuracy_to_time", limit=5)
    with materialized_runs(conn, Filters()) as n:
        assert is_materialized() and n == len(raw_runs(conn).dropna(subset=["accuracy"]))
        fast = agg.value_stats_many(conn, Filters(), ("accuracy", "duration_ns"))
        fast_board = agg.leaderboard(conn, CIFAR, "accuracy_to_time", limit=5)
    assert not is_materialized()
    for col in plain:
        pd.testing.assert_frame_equal(fast[col], plain[col], check_dtype=False, rtol=1e-12)
    pd.testing.assert_frame_equal(fast_board[0], board[0])


def test_synthetic_zoo_is_shaped_like_lemur(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic_zoo", REPO / "bench" / "synthetic_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "syn.sqlite"
    summary = mod.build_synthetic_zoo(path, 3000, seed=1)
    assert summary["runs"] == 3000 and summary["models"] == 60
    assert mod.synthetic_zoo_info(path)["n_runs"] == 3000
    with pytest.raises(FileExistsError):
        mod.build_synthetic_zoo(path, 10, seed=1)
    c = sqlite3.connect(path)
    try:
        assert c.execute("SELECT COUNT(DISTINCT task), COUNT(DISTINCT dataset) FROM run").fetchone() == (4, 11)
        whole = "epoch = CAST(epoch AS INTEGER)"
        assert {r[0] for r in c.execute(f"SELECT DISTINCT epoch FROM point WHERE {whole}")} == {1, 2, 3, 4, 5}
        assert c.execute(f"SELECT COUNT(*) FROM point WHERE NOT {whole}").fetchone()[0] > 0
        assert c.execute("SELECT COUNT(*) FROM run WHERE error IS NOT NULL").fetchone()[0] > 0
        assert c.execute("SELECT COUNT(*) FROM model WHERE params IS NOT NULL AND flops IS NOT NULL").fetchone()[0] > 40
        # the denormalised run columns agree with the run's last point, as ZooStore writes them
        bad = c.execute("SELECT COUNT(*) FROM run r JOIN point p ON p.run_id = r.id AND p.epoch = r.epochs "
                        "WHERE p.accuracy <> r.accuracy OR p.duration_ns <> r.duration_ns").fetchone()[0]
        assert bad == 0
        assert [r[0] for r in c.execute("PRAGMA integrity_check")] == ["ok"]
    finally:
        c.close()
    assert "wikitext/ppl" in render("box", path).summary


def test_correlation_plot_is_within_one_triple_and_says_which_r_is_noise(zoo: Path,
                                                                         conn: sqlite3.Connection) -> None:
    res = render("correlation", zoo, Filters())
    triple = resolve_triple(conn, Filters())
    _, sampled, total = agg.correlation(conn, triple.narrow(Filters()))
    runs = raw_runs(conn).dropna(subset=["accuracy"])
    assert total == sampled == len(runs.query("task == @triple.task and dataset == @triple.dataset "
                                              "and metric == @triple.metric")) < len(runs)  # not pooled
    assert f"on {triple.label} over {sampled} of {total} runs" in res.summary and "most runs" in res.summary
    assert sampled >= 30 and "as noise" not in res.summary
    few = Filters(nn=("alt-m0", "rag-m5"))
    _, sampled_few, _ = agg.correlation(conn, resolve_triple(conn, few).narrow(few))
    assert 3 <= sampled_few < 30
    res_few = render("correlation", zoo, few)
    assert_png(res_few.png, 1000, 600, res_few.axes_px)  # its longer scope line is wrapped, not cut off
    summary = res_few.summary
    assert f"Only {sampled_few} runs: treat |r| below about {min(1.0, 2 / sampled_few ** 0.5):.2f} as noise." in summary


@pytest.mark.parametrize(("lo", "hi", "expect"), [
    (37e3, 78e3, ["40k", "50k", "60k", "70k"]),        # under half a decade: every minor tick named
    (1.65e6, 2.6e7, ["2M", "3M", "5M", "10M", "20M"]),  # about a decade: 2x, 3x, 5x and the decades
    (1e3, 1e9, ["10k", "1M", "100M"]),                 # many decades: decades only (some of them)
])
def test_log_count_axes_have_short_labels_that_fit(lo: float, hi: float, expect: list[str]) -> None:
    from matplotlib.figure import Figure

    from stats.figures import _log_counts

    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([lo, hi], [0, 1])
    _log_counts(ax, lo, hi)
    ax.set_xlim(lo, hi)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels()
              if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert set(expect) <= set(labels), labels
    assert not any("10^" in s or "$" in s for s in labels), labels
    boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels()
                    if t.get_text() and lo <= t.get_position()[0] <= hi), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), "tick labels overlap"


def test_crowded_minor_labels_are_thinned_not_dropped() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from stats.figures import _log_counts
    from stats.fit import TICK_GAP_PX, fit_figure

    fig = Figure(figsize=(1.8, 2), layout="constrained")  # every minor tick of 37k..78k named: too many
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([37e3, 78e3], [0, 1])
    _log_counts(ax, 37e3, 78e3)
    ax.set_xlim(37e3, 78e3)

    def shown() -> list[Any]:
        fig.canvas.draw()
        return sorted((t.get_window_extent() for t in ax.get_xticklabels(which="both")
                       if t.get_text() and 37e3 <= t.get_position()[0] <= 78e3), key=lambda b: b.x0)

    before = shown()
    assert any(a.x1 + TICK_GAP_PX > b.x0 for a, b in zip(before, before[1:])), "the case must start crowded"
    assert fit_figure(fig)
    after = shown()
    assert 2 <= len(after) < len(before)
    assert all(a.x1 + TICK_GAP_PX <= b.x0 for a, b in zip(after, after[1:]))


def test_names_of_crowded_front_points_do_not_overlap() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from stats.figures import _name_point
    from stats.fit import fit_figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_xlim(1e3, 1e9)
    ax.set_ylim(0, 1)
    for name, x, y in (("alt-nn1-00000ad4", 1.0e6, 0.880), ("rag-nn2-00000fa1", 1.3e6, 0.884),
                       ("ga-00003d53", 1.6e6, 0.887), ("small-far-left", 2e3, 0.30)):
        _name_point(ax, name, x, y, 1e3, 1e9)
    fig.canvas.draw()
    assert fit_figure(fig)
    fig.canvas.draw()
    shown = [t for t in ax.texts if t.get_visible()]
    assert {t.get_text() for t in shown} == {"ga-00003d53", "small-far-left"}  # the highest of the crowd stays
    boxes = [t.get_window_extent() for t in shown]
    assert not boxes[0].overlaps(boxes[1])
