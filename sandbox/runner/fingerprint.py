"""Architecture fingerprint and FLOP count of a built model.

Why trace aten ops instead of hashing code or module names: two agents may write the same network very
differently (nn.Sequential vs separate attributes, nn.ReLU(inplace=True) vs F.relu, x.view vs flatten).
At the dispatcher level those all become the same sequence of aten ops on the same shapes, so the
fingerprint identifies the *computation*, which is what a zoo de-duplicates on. Scalar arguments are left
out on purpose (F.max_pool2d(x, 2) and nn.MaxPool2d(2) pass stride differently) - they show up in the
output shapes anyway. Parameter shapes are added (sorted, without names) to separate nets that differ
only in parameters that the trace does not see.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

# Ops that only alias or re-wrap a tensor; whether they appear depends on coding style, not architecture.
_IGNORED_OPS = frozenset(
    {"detach", "alias", "lift_fresh", "lift_fresh_copy", "_to_copy", "clone", "contiguous", "_unsafe_view"}
)


def _op_name(func: Any) -> str:
    name = func.overloadpacket.__name__
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # in-place variant (relu_) == functional (relu)
    return name


def _shapes(tree: Any) -> list[list[Any]]:
    return [
        [str(t.dtype).removeprefix("torch."), *t.shape]
        for t in tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    ]


class OpRecorder(TorchDispatchMode):
    """Records (op, overload, input shapes, output shapes) for every aten op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[list[Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name not in _IGNORED_OPS:
            self.ops.append([name, func._overloadname, _shapes((args, kwargs)), _shapes(out)])
        return out


def fingerprint(model: torch.nn.Module, x: torch.Tensor) -> str:
    """sha256 of the aten-op trace of `model(x)` (eval mode, no grad) plus the sorted parameter shapes.

    The caller passes a batch-1 input made with a fixed seed and puts the model in eval mode.
    """
    recorder = OpRecorder()
    with torch.no_grad(), recorder:
        model(x)
    params = sorted(list(p.shape) for p in model.parameters())
    blob = json.dumps({"ops": recorder.ops, "params": params}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs (multiply-add = 2) of `model(x)` as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())
