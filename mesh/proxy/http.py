"""HTTP/1.1-aware outbound proxying on asyncio: the adapter that runs the sans-IO
machine of mesh.proxy.exchange on a client connection.

`HttpOutbound` is what the client connections of one proxy share (the pool of
connections to destination proxies, the exchanges' shared state, the tasks that open
connections). A client connection the outbound listener finds to speak HTTP/1 is
handed over to a `ClientConnection` for the rest of its life: its protocol (a
`Half`, mesh.proxy.relay) passes every transport event on. Those events, the events
of the `Upstream` serving it (mesh.proxy.pool) and its timers become events for its
`Exchange`, and the commands that come back become calls on the transports, the pool
and the event loop, in order. The machine decides; this module only acts, and a
command it does not know is an error. The only coroutine is opening a new upstream
connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Any, assert_never

from mesh.errors import ConnectError, IdentityError
from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy.balancer import Balancer
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.exchange import Exchange, Phase
from mesh.proxy.exchange_io import (
    CLIENT_EOF,
    UPSTREAM_EOF,
    UPSTREAM_OPENED,
    UPSTREAM_REUSED,
    CancelTimer,
    ClientClosed,
    ClientData,
    Close,
    CloseUpstream,
    Command,
    EndWrite,
    Event,
    OpenUpstream,
    PauseReading,
    PoolUpstream,
    ResumeReading,
    Side,
    StartTimer,
    Timer,
    TimerFired,
    UpstreamClosed,
    UpstreamData,
    UpstreamFailed,
    WriteBufferDrained,
    WriteBufferFull,
    WriteClient,
    WriteUpstream,
)
from mesh.proxy.exchanges import Exchanges, Route
from mesh.proxy.pool import Pool, Upstream

log = logging.getLogger("mesh.proxy.http")

_CLIENT_FULL = WriteBufferFull(Side.CLIENT)
_CLIENT_DRAINED = WriteBufferDrained(Side.CLIENT)
_UPSTREAM_FULL = WriteBufferFull(Side.UPSTREAM)
_UPSTREAM_DRAINED = WriteBufferDrained(Side.UPSTREAM)


class HttpOutbound:
    """What every HTTP client connection of one proxy shares: the pool, the exchanges'
    retry budgets, metric children and settings, and the tasks opening connections."""

    def __init__(self, pool: Pool, metrics: ProxyMetrics, *, request_timeout: float,
                 own_identity: Callable[[], Identity], head_timeout: float = 10.0) -> None:
        self.pool = pool
        self.exchanges = Exchanges(metrics, request_timeout=request_timeout,
                                   head_timeout=head_timeout, own_identity=own_identity)
        self.tasks: set[asyncio.Task[Any]] = set()

    def serve(self, transport: asyncio.Transport, target: ServiceSpec | Route,
              balancer: Balancer | None, *, peer: str) -> ClientConnection:
        """The HTTP side of a client connection, paused; `start` it. `target` is the
        service the client dialled, or, on the outbound listener, a `Route` that finds
        each request's service from its authority (the Host header)."""
        return ClientConnection(self, transport, Exchange(self.exchanges, target, balancer,
                                                          peer=peer))

    def spawn(self, coro: Any, done: Callable[[asyncio.Task[Any]], None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(done)


class ClientConnection:
    """One HTTP client connection (the `Layer` its `Half` hands it over to) and the
    owner of the upstream serving it; its phase is its exchange's."""

    def __init__(self, http: HttpOutbound, transport: asyncio.Transport,
                 exchange: Exchange) -> None:
        self.http, self.transport, self.exchange = http, transport, exchange
        self.upstream: Upstream | None = None
        self.dialling: EndpointSpec | None = None
        self.timers: dict[Timer, asyncio.TimerHandle] = {}

    @property
    def phase(self) -> Phase:
        return self.exchange.phase

    def start(self, held: bytes, *, eof: bool) -> None:
        """Begin with the bytes read before the hand-over (and their end, if it came)."""
        self.handle(ClientData(held))
        if eof:
            self.handle(CLIENT_EOF)

    # -------------------------------------------------------------- events in

    def data_received(self, data: bytes) -> None:
        self.handle(ClientData(data))

    def eof_received(self) -> bool:
        self.handle(CLIENT_EOF)
        return True  # a client that half-closes still gets its response

    def connection_lost(self, exc: Exception | None) -> None:
        self.handle(ClientClosed(str(exc) if exc else ""))

    def pause_writing(self) -> None:
        self.handle(_CLIENT_FULL)

    def resume_writing(self) -> None:
        self.handle(_CLIENT_DRAINED)

    def upstream_data(self, data: bytes) -> None:
        self.handle(UpstreamData(data))

    def upstream_eof(self) -> bool:
        self.handle(UPSTREAM_EOF)
        return self.exchange.phase is Phase.RELAY  # an opaque relay may half-close

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        self.handle(UpstreamClosed(str(exc) if exc else "",
                                   timed_out=isinstance(exc, TimeoutError)))

    def upstream_write_full(self) -> None:
        self.handle(_UPSTREAM_FULL)

    def upstream_write_drained(self) -> None:
        self.handle(_UPSTREAM_DRAINED)

    def _timer_fired(self, timer: Timer) -> None:
        self.timers.pop(timer, None)
        self.handle(TimerFired(timer))

    def _connected(self, task: asyncio.Task[Upstream]) -> None:
        endpoint, self.dialling = self.dialling, None
        if task.cancelled():
            self.handle(UpstreamFailed("the connection attempt was cancelled",
                                       retryable=False))
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, ConnectError | IdentityError):
                log.warning("outbound connect failed unexpectedly endpoint=%s cause=%r",
                            endpoint.address if endpoint else "-", exc)
            self.handle(UpstreamFailed(str(exc), handshake=isinstance(exc, IdentityError)))
            return
        self._bind(task.result())
        self.handle(UPSTREAM_OPENED)

    # -------------------------------------------------------------- commands out

    def handle(self, event: Event) -> None:
        """Give `event` to the exchange and carry out what it answers."""
        follow: Event | None = event
        while follow is not None:
            follow = self.execute(self.exchange.handle(follow, monotonic()))

    def execute(self, commands: list[Command]) -> Event | None:
        """Carry out `commands` in order; returns the event one of them caused at once
        (an idle upstream taken from the pool), to be handled after them."""
        follow: Event | None = None
        for command in commands:
            if isinstance(command, WriteClient):
                self.transport.write(command.data)
            elif isinstance(command, WriteUpstream):
                assert self.upstream is not None
                self.upstream.write(command.data)
            elif isinstance(command, OpenUpstream):
                follow = self._open(command)
            elif isinstance(command, PoolUpstream):
                self.http.pool.put(self._release())
            elif isinstance(command, PauseReading):
                self._reading(command.side, resume=False)
            elif isinstance(command, ResumeReading):
                self._reading(command.side, resume=True)
            elif isinstance(command, StartTimer):
                self.timers[command.timer] = asyncio.get_running_loop().call_later(
                    command.delay, self._timer_fired, command.timer)
            elif isinstance(command, CancelTimer):
                handle = self.timers.pop(command.timer, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(command, CloseUpstream):
                self._release().close()
            elif isinstance(command, EndWrite):
                self._end_write(command.side)
            elif isinstance(command, Close):
                self.transport.close()
            else:
                assert_never(command)
        return follow

    def _open(self, command: OpenUpstream) -> Event | None:
        """An idle connection from the pool, or a new one (the only place one is opened)."""
        pool = self.http.pool
        up = pool.take(Pool.key(command.service, command.endpoint))
        if up is not None:
            self._bind(up)
            return UPSTREAM_REUSED
        self.dialling = command.endpoint
        self.http.spawn(pool.connect(command.service, command.endpoint), self._connected)
        return None

    def _bind(self, up: Upstream) -> None:
        up.serve(self)
        self.upstream = up

    def _release(self) -> Upstream:
        up, self.upstream = self.upstream, None
        assert up is not None
        return up

    def _reading(self, side: Side, *, resume: bool) -> None:
        if side is Side.UPSTREAM:
            assert self.upstream is not None
            if resume:
                self.upstream.resume_reading()
            else:
                self.upstream.pause_reading()
            return
        transport = self.transport
        if not resume:
            transport.pause_reading()
        elif not transport.is_closing():
            transport.resume_reading()

    def _end_write(self, side: Side) -> None:
        if side is Side.UPSTREAM:
            assert self.upstream is not None
            self.upstream.end_write()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
