"""The server as a user starts it: a stdio subprocess, streamable HTTP with a token, and the MCP
Inspector CLI as an independent client. Traffic goes only to loopback listeners these tests start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import REPO
from tests.zoo_factory import build_zoo

pytestmark = pytest.mark.anyio
INSPECTOR = Path(os.environ.get("LEMUR_INSPECTOR", REPO / ".tools" / "node_modules" / ".bin" / "mcp-inspector"))


@pytest.fixture
async def zoo_file(tmp_path: Path) -> Path:
    path = tmp_path / "zoo.sqlite"
    store = await build_zoo(path, n_models=3)
    await store.close()
    return path


def server_args(zoo: Path, *extra: str) -> list[str]:
    return ["-m", "lemur_agent_server", "--zoo", str(zoo), "--no-worker", *extra]


async def test_stdio_subprocess(zoo_file: Path):
    params = StdioServerParameters(command=sys.executable, args=server_args(zoo_file), cwd=str(REPO))
    async with Client(params) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "query_models" in tools
        result = await client.call_tool("query_models", {"unique_nn": True, "limit": 5})
        assert not result.is_error
        assert result.structured_content["total"] == 3
        assert result.structured_content["rows"][0]["name"] == "alt-m2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


async def test_http_with_bearer_token(zoo_file: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, *server_args(zoo_file, "--http", "--port", str(port),
                                                          "--token", "s3cret")],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/mcp", method="POST", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(request, timeout=5)
        assert denied.value.code == 401
        for mode in ("auto", "legacy"):
            http = httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret"})
            async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http),
                              mode=mode) as client:
                result = await client.call_tool("get_model", {"name": "rag-m1", "include_code": False})
                assert not result.is_error and result.structured_content["name"] == "rag-m1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_refuses_public_bind_without_token(zoo_file: Path):
    proc = subprocess.run([sys.executable, *server_args(zoo_file, "--http", "--host", "0.0.0.0")],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "LEMUR_TOKEN"})
    assert proc.returncode == 2
    assert "without a token" in proc.stderr


def inspector(zoo: Path, *method_args: str) -> subprocess.CompletedProcess:
    assert INSPECTOR.exists(), (f"MCP Inspector CLI not found at {INSPECTOR}; install it with "
                                "`npm install --prefix .tools @modelcontextprotocol/inspector@2.12.0`")
    cmd = [str(INSPECTOR), "--cli", sys.executable, *server_args(zoo), "--", *method_args, "--format", "json", "-q"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


async def test_inspector_cli_drives_every_kind_of_endpoint(zoo_file: Path):
    listed = inspector(zoo_file, "--method", "tools/list")
    assert listed.returncode == 0, listed.stderr
    names = {t["name"] for t in json.loads(listed.stdout)["result"]["tools"]}
    assert {"list_catalog", "query_models", "get_model", "submit_model", "get_job", "cancel_job"} <= names

    query = inspector(zoo_file, "--method", "tools/call", "--tool-name", "query_models", "--tool-args-json",
                      json.dumps({"dataset": "mnist", "epoch": 2.0, "only_best_accuracy": True}))
    assert query.returncode == 0, query.stderr
    rows = json.loads(query.stdout)["result"]["structuredContent"]["rows"]
    assert [r["name"] for r in rows] == ["alt-m2", "rag-m1", "alt-m0"]

    missing = inspector(zoo_file, "--method", "tools/call", "--tool-name", "get_model", "--tool-arg", "name=nope")
    assert missing.returncode == 5  # the Inspector's exit code for isError results
    assert "Unknown model 'nope'" in missing.stdout + missing.stderr

    code = inspector(zoo_file, "--method", "resources/read", "--uri", "lemur://models/rag-m1/code")
    assert code.returncode == 0, code.stderr
    assert "class Net" in code.stdout

    prompt = inspector(zoo_file, "--method", "prompts/get", "--prompt-name", "design_model",
                       "--prompt-args", "task=img-classification", "dataset=mnist")
    assert prompt.returncode == 0, prompt.stderr
    assert "Net contract" in prompt.stdout
