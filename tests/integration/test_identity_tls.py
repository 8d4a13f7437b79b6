"""Mutual TLS between CertStores over loopback sockets.

Covers the handshake (TLS 1.3, ALPN, identities on both sides), the words of
every failure (wrong identity, unknown anchor on either side, expired
certificate), renewal under open connections, and trust-bundle updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity import ca, tls
from mesh.identity.bundle import TrustBundle
from mesh.identity.certstore import CertStore
from mesh.identity.errors import (
    CertificateExpired,
    PeerIdentityMismatch,
    TrustSetupError,
    UntrustedChain,
)
from mesh.identity.names import Identity
from tests.unit.test_identity_certstore import DOMAIN, Authority, FakeIdentityService

API = Identity("default", "api", DOMAIN)
WEB = Identity("default", "web", DOMAIN)
DEADLINE = 5.0


@pytest.fixture
def east() -> Authority:
    return Authority.new(time.time() - 3600)


@pytest.fixture
def west() -> Authority:
    return Authority.new(time.time() - 3600)


async def new_store(identity: Identity, authority: Authority,
                    trusts: tuple[Authority, ...] = ()) -> tuple[CertStore, FakeIdentityService]:
    """A started store for ``identity`` signed by ``authority``, trusting it and ``trusts``."""
    bundle = TrustBundle((authority.anchor.cert, *(a.anchor.cert for a in trusts)))
    service = FakeIdentityService(authority, time.time, bundle=bundle)
    store = CertStore(identity, service, bundle=bundle)
    await store.start()
    return store, service


@dataclass
class Accepted:
    """What the server side saw of one connection."""

    peer: str
    identity: Identity | None = None
    error: ssl.SSLError | None = None


@dataclass
class Listener:
    """A loopback echo server that checks its peers.

    With ``tls`` the listener handshakes as ``start_server(ssl=tls)`` does; with
    ``context`` each connection looks its context up and handshakes in the
    handler (``start_tls``), so that the test sees the server's handshake errors.
    """

    tls: ssl.SSLContext | None = None
    context: Callable[[], ssl.SSLContext] | None = None
    accepted: asyncio.Queue[Accepted] = field(default_factory=asyncio.Queue)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    port: int = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        seen = Accepted(f"{host}:{port}")
        try:
            if self.context is not None:
                try:
                    await writer.start_tls(self.context())
                except ssl.SSLError as e:
                    seen.error = e
                    await self.accepted.put(seen)
                    return
            seen.identity = tls.check_peer(writer.get_extra_info("ssl_object"), expected=None,
                                           side="client", peer=seen.peer)
            await self.accepted.put(seen)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass  # the client went away; the test reads what it needs from its own side
        finally:
            writer.close()

    async def next(self) -> Accepted:
        return await asyncio.wait_for(self.accepted.get(), DEADLINE)


@contextlib.asynccontextmanager
async def listening(listener: Listener) -> AsyncIterator[Listener]:
    server = await asyncio.start_server(listener._handle, "127.0.0.1", 0, ssl=listener.tls)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()
        if listener.handlers:
            await asyncio.wait_for(asyncio.gather(*listener.handlers, return_exceptions=True),
                                   DEADLINE)


@contextlib.asynccontextmanager
async def dialled(port: int, ctx: ssl.SSLContext
                  ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=API.dns_name),
        DEADLINE)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), DEADLINE)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), DEADLINE)


async def refused(port: int, ctx: ssl.SSLContext) -> ssl.SSLError:
    with pytest.raises(ssl.SSLError) as caught:
        async with dialled(port, ctx):
            pass
    return caught.value


def leaf_serial(writer: asyncio.StreamWriter) -> int:
    return tls.peer_chain(writer.get_extra_info("ssl_object"))[0].serial_number


# -- handshakes that succeed --------------------------------------------------------------


async def test_mutual_tls_between_two_stores(east: Authority) -> None:
    api, _ = await new_store(API, east)
    web, _ = await new_store(WEB, east)
    async with listening(Listener(tls=api.server_context())) as server, \
            dialled(server.port, web.client_context()) as (reader, writer):
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.selected_alpn_protocol() == tls.ALPN == "transport.l5d.io/v1"
        assert sslobj.version() == "TLSv1.3"
        peer = f"127.0.0.1:{server.port}"
        assert tls.check_peer(sslobj, expected=API, side="server", peer=peer) == API
        assert tls.peer_identity(sslobj) == API
        assert [c.subject for c in tls.peer_chain(sslobj)][1:] == [
            east.issuer.cert.subject, east.anchor.cert.subject]
        assert (await server.next()).identity == WEB
        assert await echo(reader, writer, b"ping") == b"ping"


async def test_a_second_connection_to_a_peer_resumes_its_session(east: Authority) -> None:
    api, _ = await new_store(API, east)
    web, _ = await new_store(WEB, east)
    other = Identity("default", "other", DOMAIN)
    async with listening(Listener(tls=api.server_context())) as server:
        resumed = []
        for _ in range(3):
            async with dialled(server.port, web.client_context()) as (reader, writer):
                # A TLS 1.3 ticket arrives after the handshake, with the first reply.
                assert await echo(reader, writer, b"ping") == b"ping"
                sslobj = writer.get_extra_info("ssl_object")
                resumed.append(sslobj.session_reused)
                # Both sides still see and check each other's identity.
                assert tls.check_peer(sslobj, expected=API, side="server",
                                      peer="api") == API
                assert (await server.next()).identity == WEB
        assert resumed == [False, True, True]
        # A session is only offered to the identity it was made with.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=web.client_context(), server_hostname=other.dns_name)
        assert not writer.get_extra_info("ssl_object").session_reused
        writer.close()
        await server.next()


async def test_a_wrong_identity_is_reported_with_both_names(east: Authority) -> None:
    api, _ = await new_store(API, east)
    web, _ = await new_store(WEB, east)
    billing = Identity("payments", "billing", DOMAIN)
    async with listening(Listener(tls=api.server_context())) as server, \
            dialled(server.port, web.client_context()) as (_, writer):
        with pytest.raises(PeerIdentityMismatch) as caught:
            tls.check_peer(writer.get_extra_info("ssl_object"), expected=billing,
                           side="server", peer=f"127.0.0.1:{server.port}")
    until = api.certificates[0].not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert str(caught.value) == (
        f"server 127.0.0.1:{server.port} presented {API}, expected {billing}; "
        f"chain valid until {until}")


# -- handshakes that fail, in words -------------------------------------------------------


async def test_an_untrusted_server_is_explained_with_its_certificate(
        east: Authority, west: Authority) -> None:
    api, _ = await new_store(API, west)
    web, _ = await new_store(WEB, east)
    async with listening(Listener(tls=api.server_context())) as server:
        err = await refused(server.port, web.client_context())
        assert isinstance(err, ssl.SSLCertVerificationError)
        peer = f"127.0.0.1:{server.port}"
        chain = await tls.fetch_peer_leaf("127.0.0.1", server.port, timeout=DEADLINE)
        assert chain[0].serial_number == api.certificates[0].serial_number
        explained = tls.explain_handshake_failure(
            err, side="server", peer=peer, expected=API, bundle=web.bundle,
            diagnose=lambda: chain)
        bare = tls.explain_handshake_failure(
            err, side="server", peer=peer, expected=API, bundle=web.bundle, diagnose=None)
    assert isinstance(explained, UntrustedChain)
    message = str(explained)
    assert message.startswith(f"server {peer} presented {API} (valid from ")
    assert f"expected {API}" in message
    assert west.anchor.cert.subject.rfc4514_string() in message  # the anchor it needs
    assert web.bundle.describe(east.anchor.cert) in message  # the anchors there are
    assert isinstance(bare, UntrustedChain)
    assert f"server {peer} presented a certificate this side does not trust (unable to get " \
        f"local issuer certificate), expected {API}" in str(bare)


async def test_a_failing_diagnosis_still_gives_an_explanation(
        east: Authority, west: Authority) -> None:
    api, _ = await new_store(API, west)
    web, _ = await new_store(WEB, east)
    async with listening(Listener(tls=api.server_context())) as server:
        err = await refused(server.port, web.client_context())

    def unreachable() -> list[x509.Certificate]:
        raise ConnectionRefusedError(111, "Connection refused")

    explained = tls.explain_handshake_failure(
        err, side="server", peer="10.0.0.5:4143", expected=API, bundle=web.bundle,
        diagnose=unreachable)
    assert isinstance(explained, UntrustedChain)
    assert "fetching its certificate to say more failed: ConnectionRefusedError" in str(
        explained)


async def test_an_untrusted_client_is_explained_by_the_server(
        east: Authority, west: Authority) -> None:
    api, _ = await new_store(API, east)
    web, _ = await new_store(WEB, west, trusts=(east,))
    # TLS 1.3: the client's side of the handshake ends before the server judges it,
    # and asyncio sends no alert (CPython gh-98078), so the client sees only EOF.
    async with listening(Listener(context=api.server_context)) as server, \
            dialled(server.port, web.client_context()) as (reader, _):
        seen = await server.next()
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
    assert isinstance(seen.error, ssl.SSLCertVerificationError)
    explained = tls.explain_handshake_failure(
        seen.error, side="client", peer=seen.peer, expected=None, bundle=api.bundle,
        diagnose=None)
    assert isinstance(explained, UntrustedChain)
    assert str(explained).startswith(
        f"client {seen.peer} presented a certificate this side does not trust (unable to "
        "get local issuer certificate), any mesh identity expected; the trust bundle holds "
        f"{api.bundle.describe(east.anchor.cert)}")


async def test_a_peer_alert_says_our_certificate_was_refused(
        east: Authority, west: Authority) -> None:
    """A peer that sends TLS alerts (a blocking server here, rustls in Linkerd)."""
    api, _ = await new_store(API, east)
    web, _ = await new_store(WEB, west, trusts=(east,))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_error: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                api.server_context().wrap_socket(conn, server_side=True)
            except ssl.SSLError as e:
                server_error.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(ssl.SSLError) as caught:
            async with dialled(port, web.client_context()) as (reader, _):
                await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        await asyncio.to_thread(thread.join, DEADLINE)
        listener.close()
    assert server_error and caught.value.reason == "TLSV1_ALERT_UNKNOWN_CA"
    explained = tls.explain_handshake_failure(
        caught.value, side="server", peer=f"127.0.0.1:{port}", expected=API,
        bundle=web.bundle, diagnose=None)
    assert isinstance(explained, UntrustedChain)
    assert str(explained).startswith(
        f"server 127.0.0.1:{port} (expected {API}) refused this workload's certificate: its "
        "trust bundle lacks the anchor")


async def test_an_expired_server_certificate_names_the_clock() -> None:
    old = Authority.new(time.time() - 5 * 86400)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(old.issuer, key.public_key(), API,
                        now=datetime.now(UTC) - timedelta(days=2), lifetime=timedelta(hours=24))
    ctx = tls.server_context(old.bundle)
    tls.load_identity(ctx, ca.cert_pem(leaf) + ca.cert_pem(old.issuer.cert), ca.key_pem(key))
    web, _ = await new_store(WEB, old)
    async with listening(Listener(tls=ctx)) as server:
        err = await refused(server.port, web.client_context())
        assert isinstance(err, ssl.SSLCertVerificationError) and err.verify_code == 10
        peer = f"127.0.0.1:{server.port}"
        chain = await tls.fetch_peer_leaf("127.0.0.1", server.port, timeout=DEADLINE)
    explained = tls.explain_handshake_failure(
        err, side="server", peer=peer, expected=API, bundle=web.bundle, diagnose=lambda: chain)
    assert isinstance(explained, CertificateExpired)
    expired_at = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"server {peer} presented {API}" in str(explained)
    assert f"expired at {expired_at}" in str(explained)
    assert "clock skew" in str(explained)
    bare = tls.explain_handshake_failure(
        err, side="server", peer=peer, expected=API, bundle=web.bundle, diagnose=None)
    assert isinstance(bare, CertificateExpired)
    assert str(bare).startswith(
        f"server {peer} presented a certificate that is expired or not yet valid by this "
        "host's clock (OpenSSL: certificate has expired; now ")
    assert "compare the clocks of both hosts (clock skew)" in str(bare)


# -- renewal and trust bundles under live connections -------------------------------------


async def test_renewal_keeps_open_connections_and_serves_the_new_certificate(
        east: Authority) -> None:
    api, _ = await new_store(API, east)
    web, _ = await new_store(WEB, east)
    server_ctx = api.server_context()
    async with listening(Listener(tls=server_ctx)) as server, \
            dialled(server.port, web.client_context()) as (reader, writer):
        before = leaf_serial(writer)
        assert await echo(reader, writer, b"before") == b"before"
        await api.renew()
        await web.renew()
        renewed = api.certificates[0].serial_number
        assert renewed != before and api.server_context() is server_ctx
        assert await echo(reader, writer, b"after renewal" * 1000) == b"after renewal" * 1000
        async with dialled(server.port, web.client_context()) as (reader2, writer2):
            assert leaf_serial(writer2) == renewed
            assert await echo(reader2, writer2, b"new") == b"new"
        assert await echo(reader, writer, b"still") == b"still"
        assert (await server.next()).identity == (await server.next()).identity == WEB


async def test_trust_bundle_updates_reach_new_connections(
        east: Authority, west: Authority) -> None:
    api, service = await new_store(API, east)
    web, _ = await new_store(WEB, west, trusts=(east,))
    async with listening(Listener(context=api.server_context)) as server:
        async with dialled(server.port, web.client_context()):
            assert isinstance((await server.next()).error, ssl.SSLCertVerificationError)

        contexts = api.server_context(), api.client_context()
        service.bundle = api.bundle.with_anchor(west.anchor.cert)
        await api.renew()
        assert (api.server_context(), api.client_context()) == contexts
        async with dialled(server.port, web.client_context()) as (reader, writer):
            assert (await server.next()).identity == WEB
            assert await echo(reader, writer, b"trusted now") == b"trusted now"

            # Removing the anchor again needs fresh contexts; this connection lives on.
            service.bundle = TrustBundle((east.anchor.cert,))
            await api.renew()
            assert api.server_context() is not contexts[0]
            async with dialled(server.port, web.client_context()):
                assert isinstance((await server.next()).error, ssl.SSLCertVerificationError)
            assert await echo(reader, writer, b"still open") == b"still open"


def test_load_identity_refuses_a_key_of_another_certificate(east: Authority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(east.issuer, key.public_key(), API, now=datetime.now(UTC))
    other = ec.generate_private_key(ec.SECP256R1())
    ctx = tls.server_context(TrustBundle((east.anchor.cert,)))
    with pytest.raises(TrustSetupError, match="key values mismatch"):
        tls.load_identity(ctx, ca.cert_pem(leaf), ca.key_pem(other))
