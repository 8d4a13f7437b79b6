"""Watching HTTP/1.1 go by on a relayed connection, for per-request metrics,
without changing a byte.

The inbound side relays a connection whose transport header says ``http1``
opaquely to the application; a `HttpObserver` reads a copy of both directions
with the sans-IO framing reader and records ``request_total``,
``response_total`` and ``response_latency_ms`` per request. If the traffic
stops parsing as HTTP/1.1, or switches protocols, observation stops and the
bytes keep flowing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from mesh.errors import ProtocolError
from mesh.metrics import ProxyMetrics
from mesh.proxy import http1

log = logging.getLogger("mesh.proxy.observe")


class HttpObserver:
    def __init__(self, metrics: ProxyMetrics, labels: dict[str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.requests = http1.MessageReader("request")
        self.responses = http1.MessageReader("response")
        self.pending: deque[tuple[float, dict[str, str]]] = deque()
        self.active = True
        self._status = 0
        self._children: dict[Any, Any] = {}

    def _stop(self, why: str) -> None:
        if self.active:
            self.active = False
            log.debug("stopped observing HTTP on a relayed connection cause=%s", why)

    def from_client(self, data: bytes) -> None:
        if not self.active:
            return
        try:
            self.requests.receive_data(data)
            while True:
                event = self.requests.next_event()
                if isinstance(event, http1.Head):
                    host = event.values(b"host")
                    labels = dict(self.labels, authority=host[0].decode("latin-1")
                                  if host else "")
                    self.pending.append((time.monotonic(), labels))
                    self.responses.expect_response_to(event.method or "GET")
                    self._child("request", labels).inc()
                    self._child("authz", labels).inc()
                elif isinstance(event, (http1.Upgrade, http1.ConnectionClosed)) or \
                        event is http1.NEED_DATA or event is http1.PAUSED:
                    if event is http1.PAUSED:
                        self._stop("upgrade")
                    return
        except ProtocolError as e:
            self._stop(str(e))

    def from_server(self, data: bytes) -> None:
        if not self.active:
            return
        try:
            self.responses.receive_data(data)
            while True:
                event = self.responses.next_event()
                if isinstance(event, http1.Head) and event.status is not None and \
                        event.status >= 200 and self.pending:
                    started, labels = self.pending[0]
                    status = event.status
                    self._status = status
                    self._child(("latency", status), labels).observe(
                        (time.monotonic() - started) * 1000)
                elif isinstance(event, http1.End) and self.pending:
                    _, labels = self.pending.popleft()
                    self._child(("response", self._status), labels).inc()
                elif isinstance(event, http1.Upgrade):
                    self._stop("protocol switched")
                    return
                elif event is http1.NEED_DATA or isinstance(event, http1.ConnectionClosed):
                    return
        except ProtocolError as e:
            self._stop(str(e))

    def _child(self, what: Any, labels: dict[str, str]) -> Any:
        key = (what, labels.get("authority", ""))
        child = self._children.get(key)
        if child is not None:
            return child
        m = self.metrics
        if what == "request":
            child = m.request.labels(**labels)
        elif what == "authz":
            child = m.http_authz_allow.labels(
                direction="inbound", tls=labels["tls"], client_id=labels["client_id"],
                target_addr=labels["target_addr"])
        elif what[0] == "latency":
            child = m.response_latency.labels(**labels, status_code=str(what[1]))
        else:
            status = what[1]
            child = m.response.labels(**labels, status_code=str(status),
                                      classification="failure" if status >= 500 else "success",
                                      error="")
        self._children[key] = child
        return child
