"""Choosing an endpoint for each request: power-of-two-choices over peak-EWMA
latency, failure accrual with backoff probes, and priority groups for failover.

Pure logic: the clock and the random source are injected, and nothing here does
I/O. The caller picks, performs the attempt, then reports exactly one outcome on
the `Pick` (`succeeded` or `failed`), or `released` when it gave the attempt up
without one; each of those ends the attempt's share of the endpoint's pending
count, so accounting cannot leak.

Failover (DESIGN.md): endpoints come in priority groups, lower preferred. A pick
comes from the best group that has an available endpoint, where available means
healthy, or ejected long enough that it may take one probe request. When every
endpoint of group 0 is ejected, traffic spills to group 1; it comes back to
group 0 as soon as a probe there succeeds.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from mesh.errors import ConfigError
from mesh.proxy.discovery import EndpointSpec, canonical_address

log = logging.getLogger(__name__)

DEFAULT_DECAY_S = 10.0
DEFAULT_RTT_S = 0.030
# Keeps the cost of an endpoint idle for hours from underflowing to zero, where
# the pending count would no longer tell endpoints apart.
_MIN_ESTIMATE_S = 1e-6


class Health(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBING = "probing"
    """The backoff elapsed: the endpoint may take one request, whose outcome decides."""


@dataclass(frozen=True)
class FailureAccrual:
    """When to eject an endpoint and for how long.

    After `consecutive_failures` failures in a row the endpoint is ejected. The
    k-th ejection in a row lasts a random time between ``base * 2**(k-1)`` and
    ``base * 2**k``, capped at `backoff_max_s`: never shorter than the one before,
    and jittered below the cap so that proxies that ejected an endpoint together
    do not probe it together.
    """

    consecutive_failures: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ConfigError(f"failure accrual: consecutive_failures must be at least 1, "
                              f"got {self.consecutive_failures}")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise ConfigError(f"failure accrual: backoff must satisfy 0 < base <= max, got "
                              f"base={self.backoff_base_s}s max={self.backoff_max_s}s")

    def backoff(self, ejections: int, rng: random.Random) -> float:
        """How long the `ejections`-th consecutive ejection lasts (1 is the first)."""
        exponent = min(max(ejections - 1, 0), 62)  # past the cap anyway; avoids overflow
        low = self.backoff_base_s * 2.0**exponent
        return min(self.backoff_max_s, low * (1.0 + rng.random()))


HTTP_FAILURE_ACCRUAL = FailureAccrual(consecutive_failures=5)


@dataclass
class PeakEwma:
    """Latency estimate sensitive to peaks (Finagle's and Linkerd's peak-EWMA).

    A slower observation replaces the estimate at once; faster ones pull it down
    exponentially with time constant `decay_s`, weighted by the time since the last
    observation. Without observations the estimate decays toward zero, so an idle
    endpoint, or one that was slow a while ago, gets tried again.
    """

    decay_s: float
    value_s: float
    stamp: float

    def estimate(self, now: float) -> float:
        return self.value_s * self._weight(now)

    def observe(self, rtt_s: float, now: float) -> None:
        w = self._weight(now)
        current = self.value_s * w
        rtt_s = max(rtt_s, 0.0)
        self.value_s = rtt_s if rtt_s > current else current + rtt_s * (1.0 - w)
        self.stamp = max(now, self.stamp)

    def _weight(self, now: float) -> float:
        return math.exp(-max(now - self.stamp, 0.0) / self.decay_s)


@dataclass(eq=False)
class EndpointState:
    """What the balancer knows of one endpoint; survives discovery updates."""

    spec: EndpointSpec
    """The endpoint as discovery last described it."""
    address: tuple[str, int]
    """Where to connect: the destination proxy's inbound listener, or the app if not meshed."""
    target_port: int
    identity: str | None
    """The TLS identity it must present; None for an endpoint outside the mesh."""
    weight: int
    priority: int
    zone: str
    latency: PeakEwma
    pending: int = 0
    failures: int = 0
    """Consecutive failures."""
    health: Health = Health.HEALTHY
    ejections: int = 0
    """Consecutive ejections; sets the next backoff."""
    ejected_until: float = 0.0
    probe_in_flight: bool = False

    @property
    def key(self) -> tuple[tuple[str, int], int, str | None]:
        return self.address, self.target_port, self.identity

    def refresh(self, now: float) -> None:
        """Let an ejection whose backoff elapsed turn into probing."""
        if self.health is Health.EJECTED and now >= self.ejected_until:
            self.health = Health.PROBING
            self.probe_in_flight = False

    def available(self) -> bool:
        """May take a request now (as of the last `refresh`)."""
        return self.health is Health.HEALTHY or (
            self.health is Health.PROBING and not self.probe_in_flight)

    def cost(self, now: float) -> float:
        ewma = max(self.latency.estimate(now), _MIN_ESTIMATE_S)
        return ewma * (self.pending + 1) / self.weight


def _key(spec: EndpointSpec) -> tuple[tuple[str, int], int, str | None]:
    return canonical_address(*spec.host_port), spec.target_port, spec.identity


@dataclass(frozen=True)
class EndpointSnapshot:
    """One endpoint as metrics and debug pages show it."""

    address: tuple[str, int]
    target_port: int
    identity: str | None
    group: int
    zone: str
    weight: int
    state: Health
    available: bool
    ewma_s: float
    pending: int
    failures: int
    ejected_for_s: float
    """Time left before an ejected endpoint may be probed; 0 otherwise."""


class Pick:
    """One attempt on one endpoint; report its outcome exactly once."""

    __slots__ = ("_balancer", "_done", "endpoint", "probe")

    def __init__(self, balancer: Balancer, endpoint: EndpointState, *, probe: bool) -> None:
        self._balancer = balancer
        self.endpoint = endpoint
        self.probe = probe
        """This attempt is the one request an ejected endpoint gets to prove itself."""
        self._done = False

    def succeeded(self, latency_s: float) -> None:
        """The attempt got a good answer after `latency_s` seconds."""
        self._finish("succeeded")
        self._balancer._succeeded(self.endpoint, latency_s, probe=self.probe)

    def failed(self) -> None:
        """The attempt failed: connect error, reset, timeout or a failure status."""
        self._finish("failed")
        self._balancer._failed(self.endpoint, probe=self.probe)

    def released(self) -> None:
        """Give the attempt back without an outcome (for example, cancelled).

        Does nothing once succeeded or failed was called, so it fits in a
        ``finally``. A released probe lets the endpoint be probed again.
        """
        if self._done:
            return
        self._done = True
        self.endpoint.pending -= 1
        if self.probe:
            self.endpoint.probe_in_flight = False

    def _finish(self, outcome: str) -> None:
        if self._done:
            raise RuntimeError(f"pick of {self.endpoint.address} already has its outcome; "
                               f"{outcome}() may be called once, instead of the other")
        self._done = True
        self.endpoint.pending -= 1

    def __repr__(self) -> str:
        return f"<Pick {self.endpoint.address} probe={self.probe} done={self._done}>"


class Balancer:
    """Balances one service's requests over its endpoints."""

    def __init__(
        self,
        endpoints: Sequence[EndpointSpec] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        accrual: FailureAccrual = HTTP_FAILURE_ACCRUAL,
        decay_s: float = DEFAULT_DECAY_S,
        default_rtt_s: float = DEFAULT_RTT_S,
        service: str = "",
    ) -> None:
        if decay_s <= 0 or default_rtt_s < 0:
            raise ConfigError(f"balancer: decay must be positive and default RTT not negative, "
                              f"got decay={decay_s}s default_rtt={default_rtt_s}s")
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._accrual = accrual
        self._decay_s = decay_s
        self._default_rtt_s = default_rtt_s
        self._service = service
        self._endpoints: dict[tuple[tuple[str, int], int, str | None], EndpointState] = {}
        self._groups: list[list[EndpointState]] = []
        self.update(endpoints)

    def update(self, endpoints: Sequence[EndpointSpec]) -> None:
        """Make `endpoints` the set to balance over.

        Endpoints that remain (same address, target port and identity) keep their
        latency, pending count and health; weight, priority and zone follow the
        new spec. Picks still out on a dropped endpoint finish harmlessly.
        """
        now = self._clock()
        kept: dict[tuple[tuple[str, int], int, str | None], EndpointState] = {}
        for spec in endpoints:
            key = _key(spec)
            state = kept.get(key) or self._endpoints.get(key)
            if state is None:
                state = EndpointState(
                    spec=spec, address=key[0], target_port=spec.target_port,
                    identity=spec.identity, weight=spec.weight, priority=spec.priority,
                    zone=spec.zone,
                    latency=PeakEwma(self._decay_s, self._default_rtt_s, now))
            else:
                state.spec = spec
                state.weight, state.priority, state.zone = spec.weight, spec.priority, spec.zone
            kept[key] = state
        self._endpoints = kept
        groups: dict[int, list[EndpointState]] = {}
        for state in kept.values():
            groups.setdefault(state.priority, []).append(state)
        self._groups = [groups[p] for p in sorted(groups)]

    def pick(self, *, avoid: Collection[EndpointState] = ()) -> Pick | None:
        """An endpoint for one attempt, or None when none is available anywhere.

        `avoid` holds endpoints this request already tried: they are passed over
        while any other endpoint is available, so a retry moves to another
        endpoint, then to the next group, and returns to one it tried only when
        nothing else is left.
        """
        now = self._clock()
        for state in self._endpoints.values():
            state.refresh(now)
        chosen = self._choose(now, avoid)
        if chosen is None and avoid:
            chosen = self._choose(now, ())
        if chosen is None:
            return None
        probe = chosen.health is Health.PROBING
        if probe:
            chosen.probe_in_flight = True
        chosen.pending += 1
        return Pick(self, chosen, probe=probe)

    def snapshot(self) -> list[EndpointSnapshot]:
        """Every endpoint, best group first, for metrics and debugging."""
        now = self._clock()
        out = []
        for group in self._groups:
            for s in group:
                s.refresh(now)
                left = s.ejected_until - now if s.health is Health.EJECTED else 0.0
                out.append(EndpointSnapshot(
                    address=s.address, target_port=s.target_port, identity=s.identity,
                    group=s.priority, zone=s.zone, weight=s.weight, state=s.health,
                    available=s.available(), ewma_s=s.latency.estimate(now),
                    pending=s.pending, failures=s.failures, ejected_for_s=max(left, 0.0)))
        return out

    @property
    def endpoints(self) -> list[EndpointState]:
        """The live state of every endpoint, best group first."""
        return [s for group in self._groups for s in group]

    def __len__(self) -> int:
        return len(self._endpoints)

    def _choose(self, now: float, avoid: Collection[EndpointState]) -> EndpointState | None:
        for group in self._groups:
            ready = [s for s in group if s.available() and s not in avoid]
            if len(ready) == 1:
                return ready[0]
            if ready:
                a, b = self._rng.sample(ready, 2)
                return a if a.cost(now) <= b.cost(now) else b
        return None

    def _succeeded(self, state: EndpointState, latency_s: float, *, probe: bool) -> None:
        state.latency.observe(latency_s, self._clock())
        if probe and state.health is Health.PROBING:
            log.info("endpoint revived service=%s addr=%s identity=%s after_ejections=%d",
                     self._service, _addr(state), state.identity, state.ejections)
            state.health = Health.HEALTHY
            state.probe_in_flight = False
            state.failures = state.ejections = 0
        elif not probe and state.health is Health.HEALTHY:
            state.failures = 0
        # Otherwise a late answer from before the ejection: only the probe decides.

    def _failed(self, state: EndpointState, *, probe: bool) -> None:
        if probe and state.health is Health.PROBING:
            state.failures += 1
            self._eject(state, cause="probe failed")
        elif not probe and state.health is Health.HEALTHY:
            state.failures += 1
            if state.failures >= self._accrual.consecutive_failures:
                self._eject(state, cause="consecutive failures")

    def _eject(self, state: EndpointState, *, cause: str) -> None:
        now = self._clock()
        state.ejections += 1
        backoff = self._accrual.backoff(state.ejections, self._rng)
        state.health = Health.EJECTED
        state.probe_in_flight = False
        state.ejected_until = now + backoff
        log.info("endpoint ejected service=%s addr=%s identity=%s cause=%r failures=%d "
                 "ejections=%d backoff=%.3fs", self._service, _addr(state), state.identity,
                 cause, state.failures, state.ejections, backoff)


def _addr(state: EndpointState) -> str:
    host, port = state.address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
