"""HTTP/1.1 through a proxy pair: keep-alive, chunked and large bodies, retries
on a flaky upstream, failure accrual, priority spill-over, timeouts, errors
with l5d-proxy-error, WebSocket-style upgrades and HTTP/2 prior knowledge."""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.identity.names import Identity
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


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    flaky_count = 0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        name = self.server.server_address[1]
        if self.path == "/ok":
            self._send(200, b"ok from " + str(name).encode())
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/big":
            self._send(200, b"x" * (8 * 1024 * 1024))
        elif self.path == "/flaky":
            Handler.flaky_count += 1
            if Handler.flaky_count % 2:
                self._send(503, b"try again")
            else:
                self._send(200, b"second time lucky")
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, b"late")
        elif self.path == "/slowbody":
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"la")
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(b"te")
        elif self.path == "/ws":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while data := self.rfile.read1(65536):
                self.wfile.write(data.upper())
                self.wfile.flush()
        else:
            self._send(404, b"no such path")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self._send(200, b"got " + str(len(body)).encode())


def _app() -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class Mesh:
    def __init__(self, client: ProxyProcess, servers: list[ProxyProcess],
                 addresses: dict[str, tuple[str, int]]) -> None:
        self.client, self.servers, self.addresses = client, servers, addresses

    def conn(self, service: str = "web", timeout: float = 10) -> http.client.HTTPConnection:
        host, port = self.addresses[service]
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def get(self, path: str, service: str = "web") -> tuple[int, bytes, dict[str, str]]:
        c = self.conn(service)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body, {k.lower(): v for k, v in r.getheaders()}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("http")
    trust = Trust.create(root)
    apps = [_app() for _ in range(2)]
    servers = [start_proxy(root, f"server{i}", {
        "identity": trust.workload("default", "web"),
        "inbound": {"listen": f"127.0.0.1:{free_port()}"}}) for i in range(2)]
    port = free_port()
    addresses = {"web": ("127.0.2.10", port), "failover": ("127.0.2.11", port),
                 "dead": ("127.0.2.12", port)}
    dead_port = free_port()
    discovery = services_file(
        root / "services.yaml",
        service("web", f"127.0.2.10:{port}", endpoint(servers[0].inbound[1], apps[0][1], "web")),
        service("failover", f"127.0.2.11:{port}", endpoint(dead_port, apps[0][1], "web"),
                endpoint(servers[1].inbound[1], apps[1][1], "web", priority=1)),
        service("dead", f"127.0.2.12:{port}", endpoint(dead_port, apps[0][1], "web")))
    client = start_proxy(root, "client", {
        "identity": trust.workload("default", "client"), "discovery": str(discovery),
        "outbound": {"listen": f"127.0.0.1:{free_port()}", "requestTimeout": "1s"},
        "detectTimeout": "1s"})
    try:
        yield Mesh(client, servers, addresses)
    finally:
        client.stop()
        for s in servers:
            s.stop()
        for app, _ in apps:
            app.shutdown()


def test_keep_alive_requests_share_a_connection(mesh: Mesh) -> None:
    c = mesh.conn()
    for _ in range(5):
        c.request("GET", "/ok")
        r = c.getresponse()
        assert r.status == 200 and r.read().startswith(b"ok from")
    c.request("POST", "/echo", body=b"y" * 100_000)
    r = c.getresponse()
    assert r.read() == b"got 100000"
    c.close()


def test_chunked_and_large_bodies(mesh: Mesh) -> None:
    status, body, headers = mesh.get("/chunked")
    assert status == 200 and body == b"hello chunked world"
    assert headers.get("transfer-encoding") == "chunked"
    c = mesh.conn()
    c.request("GET", "/big")
    r = c.getresponse()
    before = _rss_kb(mesh.client)
    total = len(r.read(65536))
    # A reader that stops: back-pressure must stop the proxy from buffering the body.
    samples: list[int] = []

    def settled() -> bool:
        samples.append(_rss_kb(mesh.client))
        return len(samples) >= 5 and len(set(samples[-5:])) == 1

    wait_for(settled, interval=0.1, what="proxy memory to settle while the reader waits")
    assert samples[-1] - before < 4 * 1024, "the proxy buffered the body instead of pausing"
    while chunk := r.read(65536):
        total += len(chunk)
    assert total == 8 * 1024 * 1024
    c.close()


def _rss_kb(proxy: ProxyProcess) -> int:
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_retry_on_flaky_upstream(mesh: Mesh) -> None:
    status, body, _ = mesh.get("/flaky")
    assert status == 200 and body == b"second time lucky"


def test_no_endpoint_reachable_is_502_with_cause(mesh: Mesh) -> None:
    status, _, headers = mesh.get("/ok", service="dead")
    assert status == 502
    assert "connection to 127.0.0.1:" in headers["l5d-proxy-error"]


def test_timeout_is_504(mesh: Mesh) -> None:
    status, _, headers = mesh.get("/slow")
    assert status == 504 and "timed out" in headers["l5d-proxy-error"]


def test_a_response_still_streaming_at_the_timeout_is_cut(mesh: Mesh) -> None:
    c = mesh.conn()
    c.request("GET", "/slowbody")
    r = c.getresponse()
    assert r.status == 200  # the head came in time
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    c.close()


def test_priority_spill_over_and_failure_accrual(mesh: Mesh) -> None:
    # Group 0 is dead: every request still succeeds from group 1, and the dead
    # endpoint is ejected after repeated connect failures.
    for _ in range(8):
        status, body, _ = mesh.get("/ok", service="failover")
        assert status == 200, body
    assert mesh.client.metric("response_total", dst_service=f"failover.default.svc.{DOMAIN}",
                              classification="success") >= 8


def test_http_metrics(mesh: Mesh) -> None:
    mesh.get("/ok")
    mesh.get("/missing")
    svc = f"web.default.svc.{DOMAIN}"
    assert mesh.client.metric("request_total", direction="outbound", dst_service=svc) >= 2
    assert mesh.client.metric("response_total", dst_service=svc, status_code="404",
                              classification="success") >= 1
    buckets = [labels for labels, _ in mesh.client.metrics()["response_latency_ms_bucket"]]
    assert any(b.get("le") == "50.0" for b in buckets)


def test_upgrade_becomes_opaque(mesh: Mesh) -> None:
    host, port = mesh.addresses["web"]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        s.sendall(b"frames after the upgrade")
        got = b""
        while len(got) < len(b"frames after the upgrade"):
            got += s.recv(4096)
        assert got == b"FRAMES AFTER THE UPGRADE"


def test_malformed_request_is_400(mesh: Mesh) -> None:
    host, port = mesh.addresses["web"]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"l5d-proxy-error: malformed request" in answer
    wait_for(lambda: mesh.get("/ok")[0] == 200, what="proxy still serving")


def test_inbound_counts_requests_it_relays(mesh: Mesh) -> None:
    server = mesh.servers[0]
    client_id = Identity("default", "client", DOMAIN).dns_name
    before = server.metric("response_total", direction="inbound", status_code="200",
                           client_id=client_id)
    c = mesh.conn()
    for _ in range(3):
        c.request("GET", "/ok", headers={"Host": "web.example"})
        assert c.getresponse().read().startswith(b"ok")
    c.close()
    wait_for(lambda: server.metric("response_total", direction="inbound", status_code="200",
                                   client_id=client_id, authority="web.example") >= 3,
             what="inbound responses counted")
    assert server.metric("response_total", direction="inbound", status_code="200",
                         client_id=client_id) >= before + 3
    assert server.metric("request_total", direction="inbound", authority="web.example") >= 3
    assert server.metric("inbound_http_authz_allow_total", client_id=client_id) >= 3
    assert server.metric("response_latency_ms_count", direction="inbound",
                         status_code="200") >= 3


def test_slowloris_request_head_gets_408(mesh: Mesh) -> None:
    host, port = mesh.addresses["web"]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: web\r\n")  # and the blank line never comes
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"l5d-proxy-error: the request head" in answer
    assert mesh.client.metric("proxy_protocol_errors_total", cause="head-timeout") >= 1
    assert mesh.get("/ok")[0] == 200


def test_the_outbound_listener_routes_http_by_authority(mesh: Mesh) -> None:
    host, _, port = mesh.client.config["outbound"]["listen"].rpartition(":")
    web_port = mesh.addresses["web"][1]
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    c.request("GET", "/ok", headers={"Host": f"web.default.svc.{DOMAIN}:{web_port}"})
    r = c.getresponse()
    assert r.status == 200 and r.read().startswith(b"ok from")
    c.request("GET", "/ok", headers={"Host": f"nosuch.default.svc.{DOMAIN}"})
    r = c.getresponse()
    assert r.status == 502
    assert f"no service named nosuch.default.svc.{DOMAIN}" in r.getheader("l5d-proxy-error", "")
    c.close()


def test_pipelined_requests_are_answered_in_order(mesh: Mesh) -> None:
    host, port = mesh.addresses["web"]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n"
                  b"GET /missing HTTP/1.1\r\nHost: web\r\n\r\n"
                  b"GET /ok HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", answer) == [b"200", b"404", b"200"]


def test_a_client_that_half_closes_still_gets_its_answer(mesh: Mesh) -> None:
    host, port = mesh.addresses["web"]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok from " +
                                                                  str(_port_of(mesh)).encode())


def _port_of(mesh: Mesh) -> int:
    """The app port behind the web service (its body names it)."""
    status, body, _ = mesh.get("/ok")
    assert status == 200
    return int(body.rsplit(b" ", 1)[1])


def test_large_bodies_sent_while_upstream_connections_open(mesh: Mesh) -> None:
    # More uploads at once than the pool holds idle connections for: some wait for
    # a new connection with their body past the retry buffer, which must all arrive.
    body = bytes(range(256)) * 4096  # 1 MiB
    results: list[bytes] = []

    def upload() -> None:
        c = mesh.conn()
        c.request("POST", "/upload", body=body)
        results.append(c.getresponse().read())
        c.close()

    threads = [threading.Thread(target=upload) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [b"got %d" % len(body)] * 12


def test_clients_that_close_reuse_the_connection_between_proxies(mesh: Mesh) -> None:
    server = mesh.servers[0]
    mesh.get("/ok")  # a pooled connection to web's proxy exists from here on
    opened = server.metric("tcp_open_total", direction="inbound")
    for _ in range(5):
        c = mesh.conn()
        c.request("GET", "/ok", headers={"Connection": "close", "X-Hop": "1"})
        r = c.getresponse()
        assert r.status == 200 and r.read().startswith(b"ok from")
        assert r.getheader("connection") == "close"
        c.close()
    assert server.metric("tcp_open_total", direction="inbound") == opened
