"""The outbound side: an application dials a service address, the proxy picks an
endpoint, opens mTLS to that endpoint's proxy verifying the identity it must
present, sends the transport header, and relays.

The service comes from the address the application dialled, read with
``getsockname()`` on a redirected listener (DESIGN.md: the service range is
made local, so the proxy owns every service address). Endpoints without an
identity are outside the mesh and get plain TCP, counted as ``tls="no_identity"``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from mesh.errors import IdentityError
from mesh.identity.names import Identity
from mesh.identity.tls import check_peer
from mesh.metrics import ProxyMetrics
from mesh.proxy.assertion import peer_header
from mesh.proxy.balancer import Balancer
from mesh.proxy.detect import Detected, Detector, ProtocolKind, opaque_for
from mesh.proxy.discovery import Discovery, EndpointSpec, ServiceSpec
from mesh.proxy.exchanges import Route
from mesh.proxy.http import HttpOutbound
from mesh.proxy.relay import Flow, FlowMetrics, Half, Labels, describe
from mesh.proxy.transport_header import TransportHeader

log = logging.getLogger("mesh.proxy.outbound")
CONNECT_ATTEMPTS = 3


class Outbound:
    def __init__(self, discovery: Discovery, client_context: Callable[[], ssl.SSLContext],
                 metrics: ProxyMetrics, flows: FlowMetrics, *, connect_timeout: float,
                 own_identity: Callable[[], Identity], http: HttpOutbound | None = None,
                 detect_timeout: float = 10.0, opaque_ports: frozenset[int] = frozenset()
                 ) -> None:
        self.http = http
        self.detect_timeout = detect_timeout
        self.opaque_ports = opaque_ports
        self.discovery = discovery
        self.client_context = client_context
        self.metrics = metrics
        self.flows = flows
        self.connect_timeout = connect_timeout
        self.own_identity = own_identity
        self.balancers: dict[str, Balancer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        for service in discovery.services():
            self._update(service)
        discovery.subscribe(self._update)

    def _update(self, service: ServiceSpec) -> None:
        balancer = self.balancers.get(service.address)
        if balancer is None:
            balancer = self.balancers[service.address] = Balancer()
        balancer.update(service.endpoints)

    def protocol(self) -> asyncio.Protocol:
        flow = Flow({}, self._closed)
        return _Accepted(flow, self)

    def _closed(self, flow: Flow, exc: BaseException | None) -> None:
        if flow.labels:
            self.flows.close(flow, exc)

    def _refuse(self, peer: str, cause: str, *, service: str = "", identity: str = "",
                exc: BaseException | None = None) -> None:
        self.metrics.protocol_errors.labels("outbound", cause).inc()
        log.info("outbound connection failed peer=%s service=%s identity=%s cause=%s "
                 "detail=%s", peer, service or "-", identity or "-", cause, exc or "-")

    async def handle(self, client: Half) -> None:
        transport = client.transport
        assert transport is not None
        client.hold(b"")
        peer = describe(transport)
        host, port = transport.get_extra_info("sockname")[:2]
        service = self.discovery.resolve((host, port))
        if service is None:
            # Not a service address (the outbound listener itself, say): HTTP is routed
            # by its authority, anything else has nowhere to go.
            if self.http is not None and (await self._detect(client)).protocol is \
                    ProtocolKind.HTTP1:
                self._serve_http(client, self._route, None, peer)
                return
            transport.close()
            self._refuse(peer, "no-service", service=f"{host}:{port}")
            return
        balancer = self.balancers.get(service.address)
        if self.http is not None and balancer is not None and not service.opaque and \
                not opaque_for(port, self.opaque_ports):
            detected = await self._detect(client)
            if detected.protocol is ProtocolKind.HTTP1:
                self._serve_http(client, service, balancer, peer)
                return
        flow = client.flow
        for _attempt in range(CONNECT_ATTEMPTS):
            pick = balancer.pick() if balancer is not None else None
            if pick is None:
                transport.close()
                self._refuse(peer, "no-endpoints", service=service.name)
                return
            endpoint = pick.endpoint
            started = time.monotonic()
            try:
                labels = await self._connect(flow, service, endpoint.spec)
            except (OSError, TimeoutError, ssl.SSLError, IdentityError) as e:
                pick.failed()
                if flow.server.transport is not None:
                    flow.server.transport.close()
                flow.server.transport = None
                self._refuse(peer, "connect-failed", service=service.name,
                             identity=endpoint.spec.identity or "", exc=e)
                if flow.closed:
                    return
                continue
            pick.succeeded(time.monotonic() - started)
            if flow.closed:
                if flow.server.transport is not None:
                    flow.server.transport.close()
                return
            flow.labels = labels
            self.flows.open(labels)
            flow.server.start_relaying()
            client.start_relaying()
            return
        transport.close()

    async def _detect(self, client: Half) -> Detected:
        """Read until the protocol is known (or the detect timeout); keep every byte."""
        detector = Detector()
        decided: asyncio.Future[Detected] = asyncio.get_running_loop().create_future()

        def settle() -> None:
            # From here on bytes queue behind what the detector saw, in order.
            client.on_data = client.hold
            client.hold(detector.buffered)

        def feed(data: bytes) -> None:
            detector.receive_data(data)
            result = detector.result()
            if result is not None:
                settle()
                decided.set_result(result)

        client.on_data = feed
        client.flow.waiter = decided
        # uvloop reads before this task first runs: what was held goes to the detector first.
        held = b"".join(client.pending)
        client.pending.clear()
        if held:
            feed(held)
        assert client.transport is not None
        if not decided.done():
            client.transport.resume_reading()
        try:
            result = await asyncio.wait_for(decided, self.detect_timeout)
        except TimeoutError:
            result = detector.timeout_result()
            settle()
        except ConnectionError:
            result = detector.connection_closed()
            settle()
        client.flow.waiter = None
        return result

    def _route(self, authority: str) -> tuple[ServiceSpec, Balancer] | None:
        service = self.discovery.resolve_name(authority)
        balancer = self.balancers.get(service.address) if service is not None else None
        return (service, balancer) if service is not None and balancer is not None else None

    def _serve_http(self, client: Half, service: ServiceSpec | Route,
                          balancer: Balancer | None, peer: str) -> None:
        """Hand the connection, with the bytes read so far, to the HTTP layer."""
        assert self.http is not None and client.transport is not None
        held, client.pending = b"".join(client.pending), []
        http = self.http.serve(client.transport, service, balancer, peer=peer)
        client.hand_over(http)
        http.start(held, eof=client.eof)

    async def _connect(self, flow: Flow, service: ServiceSpec, endpoint: EndpointSpec
                       ) -> Labels:
        loop = asyncio.get_running_loop()
        host, port = endpoint.host_port
        labels: Labels = {"direction": "outbound", "peer": "dst", "tls": "true",
                          "client_id": str(self.own_identity()), "server_id": "",
                          "target_addr": endpoint.address, "dst_service": service.name}
        if endpoint.identity is None:
            labels["tls"] = "no_identity"
            await asyncio.wait_for(loop.create_connection(lambda: flow.server, host, port),
                                   self.connect_timeout)
            return labels
        expected = await dial_proxy(flow.server, endpoint,
                                    peer_header(self.client_context, endpoint, service),
                                    context=self.client_context(),
                                    timeout=self.connect_timeout)
        labels["server_id"] = str(expected)
        return labels


async def dial_proxy(upstream: Half, endpoint: EndpointSpec, header: TransportHeader, *,
                     context: ssl.SSLContext, timeout: float) -> Identity:
    """Open mTLS to a meshed endpoint's proxy with `upstream` as the protocol, check that
    it presents the endpoint's identity, and send `header`; returns that identity.

    On failure `upstream.transport`, if set, is the caller's to close.
    """
    if endpoint.identity is None:
        raise IdentityError(f"endpoint {endpoint.address} has no identity: it is not meshed")
    host, port = endpoint.host_port
    expected = Identity.parse(endpoint.identity)
    transport, _ = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
        lambda: upstream, host, port, ssl=context, server_hostname=endpoint.identity,
        ssl_handshake_timeout=timeout), timeout)
    check_peer(transport.get_extra_info("ssl_object"), expected=expected, side="server",
               peer=endpoint.address)
    transport.write(header.encode())
    return expected


class _Accepted(Half):
    """The application's side of an outbound flow; routing starts once it connects."""

    def __init__(self, flow: Flow, outbound: Outbound) -> None:
        super().__init__(flow)
        flow.client = self
        self.peer = flow.server
        flow.server.peer = self
        self.outbound = outbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.on_data = self.hold
        task = asyncio.get_running_loop().create_task(self.outbound.handle(self))
        self.outbound._tasks.add(task)
        task.add_done_callback(self.outbound._tasks.discard)
