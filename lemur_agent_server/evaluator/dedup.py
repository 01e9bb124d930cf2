"""The identity of an experiment, so a batch can reuse a result instead of training the same thing again.

Why these fields: two requests are the same experiment when the same normalized code (zoo.codehash:
comments and layout do not count) is trained on the same data with the same fixed hyperparameters,
search, epochs and seed. Fields that only change how a job is reported or bounded (name prefix,
curve spacing, time budget) are left out: a succeeded job's result does not depend on them.

Two rules find an earlier result (`find_reusable`), and the answer says which one matched:
- `code`: a succeeded job of the same experiment key.
- `fingerprint`: the code is new to that experiment, but its architecture fingerprint is known (the
  zoo's model row of this code holds it: a finished job's check stage, `analyze` or an import measured
  it), and another model with the same fingerprint and the same training code (`training_code`:
  renamed train_setup/learn/supported_hyperparameters) has a succeeded job of the same experiment.
  The fingerprint says the forward computation is the same; the training code, that it trains alike.
A code whose fingerprint the zoo has never measured can match by `code` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.evaluator.training_code import training_signature
from zoo import codehash
from zoo.store import ZooStore

KEY_FIELDS = ("task", "dataset", "metric", "prm", "search_space", "n_trials", "epochs", "seed", "repeats",
              "max_train_samples")
RULE_CODE = "code"
RULE_FINGERPRINT = "fingerprint"
MAX_TWINS = 50  # models of one fingerprint looked at per item (a zoo rarely holds more of one network)


def _fields(request: EvalRequest) -> dict[str, Any]:
    fields = request.model_dump(include=set(KEY_FIELDS))
    fields["epochs"] = float(fields["epochs"])
    # options that change the result, keyed only when they differ from their defaults, so the keys of the
    # experiments that use the defaults stay as they were (an earlier result without an ONNX file, or of
    # another protocol or precision, cannot answer such a request)
    for name, default in (("export_onnx", False), ("protocol", "default"), ("precision", "fp32"),
                          ("deterministic", None)):
        if getattr(request, name) != default:
            fields[name] = getattr(request, name)
    return fields


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def experiment_key(request: EvalRequest, code: str | None = None) -> str:
    """sha256 over the normalized code (the request's, or `code`: a twin's) and the fields that decide
    the result."""
    return _digest({"code": codehash.code_hash(request.code if code is None else code), **_fields(request)})


def architecture_key(request: EvalRequest, fingerprint: str) -> str:
    """The experiment's identity by architecture: fingerprint, training code and the same fields."""
    return _digest({"fingerprint": fingerprint, "training": training_signature(request.code), **_fields(request)})


@dataclasses.dataclass
class Reuse:
    """A succeeded job that answers a request, and the rule that found it."""

    job: dict[str, Any]
    rule: str  # RULE_CODE | RULE_FINGERPRINT
    fingerprint: str | None = None

    def result(self) -> dict[str, Any]:
        """The reusing job's result: the earlier one's, saying where it came from and why."""
        reuse = {"job_id": self.job["id"], "rule": self.rule, "model_name": self.job.get("model_name")}
        if self.fingerprint:
            reuse["fingerprint"] = self.fingerprint
        return {**(self.job.get("result") or {}), "reused_from": self.job["id"], "reuse": reuse}


async def known_fingerprint(store: ZooStore, code: str) -> str | None:
    """The architecture fingerprint the zoo measured for this normalized code, if any."""
    row = await store.fetchone("SELECT fingerprint FROM model WHERE code_hash=? AND fingerprint IS NOT NULL"
                               " ORDER BY id LIMIT 1", (codehash.code_hash(code),))
    return row["fingerprint"] if row else None


async def find_reusable(store: ZooStore, request: EvalRequest, fingerprint: str | None) -> Reuse | None:
    """The succeeded job that answers `request` (see the module), `code` rule first."""
    previous = await store.jobs.reusable(experiment_key(request))
    if previous is not None:
        return Reuse(previous, RULE_CODE)
    if fingerprint is None:
        return None
    training = training_signature(request.code)
    twins = await store.fetchall("SELECT code FROM model WHERE fingerprint=? AND code_hash!=? ORDER BY id LIMIT ?",
                                 (fingerprint, codehash.code_hash(request.code), MAX_TWINS))
    for twin in twins:
        if training is None or training_signature(twin["code"]) != training:
            continue
        previous = await store.jobs.reusable(experiment_key(request, twin["code"]))
        if previous is not None:
            return Reuse(previous, RULE_FINGERPRINT, fingerprint)
    return None
