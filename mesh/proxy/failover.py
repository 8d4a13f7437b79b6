"""Failover between a service's priority groups: which group serves, when traffic
leaves it, and when it comes back (DESIGN.md "Failover").

Pure logic on an injected clock. The balancer (mesh.proxy.balancer) keeps one
`Failover` for each service whose endpoints come in more than one priority group,
and reports the outcome of every attempt to it; the caller's I/O never reaches here.

The rules, each a `FailoverPolicy` field:

- The serving group is the best (lowest priority) group that is `UP`.
- An `UP` group goes `DOWN` at once when every one of its endpoints failed its last
  attempt at the connection level (connect error, TLS handshake failure, a new
  connection reset before answering, a connection whose peer acknowledged nothing of
  the request, or a gateway or destination proxy answering 503 with
  ``l5d-proxy-error``), or after `group_failures` failed attempts in a row across
  the group (5xx answers, timeouts, anything), or when failure accrual has ejected
  each of its endpoints. A success resets the first two.
- A group that is not `UP` gets one probe every `probe_interval_s`: a request that can
  be retried elsewhere if the probe fails (the exchange decides which may), so probes
  go on while traffic is elsewhere. A successful probe makes it `RECOVERING`; it
  turns `UP` once it has been healthy for its hold-down, every probe succeeding. A
  failed probe sends it back `DOWN` and restarts the hold-down.
- The hold-down starts at `hold_down_s` and doubles, up to `hold_down_max_s`, each
  time the group goes down again within `hold_down_max_s` of its last fall; so a
  region that flaps every second never takes traffic back.
- When no group is `UP`, there is nothing to damp against: the first successful
  probe makes its group `UP` at once.
- A group whose endpoints all leave discovery (its pods deleted, its gateway no
  longer ready) falls as if it failed (cause ``no-endpoints``), and its state is
  kept: when endpoints come back it is probed and waits out its hold-down like any
  group that went down, so a restarted region or a crash-looping pod does not take
  traffic back the moment it reappears.

Each change of serving group is reported to the `FailoverObserver` as a `Transition`
(for metrics and logs), as is the time each group spent serving.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mesh.errors import ConfigError

log = logging.getLogger("mesh.proxy.failover")

_ACCOUNT_EVERY_S = 1.0
"""How often, at most, the serving group's time is reported between transitions."""


class Cause(enum.Enum):
    """Why an attempt on an endpoint failed, as far as failover cares."""

    CONNECT = "connect-error"
    HANDSHAKE = "tls-handshake"
    RESET = "reset"
    """A new connection closed before answering (or answered nonsense)."""
    NOT_READY = "not-ready"
    """A gateway or destination proxy answered 502/503 with ``l5d-proxy-error``."""
    CLOSED = "closed"
    """A pooled connection closed before answering: maybe only an idle timeout."""
    STATUS = "5xx"
    TIMEOUT = "timeout"
    EJECTED = "ejected"
    """Failure accrual ejected every endpoint of the group, one by one."""
    UNACKNOWLEDGED = "unacknowledged"
    """The peer acknowledged nothing sent to it within the connect timeout (a pooled
    connection into a partition, a host gone without a reset)."""
    NO_ENDPOINTS = "no-endpoints"
    """Discovery took away every endpoint of the group."""


CONNECTION_CAUSES = frozenset({Cause.CONNECT, Cause.HANDSHAKE, Cause.RESET, Cause.NOT_READY,
                               Cause.UNACKNOWLEDGED})
"""Failures that say the endpoint cannot be reached, not that one request went wrong."""


class GroupHealth(enum.Enum):
    UP = "up"
    DOWN = "down"
    RECOVERING = "recovering"
    """Probes succeed; the group waits out its hold-down before taking traffic back."""


@dataclass(frozen=True)
class FailoverPolicy:
    group_failures: int = 5
    """Failed attempts in a row across a group that take it down."""
    hold_down_s: float = 5.0
    """How long a group must stay healthy before traffic returns to it."""
    hold_down_max_s: float = 60.0
    """The cap of the doubling hold-down, and the window in which a fall counts as a flap."""
    probe_interval_s: float = 1.0
    """Time between probes of a group that is not up."""

    def __post_init__(self) -> None:
        if self.group_failures < 1:
            raise ConfigError(f"failover: group_failures must be at least 1, "
                              f"got {self.group_failures}")
        if not 0 < self.hold_down_s <= self.hold_down_max_s:
            raise ConfigError(f"failover: hold-down must satisfy 0 < hold_down <= "
                              f"hold_down_max, got {self.hold_down_s}s "
                              f"and {self.hold_down_max_s}s")
        if not self.probe_interval_s > 0:
            raise ConfigError(f"failover: probe_interval must be positive, "
                              f"got {self.probe_interval_s}s")


DEFAULT_FAILOVER = FailoverPolicy()


def failover_policy(hold_down_s: float) -> FailoverPolicy:
    """The default policy with a failback hold-down of `hold_down_s` (the proxy's
    ``outbound.failbackHoldDown``); its cap is a minute, or the hold-down if longer."""
    return FailoverPolicy(hold_down_s=hold_down_s,
                          hold_down_max_s=max(DEFAULT_FAILOVER.hold_down_max_s, hold_down_s))


@dataclass(frozen=True)
class Transition:
    """The serving group changed; `to_group` is empty when no group can serve."""

    service: str
    from_group: str
    to_group: str
    direction: str
    """``failover`` (to a worse group, or to none), ``failback`` (to a better one), or
    ``initial`` for the first choice, which is no move."""
    cause: str
    """What took the old group down (a `Cause` value, ``no-endpoints``), or
    ``recovered`` for a failback."""


class FailoverObserver(Protocol):
    def moved(self, transition: Transition) -> None: ...
    def served(self, service: str, group: str, seconds: float) -> None: ...


class _Unobserved:
    def moved(self, transition: Transition) -> None:
        pass

    def served(self, service: str, group: str, seconds: float) -> None:
        pass


@dataclass(eq=False)
class PriorityGroup:
    """The endpoints of one priority, as failover sees them."""

    priority: int
    name: str
    """The cluster its endpoints run in (``local`` or ``priority-N`` when not known)."""
    members: frozenset[Hashable]
    hold_down_s: float
    health: GroupHealth = GroupHealth.UP
    unreachable: set[Hashable] = field(default_factory=set)
    """Members whose last attempt failed at the connection level."""
    streak: int = 0
    """Failed attempts in a row across the group."""
    down_at: float = -math.inf
    healthy_since: float = 0.0
    next_probe_at: float = 0.0
    probe_in_flight: bool = False
    cause: str = ""
    """Why it last went down."""


def group_name(priority: int, clusters: Sequence[str]) -> str:
    for cluster in clusters:
        if cluster:
            return cluster
    return "local" if priority == 0 else f"priority-{priority}"


class Failover:
    """The priority groups of one service and the one serving; see the module doc."""

    def __init__(self, service: str, policy: FailoverPolicy = DEFAULT_FAILOVER, *,
                 clock: Callable[[], float],
                 observer: FailoverObserver | None = None) -> None:
        self.service = service
        self.policy = policy
        self._clock = clock
        self._observer: FailoverObserver = observer if observer is not None else _Unobserved()
        self.groups: list[PriorityGroup] = []
        self._by_priority: dict[int, PriorityGroup] = {}
        self._gone: dict[str, PriorityGroup] = {}
        """Groups whose endpoints all left discovery, by name (their cluster), kept down
        until they return."""
        self.serving: PriorityGroup | None = None
        self._selected = False  # a serving group was chosen once: later choices are moves
        self._since = clock()
        self._account_at = self._since + _ACCOUNT_EVERY_S

    def update(self, groups: Sequence[tuple[int, str, frozenset[Hashable]]]) -> None:
        """Make `groups` (priority, name, endpoint keys) the service's groups; a group
        that stays keeps its health, whatever endpoints it gained or lost; one that
        leaves falls, and comes back down (see the module doc)."""
        now = self._clock()
        built = []
        for priority, name, members in sorted(groups, key=lambda g: g[0]):
            group = self._by_priority.get(priority) or self._gone.pop(name, None)
            if group is None:
                group = PriorityGroup(priority, name, members, self.policy.hold_down_s)
            group.priority, group.name, group.members = priority, name, members
            group.unreachable &= members
            built.append(group)
        present = {g.priority for g in built}
        for group in self.groups:
            if group.priority not in present:
                self._fall(group, Cause.NO_ENDPOINTS, now)
                # A probe still out reports to no one: the group may be probed on return.
                group.probe_in_flight = False
                self._gone[group.name] = group
        self.groups = built
        self._by_priority = {g.priority: g for g in built}
        self._reselect(now, Cause.NO_ENDPOINTS.value)

    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def refresh(self, now: float) -> None:
        """Let groups whose hold-down elapsed take traffic back; report serving time."""
        for group in self.groups:
            if group.health is GroupHealth.RECOVERING and \
                    now - group.healthy_since >= group.hold_down_s:
                group.health = GroupHealth.UP
                self._reselect(now, "recovered")
        if now >= self._account_at:
            self._account(now)

    def up(self, priority: int) -> bool:
        group = self._by_priority.get(priority)
        return group is not None and group.health is GroupHealth.UP

    def probe_due(self, now: float) -> int | None:
        """The priority of a group that is not up and is due a probe, if one is."""
        for group in self.groups:
            if group.health is not GroupHealth.UP and group.members and \
                    not group.probe_in_flight and now >= group.next_probe_at:
                return group.priority
        return None

    def probe_sent(self, priority: int) -> None:
        self._by_priority[priority].probe_in_flight = True

    def probe_released(self, priority: int) -> None:
        """A probe ended without an outcome: the group may be probed again."""
        group = self._by_priority.get(priority)
        if group is not None:
            group.probe_in_flight = False

    def succeeded(self, priority: int, member: Hashable, *, probe: bool) -> None:
        group = self._by_priority.get(priority)
        if group is None:
            return
        if group.health is GroupHealth.UP:
            group.streak = 0
            if group.unreachable:
                group.unreachable.discard(member)
            return
        if not probe:
            return  # an answer from before the group went down
        now = self._clock()
        group.probe_in_flight = False
        group.next_probe_at = now + self.policy.probe_interval_s
        if group.health is GroupHealth.DOWN:
            group.health = GroupHealth.RECOVERING
            group.healthy_since = now
            log.info("failover group recovering service=%s group=%s hold_down=%.1fs",
                     self.service, group.name, group.hold_down_s)
        if self.serving is None:
            group.health = GroupHealth.UP  # nothing serves: nothing to damp against
            self._reselect(now, "recovered")

    def failed(self, priority: int, member: Hashable, cause: Cause, *, probe: bool) -> None:
        group = self._by_priority.get(priority)
        if group is None:
            return
        if group.health is GroupHealth.UP:
            group.streak += 1
            if cause in CONNECTION_CAUSES:
                group.unreachable.add(member)
            if group.streak >= self.policy.group_failures or \
                    len(group.unreachable) >= len(group.members):
                self._down(group, cause)
        elif probe:
            group.probe_in_flight = False
            self._down(group, cause)
        # Otherwise an attempt from before the group went down: only probes decide.

    def exhausted(self, priority: int) -> None:
        """Failure accrual ejected the group's last healthy endpoint."""
        group = self._by_priority.get(priority)
        if group is not None:
            self._down(group, Cause.EJECTED)

    def _down(self, group: PriorityGroup, cause: Cause) -> None:
        now = self._clock()
        if self._fall(group, cause, now):
            self._reselect(now, cause.value)

    def _fall(self, group: PriorityGroup, cause: Cause, now: float) -> bool:
        """Take `group` down; False when it already was."""
        group.next_probe_at = now + self.policy.probe_interval_s
        if group.health is GroupHealth.DOWN:
            return False
        policy = self.policy
        flapped = now - group.down_at < policy.hold_down_max_s
        group.hold_down_s = (min(group.hold_down_s * 2, policy.hold_down_max_s) if flapped
                             else policy.hold_down_s)
        log.info("failover group down service=%s group=%s cause=%s was=%s hold_down=%.1fs",
                 self.service, group.name, cause.value, group.health.value,
                 group.hold_down_s)
        group.health = GroupHealth.DOWN
        group.down_at = now
        group.cause = cause.value
        group.streak = 0
        group.unreachable.clear()
        return True

    def _reselect(self, now: float, cause: str) -> None:
        old = self.serving
        new = next((g for g in self.groups if g.health is GroupHealth.UP and g.members), None)
        if new is old:
            return
        self._account(now)
        self.serving = new
        if not self._selected:
            direction, cause = "initial", ""
        elif old is None or (new is not None and new.priority < old.priority):
            direction = "failback"
        else:
            direction = "failover"
        self._selected = True
        transition = Transition(self.service, old.name if old is not None else "",
                                new.name if new is not None else "", direction, cause)
        log.info("failover service=%s from=%s to=%s direction=%s cause=%s", self.service,
                 transition.from_group or "-", transition.to_group or "-", direction, cause)
        self._observer.moved(transition)

    def _account(self, now: float) -> None:
        if self.serving is not None and now > self._since:
            self._observer.served(self.service, self.serving.name, now - self._since)
        self._since = now
        self._account_at = now + _ACCOUNT_EVERY_S
