"""The balancer: P2C over peak-EWMA, failure accrual with backoff probes, and
priority groups for failover, all driven by a fake clock and a seeded rng."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.proxy.balancer import (
    Balancer,
    EndpointState,
    FailureAccrual,
    Health,
    PeakEwma,
    Pick,
)
from mesh.proxy.discovery import EndpointSpec


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def spec(i: int, *, priority: int = 0, weight: int = 1, meshed: bool = True) -> EndpointSpec:
    ident = f"sa{i}.default.serviceaccount.identity.meshgate.cluster.local" if meshed else None
    return EndpointSpec(address=f"10.{priority}.0.{i}:4143", target_port=8080, identity=ident,
                        weight=weight, priority=priority)


def balancer(specs: list[EndpointSpec], clock: FakeClock, *, seed: int = 7,
             failures: int = 5) -> Balancer:
    return Balancer(specs, clock=clock, rng=random.Random(seed),
                    accrual=FailureAccrual(consecutive_failures=failures))


def must_pick(b: Balancer) -> Pick:
    pick = b.pick()
    assert pick is not None
    return pick


def fail(b: Balancer, target: EndpointState, times: int) -> None:
    """Fail `times` attempts that land on `target`, whatever else gets picked."""
    done = 0
    while done < times:
        pick = must_pick(b)
        if pick.endpoint is target:
            pick.failed()
            done += 1
        else:
            pick.succeeded(0.01)


def by_address(b: Balancer) -> dict[str, EndpointState]:
    return {s.address[0]: s for s in b.endpoints}


# --- peak-EWMA --------------------------------------------------------------


def test_peak_ewma_jumps_up_at_once_and_comes_down_slowly() -> None:
    ewma = PeakEwma(decay_s=10.0, value_s=0.030, stamp=0.0)
    t = 0.0
    for _ in range(200):
        t += 1.0
        ewma.observe(0.010, t)
    assert ewma.estimate(t) == pytest.approx(0.010, rel=0.01)

    ewma.observe(0.500, t)
    assert ewma.estimate(t) == 0.500  # one slow answer is believed at once

    t += 1.0
    ewma.observe(0.010, t)
    assert 0.40 < ewma.estimate(t) < 0.50  # one fast answer barely moves it
    for _ in range(9):
        t += 1.0
        ewma.observe(0.010, t)
    # After one time constant it has come down by about 1/e of the gap.
    assert ewma.estimate(t) == pytest.approx(0.010 + 0.490 / 2.718, rel=0.05)
    for _ in range(60):
        t += 1.0
        ewma.observe(0.010, t)
    assert ewma.estimate(t) < 0.012


def test_peak_ewma_decays_toward_zero_while_idle() -> None:
    ewma = PeakEwma(decay_s=10.0, value_s=0.200, stamp=0.0)
    assert ewma.estimate(0.0) == 0.200
    assert ewma.estimate(10.0) == pytest.approx(0.200 / 2.71828, rel=1e-4)
    assert ewma.estimate(-5.0) == 0.200  # a clock that steps back does not inflate it


def test_fresh_endpoint_starts_at_the_default_rtt() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock)
    (snap,) = b.snapshot()
    assert snap.ewma_s == pytest.approx(0.030)
    assert (snap.state, snap.available, snap.pending, snap.failures) == (
        Health.HEALTHY, True, 0, 0)


# --- power of two choices ---------------------------------------------------


def test_p2c_prefers_the_cheaper_endpoints_over_many_picks() -> None:
    clock = FakeClock()
    latency = {"10.0.0.1": 0.005, "10.0.0.2": 0.020, "10.0.0.3": 0.080, "10.0.0.4": 0.200}
    b = balancer([spec(i) for i in range(1, 5)], clock, seed=1234)
    counts: Counter[str] = Counter()
    for _ in range(4000):
        clock.advance(0.005)
        pick = must_pick(b)
        host = pick.endpoint.address[0]
        counts[host] += 1
        pick.succeeded(latency[host])
    fast, mid, slow, slowest = (counts[h] for h in latency)
    assert fast > mid > slow > slowest
    assert fast > 0.4 * 4000
    # Idle endpoints decay toward zero and are tried again now and then.
    assert slowest > 0


def test_pending_requests_raise_the_cost() -> None:
    clock = FakeClock()
    b = balancer([spec(1), spec(2)], clock)
    held = [must_pick(b) for _ in range(10)]
    # Equal latency: outstanding requests alternate between the two.
    assert Counter(p.endpoint.address[0] for p in held) == {"10.0.0.1": 5, "10.0.0.2": 5}
    for p in held:
        if p.endpoint.address[0] == "10.0.0.1":
            p.succeeded(0.030)
    assert {must_pick(b).endpoint.address[0] for _ in range(4)} == {"10.0.0.1"}


def test_weight_divides_the_cost() -> None:
    clock = FakeClock()
    b = balancer([spec(1, weight=3), spec(2, weight=1)], clock)
    held = [must_pick(b) for _ in range(40)]
    counts = Counter(p.endpoint.address[0] for p in held)
    assert counts["10.0.0.1"] == 30
    assert counts["10.0.0.2"] == 10


# --- failure accrual ----------------------------------------------------------


def test_ejected_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock, failures=5)
    for _ in range(4):
        must_pick(b).failed()
    must_pick(b).succeeded(0.01)  # a success breaks the streak
    for _ in range(4):
        must_pick(b).failed()
    (snap,) = b.snapshot()
    assert (snap.state, snap.failures) == (Health.HEALTHY, 4)
    must_pick(b).failed()
    (snap,) = b.snapshot()
    assert snap.state is Health.EJECTED
    assert not snap.available
    assert 1.0 <= snap.ejected_for_s <= 2.0
    assert b.pick() is None


def test_one_failure_is_enough_when_configured() -> None:
    b = balancer([spec(1)], FakeClock(), failures=1)
    must_pick(b).failed()
    assert b.snapshot()[0].state is Health.EJECTED


@pytest.mark.parametrize("bad", [
    {"consecutive_failures": 0},
    {"backoff_base_s": 0.0},
    {"backoff_base_s": 10.0, "backoff_max_s": 5.0},
])
def test_failure_accrual_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="failure accrual"):
        FailureAccrual(**bad)  # type: ignore[arg-type]


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    accrual = FailureAccrual()
    rng = random.Random(3)
    for k in range(1, 7):
        samples = [accrual.backoff(k, rng) for _ in range(200)]
        assert all(2.0 ** (k - 1) <= s <= min(60.0, 2.0**k) for s in samples)
        assert len({round(s, 6) for s in samples}) > 100  # jittered, not constant
    assert {accrual.backoff(k, rng) for k in (7, 8, 50, 10_000)} == {60.0}


def test_failed_probes_eject_for_longer_each_time() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock, failures=1)
    must_pick(b).failed()
    durations = []
    for _ in range(9):
        left = b.snapshot()[0].ejected_for_s
        durations.append(left)
        clock.advance(left)
        probe = must_pick(b)
        assert probe.probe
        probe.failed()
    assert durations == sorted(durations)
    assert 1.0 <= durations[0] <= 2.0
    assert 16.0 <= durations[4] <= 32.0
    assert durations[-1] == 60.0


def test_probe_recovers_the_endpoint_and_resets_backoff() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock, failures=2)
    for _ in range(2):
        must_pick(b).failed()
    clock.advance(0.9)
    assert b.pick() is None  # still within even the shortest backoff
    clock.advance(1.1)
    assert b.snapshot()[0].state is Health.PROBING
    probe = must_pick(b)
    assert probe.probe
    assert b.pick() is None  # one probe at a time
    probe.succeeded(0.02)
    (snap,) = b.snapshot()
    assert (snap.state, snap.failures) == (Health.HEALTHY, 0)
    assert not must_pick(b).probe
    # The next ejection starts again from the base backoff.
    for _ in range(2):
        must_pick(b).failed()
    assert b.snapshot()[0].ejected_for_s <= 2.0


def test_released_probe_lets_another_probe_through() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock, failures=1)
    must_pick(b).failed()
    clock.advance(2.0)
    probe = must_pick(b)
    probe.released()
    assert b.snapshot()[0].state is Health.PROBING
    again = must_pick(b)
    assert again.probe
    again.succeeded(0.01)
    assert b.snapshot()[0].state is Health.HEALTHY


def test_late_answers_from_before_the_ejection_do_not_decide() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock, failures=2)
    early = [must_pick(b) for _ in range(4)]
    early[0].failed()
    early[1].failed()
    assert b.snapshot()[0].state is Health.EJECTED
    early[2].succeeded(0.01)  # answered after the ejection: not a probe
    early[3].failed()
    (snap,) = b.snapshot()
    assert snap.state is Health.EJECTED
    assert snap.ejected_for_s <= 2.0  # the late failure did not extend it
    assert snap.pending == 0


# --- priority groups and failover -----------------------------------------------


def test_spill_over_to_the_next_group_and_back_after_the_hold_down() -> None:
    clock = FakeClock()
    b = balancer([spec(1), spec(2), spec(3, priority=1)], clock, failures=3)
    eps = by_address(b)
    a, c = eps["10.0.0.1"], eps["10.1.0.3"]
    assert {must_pick(b).endpoint.priority for _ in range(20)} == {0}

    fail(b, a, 3)
    assert {must_pick(b).endpoint.address[0] for _ in range(10)} == {"10.0.0.2"}
    fail(b, eps["10.0.0.2"], 3)
    picks = [must_pick(b) for _ in range(10)]
    assert {p.endpoint.address[0] for p in picks} == {"10.1.0.3"}
    for p in picks:
        p.succeeded(0.05)

    clock.advance(2.0)  # both group-0 backoffs elapsed, but the group failed over:
    assert must_pick(b).endpoint is c  # only a request that may be retried probes it
    probe = b.pick(probe_ok=True)
    assert probe is not None and probe.probe and probe.group_probe
    assert probe.endpoint.priority == 0
    assert must_pick(b).endpoint is c
    probe.succeeded(0.01)
    assert must_pick(b).endpoint is c  # healthy again, held down: traffic stays
    for _ in range(4):  # probes go on every second through the 5 s hold-down
        clock.advance(1.0)
        probe = b.pick(probe_ok=True)
        assert probe is not None and probe.group_probe
        probe.succeeded(0.01)
    assert must_pick(b).endpoint is c
    clock.advance(1.0)
    assert {must_pick(b).endpoint.priority for _ in range(10)} == {0}


def test_nothing_available_anywhere_gives_none() -> None:
    clock = FakeClock()
    b = balancer([spec(1), spec(2, priority=1)], clock, failures=1)
    assert Balancer([], clock=clock).pick() is None
    for _ in range(2):
        must_pick(b).failed()
    assert b.pick() is None
    assert [s.state for s in b.snapshot()] == [Health.EJECTED, Health.EJECTED]


def test_a_retry_avoids_what_it_tried_then_moves_to_the_next_group() -> None:
    clock = FakeClock()
    b = balancer([spec(1), spec(2), spec(3, priority=1)], clock)
    eps = by_address(b)
    a, b2, c = eps["10.0.0.1"], eps["10.0.0.2"], eps["10.1.0.3"]
    for _ in range(10):
        pick = b.pick(avoid=[a])
        assert pick is not None and pick.endpoint is b2
        pick.released()
    pick = b.pick(avoid=[a, b2])
    assert pick is not None and pick.endpoint is c
    pick.released()
    # Everything tried: better to try again than to refuse.
    pick = b.pick(avoid=[a, b2, c])
    assert pick is not None and pick.endpoint.priority == 0


# --- updates and accounting ---------------------------------------------------------


def test_update_keeps_remaining_state_adds_and_drops() -> None:
    clock = FakeClock()
    b = balancer([spec(1), spec(2)], clock, failures=1)
    eps = by_address(b)
    fail(b, eps["10.0.0.1"], 1)
    held = must_pick(b)
    assert held.endpoint is eps["10.0.0.2"]

    b.update([spec(1, weight=4), spec(3)])
    now = by_address(b)
    assert set(now) == {"10.0.0.1", "10.0.0.3"}
    assert now["10.0.0.1"] is eps["10.0.0.1"]
    assert now["10.0.0.1"].health is Health.EJECTED
    assert now["10.0.0.1"].weight == 4
    assert now["10.0.0.1"].spec.weight == 4
    assert now["10.0.0.3"].health is Health.HEALTHY
    assert len(b) == 2
    held.succeeded(0.01)  # the dropped endpoint's attempt ends harmlessly
    assert eps["10.0.0.2"].pending == 0
    assert must_pick(b).endpoint is now["10.0.0.3"]


def test_update_moves_an_endpoint_between_groups() -> None:
    clock = FakeClock()
    b = balancer([spec(1), spec(2, priority=1)], clock)
    b.update([spec(1, priority=2), spec(2, priority=1)])
    assert must_pick(b).endpoint.address[0] == "10.1.0.2"
    assert [s.group for s in b.snapshot()] == [1, 2]


def test_a_changed_identity_is_a_new_endpoint() -> None:
    clock = FakeClock()
    b = balancer([spec(1)], clock, failures=1)
    must_pick(b).failed()
    other = EndpointSpec(address="10.0.0.1:4143", target_port=8080,
                         identity="other.default.serviceaccount.identity.meshgate.cluster.local")
    b.update([other])
    assert b.snapshot()[0].state is Health.HEALTHY


def test_outcome_is_reported_once() -> None:
    b = balancer([spec(1)], FakeClock())
    pick = must_pick(b)
    pick.succeeded(0.01)
    with pytest.raises(RuntimeError, match="already has its outcome"):
        pick.failed()
    with pytest.raises(RuntimeError, match="already has its outcome"):
        pick.succeeded(0.01)
    pick.released()  # harmless in a finally
    assert b.snapshot()[0].pending == 0


def test_unmeshed_endpoints_are_balanced_too() -> None:
    b = balancer([spec(1, meshed=False)], FakeClock())
    pick = must_pick(b)
    assert pick.endpoint.identity is None
    assert pick.endpoint.address == ("10.0.0.1", 4143)
    assert pick.endpoint.target_port == 8080


def test_balancer_rejects_a_nonpositive_decay() -> None:
    with pytest.raises(ConfigError, match="decay"):
        Balancer([], decay_s=0.0)


# --- invariants under any sequence of operations -----------------------------------------

POOL = [spec(1), spec(2), spec(3, weight=2), spec(4, priority=1), spec(5, priority=1),
        spec(6, priority=3, meshed=False)]

_pick = st.tuples(st.just("pick"), st.integers(0, 2))
_fail = st.tuples(st.just("fail"), st.integers(0, 50))
# Picks and failures come often enough that endpoints get ejected, probed and revived.
_advance = st.tuples(st.just("advance"), st.one_of(st.floats(0.0, 90.0),
                                                  st.sampled_from([1.0, 2.0, 4.0, 61.0])))
ops = st.lists(st.one_of(
    _pick, _pick, _pick, _fail, _fail, _advance,
    st.tuples(st.just("update"), st.sets(st.integers(0, len(POOL) - 1))),
    st.tuples(st.just("succeed"), st.integers(0, 50), st.floats(0.0, 2.0)),
    st.tuples(st.just("release"), st.integers(0, 50)),
), min_size=20, max_size=200)


@dataclass
class Model:
    b: Balancer
    clock: FakeClock
    outstanding: list[Pick] = field(default_factory=list)

    def check_pick(self, avoid: list[EndpointState]) -> None:
        live = self.b.endpoints
        now = self.clock()
        for s in live:
            s.refresh(now)
        # With several groups, only those failover has up serve; when none is, a pick
        # may probe one that is not.
        failover = self.b.failover if self.b.group_names() else None
        if failover is not None:
            failover.refresh(now)
        nothing_serves = failover is not None and failover.serving is None
        usable = [s for s in live if s.available() and
                  (failover is None or failover.up(s.priority))]
        preferred = [s for s in usable if s not in avoid] or usable
        pick = self.b.pick(avoid=avoid)
        if pick is not None and pick.group_probe:
            assert failover is not None and nothing_serves
            assert not failover.up(pick.endpoint.priority)
            assert pick.probe == (pick.endpoint.health is not Health.HEALTHY)
            self.outstanding.append(pick)
            return
        if not usable:
            assert pick is None
            return
        assert pick is not None
        best = min(s.priority for s in preferred)
        assert pick.endpoint in preferred
        assert pick.endpoint.priority == best
        assert pick.probe == (pick.endpoint.health is Health.PROBING)
        self.outstanding.append(pick)

    def check_invariants(self, accrual: FailureAccrual) -> None:
        pending = Counter(id(p.endpoint) for p in self.outstanding)
        probes = Counter(id(p.endpoint) for p in self.outstanding if p.probe)
        states = {id(p.endpoint): p.endpoint for p in self.outstanding}
        states.update({id(s): s for s in self.b.endpoints})
        for key, s in states.items():
            assert s.pending == pending[key] >= 0
            assert probes[key] <= 1
            assert s.probe_in_flight == (probes[key] == 1)
            if s.health is Health.HEALTHY:
                assert s.failures < accrual.consecutive_failures
        for snap in self.b.snapshot():
            assert snap.pending >= 0
            assert snap.ejected_for_s <= accrual.backoff_max_s


@settings(max_examples=300, deadline=None)
@given(ops=ops, seed=st.integers(0, 2**32 - 1), failures=st.sampled_from([1, 1, 2, 3, 5]))
def test_any_sequence_keeps_the_invariants(ops: list[tuple[Any, ...]], seed: int,
                                           failures: int) -> None:
    clock = FakeClock()
    accrual = FailureAccrual(consecutive_failures=failures)
    model = Model(Balancer(POOL[:3], clock=clock, rng=random.Random(seed), accrual=accrual),
                  clock)
    for op in ops:
        kind = op[0]
        if kind == "update":
            model.b.update([POOL[i] for i in sorted(op[1])])
        elif kind == "pick":
            avoid = [p.endpoint for p in model.outstanding[-op[1]:]] if op[1] else []
            model.check_pick(avoid)
        elif kind == "advance":
            clock.advance(op[1])
        elif model.outstanding:
            pick = model.outstanding.pop(op[1] % len(model.outstanding))
            if kind == "succeed":
                pick.succeeded(op[2])
            elif kind == "fail":
                pick.failed()
            else:
                pick.released()
        model.check_invariants(accrual)
    for pick in model.outstanding:
        pick.released()
    assert all(s.pending == 0 for s in model.b.endpoints)
