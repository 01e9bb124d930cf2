"""Colours and style shared by every plot: Okabe-Ito, readable sizes, no chart junk.

Why Okabe-Ito: its eight colours stay distinguishable under the common colour-vision deficiencies
(Okabe & Ito 2008, "Color Universal Design"). Black is kept for reference marks (Pareto fronts),
yellow last because it is faint on white. The diverging map for correlations is `PuOr`, which is
also colour-blind safe (ColorBrewer).
"""

from __future__ import annotations

from typing import Any

from cycler import cycler

OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
# data series in this order; black is reserved for fronts and reference lines
SERIES = [OKABE_ITO[k] for k in ("blue", "orange", "bluish_green", "vermillion", "reddish_purple", "sky_blue",
                                 "yellow")]
REFERENCE = OKABE_ITO["black"]
DIVERGING_CMAP = "PuOr_r"
GREY = "#7F7F7F"

DPI = 100

STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "figure.titlesize": 13,
    "figure.titleweight": "bold",
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=SERIES),
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
    "axes.facecolor": "white",
}


def series(i: int) -> str:
    """The i-th data colour (cycles after seven)."""
    return SERIES[i % len(SERIES)]
