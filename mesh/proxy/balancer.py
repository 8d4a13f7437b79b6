"""Choosing an endpoint for each request: power-of-two-choices over peak-EWMA
latency, failure accrual with backoff probes, and priority groups for failover.

Pure logic: the clock and the random source are injected, and nothing here does
I/O. The caller picks, performs the attempt, then reports exactly one outcome on
the `Pick` (`succeeded` or `failed`), or `released` when it gave the attempt up
without one; each of those ends the attempt's share of the endpoint's pending
count, so accounting cannot leak.

Failover (DESIGN.md): endpoints come in priority groups, lower preferred. A pick
comes from the best group that has an available endpoint, where available means
healthy, or ejected long enough that it may take one probe request. For a service
with more than one group, which groups may serve is decided per group
(mesh.proxy.failover: a whole group fails fast, and traffic comes back only after a
hold-down); a pick that may be a probe (`probe_ok`: its failure can be retried
elsewhere) goes to a group that is down and due one. With a single group, an
endpoint's failures alone decide, as above.
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
from mesh.proxy.failover import (
    DEFAULT_FAILOVER,
    Cause,
    Failover,
    FailoverObserver,
    FailoverPolicy,
    group_name,
)

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
            self.health = Health.PROBING  # a failover group's probe may be in flight

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

    __slots__ = ("_balancer", "_done", "endpoint", "group_probe", "probe")

    def __init__(self, balancer: Balancer, endpoint: EndpointState, *, probe: bool,
                 group_probe: bool = False) -> None:
        self._balancer = balancer
        self.endpoint = endpoint
        self.probe = probe
        """This attempt is the one request an ejected endpoint gets to prove itself."""
        self.group_probe = group_probe
        """This attempt probes a priority group that is not serving (failover)."""
        self._done = False

    def succeeded(self, latency_s: float) -> None:
        """The attempt got a good answer after `latency_s` seconds."""
        self._finish("succeeded")
        self._balancer._succeeded(self.endpoint, latency_s, probe=self.probe,
                                  group_probe=self.group_probe)

    def failed(self, cause: Cause = Cause.STATUS) -> None:
        """The attempt failed: connect error, reset, timeout or a failure status."""
        self._finish("failed")
        self._balancer._failed(self.endpoint, cause, probe=self.probe,
                               group_probe=self.group_probe)

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
        failover = self._balancer.failover
        if self.group_probe and failover is not None:
            failover.probe_released(self.endpoint.priority)

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
        failover: FailoverPolicy = DEFAULT_FAILOVER,
        observer: FailoverObserver | None = None,
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
        self._failover_policy = failover
        self._observer = observer
        self.failover: Failover | None = None
        """Made when the service first has more than one priority group."""
        self._failing_over = False
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
        self._failing_over = len(self._groups) > 1
        if self._failing_over and self.failover is None:
            self.failover = Failover(self._service, self._failover_policy, clock=self._clock,
                                     observer=self._observer)
        if self.failover is not None:
            self.failover.update([
                (g[0].priority, group_name(g[0].priority, [s.spec.cluster for s in g]),
                 frozenset(g)) for g in self._groups])

    def set_failover_policy(self, policy: FailoverPolicy) -> None:
        """Use `policy` from now on (a Service's own failback damping); groups keep
        their state, and a hold-down already running keeps its length."""
        if policy != self._failover_policy:
            self._failover_policy = policy
            if self.failover is not None:
                self.failover.policy = policy

    def pick(self, *, avoid: Collection[EndpointState] = (),
             probe_ok: bool = False) -> Pick | None:
        """An endpoint for one attempt, or None when none is available anywhere.

        `avoid` holds endpoints this request already tried: they are passed over
        while any other endpoint is available, so a retry moves to another
        endpoint, then to the next group, and returns to one it tried only when
        nothing else is left. `probe_ok`: the attempt may probe a priority group that
        is not serving (its failure would be retried elsewhere); when no group
        serves, any attempt may.
        """
        now = self._clock()
        for state in self._endpoints.values():
            state.refresh(now)
        failover = self.failover if self._failing_over else None
        if failover is not None:
            failover.refresh(now)
            if probe_ok or failover.serving is None:
                priority = failover.probe_due(now)
                chosen = self._probe_choice(priority, avoid) if priority is not None else None
                if chosen is not None:
                    failover.probe_sent(chosen.priority)
                    return self._issue(chosen, group_probe=True)
        chosen = self._choose(now, avoid, failover)
        if chosen is None and avoid:
            chosen = self._choose(now, (), failover)
        if chosen is None:
            return None
        return self._issue(chosen, group_probe=False)

    def _issue(self, chosen: EndpointState, *, group_probe: bool) -> Pick:
        probe = chosen.health is not Health.HEALTHY
        if probe:
            chosen.probe_in_flight = True
        chosen.pending += 1
        return Pick(self, chosen, probe=probe, group_probe=group_probe)

    def _probe_choice(self, priority: int, avoid: Collection[EndpointState]
                      ) -> EndpointState | None:
        """An endpoint of the group `priority` to probe, whatever its own ejection."""
        ready = [s for g in self._groups if g[0].priority == priority for s in g
                 if s not in avoid and not s.probe_in_flight]
        return self._rng.choice(ready) if ready else None

    def where(self, state: EndpointState) -> str:
        """The endpoint's address, and its group when the service fails over."""
        if not self._failing_over:
            return state.spec.address
        return f"{state.spec.address} (cluster {self.group_name(state.priority)})"

    def group_name(self, priority: int) -> str:
        for group in self._groups:
            if group[0].priority == priority:
                return group_name(priority, [s.spec.cluster for s in group])
        return group_name(priority, ())

    def group_names(self) -> list[str]:
        """The names of the priority groups in order; empty unless failing over."""
        return self.failover.names() if self._failing_over and self.failover else []

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

    def _choose(self, now: float, avoid: Collection[EndpointState],
                failover: Failover | None) -> EndpointState | None:
        for group in self._groups:
            if failover is not None and not failover.up(group[0].priority):
                continue
            ready = [s for s in group if s.available() and s not in avoid]
            if len(ready) == 1:
                return ready[0]
            if ready:
                a, b = self._rng.sample(ready, 2)
                return a if a.cost(now) <= b.cost(now) else b
        return None

    def _succeeded(self, state: EndpointState, latency_s: float, *, probe: bool,
                   group_probe: bool) -> None:
        state.latency.observe(latency_s, self._clock())
        if self._failing_over and self.failover is not None:
            self.failover.succeeded(state.priority, state, probe=group_probe)
        if probe and state.health is not Health.HEALTHY:
            log.info("endpoint revived service=%s addr=%s identity=%s after_ejections=%d",
                     self._service, _addr(state), state.identity, state.ejections)
            state.health = Health.HEALTHY
            state.probe_in_flight = False
            state.failures = state.ejections = 0
        elif state.health is Health.HEALTHY:
            state.failures = 0
        # Otherwise a late answer from before the ejection: only the probe decides.

    def _failed(self, state: EndpointState, cause: Cause, *, probe: bool,
                group_probe: bool) -> None:
        if self._failing_over and self.failover is not None:
            self.failover.failed(state.priority, state, cause, probe=group_probe)
        if probe and state.health is not Health.HEALTHY:
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
        if self._failing_over and self.failover is not None and all(
                s.health is not Health.HEALTHY for s in self._endpoints.values()
                if s.priority == state.priority):
            self.failover.exhausted(state.priority)
        log.info("endpoint ejected service=%s addr=%s identity=%s cause=%r failures=%d "
                 "ejections=%d backoff=%.3fs", self._service, _addr(state), state.identity,
                 cause, state.failures, state.ejections, backoff)


def _addr(state: EndpointState) -> str:
    host, port = state.address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
