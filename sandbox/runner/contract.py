"""Load a submitted model file and check it against LEMUR's Net contract before anything runs.

Why check up front: an agent learns most from a message that says exactly what to add ("define
`def learn(self, train_data)` in class Net"), not from an AttributeError deep inside the training loop.

The contract (LEMUR nn-dataset):
  * module-level `supported_hyperparameters()` returning a set of hyperparameter names;
  * `class Net(torch.nn.Module)` with `__init__(self, in_shape, out_shape, prm, device)`,
    `train_setup(self, prm)`, `learn(self, train_data)` and `forward(self, x)` returning logits.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from sandbox import protocol
from sandbox.runner.errors import RunnerFailure, describe, traceback_tail

MODULE_NAME = "submitted_model"  # a fixed name: dataclasses/pickle need the module in sys.modules

_EXAMPLE = (
    "\n\nMinimal skeleton:\n"
    "def supported_hyperparameters():\n    return {'lr', 'momentum'}\n\n"
    "class Net(nn.Module):\n"
    "    def __init__(self, in_shape, out_shape, prm, device): ...\n"
    "    def train_setup(self, prm): ...  # create self.criteria and self.optimizer\n"
    "    def learn(self, train_data): ...  # for inputs, labels in train_data: one optimizer step each\n"
    "    def forward(self, x): ...  # logits of shape (batch, out_shape[0])"
)


def load_module(path: str | Path) -> ModuleType:
    """Import the model file. SyntaxError -> kind syntax; anything else raised on import -> exception."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path))
    if spec is None or spec.loader is None:
        raise RunnerFailure(
            protocol.KIND_SANDBOX, f"cannot load a Python module from {path}", protocol.STAGE_CHECK
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        where = f"line {exc.lineno}, column {exc.offset}" if exc.lineno else "unknown position"
        raise RunnerFailure(
            protocol.KIND_SYNTAX,
            f"SyntaxError at {where}: {exc.msg}",
            protocol.STAGE_CHECK,
            traceback_tail(exc),
        ) from exc
    except BaseException as exc:  # SystemExit/KeyboardInterrupt from model code too
        raise RunnerFailure(
            protocol.KIND_EXCEPTION,
            f"importing the model failed: {describe(exc)}",
            protocol.STAGE_CHECK,
            traceback_tail(exc),
        ) from exc
    return module


def _binds(func: Callable[..., Any], *args: Any) -> bool:
    try:
        inspect.signature(func).bind(*args)
    except TypeError:
        return False
    except ValueError:  # builtins without a signature: assume fine
        return True
    return True


def _method_problem(net: type, name: str, args: tuple[str, ...], doc: str) -> str | None:
    func = getattr(net, name, None)
    signature = f"def {name}(self{''.join(', ' + a for a in args)})"
    if func is None or not callable(func):
        return f"class Net has no method `{name}`: add `{signature}` ({doc})."
    if name == "forward" and func is torch.nn.Module.forward:
        return f"class Net does not override `forward`: add `{signature}` ({doc})."
    if not _binds(func, *(("self",) + args)):
        return f"`Net.{name}` has the wrong signature {inspect.signature(func)}: it must be `{signature}`."
    return None


def contract_problems(module: ModuleType) -> list[str]:
    """Everything missing or malformed in the module, each as an instruction to fix it."""
    problems: list[str] = []
    shp = getattr(module, "supported_hyperparameters", None)
    if shp is None or not callable(shp):
        problems.append(
            "the module has no function `supported_hyperparameters()`: add "
            "`def supported_hyperparameters(): return {'lr', 'momentum'}` at module level, "
            "listing every prm key your Net reads besides batch/epoch/transform."
        )
    elif not _binds(shp):
        problems.append("`supported_hyperparameters` must take no arguments.")
    net = getattr(module, "Net", None)
    if net is None:
        problems.append(
            "the module defines no `Net`: add `class Net(torch.nn.Module)` with "
            "__init__(self, in_shape, out_shape, prm, device), train_setup, learn and forward."
        )
        return problems
    if not (isinstance(net, type) and issubclass(net, torch.nn.Module)):
        problems.append("`Net` must be a class deriving from torch.nn.Module: `class Net(nn.Module):`.")
        return problems
    for name, args, doc in (
        (
            "__init__",
            ("in_shape", "out_shape", "prm", "device"),
            "in_shape=(1, C, H, W), out_shape=(num_classes,), prm=dict of hyperparameters, device",
        ),
        ("train_setup", ("prm",), "create the loss and optimizer from prm"),
        ("learn", ("train_data",), "iterate (inputs, labels) batches for one epoch and step the optimizer"),
        ("forward", ("x",), "return logits of shape (batch, num_classes)"),
    ):
        problem = _method_problem(net, name, args, doc)
        if problem:
            problems.append(problem)
    return problems


def declared_hyperparameters(module: ModuleType) -> set[str]:
    """Call `supported_hyperparameters()`; it must return names (set, list or tuple of str)."""
    try:
        names = module.supported_hyperparameters()
    except Exception as exc:
        raise RunnerFailure(
            protocol.KIND_EXCEPTION,
            f"supported_hyperparameters() raised {describe(exc)}",
            protocol.STAGE_CHECK,
            traceback_tail(exc),
        ) from exc
    if isinstance(names, dict):
        names = list(names)
    if not isinstance(names, set | frozenset | list | tuple) or not all(isinstance(n, str) for n in names):
        raise RunnerFailure(
            protocol.KIND_CONTRACT,
            f"supported_hyperparameters() must return a set of names like {{'lr', 'momentum'}}, "
            f"got {type(names).__name__}: {str(names)[:200]}",
            protocol.STAGE_CHECK,
        )
    return set(names)


def load_and_check(path: str | Path) -> tuple[ModuleType, set[str]]:
    """Import the model and verify the contract; raises RunnerFailure with an actionable message."""
    module = load_module(path)
    problems = contract_problems(module)
    if problems:
        raise RunnerFailure(
            protocol.KIND_CONTRACT,
            "The model does not follow the Net contract:\n- " + "\n- ".join(problems) + _EXAMPLE,
            protocol.STAGE_CHECK,
        )
    return module, declared_hyperparameters(module)
