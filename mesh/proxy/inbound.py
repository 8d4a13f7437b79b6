"""The inbound side (port 4143): terminate mTLS from other proxies, read the
transport header, authorize the caller, and relay to the local application.

Every refusal closes only the connection at fault, counts it, and logs one
line naming the peer, the identity and the cause.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from mesh.errors import IdentityError, ProtocolError
from mesh.identity.tls import ALPN, check_peer
from mesh.metrics import ProxyMetrics
from mesh.proxy.observe import HttpObserver
from mesh.proxy.relay import Flow, FlowMetrics, Half, Labels, describe
from mesh.proxy.transport_header import HeaderDecoder, SessionProtocol, TransportHeader

if TYPE_CHECKING:
    from mesh.authz import PortPolicy

log = logging.getLogger("mesh.proxy.inbound")


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

    def allows(self, identity: str) -> bool:
        return "*" in self.authorized or identity in self.authorized


class Inbound:
    def __init__(self, policy: InboundPolicy, server_context: Callable[[], ssl.SSLContext],
                 metrics: ProxyMetrics, flows: FlowMetrics) -> None:
        self.policy = policy
        self.server_context = server_context
        self.metrics = metrics
        self.flows = flows
        self._tasks: set[asyncio.Task[None]] = set()

    def protocol(self) -> asyncio.Protocol:
        """A fresh protocol for one accepted TCP connection."""
        return _Accepted(self)

    def _refuse(self, peer: str, cause: str, *, identity: str = "", exc: BaseException | None
                = None) -> None:
        self.metrics.protocol_errors.labels("inbound", cause).inc()
        log.info("inbound connection refused peer=%s identity=%s cause=%s detail=%s", peer,
                 identity or "-", cause, exc or "-")

    async def handle(self, sock: socket.socket, peer: str, protocol: Half) -> None:
        loop = asyncio.get_running_loop()
        early: list[bytes] = []
        protocol.on_data = early.append  # the header may follow the handshake at once
        try:
            context = self.server_context()  # the store's current one, for each connection
        except BaseException:
            sock.close()
            raise
        try:
            # From here the loop owns the socket and closes it if the handshake fails.
            tls, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=context,
                ssl_handshake_timeout=self.policy.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            self._refuse(peer, "tls-handshake", exc=e)
            return
        sslobj = tls.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != ALPN:
            tls.close()
            self._refuse(peer, "no-transport-alpn")
            return
        try:
            client = check_peer(sslobj, expected=None, side="client", peer=peer)
        except IdentityError as e:
            tls.close()
            self._refuse(peer, "no-identity", exc=e)
            return
        labels: Labels = {"direction": "inbound", "peer": "src", "tls": "true",
                          "client_id": str(client), "server_id": "", "target_addr": "",
                          "dst_service": ""}
        if self.policy.ports is None and not self.policy.allows(str(client)):
            self._deny(tls, peer, str(client), "", "not-authorized: identity not in "
                       "inbound.authorized")
            return
        header = await self._read_header(tls, protocol, peer, str(client), early)
        if header is None:
            return
        target = f"{self.policy.app_host}:{header.port}"
        if self.policy.ports is not None:
            decision = self.policy.ports(header.port).allows(str(client))
            if not decision.allowed:
                self._deny(tls, peer, str(client), target, decision.reason,
                           http=header.protocol is SessionProtocol.HTTP1)
                return
        labels["target_addr"] = target
        self.metrics.tcp_authz_allow.labels("inbound", "true", str(client), target).inc()
        await self._connect_app(protocol, tls, header, labels, peer, str(client))

    def _deny(self, tls: asyncio.Transport, peer: str, client: str, target: str, reason: str,
              *, http: bool = False) -> None:
        """Refuse a caller: counted, logged once, and for HTTP answered 403 as Linkerd does."""
        self.metrics.tcp_authz_deny.labels("inbound", "true", client, target,
                                           "unauthorized").inc()
        if http:
            self.metrics.http_authz_deny.labels("inbound", "true", client, target).inc()
            body = f"{reason}\n".encode()
            tls.write(b"HTTP/1.1 403 Forbidden\r\nl5d-proxy-error: " + _header_safe(reason)
                      + b"\r\ncontent-type: text/plain\r\ncontent-length: "
                      + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        log.info("inbound connection denied peer=%s identity=%s target=%s cause=%s", peer,
                 client, target or "-", reason)
        tls.close()

    async def _read_header(self, tls: asyncio.Transport, protocol: Half, peer: str,
                           client: str, early: list[bytes]) -> TransportHeader | None:
        decoder = HeaderDecoder()
        done: asyncio.Future[TransportHeader] = asyncio.get_running_loop().create_future()

        def feed(data: bytes) -> None:
            if done.done():
                protocol.hold(data)
                return
            try:
                decoder.receive_data(data)
                event = decoder.next_event()
            except ProtocolError as e:
                done.set_exception(e)
                return
            if isinstance(event, TransportHeader):
                protocol.hold(decoder.trailing_data)
                done.set_result(event)

        protocol.on_data = feed
        protocol.flow.waiter = done
        for chunk in early:
            feed(chunk)
        try:
            return await asyncio.wait_for(done, self.policy.header_timeout)
        except (ProtocolError, TimeoutError, ConnectionError) as e:
            tls.close()
            cause = "header-timeout" if isinstance(e, TimeoutError) else "bad-header"
            self._refuse(peer, cause, identity=client, exc=e)
            return None

    async def _connect_app(self, protocol: Half, tls: asyncio.Transport,
                           header: TransportHeader, labels: Labels, peer: str,
                           client: str) -> None:
        flow = protocol.flow
        flow.labels = labels
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: flow.server, self.policy.app_host, header.port)
        except OSError as e:
            self._refuse(peer, "app-unreachable", identity=client, exc=e)
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

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = describe(transport)
        plain = cast(asyncio.Transport, transport)
        # Aborting inside connection_made means neither loop ever reads the plain
        # transport; its descriptor closes, the connection lives on in the duplicate.
        try:
            sock = socket.socket(fileno=os.dup(plain.get_extra_info("socket").fileno()))
        except OSError as e:  # out of descriptors, say
            plain.abort()
            self.inbound._refuse(peer, "tls-handshake", exc=e)
            return
        plain.abort()
        flow = Flow({}, self._closed)
        self.flow = flow
        task = asyncio.get_running_loop().create_task(self.inbound.handle(sock, peer,
                                                                          flow.client))
        self.inbound._tasks.add(task)
        task.add_done_callback(self.inbound._tasks.discard)

    def _closed(self, flow: Flow, exc: BaseException | None) -> None:
        if flow.labels and flow.server.transport is not None:
            self.inbound.flows.close(flow, exc)

    def data_received(self, data: bytes) -> None:
        # The transport was aborted in connection_made, before it could read.
        raise AssertionError("bytes read from the plain transport of an inbound connection")


def _header_safe(text: str) -> bytes:
    return text.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
