"""Streamable HTTP transport with an optional bearer token.

Why our own small middleware: the token is a shared secret for a single operator, not OAuth; any
request without `Authorization: Bearer <token>` gets 401 before it reaches MCP. `/health` stays open.
"""

from __future__ import annotations

import hmac
from typing import Any

import uvicorn
from mcp.server import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class BearerToken:
    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_app(mcp: MCPServer, host: str, token: str | None) -> Any:
    @mcp.custom_route("/health", methods=["GET"])
    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = mcp.streamable_http_app(host=host)
    return BearerToken(app, token) if token else app


async def serve_http(mcp: MCPServer, host: str, port: int, token: str | None) -> None:
    config = uvicorn.Config(http_app(mcp, host, token), host=host, port=port, log_level="warning",
                            lifespan="on")
    await uvicorn.Server(config).serve()
