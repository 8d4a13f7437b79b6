"""kube's container restart back-off: 10 s, doubling to 5 min, forgotten once a
container has run for 10 minutes. Pure: the caller passes the time."""

from __future__ import annotations

from dataclasses import dataclass

INITIAL = 10.0
MAXIMUM = 300.0
RESET_AFTER = 600.0


@dataclass
class Backoff:
    delay: float = 0.0
    """The current back-off; 0 until the first restart."""
    until: float = 0.0

    def after_exit(self, *, started: float, finished: float) -> float:
        """How long to wait before restarting a container that ran from `started` to
        `finished`. The first restart is immediate, as kube's."""
        if finished - started >= RESET_AFTER:
            self.delay = 0.0
        wait = self.delay
        self.delay = INITIAL if self.delay == 0 else min(self.delay * 2, MAXIMUM)
        self.until = finished + wait
        return wait
