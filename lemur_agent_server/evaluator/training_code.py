"""A signature of how a model trains, apart from its architecture: for reuse by architecture fingerprint.

Why: the architecture fingerprint (sandbox.runner.fingerprint) identifies what forward() computes and
the parameter shapes, nothing else. Two networks with the same fingerprint but another optimizer, loss,
learning-rate use or searched hyperparameters train to other results, so reusing one's result for the
other needs their training code to agree too. The signature is the syntax tree of every `Net` method
but `__init__` and `forward` (train_setup, learn and their helpers, in source order) and of
`supported_hyperparameters`, with the names that are the author's choice renamed in order of first
use: arguments, local variables and attributes of `self`. Library names (torch.optim.SGD vs Adam),
literals and prm keys stay, so only renaming, docstrings, `pass`, comments and layout make two training
codes equal.
Parameter initialisation in `__init__` is not compared: the fingerprint's notion of "same
architecture" covers it, as it does for every other use of the fingerprint.
"""

from __future__ import annotations

import ast
import hashlib

ARCHITECTURE_METHODS = frozenset({"__init__", "forward"})


class _Renamer(ast.NodeTransformer):
    """Renames one scope's own names (arguments, assigned locals, self attributes) to v0, v1, ..."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names  # shared across the methods of one class: self attributes span them
        self.local: set[str] = set()
        self.self_name: str | None = None

    def _rename(self, name: str) -> str:
        return self.names.setdefault(name, f"v{len(self.names)}")

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> ast.AST:
        args = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
        args += [a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None]
        stored = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        self.local = set(args) | stored
        self.self_name = args[0] if method and args else None
        body = node.body[1:] if node.body and _is_docstring(node.body[0]) else node.body
        node.body = body or [ast.Pass()]
        node.name, node.decorator_list, node.returns = "f", [], None
        return self.generic_visit(node)

    def visit_Pass(self, node: ast.Pass) -> None:  # a placeholder statement changes nothing
        return None

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg, node.annotation = self._rename(node.arg), None
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.local:
            node.id = self._rename(node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and node.value.id == self.self_name:
            node.attr = self._rename("self." + node.attr)
        self.generic_visit(node)
        return node


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _training_parts(tree: ast.Module) -> tuple[list[ast.FunctionDef | ast.AsyncFunctionDef],
                                               list[ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(Net's training methods in source order, the module's supported_hyperparameters functions)."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    methods = [m for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name == "Net"
               for m in cls.body if isinstance(m, functions) and m.name not in ARCHITECTURE_METHODS]
    declared = [f for f in tree.body if isinstance(f, functions) and f.name == "supported_hyperparameters"]
    return methods, declared


def training_signature(code: str) -> str | None:
    """sha256 of the renamed training code (see the module); None when the code does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):
        return None
    methods, declared = _training_parts(tree)
    shared: dict[str, str] = {}
    parts = [_Renamer(shared).function(m, method=True) for m in methods]
    parts += [_Renamer({}).function(f, method=False) for f in declared]
    blob = "\n".join(ast.dump(p, annotate_fields=False) for p in parts)
    return hashlib.sha256(blob.encode()).hexdigest()
