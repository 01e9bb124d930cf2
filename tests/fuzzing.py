"""A seeded fuzzer of tool calls and the rule every answer must meet; shared by tests/test_fuzz.py
(a few hundred calls in CI) and bench/chaos.py (the same at scale).

Arguments start from each tool's own input schema (so most calls get past the door and reach the
tool) and are then spoiled one way at random: wrong types, integers and floats at and beyond every
range, huge, nested and unicode values, tampered cursors, unknown fields, missing required ones.

The rule (issue 11): every answer is a result or an error whose text says what to do; no text is
longer than 25,000 characters; nothing is the SDK's bare "Error executing tool X" (an internal
exception), and the server still answers afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
from collections import Counter
from typing import Any

from mcp import Client, MCPError

MAX_ANSWER_CHARS = 25_000
HINT_WORDS = re.compile(r"\b(call|use|pass|retry|choose|fix|remove|send|split|restart|shorten|lower|ask|loosen|"
                        r"start|repeat|check|submit|try)\b", re.IGNORECASE)
NAMES = ["rag-m1", "alt-m0", "LeNet5", "ResNet8", "no-such-model", ""]
DATASETS = ["mnist", "digits", "cifar-10", "fashion-mnist", "svhn", "imagenet", ""]
WEIRD_STRINGS = ["", " ", "\x00", "\ud800", "\U0001f600" * 50, "مرحبا", "a\nb", "%_\\", "' OR 1=1 --", "../../etc",
                 "null", "NaN", "１２３"]
WEIRD_NUMBERS: list[Any] = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**70, 10**30, 0.5, -0.0, 1e-308,
                            1e308, -1e308, 3.7, True, False]
SAFE_FOR_TRAINING = {"n_trials": 1, "epochs": 0.01, "time_budget_s": 5, "max_train_samples": 16}


@dataclasses.dataclass
class Report:
    """Counts by outcome, the biggest answers, and a few examples of each rule broken."""

    outcomes: Counter = dataclasses.field(default_factory=Counter)
    by_tool: Counter = dataclasses.field(default_factory=Counter)
    worst: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (chars, tool, args preview)
    broken: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)  # (rule, tool, args, text)
    longest_error: int = 0

    def add(self, outcome: str, tool: str, args: dict[str, Any], text: str) -> None:
        self.outcomes[outcome] += 1
        if outcome != "ok":
            self.longest_error = max(self.longest_error, len(text))
        self.by_tool[(tool, outcome)] += 1
        preview = _preview(args)
        self.worst = sorted([*self.worst, (len(text), tool, preview)], reverse=True)[:5]
        if outcome in BROKEN and len(self.broken) < 50:
            self.broken.append((outcome, tool, preview, text[:300]))


BROKEN = ("internal", "no_hint", "oversize", "protocol_error")


def _preview(args: dict[str, Any]) -> str:
    try:
        text = json.dumps(args, ensure_ascii=True, default=repr)
    except (ValueError, RecursionError):
        text = repr(args)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} chars)"


def classify(is_error: bool, text: str) -> str:
    if len(text) > MAX_ANSWER_CHARS:
        return "oversize"
    if not is_error:
        return "ok"
    if re.fullmatch(r"Error executing tool \w+", text.strip()) or "an internal error, logged on the server" in text:
        return "internal"
    return "tool_error" if HINT_WORDS.search(text) else "no_hint"


class Fuzzer:
    """Tool calls from a seeded generator over the tools' input schemas."""

    def __init__(self, seed: int, schemas: dict[str, dict[str, Any]], cursor: str | None):
        self.rng = random.Random(seed)
        self.schemas = schemas
        self.cursor = cursor  # a real next_cursor to tamper with

    def call(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        if rng.random() < 0.02:
            return rng.choice(["", "nope", "query_models ", "x" * 10_000, "QUERY_MODELS"]), {}
        tool = rng.choice(sorted(self.schemas))
        args = self.valid(tool)
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
            self.spoil(tool, args)
        if tool in ("submit_model", "check_model"):
            args.update({k: v for k, v in SAFE_FOR_TRAINING.items() if k in self.schemas[tool].get("properties", {})
                         and rng.random() < 0.8})
        return tool, args

    def valid(self, tool: str) -> dict[str, Any]:
        schema = self.schemas[tool]
        props = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        return {name: self.value(name, prop) for name, prop in props.items()
                if name in required or self.rng.random() < 0.4}

    def value(self, name: str, prop: dict[str, Any]) -> Any:
        rng = self.rng
        variant = rng.choice(prop.get("anyOf") or [prop])
        kind = variant.get("type")
        if "enum" in variant:
            return rng.choice(variant["enum"])
        if kind == "integer":
            low = variant.get("minimum", 0)
            return rng.randint(low, min(variant.get("maximum", low + 50), low + 50))
        if kind == "number":
            low = variant.get("minimum", variant.get("exclusiveMinimum", 0))
            return round(rng.uniform(low, min(variant.get("maximum", low + 5), low + 5)), 2) or 0.5
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "array":
            return [rng.choice(NAMES) for _ in range(rng.randint(0, 3))]
        if kind == "object":
            return rng.choice([{}, {"lr": 0.01}, {"batch": 32, "transform": "norm_32"}])
        if kind == "null":
            return None
        if name == "code":
            return rng.choice(["x = 1", "class Net: pass", "def supported_hyperparameters():\n    return {'lr'}\n"])
        if name == "dataset":
            return rng.choice(DATASETS)
        if name == "cursor":
            return self.cursor
        if name in ("job_id",):
            return rng.choice(["job-000000000000", "x"])
        return rng.choice(NAMES)

    def spoil(self, tool: str, args: dict[str, Any]) -> None:
        rng = self.rng
        props = list(self.schemas[tool].get("properties") or {})
        how = rng.choice(["type", "number", "string", "nested", "unicode", "unknown", "drop", "cursor", "big"])
        name = rng.choice(props) if props else "x"
        if how == "type":
            args[name] = rng.choice([None, [], {}, "text", 1, 1.5, True, [1, "a"], {"a": {"b": 1}}])
        elif how == "number":
            args[name] = rng.choice(WEIRD_NUMBERS)
        elif how == "string":
            args[name] = rng.choice(WEIRD_STRINGS)
        elif how == "nested":
            value: Any = 1
            for _ in range(rng.choice([5, 20, 60, 150])):
                value = [value] if rng.random() < 0.5 else {"k": value}
            args[name] = value
        elif how == "unicode":
            args[name] = "".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 200)))
        elif how == "unknown":
            args[rng.choice(["extra", "limitt", "__proto__", "ctx", "x" * 500])] = rng.choice(WEIRD_NUMBERS)
        elif how == "drop" and args:
            args.pop(rng.choice(list(args)))
        elif how == "cursor" and "cursor" in props:
            args["cursor"] = self.tampered_cursor()
        elif how == "big":
            args[name] = rng.choice(["x" * rng.choice([1_001, 100_000, 1_000_000]), list(range(20_000)),
                                     {str(i): i for i in range(5_000)}])

    def tampered_cursor(self) -> str:
        rng = self.rng
        if not self.cursor or rng.random() < 0.2:
            return rng.choice(["", "!!!", "e30=", base64.urlsafe_b64encode(b"[1,2]").decode(), "A" * 5_000])
        payload = json.loads(base64.urlsafe_b64decode(self.cursor))
        payload[rng.choice(list(payload))] = rng.choice([{"a": 1}, [1], 2**70, None, "x", 1.5, True, -(2**63)])
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


async def fuzz(client: Client, calls: int, seed: int) -> Report:
    """`calls` fuzzed tool calls on a connected client; the report says how each was answered."""
    schemas = {t.name: t.input_schema for t in (await client.list_tools()).tools}
    first = await client.call_tool("query_models", {"limit": 1})
    fuzzer = Fuzzer(seed, schemas, (first.structured_content or {}).get("next_cursor"))
    report = Report()
    for _ in range(calls):
        tool, args = fuzzer.call()
        try:
            result = await client.call_tool(tool, args)
        except MCPError as exc:
            report.add("protocol_error", tool, args, str(exc))
            continue
        text = "\n".join(getattr(c, "text", "") for c in result.content)
        report.add(classify(bool(result.is_error), text), tool, args, text)
    return report
