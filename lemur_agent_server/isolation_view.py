"""The sandbox's description once, a short id everywhere else.

Why: the isolation a job ran under (backend, image, limits, mounts, seccomp...) is ~1.5k characters; an
agent that polls get_job or reads a batch sees it in every answer and learns nothing new from the second
copy. Results carry `{"id", "backend"}`; the id is a hash of the full description, so two results with the
same id ran under the same isolation. `list_catalog.sandbox` describes the server's sandbox (with its id),
and `get_job(job_id, include_isolation=true)` shows the exact description a job's sandbox reported.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

HOW_TO_SEE = "get_job(job_id, include_isolation=true) shows it in full; list_catalog.sandbox describes this server's"


def isolation_id(isolation: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(isolation, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{isolation.get('backend', 'sandbox')}:{digest}"


def short(isolation: Any) -> Any:
    """`{"id", "backend", "full"}` for a description; anything else unchanged (None, an id already)."""
    if not isinstance(isolation, dict) or "id" in isolation and len(isolation) <= 3:
        return isolation
    return {"id": isolation_id(isolation), "backend": isolation.get("backend"), "full": HOW_TO_SEE}


def with_id(isolation: dict[str, Any]) -> dict[str, Any]:
    """The full description with its id (list_catalog)."""
    return {"id": isolation_id(isolation), **isolation}


def shorten_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(result, dict) or "isolation" not in result:
        return result
    return {**result, "isolation": short(result["isolation"])}
