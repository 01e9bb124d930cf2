"""Checks that need no execution: syntax and the presence of the Net contract's names.

Why on the host: they answer in milliseconds and need no sandbox, so an agent with a typo learns it
before any container or process starts. Everything that needs the code to run (signatures, shapes)
is checked by the runner inside the sandbox.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize

from sandbox import protocol

MAX_CODE_CHARS = 400_000
# Deepest AST a submission may have. Real model code stays under 30 levels (torch.nn's own modules:
# at most 25); radon's recursive visitors fail near 330 and CPython's parser near 3,000 (3.11).
MAX_NESTING = 100
# Tokens one chain may hold before parsing (see _token_chain): far below the parser's limit, so
# ast.parse never meets input it cannot nest; far above what a flat statement needs.
MAX_TOKEN_CHAIN = 1_000
_OPENING, _CLOSING = "([{", ")]}"
_SEPARATORS = (",", ";", "=")


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


# Bases whose methods we know: a Net on any other base (LEMUR's `class Net(ModuleWrapper)`) may inherit
# forward() or learn() from it, which only the sandbox's runtime check can see.
_PLAIN_MODULE_BASES = frozenset({"Module", "nn.Module", "torch.nn.Module"})


def _net_methods(tree: ast.Module) -> set[str] | None:
    """The methods class Net defines itself, or None when Net is absent or a base class may provide them."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Net":
            if any(ast.unparse(base) not in _PLAIN_MODULE_BASES for base in node.bases):
                return None
            defined = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assigned = {t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                        if isinstance(t, ast.Name)}
            return defined | assigned
    return None


def _too_deep(line: int | None, what: str) -> Problem:
    where = f" at line {line}" if line else ""
    return Problem(protocol.KIND_SYNTAX, f"expression nested too deeply{where}: {what}; at most {MAX_NESTING} levels "
                   "are allowed. Split it into smaller steps with intermediate variables and check again.", line=line)


def _surrogate(code: str) -> Problem | None:
    """A lone surrogate (possible in JSON text) cannot be encoded, so no parser or tool can read the file."""
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as exc:
        line = code.count("\n", 0, exc.start) + 1
        return Problem(protocol.KIND_SYNTAX, f"the code holds a lone surrogate U+{ord(code[exc.start]):04X} at line "
                       f"{line}, which is not valid Unicode text. Remove it and check again.", line=line)
    return None


def _token_chain(code: str) -> Problem | None:
    """Bound the nesting BEFORE parsing, from tokens alone (the tokenizer is iterative).

    An upper bound of the expression depth: the tokens since the last separator (`,` `;` `=`) at
    each bracket level, summed over the open brackets. Flat lists and long calls stay small;
    `- - - 1`, `a + a + a` and `x[0][0]` chains grow by one per link, as their AST does."""
    stack = [0]
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                stack = [0]
                continue
            if tok.type not in (tokenize.OP, tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
                continue
            if tok.string in _CLOSING:
                if len(stack) > 1:
                    stack.pop()
            elif tok.string in _SEPARATORS:
                stack[-1] = 0
            else:
                stack[-1] += 1
                if tok.string in _OPENING:
                    stack.append(0)
                if sum(stack) > MAX_TOKEN_CHAIN:
                    return _too_deep(tok.start[0], f"over {MAX_TOKEN_CHAIN:,} operators, operands or brackets "
                                     "in one chain")
    except (tokenize.TokenError, SyntaxError):
        return None  # unbalanced or badly indented: ast.parse reports it with line and column
    return None


def _ast_depth(tree: ast.AST) -> tuple[int, int | None]:
    """(deepest level, its line), walked with an explicit stack: no recursion on untrusted input."""
    deepest, line = 0, None
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest, line = depth, getattr(node, "lineno", line)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest, line


def _parse(code: str) -> tuple[ast.Module | None, Problem | None, bool]:
    """(tree, problem, unreadable): unreadable problems (lone surrogates, nesting beyond the bounds)
    stop every tool, while an ordinary syntax error still lets ruff report on the text."""
    problem = _surrogate(code) or _token_chain(code)
    if problem:
        return None, problem, True
    try:
        tree = ast.parse(code, filename="model.py")
    except SyntaxError as exc:
        return None, Problem(protocol.KIND_SYNTAX, f"{exc.msg} (line {exc.lineno}, column {exc.offset}): "
                             f"{(exc.text or '').strip()[:200]}. Fix the syntax and check again.",
                             line=exc.lineno, column=exc.offset), False
    except (RecursionError, MemoryError):  # the parser's own depth limits (nesting inside f-strings)
        return None, _too_deep(None, "deeper than the parser can read"), True
    except ValueError as exc:  # e.g. null bytes on some Python versions
        return None, Problem(protocol.KIND_SYNTAX, f"{str(exc)[:200]}. Fix the code and check again."), False
    depth, line = _ast_depth(tree)
    if depth > MAX_NESTING:
        return None, _too_deep(line, f"{depth} levels deep"), True
    return tree, None, False


def parse_bounded(code: str) -> tuple[ast.Module | None, Problem | None]:
    """Parse untrusted code without ever raising: (tree, None) or (None, the syntax problem)."""
    tree, problem, _ = _parse(code)
    return tree, problem


def unreadable(code: str) -> Problem | None:
    """Why no tool may read this code (the code-quality score's radon and ruff recurse), or None.
    An ordinary syntax error is not unreadable: ruff still reports on it."""
    _, problem, blocked = _parse(code)
    return problem if blocked else None


def declared_literal(tree: ast.Module) -> tuple[set[str], int] | None:
    """The names `supported_hyperparameters()` returns and its line, when its body is one literal `return`
    of strings (the usual form); None when only running it can tell."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "supported_hyperparameters":
            body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
            if len(body) != 1 or not isinstance(body[0], ast.Return):
                return None
            value = body[0].value
            if not isinstance(value, ast.Set | ast.List | ast.Tuple):
                return None
            if not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
                return None
            return {e.value for e in value.elts}, node.lineno  # type: ignore[attr-defined]
    return None


def prm_problems(code: str, prm: dict[str, object]) -> list[Problem]:
    """Fixed prm keys a literal supported_hyperparameters() does not declare (the sandbox's check refuses
    the same keys when the names are computed)."""
    if not prm:
        return []
    tree, _ = parse_bounded(code)
    found = declared_literal(tree) if tree is not None else None
    if found is None:
        return []
    declared, line = found
    unknown = sorted(set(prm) - declared - {"batch", "epoch", "transform"})
    if not unknown:
        return []
    return [Problem(protocol.KIND_CONTRACT, protocol.unknown_prm_message(unknown, sorted(declared)), line=line)]


def static_problems(code: str) -> list[Problem]:
    """Syntax errors (with line and column) and missing contract names. Empty list: go on."""
    if len(code) > MAX_CODE_CHARS:
        return [Problem(protocol.KIND_CONTRACT,
                        f"The code has {len(code)} characters; the limit is {MAX_CODE_CHARS}. Shorten it.")]
    tree, problem = parse_bounded(code)
    if tree is None:
        assert problem is not None
        return [problem]
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
