"""The HTTP exchange machine on the way that works: keep-alive over pooled
connections, pipelining, chunked bodies and trailers, a client's Connection: close,
upgrades and CONNECT turning into an opaque relay, routing by authority. Each test
is a script of events in and commands out; no socket, no event loop."""

from __future__ import annotations

import msgspec

from mesh.proxy.exchange import Phase
from mesh.proxy.exchange_io import (
    CLIENT_EOF,
    CLOSE_UPSTREAM,
    PAUSE_CLIENT,
    POOL_UPSTREAM,
    RESUME_CLIENT,
    UPSTREAM_OPENED,
    UPSTREAM_REUSED,
    CancelTimer,
    ClientData,
    Close,
    EndWrite,
    OpenUpstream,
    Side,
    StartTimer,
    Timer,
    UpstreamClosed,
    UpstreamData,
    UpstreamEof,
    WriteClient,
    WriteUpstream,
)
from mesh.proxy.pool import Pool
from tests.unit.exchange_script import GET, OK, Script, endpoint, proxy_error, service

START = StartTimer(Timer.REQUEST, 1.0)
ENDED = Close("the exchange ended the connection")


def test_keep_alive_requests_go_over_a_pooled_connection() -> None:
    s = Script()
    web = s.service.endpoints[0]
    assert s.send(ClientData(GET)) == [START, OpenUpstream(s.service, web)]
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(GET)]
    s.now = 0.020
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]
    # The next request: the connection's request timer still runs; the pool answers.
    s.now = 0.5
    assert s.send(ClientData(GET)) == [OpenUpstream(s.service, web)]
    assert s.send(UPSTREAM_REUSED) == [WriteUpstream(GET)]
    s.now = 0.6
    assert s.send(UpstreamData(OK[:20])) == []  # a head is forwarded whole
    assert s.send(UpstreamData(OK[20:])) == [WriteClient(OK), POOL_UPSTREAM]
    assert s.metric("request_total", dst_service=s.service.name) == 2
    assert s.metric("response_total", status_code="200", classification="success") == 2
    assert s.metric("response_latency_ms_count", status_code="200") == 2
    assert s.metric("response_latency_ms_bucket", status_code="200", le="20.0") == 1
    state = s.balancer.endpoints[0]
    assert state.pending == 0 and state.failures == 0


def test_the_first_read_of_a_response_is_forwarded_in_one_write() -> None:
    s = Script()
    s.send(ClientData(GET))
    s.send(UPSTREAM_OPENED)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert s.send(UpstreamData(head + b"he")) == [WriteClient(head + b"he")]
    assert s.send(UpstreamData(b"llo")) == [WriteClient(b"llo"), POOL_UPSTREAM]


def test_pipelined_requests_are_answered_in_order() -> None:
    s = Script()
    last = b"GET /c HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    web = s.service.endpoints[0]
    # Requests that must wait are not read on (nor are the bytes behind them).
    assert s.send(ClientData(GET + GET.replace(b"/ok", b"/b") + last)) == [
        START, OpenUpstream(s.service, web), PAUSE_CLIENT]
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(GET)]
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM,
                                        OpenUpstream(s.service, web)]
    assert s.send(UPSTREAM_REUSED) == [WriteUpstream(GET.replace(b"/ok", b"/b"))]
    missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    assert s.send(UpstreamData(missing)) == [WriteClient(missing), POOL_UPSTREAM,
                                             OpenUpstream(s.service, web), RESUME_CLIENT]
    assert s.send(UPSTREAM_REUSED) == [WriteUpstream(b"GET /c HTTP/1.1\r\nHost: web\r\n\r\n")]
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"
    assert s.send(UpstreamData(OK)) == [WriteClient(closing), POOL_UPSTREAM,
                                        CancelTimer(Timer.REQUEST), ENDED]
    assert s.exchange.phase is Phase.CLOSED


def test_chunked_bodies_and_trailers_pass_as_they_came() -> None:
    s = Script()
    head = b"PUT /doc HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    # Held while the connection opens (and kept for a retry: it is small).
    assert s.send(ClientData(head + b"5\r\nhello\r\n")) == [
        START, OpenUpstream(s.service, s.service.endpoints[0])]
    assert s.send(ClientData(b"6\r\n world\r\n")) == []
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(head + b"5\r\nhello\r\n6\r\n world\r\n")]
    # Once connected, the rest streams on as it arrives, trailers included.
    assert s.send(ClientData(b"0\r\nX-Sum: 11\r\n\r\n")) == [
        WriteUpstream(b"0\r\nX-Sum: 11\r\n\r\n")]
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert s.send(UpstreamData(response)) == [WriteClient(response)]
    assert s.send(UpstreamData(b"0\r\nX-Trail")) == [WriteClient(b"0\r\n")]
    # A trailer section is forwarded whole, once checked.
    assert s.send(UpstreamData(b"er: t\r\n\r\n")) == [WriteClient(b"X-Trailer: t\r\n\r\n"),
                                                     POOL_UPSTREAM]


def test_a_client_that_closes_keeps_the_connection_between_proxies() -> None:
    s = Script()
    request = b"GET /ok HTTP/1.1\r\nHost: web\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\r\n"
    s.send(ClientData(request))
    # Upstream, neither Connection nor the field it names: the connection stays open.
    assert s.send(UPSTREAM_REUSED) == [WriteUpstream(b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n")]
    kept_open = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    # The client is told the connection closes, whatever the upstream said.
    told = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert s.send(UpstreamData(kept_open)) == [WriteClient(told), POOL_UPSTREAM,
                                               CancelTimer(Timer.REQUEST), ENDED]


def test_a_client_that_half_closes_gets_its_answer_then_the_end() -> None:
    s = Script()
    s.send(ClientData(GET))
    assert s.send(CLIENT_EOF) == []
    s.send(UPSTREAM_OPENED)
    assert s.send(UpstreamData(OK)) == [
        WriteClient(OK), POOL_UPSTREAM, CancelTimer(Timer.REQUEST),
        Close("the connection ended between requests")]


def test_an_upstream_that_closes_after_its_response_is_not_pooled() -> None:
    s = Script()
    s.send(ClientData(GET))
    s.send(UPSTREAM_OPENED)
    response = b"HTTP/1.1 200 OK\r\n\r\nuntil the end"  # close-delimited
    assert s.send(UpstreamData(response)) == [WriteClient(response)]
    assert s.send(UpstreamEof()) == [CLOSE_UPSTREAM]
    # The client's own connection stays open for its next request.
    assert s.send(ClientData(GET)) == [OpenUpstream(s.service, s.service.endpoints[0])]


def test_an_accepted_upgrade_turns_into_an_opaque_relay() -> None:
    s = Script()
    request = (b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
    s.send(ClientData(request))
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(request)]
    # Frames sent early wait for the answer, which decides what they are.
    assert s.send(ClientData(b"early")) == [PAUSE_CLIENT]
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert s.send(UpstreamData(head + b"hello")) == [
        WriteClient(head), CancelTimer(Timer.REQUEST), WriteUpstream(b"early"),
        WriteClient(b"hello"), RESUME_CLIENT]
    assert s.exchange.phase is Phase.RELAY
    assert s.send(ClientData(b"GET / HTTP/1.1")) == [WriteUpstream(b"GET / HTTP/1.1")]
    assert s.send(UpstreamData(b"\x81\x05")) == [WriteClient(b"\x81\x05")]
    assert s.send(CLIENT_EOF) == [EndWrite(Side.UPSTREAM)]
    assert s.send(UpstreamEof()) == [CLOSE_UPSTREAM, Close("both sides of the relay ended")]
    assert s.metric("response_total", status_code="101", classification="success") == 1


def test_an_accepted_connect_turns_into_an_opaque_relay() -> None:
    s = Script()
    request = b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    s.send(ClientData(request))
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(request)]
    head = b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert s.send(UpstreamData(head)) == [WriteClient(head), CancelTimer(Timer.REQUEST)]
    assert s.send(ClientData(b"\x00\x00\x00\x08")) == [WriteUpstream(b"\x00\x00\x00\x08")]
    assert s.send(UpstreamClosed("reset by peer")) == [Close("the upstream closed: reset by peer")]


def test_a_declined_upgrade_stays_http() -> None:
    s = Script()
    request = b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    s.send(ClientData(request))
    s.send(UPSTREAM_OPENED)
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]
    assert s.exchange.phase is Phase.HTTP
    assert s.send(ClientData(GET)) == [OpenUpstream(s.service, s.service.endpoints[0])]


def test_requests_are_routed_by_their_authority() -> None:
    s = Script(routed=True)
    named = b"GET /ok HTTP/1.1\r\nHost: web.default.svc.cluster.local:80\r\n\r\n"
    assert s.send(ClientData(named)) == [START, OpenUpstream(s.service, s.service.endpoints[0])]
    s.send(UPSTREAM_OPENED)
    s.send(UpstreamData(OK))
    commands = s.send(ClientData(b"GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n"))
    assert proxy_error(commands[0]) == (502, "no service named nosuch is known to the proxy")
    assert commands[1:] == [CancelTimer(Timer.REQUEST),
                            Close("no service named nosuch is known to the proxy")]
    assert s.metric("proxy_protocol_errors_total", cause="no-service") == 1


def test_connections_are_pooled_by_endpoint_identity_and_header_name() -> None:
    # A gateway routes a whole connection by its transport header's name: two services
    # behind one gateway must not share a connection.
    gateway = msgspec.structs.replace(endpoint(9), authority="web.default.svc.cluster.local")
    other = msgspec.structs.replace(gateway, authority="api.default.svc.cluster.local")
    web, api = service(gateway), service(other, name="api")
    assert Pool.key(web, gateway) != Pool.key(api, other)
    assert Pool.key(web, gateway) == Pool.key(api, gateway)
    assert Pool.key(web, endpoint(1)) != Pool.key(api, endpoint(1))
    assert Pool.key(web, endpoint(1)) != Pool.key(web, endpoint(2))
