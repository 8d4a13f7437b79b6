"""The HTTP exchange machine of a failover service: a request that may be retried
moves into the next priority group when its group fails, one that may not is never
replayed and says why, and with every group down the answer names them. Scripts of
events in and commands out on a fake clock."""

from __future__ import annotations

from mesh.proxy.discovery import EndpointSpec
from mesh.proxy.exchange_io import (
    CLOSE_UPSTREAM,
    POOL_UPSTREAM,
    UPSTREAM_OPENED,
    UPSTREAM_REUSED,
    ClientData,
    OpenUpstream,
    UpstreamClosed,
    UpstreamData,
    UpstreamFailed,
    WriteClient,
    WriteUpstream,
)
from tests.unit.exchange_script import GET, OK, WEB_ID, Script, proxy_error

CLUSTERS = ("east", "west", "central")
POST = b"POST /orders HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\n{}"
NOT_READY = (b"HTTP/1.1 503 Service Unavailable\r\nl5d-proxy-error: no endpoints available "
             b"for web.default.svc.cluster.local\r\nContent-Length: 0\r\n\r\n")
REFUSED = UpstreamFailed("[Errno 111] Connection refused")
SILENT = UpstreamClosed("[Errno 110] Connection timed out", timed_out=True)
"""The kernel ended a connection whose peer acknowledged nothing (mesh.proxy.dial)."""
NAME = "web.default.svc.cluster.local"


def grouped(priority: int) -> EndpointSpec:
    """The one endpoint of `priority`'s group: a pod here, a linked cluster's gateway."""
    return EndpointSpec(address=f"10.{priority + 1}.0.1:4143", target_port=8080,
                        identity=WEB_ID, priority=priority, cluster=CLUSTERS[priority])


def script(groups: int = 3) -> Script:
    return Script(*(grouped(p) for p in range(groups)))


def opened(commands: list[object]) -> EndpointSpec:
    found = [c for c in commands if isinstance(c, OpenUpstream)]
    assert len(found) == 1, commands
    return found[0].endpoint


def test_a_get_whose_group_refuses_it_is_retried_in_the_next_group() -> None:
    s = script()
    assert opened(s.send(ClientData(GET))).priority == 0
    assert opened(s.send(REFUSED)).priority == 1
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(GET)]
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]
    assert s.metric("outbound_failover_retries_total", dst_service=NAME,
                    to_cluster="west") == 1
    assert s.metric("outbound_failover_events_total", from_cluster="east", to_cluster="west",
                    direction="failover", cause="connect-error") == 1
    assert s.metric("outbound_failover_group", cluster="west") == 1
    assert s.metric("outbound_failover_group", cluster="east") == 0


def test_a_gateway_that_answers_not_ready_is_passed_over() -> None:
    s = script()
    s.send(ClientData(GET))
    s.send(UPSTREAM_REUSED)
    commands = s.send(UpstreamData(NOT_READY))
    assert commands[0] == CLOSE_UPSTREAM and opened(commands).priority == 1
    assert s.metric("outbound_failover_events_total", cause="not-ready") == 1


def test_a_post_whose_connection_never_opened_goes_to_the_next_group() -> None:
    s = script()
    assert opened(s.send(ClientData(POST))).priority == 0
    # Refused: the POST never left the proxy, so sending it elsewhere replays nothing.
    assert opened(s.send(REFUSED)).priority == 1
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(POST)]
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]
    assert s.metric("outbound_failover_unreplayed_total") == 0
    assert s.metric("outbound_failover_retries_total", to_cluster="west") == 1


def test_a_post_that_was_sent_is_not_replayed_into_another_group() -> None:
    s = script()
    assert opened(s.send(ClientData(POST))).priority == 0
    assert s.send(UPSTREAM_OPENED) == [WriteUpstream(POST)]
    commands = s.send(UpstreamClosed("[Errno 104] Connection reset by peer"))
    assert not any(isinstance(c, OpenUpstream) for c in commands)
    status, cause = proxy_error(next(c for c in commands if isinstance(c, WriteClient)))
    assert status == 502
    assert cause == ("10.1.0.1:4143 (cluster east) closed the connection before answering: "
                     "[Errno 104] Connection reset by peer; POST is not idempotent and was "
                     "not sent to another group")
    assert s.metric("outbound_failover_unreplayed_total", dst_service=NAME, cluster="east",
                    cause="reset") == 1


def test_with_every_group_down_the_answer_names_them() -> None:
    s = script()
    s.send(ClientData(GET))
    assert opened(s.send(REFUSED)).priority == 1
    assert opened(s.send(REFUSED)).priority == 2
    commands = s.send(REFUSED)
    status, cause = proxy_error(commands[0])
    assert status == 503
    assert cause == (f"no healthy endpoint of {NAME} in groups east, west, central; last: "
                     "connection to 10.3.0.1:4143 (cluster central) failed: [Errno 111] "
                     "Connection refused")
    assert s.metric("outbound_failover_retries_total") == 2
    assert s.metric("outbound_failover_events_total", to_cluster="", direction="failover") == 1


def test_a_get_on_a_pooled_connection_into_a_partition_moves_to_the_next_group() -> None:
    s = script()
    s.send(ClientData(GET))
    assert s.send(UPSTREAM_REUSED) == [WriteUpstream(GET)]
    assert opened(s.send(SILENT)).priority == 1
    s.send(UPSTREAM_OPENED)
    assert s.send(UpstreamData(OK)) == [WriteClient(OK), POOL_UPSTREAM]
    # One silent peer is enough: the group's only endpoint cannot be reached.
    assert s.metric("outbound_failover_events_total", from_cluster="east", to_cluster="west",
                    cause="unacknowledged") == 1


def test_a_post_on_a_pooled_connection_into_a_partition_is_not_replayed() -> None:
    s = script()
    s.send(ClientData(POST))
    s.send(UPSTREAM_REUSED)
    commands = s.send(SILENT)
    assert not any(isinstance(c, OpenUpstream) for c in commands)
    status, cause = proxy_error(next(c for c in commands if isinstance(c, WriteClient)))
    assert status == 502
    assert cause == ("10.1.0.1:4143 (cluster east) acknowledged nothing of the request; the "
                     "connection timed out; POST is not idempotent and was not sent to "
                     "another group")
    assert s.metric("outbound_failover_unreplayed_total", dst_service=NAME, cluster="east",
                    cause="unacknowledged") == 1
