"""Gateway addresses: IPs as they are, names re-resolved as their TTLs run out,
and a name that stops resolving keeps its last addresses; driven by a fake
resolver and a fake clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mirror.addresses import MIN_TTL, GatewayAddresses
from mirror.errors import MirrorError


class FakeDns:
    def __init__(self) -> None:
        self.records: dict[str, tuple[list[str], float]] = {}
        self.asked: list[str] = []

    async def __call__(self, name: str) -> tuple[list[str], float]:
        self.asked.append(name)
        if name not in self.records:
            raise MirrorError(f"gateway address {name} does not resolve: NXDOMAIN")
        return self.records[name]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ips_need_no_resolving() -> None:
    dns, clock = FakeDns(), Clock()
    gw = GatewayAddresses(["192.0.2.2", "2001:DB8::1"], resolve=dns, clock=clock)
    assert gw.addresses() == ["192.0.2.2", "2001:db8::1"]
    assert gw.next_due() is None
    assert asyncio.run(gw.refresh()) is False and dns.asked == []


def test_names_are_resolved_again_when_their_ttl_runs_out() -> None:
    dns, clock = FakeDns(), Clock()
    dns.records["gw.example"] = (["192.0.2.7", "192.0.2.8"], 30.0)
    gw = GatewayAddresses(["gw.example", "192.0.2.1"], resolve=dns, clock=clock)
    assert gw.addresses() == ["192.0.2.1"]
    assert asyncio.run(gw.refresh()) is True
    assert gw.addresses() == ["192.0.2.1", "192.0.2.7", "192.0.2.8"]
    assert gw.next_due() == 130.0
    clock.now = 129.0
    assert asyncio.run(gw.refresh()) is False and dns.asked == ["gw.example"]
    dns.records["gw.example"] = (["192.0.2.9"], 0.0)
    clock.now = 130.0
    assert asyncio.run(gw.refresh()) is True
    assert gw.addresses() == ["192.0.2.1", "192.0.2.9"]
    assert gw.next_due() == 130.0 + MIN_TTL  # a zero TTL is not a busy loop


def test_a_name_that_stops_resolving_keeps_its_addresses(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    dns, clock = FakeDns(), Clock()
    dns.records["gw.example"] = (["192.0.2.7"], 5.0)
    gw = GatewayAddresses(["gw.example"], resolve=dns, clock=clock)
    asyncio.run(gw.refresh())
    del dns.records["gw.example"]
    caplog.set_level(logging.INFO, logger="mirror.addresses")
    delays = []
    for _ in range(4):
        clock.now = gw.next_due() or 0.0
        assert asyncio.run(gw.refresh()) is False
        assert gw.addresses() == ["192.0.2.7"]
        delays.append((gw.next_due() or 0.0) - clock.now)
    assert delays == [1.0, 2.0, 4.0, 8.0]  # backoff between attempts
    failures = [r for r in caplog.records if "not resolved" in r.getMessage()]
    assert len(failures) == 1 and "kept=192.0.2.7" in failures[0].getMessage()
    dns.records["gw.example"] = (["192.0.2.8"], 5.0)
    clock.now = gw.next_due() or 0.0
    assert asyncio.run(gw.refresh()) is True
    assert any("resolves again" in r.getMessage() for r in caplog.records)
