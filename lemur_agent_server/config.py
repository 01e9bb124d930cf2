"""Server settings from command-line flags and environment variables.

Why environment variables too: MCP hosts (Claude Desktop, VS Code) start servers with a near-empty
environment plus an `env` block from their config, so every setting must be reachable that way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import platformdirs

from sandbox import gpus as gpu_discovery
from zoo.connection import APP_NAME, resolve_zoo_path

ENV_DATA = "LEMUR_DATA"  # dataset root in torchvision layout
ENV_SANDBOX = "LEMUR_SANDBOX"  # auto | docker | process
ENV_SLOTS = "LEMUR_SLOTS"
ENV_GPUS = "LEMUR_GPUS"  # comma-separated device ids, e.g. "0,1", or "all" (every GPU nvidia-smi lists)
ENV_TOKEN = "LEMUR_TOKEN"  # bearer token for --http
ENV_IMAGE = "LEMUR_SANDBOX_IMAGE"
ENV_EXECUTOR = "LEMUR_EXECUTOR"  # local | ray
ENV_RAY_ADDRESS = "LEMUR_RAY_ADDRESS"  # auto | HOST:PORT
ENV_NO_SEED = "LEMUR_NO_SEED"
ENV_NO_BASELINES = "LEMUR_NO_BASELINES"  # do not queue the seed models' baseline evaluations on first start
ENV_NO_CALIBRATE = "LEMUR_NO_CALIBRATE"  # do not time the reference workload on this server's devices
ENV_PRESTART = "LEMUR_PRESTART"  # warm sandboxes kept per slot for the next jobs (0: every sandbox starts cold)

DEFAULT_IMAGE = "lemur-agent-server-sandbox:latest"


@dataclasses.dataclass
class Settings:
    zoo_path: Path
    data_root: Path
    sandbox: str = "auto"
    slots: int | None = None  # None: one per GPU, else 1; never more than the GPUs when there are GPUs
    gpus: tuple[str, ...] = ()
    image: str = DEFAULT_IMAGE
    seed_zoo: bool = True
    baselines: bool = True  # on first start, measure the seed models and queue a short evaluation of each
    baseline_epochs: float = 2.0  # digits: 45 steps an epoch at batch 32, seconds on a CPU
    baseline_budget_s: float = 90.0  # SmallVGG took 20 s a half epoch on a loaded 2-core host
    baseline_max_train_samples: int | None = None  # None: the whole training split
    calibrate: bool = True  # time the reference workload once per device while idle (evaluator.calibration)
    # keep warm sandboxes (torch imported) for the next jobs: each costs seconds of CPU and ~0.7 GB while it
    # waits, worth it for a stream of jobs, not for a server that runs one job and stops
    prestart_per_slot: int = 2
    run_workers: bool = True
    token: str | None = None
    max_time_budget_s: float = 3600.0
    memory_gb: float = 6.0  # memory limit of one sandbox
    stale_after_s: float = 15.0  # a running job whose server stopped heart-beating this long is re-queued
    threads: int = max(1, (os.cpu_count() or 1))
    executor: str = "local"  # local: this host's slots; ray: one Ray actor per sandbox (ray_executor)
    ray_address: str = "auto"

    @property
    def state_dir(self) -> Path:
        """Job directories and the dataset cache live beside the zoo file."""
        return self.zoo_path.parent

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "dataset-cache"

    @property
    def slot_count(self) -> int:
        """Parallel training jobs: one per GPU (a smaller --slots uses fewer GPUs), else --slots or 1.
        On Ray the cluster places each GPU job on a GPU of its own, so --slots may exceed this host's list."""
        if self.gpus and self.executor == "local":
            return min(self.slots, len(self.gpus)) if self.slots else len(self.gpus)
        return self.slots if self.slots else 1

    @classmethod
    def from_env(cls, zoo: str | os.PathLike[str] | None = None, **overrides: object) -> Settings:
        gpus = gpu_discovery.parse(os.environ.get(ENV_GPUS)) or ()
        slots_env = os.environ.get(ENV_SLOTS)
        settings = cls(
            zoo_path=resolve_zoo_path(zoo),
            data_root=Path(os.environ.get(ENV_DATA) or Path(platformdirs.user_data_dir(APP_NAME)) / "data"),
            sandbox=os.environ.get(ENV_SANDBOX, "auto"),
            slots=int(slots_env) if slots_env else None,
            gpus=gpus,
            image=os.environ.get(ENV_IMAGE, DEFAULT_IMAGE),
            seed_zoo=os.environ.get(ENV_NO_SEED, "") not in ("1", "true", "yes"),
            baselines=os.environ.get(ENV_NO_BASELINES, "") not in ("1", "true", "yes"),
            calibrate=os.environ.get(ENV_NO_CALIBRATE, "") not in ("1", "true", "yes"),
            prestart_per_slot=int(os.environ.get(ENV_PRESTART) or 2),
            token=os.environ.get(ENV_TOKEN) or None,
            stale_after_s=float(os.environ.get("LEMUR_STALE_AFTER_S", "15")),
            executor=os.environ.get(ENV_EXECUTOR) or "local",
            ray_address=os.environ.get(ENV_RAY_ADDRESS) or "auto",
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        return settings
