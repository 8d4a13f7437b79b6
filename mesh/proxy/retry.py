"""When a failed request may be sent again, and how many retries a proxy may add.

`RetryBudget` is Linkerd's (and Finagle's) retry budget: every original request
deposits, every retry withdraws, and over any `ttl` window the retries may number
``min_per_second * ttl + ratio * requests``. The floor lets a quiet service retry
at all; the ratio keeps retries from multiplying load when an upstream is down.

`is_retryable` says whether one failed attempt is safe to repeat. It cannot see
whether any of the response already went to the client: once a single response
byte has been forwarded, the caller must not retry, whatever this says.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mesh.errors import ConfigError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})
"""The upstream (or a gateway on the way) could not serve it; another endpoint may."""

_SLICES = 10
# Float sums of `ratio * requests` (0.1 * 3 = 0.30000000000000004) must not cost a retry.
_EPSILON = 1e-9


def is_retryable(method: str, *, body_consumed: bool, status: int | None, error: bool) -> bool:
    """May this failed attempt be sent again (to another endpoint)?

    Only idempotent methods are retried, and only if the request body can be sent
    again: `body_consumed` is True when it was streamed upstream without being kept
    whole (a request without a body, or whose body was buffered, has False). The
    attempt qualifies when it ended in an `error` before any response (connect
    error, reset, timeout) or in a 502, 503 or 504 `status`.

    Methods are case-sensitive (RFC 9110): ``get`` is not ``GET``. The caller stays
    responsible for never retrying once response bytes reached the client, and for
    asking the `RetryBudget`.
    """
    if method not in IDEMPOTENT_METHODS or body_consumed:
        return False
    return error or status in RETRYABLE_STATUSES


@dataclass
class _Slice:
    index: int
    requests: int = 0
    retries: int = 0


class RetryBudget:
    """A token bucket of retries over a sliding `ttl` window.

    The window is kept in ten slices of ``ttl / 10``: a deposit or withdrawal stops
    counting between ``0.9 * ttl`` and ``ttl`` after it was made.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10,
        ttl: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= 1000:
            raise ConfigError(f"retry budget: ratio must be within 0..1000, got {ratio}")
        if min_per_second < 0:
            raise ConfigError(f"retry budget: min_per_second must not be negative, "
                              f"got {min_per_second}")
        if not ttl > 0:
            raise ConfigError(f"retry budget: ttl must be positive, got {ttl}s")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._clock = clock
        self._slice_s = ttl / _SLICES
        self._reserve = min_per_second * ttl
        self._slices: deque[_Slice] = deque()
        self._requests = 0
        self._retries = 0

    def deposit(self) -> None:
        """Count one original request (not a retry)."""
        self._current().requests += 1
        self._requests += 1

    def withdraw(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) if it is spent."""
        current = self._current()
        if self._retries + 1 > self._allowed():
            return False
        current.retries += 1
        self._retries += 1
        return True

    @property
    def balance(self) -> int:
        """How many retries may be taken now."""
        self._current()
        return max(math.floor(self._allowed() - self._retries), 0)

    def _allowed(self) -> float:
        return self._reserve + self.ratio * self._requests + _EPSILON

    def _current(self) -> _Slice:
        """The slice for now, after dropping slices that left the window."""
        index = math.floor(self._clock() / self._slice_s)
        while self._slices and self._slices[0].index <= index - _SLICES:
            old = self._slices.popleft()
            self._requests -= old.requests
            self._retries -= old.retries
        if not self._slices or self._slices[-1].index < index:
            self._slices.append(_Slice(index))
        # A clock that stepped back still lands in the newest slice.
        return self._slices[-1]

    def __repr__(self) -> str:
        return (f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
                f"ttl={self.ttl}, balance={self.balance})")
