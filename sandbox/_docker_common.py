"""What the Docker backend's modules share: names and labels, the SDK import, container removal, and
the host-side checks of the directories a container gets.

Why a module of its own: the backend (`sandbox.docker_backend`), the per-job monitor
(`sandbox.docker_handle`) and the warm pool (`sandbox.docker_prestart`) all need these, and none of
them should import another just for a helper.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sandbox.docker_backend")

DEFAULT_IMAGE = "lemur-agent-server-sandbox:latest"
SANDBOX_UID = 65534
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
NAME_PREFIX = "lemur-sbx-"
LABEL_SANDBOX = "lemur-agent-server.sandbox"
LABEL_INSTANCE = "lemur-agent-server.instance"
LABEL_OWNER = "lemur-agent-server.owner"
LABEL_JOB = "lemur-agent-server.job"
LABEL_PRESTART = "lemur-agent-server.prestart"
LABEL_SLOT_DIR = "lemur-agent-server.slot-dir"
IN_DIR, OUT_DIR, DATA_DIR = "/job/in", "/job/out", "/data"
PRIVATE_NAMES = ("test_y.npy", "private")  # sandbox.datasets keeps test labels in <dataset>/private/


class SandboxStartError(RuntimeError):
    """The engine refused to create or start the container (the message says why)."""


def docker_sdk():  # type: ignore[no-untyped-def]
    """The `docker` package, imported on first use (the process backend never needs it)."""
    import docker

    return docker


def timeout_errors() -> tuple[type[BaseException], ...]:
    """What a blocking SDK call raises when the engine does not answer in time."""
    import requests

    return (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)


def safe_name(text: str, limit: int = 40) -> str:
    text = re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-.") or "job"
    return text[:limit]


def remove_container(container: Any, attempts: int = 5) -> bool:
    """Kill and remove a container; True when it is gone."""
    docker = docker_sdk()
    for i in range(attempts):
        try:
            container.remove(force=True, v=True)
            return True
        except docker.errors.NotFound:
            return True
        except docker.errors.DockerException as exc:
            if i == attempts - 1:
                log.error("could not remove sandbox container %s: %s", getattr(container, "name", "?"), exc)
                return False
            time.sleep(0.2 * (i + 1))
    return False


# --- making out/ writable for uid 65534 -------------------------------------------------------------------
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _acl_blob(users: dict[int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr format (version 2): owner rwx, `users` {uid: perm}, group r-x,
    mask rwx, other r-x."""
    undefined = 0xFFFFFFFF
    entries = [(_ACL_USER_OBJ, 7, undefined)]
    entries += [(_ACL_USER, perm, uid) for uid, perm in sorted(users.items())]
    entries += [(_ACL_GROUP_OBJ, 5, undefined), (_ACL_MASK, 7, undefined), (_ACL_OTHER, 5, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def prepare_out_dir(out_dir: Path) -> str:
    """Make `out_dir` (a real directory, not a link) writable for the sandbox user. Returns how."""
    st = os.lstat(out_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{out_dir} is not a directory (or is a symbolic link)")
    if os.geteuid() == 0:
        os.chown(out_dir, SANDBOX_UID, SANDBOX_UID)
        os.chmod(out_dir, 0o755)
        return "chown 65534"
    me = os.geteuid()
    try:
        os.setxattr(out_dir, "system.posix_acl_access", _acl_blob({SANDBOX_UID: 7}))
        os.setxattr(out_dir, "system.posix_acl_default", _acl_blob({SANDBOX_UID: 7, me: 7}))
        return "acl"
    except OSError:
        os.chmod(out_dir, 0o777)
        return "mode 0777"


def refuse_private(data_dir: str) -> None:
    """Defence in depth: never mount a dataset dir that holds test labels (the public dir never does)."""
    for name in PRIVATE_NAMES:
        if os.path.lexists(os.path.join(data_dir, name)):
            raise ValueError(f"refusing to mount {data_dir}: it contains {name!r} (test labels stay unmounted)")


def check_dir(path: Path, what: str) -> str:
    """The real path of an existing directory that is not itself a symbolic link."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise FileNotFoundError(f"{what} {path} is missing") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {path} is not a directory (or is a symbolic link)")
    return os.path.realpath(path)
