"""Per-layer cost of a built Net (output shape, parameters, FLOPs), the heaviest first, and its speed.

Why: "what should I make smaller" is the first question after a slow or large model; a short table of
the modules that cost the most answers it without the agent instrumenting its own code. FLOPs come from
torch's FlopCounterMode (the same counter as the model's total), keyed by module path; output shapes
from forward hooks on the same pass. Only modules that hold parameters or have no children are listed
(containers would repeat their children's cost).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sandbox.runner import netops

TOP_LAYERS = 10
TIMED_STEPS = 3  # training steps timed after one warm-up step


def _shape(out: Any) -> list[int] | None:
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return list(out[0].shape)
    return None


def _listed(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules()
            if name and (not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)))}


def layer_costs(model: torch.nn.Module, x: torch.Tensor, top: int = TOP_LAYERS) -> dict[str, Any]:
    """{'layers': [{name, type, out_shape, params, flops}] heaviest first (FLOPs, then params), 'other': ...}."""
    modules = _listed(model)
    shapes: dict[str, list[int] | None] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            shapes.setdefault(name, _shape(out))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    root = type(model).__name__
    per_module = {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    rows = [{"name": n, "type": type(m).__name__, "out_shape": shapes.get(n),
             "params": sum(p.numel() for p in m.parameters(recurse=not any(True for _ in m.children()))),
             "flops": per_module.get(f"{root}.{n}", 0)} for n, m in modules.items()]
    rows.sort(key=lambda r: (r["flops"], r["params"]), reverse=True)
    rest = rows[top:]
    return {"layers": rows[:top], "other": {"modules": len(rest), "params": sum(r["params"] for r in rest),
                                            "flops": sum(r["flops"] for r in rest)} if rest else None}


def time_steps(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> float | None:
    """Seconds per training sample over `batches[1:]` (the first learn() call is the warm-up), or None."""
    if len(batches) < 2:
        return None
    model.learn(batches[:1])
    netops.sync(device)
    t0 = time.perf_counter()
    model.learn(batches[1:])
    netops.sync(device)
    samples = sum(len(y) for _, y in batches[1:])
    return (time.perf_counter() - t0) / samples if samples else None


def time_forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float | None:
    """Seconds per sample of an evaluation forward pass (no_grad, eval mode) over `x`, after a warm-up."""
    if len(x) == 0:
        return None
    model.eval()
    with torch.no_grad():
        model(x[:1])
        netops.sync(device)
        t0 = time.perf_counter()
        model(x)
        netops.sync(device)
    model.train()
    return (time.perf_counter() - t0) / len(x)
