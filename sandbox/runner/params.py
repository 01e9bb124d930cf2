"""Hyperparameters: LEMUR's defaults, its Optuna search space, and LEMUR transform names.

Torch-free on purpose (stdlib only; optuna is used through the `trial` object passed in), so the host
can import it to validate a job's `search_space` before starting a sandbox.

Search-space override format (`JobSpec.search_space`): `sandbox.protocol.SEARCH_SPACE_FORMAT`, e.g.

    {
      "lr":        {"low": 1e-4, "high": 0.1, "log": true},   # float range, log-uniform if "log"
      "momentum":  {"low": 0.5, "high": 0.99},                  # float range, uniform
      "dropout":   {"choices": [0.0, 0.25]},                    # categorical
      "batch":     {"choices": [32, 64, 128]}                   # or {"min_power": 4, "max_power": 8}
      "transform": {"choices": ["norm_32", "norm_32_flip"]}     # default: JobSpec.transforms
    }

Entries for names the model does not declare are ignored (except batch/transform, which every model
gets). Values in `JobSpec.fixed_prm` are used as given and never searched. Defaults (LEMUR's CLI):
lr log-uniform 1e-5..1, momentum 0..1, dropout 0..0.5, batch 2^k for k = 4..8 (capped at the
training-split size), any other declared name uniform 0..1; `pretrained` is fixed to 0 because a sandbox
cannot download weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# the grammar and the validator are the host/runner contract: they live in sandbox.protocol
from sandbox.protocol import BATCH_POWERS, Transform, parse_transform, validate_search_space  # noqa: F401

RESERVED = ("batch", "epoch", "transform")
CHECK_DEFAULTS: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "dropout": 0.2, "pretrained": 0}
CHECK_OTHER = 0.5
CHECK_BATCH = 16
FALLBACK_TRANSFORM = "norm_32"
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-5, "high": 1.0, "log": True},
    "momentum": {"low": 0.0, "high": 1.0},
    "dropout": {"low": 0.0, "high": 0.5},
    "pretrained": {"choices": [0]},
}
OTHER_SPACE: dict[str, Any] = {"low": 0.0, "high": 1.0}


def validation_size(pool: int, val_fraction: float) -> int:
    """Images of a pool of `pool` held out for validation: the share, but at least one and never all
    (with a share > 0 and two images or more); none with a share of 0 (protocol "lemur")."""
    n_val = round(pool * val_fraction)
    if val_fraction > 0 and pool >= 2:
        n_val = min(max(n_val, 1), pool - 1)
    return n_val


def epoch_value(epochs: float) -> int | float:
    """`prm['epoch']`: an int when whole (LEMUR models may use it in range())."""
    return int(epochs) if float(epochs).is_integer() else float(epochs)


def default_transform(fixed_prm: dict[str, Any], transforms: list[str]) -> str:
    """The fixed transform, else the first allowed one (the host lists the dataset default first)."""
    if "transform" in fixed_prm:
        return str(fixed_prm["transform"])
    return transforms[0] if transforms else FALLBACK_TRANSFORM


def check_prm(
    declared: Iterable[str], fixed_prm: dict[str, Any], transforms: list[str], epochs: float = 1
) -> dict[str, Any]:
    """Hyperparameters for a check build: fixed values over LEMUR-like defaults (others 0.5)."""
    prm: dict[str, Any] = {
        name: CHECK_DEFAULTS.get(name, CHECK_OTHER) for name in declared if name not in RESERVED
    }
    prm.update(
        batch=CHECK_BATCH, epoch=epoch_value(epochs), transform=default_transform(fixed_prm, transforms)
    )
    prm.update(fixed_prm)
    return prm


def _suggest(trial: Any, name: str, entry: dict[str, Any]) -> Any:
    if "choices" in entry:
        return trial.suggest_categorical(name, list(entry["choices"]))
    return trial.suggest_float(name, float(entry["low"]), float(entry["high"]), log=bool(entry.get("log")))


def batch_choices(space: dict[str, Any], n_train: int) -> list[int]:
    """Batch sizes to search: the override's, or 2^k; those above the training-split size are dropped."""
    entry = space.get("batch", {})
    if "choices" in entry:
        choices = sorted({int(c) for c in entry["choices"]})
    else:
        lo, hi = entry.get("min_power", BATCH_POWERS[0]), entry.get("max_power", BATCH_POWERS[1])
        choices = [2**k for k in range(lo, hi + 1)]
    fitting = [c for c in choices if c <= max(n_train, 1)]
    if fitting:
        return fitting
    return [1 << max(max(n_train, 1).bit_length() - 1, 0)]  # the largest power of two that fits


def suggest_prm(
    trial: Any,
    declared: Iterable[str],
    fixed_prm: dict[str, Any],
    space: dict[str, Any],
    transforms: list[str],
    epochs: float,
    n_train: int,
) -> dict[str, Any]:
    """One trial's `prm` from an Optuna trial: every declared name plus batch, epoch and transform."""
    prm: dict[str, Any] = {}
    for name in sorted(set(declared) - set(RESERVED)):
        if name in fixed_prm:
            continue
        prm[name] = _suggest(trial, name, space.get(name) or DEFAULT_SPACE.get(name) or OTHER_SPACE)
    if "batch" not in fixed_prm:
        prm["batch"] = trial.suggest_categorical("batch", batch_choices(space, n_train))
    if "transform" not in fixed_prm:
        allowed = list(space.get("transform", {}).get("choices") or transforms or [FALLBACK_TRANSFORM])
        prm["transform"] = trial.suggest_categorical("transform", allowed)
    prm["epoch"] = epoch_value(epochs)
    prm.update(fixed_prm)
    return prm
