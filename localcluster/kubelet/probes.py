"""Container probes as kube's kubelet runs them: httpGet (HTTP, or HTTPS without
verifying the certificate, as kube) and tcpSocket from the
node's network namespace to the Pod's address, exec inside the container's
namespaces; each answers success or failure with kube's message."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localcluster.namespaces import socket_in_namespace

MAX_OUTPUT = 10 * 1024


@dataclass(frozen=True)
class Result:
    ok: bool
    message: str = ""


def _port(container: Mapping[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    if str(port).isdigit():
        return int(port)
    raise ValueError(f"port {port!r} is not one of the container's named ports")


async def _connect(node_netns: str, host: str, port: int, timeout: float, *,
                   tls: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await asyncio.to_thread(socket_in_namespace, node_netns)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    if not tls:
        return await asyncio.open_connection(sock=sock)
    return await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=_probe_tls(), server_hostname=host), timeout)


def _probe_tls() -> ssl.SSLContext:
    """kube's HTTPS probes: TLS without verifying the server's certificate
    (InsecureSkipVerify) and without a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _dial_error(host: str, port: int, e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return f"dial tcp {host}:{port}: i/o timeout"
    reason = getattr(e, "strerror", None) or str(e)
    return f"dial tcp {host}:{port}: connect: {str(reason).lower()}"


async def http_get(spec: Mapping[str, Any], container: Mapping[str, Any], *, node_netns: str,
                   pod_ip: str, timeout: float) -> Result:
    host = spec.get("host") or pod_ip
    port = _port(container, spec.get("port"))
    path = spec.get("path", "/") or "/"
    scheme = str(spec.get("scheme", "HTTP"))
    url = f"{scheme.lower()}://{host}:{port}{path}"
    if scheme not in ("HTTP", "HTTPS"):
        return Result(False, f"Get \"{url}\": unsupported protocol scheme {scheme!r}")
    headers = {"Host": f"{host}:{port}", "User-Agent": "kube-probe/1.32",
               "Accept": "*/*", "Connection": "close"}
    for h in spec.get("httpHeaders") or []:
        headers[h["name"]] = h["value"]
    try:
        reader, writer = await _connect(node_netns, host, port, timeout,
                                        tls=scheme == "HTTPS")
    except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
        return Result(False, f"Get \"{url}\": {_dial_error(host, port, e)}")
    try:
        request = f"GET {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(request.encode())
        status_line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError) as e:
        return Result(False, f"Get \"{url}\": {e or 'context deadline exceeded'}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.decode(errors="replace").split()
    if len(parts) < 2 or not parts[1].isdigit():
        return Result(False, f"Get \"{url}\": malformed HTTP response")
    code = int(parts[1])
    if 200 <= code < 400:
        return Result(True)
    return Result(False, f"HTTP probe failed with statuscode: {code}")


async def tcp_socket(spec: Mapping[str, Any], container: Mapping[str, Any], *,
                     node_netns: str, pod_ip: str, timeout: float) -> Result:
    host = spec.get("host") or pod_ip
    port = _port(container, spec.get("port"))
    try:
        _, writer = await _connect(node_netns, host, port, timeout)
    except (OSError, TimeoutError) as e:
        return Result(False, _dial_error(host, port, e))
    writer.close()
    return Result(True)


async def run_exec(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=dict(env), start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return Result(False, f"command timed out after {timeout:g}s")
    text = out[:MAX_OUTPUT].decode(errors="replace")
    return Result(proc.returncode == 0, text)
