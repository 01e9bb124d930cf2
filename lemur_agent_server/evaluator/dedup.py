"""The identity of an experiment, so a batch can reuse a result instead of training the same thing again.

Why these fields: two requests are the same experiment when the same normalized code (zoo.codehash:
comments and layout do not count) is trained on the same data with the same fixed hyperparameters,
search, epochs and seed. Fields that only change how a job is reported or bounded (name prefix,
curve spacing, time budget) are left out: a succeeded job's result does not depend on them.
"""

from __future__ import annotations

import hashlib
import json

from lemur_agent_server.evaluator.requests import EvalRequest
from zoo import codehash

KEY_FIELDS = ("task", "dataset", "metric", "prm", "search_space", "n_trials", "epochs", "seed", "repeats",
              "max_train_samples")


def experiment_key(request: EvalRequest) -> str:
    """sha256 over the normalized code and the fields that decide the result."""
    fields = request.model_dump(include=set(KEY_FIELDS))
    fields["epochs"] = float(fields["epochs"])
    payload = json.dumps({"code": codehash.code_hash(request.code), **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
