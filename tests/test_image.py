"""sandbox.image without a registry: a pull that cannot reach one ends in one clear line of ours.

No network traffic: the engine's error text is the one `docker pull` printed on this project's CI
machine (no registry: the DNS lookup fails), replayed by a stand-in `docker` command on PATH, the only
way to provoke that failure here without a DNS query leaving the machine.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox import image

REPO = Path(__file__).resolve().parent.parent
# captured from `docker pull` of the Dockerfile's default base on the CI machine
REAL_DNS_ERROR = ('Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: lookup '
                  'registry-1.docker.io on 10.255.255.53:53: no such host')


@pytest.mark.parametrize(("output", "reason"), [
    (REAL_DNS_ERROR, "name resolution failed"),
    ('Error response from daemon: Get "https://nvcr.io/v2/": dial tcp: lookup nvcr.io: '
     "Temporary failure in name resolution", "name resolution failed"),
    ('Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp 54.1.2.3:443: '
     "connect: network is unreachable", "no connection"),
    ('Error response from daemon: Get "https://registry-1.docker.io/v2/": net/http: request canceled while '
     "waiting for connection (Client.Timeout exceeded while awaiting headers)", "no connection"),
    ("Error response from daemon: pull access denied for lemur/nothing, repository does not exist or may "
     "require 'docker login': denied: requested access to the resource is denied",
     "access denied or no such repository"),
])
def test_registry_failures_are_recognised(output: str, reason: str) -> None:
    assert image.registry_failure(output) == reason


@pytest.mark.parametrize("output", [
    "failed to register layer: write /usr/lib/x.so: no space left on device",
    "Error response from daemon: manifest for pytorch/pytorch:9.9 not found: manifest unknown",
    "",
])
def test_other_failures_are_not_blamed_on_the_registry(output: str) -> None:
    assert image.registry_failure(output) is None


def _fake_docker(bin_dir: Path, pull_output: str) -> Path:
    """A `docker` command: no image exists, `pull` fails with `pull_output`, anything else is an error
    (and every call is recorded in calls.log)."""
    bin_dir.mkdir()
    (bin_dir / "pull-output.txt").write_text(pull_output + "\n")
    script = bin_dir / "docker"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {bin_dir}/calls.log
case "$1 $2" in
  "image inspect") echo "Error: No such image: $5" >&2; exit 1 ;;
  pull*) cat {bin_dir}/pull-output.txt >&2; exit 1 ;;
esac
echo "unexpected docker call: $*" >&2
exit 99
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_build_without_a_registry_says_to_use_the_local_base(tmp_path: Path, monkeypatch) -> None:
    fake = _fake_docker(tmp_path / "bin", REAL_DNS_ERROR)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    with pytest.raises(image.RegistryUnreachable) as caught:
        image.build_image("lemur-test-never:built", None, REPO, log=lines.append)
    message = str(caught.value)
    default_base = image.dockerfile_default_base(REPO / "Dockerfile")
    assert "\n" not in message and message.startswith(f"no registry reachable to pull the base image {default_base}")
    assert "build with `--base local`" in message and "name resolution failed" in message
    assert isinstance(caught.value, image.BuildError)  # the CLI's handling of build errors applies
    assert not any("Error response from daemon" in line for line in lines), lines
    calls = (fake / "calls.log").read_text().splitlines()
    assert calls[-1] == f"pull {default_base}" and not any(c.startswith("build") for c in calls)


def test_a_failed_pull_for_another_reason_stays_a_build_error(tmp_path: Path, monkeypatch) -> None:
    fake = _fake_docker(tmp_path / "bin", "failed to register layer: no space left on device")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(image.BuildError, match="no space left on device") as caught:
        image.pull_base("example.org/base:1", log=lambda _line: None)
    assert not isinstance(caught.value, image.RegistryUnreachable)
