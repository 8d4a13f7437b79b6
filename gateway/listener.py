"""The gateway's listener (4143): each connection from a linked cluster's proxy is
taken through the steps every mesh listener shares (`MeshListener`: mTLS from any
identity of the trust bundle, ALPN, transport header), routed and authorized by
`Exports`, then re-originated over mTLS to the chosen endpoint's proxy with the
gateway's own identity and a header carrying the caller (field 100), through the
mesh's one dial path (`mesh.proxy.dial`), and relayed.
A caller assertion (field 101) must verify against the gateway's trust bundle,
name the service the header names and prove the caller the gateway sees (the
mTLS peer, or the caller a trusted gateway forwarded); it is passed on to the
target unchanged, so that the target need not trust this gateway.
HTTP/1 requests (the header's session protocol) gain a ``Forwarded`` field
naming the caller and this gateway (`gateway.forwarded`); a request that names
this gateway already is a loop, answered 508 and refused.

Every refusal closes that connection alone, is counted in
``gateway_refused{reason}`` and logged in one line naming the peer, the caller
and the target. A caller refused by policy (``unauthorized``, ``not-exported``)
on an HTTP/1 session is first answered ``403 Forbidden`` with an
``l5d-proxy-error`` header, as the target's inbound proxy would: its proxy then
passes a denial to the application, not a broken connection that it retries.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence

from gateway.exports import Exports, Reason, Refused, Route, Target
from gateway.forwarded import ForwardedLoop, ForwardedRequests
from mesh.errors import ProtocolError
from mesh.metrics import GatewayMetrics
from mesh.proxy.assertion import AssertionVerifier, BadAssertion
from mesh.proxy.balancer import EndpointState, Pick
from mesh.proxy.dial import Connected, Dialer, DialError, Unreachable
from mesh.proxy.discovery import EndpointSpec
from mesh.proxy.http1_head import error_response
from mesh.proxy.inbound import MeshConnection, MeshListener
from mesh.proxy.relay import Flow, Labels
from mesh.proxy.transport_header import CallerAssertion, SessionProtocol, TransportHeader

log = logging.getLogger("gateway")

_FORBIDDEN = frozenset({Reason.UNAUTHORIZED, Reason.NOT_EXPORTED})
"""Refusals that are the caller's to fix: answered 403 on HTTP sessions."""


class GatewayListener(MeshListener):
    def __init__(self, exports: Exports, metrics: GatewayMetrics, *,
                 server_context: Callable[[], ssl.SSLContext], dialer: Dialer,
                 handshake_timeout: float, header_timeout: float,
                 assertions: AssertionVerifier) -> None:
        super().__init__(server_context, metrics.flows(), handshake_timeout=handshake_timeout,
                         header_timeout=header_timeout)
        self.assertions = assertions
        self.exports = exports
        self.metrics = metrics
        self.dialer = dialer
        self.relaying: dict[Flow, tuple[str, str, TransportHeader, EndpointSpec]] = {}
        """Connections relayed to a target: the TCP peer, its identity, the header it
        sent and the endpoint it reached."""
        self._recheck_due = False
        exports.subscribe(self._exports_changed)

    def _exports_changed(self) -> None:
        # Informer events come in bursts: decide once after the burst.
        if not self._recheck_due and self.relaying:
            self._recheck_due = True
            asyncio.get_running_loop().call_soon(self.recheck)

    def recheck(self) -> None:
        """Route every relayed connection again: one its Service, export label or the
        target's policy no longer admits is closed, so a change holds for connections
        kept alive from before it (the caller's proxy reconnects and is refused)."""
        self._recheck_due = False
        for flow, (peer, peer_id, header, endpoint) in list(self.relaying.items()):
            refused = self.exports.recheck(peer_id, header, endpoint)
            if refused is not None:
                self._refused(peer, peer_id, refused)
                flow.close()

    def _closed(self, flow: Flow, exc: BaseException | None) -> None:
        self.relaying.pop(flow, None)
        super()._closed(flow, exc)

    def refuse(self, peer: str, cause: str, *, identity: str = "",
               exc: BaseException | None = None) -> None:
        self._refused(peer, identity, Refused(Reason(cause), str(exc or "-"), caller=identity))

    def _refused(self, peer: str, peer_id: str, refused: Refused) -> None:
        self.metrics.refused.labels(refused.reason, refused.service, refused.caller).inc()
        asserted = f" asserted={refused.asserted}" if refused.asserted else ""
        log.info("gateway connection refused peer=%s identity=%s caller=%s%s target=%s "
                 "reason=%s detail=%s", peer, peer_id or "-", refused.caller or "-", asserted,
                 refused.target or "-", refused.reason, refused.detail)

    def _check_assertion(self, assertion: CallerAssertion, header: TransportHeader,
                         route: Route) -> Refused | None:
        """None when `assertion` proves the route's caller for the service it names."""
        caller = route.caller.identity
        try:
            asserted = self.assertions.check(assertion, authority=header.name, peer=caller)
        except BadAssertion as e:
            return Refused(Reason.BAD_ASSERTION, str(e), route.target,
                           service=route.service.name, caller=caller,
                           asserted=e.asserted or "-")
        if asserted.caller != caller:
            return Refused(Reason.BAD_ASSERTION, f"the assertion proves {asserted.caller}, but "
                           f"the caller is {caller}", route.target,
                           service=route.service.name, caller=caller, asserted=asserted.caller)
        return None

    async def serve(self, conn: MeshConnection) -> None:
        header = await self.read_header(conn)
        if header is None:
            return
        peer_id = str(conn.identity)
        route = self.exports.route(peer_id, header)
        if isinstance(route, Refused):
            self._close(conn, header, route)
            self._refused(conn.peer, peer_id, route)
            return
        if header.assertion is not None:
            bad = self._check_assertion(header.assertion, header, route)
            if bad is not None:
                conn.tls.close()
                self._refused(conn.peer, peer_id, bad)
                return
        flow = conn.client.flow

        def choose(tried: Sequence[EndpointState]) -> Pick | Refused:
            target = self.exports.choose(route, avoid=tried)
            return target.pick if isinstance(target, Target) else target

        def forward(endpoint: EndpointSpec) -> TransportHeader:
            return TransportHeader(port=endpoint.target_port, name=route.service.name,
                                   protocol=header.protocol, caller=route.caller.identity,
                                   assertion=header.assertion)

        def failed(endpoint: EndpointSpec, e: DialError) -> None:
            log.info("gateway upstream failed peer=%s caller=%s target=%s endpoint=%s "
                     "cause=%s", conn.peer, route.caller.identity, route.target,
                     endpoint.address, e)

        result = await self.dialer.connect_first(flow, choose, forward, failed=failed)
        if isinstance(result, Connected):
            if header.protocol is SessionProtocol.HTTP1:
                conn.client.rewrite = self._forwarded(conn, route)
            self._relay(conn, route, result)
            self.relaying[flow] = (conn.peer, peer_id, header, result.pick.endpoint.spec)
        elif isinstance(result, Refused):
            self._close(conn, header, result)
            self._refused(conn.peer, peer_id, result)
        elif isinstance(result, Unreachable):
            conn.tls.close()
            self._refused(conn.peer, peer_id, Refused(
                Reason.CONNECT_FAILED, str(result), route.target, service=route.service.name,
                caller=route.caller.identity))

    def _forwarded(self, conn: MeshConnection, route: Route) -> Callable[[bytes], bytes]:
        """What the caller's HTTP/1 bytes become on their way to the target."""
        requests = ForwardedRequests(caller=route.caller.identity,
                                     gateway=str(self.exports.identity))

        def rewrite(data: bytes) -> bytes:
            try:
                return requests.feed(data)
            except ProtocolError as e:
                loop = isinstance(e, ForwardedLoop)
                conn.tls.write(error_response(508, str(e)) if loop else
                               error_response(400, f"malformed request: {e}"))
                conn.client.flow.close()
                self._refused(conn.peer, str(conn.identity), Refused(
                    Reason.LOOP if loop else Reason.BAD_REQUEST, str(e), route.target,
                    service=route.service.name, caller=route.caller.identity))
                return b""

        return rewrite

    def _close(self, conn: MeshConnection, header: TransportHeader, refused: Refused) -> None:
        if header.protocol is SessionProtocol.HTTP1 and refused.reason in _FORBIDDEN:
            conn.tls.write(error_response(403, f"{refused.reason}: {refused.detail}"))
        conn.tls.close()

    def _relay(self, conn: MeshConnection, route: Route, connected: Connected) -> None:
        flow = conn.client.flow
        caller, service = route.caller.identity, route.service.name
        endpoint, server_id = connected.pick.endpoint.spec, connected.identity
        common = {"direction": "gateway", "tls": "true", "client_id": caller,
                  "target_addr": endpoint.address, "dst_service": service}
        src: Labels = {**common, "peer": "src", "server_id": str(self.exports.identity)}
        dst: Labels = {**common, "peer": "dst", "server_id": str(server_id)}
        flow.labels, flow.upstream_labels = src, dst
        self.flows.open(src)
        self.flows.open(dst)
        self.metrics.requests.labels(service, caller).inc()
        conn.client.start_relaying()
        flow.server.start_relaying()

