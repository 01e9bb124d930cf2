"""Checks that need no execution: syntax and the presence of the Net contract's names.

Why on the host: they answer in milliseconds and need no sandbox, so an agent with a typo learns it
before any container or process starts. Everything that needs the code to run (signatures, shapes)
is checked by the runner inside the sandbox.
"""

from __future__ import annotations

import ast
import dataclasses

from sandbox import protocol

MAX_CODE_CHARS = 400_000


@dataclasses.dataclass
class Problem:
    kind: str  # a protocol failure kind
    message: str
    line: int | None = None
    column: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _net_methods(tree: ast.Module) -> set[str] | None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Net":
            return {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return None


def static_problems(code: str) -> list[Problem]:
    """Syntax errors (with line and column) and missing contract names. Empty list: go on."""
    if len(code) > MAX_CODE_CHARS:
        return [Problem(protocol.KIND_CONTRACT,
                        f"The code has {len(code)} characters; the limit is {MAX_CODE_CHARS}. Shorten it.")]
    try:
        tree = ast.parse(code, filename="model.py")
    except SyntaxError as exc:
        return [Problem(protocol.KIND_SYNTAX, f"{exc.msg} (line {exc.lineno}, column {exc.offset}): "
                        f"{(exc.text or '').strip()[:200]}. Fix the syntax and check again.",
                        line=exc.lineno, column=exc.offset)]
    problems: list[Problem] = []
    names = _top_level_names(tree)
    if "supported_hyperparameters" not in names:
        problems.append(Problem(protocol.KIND_CONTRACT,
                                "Missing module-level function supported_hyperparameters() returning a set of "
                                "hyperparameter names, e.g. `def supported_hyperparameters(): return {'lr', "
                                "'momentum'}`."))
    if "Net" not in names:
        problems.append(Problem(protocol.KIND_CONTRACT,
                                "Missing class Net(torch.nn.Module) with __init__(self, in_shape, out_shape, prm, "
                                "device), train_setup(self, prm), learn(self, train_data) and forward(self, x)."))
    methods = _net_methods(tree)
    if methods is not None:
        for required in ("__init__", "train_setup", "learn", "forward"):
            if required not in methods:
                problems.append(Problem(protocol.KIND_CONTRACT,
                                        f"class Net defines no {required}(); the contract needs it (unless a "
                                        "base class provides it, add it to Net)."))
    return problems
