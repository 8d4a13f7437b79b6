"""HTTP/1.1 framing: what a relaying proxy forwards is exactly what it read."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ProtocolError
from mesh.proxy.http1 import (
    MAX_HEAD_SIZE,
    NEED_DATA,
    PAUSED,
    Body,
    ConnectionClosed,
    End,
    Event,
    Head,
    HeadTooLarge,
    IncompleteMessage,
    InvalidChunk,
    InvalidFraming,
    InvalidHead,
    MessageReader,
    ReaderStateError,
    Role,
    UnexpectedData,
    Upgrade,
)
from mesh.proxy.http1_head import serialize_head

TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FRAMING = {"content-length", "transfer-encoding", "connection", "upgrade"}


def read_all(reader: MessageReader, chunks: list[bytes], *, close: bool = True) -> list[Event]:
    """Feed `chunks`, draining events after each; then close and drain to the end."""
    events: list[Event] = []

    def drain() -> None:
        while True:
            event = reader.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return

    drain()
    for chunk in chunks:
        reader.receive_data(chunk)
        drain()
    if close:
        reader.connection_closed()
        drain()
    return events


def forwarded(events: list[Event]) -> bytes:
    out = []
    for event in events:
        if isinstance(event, Head):
            out.append(event.raw)
        elif isinstance(event, Body):
            out.append(event.data)
        elif isinstance(event, Upgrade):
            out.append(event.rest)
    return b"".join(out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def events_of(role: Role, data: bytes, *, close: bool = True) -> list[Event]:
    return read_all(MessageReader(role), [data], close=close)


# ------------------------------------------------------------------ generated messages


@dataclass
class Message:
    wire: bytes
    start: tuple[str | None, str | None, int | None]
    fields: tuple[tuple[bytes, bytes], ...]
    payload: bytes  # the body, de-chunked


tokens = st.text(TCHARS, min_size=1, max_size=12)
values = st.text("".join(chr(c) for c in range(0x21, 0x7F)) + " \t", max_size=40).map(
    lambda v: v.strip(" \t")
)
fields = st.lists(
    st.tuples(tokens, values).filter(lambda f: f[0].lower() not in FRAMING), max_size=8
)
chunk_lists = st.lists(st.binary(min_size=1, max_size=40), max_size=5)
extensions = st.sampled_from(["", ";a", ";a=b", ' ; name="quoted;value"'])


@st.composite
def bodies(draw: st.DrawFn, *, allow_none: bool) -> tuple[list[tuple[bytes, bytes]], bytes, bytes]:
    """(framing fields, body wire bytes, payload)."""
    kind = draw(st.sampled_from(["none", "length", "chunked"] if allow_none else ["length"]))
    if kind == "none":
        return [], b"", b""
    if kind == "length":
        payload = draw(st.binary(max_size=200))
        return [(b"Content-Length", str(len(payload)).encode())], payload, payload
    chunks = draw(chunk_lists)
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(c), draw(extensions).encode(), c) for c in chunks)
    trailers = draw(st.lists(st.tuples(tokens, values), max_size=3))
    wire += b"0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers) + b"\r\n"
    return [(b"Transfer-Encoding", b"chunked")], wire, b"".join(chunks)


@st.composite
def requests(draw: st.DrawFn) -> Message:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PROPFIND", "PURGE-X"]))
    target = "/" + draw(st.text("abcxyz0123456789-._~/?=&%", max_size=30))
    framing, body_wire, payload = draw(bodies(allow_none=True))
    all_fields = [(n.encode(), v.encode()) for n, v in draw(fields)] + framing
    head = f"{method} {target} HTTP/1.1\r\n".encode()
    head += b"".join(n + b": " + v + b"\r\n" for n, v in all_fields) + b"\r\n"
    return Message(head + body_wire, (method, target, None), tuple(all_fields), payload)


@st.composite
def responses(draw: st.DrawFn) -> tuple[str, Message]:
    """(method of the request answered, response)."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
    status = draw(st.sampled_from([200, 201, 204, 301, 304, 404, 503]))
    framing, body_wire, payload = draw(bodies(allow_none=False))
    if method == "HEAD" or status in (204, 304):
        body_wire = payload = b""  # the framing fields describe a body that is not sent
    all_fields = [(n.encode(), v.encode()) for n, v in draw(fields)] + framing
    head = f"HTTP/1.1 {status} Reason Phrase\r\n".encode()
    head += b"".join(n + b": " + v + b"\r\n" for n, v in all_fields) + b"\r\n"
    return method, Message(head + body_wire, (None, None, status), tuple(all_fields), payload)


def dechunk(events: list[Event]) -> list[bytes]:
    """Each message's body bytes, as forwarded (still chunked if it was)."""
    bodies, current = [], b""
    for event in events:
        if isinstance(event, Body):
            current += event.data
        elif isinstance(event, End):
            bodies.append(current)
            current = b""
    return bodies


def payload_of(wire_body: bytes, fields: tuple[tuple[bytes, bytes], ...]) -> bytes:
    if (b"Transfer-Encoding", b"chunked") not in fields:
        return wire_body
    out, rest = b"", wire_body
    while True:
        line, rest = rest.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2 :]


# ------------------------------------------------------------------ properties


@settings(max_examples=150)
@given(st.lists(requests(), min_size=1, max_size=4), st.lists(st.integers(0, 5000), max_size=10))
def test_pipelined_requests_in_any_split_forward_every_byte(
    messages: list[Message], cuts: list[int]
) -> None:
    wire = b"".join(m.wire for m in messages)
    events = read_all(MessageReader("request"), split(wire, cuts))
    assert forwarded(events) == wire
    heads = [e for e in events if isinstance(e, Head)]
    assert [(h.method, h.target, h.status) for h in heads] == [m.start for m in messages]
    assert [h.headers for h in heads] == [m.fields for m in messages]
    assert [payload_of(b, m.fields) for b, m in zip(dechunk(events), messages, strict=True)] == [
        m.payload for m in messages
    ]
    assert isinstance(events[-1], ConnectionClosed)


@settings(max_examples=150)
@given(st.lists(responses(), min_size=1, max_size=4), st.lists(st.integers(0, 5000), max_size=10))
def test_responses_framed_by_their_requests_forward_every_byte(
    exchanges: list[tuple[str, Message]], cuts: list[int]
) -> None:
    reader = MessageReader("response")
    for method, _ in exchanges:
        reader.expect_response_to(method)
    wire = b"".join(m.wire for _, m in exchanges)
    events = read_all(reader, split(wire, cuts))
    assert forwarded(events) == wire
    assert [e.status for e in events if isinstance(e, Head)] == [m.start[2] for _, m in exchanges]
    sent = [m for _, m in exchanges]
    bodies = dechunk(events)
    assert [payload_of(b, m.fields) for b, m in zip(bodies, sent, strict=True)] == [
        m.payload for m in sent
    ]
    assert reader.keep_alive


@given(
    st.sampled_from(["request", "response"]),
    st.binary(max_size=600),
    st.lists(st.integers(0, 700), max_size=6),
)
def test_any_bytes_give_events_or_a_protocol_error(
    role: Role, data: bytes, cuts: list[int]
) -> None:
    with contextlib.suppress(ProtocolError):
        read_all(MessageReader(role), split(data, cuts))


@given(
    st.sampled_from(
        [
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ]
    ),
    st.binary(max_size=300),
    st.lists(st.integers(0, 400), max_size=6),
)
def test_any_body_bytes_give_events_or_a_protocol_error(
    head: bytes, data: bytes, cuts: list[int]
) -> None:
    role: Role = "response" if head.startswith(b"HTTP") else "request"
    try:
        events = read_all(MessageReader(role), split(head + data, cuts))
    except ProtocolError:
        return
    assert forwarded(events) == (head + data)[: len(forwarded(events))]


# ------------------------------------------------------------------ examples


def test_pipelined_requests_in_one_read() -> None:
    wire = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"DELETE /c HTTP/1.1\r\n\r\n"
    )
    events = events_of("request", wire)
    assert [type(e).__name__ for e in events] == [
        "Head", "End", "Head", "Body", "End", "Head", "End", "ConnectionClosed"
    ]  # fmt: skip
    assert [e.target for e in events if isinstance(e, Head)] == ["/a", "/b", "/c"]


def test_chunked_with_extensions_and_trailers_is_forwarded_verbatim() -> None:
    body = b"4;name=value\r\nWiki\r\n5 ; x\r\npedia\r\n0;last\r\nExpires: never\r\nX-Sum: 1\r\n\r\n"
    head = b"POST /upload HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    events = events_of("request", head + body + b"GET / HTTP/1.1\r\n\r\n")
    assert events[1] == Body(body)
    assert isinstance(events[2], End)
    assert isinstance(events[3], Head) and events[3].target == "/"


def test_chunked_bytes_one_at_a_time() -> None:
    body = b"a\r\n0123456789\r\n0\r\nT: v\r\n\r\n"
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    events = read_all(MessageReader("response"), [wire[i : i + 1] for i in range(len(wire))])
    assert forwarded(events) == wire
    assert sum(isinstance(e, End) for e in events) == 1


def test_a_whole_read_of_body_is_forwarded_without_a_copy() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 10000\r\n\r\n")
    assert isinstance(reader.next_event(), Head)
    assert reader.next_event() is NEED_DATA
    data = bytes(range(256)) * 39 + b"x" * 16
    reader.receive_data(data)
    event = reader.next_event()
    assert isinstance(event, Body) and event.data is data


def test_head_of_exactly_64_kib_is_accepted() -> None:
    start = b"GET / HTTP/1.1\r\nX: "
    head = start + b"a" * (MAX_HEAD_SIZE - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE
    events = events_of("request", head)
    assert isinstance(events[0], Head) and events[0].raw == head


def test_head_one_byte_over_64_kib_is_rejected() -> None:
    start = b"GET / HTTP/1.1\r\nX: "
    head = start + b"a" * (MAX_HEAD_SIZE - len(start) - 3) + b"\r\n\r\n"
    with pytest.raises(HeadTooLarge):
        events_of("request", head)


def test_head_too_large_is_raised_without_waiting_for_its_end() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_SIZE)
    with pytest.raises(HeadTooLarge):
        reader.next_event()


def test_trailers_over_64_kib_are_rejected() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    reader.receive_data(b"X: " + b"a" * MAX_HEAD_SIZE)
    with pytest.raises(HeadTooLarge, match="trailer"):
        read_all(reader, [], close=False)


def test_extension_methods_are_accepted() -> None:
    events = events_of("request", b"MKCALENDAR-X /cal HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(events[0], Head) and events[0].method == "MKCALENDAR-X"
    assert events[0].headers == ((b"Host", b"a"),)


def test_empty_lines_before_a_request_are_skipped() -> None:
    events = events_of("request", b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert isinstance(events[0], Head) and events[0].raw == b"GET / HTTP/1.1\r\n\r\n"


def test_head_response_has_no_body_even_with_content_length() -> None:
    reader = MessageReader("response")
    reader.expect_head_response()
    reader.expect_response_to("GET")
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    wire += b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events = read_all(reader, [wire])
    assert [type(e).__name__ for e in events] == [
        "Head", "End", "Head", "Body", "End", "ConnectionClosed"
    ]  # fmt: skip


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    events = events_of("response", b"HTTP/1.1 %d X\r\nContent-Length: 9\r\n\r\n" % status)
    assert [type(e).__name__ for e in events] == ["Head", "End", "ConnectionClosed"]


def test_interim_responses_do_not_use_up_the_request() -> None:
    reader = MessageReader("response")
    reader.expect_head_response()
    wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n"
    wire += b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    events = read_all(reader, [wire])
    assert [e.status for e in events if isinstance(e, Head)] == [100, 103, 200]
    assert not any(isinstance(e, Body) for e in events)


def test_close_delimited_response_ends_at_close() -> None:
    reader = MessageReader("response")
    events = read_all(reader, [b"HTTP/1.1 200 OK\r\n\r\nsome", b" data"], close=False)
    assert events[1:] == [Body(b"some"), Body(b" data")]
    assert not reader.keep_alive
    reader.connection_closed()
    assert reader.next_event() == End()
    assert reader.next_event() == ConnectionClosed()


def test_response_with_transfer_coding_not_ending_in_chunked_is_close_delimited() -> None:
    events = events_of("response", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz")
    assert events[1:] == [Body(b"zz"), End(), ConnectionClosed()]


def test_101_switches_to_opaque_bytes() -> None:
    reader = MessageReader("response")
    wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    events = read_all(reader, [wire + b"\x81\x05", b"hello"])
    assert events[1:] == [Upgrade(b"\x81\x05"), Upgrade(b"hello"), ConnectionClosed()]
    assert not reader.keep_alive


def test_101_with_nothing_after_it_still_says_upgrade() -> None:
    events = events_of("response", b"HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\n\r\n", close=False)
    assert events[1:] == [Upgrade(b"")]


def test_connect_2xx_is_a_tunnel_and_connect_4xx_is_not() -> None:
    reader = MessageReader("response")
    reader.expect_response_to("CONNECT")
    events = read_all(reader, [b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03"])
    assert events[1] == Upgrade(b"\x16\x03")
    reader = MessageReader("response")
    reader.expect_response_to("CONNECT")
    events = read_all(reader, [b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n"])
    assert events[1:] == [End(), ConnectionClosed()]


def test_upgrade_request_pauses_until_the_response_decides() -> None:
    wire = b"GET /chat HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    reader = MessageReader("request")
    reader.receive_data(wire + b"frames")
    assert isinstance(reader.next_event(), Head)
    assert reader.next_event() == End()
    assert reader.next_event() is PAUSED
    reader.protocol_switched()
    assert reader.next_event() == Upgrade(b"frames")
    assert not reader.keep_alive


def test_declined_upgrade_goes_on_reading_http() -> None:
    wire = b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    reader = MessageReader("request")
    reader.receive_data(wire + b"GET /next HTTP/1.1\r\n\r\n")
    assert [type(e).__name__ for e in read_all(reader, [], close=False)] == ["Head", "End"]
    assert reader.next_event() is PAUSED
    reader.upgrade_declined()
    event = reader.next_event()
    assert isinstance(event, Head) and event.target == "/next"


def test_connect_request_pauses() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    event = reader.next_event()
    assert isinstance(event, Head) and event.target == "db:5432"
    assert reader.next_event() == End()
    assert reader.next_event() is PAUSED


def test_switching_without_an_upgrade_request_is_a_state_error() -> None:
    reader = MessageReader("request")
    with pytest.raises(ReaderStateError, match="protocol_switched"):
        reader.protocol_switched()


@pytest.mark.parametrize(
    ("wire", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n", False),
    ],
)
def test_keep_alive(wire: bytes, keep_alive: bool) -> None:
    reader = MessageReader("request")
    read_all(reader, [wire], close=False)
    assert reader.keep_alive is keep_alive


def test_data_after_a_closing_request_is_an_error() -> None:
    with pytest.raises(UnexpectedData):
        events_of("request", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize(
    ("wire", "error", "why"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", InvalidFraming,
         "Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
         InvalidFraming, "Content-Length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", InvalidFraming,
         "Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
         InvalidFraming, "Transfer-Encoding"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", InvalidFraming, "HTTP/1.0"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", InvalidFraming, "Content-Length"),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", InvalidHead, "header value char"),
        (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", InvalidHead, "header token"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", InvalidHead, "whitespace"),
        (b"GET / HTTP/1.1\nHost: a\n\n", InvalidHead, "bare LF"),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", InvalidHead, "bare LF"),
        (b"GET / HTTP/2.0\r\n\r\n", InvalidHead, "request line"),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", InvalidHead, "request line"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", InvalidChunk,
         "chunk-size"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX", InvalidChunk, "CRLF"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n",
         InvalidChunk, "64 bits"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
         InvalidChunk, "trailer"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n(\r\n\r\n", InvalidChunk,
         "trailer"),
    ],
)  # fmt: skip
def test_malformed_requests(wire: bytes, error: type[ProtocolError], why: str) -> None:
    with pytest.raises(error, match=why):
        events_of("request", wire)


@pytest.mark.parametrize(
    "wire",
    [b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n", b"\r\nHTTP/1.1 200 OK\r\n\r\n"],
)
def test_malformed_status_lines(wire: bytes) -> None:
    with pytest.raises(InvalidHead, match="status line"):
        events_of("response", wire)


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "more than once"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n", "Content-Length"),
    ],
)
def test_malformed_response_framing(wire: bytes, why: str) -> None:
    with pytest.raises(InvalidFraming, match=why):
        events_of("response", wire)


def test_a_trailer_that_cannot_start_a_field_fails_at_its_first_byte() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    read_all(reader, [], close=False)
    reader.receive_data(b"(")
    with pytest.raises(InvalidChunk, match="trailer"):
        reader.next_event()


def test_empty_reads_are_ignored_and_closed_stays_closed() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"")
    assert reader.next_event() is NEED_DATA
    reader.connection_closed()
    assert reader.next_event() == ConnectionClosed()
    assert reader.next_event() == ConnectionClosed()


def test_chunk_size_line_too_long() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"x" * 5000)
    with pytest.raises(InvalidChunk, match="over 4096"):
        read_all(reader, [], close=False)


@pytest.mark.parametrize(
    ("wire", "where"),
    [
        (b"GET / HTTP/1.1\r\nHost", "head"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", "last 3 bytes"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "chunk data"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n", "trailer"),
    ],
)
def test_close_mid_message_is_an_error(wire: bytes, where: str) -> None:
    with pytest.raises(IncompleteMessage, match=where):
        events_of("request", wire)


def test_errors_are_sticky() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"\x16\x03\x01\r\n\r\n")
    with pytest.raises(InvalidHead):
        reader.next_event()
    with pytest.raises(InvalidHead):
        reader.next_event()


def test_data_after_close_is_refused() -> None:
    reader = MessageReader("request")
    reader.connection_closed()
    with pytest.raises(ReaderStateError):
        reader.receive_data(b"x")


def test_expect_response_to_is_for_response_readers() -> None:
    with pytest.raises(ReaderStateError):
        MessageReader("request").expect_head_response()


def test_header_values_are_trimmed_and_looked_up_case_insensitively() -> None:
    events = events_of("request", b"GET / HTTP/1.1\r\nX-A:  one \t\r\nx-a: two\r\n\r\n")
    head = events[0]
    assert isinstance(head, Head)
    assert head.values(b"X-a") == [b"one", b"two"]


# ------------------------------------------------------------------ serialize_head


def head_of(wire: bytes) -> Head:
    event = events_of("request" if not wire.startswith(b"HTTP/") else "response", wire)[0]
    assert isinstance(event, Head)
    return event


def test_serialize_without_changes_is_the_raw_head() -> None:
    head = head_of(b"GET / HTTP/1.1\r\nHost:a  \r\n\r\n")
    assert serialize_head(head) is head.raw


def test_serialize_replaces_removes_and_appends() -> None:
    head = head_of(
        b"HTTP/1.1 404 Not Here\r\nServer: x\r\nl5d-proxy-error: old\r\nVia: a\r\n"
        b"L5D-Proxy-Error: older\r\nContent-Length: 0\r\n\r\n"
    )
    out = serialize_head(
        head,
        replace={b"l5d-proxy-error": b"new", b"l5d-client-id": b"web.default"},
        remove={b"VIA"},
    )
    assert out == (
        b"HTTP/1.1 404 Not Here\r\nServer: x\r\nl5d-proxy-error: new\r\n"
        b"Content-Length: 0\r\nl5d-client-id: web.default\r\n\r\n"
    )
    assert head_of(out).values(b"l5d-proxy-error") == [b"new"]


@pytest.mark.parametrize(
    ("name", "value"), [(b"X", b"a\r\nInjected: 1"), (b"Bad Name", b"v"), (b"X", b"\x00")]
)
def test_serialize_refuses_header_injection(name: bytes, value: bytes) -> None:
    head = head_of(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(InvalidHead):
        serialize_head(head, replace={name: value})


def test_buffered_counts_bytes_no_event_consumed_and_eof_is_remembered() -> None:
    reader = MessageReader("request")
    reader.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next")
    assert isinstance(reader.next_event(), Head)
    assert isinstance(reader.next_event(), End)
    assert reader.buffered == len(b"GET /next") and not reader.eof
    reader.connection_closed()
    assert reader.eof
