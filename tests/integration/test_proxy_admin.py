"""The admin listener (mesh.proxy.admin) as a scraper or a person meets it: real
sockets on 127.0.0.1, the standard library's HTTP client and raw bytes."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator

import pytest

from mesh.proxy.admin import JSON, AdminServer, Answer, text


def _broken() -> Answer:
    raise RuntimeError("boom")


@pytest.fixture
async def admin() -> AsyncIterator[int]:
    server = AdminServer({"/ready": lambda: text("ready\n"),
                          "/endpoints": lambda: (200, JSON, b"[]"), "/broken": _broken})
    listener = await asyncio.get_running_loop().create_server(server.protocol, "127.0.0.1", 0)
    yield listener.sockets[0].getsockname()[1]
    listener.close()


def _get(port: int, *paths: str, method: str = "GET") -> list[tuple[int, str, bytes]]:
    """Each path on one kept-alive connection: status, content type, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    out = []
    for path in paths:
        conn.request(method, path)
        resp = conn.getresponse()
        out.append((resp.status, resp.getheader("Content-Type", ""), resp.read()))
    conn.close()
    return out


async def test_routes_answer_on_one_kept_alive_connection(admin: int) -> None:
    got = await asyncio.to_thread(_get, admin, "/ready", "/endpoints?pretty=1", "/ready")
    assert got == [(200, "text/plain; charset=utf-8", b"ready\n"),
                   (200, "application/json", b"[]"),
                   (200, "text/plain; charset=utf-8", b"ready\n")]


async def test_unknown_paths_and_methods_are_named(admin: int) -> None:
    [(status, _, body)] = await asyncio.to_thread(_get, admin, "/metricz")
    assert status == 404
    assert body == b"no admin endpoint /metricz; there are /broken, /endpoints, /ready\n"
    [(status, _, body)] = await asyncio.to_thread(_get, admin, "/ready", method="POST")
    assert (status, body) == (405, b"POST is not allowed; the admin endpoints answer GET\n")
    [(status, _, body)] = await asyncio.to_thread(_get, admin, "/ready", method="HEAD")
    assert (status, body) == (200, b"")


async def test_a_failing_route_is_a_500_and_the_listener_lives_on(admin: int) -> None:
    [(status, _, body)] = await asyncio.to_thread(_get, admin, "/broken")
    assert (status, body) == (500, b"/broken failed: RuntimeError\n")
    assert (await asyncio.to_thread(_get, admin, "/ready"))[0][0] == 200


async def test_malformed_bytes_get_a_400_and_a_close(admin: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin)
    writer.write(b"GET /ready HTTP/1.1\nHost: x\n\n")  # bare LF: refused
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert (await asyncio.to_thread(_get, admin, "/ready"))[0][0] == 200
