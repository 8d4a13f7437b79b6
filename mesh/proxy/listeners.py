"""Listening sockets of the proxy and gateway, and, when one cannot be bound, who
holds its address.

Every listener sets SO_REUSEPORT so that ``--workers N`` processes share it.
Redirected listeners (a service's VIP:port) also set IP_FREEBIND (IPV6_FREEBIND
for IPv6): they bind before the address is local, and the kernel delivers to them
once a route makes it so, which lets the VM agent add its AnyIP route after the
proxy has learned of a service.

A bind that fails because the address is in use names the process holding it,
found as ``ss -ltnp`` does: the socket's inode in ``/proc/net/tcp{,6}``, then the
process with that inode among its descriptors. That is read only on this failure
path; only processes of the proxy's own user (or all, as root) can be inspected.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from mesh.config import split_address
from mesh.errors import ConfigError

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)  # linux/in6.h
BACKLOG = 1024
PROC = Path("/proc")


def bind(address: str, *, freebind: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket on HOST:PORT (SO_REUSEPORT; IP_FREEBIND
    when ``freebind``). Raises OSError as bind and listen do."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen(factory: Callable[[], asyncio.BaseProtocol], address: str, what: str
                 ) -> asyncio.AbstractServer:
    """A listener on HOST:PORT, shared with other workers (SO_REUSEPORT); a
    `ConfigError` naming the cause (and who holds the address) when it cannot bind."""
    host, port = split_address(address)
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(factory, host, port, reuse_port=True,
                                        backlog=BACKLOG)
    except OSError as e:
        cause = bind_failure(e, address)
        advice = "; stop that process or listen elsewhere" if \
            e.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"{what} listener cannot bind {address}: {cause}{advice}") from e


def bind_failure(error: OSError, address: str) -> str:
    """Why binding ``address`` failed, in words: for an address in use, who holds it."""
    if error.errno != errno.EADDRINUSE:
        return str(error.strerror or error)
    host, port = split_address(address)
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            inodes |= sockets_on(_read(PROC / "net" / table), host, port)
        except OSError:
            continue
    if not inodes:
        return "address in use"
    owners = holders(inodes)
    if not owners:
        return (f"address in use by a process this user cannot inspect (socket inode "
                f"{min(inodes)}); `sudo ss -ltnp 'sport = :{port}'` names it")
    pids = ", ".join(f"{pid} ({name})" for pid, name in owners)
    return f"address in use by pid{'s' if len(owners) > 1 else ''} {pids}"


def sockets_on(table: str, host: str, port: int) -> set[int]:
    """Inodes of the sockets in ``table`` (the text of /proc/net/tcp or tcp6) bound
    where a listener on ``host:port`` would collide: that address, or every address
    (a wildcard), on that port."""
    want = ipaddress.ip_address(host)
    found: set[int] = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        addr_hex, _, port_hex = fields[1].partition(":")
        try:
            inode, local_port, addr = int(fields[9]), int(port_hex, 16), _proc_address(addr_hex)
        except ValueError:
            continue  # not a line this parser understands; the others still count
        if inode == 0 or local_port != port:
            continue  # 0: a connection in TIME_WAIT, which holds no descriptor
        mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
        if addr.is_unspecified or addr == want or mapped == want:
            found.add(inode)
    return found


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian)
    order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def holders(inodes: Iterable[int]) -> list[tuple[int, str]]:
    """(pid, command name) of each process that has one of the sockets ``inodes``
    open, among those this process may inspect."""
    links = {f"socket:[{inode}]" for inode in inodes}
    out: list[tuple[int, str]] = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if _holds(entry / "fd", links):
                out.append((int(entry.name), _read(entry / "comm").strip()))
        except OSError:
            continue  # another user's process, or one that just exited
    return sorted(out)


def _holds(fd_dir: Path, links: set[str]) -> bool:
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) in links:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace")
