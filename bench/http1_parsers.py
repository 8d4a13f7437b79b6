"""Micro-benchmark: parsing HTTP/1.1 request and response heads with h11, httptools and a regex.

Run: `.venv/bin/python bench/http1_parsers.py` (h11 is not a meshgate dependency:
`.venv/bin/pip install h11` first). `meshgate` rows are `mesh.proxy.http1`
(head framing on top of httptools). Each parser gets one complete head
per call (a fresh parser each time, as the proxy parses heads only and frames bodies
itself) and must yield the method/target or status plus the header list.
"""

from __future__ import annotations

import re
import timeit
from typing import Any

import h11
import httptools

REQUEST = (
    b"GET /api/v1/namespaces/default/pods?limit=500&labelSelector=app%3Dweb HTTP/1.1\r\n"
    b"Host: web.default.svc.cluster.local:8080\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Authorization: Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.eyJzdWIiOiJ3ZWIifQ.c2ln\r\n"
    b"Cookie: session=5f1c2a9e8b7d4c3a; theme=dark; _ga=GA1.2.123456789.1700000000\r\n"
    b"X-Request-Id: 3b9c7a0e-5d2f-4e61-9a8b-1c2d3e4f5a6b\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"l5d-dst-override: web.default.svc.cluster.local:8080\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: no-cache\r\n"
    b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Date: Tue, 15 Oct 2024 09:21:44 GMT\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: 18342\r\n"
    b"Cache-Control: private, max-age=0\r\n"
    b'ETag: "5d8c72a5edda8d6a:0"\r\n'
    b"Vary: Accept-Encoding\r\n"
    b"Server: envoy\r\n"
    b"X-Request-Id: 3b9c7a0e-5d2f-4e61-9a8b-1c2d3e4f5a6b\r\n"
    b"l5d-proxy-error: \r\n"
    b"Set-Cookie: session=5f1c2a9e8b7d4c3a; Path=/; HttpOnly; Secure; SameSite=Lax\r\n"
    b"\r\n"
)


def h11_request() -> Any:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(REQUEST)
    return conn.next_event()


def h11_response() -> Any:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.receive_data(RESPONSE)
    return conn.next_event()


class _Collect:
    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def httptools_request() -> Any:
    sink = _Collect()
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(REQUEST)
    return parser.get_method(), sink.url, sink.headers


def httptools_response() -> Any:
    sink = _Collect()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(RESPONSE)
    return parser.get_status_code(), sink.headers


_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"(%s+) ([^\x00-\x20\x7f]+) HTTP/(1\.[01])" % _TCHAR)
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEADER = re.compile(rb"(%s+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*" % _TCHAR)


def _headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines:
        m = _HEADER.fullmatch(line)
        if m is None:
            raise ValueError(line)
        out.append((m[1], m[2]))
    return out


def regex_request() -> Any:
    lines = REQUEST[: REQUEST.index(b"\r\n\r\n")].split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    assert m is not None
    return m[1], m[2], _headers(lines[1:])


def regex_response() -> Any:
    lines = RESPONSE[: RESPONSE.index(b"\r\n\r\n")].split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    assert m is not None
    return int(m[2]), _headers(lines[1:])


def meshgate_request() -> Any:
    from mesh.proxy.http1 import MessageReader

    reader = MessageReader("request")
    reader.receive_data(REQUEST)
    return reader.next_event()


def meshgate_response() -> Any:
    from mesh.proxy.http1 import MessageReader

    reader = MessageReader("response")
    reader.receive_data(RESPONSE)
    return reader.next_event()


def main() -> None:
    print(f"request head {len(REQUEST)} B, response head {len(RESPONSE)} B")
    for name, fn in [
        ("h11 request", h11_request),
        ("httptools request", httptools_request),
        ("regex request", regex_request),
        ("meshgate request", meshgate_request),
        ("h11 response", h11_response),
        ("httptools response", httptools_response),
        ("regex response", regex_response),
        ("meshgate response", meshgate_response),
    ]:
        n = 20000
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"{name:20s} {best * 1e6:7.2f} us/head")


if __name__ == "__main__":
    main()
