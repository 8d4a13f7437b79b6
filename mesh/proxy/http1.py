"""HTTP/1.1 message framing for a proxy that relays bytes without re-encoding bodies.

A `MessageReader` reads one direction of a connection (requests from a client, or
responses from a server), sans-IO: `receive_data()` in, `next_event()` out. Events are
`Head` (with `raw`, the exact bytes to forward), `Body` (bytes exactly as on the wire,
chunk framing and trailers included; an undivided read is passed on uncopied), `End`,
`Upgrade` (a 101 or a 2xx to CONNECT: `rest` and all later bytes are opaque),
`ConnectionClosed`, and the sentinels `NEED_DATA` and `PAUSED` (a request asked to
upgrade: call `protocol_switched()` or `upgrade_declined()` once the response says).

Heads are parsed with httptools (llhttp), measured 7-13x faster than h11 on realistic
heads (`bench/http1_parsers.py`). Bodies are framed here (Content-Length, chunked,
close-delimited, none): the parsers only hand bodies back de-chunked. Lines must end in
CRLF; a bare LF is refused as a smuggling risk. Empty lines before a request line are
skipped (RFC 9112 section 2.2).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass

from mesh.errors import ProtocolError
from mesh.proxy.http1_head import (
    FIELD_LINE,
    FIELD_NAME,
    FIELD_VALUE,
    Head,
    InvalidFraming,
    InvalidHead,
    Role,
    parse_head,
)
from mesh.proxy.transport_header import NEED_DATA, NeedData

MAX_HEAD_SIZE = 64 * 1024
"""The largest head (start line, fields and the blank line) accepted, in bytes."""

_MAX_CHUNK_LINE = 4096
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;%s)?" % FIELD_VALUE)
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")


class HeadTooLarge(ProtocolError):
    """A head or trailer section is over `MAX_HEAD_SIZE`."""


class InvalidChunk(ProtocolError):
    """Chunked framing is broken: a bad chunk-size line, missing CRLF, bad trailer."""


class IncompleteMessage(ProtocolError):
    """The connection closed in the middle of a message."""


class UnexpectedData(ProtocolError):
    """Bytes arrived after a message that ended the connection."""


class ReaderStateError(ProtocolError):
    """The reader was asked to do something its state does not allow."""


class Paused(enum.Enum):
    """Sentinel: a request asked to switch protocols; the response decides."""

    PAUSED = "paused"


PAUSED = Paused.PAUSED


@dataclass(frozen=True)
class Body:
    """Body bytes as they appear on the wire (chunk framing included)."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        # Compiled with mypyc, a dataclass's generated __init__ stays interpreted and
        # costs several times a written one; events are made per message.
        object.__setattr__(self, "data", data)


@dataclass(frozen=True)
class End:
    """The message ended."""


@dataclass(frozen=True)
class Upgrade:
    """The connection switched protocols: these bytes, and all later ones, are opaque."""

    rest: bytes

    def __init__(self, rest: bytes) -> None:
        object.__setattr__(self, "rest", rest)


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection cleanly between messages."""


Event = Head | Body | End | Upgrade | ConnectionClosed | NeedData | Paused

_END = End()  # events without fields are made once (see `Body`)
_CLOSED = ConnectionClosed()


class _FastHash(enum.Enum):
    """Members are singletons, so identity is equality: hash them as objects (in C)
    rather than by name (in Python), which the transition table does per message."""

    __hash__ = object.__hash__


class _State(_FastHash):
    IDLE = "idle"  # between messages, or inside a head
    BODY = "body"
    AWAIT_SWITCH = "awaiting-switch"  # a request asked to upgrade
    TUNNEL = "tunnel"  # protocols switched; bytes are opaque
    DONE = "done"  # the last message on a connection that closes
    CLOSED = "closed"


class _Trigger(_FastHash):
    HEAD = "head"
    SWITCH = "switching head"
    END_KEEP_ALIVE = "end of message"
    END_CLOSE = "end of last message"
    END_UPGRADE = "end of upgrade request"
    SWITCHED = "protocol_switched()"
    DECLINED_KEEP_ALIVE = "upgrade_declined()"
    DECLINED_CLOSE = "upgrade_declined() on a closing connection"
    EOF = "connection close"


_TRANSITIONS: dict[tuple[_State, _Trigger], _State] = {
    (_State.IDLE, _Trigger.HEAD): _State.BODY,
    (_State.IDLE, _Trigger.SWITCH): _State.TUNNEL,
    (_State.IDLE, _Trigger.EOF): _State.CLOSED,
    (_State.BODY, _Trigger.END_KEEP_ALIVE): _State.IDLE,
    (_State.BODY, _Trigger.END_CLOSE): _State.DONE,
    (_State.BODY, _Trigger.END_UPGRADE): _State.AWAIT_SWITCH,
    (_State.AWAIT_SWITCH, _Trigger.SWITCHED): _State.TUNNEL,
    (_State.AWAIT_SWITCH, _Trigger.DECLINED_KEEP_ALIVE): _State.IDLE,
    (_State.AWAIT_SWITCH, _Trigger.DECLINED_CLOSE): _State.DONE,
    (_State.DONE, _Trigger.EOF): _State.CLOSED,
    (_State.TUNNEL, _Trigger.EOF): _State.CLOSED,
}


class _Framing(enum.Enum):
    NONE = "none"
    LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "close-delimited"


class _Chunk(enum.Enum):
    SIZE = "chunk-size line"
    DATA = "chunk data"
    DATA_CRLF = "CRLF after chunk data"
    TRAILERS = "trailer section"


class MessageReader:
    """Reads HTTP/1.x messages from one direction of a connection; see the module doc."""

    def __init__(self, role: Role) -> None:
        self._role: Role = role
        self._state = _State.IDLE
        self._buf: bytes | bytearray = b""
        self._pos = 0  # bytes before this are consumed
        self._scan = 0  # where the next search for a terminator may start
        self._eof = False
        self._error: ProtocolError | None = None
        self._keep_alive = True
        self._methods: deque[str] = deque()  # requests awaiting a response, in order
        self._framing = _Framing.NONE
        self._remaining = 0
        self._chunk = _Chunk.SIZE
        self._end_due = False
        self._end_trigger = _Trigger.END_KEEP_ALIVE
        self._upgrade_due = False

    @property
    def keep_alive(self) -> bool:
        """False once a message said the connection closes after it (Connection: close,
        HTTP/1.0 without keep-alive, a close-delimited body, a protocol switch)."""
        return self._keep_alive

    @property
    def buffered(self) -> int:
        """How many received bytes no event has consumed yet."""
        return len(self._buf) - self._pos

    @property
    def eof(self) -> bool:
        """Whether `connection_closed()` was called."""
        return self._eof

    def expect_response_to(self, method: str) -> None:
        """Queue the method of a request sent upstream; its response is framed by it."""
        if self._role != "response":
            raise ReaderStateError("expect_response_to() is for a response reader")
        self._methods.append(method)

    def expect_head_response(self) -> None:
        """The next response answers a HEAD request, so it has no body."""
        self.expect_response_to("HEAD")

    def protocol_switched(self) -> None:
        """The server agreed to the request's upgrade (101, or 2xx to CONNECT)."""
        self._fire(_Trigger.SWITCHED)
        self._keep_alive = False
        self._upgrade_due = True

    def upgrade_declined(self) -> None:
        """The server answered the upgrade request normally; keep reading HTTP."""
        closing = _Trigger.DECLINED_KEEP_ALIVE if self._keep_alive else _Trigger.DECLINED_CLOSE
        self._fire(closing)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection; `b""` is ignored (see `connection_closed`)."""
        if not data:
            return
        if self._eof:
            raise ReaderStateError(f"{self._role} reader got data after connection_closed()")
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            self._buf = data  # the common case: nothing left over, keep the caller's bytes
        else:
            if isinstance(buf, bytes):
                buf = bytearray(memoryview(buf)[pos:])
            else:
                del buf[:pos]
            buf += data
            self._buf = buf
        self._scan = max(0, self._scan - pos)
        self._pos = 0

    def connection_closed(self) -> None:
        """The peer closed its side: ends a close-delimited body, else checks completeness."""
        self._eof = True

    def next_event(self) -> Event:
        """The next event; raises a `ProtocolError` subclass (and again on later calls)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        state = self._state
        if state is _State.IDLE:
            return self._read_head()
        if state is _State.BODY:
            return self._read_body()
        if state is _State.AWAIT_SWITCH:
            return PAUSED
        if state is _State.TUNNEL:
            rest = self._take(len(self._buf))
            if rest or self._upgrade_due:
                self._upgrade_due = False
                return Upgrade(rest)
            return self._closed_or_need_data()
        if state is _State.DONE and self._pos < len(self._buf):
            raise UnexpectedData(f"bytes arrived after a {self._role} that closed the connection")
        return self._closed_or_need_data()

    def _closed_or_need_data(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._state is not _State.CLOSED:
            self._fire(_Trigger.EOF)
        return _CLOSED

    def _fire(self, trigger: _Trigger) -> None:
        state = _TRANSITIONS.get((self._state, trigger))
        if state is None:
            state_now = f"{self._role} reader is {self._state.value}"
            raise ReaderStateError(f"{trigger.value} is not allowed while the {state_now}")
        self._state = state

    def _take(self, end: int) -> bytes:
        """Consume and return the buffered bytes up to `end`."""
        data = _copy(self._buf, self._pos, end)
        self._pos = end
        return data

    # ------------------------------------------------------------------ heads

    def _read_head(self) -> Event:
        buf, pos = self._buf, self._pos
        if self._role == "request":
            while buf.startswith(b"\r\n", pos):
                pos += 2
            self._pos = pos
        if pos == len(buf):
            return self._closed_or_need_data()
        start, limit = max(pos, self._scan), pos + MAX_HEAD_SIZE
        term = buf.find(b"\n\r\n", start, limit)
        bare_lf = buf.find(b"\n\n", start, limit if term == -1 else term)
        if bare_lf != -1 or term == pos or (term != -1 and buf[term - 1] != 0x0D):
            raise InvalidHead(f"{self._role} head has a line ending in a bare LF, not CRLF")
        if term == -1:
            if len(buf) - pos >= MAX_HEAD_SIZE:
                raise HeadTooLarge(f"{self._role} head is over {MAX_HEAD_SIZE} bytes")
            if self._eof:
                raise IncompleteMessage(f"connection closed inside a {self._role} head")
            self._scan = len(buf) - 2
            return NEED_DATA
        self._scan = 0
        head = parse_head(self._role, self._take(term + 3))
        return self._start_message(head)

    def _start_message(self, head: Head) -> Head:
        fields = _Fields(head)
        if head.status is not None and head.status < 200 and head.status != 101:
            self._begin(_Framing.NONE, 0, _Trigger.END_KEEP_ALIVE)  # interim response
            return head
        keep_alive = fields.keep_alive(head.version)
        if head.status is None:
            framing, length = fields.framing(self._role, head.version)
        else:
            method = self._methods.popleft() if self._methods else None
            if head.status == 101 or (method == "CONNECT" and 200 <= head.status < 300):
                self._keep_alive = False
                self._fire(_Trigger.SWITCH)
                self._upgrade_due = True
                return head
            if method == "HEAD" or head.status in (204, 304):
                framing, length = _Framing.NONE, 0
            else:
                framing, length = fields.framing(self._role, head.version)
        if framing is _Framing.UNTIL_CLOSE:
            keep_alive = False
        self._keep_alive = self._keep_alive and keep_alive
        if fields.asks_upgrade(head):
            end = _Trigger.END_UPGRADE
        elif self._keep_alive:
            end = _Trigger.END_KEEP_ALIVE
        else:
            end = _Trigger.END_CLOSE
        self._begin(framing, length, end)
        return head

    def _begin(self, framing: _Framing, length: int, end: _Trigger) -> None:
        self._fire(_Trigger.HEAD)
        self._framing, self._remaining, self._end_trigger = framing, length, end
        self._chunk = _Chunk.SIZE
        self._end_due = framing is _Framing.NONE or (framing is _Framing.LENGTH and length == 0)

    # ------------------------------------------------------------------ bodies

    def _read_body(self) -> Event:
        if self._end_due:
            self._end_due = False
            self._fire(self._end_trigger)
            return _END
        start = self._pos
        if self._framing is _Framing.LENGTH:
            end = min(len(self._buf), start + self._remaining)
            self._remaining -= end - start
            self._end_due = self._remaining == 0
        elif self._framing is _Framing.CHUNKED:
            end = self._scan_chunks()
        else:  # close-delimited
            end = len(self._buf)
            self._end_due = end == start and self._eof
        if end > start:
            return Body(self._take(end))
        if self._end_due:
            return self._read_body()
        if self._eof:
            where = self._chunk.value
            if self._framing is _Framing.LENGTH:
                where = f"last {self._remaining} bytes"
            raise IncompleteMessage(f"connection closed in the {where} of a {self._role} body")
        return NEED_DATA

    def _scan_chunks(self) -> int:
        """Walk chunk framing from `_pos`; return how far the bytes are complete."""
        buf, pos, end = self._buf, self._pos, len(self._buf)
        while pos < end:
            phase = self._chunk
            if phase is _Chunk.DATA:
                step = min(self._remaining, end - pos)
                pos += step
                self._remaining -= step
                if self._remaining:
                    break
                self._chunk = _Chunk.DATA_CRLF
            elif phase is _Chunk.DATA_CRLF:
                if not b"\r\n".startswith(buf[pos : pos + 2]):
                    raise InvalidChunk(f"chunk data is not followed by CRLF in a {self._role}")
                if end - pos < 2:
                    break
                pos += 2
                self._chunk = _Chunk.SIZE
            elif phase is _Chunk.SIZE:
                line_end = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
                if line_end == -1:
                    if end - pos >= _MAX_CHUNK_LINE:
                        raise InvalidChunk(f"chunk-size line over {_MAX_CHUNK_LINE} bytes")
                    break
                pos = self._chunk_size(buf, pos, line_end)
            else:
                done = self._trailers_end(buf, pos)
                if done == -1:
                    break
                pos = done
                self._end_due = True
                break
        return pos

    def _chunk_size(self, buf: bytes | bytearray, pos: int, line_end: int) -> int:
        match = _CHUNK_SIZE_LINE.fullmatch(buf, pos, line_end)
        if match is None:
            line = bytes(buf[pos : min(line_end, pos + 40)])
            raise InvalidChunk(f"invalid chunk-size line {line!r} in a {self._role}")
        if len(match[1]) > 16:
            raise InvalidChunk(f"chunk size {match[1][:20]!r}... is over 64 bits")
        self._remaining = int(match[1], 16)
        self._chunk = _Chunk.DATA if self._remaining else _Chunk.TRAILERS
        return line_end + 2

    def _trailers_end(self, buf: bytes | bytearray, pos: int) -> int:
        """The end of the trailer section starting at `pos`, or -1 if not all here yet."""
        if buf.startswith(b"\r\n", pos):
            return pos + 2
        if len(buf) - pos < 2:
            if buf[pos] != 0x0D and not FIELD_NAME.match(buf, pos):
                raise InvalidChunk(f"invalid trailer section in a {self._role}")
            return -1
        start = max(pos, self._scan)
        term = buf.find(b"\r\n\r\n", start, pos + MAX_HEAD_SIZE)
        if term == -1:
            if len(buf) - pos >= MAX_HEAD_SIZE:
                raise HeadTooLarge(f"{self._role} trailer section is over {MAX_HEAD_SIZE} bytes")
            self._scan = len(buf) - 3
            return -1
        self._scan = 0
        for line in bytes(buf[pos:term]).split(b"\r\n"):
            if not FIELD_LINE.fullmatch(line):
                raise InvalidChunk(f"invalid trailer field {line[:40]!r} in a {self._role}")
        return term + 4


class _Fields:
    """The header fields that decide framing and connection reuse, read in one pass."""

    def __init__(self, head: Head) -> None:
        self.lengths: list[bytes] = []
        self.codings: list[bytes] = []
        self.connection: set[bytes] = set()
        self.upgrade = False
        for name, value in head.headers:
            low = name.lower()
            if low == b"content-length":
                self.lengths.extend(v.strip() for v in value.split(b","))
            elif low == b"transfer-encoding":
                self.codings.extend(v.strip().lower() for v in value.split(b","))
            elif low == b"connection":
                self.connection.update(v.strip().lower() for v in value.split(b","))
            elif low == b"upgrade":
                self.upgrade = True

    def keep_alive(self, version: str) -> bool:
        if b"close" in self.connection:
            return False
        return version != "1.0" or b"keep-alive" in self.connection

    def asks_upgrade(self, head: Head) -> bool:
        """Whether a request may switch the connection to another protocol."""
        upgrade = self.upgrade and b"upgrade" in self.connection and head.version == "1.1"
        return head.method == "CONNECT" or (upgrade and head.method is not None)

    def framing(self, role: Role, version: str) -> tuple[_Framing, int]:
        if self.codings:
            return self._transfer_coding(role, version), 0
        if self.lengths:
            if any(not _CONTENT_LENGTH.fullmatch(v) for v in self.lengths):
                raise InvalidFraming(f"invalid Content-Length {b', '.join(self.lengths)!r}")
            if len(set(self.lengths)) > 1:
                raise InvalidFraming(f"conflicting Content-Length {b', '.join(self.lengths)!r}")
            return _Framing.LENGTH, int(self.lengths[0])
        if role == "request":
            return _Framing.LENGTH, 0
        return _Framing.UNTIL_CLOSE, 0

    def _transfer_coding(self, role: Role, version: str) -> _Framing:
        codings = b", ".join(self.codings)
        if version == "1.0":
            raise InvalidFraming(f"HTTP/1.0 {role} has Transfer-Encoding {codings!r}")
        if self.lengths:
            raise InvalidFraming(f"{role} has both Transfer-Encoding and Content-Length")
        if self.codings[-1] == b"chunked":
            if b"chunked" in self.codings[:-1]:
                raise InvalidFraming(f"{role} is chunked more than once: {codings!r}")
            return _Framing.CHUNKED
        if role == "request":
            raise InvalidFraming(f"request Transfer-Encoding {codings!r} does not end in chunked")
        return _Framing.UNTIL_CLOSE


def _copy(buf: bytes | bytearray, start: int, end: int) -> bytes:
    if isinstance(buf, bytes):
        # The whole of `buf` comes back as itself, uncopied (said outright: compiled
        # code copies even a slice of everything).
        return buf if start == 0 and end == len(buf) else buf[start:end]
    with memoryview(buf) as view, view[start:end] as part:
        return bytes(part)
