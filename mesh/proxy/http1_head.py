"""HTTP/1.1 heads: the `Head` a `mesh.proxy.http1.MessageReader` reads, parsed from
the exact bytes of one (the start line checked here, the fields by httptools' llhttp),
and the heads a proxy writes (`serialize_head`, `error_response`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import httptools

from mesh.errors import ProtocolError

_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
"""A field value's characters (RFC 9110 field-vchar, SP and HTAB)."""
FIELD_NAME = re.compile(rb"%s+" % _TCHAR)
FIELD_LINE = re.compile(rb"%s+:%s" % (_TCHAR, FIELD_VALUE))
_REQUEST_LINE = re.compile(rb"(%s+) ([!-~]+) HTTP/(1\.[01])" % _TCHAR)
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-9][0-9]{2})(?: %s)?" % FIELD_VALUE)
_FIELD_VALUE_RE = re.compile(FIELD_VALUE)

Role = Literal["request", "response"]


class InvalidHead(ProtocolError):
    """A start line or header field is malformed."""


class InvalidFraming(ProtocolError):
    """Content-Length or Transfer-Encoding is invalid, conflicting or unsupported."""


@dataclass(frozen=True, slots=True)
class Head:
    """A request or response head; `raw` is exactly what arrived on the wire."""

    method: str | None
    target: str | None
    status: int | None
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    raw: bytes

    def __init__(self, method: str | None, target: str | None, status: int | None,
                 version: str, headers: tuple[tuple[bytes, bytes], ...], raw: bytes) -> None:
        # Written out, so that mypyc compiles it (see `Body`).
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "raw", raw)

    def values(self, name: bytes) -> list[bytes]:
        """The values of every field called `name`, compared case-insensitively."""
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]


class _HeadSink:
    """Collects llhttp's header callbacks."""

    __slots__ = ("complete", "headers")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value.rstrip(b" \t")))  # llhttp keeps trailing space

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(role: Role, raw: bytes) -> Head:
    line_end = raw.find(b"\r\n")
    if role == "request":
        request = _REQUEST_LINE.fullmatch(raw, 0, line_end)
        if request is None:
            raise InvalidHead(f"invalid request line {raw[: min(line_end, 80)]!r}")
        method, target, version = (g.decode("ascii") for g in request.groups())
        status = None
    else:
        response = _STATUS_LINE.fullmatch(raw, 0, line_end)
        if response is None:
            raise InvalidHead(f"invalid status line {raw[: min(line_end, 80)]!r}")
        method = target = None
        version, status = response[1].decode("ascii"), int(response[2])
    sink = _HeadSink()
    _feed_llhttp(role, raw, sink)
    if not sink.complete:
        raise InvalidHead(f"{role} head did not parse to the end of its fields")
    return Head(method, target, status, version, tuple(sink.headers), raw)


def _feed_llhttp(role: Role, raw: bytes, sink: _HeadSink) -> None:
    kind = httptools.HttpRequestParser if role == "request" else httptools.HttpResponseParser
    try:
        kind(sink).feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # llhttp stops at an upgrade or CONNECT; the fields are all read by then
    except httptools.HttpParserInvalidMethodError:
        # llhttp knows only registered methods, but RFC 9110 allows any token (already
        # checked); let it validate the fields behind a stand-in method.
        sink.headers.clear()
        _feed_llhttp(role, b"GET" + raw[raw.index(b" ") :], sink)
    except httptools.HttpParserError as exc:
        if sink.complete:
            # llhttp also pauses at a 101 (reported as an error, not as an upgrade) and
            # judges request framing after the fields; framing is checked in _Fields.
            return
        text = str(exc)
        framing = "Content-Length" in text or "Transfer-Encoding" in text
        raise (InvalidFraming if framing else InvalidHead)(f"invalid {role} head: {text}") from None


REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout", 508: "Loop Detected"}


def error_response(status: int, cause: str) -> bytes:
    """A proxy's own answer, which ends the connection: the cause goes in the body and
    in ``l5d-proxy-error``, as Linkerd's proxy sends it."""
    body = f"{cause}\n".encode()
    safe = cause.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return (b"HTTP/1.1 %d %s\r\nl5d-proxy-error: %s\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, REASONS.get(status, "Error").encode(), safe, len(body), body))


def serialize_head(
    head: Head,
    replace: dict[bytes, bytes] | None = None,
    remove: set[bytes] | None = None,
) -> bytes:
    """The head's bytes with fields replaced, added or removed (names case-insensitive).

    A field in `replace` keeps its first position and loses its other occurrences, or is
    appended if absent; fields in `remove` are dropped. Without changes this is `head.raw`.
    """
    if not replace and not remove:
        return head.raw
    updates: dict[bytes, tuple[bytes, bytes]] = {}
    for name, value in (replace or {}).items():
        if not FIELD_NAME.fullmatch(name) or not _FIELD_VALUE_RE.fullmatch(value):
            raise InvalidHead(f"cannot add header field {name[:40]!r}: {value[:40]!r}")
        updates[name.lower()] = (name, value)
    dropped = {name.lower() for name in remove or ()}
    lines = [head.raw[: head.raw.index(b"\r\n")]]
    placed: set[bytes] = set()
    for name, value in head.headers:
        low = name.lower()
        if low in updates:
            if low not in placed:
                placed.add(low)
                lines.append(name + b": " + updates[low][1])
        elif low not in dropped:
            lines.append(name + b": " + value)
    lines.extend(n + b": " + v for low, (n, v) in updates.items() if low not in placed)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
