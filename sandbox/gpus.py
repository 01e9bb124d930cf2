"""Which GPUs this host has, for `--gpus all`.

Why two sources: `nvidia-smi -L` is the driver's own list and names devices by the indices that
CUDA_VISIBLE_DEVICES and Docker's `--gpus device=N` understand; a host (or a container) with the
driver but without the tool still has `/proc/driver/nvidia/gpus/<pci id>/`, one folder per GPU, and
the indices follow the PCI order there as they do in nvidia-smi's default order. A host with
neither has no usable NVIDIA GPU: the answer is an empty tuple and the server runs CPU slots.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)
ALL = "all"


def _from_nvidia_smi() -> tuple[str, ...] | None:
    """Device indices from `nvidia-smi -L`; None when the tool is missing or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return tuple(_SMI_LINE.findall(out))


def _from_proc(root: Path = PROC_GPUS) -> tuple[str, ...]:
    """One index per GPU folder the driver exposes (none: no driver loaded)."""
    try:
        count = sum(1 for entry in root.iterdir() if entry.is_dir())
    except OSError:
        return ()
    return tuple(str(i) for i in range(count))


def discover(proc_root: Path = PROC_GPUS) -> tuple[str, ...]:
    """Every GPU index of this host, in CUDA's order; () on a host without NVIDIA GPUs."""
    found = _from_nvidia_smi()
    return found if found else _from_proc(proc_root)


def parse(value: str | None) -> tuple[str, ...] | None:
    """A `--gpus` / LEMUR_GPUS value: "all" (discover), "0,1" (those ids), empty or None (not set)."""
    if value is None or not value.strip():
        return None
    if value.strip().lower() == ALL:
        return discover()
    return tuple(g.strip() for g in value.split(",") if g.strip())
