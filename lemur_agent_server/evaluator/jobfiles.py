"""A job's directory on the host, and reading back what the sandbox wrote, defensively.

Why defensive: everything under out/ was written by untrusted code. We open regular files only,
never follow links, cap sizes, parse data formats only (.npy without pickle, safetensors headers),
and never unpickle or `torch.load` anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sandbox import protocol
from sandbox.backend import JobPaths

MAX_PREDS_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 2 << 30


class OutputError(ValueError):
    """A sandbox output file is missing, not a regular file, too large or malformed."""


def create_job_dir(jobs_root: Path, job_id: str, data_dir: Path, code: str) -> JobPaths:
    """Fresh <jobs_root>/<job_id>/{in,out}; in/model.py holds the code. Replaces a stale one."""
    jobs_root.mkdir(parents=True, exist_ok=True)
    job_dir = jobs_root / job_id
    if job_dir.exists():
        shutil.rmtree(job_dir, ignore_errors=True)
    (job_dir / "in").mkdir(parents=True)
    (job_dir / "out").mkdir()
    (job_dir / "in" / protocol.MODEL_FILE).write_text(code)
    os.chmod(job_dir, 0o755)
    os.chmod(job_dir / "in", 0o755)
    os.chmod(job_dir / "in" / protocol.MODEL_FILE, 0o644)
    return JobPaths(job_dir=job_dir, data_dir=data_dir)


def write_spec(paths: JobPaths, spec: protocol.JobSpec) -> None:
    target = paths.in_dir / protocol.SPEC_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(spec.to_json())
    os.chmod(tmp, 0o644)
    tmp.replace(target)


def reset_out_dir(paths: JobPaths) -> None:
    """Empty out/ before a phase, so one phase never reads another phase's events or files."""
    out = paths.out_dir
    if out.exists():
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    else:
        out.mkdir(parents=True)


def remove_job_dir(paths: JobPaths) -> None:
    shutil.rmtree(paths.job_dir, ignore_errors=True)


def remove_job_dir_of(jobs_root: Path, job_id: str) -> bool:
    """Remove <jobs_root>/<job_id> if it is there (a killed server's job left it behind). True if removed.
    A job id that is not one plain name is left alone: it never names a path outside jobs_root."""
    if not job_id or job_id in (".", "..") or Path(job_id).name != job_id:
        return False
    job_dir = jobs_root / job_id
    if job_dir.is_symlink() or not job_dir.is_dir():
        return False
    shutil.rmtree(job_dir, ignore_errors=True)
    return not job_dir.exists()


def _open_regular(out_dir: Path, rel: str, cap: int) -> int:
    """An fd for out_dir/rel if it is a regular file within out_dir, not a link, at most `cap` bytes."""
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts:
        raise OutputError(f"path {rel!r} leaves the output directory")
    current = out_dir
    for part in rel_path.parts[:-1]:
        current = current / part
        if current.is_symlink() or not current.is_dir():
            raise OutputError(f"{rel!r}: {part!r} is not a plain directory")
    try:
        fd = os.open(out_dir / rel_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise OutputError(f"{rel!r} cannot be opened: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OutputError(f"{rel!r} is not a regular file")
    if st.st_size > cap:
        os.close(fd)
        raise OutputError(f"{rel!r} is {st.st_size} bytes; the cap is {cap}")
    return fd


def read_predictions(out_dir: Path, rel: str, n_expected: int, num_classes: int) -> np.ndarray:
    """Integer class predictions, shape (n_expected,), values in [0, num_classes)."""
    fd = _open_regular(out_dir, rel, MAX_PREDS_BYTES)
    with os.fdopen(fd, "rb") as fh:
        try:
            preds = np.load(fh, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise OutputError(f"{rel!r} is not a valid .npy array: {exc}") from exc
    if preds.shape != (n_expected,):
        raise OutputError(f"predictions have shape {preds.shape}, expected ({n_expected},)")
    if preds.dtype.kind not in "iu":
        raise OutputError(f"predictions have dtype {preds.dtype}, expected integers")
    if n_expected and (preds.min() < 0 or preds.max() >= num_classes):
        raise OutputError(f"predictions outside [0, {num_classes})")
    return preds.astype(np.int64)


def _safetensors_header_ok(fh) -> bool:  # type: ignore[no-untyped-def]
    head = fh.read(8)
    if len(head) != 8:
        return False
    size = int.from_bytes(head, "little")
    if size <= 0 or size > 100 << 20:
        return False
    try:
        header = json.loads(fh.read(size))
    except ValueError:
        return False
    return isinstance(header, dict)


def archive_weights(out_dir: Path, rel: str, weights_root: Path) -> tuple[str, int, str]:
    """Copy a safetensors file into content-addressed storage. Returns (sha256, size, relative path)."""
    fd = _open_regular(out_dir, rel, MAX_WEIGHTS_BYTES)
    with os.fdopen(fd, "rb") as fh:
        if not _safetensors_header_ok(fh):
            raise OutputError(f"{rel!r} is not a safetensors file")
        fh.seek(0)
        return store_content_addressed(fh, weights_root, "safetensors")


def store_content_addressed(fh: BinaryIO, weights_root: Path, suffix: str) -> tuple[str, int, str]:
    """Copy the open file `fh` (from its current position) into `weights_root` as `<sha[:2]>/<sha>.<suffix>`
    through a temporary name, so a reader never sees half a file and equal content is stored once.
    Returns (sha256, size, path relative to `weights_root`)."""
    digest = hashlib.sha256()
    weights_root.mkdir(parents=True, exist_ok=True)
    tmp = weights_root / f".incoming-{os.getpid()}-{id(fh)}.{suffix}"
    size = 0
    with open(tmp, "wb") as dst:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    sha = digest.hexdigest()
    rel_dst = f"{sha[:2]}/{sha}.{suffix}"
    final = weights_root / rel_dst
    final.parent.mkdir(exist_ok=True)
    if final.exists():
        tmp.unlink()
    else:
        tmp.replace(final)
    return sha, size, rel_dst
