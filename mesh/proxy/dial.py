"""The one dial path to mesh peers: every connection a proxy or the gateway opens to
another proxy or gateway goes through a `Dialer`.

`Dialer.open` makes one connection: mTLS with the workload's client context
(which resumes TLS sessions with peers it has met, `ResumingContext`), the
check that the peer presents the identity discovery named for it, and the
transport header (with the caller's assertion when the endpoint is a linked
cluster's gateway, `peer_header`). An endpoint outside the mesh gets plain TCP,
where the dialer allows it. Failures leave here typed, and only here is a TLS
failure translated into words (`explain_dial_failure`): the side, the expected
and presented identities, the chain's validity and clock skew, the anchor that
is missing. That costs a second dial to read the refused certificate, paid only
on failure and bounded by the connect timeout. Every connection it makes also
gives up on a peer that acknowledges nothing sent to it within the connect timeout
(TCP_USER_TIMEOUT): a pooled connection into a partition, which no reset ever
ends, fails in a second as a new connection would, instead of holding its request
until the request timeout; the exchange then moves an idempotent request on.

`Dialer.connect_first` is the connect-retry loop of a relayed connection (the
opaque outbound and the gateway): up to `CONNECT_ATTEMPTS` endpoints, each
attempt's outcome reported to the balancer, and the caller's departure
noticed between attempts; for a failover service a connect or handshake failure
moves the next attempt to the next endpoint or priority group (mesh.proxy.failover).
An established opaque connection is never moved: its bytes already reached one
endpoint, so when that endpoint's group fails the connection ends and the client
reconnects, to the group then serving. HTTP requests retry per request instead
(mesh.proxy.http), over connections the pool opens with `Dialer.open`.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mesh.errors import ConnectError, IdentityError
from mesh.identity.names import Identity
from mesh.identity.tls import check_peer, context_bundle, explain_dial_failure
from mesh.proxy.assertion import peer_header
from mesh.proxy.balancer import EndpointState, Pick
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.failover import Cause
from mesh.proxy.relay import Flow, release
from mesh.proxy.transport_header import SessionProtocol, TransportHeader

CONNECT_ATTEMPTS = 3

DialError = ConnectError | IdentityError
"""What `Dialer.open` raises: the peer was not reached, or not the peer it must be."""

NoEndpoint = TypeVar("NoEndpoint")


class CallerLeft(enum.Enum):
    """`connect_first`'s answer when the caller's connection closed meanwhile."""

    CALLER_LEFT = "the caller left while its upstream was being dialled"


CALLER_LEFT = CallerLeft.CALLER_LEFT


@dataclass(frozen=True)
class Connected:
    """An endpoint answered: the flow's upstream is connected to it."""

    pick: Pick
    identity: Identity | None
    """The identity it proved; None for plain TCP to an endpoint outside the mesh."""


@dataclass(frozen=True)
class Unreachable:
    """Every attempt failed; `error` is the last attempt's, on `endpoint`."""

    attempts: int
    endpoint: EndpointSpec
    error: DialError

    def __str__(self) -> str:
        return (f"no endpoint answered after {self.attempts} attempts; last: "
                f"{self.endpoint.address} ({self.endpoint.identity or 'not meshed'}): "
                f"{self.error}")


def bound_unacknowledged(transport: asyncio.BaseTransport, seconds: float) -> None:
    """Make the kernel close `transport`'s TCP connection, with ETIMEDOUT, when data
    sent on it stays unacknowledged for `seconds`."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        max(1, round(seconds * 1000)))


class Dialer:
    """Opens connections to endpoints for one workload.

    ``credentials`` gives the client context to dial with (called for each
    connection, so a renewed certificate or a new trust bundle is used at once);
    when it is a `ClientCredentials` it also signs caller assertions. Without
    ``plain`` an endpoint that has no identity is refused rather than dialled in
    plain TCP (the gateway, which sends the caller's identity, never does that).
    """

    def __init__(self, credentials: Callable[[], ssl.SSLContext], *, timeout: float,
                 plain: bool = True) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.plain = plain

    def header(self, endpoint: EndpointSpec, service: ServiceSpec,
               protocol: SessionProtocol | None = None) -> TransportHeader:
        """The transport header for `endpoint`, an endpoint of `service`, from this
        workload (naming the service over there for a linked cluster's gateway)."""
        return peer_header(self.credentials, endpoint, service, protocol)

    async def open(self, protocol: asyncio.Protocol, endpoint: EndpointSpec,
                   header: TransportHeader) -> Identity | None:
        """Connect `protocol` to `endpoint`: mTLS, the identity check and `header`; plain
        TCP (no header) when the endpoint is outside the mesh. Returns the identity the
        peer proved, None for plain TCP.

        Raises `ConnectError` or an `IdentityError` that explains a TLS failure; a
        connection that was made and then refused is closed without telling `protocol`.
        """
        loop = asyncio.get_running_loop()
        host, port = endpoint.host_port
        if endpoint.identity is None:
            if not self.plain:
                raise IdentityError(f"endpoint {endpoint.address} has no identity: it is not "
                                    "meshed, and this side dials meshed endpoints only")
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: protocol, host, port), self.timeout)
            except (OSError, TimeoutError) as e:
                raise self._unreachable(endpoint, release(e)) from e
            bound_unacknowledged(transport, self.timeout)
            return None
        expected = Identity.parse(endpoint.identity)
        context = self.credentials()
        try:
            transport, _ = await asyncio.wait_for(loop.create_connection(
                lambda: protocol, host, port, ssl=context, server_hostname=endpoint.identity,
                ssl_handshake_timeout=self.timeout), self.timeout)
        except ssl.SSLError as e:
            raise await explain_dial_failure(
                release(e), host=host, port=port, peer=endpoint.address, expected=expected,
                bundle=context_bundle(context), timeout=self.timeout) from e
        except (OSError, TimeoutError) as e:
            raise self._unreachable(endpoint, release(e)) from e
        try:
            check_peer(transport.get_extra_info("ssl_object"), expected=expected,
                       side="server", peer=endpoint.address)
        except IdentityError:
            # Its end is this attempt's, not the protocol's: a flow lives on to try again.
            transport.set_protocol(asyncio.Protocol())
            transport.close()
            raise
        bound_unacknowledged(transport, self.timeout)
        transport.write(header.encode())
        return expected

    def _unreachable(self, endpoint: EndpointSpec, e: OSError | TimeoutError) -> ConnectError:
        if isinstance(e, TimeoutError):
            return ConnectError(f"{endpoint.address} did not accept the connection and "
                                f"finish the TLS handshake within {self.timeout:g}s")
        return ConnectError(f"{endpoint.address} unreachable: {e}")

    async def connect_first(
            self, flow: Flow, choose: Callable[[Sequence[EndpointState]], Pick | NoEndpoint],
            header: Callable[[EndpointSpec], TransportHeader], *,
            failed: Callable[[EndpointSpec, DialError], None],
            attempts: int = CONNECT_ATTEMPTS) -> Connected | Unreachable | CallerLeft | NoEndpoint:
        """Connect `flow`'s upstream to the first endpoint that answers.

        `choose` picks an endpoint avoiding those tried, or says why there is none
        (returned as is); `failed` hears of each failed attempt (for its log line).
        On `Connected` the upstream is open and the header sent; otherwise the
        upstream is closed, and the caller's connection is left to the caller.
        """
        tried: list[EndpointState] = []
        last: tuple[EndpointSpec, DialError] | None = None
        for _attempt in range(attempts):
            pick = choose(tried)
            if not isinstance(pick, Pick):
                return pick
            tried.append(pick.endpoint)
            endpoint = pick.endpoint.spec
            started = time.monotonic()
            try:
                identity = await self.open(flow.server, endpoint, header(endpoint))
            except (ConnectError, IdentityError) as e:
                pick.failed(Cause.HANDSHAKE if isinstance(e, IdentityError) else Cause.CONNECT)
                flow.server.transport = None
                failed(endpoint, e)
                last = endpoint, e
                if flow.closed:
                    return CALLER_LEFT
                continue
            pick.succeeded(time.monotonic() - started)
            if flow.closed:
                if flow.server.transport is not None:
                    flow.server.transport.close()
                return CALLER_LEFT
            return Connected(pick, identity)
        assert last is not None, "connect_first needs at least one attempt"
        return Unreachable(attempts, *last)
