"""Memory under connection churn, counted rather than timed.

A client proxy and a server proxy run in this process (real listeners, real
mTLS on 127.0.0.1) in front of a small HTTP application, on uvloop and on
stock asyncio. After a warm-up,
~2,000 connections are opened and closed through the pair in each way a
caller uses it — opaque (a new mTLS connection each), HTTP with
``Connection: close`` and HTTP keep-alive — interleaved with bad input
(garbage and failed handshakes on the inbound port, resets mid-request). Then
what the proxies hold must be what they held after the warm-up: the live
objects of every connection-scoped type (the proxy's own classes, TLS objects,
asyncio tasks), the process's open descriptors, the `tcp_open_connections`
gauges, and the C heap in use (glibc's ``mallinfo2``), where a leak in
OpenSSL or in the ssl module shows: a session copy leaked per resumed
connection (CPython gh-116810) grew it by ~7 KB per connection. The churn runs
with the cyclic garbage collector off, so a connection that is freed only by
it counts as kept: transports in reference cycles held ~300 KiB each until a
full collection, and swung a gateway's heap by 100 MB.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
import yaml

from mesh.config import ProxyConfig
from mesh.memory import heap_in_use
from mesh.proxy.main import Proxy
from mesh.structs import convert
from tests.controlplane import eventually
from tests.meshproxy import Trust, free_port

CHURN = 2000
CONCURRENCY = 16
HEAP_BYTES_PER_CONNECTION = 1024
"""What the C heap may grow by per connection, averaged, with the cyclic collector off
(small Python objects in cycles, and noise; a connection's TLS buffers are ~300 KiB)."""
VIP = "127.0.1.20"


CONNECTION_SCOPED = ("mesh.", "gateway.", "ssl", "asyncio.sslproto", "asyncio.selector_events")
BOUNDED_BY_TIME = {"mesh.proxy.retry._Slice"}
"""A retry budget's window: ten slices at most, however many connections."""


def live_objects() -> collections.Counter[str]:
    """Live objects of connection-scoped types, by type."""
    gc.collect()
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = kind.__dict__.get("__module__")
        name = f"{module}.{kind.__qualname__}"
        if isinstance(module, str) and module.startswith(CONNECTION_SCOPED) and \
                name not in BOUNDED_BY_TIME:
            counts[name] += 1
    counts["asyncio.Task"] = len(asyncio.all_tasks())
    return counts


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class _App(asyncio.Protocol):
    """Answers every request with 200 'ok'; closes when the request says so."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            close = b"connection: close" in head.lower()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" +
                                 (b"Connection: close\r\n" if close else b"") + b"\r\nok")
            if close:
                self.transport.close()
                return


@dataclass
class Pair:
    client: Proxy
    server: Proxy
    inbound: int
    opaque: int
    """The port of the opaque service on VIP; the HTTP service is on the next one."""
    http: int


@contextlib.asynccontextmanager
async def proxy_pair(tmp_path: Path) -> AsyncIterator[Pair]:
    trust = Trust.create(tmp_path)
    loop = asyncio.get_running_loop()
    app = await loop.create_server(_App, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    inbound, opaque, http = free_port(), free_port(), free_port()
    server_id = trust.workload("default", "web")

    def service(name: str, port: int, *, is_opaque: bool) -> dict[str, object]:
        return {"name": f"{name}.default.svc.cluster.local", "address": f"{VIP}:{port}",
                "opaque": is_opaque,
                "endpoints": [{"address": f"127.0.0.1:{inbound}", "targetPort": app_port,
                               "identity": server_id["name"]}]}

    discovery = tmp_path / "services.yaml"
    discovery.write_text(yaml.safe_dump({"services": [
        service("opaque", opaque, is_opaque=True), service("web", http, is_opaque=False)]}))

    def listeners() -> dict[str, object]:
        return {"outbound": {"listen": f"127.0.0.1:{free_port()}"},
                "admin": {"listen": f"127.0.0.1:{free_port()}"}}

    server = Proxy(convert({
        "identity": server_id, **listeners(),
        "inbound": {"listen": f"127.0.0.1:{inbound}", "authorized": ["*"]}}, ProxyConfig))
    client = Proxy(convert({
        "identity": trust.workload("default", "client"), **listeners(),
        "discovery": str(discovery), "detectTimeout": "2s",
        "inbound": {"listen": f"127.0.0.1:{free_port()}", "authorized": ["*"]}}, ProxyConfig))
    await server.start()
    await client.start()
    try:
        yield Pair(client, server, inbound, opaque, http)
    finally:
        await client.stop()
        await server.stop()
        app.close()


async def get(port: int, *, requests: int = 1, close: bool = True) -> None:
    reader, writer = await asyncio.open_connection(VIP, port)
    try:
        for i in range(requests):
            last = close and i == requests - 1
            writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n" +
                         (b"Connection: close\r\n" if last else b"") + b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await reader.readexactly(2) == b"ok"
        if close:
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def bad_input(pair: Pair, n: int) -> None:
    """Garbage and a refused handshake at the inbound port, a reset mid-request, and
    bytes that are not HTTP or a head over the size limit at the HTTP service."""
    _, writer = await asyncio.open_connection("127.0.0.1", pair.inbound)
    writer.write(b"\x16\x03\x01garbage" * 10)
    writer.close()
    plain = ssl.create_default_context()
    plain.check_hostname, plain.verify_mode = False, ssl.CERT_NONE
    # No client certificate: the server refuses it once the client has sent Finished.
    r, w = await asyncio.open_connection("127.0.0.1", pair.inbound, ssl=plain)
    w.write(b"x")
    with contextlib.suppress(ssl.SSLError, OSError):
        assert await r.read() == b""
    w.close()
    sock = socket.create_connection((VIP, pair.http))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\npart")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset
    if n % 2:
        _, writer = await asyncio.open_connection(VIP, pair.http)
        writer.write(b"\x00\x01 not http at all\r\n\r\n" + b"X" * 70000)
        writer.close()
    else:
        # A head over the proxy's limit is answered 400 by the client proxy itself.
        reader, writer = await asyncio.open_connection(VIP, pair.http)
        writer.write(b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 400 ") and b"l5d-proxy-error" in answer, answer[:200]
        writer.close()


async def churn(pair: Pair, total: int) -> None:
    """`total` connections, CONCURRENCY at a time, in every mode, with bad input."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            match i % 4:
                case 0 | 1:
                    await get(pair.opaque)
                case 2:
                    await get(pair.http)
                case _:
                    await get(pair.http, requests=5)
            if i % 100 == 0:
                await bad_input(pair, i // 100)

    async with asyncio.timeout(300):
        await asyncio.gather(*(one(i) for i in range(total)))


async def settled(pair: Pair) -> None:
    """Close the client proxy's idle pooled connections (how many there are depends on
    timing) and wait, bounded, until no connection is open through either proxy."""
    assert pair.client.outbound is not None and pair.client.outbound.http is not None
    pair.client.outbound.http.pool.close_idle()
    await eventually(lambda: not (_open_connections(pair.client) or
                                  _open_connections(pair.server)),
                     timeout=30, what="every connection through the pair closed")


def _open_connections(proxy: Proxy) -> float:
    gauge = proxy.metrics.tcp_open_connections
    return sum(sample.value for metric in gauge.collect() for sample in metric.samples)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_churn_leaves_nothing_behind(loop: str, tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(churn_and_count(tmp_path))


async def churn_and_count(tmp_path: Path) -> None:
    async with proxy_pair(tmp_path) as pair:
        await count_around_churn(pair)


async def count_around_churn(pair: Pair) -> None:
    await churn(pair, 400)  # warm-up: pools, metric children, tickets, allocator arenas
    await settled(pair)
    objects, descriptors = live_objects(), open_descriptors()
    heap = heap_in_use()
    assert heap is not None, "glibc's mallinfo2 is needed to count the C heap"

    # Without the cyclic collector, only what reference counting frees is freed: a
    # connection whose transport (and its TLS object and ~300 KiB of buffers) sat in a
    # reference cycle would be counted here, as it is held in a busy proxy until the
    # next full collection.
    gc.disable()
    try:
        await churn(pair, CHURN)
        await settled(pair)
        per_connection = ((heap_in_use() or 0) - heap) / CHURN
    finally:
        gc.enable()
    assert per_connection < HEAP_BYTES_PER_CONNECTION, (
        f"the C heap grew by {per_connection:.0f} bytes per connection")

    grown = {kind: n - objects[kind] for kind, n in live_objects().items()
             if n > objects[kind]}
    assert grown == {}, f"connection-scoped objects left after {CHURN} connections: {grown}"
    assert open_descriptors() <= descriptors
    sessions = pair.client.workload.client_context().session_stats()  # type: ignore[union-attr]
    assert sessions["hits"] > CHURN // 2, "new connections to the peer should resume TLS"
