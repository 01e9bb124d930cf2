"""Over a real stdio subprocess, every line gets a JSON-RPC answer: mcp 2.3.0 answers nothing to a
line it cannot parse (deep nesting, huge integers, broken JSON, JSON that is not JSON-RPC), so
the server's guard answers -32700 or -32600 itself, with the request's id when it can be read."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.zoo_factory import build_zoo


class Wire:
    """The server's stdin and stdout as lines, with a timeout on every read."""

    def __init__(self, zoo: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "lemur_agent_server", "--zoo", str(zoo), "--no-worker"],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.buffer = b""

    def send(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def request(self, request_id: int, method: str, params: dict | None = None) -> None:
        self.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}))

    def receive(self, timeout: float = 30) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            assert ready, "no answer from the server"
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            assert chunk, "the server closed stdout"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: each test also checks that it still answers afterwards."""
    import anyio

    zoo = tmp_path_factory.mktemp("stdio") / "zoo.sqlite"

    async def make() -> None:
        store = await build_zoo(zoo, n_models=2)
        await store.close()

    anyio.run(make)
    w = Wire(zoo)
    w.request(1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                "clientInfo": {"name": "test", "version": "1"}})
    assert w.receive(60)["id"] == 1
    w.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    yield w
    w.close()


def call(tool: str, arguments_json: str, request_id: int) -> str:
    return (f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", '
            f'"params": {{"name": "{tool}", "arguments": {arguments_json}}}}}')


BAD_LINES = {
    "nested_300": (call("get_model", '{"name": ' + "[" * 300 + "]" * 300 + "}", 7), -32700, 7),
    "nested_5000": (call("get_model", '{"name": ' + "[" * 5000 + "]" * 5000 + "}", 8), -32700, 8),
    "digits_5000": (call("leaderboard", '{"offset": ' + "9" * 5000 + "}", 9), -32700, 9),
    "broken_json": ("{bad json", -32700, None),
    "not_jsonrpc": ('{"hello": "world"}', -32600, None),
    "method_not_a_string": ('{"jsonrpc": "2.0", "id": 10, "method": 5}', -32600, 10),
    "batch": ("[]", -32600, None),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_every_malformed_line_gets_an_error_and_the_server_goes_on(wire, name):
    line, code, request_id = BAD_LINES[name]
    wire.send(line)
    answer = wire.receive()
    assert answer["jsonrpc"] == "2.0" and answer["id"] == request_id
    assert answer["error"]["code"] == code
    assert "JSON-RPC 2.0 message per line" in answer["error"]["message"]
    wire.request(2, "tools/call", {"name": "get_model", "arguments": {"name": "rag-m1", "include_code": False}})
    after = wire.receive()
    assert after["id"] == 2 and after["result"]["structuredContent"]["name"] == "rag-m1"


def test_a_nan_argument_is_refused_by_the_tool_door(wire):
    wire.send(call("query_models", '{"epoch": NaN}', 11))  # pydantic-core's JSON reader accepts NaN
    answer = wire.receive()
    assert answer["id"] == 11 and answer["result"]["isError"] is True
    assert "not a finite number" in answer["result"]["content"][0]["text"]


def test_an_oversized_line_is_answered_without_buffering_it(wire):
    wire.send(b'{"jsonrpc": "2.0", "id": 12, "method": "tools/list", "x": "' + b"a" * (17 * 1024 * 1024) + b'"}')
    answer = wire.receive(60)
    assert answer["id"] is None and answer["error"]["code"] == -32700
    assert "larger than 16,777,216 bytes" in answer["error"]["message"]
    wire.request(3, "tools/list")
    assert wire.receive()["id"] == 3
