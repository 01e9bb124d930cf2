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
