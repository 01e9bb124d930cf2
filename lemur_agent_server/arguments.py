"""Every tool call's arguments, checked once before any tool runs, and the answers when they fail.

Why here and not in each tool: the SDK validates arguments with pydantic and answers with pydantic's
text (no allowed range, no next step, the rejected value repeated in full), and some inputs pass
pydantic but break what comes after it (integers beyond SQLite's range, lone surrogates that no
encoder takes, megabyte strings that are echoed back). One check at the door covers every tool,
including the ones added later; the limits it applies are in the message it gives.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from lemur_agent_server.clip import clip
from zoo.query import SQL_INT_MAX

MAX_DEPTH = 16  # containers inside one argument (search_space needs 3)
MAX_ITEMS = 10_000  # list items and object keys in one call
DEFAULT_STRING_CHARS = 1_000  # strings whose schema declares no maxLength
SCHEMA_HINT = "tools/list shows every argument with its type and range"


def _types(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return list(prop.get("anyOf") or [prop])


def _bounds(low: Any, high: Any) -> str:
    if low is not None and high is not None:
        return f" {low:g}..{high:g}" if isinstance(low, float) or isinstance(high, float) else f" {low}..{high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def _describe(variant: dict[str, Any]) -> str:
    kind = variant.get("type", "value")
    if "enum" in variant:
        return "one of " + ", ".join(map(str, variant["enum"]))
    if kind in ("integer", "number"):
        low = variant.get("minimum", variant.get("exclusiveMinimum"))
        high = variant.get("maximum", variant.get("exclusiveMaximum"))
        if kind == "integer":
            low = -SQL_INT_MAX if low is None else low
            high = SQL_INT_MAX if high is None else high
        return kind + _bounds(low, high)
    if kind == "string":
        chars = _bounds(variant.get("minLength", 0), variant.get("maxLength", DEFAULT_STRING_CHARS))
        return f"string of{chars} characters"
    if kind == "array":
        return "list" + (f" of at most {variant['maxItems']} items" if "maxItems" in variant else "")
    return str(kind)


def allowed(prop: dict[str, Any] | None) -> str:
    """What the schema of one argument accepts, in words: 'integer 0..100', 'string of 1..300 characters or null'."""
    if not prop:
        return "see the tool's input schema"
    return " or ".join(_describe(v) for v in _types(prop))


def _max_chars(prop: dict[str, Any] | None) -> int:
    lengths = [v["maxLength"] for v in _types(prop or {}) if "maxLength" in v]
    return max(lengths) if lengths else DEFAULT_STRING_CHARS


def _resolve(prop: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """A schema with a local `$ref` (`#/$defs/Name`, how pydantic nests models) replaced by its target."""
    if not isinstance(prop, dict):
        return {}
    ref = prop.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return defs.get(ref.removeprefix("#/$defs/")) or {}
    return prop


def _child(prop: dict[str, Any] | None, key: Any, in_list: bool, defs: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of one element of a list, or of one key of an object, where the parent's schema says."""
    for variant in (_resolve(v, defs) for v in _types(prop or {})):
        if in_list and isinstance(variant.get("items"), dict):
            return _resolve(variant["items"], defs)
        if not in_list and key in (variant.get("properties") or {}):
            return _resolve(variant["properties"][key], defs)
        if not in_list and isinstance(variant.get("additionalProperties"), dict):
            return _resolve(variant["additionalProperties"], defs)
    return None


class _Walk:
    """Depth-first over one call's values with an explicit stack (the values may nest deeply)."""

    def __init__(self, defs: dict[str, Any] | None = None) -> None:
        self.items = 0
        self.defs = defs or {}

    def problem(self, name: str, value: Any, prop: dict[str, Any] | None) -> str | None:
        """The first problem of one argument; a nested string may be as long as its own schema says."""
        stack: list[tuple[str, Any, int, dict[str, Any] | None]] = [(name, value, 0, _resolve(prop, self.defs))]
        while stack:
            path, item, depth, schema = stack.pop()
            found = self._scalar(path, item, _max_chars(schema))
            if found:
                return found
            if isinstance(item, (dict, list)):
                if depth >= MAX_DEPTH:
                    return f"{path} nests deeper than {MAX_DEPTH} levels"
                self.items += len(item)
                if self.items > MAX_ITEMS:
                    return f"the arguments hold more than {MAX_ITEMS:,} list items and object keys"
                children = item.items() if isinstance(item, dict) else enumerate(item)
                for key, child in children:
                    if isinstance(key, str) and (found := self._scalar(f"{path} key", key, DEFAULT_STRING_CHARS)):
                        return found
                    stack.append((f"{path}.{key}" if isinstance(item, dict) else f"{path}[{key}]", child, depth + 1,
                                  _child(schema, key, isinstance(item, list), self.defs)))
        return None

    @staticmethod
    def _scalar(path: str, item: Any, max_chars: int) -> str | None:
        if isinstance(item, str):
            if len(item) > max_chars:
                return f"{path} has {len(item):,} characters; at most {max_chars:,} are allowed"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{path} holds a lone surrogate U+{ord(item[exc.start]):04X}, which is not valid Unicode text"
        elif isinstance(item, bool):
            return None
        elif isinstance(item, int) and abs(item) > SQL_INT_MAX:
            return f"{path}={clip(item, 30)} is beyond the integer range -(2**63-1)..2**63-1"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{path}={item} is not a finite number"
        return None


def argument_problem(tool: str, arguments: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """Why these arguments cannot go to `tool`, as a message with the fix; None when they may."""
    props: dict[str, Any] = schema.get("properties") or {}
    unknown = [name for name in arguments if name not in props]
    if unknown and schema.get("additionalProperties") is not True:
        known = ", ".join(props) or "none"
        return (f"Invalid arguments for {tool}: unknown argument {clip(unknown[0], 60)}. Its arguments are: {known}. "
                f"Remove or rename it and call {tool} again ({SCHEMA_HINT}).")
    walk = _Walk(schema.get("$defs"))
    for name, value in arguments.items():
        found = walk.problem(name, value, props.get(name))
        if found:
            return (f"Invalid arguments for {tool}: {found}. Allowed for {name}: {allowed(props.get(name))}. "
                    f"Fix it and call {tool} again ({SCHEMA_HINT}).")
    return None


def validation_message(tool: str, exc: ValidationError, schema: dict[str, Any]) -> str:
    """Pydantic's rejection in our words: each field, what it got, what it allows, the next step."""
    props: dict[str, Any] = schema.get("properties") or {}
    parts = []
    for error in exc.errors()[:5]:
        loc = [str(p) for p in error.get("loc", ())]
        field = ".".join(loc) or "arguments"
        reason = str(error.get("msg", "invalid value")).removeprefix("Value error, ").replace(
            "Unable to parse input string as an integer, exceeded maximum size", "too large an integer")
        got = f" (got {clip(error.get('input'), 60)})" if "input" in error and loc else ""
        parts.append(f"{field}: {reason}{got}; allowed: {allowed(props.get(loc[0]) if loc else None)}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return (f"Invalid arguments for {tool}: " + "; ".join(parts) + more
            + f". Fix them and call {tool} again ({SCHEMA_HINT}).")
