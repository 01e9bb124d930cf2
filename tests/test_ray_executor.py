"""The Ray executor's cluster tests (tests/ray_cluster_cases.py), run inside a network namespace of their own.

Why a namespace: Ray replaces a loopback node address by the host's outward-facing one (`ray start
--node-ip-address 127.0.0.1` still connects to the address of the default route, measured here), so on
the host's network its cluster traffic would go to an address other than loopback. In a fresh network
namespace whose only interface is `lo`, Ray finds no route out and falls back to 127.0.0.1: every
packet of the two-node cluster, the driver (this test's inner pytest) included, stays on loopback.
The Docker engine is still reached through its unix socket; sandboxes have no network anyway.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

CASES = "tests/ray_cluster_cases.py"


def test_ray_cluster_cases_pass_inside_a_private_network_namespace() -> None:
    script = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider -x "$1"'
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable, CASES], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    report = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    collected = re.search(r"(\d+) passed", proc.stdout)
    assert collected and int(collected.group(1)) == 12 and "failed" not in proc.stdout, report
