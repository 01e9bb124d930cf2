"""stdio transport that answers every line, a malformed one too.

Why: mcp 2.3.0's `mcp/server/stdio.py` (`stdin_reader`) parses each line with
`jsonrpc_message_adapter.validate_json` and, when that fails, pushes the exception into the read
stream; `mcp/shared/jsonrpc_dispatcher.py` (`JSONRPCDispatcher._dispatch`) drops exception items
with a debug log when no `on_stream_exception` observer is set (the server never sets one). So a
line that is not valid JSON, nests deeper than pydantic-core's JSON recursion limit (about 200
levels), holds an integer of more than ~4,300 digits, or is JSON but not a JSON-RPC message gets no
reply at all, and the client waits forever. JSON-RPC 2.0 (section 5.1) requires error -32700
(parse error) or -32600 (invalid request), with the request's id or null.

This module validates each line the same way before the SDK sees it, answers the ones that fail
with that error on the same stdout (line-atomic, under one lock with the SDK's writes), and hands
the rest to the SDK's own `stdio_server` unchanged. Lines are read with a size cap, so a client
cannot make the server buffer an endless line.

Because explicit streams make the SDK skip its own claim of fd 0 and fd 1, this module does the
same thing itself: while serving, fd 0 reads /dev/null and fd 1 writes to stderr, so child
processes and stray prints never touch the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import IO, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import mcp_types as types
from mcp.server.stdio import stdio_server

from lemur_agent_server.clip import clip

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 * 1024 * 1024  # one JSON-RPC message; a 400,000-character submission is ~0.5 MB
PARSE_ERROR, INVALID_REQUEST = -32700, -32600
_TOO_LARGE = b"\x00too large"
_ID_PREFIX = re.compile(r'^\s*\{[^{}\[\]]*?"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')
_LIMITS = ("Send one JSON-RPC 2.0 message per line: valid JSON, nested less than 190 levels deep, integers "
           "of at most 4,000 digits, at most 16 MiB.")


def recover_id(line: str) -> int | str | None:
    """The request id of a line that failed validation, when it can be read; None means id null."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        match = _ID_PREFIX.match(line)  # top-level keys before the first nested value
        if not match:
            return None
        try:
            message = {"id": json.loads(match.group(1))}
        except ValueError:
            return None
    found = message.get("id") if isinstance(message, dict) else None
    return found if isinstance(found, (int, str)) and not isinstance(found, bool) else None


def error_line(request_id: int | str | None, code: int, message: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}) + "\n"


def rejection(line: str) -> str | None:
    """The error reply for a line the SDK could not dispatch, or None when the line is fine."""
    try:
        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        return None
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the client gets an answer
        errors = exc.errors() if hasattr(exc, "errors") else [{"type": "json_invalid", "msg": str(exc)}]
    first = errors[0] if errors else {"type": "json_invalid", "msg": "unreadable"}
    if first.get("type") == "json_invalid":
        return error_line(recover_id(line), PARSE_ERROR, f"Parse error: {clip(first.get('msg'), 200)}. {_LIMITS}")
    return error_line(recover_id(line), INVALID_REQUEST,
                      "Invalid Request: not a JSON-RPC 2.0 request, notification or response object "
                      f"({clip(first.get('msg'), 120)} at {'.'.join(map(str, first.get('loc', ())))}). {_LIMITS}")


class LineWriter:
    """The wire's write side: one whole line per write, under one lock, so our replies and the SDK's
    messages never interleave."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.lock = anyio.Lock()

    def _put(self, data: bytes) -> None:
        self.raw.write(data)
        self.raw.flush()

    async def write(self, text: str) -> None:
        async with self.lock:
            await anyio.to_thread.run_sync(self._put, text.encode("utf-8"))

    async def flush(self) -> None:
        return None  # every write is flushed


class GuardedLines:
    """The wire's read side as the SDK iterates it: only lines it can parse; the others are answered.

    The blocking reads run in a daemon thread of ours (`_pump`), not in an anyio worker thread: a
    worker blocked in `readline` is joined when the process exits, so a server stopped (SIGTERM,
    Ctrl-C) while its client keeps stdin open would hang until the client hung up."""

    def __init__(self, raw: IO[bytes], out: LineWriter):
        self.raw = raw
        self.out = out
        self._send, self._receive = anyio.create_memory_object_stream[bytes | None](1)
        self._reader: threading.Thread | None = None
        self._stopped = threading.Event()

    def _pump(self, token: anyio.lowlevel.EventLoopToken) -> None:
        """Read lines into the stream until end of input (None), an unreadable input or a closed loop."""
        try:
            while not self._stopped.is_set():
                try:
                    line = self._read_line()
                except (OSError, ValueError):  # the descriptor went away: as the end of input
                    line = None
                anyio.from_thread.run(self._send.send, line, token=token)
                if line is None:
                    return
        except (anyio.RunFinishedError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # nobody reads any more

    def stop(self) -> None:
        """No more reads after the one in progress (the wire's descriptor is about to be closed)."""
        self._stopped.set()
        self._receive.close()

    def _read_line(self) -> bytes | None:
        line = self.raw.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := self.raw.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass  # skip the rest of the oversized line
            return _TOO_LARGE
        return line

    def __aiter__(self) -> GuardedLines:
        return self

    async def __anext__(self) -> str:
        if self._reader is None:
            self._reader = threading.Thread(target=self._pump, args=(anyio.lowlevel.current_token(),),
                                            name="lemur-stdio-reader", daemon=True)
            self._reader.start()
        while True:
            try:
                raw = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            if raw is None:
                raise StopAsyncIteration
            if raw is _TOO_LARGE:
                await self.out.write(error_line(None, PARSE_ERROR, f"Parse error: the message is larger than "
                                                                   f"{MAX_LINE_BYTES:,} bytes. {_LIMITS}"))
                continue
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            reply = rejection(line)
            if reply is None:
                return line
            log.info("answered a malformed stdio line with %s", reply[:120].strip())
            await self.out.write(reply)


def _claim(fd: int, stream: Any, mode: str) -> tuple[IO[bytes], Callable[[], None]]:
    """A private duplicate of the wire's fd, with fd itself pointed away (stdin: /dev/null, stdout:
    stderr) until the returned restore runs. A stream without a real fd is served in place."""
    try:
        if stream.buffer.fileno() != fd:
            raise OSError("not the process's own descriptor")
        private = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        return stream.buffer, lambda: None
    away = os.open(os.devnull, os.O_RDONLY) if fd == 0 else os.dup(2)
    os.dup2(away, fd)
    os.close(away)

    def restore() -> None:
        os.dup2(private, fd)
        os.close(private)

    return os.fdopen(private, mode, closefd=False), restore


@asynccontextmanager
async def guarded_stdio_server() -> AsyncIterator[tuple[Any, Any]]:
    """Like `mcp.server.stdio.stdio_server()`, with the line guard in front (the SDK's own code runs
    the streams; only what it reads and where it writes are ours)."""
    sys.stdout.flush()
    raw_in, restore_in = _claim(0, sys.stdin, "rb")
    raw_out, restore_out = _claim(1, sys.stdout, "wb")
    out = LineWriter(raw_out)
    lines = GuardedLines(raw_in, out)
    try:
        async with stdio_server(stdin=lines, stdout=out) as streams:  # type: ignore[arg-type]
            yield streams
    finally:
        lines.stop()
        restore_out()
        restore_in()
