"""Watching HTTP/1.1 go by on a relayed connection, for per-request metrics,
without changing a byte.

The inbound side relays a connection whose transport header says ``http1``
opaquely to the application; a `HttpObserver` reads a copy of both directions
with llhttp (httptools) and records ``request_total``, ``response_total``,
``response_latency_ms`` and ``inbound_http_authz_allow_total`` per request.
Nothing is forwarded from here, so the strict framing reader the outbound side
needs is not used: llhttp's callbacks cost a few microseconds per message. If
the traffic stops parsing as HTTP/1.1, or switches protocols, observation
stops and the bytes keep flowing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import httptools

from mesh.metrics import ProxyMetrics

log = logging.getLogger("mesh.proxy.observe")


class _Requests:
    """llhttp callbacks for the client's direction."""

    def __init__(self, observer: HttpObserver) -> None:
        self.observer = observer
        self.host = b""
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.host = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 4 and name.lower() == b"host":
            self.host = value

    def on_headers_complete(self) -> None:
        self.observer.request(self.host, self.parser.get_method())


class _Responses:
    """llhttp callbacks for the application's direction."""

    def __init__(self, observer: HttpObserver) -> None:
        self.observer = observer
        self.parser: Any = None

    def on_headers_complete(self) -> None:
        self.observer.response_head(self.parser.get_status_code())

    def on_message_complete(self) -> None:
        self.observer.response_end()


class HttpObserver:
    def __init__(self, metrics: ProxyMetrics, labels: dict[str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.pending: deque[tuple[float, str, bool]] = deque()
        """Requests awaiting their response: start time, authority, HEAD or not."""
        self.active = True
        self._status = 0
        self._head_only = False
        self._children: dict[tuple[Any, ...], Any] = {}
        self._req = _Requests(self)
        self._req.parser = httptools.HttpRequestParser(self._req)
        self._resp = self._new_response_parser()

    def _new_response_parser(self) -> _Responses:
        resp = _Responses(self)
        resp.parser = httptools.HttpResponseParser(resp)
        return resp

    def _stop(self, why: str) -> None:
        if self.active:
            self.active = False
            log.debug("stopped observing HTTP on a relayed connection cause=%s", why)

    def from_client(self, data: bytes) -> None:
        if self.active:
            try:
                self._req.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._stop("upgrade")
            except httptools.HttpParserError as e:
                self._stop(f"request: {e}")

    def from_server(self, data: bytes) -> None:
        if not self.active:
            return
        try:
            self._resp.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop("protocol switched")
        except httptools.HttpParserError as e:
            self._stop(f"response: {e}")
        if self._head_only:
            # llhttp cannot be told a response to HEAD has no body: start afresh.
            self._head_only = False
            self._resp = self._new_response_parser()

    def request(self, host: bytes, method: bytes) -> None:
        authority = host.decode("latin-1")
        self.pending.append((time.monotonic(), authority, method == b"HEAD"))
        self._child("request", authority).inc()
        self._child("authz", authority).inc()

    def response_head(self, status: int) -> None:
        if status < 200 or not self.pending:
            return
        started, authority, head_only = self.pending[0]
        self._status = status
        self._child("latency", authority, status).observe(
            (time.monotonic() - started) * 1000)
        if head_only:
            self.response_end()
            self._head_only = True

    def response_end(self) -> None:
        if self.pending and self._status >= 200:
            _, authority, _ = self.pending.popleft()
            self._child("response", authority, self._status).inc()
            self._status = 0

    def _child(self, what: str, authority: str, status: int = 0) -> Any:
        key = (what, authority, status)
        child = self._children.get(key)
        if child is not None:
            return child
        labels = dict(self.labels, authority=authority)
        m = self.metrics
        if what == "request":
            child = m.request.labels(**labels)
        elif what == "authz":
            child = m.http_authz_allow.labels(
                direction="inbound", tls=labels["tls"], client_id=labels["client_id"],
                target_addr=labels["target_addr"])
        elif what == "latency":
            child = m.response_latency.labels(**labels, status_code=str(status))
        else:
            child = m.response.labels(**labels, status_code=str(status),
                                      classification="failure" if status >= 500 else "success",
                                      error="")
        self._children[key] = child
        return child
