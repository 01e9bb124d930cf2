"""The exceptions `api.check_nn` raises: one class per failure kind, all under `CheckNNError`.

Why classes and not only `.result["error"]["kind"]`: LEMUR callers (NNGPT) tell failures apart with
`except AccuracyException` / `except LearnTimeException` / a CUDA out-of-memory error and react
differently (retry with half the batch, drop the model, ...). Each class carries the structured job
(`.result`: job id, status, result, error with stage/kind/message/log tail), so nothing is lost by
raising. LEMUR's names are aliases of ours, so `except api.LearnTimeException` works as before.
"""

from __future__ import annotations

from typing import Any

from sandbox.protocol import FailureKind


class CheckNNError(RuntimeError):
    """check_nn failed; `.result` holds the structured job (status, stage, kind, message, log tail)."""

    kind: str | None = None

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result

    @property
    def error(self) -> dict[str, Any]:
        return self.result.get("error") or {}

    @property
    def accuracy(self) -> float | None:
        """The last test accuracy reached, if training got that far (LEMUR's exceptions carry it too)."""
        value = (self.result.get("result") or {}).get("accuracy")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def duration(self) -> int | None:
        """Training-only nanoseconds at the last curve point, if any."""
        value = (self.result.get("result") or {}).get("duration_ns")
        return int(value) if isinstance(value, (int, float)) else None


class CodeSyntaxError(CheckNNError):
    """The code does not parse."""

    kind = FailureKind.SYNTAX


class ContractError(CheckNNError):
    """The code does not follow the Net contract (no Net, no train_setup/learn, wrong signature, ...)."""

    kind = FailureKind.CONTRACT


class OutputShapeError(CheckNNError):
    """forward() returned the wrong shape for the dataset's classes."""

    kind = FailureKind.SHAPE


class TrainingError(CheckNNError):
    """The model's own code raised while building, training or predicting."""

    kind = FailureKind.EXCEPTION


class NanLossError(CheckNNError):
    """The loss became NaN or infinite."""

    kind = FailureKind.NAN_LOSS


class OutOfMemoryError(CheckNNError):
    """The sandbox ran out of (GPU or host) memory; a smaller `batch` may fit."""

    kind = FailureKind.OOM


class LearnTimeError(CheckNNError):
    """Training did not finish within `epoch_limit_minutes` per epoch (LEMUR's LearnTimeException)."""

    kind = FailureKind.TIMEOUT


class SandboxError(CheckNNError):
    """The sandbox itself failed (not the model's fault), or the dataset is unavailable."""

    kind = FailureKind.SANDBOX


class CancelledError(CheckNNError):
    """The job was cancelled or interrupted (server shutdown)."""

    kind = FailureKind.CANCELLED


class AccuracyError(CheckNNError):
    """Trained, but the accuracy is not above 1.2 x chance: LEMUR's AccuracyException (its `good()` rule)."""


class InvalidRequestError(CheckNNError, ValueError):
    """An argument is not acceptable (unknown dataset, transform, metric, bad prm); fix it and call again."""


class UnsupportedOptionError(CheckNNError, NotImplementedError):
    """A LEMUR option we accept but cannot honour yet (export_onnx=True, transform_dir=...)."""


# LEMUR's names (ab.nn.util.Exception), for callers that catch those
AccuracyException = AccuracyError
LearnTimeException = LearnTimeError

_BY_KIND: dict[str, type[CheckNNError]] = {
    cls.kind: cls for cls in (CodeSyntaxError, ContractError, OutputShapeError, TrainingError, NanLossError,
                              OutOfMemoryError, LearnTimeError, SandboxError, CancelledError) if cls.kind
}
_BY_KIND[FailureKind.INTERRUPTED] = CancelledError


def error_for(status: str, result: dict[str, Any]) -> CheckNNError:
    """The exception for a finished job that did not succeed, chosen by its error kind (or status)."""
    err = result.get("error") or {}
    kind = str(err.get("kind") or ("timeout" if status == "timed_out" else ""))
    cls = _BY_KIND.get(kind, CheckNNError)
    message = f"check_nn {status}: {kind} {err.get('message', '')}".strip()
    return cls(message, result)
