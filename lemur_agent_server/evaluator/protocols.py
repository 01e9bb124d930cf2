"""Evaluation protocols: what an accuracy in the zoo means, and the job spec each one asks the runner for.

Why two: our default scores the trial that Optuna selected on a validation split carved from the train
split (so the test split never chooses anything); LEMUR's `check_nn` trains one trial on the whole train
split and reports the test accuracy after the last epoch. The numbers differ in meaning (and, on MNIST,
by about half a point), so a run records which protocol produced it and an imported LEMUR number is
only compared with ours under `protocol="lemur"`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sandbox import datasets, protocol
from sandbox.runner.params import validation_size

DEFAULT = "default"
LEMUR = "lemur"
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(protocol.JobSpec)}
VAL_FRACTION: float = float(_SPEC_DEFAULTS["val_fraction"])  # type: ignore[arg-type]
SPLIT_SEED: int = int(_SPEC_DEFAULTS["split_seed"])  # type: ignore[call-overload]

# LEMUR's per-dataset normalization (the mean and std of nn-dataset 2.2.11's loaders) where it differs from
# ours; its mnist, cifar-10 and svhn values equal sandbox.datasets' (digits and fashion-mnist are not LEMUR's).
LEMUR_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar-100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}

DESCRIPTIONS: dict[str, str] = {
    DEFAULT: (f"accuracy = test accuracy (the server's own count on the whole test split) of the trial Optuna "
              f"selected by its best validation accuracy; the validation split is {VAL_FRACTION:.0%} of the train "
              f"split, drawn with split seed {SPLIT_SEED} (numpy default_rng permutation; with max_train_samples, "
              f"{VAL_FRACTION:.0%} of the capped pool), and the trial trains on the other "
              f"{1 - VAL_FRACTION:.0%}; the number is the selected trial's last learning-curve point."),
    LEMUR: ("accuracy = LEMUR's check_nn: one trial trained on the whole train split (no validation split, no "
            "selection) with LEMUR's normalization, test accuracy after the last epoch. Imported LEMUR records "
            "are this protocol (LEMUR itself has no seeds, and a LEMUR search picks its best trial on test "
            "accuracy)."),
}


def check(name: str, n_trials: int) -> str | None:
    """What is wrong with asking for protocol `name` with `n_trials` trials, or None."""
    if name not in protocol.EVAL_PROTOCOLS:
        return f"protocol must be one of {list(protocol.EVAL_PROTOCOLS)}, got {name!r}."
    if name == LEMUR and n_trials != 1:
        return (f"protocol='lemur' trains one trial with no validation split (LEMUR's check_nn has no search), "
                f"so nothing could select among {n_trials} trials: pass n_trials=1 with the hyperparameters in prm, "
                "or use protocol='default' to search.")
    return None


def spec_fields(name: str, info: datasets.DatasetInfo) -> dict[str, Any]:
    """The JobSpec fields protocol `name` sets (on top of the dataset's own)."""
    if name != LEMUR:
        return {"eval_protocol": DEFAULT, "val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED}
    mean, std = LEMUR_NORMALIZATION.get(info.name, (info.mean, info.std))
    return {"eval_protocol": LEMUR, "val_fraction": 0.0, "split_seed": SPLIT_SEED, "mean": list(mean),
            "std": list(std)}


def train_samples(name: str, n_train: int, max_train_samples: int | None) -> int:
    """How many images a trial trains on: the (capped) train split less the validation split, if any."""
    pool = n_train if max_train_samples is None else min(n_train, max(int(max_train_samples), 2))
    return pool - validation_size(pool, 0.0 if name == LEMUR else VAL_FRACTION)


# the submit options' descriptions, the same in submit_model and submit_models
PROTOCOL_HELP = ("What accuracy means. 'default': the test accuracy of the trial selected on a validation split "
                 f"({VAL_FRACTION:.0%} of train, split seed {SPLIT_SEED}). 'lemur': LEMUR's check_nn, one trial "
                 "(n_trials=1) on the whole train split with LEMUR's normalization, test accuracy after the last "
                 "epoch: comparable with imported LEMUR records")
PRECISION_HELP = "'fp32' (default) or 'bf16': bf16 autocast around learn() and the evaluation passes"
DETERMINISTIC_HELP = ("Deterministic kernels (torch.use_deterministic_algorithms, cuDNN benchmark off) on top of "
                      "the seeding every run has; default: on when repeats > 1. The same code, prm and seed then "
                      "give the same accuracy and curve on CPU")
