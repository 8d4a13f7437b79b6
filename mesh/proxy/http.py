"""HTTP/1.1-aware outbound proxying: one request at a time from a client
connection, each balanced on its own, over pooled keep-alive mTLS connections
to the destination proxies.

Per request: metrics with Linkerd's names, a timeout, retries of idempotent
requests whose body is buffered (under a retry budget, never once response
bytes have reached the client), and errors answered as 502/503/504 with an
``l5d-proxy-error`` header naming the cause. An Upgrade (WebSocket, h2c)
that the server accepts turns the connection into an opaque relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import IdentityError, ProtocolError
from mesh.identity.names import Identity
from mesh.identity.tls import check_peer
from mesh.metrics import ProxyMetrics
from mesh.proxy import http1
from mesh.proxy.assertion import peer_header
from mesh.proxy.balancer import Balancer, EndpointState, Pick
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.retry import RetryBudget, is_retryable
from mesh.proxy.transport_header import SessionProtocol

log = logging.getLogger("mesh.proxy.http")

MAX_RETRY_BODY = 64 * 1024
IDLE_PER_ENDPOINT = 64
READ_SIZE = 64 * 1024
REASONS = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
           400: "Bad Request", 408: "Request Timeout"}


Route = Callable[[str], "tuple[ServiceSpec, Balancer] | None"]
"""An HTTP authority -> the service it names and its balancer, or None."""


class HeadTimeout(Exception):
    """A client started a request head and did not finish it in time (slowloris)."""


class UpstreamError(Exception):
    """An attempt failed before any response byte reached the client."""

    def __init__(self, status: int, cause: str, *, retryable: bool) -> None:
        super().__init__(cause)
        self.status, self.cause, self.retryable = status, cause, retryable


def error_response(status: int, cause: str) -> bytes:
    body = f"{cause}\n".encode()
    safe = cause.replace("\r", " ").replace("\n", " ")
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"l5d-proxy-error: {safe}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    key: tuple[str, int, int]
    server_id: str


class Pool:
    """Idle keep-alive connections to destination proxies, per endpoint."""

    def __init__(self, client_context: Callable[[], ssl.SSLContext], *,
                 connect_timeout: float) -> None:
        self.client_context = client_context
        self.connect_timeout = connect_timeout
        self.idle: dict[tuple[str, int, int], list[Upstream]] = {}

    async def get(self, service: ServiceSpec, ep: EndpointSpec) -> tuple[Upstream, bool]:
        """A connection to ``ep`` and whether it was reused from the pool."""
        host, port = ep.host_port
        key = (host, port, ep.target_port)
        idle = self.idle.get(key)
        while idle:
            up = idle.pop()
            if not up.writer.is_closing() and not up.reader.at_eof():
                return up, True
            up.writer.close()
        if ep.identity is None:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.connect_timeout)
            return Upstream(reader, writer, key, ""), False
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=self.client_context(), server_hostname=ep.identity,
            ssl_handshake_timeout=self.connect_timeout), self.connect_timeout)
        try:
            check_peer(writer.get_extra_info("ssl_object"), expected=Identity.parse(ep.identity),
                       side="server", peer=ep.address)
        except IdentityError:
            writer.close()
            raise
        writer.write(peer_header(self.client_context, ep, service, SessionProtocol.HTTP1).encode())
        return Upstream(reader, writer, key, ep.identity), False

    def put(self, up: Upstream) -> None:
        idle = self.idle.setdefault(up.key, [])
        if len(idle) < IDLE_PER_ENDPOINT and not up.writer.is_closing():
            idle.append(up)
        else:
            up.writer.close()


class _Series:
    """Metric children for one label set, with per-status children made on first use."""

    def __init__(self, metrics: ProxyMetrics, labels: dict[str, str]) -> None:
        self.metrics, self.labels = metrics, labels
        self.request = metrics.request.labels(**labels)
        self._latency: dict[int, Any] = {}
        self._response: dict[tuple[int, str], Any] = {}

    def latency(self, status: int) -> Any:
        child = self._latency.get(status)
        if child is None:
            child = self._latency[status] = self.metrics.response_latency.labels(
                **self.labels, status_code=str(status))
        return child

    def response(self, status: int, classification: str) -> Any:
        child = self._response.get((status, classification))
        if child is None:
            child = self._response[(status, classification)] = self.metrics.response.labels(
                **self.labels, status_code=str(status), classification=classification,
                error="")
        return child


class HttpOutbound:
    def __init__(self, pool: Pool, metrics: ProxyMetrics, *, request_timeout: float,
                 own_identity: Callable[[], Identity], head_timeout: float = 10.0) -> None:
        self.pool = pool
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.head_timeout = head_timeout
        self.own_identity = own_identity
        self.budgets: dict[str, RetryBudget] = {}
        self._cache: dict[tuple[str, ...], _Series] = {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    target: ServiceSpec | Route, balancer: Balancer | None, peer: str) -> None:
        """Serve one client connection's requests. `target` is the service the client
        dialled, or, on the outbound listener, a `Route` that finds each request's
        service from its authority (the Host header)."""
        requests = http1.MessageReader("request")
        service = target if isinstance(target, ServiceSpec) else None
        try:
            while True:
                head = await self._next_head(requests, reader)
                if head is None:
                    return
                if not isinstance(target, ServiceSpec):
                    host = head.values(b"host")
                    authority = host[0].decode("latin-1") if host else ""
                    found = target(authority)
                    if found is None:
                        self.metrics.protocol_errors.labels("outbound", "no-service").inc()
                        log.info("outbound request refused peer=%s authority=%s cause=no such "
                                 "service", peer, authority or "-")
                        writer.write(error_response(
                            502, f"no service named {authority or '(no Host header)'} is "
                            "known to the proxy"))
                        return
                    service, balancer = found
                assert service is not None and balancer is not None
                budget = self.budgets.setdefault(service.name, RetryBudget())
                body, complete = await self._read_body_for_retry(requests, reader)
                keep_going = await self._exchange(head, body, complete, requests, reader, writer,
                                                  service, balancer, budget, peer)
                if not keep_going or not requests.keep_alive:
                    return
        except ProtocolError as e:
            self.metrics.protocol_errors.labels("outbound", "bad-request").inc()
            log.info("outbound request refused peer=%s service=%s cause=%s", peer,
                     service.name if service else "-", e)
            with contextlib.suppress(ConnectionError):
                writer.write(error_response(400, f"malformed request: {e}"))
        except HeadTimeout as e:
            self.metrics.protocol_errors.labels("outbound", "head-timeout").inc()
            log.info("outbound request refused peer=%s service=%s cause=%s", peer,
                     service.name if service else "-", e)
            with contextlib.suppress(ConnectionError):
                writer.write(error_response(408, str(e)))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _next_head(self, requests: http1.MessageReader,
                         reader: asyncio.StreamReader) -> http1.Head | None:
        """The next request head. An idle keep-alive connection may wait as long as it
        likes; once a head has started, it must be complete within ``head_timeout``."""
        started = False
        while True:
            event = requests.next_event()
            if isinstance(event, http1.Head):
                return event
            if isinstance(event, http1.ConnectionClosed):
                return None
            if not started:
                await _pull(requests, reader)
                started = True
                continue
            try:
                async with asyncio.timeout(self.head_timeout):
                    await _pull(requests, reader)
            except TimeoutError:
                raise HeadTimeout(f"the request head was not complete within "
                                  f"{self.head_timeout:g}s") from None

    async def _read_body_for_retry(self, requests: http1.MessageReader,
                                   reader: asyncio.StreamReader) -> tuple[list[bytes], bool]:
        """Buffer up to MAX_RETRY_BODY of the body; True when all of it is in hand."""
        parts: list[bytes] = []
        size = 0
        while size <= MAX_RETRY_BODY:
            event = requests.next_event()
            if isinstance(event, http1.End):
                return parts, True
            if isinstance(event, http1.Body):
                parts.append(event.data)
                size += len(event.data)
            elif event is http1.NEED_DATA:
                await _pull(requests, reader)
            else:
                # PAUSED: an upgrade request, whose (absent) body is all in hand.
                return parts, event is http1.PAUSED
        return parts, False

    def _series(self, labels: dict[str, str]) -> _Series:
        """The metric children of one label set, looked up once, not per request."""
        key = tuple(labels.values())
        series = self._cache.get(key)
        if series is None:
            if len(self._cache) > 10_000:  # bound memory against unbounded authorities
                self._cache.clear()
            series = self._cache[key] = _Series(self.metrics, labels)
        return series

    def _labels(self, head: http1.Head, service: ServiceSpec, server_id: str,
                target: str) -> dict[str, str]:
        host = head.values(b"host")
        return {"direction": "outbound",
                "authority": host[0].decode("latin-1") if host else service.name,
                "tls": "true" if server_id else "no_identity",
                "client_id": str(self.own_identity()), "server_id": server_id,
                "target_addr": target, "dst_service": service.name}

    async def _exchange(self, head: http1.Head, body: list[bytes], complete: bool,
                        requests: http1.MessageReader, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, service: ServiceSpec,
                        balancer: Balancer, budget: RetryBudget, peer: str) -> bool:
        method = head.method or "GET"
        budget.deposit()
        started = time.monotonic()
        tried: list[EndpointState] = []
        last: UpstreamError | None = None
        while True:
            pick = balancer.pick(avoid=tried)
            if pick is None:
                last = last or UpstreamError(503, f"no endpoints available for {service.name}",
                                             retryable=False)
                break
            tried.append(pick.endpoint)
            ep = pick.endpoint.spec
            labels = self._labels(head, service, ep.identity or "", ep.address)
            if not tried[1:]:
                self._series(labels).request.inc()
            try:
                # asyncio.timeout costs no task per request, unlike wait_for on 3.11.
                async with asyncio.timeout(self.request_timeout):
                    return await self._attempt(head, body, complete, requests, reader, writer,
                                               service, ep, pick, labels, started)
            except TimeoutError:
                pick.failed()
                last = UpstreamError(504, f"request to {service.name} timed out after "
                                     f"{self.request_timeout:g}s", retryable=False)
                break
            except UpstreamError as e:
                pick.failed()
                last = e
                log.info("outbound attempt failed peer=%s service=%s endpoint=%s identity=%s "
                         "cause=%s", peer, service.name, ep.address, ep.identity or "-", e.cause)
                if not (e.retryable and complete and
                        is_retryable(method, body_consumed=False, status=e.status,
                                     error=e.status == 502)
                        and budget.withdraw()):
                    break
        assert last is not None
        self.metrics.response.labels(**self._labels(head, service, "", ""),
                                     status_code=str(last.status), classification="failure",
                                     error=last.cause.split(":")[0][:60]).inc()
        writer.write(error_response(last.status, last.cause))
        await writer.drain()
        return False

    async def _attempt(self, head: http1.Head, body: list[bytes], complete: bool,
                       requests: http1.MessageReader, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, service: ServiceSpec, ep: EndpointSpec,
                       pick: Pick, labels: dict[str, str], started: float) -> bool:
        try:
            up, reused = await self.pool.get(service, ep)
        except (OSError, TimeoutError, ssl.SSLError, IdentityError) as e:
            raise UpstreamError(502, f"connection to {ep.address} failed: {e}",
                                retryable=True) from e
        responses = http1.MessageReader("response")
        responses.expect_response_to(head.method or "GET")
        try:
            up.writer.write(head.raw + b"".join(body))
            if not complete:
                await self._stream_rest(requests, reader, up.writer)
            first = await self._response_head(responses, up, reused)
        except UpstreamError:
            up.writer.close()
            raise
        except (ConnectionError, OSError, ProtocolError) as e:
            up.writer.close()
            raise UpstreamError(502, f"{ep.address} failed: {e}", retryable=reused) from e
        status = first.status or 0
        if status != 101 and head.values(b"upgrade"):
            with contextlib.suppress(http1.ReaderStateError):
                requests.upgrade_declined()
        if status in (502, 503, 504):
            up.writer.close()
            raise UpstreamError(status, f"{ep.address} answered {status}", retryable=True)
        latency = time.monotonic() - started
        series = self._series(labels)
        series.latency(status).observe(latency * 1000)
        ok = await self._relay_response(responses, up, writer, first.raw)
        classification = "failure" if status >= 500 else "success"
        series.response(status, classification).inc()
        if status >= 500:
            pick.failed()
        else:
            pick.succeeded(latency)
        if ok == "upgraded":
            await _pipe(reader, writer, up)
            return False
        if ok == "done" and responses.keep_alive:
            self.pool.put(up)
        else:
            up.writer.close()
        return ok == "done"

    async def _stream_rest(self, requests: http1.MessageReader, reader: asyncio.StreamReader,
                           out: asyncio.StreamWriter) -> None:
        while True:
            event = requests.next_event()
            if isinstance(event, http1.End):
                return
            if isinstance(event, http1.Body):
                out.write(event.data)
                await out.drain()
            elif event is http1.NEED_DATA:
                await _pull(requests, reader)
            else:
                return

    async def _response_head(self, responses: http1.MessageReader, up: Upstream,
                             reused: bool) -> http1.Head:
        while True:
            event = responses.next_event()
            if isinstance(event, http1.Head):
                if event.status is not None and 100 <= event.status < 200 and \
                        event.status != 101:
                    continue
                return event
            if isinstance(event, http1.ConnectionClosed):
                raise UpstreamError(502, "the upstream closed the connection before answering",
                                    retryable=reused)
            await _pull(responses, up.reader)

    async def _relay_response(self, responses: http1.MessageReader, up: Upstream,
                              writer: asyncio.StreamWriter, head: bytes) -> str:
        """Forward the head and body; "done", "closed" or "upgraded".

        What one read brings is written in one go (head and body together for a
        small response): a write is a system call, the largest cost per request.
        """
        out = [head]
        while True:
            event = responses.next_event()
            if isinstance(event, http1.Body):
                out.append(event.data)
                continue
            if isinstance(event, http1.Upgrade) and event.rest:
                out.append(event.rest)
            writer.write(b"".join(out))
            out.clear()
            if isinstance(event, http1.End):
                return "done"
            if isinstance(event, http1.Upgrade):
                return "upgraded"
            if isinstance(event, http1.ConnectionClosed):
                return "closed"
            await writer.drain()
            await _pull(responses, up.reader)


async def _pull(parser: http1.MessageReader, stream: asyncio.StreamReader) -> None:
    """Give the parser the next bytes from the stream, or tell it the stream ended."""
    data = await stream.read(READ_SIZE)
    if data:
        parser.receive_data(data)
    else:
        parser.connection_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                up: Upstream) -> None:
    """After an accepted Upgrade: relay bytes both ways until either side ends."""

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(READ_SIZE):
            dst.write(data)
            await dst.drain()

    tasks = [asyncio.create_task(copy(reader, up.writer)),
             asyncio.create_task(copy(up.reader, writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        up.writer.close()
