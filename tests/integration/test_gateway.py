"""The multicluster gateway end to end on 127.0.0.1: a real embedded API server with
Services, Pods and policy resources, `meshgate gateway run` as a process, a target
proxy whose app is an echo server, and a caller proxy that sends its services'
traffic to the gateway.

    caller proxy --mTLS--> gateway --mTLS (caller in field 100)--> target proxy -> echo
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from mesh.control.crds import install_crds
from mesh.control.policy import (
    AUTHORIZATION_POLICY,
    GROUP,
    MESH_TLS_AUTHENTICATION,
    PLURALS,
    SERVER,
    VERSION,
)
from mesh.identity import tls as mtls
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.proxy.transport_header import TransportHeader
from tests.cluster import Cluster, add_meshed_service, spawn, stop_process, wait_for
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

EXPORTED = {"mirror.meshgate.io/exported": "true"}
GATEWAY = Identity("multicluster", "gateway", DOMAIN).dns_name
WEST_GATEWAY = Identity("multicluster", "west-gateway", DOMAIN).dns_name
"""Another cluster's gateway, which this gateway trusts to forward its callers."""
CALLER = Identity("default", "client", DOMAIN).dns_name
OTHER = Identity("default", "other", DOMAIN).dns_name
"""The only caller the AuthorizationPolicy on `admin` admits."""
TESTER = Identity("default", "tester", DOMAIN).dns_name
WEB = Identity("default", "web", DOMAIN).dns_name
"""A workload that talks to the proxies and the gateway directly."""
FAR_CALLER = Identity("east", "frontend", DOMAIN).dns_name
"""A caller that reaches this gateway through WEST_GATEWAY."""


def fqdn(service: str) -> str:
    return f"{service}.default.svc.{DOMAIN}"


def scrape(admin: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[str]
    listen: tuple[str, int]
    admin: str
    output: list[str] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        return sum(v for lbls, v in scrape(self.admin).get(name, [])
                   if all(lbls.get(k) == want for k, want in labels.items()))

    def logged(self, *parts: str) -> bool:
        return any(all(p in line for p in parts) for line in self.output)


@dataclass
class World:
    trust: Trust
    app_port: int
    target: ProxyProcess
    caller: ProxyProcess
    gateway: GatewayProcess
    vips: dict[str, tuple[str, int]]

    def call(self, service: str, payload: bytes) -> bytes:
        return call(self.vips[service], payload)


def _create_services(cluster: Cluster, app_port: int, inbound_port: int) -> None:
    api = cluster.api()
    core: Any = client.CoreV1Api(api)
    for name, labels in (("web", EXPORTED), ("secret", {}), ("admin", EXPORTED)):
        add_meshed_service(api, name, app_port=app_port, inbound_port=inbound_port,
                           labels=labels, port_name="echo")
    # Its Pod runs as `other`, but the proxy behind it presents web: the wrong identity.
    add_meshed_service(api, "impostor", app_port=app_port, inbound_port=inbound_port,
                       labels=EXPORTED, port_name="echo", service_account="other")
    # The local mirror of a linked cluster's web: its endpoints would be that gateway.
    core.create_namespaced_service("default", {
        "metadata": {"name": "web-west", "labels": {
            **EXPORTED, "mirror.meshgate.io/mirrored-service": "true"}},
        "spec": {"ports": [{"port": 80}]}})
    custom: Any = client.CustomObjectsApi(api)
    for kind, name, spec in (
            (SERVER, "admin", {"podSelector": {"matchLabels": {"app": "admin"}},
                               "port": "echo"}),
            (MESH_TLS_AUTHENTICATION, "others", {"identities": [OTHER]}),
            (AUTHORIZATION_POLICY, "admin-others", {
                "targetRef": {"group": GROUP, "kind": SERVER, "name": "admin"},
                "requiredAuthenticationRefs": [{"group": GROUP, "kind": MESH_TLS_AUTHENTICATION,
                                                "name": "others"}]})):
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURALS[kind], {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name},
            "spec": spec})
    slices: Any = client.DiscoveryV1Api(api)

    def every_slice_filled() -> bool:
        return all(any(s.endpoints for s in slices.list_namespaced_endpoint_slice(
            "default", label_selector=f"kubernetes.io/service-name={name}").items)
            for name in ("web", "secret", "admin", "impostor"))

    wait_for(every_slice_filled, what="EndpointSlices for web, secret, admin and impostor")


def _start_gateway(cluster: Cluster, trust: Trust) -> GatewayProcess:
    listen = ("127.0.0.1", free_port())
    admin = f"127.0.0.1:{free_port()}"
    path = trust.root / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "identity": trust.workload("multicluster", "gateway"),
        "kubeconfig": str(cluster.kubeconfig), "listen": f"{listen[0]}:{listen[1]}",
        "admin": admin, "trustedGateways": [WEST_GATEWAY], "headerTimeout": "1s",
        "connectTimeout": "2s"}))
    proc, output, _, _ = spawn([sys.executable, "-m", "mesh.cli", "gateway", "run",
                                "--config", str(path)], lambda line: "listening on" in line,
                               what="gateway")
    gateway = GatewayProcess(proc, listen, f"http://{admin}", output)

    def ready() -> bool:
        with urllib.request.urlopen(f"{gateway.admin}/ready", timeout=5) as resp:
            return resp.status == 200

    try:
        wait_for(ready, timeout=15, what="the gateway to be ready")
    except AssertionError:
        stop_process(proc)
        raise
    return gateway


@pytest.fixture(scope="module")
def world(cluster: Cluster, trust: Trust) -> Iterator[World]:
    install_crds(cluster.api())
    app = echo_app()
    app_port = app.server_address[1]
    target = start_proxy(trust.root, "target", {
        "identity": trust.workload("default", "web"),
        # The gateway itself is not authorized: only callers it forwards get in.
        "inbound": {"authorized": [CALLER, OTHER, TESTER, FAR_CALLER],
                    "trustedGateways": [GATEWAY]}})
    stack: list[Any] = [app.shutdown, target.stop]
    try:
        _create_services(cluster, app_port, target.inbound[1])
        gateway = _start_gateway(cluster, trust)
        stack.append(lambda: stop_process(gateway.proc))
        port = free_port()
        vips = {name: (f"127.0.2.{i}", port) for i, name in enumerate(
            ("web", "secret", "admin", "web-west"), start=10)}
        # web-west is what a mirror looks like to its callers: another name here, and
        # the gateway told the remote name in the transport header.
        remote = {"web-west": fqdn("web")}
        discovery = services_file(trust.root / "caller-services.yaml", *(
            {"name": fqdn(name), "address": f"{host}:{vport}", "opaque": True,
             "endpoints": [{"address": f"127.0.0.1:{gateway.listen[1]}", "targetPort": 80,
                            "identity": GATEWAY,
                            **({"authorityOverride": remote[name]} if name in remote else {})}]}
            for name, (host, vport) in vips.items()))
        caller = start_proxy(trust.root, "caller", {
            "identity": trust.workload("default", "client"), "discovery": str(discovery)})
        stack.append(caller.stop)
        yield World(trust, app_port, target, caller, gateway, vips)
    finally:
        for stop in reversed(stack):
            stop()


def _tls(world: World, address: tuple[str, int], identity: dict[str, Any] | None
         ) -> ssl.SSLSocket:
    ctx = mtls.client_context(TrustBundle.from_pem(world.trust.bundle.read_bytes()))
    if identity is not None:
        mtls.load_identity(ctx, Path(identity["certFile"]).read_bytes(),
                           Path(identity["keyFile"]).read_bytes())
    raw = socket.create_connection(address, timeout=5)
    return ctx.wrap_socket(raw, server_hostname="mesh")


def _closed(sock: socket.socket | ssl.SSLSocket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def _echo(sock: ssl.SSLSocket, header: TransportHeader, payload: bytes) -> bytes:
    """Send the header and `payload`; what came back, up to the payload's length."""
    sock.sendall(header.encode() + payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _refused_total(world: World, **labels: str) -> float:
    return world.gateway.metric("gateway_refused_total", **labels)


# -- through the gateway ----------------------------------------------------------------


def test_a_call_through_the_gateway_reaches_the_app(world: World) -> None:
    assert world.call("web", b"hello gateway") == b"hello gateway"
    big = bytes(range(256)) * 4096  # 1 MiB both ways
    assert call(world.vips["web"], big, timeout=20) == big


def test_a_mirror_name_reaches_the_remote_service_by_its_authority_override(
        world: World) -> None:
    assert world.call("web-west", b"through the mirror") == b"through the mirror"
    assert world.gateway.metric("gateway_requests_total", dst_service=fqdn("web")) >= 1


def test_the_target_sees_the_caller_not_the_gateway(world: World) -> None:
    assert world.call("web", b"who am i") == b"who am i"
    target, gateway = world.target, world.gateway
    wait_for(lambda: target.metric("tcp_close_total", direction="inbound", client_id=CALLER)
             >= 1, what="the target to count the caller's connection")
    assert target.metric("inbound_tcp_authz_allow_total", client_id=CALLER) >= 1
    assert target.metric("inbound_gateway_forwarded_total", gateway_id=GATEWAY,
                         client_id=CALLER) >= 1
    assert target.metric("tcp_open_total", client_id=GATEWAY) == 0
    assert gateway.metric("gateway_requests_total", dst_service=fqdn("web"),
                          client_id=CALLER) >= 1
    web_id = Identity("default", "web", DOMAIN).dns_name
    wait_for(lambda: gateway.metric("tcp_close_total", direction="gateway", peer="dst",
                                    client_id=CALLER, server_id=web_id) >= 1,
             what="the gateway's upstream flow to be counted")
    assert gateway.metric("tcp_read_bytes_total", direction="gateway", peer="src",
                          dst_service=fqdn("web")) >= len(b"who am i")


def test_an_unexported_service_is_refused(world: World) -> None:
    before = _refused_total(world, reason="not-exported")
    assert world.call("secret", b"psst") == b""
    wait_for(lambda: _refused_total(world, reason="not-exported", client_id=CALLER,
                                    dst_service=fqdn("secret")) > before,
             what="the refusal to be counted")
    wait_for(lambda: world.gateway.logged("reason=not-exported", f"caller={CALLER}",
                                          f"target={fqdn('secret')}:80"),
             what="a log line naming caller and target")


def test_an_authorization_policy_is_applied_at_the_gateway(world: World) -> None:
    before = _refused_total(world, reason="unauthorized")
    assert world.call("admin", b"let me in") == b""
    wait_for(lambda: _refused_total(world, reason="unauthorized", client_id=CALLER,
                                    dst_service=fqdn("admin")) > before,
             what="the denial to be counted")
    wait_for(lambda: world.gateway.logged(
        "reason=unauthorized", f"caller={CALLER}", f"target={fqdn('admin')}:80",
        "AuthorizationPolicy", "Server default/admin"), what="a log line with the reason")
    # The identity the policy names gets through, and the target sees it.
    other = world.trust.workload("default", "other")
    with _tls(world, world.gateway.listen, other) as s:
        assert _echo(s, TransportHeader(port=80, name=fqdn("admin")), b"admitted") == \
            b"admitted"
    wait_for(lambda: world.target.metric("inbound_gateway_forwarded_total", gateway_id=GATEWAY,
                                         client_id=OTHER) >= 1, what="the target to see OTHER")


def test_a_trusted_gateway_forwards_its_caller(world: World) -> None:
    west = world.trust.workload("multicluster", "west-gateway")
    with _tls(world, world.gateway.listen, west) as s:
        header = TransportHeader(port=80, name=fqdn("web"), caller=FAR_CALLER)
        assert _echo(s, header, b"from afar") == b"from afar"
    assert world.gateway.metric("gateway_requests_total", client_id=FAR_CALLER) >= 1
    wait_for(lambda: world.target.metric("inbound_tcp_authz_allow_total",
                                         client_id=FAR_CALLER) >= 1,
             what="the target to authorize the far caller")


@pytest.mark.parametrize(("who", "service", "caller", "reason"), [
    ("west-gateway", "web-west", FAR_CALLER, "loop"),
    ("tester", "web", OTHER, "forged-caller"),
    ("tester", "nope", "", "unknown-service"),
    ("west-gateway", "web", "not-an-identity", "bad-caller"),
])
def test_refusals_at_the_gateway(world: World, who: str, service: str, caller: str,
                                 reason: str) -> None:
    identity = world.trust.workload("multicluster" if who.endswith("gateway") else "default",
                                    who)
    before = _refused_total(world, reason=reason)
    with _tls(world, world.gateway.listen, identity) as s:
        s.sendall(TransportHeader(port=80, name=fqdn(service), caller=caller).encode() + b"x")
        assert _closed(s)
    wait_for(lambda: _refused_total(world, reason=reason) > before, what=f"{reason} counted")
    wait_for(lambda: world.gateway.logged(f"reason={reason}", f"target={fqdn(service)}:80"),
             what="a log line naming the target")
    assert world.call("web", b"still fine") == b"still fine"


# -- a VM's proxy, which reaches the pods only through the gateway --------------------------


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_proxy_with_an_outbound_gateway_reaches_pods_through_it(
        world: World, cluster: Cluster) -> None:
    """The VM's discovery names the pods' own proxies (as the control plane does), which
    a VM cannot dial; with `outbound.gateway` its proxy goes to the gateway instead,
    naming each service and port, opaque and HTTP alike."""
    hello = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    hello.daemon_threads = True
    threading.Thread(target=hello.serve_forever, daemon=True).start()
    port = free_port()  # the Services' port: the VIP port the VM's apps dial
    apps = {"vm-echo": world.app_port, "vm-hello": hello.server_address[1]}
    api: Any = client.DiscoveryV1Api(cluster.api())
    for name, app_port in apps.items():
        add_meshed_service(cluster.api(), name, app_port=app_port,
                           inbound_port=world.target.inbound[1], labels=EXPORTED, port=port)
    wait_for(lambda: all(any(s.endpoints for s in api.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={name}").items)
        for name in apps), what="EndpointSlices for vm-echo and vm-hello")
    vips = {"vm-echo": ("127.0.2.40", port), "vm-hello": ("127.0.2.41", port)}
    discovery = services_file(world.trust.root / "vm-services.yaml", *(
        {"name": fqdn(name), "address": f"{host}:{vport}", "opaque": name == "vm-echo",
         "endpoints": [{"address": f"{world.target.inbound[0]}:{world.target.inbound[1]}",
                        "targetPort": apps[name], "identity": WEB}]}
        for name, (host, vport) in vips.items()))
    vm = start_proxy(world.trust.root, "vm", {
        "identity": world.trust.workload("default", "tester"), "discovery": str(discovery),
        "outbound": {"gateway": {"address": f"127.0.0.1:{world.gateway.listen[1]}",
                                 "identity": GATEWAY}}})
    try:
        # The gateway learns of the new Services from its watch.
        wait_for(lambda: call(vips["vm-echo"], b"from the vm") == b"from the vm",
                 what="an opaque call through the gateway")
        with urllib.request.urlopen(f"http://{vips['vm-hello'][0]}:{port}/there",
                                    timeout=10) as resp:
            assert (resp.status, resp.read()) == (200, b"hello /there")
        with urllib.request.urlopen(f"http://{vips['vm-hello'][0]}:{port}/again",
                                    timeout=10) as resp:
            assert resp.read() == b"hello /again"
        for name in apps:
            assert world.gateway.metric("gateway_requests_total", dst_service=fqdn(name),
                                        client_id=TESTER) >= 1
        wait_for(lambda: world.target.metric("inbound_gateway_forwarded_total",
                                             gateway_id=GATEWAY, client_id=TESTER) >= 2,
                 what="the target to see the VM's calls forwarded by the gateway")
        assert vm.metric("tcp_open_total", direction="outbound", server_id=WEB) == 0
    finally:
        vm.stop()
        hello.shutdown()


# -- the target's side of field 100 ---------------------------------------------------------


def test_a_forged_caller_is_refused_by_the_target(world: World) -> None:
    tester = world.trust.workload("default", "tester")
    with _tls(world, world.target.inbound, tester) as s:  # without field 100: fine
        assert _echo(s, TransportHeader(port=world.app_port), b"me") == b"me"
    before = world.target.metric("proxy_protocol_errors_total", cause="forged-caller")
    with _tls(world, world.target.inbound, tester) as s:
        s.sendall(TransportHeader(port=world.app_port, caller=CALLER).encode() + b"as caller")
        assert _closed(s)
    wait_for(lambda: world.target.metric("proxy_protocol_errors_total", cause="forged-caller")
             > before, what="the forged caller to be counted")
    wait_for(lambda: any("cause=forged-caller" in line and f"identity={TESTER}" in line and
                         f"named caller {CALLER}" in line for line in world.target.output),
             what="a log line naming the peer and the caller it claimed")


# -- bad input and the admin server -------------------------------------------------------


@pytest.mark.parametrize(("payload", "tls", "reason"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "tls-handshake"),
    (b"not a transport header at all", True, "bad-header"),
    (b"transport.l5d.io/v1\r\n\r\n\x00\x00\x00\x02\x08\xff", True, "bad-header"),
    (b"transport.l5d", True, "header-timeout"),
])
def test_bad_input_is_refused_and_others_continue(world: World, payload: bytes, tls: bool,
                                                  reason: str) -> None:
    before = _refused_total(world, reason=reason)
    if tls:
        with _tls(world, world.gateway.listen, world.trust.workload("default", "tester")) as s:
            s.sendall(payload)
            assert world.call("web", b"meanwhile") == b"meanwhile"
            assert _closed(s)
    else:
        with socket.create_connection(world.gateway.listen, timeout=5) as raw:
            raw.sendall(payload)
            assert _closed(raw)
    wait_for(lambda: _refused_total(world, reason=reason) > before, what=f"{reason} counted")
    assert world.call("web", b"ok") == b"ok"


def test_a_client_without_a_certificate_is_refused_in_words(world: World) -> None:
    before = _refused_total(world, reason="tls-handshake")
    ctx = mtls.client_context(TrustBundle.from_pem(world.trust.bundle.read_bytes()))
    with socket.create_connection(world.gateway.listen, timeout=5) as raw:
        host, port = raw.getsockname()[:2]
        me = f"{host}:{port}"
        try:
            with ctx.wrap_socket(raw, server_hostname="mesh") as s:
                s.sendall(TransportHeader(port=80, name=fqdn("web")).encode())
                assert _closed(s)
        except (ssl.SSLError, ConnectionError):
            pass  # refused during the handshake: as good as closed
    wait_for(lambda: _refused_total(world, reason="tls-handshake") > before,
             what="the handshake failure counted")
    wait_for(lambda: world.gateway.logged(
        f"peer={me} ", "reason=tls-handshake", f"client {me} presented no certificate; "
        "meshed clients must present their workload certificate"), what="a refusal in words")


def test_an_endpoint_that_presents_another_identity_is_refused_in_words(
        world: World) -> None:
    tester = world.trust.workload("default", "tester")
    with _tls(world, world.gateway.listen, tester) as s:
        s.sendall(TransportHeader(port=80, name=fqdn("impostor")).encode() + b"x")
        assert _closed(s)
    target = f"{world.target.inbound[0]}:{world.target.inbound[1]}"
    wait_for(lambda: world.gateway.logged(
        "gateway upstream failed", f"target={fqdn('impostor')}:80",
        f"cause=server {target} presented {WEB}, expected {OTHER}; chain valid until"),
        what="each failed attempt told with both identities")
    wait_for(lambda: world.gateway.logged(
        "reason=connect-failed", "no endpoint answered after 3 attempts; last: "
        f"{target} ({OTHER}): server {target} presented {WEB}, expected {OTHER}"),
        what="the refusal with the last attempt's words")
    assert world.call("web", b"ok") == b"ok"


def test_ready_live_and_metrics(world: World) -> None:
    for path, body in (("/ready", "ready\n"), ("/live", "live\n")):
        with urllib.request.urlopen(f"{world.gateway.admin}{path}", timeout=5) as resp:
            assert (resp.status, resp.read().decode()) == (200, body)
    with urllib.request.urlopen(f"{world.gateway.admin}/metrics", timeout=5) as resp:
        page = resp.read().decode()
    for family in ("gateway_requests_total", "gateway_refused_total", "tcp_open_total"):
        assert family in page
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{world.gateway.admin}/nothing", timeout=5)


CHURN = 2000


def test_churn_through_the_gateway_leaves_nothing_behind(world: World) -> None:
    """~2,000 connections, caller -> gateway -> target, 8 at a time: afterwards the
    gateway holds what it held after a warm-up: no open connection, no more
    descriptors, and a C heap within noise (a leak of a few KB per connection, as a
    TLS session copied per connection was, shows as megabytes)."""

    def churn(n: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: world.call("web", b"ping"), range(n)))
        assert answers == [b"ping"] * n

    def settled() -> tuple[float, float]:
        wait_for(lambda: world.gateway.metric("tcp_open_connections") == 0,
                 what="every relayed connection closed")
        return (world.gateway.metric("process_open_fds"),
                world.gateway.metric("process_heap_bytes"))

    churn(300)  # warm-up: tickets, metric children, allocator arenas
    fds, heap = settled()
    churn(CHURN)
    fds_after, heap_after = settled()
    assert fds_after <= fds
    per_connection = (heap_after - heap) / CHURN
    assert per_connection < 512, f"the gateway's C heap grew {per_connection:.0f} B/connection"
