"""Small operations on a submitted Net that both check and train mode need.

Why separate: each turns a model misbehaviour into the right protocol failure kind in one place
(construction errors, wrong logits shape, odd learn() return values, NaN parameters), so check mode and
the training loop report the same failure the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from sandbox import protocol
from sandbox.runner.errors import RunnerFailure, describe, is_out_of_memory, traceback_tail


class TrialFailure(Exception):
    """A failure that ends one trial but not the job (the hyperparameters, not the code, are at fault)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def model_error(exc: BaseException, stage: str, what: str) -> Exception:
    """OOM -> TrialFailure(out_of_memory); anything else -> RunnerFailure(exception) with traceback."""
    if is_out_of_memory(exc):
        return TrialFailure(protocol.KIND_OOM, f"{what} ran out of memory: {describe(exc)}")
    return RunnerFailure(
        protocol.KIND_EXCEPTION, f"{what} raised {describe(exc)}", stage, traceback_tail(exc)
    )


def build_net(
    module: ModuleType,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    prm: dict[str, Any],
    device: torch.device,
    stage: str,
) -> torch.nn.Module:
    """`Net(in_shape, out_shape, prm, device)` moved to `device`."""
    try:
        model = module.Net(in_shape, out_shape, dict(prm), device)
        if not isinstance(model, torch.nn.Module):
            raise RunnerFailure(protocol.KIND_CONTRACT, "Net(...) did not return a torch.nn.Module", stage)
        return model.to(device)
    except RunnerFailure:
        raise
    except BaseException as exc:  # SystemExit from model code is a model error too
        raise model_error(exc, stage, f"Net({in_shape}, {out_shape}, prm, device)") from exc


def check_logits(out: Any, batch: int, num_classes: int, stage: str) -> torch.Tensor:
    """The forward output must be a (batch, num_classes) tensor of logits."""
    expected = (batch, num_classes)
    if not isinstance(out, torch.Tensor):
        got = type(out).__name__
        if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
            got += f" of shapes {[tuple(t.shape) for t in out if isinstance(t, torch.Tensor)]}"
        raise RunnerFailure(
            protocol.KIND_SHAPE,
            f"forward() must return one logits tensor of shape {expected}, got {got}",
            stage,
        )
    if tuple(out.shape) != expected:
        raise RunnerFailure(
            protocol.KIND_SHAPE,
            f"forward() returned shape {tuple(out.shape)}, expected "
            f"{expected} (batch, out_shape[0]); end the network with e.g. "
            f"nn.AdaptiveAvgPool2d(1), flatten and nn.Linear(features, out_shape[0])",
            stage,
        )
    return out


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().cpu().item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_learn_result(result: Any) -> tuple[float | None, float | None]:
    """(loss, train_accuracy) from whatever learn() returned: (acc, loss), a loss, or None."""
    if result is None:
        return None, None
    if isinstance(result, tuple | list):
        if len(result) >= 2:
            return _as_float(result[1]), _as_float(result[0])
        return (_as_float(result[0]), None) if result else (None, None)
    return _as_float(result), None


def is_nan(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


def params_finite(model: torch.nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap sum that changes when any parameter changes (to tell whether learn() stepped)."""
    with torch.no_grad():
        return float(sum(float(p.double().sum()) for p in model.parameters()))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """state_dict as safetensors; contiguous CPU clones because tied/strided tensors cannot be saved."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a clock read after it measures the work, not the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
