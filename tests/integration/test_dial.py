"""The dial path (`mesh.proxy.dial.Dialer`) in-process, on asyncio and uvloop, against
TLS servers on 127.0.0.1: what `open` proves and sends, the typed and worded errors
it raises, and how `connect_first` moves through endpoints and reports each attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mesh.errors import ConnectError, IdentityError
from mesh.identity import tls as mtls
from mesh.identity.bundle import TrustBundle
from mesh.identity.ca import IssuerDir
from mesh.identity.errors import CertificateExpired, PeerIdentityMismatch
from mesh.identity.names import Identity
from mesh.proxy.balancer import Balancer, EndpointState, Pick
from mesh.proxy.dial import CALLER_LEFT, Connected, Dialer, DialError, Unreachable
from mesh.proxy.discovery import EndpointSpec
from mesh.proxy.relay import Flow
from mesh.proxy.transport_header import NEED_DATA, HeaderDecoder, TransportHeader
from tests.meshproxy import DOMAIN, Trust, free_port

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
NOW = dt.datetime.now(dt.UTC)
DEADLINE = 10.0
WEB = Identity("default", "web", DOMAIN)
HEADER = TransportHeader(port=8080, name=f"web.default.svc.{DOMAIN}")


def run_on(loop_name: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(main, 30))


class Certificates:
    """One trust domain whose anchor dates from five days ago, and its files."""

    def __init__(self, root: Path) -> None:
        issuers = IssuerDir(root / "trust")
        issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=60),
                     issuer_lifetime=dt.timedelta(days=30), now=NOW - dt.timedelta(days=5))
        self.trust = Trust(root, issuers)
        self.bundle = TrustBundle.from_pem(self.trust.bundle.read_bytes())
        self.client = self.context(mtls.client_context, self.trust.workload("default", "client"))

    def context(self, kind: Callable[[TrustBundle], ssl.SSLContext],
                files: dict[str, Any]) -> ssl.SSLContext:
        ctx = kind(self.bundle)
        mtls.load_identity(ctx, Path(files["certFile"]).read_bytes(),
                           Path(files["keyFile"]).read_bytes())
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("dial"))


@dataclass
class Server:
    """A TLS server that reads one transport header per connection."""

    port: int
    headers: asyncio.Queue[TransportHeader | None] = field(default_factory=asyncio.Queue)

    async def header(self) -> TransportHeader | None:
        """The next connection's header; None when it closed without one."""
        return await asyncio.wait_for(self.headers.get(), DEADLINE)


@contextlib.asynccontextmanager
async def serving(ctx: ssl.SSLContext) -> AsyncIterator[Server]:
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        decoder = HeaderDecoder()
        event: object = NEED_DATA
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while event is NEED_DATA and (data := await reader.read(65536)):
                decoder.receive_data(data)
                event = decoder.next_event()
        await server.headers.put(event if isinstance(event, TransportHeader) else None)
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    server = Server(listener.sockets[0].getsockname()[1])
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()
        if handlers:
            await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), DEADLINE)


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.made = 0
        self.lost = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost += 1


def spec(port: int, identity: Identity | None = WEB, priority: int = 0) -> EndpointSpec:
    return EndpointSpec(address=f"127.0.0.1:{port}", target_port=8080,
                        identity=identity.dns_name if identity is not None else None,
                        priority=priority)


def server_of(certs: Certificates, sa: str, **leaf: Any) -> ssl.SSLContext:
    return certs.context(mtls.server_context, certs.trust.workload("default", sa, **leaf))


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_open_proves_the_identity_and_sends_the_header(certs: Certificates,
                                                      loop_name: str) -> None:
    async def main() -> None:
        async with serving(server_of(certs, "web")) as server:
            dialer = Dialer(lambda: certs.client, timeout=DEADLINE)
            proto = Recorder()
            assert await dialer.open(proto, spec(server.port), HEADER) == WEB
            assert await server.header() == HEADER
            assert proto.made == 1

    run_on(loop_name, main())


class Kept(Recorder):
    """Keeps its transport, to look at the socket the dialer made."""

    transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport

    def user_timeout_ms(self) -> int:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        value: int = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        self.transport.close()
        return value


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_dialled_connection_gives_up_on_a_peer_silent_for_the_connect_timeout(
        certs: Certificates, loop_name: str) -> None:
    """A pooled connection into a partition gets no reset: the kernel must end it."""
    async def main() -> None:
        async with serving(server_of(certs, "web")) as server:
            dialer = Dialer(lambda: certs.client, timeout=1.5)
            meshed, plain = Kept(), Kept()
            await dialer.open(meshed, spec(server.port), HEADER)
            assert meshed.user_timeout_ms() == 1500
            await dialer.open(plain, spec(server.port, identity=None), HEADER)
            assert plain.user_timeout_ms() == 1500

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_an_expired_server_is_explained_with_its_dates(certs: Certificates,
                                                      loop_name: str) -> None:
    async def main() -> None:
        ctx = server_of(certs, "web", now=NOW - dt.timedelta(days=2),
                        lifetime=dt.timedelta(days=1))
        async with serving(ctx) as server:
            dialer = Dialer(lambda: certs.client, timeout=DEADLINE)
            proto = Recorder()
            with pytest.raises(CertificateExpired) as caught:
                await dialer.open(proto, spec(server.port), HEADER)
            assert proto.made == 0
        message = str(caught.value)
        assert message.startswith(f"server 127.0.0.1:{server.port} presented {WEB} (valid "
                                  "from ")
        assert f"expected {WEB}" in message and "expired at" in message
        assert "clock skew" in message

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_wrong_identity_ends_the_attempt_not_the_protocol(certs: Certificates,
                                                          loop_name: str) -> None:
    other = Identity("default", "other", DOMAIN)

    async def main() -> None:
        async with serving(server_of(certs, "web")) as server:
            dialer = Dialer(lambda: certs.client, timeout=DEADLINE)
            proto = Recorder()
            with pytest.raises(PeerIdentityMismatch, match=f"presented {WEB}, expected "
                               f"{other}"):
                await dialer.open(proto, spec(server.port, other), HEADER)
            assert await server.header() is None  # closed before the header went out
            # The protocol saw the connection made but never lost: a flow lives on.
            assert (proto.made, proto.lost) == (1, 0)

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_unreachable_and_unmeshed_endpoints(certs: Certificates, loop_name: str) -> None:
    async def main() -> None:
        dead = free_port()
        dialer = Dialer(lambda: certs.client, timeout=DEADLINE)
        with pytest.raises(ConnectError, match=f"127.0.0.1:{dead} unreachable"):
            await dialer.open(Recorder(), spec(dead), HEADER)
        plain = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = plain.sockets[0].getsockname()[1]
        try:
            assert await dialer.open(Recorder(), spec(port, None), HEADER) is None
            meshed_only = Dialer(lambda: certs.client, timeout=DEADLINE, plain=False)
            with pytest.raises(IdentityError, match="has no identity"):
                await meshed_only.open(Recorder(), spec(port, None), HEADER)
        finally:
            plain.close()
            await plain.wait_closed()

    run_on(loop_name, main())


@dataclass
class Attempts:
    """What `connect_first` was given and told."""

    balancer: Balancer
    failures: list[tuple[str, DialError]] = field(default_factory=list)
    flow: Flow = field(default_factory=lambda: Flow({}, lambda _flow, _exc: None))

    def choose(self, tried: Sequence[EndpointState]) -> Pick | str:
        return self.balancer.pick(avoid=tried) or "no endpoints"

    def failed(self, endpoint: EndpointSpec, e: DialError) -> None:
        self.failures.append((endpoint.address, e))


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_connect_first_moves_on_to_the_next_endpoint(certs: Certificates,
                                                    loop_name: str) -> None:
    async def main() -> None:
        async with serving(server_of(certs, "web")) as server:
            dead = free_port()
            # The dead endpoint is preferred (group 0); the live one is the fallback.
            attempts = Attempts(Balancer([spec(dead), spec(server.port, priority=1)]))
            dialer = Dialer(lambda: certs.client, timeout=DEADLINE)
            result = await dialer.connect_first(attempts.flow, attempts.choose,
                                                lambda ep: HEADER, failed=attempts.failed)
            assert isinstance(result, Connected) and result.identity == WEB
            assert result.pick.endpoint.spec.address == f"127.0.0.1:{server.port}"
            assert [(address, type(e)) for address, e in attempts.failures] == [
                (f"127.0.0.1:{dead}", ConnectError)]
            assert attempts.flow.server.transport is not None
            assert await server.header() == HEADER
            attempts.flow.close()

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_connect_first_gives_up_or_stops_for_the_caller(certs: Certificates,
                                                       loop_name: str) -> None:
    async def main() -> None:
        dead = free_port()
        dialer = Dialer(lambda: certs.client, timeout=DEADLINE)
        attempts = Attempts(Balancer([spec(dead)]))
        result = await dialer.connect_first(attempts.flow, attempts.choose,
                                            lambda ep: HEADER, failed=attempts.failed)
        assert isinstance(result, Unreachable) and len(attempts.failures) == 3
        assert str(result).startswith(f"no endpoint answered after 3 attempts; last: "
                                      f"127.0.0.1:{dead} ({WEB}): 127.0.0.1:{dead} unreachable")
        # A refusal from `choose` comes back as it is.
        empty = Attempts(Balancer([]))
        assert await dialer.connect_first(empty.flow, empty.choose, lambda ep: HEADER,
                                          failed=empty.failed) == "no endpoints"
        # A caller that leaves during an attempt stops the loop there.
        leaving = Attempts(Balancer([spec(dead)]))

        def failed_and_left(endpoint: EndpointSpec, e: DialError) -> None:
            leaving.failed(endpoint, e)
            leaving.flow.close()

        assert await dialer.connect_first(leaving.flow, leaving.choose, lambda ep: HEADER,
                                          failed=failed_and_left) is CALLER_LEFT
        assert len(leaving.failures) == 1

    run_on(loop_name, main())
