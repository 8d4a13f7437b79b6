"""Caller assertions and the Forwarded header through a real gateway on 127.0.0.1.

The target proxy here does not trust the gateway (no ``trustedGateways``): it learns
the caller only from the assertion the caller's proxy signs and the gateway passes on.

    caller proxy --mTLS, assertion--> gateway --mTLS, assertion--> target proxy -> apps
"""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client

from mesh.control.crds import install_crds
from mesh.identity import ca
from mesh.identity import tls as mtls
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.proxy.assertion import sign_assertion
from mesh.proxy.transport_header import (
    AssertionClaims,
    CallerAssertion,
    SessionProtocol,
    TransportHeader,
)
from tests.cluster import Cluster, add_meshed_service, stop_process, wait_for
from tests.integration.test_gateway import GATEWAY, GatewayProcess, _start_gateway, fqdn
from tests.meshproxy import (
    DOMAIN,
    ProxyProcess,
    Trust,
    call,
    echo_app,
    free_port,
    services_file,
    start_proxy,
)

CALLER = Identity("default", "client", DOMAIN)
TESTER = Identity("default", "tester", DOMAIN)
"""A workload that talks to the gateway and the target directly."""
WEB = fqdn("web")


class _Headers(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the request's Forwarded fields, one per line."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = "".join(f"{v}\n" for v in self.headers.get_all("Forwarded") or []).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Named(http.server.BaseHTTPRequestHandler):
    """Answers every GET with "named": another service behind the same gateway."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "5")
        self.end_headers()
        self.wfile.write(b"named")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class World:
    trust: Trust
    app_port: int
    target: ProxyProcess
    caller: ProxyProcess
    gateway: GatewayProcess
    vips: dict[str, tuple[str, int]]


def _create_services(cluster: Cluster, ports: dict[str, int], inbound_port: int) -> None:
    for name, port in ports.items():
        add_meshed_service(cluster.api(), name, app_port=port, inbound_port=inbound_port,
                           labels={"mirror.meshgate.io/exported": "true"})
    slices: Any = client.DiscoveryV1Api(cluster.api())
    wait_for(lambda: all(any(s.endpoints for s in slices.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={name}").items)
        for name in ports), what="EndpointSlices for every service")


@pytest.fixture(scope="module")
def world(cluster: Cluster, trust: Trust) -> Iterator[World]:
    install_crds(cluster.api())
    app = echo_app()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Headers)
    named = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    for server in (web, named):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = {"web": app.server_address[1], "http": web.server_address[1],
             "named": named.server_address[1]}
    target = start_proxy(trust.root, "target", {
        "identity": trust.workload("default", "web"),
        "inbound": {"authorized": [CALLER.dns_name, TESTER.dns_name]}})
    stack: list[Any] = [app.shutdown, web.shutdown, named.shutdown, target.stop]
    try:
        _create_services(cluster, ports, target.inbound[1])
        gateway = _start_gateway(cluster, trust)
        stack.append(lambda: stop_process(gateway.proc))
        port = free_port()
        vips = {"web-west": ("127.0.2.20", port), "http-west": ("127.0.2.21", port),
                "named-west": ("127.0.2.22", port)}
        discovery = services_file(trust.root / "caller-services.yaml", *(
            {"name": fqdn(name), "address": f"{host}:{vport}", "opaque": name == "web-west",
             "endpoints": [{"address": f"127.0.0.1:{gateway.listen[1]}", "targetPort": 80,
                            "identity": GATEWAY,
                            "authorityOverride": fqdn(name.removesuffix("-west"))}]}
            for name, (host, vport) in vips.items()))
        caller = start_proxy(trust.root, "caller", {
            "identity": trust.workload("default", "client"), "discovery": str(discovery)})
        stack.append(caller.stop)
        yield World(trust, ports["web"], target, caller, gateway, vips)
    finally:
        for stop in reversed(stack):
            stop()


def _issue(trust: Trust, identity: Identity) -> tuple[list[x509.Certificate],
                                                      ec.EllipticCurvePrivateKey]:
    issuer = trust.issuers.load_issuer()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(issuer, key.public_key(), identity, now=dt.datetime.now(dt.UTC))
    return [leaf, issuer.cert], key


def _assertion(trust: Trust, identity: Identity, *, caller: Identity | None = None,
               authority: str = WEB) -> CallerAssertion:
    chain, key = _issue(trust, identity)
    return sign_assertion(key, chain, caller=str(caller or identity), authority=authority,
                          now=time.time())


def _tls(trust: Trust, address: tuple[str, int], identity: Identity) -> ssl.SSLSocket:
    files = trust.workload(identity.namespace, identity.service_account)
    ctx = mtls.client_context(TrustBundle.from_pem(trust.bundle.read_bytes()))
    mtls.load_identity(ctx, Path(files["certFile"]).read_bytes(),
                       Path(files["keyFile"]).read_bytes())
    return ctx.wrap_socket(socket.create_connection(address, timeout=5), server_hostname="mesh")


def _exchange(sock: ssl.SSLSocket, header: TransportHeader, payload: bytes) -> bytes:
    """Send the header and `payload`; what came back before the connection ended or
    as many bytes as were sent."""
    sock.sendall(header.encode() + payload)
    got = b""
    try:
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    return got


# -- the real caller, proven ------------------------------------------------------------


def test_a_target_that_does_not_trust_the_gateway_authorizes_the_asserted_caller(
        world: World) -> None:
    for i in range(3):  # the cached assertion serves each new connection; none is a replay
        assert call(world.vips["web-west"], b"proven %d" % i) == b"proven %d" % i
    target, caller = world.target, str(CALLER)
    wait_for(lambda: target.metric("tcp_close_total", direction="inbound", client_id=caller)
             >= 3, what="the target to count the caller's connections")
    assert target.metric("inbound_tcp_authz_allow_total", client_id=caller) >= 3
    assert target.metric("inbound_gateway_forwarded_total", gateway_id=GATEWAY,
                         client_id=caller) >= 3
    assert target.metric("tcp_open_total", client_id=GATEWAY) == 0
    assert target.metric("proxy_protocol_errors_total", cause="bad-assertion") == 0
    assert world.gateway.metric("gateway_requests_total", client_id=caller) >= 3


def test_without_an_assertion_the_target_does_not_believe_the_gateway(world: World) -> None:
    before = world.target.metric("proxy_protocol_errors_total", cause="forged-caller")
    with _tls(world.trust, world.gateway.listen, TESTER) as s:
        assert _exchange(s, TransportHeader(port=80, name=WEB), b"unproven") == b""
    wait_for(lambda: world.target.metric("proxy_protocol_errors_total", cause="forged-caller")
             > before, what="field 100 from an untrusted gateway to be refused")


def _response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a content-length: its head and its body."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    head, body = got.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, body
        body += chunk
    return head, body


def test_the_forwarded_header_reaches_the_app(world: World) -> None:
    host, port = world.vips["http-west"]
    request = f"GET / HTTP/1.1\r\nHost: {fqdn('http-west')}\r\n\r\n".encode()
    with socket.create_connection((host, port), timeout=5) as s:
        for _ in range(2):  # both requests of a keep-alive connection
            s.sendall(request)
            head, body = _response(s)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert body == f'for="{CALLER}";by="{GATEWAY}"\n'.encode()
    wait_for(lambda: world.target.metric("request_total", direction="inbound",
                                         client_id=str(CALLER)) >= 2,
             what="the target to count the asserted caller's HTTP requests")


def test_two_services_behind_one_gateway_never_share_a_connection(world: World) -> None:
    # Both are the same gateway address and target port; the gateway routes a whole
    # connection by the name in its transport header, so a pooled connection opened
    # for one must not carry a request for the other.
    for name, want in (("http-west", b"for="), ("named-west", b"named"),
                       ("http-west", b"for="), ("named-west", b"named")):
        host, port = world.vips[name]
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {fqdn(name)}\r\n\r\n".encode())
            head, body = _response(s)
        assert head.startswith(b"HTTP/1.1 200") and body.startswith(want), (name, body)


def test_a_request_that_names_this_gateway_already_is_a_loop(world: World) -> None:
    before = world.gateway.metric("gateway_refused_total", reason="loop")
    head = (f"GET / HTTP/1.1\r\nHost: {fqdn('http')}\r\n"
            f'Forwarded: for="x";by="{GATEWAY}"\r\n\r\n').encode()
    with _tls(world.trust, world.gateway.listen, TESTER) as s:
        s.sendall(TransportHeader(port=80, name=fqdn("http"),
                                  protocol=SessionProtocol.HTTP1).encode() + head)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 508 Loop Detected"), answer
    wait_for(lambda: world.gateway.metric("gateway_refused_total", reason="loop") > before,
             what="the loop to be counted")
    wait_for(lambda: world.gateway.logged("reason=loop", f"caller={TESTER}",
                                          "already passed through"), what="a log line")


# -- assertions that do not hold ----------------------------------------------------------


def test_the_gateway_refuses_an_assertion_for_another_caller(world: World) -> None:
    before = world.gateway.metric("gateway_refused_total", reason="bad-assertion")
    header = TransportHeader(port=80, name=WEB, assertion=_assertion(world.trust, CALLER))
    with _tls(world.trust, world.gateway.listen, TESTER) as s:
        assert _exchange(s, header, b"as someone else") == b""
    wait_for(lambda: world.gateway.metric("gateway_refused_total", reason="bad-assertion",
                                          client_id=str(TESTER)) > before,
             what="the gateway to count the bad assertion")
    wait_for(lambda: world.gateway.logged("reason=bad-assertion", f"caller={TESTER}",
                                          f"asserted={CALLER}"),
             what="a log line naming the caller and the asserted identity")


def test_the_gateway_refuses_an_assertion_for_another_service(world: World) -> None:
    before = world.gateway.metric("gateway_refused_total", reason="bad-assertion")
    header = TransportHeader(port=80, name=WEB, assertion=_assertion(
        world.trust, TESTER, authority=fqdn("http")))
    with _tls(world.trust, world.gateway.listen, TESTER) as s:
        assert _exchange(s, header, b"elsewhere") == b""
    wait_for(lambda: world.gateway.metric("gateway_refused_total", reason="bad-assertion")
             > before, what="the gateway to count the bad assertion")


def _refused_by_target(world: World, assertion: CallerAssertion, cause: str, *,
                       peer: Identity = TESTER, claimed: str = "") -> None:
    target = world.target
    before = target.metric("proxy_protocol_errors_total", cause="bad-assertion")
    header = TransportHeader(port=world.app_port, name=WEB, caller=claimed,
                             assertion=assertion)
    with _tls(world.trust, target.inbound, peer) as s:
        assert _exchange(s, header, b"let me in") == b""
    wait_for(lambda: target.metric("proxy_protocol_errors_total", cause="bad-assertion")
             > before, what="the target to count the bad assertion")
    wait_for(lambda: any("cause=bad-assertion" in line and f"identity={peer}" in line and
                         f"asserted={CALLER}" in line and cause in line
                         for line in target.output),
             what=f"a log line naming the peer, the asserted caller and {cause!r}")


def test_the_target_refuses_a_tampered_assertion(world: World) -> None:
    good = _assertion(world.trust, CALLER)
    claims = AssertionClaims.decode(good.claims)
    tampered = replace(good, claims=replace(claims, not_after=claims.not_after + 200).encode())
    _refused_by_target(world, tampered, "does not verify")


def test_the_target_refuses_a_forged_assertion(world: World) -> None:
    # TESTER's own key and chain, claiming to be CALLER.
    forged = _assertion(world.trust, TESTER, caller=CALLER)
    _refused_by_target(world, forged, f"signed by {TESTER}")


def test_the_target_refuses_an_untrusted_chain(world: World) -> None:
    now = dt.datetime.now(dt.UTC)
    anchor = ca.new_anchor(DOMAIN, lifetime=dt.timedelta(days=1), now=now)
    issuer = ca.new_issuer(anchor, DOMAIN, lifetime=dt.timedelta(days=1), now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(issuer, key.public_key(), CALLER, now=now)
    stranger = sign_assertion(key, [leaf, issuer.cert], caller=str(CALLER), authority=WEB,
                              now=time.time())
    _refused_by_target(world, stranger, "not trusted")


def test_the_target_refuses_an_assertion_replayed_by_another_peer(world: World) -> None:
    assertion = _assertion(world.trust, CALLER)
    # The caller itself, through the gateway: admitted.
    with _tls(world.trust, world.gateway.listen, CALLER) as s:
        header = TransportHeader(port=80, name=WEB, assertion=assertion)
        assert _exchange(s, header, b"mine") == b"mine"
    # The same assertion, straight to the target from another workload: a replay.
    _refused_by_target(world, assertion, f"replayed: {GATEWAY} presented it first")


def test_the_target_refuses_a_field_100_that_contradicts_the_assertion(world: World) -> None:
    _refused_by_target(world, _assertion(world.trust, CALLER), "field 100 names caller",
                       claimed=str(TESTER))
