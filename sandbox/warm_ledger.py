"""The warm sandboxes a pool is creating, per key, counted from the moment a creation is decided.

Both warm pools (Docker containers, process sandboxes) are filled from two sides at once: a job's start
refills the pool in the background, and the evaluator's `prestart` asks for one warm sandbox of the
job's kind right after. Deciding by "is there one in the pool?" alone, both sides saw none while the
refill's creation was in flight and both created one: a warm sandbox too many per key, each holding its
imports' memory and, on a GPU, a CUDA context. The ledger counts a creation against the pool's `slots`
from the decision on, and wakes whoever waits for one in flight instead of making a second.

It has no lock of its own: every call is made under the pool's lock (the ledger's condition shares it),
so "how many are in the pool" and "how many are coming" are read in one step.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

Key = tuple[Any, ...]


class CreationLedger:
    """Creations in flight per key; call every method with the pool's lock held."""

    def __init__(self, lock: threading.Lock) -> None:
        self._done = threading.Condition(lock)  # notified when a creation in flight is over
        self._creating: collections.Counter[Key] = collections.Counter()

    def claim(self, key: Key, in_pool: int, slots: int) -> bool:
        """Reserve one more creation for `key` if the pool's `in_pool` and the ones in flight stay
        within `slots`; False: enough are there or coming."""
        if in_pool + self._creating[key] >= slots:
            return False
        self._creating[key] += 1
        return True

    def add(self, key: Key) -> None:
        """Count a creation that was asked for outright (a pool's `create`), whatever the slots."""
        self._creating[key] += 1

    def release(self, key: Key) -> None:
        """One creation for `key` is over (in the pool, or failed): wake the callers waiting for it.
        A pool releases in the same locked step as it adds the new sandbox, so a woken caller finds it."""
        self._creating[key] -= 1
        if self._creating[key] <= 0:
            del self._creating[key]
        self._done.notify_all()

    def arrive(self, pool: list[Any], warm: Any, slots: int, closed: bool) -> list[Any]:
        """The creation of `warm` (which has a `.key`) is over: release it and put `warm` in `pool` in the same
        step, dropping sandboxes of other keys beyond `slots`. Returns what the caller must discard, outside
        the lock: those dropped, or `warm` itself when the pool closed meanwhile."""
        self.release(warm.key)
        if closed:
            return [warm]
        pool.append(warm)
        excess = [w for w in pool if w.key != warm.key][: max(0, len(pool) - slots)]
        for w in excess:
            pool.remove(w)
        return excess

    def in_flight(self, key: Key) -> int:
        return self._creating[key]

    def wait(self, timeout_s: float) -> bool:
        """Wait (the pool's lock released meanwhile) until some creation is over; False on time-out."""
        return timeout_s > 0 and self._done.wait(timeout=timeout_s)
