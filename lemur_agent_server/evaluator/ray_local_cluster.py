"""A Ray cluster of this machine's own: a head and nodes that join it, on 127.0.0.1, each a `ray start
--block` process of its own session, stopped by process id (never `ray stop`, which ends every Ray
node on the machine, other people's included).

Why in the package: the cluster tests (tests/ray_cluster_cases.py) and the throughput bench
(bench/throughput.py) both start one, and had each their own copy of this; both already import the
package (tests must not import bench/), and a `--executor ray` user trying Ray on one machine needs the
same few steps. Token authentication is the caller's: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in
the environment before Ray is imported (Ray reads them once), for the nodes and the driver alike.

Ray's own load on the machine is kept small (`QUIET_ARGS`, `QUIET_ENV`): no dashboard, no log monitor
(the driver does not print the workers' logs), no metrics agent's collection, no usage stats. Its
nodes run only when this machine runs in a network namespace whose only interface is loopback
(`only_loopback`): with a route out, Ray replaces 127.0.0.1 by the default route's address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

RAY = str(Path(sys.executable).with_name("ray"))
QUIET_ARGS = ("--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--include-log-monitor=false")
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def only_loopback() -> bool:
    """True when this process's network namespace has no interface but `lo`."""
    names = [line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    return all(name == "lo" for name in names)


def wait_for_nodes(address: str, n: int, timeout_s: float = 120) -> None:
    """Connect this process to `address` as a driver and wait until `n` nodes are alive."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False)
            if sum(node["Alive"] for node in ray.nodes()) >= n:
                return
        except Exception:  # noqa: BLE001 - the head is still starting
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray cluster at {address} did not reach {n} nodes in {timeout_s:.0f} s")
        time.sleep(0.5)


class LocalRayCluster:
    """A head (`head_args`: its resources) and one joined node per entry of `nodes` (each its args), on
    loopback, logs and Ray's session files under `temp`; this process is the driver once it is entered."""

    def __init__(self, temp: Path, head_args: list[str], nodes: list[list[str]], env: dict[str, str] | None = None):
        self.temp = temp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head_args = head_args
        self.node_args = nodes
        self.env = {**os.environ, **(env or {}), **QUIET_ENV}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> LocalRayCluster:
        common = [*QUIET_ARGS, "--temp-dir", str(self.temp)]
        try:
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard=false", *self.head_args,
                                 *common])
            wait_for_nodes(self.address, 1)
            for i, args in enumerate(self.node_args):
                self._start(f"node{i + 1}", ["--address", self.address, *args, *common])
            wait_for_nodes(self.address, 1 + len(self.node_args))
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.temp / f"{name}.log", "wb") as log:
            self.procs.append(subprocess.Popen([RAY, "start", *args, "--block"], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def processes(self) -> set[int]:
        """The nodes' processes now: `ray start`, GCS, raylets, agents, workers (and what runs below them)."""
        return {pid for p in self.procs for pid in {p.pid, *descendants(p.pid)}}

    def stop(self) -> None:
        """Disconnect, stop the nodes (the joined ones first), then kill whatever of theirs is left, by id."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        tree = {pid for p in self.procs for pid in descendants(p.pid)}
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in tree:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
