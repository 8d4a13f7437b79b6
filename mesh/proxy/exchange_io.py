"""What the HTTP exchange machine (mesh.proxy.exchange) is told and what it asks for.

Events say what happened on a client connection, on the connection to a destination
proxy serving it, or to a timer; commands say what to do about it. Both are frozen
values: a test writes them down as a script, and the asyncio adapter (mesh.proxy.http)
turns each command into one call on a transport, the pool or the event loop.

Each class writes out its ``__init__``: compiled with mypyc, the one a dataclass
generates stays interpreted (about 0.3 us a call, five or more per request), while a
written one is compiled (about 0.05 us).

There is at most one upstream connection per client connection at a time (requests
are answered one after another), so commands about "the upstream" need not name it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mesh.proxy.discovery import EndpointSpec, ServiceSpec


class Side(enum.Enum):
    CLIENT = "client"
    """The application's connection to this proxy."""
    UPSTREAM = "upstream"
    """The connection to the destination proxy (or plain endpoint) serving it."""


class Timer(enum.Enum):
    HEAD = "head"
    """A request head has begun and must be whole in time (slowloris)."""
    REQUEST = "request"
    """The request in flight must be answered in time."""


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class ClientData:
    """Bytes read from the client."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class ClientEof:
    """The client closed its sending side; it may still read."""


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client's connection is gone; `cause` is empty for a clean close."""

    cause: str

    def __init__(self, cause: str) -> None:
        object.__setattr__(self, "cause", cause)


@dataclass(frozen=True, slots=True)
class UpstreamConnected:
    """The upstream asked for with `OpenUpstream` is there: an idle one from the pool
    (`reused`) or a new one."""

    reused: bool

    def __init__(self, reused: bool) -> None:
        object.__setattr__(self, "reused", reused)


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The upstream asked for with `OpenUpstream` could not be opened."""

    cause: str
    retryable: bool = True
    """False when the attempt was called off (the proxy is stopping), not refused."""
    handshake: bool = False
    """The peer was reached but the TLS handshake or its identity check failed."""

    def __init__(self, cause: str, retryable: bool = True, handshake: bool = False) -> None:
        object.__setattr__(self, "cause", cause)
        object.__setattr__(self, "retryable", retryable)
        object.__setattr__(self, "handshake", handshake)


@dataclass(frozen=True, slots=True)
class UpstreamData:
    """Bytes read from the upstream."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class UpstreamEof:
    """The upstream closed its sending side."""


@dataclass(frozen=True, slots=True)
class UpstreamClosed:
    """The upstream's connection is gone; `cause` is empty for a clean close."""

    cause: str
    timed_out: bool
    """The kernel gave up on it: the peer acknowledged nothing sent to it in time
    (mesh.proxy.dial bounds that), so it cannot be reached."""

    def __init__(self, cause: str, *, timed_out: bool = False) -> None:
        object.__setattr__(self, "cause", cause)
        object.__setattr__(self, "timed_out", timed_out)


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer started with `StartTimer` (and not cancelled) went off."""

    timer: Timer

    def __init__(self, timer: Timer) -> None:
        object.__setattr__(self, "timer", timer)


@dataclass(frozen=True, slots=True)
class WriteBufferFull:
    """What was written to `side` is piling up: it does not read fast enough."""

    side: Side

    def __init__(self, side: Side) -> None:
        object.__setattr__(self, "side", side)


@dataclass(frozen=True, slots=True)
class WriteBufferDrained:
    """`side`'s write buffer drained below its low mark."""

    side: Side

    def __init__(self, side: Side) -> None:
        object.__setattr__(self, "side", side)


Event = (ClientData | ClientEof | ClientClosed | UpstreamConnected | UpstreamFailed |
         UpstreamData | UpstreamEof | UpstreamClosed | TimerFired | WriteBufferFull |
         WriteBufferDrained)

CLIENT_EOF = ClientEof()
UPSTREAM_EOF = UpstreamEof()
UPSTREAM_REUSED = UpstreamConnected(reused=True)
UPSTREAM_OPENED = UpstreamConnected(reused=False)


# ------------------------------------------------------------------ commands


@dataclass(frozen=True, slots=True)
class WriteClient:
    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class WriteUpstream:
    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Get a connection to `endpoint` for `service`: an idle one from the pool if there
    is one, else a new one; answered by `UpstreamConnected` or `UpstreamFailed`."""

    service: ServiceSpec
    endpoint: EndpointSpec

    def __init__(self, service: ServiceSpec, endpoint: EndpointSpec) -> None:
        object.__setattr__(self, "service", service)
        object.__setattr__(self, "endpoint", endpoint)


@dataclass(frozen=True, slots=True)
class PoolUpstream:
    """The upstream finished a response cleanly: return it to the pool, idle."""


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close the upstream; it serves this client no more."""


@dataclass(frozen=True, slots=True)
class PauseReading:
    side: Side

    def __init__(self, side: Side) -> None:
        object.__setattr__(self, "side", side)


@dataclass(frozen=True, slots=True)
class ResumeReading:
    side: Side

    def __init__(self, side: Side) -> None:
        object.__setattr__(self, "side", side)


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Fire `TimerFired(timer)` after `delay` seconds (the timer is not running)."""

    timer: Timer
    delay: float

    def __init__(self, timer: Timer, delay: float) -> None:
        object.__setattr__(self, "timer", timer)
        object.__setattr__(self, "delay", delay)


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: Timer

    def __init__(self, timer: Timer) -> None:
        object.__setattr__(self, "timer", timer)


@dataclass(frozen=True, slots=True)
class EndWrite:
    """Half-close `side` (an opaque relay passing an end of input on); a connection that
    cannot half-close (TLS) is closed instead, and its loss arrives as an event."""

    side: Side

    def __init__(self, side: Side) -> None:
        object.__setattr__(self, "side", side)


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client's connection once what was written to it is sent; the machine
    is done. The upstream was already pooled or closed by an earlier command."""

    cause: str

    def __init__(self, cause: str) -> None:
        object.__setattr__(self, "cause", cause)


Command = (WriteClient | WriteUpstream | OpenUpstream | PoolUpstream | CloseUpstream |
           PauseReading | ResumeReading | StartTimer | CancelTimer | EndWrite | Close)

POOL_UPSTREAM = PoolUpstream()
CLOSE_UPSTREAM = CloseUpstream()
PAUSE_CLIENT = PauseReading(Side.CLIENT)
RESUME_CLIENT = ResumeReading(Side.CLIENT)
PAUSE_UPSTREAM = PauseReading(Side.UPSTREAM)
RESUME_UPSTREAM = ResumeReading(Side.UPSTREAM)
