"""Protocol detection: decided as early as the bytes allow, and no byte is lost."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.proxy.detect import (
    DEFAULT_OPAQUE_PORTS,
    H2_PREFACE,
    Detected,
    Detector,
    ProtocolKind,
    opaque_for,
)

TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

request_lines = st.builds(
    lambda first, rest, target, minor: f"{first}{rest} {target} HTTP/1.{minor}\r\n".encode(),
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    st.text(TCHARS, max_size=10),
    st.text("".join(chr(c) for c in range(0x21, 0x7F)), min_size=1, max_size=200),
    st.sampled_from("01"),
)


def feed(detector: Detector, data: bytes, cuts: list[int]) -> list[Detected | None]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    results = []
    for a, b in itertools.pairwise(points):
        detector.receive_data(data[a:b])
        results.append(detector.result())
    return results


# ------------------------------------------------------------------ properties


@given(request_lines, st.binary(max_size=100), st.lists(st.integers(0, 400), max_size=8))
def test_request_lines_are_http1_in_any_split(line: bytes, rest: bytes, cuts: list[int]) -> None:
    detector = Detector()
    feed(detector, line + rest, cuts)
    result = detector.result()
    assert result is not None and result.protocol is ProtocolKind.HTTP1
    assert detector.buffered == line + rest


@given(request_lines)
def test_no_decision_before_the_request_line_ends(line: bytes) -> None:
    detector = Detector()
    for i in range(len(line) - 1):
        detector.receive_data(line[i : i + 1])
        assert detector.result() is None
    detector.receive_data(line[-1:])
    assert detector.result() == Detected(ProtocolKind.HTTP1, "HTTP/1 request line")


@given(st.binary(max_size=100), st.lists(st.integers(0, 200), max_size=6))
def test_h2_preface_in_any_split(rest: bytes, cuts: list[int]) -> None:
    detector = Detector()
    results = feed(detector, H2_PREFACE + rest, cuts)
    final = detector.result()
    assert final is not None and final.protocol is ProtocolKind.HTTP2
    assert detector.buffered == H2_PREFACE + rest
    assert all(r is None or r == final for r in results)


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_any_bytes_keep_everything_and_never_change_their_mind(
    data: bytes, cuts: list[int]
) -> None:
    detector = Detector()
    results = feed(detector, data, cuts)
    decided = [r for r in results if r is not None]
    assert all(r == decided[0] for r in decided)
    assert detector.buffered == data
    if len(data) >= 1024:
        assert detector.result() is not None


@given(st.binary(min_size=1, max_size=50))
def test_a_first_byte_that_cannot_start_a_method_is_opaque_at_once(data: bytes) -> None:
    if b"A"[0] <= data[0] <= b"Z"[0]:
        return
    detector = Detector()
    detector.receive_data(data[:1])
    result = detector.result()
    assert result is not None and result.protocol is ProtocolKind.OPAQUE


# ------------------------------------------------------------------ examples


def test_tls_client_hello_is_opaque_at_the_first_byte() -> None:
    detector = Detector()
    detector.receive_data(b"\x16")
    assert detector.result() == Detected(
        ProtocolKind.OPAQUE, "byte 0 (b'\\x16') cannot be part of an HTTP/1 request line"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"get / HTTP/1.1\r\n",  # methods are case-sensitive; real ones are uppercase
        b"GET  / HTTP/1.1",  # empty target
        b"GET / HTTP/2",
        b"GET / HTTP/1.1\n",  # bare LF
        b"GET / HTTP/1.1\rX",
        b"PRI * HTTP/2.0\r\n\r\nXX",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"EHLO example.com\r\n",
    ],
)
def test_opaque_as_soon_as_a_byte_breaks_the_grammar(data: bytes) -> None:
    detector = Detector()
    detector.receive_data(data)
    result = detector.result()
    assert result is not None and result.protocol is ProtocolKind.OPAQUE


def test_h2c_upgrade_is_an_http1_request() -> None:
    detector = Detector()
    detector.receive_data(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    )
    result = detector.result()
    assert result is not None and result.protocol is ProtocolKind.HTTP1


def test_h2_preface_waits_for_all_24_bytes() -> None:
    detector = Detector()
    detector.receive_data(H2_PREFACE[:-1])
    assert detector.result() is None
    detector.receive_data(H2_PREFACE[-1:])
    assert detector.result() == Detected(ProtocolKind.HTTP2, "HTTP/2 prior-knowledge preface")


def test_no_crlf_within_max_bytes_is_opaque() -> None:
    detector = Detector(max_bytes=64)
    detector.receive_data(b"GET /" + b"a" * 58)
    assert detector.result() is None
    detector.receive_data(b"a")
    assert detector.result() == Detected(ProtocolKind.OPAQUE, "no CRLF within 64 bytes")


def test_a_request_line_ending_exactly_at_max_bytes_is_http1() -> None:
    line = b"GET /" + b"a" * 48 + b" HTTP/1.1\r\n"
    detector = Detector(max_bytes=len(line))
    detector.receive_data(line)
    result = detector.result()
    assert result is not None and result.protocol is ProtocolKind.HTTP1


def test_a_request_line_ending_past_max_bytes_is_opaque() -> None:
    line = b"GET /" + b"a" * 48 + b" HTTP/1.1\r\n"
    detector = Detector(max_bytes=len(line) - 1)
    detector.receive_data(line)
    result = detector.result()
    assert result is not None and result.protocol is ProtocolKind.OPAQUE


def test_timeout_with_nothing_sent_is_opaque() -> None:
    detector = Detector()
    result = detector.timeout_result()
    assert result.protocol is ProtocolKind.OPAQUE
    assert "server-speaks-first" in result.reason
    assert detector.result() == result
    assert detector.buffered == b""


def test_timeout_keeps_an_earlier_decision() -> None:
    detector = Detector()
    detector.receive_data(b"GET / HTTP/1.1\r\n")
    first = detector.result()
    assert detector.timeout_result() == first


def test_close_before_a_decision_is_opaque_and_keeps_the_bytes() -> None:
    detector = Detector()
    detector.receive_data(b"GET /")
    result = detector.connection_closed()
    assert result.protocol is ProtocolKind.OPAQUE
    assert detector.buffered == b"GET /"


def test_close_after_a_decision_keeps_it() -> None:
    detector = Detector()
    detector.receive_data(H2_PREFACE)
    assert detector.connection_closed().protocol is ProtocolKind.HTTP2


def test_bytes_after_a_decision_are_kept() -> None:
    detector = Detector()
    detector.receive_data(b"\x16\x03\x01")
    detector.receive_data(b"\x02\x00")
    assert detector.buffered == b"\x16\x03\x01\x02\x00"


def test_max_bytes_must_fit_the_h2_preface() -> None:
    with pytest.raises(ValueError, match="at least 24"):
        Detector(max_bytes=23)


def test_opaque_ports() -> None:
    assert opaque_for(3306, DEFAULT_OPAQUE_PORTS)
    assert not opaque_for(8080, DEFAULT_OPAQUE_PORTS)
    assert opaque_for(8080, frozenset({8080}))
    assert not opaque_for(3306, frozenset())
