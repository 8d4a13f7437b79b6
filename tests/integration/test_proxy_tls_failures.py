"""What proxies say when mTLS between them fails, with real `meshgate proxy run`
processes on 127.0.0.1.

A caller proxy dials destination proxies whose certificates are wrong in one way
each: expired, not yet valid, under a trust anchor the caller does not hold, or
of another identity than discovery names. Its log line, and for HTTP the
``l5d-proxy-error`` header of the 502 its client gets, must name the side, the
expected and presented identities, the validity dates and clock skew, or the
missing anchor. The accepting side explains the clients it refuses (no
certificate, an expired one, an unknown anchor) in its one refusal line.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from mesh.identity import tls as mtls
from mesh.identity.bundle import TrustBundle, rfc3339
from mesh.identity.ca import IssuerDir
from mesh.identity.names import Identity
from mesh.proxy.transport_header import TransportHeader
from tests.cluster import wait_for
from tests.meshproxy import (
    DOMAIN,
    ProxyProcess,
    Trust,
    endpoint,
    free_port,
    service,
    services_file,
    start_proxy,
)

NOW = dt.datetime.now(dt.UTC)


def ident(sa: str) -> str:
    return Identity("default", sa, DOMAIN).dns_name


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def _leaf(files: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificates(Path(files["certFile"]).read_bytes())[0]


@dataclass
class Mesh:
    trust: Trust
    stranger: Trust
    client: ProxyProcess
    servers: dict[str, ProxyProcess]
    leaves: dict[str, x509.Certificate]
    http: dict[str, tuple[str, int]]
    opaque: dict[str, tuple[str, int]]

    def get(self, case: str) -> tuple[int, dict[str, str]]:
        conn = http.client.HTTPConnection(*self.http[case], timeout=20)
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def inbound(self, name: str) -> str:
        host, port = self.servers[name].inbound
        return f"{host}:{port}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("tls-failures")
    # Anchor and issuer from five days ago, so that a leaf can have expired already.
    issuers = IssuerDir(root / "trust")
    issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=60),
                 issuer_lifetime=dt.timedelta(days=30), now=NOW - dt.timedelta(days=5))
    trust = Trust(root, issuers)
    stranger = Trust.create(root / "stranger")
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    app.daemon_threads = True
    threading.Thread(target=app.serve_forever, daemon=True).start()
    app_port = app.server_address[1]
    identities = {
        "web": trust.workload("default", "web"),
        "stale": trust.workload("default", "stale", now=NOW - dt.timedelta(days=2),
                                lifetime=dt.timedelta(days=1)),
        "early": trust.workload("default", "early", now=NOW + dt.timedelta(days=1),
                                lifetime=dt.timedelta(days=1)),
        "stranger": stranger.workload("default", "stranger"),
    }
    servers: dict[str, ProxyProcess] = {}
    client = None
    try:
        for name, files in identities.items():
            servers[name] = start_proxy(root, name, {"identity": files})
        # Discovery names, per case, the server to dial and the identity it must present.
        cases = {"ok": ("web", "web"), "expired": ("stale", "stale"),
                 "not-yet-valid": ("early", "early"), "other-anchor": ("stranger", "stranger"),
                 "wrong-identity": ("web", "other")}
        port = free_port()
        http_vips: dict[str, tuple[str, int]] = {}
        opaque_vips: dict[str, tuple[str, int]] = {}
        specs = []
        for i, (case, (server, sa)) in enumerate(cases.items()):
            ep = endpoint(servers[server].inbound[1], app_port, sa)
            http_vips[case], opaque_vips[case] = (f"127.0.3.{10 + i}", port), \
                (f"127.0.3.{30 + i}", port)
            specs.append(service(f"{case}-http", f"127.0.3.{10 + i}:{port}", ep))
            specs.append(service(f"{case}-tcp", f"127.0.3.{30 + i}:{port}", ep, opaque=True))
        client = start_proxy(root, "client", {
            "identity": trust.workload("default", "client"),
            "discovery": str(services_file(root / "services.yaml", *specs))})
        yield Mesh(trust, stranger, client, servers,
                   {name: _leaf(files) for name, files in identities.items()},
                   http_vips, opaque_vips)
    finally:
        for proxy in ([client] if client is not None else []) + list(servers.values()):
            proxy.stop()
        app.shutdown()


def _logged(proxy: ProxyProcess, *parts: str) -> str:
    """The first line of `proxy`'s output holding every one of `parts` (waited for)."""
    def find() -> str | None:
        return next((line for line in proxy.output if all(p in line for p in parts)), None)

    found = wait_for(find, what=f"a log line of {proxy.name} with {parts}")
    assert found is not None
    return found


def _opaque_call(mesh: Mesh, case: str) -> bytes:
    with socket.create_connection(mesh.opaque[case], timeout=20) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # closed with the request unread: as refused as an EOF
        return got


def _expect(mesh: Mesh, case: str) -> list[str]:
    """The words a failure of `case` must carry, wherever it is told."""
    if case == "expired":
        leaf = mesh.leaves["stale"]
        return [f"server {mesh.inbound('stale')} presented {ident('stale')}",
                f"expected {ident('stale')}",
                f"expired at {rfc3339(leaf.not_valid_after_utc)}",
                f"valid from {rfc3339(leaf.not_valid_before_utc)}", "clock skew"]
    if case == "not-yet-valid":
        leaf = mesh.leaves["early"]
        return [f"server {mesh.inbound('early')} presented {ident('early')}",
                f"expected {ident('early')}",
                f"is not valid until {rfc3339(leaf.not_valid_before_utc)}",
                f"until {rfc3339(leaf.not_valid_after_utc)}", "clock skew"]
    if case == "other-anchor":
        missing = mesh.stranger.issuers.load_issuer().cert
        key_id = missing.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier).value.key_identifier
        assert key_id is not None
        held = TrustBundle.from_pem(mesh.trust.bundle.read_bytes()).anchors[0]
        return [f"server {mesh.inbound('stranger')} presented {ident('stranger')}",
                f"expected {ident('stranger')}", "not an anchor in the trust bundle",
                f"authority key id {key_id.hex()}",  # the anchor that is missing
                f"the bundle holds {TrustBundle.describe(held).split(' (')[0]}",
                TrustBundle.fingerprint(held)[:8]]
    assert case == "wrong-identity"
    return [f"server {mesh.inbound('web')} presented {ident('web')}",
            f"expected {ident('other')}",
            f"chain valid until {rfc3339(mesh.leaves['web'].not_valid_after_utc)}"]


CASES = ["expired", "not-yet-valid", "other-anchor", "wrong-identity"]


def test_the_mesh_works_where_certificates_are_right(mesh: Mesh) -> None:
    assert mesh.get("ok")[0] == 200
    assert _opaque_call(mesh, "ok").startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("case", CASES)
def test_http_answers_502_naming_the_tls_failure(mesh: Mesh, case: str) -> None:
    status, headers = mesh.get(case)
    assert status == 502
    cause = headers["l5d-proxy-error"]
    for words in _expect(mesh, case):
        assert words in cause, (words, cause)
    line = _logged(mesh.client, "outbound attempt failed", f"service={case}-http.")
    for words in _expect(mesh, case):
        assert words in line, (words, line)


@pytest.mark.parametrize("case", CASES)
def test_opaque_logs_the_tls_failure(mesh: Mesh, case: str) -> None:
    assert _opaque_call(mesh, case) == b""
    line = _logged(mesh.client, "outbound connection failed", f"service={case}-tcp.",
                   "cause=connect-failed")
    for words in _expect(mesh, case):
        assert words in line, (words, line)


def _client_context(mesh: Mesh, files: dict[str, Any] | None) -> ssl.SSLContext:
    ctx = mtls.client_context(TrustBundle.from_pem(
        mesh.trust.bundle.read_bytes() + mesh.stranger.bundle.read_bytes()))
    if files is not None:
        mtls.load_identity(ctx, Path(files["certFile"]).read_bytes(),
                           Path(files["keyFile"]).read_bytes())
    return ctx


def _knock(mesh: Mesh, ctx: ssl.SSLContext) -> str:
    """Handshake with web's inbound as a client, send a header; the client's address."""
    with socket.create_connection(mesh.servers["web"].inbound, timeout=10) as raw:
        host, port = raw.getsockname()[:2]
        me = f"{host}:{port}"
        try:
            with ctx.wrap_socket(raw, server_hostname=ident("web")) as s:
                s.sendall(TransportHeader(port=80).encode())
                assert s.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            pass  # refused during the handshake, as TLS 1.3 may tell a client
    return me


@pytest.mark.parametrize("client", ["none", "expired", "other-anchor"])
def test_the_accepting_side_explains_the_client_it_refuses(mesh: Mesh, client: str) -> None:
    web = TrustBundle.from_pem(mesh.trust.bundle.read_bytes())
    files = {"none": None,
             "expired": mesh.trust.workload("default", "lapsed", now=NOW - dt.timedelta(days=2),
                                            lifetime=dt.timedelta(days=1)),
             "other-anchor": mesh.stranger.workload("default", "tester")}[client]
    peer = _knock(mesh, _client_context(mesh, files))
    line = _logged(mesh.servers["web"], "inbound connection refused", f"peer={peer} ",
                   "cause=tls-handshake")
    expected = {
        "none": [f"client {peer} presented no certificate; meshed clients must present "
                 "their workload certificate"],
        "expired": [f"client {peer} presented a certificate that is expired or not yet valid",
                    "certificate has expired", "any mesh identity expected", "clock skew"],
        "other-anchor": [f"client {peer} presented a certificate this side does not trust",
                         "any mesh identity expected",
                         f"the trust bundle holds {web.describe(web.anchors[0])}"],
    }[client]
    for words in expected:
        assert words in line, (words, line)
