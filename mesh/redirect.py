"""AnyIP routes that make a service CIDR local, so the proxy can take its traffic.

This module owns the `local <cidr> dev lo table local` routes (what
`ip route add local 10.96.0.0/16 dev lo table local` installs). With such a
route in a network namespace, the kernel treats every address of the CIDR as
its own: a process can bind a listener on any of them, a connect() to one of
them reaches that listener, and the accepting side's `getsockname()` gives the
original destination. No iptables is involved.

Every function takes the name of a network namespace (one under
/var/run/netns, as `ip netns` names them); None means the caller's own
namespace, which is what the VM agent uses. Adding a route twice and removing
a missing one both succeed. The functions block briefly (netlink); from asyncio
code call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from mesh.errors import NetlinkError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

NETNS_RUN_DIR = os.environ.get("MESHGATE_NETNS_DIR", "/var/run/netns")
"""Where named network namespaces are bind-mounted (iproute2's place by default)."""
LOCAL_TABLE = 255
"""The kernel's `local` routing table, consulted before `main`."""
RTN_LOCAL = 2
RTPROT_KERNEL = 2
RT_SCOPE_HOST = 254
LOOPBACK = "lo"
RTPROT_BOOT = 3
"""What `ip route add` marks its routes with, and so ours by default."""
RTPROT_MESHGATE = 77
"""The protocol the VM agent marks its routes with, so that it finds every route it
added (and only those) even after a crash: `ip route show table local proto 77`."""


def ensure_local_route(cidr: Network | str, *, netns: str | None = None,
                       proto: int = RTPROT_BOOT) -> None:
    """Make every address of `cidr` local in `netns` (None: this namespace); idempotent."""
    net = _network(cidr)
    where = _where(netns)
    if netns is not None and not _netns_exists(netns):
        raise NetlinkError(f"cannot make {net} local: network namespace {netns!r} does not "
                           "exist; create it first")
    with _iproute(netns, f"make {net} local {where}") as ipr:
        lo = _loopback_index(ipr)
        # A local route on a down loopback accepts nothing, and IPv6 refuses
        # the route outright, so the loopback is brought up first.
        ipr.link("set", index=lo, state="up")
        ipr.route("replace", proto=proto, **_route_spec(net, lo))


def remove_local_route(cidr: Network | str, *, netns: str | None = None) -> None:
    """Remove the AnyIP route for `cidr` from `netns` (None: this namespace); a missing
    route or namespace counts as removed."""
    net = _network(cidr)
    if netns is not None and not _netns_exists(netns):
        return
    with _iproute(netns, f"remove the local route for {net} {_where(netns)}") as ipr:
        try:
            ipr.route("del", **_route_spec(net, _loopback_index(ipr)))
        except PyrouteNetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise


def local_routes(*, netns: str | None = None, proto: int | None = None) -> list[Network]:
    """The AnyIP routes on the loopback of `netns` that someone added (not the kernel's
    own); only those marked `proto` when it is given."""
    if netns is not None and not _netns_exists(netns):
        raise NetlinkError(f"cannot list local routes: network namespace {netns!r} does not exist")
    found: list[Network] = []
    with _iproute(netns, f"list local routes {_where(netns)}") as ipr:
        lo = _loopback_index(ipr)
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.route("dump", family=family, table=LOCAL_TABLE):
                if (route["type"] != RTN_LOCAL or route["proto"] == RTPROT_KERNEL
                        or route.get_attr("RTA_OIF") != lo
                        or (proto is not None and route["proto"] != proto)):
                    continue
                dst = route.get_attr("RTA_DST")
                found.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}"))
    return found


BYPASS_PRIORITY = 100
"""Rules sending a skipped port's traffic to the `main` table, ahead of `local`."""
LOCAL_RULE_PRIORITY = 200
"""Where `ensure_port_bypass` moves the `lookup local` rule (the kernel's is at 0, which
no rule can precede)."""
MAIN_TABLE = 254


def ensure_port_bypass(cidr: Network | str, ports: list[tuple[int, int]], *,
                       netns: str | None = None) -> None:
    """Let TCP connections to `cidr` on `ports` (inclusive ranges) leave by the `main`
    table instead of the AnyIP route: one rule per range at `BYPASS_PRIORITY`, the
    `local` lookup moved behind them (added at `LOCAL_RULE_PRIORITY` before the one at
    0 goes, so no moment lacks it). Listeners may still bind the addresses: binding
    consults the local table itself, not the rules. Idempotent."""
    net = _network(cidr)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    with _iproute(netns, f"route ports of {net} past the proxy {_where(netns)}") as ipr:
        rules = [(r.get("priority") or 0, r["table"], r.get("dst"), r["dst_len"],
                  r.get("ip_proto"), r.get("dport_range"))
                 for r in ipr.rule("dump", family=family)]
        whole = (None, 0, None, None)
        if (LOCAL_RULE_PRIORITY, LOCAL_TABLE, *whole) not in rules:
            ipr.rule("add", family=family, priority=LOCAL_RULE_PRIORITY, table=LOCAL_TABLE)
        if (0, LOCAL_TABLE, *whole) in rules:
            ipr.rule("delete", family=family, priority=0, table=LOCAL_TABLE)
        for low, high in ports:
            spec = {"priority": BYPASS_PRIORITY, "table": MAIN_TABLE,
                    "dst": str(net.network_address), "dst_len": net.prefixlen,
                    "ip_proto": socket.IPPROTO_TCP, "dport_range": f"{low}:{high}"}
            if tuple(spec.values()) not in rules:
                ipr.rule("add", family=family, **spec)


def _network(cidr: Network | str) -> Network:
    try:
        return ipaddress.ip_network(cidr)
    except ValueError as e:
        raise NetlinkError(f"{cidr!r} is not a CIDR with its host bits zero "
                           f"(for example 10.96.0.0/16): {e}") from None


def _route_spec(net: Network, lo: int) -> dict[str, Any]:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return {"family": family, "dst": str(net), "type": "local", "oif": lo,
            "table": LOCAL_TABLE, "scope": RT_SCOPE_HOST}


def _where(netns: str | None) -> str:
    return "in this network namespace" if netns is None else f"in network namespace {netns!r}"


def _netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def _loopback_index(ipr: IPRoute) -> int:
    found = ipr.link_lookup(ifname=LOOPBACK)
    if not found:
        raise NetlinkError("the network namespace has no loopback interface 'lo'")
    return int(found[0])


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@contextmanager
def _iproute(netns: str | None, action: str) -> Iterator[IPRoute]:
    """An rtnetlink connection in `netns`; netlink failures become `NetlinkError`."""
    if _on_event_loop():
        # pyroute2's synchronous API runs its own loop, which cannot nest in a running one.
        raise NetlinkError(f"cannot {action} on the event loop's thread: it blocks; "
                           "call it through `await asyncio.to_thread(...)`")
    try:
        # flags=0: open the namespace, never create it.
        ipr = IPRoute() if netns is None else IPRoute(netns=netns, flags=0)
    except OSError as e:
        raise NetlinkError(f"cannot {action}: {e.strerror or e}") from e
    try:
        with ipr:
            yield ipr
    except PyrouteNetlinkError as e:
        hint = (" (needs CAP_NET_ADMIN: run as root)"
                if e.code in (errno.EPERM, errno.EACCES) else "")
        raise NetlinkError(f"cannot {action}: {os.strerror(e.code)}{hint}") from e
