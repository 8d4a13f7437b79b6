"""``pods/exec`` over kubectl's WebSocket protocol (``v5.channel.k8s.io``, and
v4): the command runs inside the container's network and mount namespaces, with
its environment, and, with ``tty``, a terminal.

Each binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the
final ``Status`` (JSON; a non-zero exit is ``NonZeroExitCode`` with the code in
its causes, which kubectl exits with), 4 terminal resize; v5 adds 255, by which
the client closes a stream (its stdin)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import struct
import termios
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import WSMsgType, web

from localcluster.errors import ApiError

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
READ_SIZE = 32 * 1024


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("true", "1")


def status(code: int, argv: Sequence[str]) -> dict[str, Any]:
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(argv)}], exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


async def serve(request: web.Request, argv: Sequence[str], command: Sequence[str],
                env: Mapping[str, str]) -> web.StreamResponse:
    """Upgrade to a WebSocket and run `argv` (`command`, wrapped to enter the container)."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ApiError.bad_request("pods/exec needs a WebSocket upgrade with the "
                                   "v5.channel.k8s.io or v4.channel.k8s.io subprotocol")
    q = request.query
    tty = _flag(q, "tty")
    want_stdin = _flag(q, "stdin")
    ws = web.WebSocketResponse(protocols=PROTOCOLS, autoping=True)
    await ws.prepare(request)
    v5 = ws.ws_protocol == PROTOCOLS[0]
    master = slave = -1
    if tty:
        master, slave = os.openpty()
        setsid = shutil.which("setsid")
        argv = [setsid, "-c", *argv] if setsid else list(argv)
        stdio: dict[str, Any] = {"stdin": slave, "stdout": slave, "stderr": slave}
    else:
        stdio = {"stdin": asyncio.subprocess.PIPE if want_stdin else
                 asyncio.subprocess.DEVNULL,
                 "stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE}
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=dict(env),
                                                    start_new_session=True, **stdio)
    except OSError as e:
        await ws.send_bytes(bytes([ERROR]) + json.dumps({
            "metadata": {}, "status": "Failure", "message": f"cannot run {command[0]}: {e}",
            "reason": "InternalError", "code": 500}).encode())
        await ws.close()
        return ws
    finally:
        if slave >= 0:
            os.close(slave)
    pumps = []
    if tty:
        pumps.append(asyncio.create_task(_pump_fd(master, ws)))
    else:
        assert proc.stdout is not None and proc.stderr is not None
        pumps += [asyncio.create_task(_pump(proc.stdout, STDOUT, ws)),
                  asyncio.create_task(_pump(proc.stderr, STDERR, ws))]
    reader = asyncio.create_task(_read_client(ws, proc, master, v5))
    try:
        code = await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps, return_exceptions=True), 1.0)
        exit_code = code if code >= 0 else 128 - code
        if not ws.closed:
            await ws.send_bytes(bytes([ERROR]) + json.dumps(status(exit_code, command)).encode())
            await ws.close()
    finally:
        reader.cancel()
        for p in pumps:
            p.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
        if master >= 0:
            os.close(master)
    return ws


async def _pump(stream: asyncio.StreamReader, channel: int, ws: web.WebSocketResponse
                ) -> None:
    while chunk := await stream.read(READ_SIZE):
        await ws.send_bytes(bytes([channel]) + chunk)


async def _pump_fd(fd: int, ws: web.WebSocketResponse) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, fd, READ_SIZE)
        except OSError:  # EIO: the terminal's last user is gone
            return
        if not chunk:
            return
        await ws.send_bytes(bytes([STDOUT]) + chunk)


async def _read_client(ws: web.WebSocketResponse, proc: asyncio.subprocess.Process,
                       master: int, v5: bool) -> None:
    async for msg in ws:
        if msg.type != WSMsgType.BINARY or not msg.data:
            continue
        channel, data = msg.data[0], msg.data[1:]
        if channel == STDIN and data:
            if master >= 0:
                os.write(master, data)
            elif proc.stdin is not None:
                proc.stdin.write(data)
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
        elif channel == RESIZE and master >= 0:
            with contextlib.suppress(ValueError, OSError):
                size = json.loads(data)
                fcntl.ioctl(master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", int(size["Height"]), int(size["Width"]), 0, 0))
        elif channel == CLOSE and v5 and data[:1] == bytes([STDIN]):
            if master >= 0:
                os.write(master, b"\x04")
            elif proc.stdin is not None:
                proc.stdin.close()
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
