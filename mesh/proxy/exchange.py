"""HTTP/1.1 outbound proxying as a sans-IO machine: one `Exchange` per client
connection takes events (mesh.proxy.exchange_io: bytes from either side, an upstream
connected or lost, a timer fired, a write buffer full or drained) and returns the
commands that answer them (write, open an upstream, pause or resume reading, start or
cancel a timer, pool or close the upstream, close). It reads requests one at a time
with the codec of mesh.proxy.http1, balances each on its own, and never touches a
socket, a timer or the clock: the time of each event is passed in with it.

Per request: metrics with Linkerd's names, a timeout, retries of idempotent requests
whose body is buffered (under a retry budget, never once response bytes have reached
the client), and errors answered as 502/503/504 with an ``l5d-proxy-error`` header
naming the cause. A client's ``Connection: close`` stays between client and proxy:
the connection to the destination proxy goes back to the pool. An Upgrade (WebSocket,
h2c) or CONNECT that the server accepts turns the connection into an opaque relay.

What one read brings is written in one go (a write is a system call, the largest
cost per request). Back-pressure runs both ways: a client that does not read pauses
the upstream, an upstream that does not read pauses the client.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import assert_never

from mesh.errors import ProtocolError
from mesh.proxy import http1, http1_head
from mesh.proxy.balancer import Balancer
from mesh.proxy.discovery import ServiceSpec
from mesh.proxy.exchange_io import (
    CLOSE_UPSTREAM,
    PAUSE_CLIENT,
    PAUSE_UPSTREAM,
    POOL_UPSTREAM,
    RESUME_CLIENT,
    RESUME_UPSTREAM,
    CancelTimer,
    ClientClosed,
    ClientData,
    ClientEof,
    Close,
    Command,
    EndWrite,
    Event,
    OpenUpstream,
    Side,
    StartTimer,
    Timer,
    TimerFired,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamEof,
    UpstreamFailed,
    WriteBufferDrained,
    WriteBufferFull,
    WriteClient,
    WriteUpstream,
)
from mesh.proxy.exchanges import (
    MAX_RETRY_BODY,
    Exchanges,
    Failure,
    Request,
    Route,
    answered,
    kept_alive,
    unavailable,
)
from mesh.proxy.failover import Cause
from mesh.proxy.retry import is_retryable

log = logging.getLogger("mesh.proxy.http")

NEVER_SENT = frozenset({Cause.CONNECT, Cause.HANDSHAKE})
"""Failures before the request left the proxy: the upstream connection never opened."""

class Phase(enum.Enum):
    HTTP = "http"
    """Requests are read one at a time, each answered before the next is sent on."""
    RELAY = "relay"
    """The server accepted an upgrade: bytes pass opaquely both ways."""
    CLOSED = "closed"


class Exchange:
    """The HTTP side of one client connection; see the module doc."""

    def __init__(self, shared: Exchanges, target: ServiceSpec | Route,
                 balancer: Balancer | None, *, peer: str) -> None:
        self.shared, self.target, self.balancer, self.peer = shared, target, balancer, peer
        self.service: ServiceSpec | None = target if isinstance(target, ServiceSpec) else None
        self.phase = Phase.HTTP
        self.requests = http1.MessageReader("request")
        self.responses = http1.MessageReader("response")
        self.request: Request | None = None
        self._responses_fresh = True  # no message read yet, or the last one ended cleanly
        self._dialling = False  # an OpenUpstream is unanswered
        self._attached = False  # an upstream serves this client
        self._client_reading = False  # the connection is handed over with reading paused
        self._upstream_reading = False
        self._client_full = False  # the client's write buffer is full
        self._upstream_full = False
        self._head_timer = False  # running
        self._request_timer = False
        self._ended: set[Side] = set()  # sides whose end of input an opaque relay saw
        self._out: list[Command] = []
        self._now = 0.0

    def handle(self, event: Event, now: float) -> list[Command]:
        """Take one event that happened at `now`; return what to do, in order."""
        out: list[Command] = []
        self._out, self._now = out, now
        if isinstance(event, ClientData):
            self._client_data(event.data)
        elif isinstance(event, UpstreamData):
            self._upstream_data(event.data)
        elif isinstance(event, UpstreamConnected):
            self._connected(reused=event.reused)
        elif isinstance(event, WriteBufferFull):
            self._write_buffer(event.side, full=True)
        elif isinstance(event, WriteBufferDrained):
            self._write_buffer(event.side, full=False)
        elif isinstance(event, TimerFired):
            self._timer_fired(event.timer)
        elif isinstance(event, UpstreamFailed):
            self._connect_failed(event.cause, retryable=event.retryable,
                                 kind=Cause.HANDSHAKE if event.handshake else Cause.CONNECT)
        elif isinstance(event, UpstreamEof):
            self._upstream_eof()
        elif isinstance(event, UpstreamClosed):
            self._upstream_closed(event.cause, timed_out=event.timed_out)
        elif isinstance(event, ClientEof):
            self._client_eof()
        elif isinstance(event, ClientClosed):
            if self.phase is not Phase.CLOSED:
                self._close(f"the client went away: {event.cause or 'EOF'}")
        else:
            assert_never(event)
        if self.phase is not Phase.CLOSED:
            self._flow()
        return out

    # -------------------------------------------------------------- the client side

    def _client_data(self, data: bytes) -> None:
        if self.phase is Phase.RELAY:
            self._out.append(WriteUpstream(data))
        elif self.phase is Phase.HTTP:
            self._advance(data)

    def _client_eof(self) -> None:
        if self.phase is Phase.RELAY:
            self._relay_ended(Side.CLIENT)
        elif self.phase is Phase.HTTP:
            self.requests.connection_closed()
            self._advance()

    def _advance(self, data: bytes = b"") -> None:
        """Hand the request reader's events on, as far as the current request takes them."""
        requests = self.requests
        try:
            requests.receive_data(data)
            while self.phase is Phase.HTTP:
                request = self.request
                if request is not None and not self._wants_request_events(request):
                    return
                event = requests.next_event()
                if event is http1.NEED_DATA or event is http1.PAUSED:
                    return  # PAUSED: an upgrade request, whose response decides
                if isinstance(event, http1.Head):
                    self._cancel(Timer.HEAD)
                    self._start(event)
                elif request is None:
                    self._close("the connection ended between requests")
                elif isinstance(event, http1.Body):
                    self._request_body(request, event.data)
                elif isinstance(event, http1.End):
                    request.complete = True
                else:
                    self._close("the client closed its side in the middle of a request")
        except ProtocolError as e:
            self._refuse(400, "bad-request", f"malformed request: {e}", e)

    def _wants_request_events(self, request: Request) -> bool:
        if request.complete:
            return False
        # Without an upstream, the body is held for it; beyond the retry limit, wait.
        return self._attached or request.body_size <= MAX_RETRY_BODY

    def _request_body(self, request: Request, data: bytes) -> None:
        request.body_size += len(data)
        if not self._attached:
            # Held for the upstream being connected (reading stops past the retry limit).
            assert request.body is not None
            request.body.append(data)
            return
        self._out.append(WriteUpstream(data))
        if request.body is not None:
            if request.body_size <= MAX_RETRY_BODY:
                request.body.append(data)
            else:
                request.body = None  # streamed on: this request can no longer be retried

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
        request = self.request = Request(head, service, balancer, started=self._now,
                                         budget=self.shared.budget(service.name),
                                         timeout=self.shared.request_timeout)
        request.budget.deposit()
        self._watch_deadline(request.deadline)
        self._attempt(None)

    # -------------------------------------------------------------- attempts

    def _attempt(self, last: Failure | None) -> None:
        request = self.request
        assert request is not None
        tried = request.tried
        # A first attempt that may be retried may probe a failover group that is down.
        pick = request.balancer.pick(avoid=tried, probe_ok=request.idempotent and not tried)
        if pick is None:
            self._fail(unavailable(request, last))
            return
        if tried and tried[-1].priority != pick.endpoint.priority:
            self.shared.moved_group(request, pick.endpoint)
        request.pick = pick
        request.tried.append(pick.endpoint)
        ep = pick.endpoint.spec
        request.series = self.shared.series(request.head, request.service, ep)
        if len(request.tried) == 1:
            request.series.request.inc()
        self._dialling = True
        self._out.append(OpenUpstream(request.service, ep))

    def _connected(self, *, reused: bool) -> None:
        request = self.request
        if not self._dialling or request is None or self.phase is not Phase.HTTP:
            self._out.append(POOL_UPSTREAM)  # nobody waits for it (timed out, client gone)
            return
        self._dialling = False
        self._attach(request, reused=reused)
        if not request.complete:
            self._advance()  # the body that waited for this connection

    def _attach(self, request: Request, *, reused: bool) -> None:
        request.reused = reused
        self._attached = self._upstream_reading = True
        self._upstream_full = False
        if not self._responses_fresh:
            self.responses = http1.MessageReader("response")
        self._responses_fresh = False
        self.responses.expect_response_to(request.method)
        body = request.body
        head = request.head.raw if self.requests.keep_alive else kept_alive(request.head)
        self._out.append(WriteUpstream(head + b"".join(body) if body else head))
        if body is not None and request.body_size > MAX_RETRY_BODY:
            request.body = None  # what was held went out; the rest streams on

    def _connect_failed(self, cause: str, *, retryable: bool, kind: Cause) -> None:
        request = self.request
        if not self._dialling or request is None or self.phase is not Phase.HTTP:
            return
        self._dialling = False
        address = request.balancer.where(request.tried[-1])
        self._attempt_failed(Failure(502, f"connection to {address} failed: {cause}",
                                     retryable=retryable, kind=kind))

    def _attempt_failed(self, failure: Failure) -> None:
        """An attempt ended before any response byte reached the client."""
        request = self.request
        assert request is not None
        if request.pick is not None:
            request.pick.failed(failure.kind)
            request.pick = None
        ep = request.tried[-1].spec
        log.info("outbound attempt failed peer=%s service=%s endpoint=%s identity=%s cause=%s",
                 self.peer, request.service.name, ep.address, ep.identity or "-", failure.cause)
        self._drop_upstream()
        # A connection that never opened carried nothing: any method may go elsewhere.
        never_sent = failure.kind in NEVER_SENT
        if (failure.retryable and request.complete and request.body is not None
                and request.body_size <= MAX_RETRY_BODY
                and (never_sent or is_retryable(request.method, body_consumed=False,
                                                status=failure.status,
                                                error=failure.status == 502))
                and request.budget.withdraw()):
            self._attempt(failure)
            return
        self._fail(self.shared.unreplayed(request, failure))

    def _fail(self, failure: Failure) -> None:
        """Answer the client with the error and end the connection."""
        request = self.request
        assert request is not None
        self.shared.failed(request.head, request.service, status=failure.status,
                           cause=failure.cause)
        self._out.append(WriteClient(http1_head.error_response(failure.status, failure.cause)))
        self._done(keep_alive=False)

    def _drop_upstream(self) -> None:
        if self._attached:
            self._out.append(CLOSE_UPSTREAM)
            self._detach()

    def _detach(self) -> None:
        self._attached = False
        self._upstream_full = False

    def _abort(self, cause: str) -> None:
        """The client is gone or broke the protocol: give everything back."""
        request = self.request
        if request is None:
            return
        log.debug("outbound exchange aborted peer=%s service=%s cause=%s", self.peer,
                  request.service.name, cause)
        if request.pick is not None:
            request.pick.released()
            request.pick = None
        self._drop_upstream()
        self.request = None

    # -------------------------------------------------------------- the upstream side

    def _upstream_data(self, data: bytes) -> None:
        if self.phase is Phase.RELAY:
            self._out.append(WriteClient(data))
        elif self.phase is Phase.HTTP and self._attached:
            self.responses.receive_data(data)
            self._on_response()

    def _upstream_eof(self) -> None:
        if self.phase is Phase.RELAY:
            self._relay_ended(Side.UPSTREAM)
        elif self.phase is Phase.HTTP and self._attached:
            self.responses.connection_closed()
            self._on_response()

    def _upstream_closed(self, cause: str, *, timed_out: bool) -> None:
        if self.phase is Phase.RELAY:
            self._detach()
            self._close(f"the upstream closed: {cause or 'EOF'}")
            return
        request = self.request
        if self.phase is not Phase.HTTP or not self._attached or request is None:
            return
        self._detach()
        if not request.response_started:
            where = request.balancer.where(request.tried[-1])
            if timed_out:
                # Not an idle connection closing under us: the peer went silent.
                failure = Failure(502, f"{where} acknowledged nothing of the request; the "
                                  f"connection timed out", retryable=True,
                                  kind=Cause.UNACKNOWLEDGED)
            else:
                failure = Failure(502, f"{where} closed the connection before answering"
                                  f"{f': {cause}' if cause else ''}", retryable=True,
                                  kind=Cause.CLOSED if request.reused else Cause.RESET)
            self._attempt_failed(failure)
            return
        # The response was cut: what was sent stays sent, the client's connection ends.
        self._finish(ok=False)

    def _on_response(self) -> None:
        """Forward what the upstream's latest bytes complete of the response."""
        request = self.request
        if request is None:
            self._drop_upstream()  # an upstream that speaks unasked cannot be trusted
            return
        parts: list[bytes] = []
        try:
            while True:
                event = self.responses.next_event()
                if event is http1.NEED_DATA:
                    break
                if isinstance(event, http1.Body):
                    parts.append(event.data)
                elif isinstance(event, http1.Head):
                    if not self._response_head(request, event, parts):
                        return
                elif isinstance(event, http1.End):
                    self._write_client(parts)
                    self._finish(ok=True)
                    return
                elif isinstance(event, http1.Upgrade):
                    self._write_client(parts)
                    self._upgraded(event.rest)
                    return
                else:  # the upstream closed
                    self._write_client(parts)
                    self._closed_early(request)
                    return
        except ProtocolError as e:
            if not request.response_started:
                self._attempt_failed(Failure(
                    502, f"{request.balancer.where(request.tried[-1])} failed: {e}",
                    retryable=request.reused, kind=Cause.RESET))
                return
            self._write_client(parts)
            self._drop_upstream()
            self._finish(ok=False)
            return
        self._write_client(parts)

    def _write_client(self, parts: list[bytes]) -> None:
        if parts:
            self._out.append(WriteClient(b"".join(parts)))

    def _response_head(self, request: Request, head: http1.Head, parts: list[bytes]) -> bool:
        """Take a response head; False when the attempt ended instead (a retryable status)."""
        status = head.status or 0
        if 100 <= status < 200 and status != 101:
            return True  # interim responses are not forwarded
        switched = status == 101 or (request.method == "CONNECT" and 200 <= status < 300)
        if request.upgrade and not switched:
            with contextlib.suppress(http1.ReaderStateError):
                self.requests.upgrade_declined()
        if status in (502, 503, 504):
            self._attempt_failed(answered(request, head, status))
            return False
        request.status = status
        request.response_started = True
        assert request.series is not None
        request.series.latency(status).observe((self._now - request.started) * 1000)
        # A client that asked to close is told so, whatever the upstream said.
        parts.append(head.raw if self.requests.keep_alive else
                     http1_head.serialize_head(head, replace={b"connection": b"close"}))
        return True

    def _closed_early(self, request: Request) -> None:
        if not request.response_started:
            self._attempt_failed(Failure(
                502, "the upstream closed the connection before answering",
                retryable=True, kind=Cause.CLOSED if request.reused else Cause.RESET))
            return
        self._drop_upstream()
        self._finish(ok=False)

    def _record(self, request: Request) -> None:
        assert request.series is not None
        status = request.status
        failure = status >= 500
        request.series.response(status, "failure" if failure else "success").inc()
        if request.pick is not None:
            if failure:
                request.pick.failed(Cause.STATUS)
            else:
                request.pick.succeeded(self._now - request.started)
            request.pick = None

    def _finish(self, *, ok: bool) -> None:
        """The response is over: record it, pool or close the upstream, go on."""
        request = self.request
        assert request is not None
        self._record(request)
        reusable = ok and request.complete
        if self._attached:
            responses = self.responses
            if reusable and responses.keep_alive and not responses.buffered:
                self._out.append(POOL_UPSTREAM)
                self._responses_fresh = True
            else:
                self._out.append(CLOSE_UPSTREAM)
            self._detach()
        self._done(keep_alive=reusable)

    def _done(self, *, keep_alive: bool) -> None:
        """The current request ended; go on to the next one or close."""
        self.request = None
        if not keep_alive or not self.requests.keep_alive:
            self._close("the exchange ended the connection")
            return
        if self.requests.buffered or self.requests.eof:
            self._advance()

    # -------------------------------------------------------------- timeouts

    def _timer_fired(self, timer: Timer) -> None:
        request = self.request
        if timer is Timer.HEAD:
            self._head_timer = False
            if request is None and self.phase is Phase.HTTP:
                timeout = self.shared.head_timeout
                self._refuse(408, "head-timeout", f"the request head was not complete within "
                             f"{timeout:g}s", "the request head was not complete")
            return
        self._request_timer = False
        if request is not None and self.phase is Phase.HTTP:
            if self._now >= request.deadline:
                self._timed_out(request)
            else:
                self._watch_deadline(request.deadline)

    def _watch_deadline(self, deadline: float) -> None:
        """Make sure the request in flight is timed out at `deadline`.

        A connection has one request timer, which is not cancelled when a request
        ends: when it fires it times out the request then in flight if that one is
        late, or starts again for its deadline. That saves a timer per request."""
        if not self._request_timer:
            self._request_timer = True
            self._out.append(StartTimer(Timer.REQUEST, deadline - self._now))

    def _cancel(self, timer: Timer) -> None:
        if timer is Timer.HEAD and self._head_timer:
            self._head_timer = False
            self._out.append(CancelTimer(timer))
        elif timer is Timer.REQUEST and self._request_timer:
            self._request_timer = False
            self._out.append(CancelTimer(timer))

    def _timed_out(self, request: Request) -> None:
        cause = (f"request to {request.service.name} timed out after "
                 f"{self.shared.request_timeout:g}s")
        if request.pick is not None:
            request.pick.failed(Cause.TIMEOUT)
            request.pick = None
        self._drop_upstream()
        if request.response_started:
            log.info("outbound response cut peer=%s service=%s cause=%s", self.peer,
                     request.service.name, cause)
            self._done(keep_alive=False)
            return
        self._fail(Failure(504, cause, retryable=False))

    # -------------------------------------------------------------- the connection

    def _refuse(self, status: int, cause: str, message: str, detail: object) -> None:
        self.shared.refused(cause, self.peer, self.service.name if self.service else "",
                            detail)
        request = self.request
        if request is not None:
            started = request.response_started
            self._abort(message)
            if started:
                self._close(message)  # the client has part of a response: cut it
                return
        self._out.append(WriteClient(http1_head.error_response(status, message)))
        self._close(message)

    def _close(self, cause: str) -> None:
        """Close once what was written is sent."""
        self._cancel(Timer.HEAD)
        self._cancel(Timer.REQUEST)
        self._abort(cause)
        self._drop_upstream()
        self.phase = Phase.CLOSED
        self._out.append(Close(cause))

    def _write_buffer(self, side: Side, *, full: bool) -> None:
        if side is Side.CLIENT:
            self._client_full = full
        elif self._attached:
            self._upstream_full = full

    def _flow(self) -> None:
        """Read from each side exactly when what it sends can go somewhere; time a head
        that has begun."""
        request = self.request
        if self.phase is Phase.RELAY or request is None:
            wanted = not self._upstream_full
        else:
            # Stop reading bytes that must wait (a pipelined request, a body while its
            # upstream connects, anything while the upstream does not read).
            wanted = not self._upstream_full and not (
                self.requests.buffered and not self._wants_request_events(request))
        if wanted is not self._client_reading:
            self._client_reading = wanted
            self._out.append(RESUME_CLIENT if wanted else PAUSE_CLIENT)
        if self._attached and self._upstream_reading == self._client_full:
            # Read from the upstream exactly while the client takes what it sends.
            self._upstream_reading = not self._client_full
            self._out.append(PAUSE_UPSTREAM if self._client_full else RESUME_UPSTREAM)
        if request is None and self.phase is Phase.HTTP and self.requests.buffered and \
                not self._head_timer:
            # A head has begun: it must be whole within head_timeout (slowloris).
            self._head_timer = True
            self._out.append(StartTimer(Timer.HEAD, self.shared.head_timeout))

    # -------------------------------------------------------------- after an upgrade

    def _upgraded(self, rest_up: bytes) -> None:
        request = self.request
        assert request is not None
        self._record(request)
        self.request = None
        self._cancel(Timer.REQUEST)
        rest = b""
        with contextlib.suppress(http1.ReaderStateError):
            self.requests.protocol_switched()
            event = self.requests.next_event()
            if isinstance(event, http1.Upgrade):
                rest = event.rest
        self.phase = Phase.RELAY
        if rest:
            self._out.append(WriteUpstream(rest))
        if rest_up:
            self._out.append(WriteClient(rest_up))
        if self.requests.eof:
            self._relay_ended(Side.CLIENT)

    def _relay_ended(self, side: Side) -> None:
        """One side of the relay ended its input: pass that on, or close once both did."""
        self._ended.add(side)
        if len(self._ended) == 2:
            self._close("both sides of the relay ended")
        else:
            self._out.append(EndWrite(Side.UPSTREAM if side is Side.CLIENT else Side.CLIENT))
