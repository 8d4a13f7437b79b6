"""Connections from an outbound proxy to destination proxies, for HTTP/1.1: each an
`Upstream` protocol serving one client connection at a time (its `UpstreamOwner`,
mesh.proxy.http), idle in the `Pool` between responses, per endpoint.

A new connection is opened by the proxy's `Dialer` (mesh.proxy.dial): mTLS to the
endpoint's proxy, which must present the endpoint's identity, and then the
transport header (with the caller's assertion when the endpoint is a linked
cluster's gateway); an endpoint outside the mesh gets plain TCP. An idle
connection that hears anything, or is closed by its peer, is dropped.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol, cast

from mesh.proxy.dial import Dialer
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.transport_header import SessionProtocol

IDLE_PER_ENDPOINT = 64

PoolKey = tuple[str, int, int, str | None, str]
"""host, port, target port, identity, transport-header name"""


class UpstreamOwner(Protocol):
    """What an upstream connection tells the client connection it serves."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_eof(self) -> bool:
        """The peer ended its input; True to keep the connection open for writing."""

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def upstream_write_full(self) -> None: ...

    def upstream_write_drained(self) -> None: ...


class Phase(enum.Enum):
    IDLE = "idle"
    """Open and serving nobody: new, or in the pool."""
    SERVING = "serving"
    CLOSED = "closed"


class Upstream(asyncio.Protocol):
    """A connection to a destination proxy (or a plain endpoint), serving one client
    connection at a time and idling in the `Pool` between responses."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.server_id = ""
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.phase = Phase.IDLE
        self.paused = False

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def serve(self, owner: UpstreamOwner) -> None:
        """Serve `owner` until given back to the pool or closed."""
        self.owner = owner
        self.phase = Phase.SERVING

    def release(self) -> None:
        """Serve nobody, reading: paused for a slow client, it must hear a peer's close."""
        self.owner = None
        if not self.closed:
            self.phase = Phase.IDLE
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            self.close()  # an idle connection has nothing to say; it cannot be reused
            return
        owner.upstream_data(data)

    def eof_received(self) -> bool:
        owner = self.owner
        keep = owner is not None and owner.upstream_eof()
        return keep and self.transport is not None and self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_write_full()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_write_drained()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def end_write(self) -> None:
        """Half-close, or close where the transport cannot (TLS): the owner then hears
        of the loss."""
        if self.transport is None:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self.owner = None
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Idle keep-alive connections to destination proxies, per endpoint."""

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer
        self.idle: dict[PoolKey, list[Upstream]] = {}

    @staticmethod
    def key(service: ServiceSpec, ep: EndpointSpec) -> PoolKey:
        """What a connection is for: the endpoint, the identity it proved and the
        transport header it was opened with. The header's name is part of it, since
        a gateway routes a whole connection by that name: a connection opened for one
        mirrored service must never carry a request for another."""
        host, port = ep.host_port
        return host, port, ep.target_port, ep.identity, ep.authority or service.name

    def take(self, key: PoolKey) -> Upstream | None:
        """An idle connection for `key`, if one is still open."""
        idle = self.idle.get(key)
        while idle:
            up = idle.pop()
            if not up.closed and up.transport is not None and not up.transport.is_closing():
                return up
        return None

    async def connect(self, service: ServiceSpec, ep: EndpointSpec) -> Upstream:
        """A new connection to `ep` (`Dialer.open`); raises what that raises."""
        up = Upstream(self.key(service, ep))
        identity = await self.dialer.open(up, ep, self.dialer.header(ep, service,
                                                                     SessionProtocol.HTTP1))
        up.server_id = str(identity) if identity is not None else ""
        return up

    def close_idle(self) -> None:
        """Close every idle connection (at shutdown)."""
        idle, self.idle = self.idle, {}
        for ups in idle.values():
            for up in ups:
                up.close()

    def put(self, up: Upstream) -> None:
        up.release()
        idle = self.idle.setdefault(up.key, [])
        if len(idle) < IDLE_PER_ENDPOINT and not up.closed:
            idle.append(up)
        else:
            up.close()
