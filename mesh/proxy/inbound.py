"""The inbound side (port 4143): terminate mTLS from other proxies, read the
transport header, authorize the caller, and relay to the local application.

`MeshListener` is what every listener for mesh peers does before it decides
anything: hand the accepted TCP connection to TLS, check the ALPN and the
peer's identity, and read the transport header, each under its timeout. The
inbound proxy (`Inbound`) and the multicluster gateway (gateway/) build on it.

The caller is normally the mTLS peer. A peer that is a trusted gateway may
name another caller in the header's field 100 (`caller_of`): it is then that
caller who is authorized and counted, and the gateway appears in logs and in
``inbound_gateway_forwarded``. Field 100 from any other peer is refused.
A caller assertion (field 101, `mesh.proxy.assertion`) proves the caller
without trusting the peer that relays it: when it verifies, its caller is
authorized and counted (and a field 100 must name the same caller); when it
does not, the connection is refused (``cause="bad-assertion"``).

Every refusal closes only the connection at fault, counts it, and logs one
line naming the peer, the identity and the cause.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from mesh.authz import identity_matches
from mesh.errors import IdentityError, ProtocolError
from mesh.identity.names import Identity
from mesh.identity.tls import ALPN, check_peer, context_bundle, explain_handshake_failure
from mesh.metrics import ProxyMetrics
from mesh.proxy.assertion import AssertionVerifier, BadAssertion
from mesh.proxy.http1_head import error_response
from mesh.proxy.observe import HttpObserver
from mesh.proxy.relay import Buffered, Flow, FlowMetrics, Half, Labels, describe, release
from mesh.proxy.transport_header import HeaderDecoder, SessionProtocol, TransportHeader

if TYPE_CHECKING:
    from mesh.authz import PortPolicy

log = logging.getLogger("mesh.proxy.inbound")


# -- who the caller is -------------------------------------------------------------------


class ForgedCaller(ProtocolError):
    """A peer that is not a trusted gateway named a caller (transport header field 100)."""


class BadCaller(ProtocolError):
    """A trusted gateway named a caller that is not an identity name."""


@dataclass(frozen=True)
class Caller:
    """Whom a connection is authorized and counted as."""

    identity: str
    gateway: str | None = None
    """The peer that forwarded the caller (a trusted gateway, or any peer relaying the
    caller's assertion); None when the caller is the peer."""


def is_trusted_gateway(peer: str, trusted_gateways: Sequence[str]) -> bool:
    """Whether ``peer`` matches one of the patterns (exact names or ``*.suffix``)."""
    return any(identity_matches(pattern, peer) for pattern in trusted_gateways)


def caller_of(peer: str, claimed: str, trusted_gateways: Sequence[str]) -> Caller:
    """The caller of a connection from ``peer`` whose header claims ``claimed`` ("": none).

    Raises `ForgedCaller` when a peer that is no trusted gateway claims a caller,
    and `BadCaller` when a trusted gateway claims something that is no identity.
    """
    if not claimed:
        return Caller(peer)
    if not is_trusted_gateway(peer, trusted_gateways):
        raise ForgedCaller(f"{peer} named caller {claimed} in the transport header, but only "
                           "a trusted gateway may forward a caller's identity")
    try:
        Identity.parse(claimed)
    except IdentityError as e:
        raise BadCaller(f"gateway {peer} forwarded caller {claimed!r}: {e}") from None
    return Caller(claimed, gateway=peer)


# -- the shared accept side --------------------------------------------------------------


@dataclass
class MeshConnection:
    """An accepted connection once TLS is up and the peer's identity is known."""

    tls: asyncio.Transport
    client: Half
    """The accepted side of the flow; its peer, ``client.flow.server``, is the upstream."""
    peer: str
    """host:port of the TCP peer, for logs."""
    identity: Identity
    """The mTLS peer's identity, checked against the trust bundle."""
    early: list[bytes] = field(default_factory=list)
    """Bytes that arrived with the handshake, before the header reader took over."""


class MeshListener:
    """Accepts connections from mesh peers; subclasses `serve` them and `refuse` the bad.

    `protocol` is the listener's protocol factory. Each accepted socket is given
    to TLS with the server context current at that moment; the handshake, the
    ALPN and the peer's certificate are checked, and `serve` gets the connection.
    A failed handshake is refused (``tls-handshake``) with OpenSSL's verdict in
    words (`explain_handshake_failure`), as the dialling side tells its own.
    """

    def __init__(self, server_context: Callable[[], ssl.SSLContext], flows: FlowMetrics, *,
                 handshake_timeout: float, header_timeout: float) -> None:
        self.server_context = server_context
        self.flows = flows
        self.handshake_timeout = handshake_timeout
        self.header_timeout = header_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def protocol(self) -> asyncio.Protocol:
        """A fresh protocol for one accepted TCP connection."""
        return _Accepted(self)

    async def serve(self, conn: MeshConnection) -> None:
        raise NotImplementedError

    def refuse(self, peer: str, cause: str, *, identity: str = "",
               exc: BaseException | None = None) -> None:
        """Count and log a connection closed for ``cause`` (it is already closed)."""
        raise NotImplementedError

    async def handle(self, sock: socket.socket, peer: str, protocol: Half) -> None:
        conn = await self._terminate_tls(sock, peer, protocol)
        if conn is not None:
            await self.serve(conn)

    async def _terminate_tls(self, sock: socket.socket, peer: str, protocol: Half
                             ) -> MeshConnection | None:
        loop = asyncio.get_running_loop()
        early = Buffered()
        protocol.read_head(early)  # the header may follow the handshake at once
        try:
            context = self.server_context()  # the store's current one, for each connection
        except BaseException:
            sock.close()
            raise
        try:
            # From here the loop owns the socket and closes it if the handshake fails.
            tls, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=context,
                ssl_handshake_timeout=self.handshake_timeout)
        except ssl.SSLError as e:
            # No client can be dialled back for its certificate: OpenSSL's verdict is told
            # in words, with what this side trusts.
            self.refuse(peer, "tls-handshake", exc=explain_handshake_failure(
                release(e), side="client", peer=peer, expected=None,
                bundle=context_bundle(context), diagnose=None))
            return None
        except (OSError, TimeoutError) as e:
            self.refuse(peer, "tls-handshake", exc=release(e))
            return None
        sslobj = tls.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != ALPN:
            tls.close()
            self.refuse(peer, "no-transport-alpn")
            return None
        try:
            identity = check_peer(sslobj, expected=None, side="client", peer=peer)
        except IdentityError as e:
            tls.close()
            self.refuse(peer, "no-identity", exc=e)
            return None
        return MeshConnection(tls, protocol, peer, identity, early.chunks)

    async def read_header(self, conn: MeshConnection) -> TransportHeader | None:
        """The transport header, within the header timeout; None (refused) otherwise.

        What follows the header is held for the upstream, with reading paused.
        """
        protocol, tls = conn.client, conn.tls
        reading = _HeaderReading(protocol, asyncio.get_running_loop().create_future())
        done = reading.done
        protocol.read_head(reading)
        protocol.flow.waiter = done
        for chunk in conn.early:
            reading.feed(chunk)
        conn.early.clear()
        try:
            return await asyncio.wait_for(done, self.header_timeout)
        except TimeoutError:
            tls.close()
            self.refuse(conn.peer, "header-timeout", identity=str(conn.identity),
                        exc=TimeoutError(f"no complete transport header within "
                                         f"{self.header_timeout:g}s"))
            return None
        except (ProtocolError, ConnectionError) as e:
            tls.close()
            self.refuse(conn.peer, "bad-header", identity=str(conn.identity), exc=e)
            return None
        finally:
            protocol.flow.waiter = None

    def _closed(self, flow: Flow, exc: BaseException | None) -> None:
        if flow.labels and flow.server.transport is not None:
            self.flows.close(flow, exc)


# -- the inbound proxy -------------------------------------------------------------------


class _HeaderReading:
    """A mesh connection's first bytes, read until its transport header is complete;
    what follows the header is held for the upstream, with reading paused."""

    __slots__ = ("decoder", "done", "protocol")

    def __init__(self, protocol: Half, done: asyncio.Future[TransportHeader]) -> None:
        self.protocol = protocol
        self.done = done
        self.decoder = HeaderDecoder()

    def feed(self, data: bytes) -> None:
        if self.done.done():
            self.protocol.hold(data)
            return
        try:
            self.decoder.receive_data(data)
            event = self.decoder.next_event()
        except ProtocolError as e:
            self.done.set_exception(e)
            return
        if isinstance(event, TransportHeader):
            self.protocol.hold_reads()
            self.protocol.hold(self.decoder.trailing_data)
            self.done.set_result(event)


@dataclass(frozen=True)
class InboundPolicy:
    app_host: str
    authorized: frozenset[str]
    """Identity names allowed in, or {"*"} for any identity the trust bundle vouches for."""
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    ports: Callable[[int], PortPolicy] | None = None
    """Per-port policies from the control plane; when given, they decide instead of
    `authorized`."""
    trusted_gateways: tuple[str, ...] = ()
    """Identity patterns of gateways whose forwarded caller (field 100) is honoured."""

    def allows(self, identity: str) -> bool:
        return "*" in self.authorized or identity in self.authorized


class Inbound(MeshListener):
    """The inbound proxy; without `assertions` it refuses every caller assertion, since
    it cannot verify one."""

    def __init__(self, policy: InboundPolicy, server_context: Callable[[], ssl.SSLContext],
                 metrics: ProxyMetrics, flows: FlowMetrics, *,
                 assertions: AssertionVerifier | None = None) -> None:
        super().__init__(server_context, flows, handshake_timeout=policy.handshake_timeout,
                         header_timeout=policy.header_timeout)
        self.policy = policy
        self.metrics = metrics
        self.assertions = assertions
        self.relaying: dict[Flow, tuple[int, Caller, str]] = {}
        """Connections relayed to the application: their port, caller and peer."""

    def _decide(self, port: int, caller: Caller) -> str | None:
        """Why `caller` may not reach `port` now, or None when it may."""
        if self.policy.ports is not None:
            decision = self.policy.ports(port).allows(caller.identity)
            return None if decision.allowed else decision.reason
        if not self.policy.allows(caller.identity):
            return "not-authorized: identity not in inbound.authorized"
        return None

    def policy_changed(self) -> None:
        """Authorize every open connection again: one that the policy now leaves out is
        closed (its caller's proxy then opens a new one, which is refused with the
        reason), so a policy holds for connections kept alive from before it."""
        for flow, (port, caller, peer) in list(self.relaying.items()):
            reason = self._decide(port, caller)
            if reason is None:
                continue
            target = f"{self.policy.app_host}:{port}"
            self.metrics.tcp_authz_deny.labels("inbound", "true", caller.identity, target,
                                               "unauthorized").inc()
            log.info("inbound connection closed peer=%s identity=%s gateway_id=%s target=%s "
                     "cause=policy changed: %s", peer, caller.identity, caller.gateway or "-",
                     target, reason)
            flow.close()

    def _closed(self, flow: Flow, exc: BaseException | None) -> None:
        self.relaying.pop(flow, None)
        super()._closed(flow, exc)

    def refuse(self, peer: str, cause: str, *, identity: str = "",
               exc: BaseException | None = None) -> None:
        self.metrics.protocol_errors.labels("inbound", cause).inc()
        log.info("inbound connection refused peer=%s identity=%s cause=%s detail=%s", peer,
                 identity or "-", cause, exc or "-")

    async def serve(self, conn: MeshConnection) -> None:
        tls, peer = conn.tls, conn.peer
        # The peer's own identity says nothing of the caller when it is a gateway, and
        # any peer may relay a caller's assertion: authorize once the header is read.
        header = await self.read_header(conn)
        if header is None:
            return
        caller = self._caller(conn, header)
        if caller is None:
            return
        target = f"{self.policy.app_host}:{header.port}"
        reason = self._decide(header.port, caller)
        if reason is not None:
            self._deny(tls, peer, caller, target, reason,
                       http=header.protocol is SessionProtocol.HTTP1)
            return
        if caller.gateway is not None:
            self.metrics.gateway_forwarded.labels(caller.gateway, caller.identity).inc()
        labels: Labels = {"direction": "inbound", "peer": "src", "tls": "true",
                          "client_id": caller.identity, "server_id": "",
                          "target_addr": target, "dst_service": ""}
        self.metrics.tcp_authz_allow.labels("inbound", "true", caller.identity, target).inc()
        await self._connect_app(conn, header, labels, caller.identity)
        if not conn.client.flow.closed:
            self.relaying[conn.client.flow] = (header.port, caller, peer)

    def _caller(self, conn: MeshConnection, header: TransportHeader) -> Caller | None:
        """Whom the connection is for: the asserted caller, the one a trusted gateway
        forwarded, or the peer; None once the connection is refused."""
        peer_id = str(conn.identity)
        if header.assertion is None:
            try:
                return caller_of(peer_id, header.caller, self.policy.trusted_gateways)
            except ProtocolError as e:
                conn.tls.close()
                cause = "forged-caller" if isinstance(e, ForgedCaller) else "bad-caller"
                self.refuse(conn.peer, cause, identity=peer_id, exc=e)
                return None
        try:
            if self.assertions is None:
                raise BadAssertion("this listener has no trust bundle to verify caller "
                                   "assertions with")
            asserted = self.assertions.check(header.assertion, authority=header.name,
                                             peer=peer_id)
            if header.caller and header.caller != asserted.caller:
                raise BadAssertion(f"field 100 names caller {header.caller}, the assertion "
                                   f"proves {asserted.caller}", asserted=asserted.caller)
        except BadAssertion as e:
            conn.tls.close()
            self.metrics.protocol_errors.labels("inbound", "bad-assertion").inc()
            log.info("inbound connection refused peer=%s identity=%s asserted=%s "
                     "cause=bad-assertion detail=%s", conn.peer, peer_id, e.asserted or "-", e)
            return None
        return Caller(asserted.caller,
                      gateway=None if asserted.caller == peer_id else peer_id)

    def _deny(self, tls: asyncio.Transport, peer: str, caller: Caller, target: str,
              reason: str, *, http: bool = False) -> None:
        """Refuse a caller: counted, logged once, and for HTTP answered 403 as Linkerd does."""
        client = caller.identity
        self.metrics.tcp_authz_deny.labels("inbound", "true", client, target,
                                           "unauthorized").inc()
        if http:
            self.metrics.http_authz_deny.labels("inbound", "true", client, target).inc()
            tls.write(error_response(403, reason))
        log.info("inbound connection denied peer=%s identity=%s gateway_id=%s target=%s "
                 "cause=%s", peer, client, caller.gateway or "-", target or "-", reason)
        tls.close()

    async def _connect_app(self, conn: MeshConnection, header: TransportHeader,
                           labels: Labels, client: str) -> None:
        protocol, tls, peer = conn.client, conn.tls, conn.peer
        flow = protocol.flow
        flow.labels = labels
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: flow.server, self.policy.app_host, header.port)
        except OSError as e:
            self.refuse(peer, "app-unreachable", identity=client, exc=e)
            tls.close()
            return
        if flow.closed:  # the caller left while the application was being dialled
            if flow.server.transport is not None:
                flow.server.transport.close()
            return
        self.flows.open(labels)
        flow.upstream_labels = None
        if header.protocol is SessionProtocol.HTTP1:
            observer = HttpObserver(self.metrics, {
                "direction": "inbound", "authority": "", "tls": "true", "client_id": client,
                "server_id": "", "target_addr": labels["target_addr"], "dst_service": ""})
            protocol.observe = observer.from_client
            flow.server.observe = observer.from_server
        protocol.start_relaying()
        flow.server.start_relaying()


class _Accepted(asyncio.Protocol):
    """An accepted TCP connection, handed over to TLS before anything is read.

    The listener's plain transport is never read from: `connection_made` gives
    a duplicate of its socket to ``loop.connect_accepted_socket`` (with the
    server context current for this connection) and aborts the plain transport.
    Pausing the plain transport and calling ``start_tls`` later does not work
    with uvloop, which starts reading right after `connection_made` returns,
    whatever ``pause_reading()`` was called there: a ClientHello sent at once
    reached this protocol instead of the TLS one.
    """

    def __init__(self, listener: MeshListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = describe(transport)
        plain = cast(asyncio.Transport, transport)
        # Aborting inside connection_made means neither loop ever reads the plain
        # transport; its descriptor closes, the connection lives on in the duplicate.
        try:
            sock = socket.socket(fileno=os.dup(plain.get_extra_info("socket").fileno()))
        except OSError as e:  # out of descriptors, say
            plain.abort()
            self.listener.refuse(peer, "tls-handshake", exc=e)
            return
        plain.abort()
        flow = Flow({}, self.listener._closed)
        self.flow = flow
        task = asyncio.get_running_loop().create_task(self.listener.handle(sock, peer,
                                                                           flow.client))
        self.listener._tasks.add(task)
        task.add_done_callback(self.listener._tasks.discard)

    def data_received(self, data: bytes) -> None:
        # The transport was aborted in connection_made, before it could read.
        raise AssertionError("bytes read from the plain transport of an inbound connection")
