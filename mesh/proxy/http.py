"""HTTP/1.1-aware outbound proxying: one request at a time from a client
connection, each balanced on its own, over pooled keep-alive mTLS connections
to the destination proxies.

Per request: metrics with Linkerd's names, a timeout, retries of idempotent
requests whose body is buffered (under a retry budget, never once response
bytes have reached the client), and errors answered as 502/503/504 with an
``l5d-proxy-error`` header naming the cause. An Upgrade (WebSocket, h2c)
that the server accepts turns the connection into an opaque relay.

Everything runs in protocol callbacks, as the opaque relay does: the client's
connection is a `ClientSide`, each request an `Exchange`, each connection to a
destination proxy an `Upstream` (mesh.proxy.pool). Bytes are parsed where they arrive and written
on in the same callback; the only coroutine is opening a new upstream
connection. What one read brings is written in one go (a small response's head
and body together), since a write is a system call, the largest cost per
request. Back-pressure runs both ways: a client that does not read pauses the
upstream, an upstream that does not read pauses the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from mesh.errors import ConnectError, IdentityError, ProtocolError
from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy import http1
from mesh.proxy.balancer import Balancer, EndpointState, Pick
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.pool import Pool, Upstream
from mesh.proxy.relay import Flow
from mesh.proxy.retry import RetryBudget, is_retryable

log = logging.getLogger("mesh.proxy.http")

MAX_RETRY_BODY = 64 * 1024


Route = Callable[[str], "tuple[ServiceSpec, Balancer] | None"]
"""An HTTP authority -> the service it names and its balancer, or None."""

class UpstreamError(Exception):
    """An attempt failed before any response byte reached the client."""

    def __init__(self, status: int, cause: str, *, retryable: bool) -> None:
        super().__init__(cause)
        self.status, self.cause, self.retryable = status, cause, retryable


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
    """What every HTTP client connection of one proxy shares: the pool, the retry
    budgets, the metric children and the settings."""

    def __init__(self, pool: Pool, metrics: ProxyMetrics, *, request_timeout: float,
                 own_identity: Callable[[], Identity], head_timeout: float = 10.0) -> None:
        self.pool = pool
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.head_timeout = head_timeout
        self.own_identity = own_identity
        self.budgets: dict[str, RetryBudget] = {}
        self._cache: dict[tuple[bytes, str, str, str | None], _Series] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    def serve(self, transport: asyncio.Transport, held: list[bytes], eof: bool,
              target: ServiceSpec | Route, balancer: Balancer | None, peer: str) -> None:
        """Take over a client connection whose first bytes (`held`) were read already.
        `target` is the service the client dialled, or, on the outbound listener, a
        `Route` that finds each request's service from its authority (the Host header)."""
        client = ClientSide(self, target, balancer, peer)
        transport.set_protocol(client)
        client.connection_made(transport)
        for data in held:
            client.requests.receive_data(data)
        if eof:
            client.requests.connection_closed()
        client.advance()
        client.after_read()

    def spawn(self, coro: Any, done: Callable[[asyncio.Task[Any]], None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(done)

    def series(self, head: http1.Head, service: ServiceSpec, ep: EndpointSpec) -> _Series:
        """The metric children of a request to `ep`, looked up once, not per request."""
        host = head.values(b"host")
        key = (host[0] if host else b"", service.name, ep.address, ep.identity)
        series = self._cache.get(key)
        if series is None:
            if len(self._cache) > 10_000:  # bound memory against unbounded authorities
                self._cache.clear()
            series = self._cache[key] = _Series(self.metrics, self.labels(
                head, service, ep.identity or "", ep.address))
        return series

    def labels(self, head: http1.Head, service: ServiceSpec, server_id: str,
               target: str) -> dict[str, str]:
        host = head.values(b"host")
        return {"direction": "outbound",
                "authority": host[0].decode("latin-1") if host else service.name,
                "tls": "true" if server_id else "no_identity",
                "client_id": str(self.own_identity()), "server_id": server_id,
                "target_addr": target, "dst_service": service.name}

    def refused(self, cause: str, peer: str, service: str, detail: object) -> None:
        self.metrics.protocol_errors.labels("outbound", cause).inc()
        log.info("outbound request refused peer=%s service=%s cause=%s", peer,
                 service or "-", detail)


class ClientSide(asyncio.Protocol):
    """An application's connection to the outbound proxy, read one request at a time."""

    def __init__(self, http: HttpOutbound, target: ServiceSpec | Route,
                 balancer: Balancer | None, peer: str) -> None:
        self.http, self.target, self.balancer, self.peer = http, target, balancer, peer
        self.service = target if isinstance(target, ServiceSpec) else None
        self.requests = http1.MessageReader("request")
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._paused = True  # the connection is handed over with reading paused

    # -------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.requests.receive_data(data)
        self.advance()
        self.after_read()

    def after_read(self) -> None:
        """Time a head that has begun; stop reading bytes that must wait (a pipelined
        request, a body while its upstream connects)."""
        if self.closed:
            return
        exchange = self.exchange
        if exchange is None:
            if self.requests.buffered and self._head_timer is None:
                # A head has begun: it must be whole within head_timeout (slowloris).
                self._head_timer = asyncio.get_running_loop().call_later(
                    self.http.head_timeout, self._head_timed_out)
            self.resume_reading()
        elif self.requests.buffered and not exchange.wants_request_events():
            self.pause_reading()
        else:
            self.resume_reading()

    def eof_received(self) -> bool:
        self.requests.connection_closed()
        self.advance()
        return True  # a client that half-closes still gets its response

    def connection_lost(self, exc: Exception | None) -> None:
        if self.exchange is not None:
            self.exchange.abort(f"the client went away: {exc or 'EOF'}")
        self.close()

    def pause_writing(self) -> None:
        up = self.exchange.upstream if self.exchange is not None else None
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self.exchange.upstream if self.exchange is not None else None
        if up is not None:
            up.resume_reading()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    # -------------------------------------------------------------- requests

    def advance(self) -> None:
        """Hand the request reader's events on, as far as the current exchange takes them."""
        try:
            while not self.closed:
                exchange = self.exchange
                if exchange is not None and not exchange.wants_request_events():
                    return
                event = self.requests.next_event()
                if event is http1.NEED_DATA:
                    return
                if isinstance(event, http1.Head):
                    self._cancel_head_timer()
                    self._start(event)
                elif exchange is None:
                    self.close()  # the connection ended between requests
                    return
                elif isinstance(event, http1.Body):
                    exchange.request_body(event.data)
                elif isinstance(event, http1.End):
                    exchange.request_ended()
                elif event is http1.PAUSED:
                    return  # an upgrade request: its response decides
                else:
                    exchange.abort("the client closed its side in the middle of a request")
                    self.close()
                    return
        except ProtocolError as e:
            self._refuse(400, "bad-request", f"malformed request: {e}", e)

    def _start(self, head: http1.Head) -> None:
        if isinstance(self.target, ServiceSpec):
            service, balancer = self.target, self.balancer
        else:
            host = head.values(b"host")
            authority = host[0].decode("latin-1") if host else ""
            found = self.target(authority)
            if found is None:
                self._refuse(502, "no-service", f"no service named "
                             f"{authority or '(no Host header)'} is known to the proxy",
                             f"no such service authority={authority or '-'}")
                return
            service, balancer = found
            self.service = service
        assert balancer is not None
        self.exchange = Exchange(self, head, service, balancer)
        self.exchange.attempt()

    def exchange_done(self, *, keep_alive: bool) -> None:
        """The current exchange ended; go on to the next request or close."""
        self.exchange = None
        if not keep_alive or not self.requests.keep_alive:
            self.close()
            return
        if self.requests.buffered or self.requests.eof:
            self.advance()
        self.after_read()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.exchange is None and not self.closed:
            self._refuse(408, "head-timeout", f"the request head was not complete within "
                         f"{self.http.head_timeout:g}s", "the request head was not complete")

    def watch_deadline(self, deadline: float) -> None:
        """Make sure the request in flight is timed out at `deadline`.

        A connection has one request timer, which is not cancelled when a request
        ends: when it fires it times out the request then in flight if that one is
        late, or re-arms for its deadline. That saves a timer per request."""
        if self._request_timer is None:
            self._request_timer = asyncio.get_running_loop().call_later(
                deadline - time.monotonic(), self._check_deadline)

    def _check_deadline(self) -> None:
        self._request_timer = None
        exchange = self.exchange
        if exchange is None or exchange.done or self.closed:
            return
        if time.monotonic() >= exchange.deadline:
            exchange.timed_out()
        else:
            self.watch_deadline(exchange.deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, cause: str, message: str, detail: object) -> None:
        self.http.refused(cause, self.peer, self.service.name if self.service else "", detail)
        if self.exchange is not None:
            if self.exchange.response_started:
                self.exchange.abort(message)
                self.close()
                return
            self.exchange.abort(message)
        self.write(http1.error_response(status, message))
        self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """Close once what was written is sent."""
        self._cancel_head_timer()
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def tunnel(self, up: Upstream, rest: bytes, rest_up: bytes) -> None:
        """After an accepted Upgrade: relay bytes both ways until either side ends."""
        assert self.transport is not None and up.transport is not None
        flow = Flow({}, lambda _flow, _exc: None)
        flow.client.transport, flow.server.transport = self.transport, up.transport
        self.transport.set_protocol(flow.client)
        up.transport.set_protocol(flow.server)
        if rest:
            up.transport.write(rest)
        if rest_up:
            self.transport.write(rest_up)
        self.closed = True  # this protocol is done; the flow owns both transports
        up.exchange = None
        self.resume_reading()
        up.resume_reading()
        if self.requests.eof:
            flow.client.eof_received()


class Exchange:
    """One request and its response, over one or more attempts on endpoints."""

    __slots__ = ("balancer", "body", "body_size", "budget", "client", "connecting", "deadline",
                 "done", "head", "http", "method", "pick", "request_complete",
                 "response_started", "reused", "series", "service", "started", "status",
                 "tried", "upgrade", "upstream")

    def __init__(self, client: ClientSide, head: http1.Head, service: ServiceSpec,
                 balancer: Balancer) -> None:
        http = client.http
        self.client, self.http, self.head = client, http, head
        self.service, self.balancer = service, balancer
        self.method = head.method or "GET"
        self.upgrade = bool(head.values(b"upgrade"))
        budget = http.budgets.get(service.name)
        if budget is None:
            budget = http.budgets[service.name] = RetryBudget()
        self.budget = budget
        budget.deposit()
        self.started = time.monotonic()
        self.body: list[bytes] | None = []  # kept for a retry while small; None once not
        self.body_size = 0
        self.request_complete = False
        self.tried: list[EndpointState] = []
        self.pick: Pick | None = None
        self.upstream: Upstream | None = None
        self.connecting = False
        self.reused = False
        self.response_started = False
        self.status = 0
        self.series: _Series | None = None
        self.done = False
        self.deadline = self.started + http.request_timeout
        client.watch_deadline(self.deadline)

    # -------------------------------------------------------------- the request side

    def wants_request_events(self) -> bool:
        if self.request_complete or self.done:
            return False
        # Without an upstream, the body is held for it; beyond the retry limit, wait.
        return self.upstream is not None or self.body_size <= MAX_RETRY_BODY

    def request_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.upstream is None:
            # Held for the upstream being connected (reading stops past the retry limit).
            assert self.body is not None
            self.body.append(data)
            return
        self.upstream.write(data)
        if self.body is not None:
            if self.body_size <= MAX_RETRY_BODY:
                self.body.append(data)
            else:
                self.body = None  # streamed on: this request can no longer be retried

    def request_ended(self) -> None:
        self.request_complete = True

    # -------------------------------------------------------------- attempts

    def attempt(self, last: UpstreamError | None = None) -> None:
        pick = self.balancer.pick(avoid=self.tried)
        if pick is None:
            self._fail(last or UpstreamError(
                503, f"no endpoints available for {self.service.name}", retryable=False))
            return
        self.pick = pick
        self.tried.append(pick.endpoint)
        ep = pick.endpoint.spec
        self.series = self.http.series(self.head, self.service, ep)
        if len(self.tried) == 1:
            self.series.request.inc()
        up = self.http.pool.take(Pool.key(self.service, ep))
        if up is not None:
            self._attach(up, reused=True)
            return
        self.connecting = True
        self.http.spawn(self.http.pool.connect(self.service, ep), self._connected)

    def _connected(self, task: asyncio.Task[Upstream]) -> None:
        self.connecting = False
        if task.cancelled():
            self.abort("the connection attempt was cancelled")
            return
        exc = task.exception()
        if self.done:
            if exc is None:
                self.http.pool.put(task.result())
            return
        if exc is not None:
            ep = self.pick.endpoint.spec if self.pick else None
            if not isinstance(exc, ConnectError | IdentityError):
                log.warning("outbound connect failed unexpectedly endpoint=%s cause=%r",
                            ep.address if ep else "-", exc)
            self._attempt_failed(UpstreamError(
                502, f"connection to {ep.address if ep else '?'} failed: {exc}",
                retryable=True))
            return
        self._attach(task.result(), reused=False)
        if not self.request_complete:
            self.client.advance()  # the body that waited for this connection
            self.client.after_read()

    def _attach(self, up: Upstream, *, reused: bool) -> None:
        self.upstream, self.reused = up, reused
        up.exchange = self
        up.responses.expect_response_to(self.method)
        body = self.body
        head = self.head.raw if self.client.requests.keep_alive else _kept_alive(self.head)
        up.write(head + b"".join(body) if body else head)
        if body is not None and self.body_size > MAX_RETRY_BODY:
            self.body = None  # what was held went out; the rest streams on

    def _attempt_failed(self, e: UpstreamError) -> None:
        """An attempt ended before any response byte reached the client."""
        if self.pick is not None:
            self.pick.failed()
            self.pick = None
        ep = self.tried[-1].spec if self.tried else None
        log.info("outbound attempt failed peer=%s service=%s endpoint=%s identity=%s cause=%s",
                 self.client.peer, self.service.name, ep.address if ep else "-",
                 (ep.identity if ep else None) or "-", e.cause)
        self._drop_upstream()
        if (e.retryable and self.request_complete and self.body is not None
                and self.body_size <= MAX_RETRY_BODY
                and is_retryable(self.method, body_consumed=False, status=e.status,
                                 error=e.status == 502)
                and self.budget.withdraw()):
            self.attempt(last=e)
            return
        self._fail(e)

    def _fail(self, e: UpstreamError) -> None:
        """Answer the client with the error and end the exchange."""
        self.http.metrics.response.labels(
            **self.http.labels(self.head, self.service, "", ""), status_code=str(e.status),
            classification="failure", error=e.cause.split(":")[0][:60]).inc()
        self.client.write(http1.error_response(e.status, e.cause))
        self._end()
        self.client.exchange_done(keep_alive=False)

    def _drop_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            up.close()

    def timed_out(self) -> None:
        if self.done:
            return
        cause = f"request to {self.service.name} timed out after {self.http.request_timeout:g}s"
        if self.pick is not None:
            self.pick.failed()
            self.pick = None
        self._drop_upstream()
        if self.response_started:
            log.info("outbound response cut peer=%s service=%s cause=%s", self.client.peer,
                     self.service.name, cause)
            self._end()
            self.client.exchange_done(keep_alive=False)
            return
        self._fail(UpstreamError(504, cause, retryable=False))

    def upstream_lost(self, up: Upstream, exc: Exception | None) -> None:
        if up is not self.upstream or self.done:
            return
        self.upstream = None
        if not self.response_started:
            self._attempt_failed(UpstreamError(
                502, f"{self.tried[-1].spec.address} closed the connection before answering"
                f"{f': {exc}' if exc else ''}", retryable=self.reused))
            return
        # The response was cut: what was sent stays sent, the client's connection ends.
        self._finish(ok=False)

    def abort(self, cause: str) -> None:
        """The client is gone or broke the protocol: give everything back."""
        if self.done:
            return
        log.debug("outbound exchange aborted peer=%s service=%s cause=%s", self.client.peer,
                  self.service.name, cause)
        if self.pick is not None:
            self.pick.released()
            self.pick = None
        self._drop_upstream()
        self._end()

    def _end(self) -> None:
        self.done = True

    # -------------------------------------------------------------- the response side

    def on_response(self) -> None:
        """Forward what the upstream's latest bytes complete of the response."""
        up = self.upstream
        if up is None or self.done:
            return
        out: list[bytes] = []
        try:
            while True:
                event = up.responses.next_event()
                if event is http1.NEED_DATA:
                    break
                if isinstance(event, http1.Body):
                    out.append(event.data)
                elif isinstance(event, http1.Head):
                    if not self._response_head(event, out):
                        return
                elif isinstance(event, http1.End):
                    self.client.write(b"".join(out))
                    self._finish(ok=True)
                    return
                elif isinstance(event, http1.Upgrade):
                    self.client.write(b"".join(out))
                    self._upgraded(up, event.rest)
                    return
                else:  # the upstream closed
                    self.client.write(b"".join(out))
                    self._closed_early()
                    return
        except ProtocolError as e:
            if not self.response_started:
                self._attempt_failed(UpstreamError(
                    502, f"{self.tried[-1].spec.address} failed: {e}", retryable=self.reused))
                return
            self.client.write(b"".join(out))
            self._drop_upstream()
            self._finish(ok=False)
            return
        if out:
            self.client.write(b"".join(out))

    def _response_head(self, head: http1.Head, out: list[bytes]) -> bool:
        """Take a response head; False when the attempt ended instead (a retryable status)."""
        status = head.status or 0
        if 100 <= status < 200 and status != 101:
            return True  # interim responses are not forwarded
        if status != 101 and self.upgrade:
            with contextlib.suppress(http1.ReaderStateError):
                self.client.requests.upgrade_declined()
        if status in (502, 503, 504):
            self._attempt_failed(UpstreamError(
                status, f"{self.tried[-1].spec.address} answered {status}", retryable=True))
            return False
        self.status = status
        self.response_started = True
        assert self.series is not None
        self.series.latency(status).observe((time.monotonic() - self.started) * 1000)
        # A client that asked to close is told so, whatever the upstream said.
        out.append(head.raw if self.client.requests.keep_alive else
                   http1.serialize_head(head, replace={b"connection": b"close"}))
        return True

    def _closed_early(self) -> None:
        if not self.response_started:
            self._attempt_failed(UpstreamError(
                502, "the upstream closed the connection before answering",
                retryable=self.reused))
            return
        self._drop_upstream()
        self._finish(ok=False)

    def _record(self) -> None:
        assert self.series is not None
        status = self.status
        failure = status >= 500
        self.series.response(status, "failure" if failure else "success").inc()
        if self.pick is not None:
            if failure:
                self.pick.failed()
            else:
                self.pick.succeeded(time.monotonic() - self.started)
            self.pick = None

    def _finish(self, *, ok: bool) -> None:
        """The response is over: record it, pool or close the upstream, go on."""
        self._record()
        up, self.upstream = self.upstream, None
        reusable = ok and self.request_complete
        if up is not None:
            if reusable and up.responses.keep_alive:
                self.http.pool.put(up)
            else:
                up.close()
        self._end()
        self.client.exchange_done(keep_alive=reusable)

    def _upgraded(self, up: Upstream, rest_up: bytes) -> None:
        self._record()
        self._end()
        self.upstream = None
        requests = self.client.requests
        rest = b""
        with contextlib.suppress(http1.ReaderStateError):
            requests.protocol_switched()
            event = requests.next_event()
            if isinstance(event, http1.Upgrade):
                rest = event.rest
        self.client.exchange = None
        self.client.tunnel(up, rest, rest_up)


def _kept_alive(head: http1.Head) -> bytes:
    """The request head to send upstream when the client closes after this request:
    without its Connection field (and the fields that names, hop-by-hop like it), so
    the connection between the proxies stays open for the pool. A client that does
    not keep its connections alive then costs a TCP accept, not a TLS handshake."""
    if head.version != "1.1" or head.values(b"upgrade"):
        return head.raw
    named = {token.strip().lower() for value in head.values(b"connection")
             for token in value.split(b",")}
    return http1.serialize_head(head, remove={b"connection", *named})
