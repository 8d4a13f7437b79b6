"""A proxy pair on 127.0.0.1 relaying opaque TCP over mTLS with the transport
header, and every bad-input case on the inbound side."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.identity import tls as mtls
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
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


class Mesh:
    def __init__(self, trust: Trust, app_port: int, server: ProxyProcess, client: ProxyProcess,
                 service: tuple[str, int]) -> None:
        self.trust, self.app_port = trust, app_port
        self.server, self.client, self.service = server, client, service

    def call(self, payload: bytes, timeout: float = 5) -> bytes:
        return call(self.service, payload, timeout)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    trust = Trust.create(root)
    app = echo_app()
    app_port = app.server_address[1]
    server = start_proxy(root, "server", {
        "identity": trust.workload("default", "echo"),
        "inbound": {"listen": f"127.0.0.1:{free_port()}",
                    "authorized": [Identity("default", "client", DOMAIN).dns_name,
                                   Identity("default", "tester", DOMAIN).dns_name]},
        "detectTimeout": "1s"})
    vip = ("127.0.1.10", free_port())
    inbound = server.inbound[1]
    discovery = services_file(
        root / "services.yaml",
        service("echo", f"{vip[0]}:{vip[1]}", endpoint(inbound, app_port, "echo")),
        service("impostor", f"127.0.1.11:{vip[1]}", endpoint(inbound, app_port, "other")),
        service("refused", f"127.0.1.12:{vip[1]}", endpoint(inbound, free_port(), "echo")))
    client = start_proxy(root, "client", {
        "identity": trust.workload("default", "client"), "discovery": str(discovery)})
    try:
        yield Mesh(trust, app_port, server, client, vip)
    finally:
        client.stop()
        server.stop()
        app.shutdown()


def _tls_to_inbound(mesh: Mesh, identity: dict[str, Any] | None) -> ssl.SSLSocket:
    bundle = TrustBundle.from_pem(mesh.trust.bundle.read_bytes())
    ctx = mtls.client_context(bundle)
    if identity is not None:
        mtls.load_identity(ctx, Path(identity["certFile"]).read_bytes(),
                           Path(identity["keyFile"]).read_bytes())
    raw = socket.create_connection(mesh.server.inbound, timeout=5)
    return ctx.wrap_socket(raw, server_hostname="echo")


def _closed(sock: socket.socket | ssl.SSLSocket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def test_relay_through_proxy_pair(mesh: Mesh) -> None:
    assert mesh.call(b"hello mesh") == b"hello mesh"
    big = bytes(range(256)) * 4096  # 1 MiB both ways
    assert mesh.call(big, timeout=20) == big


def test_metrics_have_linkerd_names_and_labels(mesh: Mesh) -> None:
    mesh.call(b"count me")
    client_id = Identity("default", "client", DOMAIN).dns_name
    server_id = Identity("default", "echo", DOMAIN).dns_name

    def closed_both_sides() -> bool:
        return (mesh.client.metric("tcp_close_total", direction="outbound",
                                   server_id=server_id) >= 1 and
                mesh.server.metric("tcp_close_total", direction="inbound",
                                   client_id=client_id) >= 1)

    wait_for(closed_both_sides, what="closed connections counted")
    assert mesh.client.metric("tcp_open_total", direction="outbound", tls="true",
                              dst_service=f"echo.default.svc.{DOMAIN}") >= 1
    assert mesh.client.metric("tcp_write_bytes_total", direction="outbound") >= len(b"count me")
    assert mesh.server.metric("inbound_tcp_authz_allow_total", client_id=client_id) >= 1
    assert mesh.server.metric("tcp_read_bytes_total", direction="inbound") >= len(b"count me")
    assert "tcp_connection_duration_ms_bucket" in mesh.server.metrics()


def test_plain_bytes_on_inbound_are_refused(mesh: Mesh) -> None:
    before = mesh.server.metric("proxy_protocol_errors_total", cause="tls-handshake")
    with socket.create_connection(mesh.server.inbound, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed(s)
    wait_for(lambda: mesh.server.metric("proxy_protocol_errors_total", cause="tls-handshake")
             > before, what="handshake failure counted")
    assert mesh.call(b"still fine") == b"still fine"


def test_client_without_certificate_is_refused(mesh: Mesh) -> None:
    before = mesh.server.metric("proxy_protocol_errors_total", cause="tls-handshake")
    try:
        with _tls_to_inbound(mesh, None) as s:
            s.sendall(TransportHeader(port=mesh.app_port).encode() + b"x")
            assert _closed(s)
    except (ssl.SSLError, ConnectionError):
        pass  # refused during the handshake: as good as closed
    wait_for(lambda: mesh.server.metric("proxy_protocol_errors_total", cause="tls-handshake")
             > before, what="handshake failure counted")
    assert mesh.call(b"ok") == b"ok"


def test_untrusted_client_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    stranger = Trust.create(tmp_path).workload("default", "tester")
    bundle = TrustBundle.from_pem(mesh.trust.bundle.read_bytes())
    ctx = mtls.client_context(bundle)
    mtls.load_identity(ctx, Path(stranger["certFile"]).read_bytes(),
                       Path(stranger["keyFile"]).read_bytes())
    with socket.create_connection(mesh.server.inbound, timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="echo") as tls:
                tls.sendall(TransportHeader(port=mesh.app_port).encode() + b"x")
                assert _closed(tls)
        except (ssl.SSLError, ConnectionError):
            pass  # refused during the handshake: as good as closed
    assert mesh.call(b"ok") == b"ok"


def test_unauthorized_identity_is_denied(mesh: Mesh) -> None:
    intruder = mesh.trust.workload("default", "intruder")
    before = mesh.server.metric("inbound_tcp_authz_deny_total")
    with _tls_to_inbound(mesh, intruder) as s:
        s.sendall(TransportHeader(port=mesh.app_port).encode() + b"hello")
        assert _closed(s)
    wait_for(lambda: mesh.server.metric("inbound_tcp_authz_deny_total") > before,
             what="denial counted")


@pytest.mark.parametrize("payload", [
    b"not a transport header at all",
    b"transport.l5d.io/v1\r\n\r\n\x00\x02\x00\x00" + b"x" * 16,  # 128 KiB announced
    b"transport.l5d.io/v1\r\n\r\n\x00\x00\x00\x02\x08\xff",  # varint runs off the end
])
def test_malformed_transport_header(mesh: Mesh, payload: bytes) -> None:
    tester = mesh.trust.workload("default", "tester")
    before = mesh.server.metric("proxy_protocol_errors_total", cause="bad-header")
    with _tls_to_inbound(mesh, tester) as s:
        s.sendall(payload)
        assert _closed(s)
    wait_for(lambda: mesh.server.metric("proxy_protocol_errors_total", cause="bad-header")
             > before, what="bad header counted")
    assert mesh.call(b"ok") == b"ok"


def test_slowloris_header_times_out(mesh: Mesh) -> None:
    tester = mesh.trust.workload("default", "tester")
    with _tls_to_inbound(mesh, tester) as s:
        s.sendall(b"transport.l5d")  # then nothing: the 1 s header timeout closes it
        started = time.monotonic()
        assert _closed(s)
        assert time.monotonic() - started < 30
    assert mesh.server.metric("proxy_protocol_errors_total", cause="header-timeout") >= 1


def test_wrong_server_identity_is_refused(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.1.11", mesh.service[1]), timeout=5) as s:
        s.sendall(b"hello")
        assert _closed(s)
    wait_for(lambda: any("presented echo.default.serviceaccount" in line and
                         "expected other.default" in line for line in mesh.client.output),
             what="a log line naming both identities")
    assert mesh.client.metric("proxy_protocol_errors_total", cause="connect-failed") >= 1


def test_refusing_upstream_closes_only_that_connection(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.1.12", mesh.service[1]), timeout=5) as s:
        s.sendall(b"hello")
        assert _closed(s)
    wait_for(lambda: mesh.server.metric("proxy_protocol_errors_total",
                                        cause="app-unreachable") >= 1, what="refusal counted")
    assert mesh.call(b"ok") == b"ok"


def test_sighup_reloads_discovery_and_keeps_last_good_data(mesh: Mesh) -> None:
    import signal

    import yaml

    path = Path(mesh.client.config["discovery"])
    original = path.read_text()
    doc = yaml.safe_load(original)
    late = dict(doc["services"][0], name=f"late.default.svc.{DOMAIN}",
                address=f"127.0.1.13:{mesh.service[1]}")
    path.write_text(yaml.safe_dump({"services": [*doc["services"], late]}))
    mesh.client.proc.send_signal(signal.SIGHUP)

    def late_answers() -> bool:
        with socket.create_connection(("127.0.1.13", mesh.service[1]), timeout=5) as s:
            s.sendall(b"late")
            return s.recv(10) == b"late"

    wait_for(late_answers, what="the service added by reload to answer")
    try:
        path.write_text("services: [{name: broken")
        mesh.client.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("discovery reload failed" in line for line in mesh.client.output),
                 what="the failed reload to be logged")
        assert mesh.call(b"still here") == b"still here"
    finally:
        path.write_text(original)
