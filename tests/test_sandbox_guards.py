"""The host-side guards that do not trust what a sandbox writes: the events reader, the out/ watchdog,
the training-time clamp and the setuid filter's program. End-to-end, the hostile suite drives them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from lemur_agent_server.evaluator.pipeline import MIN_TRAIN_SHARE, _check_failure, trusted_duration
from sandbox import _namespaces, protocol
from sandbox.backend import (
    MAX_EVENT_LINE,
    Exit,
    Handle,
    JobPaths,
    Limits,
    LogTail,
    OutDirWatch,
    _LineReader,
    out_usage,
)


def test_line_reader_drops_an_overlong_line_whole_and_keeps_the_rest() -> None:
    reader = _LineReader()
    long = b"x" * (MAX_EVENT_LINE + 10)
    lines = reader.feed(b'{"a":1}\n' + long[: MAX_EVENT_LINE // 2])
    lines += reader.feed(long[MAX_EVENT_LINE // 2:])  # the buffer passes the cap here: dropped
    lines += reader.feed(b'tail of the long line\n{"b":2}\n{"c"')
    lines += reader.feed(b":3}\n")
    assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


class _FinishedHandle(Handle):
    """A handle whose sandbox has already ended: `events()` reads the file once to its end."""

    def __init__(self, paths: JobPaths) -> None:
        self.paths = paths

    async def wait(self) -> Exit:
        return Exit(exit_code=0)

    async def cancel(self) -> None:
        return None

    def finished(self) -> bool:
        return True


@pytest.mark.anyio
async def test_events_keep_only_json_objects_with_an_event_name(tmp_path: Path) -> None:
    paths = JobPaths(job_dir=tmp_path, data_dir=tmp_path)
    paths.out_dir.mkdir()
    flood = b'{"event": "warning"}\n' * 5000  # parsed in a worker thread (a burst)
    junk = (b'not json\n[1, 2]\n{"no_event": 1}\n{"event": 7}\n' + b"[" * (MAX_EVENT_LINE + 1) + b"\n"
            + b'{"event": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    (paths.out_dir / protocol.EVENTS_FILE).write_bytes(flood + junk + b'{"event": "done", "best_trial": 0}')
    got = [e async for e in _FinishedHandle(paths).events(poll_s=0.01)]
    assert len(got) == 5000 and got[0] == {"event": "warning"}
    # the last line has no newline yet: a line is only read once it is complete
    assert all(e["event"] == "warning" for e in got)


def test_out_usage_counts_allocated_blocks_and_entries(tmp_path: Path) -> None:
    (tmp_path / "dense").write_bytes(os.urandom(1 << 20))
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB apparent, nothing allocated
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to("/etc/passwd")
    used, entries = out_usage(tmp_path, 100)
    assert (1 << 20) <= used < (1 << 20) + (1 << 17) and entries == 5


def test_out_dir_watch_stops_a_job_over_its_total_cap(tmp_path: Path) -> None:
    killed = threading.Event()
    watch = OutDirWatch(tmp_path, Limits(wall_s=1, out_cap_bytes=1 << 20), killed.set, lambda: killed.is_set())
    (tmp_path / "a").write_bytes(os.urandom(700 << 10))
    assert not watch.check() and watch.over_cap() is None and not killed.is_set()
    (tmp_path / "b").write_bytes(os.urandom(700 << 10))  # each file under the cap, together over it
    watch.start()
    assert killed.wait(5), "the watchdog never fired"
    assert "over its cap of 1 MiB" in (watch.exceeded or "")


def test_trusted_duration_is_clamped_to_what_the_host_saw() -> None:
    observed = 2_000_000_000
    assert trusted_duration(1_500_000_000, observed) == 1_500_000_000  # honest: the runner's own count
    assert trusted_duration(1, observed) == int(observed * MIN_TRAIN_SHARE)  # forged low: the floor
    assert trusted_duration(10**15, observed) == observed  # forged high: what the host saw
    assert trusted_duration("fast", observed) == observed and trusted_duration(float("nan"), observed) == observed


@pytest.mark.parametrize("arch", sorted(_namespaces._MODE_ARG))
def test_setid_filter_program_is_well_formed(arch: str) -> None:
    prog = _namespaces._seccomp_program(arch)
    assert len(prog) < 64
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code & 0x07 == 0x05:  # a jump: every target lies inside the program, forward only
            far = k if code == 0x05 else max(jt, jf)
            assert pc + 1 + far < len(prog), (pc, code, jt, jf, k)
    assert prog[-1] == (0x06, 0, 0, 0x7FFF0000) and prog[-2] == (0x06, 0, 0, 0x00050001)
    json.dumps(prog)  # plain integers only


def test_setid_filter_refuses_setuid_bits_and_allows_the_rest(tmp_path: Path) -> None:
    """In a child process (a filter is for life): chmod/open with a set-id bit fail, plain ones work."""
    import subprocess
    import sys

    target = tmp_path / "f"
    target.write_text("x")
    code = f"""
import errno, os, sys
sys.path.insert(0, {str(Path(_namespaces.__file__).parent)!r})
import _namespaces
_namespaces._forbid_setid_bits()
out = {{}}
for mode in (0o4755, 0o2755, 0o755):
    try:
        os.chmod({str(target)!r}, mode)
        out[oct(mode)] = oct(os.stat({str(target)!r}).st_mode & 0o7777)
    except OSError as e:
        out[oct(mode)] = errno.errorcode[e.errno]
try:
    os.close(os.open({str(tmp_path / "g")!r}, os.O_CREAT | os.O_WRONLY, 0o4755))
    out["open"] = "created"
except OSError as e:
    out["open"] = errno.errorcode[e.errno]
print(out)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert r.stdout.strip() == str({"0o4755": "EPERM", "0o2755": "EPERM", "0o755": "0o755", "open": "EPERM"})


def test_a_budget_spent_starting_the_sandbox_says_the_code_never_ran() -> None:
    # The phase as the pipeline leaves it (`Phase.check/error/ready`); a real cold start that outlasts
    # the budget depends on the disk, so the decision is checked on its inputs here.
    killed = Exit(exit_code=None, timed_out=True, wall_s=15.2, log_tail="")
    starting = _check_failure(SimpleNamespace(check=None, error=None, ready=None), killed)
    assert starting is not None and starting["kind"] == protocol.KIND_TIMEOUT and starting["started"] is False
    assert "still starting" in starting["message"]
    assert "before any of the submitted code ran" in starting["message"]
    assert "time_budget_s" in starting["message"]
    # once the runner was ready, a timeout in the check is the model's (an import or __init__ that hangs)
    running = _check_failure(SimpleNamespace(check=None, error=None, ready={"event": "ready"}), killed)
    assert running is not None and running["kind"] == protocol.KIND_TIMEOUT and "started" not in running
    assert running["message"] == "Killed after 15.2 s: the time budget ran out."


def test_log_tail_keeps_the_last_cap_bytes_and_says_it_cut() -> None:
    """Both backends keep a sandbox's output through MonitoredHandle's LogTail."""
    tail = LogTail(8)
    tail.feed(b"1234")
    tail.feed(b"5678")
    assert (tail.text(), tail.truncated) == ("12345678", False)
    tail.feed(b"9\xff")  # past the cap: the oldest bytes go; a torn UTF-8 sequence does not raise
    assert (tail.text(), tail.truncated) == ("3456789\ufffd", True)
