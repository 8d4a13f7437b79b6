"""The inbound HTTP observer counts what passes without being fooled by framing."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import ProxyMetrics
from mesh.proxy.observe import HttpObserver

LABELS = {"direction": "inbound", "authority": "", "tls": "true", "client_id": "c",
          "server_id": "", "target_addr": "127.0.0.1:80", "dst_service": ""}


def _responses(m: ProxyMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            if s.name == "response_total":
                out[(s.labels["authority"], s.labels["status_code"])] = s.value
    return out


def test_pipelined_requests_head_and_chunked_bodies() -> None:
    m = ProxyMetrics()
    o = HttpObserver(m, LABELS)
    o.from_client(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nHEAD /b HTTP/1.1\r\nHost: b\r\n\r\n"
                  b"POST /c HTTP/1.1\r\nHost: c\r\nContent-Length: 3\r\n\r\nxyz")
    o.from_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    o.from_server(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n")  # HEAD: no body
    o.from_server(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 1\r\n\r\n!")
    assert _responses(m) == {("a", "200"): 1.0, ("b", "404"): 1.0, ("c", "503"): 1.0}
    assert o.active and not o.pending


def test_upgrade_and_garbage_stop_observation_only() -> None:
    m = ProxyMetrics()
    o = HttpObserver(m, LABELS)
    o.from_client(b"GET /ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"\r\n")
    assert not o.active
    o.from_server(b"\x81\x05hello")  # ignored, never raises
    g = HttpObserver(m, LABELS)
    g.from_client(b"\x16\x03\x01 not http at all")
    assert not g.active
