"""The ONNX file a sandbox exported, into the zoo's content-addressed weights store.

Why its own module: the file was written by untrusted code, so it is read like every other output
(`jobfiles`: a regular file inside out/, no links, a size cap) and only checked, never parsed or run:
the server never loads a model. The check is the one a protobuf ModelProto written by an ONNX exporter
always passes: it opens with field 1 (`ir_version`, a small varint).
"""

from __future__ import annotations

import os
from pathlib import Path

from lemur_agent_server.evaluator import jobfiles

MAX_ONNX_BYTES = jobfiles.MAX_WEIGHTS_BYTES
FORMAT = "onnx"


def _looks_like_onnx(head: bytes) -> bool:
    return len(head) == 2 and head[0] == 0x08 and 0 < head[1] < 0x80


def archive_onnx(out_dir: Path, rel: str, weights_root: Path) -> tuple[str, int, str]:
    """Copy out_dir/rel into `weights_root` as `<sha[:2]>/<sha>.onnx`. Returns (sha256, size, relative path);
    raises jobfiles.OutputError for anything that is not a plausible ONNX file."""
    if not rel.endswith(".onnx"):
        raise jobfiles.OutputError(f"{rel!r} is not an .onnx file")
    fd = jobfiles._open_regular(out_dir, rel, MAX_ONNX_BYTES)  # noqa: SLF001 - the one safe opener of out/ files
    with os.fdopen(fd, "rb") as fh:
        if not _looks_like_onnx(fh.read(2)):
            raise jobfiles.OutputError(f"{rel!r} is not an ONNX model (no ModelProto header)")
        fh.seek(0)
        return jobfiles.store_content_addressed(fh, weights_root, FORMAT)
