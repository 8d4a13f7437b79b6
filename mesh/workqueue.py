"""A keyed work queue for reconcilers.

Watch callbacks only ``add`` keys; workers take keys and call the reconcile
function. A key is never reconciled by two workers at once, and a key added
again while it is being reconciled runs once more afterwards, so the last
state always gets a pass. Failures are retried with exponential backoff when
they are `TemporaryError`s (or unexpected), and dropped with a log line when
they are `PermanentError`s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from mesh.errors import MeshError

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class TemporaryError(MeshError):
    """Reconcile again after ``delay`` seconds."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(MeshError):
    """Retrying cannot help until the object changes."""


class WorkQueue(Generic[K]):
    def __init__(self, name: str, reconcile: Callable[[K], Awaitable[None]], *,
                 base_delay: float = 0.05, max_delay: float = 30.0) -> None:
        self.name = name
        self._reconcile = reconcile
        self._pending: dict[K, None] = {}
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._wake = asyncio.Event()
        self._base = base_delay
        self._max = max_delay
        self._timers: set[asyncio.TimerHandle] = set()

    def add(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        self._pending[key] = None
        self._wake.set()

    def add_after(self, key: K, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.add(key)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def idle(self) -> bool:
        return not self._pending and not self._active and not self._timers

    async def _take(self) -> K:
        while True:
            for key in self._pending:
                if key not in self._active:
                    del self._pending[key]
                    self._active.add(key)
                    return key
            self._wake.clear()
            await self._wake.wait()

    async def run(self, workers: int = 1) -> None:
        """Process keys until cancelled."""
        try:
            await asyncio.gather(*(self._worker() for _ in range(workers)))
        finally:
            for t in self._timers:
                t.cancel()
            self._timers.clear()

    async def _worker(self) -> None:
        while True:
            key = await self._take()
            try:
                await self._reconcile(key)
                self._failures.pop(key, None)
            except PermanentError as e:
                self._failures.pop(key, None)
                log.warning("reconcile failed permanently queue=%s key=%s cause=%s",
                            self.name, key, e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = getattr(e, "delay", None) or min(self._max, self._base * 2 ** (n - 1))
                log.warning("reconcile failed queue=%s key=%s attempt=%d retry_in=%.2fs "
                            "cause=%s: %s", self.name, key, n, delay, type(e).__name__, e)
                self.add_after(key, delay)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
