"""Metric families with Linkerd's names, labels and buckets, so that Linkerd
dashboards and queries work against meshgate proxies unchanged.

prometheus-client adds the ``_total`` suffix to counters itself: the family
``tcp_open`` is exposed as ``tcp_open_total``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector

from mesh.memory import HeapCollector
from mesh.proxy.relay import FlowMetrics

# Linkerd's proxy buckets (linkerd2-proxy: metrics/latency.rs).
LATENCY_MS_BUCKETS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000,
                      3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)
DURATION_MS_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

TCP_LABELS = ("direction", "peer", "tls", "client_id", "server_id", "target_addr",
              "dst_service")
HTTP_LABELS = ("direction", "authority", "tls", "client_id", "server_id", "target_addr",
               "dst_service")
AUTHZ_LABELS = ("direction", "tls", "client_id", "target_addr")


@dataclass
class TcpMetrics:
    """The TCP families of Linkerd's proxy, which every relaying process exposes."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        # process_resident_memory_bytes, process_open_fds, ... as Linkerd's proxy has.
        ProcessCollector(registry=r)
        r.register(HeapCollector())
        self.tcp_open = Counter("tcp_open", "Connections opened", TCP_LABELS, registry=r)
        self.tcp_close = Counter("tcp_close", "Connections closed", (*TCP_LABELS, "errno"),
                                 registry=r)
        self.tcp_open_connections = Gauge("tcp_open_connections", "Connections open now",
                                          TCP_LABELS, registry=r, multiprocess_mode="livesum")
        self.tcp_read_bytes = Counter("tcp_read_bytes", "Bytes read from the peer",
                                      TCP_LABELS, registry=r)
        self.tcp_write_bytes = Counter("tcp_write_bytes", "Bytes written to the peer",
                                       TCP_LABELS, registry=r)
        self.tcp_connection_duration = Histogram(
            "tcp_connection_duration_ms", "How long connections lived",
            (*TCP_LABELS, "errno"), buckets=DURATION_MS_BUCKETS, registry=r)

    def flows(self) -> FlowMetrics:
        """What records each relayed flow in these families when it ends."""
        return FlowMetrics(opened=self.tcp_open, closed=self.tcp_close,
                           open_now=self.tcp_open_connections, read=self.tcp_read_bytes,
                           written=self.tcp_write_bytes, duration=self.tcp_connection_duration)


@dataclass
class ProxyMetrics(TcpMetrics):
    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.registry
        self.request = Counter("request", "HTTP requests", HTTP_LABELS, registry=r)
        self.response = Counter("response", "HTTP responses",
                                (*HTTP_LABELS, "status_code", "classification", "error"),
                                registry=r)
        self.response_latency = Histogram(
            "response_latency_ms", "Time from request to response headers",
            (*HTTP_LABELS, "status_code"), buckets=LATENCY_MS_BUCKETS, registry=r)
        self.tcp_authz_allow = Counter("inbound_tcp_authz_allow", "Connections authorized",
                                       AUTHZ_LABELS, registry=r)
        self.http_authz_allow = Counter("inbound_http_authz_allow", "Requests authorized",
                                        AUTHZ_LABELS, registry=r)
        self.http_authz_deny = Counter("inbound_http_authz_deny", "Requests refused",
                                       AUTHZ_LABELS, registry=r)
        self.tcp_authz_deny = Counter("inbound_tcp_authz_deny", "Connections refused",
                                      (*AUTHZ_LABELS, "reason"), registry=r)
        self.protocol_errors = Counter("proxy_protocol_errors", "Connections closed for "
                                       "malformed or unexpected bytes, by cause",
                                       ("direction", "cause"), registry=r)
        self.endpoint_ejections = Counter("outbound_endpoint_ejections",
                                          "Endpoints ejected by failure accrual",
                                          ("dst_service", "endpoint"), registry=r)
        self.gateway_forwarded = Counter(
            "inbound_gateway_forwarded", "Connections whose caller a trusted gateway "
            "forwarded (transport header field 100); client_id is that caller",
            ("gateway_id", "client_id"), registry=r)


@dataclass
class GatewayMetrics(TcpMetrics):
    """The gateway's families: its flows (direction="gateway") and its decisions."""

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.registry
        self.requests = Counter("gateway_requests", "Connections forwarded to a target "
                                "service, by target and caller", ("dst_service", "client_id"),
                                registry=r)
        self.refused = Counter("gateway_refused", "Connections refused, by reason; "
                               "dst_service and client_id are empty until known",
                               ("reason", "dst_service", "client_id"), registry=r)


_SHARED_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes(directory: Path) -> None:
    """Keep this process's metric values in files under `directory`, so that any
    of several worker processes can expose the sum of all of them.

    prometheus-client's multiprocess mode; call it before the first metric is
    made, in the parent before forking workers. `exposition()` then reads every
    worker's files, so a scrape that lands on any worker sees the whole proxy.
    """
    os.environ[_SHARED_ENV] = str(directory)
    _values.ValueClass = _values.MultiProcessValue()


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry`, or of all worker processes when shared."""
    directory = os.environ.get(_SHARED_ENV)
    if directory is None:
        return generate_latest(registry)
    combined = CollectorRegistry()
    MultiProcessCollector(combined, path=directory)
    return generate_latest(combined)
