"""The gateway's liveness hysteresis: consecutive failures before not-alive,
consecutive successes before alive again; one late probe is not an outage."""

from __future__ import annotations

from mirror.probe import GatewayHealth


def _feed(health: GatewayHealth, outcomes: str) -> list[bool]:
    """Feed "+" (success) and "-" (failure); returns `alive` after each."""
    out = []
    for c in outcomes:
        health.record(c == "+", "" if c == "+" else "timeout")
        out.append(health.alive)
    return out


def test_starts_alive_and_needs_the_threshold_of_failures() -> None:
    h = GatewayHealth(failure_threshold=3)
    assert h.alive and not h.probed
    assert _feed(h, "--") == [True, True]
    assert _feed(h, "-") == [False]
    assert h.last_error == "timeout"


def test_a_single_late_probe_does_not_flap() -> None:
    h = GatewayHealth(failure_threshold=3)
    assert all(_feed(h, "+-+--+-+--+"))


def test_recovery_needs_consecutive_successes() -> None:
    h = GatewayHealth(failure_threshold=2, success_threshold=3)
    assert _feed(h, "--") == [True, False]
    assert _feed(h, "++-++") == [False] * 5
    assert _feed(h, "+") == [True]


def test_record_reports_only_transitions() -> None:
    h = GatewayHealth(failure_threshold=1)
    assert h.record(True) is False
    assert h.record(False, "refused") is True
    assert h.record(False, "refused") is False
    assert h.record(True) is True
