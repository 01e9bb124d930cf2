"""Registering plain functions' MCP wrappers under the tool's public name.

Why: the tool logic lives in module-level functions (`check_model(state, request)`, ...), so the MCP
wrapper of a tool needs another Python name inside its `register_*` function; the SDK names a tool's
argument schema after the wrapper (`<name>Arguments`), and the schema a client sees must not change
with that internal name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from mcp.server import MCPServer
from mcp.types import ToolAnnotations

F = TypeVar("F", bound=Callable[..., Any])


def tool(mcp: MCPServer, name: str, annotations: ToolAnnotations, **options: Any) -> Callable[[F], F]:
    """`mcp.tool(name=name, ...)`, with the wrapper renamed to `name` first (its schema titles follow)."""

    def register(fn: F) -> F:
        fn.__name__ = fn.__qualname__ = name
        return mcp.tool(name=name, annotations=annotations, **options)(fn)

    return register
