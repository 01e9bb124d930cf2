"""One rule for echoing a caller's value back in a message: cut it, say how long it was.

Why: an error that repeats its input verbatim grows with the input (a 1 MB dataset name made a 1 MB
error), and hosts reject tool answers over ~25k tokens. Every message that quotes an argument goes
through `clip`.
"""

from __future__ import annotations

import json
from typing import Any

ECHO_CHARS = 80
MAX_MESSAGE_CHARS = 4_000


def clip(value: Any, limit: int = ECHO_CHARS) -> str:
    """`value` as short text: strings as they are, anything else as compact JSON (repr if not JSON),
    cut to `limit` characters with an ellipsis and the original length."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (ValueError, RecursionError):
            text = object.__repr__(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def clip_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A whole message cut to `limit` characters (the last guard before an answer leaves the server)."""
    return text if len(text) <= limit else f"{text[:limit]}… (message cut at {limit:,} characters)"
