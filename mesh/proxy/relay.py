"""Relaying bytes between two transports, with back-pressure and accounting.

A relayed connection is two `Half` protocols, each forwarding what it reads to
the other's transport. When a transport's write buffer fills
(``pause_writing``), the *other* side stops reading until it drains, so a slow
reader bounds the memory a connection can hold. Bytes read before the other
side exists (a transport header being parsed, an upstream still connecting)
are held in ``pending`` with reading paused.

Accounting lives in one `Flow` per relayed connection and reaches the metric
families once, when the flow ends, so the hot path touches no labels.

An accepted connection found to speak a protocol the proxy understands (HTTP/1) is
handed over to that protocol's `Layer` instead of being relayed: its `Half` stays
its transport's protocol and passes every event on.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("mesh.proxy")

Labels = dict[str, str]
E = TypeVar("E", bound=BaseException)


class Flow:
    """One relayed connection: its two halves, byte counts and end-of-life."""

    __slots__ = ("_on_close", "client", "closed", "labels", "opened", "server",
                 "upstream_labels", "waiter")

    def __init__(self, labels: Labels, on_close: Callable[[Flow, BaseException | None], None]
                 ) -> None:
        self.labels = labels
        self.upstream_labels: Labels | None = None
        self.opened = time.monotonic()
        self.closed = False
        self._on_close = on_close
        self.client = Half(self)
        self.server = Half(self)
        self.client.peer, self.server.peer = self.server, self.client
        self.waiter: asyncio.Future[Any] | None = None
        """Set while the flow is being set up; a close fails it, so setup stops waiting."""

    def close(self, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc or 'EOF'}"))
        for half in (self.client, self.server):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.close()
        self._on_close(self, exc)


class Layer(Protocol):
    """What takes a connection over from its `Half` (mesh.proxy.http's HTTP layer)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class HeadReader(Protocol):
    """What reads a connection's first bytes before it is relayed or handed over
    (a transport header, protocol detection)."""

    def feed(self, data: bytes) -> None: ...


class Buffered:
    """A `HeadReader` that keeps what it is fed, for a reader that comes later."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)


class Phase(enum.Enum):
    RELAY = "relay"
    """Reads are relayed to the peer (held while it is not connected yet)."""
    HOLD = "hold"
    """Reads are held in ``pending``, with reading paused, until the flow is routed."""
    HEAD = "head"
    """Reads go to ``head``, the `HeadReader` of the connection's first bytes."""
    HANDED_OVER = "handed over"
    """The connection is its `layer`'s: every transport event goes there."""


class Half(asyncio.Protocol):
    """One side of a flow: what it reads is written to its peer."""

    __slots__ = ("eof", "flow", "head", "layer", "observe", "on_connected", "peer",
                 "pending", "phase", "read_bytes", "rewrite", "transport")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.peer: Half | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.read_bytes = 0
        self.eof = False
        self.head: HeadReader | None = None
        """In `Phase.HEAD`, where reads go instead of to the peer."""
        self.observe: Callable[[bytes], None] | None = None
        """Sees a copy of every byte relayed from this side (HTTP metrics)."""
        self.rewrite: Callable[[bytes], bytes] | None = None
        """Turns what this side reads into what its peer is sent (the gateway's
        Forwarded header); it deals with its own errors."""
        self.on_connected: Callable[[Half], None] | None = None
        """Called once the transport is there (an accepted connection's routing)."""
        self.phase = Phase.RELAY
        self.layer: Layer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        if self.on_connected is not None:
            self.on_connected(self)

    def hold_reads(self) -> None:
        """Hold what is read from now on (`Phase.HOLD`) until `start_relaying`."""
        self.head = None
        self.phase = Phase.HOLD

    def read_head(self, reader: HeadReader) -> None:
        """Give what is read from now on to `reader` (`Phase.HEAD`)."""
        self.head = reader
        self.phase = Phase.HEAD

    def hand_over(self, layer: Layer) -> None:
        """Give the connection to `layer` for the rest of its life (it was not relayed)."""
        self.layer = layer
        self.head = None
        self.phase = Phase.HANDED_OVER

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is Phase.HANDED_OVER and self.layer is not None:
            self.layer.data_received(data)
            return
        self.read_bytes += len(data)
        if phase is Phase.HEAD and self.head is not None:
            self.head.feed(data)
            return
        if phase is Phase.HOLD:
            self.hold(data)
            return
        if self.rewrite is not None:
            data = self.rewrite(data)
            if not data:
                return
        if self.observe is not None:
            self.observe(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.hold(data)

    def hold(self, data: bytes) -> None:
        """Keep ``data`` for the peer, and stop reading until the peer is there."""
        if data:
            self.pending.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def start_relaying(self) -> None:
        """Send what was held to the peer and let bytes flow both ways."""
        self.head = None
        self.phase = Phase.RELAY
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if self.pending:
            held = b"".join(self.pending)
            self.pending.clear()
            if self.rewrite is not None:
                held = self.rewrite(held)
            if self.observe is not None:
                self.observe(held)
            peer.transport.write(held)
        if self.eof:
            self._forward_eof()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.phase is Phase.HANDED_OVER and self.layer is not None:
            return self.layer.eof_received()
        self.eof = True
        if self.phase is Phase.RELAY and self.peer is not None and \
                self.peer.transport is not None:
            self._forward_eof()
        # Keeping a half-closed transport open is only possible without TLS.
        return self.transport is not None and self.transport.can_write_eof()

    def _forward_eof(self) -> None:
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.eof or not peer.transport.can_write_eof():
            # asyncio's TLS transports cannot half-close, so an end of input
            # ends the flow; close() still delivers what is buffered.
            self.flow.close()
        else:
            peer.transport.write_eof()

    def pause_writing(self) -> None:
        if self.phase is Phase.HANDED_OVER and self.layer is not None:
            self.layer.pause_writing()
        elif self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.phase is Phase.HANDED_OVER and self.layer is not None:
            self.layer.resume_writing()
            return
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.phase is Phase.RELAY and \
                not peer.transport.is_closing():
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is Phase.HANDED_OVER and self.layer is not None:
            self.layer.connection_lost(exc)
        else:
            self.flow.close(exc)
        # The transport and this protocol refer to each other (and the transport holds
        # its TLS object and buffers, ~300 KiB): let go of it now, so it is freed at
        # once rather than at the next full collection of reference cycles.
        self.transport = None
        self.layer = None
        self.head = None
        self.observe = self.rewrite = self.on_connected = None
        self.pending = []


def release(exc: E) -> E:
    """`exc` without its tracebacks (and those of its causes), returned.

    A failed TLS handshake's exception is referenced by the protocol that failed
    (its waiter), and its traceback's frames reference that protocol: a cycle that
    holds the connection's TLS object and buffers (~300 KiB) until the next full
    collection. Once the exception has been told, its frames are of no use.
    """
    seen: BaseException | None = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return exc


def errno_label(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return ""


class FlowMetrics:
    """Records a flow's life in the TCP families when it ends.

    prometheus-client's ``labels()`` costs ~17 µs (it checks and sorts the
    labels under a lock), and a flow touched it seven times per side: each
    label set's children are looked up once and kept. They live as long as the
    families keep them anyway (for ever), so this adds no series, only a key.
    """

    def __init__(self, *, opened: Counter, closed: Counter, open_now: Gauge, read: Counter,
                 written: Counter, duration: Histogram) -> None:
        self.opened, self.closed, self.open_now = opened, closed, open_now
        self.read, self.written, self.duration = read, written, duration
        self._series: dict[tuple[tuple[str, str], ...], _FlowSeries] = {}
        self._ends: dict[tuple[tuple[tuple[str, str], ...], str], _FlowEnd] = {}

    def _of(self, key: tuple[tuple[str, str], ...]) -> _FlowSeries:
        series = self._series.get(key)
        if series is None:
            labels = dict(key)
            series = self._series[key] = _FlowSeries(
                self.opened.labels(**labels), self.open_now.labels(**labels),
                self.read.labels(**labels), self.written.labels(**labels))
        return series

    def open(self, labels: Labels) -> None:
        series = self._of(tuple(labels.items()))
        series.opened.inc()
        series.open_now.inc()

    def close(self, flow: Flow, exc: BaseException | None) -> None:
        err = errno_label(exc)
        ms = (time.monotonic() - flow.opened) * 1000
        for labels, half, other in ((flow.labels, flow.client, flow.server),
                                    (flow.upstream_labels, flow.server, flow.client)):
            if labels is None:
                continue
            key = tuple(labels.items())
            series = self._of(key)
            series.open_now.dec()
            series.read.inc(half.read_bytes)
            series.written.inc(other.read_bytes)
            end = self._ends.get((key, err))
            if end is None:
                end = self._ends[(key, err)] = _FlowEnd(
                    self.closed.labels(**labels, errno=err),
                    self.duration.labels(**labels, errno=err))
            end.closed.inc()
            end.duration.observe(ms)


class _FlowSeries:
    __slots__ = ("open_now", "opened", "read", "written")

    def __init__(self, opened: Counter, open_now: Gauge, read: Counter,
                 written: Counter) -> None:
        self.opened, self.open_now, self.read, self.written = opened, open_now, read, written


class _FlowEnd:
    __slots__ = ("closed", "duration")

    def __init__(self, closed: Counter, duration: Histogram) -> None:
        self.closed, self.duration = closed, duration


def describe(transport: asyncio.BaseTransport | None, key: str = "peername") -> str:
    info: Any = transport.get_extra_info(key) if transport is not None else None
    if isinstance(info, tuple) and len(info) >= 2:
        host = f"[{info[0]}]" if ":" in str(info[0]) else info[0]
        return f"{host}:{info[1]}"
    return "?"
