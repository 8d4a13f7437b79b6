"""The service addresses made local on the VM, so its applications' connections
to them land on the proxy with their original destination (no iptables).

One AnyIP route per service address (``local 10.96.0.12/32 dev lo table
local``), marked with the agent's own route protocol (`RTPROT_MESHGATE`), so
the set is read back from the kernel rather than remembered: a restarted
agent, or `vm leave` after a crash, finds exactly the routes the agent added
and no other. The proxy binds its listener for each address with
IP_FREEBIND, so it does not matter which of the two learns of a service first.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from mesh import redirect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutePlan:
    add: tuple[redirect.Network, ...]
    remove: tuple[redirect.Network, ...]


def host_network(address: str) -> redirect.Network:
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


def plan(current: Iterable[redirect.Network], addresses: Iterable[str]) -> RoutePlan:
    """What to change so that exactly `addresses` are local (as host routes)."""
    have = set(current)
    want = {host_network(a) for a in addresses}
    return RoutePlan(tuple(sorted(want - have, key=str)), tuple(sorted(have - want, key=str)))


def current() -> list[redirect.Network]:
    """The routes the agent has added in this namespace."""
    return redirect.local_routes(proto=redirect.RTPROT_MESHGATE)


def sync(addresses: Iterable[str]) -> RoutePlan:
    """Make exactly `addresses` local; blocking (netlink), call through a thread."""
    todo = plan(current(), addresses)
    for net in todo.add:
        redirect.ensure_local_route(net, proto=redirect.RTPROT_MESHGATE)
    for net in todo.remove:
        redirect.remove_local_route(net)
    if todo.add or todo.remove:
        log.info("service routes changed added=%d removed=%d", len(todo.add), len(todo.remove))
    return todo


def remove_all() -> int:
    """Remove every route the agent added; how many there were."""
    found = current()
    for net in found:
        redirect.remove_local_route(net)
    return len(found)
