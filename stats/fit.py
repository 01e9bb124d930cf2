"""Text that fits: a pass over a laid-out figure that mends what only the layout reveals.

Why a pass after layout instead of better guesses while drawing: where an axes starts, how wide it is
and how long its labels render are known only once constrained layout has placed everything, and they
change with the requested size (a plot is drawn from 640 to 2400 px wide). Each mend here is small and
only ever shortens or thins text; saving the figure lays it out again with the mended text.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter

SUBTITLE_GID = "lemur-subtitle"  # the scope line under a title (figures._subtitle)
POINT_NAME_GID = "lemur-point-name"  # a model's name beside its point (figures._name_point)
EDGE_PAD_PX = 8.0
TICK_GAP_PX = 4.0


def fit_figure(fig: Figure) -> bool:
    """Apply every mend to a figure after a layout pass; True when something changed."""
    renderer = fig.canvas.get_renderer()
    changed = fit_subtitles(fig, renderer)
    for ax in fig.axes:
        changed |= thin_minor_tick_labels(ax, renderer)
        changed |= wrap_long_ylabel(ax, renderer)
        changed |= hide_colliding_point_names(ax, renderer)
    return changed


def fit_subtitles(fig: Figure, renderer: Any) -> bool:
    """Re-wrap every scope line that runs past the figure's right edge.

    A scope line starts at its axes' left edge (the correlation heatmap's row labels push it far right),
    and a clipped one loses the caveats at its end ("few runs: |r| < 0.58 may be chance")."""
    changed = False
    for text in fig.findobj(lambda a: isinstance(a, Text) and a.get_gid() == SUBTITLE_GID):
        box = text.get_window_extent(renderer)
        room = fig.bbox.width - EDGE_PAD_PX - box.x0
        lines = text.get_text().splitlines()
        if box.width <= room or not lines:
            continue
        chars = max(20, int(max(map(len, lines)) * room / box.width))
        text.set_text(textwrap.fill(" ".join(lines), chars))
        changed = True
    return changed


def thin_minor_tick_labels(ax: Any, renderer: Any) -> bool:
    """Drop minor x tick labels that would touch a neighbour; major labels always stay.

    Minor labels are what names a narrow log axis (37k..78k has no decade tick at all), so they are
    thinned, not removed: from left to right, a minor label is kept only if it clears the last kept
    label and the next major one by `TICK_GAP_PX`."""
    lo, hi = sorted(ax.get_xlim())
    major = [(t.get_window_extent(renderer), t.get_position()[0]) for t in ax.get_xticklabels()
             if t.get_text() and lo <= t.get_position()[0] <= hi]
    minor = [(t.get_window_extent(renderer), t.get_position()[0]) for t in ax.get_xticklabels(minor=True)
             if t.get_text() and lo <= t.get_position()[0] <= hi]
    if not minor:
        return False
    boxes = sorted(major + minor, key=lambda bv: bv[0].x0)
    if all(a.x1 + TICK_GAP_PX <= b.x0 for (a, _), (b, _) in zip(boxes, boxes[1:])):
        return False
    majors = [b for b, _ in major]
    kept: list[float] = []
    last_x1 = -math.inf
    for box, value in sorted(minor, key=lambda bv: bv[0].x0):
        clear_of_majors = all(box.x1 + TICK_GAP_PX <= m.x0 or m.x1 + TICK_GAP_PX <= box.x0 for m in majors)
        if box.x0 >= last_x1 + TICK_GAP_PX and clear_of_majors:
            kept.append(value)
            last_x1 = box.x1
    previous = ax.xaxis.get_minor_formatter()
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, pos: previous(v, pos) if any(math.isclose(v, k, rel_tol=1e-9) for k in kept) else ""))
    return True


def wrap_long_ylabel(ax: Any, renderer: Any) -> bool:
    """Break a y label that is taller than its axes into two lines, so it does not run along the axes
    below it (the mean ± std plot's accuracy label beside its points-per-epoch bars)."""
    label = ax.yaxis.label
    text = label.get_text()
    if not text or "\n" in text or not label.get_visible():
        return False
    if label.get_window_extent(renderer).height <= ax.get_window_extent(renderer).height:
        return False
    label.set_text(textwrap.fill(text, math.ceil(len(text) / 2) + 1))
    return True


def hide_colliding_point_names(ax: Any, renderer: Any) -> bool:
    """Keep a model's name beside its point only where it overlaps no higher point's name.

    On a dense front the most accurate models sit within a few pixels of each other (a million-run zoo
    put three names on top of one another); the highest point keeps its name, the summary lists them all."""
    names = [t for t in ax.texts if t.get_gid() == POINT_NAME_GID and t.get_visible()]
    kept: list[Any] = []
    changed = False
    for text in sorted(names, key=lambda t: -t.xy[1]):
        box = text.get_window_extent(renderer)
        if any(box.overlaps(other) for other in kept):
            text.set_visible(False)
            changed = True
        else:
            kept.append(box)
    return changed
