"""One `fetch` (SQL, no matplotlib) and one `draw` (matplotlib, no SQL) per plot kind.

Why split: `stats.plots.render` runs `fetch` freely in any thread and only `draw` under the global
matplotlib lock, so slow queries never hold the lock. Every `draw` gets a fresh `Figure` (object API,
never pyplot) and returns a short text summary of what the picture shows, for the agent that may not
see images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import sqlite3
import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from sandbox.protocol import JobStatus, RunStatus
from sandbox.runner import calibrate as workload  # the reference workloads' constants (no torch)
from stats import aggregates as agg
from stats.fit import POINT_NAME_GID, SUBTITLE_GID
from stats.palette import DIVERGING_CMAP, GREY, REFERENCE, series
from stats.scope import Triple, check_models, describe, no_data, resolve_triple
from zoo.query import Filters


@dataclasses.dataclass(frozen=True)
class Options:
    width: int = 1000  # pixels
    height: int = 600  # pixels
    models: tuple[str, ...] = ()  # learning curves: these models (else the top `limit`)
    limit: int = 5  # learning curves: models drawn when `models` is empty
    cap: int = agg.SCATTER_CAP  # scatters: most points drawn


def _n(x: float) -> str:
    return f"{int(x):,}"


def _acc_label(metric: str) -> str:
    return f"Accuracy ({metric}, fraction; higher is better)"


def _seconds(v: float, _pos: Any = None) -> str:
    if v >= 1:
        return f"{v:,.0f}"
    return f"{v:g}"


def _log_seconds(ax: Any, axis: str = "x", label: str = "Training time (s, log scale)") -> None:
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10))
    target.set_major_formatter(FuncFormatter(_seconds))
    getattr(ax, f"set_{axis}label")(label)


def _si(v: float, _pos: Any = None) -> str:
    """A count as people say it: 37k, 1.9M, 2G."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def _decades(lo: float, hi: float) -> float:
    """How many powers of ten a positive range spans (a hair above 0 for a single value)."""
    return math.log10(max(hi, lo * 1.0001) / max(lo, 1e-12))


def _log_counts(ax: Any, lo: float, hi: float) -> None:
    """A log x axis of counts with short labels. Over a narrow range the decade ticks alone leave one
    label or none, so minor ticks are labelled too: all of them under half a decade, the 2x, 3x and 5x
    ones under 1.5 decades, none beyond (matplotlib's own 10^x minor labels collided on a 4-model zoo)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_si))
    decades = _decades(lo, hi)
    if decades >= 1.5:
        ax.xaxis.set_minor_formatter(NullFormatter())
        return
    wanted = range(2, 10) if decades < 0.5 else (2, 3, 5)
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _pos: _si(v) if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in wanted else ""))


def _name_point(ax: Any, name: str, x: float, y: float, lo: float, hi: float) -> None:
    """A label beside a point of a log-x axis, on the side with room (left-edge labels ran off the axes)."""
    left_half = math.log10(x / lo) < 0.5 * _decades(lo, hi)
    ax.annotate(_short(name, 24), (x, y), xytext=(6, 6) if left_half else (-6, 6), textcoords="offset points",
                ha="left" if left_half else "right", fontsize=8, gid=POINT_NAME_GID)


def _scope_note(f: Filters, triple: Triple | None = None) -> str:
    parts = []
    if triple is not None:
        parts.append(triple.label + (" (the one with most runs)" if triple.chosen else ""))
    parts.append("final point of each run" if f.epoch is None else f"points at epoch {f.epoch:g}")
    extra = describe(dataclasses.replace(f, task=None, dataset=None, metric=None, epoch=None))
    if extra != "no filters":
        parts.append(extra)
    return " · ".join(parts)


def _subtitle(fig: Figure, ax: Any, text: str) -> None:
    """The scope line under the figure title: left-aligned on the axes and wrapped to the figure
    (`stats.fit` wraps it tighter once the layout has placed the axes)."""
    chars = max(40, int((fig.get_figwidth() * fig.dpi - 80) / 6.3))
    ax.set_title(textwrap.fill(text, chars), loc="left", fontsize=9, color="#333333", gid=SUBTITLE_GID)


def _chosen_hint(triple: Triple) -> str:
    return (" It is the task/dataset/metric with the most runs matching the filters; pass task, dataset and "
            "metric to choose another." if triple.chosen else "")


def _marker(n: int) -> tuple[float, float]:
    """Scatter marker area and alpha: big and solid for a few points, small and translucent for thousands."""
    if n <= 300:
        return 28.0, 0.85
    if n <= 1500:
        return 14.0, 0.6
    return 7.0, 0.45


def _short(name: str, n: int = 30) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _legend_outside(ax: Any, **kw: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, **kw)


# --- curves --------------------------------------------------------------------------------------
def fetch_curves(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    check_models(conn, o.models)
    base = dataclasses.replace(f, nn=o.models or f.nn, epoch=None)
    triple = resolve_triple(conn, base)
    return {"f": base, "triple": triple, "models": o.models,
            "points": agg.learning_curves(conn, base, triple, o.models, o.limit)}


def draw_curves(fig: Figure, d: dict[str, Any]) -> str:
    ax = fig.add_subplot()
    pts: pd.DataFrame = d["points"]
    lines = []
    for i, (name, g) in enumerate(pts.groupby("name", sort=False)):
        c = series(i)
        ax.plot(g["epoch"], g["accuracy"], color=c, label=f"{_short(name)}  (final {g['final'].iloc[0]:.3f})")
        whole = g["epoch"] % 1 == 0
        ax.plot(g["epoch"][whole], g["accuracy"][whole], "o", color=c)
        ax.plot(g["epoch"][~whole], g["accuracy"][~whole], "o", mfc="white", mec=c, mew=1.5)
        best = g.loc[g["accuracy"].idxmax()]
        lines.append(f"{name} peaks at {best['accuracy']:.3f} (epoch {best['epoch']:g}, {len(g)} points"
                     f"{', half epochs' if (~whole).any() else ''})")
    handles, labels = ax.get_legend_handles_labels()
    if (pts["epoch"] % 1 != 0).any():
        handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec=GREY))
        labels.append("half-epoch point")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="Model (best run)")
    ax.set_xlabel("Epoch")
    ax.set_ylabel(_acc_label(d["triple"].metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    note = _scope_note(dataclasses.replace(d["f"], nn=()), d["triple"])  # the legend names the models
    _subtitle(fig, ax, note.replace("final point of each run", "best run of each model"))
    fig.suptitle("Learning curves")
    which = "the named models" if d["models"] else f"the top {pts['name'].nunique()} models by final accuracy"
    return (f"Learning curves on {d['triple'].label} of the best run of {which}: " + "; ".join(lines) + "."
            + _chosen_hint(d["triple"]))


# --- mean ± std per epoch ------------------------------------------------------------------------
def fetch_mean_std(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    base = dataclasses.replace(f, epoch=None)
    triple = resolve_triple(conn, base)
    return {"f": base, "triple": triple, "summary": agg.epoch_summary(conn, triple.narrow(base))}


def draw_mean_std(fig: Figure, d: dict[str, Any]) -> str:
    s: pd.DataFrame = d["summary"]
    ax, bx = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    # whole epochs are lines; half epochs (only the evaluator records them, so fewer and different runs)
    # are hollow markers, so that the two populations do not zig-zag into one line
    whole, half = s[s["epoch"] % 1 == 0], s[s["epoch"] % 1 != 0]
    std = whole["std"].fillna(0)
    ax.fill_between(whole["epoch"], whole["mean"] - std, whole["mean"] + std, color=series(0), alpha=0.2, lw=0,
                    label="mean ± 1 std")
    for col, style, i in (("mean", "o-", 0), ("median", "s--", 1), ("best", "^:", 2)):
        ax.plot(whole["epoch"], whole[col], style, color=series(i), label=col)
        if len(half):
            ax.plot(half["epoch"], half[col], style[0], color=series(i), mfc="white", mew=1.3)
    ax.set_ylabel(_acc_label(d["triple"].metric))
    handles, labels = ax.get_legend_handles_labels()
    if len(half):
        handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec=GREY))
        labels.append("half epoch\n(evaluator runs only)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    bx.bar(s["epoch"], s["n"], width=0.35, color=[GREY if e % 1 == 0 else "#BBBBBB" for e in s["epoch"]])
    bx.set_ylabel("Points")
    bx.set_xlabel("Epoch")
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    _subtitle(fig, ax, _scope_note(d["f"], d["triple"]).replace("final point of each run", "every curve point"))
    fig.suptitle("Accuracy per epoch: mean ± std, median and best")
    first, last = (whole if len(whole) else s).iloc[[0, -1]].itertuples()
    return (f"Accuracy per epoch on {d['triple'].label} over {_n(s['n'].sum())} curve points: at epoch "
            f"{first.epoch:g} mean {first.mean:.3f} ± {first.std:.3f}, median {first.median:.3f}, best "
            f"{first.best:.3f} (n={_n(first.n)}); at epoch {last.epoch:g} mean {last.mean:.3f} ± {last.std:.3f}, "
            f"median {last.median:.3f}, best {last.best:.3f} (n={_n(last.n)})."
            + (f" {len(half)} half epochs drawn hollow." if len(half) else "") + _chosen_hint(d["triple"]))


# --- accuracy vs training time -------------------------------------------------------------------
def fetch_accuracy_vs_time(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    triple = resolve_triple(conn, f)
    return {"f": f, "triple": triple, "data": agg.accuracy_vs_time(conn, f, triple, o.cap)}


def epochs_reached(epochs: Any) -> Any:
    """Each run's epochs reached, down to half epochs (0 below one half), 6 for 6 and more."""
    return (np.floor(np.asarray(epochs, dtype=float) * 2 + 1e-9) / 2).clip(max=6)


def draw_accuracy_vs_time(fig: Figure, d: dict[str, Any]) -> str:
    data: agg.ScatterData = d["data"]
    ax = fig.add_subplot()
    s = data.sample
    groups = epochs_reached(s["epoch"])  # a run that stopped at 0.5 says 0.5, not 1
    size, alpha = _marker(len(s))
    for i, e in enumerate(sorted(np.unique(groups))):
        m = groups == e
        label = "<0.5" if e == 0 else f"{e:g}" if e < 6 else "6+"
        ax.scatter(s["duration_ns"][m] / 1e9, s["accuracy"][m], s=size, alpha=alpha, lw=0, color=series(i),
                   label=label)
    fr = data.front
    ax.step(fr["duration_ns"] / 1e9, fr["accuracy"], where="post", color=REFERENCE, lw=1.4,
            label=f"Pareto front\n(all {_n(data.total)} runs)")
    ax.plot(fr["duration_ns"] / 1e9, fr["accuracy"], "D", color=REFERENCE, ms=4)
    _log_seconds(ax)
    ax.set_ylabel(_acc_label(d["triple"].metric))
    _legend_outside(ax, title="Epochs reached", markerscale=max(1.0, 5 / size ** 0.5))
    drawn = f"{_n(len(s))} of {_n(data.total)} runs drawn" + (f" (1 in {data.every}, deterministic)"
                                                            if data.every > 1 else "")
    _subtitle(fig, ax, _scope_note(d["f"], d["triple"]) + " · " + drawn)
    fig.suptitle("Accuracy vs training time")
    best = fr.iloc[-1]
    fastest = fr.iloc[0]
    med_t = float(np.median(s["duration_ns"])) / 1e9
    return (f"Accuracy vs training time on {d['triple'].label}: {drawn}. Median training time {med_t:,.0f} s. "
            f"The front has {len(fr)} runs, from {fastest['accuracy']:.3f} in {fastest['duration_ns'] / 1e9:,.1f} s "
            f"to the best {best['accuracy']:.3f} in {best['duration_ns'] / 1e9:,.0f} s." + _chosen_hint(d["triple"]))


# --- accuracy vs params / FLOPs (Pareto) ---------------------------------------------------------
def fetch_pareto(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    triple = resolve_triple(conn, f)
    models = agg.model_best(conn, f, triple)
    return {"f": f, "triple": triple, "models": models, "cap": o.cap}


PARETO_NAMED = 3  # front points named on the plot, most accurate first (more overlap on dense fronts)


def draw_pareto(fig: Figure, d: dict[str, Any]) -> str:
    m: pd.DataFrame = d["models"]
    axes = fig.subplots(1, 2, sharey=True)
    notes = []
    for ax, col, label in ((axes[0], "params", "Parameters (count, log scale)"),
                           (axes[1], "flops", "FLOPs per forward pass (log scale)")):
        have = m[m[col].notna() & (m[col] > 0)]
        if have.empty:
            ax.text(0.5, 0.5, f"no model has {col} measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(label)
            continue
        mask = agg.pareto_mask(have[col].to_numpy(float), have["accuracy"].to_numpy(float))
        every = max(1, int(np.ceil(len(have) / d["cap"])))
        shown = have.iloc[::every]
        size, alpha = _marker(len(shown))
        ax.scatter(shown[col], shown["accuracy"], s=size, alpha=alpha, lw=0, color=series(0))
        front = have[mask].sort_values(col)
        ax.step(front[col], front["accuracy"], where="post", color=REFERENCE, lw=1.4)
        ax.plot(front[col], front["accuracy"], "D", color=series(3), ms=5)
        lo, hi = float(have[col].min()), float(have[col].max())
        for _, point in front.tail(PARETO_NAMED).iterrows():  # the most accurate end of the front, named
            _name_point(ax, point["name"], float(point[col]), float(point["accuracy"]), lo, hi)
        _log_counts(ax, lo, hi)
        drawn = f"{_n(len(shown))} of {_n(len(have))} drawn" if every > 1 else f"{_n(len(have))} models"
        ax.set_xlabel(f"{label}\n{drawn} · {len(front)} on the front")
        names = ", ".join(f"{r['name']} ({r['accuracy']:.3f} @ {r[col]:.3g})" for _, r in front.tail(5).iterrows())
        notes.append(f"{col}: {len(front)} models on the front of {_n(len(have))}; most accurate: {names}")
    axes[0].set_ylabel(_acc_label(d["triple"].metric) + "\nbest run per model")
    handles = [Line2D([], [], marker="o", ls="", color=series(0), alpha=0.6, label="model (best run)"),
               Line2D([], [], marker="D", color=REFERENCE, mfc=series(3), mec=series(3), label="Pareto front")]
    _legend_outside(axes[1], handles=handles)
    fig.suptitle("Accuracy vs model size: Pareto front")
    _subtitle(fig, axes[0], _scope_note(d["f"], d["triple"]))
    return (f"Best accuracy per model on {d['triple'].label} against parameters and FLOPs ({_n(len(m))} models). "
            + ". ".join(notes) + "." + _chosen_hint(d["triple"]))


# --- box plots per dataset -----------------------------------------------------------------------
def _boxes(ax: Any, stats: pd.DataFrame, scale: float = 1.0) -> list[Patch]:
    tasks = sorted(set(stats["task"]))
    colour = {t: series(i) for i, t in enumerate(tasks)}
    bxp = [{"label": f"{r.dataset} · {r.metric}\n(n={_n(r.n)})", "med": r.median / scale, "q1": r.q1 / scale,
            "q3": r.q3 / scale, "whislo": r.p5 / scale, "whishi": r.p95 / scale, "mean": r.mean / scale,
            "fliers": []} for r in stats.itertuples()]
    art = ax.bxp(bxp, orientation="horizontal", patch_artist=True, showmeans=True, widths=0.6,
                 meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": REFERENCE, "markersize": 4},
                 medianprops={"color": REFERENCE, "lw": 1.5})
    for patch, t in zip(art["boxes"], stats["task"]):
        patch.set_facecolor(colour[t])
        patch.set_alpha(0.75)
    ax.invert_yaxis()
    return [Patch(color=colour[t], alpha=0.75, label=t) for t in tasks]


def fetch_box(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    return {"f": f, "stats": agg.value_stats(conn, f, "accuracy").sort_values("median", ascending=False)}


def draw_box(fig: Figure, d: dict[str, Any]) -> str:
    st: pd.DataFrame = d["stats"]
    ax = fig.add_subplot()
    handles = _boxes(ax, st)
    ax.set_xlabel("Accuracy (fraction, metric per row; higher is better)")
    _legend_outside(ax, handles=handles + [Line2D([], [], marker="D", ls="", mfc="white", mec=REFERENCE,
                                                   label="mean")], title="Task")
    _subtitle(fig, ax, _scope_note(d["f"]) + " · box: quartiles, whiskers: 5th–95th percentile, ◇ mean")
    fig.suptitle("Accuracy per dataset")
    parts = [f"{r.dataset}/{r.metric} median {r.median:.3f} (IQR {r.q1:.3f}–{r.q3:.3f}, n={_n(r.n)})"
             for r in st.head(12).itertuples()]
    return f"Accuracy distribution per task/dataset/metric ({_n(st['n'].sum())} runs): " + "; ".join(parts) + "."


# --- histogram of accuracies ---------------------------------------------------------------------
def fetch_histogram(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    triple = resolve_triple(conn, f)
    return {"f": f, "triple": triple, "hist": agg.accuracy_histogram(conn, f, triple)}


def _binned_median(h: pd.DataFrame) -> float:
    """The median interpolated inside its bin (exact up to the bin width)."""
    cdf = h["count"].cumsum().to_numpy() / h["count"].sum()
    i = int(np.searchsorted(cdf, 0.5))
    before = cdf[i - 1] if i else 0.0
    frac = (0.5 - before) / (cdf[i] - before) if cdf[i] > before else 0.5
    return float(h["left"].iat[i] + frac * (h["right"].iat[i] - h["left"].iat[i]))


def draw_histogram(fig: Figure, d: dict[str, Any]) -> str:
    hist = d["hist"]
    h: pd.DataFrame = hist["bins"]
    ax = fig.add_subplot()
    ax.bar(h["left"], h["count"], width=h["right"] - h["left"], align="edge", color=series(0), alpha=0.85,
           edgecolor="white", lw=0.5, label="runs")
    median = _binned_median(h)
    ax.axvline(hist["mean"], color=series(1), ls="--", lw=1.6, label=f"mean {hist['mean']:.3f}")
    ax.axvline(median, color=series(2), ls="-.", lw=1.6, label=f"median ≈ {median:.3f}")
    ax.axvline(hist["max"], color=series(3), ls=":", lw=1.8, label=f"best {hist['max']:.3f}")
    ax.set_xlabel(_acc_label(d["triple"].metric))
    ax.set_ylabel("Runs per bin")
    ax.legend(loc="best", frameon=True, framealpha=0.85)
    width = float(h["right"].iat[0] - h["left"].iat[0])
    _subtitle(fig, ax, _scope_note(d["f"], d["triple"]) + f" · {_n(hist['n'])} runs, {len(h)} bins of {width:.3g}")
    fig.suptitle("Distribution of accuracy")
    peak = h.loc[h["count"].idxmax()]
    return (f"Histogram of {_n(hist['n'])} accuracies on {d['triple'].label}: range {hist['min']:.3f}–"
            f"{hist['max']:.3f}, mean {hist['mean']:.3f}, median ≈ {median:.3f}; the fullest bin "
            f"{peak['left']:.3f}–{peak['right']:.3f} holds {_n(peak['count'])} runs." + _chosen_hint(d["triple"]))


# --- durations -----------------------------------------------------------------------------------
def fetch_durations(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    return {"f": f, "stats": agg.value_stats(conn, f, "duration_ns").sort_values("median", ascending=False)}


def draw_durations(fig: Figure, d: dict[str, Any]) -> str:
    st: pd.DataFrame = d["stats"]
    ax = fig.add_subplot()
    handles = _boxes(ax, st, scale=1e9)
    _log_seconds(ax, "x", "Training time to the run's last point (s, log scale)")
    _legend_outside(ax, handles=handles, title="Task")
    _subtitle(fig, ax, _scope_note(d["f"]) + " · box: quartiles, whiskers: 5th–95th percentile, ◇ mean")
    fig.suptitle("Training time per dataset")
    parts = [f"{r.dataset}/{r.metric} median {r.median / 1e9:,.0f} s (p95 {r.p95 / 1e9:,.0f} s)"
             for r in st.head(12).itertuples()]
    return f"Training time per task/dataset/metric ({_n(st['n'].sum())} runs): " + "; ".join(parts) + "."


# --- failures ------------------------------------------------------------------------------------
def fetch_failures(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    return {**check_failures(f, agg.failures(conn, f)), "jobs": agg.job_outcomes(conn, f)}


def check_failures(f: Filters, fl: dict[str, Any]) -> dict[str, Any]:
    if not fl["evaluator_runs"]:
        raise no_data(f, "evaluator runs (only imported LEMUR records)")
    return {"f": f, "failures": fl}


STATUS_COLOURS = {RunStatus.SUCCEEDED: series(2), RunStatus.PRUNED: series(5), RunStatus.FAILED: series(4),
                  RunStatus.TIMED_OUT: series(3)}


def draw_failures(fig: Figure, d: dict[str, Any]) -> str:
    fl = d["failures"]
    r: pd.DataFrame = fl["reasons"].head(15)
    top, ax = fig.subplots(2, 1, height_ratios=[1, 6])
    # every submission by status, as one stacked bar of shares
    left = 0.0
    for x in fl["by_status"].itertuples():
        top.barh(0, x.share, left=left, color=STATUS_COLOURS.get(x.status, GREY), label=x.status)
        if x.share > 0.04:
            top.text(left + x.share / 2, 0, f"{x.share:.0%}", ha="center", va="center", fontsize=8, color="white")
        left += x.share
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.15), frameon=False, ncols=2, fontsize=8,
               title="Status", handlelength=1)
    top.set_xlim(0, 1)
    top.set_yticks([])
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
    top.grid(False)
    top.set_xlabel("Share of evaluator runs (one per trial) by status", fontsize=8)
    share = fl["failed_share"] or 0.0
    _subtitle(fig, top, _scope_note(d["f"]).replace("final point of each run", "evaluator runs, one per trial")
              + f" · {_n(fl['failed'])} of {_n(fl['evaluator_runs'])} failed ({share:.1%})" + _jobs_note(d.get("jobs")))
    if r.empty:
        ax.text(0.5, 0.5, f"No failed or timed-out runs among {_n(fl['evaluator_runs'])} evaluator runs.", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = np.arange(len(r))
        ax.barh(y, r["runs"], color=[STATUS_COLOURS.get(s, GREY) for s in r["status"]])
        for yi, x in zip(y, r.itertuples()):
            ax.text(x.runs, yi, f"  {x.share:.1%}", va="center", fontsize=8)
        ax.set_yticks(y, [f"{x.stage}: {_short(str(x.kind), 28)}" for x in r.itertuples()])
        ax.invert_yaxis()
        ax.set_xlabel("Failed runs (count); label: share of all evaluator runs")
        ax.set_xlim(0, float(r["runs"].max()) * 1.15)
        ax.grid(axis="y", visible=False)
    fig.suptitle("Why evaluator runs failed (stage: kind)")
    status_txt = ", ".join(f"{s.status} {_n(s.runs)} ({s.share:.1%})" for s in fl["by_status"].itertuples())
    reasons = "; ".join(f"{x.stage}/{x.kind} {_n(x.runs)} ({x.share:.1%}), e.g. {x.example!r}"
                        for x in fl["reasons"].head(3).itertuples())
    return (f"{_n(fl['failed'])} of {_n(fl['evaluator_runs'])} evaluator runs (one per trial) failed ({share:.1%}); "
            f"statuses: {status_txt}. Top reasons: {reasons or 'none'}." + _jobs_text(d.get("jobs")))


def _jobs_note(jobs: dict[str, Any] | None) -> str:
    if not jobs or not jobs["jobs"]:
        return ""
    ok = int(jobs["by_status"].loc[jobs["by_status"]["status"] == JobStatus.SUCCEEDED, "jobs"].sum())
    return f" · submissions: {_n(ok)} of {_n(jobs['jobs'])} succeeded"


def _job_reason(x: Any) -> str:
    if pd.isna(x.example) and x.status == JobStatus.TIMED_OUT:  # the budget stopped a search that had trials to keep
        return f"timed_out {_n(x.jobs)} without an error (the budget ended the search; finished trials were kept)"
    if pd.isna(x.example):
        return f"{x.status} {_n(x.jobs)} without an error"
    return f"{x.status} at {x.stage}/{x.kind} {_n(x.jobs)}, e.g. {_short(str(x.example), 80)!r}"


def _jobs_text(jobs: dict[str, Any] | None) -> str:
    """The submissions' own outcomes, after the per-run figures: a job stopped by its budget after good
    trials is one timed_out submission next to succeeded runs."""
    if not jobs or not jobs["jobs"]:
        return " No submission jobs are recorded in this zoo for these filters (imported or synthetic runs)."
    status = ", ".join(f"{s.status} {_n(s.jobs)} ({s.share:.1%})" for s in jobs["by_status"].itertuples())
    why = "; ".join(_job_reason(x) for x in jobs["reasons"].head(3).itertuples())
    return f" Submissions (jobs): {_n(jobs['jobs'])} finished: {status}." + (f" Not succeeded: {why}." if why else "")


# --- correlation heatmap -------------------------------------------------------------------------
def fetch_correlation(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    """Within one task/dataset/metric, as the other single-triple views: pooled over datasets, the
    correlations would mostly say which dataset is easier and slower (fashion-mnist trains longer and
    scores higher than digits), not how accuracy moves with cost or hyperparameters."""
    triple = resolve_triple(conn, f)
    g = triple.narrow(f)
    corr, sampled, total = agg.correlation(conn, g)
    if corr.shape[0] < 2:
        raise no_data(g, "runs with two or more varying quantities")
    return {"f": f, "triple": triple, "corr": corr, "sampled": sampled, "total": total}


FEW_RUNS_FOR_CORRELATION = 30  # below this the summary says which |r| could be chance


def draw_correlation(fig: Figure, d: dict[str, Any]) -> str:
    c: pd.DataFrame = d["corr"]
    ax = fig.add_subplot()
    im = ax.imshow(c.to_numpy(float), cmap=DIVERGING_CMAP, vmin=-1, vmax=1, aspect="auto")  # fill the width
    k = len(c)
    ax.set_xticks(range(k), c.columns, rotation=35, ha="right")
    ax.set_yticks(range(k), c.index)
    ax.grid(False)
    for i in range(k):
        for j in range(k):
            v = c.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{0.0 if abs(v) < 0.005 else v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Pearson r", shrink=0.9)
    sample = f"{_n(d['sampled'])} of {_n(d['total'])} runs" + (" (deterministic sample)"
                                                              if d["sampled"] < d["total"] else "")
    few = d["sampled"] < FEW_RUNS_FOR_CORRELATION
    # |r| above ~2/sqrt(n) is what a test at the 5 % level needs: say so, so that a tiny zoo's +1.00 does
    # not read as a law
    noise = min(1.0, 2 / math.sqrt(d["sampled"]))
    _subtitle(fig, ax, _scope_note(d["f"], d["triple"]) + " · " + sample
              + (f" · few runs: |r| < {noise:.2f} may be chance" if few else ""))
    fig.suptitle("Correlations between accuracy, cost and hyperparameters")
    pairs = [(abs(c.iat[i, j]), c.index[i], c.columns[j], c.iat[i, j]) for i in range(k) for j in range(i)
             if np.isfinite(c.iat[i, j])]
    acc = c["accuracy"].drop("accuracy").dropna().sort_values(key=abs, ascending=False) if "accuracy" in c else None
    acc_txt = ", ".join(f"{n} {v:+.2f}" for n, v in acc.head(4).items()) if acc is not None else "n/a"
    strongest = ", ".join(f"{a}~{b} {v:+.2f}" for _, a, b, v in sorted(pairs, reverse=True)[:3])
    caution = f" Only {d['sampled']} runs: treat |r| below about {noise:.2f} as noise." if few else ""
    return (f"Pearson correlations on {d['triple'].label} over {sample}. With accuracy: {acc_txt}. "
            f"Strongest pairs: {strongest}." + caution + _chosen_hint(d["triple"]))


# --- timeline (rolling mean) ---------------------------------------------------------------------
def fetch_timeline(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    triple = resolve_triple(conn, f)
    return {"f": f, "triple": triple, "tl": agg.timeline(conn, f, triple)}


def draw_timeline(fig: Figure, d: dict[str, Any]) -> str:
    tl: pd.DataFrame = d["tl"]
    when = [dt.datetime.fromtimestamp(t, dt.UTC) for t in tl["start"]]
    ax, bx = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot(when, tl["mean"], color=series(0), alpha=0.35, lw=1, label="mean per bin")
    ax.plot(when, tl["rolling_mean"], color=series(0), lw=2.2, label="rolling mean (5 bins)")
    ax.step(when, tl["best_so_far"], where="post", color=series(2), lw=1.8, label="best so far")
    ax.set_ylabel(_acc_label(d["triple"].metric))
    _legend_outside(ax)
    width = (when[1] - when[0]) * 0.9 if len(when) > 1 else dt.timedelta(days=1)
    bx.bar(when, tl["runs"], width=width, align="edge", color=GREY)
    bx.set_ylabel("Runs")
    bx.set_xlabel("Run created (UTC)")
    fig.autofmt_xdate()
    _subtitle(fig, ax, _scope_note(d["f"], d["triple"]))
    fig.suptitle("Accuracy over time: rolling mean and best so far")
    return (f"Final accuracy on {d['triple'].label} by creation time, {len(tl)} bins from {when[0]:%Y-%m-%d} to "
            f"{when[-1]:%Y-%m-%d} ({_n(tl['runs'].sum())} runs): rolling mean {tl['rolling_mean'].iloc[0]:.3f} → "
            f"{tl['rolling_mean'].iloc[-1]:.3f}, best so far {tl['best_so_far'].iloc[-1]:.3f}."
            + _chosen_hint(d["triple"]))


# --- device calibration ---------------------------------------------------------------------------
def fetch_calibration(conn: sqlite3.Connection, f: Filters, o: Options) -> dict[str, Any]:
    """Each calibrated device's speed curve (lemur_agent_server.evaluator.calibration), and per model that
    trained on two or more of them its mean raw and normalized training time on each; without any
    calibration, the devices the runs name, so the picture says what is there to calibrate."""
    cal = agg._frame(conn, "SELECT id, device_kind, device_name, threads, median_ns, spread, times_ns, factor, "
                           "curve FROM device_calibration WHERE status = 'ok' ORDER BY created, id")
    clauses, args = ["r.duration_norm_ns IS NOT NULL", "r.status = 'succeeded'"], []
    for column, value in (("task", f.task), ("dataset", f.dataset), ("metric", f.metric)):
        if value is not None:
            clauses.append(f"r.{column} = ?")
            args.append(value)
    if f.nn:
        clauses.append(f"m.name IN ({','.join('?' * len(f.nn))})")
        args.extend(f.nn)
    runs = agg._frame(conn, (
        "SELECT m.name, r.dataset, r.epochs, r.calibration_id, COUNT(*) AS runs, AVG(r.duration_ns) AS raw_ns, "
        "AVG(r.duration_norm_ns) AS norm_ns FROM run r JOIN model m ON m.id = r.model_id "
        f"WHERE {' AND '.join(clauses)} GROUP BY m.name, r.dataset, r.epochs, r.calibration_id"), args)
    if len(runs):
        devices = runs.groupby(["name", "dataset", "epochs"])["calibration_id"].transform("nunique")
        runs = runs[devices >= 2]
    seen = None if len(cal) else agg._frame(conn, (
        "SELECT COALESCE(device, 'not recorded (imported)') AS device, COUNT(*) AS runs, AVG(duration_ns) AS mean_ns "
        "FROM run WHERE duration_ns IS NOT NULL GROUP BY 1 ORDER BY runs DESC"))
    if seen is not None and seen.empty:
        raise no_data(f, "device calibrations or timed runs")
    return {"f": f, "cal": cal, "runs": runs, "seen": seen}


def _device_label(row: Any) -> str:
    threads = f" · {int(row.threads)} thread{'s' if row.threads != 1 else ''}" if row.device_kind == "cpu" else ""
    return f"{_short(str(row.device_name), 34)}{threads}"


def _curve(row: Any) -> list[dict[str, Any]]:
    """A device's curve (one entry per reference workload); a row of workload version 1 has none."""
    return json.loads(row.curve) if isinstance(row.curve, str) else []


def _draw_calibrations(ax: Any, cal: pd.DataFrame) -> list[str]:
    """Each device's factor (speed-up over the reference device) against the work per step of the reference
    workloads; a version-1 row (one workload) is one marker. Returns one summary line per device."""
    notes = []
    for i, row in enumerate(cal.itertuples()):
        curve = _curve(row)
        label = _device_label(row)
        if curve:
            work = np.array([c["work"] for c in curve], float) / 1e6
            factor = np.array([c["factor"] for c in curve], float)
            spread = np.array([c["spread"] for c in curve], float)
            ax.errorbar(work, factor, yerr=factor * spread / 2, color=series(i), marker="o", ms=5, lw=1.6,
                        capsize=3, label=label)
            notes.append(f"{label}: factor " + ", ".join(f"×{f:.2f} at {w:,.0f}" for w, f in zip(work, factor))
                         + f" MFLOP per step (spread {spread.min():.1%}–{spread.max():.1%}), median "
                         f"{row.median_ns / 1e6:,.1f} ms per anchor block")
        else:
            ax.plot([workload.POINTS[workload.ANCHOR].work / 1e6], [row.factor], marker="*", ms=11, ls="",
                    color=series(i), label=f"{label} (one workload)")
            notes.append(f"{label}: one workload (version 1), median {row.median_ns / 1e6:,.1f} ms per block, "
                         f"spread {row.spread:.1%}, factor {row.factor:.3f}")
    ax.axhline(1.0, color=REFERENCE, ls="--", lw=1.4, label="reference device (×1 at every size)")
    ax.set_xscale("log")
    ax.set_xlabel("Work per step (MFLOP: FLOPs of one sample × batch)")
    ax.set_ylabel("Speed-up over the reference device (factor)")
    ax.legend(loc="best", frameon=True, framealpha=0.85, fontsize=8)
    return notes


def _draw_agreement(ax: Any, runs: pd.DataFrame, cal: pd.DataFrame) -> list[str]:
    models = list(dict.fromkeys(zip(runs["name"], runs["dataset"], runs["epochs"])))[:6]
    devices = list(dict.fromkeys(runs["calibration_id"]))
    width = 0.8 / max(1, len(devices))
    labels = {int(r.id): _device_label(r) for r in cal.itertuples()}
    colour = {d: series(list(cal["id"]).index(d)) if d in set(cal["id"]) else GREY for d in devices}
    lines = []
    for j, key in enumerate(models):
        g = runs[(runs["name"] == key[0]) & (runs["dataset"] == key[1]) & (runs["epochs"] == key[2])]
        for i, d in enumerate(devices):
            row = g[g["calibration_id"] == d]
            if row.empty:
                continue
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(x, row["raw_ns"].iloc[0] / 1e9, width * 0.9, fill=False, edgecolor=colour[d], lw=1.2)
            ax.bar(x, row["norm_ns"].iloc[0] / 1e9, width * 0.55, color=colour[d], alpha=0.9)
        norm = g["norm_ns"].to_numpy(float)
        gap = (norm.max() - norm.min()) / norm.mean()
        lines.append(f"{key[0]} on {key[1]} ({key[2]:g} epochs): normalized "
                     + " vs ".join(f"{v / 1e9:,.2f} s" for v in norm) + f" (gap {gap:.1%}), raw "
                     + " vs ".join(f"{v / 1e9:,.2f} s" for v in g["raw_ns"]))
    ax.set_xticks(range(len(models)), [_short(m[0], 18) for m in models])
    ax.set_ylabel("Training time (s)")
    handles = [Patch(color=colour[d], label=_short(labels.get(int(d), f"calibration {d}"), 28)) for d in devices]
    handles += [Patch(fill=False, edgecolor=GREY, label="measured (outline)"),
                Patch(color=GREY, label="on the reference device")]
    _legend_outside(ax, handles=handles, fontsize=8)
    return lines


def draw_calibration(fig: Figure, d: dict[str, Any]) -> str:
    cal: pd.DataFrame = d["cal"]
    if d["seen"] is not None:
        ax = fig.add_subplot()
        seen: pd.DataFrame = d["seen"]
        ax.barh(np.arange(len(seen)), seen["runs"], color=[series(i) for i in range(len(seen))])
        ax.set_yticks(np.arange(len(seen)), [_short(str(s), 30) for s in seen["device"]])
        ax.invert_yaxis()
        ax.set_xlabel("Runs with a training time")
        fig.suptitle("Devices seen (none calibrated yet)")
        _subtitle(fig, ax, "a device is calibrated when a worker of the server is idle, after its first job")
        parts = ", ".join(f"{r.device}: {_n(r.runs)} runs, mean {r.mean_ns / 1e9:,.1f} s" for r in seen.itertuples())
        return (f"No device calibration in this zoo yet, so no run has a normalized duration; the runs name these "
                f"devices: {parts}. Start a server with workers: it calibrates its device when idle.")
    runs: pd.DataFrame = d["runs"]
    if runs.empty:
        ax = fig.add_subplot()
        notes = _draw_calibrations(ax, cal)
        agree = "No model has calibrated runs on two devices yet, so there is nothing to compare."
    else:
        ax, bx = fig.subplots(1, 2, width_ratios=[1, 1.3])
        notes = _draw_calibrations(ax, cal)
        bx.set_title("Same model, two devices", fontsize=10)
        agree = "Same model on several devices: " + "; ".join(_draw_agreement(bx, runs, cal)) + "."
    fig.suptitle("Device calibration: each device's speed over the reference workloads")
    _subtitle(fig, ax, f"{len(cal)} device{'s' if len(cal) != 1 else ''} · normalized = measured × "
              "factor(work/step)")
    return f"Device calibration of {len(cal)} devices: " + "; ".join(notes) + ". " + agree
