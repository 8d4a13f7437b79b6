"""Failover between priority groups (mesh.proxy.failover) through the balancer that
keeps it: failing fast on a whole group, 5xx streaks, a gateway not ready, probes
while traffic is elsewhere, failback only after a hold-down that flaps lengthen.
A fake clock and a seeded rng; no I/O."""

from __future__ import annotations

import random

import pytest

from mesh.errors import ConfigError
from mesh.proxy.balancer import Balancer, Pick
from mesh.proxy.discovery import EndpointSpec
from mesh.proxy.failover import Cause, FailoverPolicy, GroupHealth, Transition

CLUSTERS = ("east", "west", "central")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Recorder:
    def __init__(self) -> None:
        self.moves: list[Transition] = []
        self.seconds: dict[str, float] = {}

    def moved(self, transition: Transition) -> None:
        self.moves.append(transition)

    def served(self, service: str, group: str, seconds: float) -> None:
        self.seconds[group] = self.seconds.get(group, 0.0) + seconds

    def directions(self) -> list[tuple[str, str, str, str]]:
        return [(t.from_group, t.to_group, t.direction, t.cause) for t in self.moves
                if t.direction != "initial"]


def spec(i: int, priority: int) -> EndpointSpec:
    return EndpointSpec(address=f"10.{priority}.0.{i}:4143", target_port=8080,
                        identity=None, priority=priority, cluster=CLUSTERS[priority])


class Service:
    """web with `per_group` endpoints in each of `groups` priority groups."""

    def __init__(self, groups: int = 2, per_group: int = 2, **policy: float) -> None:
        self.clock = FakeClock()
        self.seen = Recorder()
        self.balancer = Balancer([spec(i, p) for p in range(groups) for i in range(per_group)],
                                 clock=self.clock, rng=random.Random(7), service="web",
                                 failover=FailoverPolicy(**policy),  # type: ignore[arg-type]
                                 observer=self.seen)

    def pick(self, *, probe_ok: bool = False) -> Pick:
        pick = self.balancer.pick(probe_ok=probe_ok)
        assert pick is not None
        return pick

    def serving(self) -> str | None:
        failover = self.balancer.failover
        assert failover is not None
        failover.refresh(self.clock())
        return failover.serving.name if failover.serving else None

    def group(self, name: str) -> GroupHealth:
        failover = self.balancer.failover
        assert failover is not None
        return next(g.health for g in failover.groups if g.name == name)

    def fail_group(self, priority: int, cause: Cause) -> None:
        for ep in self.balancer.endpoints:
            if ep.priority == priority:
                Pick(self.balancer, ep, probe=False).failed(cause)

    def probe(self, *, ok: bool) -> Pick:
        """Send one probe-eligible request; it must be a probe of a group not serving."""
        pick = self.pick(probe_ok=True)
        assert pick.group_probe, pick
        if ok:
            pick.succeeded(0.01)
        else:
            pick.failed(Cause.CONNECT)
        return pick


def test_a_connect_error_on_every_endpoint_of_the_group_fails_over_at_once() -> None:
    s = Service()
    assert s.serving() == "east"
    assert {s.pick().endpoint.priority for _ in range(20)} == {0}
    east = [ep for ep in s.balancer.endpoints if ep.priority == 0]
    Pick(s.balancer, east[0], probe=False).failed(Cause.CONNECT)
    assert s.serving() == "east"  # the other endpoint may still answer
    Pick(s.balancer, east[1], probe=False).failed(Cause.RESET)
    assert s.serving() == "west"
    assert {s.pick().endpoint.priority for _ in range(20)} == {1}
    assert s.seen.directions() == [("east", "west", "failover", "reset")]
    # Per endpoint, a single failure each ejects nothing: the group decided.
    assert all(ep.failures == 1 for ep in east)


def test_a_success_in_between_keeps_the_group() -> None:
    s = Service()
    east = [ep for ep in s.balancer.endpoints if ep.priority == 0]
    Pick(s.balancer, east[0], probe=False).failed(Cause.CONNECT)
    Pick(s.balancer, east[0], probe=False).succeeded(0.01)
    Pick(s.balancer, east[1], probe=False).failed(Cause.CONNECT)
    assert s.serving() == "east"


def test_a_5xx_streak_across_the_group_fails_over() -> None:
    s = Service(group_failures=4)
    for _ in range(3):
        s.pick().failed(Cause.STATUS)
    assert s.serving() == "east"  # 5xx is an answer: only a streak counts
    s.pick().failed(Cause.STATUS)
    assert s.serving() == "west"
    assert s.seen.directions() == [("east", "west", "failover", "5xx")]


def test_a_gateway_that_is_not_ready_fails_its_group_over() -> None:
    s = Service(groups=3, per_group=1)
    s.fail_group(0, Cause.STATUS)
    assert s.serving() == "east"
    s.fail_group(0, Cause.NOT_READY)
    s.fail_group(1, Cause.NOT_READY)
    assert s.serving() == "central"
    assert s.seen.directions() == [("east", "west", "failover", "not-ready"),
                                   ("west", "central", "failover", "not-ready")]


def test_a_pooled_connection_closed_unanswered_alone_moves_nothing() -> None:
    s = Service(per_group=1)
    s.fail_group(0, Cause.CLOSED)  # perhaps only the server's idle timeout
    assert s.serving() == "east"


def test_ejecting_every_endpoint_one_by_one_fails_the_group_over() -> None:
    s = Service(group_failures=100)
    for ep in s.balancer.endpoints[:2]:
        for _ in range(5):
            Pick(s.balancer, ep, probe=False).failed(Cause.STATUS)
            Pick(s.balancer, s.balancer.endpoints[2], probe=False).succeeded(0.01)
    assert s.serving() == "west"
    assert s.seen.directions()[-1][3] == "ejected"


def test_probes_go_on_while_traffic_is_elsewhere() -> None:
    s = Service()
    s.fail_group(0, Cause.CONNECT)
    assert s.pick(probe_ok=True).endpoint.priority == 1  # no probe before the interval
    for _ in range(5):
        s.clock.advance(1.0)
        probe = s.probe(ok=False)
        assert probe.endpoint.priority == 0
        # One probe per interval: the rest, even those that could be, stay on west.
        assert {s.pick(probe_ok=True).endpoint.priority for _ in range(10)} == {1}
    assert s.serving() == "west"
    # A request that cannot be retried elsewhere is never a probe while a group serves.
    s.clock.advance(1.0)
    assert not s.pick().group_probe


def test_failback_only_after_the_hold_down() -> None:
    s = Service(hold_down_s=5.0)
    s.fail_group(0, Cause.CONNECT)
    s.clock.advance(1.0)
    s.probe(ok=True)
    assert s.group("east") is GroupHealth.RECOVERING
    for _ in range(4):
        assert s.serving() == "west"
        assert {s.pick().endpoint.priority for _ in range(10)} == {1}
        s.clock.advance(1.0)
        s.probe(ok=True)
    s.clock.advance(1.0)
    assert s.serving() == "east"
    assert {s.pick().endpoint.priority for _ in range(10)} == {0}
    assert s.seen.directions() == [("east", "west", "failover", "connect-error"),
                                   ("west", "east", "failback", "recovered")]
    assert s.seen.seconds["west"] == pytest.approx(6.0)


def test_a_failed_probe_restarts_the_hold_down() -> None:
    s = Service(hold_down_s=3.0)
    s.fail_group(0, Cause.CONNECT)
    s.clock.advance(1.0)
    s.probe(ok=True)
    s.clock.advance(1.0)
    s.probe(ok=True)
    s.clock.advance(1.0)
    s.probe(ok=False)  # 2 s healthy, then down again: the hold-down starts over, doubled
    for _ in range(6):
        s.clock.advance(1.0)
        s.probe(ok=True)
        assert s.serving() == "west"
    s.clock.advance(1.0)
    assert s.serving() == "east"  # 6 s healthy: the doubled hold-down


def test_a_flapping_group_does_not_bounce_traffic() -> None:
    s = Service(hold_down_s=2.0, hold_down_max_s=16.0)
    s.fail_group(0, Cause.CONNECT)
    served = set()
    for second in range(60):  # down one second, up the next
        s.clock.advance(1.0)
        s.probe(ok=second % 2 == 1)
        served.add(s.serving())
    assert served == {"west"}
    assert len(s.seen.directions()) == 1
    failover = s.balancer.failover
    assert failover is not None and failover.groups[0].hold_down_s == 16.0


def test_a_region_that_stays_up_gets_the_base_hold_down_back() -> None:
    s = Service(hold_down_s=1.0, hold_down_max_s=8.0)
    failover = s.balancer.failover
    assert failover is not None
    # Each fall within 8 s of the last doubles the hold-down; the fifth comes 9 s after.
    for hold_down in (1.0, 2.0, 4.0, 8.0, 1.0):
        s.fail_group(0, Cause.CONNECT)
        assert failover.groups[0].hold_down_s == hold_down
        s.clock.advance(1.0)
        s.probe(ok=True)
        s.clock.advance(hold_down)
        assert s.serving() == "east"


def test_when_no_group_serves_any_request_probes_and_the_first_success_serves() -> None:
    s = Service()
    s.fail_group(0, Cause.CONNECT)
    s.fail_group(1, Cause.CONNECT)
    assert s.serving() is None
    assert s.seen.directions()[-1] == ("west", "", "failover", "connect-error")
    assert s.balancer.pick() is None  # probes are not due yet: fail fast
    s.clock.advance(1.0)
    first = s.pick()  # a POST may probe: it would fail anyway
    assert first.group_probe and first.endpoint.priority == 0
    second = s.pick()
    assert second.group_probe and second.endpoint.priority == 1
    assert s.balancer.pick() is None
    second.succeeded(0.01)
    assert s.serving() == "west"  # at once: nothing to damp against
    first.failed(Cause.CONNECT)
    assert s.serving() == "west"
    assert s.balancer.group_names() == ["east", "west"]


def test_a_released_probe_lets_the_group_be_probed_again() -> None:
    s = Service()
    s.fail_group(0, Cause.CONNECT)
    s.clock.advance(1.0)
    s.pick(probe_ok=True).released()
    assert s.pick(probe_ok=True).group_probe


def endpoints_of(s: Service, *priorities: int) -> list[EndpointSpec]:
    return [ep.spec for ep in s.balancer.endpoints if ep.priority in priorities]


def test_a_group_whose_endpoints_leave_comes_back_only_after_its_hold_down() -> None:
    s = Service(groups=3, hold_down_s=2.0)
    everyone = endpoints_of(s, 0, 1, 2)
    s.balancer.update(endpoints_of(s, 1, 2))  # east's pods deleted
    assert s.serving() == "west"
    assert s.seen.directions() == [("east", "west", "failover", "no-endpoints")]
    s.clock.advance(3.0)
    s.balancer.update(everyone)  # back, Ready, but not yet trusted
    assert s.group("east") is GroupHealth.DOWN
    assert s.serving() == "west"
    assert {s.pick().endpoint.priority for _ in range(10)} == {1}
    probe = s.probe(ok=True)
    assert probe.endpoint.priority == 0 and s.group("east") is GroupHealth.RECOVERING
    s.clock.advance(1.0)
    s.probe(ok=True)
    assert s.serving() == "west"
    s.clock.advance(1.0)
    assert s.serving() == "east"
    assert s.seen.directions()[-1] == ("west", "east", "failback", "recovered")


def test_a_group_that_keeps_leaving_and_returning_waits_longer_each_time() -> None:
    s = Service(hold_down_s=2.0)
    everyone = endpoints_of(s, 0, 1)
    failover = s.balancer.failover
    assert failover is not None
    for hold_down in (2.0, 4.0, 8.0):
        s.balancer.update(endpoints_of(s, 1))  # a crash-looping pod: gone...
        s.clock.advance(1.0)
        s.balancer.update(everyone)  # ...Ready again a second later
        assert failover.groups[0].hold_down_s == hold_down
        s.clock.advance(1.0)
        s.probe(ok=True)
        s.clock.advance(1.0)
        assert s.serving() == "west"
    assert [d[2] for d in s.seen.directions()] == ["failover"]


def test_a_group_that_returns_while_nothing_serves_serves_at_its_first_success() -> None:
    s = Service()
    everyone = endpoints_of(s, 0, 1)
    s.fail_group(1, Cause.CONNECT)
    s.balancer.update(endpoints_of(s, 1))
    assert s.serving() is None
    s.clock.advance(1.0)
    s.balancer.update(everyone)
    first = s.pick()
    assert first.group_probe and first.endpoint.priority == 0
    first.succeeded(0.01)
    assert s.serving() == "east"


def test_a_probe_out_when_its_group_leaves_does_not_block_probes_on_its_return() -> None:
    s = Service()
    everyone = endpoints_of(s, 0, 1)
    s.fail_group(0, Cause.CONNECT)
    s.clock.advance(1.0)
    out = s.pick(probe_ok=True)
    assert out.group_probe
    s.balancer.update(endpoints_of(s, 1))
    s.clock.advance(1.0)
    s.balancer.update(everyone)
    assert s.pick(probe_ok=True).group_probe
    out.released()


def test_one_group_keeps_plain_failure_accrual() -> None:
    clock = FakeClock()
    b = Balancer([spec(0, 0)], clock=clock)
    pick = b.pick()
    assert pick is not None
    pick.failed(Cause.CONNECT)
    assert b.failover is None and b.group_names() == []
    assert b.pick() is not None


def test_the_policy_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="hold-down"):
        FailoverPolicy(hold_down_s=10.0, hold_down_max_s=5.0)
    with pytest.raises(ConfigError, match="group_failures"):
        FailoverPolicy(group_failures=0)
