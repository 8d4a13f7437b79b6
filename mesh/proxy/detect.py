"""Protocol detection, sans-IO: is a new connection HTTP/1, HTTP/2 or opaque?

The proxy feeds the first bytes a client sends into a `Detector` and asks `result()`
after each read. The answer comes as soon as the bytes prove it:

- HTTP/1 once a whole request line `METHOD SP target SP HTTP/1.x CRLF` has arrived
  (an `Upgrade: h2c` request is still an HTTP/1 request);
- HTTP/2 once the prior-knowledge preface `PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n` has;
- opaque as soon as a byte cannot continue either (a TLS ClientHello fails at its first
  byte), or when no CRLF arrives within `max_bytes`.

Every byte read stays in `buffered`, so the chosen handler starts from the first one.

Timing out is the caller's job. A server-speaks-first protocol (SMTP, MySQL, ...) has a
client that sends nothing until the server greets it, so the caller waits at most its
detection timeout and then takes `Detector.timeout_result()`, which is opaque. Ports known
to be such protocols skip detection altogether: see `opaque_for()`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
"""Linkerd's default opaque ports: SMTP, MySQL, Galera, Postgres, Redis, Elasticsearch
and Memcached, whose servers speak first so detection could only time out."""

_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
# Registered methods all start with an uppercase letter, so anything else (a TLS record,
# a binary protocol, a lowercase word) is rejected at the first byte.
_METHOD = rb"[A-Z]" + _TCHAR + rb"*"
_TARGET = rb"[!-~]+"
_REQUEST_LINE = re.compile(_METHOD + rb" " + _TARGET + rb" HTTP/1\.[01]\r\n")


def _prefixes(literal: bytes) -> bytes:
    """A pattern matching every prefix of `literal`, including the empty one."""
    pattern = b""
    for byte in reversed(literal):
        pattern = b"(?:" + re.escape(bytes([byte])) + pattern + b")?"
    return pattern


# Matches exactly the byte strings that can still grow into a request line.
_VERSION_PREFIX = b"(?:" + _prefixes(b"HTTP/1.") + rb"|HTTP/1\.[01]\r?)"
_REQUEST_LINE_PREFIX = re.compile(
    _METHOD + b"(?: (?:" + _TARGET + b"(?: " + _VERSION_PREFIX + b")?)?)?"
)


class ProtocolKind(enum.Enum):
    """What a connection speaks, as far as the proxy cares."""

    HTTP1 = "http/1"
    HTTP2 = "h2"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class Detected:
    """A detection outcome and, for logs, the evidence it rests on."""

    protocol: ProtocolKind
    reason: str


class Detector:
    """Decides a connection's protocol from its first bytes; see the module docstring."""

    def __init__(self, max_bytes: int = 1024) -> None:
        if max_bytes < len(H2_PREFACE):
            raise ValueError(
                f"Detector max_bytes must be at least {len(H2_PREFACE)} to see the HTTP/2 "
                f"preface, got {max_bytes}"
            )
        self._max_bytes = max_bytes
        self._buf = bytearray()
        self._result: Detected | None = None

    @property
    def buffered(self) -> bytes:
        """Every byte received so far, in order, decided or not."""
        return bytes(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client. Bytes after a decision are kept too."""
        self._buf += data
        if self._result is None:
            self._result = self._decide()

    def result(self) -> Detected | None:
        """The decision, or None while the bytes so far fit more than one protocol."""
        return self._result

    def timeout_result(self) -> Detected:
        """The decision to take when the detection timeout fires: opaque if undecided.

        A client that sends nothing (or too little) before the timeout is most likely
        waiting for a server-speaks-first protocol's greeting.
        """
        if self._result is None:
            self._result = Detected(
                ProtocolKind.OPAQUE,
                f"detection timed out after {len(self._buf)} bytes; "
                "assuming a server-speaks-first protocol",
            )
        return self._result

    def connection_closed(self) -> Detected:
        """The client closed before a decision: relay what it sent opaquely."""
        if self._result is None:
            self._result = Detected(
                ProtocolKind.OPAQUE, f"client closed after {len(self._buf)} bytes"
            )
        return self._result

    def _decide(self) -> Detected | None:
        buf = self._buf
        if len(buf) < len(H2_PREFACE):
            if H2_PREFACE.startswith(buf):
                return None
        elif buf.startswith(H2_PREFACE):
            return Detected(ProtocolKind.HTTP2, "HTTP/2 prior-knowledge preface")
        end = buf.find(b"\r\n", 0, self._max_bytes)
        if end != -1:
            if _REQUEST_LINE.fullmatch(buf, 0, end + 2):
                return Detected(ProtocolKind.HTTP1, "HTTP/1 request line")
            return Detected(ProtocolKind.OPAQUE, "first line is not an HTTP/1 request line")
        limit = min(len(buf), self._max_bytes)
        if not _REQUEST_LINE_PREFIX.fullmatch(buf, 0, limit):
            return Detected(ProtocolKind.OPAQUE, _why_not_http(buf[:limit]))
        if len(buf) >= self._max_bytes:
            return Detected(ProtocolKind.OPAQUE, f"no CRLF within {self._max_bytes} bytes")
        return None


def _why_not_http(head: bytearray) -> str:
    """Name the first byte that cannot belong to a request line, for logs."""
    # Viability is monotone (no extension of a dead prefix lives), so bisect for the
    # shortest dead prefix instead of trying every length.
    good, bad = 0, len(head)
    while bad - good > 1:
        mid = (good + bad) // 2
        if _REQUEST_LINE_PREFIX.fullmatch(head, 0, mid):
            good = mid
        else:
            bad = mid
    return f"byte {good} ({bytes(head[good:bad])!r}) cannot be part of an HTTP/1 request line"


def opaque_for(port: int, opaque_ports: frozenset[int]) -> bool:
    """Whether connections to `port` skip detection and are relayed opaquely.

    `opaque_ports` is the proxy's list (``outbound.opaquePorts``), `DEFAULT_OPAQUE_PORTS`
    unless configured; a Service's own opaque ports come from discovery.
    """
    return port in opaque_ports
