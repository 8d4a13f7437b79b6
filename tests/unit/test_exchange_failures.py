"""The HTTP exchange machine when things go wrong: retries under the retry budget,
timeouts as fired timers (504, 408), errors answered with l5d-proxy-error (502, 503,
400), failure accrual, back-pressure both ways, a client that goes away. Scripts of
events in and commands out on a fake clock; no socket, no event loop."""

from __future__ import annotations

from mesh.proxy.balancer import Health
from mesh.proxy.exchange_io import (
    CLOSE_UPSTREAM,
    PAUSE_CLIENT,
    PAUSE_UPSTREAM,
    POOL_UPSTREAM,
    RESUME_CLIENT,
    RESUME_UPSTREAM,
    UPSTREAM_OPENED,
    UPSTREAM_REUSED,
    CancelTimer,
    ClientClosed,
    ClientData,
    Close,
    OpenUpstream,
    Side,
    StartTimer,
    Timer,
    TimerFired,
    UpstreamClosed,
    UpstreamData,
    UpstreamFailed,
    WriteBufferDrained,
    WriteBufferFull,
    WriteClient,
    WriteUpstream,
)
from tests.unit.exchange_script import GET, OK, Script, endpoint, proxy_error

UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
ENDED = Close("the exchange ended the connection")
CANCEL = CancelTimer(Timer.REQUEST)


def _opened(s: Script, request: bytes = GET) -> OpenUpstream:
    """Send `request`; the endpoint its first attempt goes to."""
    opened = [c for c in s.send(ClientData(request)) if isinstance(c, OpenUpstream)]
    assert len(opened) == 1
    return opened[0]


def test_a_failed_connection_is_retried_on_another_endpoint() -> None:
    s = Script(endpoint(1), endpoint(2))
    first = _opened(s).endpoint
    commands = s.send(UpstreamFailed("[Errno 111] Connection refused"))
    assert len(commands) == 1 and isinstance(commands[0], OpenUpstream)
    assert commands[0].endpoint != first
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(GET)]
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]
    states = {state.spec: state for state in s.balancer.endpoints}
    assert states[first].failures == 1 and states[commands[0].endpoint].failures == 0
    assert s.metric("request_total") == 1  # a retry is not another request


def test_a_503_is_retried_on_another_endpoint() -> None:
    s = Script(endpoint(1), endpoint(2))
    first = _opened(s).endpoint
    s.send(UPSTREAM_REUSED)
    commands = s.send(UpstreamData(UNAVAILABLE))
    assert commands[0] == CLOSE_UPSTREAM and isinstance(commands[1], OpenUpstream)
    assert commands[1].endpoint != first
    s.send(UPSTREAM_REUSED)
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]


def test_no_retry_once_the_budget_is_spent() -> None:
    s = Script(endpoint(1), endpoint(2))
    budget = s.shared.budget(s.service.name)
    while budget.withdraw():
        pass
    first = _opened(s).endpoint
    commands = s.send(UpstreamFailed("[Errno 111] Connection refused"))
    assert proxy_error(commands[0]) == (
        502, f"connection to {first.address} failed: [Errno 111] Connection refused")
    assert commands[1:] == [CANCEL, ENDED]
    assert s.metric("response_total", status_code="502", classification="failure",
                    error="connection to 10.1.0.1") + s.metric(
        "response_total", status_code="502", error="connection to 10.1.0.2") == 1
    # The budget refills as its window moves on.
    s.now = 10.0
    assert budget.balance > 0


def test_requests_that_are_not_idempotent_are_not_retried_once_sent() -> None:
    post = b"POST /orders HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\n{}"
    s = Script(endpoint(1), endpoint(2))
    _opened(s, post)
    s.send(UPSTREAM_OPENED)
    commands = s.send(UpstreamClosed("[Errno 104] Connection reset by peer"))
    assert proxy_error(commands[0])[0] == 502 and commands[1:] == [CANCEL, ENDED]
    # Refused before it was sent: it carried nothing, so it goes to the next endpoint.
    never_sent = Script(endpoint(1), endpoint(2))
    _opened(never_sent, post)
    assert isinstance(never_sent.send(UpstreamFailed("[Errno 111] Connection refused"))[0],
                      OpenUpstream)


def test_a_connection_that_closes_unanswered_is_retried_for_idempotent_requests() -> None:
    # A pooled connection may have been closed by its peer as it was taken; a new one
    # that is reset has perhaps seen the request, which only an idempotent one survives
    # (the retry budget bounds a request that kills every server it reaches).
    s = Script(endpoint(1), endpoint(2))
    _opened(s)
    s.send(UPSTREAM_REUSED)
    assert isinstance(s.send(UpstreamClosed(""))[0], OpenUpstream)
    s.send(UPSTREAM_OPENED)
    assert isinstance(s.send(UpstreamClosed("[Errno 104] Connection reset by peer"))[0],
                      OpenUpstream)
    post = Script(endpoint(1), endpoint(2))
    _opened(post, b"POST /orders HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\n{}")
    post.send(UPSTREAM_OPENED)
    commands = post.send(UpstreamClosed("[Errno 104] Connection reset by peer"))
    assert proxy_error(commands[0])[1].endswith(
        "closed the connection before answering: [Errno 104] Connection reset by peer")


def test_endpoints_that_keep_failing_are_ejected_then_the_request_fails() -> None:
    s = Script(endpoint(1), endpoint(2))
    _opened(s)
    attempts = 1
    while isinstance((commands := s.send(UpstreamFailed("refused")))[0], OpenUpstream):
        attempts += 1
    assert attempts == 10  # five consecutive failures each (failure accrual)
    assert [state.health for state in s.balancer.endpoints] == [Health.EJECTED] * 2
    assert proxy_error(commands[0])[0] == 502


def test_no_endpoints_is_503() -> None:
    s = Script()
    s.balancer.update([])
    commands = s.send(ClientData(GET))
    assert commands[0] == StartTimer(Timer.REQUEST, 1.0)
    assert proxy_error(commands[1]) == (
        503, "no endpoints available for web.default.svc.cluster.local")
    assert commands[2:] == [CANCEL, ENDED]


def test_a_malformed_request_is_400() -> None:
    s = Script()
    commands = s.send(ClientData(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n"
                                 b"Content-Length: 2\r\n\r\n"))
    status, cause = proxy_error(commands[0])
    assert status == 400 and cause.startswith("malformed request: ")
    assert isinstance(commands[1], Close) and len(commands) == 2
    assert s.metric("proxy_protocol_errors_total", cause="bad-request") == 1


def test_an_unanswered_request_times_out_with_504() -> None:
    s = Script(request_timeout=1.0)
    assert s.send(ClientData(GET))[0] == StartTimer(Timer.REQUEST, 1.0)
    s.send(UPSTREAM_OPENED)
    s.send(UpstreamData(OK))
    # The connection's timer, started for the first request, fires during the
    # second: it starts again for the second one's deadline.
    s.now = 0.5
    _opened(s)
    s.send(UPSTREAM_REUSED)
    s.now = 1.0
    assert s.send(TimerFired(Timer.REQUEST)) == [StartTimer(Timer.REQUEST, 0.5)]
    s.now = 1.5
    commands = s.send(TimerFired(Timer.REQUEST))
    assert commands[0] == CLOSE_UPSTREAM
    assert proxy_error(commands[1]) == (
        504, "request to web.default.svc.cluster.local timed out after 1s")
    assert commands[2:] == [ENDED]
    assert s.balancer.endpoints[0].failures == 1
    assert s.metric("response_total", status_code="504", classification="failure") == 1


def test_a_response_still_streaming_at_the_deadline_is_cut() -> None:
    s = Script(request_timeout=1.0)
    s.send(ClientData(GET))
    s.send(UPSTREAM_OPENED)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nla"
    assert s.send(UpstreamData(head)) == [WriteClient(head)]
    s.now = 1.0
    assert s.send(TimerFired(Timer.REQUEST)) == [CLOSE_UPSTREAM, ENDED]


def test_a_head_not_complete_in_time_is_408() -> None:
    s = Script(head_timeout=10.0)
    assert s.send(ClientData(b"GET /ok HTTP/1.1\r\nHost: web\r\n")) == [
        StartTimer(Timer.HEAD, 10.0)]
    s.now = 10.0
    commands = s.send(TimerFired(Timer.HEAD))
    assert proxy_error(commands[0]) == (408, "the request head was not complete within 10s")
    assert len(commands) == 2 and isinstance(commands[1], Close)
    assert s.metric("proxy_protocol_errors_total", cause="head-timeout") == 1


def test_a_head_complete_in_time_stops_its_timer() -> None:
    s = Script(head_timeout=10.0)
    s.send(ClientData(b"GET /ok HTTP/1.1\r\nHost: web\r\n"))
    assert s.send(ClientData(b"\r\n"))[:2] == [CancelTimer(Timer.HEAD),
                                               StartTimer(Timer.REQUEST, 1.0)]


def test_a_client_that_does_not_read_pauses_the_upstream() -> None:
    s = Script()
    s.send(ClientData(GET))
    s.send(UPSTREAM_OPENED)
    assert s.send(UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")) != []
    assert s.send(WriteBufferFull(Side.CLIENT)) == [PAUSE_UPSTREAM]
    assert s.send(WriteBufferDrained(Side.CLIENT)) == [RESUME_UPSTREAM]
    # A client still not reading when the next upstream is taken pauses that one.
    s.send(UpstreamData(b"defghi"))
    s.send(WriteBufferFull(Side.CLIENT))
    s.send(ClientData(GET))
    assert s.send(UPSTREAM_REUSED) == [WriteUpstream(GET), PAUSE_UPSTREAM]


def test_an_upstream_that_does_not_read_pauses_the_client() -> None:
    s = Script()
    head = b"PUT /big HTTP/1.1\r\nHost: web\r\nContent-Length: 200000\r\n\r\n"
    s.send(ClientData(head))
    s.send(UPSTREAM_OPENED)
    assert s.send(ClientData(b"x" * 1000)) == [WriteUpstream(b"x" * 1000)]
    assert s.send(WriteBufferFull(Side.UPSTREAM)) == [PAUSE_CLIENT]
    assert s.send(WriteBufferDrained(Side.UPSTREAM)) == [RESUME_CLIENT]


def test_a_large_body_waits_for_its_connection_unread_and_is_not_retried() -> None:
    s = Script(endpoint(1), endpoint(2))
    head = b"PUT /big HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\n"
    _opened(s, head + b"x" * 70_000)
    # Past the retry buffer while the connection opens: the rest waits in the socket.
    assert s.send(ClientData(b"y" * 30_000)) == [PAUSE_CLIENT]
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(head + b"x" * 70_000),
                                       WriteUpstream(b"y" * 30_000), RESUME_CLIENT]
    commands = s.send(UpstreamClosed("[Errno 104] Connection reset by peer"))
    assert proxy_error(commands[0])[0] == 502  # the body was streamed: no retry


def test_a_client_that_goes_away_gives_everything_back() -> None:
    s = Script()
    s.send(ClientData(GET))
    s.send(UPSTREAM_OPENED)
    assert s.send(ClientClosed("[Errno 104] Connection reset by peer")) == [
        CANCEL, CLOSE_UPSTREAM, Close("the client went away: [Errno 104] Connection reset by peer")]
    assert s.balancer.endpoints[0].pending == 0
    assert s.send(UpstreamData(OK)) == []


def test_a_connection_opened_for_a_client_gone_goes_to_the_pool() -> None:
    s = Script()
    s.send(ClientData(GET))
    assert s.send(ClientClosed("")) == [CANCEL, Close("the client went away: EOF")]
    assert s.send(UPSTREAM_OPENED) == [POOL_UPSTREAM]
    assert s.send(UpstreamFailed("too late")) == []
