"""The asyncio adapter of the HTTP exchange (mesh.proxy.http): it carries out what
the machine answers on transports, the pool and the event loop, and nothing it does
not know; the connection's protocol hands every event over to it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy.dial import Dialer
from mesh.proxy.exchange import Exchange
from mesh.proxy.exchange_io import Timer
from mesh.proxy.http import ClientConnection, HttpOutbound
from mesh.proxy.pool import Pool, Upstream
from mesh.proxy.relay import Flow, Phase
from tests.unit.exchange_script import GET, OK, PEER, Script


class _Transport:
    """What the adapter needs of a transport: it records writes and closes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _http() -> HttpOutbound:
    return HttpOutbound(Pool(Dialer(lambda: pytest.fail("no connection is opened"), timeout=1)),
                        ProxyMetrics(CollectorRegistry()), request_timeout=1.0,
                        own_identity=lambda: Identity("default", "client", "cluster.local"))


async def test_the_adapter_carries_out_the_commands_on_transports() -> None:
    s = Script()
    http = _http()
    key = Pool.key(s.service, s.service.endpoints[0])
    up, up_transport = Upstream(key), _Transport()
    up.connection_made(up_transport)  # type: ignore[arg-type]
    http.pool.put(up)
    client = _Transport()
    connection = http.serve(client, s.service, s.balancer,  # type: ignore[arg-type]
                            peer=PEER)
    connection.start(GET, eof=False)
    assert client.reading and up_transport.written == [GET] and up.owner is connection
    assert set(connection.timers) == {Timer.REQUEST}
    up.data_received(OK)
    assert client.written == [OK] and http.pool.idle[key] == [up] and up.owner is None
    connection.connection_lost(None)
    assert client.closed and not connection.timers


def test_the_adapter_refuses_a_command_it_does_not_know() -> None:
    s = Script()
    client = ClientConnection(_http(), _Transport(),  # type: ignore[arg-type]
                              Exchange(s.shared, s.service, s.balancer, peer=PEER))
    with pytest.raises((AssertionError, TypeError)):
        client.execute([object()])  # type: ignore[list-item]


class _Layer:
    def __init__(self) -> None:
        self.events: list[object] = []

    def data_received(self, data: bytes) -> None:
        self.events.append(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def test_a_connection_handed_over_passes_every_event_to_its_layer() -> None:
    closed: list[Flow] = []
    half = Flow({}, lambda flow, exc: closed.append(flow)).client
    layer = _Layer()
    half.hand_over(layer)
    assert half.phase is Phase.HANDED_OVER
    half.data_received(GET)
    assert half.eof_received()
    half.pause_writing()
    half.resume_writing()
    half.connection_lost(None)
    assert layer.events == [GET, "eof", "pause", "resume", ("lost", None)]
    assert half.read_bytes == 0 and not half.pending and not closed  # no flow was relayed
