"""The ``Forwarded`` header (RFC 7239) the gateway adds to HTTP/1 requests, sans-IO.

When a transport header says the session protocol is HTTP/1, the gateway runs the
caller's bytes through `ForwardedRequests` on their way to the target: every
request head gains one field line ``Forwarded: for="<caller>";by="<gateway>"``
(identities as quoted strings), bodies pass byte for byte. A request whose
``Forwarded`` already names this gateway in ``by`` has been here before: that is a
loop, and `ForwardedLoop` is raised instead.

The gateway does not read responses, so after a request that asks to upgrade the
rest of the connection is relayed as it is, without more ``Forwarded`` fields.
"""

from __future__ import annotations

import re

from mesh.errors import ProtocolError
from mesh.proxy import http1

_BY = re.compile(r'(?:^|;)\s*by\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)


class ForwardedLoop(ProtocolError):
    """A request's Forwarded header shows it already passed through this gateway."""


def quoted(value: str) -> str:
    """`value` as an RFC 7230 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwarded_by(values: list[bytes]) -> list[str]:
    """Every ``by`` node named in Forwarded field values, unquoted."""
    nodes: list[str] = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            for match in _BY.finditer(element.strip()):
                node = match.group(1)
                if node.startswith('"'):
                    node = re.sub(r"\\(.)", r"\1", node[1:-1])
                nodes.append(node)
    return nodes


class ForwardedRequests:
    """Adds a Forwarded field to each request of one HTTP/1 client connection.

    `feed` takes bytes as read from the caller and returns what to send to the
    target; it raises `ForwardedLoop`, or another `ProtocolError` for bytes that
    are not HTTP/1 requests.
    """

    def __init__(self, *, caller: str, gateway: str) -> None:
        self.gateway = gateway
        self.field = f"Forwarded: for={quoted(caller)};by={quoted(gateway)}\r\n".encode()
        self._reader = http1.MessageReader("request")
        self._opaque = False

    def feed(self, data: bytes) -> bytes:
        if self._opaque:
            return data
        self._reader.receive_data(data)
        out: list[bytes] = []
        while True:
            event = self._reader.next_event()
            if isinstance(event, http1.Head):
                out.append(self._rewrite(event))
            elif isinstance(event, http1.Body):
                out.append(event.data)
            elif isinstance(event, http1.Upgrade):
                out.append(event.rest)
                self._opaque = True
                break
            elif event is http1.PAUSED:
                # The response decides whether the protocol switches; it is not ours to
                # read, so from here the connection is relayed as it is.
                self._reader.protocol_switched()
            elif event is http1.NEED_DATA or isinstance(event, http1.ConnectionClosed):
                break
        return b"".join(out)

    def _rewrite(self, head: http1.Head) -> bytes:
        if self.gateway in forwarded_by(head.values(b"forwarded")):
            raise ForwardedLoop(f"{head.method} {head.target} already passed through "
                                f"{self.gateway} (its Forwarded header says so)")
        # The head ends with the empty line: the new field goes just before it.
        return head.raw[:-2] + self.field + b"\r\n"
