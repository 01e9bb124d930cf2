"""What an exception from the submitted code means for its author: where in the file, and what to change.

Why on the host: the runner's traceback is text from an untrusted process; reading the line number of the
model file's last frame from it, and the source line from the code the host itself holds, gives the agent
`line` and the line's text without trusting anything else the sandbox said.
"""

from __future__ import annotations

import re
from typing import Any

from sandbox import protocol

_FRAME = re.compile(r'File "[^"]*' + re.escape(protocol.MODEL_FILE) + r'", line (\d+), in (\S+)')
_KEY_ERROR = re.compile(r"KeyError: '([^']{1,80})'")
RESERVED = ("batch", "epoch", "transform")


def locate(traceback: str, code: str) -> dict[str, Any]:
    """`line`, `function` and `source` of the submitted file's innermost frame in `traceback`, or {}."""
    frames = _FRAME.findall(traceback or "")
    if not frames:
        return {}
    line, function = int(frames[-1][0]), frames[-1][1]
    lines = code.splitlines()
    out: dict[str, Any] = {"line": line, "function": function}
    if 1 <= line <= len(lines):
        out["source"] = lines[line - 1].strip()[:200]
    return out


def hint(message: str, source: str | None) -> str | None:
    """A next step for the failures an agent meets most, or None."""
    found = _KEY_ERROR.search(message or "")
    if found and (source is None or "prm" in source):
        key = found.group(1)
        if key in RESERVED:
            return (f"prm['{key}'] is always given by the server; check the spelling and that you index the prm "
                    "dict passed to __init__/train_setup.")
        return (f"prm has no '{key}': declare it in supported_hyperparameters() (e.g. return {{'lr', 'momentum', "
                f"'{key}'}}) so the search gives it a value in [0, 1], or read it with prm.get('{key}', default).")
    return None


def explain(error: dict[str, Any], code: str) -> dict[str, Any]:
    """`error` with `line`/`function`/`source` and a `hint` where the traceback and message allow."""
    if error.get("kind") != protocol.KIND_EXCEPTION:
        return error
    where = locate(str(error.get("traceback") or ""), code)
    out = {**error, **{k: v for k, v in where.items() if k not in error}}
    advice = hint(str(error.get("message") or ""), where.get("source"))
    if advice and "hint" not in out:
        out["hint"] = advice
    return out
