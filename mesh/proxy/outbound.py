"""The outbound side: an application dials a service address, the proxy picks an
endpoint, opens mTLS to that endpoint's proxy verifying the identity it must
present and sends the transport header (the `Dialer`'s connect-retry loop), and
relays.

The service comes from the address the application dialled, read with
``getsockname()`` on a redirected listener (DESIGN.md: the service range is
made local, so the proxy owns every service address). Endpoints without an
identity are outside the mesh and get plain TCP, counted as ``tls="no_identity"``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy.balancer import Balancer, EndpointState, Pick
from mesh.proxy.detect import Detected, Detector, ProtocolKind, opaque_for
from mesh.proxy.dial import Connected, Dialer, DialError, Unreachable
from mesh.proxy.discovery import Discovery, EndpointSpec, ServiceSpec
from mesh.proxy.exchanges import Route
from mesh.proxy.failover import (
    DEFAULT_FAILOVER,
    FailoverPolicy,
    failover_policy,
)
from mesh.proxy.http import HttpOutbound
from mesh.proxy.relay import Flow, FlowMetrics, Half, Labels, describe

log = logging.getLogger("mesh.proxy.outbound")


class Outbound:
    def __init__(self, discovery: Discovery, dialer: Dialer, metrics: ProxyMetrics,
                 flows: FlowMetrics, *, own_identity: Callable[[], Identity],
                 http: HttpOutbound | None = None, detect_timeout: float = 10.0,
                 opaque_ports: frozenset[int] = frozenset(),
                 failover: FailoverPolicy = DEFAULT_FAILOVER) -> None:
        self.http = http
        self.failover = failover
        self.detect_timeout = detect_timeout
        self.opaque_ports = opaque_ports
        self.discovery = discovery
        self.dialer = dialer
        self.metrics = metrics
        self.flows = flows
        self.own_identity = own_identity
        self.balancers: dict[str, Balancer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        for service in discovery.services():
            self._update(service)
        discovery.subscribe(self._update)

    def _update(self, service: ServiceSpec) -> None:
        balancer = self.balancers.get(service.address)
        if balancer is None:
            balancer = self.balancers[service.address] = Balancer(
                service=service.name, failover=self.failover, observer=self.metrics.failover)
        # The Service's failover.meshgate.io/policy, served as failbackSeconds, wins.
        balancer.set_failover_policy(self.failover if service.failback_s is None
                                     else failover_policy(service.failback_s))
        balancer.update(service.endpoints)

    def protocol(self) -> asyncio.Protocol:
        """The protocol of a connection an application made: its flow's client half,
        routed once it connects."""
        client = Flow({}, self._closed).client
        client.on_connected = self._accepted
        return client

    def _accepted(self, client: Half) -> None:
        client.hold_reads()  # until routed
        task = asyncio.get_running_loop().create_task(self.handle(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

        def choose(tried: Sequence[EndpointState]) -> Pick | None:
            # A first attempt may probe a failover group that is down: a new connection
            # that fails is dialled to the next endpoint or group.
            return balancer.pick(avoid=tried, probe_ok=not tried) if balancer else None

        def failed(endpoint: EndpointSpec, e: DialError) -> None:
            self._refuse(peer, "connect-failed", service=service.name,
                         identity=endpoint.identity or "", exc=e)

        result = await self.dialer.connect_first(
            flow, choose, lambda endpoint: self.dialer.header(endpoint, service), failed=failed)
        if isinstance(result, Connected):
            flow.labels = self._labels(service, result)
            self.flows.open(flow.labels)
            flow.server.start_relaying()
            client.start_relaying()
        elif result is None:
            transport.close()
            self._refuse(peer, "no-endpoints", service=service.name)
        elif isinstance(result, Unreachable):
            transport.close()  # each attempt was logged as it failed

    async def _detect(self, client: Half) -> Detected:
        """Read until the protocol is known (or the detect timeout); keep every byte."""
        reading = _Detecting(client, asyncio.get_running_loop().create_future())
        client.read_head(reading)
        client.flow.waiter = reading.decided
        # uvloop reads before this task first runs: what was held goes to the detector first.
        held = b"".join(client.pending)
        client.pending.clear()
        if held:
            reading.feed(held)
        assert client.transport is not None
        if not reading.decided.done():
            client.transport.resume_reading()
        try:
            result = await asyncio.wait_for(reading.decided, self.detect_timeout)
        except TimeoutError:
            result = reading.detector.timeout_result()
            reading.settle()
        except ConnectionError:
            result = reading.detector.connection_closed()
            reading.settle()
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

    def _labels(self, service: ServiceSpec, connected: Connected) -> Labels:
        identity = connected.identity
        return {"direction": "outbound", "peer": "dst",
                "tls": "true" if identity is not None else "no_identity",
                "client_id": str(self.own_identity()),
                "server_id": str(identity) if identity is not None else "",
                "target_addr": connected.pick.endpoint.spec.address,
                "dst_service": service.name}


class _Detecting:
    """An accepted connection's first bytes, read until its protocol is known."""

    __slots__ = ("client", "decided", "detector")

    def __init__(self, client: Half, decided: asyncio.Future[Detected]) -> None:
        self.client = client
        self.decided = decided
        self.detector = Detector()

    def feed(self, data: bytes) -> None:
        self.detector.receive_data(data)
        result = self.detector.result()
        if result is not None:
            self.settle()
            self.decided.set_result(result)

    def settle(self) -> None:
        """From here on bytes queue behind what the detector saw, in order."""
        self.client.hold_reads()
        self.client.hold(self.detector.buffered)
