"""The job's time budget, seen from inside: what fits before the host's hard kill.

Why estimate instead of just running until killed: a killed sandbox loses the trial in progress (no
weights, no final event). The runner therefore stops on its own a little early - before a partial epoch
that, at the speed measured so far, would not finish and still leave time to evaluate - and reports the
trial as pruned (kind timeout) with the points it has.

Speeds are kept per sample *and pixel* (transform side squared) so an estimate made at 32x32 still says
something about a trial that trains at 224x224.
"""

from __future__ import annotations

import time

from sandbox.protocol import TimeBudget

FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of a training step


class Budget:
    """Deadline bookkeeping. All times are `time.monotonic()` seconds."""

    def __init__(self, started: float, budget_s: float) -> None:
        self.started = started
        self.end = started + TimeBudget(budget_s).runner_end()  # the margins: TimeBudget
        self._train_s = 0.0
        self._train_units = 0.0
        self._eval_s = 0.0
        self._eval_units = 0.0

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def remaining(self) -> float:
        return self.end - self.now()

    def record_train(self, seconds: float, samples: int, pixels: int) -> None:
        if samples > 0:
            self._train_s += seconds
            self._train_units += samples * pixels

    def record_eval(self, seconds: float, samples: int, pixels: int) -> None:
        if samples > 0:
            self._eval_s += seconds
            self._eval_units += samples * pixels

    def train_rate(self) -> float | None:
        """Seconds per (sample x pixel) of training measured so far."""
        return self._train_s / self._train_units if self._train_units else None

    def train_estimate(self, samples: int, pixels: int) -> float | None:
        rate = self.train_rate()
        return None if rate is None else rate * samples * pixels

    def eval_estimate(self, samples: int, pixels: int, live_train_rate: float | None = None) -> float:
        """Measured evaluation speed; before the first evaluation, a third of the training speed."""
        if self._eval_units:
            return self._eval_s / self._eval_units * samples * pixels
        rate = self.train_rate() or live_train_rate
        return 0.0 if rate is None else rate * FORWARD_SHARE * samples * pixels

    def fits(self, seconds: float) -> bool:
        return self.now() + seconds <= self.end
