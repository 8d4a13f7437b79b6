"""A small HTTPS/1.1 client for the proxy's own calls: the control plane's streams
and the identity service.

The proxy process serves traffic all day and makes a handful of requests a
day; a general client library costs it ~12 MB of imports for that. This one
is asyncio streams and httptools (llhttp, which the data plane already loads):
one request per connection, the response head, then the body as it arrives,
de-chunked. Errors are the standard library's (`OSError`, `ssl.SSLError`,
`TimeoutError`) plus `ResponseError` for a response that does not parse;
callers translate them into the mesh's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools

from mesh.errors import ConfigError, MeshError

MAX_HEAD = 64 * 1024


class ResponseError(MeshError):
    """The server's answer is not an HTTP/1.1 response, or it ended early."""


class _Parsed:
    """What httptools reports of one response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.done = False
        self.body: deque[bytes] = deque()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class Response:
    """An answer whose head has arrived; its body is read with `chunk` or `read`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 parser: httptools.HttpResponseParser, parsed: _Parsed) -> None:
        self._reader, self._writer = reader, writer
        self._parser, self._parsed = parser, parsed
        self.status: int = parser.get_status_code()
        self.headers = parsed.headers
        self.ssl_object: ssl.SSLObject | None = writer.get_extra_info("ssl_object")

    async def chunk(self) -> bytes:
        """The next piece of the body, de-chunked; b"" once it has ended."""
        parsed = self._parsed
        while not parsed.body:
            if parsed.done:
                return b""
            data = await self._reader.read(65536)
            if not data and self._close_delimited():
                return b""
            _feed(self._parser, data)
        return parsed.body.popleft()

    def _close_delimited(self) -> bool:
        return "content-length" not in self.headers and \
            "chunked" not in self.headers.get("transfer-encoding", "").lower()

    async def read(self, limit: int = 1024 * 1024) -> bytes:
        """The whole body, at most `limit` bytes of it."""
        parts, size = [], 0
        while size < limit and (piece := await self.chunk()):
            parts.append(piece)
            size += len(piece)
        return b"".join(parts)[:limit]

    async def json(self) -> Any:
        """The body as JSON; None when it is not."""
        try:
            return json.loads(await self.read())
        except ValueError:
            return None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()


def _feed(parser: httptools.HttpResponseParser, data: bytes) -> None:
    if not data:
        raise ResponseError("the server closed the connection before the response ended")
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as e:
        raise ResponseError(f"the answer is not HTTP/1.1: {e}") from e


async def request(url: str, method: str, path: str, *, context: ssl.SSLContext,
                  server_hostname: str, timeout: float, body: Any = None) -> Response:
    """Send one request to ``url`` (``https://host:port``) and wait, up to `timeout`
    seconds, for the response head; `body`, if given, is sent as JSON. Close the
    response when done with it."""
    split = urlsplit(url)
    if split.scheme != "https" or split.hostname is None:
        raise ConfigError(f"{url!r} is not an https://HOST:PORT address")
    host, port = split.hostname, split.port or 443
    payload = json.dumps(body).encode() if body is not None else b""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=server_hostname,
            ssl_handshake_timeout=timeout)
        try:
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = (f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"
                    "Accept: application/json\r\nConnection: close\r\n")
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            writer.write(head.encode() + b"\r\n" + payload)
            parsed = _Parsed()
            parser = httptools.HttpResponseParser(parsed)
            seen = 0
            while not parsed.head_done:
                data = await reader.read(65536)
                seen += len(data)
                if seen > MAX_HEAD and not parsed.head_done:
                    raise ResponseError(f"the response head is over {MAX_HEAD} bytes")
                _feed(parser, data)
        except BaseException:
            writer.close()
            raise
    return Response(reader, writer, parser, parsed)
