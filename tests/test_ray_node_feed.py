"""The Ray node's feed of a sandbox's out/ to the host (`ray_executor.OutFeed`), without a cluster.

The runner writes a file (a point's predictions) and then appends the event that names it; the host
parses each event as soon as it has it. So every event the feed hands over must come with the
complete file it names, whenever the runner writes while the feed looks. Real threads and files: a
writer that behaves like the runner (the file in two writes, then the event), a reader that behaves
like the host, and many other files in out/ (what a submission may leave there) to make each look
at out/ take long enough for the runner to write in the middle of it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from lemur_agent_server.evaluator.ray_executor import OutFeed, _write_files
from sandbox import protocol

POINTS = 150
PADDING = 3000


def _runner(out: Path, stop: threading.Event) -> None:
    """Write POINTS predictions files, each in two writes, and after each the event that names it."""
    events = out / protocol.EVENTS_FILE
    for n in range(POINTS):
        rel = f"preds/p{n}.npy"
        with open(out / rel, "wb") as f:
            f.write(b"head" * 64)
            f.flush()
            time.sleep(0.0002)  # a reader may see the file half written
            f.write(b"body" * 256)
        with open(events, "a") as f:
            f.write(json.dumps({"event": "point", "preds": rel}) + "\n")
        time.sleep(0.001)
    stop.set()


def test_every_event_the_host_gets_comes_with_the_complete_file_it_names(tmp_path: Path):
    out, host = tmp_path / "node-out", tmp_path / "host-out"
    (out / "preds").mkdir(parents=True)
    host.mkdir()
    for i in range(PADDING):  # files the code left in out/: each look at out/ stats them all
        (out / "preds" / f"pad{i}").write_bytes(b"")
    feed = OutFeed(out)
    stop = threading.Event()
    writer = threading.Thread(target=_runner, args=(out, stop))
    writer.start()
    offset, pending, seen, missing = 0, b"", 0, []
    while True:
        ended = stop.is_set()
        files, chunk = feed.read(offset)
        _write_files(host, files)  # as the host does: the files first, then the events
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            rel = json.loads(line)["preds"]
            seen += 1
            got = (host / rel).read_bytes() if (host / rel).is_file() else None
            if got != (out / rel).read_bytes():  # absent, or half of it
                missing.append(rel)
        if ended and not chunk:
            break
    writer.join()
    assert seen == POINTS
    assert missing == []  # no event arrived before (all of) its file


def _append_event_later(out: Path, delay_s: float) -> threading.Thread:
    def append() -> None:
        time.sleep(delay_s)
        with open(out / protocol.EVENTS_FILE, "a") as f:
            f.write(json.dumps({"event": "ready"}) + "\n")
    writer = threading.Thread(target=append)
    writer.start()
    return writer


def test_a_poll_waits_on_the_node_for_the_next_event_and_hands_it_over_with_no_second_call(tmp_path: Path):
    """The host's read is a long poll: it does not come back empty while the sandbox runs and writes
    nothing (one Ray call per second of silence instead of ten), and it answers when the event comes,
    not at the end of its wait."""
    feed = OutFeed(tmp_path)
    writer = _append_event_later(tmp_path, 0.3)
    began = time.monotonic()
    files, chunk, done = feed.poll(0, wait_s=30, ended=lambda: False)
    waited = time.monotonic() - began
    writer.join()
    assert (files, json.loads(chunk), done) == ({}, {"event": "ready"}, False)
    assert 0.3 <= waited < 30  # it waited for the event, and stopped waiting when it came


def test_a_poll_answers_at_once_when_the_sandbox_has_ended(tmp_path: Path):
    feed = OutFeed(tmp_path)
    began = time.monotonic()
    assert feed.poll(0, wait_s=30, ended=lambda: True) == ({}, b"", True)
    assert time.monotonic() - began < 30


def test_a_poll_with_nothing_new_comes_back_empty_after_its_wait(tmp_path: Path):
    (tmp_path / protocol.EVENTS_FILE).write_text(json.dumps({"event": "ready"}) + "\n")
    feed = OutFeed(tmp_path)
    offset = (tmp_path / protocol.EVENTS_FILE).stat().st_size  # the host has every event already
    began = time.monotonic()
    assert feed.poll(offset, wait_s=0.2, ended=lambda: False) == ({}, b"", False)
    assert time.monotonic() - began >= 0.2
