"""Server-speaks-first protocols behind the mesh: the greeting arrives at once.

A client of SMTP, MySQL or Redis sends nothing until the server greets it, so
an outbound proxy that waited to detect the protocol would hold the
connection for its whole detection timeout (30 s here). Ports on Linkerd's
default opaque list skip detection in every proxy, and a Service marked
opaque by discovery (its ``config.meshgate.io/opaque-ports`` annotation, as
the destination API serves it) skips it on any port.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.config import OutboundConfig
from tests.meshproxy import (
    ProxyProcess,
    Trust,
    endpoint,
    free_port,
    service,
    services_file,
    start_proxy,
)

VIP = "127.0.1.30"
GREETING = b"220 mail.example ESMTP ready\r\n"
READ_WITHIN = 3.0
"""Seconds a greeting may take through the pair: far less than the detection timeout."""


class _Greeter(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(GREETING)
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture(scope="module")
def greeter() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Greeter)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _pair(root: Path, app_port: int, *, services: list[tuple[str, int, bool]],
          outbound: dict[str, object] | None = None) -> tuple[ProxyProcess, ProxyProcess]:
    trust = Trust.create(root)
    server = start_proxy(root, "server", {"identity": trust.workload("default", "mail")})
    inbound = server.inbound[1]
    discovery = services_file(root / "services.yaml", *(
        service(name, f"{VIP}:{port}", endpoint(inbound, app_port, "mail"), opaque=opaque)
        for name, port, opaque in services))
    client = start_proxy(root, "client", {
        "identity": trust.workload("default", "client"), "discovery": str(discovery),
        "detectTimeout": "30s",
        "outbound": {"listen": f"127.0.0.1:{free_port()}", **(outbound or {})}})
    return server, client


def _greeting(port: int) -> bytes:
    with socket.create_connection((VIP, port), timeout=READ_WITHIN) as s:
        got = b""
        while not got.endswith(b"\r\n"):
            chunk = s.recv(1024)  # socket.timeout fails the test: the proxy held it
            if not chunk:
                break
            got += chunk
        s.sendall(b"EHLO client\r\n")
        assert s.recv(1024) == b"EHLO client\r\n"
        return got


def test_the_default_opaque_ports_are_linkerds() -> None:
    assert OutboundConfig().opaque_ports == [25, 587, 3306, 4444, 5432, 6379, 9300, 11211]


def test_a_greeting_arrives_at_once(tmp_path: Path, greeter: int) -> None:
    """Port 3306 (MySQL) is on the default list; the second service is opaque
    because discovery says so, on a port of no known protocol."""
    other = free_port()
    server, client = _pair(tmp_path, greeter, services=[("mysql", 3306, False),
                                                        ("legacy", other, True)])
    try:
        assert _greeting(3306) == GREETING
        assert _greeting(other) == GREETING
        assert client.metric("tcp_open_total", direction="outbound") == 2
    finally:
        client.stop()
        server.stop()


def test_a_proxy_can_drop_the_default_list(tmp_path: Path, greeter: int) -> None:
    """With ``opaquePorts: []`` port 3306 is detected like any other: the client, which
    sends nothing, hears nothing until detection gives up."""
    server, client = _pair(tmp_path, greeter, services=[("mysql", 3306, False)],
                           outbound={"opaquePorts": []})
    try:
        with pytest.raises(TimeoutError):
            _greeting(3306)
    finally:
        client.stop()
        server.stop()
