"""The check event's per-layer cost table and speed estimate, made safe to show (the sandbox wrote them).

Why bounded here: the numbers come from the submitted code's process; an agent must see a short table of
plain numbers and names, whatever the runner sent (at most `TOP_LAYERS` rows, clipped strings).
"""

from __future__ import annotations

import math
from typing import Any

from zoo.records import is_number

TOP_LAYERS = 10
MAX_DIMS = 8


def _count(value: Any) -> int | None:
    return int(value) if is_number(value) and 0 <= value < 2**62 else None


def _seconds(value: Any) -> float | None:
    return round(float(value), 3) if is_number(value) and math.isfinite(value) and 0 <= value < 1e9 else None


def layer_table(check: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The heaviest modules: name, type, out_shape, params, flops (the runner's order: FLOPs first)."""
    rows = check.get("layers")
    if not isinstance(rows, list):
        return None
    table = []
    for row in rows[:TOP_LAYERS]:
        if not isinstance(row, dict):
            continue
        shape = row.get("out_shape")
        shape = [int(d) for d in shape[:MAX_DIMS] if is_number(d)] if isinstance(shape, list) else None
        table.append({"name": str(row.get("name", ""))[:100], "type": str(row.get("type", ""))[:60],
                      "out_shape": shape, "params": _count(row.get("params")), "flops": _count(row.get("flops"))})
    return table


def speed(check: dict[str, Any]) -> dict[str, Any] | None:
    """Seconds per epoch and per evaluation pass the check measured, with what they were measured at."""
    raw = check.get("speed")
    if not isinstance(raw, dict):
        return None
    return {"epoch_s": _seconds(raw.get("epoch_s")), "eval_pass_s": _seconds(raw.get("eval_pass_s")),
            "batch": _count(raw.get("batch")), "transform": str(raw.get("transform", ""))[:40],
            "train_samples": _count(raw.get("train_samples")), "eval_samples": _count(raw.get("eval_samples")),
            "timed_steps": _count(raw.get("timed_steps")),
            "note": "measured on a few training steps in this server's sandbox now (warm-up excluded); a loaded "
                    "host or another batch size changes it. A job of E epochs with a point every eval_every "
                    "epochs needs about E * epoch_s + (E / eval_every) * eval_pass_s per trial, plus start-up."}
