"""The transport header codec: Linkerd's wire format, limits, and no lost bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ProtocolError
from mesh.proxy.transport_header import (
    MAX_HEADER_LENGTH,
    NEED_DATA,
    PREFACE,
    AssertionClaims,
    BadPreface,
    CallerAssertion,
    HeaderDecoder,
    HeaderTooLarge,
    MalformedHeader,
    SessionProtocol,
    TransportHeader,
    TruncatedHeader,
)


def frame(message: bytes) -> bytes:
    return PREFACE + len(message).to_bytes(4, "big") + message


def decode(data: bytes) -> tuple[TransportHeader, bytes]:
    decoder = HeaderDecoder()
    decoder.receive_data(data)
    header = decoder.next_event()
    assert isinstance(header, TransportHeader)
    return header, decoder.trailing_data


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


assertions = st.builds(
    CallerAssertion,
    claims=st.binary(max_size=200),
    signature=st.binary(max_size=80),
    chain=st.lists(st.binary(max_size=600), max_size=3).map(tuple),
)
claims = st.builds(
    AssertionClaims,
    caller=st.text(max_size=100),
    authority=st.text(max_size=100),
    not_after=st.integers(-(2**63), 2**63 - 1),
    nonce=st.binary(max_size=32),
)
headers = st.builds(
    TransportHeader,
    port=st.integers(1, 65535),
    name=st.text(max_size=300),
    protocol=st.sampled_from([None, SessionProtocol.HTTP1, SessionProtocol.HTTP2]),
    caller=st.text(max_size=300),
    assertion=st.none() | assertions,
)


# ------------------------------------------------------------------ properties


@given(headers, st.binary(max_size=200), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_in_any_split_keeps_the_stream(
    header: TransportHeader, stream: bytes, cuts: list[int]
) -> None:
    wire = header.encode() + stream
    decoder = HeaderDecoder()
    event: object = NEED_DATA
    for piece in pieces(wire, cuts):
        decoder.receive_data(piece)
        event = decoder.next_event()
    assert event == header
    assert decoder.trailing_data == stream


@given(st.binary(max_size=400), st.lists(st.integers(0, 500), max_size=6))
def test_any_bytes_give_events_or_a_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = HeaderDecoder()
    try:
        for piece in pieces(data, cuts):
            decoder.receive_data(piece)
            decoder.next_event()
        decoder.connection_closed()
        decoder.next_event()
    except ProtocolError:
        pass


@given(st.binary(max_size=300), st.binary(max_size=50))
def test_any_message_after_a_valid_preface_decodes_or_fails_typed(
    message: bytes, stream: bytes
) -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(frame(message) + stream)
    try:
        event = decoder.next_event()
    except MalformedHeader:
        return
    assert isinstance(event, TransportHeader)
    assert decoder.trailing_data == stream


@given(headers, st.binary(max_size=100), st.binary(max_size=100))
def test_bytes_fed_after_the_header_are_kept(
    header: TransportHeader, first: bytes, later: bytes
) -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(header.encode() + first)
    assert decoder.next_event() == header
    decoder.receive_data(later)
    assert decoder.next_event() == header
    assert decoder.trailing_data == first + later


# ------------------------------------------------------------------ wire format


def test_encoding_matches_linkerds_field_numbers() -> None:
    header = TransportHeader(
        port=4143, name="web.default.svc.cluster.local", protocol=SessionProtocol.HTTP2
    )
    message = (
        b"\x08\xaf\x20"  # field 1, varint: 4143
        + b"\x12\x1d"
        + b"web.default.svc.cluster.local"  # field 2, 29 bytes
        + b"\x1a\x02\x12\x00"  # field 3 {field 2 (http2) {}}
    )
    assert header.encode() == frame(message)


def test_caller_is_field_100() -> None:
    wire = TransportHeader(port=80, caller="spiffe://a").encode()
    assert wire.endswith(b"\xa2\x06\x0aspiffe://a")  # key (100 << 3 | 2) as a varint


@given(claims)
def test_assertion_claims_round_trip(value: AssertionClaims) -> None:
    assert AssertionClaims.decode(value.encode()) == value


def test_the_assertion_is_field_101_with_claims_signature_and_chain() -> None:
    assertion = CallerAssertion(b"c", b"s", (b"leaf", b"issuer"))
    wire = TransportHeader(port=80, assertion=assertion).encode()
    # key (101 << 3 | 2), length 20; then fields 1, 2 and 3 (repeated), each bytes.
    assert wire.endswith(b"\xaa\x06\x14\x0a\x01c\x12\x01s\x1a\x04leaf\x1a\x06issuer")
    header, _ = decode(wire)
    assert header.assertion == assertion


def test_claims_have_fixed_field_numbers() -> None:
    value = AssertionClaims(caller="a", authority="b", not_after=300, nonce=b"n")
    assert value.encode() == b"\x0a\x01a\x12\x01b\x18\xac\x02\x22\x01n"


def test_unknown_fields_of_the_assertion_and_claims_are_skipped() -> None:
    header, _ = decode(frame(b"\x08\x50\xaa\x06\x05\x0a\x01c\x20\x07"))
    assert header.assertion == CallerAssertion(b"c", b"", ())
    assert AssertionClaims.decode(b"\x0a\x01a\x28\x01") == AssertionClaims("a", "", 0, b"")


def test_a_header_with_only_a_port_is_opaque() -> None:
    header, rest = decode(frame(b"\x08\x50") + b"data")
    assert header == TransportHeader(port=80)
    assert header.protocol is None
    assert rest == b"data"


def test_http1_session_protocol() -> None:
    header, _ = decode(frame(b"\x08\x50\x1a\x02\x0a\x00"))
    assert header.protocol is SessionProtocol.HTTP1


def test_session_protocol_without_a_kind_is_opaque() -> None:
    header, _ = decode(frame(b"\x08\x50\x1a\x00"))
    assert header.protocol is None


def test_unknown_fields_inside_the_session_protocol_are_skipped() -> None:
    header, _ = decode(frame(b"\x08\x50\x1a\x08\x18\x01\x12\x04\x20\x02\x28\x03"))
    assert header.protocol is SessionProtocol.HTTP2


def test_later_fields_win_and_an_empty_session_protocol_merges() -> None:
    message = b"\x08\x50\x08\x51\x1a\x02\x0a\x00\x1a\x00\x12\x01a\x12\x01b"
    header, _ = decode(frame(message))
    assert header == TransportHeader(port=81, name="b", protocol=SessionProtocol.HTTP1)


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (
        b"\x20\x96\x01"  # field 4 varint
        + b"\x29"
        + bytes(8)  # field 5 fixed64
        + b"\x32\x03abc"  # field 6 length-delimited
        + b"\x3d"
        + bytes(4)  # field 7 fixed32
    )
    header, _ = decode(frame(unknown + b"\x08\x50\x1a\x04\x12\x02\x08\x01"))
    assert header == TransportHeader(port=80, protocol=SessionProtocol.HTTP2)


def test_empty_trailing_data_before_the_header_completes() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(PREFACE)
    assert decoder.next_event() is NEED_DATA
    assert decoder.trailing_data == b""


# ------------------------------------------------------------------ limits and errors


def test_preface_rejected_at_the_first_differing_byte() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(b"trans")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"X")
    with pytest.raises(BadPreface, match="byte 5"):
        decoder.next_event()


def test_preface_rejected_at_the_first_byte() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(b"\x16")  # a TLS record, not a header
    with pytest.raises(BadPreface):
        decoder.next_event()


def test_length_at_the_limit_is_accepted() -> None:
    padding = MAX_HEADER_LENGTH - 2 - 4  # port field, then an unknown field's key + length
    message = b"\x08\x50" + b"\x22\xfa\xff\x03" + bytes(padding)
    assert len(message) == MAX_HEADER_LENGTH
    header, rest = decode(frame(message) + b"x")
    assert header.port == 80
    assert rest == b"x"


def test_length_over_the_limit_fails_as_soon_as_it_is_read() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(PREFACE + (MAX_HEADER_LENGTH + 1).to_bytes(4, "big"))
    with pytest.raises(HeaderTooLarge):
        decoder.next_event()


def test_encoding_an_oversized_header_fails() -> None:
    with pytest.raises(HeaderTooLarge):
        TransportHeader(port=80, name="a" * MAX_HEADER_LENGTH).encode()


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\x08", "inside a varint"),
        (b"\x08\x80\x80", "inside a varint"),
        (b"\x0a\x01\x00", "wire type 2"),  # port as length-delimited
        (b"\x08\x50\x10\x01", "field 2 has wire type 0"),  # name as varint
        (b"\x08\x50\x1a\x02\x08\x00", "field session_protocol.1"),
        (b"", "port 0"),
        (b"\x08\x00", "port 0"),
        (b"\x08\x80\x80\x04", "port 65536"),
        (b"\x08" + b"\xff" * 9 + b"\x01", "port -1"),
        (b"\x08" + b"\xff" * 9 + b"\x02", "over 64 bits"),
        (b"\x08\x50\x12\x05ab", "past the message end"),
        (b"\x08\x50\x12\x01\xff", "UTF-8"),
        (b"\x08\x50\xa2\x06\x01\xff", "caller is not valid UTF-8"),
        (b"\x08\x50\xa8\x06\x01", "field 101 has wire type 0"),
        (b"\x08\x50\xaa\x06\x02\x08\x01", "field assertion.1 has wire type 0"),
        (b"\x08\x50\xaa\x06\x03\x0a\x05a", "past the message end"),
        (b"\x08\x50\x23\x24", "wire type 3"),
        (b"\x08\x50\x29\x00", "fixed-width"),
        (b"\x00\x08\x50", "field key 0"),
    ],
)
def test_malformed_messages(message: bytes, why: str) -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(frame(message))
    with pytest.raises(MalformedHeader, match=why):
        decoder.next_event()


def test_errors_are_sticky() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(b"nope")
    with pytest.raises(BadPreface):
        decoder.next_event()
    decoder.receive_data(b"more")
    with pytest.raises(BadPreface):
        decoder.next_event()


def test_close_before_the_header_completes() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(frame(b"\x08\x50")[:-1])
    assert decoder.next_event() is NEED_DATA
    decoder.connection_closed()
    with pytest.raises(TruncatedHeader):
        decoder.next_event()


def test_close_after_the_header_is_fine() -> None:
    decoder = HeaderDecoder()
    decoder.receive_data(frame(b"\x08\x50"))
    decoder.connection_closed()
    assert decoder.next_event() == TransportHeader(port=80)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_ports_outside_the_range_cannot_be_built(port: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        TransportHeader(port=port)
