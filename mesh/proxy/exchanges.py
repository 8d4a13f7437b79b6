"""What HTTP exchanges (mesh.proxy.exchange) keep besides their connection's state:
`Exchanges`, shared by every client connection of one proxy (the retry budget per
service, the metric children per label set, the timeouts), the `Route` from an
authority to a service on the outbound listener, `Request`, one request
and its response over one or more attempts, and the request head sent upstream for a
client that closes (`kept_alive`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy import http1, http1_head
from mesh.proxy.balancer import Balancer, EndpointState, Pick
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.failover import CONNECTION_CAUSES, Cause
from mesh.proxy.retry import IDEMPOTENT_METHODS, RetryBudget

log = logging.getLogger("mesh.proxy.http")

MAX_RETRY_BODY = 64 * 1024
"""The largest request body kept for a retry; a larger one streams on and is not retried."""

Route = Callable[[str], "tuple[ServiceSpec, Balancer] | None"]
"""An HTTP authority -> the service it names and its balancer, or None."""

_MAX_SERIES = 10_000
"""Metric children kept looked up; bounds memory against unbounded authorities."""


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt failed before any response byte reached the client."""

    status: int
    cause: str
    retryable: bool
    kind: Cause = Cause.STATUS
    """What it says of the endpoint, for failure accrual and failover."""


class Series:
    """Metric children for one label set, with per-status children made on first use."""

    def __init__(self, metrics: ProxyMetrics, labels: dict[str, str]) -> None:
        self.metrics, self.labels = metrics, labels
        self.request = metrics.request.labels(**labels)
        self._latency: dict[int, Any] = {}
        self._response: dict[tuple[int, str], Any] = {}

    def latency(self, status: int) -> Any:
        child = self._latency.get(status)
        if child is None:
            child = self._latency[status] = self.metrics.response_latency.labels(
                **self.labels, status_code=str(status))
        return child

    def response(self, status: int, classification: str) -> Any:
        child = self._response.get((status, classification))
        if child is None:
            child = self._response[(status, classification)] = self.metrics.response.labels(
                **self.labels, status_code=str(status), classification=classification,
                error="")
        return child


class Exchanges:
    """What every HTTP client connection of one proxy shares: the retry budgets, the
    metric children and the settings. `clock` is the retry budgets' clock."""

    def __init__(self, metrics: ProxyMetrics, *, request_timeout: float, head_timeout: float,
                 own_identity: Callable[[], Identity],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.head_timeout = head_timeout
        self.own_identity = own_identity
        self.clock = clock
        self.budgets: dict[str, RetryBudget] = {}
        self._cache: dict[tuple[bytes, str, str, str | None], Series] = {}

    def budget(self, service: str) -> RetryBudget:
        budget = self.budgets.get(service)
        if budget is None:
            budget = self.budgets[service] = RetryBudget(clock=self.clock)
        return budget

    def series(self, head: http1.Head, service: ServiceSpec, ep: EndpointSpec) -> Series:
        """The metric children of a request to `ep`, looked up once, not per request."""
        host = head.values(b"host")
        key = (host[0] if host else b"", service.name, ep.address, ep.identity)
        series = self._cache.get(key)
        if series is None:
            if len(self._cache) > _MAX_SERIES:
                self._cache.clear()
            series = self._cache[key] = Series(self.metrics, self.labels(
                head, service, ep.identity or "", ep.address))
        return series

    def labels(self, head: http1.Head, service: ServiceSpec, server_id: str,
               target: str) -> dict[str, str]:
        host = head.values(b"host")
        return {"direction": "outbound",
                "authority": host[0].decode("latin-1") if host else service.name,
                "tls": "true" if server_id else "no_identity",
                "client_id": str(self.own_identity()), "server_id": server_id,
                "target_addr": target, "dst_service": service.name}

    def failed(self, head: http1.Head, service: ServiceSpec, *, status: int,
               cause: str) -> None:
        """Count a request the proxy answered itself with an error."""
        self.metrics.response.labels(
            **self.labels(head, service, "", ""), status_code=str(status),
            classification="failure", error=cause.split(":")[0][:60]).inc()

    def moved_group(self, request: Request, to: EndpointState) -> None:
        """A retry of `request` goes to another priority group than its last attempt."""
        self.metrics.failover.retried(request.service.name,
                                      request.balancer.group_name(to.priority))

    def unreplayed(self, request: Request, failure: Failure) -> Failure:
        """`request` failed on an endpoint of a failover service and is not sent
        elsewhere because it is not idempotent: count it, and say so to the client."""
        balancer = request.balancer
        # A reused connection closed unanswered counts too: the request may have been
        # delivered, so it is not sent again either way.
        if request.idempotent or not balancer.group_names() or not request.tried or \
                failure.kind not in CONNECTION_CAUSES | {Cause.CLOSED}:
            return failure
        last = request.tried[-1]
        group = balancer.group_name(last.priority)
        self.metrics.failover.refused(request.service.name, group, failure.kind.value)
        where = "" if group in failure.cause else f" (group {group})"
        return Failure(failure.status, f"{failure.cause}{where}; {request.method} is not "
                       "idempotent and was not sent to another group", retryable=False,
                       kind=failure.kind)

    def refused(self, cause: str, peer: str, service: str, detail: object) -> None:
        """Count and log a connection refused for what its client sent (or did not)."""
        self.metrics.protocol_errors.labels("outbound", cause).inc()
        log.info("outbound request refused peer=%s service=%s cause=%s", peer,
                 service or "-", detail)


class Request:
    """One request and its response, over one or more attempts on endpoints."""

    __slots__ = ("balancer", "body", "body_size", "budget", "complete", "deadline", "head",
                 "idempotent", "method", "pick", "response_started", "reused", "series", "service",
                 "started", "status", "tried", "upgrade")

    def __init__(self, head: http1.Head, service: ServiceSpec, balancer: Balancer, *,
                 budget: RetryBudget, started: float, timeout: float) -> None:
        self.head, self.service, self.balancer, self.budget = head, service, balancer, budget
        self.method = head.method or "GET"
        self.idempotent = self.method in IDEMPOTENT_METHODS
        # CONNECT switches protocols on a 2xx whether or not it says Upgrade.
        self.upgrade = self.method == "CONNECT" or bool(head.values(b"upgrade"))
        self.started = started
        self.deadline = started + timeout
        self.body: list[bytes] | None = []  # kept for a retry while small; None once not
        self.body_size = 0
        self.complete = False
        self.tried: list[EndpointState] = []
        self.pick: Pick | None = None
        self.reused = False
        self.response_started = False
        self.status = 0
        self.series: Series | None = None


def answered(request: Request, head: http1.Head, status: int) -> Failure:
    """The attempt's answer was 502, 503 or 504. With ``l5d-proxy-error`` it is the
    gateway or destination proxy there that says so, not the app: that endpoint
    cannot serve (a gateway not ready, no endpoints behind it)."""
    said = head.values(b"l5d-proxy-error")
    where = request.balancer.where(request.tried[-1])
    if not said:
        return Failure(status, f"{where} answered {status}", retryable=True)
    return Failure(status, f"{where} answered {status}: {said[0].decode('latin-1')}",
                   retryable=True, kind=Cause.NOT_READY)


def unavailable(request: Request, last: Failure | None) -> Failure:
    """The answer when no endpoint is left to try: for a failover service, naming the
    groups it has (and the last attempt's failure)."""
    name = request.service.name
    groups = request.balancer.group_names()
    if not groups:
        return last or Failure(503, f"no endpoints available for {name}", retryable=False)
    cause = f"no healthy endpoint of {name} in groups {', '.join(groups)}"
    return Failure(503, f"{cause}; last: {last.cause}" if last else cause, retryable=False)


def kept_alive(head: http1.Head) -> bytes:
    """The request head to send upstream when the client closes after this request:
    without its Connection field (and the fields that names, hop-by-hop like it), so
    the connection between the proxies stays open for the pool. A client that does
    not keep its connections alive then costs a TCP accept, not a TLS handshake."""
    if head.version != "1.1" or head.values(b"upgrade"):
        return head.raw
    named = {token.strip().lower() for value in head.values(b"connection")
             for token in value.split(b",")}
    return http1_head.serialize_head(head, remove={b"connection", *named})
