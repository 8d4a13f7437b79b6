"""Linkerd's transport header, sans-IO: the first bytes a proxy sends to a peer proxy.

After a TLS handshake with ALPN `transport.l5d.io/v1` the client proxy writes the
preface `transport.l5d.io/v1\\r\\n\\r\\n`, a big-endian u32 length and a protobuf
message, then the relayed stream. The message is Linkerd's `transport.l5d.io.Header`
(linkerd2-proxy, `linkerd/transport-header/proto/header.proto`)::

    message Header {
      int32 port = 1;
      string name = 2;                       // optional; intended for gateway forwarding
      SessionProtocol session_protocol = 3;  // absent: the stream is opaque
      string caller = 100;                   // meshgate only (Linkerd skips it)
      CallerAssertion assertion = 101;       // meshgate only (Linkerd skips it)
    }
    message SessionProtocol {
      message Http1 {}
      message Http2 {}
      oneof kind { Http1 http1 = 1; Http2 http2 = 2; }
    }

    message CallerAssertion {   // signed by the caller's proxy (mesh.proxy.assertion)
      bytes claims = 1;          // an encoded AssertionClaims: the signed bytes
      bytes signature = 2;       // ECDSA P-256 SHA-256 with the caller's workload key
      repeated bytes chain = 3;  // the caller's certificates, DER, leaf first
    }
    message AssertionClaims {
      string caller = 1;     // the caller's identity name
      string authority = 2;  // the target service: the header name it is sent with
      int64 not_after = 3;   // Unix seconds
      bytes nonce = 4;       // random; names this assertion in replay caches
    }

`TransportHeader.encode()` writes all of it; `HeaderDecoder` reads it back as bytes
arrive and keeps whatever follows the header in `trailing_data`. Unknown fields are
skipped, as protobuf requires, so a Linkerd proxy reads meshgate's headers and the other
way round.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mesh.errors import ProtocolError

ALPN = "transport.l5d.io/v1"
PREFACE = b"transport.l5d.io/v1\r\n\r\n"
MAX_HEADER_LENGTH = 64 * 1024
"""The largest protobuf message accepted, in bytes (the u32 length field)."""

_PREFIX_LENGTH = len(PREFACE) + 4
_PORT, _NAME, _SESSION_PROTOCOL, _CALLER, _ASSERTION = 1, 2, 3, 100, 101
_CLAIMS, _SIGNATURE, _CHAIN = 1, 2, 3
_CLAIM_CALLER, _CLAIM_AUTHORITY, _CLAIM_NOT_AFTER, _CLAIM_NONCE = 1, 2, 3, 4
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class HeaderTooLarge(ProtocolError):
    """The transport header's length field is over `MAX_HEADER_LENGTH`."""


class BadPreface(ProtocolError):
    """The stream does not start with the transport header preface."""


class MalformedHeader(ProtocolError):
    """The header's protobuf message is invalid (truncated, wrong wire type, bad port)."""


class TruncatedHeader(ProtocolError):
    """The connection closed before the whole transport header arrived."""


class NeedData(enum.Enum):
    """Sentinel returned by `next_event()`: feed more bytes with `receive_data()`."""

    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA


class SessionProtocol(enum.Enum):
    """Linkerd's `SessionProtocol.kind`; each value is its field number in the oneof."""

    HTTP1 = 1
    HTTP2 = 2


@dataclass(frozen=True)
class AssertionClaims:
    """What a caller asserts: who it is, which service it calls, until when; `nonce`
    makes each signed assertion distinct."""

    caller: str
    authority: str
    not_after: int
    nonce: bytes

    def encode(self) -> bytes:
        msg = bytearray()
        _put_bytes(msg, _CLAIM_CALLER, self.caller.encode())
        _put_bytes(msg, _CLAIM_AUTHORITY, self.authority.encode())
        msg += _encode_varint(_CLAIM_NOT_AFTER << 3)
        msg += _encode_varint(self.not_after & 0xFFFFFFFFFFFFFFFF)
        _put_bytes(msg, _CLAIM_NONCE, self.nonce)
        return bytes(msg)

    @classmethod
    def decode(cls, data: bytes) -> AssertionClaims:
        """Read encoded claims; raises `MalformedHeader` on bad protobuf or UTF-8."""
        caller = authority = ""
        not_after, nonce, pos, end = 0, b"", 0, len(data)
        while pos < end:
            field, wire_type, pos = _read_key(data, pos, end)
            if field == _CLAIM_NOT_AFTER:
                _expect_wire_type(field, wire_type, _VARINT, "assertion.claims.")
                value, pos = _read_varint(data, pos, end)
                not_after = value - (1 << 64) if value >= 1 << 63 else value
            elif field in (_CLAIM_CALLER, _CLAIM_AUTHORITY, _CLAIM_NONCE):
                _expect_wire_type(field, wire_type, _LENGTH_DELIMITED, "assertion.claims.")
                start, pos = _read_length(data, pos, end)
                if field == _CLAIM_NONCE:
                    nonce = data[start:pos]
                elif field == _CLAIM_CALLER:
                    caller = _utf8(data, start, pos, "assertion caller")
                else:
                    authority = _utf8(data, start, pos, "assertion authority")
            else:
                pos = _skip(data, pos, end, wire_type)
        return cls(caller, authority, not_after, nonce)


@dataclass(frozen=True)
class CallerAssertion:
    """A caller's signed claims and the certificate chain that vouches for its key.

    The codec only carries it; `mesh.proxy.assertion` signs and verifies it.
    """

    claims: bytes
    signature: bytes
    chain: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        msg = bytearray()
        _put_bytes(msg, _CLAIMS, self.claims)
        _put_bytes(msg, _SIGNATURE, self.signature)
        for cert in self.chain:
            _put_bytes(msg, _CHAIN, cert)
        return bytes(msg)


@dataclass(frozen=True)
class TransportHeader:
    """The decoded header: target port, optional name, session protocol, caller and the
    caller's assertion."""

    port: int
    name: str = ""
    protocol: SessionProtocol | None = None
    caller: str = ""
    assertion: CallerAssertion | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"TransportHeader.port must be in 1..65535, got {self.port}")

    def encode(self) -> bytes:
        """The preface, length and message, ready to write before the relayed stream."""
        msg = bytearray(b"\x08")
        msg += _encode_varint(self.port)
        if self.name:
            _put_bytes(msg, _NAME, self.name.encode())
        if self.protocol is not None:
            # An empty Http1/Http2 message: the tag of the oneof member, then length 0.
            kind = bytes([(self.protocol.value << 3) | _LENGTH_DELIMITED, 0])
            _put_bytes(msg, _SESSION_PROTOCOL, kind)
        if self.caller:
            _put_bytes(msg, _CALLER, self.caller.encode())
        if self.assertion is not None:
            _put_bytes(msg, _ASSERTION, self.assertion.encode())
        if len(msg) > MAX_HEADER_LENGTH:
            raise HeaderTooLarge(
                f"transport header for port {self.port} would be {len(msg)} bytes, over the "
                f"{MAX_HEADER_LENGTH}-byte limit; shorten the name, caller or assertion chain"
            )
        return PREFACE + len(msg).to_bytes(4, "big") + msg


class _Phase(enum.Enum):
    PREFACE = "preface"
    LENGTH = "length"
    MESSAGE = "message"
    DONE = "done"
    FAILED = "failed"


# Each phase may only move to the phases listed; anything else is a bug we report as
# a protocol error rather than a silent wrong turn.
_TRANSITIONS: dict[_Phase, frozenset[_Phase]] = {
    _Phase.PREFACE: frozenset({_Phase.LENGTH, _Phase.FAILED}),
    _Phase.LENGTH: frozenset({_Phase.MESSAGE, _Phase.FAILED}),
    _Phase.MESSAGE: frozenset({_Phase.DONE, _Phase.FAILED}),
    _Phase.DONE: frozenset(),
    _Phase.FAILED: frozenset(),
}


class HeaderDecoder:
    """Reads one transport header from the start of a stream.

    Feed bytes with `receive_data()` and call `next_event()`, which returns `NEED_DATA`
    until the header is complete, then the `TransportHeader` (on every later call too).
    Errors are raised by `next_event()` as soon as the bytes seen prove them: a wrong
    preface at its first differing byte, an oversized length as soon as it is read.
    Bytes after the header, including any passed in later, are in `trailing_data`.
    """

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._phase = _Phase.PREFACE
        self._length = 0
        self._header: TransportHeader | None = None
        self._trailing: bytes = b""
        self._closed = False
        self._error: ProtocolError | None = None

    @property
    def trailing_data(self) -> bytes:
        """The start of the relayed stream: bytes received after the header."""
        return self._trailing

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection; `b""` is ignored (see `connection_closed`)."""
        if not data:
            return
        if self._phase is _Phase.DONE:
            self._trailing += data
        elif not self._buf:
            self._buf = data  # the fast path: keep the caller's bytes, copy nothing
        else:
            if isinstance(self._buf, bytes):
                self._buf = bytearray(self._buf)
            self._buf += data

    def connection_closed(self) -> None:
        """The peer closed its side; an unfinished header then becomes an error."""
        self._closed = True

    def next_event(self) -> TransportHeader | NeedData:
        """The header once complete, else `NEED_DATA`; raises a `ProtocolError` subclass."""
        if self._header is not None:
            return self._header
        if self._error is not None:
            raise self._error
        try:
            event = self._step()
        except ProtocolError as exc:
            self._move(_Phase.FAILED)
            self._error = exc
            raise
        if event is NEED_DATA and self._closed:
            self._move(_Phase.FAILED)
            self._error = TruncatedHeader(
                f"connection closed after {len(self._buf)} bytes of the transport header "
                f"(in its {self._phase.value}); the peer is not a meshgate or Linkerd proxy"
            )
            raise self._error
        return event

    def _move(self, phase: _Phase) -> None:
        if phase not in _TRANSITIONS[self._phase]:
            raise ProtocolError(
                f"transport header decoder cannot go from {self._phase.value} to {phase.value}"
            )
        self._phase = phase

    def _step(self) -> TransportHeader | NeedData:
        buf = self._buf
        if self._phase is _Phase.PREFACE:
            if not buf.startswith(PREFACE):
                _check_preface(buf)
                return NEED_DATA
            self._move(_Phase.LENGTH)
        if self._phase is _Phase.LENGTH:
            if len(buf) < _PREFIX_LENGTH:
                return NEED_DATA
            self._length = int.from_bytes(buf[len(PREFACE) : _PREFIX_LENGTH], "big")
            if self._length > MAX_HEADER_LENGTH:
                raise HeaderTooLarge(
                    f"transport header length {self._length} is over the "
                    f"{MAX_HEADER_LENGTH}-byte limit; the peer sent a corrupt or hostile header"
                )
            self._move(_Phase.MESSAGE)
        end = _PREFIX_LENGTH + self._length
        if len(buf) < end:
            return NEED_DATA
        header = _decode_message(buf, _PREFIX_LENGTH, end)
        self._trailing = bytes(buf[end:])
        self._buf = b""
        self._header = header
        self._move(_Phase.DONE)
        return header


def _check_preface(buf: bytes | bytearray) -> None:
    """Raise `BadPreface` if `buf` (shorter than the preface or not) already differs."""
    n = min(len(buf), len(PREFACE))
    if buf[:n] == PREFACE[:n]:
        return
    at = next(i for i in range(n) if buf[i] != PREFACE[i])
    raise BadPreface(
        f"stream does not start with the transport header preface: byte {at} is "
        f"{bytes(buf[at : at + 1])!r}, expected {PREFACE[at : at + 1]!r}; the peer is not "
        "speaking transport.l5d.io/v1"
    )


def _decode_message(buf: bytes | bytearray, pos: int, end: int) -> TransportHeader:
    port = 0
    name = caller = ""
    protocol: SessionProtocol | None = None
    assertion: CallerAssertion | None = None
    while pos < end:
        field, wire_type, pos = _read_key(buf, pos, end)
        if field == _PORT:
            _expect_wire_type(field, wire_type, _VARINT)
            value, pos = _read_varint(buf, pos, end)
            port = _as_int32(value)
        elif field == _ASSERTION:
            _expect_wire_type(field, wire_type, _LENGTH_DELIMITED)
            start, pos = _read_length(buf, pos, end)
            assertion = _decode_assertion(buf, start, pos)
        elif field in (_NAME, _SESSION_PROTOCOL, _CALLER):
            _expect_wire_type(field, wire_type, _LENGTH_DELIMITED)
            start, pos = _read_length(buf, pos, end)
            if field == _SESSION_PROTOCOL:
                protocol = _decode_session_protocol(buf, start, pos) or protocol
            elif field == _NAME:
                name = _utf8(buf, start, pos, "name")
            else:
                caller = _utf8(buf, start, pos, "caller")
        else:
            pos = _skip(buf, pos, end, wire_type)
    if not 1 <= port <= 65535:
        raise MalformedHeader(f"transport header port {port} is outside 1..65535")
    return TransportHeader(port=port, name=name, protocol=protocol, caller=caller,
                           assertion=assertion)


def _decode_assertion(buf: bytes | bytearray, pos: int, end: int) -> CallerAssertion:
    claims = signature = b""
    chain: list[bytes] = []
    while pos < end:
        field, wire_type, pos = _read_key(buf, pos, end)
        if field in (_CLAIMS, _SIGNATURE, _CHAIN):
            _expect_wire_type(field, wire_type, _LENGTH_DELIMITED, "assertion.")
            start, pos = _read_length(buf, pos, end)
            value = bytes(buf[start:pos])
            if field == _CLAIMS:
                claims = value
            elif field == _SIGNATURE:
                signature = value
            else:
                chain.append(value)
        else:
            pos = _skip(buf, pos, end, wire_type)
    return CallerAssertion(claims, signature, tuple(chain))


def _decode_session_protocol(buf: bytes | bytearray, pos: int, end: int) -> SessionProtocol | None:
    """The oneof member set last, or None when the message sets none (opaque)."""
    kind: SessionProtocol | None = None
    while pos < end:
        field, wire_type, pos = _read_key(buf, pos, end)
        if field in (SessionProtocol.HTTP1.value, SessionProtocol.HTTP2.value):
            _expect_wire_type(field, wire_type, _LENGTH_DELIMITED, "session_protocol.")
            start, pos = _read_length(buf, pos, end)
            _skip_message(buf, start, pos)  # Http1/Http2 are empty; skip unknown fields
            kind = SessionProtocol(field)
        else:
            pos = _skip(buf, pos, end, wire_type)
    return kind


def _skip_message(buf: bytes | bytearray, pos: int, end: int) -> None:
    while pos < end:
        _, wire_type, pos = _read_key(buf, pos, end)
        pos = _skip(buf, pos, end, wire_type)


def _read_key(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = _read_varint(buf, pos, end)
    if key > 0xFFFFFFFF or key >> 3 == 0:
        raise MalformedHeader(f"transport header has an invalid field key {key}")
    return key >> 3, key & 7, pos


def _read_varint(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise MalformedHeader("transport header has a varint over 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise MalformedHeader("transport header message ends inside a varint")


def _read_length(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """Read a length prefix; return (start, end) of the bytes it covers."""
    length, pos = _read_varint(buf, pos, end)
    if length > end - pos:
        raise MalformedHeader(f"transport header field of {length} bytes runs past the message end")
    return pos, pos + length


def _skip(buf: bytes | bytearray, pos: int, end: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire_type == _LENGTH_DELIMITED:
        return _read_length(buf, pos, end)[1]
    width = {_FIXED64: 8, _FIXED32: 4}.get(wire_type)
    if width is None:
        raise MalformedHeader(f"transport header uses unsupported wire type {wire_type}")
    if width > end - pos:
        raise MalformedHeader("transport header message ends inside a fixed-width field")
    return pos + width


def _expect_wire_type(field: int, actual: int, expected: int, prefix: str = "") -> None:
    if actual != expected:
        raise MalformedHeader(
            f"transport header field {prefix}{field} has wire type {actual}, expected {expected}"
        )


def _as_int32(value: int) -> int:
    """Protobuf int32 semantics: keep the low 32 bits, two's complement."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _utf8(buf: bytes | bytearray, start: int, end: int, what: str) -> str:
    try:
        return str(memoryview(buf)[start:end], "utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedHeader(f"transport header {what} is not valid UTF-8: {exc}") from None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _put_bytes(msg: bytearray, field: int, value: bytes) -> None:
    msg += _encode_varint((field << 3) | _LENGTH_DELIMITED)
    msg += _encode_varint(len(value))
    msg += value
