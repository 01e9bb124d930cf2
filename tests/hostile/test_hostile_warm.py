"""The hostile cases again, each run in a PRE-STARTED sandbox (the warm path of both backends).

Why: a warm sandbox is started before its job (its runner waits for the spec), so every limit and every
layer of isolation must already hold for it exactly as for a cold start. Each case here is the whole
`test_hostile_submission` (its outcome, the leaks, the zoo, nothing left behind), with one difference:
before the submission the server's backend pre-starts a sandbox of the job's key and waits until its
runner waits; the job must then report `prestarted: true`, so the attack ran in the warm sandbox.

Every case runs, except three of the wall-clock ones (`SAME_KILL_AS`): a warm sandbox is killed by the
same clock and the same kill as a cold one, and a loop stopped in the check (`infinite_loop_import`) and
one stopped in training (`infinite_loop_learn`), plus the fork bomb, already show it for the warm path.
Each of the three would add ~18 s per backend to CI for no new path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox import datasets
from sandbox.backend import Limits
from sandbox.process_prestart import warm_root
from tests.hostile import test_hostile as base
from tests.hostile.conftest import World

PRESTART_PER_SLOT = 2  # as a real server keeps them (tests/conftest keeps fewer); with 1 a Docker case failed

pytestmark = pytest.mark.anyio


def warm_cgroups(server: Any) -> set[str]:
    """The cgroup dirs of the process backend's warm sandboxes still waiting in its pool (made for the
    next job after this one started: not this job's, and each serves one job only)."""
    pool = getattr(server.state.queue.backend, "pool", None)
    if pool is None:
        return set()
    return {str(d) for w in pool.warm() if w.spawned.cgroup is not None for d in w.spawned.cgroup.dirs.values()}


def without_warm(leftovers: Any) -> Any:
    """`leftover_sandboxes`, not counting the warm sandboxes still in the pool (as it does for Docker)."""
    def check(server: Any, backend: str) -> list[str]:
        waiting = warm_cgroups(server)
        return [d for d in leftovers(server, backend) if d not in waiting]
    return check


def outside_warm_dirs(watched: Any) -> Any:
    """`World.watched` without the process backend's warm job dirs (`process_prestart.warm_root`): the
    server's own, like the job dirs it skips (the harness skips Docker's, which live among the jobs)."""
    def check(world: World) -> dict[str, str]:
        root = str(warm_root(Path(world.settings.jobs_dir)))
        return {k: v for k, v in watched(world).items() if k != root and not k.startswith(root + os.sep)}
    return check


# a loop in __init__ is killed in the check like one at import; a loop in forward or a sleep in learn is
# killed in training like a loop in learn
SAME_KILL_AS = {"infinite_loop_init": "infinite_loop_import", "infinite_loop_forward": "infinite_loop_learn",
                "sleep_forever_learn": "infinite_loop_learn"}
WARM_CASES = [c for c in base.CASES if c.name not in SAME_KILL_AS]


def test_every_case_left_out_of_the_warm_runs_has_its_kind_run_warm() -> None:
    names = {c.name for c in base.CASES}
    kept = {c.name: c for c in WARM_CASES}
    by_name = {c.name: c for c in base.CASES}
    assert set(SAME_KILL_AS) <= names and len(WARM_CASES) == len(base.CASES) - len(SAME_KILL_AS)
    for left_out, kind in SAME_KILL_AS.items():  # the kept case ends the same way (status, kind, stage)
        assert kind in kept and kept[kind].expected("process") == by_name[left_out].expected("process")


@pytest.mark.parametrize("case", WARM_CASES, ids=[c.name for c in WARM_CASES])
async def test_hostile_submission_in_a_warm_sandbox(case: base.Case, backend_name: str, world: World,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    servers: list[Any] = []
    real_build, real_run = base.build_server, base.run_hostile

    def build(settings: Any) -> Any:
        servers.append(real_build(settings))
        return servers[-1]

    async def warm_then_run(client: Any, w: World, code: str, budget_s: float) -> Any:
        settings = w.settings
        backend = servers[-1].state.queue.backend
        public = datasets.prepare("digits", Path(settings.data_root), Path(settings.cache_dir)).public_dir
        # the limits the queue's phase gives a CPU job (the wall clock is not part of a warm sandbox's key)
        limits = Limits(wall_s=1.0, memory_bytes=int(settings.memory_gb * (1 << 30)), cpus=float(settings.threads),
                        gpu=settings.gpus[0] if case.gpu and settings.gpus else None)
        # (5 min: a CI run here saw a warm container's imports exceed the default 120 s on a slow disk)
        await backend.prestart(public, limits, jobs_root=Path(settings.jobs_dir), wait_ready=True, timeout_s=300)
        seen = await real_run(client, w, code, budget_s)
        full = await base.call(client, "get_job", job_id=seen.job["job_id"], include_isolation=True)
        isolation = (full.get("result") or {}).get("isolation") or {}
        assert isolation.get("prestarted") is True, isolation
        if not seen.latencies:  # a warm job can end (in under a second) before the first latency sample
            t0 = time.monotonic()
            await base.call(client, "list_catalog")
            seen.latencies.append(time.monotonic() - t0)
        return seen

    monkeypatch.setattr(base, "build_server", build)
    monkeypatch.setattr(base, "run_hostile", warm_then_run)
    monkeypatch.setattr(base, "leftover_sandboxes", without_warm(base.leftover_sandboxes))
    # type(world): pytest loads the conftest as its own module, so its World is not this file's import
    monkeypatch.setattr(type(world), "watched", outside_warm_dirs(type(world).watched))
    await base.test_hostile_submission(case, backend_name, world)
