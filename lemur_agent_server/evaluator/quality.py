"""Code quality in [0, 1] from ruff and radon: static analysis only, the code never runs.

Formula (documented for agents; LEMUR's pylint-based score is the model, with ruff instead of pylint):

    penalty = 5 * errors        (ruff F: undefined names, unused imports that shadow, syntax-level bugs; E9)
            + 2 * bug_risks     (ruff B: likely bugs such as mutable defaults)
            + 1 * style         (ruff E and W: pycodestyle, max line length 120)
            + 1 * complex_blocks (radon: functions/methods with cyclomatic complexity > 10)
            + 2 * very_complex  (radon: complexity > 20, on top)
    score = max(0, 100 - penalty) / 100

The breakdown lists the counts, the first messages with line numbers, and radon's maintainability
index (reported, not scored) so an agent can act on it.

When the code cannot be scored at all (nested beyond the static checks' bound, a lone surrogate, or
ruff failing), the score is None and the breakdown's `error` says why: a field, never an exception,
because the score is computed on the host for code nobody has vetted yet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from radon.complexity import cc_visit
from radon.metrics import mi_visit

from lemur_agent_server.evaluator.static_checks import unreadable

RUFF_SELECT = "E,W,F,B"
# A failed ruff run is tried once more (ruff_findings; radon runs in-process and is not retried): a busy host
# can fail a subprocess (a thread it could not start, a time-out) where the code is not to blame, and a
# model scored None stays unscored until analyzed again.
TOOL_ATTEMPTS = 2
WEIGHTS = {"errors": 5, "bug_risks": 2, "style": 1, "complex_blocks": 1, "very_complex_blocks": 2}


def _ruff_executable() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    return [found] if found else [sys.executable, "-m", "ruff"]


def ruff_findings(code: str) -> list[dict[str, Any]]:
    """ruff's JSON findings for the code, fed on stdin (no file is written, nothing is executed)."""
    cmd = [*_ruff_executable(), "check", "--no-cache", "--isolated", "--select", RUFF_SELECT,
           "--line-length", "120", "--output-format", "json", "--stdin-filename", "model.py", "-"]
    for attempt in range(1, TOOL_ATTEMPTS + 1):
        try:
            proc = subprocess.run(cmd, input=code, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            if attempt == TOOL_ATTEMPTS:
                raise
            continue
        if proc.returncode in (0, 1):
            return json.loads(proc.stdout or "[]")
        if attempt == TOOL_ATTEMPTS:
            raise RuntimeError(f"ruff failed: {proc.stderr[-500:]}")
    raise AssertionError("unreachable: the last attempt returns or raises")


def _category(code: str | None) -> str:
    if not code:
        return "errors"  # ruff reports syntax errors without a code
    if code.startswith("F") or code.startswith("E9"):
        return "errors"
    if code.startswith("B"):
        return "bug_risks"
    return "style"


FORMULA = "max(0, 100 - 5*errors - 2*bug_risks - 1*style - 1*complex_blocks - 2*very_complex_blocks) / 100"
TOOLS = {"ruff_select": RUFF_SELECT, "radon": "cc, mi"}


def not_scored(reason: str) -> tuple[None, dict[str, Any]]:
    return None, {"score": None, "error": f"not scored: {reason}", "formula": FORMULA, "tools": TOOLS}


def code_quality(code: str) -> tuple[float | None, dict[str, Any]]:
    """(score in [0, 1] or None, breakdown). Never raises: a parse failure scores 0, code no tool can
    read (or a tool failure) scores None with the reason in the breakdown's `error`."""
    blocked = unreadable(code)
    if blocked is not None:
        return not_scored(blocked.message)
    try:
        return _score(code)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, RecursionError, MemoryError) as exc:
        return not_scored(f"the scoring tools failed ({type(exc).__name__}: {str(exc)[:200]})")


def _score(code: str) -> tuple[float, dict[str, Any]]:
    counts = {key: 0 for key in WEIGHTS}
    messages: list[str] = []
    for finding in ruff_findings(code):
        counts[_category(finding.get("code"))] += 1
        if len(messages) < 15:
            row = (finding.get("location") or {}).get("row")
            messages.append(f"line {row}: {finding.get('code')} {finding.get('message')}")
    complexities: list[dict[str, Any]] = []
    maintainability = None
    try:
        for block in cc_visit(code):
            if block.complexity > 10:
                counts["complex_blocks"] += 1
                complexities.append({"name": block.name, "line": block.lineno, "complexity": block.complexity})
            if block.complexity > 20:
                counts["very_complex_blocks"] += 1
        maintainability = round(mi_visit(code, multi=True), 1)
    except SyntaxError:
        counts["errors"] += 20
    penalty = sum(WEIGHTS[k] * v for k, v in counts.items())
    score = max(0.0, 100.0 - penalty) / 100.0
    detail = {"score": score, "formula": FORMULA, "counts": counts, "messages": messages,
              "complex_blocks": complexities[:10], "maintainability_index": maintainability, "tools": TOOLS}
    return score, detail
