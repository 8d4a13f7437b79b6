"""The gateway's Forwarded header: added to every request head in any split of the
bytes, bodies untouched, loops found, upgrades left alone."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.forwarded import ForwardedLoop, ForwardedRequests, forwarded_by, quoted
from mesh.errors import ProtocolError

CALLER = "client.default.serviceaccount.identity.meshgate.cluster.local"
GATEWAY = "gateway.multicluster.serviceaccount.identity.meshgate.cluster.local"
FIELD = f'Forwarded: for="{CALLER}";by="{GATEWAY}"\r\n'.encode()


def requests() -> ForwardedRequests:
    return ForwardedRequests(caller=CALLER, gateway=GATEWAY)


CHUNKED = (b"POST /a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")
SIZED = b"PUT /b HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc"
PLAIN = b"GET /c HTTP/1.1\r\nHost: web\r\n\r\n"


def expected() -> bytes:
    return b"".join(message.replace(b"\r\n\r\n", b"\r\n" + FIELD + b"\r\n", 1)
                    for message in (CHUNKED, SIZED, PLAIN))


@given(st.lists(st.integers(0, len(CHUNKED + SIZED + PLAIN)), max_size=8))
def test_each_request_gains_the_field_in_any_split(cuts: list[int]) -> None:
    wire = CHUNKED + SIZED + PLAIN
    points = sorted({0, len(wire), *cuts})
    rewriter = requests()
    out = b"".join(rewriter.feed(wire[a:b]) for a, b in itertools.pairwise(points))
    assert out == expected()


def test_a_request_that_passed_this_gateway_is_a_loop() -> None:
    rewriter = requests()
    head = (b"GET / HTTP/1.1\r\nHost: web\r\nForwarded: for=\"x\";by=\"other\", "
            b"for=\"y\";By=" + quoted(GATEWAY).encode() + b"\r\n\r\n")
    with pytest.raises(ForwardedLoop, match="already passed through"):
        rewriter.feed(head)


def test_another_gateway_in_forwarded_is_no_loop() -> None:
    head = b'GET / HTTP/1.1\r\nHost: web\r\nForwarded: for="x";by="other-gateway"\r\n\r\n'
    assert requests().feed(head).endswith(FIELD + b"\r\n")


def test_forwarded_by_reads_quoted_and_bare_nodes() -> None:
    assert forwarded_by([b'for=a;by="b\\"c", by=d;for=e', b"BY = f"]) == ['b"c', "d", "f"]


def test_after_an_upgrade_request_the_bytes_pass_as_they_are() -> None:
    rewriter = requests()
    head = b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert rewriter.feed(head + b"\x81\x02hi") == head[:-2] + FIELD + b"\r\n\x81\x02hi"
    assert rewriter.feed(PLAIN) == PLAIN


def test_bytes_that_are_not_http_are_an_error() -> None:
    with pytest.raises(ProtocolError):
        requests().feed(b"\x16\x03\x01 not http at all\r\n\r\n")
