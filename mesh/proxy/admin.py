"""The admin listener of a proxy or gateway (4191): ``/metrics``, ``/ready``,
``/live`` and whatever else its process serves, as plain GET routes.

It is an asyncio protocol over the data plane's own HTTP/1.1 reader
(mesh.proxy.http1), so a process that relays traffic does not load a web
framework for a few scrapes a minute. Each route is a function returning the
status, content type and body; it runs on the event loop and must be quick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import cast

from mesh.errors import ProtocolError
from mesh.proxy import http1, http1_head

log = logging.getLogger("mesh.proxy.admin")

Answer = tuple[int, str, bytes]
"""Status, content type and body."""
Route = Callable[[], Answer]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


def text(body: str, status: int = 200) -> Answer:
    return status, TEXT, body.encode()


class AdminServer:
    """The routes of one admin listener; `protocol` is its protocol factory."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)

    def protocol(self) -> asyncio.Protocol:
        return _AdminConnection(self)

    def answer(self, head: http1.Head) -> Answer:
        if head.method not in ("GET", "HEAD"):
            return text(f"{head.method} is not allowed; the admin endpoints answer GET\n",
                        405)
        path = (head.target or "/").split("?", 1)[0]
        route = self.routes.get(path)
        if route is None:
            known = ", ".join(sorted(self.routes))
            return text(f"no admin endpoint {path}; there are {known}\n", 404)
        try:
            return route()
        except Exception as e:  # a broken route must not take the listener down
            log.exception("admin endpoint failed path=%s", path)
            return text(f"{path} failed: {type(e).__name__}\n", 500)


class _AdminConnection(asyncio.Protocol):
    """One admin connection: requests answered in order, kept alive if asked."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.requests = http1.MessageReader("request")
        self.transport: asyncio.Transport | None = None
        self.head: http1.Head | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.requests.receive_data(data)
        self._advance()

    def eof_received(self) -> bool:
        self.requests.connection_closed()
        self._advance()
        return False

    def _advance(self) -> None:
        transport = self.transport
        while transport is not None and not transport.is_closing():
            try:
                event = self.requests.next_event()
            except ProtocolError as e:
                transport.write(http1_head.error_response(400, f"malformed request: {e}"))
                transport.close()
                return
            if isinstance(event, http1.Head):
                self.head = event
            elif event is http1.PAUSED:  # an upgrade was asked for: answered, not granted
                if self.head is not None:
                    self._respond(transport, self.head)
                    self.head = None
                self.requests.upgrade_declined()
            elif isinstance(event, http1.End) and self.head is not None:
                self._respond(transport, self.head)
                self.head = None
            elif isinstance(event, http1.ConnectionClosed | http1.Upgrade):
                transport.close()
                return
            elif event is http1.NEED_DATA:
                return

    def _respond(self, transport: asyncio.Transport, head: http1.Head) -> None:
        status, content_type, body = self.server.answer(head)
        keep_alive = self.requests.keep_alive
        reason = HTTPStatus(status).phrase
        close = "" if keep_alive else "Connection: close\r\n"
        out = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n{close}\r\n").encode()
        transport.write(out if head.method == "HEAD" else out + body)
        if not keep_alive:
            transport.close()
