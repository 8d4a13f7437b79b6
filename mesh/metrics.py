"""Metric families with Linkerd's names, labels and buckets, so that Linkerd
dashboards and queries work against meshgate proxies unchanged.

prometheus-client adds the ``_total`` suffix to counters itself: the family
``tcp_open`` is exposed as ``tcp_open_total``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from mesh.proxy.failover import Transition
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
        self.failover = FailoverMetrics(r)
        self.gateway_forwarded = Counter(
            "inbound_gateway_forwarded", "Connections whose caller a trusted gateway "
            "forwarded (transport header field 100); client_id is that caller",
            ("gateway_id", "client_id"), registry=r)


_MAX_CHILDREN = 10_000
"""Metric children kept looked up per family; bounds memory against label churn."""


class FailoverMetrics:
    """Failover between priority groups (mesh.proxy.failover), per service; observes
    the balancers' `Failover` and counts the retries and refusals of the exchanges.

    The serving group is a gauge per group, 1 for the one serving and 0 for the
    others (as ``kube_pod_status_phase``), rather than one gauge holding the serving
    priority: ``outbound_failover_group == 1`` then says by name which cluster serves
    each service, ``outbound_failover_group{cluster="west"} == 1`` alerts on one,
    and the cluster names match those of the events and of the seconds counter.
    """

    def __init__(self, r: CollectorRegistry) -> None:
        self.group = Gauge("outbound_failover_group", "1 for the priority group (by "
                           "cluster) that serves the service, 0 for those that did",
                           ("dst_service", "cluster"), registry=r, multiprocess_mode="max")
        self.events = Counter("outbound_failover_events", "Changes of the serving priority "
                              "group: failover (to a worse group or none) or failback",
                              ("dst_service", "from_cluster", "to_cluster", "direction",
                               "cause"), registry=r)
        self.group_seconds = Counter("outbound_failover_group_seconds", "Time each priority "
                                     "group spent serving the service",
                                     ("dst_service", "cluster"), registry=r)
        self.retries = Counter("outbound_failover_retries", "Requests retried into another "
                               "priority group than their last attempt's",
                               ("dst_service", "to_cluster"), registry=r)
        self.unreplayed = Counter("outbound_failover_unreplayed", "Requests that failed on a "
                                  "priority group and were not sent to another because they "
                                  "are not idempotent", ("dst_service", "cluster", "cause"),
                                  registry=r)
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, family: Any, *labels: str) -> Any:
        key = (family, *labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > _MAX_CHILDREN:
                self._children.clear()
            child = self._children[key] = family.labels(*labels)
        return child

    def moved(self, t: Transition) -> None:
        if t.from_group:
            self._child(self.group, t.service, t.from_group).set(0)
        if t.to_group:
            self._child(self.group, t.service, t.to_group).set(1)
        if t.direction != "initial":
            self.events.labels(t.service, t.from_group, t.to_group, t.direction,
                               t.cause).inc()

    def served(self, service: str, group: str, seconds: float) -> None:
        self._child(self.group_seconds, service, group).inc(seconds)

    def retried(self, service: str, to_group: str) -> None:
        self._child(self.retries, service, to_group).inc()

    def refused(self, service: str, group: str, cause: str) -> None:
        self._child(self.unreplayed, service, group, cause).inc()


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
