"""The inbound side under uvloop as well as asyncio.

uvloop starts reading an accepted connection right after the protocol's
``connection_made`` returns, whatever ``pause_reading()`` was called there, so
the ClientHello used to reach the plain protocol before ``start_tls`` could
take over. These tests run the opaque proxy pair with ``--loop uvloop`` (the
service is ``opaque: true``: outbound HTTP detection has its own uvloop race,
see `test_detected_service_answers_promptly`), and an
in-process `Inbound` on both loops: per-connection context selection (a trust
anchor dropped from the context stops being trusted for new connections),
handshake failures counted and logged with the peer and explained in words, the
header timeout, and the transport header arriving in the same read as the end
of the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mesh.identity import tls as mtls
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy.inbound import Inbound, InboundPolicy
from mesh.proxy.relay import FlowMetrics
from mesh.proxy.transport_header import TransportHeader
from tests.cluster import wait_for
from tests.meshproxy import (
    DOMAIN,
    ProxyProcess,
    Trust,
    call,
    echo_app,
    endpoint,
    free_port,
    service,
    services_file,
    start_proxy,
)

UVLOOP = ("--loop", "uvloop")
DETECTED = "127.0.1.21"
"""A service without ``opaque: true``: the outbound side reads to detect HTTP first."""


class Pair:
    def __init__(self, trust: Trust, app_port: int, server: ProxyProcess,
                 client: ProxyProcess, service: tuple[str, int]) -> None:
        self.trust, self.app_port = trust, app_port
        self.server, self.client, self.service = server, client, service

    def call(self, payload: bytes, timeout: float = 5, *,
             service: tuple[str, int] | None = None) -> bytes:
        return call(service or self.service, payload, timeout)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("uvmesh")
    trust = Trust.create(root)
    app = echo_app()
    app_port = app.server_address[1]
    server = start_proxy(root, "server", {
        "identity": trust.workload("default", "echo"),
        "inbound": {"listen": f"127.0.0.1:{free_port()}",
                    "authorized": [Identity("default", "client", DOMAIN).dns_name]},
        "detectTimeout": "1s"}, extra=UVLOOP)
    vip = ("127.0.1.20", free_port())
    inbound = server.inbound[1]
    discovery = services_file(
        root / "services.yaml",
        service("echo", f"{vip[0]}:{vip[1]}", endpoint(inbound, app_port, "echo"),
                opaque=True),
        service("detected", f"{DETECTED}:{vip[1]}", endpoint(inbound, app_port, "echo")))
    try:
        client = start_proxy(root, "client", {
            "identity": trust.workload("default", "client"), "discovery": str(discovery)},
            extra=UVLOOP)
    except BaseException:
        server.stop()
        raise
    try:
        yield Pair(trust, app_port, server, client, vip)
    finally:
        client.stop()
        server.stop()
        app.shutdown()
        app.server_close()


def _closed(sock: socket.socket | ssl.SSLSocket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def test_both_proxies_run_uvloop(pair: Pair) -> None:
    for proxy in (pair.server, pair.client):
        maps = Path(f"/proc/{proxy.proc.pid}/maps")
        assert "uvloop/loop." in maps.read_text(), f"{proxy.name} did not load uvloop"


def test_relay_round_trip(pair: Pair) -> None:
    assert pair.call(b"hello uvloop") == b"hello uvloop"
    big = bytes(range(256)) * 4096  # 1 MiB both ways
    assert pair.call(big, timeout=20) == big
    client_id = Identity("default", "client", DOMAIN).dns_name
    assert pair.server.metric("inbound_tcp_authz_allow_total", client_id=client_id) >= 2


def test_many_connections_in_parallel(pair: Pair) -> None:
    results: list[bytes] = []

    def one(i: int) -> None:
        results.append(pair.call(b"conn %d" % i, timeout=10))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == sorted(b"conn %d" % i for i in range(20))


def test_detected_service_answers_promptly(pair: Pair) -> None:
    payload = b"not http, decided at once"
    assert pair.call(payload, timeout=3, service=(DETECTED, pair.service[1])) == payload


def test_plain_bytes_are_refused_as_tls_handshake(pair: Pair) -> None:
    before = pair.server.metric("proxy_protocol_errors_total", cause="tls-handshake")
    with socket.create_connection(pair.server.inbound, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed(s)
        port = s.getsockname()[1]
    wait_for(lambda: pair.server.metric("proxy_protocol_errors_total", cause="tls-handshake")
             > before, what="handshake failure counted")
    wait_for(lambda: any(f"peer=127.0.0.1:{port} " in line and "cause=tls-handshake" in line
                         for line in pair.server.output), what="a log line naming the peer")
    assert not any("Traceback" in line for line in pair.server.output)
    assert pair.call(b"still fine") == b"still fine"


def test_unauthorized_identity_is_denied(pair: Pair) -> None:
    intruder = pair.trust.workload("default", "intruder")
    ctx = mtls.client_context(TrustBundle.from_pem(pair.trust.bundle.read_bytes()))
    mtls.load_identity(ctx, Path(intruder["certFile"]).read_bytes(),
                       Path(intruder["keyFile"]).read_bytes())
    before = pair.server.metric("inbound_tcp_authz_deny_total")
    raw = socket.create_connection(pair.server.inbound, timeout=5)
    with ctx.wrap_socket(raw, server_hostname="echo") as s:
        s.sendall(TransportHeader(port=pair.app_port).encode() + b"hello")
        assert _closed(s)
    wait_for(lambda: pair.server.metric("inbound_tcp_authz_deny_total") > before,
             what="denial counted")
    assert pair.call(b"ok") == b"ok"


# --- in-process: the same Inbound on both loops --------------------------------------


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop_name: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(main, 30))


class Setup:
    """Two trust anchors, a server identity under the first, a client under each."""

    def __init__(self, root: Path) -> None:
        self.a, self.b = Trust.create(root / "a"), Trust.create(root / "b")
        self.bundle_a = TrustBundle.from_pem(self.a.bundle.read_bytes())
        self.bundle_ab = TrustBundle.from_pem(self.a.bundle.read_bytes() +
                                              self.b.bundle.read_bytes())
        self.server_files = self.a.workload("default", "echo")
        self.client_a = self.a.workload("default", "client")
        self.client_b = self.b.workload("default", "client")

    def server_context(self, bundle: TrustBundle) -> ssl.SSLContext:
        ctx = mtls.server_context(bundle)
        mtls.load_identity(ctx, Path(self.server_files["certFile"]).read_bytes(),
                           Path(self.server_files["keyFile"]).read_bytes())
        return ctx

    def client_context(self, files: dict[str, Any] | None) -> ssl.SSLContext:
        ctx = mtls.client_context(self.bundle_ab)
        if files is not None:
            mtls.load_identity(ctx, Path(files["certFile"]).read_bytes(),
                               Path(files["keyFile"]).read_bytes())
        return ctx


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("anchors"))


class Running:
    def __init__(self, inbound: Inbound, metrics: ProxyMetrics, port: int,
                 app_port: int) -> None:
        self.inbound, self.metrics, self.port, self.app_port = inbound, metrics, port, app_port

    def count(self, cause: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "proxy_protocol_errors_total", {"direction": "inbound", "cause": cause})
        return value or 0.0

    def allowed(self) -> float:
        return sum(s.value for m in self.metrics.registry.collect()
                   if m.name == "inbound_tcp_authz_allow" for s in m.samples
                   if s.name.endswith("_total"))

    async def call(self, ctx: ssl.SSLContext, payload: bytes, *,
                   header: bool = True) -> bytes:
        """Handshake, send header and payload in one write, read until EOF or len(payload)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx,
                                                       server_hostname="echo")
        try:
            if header:
                writer.write(TransportHeader(port=self.app_port).encode() + payload)
            got = b""
            while len(got) < len(payload):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
            return got
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def refused(self, ctx: ssl.SSLContext) -> bool:
        """The connection ends (alert, reset or EOF) without relaying a byte."""
        try:
            return await self.call(ctx, b"refuse me") == b""
        except (ssl.SSLError, ConnectionError):
            return True


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _serve(context: Callable[[], ssl.SSLContext],
                 header_timeout: float = 10.0) -> tuple[Running, list[asyncio.AbstractServer]]:
    loop = asyncio.get_running_loop()
    metrics = ProxyMetrics()
    m = metrics
    flows = FlowMetrics(opened=m.tcp_open, closed=m.tcp_close, open_now=m.tcp_open_connections,
                        read=m.tcp_read_bytes, written=m.tcp_write_bytes,
                        duration=m.tcp_connection_duration)
    inbound = Inbound(InboundPolicy(app_host="127.0.0.1", authorized=frozenset({"*"}),
                                    handshake_timeout=5, header_timeout=header_timeout),
                      context, metrics, flows)
    app = await asyncio.start_server(_echo, "127.0.0.1", 0)
    server = await loop.create_server(inbound.protocol, "127.0.0.1", 0)
    running = Running(inbound, metrics, server.sockets[0].getsockname()[1],
                      app.sockets[0].getsockname()[1])
    return running, [server, app]


async def _close(servers: list[asyncio.AbstractServer]) -> None:
    for s in servers:
        s.close()
        await s.wait_closed()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_removed_anchor_is_refused_for_new_connections(setup: Setup, loop_name: str) -> None:
    contexts = {"now": setup.server_context(setup.bundle_ab)}
    served: list[ssl.SSLContext] = []

    def current() -> ssl.SSLContext:
        served.append(contexts["now"])
        return contexts["now"]

    async def main() -> None:
        running, servers = await _serve(current)
        try:
            from_b = setup.client_context(setup.client_b)
            from_a = setup.client_context(setup.client_a)
            assert await running.call(from_b, b"b while trusted") == b"b while trusted"
            assert await running.call(from_a, b"a while trusted") == b"a while trusted"
            assert running.allowed() == 2
            # The anchor of b is removed: the store hands out a context without it.
            contexts["now"] = setup.server_context(setup.bundle_a)
            before = running.count("tls-handshake")
            assert await running.refused(from_b)
            assert await running.call(from_a, b"a still fine") == b"a still fine"
            assert running.count("tls-handshake") == before + 1
            assert running.allowed() == 3
            assert served[-1] is contexts["now"] and served[0] is not contexts["now"]
            assert len(served) == 4  # one context per connection
        finally:
            await _close(servers)

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_handshake_failures_are_counted_and_name_the_peer(
        setup: Setup, loop_name: str, caplog: pytest.LogCaptureFixture) -> None:
    ctx = setup.server_context(setup.bundle_a)

    async def main() -> None:
        running, servers = await _serve(lambda: ctx)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            port = writer.get_extra_info("sockname")[1]
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await reader.read() == b""
            writer.close()
            assert await running.refused(setup.client_context(None))
            for _ in range(100):
                if running.count("tls-handshake") >= 2:
                    break
                await asyncio.sleep(0.02)
            assert running.count("tls-handshake") == 2
            lines = [r.getMessage() for r in caplog.records
                     if r.name == "mesh.proxy.inbound"]
            assert sum(f"peer=127.0.0.1:{port} " in line and "cause=tls-handshake" in line
                       and f"client 127.0.0.1:{port} sent plain-text HTTP, not TLS" in line
                       for line in lines) == 1, lines
            # The client without a certificate is told of in words, not OpenSSL's codes.
            assert sum("cause=tls-handshake" in line and "presented no certificate; meshed "
                       "clients must present their workload certificate" in line
                       for line in lines) == 1, lines
            assert await running.call(setup.client_context(setup.client_a), b"ok") == b"ok"
        finally:
            await _close(servers)

    caplog.set_level(logging.INFO, logger="mesh.proxy.inbound")
    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_header_timeout(setup: Setup, loop_name: str) -> None:
    ctx = setup.server_context(setup.bundle_a)

    async def main() -> None:
        running, servers = await _serve(lambda: ctx, header_timeout=0.3)
        try:
            client = setup.client_context(setup.client_a)
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port,
                                                           ssl=client, server_hostname="echo")
            writer.write(b"transport.l5d")  # then nothing
            started = asyncio.get_running_loop().time()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await reader.read() == b""
            assert asyncio.get_running_loop().time() - started < 5
            writer.close()
            assert running.count("header-timeout") == 1
        finally:
            await _close(servers)

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_big_transfer_and_early_bytes(setup: Setup, loop_name: str) -> None:
    """The header and data sent with the client's Finished reach the application."""
    ctx = setup.server_context(setup.bundle_a)

    async def main() -> None:
        running, servers = await _serve(lambda: ctx)
        try:
            client = setup.client_context(setup.client_a)
            big = os.urandom(1 << 20)
            assert await running.call(client, big) == big
            results = await asyncio.gather(*(running.call(client, b"n%d" % i)
                                             for i in range(30)))
            assert results == [b"n%d" % i for i in range(30)]
        finally:
            await _close(servers)

    run_on(loop_name, main())
