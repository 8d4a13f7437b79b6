"""Named network namespaces and netlink: the primitives every topology is built from
(a cluster's node and pods in localcluster.netns, the shared WAN in localcluster.wan).

Namespaces are bind-mounted under `NETNS_RUN_DIR`. Netlink calls go through
`iproute`, which turns pyroute2's and the kernel's errors into `TopologyError`s
that say what was being done and, for a missing privilege, how to get it.
`socket_in_namespace` makes a socket in another namespace without moving the
calling thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from mesh import redirect
from mesh.errors import NetlinkError

NETNS_RUN_DIR = Path(redirect.NETNS_RUN_DIR)
"""Where named namespaces are bind-mounted: iproute2's place, or, for a cluster run
without root, a directory of its own inside its private mount namespace
(localcluster.rootless)."""
pyroute2_netns.NETNS_RUN_DIR = str(NETNS_RUN_DIR)
ROOT_HINT = "run as root, or under `unshare --user --map-root-user --net --mount`"
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_CAPS = ((12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN"))


class TopologyError(NetlinkError):
    """A cluster's namespaces, bridge or pods could not be built, changed or removed."""


class NotPermittedError(TopologyError):
    """The process lacks CAP_NET_ADMIN or CAP_SYS_ADMIN."""


class NamespaceTakenError(TopologyError):
    """A network namespace with the name the topology needs exists and is not ours."""


def namespace_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    return namespace_path(name).exists()


def _effective_caps() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_privileges() -> None:
    caps = _effective_caps()
    missing = [name for bit, name in _CAPS if not caps >> bit & 1]
    if missing:
        raise NotPermittedError(f"building network namespaces needs {' and '.join(missing)}: "
                                f"{ROOT_HINT}")


def translate(action: str, e: BaseException) -> TopologyError:
    code = getattr(e, "code", None) if isinstance(e, PyrouteNetlinkError) else getattr(
        e, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else str(e)
    if code in (errno.EPERM, errno.EACCES):
        return NotPermittedError(f"cannot {action}: {reason}; {ROOT_HINT}")
    if code == errno.ERANGE:
        reason += " (is an interface name longer than 15 characters?)"
    return TopologyError(f"cannot {action}: {reason}")


@contextmanager
def iproute(netns: str, action: str) -> Iterator[IPRoute]:
    """An rtnetlink connection in `netns` (opened, never created)."""
    try:
        ipr = IPRoute(netns=netns, flags=0)
    except OSError as e:
        raise translate(action, e) from e
    try:
        with ipr:
            yield ipr
    except (PyrouteNetlinkError, OSError) as e:
        raise translate(action, e) from e


def require_off_event_loop(action: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    # pyroute2's synchronous API runs its own loop, which cannot nest in a running one.
    raise TopologyError(f"{action} blocks and cannot run on the event loop's thread; call it "
                        "through `await asyncio.to_thread(...)`")


@contextmanager
def locked(path: Path, *, timeout: float = 30.0) -> Iterator[None]:
    """An exclusive fcntl lock on the file `path` (created if absent), across threads and
    processes; a holder that keeps it past `timeout` seconds is reported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TopologyError(f"another process has held {path} for {timeout:.0f} s; "
                                        "wait for it or stop it") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def create(name: str, owner: str) -> None:
    try:
        pyroute2_netns.create(name)
    except FileExistsError:
        raise taken(name, owner) from None
    except OSError as e:
        raise translate(f"create network namespace {name!r}", e) from e


def delete(name: str) -> None:
    if not exists(name):
        return
    try:
        pyroute2_netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise translate(f"delete network namespace {name!r}", e) from e


def taken(name: str, owner: str) -> NamespaceTakenError:
    return NamespaceTakenError(f"network namespace {name!r} already exists and is not part of "
                               f"{owner}; delete it (`ip netns delete {name}`) or choose "
                               "another name")


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM:
            raise NotPermittedError(f"entering network namespace {what} needs "
                                    f"CAP_SYS_ADMIN: {ROOT_HINT}")
        raise TopologyError(f"cannot enter network namespace {what}: {os.strerror(code)}")


def run_in_namespace(netns: str, action: Callable[[], T]) -> T:
    """`action()` run in network namespace `netns`, by a short-lived thread that enters
    it and ends there; its result is returned and its exception raised here. The
    calling thread is unchanged: setns moves only the calling thread, and a process in
    a user namespace of its own (localcluster.rootless) may enter the cluster's
    namespaces but never return to the host's, which belongs to the initial user
    namespace."""
    path = namespace_path(netns)
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise TopologyError(f"network namespace {netns!r} does not exist "
                                    f"({path})") from None
            try:
                setns(target, repr(netns))
            finally:
                os.close(target)
            done.append(action())
        except BaseException as e:  # handed to the caller's thread
            failed.append(e)

    worker = threading.Thread(target=run, name=f"in-{netns}")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return done[0]


def socket_in_namespace(netns: str, family: int = socket.AF_INET,
                        type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket created in network namespace `netns`; it stays there wherever it is used,
    so one process can listen in several namespaces (`run_in_namespace`)."""
    return run_in_namespace(netns, lambda: socket.socket(family, type, proto))
